"""The numbers ``relcache bench`` and ``relcache analyze`` report, each against a value computed by hand: PSNR, SSIM,
relative L1, the Frechet distance, a bench row, and analyze's ratio RSD, step distances, errors and correlation.
(A mutation review found each of these rules changeable without any other test failing.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from relcache.evaluation.analyze import Trace, analyze_trace, ratio_rsd, step_distances
from relcache.evaluation.bench import BenchMethod, _row
from relcache.evaluation.digits import frechet_distance
from relcache.evaluation.metrics import psnr, relative_l1, ssim
from relcache.methods import FORA

# metrics.py

#: 10 log10(1 / MSE) with MSE = 0.25² = 1/16: two constant images 0.25 apart after the [-1, 1] -> [0, 1] mapping
PSNR_QUARTER = 10 * math.log10(16)  # 12.0412 dB


def test_psnr_of_constant_images_by_hand():
    """``x`` = 0 maps to 0.5 and ``ref`` = 0.5 maps to 0.75: MSE = 0.25² = 1/16 on the [0, 1] scale, data range 1,
    so PSNR = 10 log10(1 / (1/16)) = 10 log10 16 = 12.0412 dB. (Data range 2 would say 18.06 dB; skipping the
    mapping, MSE 0.5² = 0.25, 6.02 dB.) Identical images are capped at 100 dB (torchmetrics says inf)."""
    x, ref = torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.5)
    assert psnr(x, ref) == pytest.approx(PSNR_QUARTER, rel=1e-6)
    assert psnr(ref, ref) == 100.0


def test_psnr_is_the_mean_of_per_image_values_each_capped_first():
    """Image 0 equals its reference (inf, capped to 100 dB), image 1 is 0.25 off everywhere (12.0412 dB): the mean
    of the per-image values is (100 + 12.0412) / 2 = 56.0206 dB. Capping after the mean would say 100 (the mean is
    inf); one PSNR of the pooled MSE (1/32) would say 15.05 dB; a cap of 50 would say 31.02 dB."""
    ref = torch.full((2, 1, 8, 8), 0.5)
    x = torch.stack([ref[0], torch.zeros(1, 8, 8)])
    assert psnr(x, ref) == pytest.approx((100.0 + PSNR_QUARTER) / 2, rel=1e-6)


def test_ssim_of_constant_images_by_hand():
    """Constant images have no variance, so SSIM = (2 a b + C1) / (a² + b² + C1) (the contrast-structure term is
    C2 / C2 = 1) with C1 = (0.01 · 1)² = 1e-4. ``x`` = 0 and ``ref`` = 0.5 map to a = 0.5, b = 0.75:
    (0.75 + 1e-4) / (0.8125 + 1e-4) = 0.7501 / 0.8126 = 0.923086. Without the [-1, 1] -> [0, 1] mapping (a = 0,
    b = 0.5) it would be 1e-4 / 0.2501 = 0.0004. Identical images give 1. (torchmetrics works in float32 and forms
    the variances as E[x²] - mu², which on flat images leaves up to about 5e-4 of rounding against C2 = 9e-4: 0.92266
    here, and 0.99947 for identical flat images with a 7-pixel window; hence abs=5e-3.)"""
    x, ref = torch.zeros(2, 3, 16, 16), torch.full((2, 3, 16, 16), 0.5)
    assert ssim(x, ref) == pytest.approx(0.7501 / 0.8126, abs=5e-3)
    assert ssim(ref, ref) == pytest.approx(1.0, abs=5e-3)


@pytest.mark.parametrize("size,kernel", [(16, 11), (7, 7), (8, 7)])
def test_ssim_window_is_11_pixels_sigma_1_5_shrunk_in_proportion(size, kernel):
    """The documented window: 11 pixels with sigma 1.5 where the image holds it, else the largest odd size that fits
    (7 for 7 and 8 pixels) with sigma 1.5 · 7 / 11. Compared with torchmetrics given that window explicitly (on the
    images mapped to [0, 1]); random images, so a window of another size or sigma gives another value."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, size, size, generator=g) * 2 - 1
    ref = (x + 0.3 * torch.randn(3, 2, size, size, generator=g)).clamp(-1, 1)
    expected = structural_similarity_index_measure((x + 1) / 2, (ref + 1) / 2, data_range=1.0, kernel_size=kernel,
                                                   sigma=1.5 * kernel / 11)
    assert ssim(x, ref) == pytest.approx(float(expected), rel=1e-6)


def test_relative_l1_is_the_mean_of_per_sample_ratios_over_the_reference():
    """Sample 0: ref 1, x 2 everywhere: ‖x - ref‖₁ / ‖ref‖₁ = 1. Sample 1: ref 2, x 2.5: 0.5 / 2 = 0.25. The mean over
    samples is 0.625 (over ``x`` instead of ``ref`` it would be (0.5 + 0.2) / 2 = 0.35; pooled over the batch,
    (1 + 0.5) / (1 + 2) = 0.5)."""
    ref = torch.stack([torch.ones(3, 4), torch.full((3, 4), 2.0)])
    x = torch.stack([torch.full((3, 4), 2.0), torch.full((3, 4), 2.5)])
    assert relative_l1(x, ref) == pytest.approx(0.625, rel=1e-6)


# digits.py


def _exact_sample(mu: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n rows whose sample mean is exactly ``mu`` and sample covariance (ddof 1) exactly ``cov``."""
    z = np.random.default_rng(seed).normal(size=(n, len(mu)))
    q, _ = np.linalg.qr(z - z.mean(0))  # orthonormal, zero-mean columns: q.T q = I
    return mu + np.sqrt(n - 1) * q @ np.linalg.cholesky(cov).T


def test_frechet_distance_of_non_commuting_covariances_by_hand():
    """S_a = diag(1, 9) and S_b = [[1, 1], [1, 2]] do not commute, so Tr (S_a S_b)^(1/2) is not Tr S_a^(1/2) S_b^(1/2).
    For a 2x2 matrix M with positive eigenvalues, Tr M^(1/2) = sqrt(Tr M + 2 sqrt(det M)); here S_a S_b = [[1, 1],
    [9, 18]], Tr = 19, det = 9 · 1 = 9, so Tr (S_a S_b)^(1/2) = sqrt(19 + 6) = 5. With mu_a - mu_b = (1, 2):
    FD = 1 + 4 + Tr S_a + Tr S_b - 2 · 5 = 5 + 10 + 3 - 10 = 8. (The product of the separate roots, diag(1, 3) ·
    [[2, 1], [1, 3]] / sqrt(5), has trace 11 / sqrt(5) and would give 18 - 22 / sqrt(5) = 8.161.)"""
    s_a, s_b = np.diag([1.0, 9.0]), np.array([[1.0, 1.0], [1.0, 2.0]])
    a = _exact_sample(np.array([1.0, 2.0]), s_a, 60, seed=0)
    b = _exact_sample(np.zeros(2), s_b, 60, seed=1)
    assert np.allclose(np.cov(a, rowvar=False), s_a) and np.allclose(np.cov(b, rowvar=False), s_b)
    assert frechet_distance(a, b) == pytest.approx(8.0, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(8.0, rel=1e-9)


# bench.py


def test_a_row_by_hand():
    """One method's row from two batches of one sample each, against full computation's (samples, mean time 6 s,
    mean FLOPs 100): time (2 + 4) / 2 = 3 s, speed-up 6 / 3 = 2 (not 0.5), NFC (5 + 7) / 2 = 6 (each batch counts:
    RCS spends another NFC on each), FLOPs (50 + 70) / 2 = 60 and their ratio 60 / 100 = 0.6. Quality: sample 0 equals
    full computation's, sample 1 is 0 where full computation is 0.5: rel L1 (0 + 1) / 2 = 0.5, PSNR
    (100 + 12.0412) / 2 (``test_psnr_is_the_mean_of_per_image_values_each_capped_first``), SSIM (1 + 0.923086) / 2
    (``test_ssim_of_constant_images_by_hand``)."""
    full_samples = torch.full((2, 1, 8, 8), 0.5)
    per = {0: (full_samples[:1].clone(), 2.0, 5.0, 50.0), 1: (torch.zeros(1, 1, 8, 8), 4.0, 7.0, 70.0)}
    row = _row(BenchMethod("FORA N=2", FORA(2), budget=6), per, (full_samples, 6.0, 100.0), torch.zeros(2),
               evaluator=None, real_images=None, count_flops=True)
    assert (row.time_s, row.speedup, row.nfc, row.flops, row.flops_ratio) == pytest.approx((3.0, 2.0, 6.0, 60.0, 0.6))
    assert row.rel_l1 == pytest.approx(0.5, rel=1e-6)
    assert row.psnr == pytest.approx((100 + 10 * math.log10(16)) / 2, rel=1e-6)
    assert row.ssim == pytest.approx((1 + 0.7501 / 0.8126) / 2, abs=5e-3)
    assert math.isnan(row.fid) and math.isnan(row.fid2fc) and math.isnan(row.accuracy)


# analyze.py


def _scalars(values: list[float]) -> list[torch.Tensor]:
    return [torch.tensor([[float(v)]]) for v in values]


def test_ratio_rsd_by_hand():
    """Inputs move by 1 from step 0 to 1 and by 2 from 1 to 3 (full steps 0, 1, 3). Sample 0's outputs move by 1 and
    6 (s = 1, 3), sample 1's by 3 and 10 (s = 3, 5); s is the mean over samples, 2 then 4, and its relative standard
    deviation over full steps (population std) is 1 / 3. (The sample std would say sqrt(2) / 3 = 0.471; an RSD over
    the samples of each step, averaged, (1 / 2 + 1 / 4) / 2 = 0.375.) Step 2 is not a full step: never read."""
    inputs = [torch.full((2, 1), float(i)) for i in range(4)]
    outputs = [torch.tensor([[0.0], [0.0]]), torch.tensor([[1.0], [3.0]]), torch.tensor([[99.0], [-99.0]]),
               torch.tensor([[7.0], [13.0]])]
    assert ratio_rsd(inputs, outputs, [0, 1, 3]) == pytest.approx(1 / 3, rel=1e-6)


def test_step_distances_are_l2_then_min_max_normalised():
    """Steps move by (1, 0, 0, 0), (1, 1, 1, 1) and (2, 0, 0, 0): L2 distances 1, 2, 2, min-max normalised to
    0, 1, 1. (L1 distances 1, 4, 2 would give 0, 1, 1/3.)"""
    moves = torch.tensor([[0.0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [2, 0, 0, 0]])
    seq = list(moves.cumsum(0)[:, None, :])  # (batch 1, 4 features) per step
    assert step_distances(seq).tolist() == pytest.approx([0.0, 1.0, 1.0])


def test_analyze_trace_errors_and_correlation_by_hand():
    """One module, one sample, 8 steps; Interval(2, 2) is full at 0, 1, 3, 5, 7 and cached at 2, 4, 6. Inputs and
    outputs equal the step index at full steps, so first-order Taylor (slope of the last two full steps, 1) predicts
    2, 4, 6 for both at the cached steps, and FORA the last full output 1, 3, 5.

    Inputs at 2, 4, 6 are 1, 8, 24: input errors |2 - 1| / 1 = 1, |4 - 8| / 8 = 0.5, |6 - 24| / 24 = 0.75.
    Outputs are 1.6, 16, 12: Taylor's output errors 0.4 / 1.6 = 0.25, 12 / 16 = 0.75, 6 / 12 = 0.5, i.e.
    1.25 - input error: Pearson r = -1 exactly (an uncentred cosine of these positive errors would be +0.87).
    Module errors, the mean over cached steps: TaylorSeer (0.25 + 0.75 + 0.5) / 3 = 0.5; FORA |1 - 1.6| / 1.6 =
    0.375, |3 - 16| / 16 = 0.8125, |5 - 12| / 12 = 7/12, mean 0.590278 (the median would say 0.583333). s = 1 at
    every full step: RSD 0."""
    ins = _scalars([0, 1, 1, 3, 8, 5, 24, 7])
    outs = _scalars([0, 1, 1.6, 3, 16, 5, 12, 7])
    result = analyze_trace(Trace(["block"], [ins], [outs]), interval=2, order=1)
    assert result.io_errors["input"] == pytest.approx({2: 1.0, 4: 0.5, 6: 0.75})
    assert result.io_errors["output"] == pytest.approx({2: 0.25, 4: 0.75, 6: 0.5})
    assert result.io_correlation == pytest.approx(-1.0, abs=1e-9)
    assert result.module_errors["TaylorSeer m=1"] == pytest.approx([0.5])
    assert result.module_errors["FORA"] == pytest.approx([(0.375 + 0.8125 + 7 / 12) / 3])
    assert result.ratio_rsd == pytest.approx([0.0], abs=1e-9)


def test_a_speed_up_past_the_ideal_is_noted_as_timing_noise():
    """Full computation at NFC 50, a row at NFC 10: ideal 5x; ``PAST_IDEAL`` 1.2 lets it reach 6x unnoted. 6.5x gets
    the note (appended to one it had), 5.9x none; the full row never."""
    import dataclasses

    from relcache.evaluation.bench import FULL, PAST_IDEAL, _note_past_ideal
    from relcache.evaluation.table import BenchRow

    assert PAST_IDEAL == 1.2
    nan = float("nan")
    row = BenchRow("FORA N=5", 10, 10.0, nan, nan, 1.0, 6.5, nan, nan, nan, nan, nan, nan, note="resumed")
    slower = dataclasses.replace(row, speedup=5.9, note="")
    full = dataclasses.replace(row, method=FULL.label, nfc=50.0, speedup=1.0, note="")
    for r in (row, slower, full):
        _note_past_ideal(r, 50.0)
    assert row.note == "resumed; faster than its NFC allows (5.00x): timing noise, a busy machine; time it again"
    assert slower.note == "" and full.note == ""
