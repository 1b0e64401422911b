"""bench, analyze and demo on tiny settings: the tables must be consistent with what they measure."""

import datetime
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import start_fork_server, tiny_dit

from relcache.cli import main
from relcache.evaluation.analyze import analyze_trace, record_trace, save_analysis
from relcache.evaluation.bench import FULL, BenchMethod, default_methods, interval_for, run_bench
from relcache.evaluation.reference import sample_digits
from relcache.methods import FORA, FasterCache, TaylorSeer

STEPS = 10


def _bench(methods, **kw):
    model = tiny_dit(num_classes=10)
    return run_bench(model, sample_digits, methods, num_samples=4, batch_size=2, num_steps=STEPS, progress=False, **kw)


def _deterministic(rows):
    return [(r.method, r.nfc, r.flops, r.rel_l1, r.psnr, r.ssim) for r in rows]


def test_bench_table_is_consistent():
    methods = [BenchMethod("FORA N=2", FORA(2), budget=6), BenchMethod("TaylorSeer N=4", TaylorSeer(4), budget=4),
               BenchMethod("unavailable peer", unavailable="needs a GPU")]
    result = _bench(methods)
    full, fora, taylor, missing = result.rows
    assert full.method == FULL.label and full.nfc == STEPS
    assert full.rel_l1 == 0.0 and full.flops_ratio == 1.0 and full.ssim == pytest.approx(1.0)
    # Interval(2, 2) over 10 steps: 0, 1, 3, 5, 7, 9; Interval(4, 2): 0, 1, 5, 9
    assert fora.nfc == 6 and taylor.nfc == 4
    assert 1.0 > fora.flops_ratio > taylor.flops_ratio > 0  # FLOPs fall with NFC
    assert fora.rel_l1 > 0 and taylor.rel_l1 > 0
    assert math.isnan(missing.nfc) and missing.note == "needs a GPU"
    assert set(result.samples) == {FULL.label, "FORA N=2", "TaylorSeer N=4"}


def test_a_cfg_cache_row_that_changed_nothing_says_so():
    """RFC + CFG-Cache's default (``skip_full`` False beside RFC) skips nothing: its row repeated RFC's numbers with
    nothing saying so, and its marker hid RFC's in the plot. A row that did skip keeps an empty note."""
    import dataclasses

    from relcache import RFC, CFGCache

    rfc = RFC(target_nfc=5)
    methods = [BenchMethod("RFC", rfc), BenchMethod("RFC + CFG-Cache", dataclasses.replace(rfc, cfg_cache=CFGCache())),
               BenchMethod("FORA", FORA(2)), BenchMethod("FORA + CFG-Cache", dataclasses.replace(
                   FORA(2), cfg_cache=CFGCache(skip_full=True, window=(0.0, 1.0), interval=3)))]
    rows = {r.method: r for r in _bench(methods).rows}
    assert rows["RFC + CFG-Cache"].note == "the samples of RFC: CFG-Cache skipped nothing"
    assert rows["RFC + CFG-Cache"].rel_l1 == rows["RFC"].rel_l1
    assert rows["FORA + CFG-Cache"].note == "" and rows["FORA + CFG-Cache"].rel_l1 != rows["FORA"].rel_l1


def test_default_methods_cover_the_ablations():
    labels = [m.label for m in default_methods((14, 7))]
    assert len(labels) == 13 and labels[-1] == "FasterCache (defaults)"
    assert {"FORA N=9", "RFE alone N=4 m=2", "RCS alone NFC=7 m=2", "RFC NFC=14 m=2"} <= set(labels)
    with pytest.raises(ValueError, match="budgets must be among"):
        default_methods((13,))


def test_default_methods_over_other_step_counts_give_each_budget_one_nfc():
    """Over 20 steps the paper's intervals stay: N = 4 is full at 0, 1, 5, 9, 13, 17 (NFC 6), N = 5 and N = 6 both
    give NFC 5 (0, 1, 6, 11, 16 and 0, 1, 7, 13, 19); RFC aims at the interval's NFC, and a taken NFC adds no rows."""
    assert [interval_for(k) for k in (14, 11, 10, 8, 7)] == [(4, 14), (5, 11), (6, 10), (7, 8), (9, 7)]
    assert [interval_for(k, 20) for k in (14, 11, 10)] == [(4, 6), (5, 5), (6, 5)]
    labels = [m.label for m in default_methods((14, 11, 10, 14), num_steps=20)]
    assert labels == ["FORA N=4", "TaylorSeer N=4 m=2", "RFE alone N=4 m=2", "RCS alone NFC=6 m=2", "RFC NFC=6 m=2",
                      "RFC NFC=6 m=2 + CFG-Cache", "FORA N=5", "TaylorSeer N=5 m=2", "RFE alone N=5 m=2",
                      "RCS alone NFC=5 m=2", "RFC NFC=5 m=2", "RFC NFC=5 m=2 + CFG-Cache",
                      "FasterCache (warmup 6 of 20 steps)"]
    # FasterCache's warm-up scales with the steps (found by review: 15 full steps of warm-up of 20, NFC 18)
    assert default_methods((14,), num_steps=20)[-1].config.schedule.warmup == 6
    assert default_methods((14,))[-1].config == FasterCache()


_IMPORTED_BY = os.getpid()  # a process forked from the fork server that imported this module sees the server's pid


def _rank(rank, world, path, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, init_method=f"file://{path}")
    result = _bench([BenchMethod("FORA N=3", FORA(3))], count_flops=True)
    if rank == 0:
        queue.put((_deterministic(result.rows), _IMPORTED_BY != os.getpid()))
    torch.distributed.destroy_process_group()


def test_two_processes_give_the_single_process_table(tmp_path):
    single = _deterministic(_bench([BenchMethod("FORA N=3", FORA(3))]).rows)
    start_fork_server()  # forked from a server that imported this module: no import of diffusers per process
    ctx = mp.get_context("forkserver")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, tmp_path / "store", queue)) for r in range(2)]
    for p in procs:
        p.start()
    table, imported_by_the_server = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    assert table == single
    assert imported_by_the_server  # the process found this module imported (conftest.start_fork_server)


def test_analyze_numbers_and_files(tmp_path):
    model = tiny_dit(num_classes=10)
    trace = record_trace(model, lambda: sample_digits(model, torch.arange(2), num_steps=12))
    assert trace.num_steps == 12 and len(trace.names) == 6
    result = analyze_trace(trace, interval=3, order=1)
    # distances are min-max normalised; errors are averaged over the 7 cached steps of Interval(3, 2)
    for curves in result.distances.values():
        assert min(curves["output"]) == 0.0 and max(curves["output"]) == 1.0
    assert all(len(v) == 6 for v in result.module_errors.values())
    # Interval(3, 2) on 12 steps: full at 0, 1, 4, 7, 10; the errors are measured at the other seven
    assert sorted(result.io_errors["input"]) == [2, 3, 5, 6, 8, 9, 11]
    assert -1.0 <= result.io_correlation <= 1.0
    files = {p.name for p in save_analysis(result, tmp_path)}
    assert {"fig1_step_distances.png", "fig2a_module_errors.csv", "fig2b_ratio_rsd.png", "fig2c_io_errors.csv"} <= files
    with pytest.raises(ValueError, match=r"modules must be indices in 0\.\.5"):
        analyze_trace(trace, modules=[6])
    with pytest.raises(ValueError, match=r"gives 12 full and 0 cached steps"):  # nothing cached: NaN figures
        analyze_trace(trace, interval=1)


def test_demo_end_to_end_at_reduced_size(tmp_path, capsys):
    """``--out DIR/`` writes the grid inside DIR and prints the file it wrote (``demo_out/`` used to write
    ``demo_out.png`` and print ``demo_out``). Its progress bar is labelled ``demo`` (it said ``bench``)."""
    out = tmp_path / "demo_out" / "relcache-demo.png"
    assert main(["demo", "--samples", "2", "--budgets", "7", "--out", f"{tmp_path / 'demo_out'}/"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "demo: 100%" in captured.err and "bench:" not in captured.err
    assert out.exists() and out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"image grid: {out}  " in printed
    assert "| RFC NFC=7 | 7 |" in printed and "| full computation | 50 |" in printed


def test_cli_rejects_bad_budgets(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--budgets", "13"])
    assert "must be one of [7, 8, 10, 11, 14]" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["bench", "--order", "0"], "--order: invalid choice: 0 (choose from 1, 2, 3, 4)"),
    (["bench", "--steps", "1"], "--steps: must be an integer in 2..1000 (the schedulers' training steps), got 1"),
    (["bench", "--guidance", "nan"], "--guidance: must be a finite number >= 0 (1 or less: no guidance), got nan"),
    (["bench", "--guidance", "-0.5"], "--guidance: must be a finite number >= 0 (1 or less: no guidance), got -0.5"),
    (["analyze", "--guidance", "-1"], "--guidance: must be a finite number >= 0"),
    (["bench", "--peers", "--steps", "20"], "--peers needs --steps 50"),
    (["analyze", "--order", "0"], "--order: invalid choice: 0"),
    (["analyze", "--interval", "1", "--steps", "6"], "--interval: --interval 1 over --steps 6 gives 6 full and 0 "
                                                     "cached steps; the analysis needs at least 3 of each: use "
                                                     "--interval in 3..4"),
    (["analyze", "--steps", "3"], "gives 2 full and 1 cached steps; the analysis needs at least 3 of each: use more "
                                  "--steps"),
    (["bench", "--only", "NoSuchMethod"], "--only 'NoSuchMethod' matches no method; the labels are: FORA N=4,"),
    # found by review: a label that matches nothing beside one that does was dropped silently
    (["bench", "--only", "FORA", "NoSuchMethod"], "--only 'NoSuchMethod' matches no method; the labels are: FORA"),
])
def test_cli_names_the_bad_option(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_cli_bench_on_a_local_pipeline_directory(tmp_path, capsys):
    """``--model DIR``: caching is enabled on the bare transformer, so the sampler announces the steps (RFC's target
    NFC needs them; every RFC row used to fail with 'target_nfc needs the number of steps')."""
    from conftest import dit_pipe

    dit_pipe().save_pretrained(tmp_path / "dit")
    out = tmp_path / "bench"
    argv = ["bench", "--model", str(tmp_path / "dit"), "--samples", "2", "--batch-size", "2", "--steps", "8",
            "--budgets", "7", "--no-flops", "--only", "RFC NFC", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    # budget 7 is N = 9: over 8 steps full at 0 and 1 only, so RFC aims at NFC 2
    assert "| RFC NFC=2 m=2 | 2.00 |" in printed and (out / "bench.md").exists()


def _gather_or_die(rank, world, path, queue):
    """Rank 1 dies before the bench's gather; rank 0 must stop with RankLostError instead of waiting."""
    from relcache.evaluation.ranks import RankLostError, gather

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, init_method=f"file://{path}",
                                         timeout=datetime.timedelta(seconds=20))
    # torch's init returns on one process before the other has finished gloo's handshake: rank 1 leaving at once
    # failed rank 0's init with "Connection closed by peer", before any gather (a fresh-clone CI run, 2026-12-07;
    # test_context_parallel.py's workers wait the same way)
    torch.distributed.barrier()
    if rank == 1:
        os._exit(3)  # a rank killed mid-run (no clean shutdown)
    try:
        gather({"FORA": {0: (torch.zeros(1), 0.0, 0.0, 0.0)}}, world)
        queue.put("returned")
    except RankLostError as err:
        queue.put(str(err))


def test_a_rank_that_dies_stops_the_others_with_a_clear_error(tmp_path):
    start_fork_server()  # forked from a server that imported this module: no import of diffusers per process
    ctx = mp.get_context("forkserver")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_or_die, args=(r, 2, tmp_path / "store", queue)) for r in range(2)]
    for p in procs:
        p.start()
    message = queue.get(timeout=120)  # before the fix rank 0 died on the raw backend error and put nothing
    for p in procs:
        p.join(timeout=60)
    assert message.startswith("relcache bench: rank 0 stopped while gathering the results") and "--resume" in message
