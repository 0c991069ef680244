"""`lamina-net bench bandwidth` works: short runs over tcp and shm whose records have the fields, whose bytes
arrived intact (checked by the C++ receiver), with baselines beside them; bad arguments give a clear error.
Speed is what the benchmark prints as ratios, never asserted here."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lamina_net import _core, bench_bandwidth
from lamina_net.errors import UsageError


def _bench(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lamina_net", "bench", "bandwidth", *argv], capture_output=True,
                          text=True, timeout=timeout)


def test_tcp_and_shm_end_to_end_with_references(tmp_path):
    path = tmp_path / "bw.json"
    # 3 B: shorter than the stamp word; 4099 B: not a multiple of 8; 40000 B: above shm's 32 KiB ring copy.
    sizes = [3, 4099, 40000]
    proc = _bench("--transport", "tcp,shm", "--sizes", ",".join(map(str, sizes)), "--window", "4",
                  "--iterations", "30", "--warmup", "5", "--baseline", "memcpy,tcp-stream", "--repeat", "1",
                  "--json", str(path), "--plot", str(tmp_path / "bw.png"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "bw.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = json.loads(path.read_text())
    ours = [r for r in records if r["system"] == "lamina-net"]
    assert sorted((r["transport"], r["size_bytes"]) for r in ours) == sorted(
        (t, s) for t in ("tcp", "shm") for s in sizes)
    for r in ours:
        assert r["metric"] == "bandwidth" and r["op"] == "put" and r["window"] == 4
        assert r["iterations"] == 32  # 30 puts rounded up to whole windows of 4
        assert r["verified"] is True and r["first_bad_offset"] == -1
        assert r["signals_seen"] == 8 + 2  # measured windows + warm-up windows (5 puts -> 2 windows)
        assert r["gbps"] > 0 and r["repeat"] == 1 and r["gbps_runs"] == [r["gbps"]]
        assert r["gbps"] == pytest.approx(r["size_bytes"] * r["iterations"] / r["seconds_runs"][0] / 1e9)
        reference = "memcpy" if r["transport"] == "shm" else "tcp_stream"
        assert r[f"ratio_vs_{reference}"] == pytest.approx(r["gbps"] / r[f"{reference}_gbps"])
        other = "tcp_stream" if r["transport"] == "shm" else "memcpy"
        assert f"ratio_vs_{other}" not in r  # a reference is compared with its own transport only
    refs = {(r["system"], r["size_bytes"]): r for r in records if r["system"] != "lamina-net"}
    assert set(refs) == {(n, s) for n in ("memcpy", "tcp-stream") for s in sizes}
    assert all(r["metric"] == "bandwidth" and r["gbps"] > 0 and r["iterations"] == 32 for r in refs.values())
    assert "vs memcpy" in proc.stdout and "vs C tcp" in proc.stdout


def test_torch_baseline_gloo(tmp_path):
    pytest.importorskip("torch", reason="the gloo baseline needs torch")
    path = tmp_path / "bw.json"
    proc = _bench("--transport", "tcp", "--sizes", "4096", "--window", "8", "--iterations", "64", "--warmup", "8",
                  "--baseline", "gloo", "--repeat", "1", "--json", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = json.loads(path.read_text())
    gloo = [r for r in records if r["system"] == "gloo"]
    ours = [r for r in records if r["system"] == "lamina-net"]
    assert len(gloo) == 1 and gloo[0]["gbps"] > 0 and gloo[0]["window"] == 8 and gloo[0]["iterations"] == 64
    assert ours[0]["ratio_vs_gloo"] == pytest.approx(ours[0]["gbps"] / gloo[0]["gbps"])


def test_repeated_rounds_report_medians(tmp_path):
    path = tmp_path / "bw.json"
    proc = _bench("--transport", "shm", "--sizes", "65536", "--window", "4", "--iterations", "16", "--warmup", "4",
                  "--baseline", "memcpy", "--repeat", "3", "--json", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ours, memcpy = sorted(json.loads(path.read_text()), key=lambda r: r["system"])
    assert ours["system"] == "lamina-net" and memcpy["system"] == "memcpy"
    for r in (ours, memcpy):
        assert r["repeat"] == 3 and len(r["gbps_runs"]) == 3
        assert r["gbps"] == sorted(r["gbps_runs"])[1]
    assert len(ours["seconds_runs"]) == 3 and ours["verified"] is True
    assert ours["memcpy_gbps"] == memcpy["gbps"]
    # The ratio is the median of the rounds' own ratios, so it lies within theirs.
    assert min(g / m for g, m in zip(ours["gbps_runs"], memcpy["gbps_runs"])) <= ours["ratio_vs_memcpy"]
    assert ours["ratio_vs_memcpy"] <= max(g / m for g, m in zip(ours["gbps_runs"], memcpy["gbps_runs"]))


def test_a_baseline_that_cannot_run_says_why_and_the_rest_goes_on(tmp_path):
    proc = _bench("--transport", "shm", "--sizes", "64", "--window", "2", "--iterations", "8", "--warmup", "0",
                  "--baseline", "memcpy,ib_write_bw", "--repeat", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "baseline ib_write_bw: not run, it is the reference of verbs, which is not measured" in proc.stdout
    assert "vs memcpy" in proc.stdout


def test_the_receivers_check_catches_wrong_bytes():
    for size in (1, 7, 8, 9, 4099, 65536):
        data = bytearray(_core.bandwidth_pattern(size, 5))
        assert _core.check_bandwidth_pattern(data, 5) == -1
        assert _core.check_bandwidth_pattern(data, 6) == max(0, size - 8)  # another window's stamp
        data[size // 2] ^= 0x01
        assert _core.check_bandwidth_pattern(data, 5) == size // 2
    # A copy shifted by one word (the words are mixed, so no shift matches by chance).
    data = _core.bandwidth_pattern(4096, 1)
    assert _core.check_bandwidth_pattern(data[8:] + data[:8], 1) == 0
    # The pattern depends on the size, so leftovers of another size do not pass.
    assert _core.check_bandwidth_pattern(_core.bandwidth_pattern(64, 1)[:32], 1) != -1


@pytest.mark.parametrize("argv, message", [
    (["--window", "0"], "--window"),
    (["--sizes", "8,abc"], "--sizes"),
    (["--sizes", "0"], "sizes must be in"),
    (["--transport", "carrier-pigeon"], "unknown transport"),
    (["--baseline", "mpi"], "unknown baseline"),
    (["--baseline", "none,gloo"], "excludes"),
    (["--iterations", "-1"], "--iterations"),
    (["--timeout", "0"], "--timeout"),
    (["--repeat", "0"], "--repeat"),
    (["--rank", "0"], "--store"),
])
def test_bad_arguments_give_a_clear_error(argv, message):
    bad = _bench(*argv, timeout=60)
    assert bad.returncode != 0
    assert "lamina-net bench bandwidth:" in bad.stderr and message in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


def test_option_parsers_raise_usage_errors():
    with pytest.raises(UsageError, match="unknown transport"):
        bench_bandwidth.parse_transports("tcp,udp")
    with pytest.raises(UsageError, match="unknown baseline"):
        bench_bandwidth.parse_baselines("memcpy,nope", ["shm"], cross_host=False)
    run, skipped = bench_bandwidth.parse_baselines("tcp-stream", ["tcp"], cross_host=True)
    assert run == [] and skipped == ["baseline tcp-stream: not run, it runs on this host only, and this is a "
                                     "cross-host run (--rank)"]
    assert bench_bandwidth.windows_for(4096, 64, 100) == 2  # rounded up to whole windows
