"""`lamina-net bench exchange`: the decode exchange's shapes come from the planner, and short runs
produce checked records over lamina-net and the torch.distributed baseline. Speed is measured by the
benchmark, not asserted here."""
import json
import os
import subprocess
import sys

import pytest

from lamina_net.bench_exchange import exchange_shape
from lamina_net.errors import UsageError
from lamina_net.plan import load_model


def test_llama3_70b_shards_match_the_planner():
    shape = exchange_shape("llama3-70b", batch=300, attention_ranks=2)
    # 64 query heads and 8 key/value heads of 128 bf16 elements, split over 2 ranks, 300 tokens.
    assert shape.q_bytes == shape.out_bytes == 300 * 32 * 128 * 2
    assert shape.kv_bytes == 300 * 4 * 128 * 2
    assert shape.layers == 80
    # The planner's bytes per token per layer (36 KiB for LLaMA3-70B) times the batch, all ranks, both ways.
    assert load_model("llama3-70b").network_bytes_per_token_per_layer == 36 * 1024
    assert shape.layer_bytes == 36 * 1024 * 300
    assert exchange_shape("llama-65b", batch=1, attention_ranks=4, layers=3).layer_bytes == 64 * 1024


@pytest.mark.parametrize("kwargs, match", [
    ({"attention_ranks": 3}, "cannot be split evenly"),
    ({"attention_ranks": 0}, "attention_ranks must be a positive integer"),
    ({"batch": -1}, "batch must be"),
    ({"layers": 81}, r"layers must be in \[1, 80\]"),
    ({"model": "gpt-17"}, "unknown model"),
])
def test_bad_shapes_are_usage_errors(kwargs, match):
    with pytest.raises(UsageError, match=match):
        exchange_shape(**{"model": "llama3-70b", "batch": 300, "attention_ranks": 2, **kwargs})


def _exchange(*argv, env=None, timeout=400):
    return subprocess.run([sys.executable, "-m", "lamina_net", "bench", "exchange", *argv], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_exchange_over_shm_and_tcp_against_gloo(tmp_path):
    pytest.importorskip("torch")
    path = tmp_path / "ex.json"
    proc = _exchange("--batch", "2", "--layers", "3", "--steps", "2", "--warmup", "1", "--transport", "shm,tcp",
                     "--json", str(path), "--timeout", "30")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(path.read_text())
    assert [(r["system"], r["transport"]) for r in records] == [
        ("lamina-net", "shm"), ("lamina-net", "tcp"), ("torch-gloo", "gloo")]
    gloo = records[-1]
    for r in records:
        assert r["metric"] == "latency" and r["model"] == "llama3-70b" and r["batch"] == 2
        assert r["size_bytes"] == 36 * 1024 * 2 and r["layers"] == 3 and r["attention_ranks"] == 2
        assert r["per_layer_us"]["n"] == 3 * 2 and r["per_step_us"]["n"] == 2
        assert 0 < r["per_layer_us"]["p50"] <= r["per_layer_us"]["p99"]
        # A step is three layers end to end.
        assert r["per_step_us"]["p50"] >= 3 * r["per_layer_us"]["min"]
    for r in records[:2]:
        assert r["ratio_vs_gloo"] == pytest.approx(r["per_layer_us"]["p50"] / gloo["per_layer_us"]["p50"])
        assert r["ratio_vs_gloo_per_step"] == pytest.approx(r["per_step_us"]["p50"] / gloo["per_step_us"]["p50"])
    assert "ratio_vs_gloo" not in gloo
    assert "speedup" in proc.stdout and "torch-gloo" in proc.stdout


def test_a_baseline_that_cannot_run_says_why_and_the_rest_goes_on(tmp_path):
    # A torch that fails to import stands in for a machine without torch.
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('no torch here')\n")
    env = dict(os.environ, PYTHONPATH=f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    path = tmp_path / "ex.json"
    proc = _exchange("--batch", "1", "--layers", "2", "--steps", "1", "--warmup", "0", "--transport", "shm",
                     "--json", str(path), "--timeout", "30", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reason = [ln for ln in proc.stderr.splitlines() if "baseline" in ln]
    assert reason == ["bench exchange: torch baseline skipped: torch is not installed (pip install torch)"]
    (record,) = json.loads(path.read_text())
    assert record["system"] == "lamina-net" and not any(k.startswith("ratio_vs_") for k in record)


def test_bad_arguments_fail_cleanly():
    proc = _exchange("--attention-ranks", "3", "--baseline", "none", timeout=60)
    assert proc.returncode != 0 and "cannot be split evenly" in proc.stderr and "Traceback" not in proc.stderr
    proc = _exchange("--transport", "ib", "--baseline", "none", timeout=60)
    assert proc.returncode != 0 and "unknown transport" in proc.stderr
