"""``relcache analyze``: the trace's memory is estimated before the long part and a size the machine cannot hold is
refused naming --samples and --steps; what it writes records how it was made (run.json, figure footers); fig2c's
steps are whole numbers. (Found by review: DiT-XL-2-256 at the defaults traced 123 GiB into RAM and was killed after
a long run, with nothing saved; the CSVs and PNGs said nothing of --interval and the rest.)"""

import json

import pytest
import torch
from conftest import tiny_dit

import relcache.cli as cli
import relcache.evaluation.analyze as analyze
from relcache.cli import main
from relcache.evaluation.analyze import TraceTooLarge, record_trace, trace_bytes
from relcache.evaluation.reference import sample_digits

#: facebook/DiT-XL-2-256's transformer config: its trace is what the review measured (123 GiB at the defaults)
DIT_XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
              sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")


def _kept(trace) -> int:
    return sum(t.nbytes for seqs in (trace.inputs, trace.outputs) for seq in seqs for t in seq)


@pytest.mark.parametrize("guidance,rows", [(1.5, 4), (1.0, 2)])
def test_the_estimate_is_what_the_trace_keeps(guidance, rows):
    """``trace_bytes`` (a call on the meta device) counts exactly the bytes ``record_trace`` keeps; guidance doubles
    the rows of every model call."""
    model = tiny_dit(num_classes=10)
    trace = record_trace(model, lambda: sample_digits(model, torch.arange(2), num_steps=3, guidance_scale=guidance))
    assert trace_bytes(model, rows, 3) == _kept(trace) > 0
    assert trace_bytes(model, 20, 50) == 10 * 50 / 3 * trace_bytes(model, 2, 3)  # linear in rows and steps


def test_dit_xl_at_the_defaults_is_estimated_at_123_gib():
    with torch.device("meta"):
        from diffusers import DiTTransformer2DModel

        model = DiTTransformer2DModel(**DIT_XL)
    assert trace_bytes(model, 20, 50) == 56 * 2 * 50 * 20 * 256 * 1152 * 4  # 123.0 GiB


def test_record_trace_stops_after_the_first_step_when_the_whole_would_not_fit():
    model = tiny_dit(num_classes=10)
    steps = []
    model.register_forward_pre_hook(lambda *_: steps.append(1))
    need = trace_bytes(model, 4, 6)
    with pytest.raises(TraceTooLarge) as err:
        record_trace(model, lambda: sample_digits(model, torch.arange(2), num_steps=6), num_steps=6,
                     max_bytes=need - 1)
    assert len(steps) == 1 and err.value.estimate == need
    steps.clear()
    record_trace(model, lambda: sample_digits(model, torch.arange(2), num_steps=6), num_steps=6, max_bytes=need)
    assert len(steps) == 6


@pytest.fixture
def tiny_reference(monkeypatch):
    """The shipped model replaced by a tiny DiT (the same sampler): analyze's whole path in about a second."""
    model = tiny_dit(num_classes=10)
    monkeypatch.setattr(cli.analyze, "_reference", lambda: (model, sample_digits, None, None))
    return model


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_a_trace_larger_than_the_memory_is_refused_before_tracing(capsys, monkeypatch, tmp_path, tiny_reference):
    traced = []
    monkeypatch.setattr(analyze, "record_trace", lambda *a, **k: traced.append(1))
    need = trace_bytes(tiny_reference, 20, 50)  # --samples 10 under guidance, --steps 50
    monkeypatch.setattr(analyze, "available_memory", lambda: int(need / 0.7 / 2.4))  # room for 4 samples
    line = _usage_error(capsys, ["analyze", "--out", str(tmp_path / "a")])
    assert line.startswith("relcache analyze: error: --samples 10 --steps 50: the trace (every cached module's "
                           f"input and output at every step, float32) would take {analyze.gib(need)} of memory")
    assert line.endswith("lower --samples or --steps (--samples 4 or fewer fit at --steps 50)")
    assert not traced and not (tmp_path / "a").exists()


def test_a_dit_xl_pipeline_is_refused_before_it_loads(capsys, monkeypatch, tmp_path):
    """The review's case: ``--model`` DiT-XL-2-256 at the defaults on a machine of 64 GiB: refused from the config,
    before its weights are read; --samples 1 (12.3 GiB) goes on to load."""
    from diffusers import DiTTransformer2DModel

    path = tmp_path / "dit-xl"
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline",
                                                      "transformer": ["diffusers", "DiTTransformer2DModel"]}))
    with torch.device("meta"):
        DiTTransformer2DModel(**DIT_XL).save_config(path / "transformer")

    def load(*args):
        raise RuntimeError("loading the pipeline")

    monkeypatch.setattr(cli.analyze, "_pipeline_sampler", load)
    monkeypatch.setattr(analyze, "available_memory", lambda: 64 * 2**30)
    line = _usage_error(capsys, ["analyze", "--model", str(path), "--out", str(tmp_path / "a")])
    assert "--samples 10 --steps 50: the trace" in line and "would take 123.0 GiB of memory, over the 44.8 GiB" in line
    assert line.endswith("(70% of the 64.0 GiB available): lower --samples or --steps (--samples 3 or fewer fit at "
                         "--steps 50)")
    with pytest.raises(RuntimeError, match="loading the pipeline"):
        main(["analyze", "--model", str(path), "--samples", "1", "--out", str(tmp_path / "a")])


@pytest.fixture
def figures(monkeypatch):
    """The figures saved, kept open (``plt.close`` records them instead)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    yield kept
    for fig in kept:
        close(fig)


def test_the_outputs_record_how_they_were_made(tmp_path, tiny_reference, figures, capsys):
    from PIL import Image

    out = tmp_path / "a"
    argv = ["analyze", "--samples", "2", "--steps", "8", "--interval", "2", "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "relcache " + " ".join(argv[:-1]) + f" {out}"
    assert {k: record["settings"][k] for k in ("samples", "steps", "interval", "order", "guidance", "seed",
                                               "model")} == {
        "samples": 2, "steps": 8, "interval": 2, "order": 2, "guidance": 1.5, "seed": 3,
        "model": "shipped reference model"}
    assert {"relcache", "torch", "diffusers"} <= set(record["versions"]) and record["date"]
    assert record["analysis"]["interval"] == 2
    assert set(record["files"]) == {p.name for p in out.iterdir()} - {"run.json"}
    assert str(out / "run.json") in capsys.readouterr().out.splitlines()
    # the CSVs stay plain tables: their header row first
    assert (out / "fig2c_io_errors.csv").read_text().splitlines()[0] == "step,input_error,output_error"
    assert (out / "fig1_step_distances.csv").read_text().splitlines()[0] == "module,step,input,output"
    # every figure: the record as a footer that fits the figure, and in the PNG's metadata
    assert len(figures) == 4
    for fig in figures:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        footer = [t for t in fig.texts if "relcache analyze" in t.get_text()]
        assert len(footer) == 1
        text = " ".join(footer[0].get_text().split())
        assert "interval=2" in text and "seed=3" in text and "samples=2" in text and "steps=8" in text
        box = footer[0].get_window_extent(renderer)
        assert 0 <= box.x0 and box.x1 <= fig.bbox.x1 and 0 <= box.y0
        for ax in fig.axes:  # the footer is below the axes' labels
            assert ax.get_tightbbox(renderer).y0 >= box.y1 - 1
    for name in ("fig1_step_distances.png", "fig2a_module_errors.png", "fig2b_ratio_rsd.png", "fig2c_io_errors.png"):
        assert "interval=2" in Image.open(out / name).text["Description"]
    # the figures that depend on --interval say it in their titles
    titles = {fig.axes[0].get_title() for fig in figures}
    assert sum("every 2 after 2 warm-up steps" in t for t in titles) == 3


def test_fig2c_steps_are_whole_numbers(tmp_path, tiny_reference, figures):
    """Its cached steps 2, 4, 6 were ticked 1.5, 2.0, 2.5, ... (found by review: 2.5, 7.5)."""
    assert main(["analyze", "--samples", "1", "--steps", "8", "--interval", "2", "--out", str(tmp_path)]) == 0
    for fig in (figures[0], figures[-1]):  # fig1 and fig2c: steps on x
        fig.canvas.draw()
        for ax in fig.axes:
            lo, hi = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_a_save_stopped_part_way_leaves_no_earlier_run_record(tmp_path, monkeypatch):
    """An earlier analysis in ``--out``: its ``run.json`` goes as the new save starts, and the new one is written
    last, so a save stopped part-way leaves figures of two runs with no record claiming them (it left the earlier
    run's, found by review); each file is written whole (``runlog.whole``: replaced in one step)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / analyze.RUN_RECORD).write_text(json.dumps({"command": "the earlier run"}))
    (out / "fig1_step_distances.png").write_bytes(b"earlier")

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(analyze, "_per_module", stop)
    monkeypatch.setattr(analyze, "_step_distances", lambda w, result: w.table("fig1_step_distances.csv", ["a"],
                                                                             [[1]]))
    with pytest.raises(KeyboardInterrupt):
        analyze.save_analysis(None, out, run={"command": "the new run"})
    assert not (out / analyze.RUN_RECORD).exists()
    assert (out / "fig1_step_distances.csv").read_text() == "a\n1\n"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
