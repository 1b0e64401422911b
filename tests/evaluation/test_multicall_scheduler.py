"""``relcache bench`` and ``calibrate`` on a pipeline whose scheduler calls the transformer twice a step (Heun): they
count budgets in steps of one call and announced ``--steps``, so such a run cached every call past that count and
``calibrate`` printed steps the pipeline then refused (found by review). Refused now, naming the scheduler and its
call count, before any generation runs."""

import json

import pytest
import tiny_pipelines as tiny
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
)

from relcache.cli import main
from relcache.errors import ConfigError
from relcache.evaluation.pipelines import check_one_call_per_step


def test_schedulers_of_two_calls_a_step_are_refused_with_their_count():
    for scheduler in (HeunDiscreteScheduler(), KDPM2DiscreteScheduler()):  # 2 x 8 - 1 calls
        before = len(scheduler.timesteps)
        with pytest.raises(ConfigError, match=f"scheduler .{type(scheduler).__name__}. makes 15 transformer calls "
                                              "for 8 steps"):
            check_one_call_per_step(scheduler, 8)
        assert len(scheduler.timesteps) == before  # the pipeline's own scheduler is left as it was
    for scheduler in (DDIMScheduler(), DPMSolverMultistepScheduler(), FlowMatchEulerDiscreteScheduler()):
        check_one_call_per_step(scheduler, 8)
    # a count that needs the pipeline's arguments (FLUX's dynamic shift needs mu) is let through
    check_one_call_per_step(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 8)


def test_calibrate_on_a_heun_pipeline_is_refused_before_generating(tmp_path, capsys):
    pipe_dir = tiny.save_pixart(tmp_path / "pixart")
    (pipe_dir / "scheduler" / "scheduler_config.json").write_text(HeunDiscreteScheduler().to_json_string())
    index = json.loads((pipe_dir / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "HeunDiscreteScheduler"]
    (pipe_dir / "model_index.json").write_text(json.dumps(index))
    argv = ["calibrate", "--model", str(pipe_dir), "--samples", "2", "--steps", "8", "--nfc", "4",
            "--height", "16", "--width", "16", "--out", str(tmp_path / "cal")]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "(HeunDiscreteScheduler) makes 15 transformer calls for 8 steps" in err
    assert not (tmp_path / "cal" / "calibration.json").exists()
