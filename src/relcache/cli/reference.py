"""The shipped reference model as the commands load it (``demo``, ``bench`` and ``analyze`` without ``--model``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..evaluation.bench import Sampler


def _reference() -> tuple[torch.nn.Module, Sampler, torch.nn.Module, torch.Tensor]:
    """(transformer, sampler, evaluator, real images) of the shipped reference model."""
    from ..evaluation.digits import load_digits_dataset
    from ..evaluation.reference import load_evaluator, load_reference_transformer, sample_digits

    real, _ = load_digits_dataset("all")
    return load_reference_transformer(), sample_digits, load_evaluator(), real
