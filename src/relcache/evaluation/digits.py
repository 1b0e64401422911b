"""Offline evaluation on scikit-learn's bundled digits: a small CNN classifier and a digits-FID.

The reference DiT (``relcache.evaluation.reference``) generates 16x16 digits. To measure how much a
caching method degrades its samples without any network access we use:

* ``class_accuracy``: the fraction of class-conditional samples the classifier assigns to the
  requested class (a proxy for conditional fidelity);
* ``digits_fid``: the Frechet distance between Gaussian fits of the classifier's penultimate
  features (the FID recipe, with this small classifier in place of Inception-v3).

All images use one preprocessing, shared with the DiT's training data: the 8x8 sklearn digits
(values 0..16) are upsampled bilinearly (``align_corners=False``) to 16x16 and scaled to [-1, 1].
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

IMAGE_SIZE = 16
NUM_CLASSES = 10

__all__ = [
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "DigitsClassifier",
    "class_accuracy",
    "digits_features",
    "digits_fid",
    "frechet_distance",
    "load_digits_dataset",
    "preprocess_digits",
    "random_shift",
]


def preprocess_digits(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Map raw sklearn digits (N, 64) or (N, 8, 8), values 0..16, to (N, 1, 16, 16) floats in [-1, 1]."""
    x = torch.as_tensor(np.asarray(raw), dtype=torch.float32).reshape(-1, 1, 8, 8)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (x / 16.0 * 2.0 - 1.0).clamp(-1.0, 1.0)


def load_digits_dataset(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` of the sklearn digits for ``split`` in {"all", "train", "test"}.

    The train/test split is fixed (25 % test, stratified, ``random_state=0``) so the evaluator's
    held-out accuracy is reproducible and both training scripts see the same partition.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    data = load_digits()
    raw, labels = data.data, data.target
    if split != "all":
        idx = np.arange(len(labels))
        train_idx, test_idx = train_test_split(idx, test_size=0.25, random_state=0, stratify=labels)
        sel = np.sort(train_idx if split == "train" else test_idx)
        raw, labels = raw[sel], labels[sel]
    return preprocess_digits(raw), torch.as_tensor(labels, dtype=torch.long)


def random_shift(
    images: torch.Tensor, max_shift: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift] per axis (augmentation).

    Vacated pixels are filled with the background value -1 (no wrap-around), so a shifted digit is
    still a plausible digit.
    """
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    m = max_shift
    padded = F.pad(images, (m, m, m, m), value=-1.0)
    offsets = torch.randint(0, 2 * m + 1, (n, 2), generator=generator)
    rows = (offsets[:, 0:1] + torch.arange(h)).view(n, h, 1)
    cols = (offsets[:, 1:2] + torch.arange(w)).view(n, 1, w)
    batch = torch.arange(n).view(n, 1, 1)
    # Advanced indices separated by a slice put the broadcast dims first: (n, h, w, C).
    return padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()


class DigitsClassifier(nn.Module):
    """Small CNN on (N, 1, 16, 16) images in [-1, 1] with a ``feature_dim``-d penultimate layer."""

    def __init__(self, channels: int = 32, feature_dim: int = 64, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        c = channels
        self.config = {"channels": channels, "feature_dim": feature_dim, "num_classes": num_classes}
        self.conv = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
        )
        self.fc = nn.Linear(2 * c * 4 * 4, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (post-ReLU) features, shape (N, feature_dim); the FID embedding."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, shape (N, num_classes)."""
        return self.head(self.dropout(self.features(x)))


def _batched(
    classifier: DigitsClassifier, images: torch.Tensor, fn_name: str, batch_size: int
) -> torch.Tensor:
    """Run ``classifier.<fn_name>`` over ``images`` in eval mode, without grad, in batches."""
    param = next(classifier.parameters())
    was_training = classifier.training
    classifier.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size].to(device=param.device, dtype=param.dtype)
            outs.append(getattr(classifier, fn_name)(chunk).float().cpu())
    classifier.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def class_accuracy(
    classifier: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> float:
    """Fraction of ``images`` that ``classifier`` assigns to ``labels`` (images in [-1, 1])."""
    logits = _batched(classifier, images, "forward", batch_size)
    return float((logits.argmax(dim=1) == torch.as_tensor(labels).cpu()).float().mean())


def digits_features(classifier: DigitsClassifier, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Penultimate features of ``images`` as a float64 array (N, feature_dim)."""
    return _batched(classifier, images, "features", batch_size).numpy().astype(np.float64)


def _sqrtm_checked(mat: np.ndarray) -> np.ndarray | None:
    """``sqrtm(mat)``, or None if it is not finite or does not square back to ``mat``.

    Dead ReLU features make the covariances singular; scipy then warns, yet its result is usually
    exact, so the warning is silenced and the result verified instead.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(mat)
    if not np.isfinite(root).all():
        return None
    scale = max(np.linalg.norm(mat), 1e-300)
    return root if np.linalg.norm(root @ root - mat) / scale < 1e-6 else None


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussian fits of two feature sets (rows are samples).

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``. If the matrix square root is not
    finite or inaccurate (near-singular covariances), ``eps * I`` is added to both covariances;
    tiny imaginary parts left by ``sqrtm`` are discarded. 1-D inputs are one scalar per sample. NaN when either set
    has fewer than two samples (a covariance needs two).
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    a = a.reshape(-1, 1) if a.ndim == 1 else a  # 1-D input: one scalar feature per sample
    b = b.reshape(-1, 1) if b.ndim == 1 else b
    if min(len(a), len(b)) < 2:
        return math.nan
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    sigma_a = np.atleast_2d(np.cov(a, rowvar=False))
    sigma_b = np.atleast_2d(np.cov(b, rowvar=False))
    diff = mu_a - mu_b
    covmean = _sqrtm_checked(sigma_a @ sigma_b)
    if covmean is None:  # near-singular product: regularise both covariances
        offset = np.eye(sigma_a.shape[0]) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component: {np.abs(covmean.imag).max()}")
        covmean = covmean.real
    value = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


def digits_fid(classifier: DigitsClassifier, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Digits-FID: ``frechet_distance`` of the classifier's features of two image sets."""
    return frechet_distance(digits_features(classifier, images_a), digits_features(classifier, images_b))
