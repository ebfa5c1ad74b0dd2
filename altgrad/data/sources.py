"""Raw text sources: Tiny Shakespeare, local text files, Hugging Face datasets, EurLex.

Each source yields a :class:`RawCorpus`: a list of documents (strings) for training and,
when the source has a separate evaluation split, a list for evaluation. Joining,
splitting and tokenizing happen in :mod:`altgrad.data.prepare`.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

from altgrad.data.config import TINY_SHAKESPEARE_ENV, DataConfig

__all__ = [
    "EURLEX_PARQUET",
    "RawCorpus",
    "TINY_SHAKESPEARE_URL",
    "load_corpus",
    "resolve_tiny_shakespeare",
]

logger = logging.getLogger(__name__)

#: Where nanoGPT's data/shakespeare_char/prepare.py downloads Tiny Shakespeare from.
TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)

#: Parquet copy of MultiEURLEX used when ``data.source="eurlex"`` has neither ``path`` nor
#: ``hf_name``. The canonical ``nlpaueb/multi_eurlex`` (and ``coastalcph/multi_eurlex`` main)
#: is a loading script, which datasets>=4 refuses to run. The Hugging Face staff's
#: "Convert dataset to Parquet" commit of coastalcph/multi_eurlex holds one folder per
#: language with ``{train,validation,test}-00000-of-00001.parquet`` (en: 166/16.6/23.9 MB;
#: columns celex_id, text, labels). It is read by commit with the generic parquet builder,
#: so no script runs. Pinned to a commit whose tree lists ``en/``.
EURLEX_PARQUET = {
    "repo": "coastalcph/multi_eurlex",
    "revision": "5255066cba7318d9093a8af55f91bda28be5cdce",
    "pattern": "{lang}/{split}-*.parquet",
}

# File extensions of local EurLex dumps -> the datasets builder that reads them.
_BUILDER_BY_SUFFIX = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class RawCorpus:
    """Documents of one source, before joining and tokenization."""

    #: Training documents (or the whole corpus when ``eval_documents`` is None).
    documents: list[str]
    #: Documents of a separate evaluation split; None = hold out the tail of ``documents``.
    eval_documents: list[str] | None
    #: Human-readable origin, stored in the cache's meta.json.
    description: str


def load_corpus(cfg: DataConfig) -> RawCorpus:
    """Read the documents ``cfg`` points at (no tokenization).

    Example:
        >>> corpus = load_corpus(DataConfig(source="text", path="notes/"))  # doctest: +SKIP
        >>> len(corpus.documents)  # one per *.txt file  # doctest: +SKIP
        3
    """
    if cfg.source == "shakespeare_char":
        path = resolve_tiny_shakespeare(cfg.path, cfg.resolved_cache_dir())
        return RawCorpus([_read_text_file(path, required=True)], None, f"tinyshakespeare:{path}")
    if cfg.source == "text":
        files = _list_files(cfg.path, cfg.file_pattern, option="data.path")
        docs = [doc for doc in (_read_text_file(f, required=len(files) == 1) for f in files) if doc]
        if not docs:
            raise ValueError(
                f"data.path={cfg.path!r}: all {len(files)} file(s) are empty; "
                f"point data.path at non-empty text"
            )
        return RawCorpus(docs, None, f"text:{cfg.path} ({len(files)} files)")
    if cfg.source == "hf":
        return _load_hf(cfg, cfg.hf_name, cfg.hf_config, data_files=cfg.path)
    if cfg.source == "eurlex":
        return _load_eurlex(cfg)
    raise AssertionError(cfg.source)  # DataConfig validates the source


# ----------------------------------------------------------------------------- local files


def resolve_tiny_shakespeare(path: str | None, cache_dir: Path) -> Path:
    """Local Tiny Shakespeare ``input.txt``: ``path``, else ``$ALTGRAD_TINYSHAKESPEARE``,
    else a previous download in ``cache_dir``, else download it (nanoGPT's URL).

    An explicit ``data.path`` wins over the environment variable, as explicit config
    should. Offline, the download fails with a ``ValueError`` naming ``data.path``.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ValueError(
                f"data.path={path!r}: no such file; point data.path at Tiny Shakespeare's "
                f"input.txt (or leave it unset to use ${TINY_SHAKESPEARE_ENV} or a download)"
            )
        return p
    env = os.environ.get(TINY_SHAKESPEARE_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise ValueError(
                f"${TINY_SHAKESPEARE_ENV}={env!r}: no such file; fix the variable or set data.path"
            )
        return p
    target = cache_dir / "downloads" / "tinyshakespeare" / "input.txt"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading Tiny Shakespeare from %s", TINY_SHAKESPEARE_URL)
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=30) as response:
            # Temp file + rename: an interrupted download never looks like a finished one.
            with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
                shutil.copyfileobj(response, tmp)
        os.replace(tmp.name, target)
    except (urllib.error.URLError, OSError) as e:
        raise ValueError(
            f"Tiny Shakespeare is not available locally and downloading it from "
            f"{TINY_SHAKESPEARE_URL} failed ({e}). Without network, copy input.txt here "
            f"and set data.path=/path/to/input.txt (or ${TINY_SHAKESPEARE_ENV})."
        ) from e
    return target


def _read_text_file(path: Path, required: bool) -> str:
    # Text mode with universal newlines, like nanoGPT's `open(path, 'r').read()`.
    text = path.read_text(encoding="utf-8")
    if not text and required:
        raise ValueError(f"{str(path)!r} is empty; point data.path at a file with text")
    if not text:
        logger.warning("skipping empty file %s", path)
    return text


def _list_files(path: str, pattern: str, option: str) -> list[Path]:
    """A file, every file matching ``pattern`` under a folder, or a glob; sorted by path."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.glob(pattern) if f.is_file())
        if not files:
            raise ValueError(
                f"{option}={path!r} is a folder without files matching {pattern!r} "
                f"(data.file_pattern); add files or change the pattern"
            )
        return files
    if glob.has_magic(path):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(path), recursive=True))
        files = [f for f in files if f.is_file()]
        if not files:
            raise ValueError(f"{option}={path!r}: the glob matches no files")
        return files
    raise ValueError(f"{option}={path!r}: no such file or folder")


# ----------------------------------------------------------------------------- datasets


def _load_hf(
    cfg: DataConfig, name: str, config: str | None, data_files: str | list | dict | None
) -> RawCorpus:
    train = _load_split(cfg, name, config, data_files, cfg.hf_split, "data.hf_split")
    docs = _column_texts(train, cfg.text_column, f"{name}[{cfg.hf_split}]")
    eval_docs = None
    if cfg.hf_eval_split is not None:
        split = _load_split(cfg, name, config, data_files, cfg.hf_eval_split, "data.hf_eval_split")
        eval_docs = _column_texts(split, cfg.text_column, f"{name}[{cfg.hf_eval_split}]")
    return RawCorpus(docs, eval_docs, f"hf:{name}:{config}:{cfg.hf_split}:{cfg.hf_eval_split}")


def _load_split(cfg: DataConfig, name: str, config, data_files, split: str, split_option: str):
    import datasets  # deferred: importing datasets costs ~1 s and only these sources need it

    local = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not local.exists():
        option = "data.path" if cfg.source == "eurlex" else "data.hf_name"
        raise ValueError(f"{option}={name!r}: no such local dataset folder")
    try:
        if local.is_dir() and (
            (local / "state.json").is_file() or (local / "dataset_dict.json").is_file()
        ):
            # save_to_disk output: load_dataset refuses it, load_from_disk reads it.
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(
                        f"{split_option}={split!r} is not a split of {name!r}; "
                        f"available splits: {sorted(loaded)}"
                    )
                return loaded[split]
            return loaded  # a single saved split is used whatever the split name
        return datasets.load_dataset(name, config, data_files=data_files, split=split)
    except ValueError as e:
        if "Unknown split" in str(e):
            raise ValueError(f"{split_option}={split!r}: {e}") from e
        if split_option in str(e):
            raise
        raise ValueError(_load_failure(cfg, name, e)) from e
    except Exception as e:  # network, auth, missing files, refused scripts: all one message
        raise ValueError(_load_failure(cfg, name, e)) from e


def _load_failure(cfg: DataConfig, name: str, e: Exception) -> str:
    what = "the EurLex parquet copy" if cfg.source == "eurlex" else f"dataset {name!r}"
    fix = (
        "download the files where there is network and set data.path to the local "
        ".jsonl/.parquet files (a 'text' field per document)"
        if cfg.source == "eurlex"
        else "download it where there is network (datasets.load_dataset(...).save_to_disk(DIR)) "
        "and set data.hf_name=DIR, or point data.path at local data files"
    )
    return (
        f"could not load {what} ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}). "
        f"If the Hugging Face Hub is unreachable (offline, or HF_HUB_OFFLINE=1 without a "
        f"cached copy): {fix}."
    )


def _column_texts(ds, column: str, what: str) -> list[str]:
    if column not in ds.column_names:
        raise ValueError(
            f"{what} has no column {column!r} (data.text_column); available columns: "
            f"{ds.column_names}"
        )
    texts = ds[column]
    texts = list(texts) if not isinstance(texts, list) else texts
    bad = next((t for t in texts if t is not None and not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(
            f"{what}: column {column!r} (data.text_column) holds {type(bad).__name__} values, "
            f"not text; pick a string column from {ds.column_names}"
        )
    docs = [t for t in texts if t]  # None and "" carry no tokens
    if not docs:
        raise ValueError(f"{what}: column {column!r} has no non-empty text")
    return docs


def _load_eurlex(cfg: DataConfig) -> RawCorpus:
    if cfg.path is not None:
        files = _list_files(cfg.path, "**/*", option="data.path")
        by_builder: dict[str, list[str]] = {}
        for f in files:
            builder = _BUILDER_BY_SUFFIX.get(f.suffix.lower())
            if builder is not None:
                by_builder.setdefault(builder, []).append(str(f))
        if len(by_builder) != 1:
            raise ValueError(
                f"data.path={cfg.path!r}: expected .jsonl/.json or .parquet files (one kind), "
                f"found {sorted({f.suffix for f in files}) or 'none'}"
            )
        (builder, data_files), = by_builder.items()
        if cfg.hf_eval_split is not None:
            raise ValueError(
                "data.hf_eval_split does not apply to local EurLex files (they form one split); "
                "set it to null and use data.val_fraction"
            )
        local_cfg = replace(cfg, hf_split="train")  # builders put all data_files in "train"
        corpus = _load_hf(local_cfg, builder, None, data_files=data_files)
        corpus.description = f"eurlex-local:{cfg.path} ({len(data_files)} files)"
        return corpus
    if cfg.hf_name is not None:
        return _load_hf(cfg, cfg.hf_name, cfg.hf_config, data_files=None)
    lang = cfg.hf_config or "en"
    base = f"hf://datasets/{EURLEX_PARQUET['repo']}@{EURLEX_PARQUET['revision']}/"
    splits = [cfg.hf_split] + ([cfg.hf_eval_split] if cfg.hf_eval_split else [])
    data_files = {s: base + EURLEX_PARQUET["pattern"].format(lang=lang, split=s) for s in splits}
    corpus = _load_hf(cfg, "parquet", None, data_files=data_files)
    corpus.description = f"eurlex:{EURLEX_PARQUET['repo']}@{EURLEX_PARQUET['revision']}:{lang}"
    return corpus
