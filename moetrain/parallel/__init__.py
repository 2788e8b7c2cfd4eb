"""Parallelism applied to the model from outside: the degrees and their meshes (``dims``)."""

from moetrain.parallel.dims import LayoutError, Meshes, ParallelDims, RankCoords, build_meshes

__all__ = ["LayoutError", "Meshes", "ParallelDims", "RankCoords", "build_meshes"]
