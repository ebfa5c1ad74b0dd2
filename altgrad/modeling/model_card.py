"""README.md model cards for saved altgrad GPTs.

A saved directory should say what it holds: the architecture, how many parameters, how it was
trained and, for this project above all, in which number formats (the quantization recipe).
The card is a `huggingface_hub.ModelCard`, so `model.push_to_hub(...)` followed by
`card.push_to_hub(...)` publishes it, and the Hub renders its metadata header.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

# The architecture fields shown in the card, in nanoGPT's order.
_ARCH_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout", "bias", "tie_word_embeddings")


def _config_dict(model_config: Any) -> dict:
    if isinstance(model_config, Mapping):
        return dict(model_config)
    if hasattr(model_config, "to_dict"):
        return model_config.to_dict()
    raise TypeError(f"model_config must be a GPTConfig or a dict, got {type(model_config).__name__}")


def count_parameters(model_config: Any) -> dict[str, int]:
    """Parameter counts of a GPT from its config alone (nanoGPT's layout, no weights needed).

    Returns `total` (a tied embedding counted once, like `model.num_parameters()`) and
    `non_embedding` (total minus the position embeddings, nanoGPT's `get_num_params()`).

    Example:

    ```python
    >>> count_parameters(dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257))
    {'total': 124439808, 'non_embedding': 123653376}

    ```
    """
    cfg = _config_dict(model_config)
    C, L, V, T = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"], cfg["block_size"]
    bias = bool(cfg.get("bias", True))
    tied = bool(cfg.get("tie_word_embeddings", True))
    # Per block: c_attn 3C^2, attn.c_proj C^2, c_fc 4C^2, mlp.c_proj 4C^2 = 12C^2 weights, two
    # LayerNorm gains, and (with bias) 3C + C + 4C + C Linear biases plus two LayerNorm biases.
    per_block = 12 * C * C + 2 * C + (11 * C if bias else 0)
    final_ln = C + (C if bias else 0)
    embeddings = V * C + T * C + (0 if tied else V * C)
    total = L * per_block + final_ln + embeddings
    return {"total": total, "non_embedding": total - T * C}


def _plain(value: Any) -> Any:
    """Make a value YAML-safe: containers recursively, scalars as is, one-element tensors as
    numbers, and anything else (dtypes, paths, enums) as its str()."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    numel = getattr(value, "numel", None)
    if callable(numel) and hasattr(value, "item") and numel() == 1:
        return value.item()
    return str(value)


def _yaml_block(data: Mapping) -> str:
    text = yaml.safe_dump(_plain(data), sort_keys=False, default_flow_style=False, allow_unicode=True)
    return f"```yaml\n{text}```"


def write_model_card(
    save_dir: str | os.PathLike,
    model_config: Any,
    training_config: dict | None = None,
    quant_recipe: dict | None = None,
    *,
    model_name: str | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """Write `save_dir/README.md` describing a saved GPT, and return the `ModelCard`.

    Args:
        save_dir: the `save_pretrained` directory (created if missing).
        model_config: the model's `GPTConfig` (or its dict).
        training_config: hyper-parameters of the run (any dict; values are written as YAML,
            non-YAML values as their str()). None records "not recorded".
        quant_recipe: the number formats used (weights / activations / gradients, scaling, ...).
            None records full-precision training.
        model_name: the card's title; defaults to the directory name.
        tags: extra Hub tags.

    Example:

    ```python
    >>> import tempfile
    >>> from altgrad.modeling import GPTConfig
    >>> config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=65)
    >>> out = tempfile.mkdtemp()
    >>> card = write_model_card(out, config, training_config={"lr": 6e-4},
    ...                         quant_recipe={"weights": "fp8_e4m3", "grads": "fp8_e5m2"})
    >>> "fp8_e4m3" in open(f"{out}/README.md").read()
    True

    ```
    """
    save_dir = os.fspath(save_dir)
    os.makedirs(save_dir, exist_ok=True)
    cfg = _config_dict(model_config)
    model_name = model_name or os.path.basename(os.path.normpath(save_dir)) or "altgrad-gpt"
    counts = count_parameters(cfg)

    arch = {"model_type": cfg.get("model_type", "altgrad_gpt")}
    arch.update({k: cfg[k] for k in _ARCH_FIELDS if k in cfg})
    arch["parameters"] = counts["total"]
    arch["non_embedding_parameters"] = counts["non_embedding"]

    card_tags = ["altgrad", "nanogpt", "gpt", "custom_code"]
    if quant_recipe:
        card_tags.append("low-precision-training")
    card_tags += [t for t in (tags or []) if t not in card_tags]
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", tags=card_tags, model_name=model_name
    )

    if training_config:
        training = _yaml_block(training_config)
    else:
        training = "Not recorded."
    if quant_recipe:
        quant = _yaml_block(quant_recipe)
    else:
        quant = "None: trained in full precision."

    n_layer = cfg.get("n_layer")
    blocks = f"{n_layer} pre-LayerNorm block{'' if n_layer == 1 else 's'}"
    body = f"""# {model_name}

A GPT language model with [nanoGPT](https://github.com/karpathy/nanoGPT)'s architecture, trained
with altgrad (low-precision float training of GPTs).

## Architecture

GPT-2 style decoder: learned token and position embeddings, {blocks}
(causal self-attention + 4x GELU MLP), final LayerNorm, language-model head
{'tied to' if cfg.get('tie_word_embeddings', True) else 'separate from'} the token embedding.
**{counts['total']:,} parameters** ({counts['non_embedding']:,} without position embeddings).

{_yaml_block(arch)}

## Training configuration

{training}

## Quantization recipe

{quant}

## Usage

The modeling code ships with the weights, so altgrad need not be installed:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{model_name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{model_name}")
ids = tokenizer("ROMEO:", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=100, do_sample=True)[0]))

```

Sequences (prompt plus generated tokens) cannot exceed block_size = {cfg.get('block_size')} tokens.
"""
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")
    card.save(os.path.join(save_dir, "README.md"))
    return card


__all__ = ["count_parameters", "write_model_card"]
