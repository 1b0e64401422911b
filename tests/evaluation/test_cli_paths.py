"""The command line checks its paths and indices before any long work: a usage error naming the option, exit code 2,
no traceback, nothing run and nothing written. (Tests run as root, where chmod stops nothing: an unwritable location
here is a path under a regular file.)"""

import json
import sys
import types
from pathlib import Path

import pytest

import relcache.cli as cli
from relcache.cli import DEMO_GRID, build_parser, main


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model, sampling or tracing fails the test: a bad option must be refused before any of them."""
    def started(*args, **kwargs):
        raise AssertionError("the command started working before refusing a bad option")

    import relcache.evaluation.analyze as analyze
    import relcache.evaluation.bench as bench
    import relcache.evaluation.pipelines as pipelines
    import relcache.evaluation.steps_search as steps_search

    # each command module's own names, and what its run function imports when it runs
    for command, names in ((cli.demo, ("_reference",)), (cli.bench, ("_reference",)),
                           (cli.analyze, ("_reference", "_pipeline_sampler")), (cli.calibrate, ("_reference",))):
        for name in names:
            monkeypatch.setattr(command, name, started)
    monkeypatch.setattr(bench, "run_bench", started)
    monkeypatch.setattr(analyze, "record_trace", started)
    monkeypatch.setattr(pipelines, "load_sampler", started)
    monkeypatch.setattr(steps_search, "calibrate_steps", started)


def _usage_error(capsys, argv) -> str:
    """Run ``relcache argv``; it must exit 2 with a one-line error (after argparse's usage). Returns that line."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err and err.startswith("usage: relcache ")
    return err.strip().splitlines()[-1]


@pytest.fixture
def under_a_file(tmp_path) -> Path:
    (tmp_path / "file").write_text("not a directory")
    return tmp_path / "file" / "sub"


@pytest.mark.parametrize("argv,out", [
    (["bench", "--samples", "2", "--no-flops"], "{}"),
    (["analyze", "--samples", "1"], "{}"),
    (["demo", "--samples", "2", "--budgets", "7"], "{}/grid.png"),
    (["demo", "--samples", "2", "--budgets", "7"], "{}/"),
])
def test_an_unwritable_out_fails_before_any_work(capsys, no_work, under_a_file, argv, out):
    """``bench``/``demo --out <unwritable>`` used to run the whole job, then fail with a traceback, losing every
    result."""
    line = _usage_error(capsys, [*argv, "--out", out.format(under_a_file)])
    assert line.startswith(f"relcache {argv[0]}: error: argument --out: cannot write")
    assert f"{under_a_file.parent} is not a directory" in line
    assert not any(p.name != "file" for p in under_a_file.parent.parent.iterdir())  # nothing created


def test_the_default_outputs_are_checked_without_creating_anything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = build_parser()
    assert parser.parse_args(["bench"]).out == Path("runs/bench")
    assert parser.parse_args(["analyze"]).out == Path("runs/analyze")
    assert parser.parse_args(["demo"]).out == Path(DEMO_GRID)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value,written", [
    ("grid.png", "grid.png"), ("grid.PNG", "grid.PNG"), ("grid", "grid.png"),
    ("runs/demo_out/", f"runs/demo_out/{DEMO_GRID}"), (".", DEMO_GRID), ("new/deeper/grid", "new/deeper/grid.png"),
])
def test_demo_out_names_the_file_written(tmp_path, monkeypatch, value, written):
    """``demo --out ./demo_out/`` used to write ``demo_out.png`` and print ``demo_out``: the parsed path is now the
    file written (``save_grid`` adds no suffix), a directory gets ``relcache-demo.png`` inside."""
    monkeypatch.chdir(tmp_path)
    assert build_parser().parse_args(["demo", "--out", value]).out == Path(written)


def test_demo_out_must_be_a_png(capsys, no_work):
    line = _usage_error(capsys, ["demo", "--out", "grid.pdf"])
    assert line == ("relcache demo: error: argument --out: the grid is a PNG: name a .png file or a directory, "
                    "got grid.pdf")


def _pipeline_index(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "model_index.json").write_text(content)
    return path


@pytest.mark.parametrize("command", ["bench", "analyze"])
@pytest.mark.parametrize("make,reason", [
    (lambda tmp: "nosuch/model", "nosuch/model does not exist"),  # a Hub name: never sent to the Hub
    (lambda tmp: str(tmp), "has no model_index.json"),
    (lambda tmp: str(_pipeline_index(tmp / "notes.txt", "")) + "/model_index.json", "is not a directory"),
    (lambda tmp: str(_pipeline_index(tmp / "broken", "{not json")), "cannot read"),
    (lambda tmp: str(_pipeline_index(tmp / "sd", json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))),
     "holds a StableDiffusionPipeline"),
])
def test_model_must_be_a_local_pipeline_directory(capsys, no_work, tmp_path, monkeypatch, command, make, reason):
    """``--model`` used to reach ``DiTPipeline.from_pretrained``: a diffusers traceback, and a Hub request for a
    name like ``nosuch/model`` although the flag is documented as a local directory. ``bench`` takes any supported
    family (told by the transformer class in model_index.json), ``analyze`` DiT pipelines."""
    monkeypatch.chdir(tmp_path)
    line = _usage_error(capsys, [command, "--model", make(tmp_path)])
    need = ("must be a local diffusers pipeline directory of a supported family (dit, pixart, sd3, flux, wan, "
            "cogvideox, hunyuan_video, latte) with a model_index.json; " if command == "bench" else
            "must be a local diffusers DiTPipeline directory (with a model_index.json); ")
    assert line.startswith(f"relcache {command}: error: argument --model: {need}")
    assert reason in line


def test_analyze_model_must_be_a_dit_pipeline(capsys, no_work, tmp_path):
    path = _pipeline_index(tmp_path / "pixart", json.dumps(
        {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}))
    assert _usage_error(capsys, ["analyze", "--model", str(path)]).endswith("holds a PixArtAlphaPipeline")


def test_model_accepts_a_pipeline_directory(tmp_path):
    path = _pipeline_index(tmp_path / "dit", json.dumps(
        {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]}))
    assert build_parser().parse_args(["bench", "--model", str(path)]).model == str(path)
    assert build_parser().parse_args(["analyze", "--model", str(path)]).model == str(path)


def test_analyze_labels_stay_within_the_models_classes(monkeypatch, tmp_path):
    """Found by review: ``analyze --model`` cycled labels 0..9 whatever the model's classes, so a DiT of 5 classes
    got labels past its last (an IndexError) or its null class."""
    from conftest import dit_pipe, tiny_dit
    from diffusers import DiTPipeline

    import relcache.evaluation.analyze as analyze

    plain = dit_pipe()
    DiTPipeline(transformer=tiny_dit(num_classes=5), vae=plain.vae, scheduler=plain.scheduler).save_pretrained(
        tmp_path / "dit5")
    labels = []

    def record_trace(model, run, **kwargs):
        labels.append(run.args[1].tolist())
        raise RuntimeError("tracing")

    monkeypatch.setattr(analyze, "record_trace", record_trace)
    with pytest.raises(RuntimeError, match="tracing"):
        main(["analyze", "--model", str(tmp_path / "dit5"), "--samples", "7", "--out", str(tmp_path / "a")])
    assert labels == [[0, 1, 2, 3, 4, 0, 1]]


def test_analyze_modules_out_of_range_fails_before_tracing(capsys, monkeypatch, tmp_path):
    """``analyze --modules 999`` used to fail only after tracing a whole generation."""
    import relcache.evaluation.analyze as analyze

    traced = []

    def record_trace(model, run, **kwargs):
        traced.append(model)
        raise RuntimeError("tracing")

    monkeypatch.setattr(analyze, "record_trace", record_trace)
    out = str(tmp_path / "analysis")
    line = _usage_error(capsys, ["analyze", "--modules", "0", "999", "--samples", "1", "--out", out])
    # the shipped reference DiT: 8 blocks, attention and MLP each
    assert line == ("relcache analyze: error: argument --modules: must be indices in 0..15 (the model has 16 cached "
                    "modules), got 999")
    assert not traced
    assert _usage_error(capsys, ["analyze", "--modules", "-1"]).endswith("argument --modules: must be an integer >= 0, "
                                                                         "got -1")
    with pytest.raises(RuntimeError, match="tracing"):  # indices in range go on to the trace
        main(["analyze", "--modules", "0", "15", "--samples", "1", "--out", out])
    assert len(traced) == 1


def _dit_dir(path: Path) -> Path:
    """A DiTPipeline directory with its transformer's config (2 blocks) and no weights: enough for every check that
    runs before loading."""
    from diffusers import DiTTransformer2DModel

    index = {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]}
    _pipeline_index(path, json.dumps(index))
    config = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8,
                  patch_size=2, num_embeds_ada_norm=10)
    DiTTransformer2DModel.from_config(config).save_config(path / "transformer")
    return path


@pytest.mark.parametrize("argv,message", [
    (["bench", "--only", "NoSuchMethod"], "--only 'NoSuchMethod' matches no method; the labels are: FORA N=4,"),
    (["bench", "--height", "16"], "--height is not taken by dit pipelines, which make images of their transformer's "
                                  "sample size"),
    (["bench", "--width", "16"], "--width is not taken by dit pipelines"),
    (["analyze", "--modules", "4"], "argument --modules: must be indices in 0..3 (the model has 4 cached modules), "
                                    "got 4"),
])
def test_a_local_pipelines_options_are_checked_before_it_loads(capsys, no_work, tmp_path, argv, message):
    """``--only``, ``--height``/``--width`` on a DiT pipeline and ``analyze --modules`` used to be refused only after
    the pipeline had loaded (minutes for a real checkpoint), ``--height`` on DiT with a TypeError traceback."""
    path = _dit_dir(tmp_path / "dit")
    line = _usage_error(capsys, [argv[0], "--model", str(path), *argv[1:], "--out", str(tmp_path / "out")])
    assert message in line


@pytest.mark.parametrize(("transformer", "patch", "good", "bad", "message"), [
    ("SD3Transformer2DModel", 2, 1024, 1000, "multiple of 16 for this sd3 pipeline (the VAE's scale 8 x the "
     "transformer's patch 2), got 1000"),
    # FLUX's patch_size is 1, but it packs 2x2 latents: its pipeline would have resized the image without a word
    ("FluxTransformer2DModel", 1, 1040, 1000, "multiple of 16 for this flux pipeline (the VAE's scale 8 x the "
     "transformer's patch 2), got 1000"),
    ("CogVideoXTransformer3DModel", 2, 480, 472, "multiple of 16 for this cogvideox pipeline (the VAE's scale 8 x "
     "the transformer's patch 2), got 472"),
    ("WanTransformer3DModel", [1, 2, 2], 480, 472, "multiple of 16 for this wan pipeline (its pipeline checks it), "
     "got 472"),
    ("PixArtTransformer2DModel", 2, 1000, None, None),  # its pipeline bins the size itself
])
@pytest.mark.parametrize("option", ["--height", "--width"])
def test_a_size_the_pipeline_would_refuse_is_refused_before_it_loads(capsys, no_work, tmp_path, transformer, patch,
                                                                     good, bad, message, option):
    """Found by review: ``--height``/``--width`` were checked as multiples of 8 only, so an SD3, Wan or HunyuanVideo
    size its pipeline refuses (16), or a CogVideoX one it breaks on, failed only after the pipeline had loaded. The
    multiple comes from the directory's configs: a VAE of 4 blocks scales by 8."""
    index = {"_class_name": "P", "transformer": ["diffusers", transformer]}
    path = _pipeline_index(tmp_path / "pipe", json.dumps(index))
    for part, config in (("vae", {"block_out_channels": [8, 8, 8, 8]}), ("transformer", {"patch_size": patch})):
        (path / part).mkdir()
        (path / part / "config.json").write_text(json.dumps(config))
    argv = ["bench", "--model", str(path), "--out", str(tmp_path / "out"), option]
    if bad is not None:
        assert _usage_error(capsys, [*argv, str(bad)]).endswith(f"argument {option}: must be a {message}")
    with pytest.raises(AssertionError, match="started working"):  # accepted: the work begins
        main([*argv, str(good)])


@pytest.mark.parametrize("command", ["bench", "demo", "analyze"])
@pytest.mark.parametrize("seed", [str(2**63), "-1"])
def test_a_seed_out_of_range_is_refused_before_any_work(capsys, no_work, command, seed):
    """A seed past 2**63 - 1 used to pass the parser and overflow in ``torch.Generator.manual_seed`` after the model
    loaded."""
    line = _usage_error(capsys, [command, "--seed", seed])
    assert line.endswith(f"argument --seed: must be an integer in 0..{2**63 - 1}, got {seed}")


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "--budgets", "14.5"], "--budgets: must be one of [7, 8, 10, 11, 14] (NFC of 50 steps), got 14.5"),
    (["demo", "--budgets", "7.0"], "--budgets: must be one of [7, 8, 10, 11, 14] (NFC of 50 steps), got 7.0"),
    (["calibrate", "--nfc", "2"], "argument --nfc: each must be an integer in 3..49 (below --steps: at --steps "
     "every step is full, with nothing to calibrate), got 2"),
    (["calibrate", "--nfc", "2", "60", "--steps", "50"], "argument --nfc: each must be an integer in 3..49 (below "
     "--steps: at --steps every step is full, with nothing to calibrate), got 2 60"),
    (["calibrate", "--nfc", "3.5"], "argument --nfc: invalid integer value: '3.5'"),
])
def test_budget_options_name_their_allowed_values(capsys, no_work, argv, message):
    """A non-integer budget said "invalid _budget value" (an internal name), and calibrate's --nfc said ">= 2" where
    it needs 3 or more (found by review). --nfc's range depends on --steps, so it is checked once, after parsing:
    a budget below 3 and one at or above --steps get the same words."""
    assert _usage_error(capsys, argv).endswith(message)


def test_demo_runs_a_repeated_budget_once(monkeypatch, tmp_path):
    """``demo --budgets 7 7`` used to run every method twice and print each row twice."""
    ran = []

    def run_bench(model, sampler, methods, **kwargs):
        ran.extend(m.label for m in methods)
        raise RuntimeError("stop before sampling")

    monkeypatch.setattr(cli.demo, "_reference", lambda: (None, None, None, None))
    monkeypatch.setattr("relcache.evaluation.bench.run_bench", run_bench)  # demo's run imports it when it runs
    with pytest.raises(RuntimeError, match="stop before sampling"):
        main(["demo", "--budgets", "7", "14", "7", "--out", str(tmp_path / "grid.png")])
    assert ran == ["FORA NFC=7", "TaylorSeer NFC=7", "RFC NFC=7", "FORA NFC=14", "TaylorSeer NFC=14", "RFC NFC=14"]


@pytest.mark.parametrize("command,written,kept", [
    ("bench", "results.jsonl", "every finished generation is kept in {out}: run the same command with --resume (in "
                               "place of --overwrite, if given) to continue"),
    ("calibrate", "calibration.json", "every finished budget is kept in {out}/calibration.json: run the same command "
                                      "with --resume (in place of --overwrite, if given) to continue"),
    ("analyze", "summary.json", "the analysis in {out} may be incomplete (it has no run.json): run the command "
                                "again"),
    ("analyze", "run.json", "the earlier analysis in {out} is as it was (its run.json describes it)"),
])
@pytest.mark.parametrize("started", [False, True], ids=["before-any-file", "after-a-file"])
def test_ctrl_c_ends_a_command_with_one_line_and_status_130(capsys, monkeypatch, tmp_path, command, written, kept,
                                                           started):
    """Ctrl-C used to end ``bench`` with a traceback and no word of ``--resume``. Stopped before its first file (while
    loading the model) a command says nothing was written: it used to name a file that was not there (found by
    review). The file a resumable command looks for is the one it writes (``runlog.LOG``, ``calibrate.RESULT``)."""
    from relcache.cli.calibrate import RESULT
    from relcache.evaluation.runlog import LOG

    assert {"bench": LOG, "calibrate": RESULT}.get(command, written) == written
    out = tmp_path / "out"

    def interrupted(*args, **kwargs):
        if started:  # what the command had written by then
            out.mkdir(exist_ok=True)
            (out / written).write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(getattr(cli, command), "_reference", interrupted)
    extra = ["--nfc", "7"] if command == "calibrate" else ["--samples", "2"]
    assert main([command, *extra, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    said = kept.format(out=out) if started else f"nothing was written in {out} yet"
    assert err.strip() == f"relcache {command}: interrupted; {said}"


@pytest.mark.parametrize("command,raised,said", [
    ("demo", RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                          "you tried to allocate 8000000000 bytes. Error code 12 (Cannot allocate memory)"),
     "can't allocate memory: you tried to allocate 8000000000 bytes. Error code 12 (Cannot allocate memory)"),
    ("bench", "device", "CUDA out of memory. Tried to allocate 20.00 GiB."),
])
def test_out_of_memory_ends_a_command_with_one_line_naming_its_size_options(capsys, monkeypatch, tmp_path, command,
                                                                           raised, said):
    """Found by review: ``--samples 1000000000`` ended in the CPU allocator's traceback (no bound on it is known before
    the model loads). Now one line names the options that size what the command holds, and what it kept."""
    import torch

    if raised == "device":
        raised = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nGPU 0 has a total capacity")

    def allocate(*args, **kwargs):
        raise raised

    monkeypatch.setattr(getattr(cli, command), "_reference", allocate)
    out = tmp_path / ("grid.png" if command == "demo" else "out")
    assert main([command, "--samples", "2", "--out", str(out)]) == 1
    sizes = {"demo": "--samples", "bench": "--batch-size (one generation's samples) or --samples (all are kept)"}
    kept = "nothing was written" if command == "demo" else f"nothing was written in {out} yet"
    line = f"relcache {command}: out of memory ({said}): lower {sizes[command]}; {kept}"
    assert capsys.readouterr().err.strip() == line


def test_a_runtime_error_other_than_memory_keeps_its_traceback(monkeypatch, tmp_path):
    """Only an allocation refused by torch is turned into one line: any other error is raised as it was."""
    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(cli.demo, "_reference", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(["demo", "--samples", "2", "--out", str(tmp_path / "grid.png")])


def test_ctrl_c_while_torch_is_imported_ends_with_the_same_line(capsys, monkeypatch, tmp_path):
    """Found by review: Ctrl-C in the first second or so of a command (its import of torch, after the options are
    checked) ended with a traceback. Here the import is interrupted by a module whose names raise it."""
    class Interrupting(types.ModuleType):
        def __getattr__(self, name: str) -> object:
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "relcache.evaluation.ranks", Interrupting("relcache.evaluation.ranks"))
    out = tmp_path / "grid.png"
    assert main(["demo", "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip() == "relcache demo: interrupted; nothing was written"
    assert not out.exists()


#: run in a fresh interpreter (this one has torch already): the modules that must not have been imported
_HEAVY = ("torch", "diffusers", "numpy", "matplotlib")


def _fresh(body: str) -> tuple[list[str], str]:
    """(which of ``_HEAVY`` are imported, stderr) once ``body`` has run in a new interpreter, which must exit 0."""
    import subprocess
    import sys

    script = f"import sys\n{body}\nprint('imported:', *(m for m in {_HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1].split()[1:], done.stderr


@pytest.mark.parametrize(("argv", "error"), [
    (["--help"], None), (["demo", "--help"], None), (["bench", "--budgets", "5"], "error: argument --budgets"),
    (["calibrate", "--nfc", "1"], "error: argument --nfc"),
    (["calibrate", "--nfc", "3", "--steps", "3"], "error: argument --steps"),
    (["analyze", "--samples", "0"], "error: argument --samples"),
    # the commands' checks across options (``cli.main`` runs them before importing torch)
    (["bench", "--peers", "--steps", "20"], "error: --peers needs --steps 50"),
    (["bench", "--resume", "--overwrite"], "error: --resume continues the run"),
    (["calibrate", "--nfc", "3", "--resume", "--overwrite"], "error: --resume continues the run"),
])
def test_help_and_a_bad_option_answer_without_importing_torch(argv, error):
    """``relcache --help`` and an option error used to take about 7 s: building the parser imported torch and
    diffusers (peft with it). The parser and its type checks now import neither, nor numpy or matplotlib."""
    body = f"from relcache.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit as e:\n    code = e.code\n"
    imported, err = _fresh(body + f"assert code == {0 if error is None else 2}, code")
    assert imported == [], (imported, err)
    if error is not None:
        assert err.startswith("usage: relcache ") and error in err, err


def test_python_dash_m_relcache_is_the_command():
    """``python -m relcache`` (a venv whose scripts folder is not on PATH) runs the command: it had answered that
    relcache cannot be executed directly (found by a careful-user review)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "relcache", "bench", "--budgets", "5"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("usage: relcache bench"), done.stderr
    assert "error: argument --budgets" in done.stderr


def test_import_relcache_imports_its_names_on_first_use():
    """``import relcache`` imports no torch. Reading ``relcache.enable`` imports the runtime and registers the model
    adapters; an unknown name is an AttributeError; ``dir`` and ``import *`` give every public name."""
    assert _fresh("import relcache")[0] == []
    body = """import relcache
assert relcache.enable is relcache.api.enable and relcache.RFC is relcache.methods.config.RFC
from diffusers import DiTTransformer2DModel
from relcache.models.base import find_adapter
m = DiTTransformer2DModel(num_layers=1, num_attention_heads=2, attention_head_dim=8, in_channels=4, sample_size=8,
                          out_channels=4, num_embeds_ada_norm=10)
assert type(find_adapter(m)).__name__ == "DiTAdapter", find_adapter(m)
assert set(relcache.__all__) <= set(dir(relcache))
try:
    relcache.nosuch
except AttributeError as e:
    assert "nosuch" in str(e)
else:
    raise SystemExit("no AttributeError")
from relcache import *
assert FasterCache is relcache.FasterCache and CustomAdapter is relcache.models.CustomAdapter
"""
    assert "torch" in _fresh(body)[0]


@pytest.mark.parametrize("command", ["demo", "bench", "analyze", "calibrate"])
def test_an_unknown_option_shows_the_commands_usage(capsys, no_work, command):
    """``relcache demo --bogus`` used to print the top-level usage (argparse's default for a subcommand's unknown
    option): it now shows the command's own usage and names the option."""
    with pytest.raises(SystemExit) as exit_:
        main([command, "--bogus", "1", *(["--nfc", "8"] if command == "calibrate" else [])])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"usage: relcache {command} "), err
    assert err.strip().splitlines()[-1] == f"relcache {command}: error: unrecognized arguments: --bogus 1"


def test_an_unknown_option_before_the_command_shows_the_top_level_usage(capsys, no_work):
    """``relcache --bogus demo``: the option was given to ``relcache`` itself, whose usage is the one to show."""
    with pytest.raises(SystemExit) as exit_:
        main(["--bogus", "demo"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: relcache [-h]"), err
    assert err.strip().splitlines()[-1] == "relcache: error: unrecognized arguments: --bogus"


@pytest.mark.parametrize("argv", [["bench", "--samples", "2", "--no-flops"], ["calibrate", "--nfc", "5"],
                                  ["analyze", "--samples", "1"]])
def test_an_out_another_command_is_writing_into_is_refused_before_any_work(capsys, no_work, tmp_path, argv):
    """Two runs into one ``--out`` were both accepted, and their records mixed: a later ``bench --resume`` read one
    run's samples as the other's, and two ``calibrate`` runs each said they wrote the file only one kept (found by
    review). A command holds its ``--out`` (an exclusive flock on the directory) while it runs; here the test holds
    it, as a running command would."""
    fcntl = pytest.importorskip("fcntl")
    import os

    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = _usage_error(capsys, [*argv, "--out", str(out)])
    finally:
        os.close(fd)
    assert line == (f"relcache {argv[0]}: error: --out {out} is in use by another relcache command still writing into "
                    "it: wait for it to end, or choose another --out")


def test_the_claim_on_out_is_released_and_an_empty_directory_it_made_removed(tmp_path, monkeypatch):
    """Held for the command only: the same directory can be claimed again after it (a second command in sequence,
    or ``--resume``), a directory the claim made is removed when the command wrote nothing into it (a run refused
    after loading its model left an empty ``--out``), and kept when it did; under torchrun only the first rank
    holds it (the ranks share the directory)."""
    fcntl = pytest.importorskip("fcntl")
    import os

    from relcache.cli.options import claimed

    made, kept = tmp_path / "a" / "b", tmp_path / "kept"
    with claimed(made):
        assert made.is_dir()
    assert not made.exists() and (tmp_path / "a").is_dir()
    with claimed(kept):
        (kept / "x").write_text("1")
    with claimed(kept):  # released: claimed again
        fd = os.open(kept, os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    assert (kept / "x").is_file()
    monkeypatch.setenv("RANK", "1")
    with claimed(kept):
        fd = os.open(kept, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # not held by a later rank
        os.close(fd)


@pytest.mark.parametrize("command", ["bench", "analyze", "calibrate"])
def test_steps_past_the_schedulers_training_steps_are_refused_by_the_parser(capsys, no_work, command):
    """``--steps 1001`` loaded the model, then failed in diffusers' ``set_timesteps`` with a traceback, and ``bench``
    left a run record the corrected command had to ``--overwrite`` (found by review)."""
    line = _usage_error(capsys, [command, "--steps", "1001"])
    assert line.endswith("argument --steps: must be an integer in 2..1000 (the schedulers' training steps), got 1001")


def test_a_budget_that_adds_no_rows_is_named():
    """Over 10 steps budgets 11 and 10 (intervals 5 and 6) both give NFC 3: the second added no rows, silently
    (found by review); ``repeated_budgets`` names it, and a budget given twice, for the command's note."""
    from relcache.evaluation.bench import default_methods, repeated_budgets

    assert repeated_budgets([14, 11, 10, 14], 10) == [(10, 3, 11), (14, 4, 14)]
    assert repeated_budgets([14, 11, 10, 8, 7], 50) == []
    labels = [m.label for m in default_methods([14, 11, 10, 14], num_steps=10)]
    assert [lb for lb in labels if lb.startswith("FORA")] == ["FORA N=4", "FORA N=5"]


@pytest.mark.parametrize("argv,what", [(["bench", "--samples", "2", "--no-flops"], "run"),
                                       (["calibrate", "--nfc", "5"], "calibration")])
def test_resume_with_nothing_to_continue_says_so_before_starting(capsys, no_work, tmp_path, argv, what):
    """``--resume`` on a directory holding no run (a mistyped ``--out``) started a new run without a word (found by
    review); it still starts one, saying so first."""
    out = tmp_path / "typo"
    with pytest.raises(AssertionError, match="started working"):
        main([*argv, "--resume", "--out", str(out)])
    assert f"note: --resume: {out} holds no {what} to continue; starting a new one" in capsys.readouterr().err
