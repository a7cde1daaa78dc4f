"""Datasets and batching: in-memory arrays, minibatches, microbatches, small real datasets."""

from ._math._data import ArrayDataset, batch_length, epoch_permutation, split_microbatches
from ._math._datasets import default_cache_dir, load_digits, load_mnist1d

__all__ = [
    "ArrayDataset",
    "batch_length",
    "default_cache_dir",
    "epoch_permutation",
    "load_digits",
    "load_mnist1d",
    "split_microbatches",
]
