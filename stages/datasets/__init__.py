"""Dataset readers, label maps, reference transforms and the synthetic dataset (method.md §1.5, §1.6, §8)."""
from .base import DatasetReader, SampleRef, check_sample
from .registry import dataset_names, get_reader
from .synthetic import SYNTHETIC_CLASS_NAMES, generate_synthetic

__all__ = [
    "SYNTHETIC_CLASS_NAMES",
    "DatasetReader",
    "SampleRef",
    "check_sample",
    "dataset_names",
    "generate_synthetic",
    "get_reader",
]
