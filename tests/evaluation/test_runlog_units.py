"""``runlog`` by hand, without a bench run: the log names, the batch checks of a result line for a run whose last batch
is short, the run record a rank new to a resumed run gets, and ``load_results``' batch filter."""

import math

import pytest
import torch

from relcache.evaluation import runlog

HEADER = {"kind": "run", "settings": {"num_samples": 5, "batch_size": 2}, "versions": {}, "date": "2026-01-01",
          "command": "relcache bench"}


def _result(batch, rows):
    return {"method": "m", "budget": None, "batch": batch, "seconds": 1.0, "nfc": 3.0, "flops": None,
            "samples": {"file": "samples/rank0/m00.bin", "offset": 0, "shape": [rows, 1, 2, 2]}}


def test_rank_zero_has_no_numbered_log(tmp_path):
    for name in ("results.jsonl", "results.rank0.jsonl", "results.rank1.jsonl"):
        (tmp_path / name).write_text("{}\n")
    assert [p.name for p in runlog.log_paths(tmp_path)] == ["results.jsonl", "results.rank1.jsonl"]


def test_the_last_batch_of_a_run_may_be_short_and_no_batch_comes_after_it():
    settings = HEADER["settings"]  # 5 samples in batches of 2: batches 0, 1 and 2, the last of 1 sample
    assert runlog._check_result(_result(1, 2), settings) is None
    assert runlog._check_result(_result(2, 1), settings) is None
    assert (runlog._check_result(_result(2, 2), settings)
            == "its samples shape [2, 1, 2, 2] does not hold batch 2's 1 samples")
    assert runlog._check_result(_result(3, 1), settings) == "its batch 3 is past the run's last (2)"
    assert runlog._check_result({**_result(0, 2), "seconds": 0.0}, settings) is None


def _log(tmp_path):
    log = runlog.RunLog(tmp_path, 0, ["m"])
    log.start(HEADER)
    for batch, rows in ((0, 2), (1, 2), (2, 1)):
        log.append("m", None, batch, (torch.full((rows, 1, 2, 2), float(batch)), 0.5, 3.0, math.nan))
    return log


def test_load_results_reads_only_the_batches_asked_for(tmp_path):
    _log(tmp_path)
    got = runlog.load_results(tmp_path, batches={1, 2})
    assert sorted(got) == [("m", 1), ("m", 2)]
    samples, seconds, nfc, flops = got[("m", 2)]
    assert samples.tolist() == [[[[2.0, 2.0], [2.0, 2.0]]]] and seconds == 0.5 and nfc == 3.0 and math.isnan(flops)
    assert sorted(runlog.load_results(tmp_path)) == [("m", 0), ("m", 1), ("m", 2)]


def test_a_rank_new_to_a_resumed_run_starts_its_log_with_the_run_record(tmp_path):
    _log(tmp_path)
    resume = {"kind": "resume", "date": "2026-01-02", "command": "relcache bench --resume"}
    runlog.RunLog(tmp_path, 1, ["m"]).start(resume)
    header = runlog.read_header(tmp_path)
    rank1 = runlog._check_header(tmp_path / "results.rank1.jsonl",
                                 (tmp_path / "results.rank1.jsonl").read_text().splitlines()[0])
    assert rank1 == {**header, "resumed_by": resume}
    runlog.RunLog(tmp_path, 0, ["m"]).start(resume)
    assert runlog.read_resumes(tmp_path) == [{"date": "2026-01-02", "command": "relcache bench --resume"}]
    runlog.check_log(tmp_path)


def test_a_cut_last_line_is_dropped_before_the_next_record(tmp_path):
    log = _log(tmp_path)
    whole = log.path.read_text()
    log.path.write_text(whole + '{"kind": "res')
    log.start({"kind": "resume", "date": "d", "command": "c"})
    assert log.path.read_text() == whole + '{"kind": "resume", "date": "d", "command": "c"}\n'


@pytest.mark.parametrize(("old", "new", "said"), [
    # 51 characters the same, the quote included: all but the last 20 of them cut
    ("x" * 50 + "a", "x" * 50 + "b", "key: ..." + "x" * 20 + 'a" -> ...' + "x" * 20 + 'b"'),
    ("x" * 30 + "a", "x" * 30 + "b", 'key: "' + "x" * 30 + 'a" -> "' + "x" * 30 + 'b"'),  # 31 the same: kept
])
def test_a_long_shared_start_is_cut_from_a_difference(old, new, said):
    assert runlog.differences({"key": old}, {"key": new}) == [said]
