"""Tests for altgrad.modeling.tokenization: char (nanoGPT-exact), byte-level BPE, loading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from altgrad.modeling.tokenization import (
    EOT_TOKEN,
    build_char_tokenizer,
    char_tokenizer_from_nanogpt_meta,
    encode_strict,
    is_char_tokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tiny_shakespeare_path() -> Path | None:
    """ALTGRAD_TINYSHAKESPEARE, else the CI location ../shared/data/... next to the repo."""
    candidates = [os.environ.get("ALTGRAD_TINYSHAKESPEARE"),
                  REPO_ROOT.parent / "shared/data/tinyshakespeare/input.txt"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


@pytest.fixture(scope="module")
def shakespeare() -> str:
    path = _tiny_shakespeare_path()
    if path is None:
        pytest.skip("Tiny Shakespeare not found (set ALTGRAD_TINYSHAKESPEARE)")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def char_tok(shakespeare):
    return build_char_tokenizer(shakespeare, model_max_length=256)


# ---------------------------------------------------------------- char tokenizer


def test_char_vocab_is_nanogpt(shakespeare, char_tok):
    # nanoGPT data/shakespeare_char/prepare.py, verbatim logic.
    chars = sorted(list(set(shakespeare)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    assert len(chars) == 65
    assert len(char_tok) == 65 and char_tok.vocab_size == 65
    assert char_tok.get_vocab() == stoi
    assert char_tok.model_max_length == 256
    assert char_tok.all_special_tokens == []
    assert is_char_tokenizer(char_tok)


def test_char_round_trip_whole_corpus(shakespeare, char_tok):
    chars = sorted(set(shakespeare))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = char_tok.backend_tokenizer.encode(shakespeare).ids
    assert ids == [stoi[c] for c in shakespeare]  # nanoGPT's encode()
    assert char_tok.decode(ids) == shakespeare


def test_char_call_adds_nothing_and_keeps_spaces(char_tok):
    s = "  First Citizen:\n\nBefore we proceed ,  any further, hear me speak . \n"
    ids = char_tok(s)["input_ids"]
    assert len(ids) == len(s)  # no BOS/EOS, one id per character
    assert char_tok.decode(ids) == s
    assert char_tok.batch_decode([ids, ids[:3]]) == [s, s[:3]]


def test_char_save_load(tmp_path, char_tok, shakespeare):
    char_tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.get_vocab() == char_tok.get_vocab()
    assert loaded.model_max_length == 256
    text = shakespeare[:5000]
    assert loaded(text)["input_ids"] == char_tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(char_tok)
    via_helper = load_tokenizer(tmp_path, model_max_length=64)
    assert via_helper.model_max_length == 64 and via_helper.get_vocab() == char_tok.get_vocab()


def test_char_unknown_character(char_tok):
    assert encode_strict(char_tok, "Hello, world!\n") == char_tok("Hello, world!\n")["input_ids"]
    with pytest.raises(ValueError, match=r"not in the char tokenizer's vocabulary: '\\t', 'é'"):
        encode_strict(char_tok, "caf\té")
    with pytest.raises(Exception):  # the plain call refuses too (never silently drops)
        char_tok("café")


def test_char_from_nanogpt_meta(shakespeare, char_tok):
    chars = sorted(set(shakespeare))
    meta = {"vocab_size": len(chars),
            "stoi": {ch: i for i, ch in enumerate(chars)},
            "itos": {i: ch for i, ch in enumerate(chars)}}
    tok = char_tokenizer_from_nanogpt_meta(meta, model_max_length=128)
    assert tok.get_vocab() == char_tok.get_vocab()
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(char_tok)
    bad = dict(meta, itos={**meta["itos"], 0: "x"})
    with pytest.raises(ValueError, match="not the inverse"):
        char_tokenizer_from_nanogpt_meta(bad)
    with pytest.raises(ValueError, match="'stoi'"):
        char_tokenizer_from_nanogpt_meta({"vocab_size": 3})


def test_char_errors():
    with pytest.raises(ValueError, match="empty"):
        build_char_tokenizer("")
    with pytest.raises(TypeError):
        build_char_tokenizer(["ab"])  # type: ignore[arg-type]


def test_char_small_text_ids_sorted():
    tok = build_char_tokenizer("hello world\n")
    assert tok.get_vocab() == {"\n": 0, " ": 1, "d": 2, "e": 3, "h": 4, "l": 5, "o": 6, "r": 7, "w": 8}


# ---------------------------------------------------------------- BPE tokenizer


@pytest.fixture(scope="module")
def bpe_tok(shakespeare):
    return train_bpe_tokenizer([shakespeare[:200_000]], vocab_size=512, model_max_length=128)


def test_bpe_vocab_size_and_eos(bpe_tok):
    assert len(bpe_tok) == 512
    assert bpe_tok.eos_token == EOT_TOKEN
    assert bpe_tok.convert_tokens_to_ids(EOT_TOKEN) == 0
    assert bpe_tok.model_max_length == 128


@pytest.mark.parametrize("text", [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "  leading and trailing spaces  \n\n\n",
    "unicode: wörld, 日本語, emoji 🙂👍🏽, tabs\tand\r\nCRLF, NUL\x00 ok",
    "",
])
def test_bpe_round_trip(bpe_tok, text):
    ids = bpe_tok(text)["input_ids"]
    assert bpe_tok.decode(ids) == text


def test_bpe_compresses_and_eot_is_special(bpe_tok, shakespeare):
    sample = shakespeare[:10_000]
    assert len(bpe_tok(sample)["input_ids"]) < 0.6 * len(sample.encode())
    ids = bpe_tok("a" + EOT_TOKEN + "b")["input_ids"]
    assert 0 in ids  # the separator string maps to the single special id


def test_bpe_save_load(tmp_path, bpe_tok):
    bpe_tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "Säve and lóad 🙂\n"
    assert loaded(text)["input_ids"] == bpe_tok(text)["input_ids"]
    assert loaded.eos_token == EOT_TOKEN and len(loaded) == 512
    assert loaded.decode(loaded(text)["input_ids"]) == text


def test_bpe_vocab_too_small():
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe_tokenizer(["abc"], vocab_size=100)


def test_bpe_accepts_plain_string_and_generator():
    a = train_bpe_tokenizer("low lower lowest " * 20, vocab_size=270)
    b = train_bpe_tokenizer((t for t in ["low lower lowest " * 20]), vocab_size=270)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)


# ---------------------------------------------------------------- load_tokenizer errors


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="trained from the data"):
        load_tokenizer("char")
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope" / "tok"))
    with pytest.raises(ValueError, match="holds no loadable tokenizer"):
        load_tokenizer(tmp_path)
    # Offline Hub name: clear message pointing at a local directory (local_files_only
    # fails fast; without it the Hub client would retry for about a minute here).
    with pytest.raises(ValueError, match=r"pass that local directory instead \(data.tokenizer=DIR\)"):
        load_tokenizer("altgrad-test/definitely-not-cached", local_files_only=True)


def test_load_tokenizer_json_file(tmp_path):
    tok = build_char_tokenizer("abc\n")
    tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.decode(loaded("cab\n")["input_ids"]) == "cab\n"
