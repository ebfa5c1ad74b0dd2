"""Convert a nanoGPT checkpoint (`ckpt.pt`) into a transformers model directory.

nanoGPT's train.py saves `{"model": state_dict, "model_args": {...}, "config": {...}, "iter_num",
"best_val_loss", "optimizer"}`. The state-dict keys already match `altgrad.modeling.GPT`, up to two
artefacts removed here: `_orig_mod.` prefixes (the model was `torch.compile`d) and `attn.bias`
causal-mask buffers (nanoGPT without flash attention).

Usage:

```
python -m altgrad.modeling.convert_nanogpt out-shakespeare-char/ckpt.pt hf-shakespeare-char \
    --meta data/shakespeare_char/meta.pkl
```

The output directory loads with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
and, when a `meta.pkl` was given, `AutoTokenizer.from_pretrained(dir)`.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
from collections.abc import Mapping

import torch

from .configuration_gpt import GPTConfig
from .model_card import write_model_card
from .modeling_gpt import GPT

logger = logging.getLogger(__name__)

# torch.compile wraps the module as `_orig_mod`, possibly more than once.
_COMPILE_PREFIX = re.compile(r"(^|\.)_orig_mod\.")
# nanoGPT's causal-mask buffer (only registered without flash attention), and GPT-2's
# `masked_bias` buffer, which old conversions sometimes carried along. Both are not weights.
_MASK_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")


def nanogpt_state_dict_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return nanoGPT's state dict with `_orig_mod.` prefixes stripped and attention-mask buffers
    dropped, i.e. keyed exactly like `GPT(config).state_dict()`.

    Example:

    ```python
    >>> sd = {"_orig_mod.transformer.h.0.attn.bias": torch.ones(1, 1, 4, 4), "_orig_mod.lm_head.weight": torch.zeros(3, 2)}
    >>> list(nanogpt_state_dict_to_hf(sd))
    ['lm_head.weight']

    ```
    """
    out = {}
    for key, value in state_dict.items():
        key = _COMPILE_PREFIX.sub(r"\1", key)
        if _MASK_BUFFER.search(key):
            continue
        if key in out:
            raise ValueError(f"state dict has {key!r} twice once `_orig_mod.` prefixes are removed")
        out[key] = value
    return out


def load_nanogpt_state_dict(model: GPT, state_dict: Mapping[str, torch.Tensor]) -> GPT:
    """Copy a nanoGPT state dict into `model`, with clear errors on any mismatch."""
    state_dict = nanogpt_state_dict_to_hf(state_dict)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"nanoGPT state dict does not match the GPT built from model_args: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}"
        )
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{key}: checkpoint shape {tuple(tensor.shape)} but model_args give {tuple(expected[key].shape)}"
            )
    if model.config.tie_word_embeddings and not torch.equal(
        state_dict["lm_head.weight"], state_dict["transformer.wte.weight"]
    ):
        # nanoGPT always ties them; different values mean a different architecture.
        raise ValueError(
            "lm_head.weight differs from transformer.wte.weight but the config ties them; "
            "convert with tie_word_embeddings=False"
        )
    model.load_state_dict(state_dict, strict=True)
    return model


def _char_tokenizer_from_meta(meta: Mapping, model_max_length: int):
    """nanoGPT meta.pkl -> char tokenizer, or None when altgrad's tokenizer module is absent."""
    try:
        from . import tokenization
    except ImportError:  # the tokenizer module is optional for the converter
        logger.warning("altgrad.modeling.tokenization is not available: meta.pkl ignored, no tokenizer saved")
        return None
    if hasattr(tokenization, "char_tokenizer_from_nanogpt_meta"):
        return tokenization.char_tokenizer_from_nanogpt_meta(meta, model_max_length=model_max_length)
    # itos lists the characters in id order, which is sorted order for nanoGPT's prepare.py, so
    # rebuilding from that text gives the same ids (checked below).
    itos = meta["itos"]
    tokenizer = tokenization.build_char_tokenizer(
        "".join(itos[i] for i in range(len(itos))), model_max_length=model_max_length
    )
    if tokenizer.get_vocab() != dict(meta["stoi"]):
        raise ValueError("meta.pkl's stoi is not in sorted-character order; cannot rebuild it")
    return tokenizer


def convert_nanogpt_checkpoint(
    ckpt_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    meta_path: str | os.PathLike | None = None,
    *,
    trust_checkpoint: bool = False,
    model_card: bool = True,
) -> GPT:
    """Convert nanoGPT's `ckpt.pt` to a saved transformers model directory and return the model.

    Args:
        ckpt_path: nanoGPT checkpoint (dict with `model_args` and `model`).
        out_dir: output directory (`config.json`, `model.safetensors`, the modeling source files,
            README.md, and the tokenizer files when `meta_path` is given).
        meta_path: optional nanoGPT `meta.pkl` (`stoi` / `itos`) of a char-level data set; saved as a
            transformers char tokenizer next to the model.
        trust_checkpoint: load with `torch.load(weights_only=False)`, needed for checkpoints that
            pickle arbitrary objects. Only for files you trust: unpickling runs code.
        model_card: write README.md with the architecture and the checkpoint's training config.

    Example:

    ```python
    >>> model = convert_nanogpt_checkpoint("out-shakespeare-char/ckpt.pt", "hf-model",
    ...                                    meta_path="data/shakespeare_char/meta.pkl")  # doctest: +SKIP

    ```
    """
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{ckpt_path} holds objects torch.load refuses with weights_only=True; if you trust the file, "
            "pass trust_checkpoint=True (CLI: --trust-checkpoint)"
        ) from err
    if not isinstance(checkpoint, Mapping) or "model_args" not in checkpoint or "model" not in checkpoint:
        keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(f"{ckpt_path} is not a nanoGPT checkpoint (needs 'model_args' and 'model'), got {keys}")

    config = GPTConfig(**dict(checkpoint["model_args"]))
    model = load_nanogpt_state_dict(GPT(config), checkpoint["model"]).eval()
    model.save_pretrained(out_dir)

    if meta_path is not None:
        with open(meta_path, "rb") as f:
            meta = pickle.load(f)  # nanoGPT's own format; only convert files you trust
        tokenizer = _char_tokenizer_from_meta(meta, model_max_length=config.block_size)
        if tokenizer is not None:
            if len(tokenizer) > config.vocab_size:
                raise ValueError(
                    f"meta.pkl has {len(tokenizer)} characters but the model's vocab_size is {config.vocab_size}"
                )
            tokenizer.save_pretrained(out_dir)

    if model_card:
        training_config = dict(checkpoint.get("config") or {})
        for key in ("iter_num", "best_val_loss"):
            if key in checkpoint:
                training_config[key] = checkpoint[key]
        write_model_card(out_dir, config, training_config=training_config or None)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m altgrad.modeling.convert_nanogpt",
        description="Convert a nanoGPT ckpt.pt into a transformers model directory.",
    )
    parser.add_argument("ckpt", help="nanoGPT checkpoint file (ckpt.pt)")
    parser.add_argument("out_dir", help="output directory")
    parser.add_argument("--meta", default=None, help="nanoGPT meta.pkl of a char-level data set")
    parser.add_argument(
        "--trust-checkpoint", action="store_true", help="torch.load with weights_only=False (trusted files only)"
    )
    parser.add_argument("--no-model-card", action="store_true", help="do not write README.md")
    args = parser.parse_args(argv)
    model = convert_nanogpt_checkpoint(
        args.ckpt,
        args.out_dir,
        meta_path=args.meta,
        trust_checkpoint=args.trust_checkpoint,
        model_card=not args.no_model_card,
    )
    print(f"saved {model.num_parameters():,}-parameter GPT to {args.out_dir}")


if __name__ == "__main__":
    main()
