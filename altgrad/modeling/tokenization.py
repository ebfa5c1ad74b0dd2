"""Tokenizers for altgrad: nanoGPT-exact characters, byte-level BPE, or a saved/Hub tokenizer.

Every tokenizer here is a ``transformers.PreTrainedTokenizerFast`` backed by the
``tokenizers`` library, so it saves with ``save_pretrained`` and loads back (offline)
with ``AutoTokenizer.from_pretrained(dir)`` like any Hugging Face tokenizer.

* :func:`build_char_tokenizer` -- character level, vocabulary ``sorted(set(text))``
  with the ids of nanoGPT's ``shakespeare_char`` (65 symbols on Tiny Shakespeare).
  No special tokens, no normalization, no BOS/EOS: ``decode(encode(s)) == s`` exactly.
* :func:`train_bpe_tokenizer` -- GPT-2-style byte-level BPE trained on a corpus
  (GPT-2's own vocabulary files cannot be downloaded everywhere, e.g. offline CI).
* :func:`load_tokenizer` -- a local tokenizer directory or a Hub name, with a clear
  error when the Hub is unreachable.

Unknown characters (char tokenizer): the vocabulary has no unknown token on purpose,
so that it stays exactly nanoGPT's 65 ids (an extra ``<unk>`` id would change the
model's vocab size and the checkpoints' shape). Encoding a character outside the
vocabulary therefore raises; the backend's message is terse
("WordLevel error: Missing [UNK] token from the vocabulary"), so use
:func:`encode_strict` where a user-typed prompt is encoded: it raises a ``ValueError``
naming the unknown characters. Prompts made of known characters never fail.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

__all__ = [
    "EOT_TOKEN",
    "build_char_tokenizer",
    "char_tokenizer_from_nanogpt_meta",
    "encode_strict",
    "is_char_tokenizer",
    "load_tokenizer",
    "tokenizer_fingerprint",
    "train_bpe_tokenizer",
]

#: GPT-2's end-of-text token, used as EOS and document separator by the BPE tokenizer.
EOT_TOKEN = "<|endoftext|>"

# Name of the unknown token the char model *would* use. It is deliberately absent from
# the vocabulary (see the module docstring), which makes the backend raise on unknown
# characters instead of silently dropping them (a BPE model without unk drops them).
_CHAR_UNK = "[UNK]"

# Per-code-point split. "." does not match "\n" in the backend's regex engine and "\X"
# would glue "\r\n" into one grapheme, so match any single code point explicitly.
_ONE_CODE_POINT = Regex(r"[\s\S]")


def _char_tokenizer_from_chars(
    chars: Sequence[str], model_max_length: int | None
) -> PreTrainedTokenizerFast:
    """Char tokenizer whose id ``i`` is ``chars[i]`` (the shared core of the public builders)."""
    for ch in chars:
        if not isinstance(ch, str) or len(ch) != 1:
            raise ValueError(f"char vocabulary entries must be single characters, got {ch!r}")
    if len(set(chars)) != len(chars):
        raise ValueError("char vocabulary has duplicate characters")
    if not chars:
        raise ValueError("char vocabulary is empty: the text has no characters")
    vocab = {ch: i for i, ch in enumerate(chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_CHAR_UNK))
    # No normalizer: text goes in byte-for-byte as given.
    backend.pre_tokenizer = pre_tokenizers.Split(_ONE_CODE_POINT, behavior="isolated")
    # Fuse concatenates tokens; without a decoder the backend would join them with spaces.
    backend.decoder = decoders.Fuse()
    kwargs = {} if model_max_length is None else {"model_max_length": int(model_max_length)}
    # clean_up_tokenization_spaces=False: transformers would otherwise rewrite " ," -> ","
    # and " 's" -> "'s" on decode, breaking the exact round trip.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, clean_up_tokenization_spaces=False, **kwargs
    )


def build_char_tokenizer(text: str, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """Character-level tokenizer with nanoGPT's ``shakespeare_char`` vocabulary.

    Ids are the positions in ``sorted(set(text))``, i.e. equal to nanoGPT's ``stoi``.
    ``model_max_length`` should be the model's ``block_size``.

    Example:
        >>> tok = build_char_tokenizer("hello world\\n", model_max_length=8)
        >>> tok("hello")["input_ids"]
        [4, 3, 5, 5, 6]
        >>> tok.decode(tok("lo\\nw")["input_ids"])
        'lo\\nw'
    """
    if not isinstance(text, str):
        raise TypeError(f"build_char_tokenizer expects the corpus as a str, got {type(text).__name__}")
    if not text:
        raise ValueError("build_char_tokenizer: the text is empty, there is no vocabulary to build")
    return _char_tokenizer_from_chars(sorted(set(text)), model_max_length)


def char_tokenizer_from_nanogpt_meta(
    meta: Mapping, model_max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """Char tokenizer from nanoGPT's ``meta.pkl`` dict (keys ``stoi``, ``itos``, ``vocab_size``).

    Example:
        >>> import pickle
        >>> meta = pickle.load(open("data/shakespeare_char/meta.pkl", "rb"))  # doctest: +SKIP
        >>> tok = char_tokenizer_from_nanogpt_meta(meta, model_max_length=256)  # doctest: +SKIP
    """
    if "stoi" not in meta and "itos" not in meta:
        raise ValueError(
            f"nanoGPT meta dict needs 'stoi' and/or 'itos', got keys {sorted(meta)}"
        )
    stoi = dict(meta["stoi"]) if "stoi" in meta else {ch: i for i, ch in dict(meta["itos"]).items()}
    n = len(stoi)
    if sorted(stoi.values()) != list(range(n)):
        raise ValueError("nanoGPT meta 'stoi' ids must be exactly 0..vocab_size-1")
    chars = [""] * n
    for ch, i in stoi.items():
        chars[i] = ch
    if "itos" in meta:
        itos = dict(meta["itos"])
        if itos != {i: ch for i, ch in enumerate(chars)}:
            raise ValueError("nanoGPT meta 'itos' is not the inverse of 'stoi'")
    if "vocab_size" in meta and int(meta["vocab_size"]) != n:
        raise ValueError(f"nanoGPT meta vocab_size={meta['vocab_size']} but stoi has {n} entries")
    return _char_tokenizer_from_chars(chars, model_max_length)


def is_char_tokenizer(tokenizer: PreTrainedTokenizerFast) -> bool:
    """True for tokenizers made by :func:`build_char_tokenizer` (per-code-point word level)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and isinstance(backend.model, models.WordLevel) and all(
        len(tok) == 1 for tok in tokenizer.get_vocab()
    )


def encode_strict(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Encode ``text`` without special tokens, with a clear error for unknown characters.

    For char tokenizers every character must be in the vocabulary; a ``ValueError``
    lists the ones that are not. Other tokenizers (byte-level BPE never meets an
    unknown byte) simply encode.

    Example:
        >>> tok = build_char_tokenizer("abc ")
        >>> encode_strict(tok, "cab a")
        [3, 1, 2, 0, 1]
        >>> encode_strict(tok, "abz")
        Traceback (most recent call last):
        ...
        ValueError: ...not in the char tokenizer's vocabulary: 'z'...
    """
    if is_char_tokenizer(tokenizer):
        unknown = sorted(set(text) - set(tokenizer.get_vocab()))
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:20])
            more = f" (and {len(unknown) - 20} more)" if len(unknown) > 20 else ""
            raise ValueError(
                f"{len(unknown)} character(s) are not in the char tokenizer's vocabulary: "
                f"{shown}{more}. The vocabulary is the training text's characters; remove "
                f"or replace these characters (the char tokenizer has no unknown token)."
            )
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    model_max_length: int | None = None,
    special_tokens: Sequence[str] = (EOT_TOKEN,),
) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE tokenizer on ``texts``.

    The vocabulary is the 256 byte symbols, the ``special_tokens`` (ids 0..k-1) and
    learned merges up to ``vocab_size`` in total. The first special token is the EOS
    token. Byte-level means any string (any Unicode) round-trips exactly. A corpus too
    small to learn ``vocab_size - 256 - k`` merges gives a smaller vocabulary.

    Example:
        >>> tok = train_bpe_tokenizer(["low lower lowest " * 50], vocab_size=300)
        >>> ids = tok("lowest 🙂")["input_ids"]
        >>> tok.decode(ids)
        'lowest 🙂'
    """
    special_tokens = list(special_tokens)
    n_bytes = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < n_bytes + len(special_tokens):
        raise ValueError(
            f"bpe vocab_size={vocab_size} is too small: byte-level BPE needs at least "
            f"{n_bytes + len(special_tokens)} ({n_bytes} byte symbols + "
            f"{len(special_tokens)} special token(s))"
        )
    if isinstance(texts, str):  # a bare string would be iterated character by character
        texts = [texts]
    backend = Tokenizer(models.BPE())
    # Same settings as GPT-2: no prefix space, GPT-2 regex split, byte-level decoding.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        # All 256 bytes up front, so bytes unseen in training still encode.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    kwargs = {} if model_max_length is None else {"model_max_length": int(model_max_length)}
    if special_tokens:
        kwargs["eos_token"] = special_tokens[0]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, clean_up_tokenization_spaces=False, **kwargs
    )


def _looks_like_path(name: str) -> bool:
    """A Hub id is ``name`` or ``org/name``; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or name.endswith(".json")


def load_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    model_max_length: int | None = None,
    local_files_only: bool = False,
) -> PreTrainedTokenizerFast:
    """Load a tokenizer from a local directory / ``tokenizer.json`` file, or a Hub name.

    ``"char"`` and ``"bpe"`` are not loadable: they are built from the training text
    (:func:`build_char_tokenizer`, :func:`train_bpe_tokenizer`, or ``prepare_data`` with
    ``data.tokenizer="char"``/``"bpe"``). When a Hub name cannot be fetched (offline,
    wrong name, gated) a ``ValueError`` says to pass a local directory instead.
    ``local_files_only=True`` skips the network (fails fast when offline; the Hub
    client otherwise retries for about a minute -- ``HF_HUB_OFFLINE=1`` does the same).

    Example:
        >>> tok = build_char_tokenizer("abc")
        >>> tok.save_pretrained("/tmp/char_tok")  # doctest: +ELLIPSIS
        (...)
        >>> load_tokenizer("/tmp/char_tok").decode([2, 0])
        'ca'
    """
    name = os.fspath(name_or_path)
    if name in ("char", "bpe"):
        raise ValueError(
            f"tokenizer {name!r} is trained from the data, not loaded: use "
            f"build_char_tokenizer/train_bpe_tokenizer, or prepare_data with "
            f"data.tokenizer={name!r}"
        )
    path = Path(name).expanduser()
    if path.is_file():
        # A bare tokenizer.json (e.g. written by tokenizers' Tokenizer.save).
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path), clean_up_tokenization_spaces=False)
    elif path.is_dir():
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"{str(path)!r} is a directory but holds no loadable tokenizer "
                f"(expected tokenizer.json / tokenizer_config.json as written by "
                f"save_pretrained): {e}"
            ) from e
    elif _looks_like_path(name):
        raise ValueError(
            f"tokenizer path {name!r} does not exist; pass an existing tokenizer directory "
            f"(save_pretrained output), a tokenizer.json file, a Hub name, or 'char'/'bpe'"
        )
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
        except OSError as e:
            raise ValueError(
                f"could not load tokenizer {name!r} from the Hugging Face Hub or its local "
                f"cache ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                f"If the Hub is unreachable, save the tokenizer on a machine with network "
                f"(AutoTokenizer.from_pretrained({name!r}).save_pretrained(DIR)) and pass that "
                f"local directory instead (data.tokenizer=DIR), or train one from the data "
                f"with data.tokenizer='char' or 'bpe'."
            ) from e
    if model_max_length is not None:
        tok.model_max_length = int(model_max_length)
    return tok


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """Stable hash of a tokenizer's full definition (vocab, merges, pre/post-processing).

    Two tokenizers with the same fingerprint map every text to the same ids; used in
    data cache keys.

    Example:
        >>> tokenizer_fingerprint(build_char_tokenizer("ab")) == tokenizer_fingerprint(
        ...     build_char_tokenizer("ba"))
        True
    """
    backend_json = tokenizer.backend_tokenizer.to_str()
    return hashlib.sha256(backend_json.encode("utf-8")).hexdigest()
