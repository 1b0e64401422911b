"""Quality against full computation: relative L1, PSNR and SSIM of final samples.

PSNR and SSIM come from torchmetrics; images are expected in [-1, 1] and mapped to [0, 1].
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ..methods.history import relative_l1

__all__ = ["psnr", "relative_l1", "ssim"]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean per-image PSNR in dB of images in [-1, 1] (data range 1 after mapping to [0, 1])."""
    values = [
        peak_signal_noise_ratio(_unit(a[None]), _unit(b[None]), data_range=1.0) for a, b in zip(x, ref, strict=True)
    ]
    return float(torch.stack(values).clamp(max=100.0).mean())


def ssim(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean SSIM of images in [-1, 1]; the Gaussian window shrinks for images smaller than 11 pixels."""
    kernel = min(11, x.shape[-1] - (1 - x.shape[-1] % 2), x.shape[-2] - (1 - x.shape[-2] % 2))
    return float(structural_similarity_index_measure(_unit(x), _unit(ref), data_range=1.0, kernel_size=kernel))
