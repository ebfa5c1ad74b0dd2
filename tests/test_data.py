"""Tests for altgrad.data: sources, token cache, datasets, errors, concurrency."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import altgrad.data.cache as cache_mod
import altgrad.data.prepare as prepare_mod
import altgrad.data.sources as sources_mod
from altgrad.data import (
    DataConfig,
    RandomWindowDataset,
    SequentialBlockDataset,
    prepare_data,
)
from altgrad.modeling.tokenization import EOT_TOKEN

REPO_ROOT = Path(__file__).resolve().parents[1]
NANOGPT_TRAIN, NANOGPT_VAL = 1_003_854, 111_540


def _tiny_shakespeare_path() -> Path | None:
    """$ALTGRAD_TINYSHAKESPEARE, else the CI location ../shared/data/... next to the repo."""
    for c in (os.environ.get("ALTGRAD_TINYSHAKESPEARE"),
              REPO_ROOT.parent / "shared/data/tinyshakespeare/input.txt"):
        if c and Path(c).is_file():
            return Path(c)
    return None


@pytest.fixture(scope="module")
def shakespeare_path() -> Path:
    path = _tiny_shakespeare_path()
    if path is None:
        pytest.skip("Tiny Shakespeare not found (set ALTGRAD_TINYSHAKESPEARE)")
    return path


@pytest.fixture(scope="module")
def shakespeare_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("altgrad-cache")


@pytest.fixture(scope="module")
def shakespeare(shakespeare_path, shakespeare_cache):
    cfg = DataConfig(path=str(shakespeare_path), cache_dir=str(shakespeare_cache))
    return prepare_data(cfg, block_size=64, num_train_samples=1000)


@pytest.fixture()
def offline_hub(monkeypatch):
    """Make the Hub clients fail fast (they read these flags at call time)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture()
def hf_cache(monkeypatch, tmp_path):
    """Keep datasets' own arrow cache inside the test's tmp dir."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _decode_all(data) -> tuple[str, str]:
    tok = data.tokenizer
    return tok.decode(data.train_tokens.tolist()), tok.decode(data.val_tokens.tolist())


# ----------------------------------------------------------------------------- Tiny Shakespeare


def test_shakespeare_char_matches_nanogpt(shakespeare, shakespeare_path):
    text = shakespeare_path.read_text()
    # nanoGPT data/shakespeare_char/prepare.py
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = len(text)
    train_ids = np.array([stoi[c] for c in text[: int(n * 0.9)]], dtype=np.uint16)
    val_ids = np.array([stoi[c] for c in text[int(n * 0.9):]], dtype=np.uint16)

    assert shakespeare.vocab_size == 65
    assert len(shakespeare.train_tokens) == NANOGPT_TRAIN == len(train_ids)
    assert len(shakespeare.val_tokens) == NANOGPT_VAL == len(val_ids)
    assert shakespeare.train_tokens.dtype == np.uint16
    assert np.array_equal(shakespeare.train_tokens, train_ids)
    assert np.array_equal(shakespeare.val_tokens, val_ids)
    assert shakespeare.tokenizer.model_max_length == 64
    meta = json.loads((shakespeare.cache_path / "meta.json").read_text())
    assert meta["train_tokens"] == NANOGPT_TRAIN and meta["vocab_size"] == 65


def test_shakespeare_tokens_decode_to_text(shakespeare, shakespeare_path):
    text = shakespeare_path.read_text()
    train, val = _decode_all(shakespeare)
    assert train + val == text
    assert train == text[:NANOGPT_TRAIN]


def test_cache_reused_without_retokenizing(shakespeare, shakespeare_path, shakespeare_cache,
                                           monkeypatch):
    entry = shakespeare.cache_path
    mtimes = {f.name: f.stat().st_mtime_ns for f in entry.iterdir()}

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although the cache is valid")

    monkeypatch.setattr(prepare_mod, "_encode_chunks", no_tokenizing)
    cfg = DataConfig(path=str(shakespeare_path), cache_dir=str(shakespeare_cache))
    again = prepare_data(cfg, block_size=32, num_train_samples=10)
    assert again.from_cache and not shakespeare.from_cache
    assert again.cache_path == entry
    assert {f.name: f.stat().st_mtime_ns for f in entry.iterdir()} == mtimes
    assert again.tokenizer.model_max_length == 32  # block size is not part of the cache
    assert np.array_equal(again.val_tokens, shakespeare.val_tokens)


def test_cache_invalidated_when_text_changes(shakespeare_path, tmp_path):
    text = shakespeare_path.read_text()[:20_000]
    path = _write(tmp_path / "input.txt", text)
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"))
    first = prepare_data(cfg, block_size=16, num_train_samples=10)
    _write(path, text.replace("Citizen", "Citizen!", 1))
    second = prepare_data(cfg, block_size=16, num_train_samples=10)
    assert not second.from_cache and second.cache_path != first.cache_path
    assert _decode_all(second)[0].startswith("First Citizen!")
    # Changing the split rule is a different entry too.
    third = prepare_data(DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"),
                                    val_fraction=0.2), block_size=16, num_train_samples=10)
    assert third.cache_path not in (first.cache_path, second.cache_path)


def test_cache_dir_from_env(shakespeare_path, tmp_path, monkeypatch):
    monkeypatch.setenv("ALTGRAD_DATA_CACHE", str(tmp_path / "env-cache"))
    path = _write(tmp_path / "small.txt", shakespeare_path.read_text()[:5000])
    data = prepare_data(DataConfig(path=str(path)), block_size=8, num_train_samples=4)
    assert data.cache_path.parent == tmp_path / "env-cache"


# ----------------------------------------------------------------------------- datasets


def test_random_windows_deterministic_in_range(shakespeare):
    ds = shakespeare.train_dataset
    tokens = shakespeare.train_tokens
    assert len(ds) == 1000
    same = RandomWindowDataset(tokens, 64, 1000, seed=ds.seed)
    other_seed = RandomWindowDataset(tokens, 64, 1000, seed=ds.seed + 1)
    offsets = [ds.offset(i) for i in range(len(ds))]
    assert all(0 <= o <= len(tokens) - 64 - 1 for o in offsets)
    assert len(set(offsets)) > 990  # random, not a constant
    for i in (0, 1, 17, 999, 17):  # any order, repeated: same window
        item = ds[i]
        assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (64,)
        assert torch.equal(item["labels"], item["input_ids"])
        assert torch.equal(item["input_ids"], same[i]["input_ids"])
        start = offsets[i]
        assert item["input_ids"].tolist() == tokens[start:start + 64].tolist()
    assert [other_seed.offset(i) for i in range(20)] != offsets[:20]
    with pytest.raises(IndexError):
        ds[1000]


def test_datasets_pickle_memmap_by_reference(shakespeare):
    blob = pickle.dumps(shakespeare.train_dataset)
    assert len(blob) < 10_000  # the 1 MB of tokens is not copied
    clone = pickle.loads(blob)
    assert torch.equal(clone[5]["input_ids"], shakespeare.train_dataset[5]["input_ids"])


def test_sequential_blocks_cover_val(shakespeare):
    ds = shakespeare.eval_dataset
    val = shakespeare.val_tokens
    assert len(ds) == len(val) // 64
    blocks = torch.cat([ds[i]["input_ids"] for i in range(len(ds))])
    assert blocks.tolist() == val[: len(ds) * 64].tolist()
    assert all(torch.equal(ds[i]["labels"], ds[i]["input_ids"]) for i in (0, len(ds) - 1))
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_sequential_blocks_max_blocks_evenly_spread():
    tokens = np.arange(1000, dtype=np.uint16)
    ds = SequentialBlockDataset(tokens, block_size=10, max_blocks=7)
    starts = [int(ds[i]["input_ids"][0]) for i in range(len(ds))]
    assert len(ds) == 7 and starts[0] == 0 and starts[-1] == 990
    assert starts == sorted(set(starts)) and all(s % 10 == 0 for s in starts)
    assert len(SequentialBlockDataset(tokens, 10, max_blocks=500)) == 100
    assert len(SequentialBlockDataset(tokens, 10, max_blocks=1)) == 1


def test_dataloader_batches(shakespeare):
    from transformers import default_data_collator

    loader = torch.utils.data.DataLoader(shakespeare.train_dataset, batch_size=4,
                                         collate_fn=default_data_collator)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 64) and torch.equal(batch["labels"], batch["input_ids"])


def test_dataset_argument_errors():
    with pytest.raises(ValueError, match="fewer than block_size \\+ 1"):
        RandomWindowDataset(np.arange(8), block_size=8, num_samples=1)
    with pytest.raises(ValueError, match="fewer than one block"):
        SequentialBlockDataset(np.arange(7), block_size=8)


# ----------------------------------------------------------------------------- other sources


def test_local_folder_source(tmp_path):
    root = tmp_path / "corpus"
    _write(root / "b.txt", "second file\n" * 50)
    _write(root / "a.txt", "first file\n" * 50)
    _write(root / "sub" / "c.txt", "third, nested\n" * 50)
    _write(root / "notes.md", "not matched by the pattern")
    _write(root / "empty.txt", "")  # skipped with a warning
    cfg = DataConfig(source="text", path=str(root), cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg, block_size=16, num_train_samples=8)
    expected = "\n\n".join(["first file\n" * 50, "second file\n" * 50, "third, nested\n" * 50])
    assert "".join(_decode_all(data)) == expected
    assert data.meta["separator"] == "\n\n"
    # A single file works too, and a glob.
    one = prepare_data(DataConfig(source="text", path=str(root / "a.txt"),
                                  cache_dir=str(tmp_path / "cache")), 16, 8)
    assert "".join(_decode_all(one)) == "first file\n" * 50
    globbed = prepare_data(DataConfig(source="text", path=str(root / "*.txt"),
                                      cache_dir=str(tmp_path / "cache")), 16, 8)
    assert "".join(_decode_all(globbed)) == "\n\n".join(["first file\n" * 50, "second file\n" * 50])


def _docs(n: int = 40) -> list[str]:
    return [f"Document {i}: the council adopted regulation {i * 7} on fisheries. " * 3
            for i in range(n)]


def test_hf_dataset_from_save_to_disk(tmp_path, hf_cache):
    import datasets

    docs = _docs()
    ds = datasets.Dataset.from_dict({"content": docs, "id": list(range(len(docs)))})
    ds.save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(source="hf", hf_name=str(tmp_path / "saved"), text_column="content",
                     cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg, block_size=16, num_train_samples=8)
    assert "".join(_decode_all(data)) == "\n\n".join(docs)

    bad = DataConfig(source="hf", hf_name=str(tmp_path / "saved"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"no column 'text'.*available columns: \['content', 'id'\]"):
        prepare_data(bad, block_size=16, num_train_samples=8)


def test_hf_dataset_dict_with_eval_split(tmp_path, hf_cache):
    import datasets

    docs = _docs()
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:30]}),
                               "validation": datasets.Dataset.from_dict({"text": docs[30:]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    cfg = DataConfig(source="hf", hf_name=str(tmp_path / "dd"), hf_eval_split="validation",
                     cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg, block_size=16, num_train_samples=8)
    assert _decode_all(data) == ("\n\n".join(docs[:30]), "\n\n".join(docs[30:]))
    with pytest.raises(ValueError, match=r"data.hf_eval_split='test'.*\['train', 'validation'\]"):
        prepare_data(DataConfig(source="hf", hf_name=str(tmp_path / "dd"), hf_eval_split="test",
                                cache_dir=str(tmp_path / "cache")), 16, 8)


def test_hf_json_builder_with_data_files(tmp_path, hf_cache):
    docs = _docs()
    path = _write(tmp_path / "docs.jsonl", "".join(json.dumps({"body": d}) + "\n" for d in docs))
    cfg = DataConfig(source="hf", hf_name="json", path=str(path), text_column="body",
                     cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg, block_size=16, num_train_samples=8)
    assert "".join(_decode_all(data)) == "\n\n".join(docs)
    with pytest.raises(ValueError, match=r"available columns: \['body'\]"):
        prepare_data(DataConfig(source="hf", hf_name="json", path=str(path),
                                cache_dir=str(tmp_path / "cache")), 16, 8)
    with pytest.raises(ValueError, match="data.hf_split='validation'"):
        prepare_data(DataConfig(source="hf", hf_name="json", path=str(path), text_column="body",
                                hf_split="validation", cache_dir=str(tmp_path / "cache")), 16, 8)


def test_eurlex_local_jsonl_with_bpe(tmp_path, hf_cache):
    docs = [f"COMMISSION REGULATION (EU) No {i}/2010 of 12 March 2010 amending Annex I to "
            f"Regulation (EC) No 1234/2007 as regards the customs duties — €{i},50 per tonne.\n"
            f"Article {i}\nThis Regulation shall enter into force on the day of its publication.\n"
            for i in range(120)]
    folder = tmp_path / "eurlex"
    for part in range(2):  # two files, like train/validation dumps
        rows = docs[part * 60:(part + 1) * 60]
        _write(folder / f"part{part}.jsonl",
               "".join(json.dumps({"celex_id": str(i), "text": t, "labels": [1]}) + "\n"
                       for i, t in enumerate(rows)))
    cfg = DataConfig(source="eurlex", path=str(folder), tokenizer="bpe", bpe_vocab_size=400,
                     cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg, block_size=32, num_train_samples=8)
    eos = data.tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    assert data.tokenizer.eos_token == EOT_TOKEN and data.vocab_size == 400
    assert data.meta["separator"] == EOT_TOKEN
    train, val = _decode_all(data)
    assert train + val == EOT_TOKEN.join(docs)
    # Documents are separated by the single EOS id.
    assert int((np.asarray(data.train_tokens) == eos).sum()) + int(
        (np.asarray(data.val_tokens) == eos).sum()) == len(docs) - 1
    # The BPE tokenizer is stored with the cache: a second run reuses it, no retraining.
    again = prepare_data(cfg, block_size=32, num_train_samples=8)
    assert again.from_cache and again.tokenizer.get_vocab() == data.tokenizer.get_vocab()


def test_eurlex_wrong_files(tmp_path):
    _write(tmp_path / "x.txt", "text")
    with pytest.raises(ValueError, match=r"expected \.jsonl/\.json or \.parquet files"):
        prepare_data(DataConfig(source="eurlex", path=str(tmp_path), cache_dir=str(tmp_path)),
                     16, 8)


# ----------------------------------------------------------------------------- clear errors


def test_offline_hub_dataset_names_the_option(tmp_path, offline_hub, hf_cache):
    cfg = DataConfig(source="hf", hf_name="altgrad-test/not-cached-anywhere",
                     cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"Hub is unreachable.*data\.hf_name=DIR.*data\.path"):
        prepare_data(cfg, block_size=16, num_train_samples=8)


def test_missing_local_dataset_folder(tmp_path):
    cfg = DataConfig(source="hf", hf_name=str(tmp_path / "nope"), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"data.hf_name=.*no such local dataset folder"):
        prepare_data(cfg, block_size=16, num_train_samples=8)


def test_offline_eurlex_default_names_data_path(tmp_path, offline_hub, hf_cache):
    cfg = DataConfig(source="eurlex", tokenizer="bpe", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"EurLex parquet copy.*set data\.path to the local"):
        prepare_data(cfg, block_size=16, num_train_samples=8)


def test_offline_tiny_shakespeare_names_data_path(tmp_path, monkeypatch):
    monkeypatch.delenv("ALTGRAD_TINYSHAKESPEARE", raising=False)
    # A port nothing listens on: refused at once, like an offline machine.
    monkeypatch.setattr(sources_mod, "TINY_SHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    with pytest.raises(ValueError, match=r"set data\.path=/path/to/input\.txt"):
        prepare_data(DataConfig(cache_dir=str(tmp_path)), block_size=16, num_train_samples=8)
    with pytest.raises(ValueError, match=r"data\.path='/nonexistent/input.txt': no such file"):
        prepare_data(DataConfig(path="/nonexistent/input.txt", cache_dir=str(tmp_path)), 16, 8)


def test_offline_hub_tokenizer_names_the_option(tmp_path, offline_hub):
    path = _write(tmp_path / "t.txt", "hello world\n" * 100)
    cfg = DataConfig(source="text", path=str(path), tokenizer="altgrad-test/no-such-tokenizer",
                     cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"data\.tokenizer=.*local directory"):
        prepare_data(cfg, block_size=16, num_train_samples=8)


def test_pretrained_tokenizer_directory(tmp_path, shakespeare_path):
    from altgrad.modeling.tokenization import train_bpe_tokenizer

    text = shakespeare_path.read_text()[:30_000]
    train_bpe_tokenizer([text], 300).save_pretrained(tmp_path / "tok")
    path = _write(tmp_path / "t.txt", text)
    cfg = DataConfig(source="text", path=str(path), tokenizer=str(tmp_path / "tok"),
                     cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg, block_size=16, num_train_samples=8)
    assert data.vocab_size == 300 and "".join(_decode_all(data)) == text
    assert data.meta["tokenizer"]["kind"] == "pretrained"


def test_too_short_and_empty(tmp_path):
    short = _write(tmp_path / "short.txt", "x" * 200)  # 180 train / 20 val characters
    cfg = DataConfig(source="text", path=str(short), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"val split has 20 tokens, fewer than one block \+ 1"):
        prepare_data(cfg, block_size=32, num_train_samples=8)
    assert len(prepare_data(cfg, block_size=16, num_train_samples=8).eval_dataset) == 1

    empty = _write(tmp_path / "empty.txt", "")
    with pytest.raises(ValueError, match="is empty"):
        prepare_data(DataConfig(source="text", path=str(empty), cache_dir=str(tmp_path)), 16, 8)
    _write(tmp_path / "emptydir" / "a.txt", "")
    _write(tmp_path / "emptydir" / "b.txt", "")
    with pytest.raises(ValueError, match=r"all 2 file\(s\) are empty"):
        prepare_data(DataConfig(source="text", path=str(tmp_path / "emptydir"),
                                cache_dir=str(tmp_path)), 16, 8)
    with pytest.raises(ValueError, match="train split is empty"):
        prepare_data(DataConfig(source="text", path=str(_write(tmp_path / "one.txt", "a")),
                                cache_dir=str(tmp_path)), 1, 8)
    with pytest.raises(ValueError, match="no such file or folder"):
        prepare_data(DataConfig(source="text", path=str(tmp_path / "missing"),
                                cache_dir=str(tmp_path)), 16, 8)


@pytest.mark.parametrize("kwargs, match", [
    ({"source": "wiki"}, r"data.source='wiki' is not supported; use one of 'shakespeare_char'"),
    ({"source": "text"}, r"data.path=None is required for data.source='text'"),
    ({"source": "hf"}, r"data.hf_name=None is required"),
    ({"val_fraction": 1.0}, r"data.val_fraction=1.0 must be a number strictly between 0 and 1"),
    ({"val_fraction": 0}, r"data.val_fraction=0"),
    ({"bpe_vocab_size": 100}, r"data.bpe_vocab_size=100 must be an integer >= 257"),
    ({"max_eval_blocks": 0}, r"data.max_eval_blocks=0 must be a positive integer"),
    ({"seed": "1"}, r"data.seed='1' must be an integer"),
    ({"tokenizer": ""}, r"data.tokenizer='' must be a non-empty string"),
    ({"hf_eval_split": "validation"}, r"only applies to data.source 'hf' or 'eurlex'"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_config_is_frozen_and_yaml_friendly():
    import dataclasses

    cfg = DataConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.source = "text"  # type: ignore[misc]
    for f in dataclasses.fields(DataConfig):
        assert isinstance(getattr(cfg, f.name), (str, int, float, bool, type(None), list))


# ----------------------------------------------------------------------------- crash & concurrency


def test_crash_mid_build_leaves_nothing_reusable(tmp_path, monkeypatch, shakespeare_path):
    path = _write(tmp_path / "t.txt", shakespeare_path.read_text()[:20_000])
    cfg = DataConfig(source="text", path=str(path), cache_dir=str(tmp_path / "cache"))
    real_write = cache_mod.write_tokens

    def crash_after_partial_write(file, chunks, dtype):
        with open(file, "wb") as f:
            f.write(b"\x00" * 10)
        raise KeyboardInterrupt("simulated crash while writing tokens")

    monkeypatch.setattr(prepare_mod, "write_tokens", crash_after_partial_write)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, block_size=16, num_train_samples=8)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []

    monkeypatch.setattr(prepare_mod, "write_tokens", real_write)
    data = prepare_data(cfg, block_size=16, num_train_samples=8)
    assert not data.from_cache and "".join(_decode_all(data)) == path.read_text()

    # A corrupted entry (truncated token file) is detected and rebuilt, not served.
    expected = np.array(data.train_tokens)  # copy: reading a truncated memmap is SIGBUS
    del data
    with open(cfg.resolved_cache_dir().glob("text-char-*").__next__() / "train.bin", "r+b") as f:
        f.truncate(100)
    rebuilt = prepare_data(cfg, block_size=16, num_train_samples=8)
    assert not rebuilt.from_cache and np.array_equal(rebuilt.train_tokens, expected)


def _prepare_in_child(cfg, barrier, queue, use_lock):
    if not use_lock:  # simulate a filesystem that ignores locks: only the atomic rename protects
        import contextlib

        cache_mod.FileLock = lambda *a, **k: contextlib.nullcontext()
    barrier.wait()
    try:
        data = prepare_data(cfg, block_size=32, num_train_samples=8)
        queue.put((str(data.cache_path), data.from_cache,
                   np.asarray(data.train_tokens).tobytes(), np.asarray(data.val_tokens).tobytes()))
    except BaseException as e:  # report instead of hanging the parent
        queue.put(repr(e))


@pytest.mark.parametrize("use_lock", [True, False], ids=["filelock", "rename-only"])
def test_concurrent_prepare_two_processes(tmp_path, shakespeare_path, use_lock):
    path = _write(tmp_path / "t.txt", shakespeare_path.read_text()[:400_000])
    cfg = DataConfig(source="text", path=str(path), tokenizer="bpe", bpe_vocab_size=300,
                     cache_dir=str(tmp_path / "cache"))
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(cfg, barrier, queue, use_lock))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(isinstance(r, tuple) for r in results), results
    (path_a, cached_a, train_a, val_a), (path_b, cached_b, train_b, val_b) = results
    assert path_a == path_b and train_a == train_b and val_a == val_b
    if use_lock:
        assert sorted([cached_a, cached_b]) == [False, True]  # exactly one process tokenized
    leftovers = [p.name for p in (tmp_path / "cache").iterdir()
                 if p.name.startswith((".tmp-", ".trash-"))]
    assert leftovers == []
    # The published entry is complete and what a fresh call reads.
    data = prepare_data(cfg, block_size=32, num_train_samples=8)
    assert data.from_cache and "".join(_decode_all(data)) == path.read_text()
