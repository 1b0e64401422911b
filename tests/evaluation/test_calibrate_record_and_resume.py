"""``relcache calibrate``'s record and printout, its ``--resume``/``--overwrite`` and the presets it names, with
``calibrate_steps`` replaced by a stand-in of known results (no model runs)."""

import argparse
import json

import pytest

import relcache
import relcache.cli as cli
from relcache.cli import main
from relcache.cli.calibrate import PREDICTORS, _predictor, _settings, _start
from relcache.evaluation import steps_search
from relcache.evaluation.steps_search import Calibration

ARGS = ["calibrate", "--steps", "6", "--samples", "2", "--labels", "3", "7"]


class Stop(Exception):
    pass


@pytest.fixture
def fake(monkeypatch):
    """``calibrate_steps`` returning NFC steps ending at the last step (rel L1 0.1, start 0.2, RFC's 0.4, or 0 for
    NFC 4, 7 evaluated), each call logged; it raises ``Stop`` for the NFC in ``fake.stop``."""
    calls = []

    def calibrate_steps(model, generate, nfc, num_steps, predictor, *, radius, rounds, progress=True):
        calls.append({"nfc": nfc, "num_steps": num_steps, "predictor": predictor, "radius": radius,
                      "rounds": rounds})
        if nfc == calibrate_steps.stop:
            raise Stop
        steps = relcache.Steps((*range(nfc - 1), num_steps - 1), num_steps=num_steps)
        return Calibration(steps, 0.1, 0.2, (0, 1, 5), 0.0 if nfc == 4 else 0.4, 7)

    calibrate_steps.stop, calibrate_steps.calls = None, calls
    monkeypatch.setattr(steps_search, "calibrate_steps", calibrate_steps)
    monkeypatch.setattr(cli.calibrate, "_reference",
                        lambda: (None, lambda *a, **k: pytest.fail("generated"), None, None))
    return calibrate_steps


def test_each_budget_is_recorded_and_printed_as_found(tmp_path, capsys, fake):
    out = tmp_path / "cal"
    assert main([*ARGS, "--nfc", "3", "4", "--radius", "2", "--rounds", "0", "--predictor", "plus",
                 "--out", str(out)]) == 0
    assert [(c["nfc"], c["num_steps"], c["radius"], c["rounds"]) for c in fake.calls] == [(3, 6, 2, 0), (4, 6, 2, 0)]
    assert fake.calls[0]["predictor"] == _predictor("plus", 2)
    record = json.loads((out / "calibration.json").read_text())
    got = record["budgets"]["3"]
    use = "relcache.RFCPlus(order=2, full_steps=relcache.Steps([0, 1, 5], num_steps=6))"
    assert {k: got[k] for k in got if k != "date"} == {
        "steps": [0, 1, 5], "rel_l1": 0.1, "start_rel_l1": 0.2, "rfc_steps": [0, 1, 5], "rfc_rel_l1": 0.4,
        "evaluated": 7, "use": use}
    assert record["budgets"]["4"]["steps"] == [0, 1, 2, 5]
    printed = capsys.readouterr().out
    # the ratio is ours over RFC's (0.1 / 0.4), and none where RFC's error is 0
    assert (f"NFC 3: rel L1 0.1 on the calibration batch (0.25x RFC's 0.4; 9 generations: the search's 7, full "
            f"computation's and RFC's)\n  {use}\n") in printed
    assert "NFC 4: rel L1 0.1 on the calibration batch (against RFC's 0; 9 generations" in printed


def test_a_budget_is_written_as_soon_as_it_is_found(tmp_path, fake):
    out = tmp_path / "cal"
    fake.stop = 4
    with pytest.raises(Stop):
        main([*ARGS, "--nfc", "3", "4", "--out", str(out)])
    assert list(json.loads((out / "calibration.json").read_text())["budgets"]) == ["3"]


def test_overwrite_deletes_the_earlier_calibration_before_any_work(tmp_path, fake):
    out = tmp_path / "cal"
    assert main([*ARGS, "--nfc", "3", "--out", str(out)]) == 0
    fake.stop = 3
    with pytest.raises(Stop):
        main([*ARGS, "--nfc", "3", "--out", str(out), "--overwrite"])
    assert not (out / "calibration.json").exists()


def test_every_option_of_the_search_is_a_setting_a_resume_must_share(tmp_path, capsys, fake):
    out = tmp_path / "cal"
    assert main([*ARGS, "--nfc", "3", "--out", str(out)]) == 0
    for option, value in (("--rounds", "2"), ("--radius", "2"), ("--predictor", "rfe"), ("--order", "3"),
                          ("--seed", "1"), ("--samples", "3"), ("--guidance", "2")):
        with pytest.raises(SystemExit):  # the later option wins
            main([*ARGS, "--nfc", "3", "--out", str(out), "--resume", option, value])
        assert f"other settings ({option[2:]})" in capsys.readouterr().err, option


def test_the_settings_recorded():
    args = argparse.Namespace(samples=2, steps=6, order=3, seed=100, predictor="rfe", radius=1, rounds=0)
    assert _settings(args, [3, 7], {"model": "reference"}, 1.5) == {
        "samples": 2, "steps": 6, "guidance": 1.5, "order": 3, "seed": 100, "predictor": "rfe", "radius": 1,
        "rounds": 0, "conditions": [3, 7], "model": "reference"}


@pytest.mark.parametrize("name", list(PREDICTORS))
def test_the_predictor_calibrated_is_the_one_of_the_preset_printed(name):
    config = eval(PREDICTORS[name].format(order=3, steps=[0, 1, 4], num_steps=8), {"relcache": relcache})  # noqa: S307
    assert _predictor(name, 3) == config.predictor


@pytest.mark.parametrize("budgets", [
    {"3": {"steps": [0, 1, 4], "rel_l1": 0.1, "rfc_rel_l1": 0.2, "evaluated": 3}},  # no "use"
    {"three": {"steps": [0, 1, 4], "rel_l1": 0.1, "rfc_rel_l1": 0.2, "evaluated": 3, "use": "..."}},  # not an NFC
])
def test_resume_refuses_an_entry_it_could_not_print(tmp_path, budgets):
    (tmp_path / "calibration.json").write_text(json.dumps({"settings": {"s": 1}, "budgets": budgets}))
    args = argparse.Namespace(out=tmp_path, resume=True, overwrite=False, steps=8)
    with pytest.raises(relcache.ConfigError, match="--resume: .*calibration.json"):
        _start(args, {"s": 1})
