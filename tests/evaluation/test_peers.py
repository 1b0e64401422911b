"""Peers (diffusers' and cache-dit's caches) in the benchmark: they run, skip compute, and detach cleanly."""

import math
import sys
from collections.abc import Callable

import pytest
import torch
from conftest import tiny_dit
from torch import nn

from relcache.evaluation import peers
from relcache.evaluation.bench import BenchMethod, run_bench
from relcache.evaluation.reference import sample_digits

STEPS = 10


def _generate(model: nn.Module, guidance_scale: float = 1.5) -> torch.Tensor:
    return sample_digits(model, torch.tensor([3, 7]), num_steps=STEPS, guidance_scale=guidance_scale,
                         generator=torch.Generator().manual_seed(0))


def _layout(model: nn.Module) -> list[tuple[str, list[str], list[str], list[str]]]:
    """Instance attributes, children, hooks and state-dict keys of every module."""
    hooks = ("_forward_pre_hooks", "_forward_hooks")
    return [(name, sorted(vars(m)), sorted(m._modules), [f"{h}:{len(getattr(m, h))}" for h in hooks])
            for name, m in model.named_modules()] + [("state_dict", sorted(model.state_dict()), [], [])]


# tiny-model settings (10 steps, random weights): thresholds high enough that some steps are skipped
PEERS: dict[str, Callable[[], peers.Peer]] = {
    "taylorseer": lambda: peers.diffusers_taylorseer("diffusers TaylorSeer", interval=3, warmup=1),
    "fbcache": lambda: peers.diffusers_first_block_cache("diffusers FBCache", 0.5),
    "magcache": lambda: peers.DiffusersMagCache("diffusers MagCache", 0.5, max_skip_steps=3, num_steps=STEPS),
    "fastercache": lambda: peers.DiffusersFasterCache(),
    "cache_dit": lambda: peers.CacheDiTPeer("cache-dit DBCache", 0.5),
}
EXPECTED_NFC = {"taylorseer": 4.0}  # full steps 0, 2, 5, 8 (diffusers' schedule)


@pytest.mark.filterwarnings("ignore:torch.meshgrid")  # inside diffusers' FasterCache
@pytest.mark.parametrize("name", list(PEERS))
def test_peer_runs_in_bench_skips_compute_and_detaches_cleanly(name: str) -> None:
    if name == "cache_dit" and peers.cache_dit_unavailable() is not None:
        pytest.skip(peers.cache_dit_unavailable())
    model = tiny_dit(num_classes=10)
    before, layout = _generate(model), _layout(model)
    peer = PEERS[name]()
    result = run_bench(model, sample_digits, [BenchMethod(peer.label, peer=peer)], num_samples=2, batch_size=2,
                       num_steps=STEPS, count_flops=True, progress=False)
    row = result.rows[1]
    assert row.method == peer.label and not row.note
    assert all(math.isfinite(v) for v in (row.rel_l1, row.psnr, row.ssim, row.speedup))
    assert 0 < row.rel_l1 and row.flops_ratio < 0.95, "the peer must change the samples and skip compute"
    nfc = peer.nfc(model)
    if name == "fastercache":
        assert math.isnan(nfc)
    else:
        assert 1 <= nfc < STEPS
        assert nfc == EXPECTED_NFC.get(name, nfc)
    assert torch.equal(_generate(model), before), "after detach the model must compute exactly as before"
    assert _layout(model) == layout, "detach must leave no hook, attribute or module behind"


def test_taylorseer_schedule_gives_the_budgets() -> None:
    for nfc, (interval, warmup) in peers.TAYLORSEER_SCHEDULE.items():
        full = [s for s in range(50) if s < warmup or (s - warmup - 1) % interval == 0]
        assert len(full) == nfc


def test_peer_methods_rows() -> None:
    rows = peers.peer_methods([14, 7])
    labels = [r.label for r in rows]
    assert len(labels) == len(set(labels)) == 2 * 4 + 1
    assert {r.budget for r in rows} == {14, 7, None}
    assert all(r.peer is not None or r.unavailable for r in rows)
    with pytest.raises(ValueError, match="budgets"):
        peers.peer_methods([13])


def test_missing_cache_dit_gives_rows_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # import fails as if not installed
    rows = [r for r in peers.peer_methods([14]) if r.label.startswith("cache-dit")]
    assert len(rows) == 1 and rows[0].peer is None and "not installed" in rows[0].unavailable
    model = tiny_dit(num_classes=10)
    result = run_bench(model, sample_digits, rows, num_samples=2, batch_size=2, num_steps=2, count_flops=False,
                       progress=False)
    row = result.rows[1]
    assert row.note == rows[0].unavailable and math.isnan(row.nfc) and math.isnan(row.rel_l1)


def test_magcache_rejects_another_step_count() -> None:
    model = tiny_dit(num_classes=10)
    peer = peers.DiffusersMagCache("MagCache", 0.5, 3, num_steps=STEPS - 2, mag_ratios=[1.0] * (STEPS - 2))
    peer.attach(model)
    try:
        peer.before_generation(model)
        with pytest.raises(RuntimeError, match="more than 8"):
            _generate(model)
    finally:
        peer.detach(model)


def test_fastercache_needs_batched_cfg() -> None:
    model = tiny_dit(num_classes=10)
    peer = peers.DiffusersFasterCache()
    peer.attach(model)
    try:
        peer.before_generation(model)
        with pytest.raises(ValueError, match="CFG"):
            _generate(model, guidance_scale=1.0)
    finally:
        peer.detach(model)


THRESHOLD_PEERS = ("diffusers FBCache", "diffusers MagCache", "cache-dit DBCache")


@pytest.mark.parametrize("settings,named", [
    ({"reference_model": False}, "another model"),
    ({"guidance_scale": 4.0}, "guidance scale 4.0"),
    ({"batch_size": 2}, "batch size 2"),
])
def test_threshold_peers_do_not_run_where_their_thresholds_were_not_calibrated(settings, named) -> None:
    """Found by review: on a user's DiT (--model) the rows labelled "NFC~14" used the reference model's thresholds
    and realized NFC 50; so did other guidance and batch sizes, unchecked. Their rows are unavailable, saying why and
    how to calibrate; TaylorSeer (a fixed schedule) and FasterCache still run."""
    rows = peers.peer_methods([14, 7], **settings)
    for row in rows:
        if row.label.startswith(THRESHOLD_PEERS):
            assert row.peer is None and "calibrated on the shipped reference model" in row.unavailable
            assert named in row.unavailable and "calibrate_thresholds" in row.unavailable
            assert "t=" not in row.label  # no threshold is used
        else:
            assert row.peer is not None, row.label
    assert len(rows) == 2 * 4 + 1 and {r.budget for r in rows} == {14, 7, None}
    calibrated = peers.peer_methods([14], batch_size=10, guidance_scale=1.5, reference_model=True)
    assert all(r.peer is not None for r in calibrated if r.label.startswith(THRESHOLD_PEERS[:2]))


def test_cli_peers_on_another_model_say_why_the_threshold_peers_are_left_out(tmp_path, capsys) -> None:
    import json

    from conftest import dit_pipe

    from relcache.cli import main

    dit_pipe().save_pretrained(tmp_path / "dit")
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tmp_path / "dit"), "--peers", "--samples", "2", "--batch-size", "2",
                 "--budgets", "7", "--no-flops", "--only", "FBCache", "MagCache", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "note: diffusers' FBCache and MagCache and cache-dit's DBCache are left out" in err
    assert "not for another model, batch size 2" in err and "calibrate_thresholds" in err
    rows = {r["method"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert set(rows) == {"full computation", "diffusers FBCache NFC~7", "diffusers MagCache K=9 NFC~7"}
    assert all("calibrated on the shipped reference model" in r["note"]
               for m, r in rows.items() if m != "full computation")
