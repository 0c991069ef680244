"""`lamina-net bench latency --path` and `lamina-net bench rate` work: short runs whose records have
the right fields and positive numbers. Their speed is measured by the benchmark, not asserted here."""
import json
import subprocess
import sys

import pytest


def _bench(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lamina_net", "bench", *argv], capture_output=True, text=True,
                          timeout=timeout)


def test_latency_host_and_device_paths_side_by_side(tmp_path):
    path = tmp_path / "lat.json"
    proc = _bench("latency", "--path", "host,device", "--sizes", "8", "--iterations", "50", "--warmup", "5",
                  "--transport", "shm", "--no-reference", "--baseline", "none", "--json", str(path))
    assert proc.returncode == 0, proc.stderr
    records = json.loads(path.read_text())
    assert [(r["transport"], r["size_bytes"], r["path"]) for r in records] == [("shm", 8, "host"), ("shm", 8, "device")]
    host, device = records
    for r in records:
        assert {"transport", "op", "size_bytes", "iterations", "p50_us", "p99_us", "path"} <= set(r)
        assert r["op"] == "put" and r["iterations"] == 50 and 0 < r["p50_us"] <= r["p99_us"]
    assert "device_path" not in host
    assert device["device_path"] == "proxy"
    assert device["host_p50_us"] == host["p50_us"]
    assert device["ratio_vs_host"] == pytest.approx(device["p50_us"] / host["p50_us"])
    # The table shows the path and the device/host ratio.
    assert "dev/host" in proc.stdout and "device" in proc.stdout


def test_latency_device_path_over_tcp(tmp_path):
    path = tmp_path / "lat.json"
    proc = _bench("latency", "--path", "device", "--sizes", "8,4096", "--iterations", "30", "--warmup", "5",
                  "--transport", "tcp", "--no-reference", "--baseline", "none", "--json", str(path))
    assert proc.returncode == 0, proc.stderr
    records = json.loads(path.read_text())
    assert [(r["transport"], r["size_bytes"], r["path"]) for r in records] == [("tcp", 8, "device"),
                                                                               ("tcp", 4096, "device")]
    for r in records:
        assert r["device_path"] == "proxy" and 0 < r["p50_us"] <= r["p99_us"]
        assert "ratio_vs_host" not in r  # no host row in this run to compare with


def test_latency_default_path_is_host_and_the_table_is_unchanged(tmp_path):
    path = tmp_path / "lat.json"
    proc = _bench("latency", "--sizes", "8", "--iterations", "20", "--warmup", "2", "--transport", "shm",
                  "--no-reference", "--baseline", "none", "--json", str(path))
    assert proc.returncode == 0, proc.stderr
    (record,) = json.loads(path.read_text())
    assert record["path"] == "host" and "device_path" not in record
    header = proc.stdout.splitlines()[0].split()
    assert header[:3] == ["transport", "op", "size"] and "dev/host" not in header


def test_latency_path_is_checked():
    bad = _bench("latency", "--path", "gpu", "--sizes", "8", timeout=60)
    assert bad.returncode != 0 and "--path" in bad.stderr
    bad = _bench("latency", "--path", "device", "--op", "send", "--sizes", "8", timeout=60)
    assert bad.returncode != 0 and "--op put" in bad.stderr


def test_rate_records_per_producer_count_with_the_host_reference(tmp_path):
    path = tmp_path / "rate.json"
    proc = _bench("rate", "--producers", "1,2", "--size", "8", "--ops", "2000", "--repeat", "2", "--json", str(path))
    assert proc.returncode == 0, proc.stderr
    records = json.loads(path.read_text())
    assert [(r["transport"], r["path"], r["producers"]) for r in records] == [
        ("shm", "host", 1), ("shm", "device", 1), ("shm", "device", 2)]
    host = records[0]
    for r in records:
        assert r["bench"] == "rate" and r["size_bytes"] == 8 and r["ops"] == 2000 and r["repeat"] == 2
        assert r["ops_per_s"] > 0 and len(r["ops_per_s_runs"]) == 2 and all(x > 0 for x in r["ops_per_s_runs"])
    for r in records[1:]:
        assert r["device_path"] == "proxy"
        assert r["host_ops_per_s"] == host["ops_per_s"]
        assert r["ratio_vs_host"] == pytest.approx(r["ops_per_s"] / host["ops_per_s"])
    assert "Mops/s" in proc.stdout


def test_rate_over_tcp_and_bad_arguments(tmp_path):
    path = tmp_path / "rate.json"
    proc = _bench("rate", "--transport", "tcp", "--producers", "3", "--size", "64", "--ops", "1000", "--repeat", "1",
                  "--json", str(path))
    assert proc.returncode == 0, proc.stderr
    records = json.loads(path.read_text())
    assert [(r["transport"], r["path"], r["producers"], r["size_bytes"]) for r in records] == [
        ("tcp", "host", 1, 64), ("tcp", "device", 3, 64)]
    assert all(r["ops_per_s"] > 0 for r in records)
    for argv in (["--producers", "0"], ["--producers", "a"], ["--ops", "0"], ["--ring-slots", "3"],
                 ["--transport", "ib"]):
        bad = _bench("rate", *argv, timeout=60)
        assert bad.returncode != 0 and "lamina-net bench" in bad.stderr, argv
