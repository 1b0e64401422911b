"""Nothing lost: ``run_bench`` records every finished generation as it ends, and a run interrupted part-way resumes
to the table of an uninterrupted run, rerunning only the generation in flight."""

import json
import math
import re
import shlex

import pytest
from conftest import tiny_dit

from relcache.cli import main
from relcache.evaluation import provenance, runlog
from relcache.evaluation.bench import BenchMethod, run_bench
from relcache.evaluation.reference import sample_digits
from relcache.methods import FORA, TaylorSeer

STEPS = 6
METHODS = [BenchMethod("FORA N=3", FORA(3), budget=14), BenchMethod("TaylorSeer N=4", TaylorSeer(4), budget=7)]


class Interrupted(KeyboardInterrupt):
    pass


class Counting:
    """``sample_digits`` that counts its calls and raises ``Interrupted`` at call ``stop`` (1-based)."""

    def __init__(self, stop: int | None = None):
        self.calls, self.stop = 0, stop

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.stop:
            raise Interrupted
        return sample_digits(*args, **kwargs)


def _run(out, sampler, methods=METHODS, **kw):
    kw = {"num_samples": 4, "batch_size": 2, "num_steps": STEPS, "seed": 0, **kw}
    return run_bench(tiny_dit(num_classes=10), sampler, methods, progress=False, out_dir=out, **kw)


def _table(result):
    """Every column measured from the samples (times are measured, so they are compared separately)."""
    def value(v):
        return "nan" if isinstance(v, float) and math.isnan(v) else v  # nan != nan

    return [tuple(value(v) for v in (r.method, r.budget, r.nfc, r.flops, r.flops_ratio, r.rel_l1, r.psnr, r.ssim))
            for r in result.rows]


def _results(out):
    return [json.loads(line) for line in (out / runlog.LOG).read_text().splitlines()]


def test_an_interrupted_run_resumes_to_the_uninterrupted_table(tmp_path):
    whole = _run(tmp_path / "whole", Counting())
    # 3 methods x 2 batches = 6 generations of 2 sampler calls each (timed + FLOP count), after 1 warm-up call.
    # Stop inside the 4th generation's FLOP pass: 3 generations are recorded, the 4th is lost.
    first = Counting(stop=1 + 3 * 2 + 2)
    with pytest.raises(Interrupted):
        _run(tmp_path / "cut", first)
    records = _results(tmp_path / "cut")
    assert records[0]["kind"] == "run" and [r["kind"] for r in records[1:]] == ["result"] * 3
    assert [(r["method"], r["batch"]) for r in records[1:]] == [
        ("full computation", 0), ("FORA N=3", 0), ("TaylorSeer N=4", 0)]

    second = Counting()
    resumed = _run(tmp_path / "cut", second, resume=True)
    assert second.calls == 1 + 3 * 2  # the warm-up and the 3 generations not recorded: nothing finished is rerun
    assert _table(resumed) == _table(whole)
    for label, samples in whole.samples.items():
        assert resumed.samples[label].equal(samples)
    records = _results(tmp_path / "cut")
    assert [r["kind"] for r in records].count("result") == 6 and records[4]["kind"] == "resume"
    # the times of the 3 recorded generations are the ones measured before the interruption
    first_times = {(r["method"], r["batch"]): r["seconds"] for r in records if r["kind"] == "result"}
    fora = [first_times[("FORA N=3", b)] for b in range(2)]
    assert next(r for r in resumed.rows if r.method == "FORA N=3").time_s == pytest.approx(sum(fora) / 2)
    assert resumed.run["resumed"] and resumed.run["date"] == records[0]["date"]

    third = Counting()  # resuming a finished run generates nothing
    again = _run(tmp_path / "cut", third, resume=True)
    assert third.calls == 0 and _table(again) == _table(whole)


def test_a_speed_up_across_sessions_says_so(tmp_path):
    """Found by review: a run interrupted inside a batch resumed with full computation timed in the first session and
    the methods in the second, and their speed-ups divided times taken apart without a word. Such rows say so; rows
    whose every batch was timed in full computation's session say nothing."""
    out = tmp_path / "run"
    with pytest.raises(Interrupted):  # the warm-up, full computation on batch 0, then stopped inside FORA on batch 0
        _run(out, Counting(stop=1 + 1 + 1), count_flops=False)
    assert [(r["method"], r["batch"]) for r in _results(out) if r["kind"] == "result"] == [("full computation", 0)]
    resumed = _run(out, Counting(), resume=True, count_flops=False)
    notes = {r.method: r.note for r in resumed.rows}
    assert notes == {"full computation": "",
                     "FORA N=3": "timed in another session than full computation on 1 of 2 batches (resumed)",
                     "TaylorSeer N=4": "timed in another session than full computation on 1 of 2 batches (resumed)"}
    assert all(r.note == "" for r in _run(tmp_path / "whole", Counting(), count_flops=False).rows)


def test_a_line_cut_short_by_a_kill_is_rerun(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        _run(out, Counting(stop=1 + 2 + 1), count_flops=False)
    log = out / runlog.LOG
    lines = log.read_text().splitlines()
    last = json.loads(lines[-1])
    with (out / last["samples"]["file"]).open("ab") as f:  # a kill while writing the next batch's samples ...
        f.write(b"\x00" * 100)
    log.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])  # ... and a kill while writing the line itself
    counting = Counting()
    resumed = _run(out, counting, resume=True, count_flops=False)
    assert counting.calls == 1 + (6 - 1)  # only the first generation survived whole
    assert _table(resumed) == _table(_run(tmp_path / "whole", Counting(), count_flops=False))
    # found by review: the resume record was appended to the cut line, and a second resume found line N not JSON
    assert all(json.loads(line) for line in log.read_text().splitlines())
    third = Counting()
    assert _table(_run(out, third, resume=True, count_flops=False)) == _table(resumed) and third.calls == 0


@pytest.mark.parametrize("damage", ["missing", "short", "not JSON"])
def test_a_damaged_record_is_refused_naming_the_file_and_the_way_on(tmp_path, damage):
    """Found by review: a samples file removed since the run was a traceback (FileNotFoundError); and no message
    said how to go on."""
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        _run(out, Counting(stop=1 + 2 * 2 + 1), count_flops=False)  # two generations recorded
    log = out / runlog.LOG
    lines = log.read_text().splitlines()
    samples = out / json.loads(lines[1])["samples"]["file"]
    if damage == "missing":
        samples.unlink()
    elif damage == "short":
        samples.write_bytes(samples.read_bytes()[:8])
    else:
        log.write_text("\n".join([lines[0], "{cut", *lines[1:]]) + "\n")
    said = {"missing": f"{samples}, which {log} names, is missing", "short": "is shorter than",
            "not JSON": f"line 2 of {log} is not JSON"}[damage]
    with pytest.raises(runlog.ResumeError, match=re.escape(said) + r".*\(run the command with --overwrite instead "
                                                 r"of --resume to start again\)"):
        _run(out, Counting(), resume=True, count_flops=False)


def test_a_run_whose_first_generation_fails_leaves_no_run_to_overwrite(tmp_path):
    """Found by review: the run's record was written before the warm-up generation, so a size the pipeline refused
    left an "earlier run" that the corrected command had to overwrite (and could not resume: its settings differ)."""
    with pytest.raises(Interrupted):
        _run(tmp_path / "out", Counting(stop=1))  # the warm-up, the first sampler call
    assert not runlog.has_log(tmp_path / "out")
    _run(tmp_path / "out", Counting())  # the corrected command, as it is: no --overwrite needed
    assert [r["kind"] for r in _results(tmp_path / "out")] == ["run"] + ["result"] * 6


@pytest.mark.parametrize("change,named", [
    ({"seed": 1}, "seed: 0 -> 1"),
    ({"num_samples": 6}, "num_samples: 4 -> 6"),
    ({"methods": METHODS[:1]}, "methods: "),
    ({"guidance_scale": 2.0}, "guidance_scale: 1.5 -> 2.0"),
])
def test_resume_refuses_other_settings(tmp_path, change, named):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        _run(out, Counting(stop=4))
    counting = Counting()
    with pytest.raises(runlog.ResumeError, match="cannot resume the run in .*its settings differ") as err:
        _run(out, counting, resume=True, **change)
    assert named in str(err.value) and counting.calls == 0


def test_a_recorded_run_is_never_overwritten_by_a_new_one(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        _run(out, Counting(stop=4))
    before = (out / runlog.LOG).read_text()
    with pytest.raises(runlog.ResumeError, match="holds an earlier run's results.jsonl"):
        _run(out, Counting())
    assert (out / runlog.LOG).read_text() == before


def _dit_dir(tmp_path):
    from conftest import dit_pipe

    dit_pipe().save_pretrained(tmp_path / "dit")
    return str(tmp_path / "dit")


def test_cli_resume_and_the_run_record_in_every_file(tmp_path, capsys):
    from PIL import Image

    model, out = _dit_dir(tmp_path), tmp_path / "bench"
    argv = ["bench", "--model", model, "--samples", "2", "--batch-size", "2", "--steps", "4", "--budgets", "7",
            "--no-flops", "--only", "RFC NFC", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out.split("\n\nwritten")[0]
    command = "relcache " + shlex.join(argv)
    md = (out / "bench.md").read_text()
    assert f"- command: {command}\n" in md and "- versions: relcache 0.1.0, torch " in md and "seed=0" in md
    assert (out / "bench.csv").read_text().startswith(f"# command: {command}\n")
    run = json.loads((out / "bench.json").read_text())["run"]
    assert run["command"] == command and run["settings"]["family"] == "dit" and run["settings"]["seed"] == 0
    for png in ("pareto.png", "samples.png"):
        assert f"command: {command}" in Image.open(out / png).text["Description"]

    # a second run into the same directory: refused, the recorded run named
    with pytest.raises(SystemExit):
        main(argv)
    assert "holds an earlier run (started " in capsys.readouterr().err
    # resumed: nothing to generate, the same table, the resumption recorded
    assert main([*argv, "--resume"]) == 0
    assert capsys.readouterr().out.split("\n\nwritten")[0] == table
    assert [r["kind"] for r in _results(out)] == ["run"] + ["result"] * 3 + ["resume"]
    assert "- resumed: " in (out / "bench.md").read_text()
    # other settings: refused before the model is loaded
    with pytest.raises(SystemExit):
        main([*argv, "--resume", "--seed", "3"])
    assert "seed: 0 -> 3" in capsys.readouterr().err
    # --overwrite starts over
    assert main([*argv, "--overwrite", "--steps", "5"]) == 0
    assert [r["kind"] for r in _results(out)] == ["run"] + ["result"] * 3
    with pytest.raises(SystemExit):
        main([*argv, "--resume", "--overwrite"])
    assert "pass one of them" in capsys.readouterr().err




def test_resume_refuses_other_versions_but_not_other_machines(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        _run(out, Counting(stop=4))
    log = out / runlog.LOG
    lines = log.read_text().splitlines()
    header = json.loads(lines[0])
    header["machine"]["host"] = "elsewhere"
    header["versions"]["python"] = "3.0"  # recorded, not compared
    import importlib.metadata
    assert header["versions"]["torchmetrics"] == importlib.metadata.version("torchmetrics")  # SSIM depends on it
    del header["versions"]["torchmetrics"]  # a run recorded before it was: still resumable
    log.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    counting = Counting()
    _run(out, counting, resume=True)
    assert counting.calls == 1 + (6 - 1) * 2  # the warm-up and the 5 generations not recorded (timed + FLOPs)
    header["versions"]["diffusers"] = "0.1.0"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    with pytest.raises(runlog.ResumeError, match=r"version diffusers: \"0.1.0\" -> "):
        _run(out, Counting(), resume=True)


def test_a_refused_resume_shows_what_differs():
    """Other methods (``--only``): the labels left out and added, not two lists cut at their shared start; a long
    setting: both values from shortly before where they differ."""
    config = "CacheConfig(predictor=Relational(order=2), schedule=InputError(threshold=0.3, target_nfc={}, order=2))"
    old = {"methods": [{"label": "full computation", "config": None},
                       {"label": "RFC NFC 14", "config": config.format(14)}],
           "schedule": config.format(14)}
    new = {"methods": [{"label": "full computation", "config": None},
                       {"label": "FORA NFC 14", "config": "FORA(4)"},
                       {"label": "RFC NFC 11", "config": config.format(11)}],
           "schedule": config.format(11)}
    assert runlog.differences(old, new) == [
        'methods: 2 -> 3 items; not in the new run: ["RFC NFC 14"]; new: ["FORA NFC 14", "RFC NFC 11"]',
        'schedule: ...ld=0.3, target_nfc=14, order=2))" -> ...ld=0.3, target_nfc=11, order=2))"']  # 20 before
    assert runlog.differences({"m": [1, 2]}, {"m": [2, 1]}) == ["m: 2 -> 2 items; the same items in another order"]
    assert runlog.differences({"c": [1, 1, 2]}, {"c": [1, 2, 2]}) == [
        "c: 3 -> 3 items; not in the new run: [1]; new: [2]"]  # repeats count (class labels may repeat)
    assert runlog.differences({"seed": 0}, {"seed": 3}) == ["seed: 0 -> 3"]


def _interrupted(out, **kw):
    """A run stopped after two generations (full computation and FORA on batch 0) without FLOP counts."""
    with pytest.raises(Interrupted):
        _run(out, Counting(stop=1 + 2 + 1), count_flops=False, **kw)
    return out / runlog.LOG


@pytest.mark.parametrize("recorded,refused", [
    ("deadbee", True), ("abc1234+", True), ("abc1234", False), (None, False)])
def test_resume_refuses_a_run_recorded_by_another_commit(tmp_path, monkeypatch, recorded, refused):
    """Found by review: only the version strings were compared, so a run recorded at commit deadbee resumed at
    another commit and its table went out under deadbee's name. Compared where both runs know it, with its "+"
    (uncommitted changes) marker; a run recorded without one (an installed package, an older log) still resumes."""
    monkeypatch.setattr(provenance, "_git_commit", lambda: "abc1234")
    log = _interrupted(tmp_path / "run")
    lines = log.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["versions"]["relcache commit"] == "abc1234"
    if recorded is None:
        del header["versions"]["relcache commit"]
    else:
        header["versions"]["relcache commit"] = recorded
    log.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    counting = Counting()
    if refused:
        with pytest.raises(runlog.ResumeError, match=re.escape(f"relcache commit: {recorded} -> abc1234 (the run was "
                                                               "recorded by other code") + ".*--overwrite"):
            _run(tmp_path / "run", counting, resume=True, count_flops=False)
        assert counting.calls == 0
    else:
        _run(tmp_path / "run", counting, resume=True, count_flops=False)
        assert counting.calls == 1 + 6 - 2


def _set(i, *keys, value=KeyError):
    """An edit of line ``i``: its ``keys`` (a path) set to ``value``, or removed."""
    def edit(lines):
        rec = json.loads(lines[i])
        inner = rec
        for k in keys[:-1]:
            inner = inner[k]
        if value is KeyError:
            del inner[keys[-1]]
        else:
            inner[keys[-1]] = value
        return [*lines[:i], json.dumps(rec), *lines[i + 1:]]
    return edit


DAMAGE = {  # what the reviewer's corrupt.py tried: edit of the log's lines -> the line named
    "first line a list": (lambda lines: ["[]", *lines[1:]], "the first line of {log} is not a run record"),
    "empty": (lambda lines: [], "{log} is empty"),
    "run record without settings": (_set(0, "settings"), "line 1 of {log}"),
    "no samples": (_set(2, "samples"), "line 3 of {log}"),
    "no batch": (_set(2, "batch"), "line 3 of {log}"),
    "seconds a string": (_set(2, "seconds", value="abc"), "line 3 of {log}"),
    "seconds null": (_set(2, "seconds", value=None), "line 3 of {log}"),
    "batch a string": (_set(2, "batch", value="0"), "line 3 of {log}"),
    "batch past the last": (_set(2, "batch", value=7), "line 3 of {log}"),
    "a list line": (lambda lines: [*lines[:2], "[1, 2]", *lines[2:]], "line 3 of {log}"),
    "unknown kind": (lambda lines: [*lines[:2], '{"kind": "foo"}', *lines[2:]], "line 3 of {log}"),
    "shape of another batch": (_set(2, "samples", "shape", value=[1, 4, 8, 8]), "line 3 of {log}"),
    "shape of another model": (_set(2, "samples", "shape", value=[2, 4, 4, 4]), "line 3 of {log}"),
    "negative offset": (_set(2, "samples", "offset", value=-5), "line 3 of {log}"),
    "absolute file": (_set(2, "samples", "file", value="/etc/passwd"), "line 3 of {log}"),
    "offset past the end": (_set(2, "samples", "offset", value=10**6), "(line 3)"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_hand_edited_log_is_refused_naming_the_line(tmp_path, damage):
    """Found by review: KeyError, TypeError, ValueError, OSError and AttributeError tracebacks, most after the model
    had loaded. Every line is checked, and the first wrong one named with the way on, before any generation."""
    log = _interrupted(tmp_path / "run")
    edit, said = DAMAGE[damage]
    lines = edit(log.read_text().splitlines())
    log.write_text("".join(line + "\n" for line in lines))
    counting = Counting()
    with pytest.raises(runlog.ResumeError, match=re.escape(said.format(log=log)) + ".*--overwrite"):
        _run(tmp_path / "run", counting, resume=True, count_flops=False)
    assert counting.calls == 0
    with pytest.raises(runlog.ResumeError, match=re.escape(said.format(log=log))):
        runlog.check_log(tmp_path / "run")


def test_only_the_run_logs_are_read_and_overwritten(tmp_path):
    """Found by review: any results*.jsonl was read as a rank's log (a results.backup.jsonl overrode the real one),
    and --overwrite deleted a user's results_notes.jsonl."""
    out = tmp_path / "run"
    log = _interrupted(out)
    lines = log.read_text().splitlines()
    (out / "results.backup.jsonl").write_text("\n".join([*lines, _set(2, "seconds", value=99.0)(lines)[2]]) + "\n")
    (out / "results_notes.jsonl").write_text("my notes\n")
    (out / "results.rank02.jsonl").write_text("not a rank's name\n")
    for name in ("results.rank10.jsonl", "results.rank2.jsonl"):
        (out / name).write_text(lines[0] + "\n")
    assert [p.name for p in runlog.log_paths(out)] == ["results.jsonl", "results.rank2.jsonl", "results.rank10.jsonl"]
    (out / "results.rank10.jsonl").unlink()
    (out / "results.rank2.jsonl").unlink()
    seconds = {k: v[1] for k, v in runlog.load_results(out).items()}
    assert seconds[("FORA N=3", 0)] == json.loads(lines[2])["seconds"] != 99.0
    runlog.clear(out)
    assert sorted(p.name for p in out.iterdir()) == ["results.backup.jsonl", "results.rank02.jsonl",
                                                     "results_notes.jsonl"]


def test_the_log_is_standard_json_and_older_logs_with_nan_still_resume(tmp_path):
    """Unmeasured FLOPs were written as a bare NaN, which is not JSON (strict readers refuse it): now null. A log
    written before, with NaN, still resumes, NaN read as NaN."""
    log = _interrupted(tmp_path / "run")

    def strict(token):
        raise ValueError(f"not JSON: {token}")

    records = [json.loads(line, parse_constant=strict) for line in log.read_text().splitlines()]
    assert [r["flops"] for r in records[1:]] == [None, None]
    assert all(math.isnan(g[3]) for g in runlog.load_results(tmp_path / "run").values())
    log.write_text(log.read_text().replace('"flops": null', '"flops": NaN'))  # as an older version wrote it
    resumed = _run(tmp_path / "run", Counting(), resume=True, count_flops=False)
    assert _table(resumed) == _table(_run(tmp_path / "whole", Counting(), count_flops=False))


def test_cli_refuses_a_damaged_log_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """Found by review: a damaged line was a traceback after the model had loaded; an empty results.jsonl without
    --resume was refused with "cannot resume" (not asked for) and no way on."""
    from relcache.evaluation import pipelines

    model, out = _dit_dir(tmp_path), tmp_path / "bench"
    argv = ["bench", "--model", model, "--samples", "2", "--batch-size", "2", "--steps", "4", "--budgets", "7",
            "--no-flops", "--only", "RFC NFC", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipelines, "load_sampler", loaded)
    log = out / runlog.LOG
    lines = log.read_text().splitlines()
    log.write_text("".join(line + "\n" for line in _set(1, "seconds", value=None)(lines)))
    with pytest.raises(SystemExit):
        main([*argv, "--resume"])
    err = capsys.readouterr().err
    assert f"line 2 of {log} is not a result the run wrote: its seconds is not a number" in err
    assert "--overwrite" in err and "Traceback" not in err
    log.write_text("")
    for extra in ([], ["--resume"]):
        with pytest.raises(SystemExit):
            main([*argv, *extra])
        err = capsys.readouterr().err
        assert "--overwrite" in err and ("empty" in err) and "Traceback" not in err


def test_an_output_is_replaced_whole_or_not_at_all(tmp_path):
    """``runlog.whole``: the new content replaces the file in one step. A write stopped part-way leaves the earlier
    file as it was and no temporary file; bench wrote in place, so a stop (or an earlier file it could not open for
    writing) left half its outputs (found by review)."""
    from relcache.evaluation.runlog import whole

    path = tmp_path / "bench.md"
    path.write_text("earlier")
    with pytest.raises(KeyboardInterrupt), whole(path) as tmp:
        tmp.write_text("half of the new")
        raise KeyboardInterrupt
    assert path.read_text() == "earlier" and [p.name for p in tmp_path.iterdir()] == ["bench.md"]
    with whole(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["bench.md"]


def test_a_log_holding_a_second_run_of_other_settings_is_refused(tmp_path):
    """Two commands into one ``--out`` (before the command held it) appended a second run record to the log, and
    ``--resume`` read that run's generations as the first's, reporting wrong numbers without a word (found by
    review). A later run record whose settings differ from line 1's is refused, naming the line and the setting; one
    with the same settings (a rank new to the run copies the header) is not."""
    log = _interrupted(tmp_path / "run")
    lines = log.read_text().splitlines()
    header = json.loads(lines[0])
    same = json.dumps({**header, "resumed_by": {"kind": "resume"}})
    other = json.dumps({**header, "settings": {**header["settings"], "seed": 1}})
    log.write_text("\n".join([*lines, same, *lines[1:]]) + "\n")
    runlog.check_log(tmp_path / "run")
    log.write_text("\n".join([*lines, other, *lines[1:]]) + "\n")
    with pytest.raises(runlog.ResumeError, match=rf"line {len(lines) + 1} of .* starts another run than line 1 "
                                                 r"\(other settings: seed: 0 -> 1\)"):
        runlog.check_log(tmp_path / "run")
