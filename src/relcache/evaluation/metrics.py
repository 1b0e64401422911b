"""Quality against full computation: relative L1, PSNR and SSIM of final samples.

PSNR and SSIM come from torchmetrics; images are expected in [-1, 1] and mapped to [0, 1]. Samples are images
``(batch, channels, height, width)`` or videos ``(batch, frames, channels, height, width)``; PSNR and SSIM of a video
are means over its frames, each frame scored as an image (``frame_metrics`` gives them frame by frame).
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ..methods.history import relative_l1

__all__ = ["frame_metrics", "psnr", "relative_l1", "ssim"]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def _frames(x: torch.Tensor) -> torch.Tensor:
    """Videos as a batch of frames (images unchanged)."""
    return x.flatten(0, 1) if x.ndim == 5 else x


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean per-image (per-frame) PSNR in dB of images in [-1, 1] (data range 1 after mapping to [0, 1])."""
    x, ref = _frames(x), _frames(ref)
    values = [
        peak_signal_noise_ratio(_unit(a[None]), _unit(b[None]), data_range=1.0) for a, b in zip(x, ref, strict=True)
    ]
    return float(torch.stack(values).clamp(max=100.0).mean())


def ssim(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean SSIM of images (frames) in [-1, 1], with torchmetrics' Gaussian window (11 pixels, sigma 1.5); for images
    smaller than 11 pixels the window shrinks to the largest odd size that fits, its sigma in proportion. (torchmetrics
    sizes a Gaussian window from sigma alone, ``2 · int(3.5 sigma + 0.5) + 1``: the kernel size given with the
    default sigma was ignored, and images of 5 pixels or fewer failed; found by review.) torchmetrics reflect-pads the
    images by half a window and averages the whole map, borders included (scikit-image crops them away instead)."""
    x, ref = _frames(x), _frames(ref)
    kernel = min(11, x.shape[-1] - (1 - x.shape[-1] % 2), x.shape[-2] - (1 - x.shape[-2] % 2))
    return float(structural_similarity_index_measure(_unit(x), _unit(ref), data_range=1.0, kernel_size=kernel,
                                                     sigma=1.5 * kernel / 11))


def frame_metrics(x: torch.Tensor, ref: torch.Tensor) -> dict[str, list[float]]:
    """Relative L1, PSNR and SSIM of each frame of videos ``(batch, frames, ...)`` against ``ref``."""
    if x.ndim != 5 or x.shape != ref.shape:
        raise ValueError(f"expected videos of equal shape (batch, frames, channels, height, width), got "
                         f"{tuple(x.shape)} and {tuple(ref.shape)}")
    frames = range(x.shape[1])
    return {"rel_l1": [relative_l1(x[:, f], ref[:, f]) for f in frames],
            "psnr": [psnr(x[:, f], ref[:, f]) for f in frames],
            "ssim": [ssim(x[:, f], ref[:, f]) for f in frames]}
