"""Short runs of the fuzz targets (tests/fuzz/fuzz_decoders.py); long runs and
their figures are in the README's reliability section."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("atheris", reason="atheris not installed (scripts/requirements-dev.txt)")

FUZZ = os.path.join(os.path.dirname(__file__), "fuzz", "fuzz_decoders.py")


@pytest.mark.parametrize("target, runs", [("descriptor", 20000), ("store", 20000), ("device", 500)])
def test_fuzz_target_finds_nothing_in_a_short_run(target, runs, tmp_path):
    proc = subprocess.run([sys.executable, FUZZ, target, f"-runs={runs}", "-seed=1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"Done {runs} runs" in proc.stderr, proc.stderr[-2000:]


REGRESSIONS = os.path.join(os.path.dirname(__file__), "fuzz", "regressions")


@pytest.mark.parametrize("name", sorted(os.listdir(REGRESSIONS)))
def test_fuzz_findings_stay_fixed(name, tmp_path):
    """Every input a fuzzer once stopped on (file name: target-what-it-was)."""
    target = name.split("-", 1)[0]
    proc = subprocess.run([sys.executable, FUZZ, target, os.path.join(REGRESSIONS, name)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
