"""Decode pipeline over real lamina-net channels: a model worker in this process and
attention workers as local subprocesses (tcp and shm). Token-for-token equality with the
monolithic model, measured bytes on the wire, worker failures, and the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
lamina_net = pytest.importorskip("lamina_net")

from test_decode import CONFIGS, NEW_TOKENS, ragged_prompts, reference_tokens, tiny_model  # noqa: E402

from lamina_net.decode.link import PipelineError  # noqa: E402
from lamina_net.decode.model_worker import ModelWorker  # noqa: E402
from lamina_net.decode.pipeline import LocalCluster, run_local_pipeline  # noqa: E402

TIMEOUT = 30.0


@pytest.fixture(scope="module", params=["tcp", "shm"])
def cluster(request):
    """Two attention workers, reused by every equality test of one transport."""
    with LocalCluster(2, transport=request.param, timeout=TIMEOUT) as workers:
        yield workers


# (config, attention workers, micro-batches): MHA and GQA, an uneven head split,
# a sliding window, Qwen2/Qwen3, 1 and 2 workers, n = 1, 2 and 3.
CASES = [
    ("llama-mha", 1, 1),
    ("llama-mha", 2, 2),
    ("llama-gqa", 2, 1),
    ("llama-gqa", 1, 3),
    ("llama-3kv", 2, 2),
    ("mistral-window", 2, 2),
    ("qwen2", 2, 1),
    ("qwen3", 1, 2),
]


@pytest.mark.parametrize("name, workers, micro_batches", CASES, ids=[f"{c}-w{w}-n{n}" for c, w, n in CASES])
def test_matches_monolithic_generate_over_lamina_net(cluster, name, workers, micro_batches):
    assert name in CONFIGS
    model_worker = ModelWorker(tiny_model(name), cluster.links[:workers], micro_batches, TIMEOUT)
    tokens = model_worker.generate(*ragged_prompts(), max_new_tokens=NEW_TOKENS)
    assert torch.equal(tokens, reference_tokens(name))

    stats = model_worker.last_stats
    geometry = model_worker.geometry
    assert stats.bytes_per_token_per_layer == geometry.wire_bytes_per_token_per_layer()
    # Each decode step sends one message per layer, micro-batch and worker.
    steps = tokens.shape[1] - 1
    assert stats.decode_layer_calls == steps * geometry.num_layers * micro_batches
    reports = model_worker.worker_stats()
    assert all(r.decode_layer_messages >= stats.decode_layer_calls for r in reports)


def test_paper_formula_on_the_wire(cluster):
    """Llama-GQA (G = 4): (2 + 2/G) * e * d = 2.5 * 4 * 64 = 640 bytes per token per layer."""
    model_worker = ModelWorker(tiny_model("llama-gqa"), cluster.links, 2, TIMEOUT)
    model_worker.generate(*ragged_prompts(), max_new_tokens=4)
    assert model_worker.last_stats.bytes_per_token_per_layer == 640 == model_worker.geometry.paper_formula_bytes()


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_dead_attention_worker_fails_the_pipeline_quickly_and_clearly(transport):
    input_ids, attention_mask = ragged_prompts()
    started = time.monotonic()
    with pytest.raises(PipelineError) as failure:
        # Worker 1 SIGKILLs itself after 7 layer messages: in the middle of decoding.
        run_local_pipeline(tiny_model("llama-gqa"), input_ids, attention_mask, 20, attention_workers=2,
                           micro_batches=2, transport=transport, timeout=TIMEOUT, crash_worker=1,
                           crash_after_messages=7)
    elapsed = time.monotonic() - started
    message = str(failure.value)
    assert "attention worker 1 (rank 2)" in message
    assert "killed by signal 9" in message
    assert elapsed < TIMEOUT / 2, f"took {elapsed:.1f} s to notice a dead worker"


def test_hung_attention_worker_times_out_within_the_timeout():
    timeout = 3.0
    with LocalCluster(2, transport="tcp", timeout=timeout) as workers:
        model_worker = ModelWorker(tiny_model("llama-gqa"), workers.links, 1, timeout)
        model_worker.generate(*ragged_prompts(), max_new_tokens=2)  # both workers up and serving
        os.kill(workers.pids[0], signal.SIGSTOP)  # alive but silent
        started = time.monotonic()
        try:
            with pytest.raises(PipelineError, match=r"attention worker 0 \(rank 1\) timed out"):
                model_worker.generate(*ragged_prompts(), max_new_tokens=2)
            assert time.monotonic() - started < timeout + 5
        finally:
            os.kill(workers.pids[0], signal.SIGKILL)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_a_killed_worker_is_replaced_by_a_new_process_and_tokens_match(transport):
    with LocalCluster(2, transport=transport, timeout=TIMEOUT, kill_worker=(2, 5)) as workers:
        killed = workers.pids[1]
        model_worker = ModelWorker(tiny_model("llama-gqa"), workers.links, 2, TIMEOUT,
                                   replace_worker=workers.replace)
        tokens = model_worker.generate(*ragged_prompts(), max_new_tokens=NEW_TOKENS)
        assert torch.equal(tokens, reference_tokens("llama-gqa"))
        (recovery,) = model_worker.last_stats.recoveries
        assert recovery.worker == 1 and "attention worker 1 (rank 2)" in recovery.cause
        assert recovery.replayed_steps >= 5  # the steps before the kill ran again on the new cache
        assert workers.pids[1] != killed
        with pytest.raises(ProcessLookupError):
            os.kill(killed, 0)  # reaped, not left a zombie
        # The replacement serves further calls like the original did.
        again = model_worker.generate(*ragged_prompts(), max_new_tokens=NEW_TOKENS)
        assert torch.equal(again, reference_tokens("llama-gqa"))
        assert model_worker.last_stats.recoveries == []


def test_a_hung_worker_is_replaced_after_the_timeout():
    timeout = 3.0
    with LocalCluster(2, transport="tcp", timeout=timeout) as workers:
        model_worker = ModelWorker(tiny_model("llama-gqa"), workers.links, 1, timeout,
                                   replace_worker=workers.replace)
        model_worker.generate(*ragged_prompts(), max_new_tokens=2)  # both workers up and serving
        hung = workers.pids[0]
        os.kill(hung, signal.SIGSTOP)  # alive but silent: only the timeout tells
        try:
            tokens = model_worker.generate(*ragged_prompts(), max_new_tokens=NEW_TOKENS)
            assert torch.equal(tokens, reference_tokens("llama-gqa"))
            (recovery,) = model_worker.last_stats.recoveries
            assert "timed out" in recovery.cause and workers.pids[0] != hung
        finally:
            try:
                os.kill(hung, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _cli(*flags, timeout=240):
    # Run where this test's lamina_net was imported from (the editable checkout or an installed copy), from
    # that package's parent directory: `python -m` puts the working directory first on sys.path.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(lamina_net.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-m", "lamina_net", "decode", "--hidden-size", "64", "--layers", "2",
                           "--heads", "4", "--kv-heads", "2", "--vocab-size", "256", "--batch", "3",
                           "--prompt-len", "8", "--new-tokens", "8", *flags],
                          capture_output=True, text=True, timeout=timeout, cwd=package_root, env=env)


def test_cli_check_passes_and_reports_measurements():
    done = _cli("--check", "--ragged", "--family", "qwen2", "--micro-batches", "2", "--attention-workers", "2",
                "--transport", "tcp", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["check"] == "identical"
    assert report["transport"] == "tcp"
    assert report["bytes_per_token_per_layer"] == report["formula_bytes_per_token_per_layer"] == 768
    assert report["tokens_per_second"] > 0 and report["attention_per_layer_s"] > 0


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_cli_json_file_has_offloaded_and_monolithic_measurements(tmp_path, micro_batches):
    path = tmp_path / "decode.json"
    done = _cli("--micro-batches", str(micro_batches), "--attention-workers", "2", "--transport", "shm",
                "--json", str(path))
    assert done.returncode == 0, done.stderr
    assert f"measurements written to {path}" in done.stdout
    report = json.loads(path.read_text())
    assert report["check"] is None and report["cpu_count"] == os.cpu_count()
    offloaded, monolithic = report["offloaded"], report["monolithic"]
    # batch 3, 8 new tokens, no EOS in the tiny config: 7 decode steps per micro-batch.
    assert offloaded["time_between_tokens_s"]["samples"] == 7 * micro_batches
    assert monolithic["time_between_tokens_s"]["samples"] == 7
    for section in (offloaded, monolithic):
        assert section["tokens_per_second"] > 0 and section["decode_tokens_per_second"] > 0
        tbt = section["time_between_tokens_s"]
        assert 0 < tbt["p50"] <= tbt["p99"]
        assert section["per_layer_s"]["compute"] > 0
    layer = offloaded["per_layer_s"]
    assert monolithic["per_layer_s"]["network"] == 0.0
    assert layer["network"] >= layer["network_request"] > 0  # local workers share this host's clock
    assert layer["compute"] == pytest.approx(layer["model_compute"] + layer["attention_compute"])
    assert offloaded["network_samples"]["requests"] == 7 * micro_batches * 2 * 2  # steps x n x layers x workers
    from lamina_net.decode.sweep import HEADER, table_row

    row = table_row(report)  # the docs' table is made of these rows
    assert row.startswith(f"| 2 | {micro_batches} | shm | {offloaded['tokens_per_second']:.0f} | ")
    assert row.count("|") == HEADER.splitlines()[0].count("|")
    if micro_batches == 1:  # nothing to compute meanwhile: replies are waited for, and the legs fit the round trip
        assert 0 < offloaded["network_samples"]["replies"] <= offloaded["network_samples"]["requests"]
        assert layer["network_reply"] > 0
        assert layer["network"] + layer["attention_compute"] <= layer["round_trip"] * 1.05


def test_cli_reports_a_dead_worker_and_exits_nonzero():
    done = _cli("--transport", "shm", "--inject-fault-after", "5", "--timeout", "10")
    assert done.returncode == 1
    assert "pipeline failed: attention worker 0 (rank 1)" in done.stderr


def test_cli_recovers_from_a_killed_worker():
    done = _cli("--check", "--recover", "--kill-attention-worker", "1@5", "--attention-workers", "2",
                "--micro-batches", "1",
                "--transport", "shm", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["check"] == "identical"
    (recovery,) = report["recoveries"]
    assert recovery["worker"] == 0 and recovery["replayed_steps"] == 5
    assert recovery["total_s"] >= recovery["replace_s"] > 0


def test_cli_without_recover_a_killed_worker_fails_the_run():
    done = _cli("--kill-attention-worker", "1@3", "--transport", "tcp", "--timeout", "10")
    assert done.returncode == 1
    assert "pipeline failed: attention worker 0 (rank 1)" in done.stderr and "killed by signal 9" in done.stderr


@pytest.mark.parametrize("flags, message", [
    (["--kill-attention-worker", "1-5"], "wants RANK@STEP"),
    (["--kill-attention-worker", "0@1"], "not an attention worker"),
    (["--kill-attention-worker", "1@8"], "never runs with --new-tokens 8"),
    (["--recover", "--transport", "loopback"], "loopback"),
    (["--ray-address", "auto"], "needs --launcher ray"),
])
def test_cli_rejects_bad_fault_flags(flags, message):
    done = _cli(*flags)
    assert done.returncode == 2 and message in done.stderr, done.stderr
