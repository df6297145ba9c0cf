"""scripts/bench_data.py runs (quick mode, on the real STS dev file) and reports a cold and a cached
load measured in separate processes, the second reading the first's datasets cache."""
import re
import subprocess
import sys

from conftest import REPO


def test_bench_data_quick_measures_cold_and_cached(data_root):
    r = subprocess.run([sys.executable, "scripts/bench_data.py", "--quick", "--data-root",
                        str(data_root)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, 1), r.stderr  # 1: slower than the target, still a measurement
    line = re.search(r"cold ([\d.]+) s, cached ([\d.]+) s: cached/cold ([\d.]+)x", r.stdout)
    assert line, r.stdout
    cold, cached, ratio = map(float, line.groups())
    assert "863 rows of sts dev" in r.stdout and cached < cold
    assert abs(ratio - cached / cold) < 0.06  # from unrounded times
