"""The pytest-benchmark suite in bench/ runs (short mode: each benchmark body once, untimed).

It checks that the suite works, not its times: --benchmark-disable runs every
body once, and the suite's own asserts check what each call did.
"""
import re
import subprocess
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parent.parent / "bench" / "test_api_overheads.py"


def test_api_overheads_suite_runs_in_short_mode():
    proc = subprocess.run([sys.executable, "-m", "pytest", str(SUITE), "-q", "-p", "no:cacheprovider",
                           "--benchmark-disable", "-o", "addopts="],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    # register, put x2, put+signal+wait x2, put_many+signal+wait, iput+wait, send/recv x2 over shm and tcp;
    # nothing skipped.
    assert passed and int(passed.group(1)) == 18, proc.stdout[-2000:]
    assert "skipped" not in proc.stdout and "failed" not in proc.stdout
