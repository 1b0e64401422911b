"""The shipped reference model: a small class-conditional DiT trained on sklearn's 16x16 digits.

It lets caching quality be measured offline on a *real* trained diffusion transformer: generate with
``sample_digits`` (DDIM 50 steps, batched CFG 1.5), then score the samples with the digits
classifier from ``load_evaluator`` (class accuracy, digits-FID; see ``relcache.evaluation.digits``).
Everything loads from the package directory; nothing touches the network. See ``MODEL_CARD.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .sampler import make_ddim_scheduler, sample_digits

if TYPE_CHECKING:
    from diffusers import DiTTransformer2DModel

    from ..digits import DigitsClassifier

REFERENCE_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = REFERENCE_DIR / "weights"
TRANSFORMER_DIR = WEIGHTS_DIR / "transformer"
EVALUATOR_WEIGHTS = WEIGHTS_DIR / "evaluator.safetensors"
EVALUATOR_CONFIG = WEIGHTS_DIR / "evaluator_config.json"

__all__ = [
    "EVALUATOR_CONFIG",
    "EVALUATOR_WEIGHTS",
    "REFERENCE_DIR",
    "TRANSFORMER_DIR",
    "WEIGHTS_DIR",
    "load_evaluator",
    "load_reference_transformer",
    "make_ddim_scheduler",
    "sample_digits",
]


def load_reference_transformer(dtype: torch.dtype = torch.float32) -> DiTTransformer2DModel:
    """Load the shipped DiT (stored in float16) as ``dtype``, in eval mode, from local files only."""
    from diffusers import DiTTransformer2DModel

    # low_cpu_mem_usage=False: the model is 2.8 M parameters, and without it diffusers warns on every
    # install that lacks accelerate (a plain ``pip install relcache`` does).
    model = DiTTransformer2DModel.from_pretrained(
        TRANSFORMER_DIR, torch_dtype=dtype, local_files_only=True, low_cpu_mem_usage=False
    )
    return model.eval()


def load_evaluator() -> DigitsClassifier:
    """Load the shipped digits classifier (float32, eval mode) used for class accuracy and digits-FID."""
    from safetensors.torch import load_file

    from ..digits import DigitsClassifier

    config = json.loads(EVALUATOR_CONFIG.read_text())["config"]
    model = DigitsClassifier(**config)
    model.load_state_dict(load_file(EVALUATOR_WEIGHTS))
    return model.eval()
