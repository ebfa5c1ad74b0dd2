"""Quantized training: recipes, quantizing Linear layers, the FP32 shadow and the Trainer subclass."""

from altgrad.training.quantized_linear import ModelQuantizer, QuantLinear, TensorQuantizer, quantize_model
from altgrad.training.recipe import RECIPE_PRESETS, TENSOR_ROLES, QuantRecipe, TensorQuantSpec, get_recipe
from altgrad.training.shadow import FP32ShadowModel, gradient_snr
from altgrad.training.trainer import AltGradTrainer

__all__ = [
    "QuantRecipe",
    "TensorQuantSpec",
    "RECIPE_PRESETS",
    "TENSOR_ROLES",
    "get_recipe",
    "QuantLinear",
    "TensorQuantizer",
    "ModelQuantizer",
    "quantize_model",
    "FP32ShadowModel",
    "gradient_snr",
    "AltGradTrainer",
]
