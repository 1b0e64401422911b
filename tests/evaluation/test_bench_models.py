"""``relcache bench --model DIR`` on tiny saved pipelines of FLUX, SD3, PixArt and Wan (text encoders and tokenizers
included, built here, nothing downloaded): loaded as a user's directory would be, prompts from a file or the
built-in list, quality against full computation (per frame for video) and every output file written. Bad input is
refused before anything is loaded."""

import json

import pytest
import tiny_pipelines as tiny

import relcache.evaluation.pipelines as pipelines
from relcache.cli import main
from relcache.evaluation.pipelines import DEFAULT_PROMPTS

#: family -> (save, size options, extra options)
CASES = {
    "flux": (tiny.save_flux, ["--height", "16", "--width", "16"], []),
    "sd3": (tiny.save_sd3, ["--height", "16", "--width", "16"], ["--guidance", "3"]),
    "pixart": (tiny.save_pixart, ["--height", "16", "--width", "16"], []),
    "wan": (tiny.save_wan, ["--height", "32", "--width", "32"], ["--frames", "5"]),
}


def _rows(out):
    return {r["method"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}


@pytest.mark.parametrize("family", list(CASES))
def test_bench_runs_on_a_saved_pipeline_of_each_family(tmp_path, capsys, family):
    save, size, extra = CASES[family]
    model, out = save(tmp_path / family), tmp_path / "bench"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\na blue dog on a hill\n")
    use_file = family in ("flux", "wan")
    argv = ["bench", "--model", str(model), "--samples", "2", "--batch-size", "2", "--steps", "4", "--budgets", "14",
            "--only", "RFC NFC=2 m=2", "--out", str(out), *size, *extra]
    if use_file:
        argv += ["--prompts", str(prompts)]
    if family != "pixart":
        argv += ["--no-flops"]  # one family counts FLOPs too (the counting pass doubles the time)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = _rows(out)
    # 4 steps, budget 14 = interval 4: full at steps 0, 1 (warm-up) -> RFC aims at NFC 2
    full, rfc = rows["full computation"], rows["RFC NFC=2 m=2"]
    assert full["nfc"] == 4 and full["rel_l1"] == 0.0 and rfc["nfc"] == 2
    assert 0 < rfc["rel_l1"] < 1 and rfc["psnr"] < 100 and 0 < rfc["ssim"] <= 1
    assert rfc["time_s"] > 0 and full["speedup"] == 1.0
    if family == "pixart":
        assert full["flops_ratio"] == 1.0 and 0 < rfc["flops_ratio"] < 1
    settings = json.loads((out / "bench.json").read_text())["run"]["settings"]
    assert settings["family"] == family and settings["model"] == str(model.resolve())
    assert settings["prompts"]["count"] == (2 if use_file else len(DEFAULT_PROMPTS))
    for name in ("bench.md", "bench.csv", "pareto.png", "samples.png", "results.jsonl"):
        assert (out / name).stat().st_size > 0
    if family == "wan":  # video: (batch, frames, channels, height, width), quality frame by frame
        per = json.loads((out / "bench.json").read_text())["per_frame"]
        frames = len(per["RFC NFC=2 m=2"]["psnr"])
        assert frames == 5 and per["full computation"]["rel_l1"] == [0.0] * frames
        assert "per frame:" in printed and "## Per frame" in (out / "bench.md").read_text()


@pytest.fixture
def flux_dir(tmp_path):
    return tiny.save_flux(tmp_path / "flux")


@pytest.fixture
def no_load(monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before a bad option was refused")

    monkeypatch.setattr(pipelines, "load_sampler", started)


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_bad_input_is_refused_before_loading(tmp_path, capsys, no_load, flux_dir):
    (tmp_path / "wan").mkdir()
    (tmp_path / "wan" / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}))
    (tmp_path / "wan22").mkdir()  # two experts: the CLI would cache the first only (found by review)
    (tmp_path / "wan22" / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
         "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    (tmp_path / "empty.txt").write_text("\n  \n")
    out = ["--out", str(tmp_path / "out")]
    cases = [
        (["--model", str(tmp_path / "unet")], "holds a StableDiffusionPipeline with no transformer; supported "
         "families: dit, pixart, sd3, flux, wan, cogvideox, hunyuan_video, latte"),
        (["--model", str(tmp_path / "wan22")], "holds a WanPipeline with two transformers (transformer and "
         "transformer_2, experts as in Wan 2.2): the command caches the bare transformer"),
        (["--model", str(flux_dir), "--prompts", str(tmp_path / "none.txt")],
         "argument --prompts: must be a text file with one prompt a line; "),
        (["--model", str(flux_dir), "--prompts", str(tmp_path / "empty.txt")], "holds no prompt (one a line)"),
        (["--model", str(flux_dir), "--frames", "5"], "argument --frames: flux makes images; --frames is for video"),
        (["--model", str(tmp_path / "wan"), "--frames", "4"],
         "argument --frames: wan needs a frame count that is 1 + a multiple of 4 (1, 5, 9, ...), got 4"),
        (["--model", str(tmp_path / "wan"), "--frames", "0"], "got 0"),
        (["--model", str(flux_dir), "--labels", "3"], "--labels is for class-conditional models; flux takes --prompts"),
        (["--prompts", str(tmp_path / "empty.txt")], "holds no prompt"),
        (["--labels", "3", "10"], "argument --labels: must be classes in 0..9, got 10"),
        (["--height", "32"], "--height is for --model pipelines; the reference model makes 16x16 digits"),
        (["--model", str(flux_dir), "--height", "20"], "argument --height: must be a positive multiple of 8"),
        (["--model", str(flux_dir), "--peers"], "--peers runs on the reference model and DiT pipelines, not on flux"),
    ]
    for argv, message in cases:
        line = _error(capsys, ["bench", *argv, *out])
        assert message in line, (argv, line)
    assert not (tmp_path / "out").exists()


def test_prompts_are_refused_for_class_conditional_models(tmp_path, capsys, no_load):
    (tmp_path / "p.txt").write_text("a cat\n")
    line = _error(capsys, ["bench", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out")])
    assert line.endswith("--prompts is for text-conditioned models; the reference model takes --labels")


def test_the_builtin_prompts_are_varied():
    assert len(DEFAULT_PROMPTS) >= 24 and len(set(DEFAULT_PROMPTS)) == len(DEFAULT_PROMPTS)
