"""Quantized training.

One file per concern:

=====================  ==========================================================================
``recipe.py``          what is quantized and how: `QuantRecipe` / `TensorQuantSpec` (frozen data, enums
                       parsed once; tensor / row / 1xN block / NxN tile granularity), presets
``quantized_linear.py``  `quantize_model` -> `QuantLinear` (quantized operands in all three GEMMs);
                       `TensorQuantizer` = spec + `ScaleState` (checkpointable) + `StatsAccumulator`;
                       `ModelQuantizer` (the per-step hooks)
``native_fp8.py``      the same GEMMs on FP8 tensor cores (`torch._scaled_mm`); `NativeFP8Plan`, decided
                       once per layer at conversion
``optimizer_states.py``  `OptimizerStateQuantizer`: Adam's moments rounded into the recipe's
                       ``optimizer_m`` / ``optimizer_v`` formats after every step
``shadow.py``          `FP32ShadowModel`: the float32 twin that measures gradient fidelity
``whatif.py``          what-if: other formats scored on the run's own tensors (statistics on logging steps)
                       and steps (alternative recipes replayed, gradients scored against the shadow)
``session.py``         `QuantSession`: the per-step lifecycle any training loop drives (conversion,
                       shadow, statistics, bit-stall, non-finite verdict, metrics, alerts)
``checkpointing.py``   altgrad's checkpoint files, atomic folders, resume checks, anomaly checkpoints
``trainer.py``         `AltGradTrainer`: `transformers.Trainer` hooks mapped onto a `QuantSession`
=====================  ==========================================================================
"""

from altgrad.training.native_fp8 import NativeFP8Plan
from altgrad.training.quantized_linear import (
    ModelQuantizer,
    QuantLinear,
    ScaleState,
    StatsAccumulator,
    TensorQuantizer,
    quantize_model,
)
from altgrad.training.optimizer_states import OptimizerStateQuantizer
from altgrad.training.recipe import (
    OPTIMIZER_ROLES,
    RECIPE_PRESETS,
    TENSOR_ROLES,
    AmaxAlgo,
    Backend,
    Compensation,
    GranularityKind,
    QuantRecipe,
    Rounding,
    Scaling,
    TensorQuantSpec,
    get_recipe,
    recipe_mismatch,
)
from altgrad.training.session import QuantSession, StepVerdict, perplexity
from altgrad.training.shadow import FP32ShadowModel, gradient_snr
from altgrad.training.trainer import AltGradTrainer
from altgrad.training.whatif import WhatIfConfig

__all__ = [
    "QuantRecipe",
    "TensorQuantSpec",
    "RECIPE_PRESETS",
    "TENSOR_ROLES",
    "OPTIMIZER_ROLES",
    "get_recipe",
    "recipe_mismatch",
    "Compensation",
    "OptimizerStateQuantizer",
    "Rounding",
    "Scaling",
    "GranularityKind",
    "AmaxAlgo",
    "Backend",
    "QuantLinear",
    "TensorQuantizer",
    "ScaleState",
    "StatsAccumulator",
    "NativeFP8Plan",
    "ModelQuantizer",
    "quantize_model",
    "FP32ShadowModel",
    "gradient_snr",
    "QuantSession",
    "StepVerdict",
    "perplexity",
    "AltGradTrainer",
    "WhatIfConfig",
]
