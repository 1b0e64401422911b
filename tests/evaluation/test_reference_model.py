"""The shipped reference DiT, its sampler and the digits evaluator (offline, a few seconds on 2 cores)."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
from torch import nn

import relcache
from relcache.evaluation.digits import (
    class_accuracy,
    digits_fid,
    frechet_distance,
    load_digits_dataset,
    random_shift,
)
from relcache.evaluation.reference import load_evaluator, load_reference_transformer, sample_digits

PER_CLASS = 2  # 20 samples: the card's 500-sample accuracy leaves ample margin over the 90 % bar
SEED = 0


@pytest.fixture(scope="module")
def no_network():
    """Make any socket connection fail, so loading must be purely local."""
    mp = pytest.MonkeyPatch()

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def transformer(no_network):
    return load_reference_transformer()


@pytest.fixture(scope="module")
def evaluator(no_network):
    return load_evaluator()


@pytest.fixture(scope="module")
def samples(transformer):
    labels = torch.arange(10).repeat_interleave(PER_CLASS)
    gen = torch.Generator().manual_seed(SEED)
    return sample_digits(transformer, labels, num_steps=50, guidance_scale=1.5, generator=gen), labels


def test_transformer_loads_offline(transformer):
    cfg = transformer.config
    assert type(transformer).__name__ == "DiTTransformer2DModel"
    assert cfg.norm_type == "ada_norm_zero" and cfg.num_layers >= 8
    assert (cfg.in_channels, cfg.out_channels, cfg.sample_size, cfg.patch_size) == (1, 1, 16, 2)
    assert cfg.num_embeds_ada_norm == 10
    assert not transformer.training
    assert all(p.dtype == torch.float32 for p in transformer.parameters())


def test_evaluator_heldout_accuracy(evaluator):
    images, labels = load_digits_dataset("test")
    assert images.shape == (450, 1, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert class_accuracy(evaluator, images, labels) >= 0.95


def test_dataset_split_is_fixed_and_disjoint():
    train, _ = load_digits_dataset("train")
    test, _ = load_digits_dataset("test")
    everything, labels = load_digits_dataset("all")
    assert len(train) + len(test) == len(everything) == 1797
    assert sorted(labels.unique().tolist()) == list(range(10))
    flat = {tuple(x.flatten().tolist()) for x in test}
    assert sum(tuple(x.flatten().tolist()) in flat for x in train) < 10  # sklearn digits has rare duplicates


def test_full_computation_samples_are_the_requested_digits(samples, evaluator):
    images, labels = samples
    assert images.shape == (10 * PER_CLASS, 1, 16, 16)
    assert images.dtype == torch.float32 and images.min() >= -1 and images.max() <= 1
    assert class_accuracy(evaluator, images, labels) >= 0.9


def test_sampler_is_seeded(transformer):
    labels = torch.tensor([3, 7])
    a = sample_digits(transformer, labels, num_steps=4, generator=torch.Generator().manual_seed(1))
    b = sample_digits(transformer, labels, num_steps=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("guidance, doubled", [(1.5, True), (1.0, False)])
def test_sampler_batches_cfg_in_one_call(transformer, guidance, doubled):
    calls = []

    def record(module, args, kwargs):
        calls.append((args[0].shape[0], kwargs["timestep"].shape, kwargs["class_labels"].tolist()))

    handle = transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        sample_digits(transformer, torch.tensor([1, 2, 3]), num_steps=3, guidance_scale=guidance)
    finally:
        handle.remove()
    assert len(calls) == 3  # one transformer call per step
    batch, t_shape, labels = calls[0]
    if doubled:
        assert batch == 6 and t_shape == (6,) and labels == [1, 2, 3, 10, 10, 10]
    else:
        assert batch == 3 and t_shape == (3,) and labels == [1, 2, 3]


def test_sampler_announces_the_generation(transformer):
    """RFC(target_nfc=...) needs the step count: only the sampler's announcement can give it on a bare model."""
    with relcache.cached(transformer, relcache.RFC(target_nfc=3)):
        sample_digits(transformer, torch.tensor([0]), num_steps=5)
        st = relcache.stats(transformer)
    assert (st.num_steps, st.nfc) == (5, 3)


def test_frechet_distance_self_and_shift():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    assert abs(frechet_distance(feats, feats)) < 1e-6
    shift = np.linspace(0.1, 0.8, 8)
    # Equal covariances: the distance is exactly the squared mean shift.
    assert frechet_distance(feats, feats + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_frechet_distance_of_one_sample_is_nan():
    """A covariance needs two samples: ``bench``/``demo --samples 1`` used to end in a scipy traceback after every
    generation had run."""
    rng = np.random.default_rng(3)
    assert math.isnan(frechet_distance(rng.normal(size=(1, 4)), rng.normal(size=(5, 4))))
    assert math.isnan(frechet_distance(rng.normal(size=(5, 4)), rng.normal(size=(1, 4))))
    assert math.isnan(frechet_distance(rng.normal(size=1), rng.normal(size=1)))
    assert np.isfinite(frechet_distance(rng.normal(size=(2, 4)), rng.normal(size=(2, 4))))


def test_frechet_distance_singular_covariance_is_finite():
    rng = np.random.default_rng(1)
    a = np.concatenate([rng.normal(size=(50, 3)), np.zeros((50, 5))], axis=1)  # rank-3 covariance
    b = np.concatenate([rng.normal(size=(50, 3)), np.zeros((50, 5))], axis=1)
    value = frechet_distance(a, b)
    assert np.isfinite(value) and value >= 0


def test_frechet_distance_1d_closed_form():
    rng = np.random.default_rng(2)
    a, b = rng.normal(1.0, 2.0, size=4000), rng.normal(-0.5, 0.5, size=4000)
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-7)
    # and close to the population value (1.5^2 + 1.5^2)
    assert frechet_distance(a, b) == pytest.approx(4.5, rel=0.05)


class _PixelFeatures(nn.Module):
    """Stand-in for the classifier whose features are the raw pixels, to test ``digits_fid`` exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _exact_gaussian_sample(mu: torch.Tensor, sd: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n samples whose sample mean is exactly ``mu`` and sample covariance exactly ``diag(sd**2)``."""
    z = torch.randn(n, len(mu), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(z - z.mean(0))  # orthonormal, zero-mean columns
    return mu + sd * q * (n - 1) ** 0.5


def test_digits_fid_matches_diagonal_gaussian_closed_form():
    n = 500
    mu_a = torch.tensor([0.0, 1.0, -1.0, 0.5], dtype=torch.float64)
    sd_a = torch.tensor([1.0, 0.5, 2.0, 1.0], dtype=torch.float64)
    mu_b = torch.tensor([0.5, 1.0, 0.0, 0.5], dtype=torch.float64)
    sd_b = torch.tensor([1.0, 1.5, 1.0, 0.2], dtype=torch.float64)
    a = _exact_gaussian_sample(mu_a, sd_a, n, seed=3).view(n, 1, 2, 2)
    b = _exact_gaussian_sample(mu_b, sd_b, n, seed=4).view(n, 1, 2, 2)
    # Diagonal covariances: sum_i (mu_a - mu_b)_i^2 + (sd_a - sd_b)_i^2 = 1.25 + 2.64
    expected = float(((mu_a - mu_b) ** 2).sum() + ((sd_a - sd_b) ** 2).sum())
    assert expected == pytest.approx(3.89)
    assert digits_fid(_PixelFeatures(), a, b) == pytest.approx(expected, rel=1e-7)


def test_random_shift_moves_content_by_at_most_one_pixel():
    images, _ = load_digits_dataset("test")
    x = images[:16]
    shifted = random_shift(x, 1, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    for i in range(len(x)):
        assert any(
            torch.equal(shifted[i], padded[i, :, 1 + dy : 17 + dy, 1 + dx : 17 + dx])
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        )


def test_real_data_fid_is_small_against_itself_and_larger_against_noise(evaluator):
    train, _ = load_digits_dataset("train")
    test, _ = load_digits_dataset("test")
    real_vs_real = digits_fid(evaluator, test, train)
    noise = torch.rand(450, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert real_vs_real < digits_fid(evaluator, noise, train) / 10
