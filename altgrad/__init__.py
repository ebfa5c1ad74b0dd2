"""altgrad: train GPTs with weights, activations and gradients in low-precision float formats and see
where and why they break.

Importing altgrad registers its GPT with transformers' ``AutoConfig`` / ``AutoModelForCausalLM``.

Example:
    >>> import torch, altgrad
    >>> altgrad.quantize(torch.tensor([0.3, 500.0]), "e4m3").tolist()
    [0.3125, 448.0]
"""

__version__ = "0.1.0"

from altgrad.modeling import GPT, GPTConfig, GPTForCausalLM, build_char_tokenizer, train_bpe_tokenizer
from altgrad.monitoring import AlertCallback, MonitoringConfig
from altgrad.quantization import (
    FORMAT_REGISTRY,
    AmaxHistory,
    BitStallDetector,
    FloatFormat,
    Granularity,
    compute_scale,
    dequantize,
    fake_quantize,
    get_format,
    quantization_stats,
    quantize,
)
from altgrad.training import AltGradTrainer, FP32ShadowModel, QuantRecipe, TensorQuantSpec, get_recipe, quantize_model

__all__ = [
    "GPT",
    "GPTConfig",
    "GPTForCausalLM",
    "build_char_tokenizer",
    "train_bpe_tokenizer",
    "FORMAT_REGISTRY",
    "FloatFormat",
    "get_format",
    "quantize",
    "dequantize",
    "fake_quantize",
    "compute_scale",
    "Granularity",
    "AmaxHistory",
    "quantization_stats",
    "BitStallDetector",
    "QuantRecipe",
    "TensorQuantSpec",
    "get_recipe",
    "quantize_model",
    "FP32ShadowModel",
    "AltGradTrainer",
    "MonitoringConfig",
    "AlertCallback",
]
