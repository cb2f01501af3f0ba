"""The loop on a user's file whose class mix turns over (a prior shift), end to end.

Beside `tests/test_own_data.py`'s concept change (labels flip): here each class's inputs keep their
distribution and only the share of each class moves, so the old champion is still "right given x"
but its boundary is in the wrong place for the new mix. In a file of its own so that, under
pytest-xdist's `--dist loadfile`, it runs beside the concept-change loop, not after it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_own_data import init_and_run, mixing_csv


@pytest.mark.integration
@pytest.mark.heavy
@pytest.mark.timeout(1800)
def test_run_from_a_file_whose_class_mix_turns_over_retrains_by_offsets_and_recovers(tmp_path: Path) -> None:
    """ "fail" goes from 15 % to 75 % of the rows at row 4000 of 6000, P(x|fail) and P(x|ok) unchanged,
    with overlapping classes (best accuracy about 0.90 before and 0.85 after; the old boundary gets
    about 0.66 after). The monitor sees it (data, prediction or performance drift), the retrain
    learns from the records since then, chosen by offset, the gate promotes on the same recent data,
    and the new champion answers better than the old one did after the change."""
    source = mixing_csv(tmp_path / "line-3 grades.csv", rows=6000, change_at=4000)
    _, _, result, report = init_and_run(tmp_path, source, "grades", change_at=4000)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "=== driftloop run: promoted" in result.stdout
    assert 4000 < report["drift_detected_at_record"] < 6000, report["timeline"]
    assert report["failed_requests"] == 0
    assert report["accuracy_before_drift"] > 0.85
    assert report["accuracy_after_drift_before_retrain"] < report["accuracy_before_drift"] - 0.1
    assert report["accuracy_after_promotion"] > report["accuracy_after_drift_before_retrain"] + 0.08
    retrains = [g for g in report["gate"] if g["version"] != "1"]
    assert retrains and retrains[-1]["promoted"], report["gate"]
    data = report["jobs"][-1]["summary"]["data"]
    assert data["selected_by"] == "offsets" and data["from_offsets"], data
