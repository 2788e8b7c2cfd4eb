"""The training app: ``moetrain-train`` (Hydra) over the library layers."""
