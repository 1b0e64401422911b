"""The command line's argparse types at their bounds (``relcache.cli.options``), the reference model's labels and
what the ``--out`` claim leaves of a directory that was already there."""

import argparse
import os

import pytest

from relcache import ConfigError
from relcache.cli.options import (
    _guidance,
    _index,
    _output_png,
    _pipeline_inputs,
    _positive,
    _size,
    _steps,
    claimed,
)


@pytest.mark.parametrize(("parse", "good", "bad"), [
    (_steps, ["2", "1000"], ["1", "1001"]),
    (_positive, ["1"], ["0"]),
    (_index, ["0"], ["-1"]),
    (_size, ["8", "512"], ["0", "-8", "12"]),
])
def test_integer_types_take_their_bounds_and_refuse_past_them(parse, good, bad):
    assert [parse(v) for v in good] == [int(v) for v in good]
    for value in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=f"got {value}$"):
            parse(value)


def test_guidance_takes_zero_and_refuses_negative_or_non_finite():
    assert _guidance("0") == 0.0 and _guidance("1.5") == 1.5
    for value in ("-0.5", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"finite number >= 0 .*got {value}$"):
            _guidance(value)


def test_a_png_suffix_in_capitals_is_a_png(tmp_path):
    assert _output_png(str(tmp_path / "grid.PNG")) == tmp_path / "grid.PNG"
    with pytest.raises(argparse.ArgumentTypeError, match="the grid is a PNG"):
        _output_png(str(tmp_path / "grid.jpg"))


def _reference_args(labels):
    return argparse.Namespace(model=None, peers=False, height=None, width=None, frames=None, labels=labels,
                              prompts=None)


def test_the_reference_models_labels_are_its_ten_classes():
    family, conditions, extra = _pipeline_inputs(_reference_args(None))
    assert family is None and conditions == list(range(10)) and extra["model"] == "reference"
    assert _pipeline_inputs(_reference_args([0, 9]))[1] == [0, 9]
    with pytest.raises(ConfigError, match=r"must be classes in 0\.\.9, got 10"):
        _pipeline_inputs(_reference_args([3, 10]))


def test_a_directory_that_was_there_stays_when_the_claim_ends(tmp_path):
    pytest.importorskip("fcntl")
    there = tmp_path / "out"
    there.mkdir()
    with claimed(there):
        pass
    assert there.is_dir() and os.listdir(there) == []
