"""``prepare_data``: source -> split -> tokenizer -> cached token files -> torch datasets."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
from transformers import PreTrainedTokenizerFast

from altgrad.data.cache import cache_key, get_or_build, read_tokens, token_dtype, write_tokens
from altgrad.data.config import DataConfig
from altgrad.data.sources import RawCorpus, load_corpus
from altgrad.data.torch_datasets import RandomWindowDataset, SequentialBlockDataset
from altgrad.modeling.tokenization import (
    EOT_TOKEN,
    build_char_tokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)

__all__ = ["PreparedData", "prepare_data", "split_text"]

logger = logging.getLogger(__name__)

#: Document separator when the tokenizer has no EOS token (char tokenizer): a blank line.
PLAIN_SEPARATOR = "\n\n"
# Texts are encoded in chunks of about this many characters (bounded memory, and
# encode_batch spreads chunks over cores)...
_CHUNK_CHARS = 1 << 18
_CHUNKS_PER_BATCH = 16
# ...cut only right after a newline that precedes a non-space character. GPT-2's byte-level
# pre-tokenizer always ends a pre-token there, so BPE ids are identical to encoding the
# text in one piece (and any cut is exact for the char tokenizer). Tokenizers that add a
# prefix space at the start of every input (sentencepiece/Metaspace) may differ by a token
# at each cut, i.e. about once per 256 KiB of text.
_SAFE_CUT = re.compile(r"\n(?=\S)")


@dataclass
class PreparedData:
    """Everything the trainer needs from the data side."""

    #: Random training windows (``num_train_samples`` of them).
    train_dataset: RandomWindowDataset
    #: Consecutive non-overlapping blocks of the val split.
    eval_dataset: SequentialBlockDataset
    #: The tokenizer that made the tokens (loaded from the cache entry), model_max_length=block_size.
    tokenizer: PreTrainedTokenizerFast
    #: ``len(tokenizer)``: the model's embedding size.
    vocab_size: int
    #: All train token ids (read-only memmap).
    train_tokens: np.ndarray
    #: All val token ids (read-only memmap).
    val_tokens: np.ndarray
    #: The cache entry folder (train.bin, val.bin, tokenizer/, meta.json).
    cache_path: Path
    #: True when the tokens were already cached (nothing was tokenized by this call).
    from_cache: bool
    #: Contents of meta.json.
    meta: dict


def prepare_data(cfg: DataConfig, block_size: int, num_train_samples: int) -> PreparedData:
    """Load, split, tokenize (once, cached) and wrap the data of ``cfg`` for training.

    Safe to call from every process of a multi-process run: one process tokenizes and
    writes the cache entry under a file lock, the others wait and then read it.

    Example:
        >>> cfg = DataConfig(path="/data/tinyshakespeare/input.txt", cache_dir="/tmp/cache")
        >>> data = prepare_data(cfg, block_size=256, num_train_samples=5000 * 64)  # doctest: +SKIP
        >>> data.vocab_size, len(data.train_tokens), len(data.val_tokens)  # doctest: +SKIP
        (65, 1003854, 111540)
        >>> data.train_dataset[0]["input_ids"].shape  # doctest: +SKIP
        torch.Size([256])
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if not isinstance(num_train_samples, int) or num_train_samples < 1:
        raise ValueError(f"num_train_samples must be a positive integer, got {num_train_samples!r}")

    corpus = load_corpus(cfg)
    kind, pretrained = _tokenizer_kind(cfg)
    separator = _separator(kind, pretrained)
    train_text, val_text = split_text(corpus, separator, cfg.val_fraction)
    spec = _tokenizer_spec(cfg, kind, pretrained)
    key = cache_key(train_text, val_text, spec)

    def build(tmp: Path) -> dict:
        logger.info("tokenizing %s (%d + %d chars) with %s", corpus.description,
                    len(train_text), len(val_text), spec)
        tok = _make_tokenizer(cfg, kind, pretrained, train_text, val_text, separator)
        tok.save_pretrained(tmp / "tokenizer")
        dtype = token_dtype(len(tok))
        counts = {split: write_tokens(tmp / f"{split}.bin", _encode_chunks(tok, text), dtype)
                  for split, text in (("train", train_text), ("val", val_text))}
        return {
            "source": corpus.description,
            "tokenizer": spec,
            "separator": separator,
            "val_fraction": None if corpus.eval_documents is not None else cfg.val_fraction,
            "vocab_size": len(tok),
            "dtype": dtype.name,
            "train_chars": len(train_text),
            "val_chars": len(val_text),
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "tokenizers_version": tokenizers.__version__,
        }

    name = f"{cfg.source}-{kind}"
    entry, meta, from_cache = get_or_build(cfg.resolved_cache_dir(), name, key, build)
    logger.info("token cache %s %s", "hit" if from_cache else "written", entry)

    tokenizer = load_tokenizer(entry / "tokenizer", model_max_length=block_size)
    dtype = np.dtype(meta["dtype"])
    train_tokens = read_tokens(entry / "train.bin", dtype, meta["train_tokens"])
    val_tokens = read_tokens(entry / "val.bin", dtype, meta["val_tokens"])
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) < block_size + 1:
            raise ValueError(
                f"the {split} split has {len(tokens)} tokens, fewer than one block + 1 "
                f"(block_size + 1 = {block_size + 1}); use a smaller block size or more text "
                f"(data.path / data.hf_name), or change data.val_fraction"
            )
    return PreparedData(
        train_dataset=RandomWindowDataset(train_tokens, block_size, num_train_samples, cfg.seed),
        eval_dataset=SequentialBlockDataset(val_tokens, block_size, cfg.max_eval_blocks),
        tokenizer=tokenizer,
        vocab_size=len(tokenizer),
        train_tokens=train_tokens,
        val_tokens=val_tokens,
        cache_path=entry,
        from_cache=from_cache,
        meta=meta,
    )


def split_text(corpus: RawCorpus, separator: str, val_fraction: float) -> tuple[str, str]:
    """Join documents with ``separator``; split by characters like nanoGPT's prepare.py.

    ``train = text[:int(n * (1 - val_fraction))]``, ``val`` = the rest (for Tiny
    Shakespeare and 0.1: nanoGPT's ``data[:int(n*0.9)]``). A corpus with its own eval
    documents is not split.

    Example:
        >>> split_text(RawCorpus(["abcdefghij"], None, ""), "\\n\\n", 0.2)
        ('abcdefgh', 'ij')
    """
    text = separator.join(corpus.documents)
    if corpus.eval_documents is not None:
        train, val = text, separator.join(corpus.eval_documents)
    else:
        n_train = int(len(text) * (1 - val_fraction))
        train, val = text[:n_train], text[n_train:]
    for split, part in (("train", train), ("val", val)):
        if not part:
            raise ValueError(
                f"the {split} split is empty ({len(text)} characters in total); add text "
                f"(data.path / data.hf_name) or change data.val_fraction"
            )
    return train, val


# ----------------------------------------------------------------------------- tokenizer


def _tokenizer_kind(cfg: DataConfig) -> tuple[str, PreTrainedTokenizerFast | None]:
    if cfg.tokenizer in ("char", "bpe"):
        return cfg.tokenizer, None
    try:
        return "pretrained", load_tokenizer(cfg.tokenizer)
    except ValueError as e:
        raise ValueError(f"data.tokenizer={cfg.tokenizer!r}: {e}") from e


def _separator(kind: str, pretrained: PreTrainedTokenizerFast | None) -> str:
    if kind == "bpe":
        return EOT_TOKEN
    if kind == "pretrained" and pretrained.eos_token:
        return pretrained.eos_token
    return PLAIN_SEPARATOR


def _tokenizer_spec(cfg: DataConfig, kind: str, pretrained) -> dict:
    """Identity of the tokenizer for the cache key.

    char/bpe are functions of the (hashed) text plus these settings; a loaded tokenizer is
    identified by the hash of its full definition, not by its name.
    """
    if kind == "char":
        return {"kind": "char"}
    if kind == "bpe":
        return {"kind": "bpe", "vocab_size": cfg.bpe_vocab_size, "special_tokens": [EOT_TOKEN]}
    return {"kind": "pretrained", "fingerprint": tokenizer_fingerprint(pretrained)}


def _make_tokenizer(cfg, kind, pretrained, train_text, val_text, separator):
    if kind == "char":
        # nanoGPT builds the vocabulary from the whole text, val included; the set union
        # avoids concatenating the two texts.
        return build_char_tokenizer("".join(sorted(set(train_text) | set(val_text))))
    if kind == "bpe":
        # Trained on the train split only (no peeking at val), one document at a time.
        docs = (d for d in train_text.split(separator) if d)
        return train_bpe_tokenizer(docs, cfg.bpe_vocab_size, special_tokens=(EOT_TOKEN,))
    return pretrained


def _chunks(text: str, size: int | None = None) -> Iterator[str]:
    size = _CHUNK_CHARS if size is None else size
    start, n = 0, len(text)
    while start < n:
        cut = _SAFE_CUT.search(text, start + size) if n - start > size else None
        end = cut.end() if cut else n
        yield text[start:end]
        start = end


def _encode_chunks(tok: PreTrainedTokenizerFast, text: str) -> Iterator[np.ndarray]:
    """Token ids of ``text`` (no BOS/EOS added), chunk by chunk, via the tokenizers backend.

    The backend is called directly: it batches across cores, and the transformers
    wrapper would warn about sequences longer than model_max_length.
    """
    backend = tok.backend_tokenizer
    batch: list[str] = []
    for chunk in _chunks(text):
        batch.append(chunk)
        if len(batch) == _CHUNKS_PER_BATCH:
            yield from _encode_batch(backend, batch)
            batch = []
    if batch:
        yield from _encode_batch(backend, batch)


def _encode_batch(backend, batch: list[str]) -> Iterator[np.ndarray]:
    for encoding in backend.encode_batch(batch, add_special_tokens=False):
        yield np.asarray(encoding.ids, dtype=np.int64)
