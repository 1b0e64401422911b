"""``relcache calibrate`` on the shipped model (tiny settings), ``calibrate_steps`` and ``fit_count``."""

import json

import pytest
import torch

import relcache
import relcache.cli as cli
from relcache.cli import main
from relcache.evaluation.reference import load_reference_transformer, sample_digits
from relcache.evaluation.steps_search import fit_count
from relcache.methods.history import relative_l1

ARGS = ["calibrate", "--nfc", "3", "--steps", "6", "--samples", "2", "--radius", "1", "--rounds", "1",
        "--labels", "3", "7"]


def test_fit_count_by_hand():
    assert fit_count([0, 1, 5], 4, 10) == (0, 1, 5, 7)  # the largest gap is 5 -> 10 (the end)
    assert fit_count([0, 1, 3, 5, 8], 4, 10) == (0, 1, 5, 8)  # 3 sits where its two gaps sum least (1 -> 5)
    assert fit_count([0, 1, 4], 3, 10) == (0, 1, 4)


def test_calibrates_records_and_resumes(tmp_path, capsys, monkeypatch):
    import relcache.cli.calibrate as calibrate_cli

    reference, calls = calibrate_cli._reference, []

    def counting() -> tuple:  # the shipped model, its sampler counting the generations it runs
        model, sampler, evaluator, real = reference()
        return model, lambda *a, **k: calls.append(1) or sampler(*a, **k), evaluator, real

    monkeypatch.setattr(calibrate_cli, "_reference", counting)
    out = tmp_path / "cal"
    assert main([*ARGS, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # the printed count is every generation run: the search's, full computation's and RFC's (it omitted those two)
    assert f"; {len(calls)} generations: the search's {len(calls) - 2}," in printed
    record = json.loads((out / "calibration.json").read_text())
    got = record["budgets"]["3"]
    assert record["settings"]["seed"] == 100 and record["settings"]["conditions"] == [3, 7]
    assert len(got["steps"]) == 3 and got["steps"][:2] == [0, 1]
    assert got["rel_l1"] <= got["start_rel_l1"] and got["evaluated"] >= 2
    assert got["use"] == f"relcache.RFCPlus(order=2, full_steps=relcache.Steps({got['steps']}, num_steps=6), fit=True)"
    assert got["use"] in printed
    import relcache as rc  # the printed configuration runs as written, and refuses a generation of another length
    cfg = eval(got["use"], {"relcache": rc})  # noqa: S307 - our own output
    assert cfg.schedule.steps == tuple(got["steps"]) and cfg.schedule.num_steps == 6

    # the recorded error is the batch's rel L1 with those steps, measured again here
    model, labels = load_reference_transformer(), torch.tensor([3, 7])
    ref = sample_digits(model, labels, num_steps=6, generator=torch.Generator().manual_seed(100))
    with relcache.cached(model, relcache.RFCPlus(full_steps=got["steps"], fit=True)):
        again = sample_digits(model, labels, num_steps=6, generator=torch.Generator().manual_seed(100))
    assert relative_l1(again, ref) == pytest.approx(got["rel_l1"], rel=1e-6)

    # an interrupted or finished run is never overwritten by accident; --resume redoes nothing that is recorded
    with pytest.raises(SystemExit):
        main([*ARGS, "--out", str(out)])
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(cli.calibrate, "_reference", lambda: (model, sample_digits, None, None))
    import relcache.evaluation.steps_search as steps_search

    monkeypatch.setattr(steps_search, "search_steps", lambda *a, **k: pytest.fail("recorded budget searched again"))
    assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    assert "full computation's and RFC's, recorded before)" in capsys.readouterr().out  # none of them ran now
    with pytest.raises(SystemExit):
        main([*ARGS, "--radius", "2", "--out", str(out), "--resume"])  # the later --radius wins
    assert "other settings (radius)" in capsys.readouterr().err


def test_bad_budget_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.calibrate, "_reference", lambda: pytest.fail("loaded before refusing"))
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", "--nfc", "9", "--steps", "8", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "--nfc: each must be an integer in 3..7 (below --steps" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--nfc", "6", "--steps", "6"], "--nfc: each must be an integer in 3..5 (below --steps: at --steps every step is "
                                     "full, with nothing to calibrate), got 6"),
    (["--nfc", "3", "--steps", "3"],
     "--steps: must be at least 4 for calibrate (3 full steps and one to cache), got 3"),
])
def test_budgets_with_nothing_to_calibrate_are_refused_naming_the_option(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(cli.calibrate, "_reference", lambda: pytest.fail("loaded before refusing"))
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", *argv, "--out", str(tmp_path)])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("text", ['{"settings": ', "[1, 2]", '{"settings": {}, "budgets": {"3": {}}}'])
def test_resume_from_a_damaged_record_is_refused_naming_the_file(tmp_path, capsys, monkeypatch, text):
    monkeypatch.setattr(cli.calibrate, "_reference", lambda: pytest.fail("loaded before refusing"))
    (tmp_path / "calibration.json").write_text(text)
    with pytest.raises(SystemExit) as exit_:
        main([*ARGS, "--out", str(tmp_path), "--resume"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--resume: {tmp_path / 'calibration.json'}" in err and "--overwrite" in err


def test_resume_refuses_a_recorded_budget_that_is_not_a_valid_list(tmp_path):
    """A hand-edited record (NFC 5's steps ending at 9 of 8 steps) was resumed and its ``use`` line printed, which
    raises when run (found by review). Each recorded budget must be NFC increasing steps from 0 below ``--steps``."""
    import argparse
    import json
    import re

    from relcache.cli.calibrate import _start

    args = argparse.Namespace(out=tmp_path, resume=True, overwrite=False, steps=8)
    entry = {"rel_l1": 0.1, "rfc_rel_l1": 0.2, "evaluated": 3, "use": "..."}
    for steps, good in (([0, 1, 3, 4, 6], True), ([0, 1, 3, 4, 9], False), ([0, 1, 3, 4], False),
                        ([0, 3, 1, 4, 6], False)):
        record = {"settings": {"s": 1}, "budgets": {"5": {**entry, "steps": steps}}}
        (tmp_path / "calibration.json").write_text(json.dumps(record))
        if good:
            assert _start(args, {"s": 1}) == record
        else:
            with pytest.raises(relcache.ConfigError, match=f"holds for NFC 5 the steps {re.escape(str(steps))}"):
                _start(args, {"s": 1})
