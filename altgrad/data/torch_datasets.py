"""Torch datasets over a token array, shaped for the Hugging Face ``Trainer``.

Items are ``{"input_ids": LongTensor[block_size], "labels": <the same tensor>}``.
Labels are *unshifted*: the causal LM shifts them inside its loss (HF convention), so a
block of ``block_size`` tokens gives ``block_size - 1`` next-token predictions.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["RandomWindowDataset", "SequentialBlockDataset"]


class _TokenArrayMixin:
    """Holds the token array; pickles a memmap by file name instead of by content.

    DataLoader workers started with "spawn" (and multi-process launchers) pickle the
    dataset; reopening the memmap keeps that O(1) instead of copying the whole corpus.
    """

    tokens: np.ndarray

    def _set_tokens(self, tokens) -> None:
        if isinstance(tokens, (str, os.PathLike)):
            raise TypeError("pass the token array (e.g. np.memmap), not a path")
        tokens = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must hold integer ids, got dtype {tokens.dtype}")
        self.tokens = tokens

    def __getstate__(self):
        state = self.__dict__.copy()
        tokens = state["tokens"]
        if isinstance(tokens, np.memmap) and tokens.filename is not None:
            state["tokens"] = ("memmap", tokens.filename, tokens.dtype.str, tokens.offset,
                               tokens.shape)
        return state

    def __setstate__(self, state):
        tokens = state["tokens"]
        if isinstance(tokens, tuple) and tokens and tokens[0] == "memmap":
            _, filename, dtype, offset, shape = tokens
            state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r",
                                        offset=offset, shape=shape)
        self.__dict__.update(state)

    def _block(self, start: int, block_size: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.asarray(self.tokens[start:start + block_size], dtype=np.int64))
        return {"input_ids": ids, "labels": ids}


class RandomWindowDataset(_TokenArrayMixin, Dataset):
    """``num_samples`` random windows of ``block_size`` tokens (nanoGPT's ``get_batch``).

    Unlike nanoGPT, window ``i`` starts at an offset drawn from a generator seeded with
    ``(seed, i)`` only. The Trainer's sampler then fully determines the data order, and
    resuming from a checkpoint replays exactly the same windows.

    Example:
        >>> import numpy as np
        >>> ds = RandomWindowDataset(np.arange(100, dtype=np.uint16), block_size=8,
        ...                          num_samples=1000, seed=0)
        >>> item = ds[3]
        >>> item["input_ids"].shape, bool((item["labels"] == item["input_ids"]).all())
        (torch.Size([8]), True)
        >>> bool((ds[3]["input_ids"] == item["input_ids"]).all())  # same index, same window
        True
    """

    def __init__(self, tokens, block_size: int, num_samples: int, seed: int = 0):
        self._set_tokens(tokens)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if len(self.tokens) < block_size + 1:
            raise ValueError(
                f"{len(self.tokens)} tokens are fewer than block_size + 1 = {block_size + 1}; "
                f"use a smaller block_size or more data"
            )
        self.block_size = int(block_size)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        # Offsets 0..len-block_size-1, as nanoGPT's torch.randint(len(data) - block_size),
        # so the token after every window exists (the same windows nanoGPT can draw).
        self.num_offsets = len(self.tokens) - self.block_size

    def __len__(self) -> int:
        return self.num_samples

    def offset(self, index: int) -> int:
        """Start of window ``index``: a pure function of ``(seed, index)``."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, index])
        return int(rng.integers(self.num_offsets))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self._block(self.offset(int(index)), self.block_size)


class SequentialBlockDataset(_TokenArrayMixin, Dataset):
    """Consecutive, non-overlapping blocks of ``block_size`` tokens, for evaluation.

    Block ``i`` is ``tokens[i*block_size:(i+1)*block_size]``; the final partial block is
    dropped. With ``max_blocks`` only that many blocks are kept, evenly spread over the
    whole array (a representative subset, still deterministic and non-overlapping).

    Example:
        >>> import numpy as np
        >>> ds = SequentialBlockDataset(np.arange(10), block_size=4)
        >>> len(ds), ds[1]["input_ids"].tolist()
        (2, [4, 5, 6, 7])
    """

    def __init__(self, tokens, block_size: int, max_blocks: int | None = None):
        self._set_tokens(tokens)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        n_blocks = len(self.tokens) // block_size
        if n_blocks == 0:
            raise ValueError(
                f"{len(self.tokens)} tokens are fewer than one block of {block_size}; "
                f"use a smaller block_size or more evaluation data"
            )
        if max_blocks is not None and max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1 or None, got {max_blocks}")
        self.block_size = int(block_size)
        self.total_blocks = n_blocks
        if max_blocks is None or max_blocks >= n_blocks:
            self.block_indices = np.arange(n_blocks)
        elif max_blocks == 1:
            self.block_indices = np.zeros(1, dtype=np.int64)
        else:
            # Integer spacing (not np.linspace + round: banker's rounding can repeat a block).
            i = np.arange(max_blocks, dtype=np.int64)
            self.block_indices = i * (n_blocks - 1) // (max_blocks - 1)

    def __len__(self) -> int:
        return len(self.block_indices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = int(self.block_indices[index])  # IndexError past the end, as lists do
        return self._block(block * self.block_size, self.block_size)
