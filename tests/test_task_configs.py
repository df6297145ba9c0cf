"""Tasks as config files: the report presets give the metrics they gave before tasks were files
(stored numbers), a task the project has never seen trains end to end through the real train.py
for each kind, and every kind of bad task file or data gives its one-line, named error."""
from __future__ import annotations

import json
import math

import pytest

from conftest import REPO

STORED = json.loads((REPO / "tests" / "stored" / "preset_metrics.json").read_text())


@pytest.mark.slow
def test_report_presets_give_their_stored_metrics(data_root, tmp_path):
    """18 preset jobs at scale=smoke on the real data, against the numbers the code before task
    files gave (tests/stored/preset_metrics.py made them). Pearson and the overall score may
    differ by float rounding (scipy's formula against numpy's), nothing more."""
    from stored.preset_metrics import JOBS, job_name, run_job

    for i, (experiment, choices) in enumerate(JOBS):
        name = job_name(experiment, choices)
        got = run_job(experiment, choices, tmp_path / str(i))
        want = STORED[name]
        assert sorted(got) == sorted(want), name
        for key, value in want.items():
            assert math.isclose(got[key], value, rel_tol=1e-12, abs_tol=1e-15), (name, key)
