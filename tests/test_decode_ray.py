"""The decode pipeline under Ray: actors placed by resource on a two-node local Ray cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

if os.environ.get("LAMINA_NET_SANITIZED"):
    # Ray's raylet and GCS would start with the sanitizer runtime preloaded; the launcher adds no native
    # code to what the local pipeline tests run under the sanitizer.
    pytest.skip("the Ray launcher is not tested under the sanitizer jobs", allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_decode import NEW_TOKENS, ragged_prompts, reference_tokens, tiny_model  # noqa: E402

import lamina_net  # noqa: E402
from lamina_net.decode import PipelineError, RayCluster  # noqa: E402

TIMEOUT = 30.0


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node offering the compute resource and a second node offering two attention slots."""
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"lamina_compute": 1}, "object_store_memory": 128 << 20,
        "include_dashboard": False})
    cluster.add_node(num_cpus=1, resources={"lamina_attention": 2}, object_store_memory=128 << 20)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_actors_are_placed_by_resource_and_tokens_match(ray_cluster):
    with RayCluster(2, timeout=TIMEOUT) as workers:
        head = ray_cluster.head_node.node_id
        assert workers.model_node == head
        assert all(node != head for node in workers.attention_nodes)
        assert workers.transport == "shm"  # both "nodes" run on this host: the pair picks shm as anywhere
        tokens = workers.generate(tiny_model("llama-gqa"), *ragged_prompts(), NEW_TOKENS, micro_batches=2).tokens
        assert torch.equal(tokens, reference_tokens("llama-gqa"))
        # The actors serve further calls, like local worker processes.
        again = workers.generate(tiny_model("qwen2"), *ragged_prompts(), NEW_TOKENS, micro_batches=1)
        assert torch.equal(again.tokens, reference_tokens("qwen2"))
    assert workers.model_node == head  # close() is idempotent
    workers.close()


def test_a_killed_actor_is_the_same_clear_error_as_a_killed_process(ray_cluster):
    with RayCluster(2, transport="tcp", timeout=TIMEOUT, kill_worker=(1, 3)) as workers:
        with pytest.raises(PipelineError) as failure:
            workers.generate(tiny_model("llama-gqa"), *ragged_prompts(), NEW_TOKENS, micro_batches=2)
    message = str(failure.value)
    assert message.startswith("attention worker 0 (rank 1) failed while receiving: TransportError: tcp channel")
    assert "attention worker 0 (rank 1, Ray actor) died" in message
    assert "Traceback" not in message


def test_a_killed_actor_is_replaced_by_a_new_actor_with_recover(ray_cluster):
    with RayCluster(2, timeout=TIMEOUT, kill_worker=(2, 5)) as workers:
        result = workers.generate(tiny_model("llama-gqa"), *ragged_prompts(), NEW_TOKENS, micro_batches=2,
                                  recover=True)
    assert torch.equal(result.tokens, reference_tokens("llama-gqa"))
    (recovery,) = result.stats.recoveries
    assert recovery.worker == 1 and recovery.replayed_steps >= 5


def test_a_missing_resource_is_named(ray_cluster):
    with pytest.raises(PipelineError, match=r"offers 0 of resource 'no_such_gpus'.*needs 2"):
        RayCluster(2, attention_resource="no_such_gpus", timeout=TIMEOUT)


def _cli(*flags):
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(lamina_net.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-m", "lamina_net", "decode", "--launcher", "ray", "--hidden-size", "64",
                           "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab-size", "256", "--batch", "3",
                           "--prompt-len", "8", "--new-tokens", "8", *flags],
                          capture_output=True, text=True, timeout=300, cwd=package_root, env=env)


def test_cli_check_under_the_ray_cluster_recovers_a_killed_worker(ray_cluster):
    done = _cli("--ray-address", ray_cluster.address, "--check", "--recover", "--kill-attention-worker", "1@5",
                "--micro-batches", "1", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["check"] == "identical" and report["launcher"] == "ray"
    (recovery,) = report["recoveries"]
    assert recovery["worker"] == 0 and recovery["replayed_steps"] == 5


def test_cli_starts_its_own_ray_without_an_address():
    done = _cli("--check", "--attention-workers", "2", "--transport", "tcp")
    assert done.returncode == 0, done.stderr
    assert "attention workers: 2 (Ray actors) over tcp" in done.stdout
    assert "check: generated tokens identical" in done.stdout


@pytest.mark.parametrize("flags, message", [
    (["--transport", "loopback"], "not with --transport loopback"),
    (["--rank", "0", "--world-size", "3"], "not with --rank/--world-size"),
])
def test_cli_rejects_ray_with_other_launch_modes(flags, message):
    done = _cli(*flags)
    assert done.returncode == 2 and message in done.stderr, done.stderr
