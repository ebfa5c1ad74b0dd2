"""``DataConfig``: which text to train on, how to tokenize it, where to cache the tokens."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DataConfig", "SOURCES", "DEFAULT_CACHE_DIR", "CACHE_ENV", "TINY_SHAKESPEARE_ENV"]

#: Accepted values of ``DataConfig.source``.
SOURCES = ("shakespeare_char", "text", "hf", "eurlex")
#: Built-in tokenizer kinds; any other value of ``DataConfig.tokenizer`` is a path or Hub name.
TOKENIZER_KINDS = ("char", "bpe")
DEFAULT_CACHE_DIR = "~/.cache/altgrad/data"
#: Environment variable that moves the token cache when ``cache_dir`` is left at its default.
CACHE_ENV = "ALTGRAD_DATA_CACHE"
#: Environment variable pointing at a local Tiny Shakespeare ``input.txt``.
TINY_SHAKESPEARE_ENV = "ALTGRAD_TINYSHAKESPEARE"


@dataclass(frozen=True)
class DataConfig:
    """Data section of a run config (YAML-friendly: plain scalars only).

    Sources:
        * ``shakespeare_char`` -- Tiny Shakespeare; ``path`` (else ``$ALTGRAD_TINYSHAKESPEARE``,
          else a download) is nanoGPT's ``input.txt``. With ``tokenizer="char"`` this is
          nanoGPT's ``shakespeare_char`` exactly (65 symbols, 1,003,854 / 111,540 tokens).
        * ``text`` -- ``path`` is a text file, a folder (files matching ``file_pattern``,
          sorted by path) or a glob; each file is one document.
        * ``hf`` -- ``hf_name`` is a Hub dataset, a local dataset folder (data files or
          ``save_to_disk`` output) or a builder such as ``"json"``/``"parquet"`` with the
          files in ``path``; one row of ``text_column`` is one document.
        * ``eurlex`` -- English MultiEURLEX: local ``.jsonl``/``.json``/``.parquet`` files in
          ``path`` with a ``text`` field, else the Hub's parquet copy (see
          ``altgrad.data.sources.EURLEX_PARQUET``). Meant for ``tokenizer="bpe"``.

    Documents are joined with a separator before splitting: the EOS token
    ``<|endoftext|>`` for BPE (and for loaded tokenizers that have an EOS token),
    a blank line ``"\\n\\n"`` otherwise. The joined text is split by characters like
    nanoGPT's ``prepare.py``: the first ``1 - val_fraction`` is train, the rest
    validation (unless ``hf_eval_split`` names a separate split).

    Example:
        >>> cfg = DataConfig(path="input.txt", cache_dir="/tmp/altgrad-cache")
        >>> cfg.source, cfg.tokenizer, cfg.val_fraction
        ('shakespeare_char', 'char', 0.1)
        >>> DataConfig(source="wiki")
        Traceback (most recent call last):
        ...
        ValueError: data.source='wiki' is not supported; use one of 'shakespeare_char', 'text', 'hf', 'eurlex'
    """

    # Where the text comes from: "shakespeare_char", "text", "hf" or "eurlex".
    source: str = "shakespeare_char"
    # Local file / folder / glob. shakespeare_char: input.txt; text: the corpus; hf: data_files
    # for a builder like "json"; eurlex: local jsonl/parquet files (skips the Hub).
    path: str | None = None
    # Files read from a `path` folder (text and eurlex sources), relative glob, recursive with **.
    file_pattern: str = "**/*.txt"
    # hf: dataset name on the Hub, a local dataset folder, or a builder ("json", "parquet", "csv").
    # eurlex: an alternative Hub copy; None = the built-in parquet copy.
    hf_name: str | None = None
    # hf: dataset config name. eurlex: language code of the built-in copy (None = "en").
    hf_config: str | None = None
    # hf/eurlex: split to train on.
    hf_split: str = "train"
    # hf/eurlex: split to evaluate on (e.g. "validation"); None = last val_fraction of hf_split.
    hf_eval_split: str | None = None
    # hf/eurlex: column holding the document text.
    text_column: str = "text"
    # "char" (nanoGPT characters), "bpe" (byte-level BPE trained on the train split),
    # or a tokenizer directory / Hub name loaded with AutoTokenizer.
    tokenizer: str = "char"
    # Vocabulary size of the trained BPE tokenizer (tokenizer="bpe" only), >= 257.
    bpe_vocab_size: int = 8192
    # Fraction of the text (by characters, at the end) held out for evaluation, in (0, 1).
    val_fraction: float = 0.1
    # Token cache folder; $ALTGRAD_DATA_CACHE replaces the default when this is left unchanged.
    cache_dir: str = DEFAULT_CACHE_DIR
    # Evaluate on at most this many blocks, evenly spread over the val split (None = all).
    max_eval_blocks: int | None = None
    # Seed of the random training windows (window i is a function of (seed, i) only).
    seed: int = 1337

    def __post_init__(self) -> None:
        def fail(field: str, problem: str) -> None:
            raise ValueError(f"data.{field}={getattr(self, field)!r} {problem}")

        if self.source not in SOURCES:
            fail("source", "is not supported; use one of " + ", ".join(repr(s) for s in SOURCES))
        for field in ("path", "hf_name", "hf_config", "hf_eval_split"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not value):
                fail(field, "must be a non-empty string or null")
        for field in ("file_pattern", "hf_split", "text_column", "tokenizer", "cache_dir"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                fail(field, "must be a non-empty string")
        if self.source == "text" and self.path is None:
            fail("path", "is required for data.source='text' (a text file, a folder or a glob)")
        if self.source == "hf" and self.hf_name is None:
            fail("hf_name", "is required for data.source='hf' (a Hub dataset name, a local "
                 "dataset folder, or a builder like 'json' with data.path)")
        if self.source in ("shakespeare_char", "text") and (
            self.hf_eval_split is not None or self.hf_name is not None
        ):
            fail("hf_name" if self.hf_name is not None else "hf_eval_split",
                 f"only applies to data.source 'hf' or 'eurlex', not {self.source!r}")
        if not _is_int(self.bpe_vocab_size) or not 257 <= self.bpe_vocab_size < 2**32:
            fail("bpe_vocab_size", "must be an integer >= 257 (256 bytes + <|endoftext|>)")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) \
                or not 0.0 < float(self.val_fraction) < 1.0:
            fail("val_fraction", "must be a number strictly between 0 and 1")
        if self.max_eval_blocks is not None and (
            not _is_int(self.max_eval_blocks) or self.max_eval_blocks < 1
        ):
            fail("max_eval_blocks", "must be a positive integer or null (all blocks)")
        if not _is_int(self.seed):
            fail("seed", "must be an integer")

    def resolved_cache_dir(self) -> Path:
        """``cache_dir`` with ``~`` expanded; ``$ALTGRAD_DATA_CACHE`` if it was left at the default."""
        cache_dir = self.cache_dir
        if cache_dir == DEFAULT_CACHE_DIR and os.environ.get(CACHE_ENV):
            cache_dir = os.environ[CACHE_ENV]
        return Path(cache_dir).expanduser()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
