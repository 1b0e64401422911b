"""``benchmarks/speed.py``'s round-by-round comparison (the speed issue's 3 % margin, docs/performance.md): each
row's time over TaylorSeer's in the same round, against the TaylorSeer row of the same batch modulation, saved under
a key that names that row."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import speed  # noqa: E402


def _row(method: str, times: list[float]) -> dict[str, object]:
    return {"method": method, "budget": 14, "nfc": 14, "times_s": times}


def test_each_row_is_paired_round_by_round_with_taylorseer_of_the_same_modulation():
    ts, rfc = _row("TaylorSeer m=2", [10.0, 12.0, 11.0]), _row("RFC m=2", [10.5, 11.4, 11.0])
    ts_bm = _row("TaylorSeer m=2 + batch modulation", [8.0, 8.0, 10.0])
    rfc_bm = _row("RFC m=2 + batch modulation", [8.4, 8.8, 9.0])
    lines = speed.paired_lines([ts, rfc, ts_bm, rfc_bm])
    # per round: 10.5/10 = 1.05, 11.4/12 = 0.95, 11/11 = 1; with batch modulation 1.05, 1.1, 0.9
    assert rfc["over_TaylorSeer m=2_per_round"] == [11.4 / 12, 1.0, 10.5 / 10]
    assert rfc_bm["over_TaylorSeer m=2 + batch modulation_per_round"] == [9.0 / 10, 8.4 / 8, 8.8 / 8]
    assert "over_TaylorSeer m=2_per_round" not in rfc_bm and not any(k.startswith("over") for k in ts)
    assert lines == [
        "RFC m=2 over TaylorSeer m=2, NFC 14, per round: median +0.0 %, range -5.0 % to +5.0 % (3 rounds)",
        "RFC m=2 + batch modulation over TaylorSeer m=2 + batch modulation, NFC 14, per round: median +5.0 %, "
        "range -10.0 % to +10.0 % (3 rounds)",
    ]
