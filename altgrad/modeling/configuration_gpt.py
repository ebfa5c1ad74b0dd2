"""Configuration of altgrad's GPT: nanoGPT's `GPTConfig` as a transformers 5.x `PreTrainedConfig`.

This file is copied next to the weights by `save_pretrained` (remote code), so it must stay
self-contained: it may import torch and transformers only, never `altgrad`.
"""

from transformers import PreTrainedConfig

# Keys that transformers itself feeds to a config's constructor (from `config.json`, `from_dict`,
# `from_pretrained(**kwargs)`, `to_dict()` round trips) without them being dataclass fields. They are
# handed on to `PreTrainedConfig.__post_init__`, which knows what to do with each. Anything else is a
# typo or a key of another model, and is rejected instead of being silently stored on the config.
_TRANSFORMERS_KWARGS = frozenset(
    {
        "model_type",  # written into every config.json
        "auto_map",  # written by save_pretrained for remote code
        "name_or_path",
        "num_labels",
        "torch_dtype",  # pre-v5 spelling of `dtype`
        "output_attentions",
        "attn_implementation",
        "experts_implementation",
        "quantization_config",  # set by transformers' quantizers
        "transformers_weights",
        "custom_pipelines",
    }
)


class GPTConfig(PreTrainedConfig):
    r"""
    Hyper-parameters of a nanoGPT model (GPT-2 architecture with learned absolute positions).

    The field names and defaults are nanoGPT's (the defaults give GPT-2 124M with the vocabulary
    padded to 50304), so a nanoGPT `model_args` dict can be passed as is: `GPTConfig(**model_args)`.
    The standard transformers names are aliases: `hidden_size` -> `n_embd`, `num_hidden_layers` ->
    `n_layer`, `num_attention_heads` -> `n_head`, `max_position_embeddings` -> `block_size`.

    Unknown keys raise a `ValueError` (transformers' default would be to store them silently, which
    turns a typo such as `n_layers=4` into a 12-layer model).

    Example:

    ```python
    >>> from altgrad.modeling import GPTConfig, GPT
    >>> config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=65)
    >>> config.hidden_size  # standard alias
    64
    >>> model = GPT(config)

    ```
    """

    model_type = "altgrad_gpt"
    # Output fields the Trainer drops from predictions: the KV cache, named `cache` from transformers 5.24
    # on and `past_key_values` before.
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "block_size",
    }

    # Depth. Cost and capacity grow linearly; deeper nets need the 1/sqrt(2*n_layer) residual init
    # (applied in `_init_weights`) to keep the residual stream's variance from growing with depth.
    n_layer: int = 12
    # Attention heads. More heads = more, smaller (n_embd/n_head) attention patterns at the same cost;
    # very small head dims make attention scores coarse, especially in low precision.
    n_head: int = 12
    # Width of the residual stream. Parameters and FLOPs grow quadratically with it.
    n_embd: int = 768
    # Context length: the number of learned position embeddings. Longer contexts cost memory
    # (attention is O(T^2) in FLOPs) and a sequence can never be longer than this.
    block_size: int = 1024
    # Vocabulary size. nanoGPT pads GPT-2's 50257 up to 50304 (a multiple of 64) because the padded
    # matmuls run faster; the unused rows simply never get targets.
    vocab_size: int = 50304
    # Dropout on embeddings, attention weights and residual branches. 0.0 for pretraining (more data
    # beats regularization); ~0.1-0.2 for finetuning or tiny data sets such as Shakespeare.
    dropout: float = 0.0
    # Biases in Linear and LayerNorm layers. True matches GPT-2; False is slightly faster and about
    # as good (nanoGPT's observation), and removes tensors that low-precision formats must handle.
    bias: bool = True
    # Share the input embedding with the output projection (GPT-2 does). Saves vocab_size*n_embd
    # parameters; untying adds capacity but doubles the largest matrix. transformers v5 no longer
    # defines this on the base config, so every model must declare it.
    tie_word_embeddings: bool = True
    # KV cache for decoding (`generate`'s default and forward's in eval mode without labels): each
    # new token costs O(T) instead of re-running the whole prefix, for 2*n_layer*T*n_embd values of
    # memory per sequence. Never built in train mode or for a loss unless asked for.
    use_cache: bool = True
    # Special tokens, for `generate` and pipelines. None (nanoGPT's char and GPT-2 BPE data have no
    # padding) means generation stops only at `max_new_tokens`.
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        # Underscored keys are transformers' private bookkeeping (`_name_or_path` from `to_dict()`,
        # `_commit_hash` in old files): never a user's typo of a GPT field.
        unknown = sorted(k for k in kwargs if k not in self._accepted_extra_kwargs() and not k.startswith("_"))
        if unknown:
            raise ValueError(
                f"GPTConfig got unknown key(s) {unknown}. Valid keys are the GPT fields "
                f"{sorted(self._gpt_field_names())}, their aliases {sorted(self.attribute_map)}, "
                f"and the standard PreTrainedConfig fields {sorted(self._base_field_names())}."
            )
        model_type = kwargs.pop("model_type", self.model_type)
        if model_type != self.model_type:
            raise ValueError(
                f"GPTConfig got model_type={model_type!r}, expected {self.model_type!r}: this config.json "
                "belongs to another architecture."
            )
        super().__post_init__(**kwargs)
        self.validate_architecture()

    @classmethod
    def _base_field_names(cls) -> set[str]:
        return {f.name for f in PreTrainedConfig.__dataclass_fields__.values()}

    @classmethod
    def _gpt_field_names(cls) -> set[str]:
        return set(cls.__dataclass_fields__) - cls._base_field_names()

    @classmethod
    def _accepted_extra_kwargs(cls) -> set[str]:
        return set(_TRANSFORMERS_KWARGS) | set(cls.attribute_map)

    @staticmethod
    def _is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def validate_architecture(self):
        """Raise a `ValueError` naming the first inconsistent field (also re-run by `GPT(config)`)."""
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if not self._is_int(value) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                "each head gets n_embd // n_head channels."
            )
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be a float in [0, 1), got {self.dropout!r}")
        for name in ("bias", "tie_word_embeddings", "use_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            for token_id in ids:
                if token_id is not None and (not self._is_int(token_id) or not 0 <= token_id < self.vocab_size):
                    raise ValueError(
                        f"GPTConfig.{name}={value!r} is not a token id in [0, vocab_size={self.vocab_size})"
                    )

    def validate(self):
        """Run transformers' own checks, then ours (called by `save_pretrained`)."""
        super().validate()
        self.validate_architecture()


__all__ = ["GPTConfig"]
