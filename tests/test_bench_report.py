"""lamina_net.bench_report: compare, tables, plots and the progress bar of the bench commands.

Pure Python on made-up records (no transport needed), plus the CLI on saved files.
"""
import json
import subprocess
import sys

import pytest

from lamina_net import bench_report
from lamina_net.errors import UsageError


def _lat(transport, size, p50, p99=None, **extra):
    return {"transport": transport, "op": "put" if transport in ("shm", "tcp") else "send", "size_bytes": size,
            "iterations": 100, "p50_us": p50, "p99_us": p99 if p99 is not None else 2 * p50, "path": "host", **extra}


RUN_A = [_lat("shm", 8, 0.20), _lat("shm", 4096, 0.40), _lat("tcp", 8, 3.0), _lat("gloo", 8, 70.0)]


def test_records_are_matched_on_system_transport_op_size_path():
    b = [_lat("shm", 8, 0.30), _lat("shm", 4096, 0.40), _lat("tcp", 8, 3.0, path="device"), _lat("gloo", 8, 35.0)]
    result = bench_report.compare_records(RUN_A, b)
    by = {(row["key"][1], row["key"][3], row["metric"]): row for row in result["rows"]}
    assert by[("shm", 8, "p50_us")]["ratio"] == pytest.approx(1.5)
    assert by[("shm", 8, "p50_us")]["verdict"] == "worse"
    assert by[("shm", 4096, "p50_us")]["verdict"] == ""
    assert by[("gloo", 8, "p50_us")]["verdict"] == "better"
    # The device tcp row is another measurement than the host one: not compared, listed on both sides.
    assert ("tcp", 8, "p50_us") not in by
    assert [k[1:] for k in result["only_a"]] == [("tcp", "put", 8, "host")]
    assert [k[1:] for k in result["only_b"]] == [("tcp", "put", 8, "device")]
    assert {(r["key"][1], r["metric"]) for r in result["regressions"]} == {("shm", "p50_us"), ("shm", "p99_us")}


def test_a_rate_that_drops_is_the_regression_not_one_that_rises():
    a = [{"transport": "shm", "op": "put", "size_bytes": 1 << 20, "gb_per_s": 10.0},
         {"transport": "tcp", "op": "put", "size_bytes": 1 << 20, "gb_per_s": 2.0}]
    b = [{"transport": "shm", "op": "put", "size_bytes": 1 << 20, "gb_per_s": 5.0},
         {"transport": "tcp", "op": "put", "size_bytes": 1 << 20, "gb_per_s": 4.0}]
    result = bench_report.compare_records(a, b, threshold=0.2)
    verdicts = {row["key"][1]: row["verdict"] for row in result["rows"]}
    assert verdicts == {"shm": "worse", "tcp": "better"}


def test_bench_bandwidth_records_compare_and_tabulate_as_rates():
    # bench bandwidth writes GB/s as "gbps": a drop is the regression, and the table shows it.
    a = [{"system": "lamina-net", "transport": "shm", "op": "put", "size_bytes": 1 << 20, "gbps": 30.0}]
    b = [{"system": "lamina-net", "transport": "shm", "op": "put", "size_bytes": 1 << 20, "gbps": 20.0}]
    result = bench_report.compare_records(a, b, threshold=0.2)
    assert [(row["metric"], row["verdict"]) for row in result["rows"]] == [("gbps", "worse")]
    header = bench_report.format_table(b, markdown=True).splitlines()[0]
    assert "GB/s" in header and "20.00" in bench_report.format_table(b, markdown=True)


def test_nested_exchange_metrics_are_compared():
    a = [{"system": "lamina-net", "transport": "shm", "op": "exchange", "size_bytes": 36864,
          "per_layer_us": {"p50": 10.0, "p99": 20.0}, "per_step_us": {"p50": 800.0, "p99": 900.0}}]
    b = [dict(a[0], per_layer_us={"p50": 30.0, "p99": 20.0})]
    rows = {row["metric"]: row for row in bench_report.compare_records(a, b)["rows"]}
    assert rows["per_layer_us.p50"]["ratio"] == pytest.approx(3.0)
    assert rows["per_layer_us.p99"]["ratio"] == pytest.approx(1.0)
    assert rows["per_step_us.p50"]["ratio"] == pytest.approx(1.0)


def test_bad_files_and_threshold_are_typed_errors(tmp_path):
    with pytest.raises(UsageError, match="cannot read"):
        bench_report.load_records(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsageError, match="not a JSON file"):
        bench_report.load_records(str(tmp_path / "bad.json"))
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(UsageError, match="list of benchmark records"):
        bench_report.load_records(str(tmp_path / "obj.json"))
    with pytest.raises(UsageError, match="threshold"):
        bench_report.compare_records(RUN_A, RUN_A, threshold=-1)


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "lamina_net", "bench", *argv], capture_output=True, text=True,
                          timeout=60)


def test_compare_cli_prints_ratios_and_can_fail_on_a_regression(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(RUN_A))
    b.write_text(json.dumps([_lat("shm", 8, 0.50)] + RUN_A[1:]))
    proc = _cli("compare", str(a), str(b))
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if " p50_us " in ln and " 8 " in ln and "shm" in ln)
    assert "2.500" in line and "worse" in line
    assert "2 regressions" in proc.stdout  # p50 and p99 of shm 8 B
    assert _cli("compare", str(a), str(b), "--fail-on-regression").returncode == 1
    assert _cli("compare", str(a), str(a), "--fail-on-regression").returncode == 0
    bad = _cli("compare", str(a), str(tmp_path / "nope.json"))
    assert bad.returncode != 0 and "cannot read" in bad.stderr


def test_table_markdown_has_a_row_per_record_and_the_ratios(tmp_path):
    records = [_lat("tcp", 8, 3.0, ratio_vs_gloo=0.04), _lat("gloo", 8, 75.0)]
    text = bench_report.format_table(records, markdown=True)
    lines = text.splitlines()
    assert lines[0].startswith("| system | transport | op | size | path | p50 us | p99 us") and "vs gloo" in lines[0]
    assert len(lines) == 4
    assert lines[2].split("|")[1:4] == [" lamina-net ", " tcp ", " put "] and "0.040" in lines[2]
    assert lines[3].split("|")[1].strip() == "torch-gloo"


def test_plot_writes_a_png_with_one_line_per_system(tmp_path):
    pytest.importorskip("matplotlib")
    records = [_lat("shm", s, 0.1 * s ** 0.5) for s in (8, 64, 4096)] + [_lat("gloo", s, 70.0) for s in (8, 64)]
    records.append({"transport": "shm", "op": "put", "size_bytes": 1 << 20, "gb_per_s": 9.5, "path": "host"})
    path = tmp_path / "lat.png"
    bench_report.plot_records(records, str(path), "latency", hardware="test cpu", date="2026-12-01")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UsageError, match="nothing|no record"):
        bench_report.plot_records([{"transport": "shm"}], str(tmp_path / "empty.png"), "latency")


def test_series_are_one_per_system_transport_op_path():
    labels = {bench_report._series_label(r) for r in
              [_lat("shm", 8, 1.0), _lat("shm", 64, 1.0), _lat("gloo", 8, 1.0), _lat("shm", 8, 1.0, path="device")]}
    assert labels == {"lamina-net shm put", "torch-gloo", "lamina-net shm put (device)"}


def test_progress_is_off_when_stdout_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert isinstance(bench_report.progress(100, "x"), bench_report._NoBar)
    tqdm = pytest.importorskip("tqdm")
    bar = bench_report.progress(3, "x", enabled=True)
    assert isinstance(bar, tqdm.tqdm)
    with bar:
        bar.update()
        assert bar.n == 1


def test_latency_plot_and_json_from_the_cli(tmp_path):
    pytest.importorskip("matplotlib")
    png, js = tmp_path / "lat.png", tmp_path / "lat.json"
    proc = subprocess.run([sys.executable, "-m", "lamina_net", "bench", "latency", "--sizes", "8,64", "--iterations",
                           "20", "--warmup", "2", "--transport", "shm", "--no-reference", "--baseline", "none",
                           "--json", str(js), "--plot", str(png)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["size_bytes"] for r in json.loads(js.read_text())] == [8, 64]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Not a terminal: no progress bar in the output.
    assert "bench latency:" not in proc.stderr and "it/s" not in proc.stderr
