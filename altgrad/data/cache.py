"""Token cache: tokenize once into ``numpy.memmap`` files keyed by a content hash.

Layout of one entry ``<cache_dir>/<name>-<key16>/``::

    train.bin  val.bin    raw token ids, uint16 (vocab < 65536) or uint32, no header
    tokenizer/            the tokenizer that made them (save_pretrained), reused on hits
    meta.json             counts, dtype, key, what was hashed; written last

Crash and concurrency safety: an entry is built in a private temp folder and published
with one atomic ``os.rename`` of the folder, so a reader sees either nothing or a
complete entry -- never a half-written file. A ``filelock.FileLock`` per key makes
concurrent callers (e.g. every rank of an ``accelerate launch``) wait for the one that
builds instead of building it N times; the atomic rename keeps things correct even on
filesystems where the lock is not honoured.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from filelock import FileLock

__all__ = [
    "CACHE_FORMAT_VERSION",
    "cache_key",
    "get_or_build",
    "read_tokens",
    "token_dtype",
    "write_tokens",
]

logger = logging.getLogger(__name__)

#: Bump when the on-disk format or the tokenization/splitting rule changes.
CACHE_FORMAT_VERSION = 1
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id: uint16 below 65536 tokens, else uint32."""
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


def cache_key(train_text: str, val_text: str, tokenizer_spec: dict) -> str:
    """sha256 over the format version, both raw texts and the tokenizer's identity.

    Hashing the train and val texts separately also captures the split rule.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT_VERSION, "tokenizer": tokenizer_spec},
                        sort_keys=True).encode())
    for text in (train_text, val_text):
        data = text.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))  # length prefix: no ambiguity at the seam
        h.update(data)
    return h.hexdigest()


def read_tokens(path: Path, dtype: np.dtype, count: int) -> np.memmap:
    """Open a token file read-only (pages are loaded lazily and shared between processes)."""
    if count == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def _entry_is_complete(entry: Path) -> dict | None:
    """meta.json of a finished entry, or None if missing/inconsistent (then it is rebuilt)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        for split in SPLITS:
            expected = meta[f"{split}_tokens"] * dtype.itemsize
            if (entry / f"{split}.bin").stat().st_size != expected:
                return None
        if not (entry / "tokenizer" / "tokenizer.json").is_file():
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


Builder = Callable[[Path], dict]


def get_or_build(cache_dir: Path, name: str, key: str, build: Builder) -> tuple[Path, dict, bool]:
    """Return ``(entry_dir, meta, from_cache)``, calling ``build(tmp_dir)`` on a miss.

    ``build`` writes ``train.bin``, ``val.bin`` and ``tokenizer/`` into ``tmp_dir`` and
    returns the meta dict; this function writes meta.json last and publishes the folder.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    entry = cache_dir / f"{name}-{key[:16]}"
    meta = _entry_is_complete(entry)
    if meta is not None and meta.get("key") == key:
        return entry, meta, True

    with FileLock(str(cache_dir / f".{key[:16]}.lock")):
        # Someone may have finished while we waited for the lock.
        meta = _entry_is_complete(entry)
        if meta is not None and meta.get("key") == key:
            return entry, meta, True
        if entry.exists() and _entry_is_complete(entry) is None:
            logger.warning("token cache entry %s is incomplete or corrupt; rebuilding", entry)
            _remove(entry)
        _remove_dead_builders(cache_dir, key)

        tmp = cache_dir / f".tmp-{key[:16]}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            meta = dict(build(tmp), key=key, format=CACHE_FORMAT_VERSION, created=time.time())
            _write_json_atomic(tmp / "meta.json", meta)
            _fsync_dir_files(tmp)
            try:
                os.rename(tmp, entry)  # atomic publish of the whole folder
            except OSError:
                # Another builder (on a filesystem ignoring the lock) published first.
                if _entry_is_complete(entry) is None:
                    raise
                logger.info("token cache entry %s was published concurrently", entry)
        finally:
            if tmp.exists():
                _remove(tmp)
    meta = _entry_is_complete(entry)
    if meta is None:
        raise RuntimeError(f"token cache entry {entry} is incomplete right after building it")
    return entry, meta, False


def write_tokens(path: Path, chunks: Iterator[np.ndarray], dtype: np.dtype) -> int:
    """Stream id arrays to ``path`` as raw ``dtype``; returns the number of tokens.

    Written with plain ``ndarray.tofile`` (not a pre-sized memmap) because the count is
    not known until the text is tokenized; the result is read back as a memmap.
    """
    count = 0
    info = np.iinfo(dtype)
    with open(path, "wb") as f:
        for ids in chunks:
            if ids.size and (ids.min() < 0 or ids.max() > info.max):
                raise ValueError(f"token id out of range for {dtype}: vocab does not fit")
            ids.astype(dtype, copy=False).tofile(f)
            count += int(ids.size)
    return count


def _remove_dead_builders(cache_dir: Path, key: str) -> None:
    """Delete temp folders of builders of ``key`` that crashed (same host, process gone).

    Folders of live processes -- or of other hosts, which cannot be checked -- are left
    alone, so this never pulls the rug from under a concurrent builder.
    """
    host = socket.gethostname()
    for tmp in cache_dir.glob(f".tmp-{key[:16]}-*"):
        prefix, pid, _ = tmp.name.rsplit("-", 2)
        if prefix != f".tmp-{key[:16]}-{host}" or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only checks that the process exists
        except ProcessLookupError:
            _remove(tmp)
        except PermissionError:
            pass  # exists, owned by someone else


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _fsync_dir_files(folder: Path) -> None:
    # Flush file contents before the rename makes them visible (power-loss safety).
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _remove(path: Path) -> None:
    # Rename first, so a half-deleted folder never sits under a name anyone reads.
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)
