"""Data for altgrad: text sources, a content-hashed token cache and Trainer-ready datasets.

Example:
    >>> from altgrad.data import DataConfig, prepare_data
    >>> cfg = DataConfig(source="shakespeare_char", path="input.txt")  # doctest: +SKIP
    >>> data = prepare_data(cfg, block_size=256, num_train_samples=320_000)  # doctest: +SKIP
    >>> trainer = Trainer(model, args, train_dataset=data.train_dataset,
    ...                   eval_dataset=data.eval_dataset)  # doctest: +SKIP
"""

from altgrad.data.config import DataConfig
from altgrad.data.prepare import PreparedData, prepare_data, split_text
from altgrad.data.sources import RawCorpus, load_corpus, resolve_tiny_shakespeare
from altgrad.data.torch_datasets import RandomWindowDataset, SequentialBlockDataset

__all__ = [
    "DataConfig",
    "PreparedData",
    "RandomWindowDataset",
    "RawCorpus",
    "SequentialBlockDataset",
    "load_corpus",
    "prepare_data",
    "resolve_tiny_shakespeare",
    "split_text",
]
