"""Tests for `lamina-net plan` (lamina_net/plan): paper figures, the roofline model, the CLI."""
from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import lamina_net.plan
from lamina_net.plan import (Assumptions, Deployment, PlanError, estimate, load_device_file, load_model,
                             make_plan, model_from_config, preset_devices)
from lamina_net.plan.cli import main as plan_main
from lamina_net.plan.estimate import (attention_time, iteration_time, max_batch, min_network_bandwidth,
                                      model_time, network_bytes_per_iteration)

REPO = Path(__file__).resolve().parents[1]
KIB = 1024
GIB = 2**30

# Llama-3-8B's config.json fields, as a small stand-in for a downloaded Hugging Face model.
LLAMA3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 14336, "vocab_size": 128256, "torch_dtype": "bfloat16",
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def devices():
    return preset_devices()


@pytest.fixture(scope="module")
def h100(devices):
    return devices["h100"]


@pytest.fixture(scope="module")
def h20(devices):
    return devices["h20"]


def run_module(module: str, *argv: str) -> subprocess.CompletedProcess:
    """Run `python -m MODULE ARGV` as a user would, in a fresh interpreter.

    The child finds lamina_net where this process found it (source tree or
    installed), so both runs test the same code.
    """
    package_root = str(Path(lamina_net.plan.__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    # From the package's root: for an installed package, the checkout's source tree would shadow it.
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=package_root, env=env,
                          capture_output=True, text=True, timeout=120)


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return run_module("lamina_net.plan", *argv)


def row(stdout: str, name: str) -> list[str]:
    """The cells of the table row for deployment ``name``."""
    for line in stdout.splitlines():
        if line.split() and line.split()[0] == name:
            return line.split()
    raise AssertionError(f"no row {name!r} in:\n{stdout}")


# --- figures from the paper -------------------------------------------------------------------

def test_network_bytes_per_token_per_layer_match_paper():
    # q 16 KiB + k, v 4 KiB out and 16 KiB back (G = 8); 64 KiB without GQA.
    assert load_model("llama3-70b").network_bytes_per_token_per_layer == 36 * KIB
    assert load_model("llama-65b").network_bytes_per_token_per_layer == 64 * KIB
    for name in ("llama-33b", "llama-65b", "llama3-70b"):
        m = load_model(name)
        assert m.network_bytes_per_token_per_layer == (2 + 2 / m.group_size) * m.dtype_bytes * m.hidden_size


def test_paper_model_shapes():
    m33, m65, m70 = (load_model(n) for n in ("llama-33b", "llama-65b", "llama3-70b"))
    assert (m33.num_layers, m33.hidden_size, m33.group_size) == (60, 6656, 1)
    assert (m65.num_layers, m65.hidden_size, m65.group_size) == (80, 8192, 1)
    assert (m70.num_layers, m70.hidden_size, m70.group_size) == (80, 8192, 8)
    # Parameter counts come out as the models' names say.
    assert m33.parameters == pytest.approx(32.5e9, rel=0.01)
    assert m65.parameters == pytest.approx(65.3e9, rel=0.01)
    assert m70.parameters == pytest.approx(70.6e9, rel=0.01)
    assert all(m.dtype_bytes == 2 for m in (m33, m65, m70))


def test_paper_device_specs(h100, h20):
    assert (h100.bf16_tflops, h100.memory_gb, h100.memory_bandwidth_gbs, h100.price_per_hour) == (989, 80, 3350, 11.06)
    assert (h20.bf16_tflops, h20.memory_gb, h20.memory_bandwidth_gbs, h20.price_per_hour) == (148, 96, 4000, 4.63)


def test_required_presets_exist(devices):
    for name in ("h100", "h20", "h200", "a100", "l40s"):
        d = devices[name]
        assert d.bf16_tflops > 0 and d.memory_gb > 0 and d.memory_bandwidth_gbs > 0
        assert d.price_per_hour > 0 and d.nic_gbps > 0


@pytest.mark.parametrize("deployment, price", [
    ((1, 2), 20.32),   # LLaMA-33B, Lamina
    ((2, 0), 22.12),   # LLaMA-33B, vLLM on 2xH100
    ((2, 4), 40.64),   # LLaMA-65B/70B, Lamina
    ((4, 0), 44.24),   # LLaMA-65B/70B, vLLM on 4xH100
])
def test_paper_equal_cost_prices(h100, h20, deployment, price):
    a, b = deployment
    d = Deployment(h100, a, h20 if b else None, b)
    assert d.cost_per_hour == pytest.approx(price, abs=1e-9)


def test_paper_bandwidth_bound_is_reproduced_per_device_pair(h100, h20):
    """The paper's ~30 GB/s for LLaMA3-70B at batch 300, alpha 0.2: one H100 + one H20 at peak rates."""
    m = load_model("llama3-70b")
    peak = Assumptions(compute_efficiency=1.0, memory_efficiency=1.0)
    e = estimate(m, Deployment(h100, 1, h20, 1), batch=300, context=4096, alpha=0.2, assumptions=peak)
    assert e.min_bandwidth / 1e9 == pytest.approx(30, abs=2)
    # ... and it fits one 400 Gb/s NIC (50 GB/s), as the paper says.
    assert e.min_bandwidth < h100.nic_bytes_per_s


def test_cli_prices_match_paper_in_json(tmp_path):
    out = tmp_path / "plan.json"
    result = run_cli("--model", "llama-33b", "--dop", "1,2", "--tp", "2", "--batch", "16",
                     "--context", "1024", "--json", str(out))
    assert result.returncode == 0, result.stderr
    costs = {d["name"]: d["cost_per_hour"] for d in json.loads(out.read_text())["deployments"]}
    assert costs == {"DOP(1,2)": pytest.approx(20.32), "2xH100": pytest.approx(22.12)}


# --- the roofline model -----------------------------------------------------------------------

def test_model_time_is_memory_bound_at_batch_one_and_compute_bound_at_large_batch(h100):
    m = load_model("llama3-70b")
    a = Assumptions()
    weight_read = m.matmul_params * m.dtype_bytes / (2 * h100.bandwidth_bytes_per_s * a.memory_efficiency)
    assert model_time(m, 1, h100, 2, a) == pytest.approx(weight_read)
    big = 4096
    compute = big * m.flops_per_token / (2 * h100.flops_per_s * a.compute_efficiency)
    assert compute > weight_read
    assert model_time(m, big, h100, 2, a) == pytest.approx(compute)


def test_attention_time_is_kv_bytes_over_bandwidth(h20):
    m = load_model("llama3-70b")
    a = Assumptions()
    kv_bytes = 300 * 4096 * m.kv_bytes_per_token
    assert kv_bytes == 300 * 4096 * 80 * 4 * KIB
    assert attention_time(m, 300, 4096, h20, 4, a) == pytest.approx(
        kv_bytes / (4 * h20.bandwidth_bytes_per_s * a.memory_efficiency))


def test_network_bytes_and_min_bandwidth_formula(h100, h20):
    m = load_model("llama3-70b")
    assert network_bytes_per_iteration(m, 300) == 36 * KIB * 300 * 80
    e = estimate(m, Deployment(h100, 2, h20, 4), batch=300, context=4096, alpha=0.2)
    assert e.network_bytes == 36 * KIB * 300 * 80
    assert e.min_bandwidth == pytest.approx(e.network_bytes / (0.2 * (e.mtime_s + e.atime_s)))
    assert min_network_bandwidth(1e9, 0.01, 0.04, 0.5) == pytest.approx(4e10)
    # A smaller alpha (less tolerated overhead) needs proportionally more bandwidth.
    tighter = estimate(m, Deployment(h100, 2, h20, 4), batch=300, context=4096, alpha=0.1)
    assert tighter.min_bandwidth == pytest.approx(2 * e.min_bandwidth)


def test_iteration_time_without_overlap_adds_network(h100, h20):
    m = load_model("llama3-70b")
    a = Assumptions()
    e = estimate(m, Deployment(h100, 2, h20, 8), batch=300, context=4096, alpha=0.2, assumptions=a)
    wire = e.network_bytes / (2 * h100.nic_bytes_per_s * a.network_efficiency)
    assert e.network_time_s == pytest.approx(80 * 33e-6 + wire)
    assert e.iteration_time_s == pytest.approx(e.mtime_s + e.atime_s + e.network_time_s)
    assert e.throughput == pytest.approx(300 / e.iteration_time_s)
    assert e.tokens_per_dollar == pytest.approx(e.throughput * 3600 / (2 * 11.06 + 8 * 4.63))


def test_homogeneous_has_no_network_and_sums_mtime_atime(h100):
    m = load_model("llama3-70b")
    e = estimate(m, Deployment(h100, 8), batch=300, context=4096, alpha=0.2)
    assert e.network_bytes == 0 and e.min_bandwidth is None and e.network_time_s == 0
    assert e.iteration_time_s == pytest.approx(e.mtime_s + e.atime_s)


def test_microbatch_overlap_is_bounded_by_the_slowest_pool(h100, h20):
    m = load_model("llama3-70b")
    d = Deployment(h100, 4, h20, 8)
    serial = estimate(m, d, 400, 4096, 0.2, Assumptions(microbatches=1))
    overlapped = estimate(m, d, 400, 4096, 0.2, Assumptions(microbatches=2))
    assert overlapped.iteration_time_s < serial.iteration_time_s
    # Each pool still has to do all of its work once per iteration.
    assert overlapped.iteration_time_s >= max(overlapped.mtime_s, overlapped.atime_s)
    time, _ = iteration_time(m, d, 400, 4096, Assumptions(microbatches=2))
    assert time == pytest.approx(overlapped.iteration_time_s)


def test_max_batch_places_weights_on_compute_and_kv_on_attention(h100, h20):
    m = load_model("llama3-70b")
    a = Assumptions()
    per_request = 4096 * m.kv_bytes_per_token
    dop = max_batch(m, Deployment(h100, 2, h20, 4), 4096, a)
    assert dop == math.floor(4 * 96 * GIB * 0.9 / per_request) == 276
    homogeneous = max_batch(m, Deployment(h100, 4), 4096, a)
    assert homogeneous == math.floor((4 * 80 * GIB * 0.9 - m.weight_bytes) / per_request) == 125
    # 141 GB of weights do not fit one 80 GiB H100, whatever the attention side.
    assert max_batch(m, Deployment(h100, 1, h20, 8), 4096, a) == 0
    assert max_batch(m, Deployment(h100, 1), 4096, a) == 0


def test_batch_beyond_memory_has_no_throughput(h100, h20):
    m = load_model("llama3-70b")
    e = estimate(m, Deployment(h100, 2, h20, 4), batch=277, context=4096, alpha=0.2)
    assert not e.fits and e.throughput is None and e.tokens_per_dollar is None
    assert "batch > max 276" in e.notes


def test_plan_picks_the_best_fitting_split(h100, h20):
    m = load_model("llama3-70b")
    plan = make_plan(m, h100, h20, batch=200, context=4096, alpha=0.2)
    names = [e.deployment.name for e in plan.estimates]
    # Splits that cannot hold the weights, or violate head divisibility, are not candidates.
    assert "DOP(1,2)" not in names and "DOP(2,3)" not in names and "1xH100" not in names
    assert {"DOP(2,4)", "DOP(4,8)", "4xH100", "8xH100"} <= set(names)
    fitting = [e for e in plan.estimates if e.deployment.disaggregated and e.fits]
    assert fitting
    assert plan.best_dop is max(fitting, key=lambda e: e.tokens_per_dollar)
    assert plan.best.tokens_per_dollar >= plan.best_homogeneous.tokens_per_dollar
    assert plan.best.tokens_per_dollar >= plan.best_dop.tokens_per_dollar


def test_explicit_split_must_divide_heads(h100, h20):
    with pytest.raises(PlanError, match="does not divide"):
        make_plan(load_model("llama3-70b"), h100, h20, batch=8, context=1024, dop_splits=[(2, 3)])


# --- model and device input -------------------------------------------------------------------

def test_hf_config_file_and_directory(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA3_8B_CONFIG))
    for source in (str(path), str(tmp_path)):
        m = load_model(source)
        assert (m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads) == (4096, 32, 32, 8)
        assert (m.intermediate_size, m.vocab_size, m.dtype_bytes, m.head_dim) == (14336, 128256, 2, 128)
        assert m.parameters == pytest.approx(8.03e9, rel=0.005)
        assert m.network_bytes_per_token_per_layer == (2 + 2 / 4) * 2 * 4096


def test_hf_config_defaults_and_dtype():
    no_gqa = {k: v for k, v in LLAMA3_8B_CONFIG.items() if k not in ("num_key_value_heads", "torch_dtype")}
    m = model_from_config(no_gqa, "mha")
    assert m.num_kv_heads == m.num_heads and m.group_size == 1
    assert m.dtype_bytes == 2  # a config without torch_dtype is taken as 16-bit
    assert model_from_config(LLAMA3_8B_CONFIG, "fp32", dtype="float32").dtype_bytes == 4
    assert model_from_config(dict(LLAMA3_8B_CONFIG, torch_dtype="float32"), "x").dtype_bytes == 4


@pytest.mark.parametrize("changes, message", [
    ({"num_attention_heads": 0}, "'num_attention_heads' must be a positive integer"),
    ({"vocab_size": "big"}, "'vocab_size' must be a positive integer"),
    ({"num_key_value_heads": 5}, "not a multiple"),
    ({"torch_dtype": "float13"}, "unknown dtype"),
    ({"num_local_experts": 8}, "mixture-of-experts"),
])
def test_bad_hf_config(changes, message):
    with pytest.raises(PlanError, match=message):
        model_from_config(dict(LLAMA3_8B_CONFIG, **changes), "bad")


def test_hf_config_missing_key():
    config = {k: v for k, v in LLAMA3_8B_CONFIG.items() if k != "intermediate_size"}
    with pytest.raises(PlanError, match="missing intermediate_size"):
        model_from_config(config, "bad")


def test_device_file_adds_and_overrides(tmp_path):
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({
        "MyAccel": {"bf16_tflops": 500, "memory_gb": 192, "memory_bandwidth_gbs": 5300,
                    "price_per_hour": 3.5, "nic_gbps": 400},
        "h100": {"bf16_tflops": 989, "memory_gb": 80, "memory_bandwidth_gbs": 3350,
                 "price_per_hour": 2.0, "nic_gbps": 400, "source": "my discount"},
    }))
    loaded = load_device_file(path)
    assert loaded["myaccel"].memory_gb == 192
    out = tmp_path / "plan.json"
    result = run_cli("--devices", str(path), "--attention", "myaccel", "--dop", "2,4", "--tp", "4",
                     "--batch", "64", "--json", str(out))
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    assert doc["devices"]["attention"]["name"] == "myaccel"
    costs = {d["name"]: d["cost_per_hour"] for d in doc["deployments"]}
    assert costs["DOP(2,4)"] == pytest.approx(2 * 2.0 + 4 * 3.5)
    assert costs["4xH100"] == pytest.approx(8.0)


# --- the command line -------------------------------------------------------------------------

def test_cli_end_to_end_table_and_json(tmp_path):
    out = tmp_path / "plan.json"
    result = run_cli("--model", "llama3-70b", "--compute", "h100", "--attention", "h20",
                     "--context", "4096", "--batch", "200", "--alpha", "0.2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    stdout = result.stdout
    assert "36 KiB per token per layer" in stdout
    assert "best DOP split at batch 200:" in stdout

    doc = json.loads(out.read_text())
    assert doc["inputs"] == {"context": 4096, "batch": 200, "alpha": 0.2}
    assert doc["model"]["network_bytes_per_token_per_layer"] == 36 * KIB
    assert doc["model"]["network_bytes_per_iteration"] == 36 * KIB * 200 * 80
    by_name = {d["name"]: d for d in doc["deployments"]}
    dop = by_name["DOP(2,4)"]
    for field in ("cost_per_hour", "max_batch", "mtime_s", "atime_s", "network_bytes_per_iteration",
                  "min_bandwidth_gbs", "iteration_time_s", "throughput_tokens_per_s", "tokens_per_dollar"):
        assert dop[field] is not None and dop[field] > 0, field
    assert dop["kind"] == "dop" and dop["fits"] is True
    assert dop["throughput_tokens_per_s"] == pytest.approx(200 / dop["iteration_time_s"])
    assert by_name["4xH100"]["network_bytes_per_iteration"] == 0

    # The table shows the same numbers as the JSON.
    cells = row(stdout, "DOP(2,4)")
    assert cells[1] == f"{dop['cost_per_hour']:.2f}"
    assert cells[2] == str(dop["max_batch"])
    assert cells[3] == f"{dop['mtime_s'] * 1e3:.2f}"
    assert cells[4] == f"{dop['atime_s'] * 1e3:.2f}"
    assert cells[5] == f"{dop['min_bandwidth_gbs']:.1f}"
    assert cells[8] == f"{dop['throughput_tokens_per_s']:.0f}"
    assert cells[9] == f"{dop['tokens_per_dollar']:.0f}"
    assert doc["best_dop"] in by_name and by_name[doc["best_dop"]]["kind"] == "dop"
    assert f"best DOP split at batch 200: {doc['best_dop']} " in stdout


def test_cli_with_hf_config(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA3_8B_CONFIG))
    out = tmp_path / "plan.json"
    result = run_cli("--model", str(config), "--batch", "32", "--context", "2048", "--json", str(out))
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    assert doc["model"]["hidden_size"] == 4096 and doc["model"]["num_layers"] == 32
    # An 8B model fits one H100, so the single-GPU deployment is a candidate.
    assert "1xH100" in {d["name"] for d in doc["deployments"]}
    assert "1xH100" in result.stdout


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, chunk = struct.unpack(">I4s", data[8:16])
    assert chunk == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def test_cli_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "tpd.png"
    result = run_cli("--batch", "200", "--plot", str(png))
    assert result.returncode == 0, result.stderr
    width, height = _png_size(png.read_bytes())
    assert width > 300 and height > 200
    assert png.stat().st_size > 10_000  # curves and labels drawn, not an empty canvas


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    png = tmp_path / "tpd.png"
    assert plan_main(["--batch", "8", "--plot", str(png)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not png.exists()


def test_lamina_net_cli_dispatches_plan(monkeypatch, capsys):
    """The top-level `lamina-net plan` entry point reaches this module's add_arguments and run."""
    from lamina_net import cli

    # Only the plan subcommand: the others' modules belong to other parts of the tree.
    monkeypatch.setattr(cli, "_SUBCOMMANDS", {"plan": cli._SUBCOMMANDS["plan"]})
    assert cli.main(["plan", "--model", "llama-65b", "--batch", "64", "--context", "2048"]) == 0
    out = capsys.readouterr().out
    assert "64 KiB per token per layer" in out
    assert row(out, "DOP(2,4)")[1] == "40.64"
    assert row(out, "4xH100")[1] == "44.24"


def test_python_m_lamina_net_plan():
    """The real top-level command, once every subcommand module of lamina_net/cli.py exists."""
    result = run_module("lamina_net", "plan", "--batch", "64")
    missing = "No module named 'lamina_net."
    if result.returncode != 0 and missing in result.stderr and "lamina_net.plan" not in result.stderr:
        pytest.skip("another lamina-net subcommand module is not in the tree yet: "
                    + result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr
    assert row(result.stdout, "DOP(2,4)")[1] == "40.64"


# --- bad input gives a message and a non-zero exit, not a traceback ---------------------------

@pytest.mark.parametrize("argv, message", [
    (["--model", "llama-7b"], "unknown model 'llama-7b'"),
    (["--compute", "tpu9"], "unknown compute device 'tpu9'"),
    (["--attention", "nope"], "unknown attention device 'nope'"),
    (["--batch", "0"], "--batch: must be a positive integer"),
    (["--batch", "-3"], "--batch: must be a positive integer"),
    (["--batch", "many"], "--batch: expected a positive integer"),
    (["--context", "0"], "--context: must be a positive integer"),
    (["--alpha", "0"], "--alpha: must be strictly between 0 and 1"),
    (["--alpha", "1"], "--alpha: must be strictly between 0 and 1"),
    (["--alpha", "1.5"], "--alpha: must be strictly between 0 and 1"),
    (["--alpha", "-0.1"], "--alpha: must be strictly between 0 and 1"),
    (["--dop", "2,3"], "does not divide"),
    (["--devices", "/nonexistent/devices.json"], "cannot read device file"),
])
def test_bad_input_is_reported_without_traceback(argv, message):
    result = run_cli(*argv)
    assert result.returncode == 2
    assert message in result.stderr
    assert "lamina-net plan" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot read device file"),
    ("[]", "expected a non-empty JSON object"),
    ('{"x": 5}', "must be a JSON object of fields"),
    ('{"x": {"bf16_tflops": 100}}', "is missing memory_gb"),
    ('{"x": {"bf16_tflops": 100, "memory_gb": -1, "memory_bandwidth_gbs": 1, "price_per_hour": 1,'
     ' "nic_gbps": 1}}', "'memory_gb' must be a positive number"),
    ('{"x": {"bf16_tflops": "fast", "memory_gb": 1, "memory_bandwidth_gbs": 1, "price_per_hour": 1,'
     ' "nic_gbps": 1}}', "'bf16_tflops' must be a positive number"),
    ('{"x": {"tflops": 1, "bf16_tflops": 1, "memory_gb": 1, "memory_bandwidth_gbs": 1,'
     ' "price_per_hour": 1, "nic_gbps": 1}}', "unknown field(s) tflops"),
])
def test_malformed_device_file(tmp_path, capsys, content, message):
    path = tmp_path / "devices.json"
    path.write_text(content)
    assert plan_main(["--devices", str(path)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.err.startswith("lamina-net plan: error:")
    assert captured.out == ""


def test_malformed_model_config_via_cli(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 4096}))
    result = run_cli("--model", str(path))
    assert result.returncode == 2
    assert "config is missing num_hidden_layers" in result.stderr
    assert "Traceback" not in result.stderr
