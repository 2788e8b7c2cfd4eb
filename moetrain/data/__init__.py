"""Data pipeline: built-in corpus, tokenizers, prepared token files, windows, resumable sampler.

Public API: ``DataConfig``/``SourceConfig``, ``build_tokenizer``, ``build_datasets``,
``WindowDataset``, ``TokenSource``, ``ShuffledSampler``, ``BatchIterator``,
``PrefetchingBatches`` (background assembly), ``MixtureWindows``/``MixtureSampler`` (weighted
mixtures), ``MegatronIndexedDataset``/``MegatronWriter`` (Megatron-LM ``.idx``/``.bin`` reader
and writer). See docs/data.md.
"""

from moetrain.data.batches import BatchIterator, micro_batch_slices
from moetrain.data.config import DataConfig, SourceConfig
from moetrain.data.dataset import TokenSource, WindowDataset, build_datasets
from moetrain.data.megatron_indexed import MegatronIndexedDataset
from moetrain.data.megatron_writer import MegatronWriter
from moetrain.data.mixture import MixtureSampler, MixtureWindows
from moetrain.data.prefetch import PrefetchingBatches
from moetrain.data.sampler import ShuffledSampler
from moetrain.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "BatchIterator",
    "ByteTokenizer",
    "DataConfig",
    "HFTokenizer",
    "MegatronIndexedDataset",
    "MegatronWriter",
    "MixtureSampler",
    "MixtureWindows",
    "PrefetchingBatches",
    "ShuffledSampler",
    "SourceConfig",
    "TokenSource",
    "Tokenizer",
    "WindowDataset",
    "build_datasets",
    "build_tokenizer",
    "micro_batch_slices",
]
