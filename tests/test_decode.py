"""Decode pipeline, transport-free parts: head split, attention-shard math, the converter hook,
and token-for-token equality of a loopback run (attention shards served in-process) with the
monolithic model. The multi-process runs over lamina-net are in test_decode_pipeline.py."""
from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import functools  # noqa: E402

from lamina_net.decode.attention_shard import AttentionServer, MicroBatchKVCache  # noqa: E402
from lamina_net.decode.converter import (CONTEXT_KWARG, ConversionError, PassThroughCache,  # noqa: E402
                                         cache_kwargs, offload_attention, restore_attention)
from lamina_net.decode.link import LoopbackLink, PipelineError, WorkerFailure  # noqa: E402
from lamina_net.decode.model_worker import ModelWorker  # noqa: E402
from lamina_net.decode.models import random_model, random_prompts, reference_generate, tiny_config  # noqa: E402
from lamina_net.decode.partition import HeadSplitError, partition_heads  # noqa: E402
from lamina_net.decode.protocol import Kind, ProtocolError  # noqa: E402

torch.use_deterministic_algorithms(True)

# Tiny float32 configs (hidden 64 unless noted): MHA, GQA, an odd KV-head count, sliding
# window, Qwen2 (q/k/v bias), Qwen3 (q/k norms, head_dim != hidden/heads).
CONFIGS = {
    "llama-mha": dict(family="llama", num_heads=4, num_kv_heads=4),
    "llama-gqa": dict(family="llama", num_layers=3, num_heads=8, num_kv_heads=2),
    "llama-3kv": dict(family="llama", hidden_size=96, num_heads=6, num_kv_heads=3),
    "mistral-window": dict(family="mistral", num_heads=4, num_kv_heads=2, sliding_window=6),
    "qwen2": dict(family="qwen2", num_heads=4, num_kv_heads=2),
    "qwen3": dict(family="qwen3", num_heads=4, num_kv_heads=2, head_dim=32),
}
NEW_TOKENS = 10


def tiny_model(name: str):
    return random_model(tiny_config(**CONFIGS[name]))


def ragged_prompts():
    """Four prompts of different lengths, left-padded, with their attention mask."""
    return random_prompts(batch=4, prompt_len=9, vocab_size=256, ragged=True, seed=3)


@functools.lru_cache(maxsize=None)
def reference_tokens(name: str) -> torch.Tensor:
    return reference_generate(tiny_model(name), *ragged_prompts(), NEW_TOKENS)


# ---- head partitioning

def test_even_split_gqa_keeps_query_groups_with_their_kv_head():
    partition = partition_heads(num_q_heads=8, num_kv_heads=2, head_dim=16, num_workers=2)
    assert partition.group_size == 4 and partition.is_even
    assert [(s.kv_heads, s.q_heads) for s in partition.shards] == [((0, 1), (0, 4)), ((1, 2), (4, 8))]


def test_uneven_split_differs_by_at_most_one_head():
    partition = partition_heads(num_q_heads=10, num_kv_heads=5, head_dim=8, num_workers=3)
    assert [s.num_kv_heads for s in partition.shards] == [2, 2, 1]
    assert [s.q_heads for s in partition.shards] == [(0, 4), (4, 8), (8, 10)]
    assert not partition.is_even


@pytest.mark.parametrize("q_heads, kv_heads, workers, words", [
    (4, 2, 3, "cannot split 2 KV heads over 3"),
    (4, 4, 0, "at least one"),
    (6, 4, 1, "not a multiple"),
])
def test_impossible_split_is_refused_with_a_reason(q_heads, kv_heads, workers, words):
    with pytest.raises(HeadSplitError, match=words):
        partition_heads(q_heads, kv_heads, 16, workers)


# ---- attention-shard math

def _reference_attention(q, keys, values, valid, start, scaling, window):
    """Direct per-(batch, head, query) softmax attention, for comparison."""
    batch, q_heads, q_len, _ = q.shape
    group = q_heads // keys.shape[1]
    out = torch.zeros(batch, q_len, q_heads, q.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            for i in range(q_len):
                pos = start + i
                allowed = [j for j in range(pos + 1) if valid[b, j] and (window == 0 or pos - j < window)]
                if not allowed:
                    continue
                k = keys[b, h // group, allowed].double()
                weights = torch.softmax(k @ q[b, h, i].double() * scaling, dim=0)
                out[b, i, h] = weights @ values[b, h // group, allowed].double()
    return out


@pytest.mark.parametrize("group, window", [(1, 0), (4, 0), (2, 3)])
def test_shard_attention_matches_direct_computation_over_steps(group, window):
    generator = torch.Generator().manual_seed(0)
    batch, kv_heads, head_dim = 3, 2, 8
    cache = MicroBatchKVCache(batch, kv_heads, head_dim, torch.float32, torch.device("cpu"))
    prompt_valid = torch.ones(batch, 5, dtype=torch.bool)
    prompt_valid[1, :2] = False  # left padding
    all_keys, all_values, all_valid = [], [], []
    for step, q_len in enumerate([5, 1, 1, 1]):
        new_valid = prompt_valid if step == 0 else None
        cache.begin_step(q_len, new_valid)
        q = torch.randn(batch, kv_heads * group, q_len, head_dim, generator=generator)
        k = torch.randn(batch, kv_heads, q_len, head_dim, generator=generator)
        v = torch.randn(batch, kv_heads, q_len, head_dim, generator=generator)
        all_keys.append(k.transpose(1, 2))
        all_values.append(v.transpose(1, 2))
        all_valid.append(new_valid if new_valid is not None else torch.ones(batch, q_len, dtype=torch.bool))
        out = cache.attend(0, q, k, v, scaling=0.3, sliding_window=window)
        keys = torch.cat(all_keys, 1).transpose(1, 2)
        values = torch.cat(all_values, 1).transpose(1, 2)
        expected = _reference_attention(q, keys, values, torch.cat(all_valid, 1), cache.step_start, 0.3, window)
        real_rows = torch.cat(all_valid, 1)[:, cache.step_start:]  # padded queries' outputs are don't-care
        assert torch.allclose(out.double()[real_rows], expected[real_rows], atol=1e-5)


def test_cache_grows_past_its_first_capacity():
    cache = MicroBatchKVCache(1, 1, 4, torch.float32, torch.device("cpu"))
    for _ in range(40):
        cache.begin_step(1, None)
        x = torch.ones(1, 1, 1, 4)
        out = cache.attend(0, x, x, x * cache.length, 1.0)
    assert cache.capacity >= 40
    assert math.isclose(float(out[0, 0, 0, 0]), sum(range(1, 41)) / 40, rel_tol=1e-5)


# ---- converter hook

def test_hook_receives_only_new_tokens_and_rotated_q():
    model = tiny_model("llama-gqa")
    geometry = offload_attention(model)
    seen = []

    class Recorder:
        def attend(self, layer, query, key, value, scaling, sliding_window):
            seen.append((layer, tuple(query.shape), tuple(key.shape), scaling, sliding_window))
            return torch.zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])

    cache = PassThroughCache(geometry.num_layers)
    with torch.inference_mode():
        model(torch.tensor([[5, 6, 7]]), use_cache=True, **cache_kwargs(model, cache), **{CONTEXT_KWARG: Recorder()})
        model(torch.tensor([[8]]), use_cache=True, **cache_kwargs(model, cache), **{CONTEXT_KWARG: Recorder()})
    assert cache.get_seq_length() == 4
    assert [s[0] for s in seen] == [0, 1, 2, 0, 1, 2]
    assert seen[0][1:3] == ((1, 8, 3, 8), (1, 2, 3, 8)) and seen[3][1:3] == ((1, 8, 1, 8), (1, 2, 1, 8))
    assert seen[0][3] == pytest.approx(8 ** -0.5)
    restore_attention(model)


def test_converted_model_without_a_target_says_how_to_run_it():
    model = tiny_model("llama-mha")
    offload_attention(model)
    with pytest.raises(ConversionError, match="ModelWorker"):
        model(torch.tensor([[5, 6]]), use_cache=True, **cache_kwargs(model, PassThroughCache(2)))


def test_installed_transformers_is_in_the_supported_range_declared_by_the_extra():
    from lamina_net.decode import converter

    tomllib = pytest.importorskip("tomllib")
    import os

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml"), "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["decode"]
    assert f"transformers{converter.SUPPORTED_TRANSFORMERS}" in extra
    assert converter.transformers_supported(), converter.TRANSFORMERS_VERSION
    assert converter.transformers_supported("4.57.6") and converter.transformers_supported("5.24.0")
    assert not converter.transformers_supported("4.56.2") and not converter.transformers_supported("5.25.0")


def test_transformers_outside_the_range_is_refused_naming_the_range(monkeypatch):
    from lamina_net.decode import converter

    model = tiny_model("llama-mha")
    monkeypatch.setattr(converter, "TRANSFORMERS_VERSION", "4.50.0")
    with pytest.raises(ConversionError, match=r"tested with transformers >=4\.57\.6,<5\.25; this is transformers "
                                              r"4\.50\.0"):
        offload_attention(model)
    assert offload_attention(model, allow_untested=True).num_layers == 2
    restore_attention(model)


def test_untested_family_is_refused_unless_allowed():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=128)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ConversionError, match="not among the tested") as refusal:
        offload_attention(model)
    assert "transformers >=4.57.6,<5.25" in str(refusal.value)


def test_wire_bytes_match_the_paper_formula():
    geometry = offload_attention(tiny_model("llama-gqa"))
    # (2 + 2/G) * e * d with G = 4, e = 4 (float32), d = 64
    assert geometry.wire_bytes_per_token_per_layer() == geometry.paper_formula_bytes() == 2.5 * 4 * 64


# ---- loopback: the whole model-worker path, attention shards in-process

def _loopback_generate(name, workers, micro_batches, new_tokens=NEW_TOKENS):
    model = tiny_model(name)
    input_ids, attention_mask = ragged_prompts()
    worker = ModelWorker(model, [LoopbackLink(AttentionServer()) for _ in range(workers)], micro_batches)
    tokens = worker.generate(input_ids, attention_mask, new_tokens)
    return tokens, worker


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("workers, micro_batches", [(1, 1), (2, 2), (2, 1), (1, 3)])
def test_loopback_matches_monolithic_generate(name, workers, micro_batches):
    tokens, worker = _loopback_generate(name, workers, micro_batches)
    assert torch.equal(tokens, reference_tokens(name))
    stats = worker.last_stats
    assert stats.bytes_per_token_per_layer == worker.geometry.wire_bytes_per_token_per_layer()


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_loopback_stats_split_compute_network_and_token_intervals(micro_batches):
    tokens, worker = _loopback_generate("llama-gqa", 2, micro_batches, new_tokens=5)
    stats = worker.last_stats
    steps = tokens.shape[1] - 1
    assert len(stats.token_intervals) == steps * micro_batches and min(stats.token_intervals) > 0
    assert stats.decode_layer_calls == steps * micro_batches * worker.geometry.num_layers
    assert stats.compute_per_layer > 0
    # In-process: the request is in the server's hands as soon as it is posted, so the legs are tiny.
    assert stats.decode_requests == 2 * stats.decode_layer_calls
    assert 0 <= stats.request_leg < stats.round_trip_per_layer


def test_micro_batches_interleave_layer_by_layer():
    model = tiny_model("llama-gqa")
    input_ids, attention_mask = ragged_prompts()
    order = []

    class Tracing(AttentionServer):
        def _layer(self, header, payload):
            order.append((header[1], header[2]))  # (micro-batch, layer)
            return super()._layer(header, payload)

    worker = ModelWorker(model, [LoopbackLink(Tracing())], micro_batches=2)
    worker.generate(input_ids, attention_mask, 2)
    # Rotational: micro-batch 0 layer l, micro-batch 1 layer l, micro-batch 0 layer l+1, ...
    assert order[:6] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]


def test_more_micro_batches_than_requests_is_refused():
    model = tiny_model("llama-mha")
    worker = ModelWorker(model, [LoopbackLink(AttentionServer())], micro_batches=5)
    with pytest.raises(ValueError, match="at least 5"):
        worker.generate(*ragged_prompts(), max_new_tokens=2)


def test_model_worker_refuses_more_workers_than_kv_heads():
    with pytest.raises(HeadSplitError, match="cannot split 2 KV heads over 3"):
        ModelWorker(tiny_model("qwen2"), [LoopbackLink(AttentionServer()) for _ in range(3)])


# ---- recovery: a lost attention worker replaced, the sequence kept (in-process; the processes'
# version is in test_decode_pipeline.py)

class DyingLoopbackLink(LoopbackLink):
    """A loopback worker that is lost at a forward step: from its first LAYER message of that step on,
    every operation raises as a dead peer's channel does."""

    def __init__(self, server, die_at_step: int, peer: str = "dying loopback worker"):
        super().__init__(server, peer)
        self.die_at_step, self.dead = die_at_step, False

    def _check(self, action: str, tensor=None) -> None:
        if not self.dead and tensor is not None:
            kind, micro_batch = tensor.reshape(-1).view(torch.uint8)[:16].view(torch.int64).tolist()
            step = self.server.current_step(micro_batch) if kind == Kind.LAYER else None
            self.dead = step is not None and step >= self.die_at_step
        if self.dead:
            raise WorkerFailure(self.peer, action, ConnectionResetError("peer gone"), self)

    def isend(self, tensor):
        self._check("sending", tensor)
        return super().isend(tensor)

    def irecv(self, tensor):
        self._check("receiving")
        return super().irecv(tensor)


@pytest.mark.parametrize("name, workers, micro_batches, lost",
                         [("llama-gqa", 2, 1, 1), ("llama-gqa", 2, 2, 0), ("llama-3kv", 2, 3, 1),
                          ("mistral-window", 1, 2, 0)])
def test_a_lost_worker_is_replaced_and_generation_matches_monolithic(name, workers, micro_batches, lost):
    links = [LoopbackLink(AttentionServer()) for _ in range(workers)]
    links[lost] = DyingLoopbackLink(AttentionServer(), die_at_step=4)
    replaced = []

    def replace(index, failure):
        replaced.append((index, type(failure).__name__))
        return LoopbackLink(AttentionServer(), f"replacement {index}")

    worker = ModelWorker(tiny_model(name), links, micro_batches, replace_worker=replace)
    tokens = worker.generate(*ragged_prompts(), max_new_tokens=NEW_TOKENS)
    assert torch.equal(tokens, reference_tokens(name))
    assert [index for index, _ in replaced] == [lost]
    assert worker.links[lost].peer == f"replacement {lost}"
    (recovery,) = worker.last_stats.recoveries
    assert recovery.worker == lost and "peer gone" in recovery.cause
    # The micro-batch that met the loss had 4 tokens; the others 3 or 4 (they were a layer behind).
    assert 4 + 3 * (micro_batches - 1) <= recovery.replayed_steps <= 4 * micro_batches
    assert recovery.replay_s is not None and recovery.total_s >= recovery.replay_s > 0
    # Replayed steps are not decode steps: only the exchanges of the step each micro-batch was in at the
    # loss count twice (done, thrown away, done again).
    steps, layers = tokens.shape[1] - 1, worker.geometry.num_layers
    assert steps * micro_batches * layers <= worker.last_stats.decode_layer_calls < (steps + 1) * micro_batches * layers
    assert len(worker.last_stats.token_intervals) == steps * micro_batches


def test_without_a_replacement_the_loss_raises():
    links = [LoopbackLink(AttentionServer()), DyingLoopbackLink(AttentionServer(), die_at_step=2)]
    worker = ModelWorker(tiny_model("llama-gqa"), links, 2)
    with pytest.raises(PipelineError, match="dying loopback worker failed while sending"):
        worker.generate(*ragged_prompts(), max_new_tokens=NEW_TOKENS)


def test_recoveries_are_bounded_when_every_replacement_dies_too():
    calls = []

    def replace(index, failure):
        calls.append(index)
        return DyingLoopbackLink(AttentionServer(), die_at_step=1, peer=f"replacement {len(calls)}")

    worker = ModelWorker(tiny_model("llama-gqa"), [DyingLoopbackLink(AttentionServer(), die_at_step=1)], 1,
                         replace_worker=replace, max_recoveries=2)
    with pytest.raises(PipelineError, match="replacement 2 failed while sending"):
        worker.generate(*ragged_prompts(), max_new_tokens=NEW_TOKENS)
    assert calls == [0, 0]


def test_a_protocol_error_is_not_mistaken_for_a_lost_worker():
    class Broken(AttentionServer):
        def _layer(self, header, payload):
            raise ProtocolError("bad layer")

    worker = ModelWorker(tiny_model("llama-gqa"), [LoopbackLink(Broken())], 1,
                         replace_worker=lambda index, failure: pytest.fail("replaced a worker for a protocol error"))
    with pytest.raises(ProtocolError, match="bad layer"):
        worker.generate(*ragged_prompts(), max_new_tokens=3)


# ---- CLI input checking (fails before any worker starts)

def _cli_status(argv, capsys):
    from lamina_net.cli import build_parser

    args = build_parser().parse_args(["decode", *argv])
    from lamina_net.decode import cli

    status = cli.run(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("argv, words", [
    (["--attention-workers", "3", "--kv-heads", "2"], "cannot split 2 KV heads over 3 attention workers"),
    (["--micro-batches", "4", "--batch", "2"], "--micro-batches 4 needs --batch >= 4"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--hidden-size", "96", "--heads", "6", "--kv-heads", "4"], "6 query heads is not a multiple of 4 KV heads"),
    (["--config", "/nonexistent/config.json"], "error"),
])
def test_cli_rejects_bad_input_with_status_2(argv, words, capsys):
    status, _, err = _cli_status(["--transport", "loopback", "--hidden-size", "64", "--layers", "1", *argv], capsys)
    assert status == 2
    assert words in err


@pytest.mark.parametrize("argv, words", [(["--workers", "0"], "expected integers >= 1"),
                                         (["--micro-batches", "x"], "expected comma-separated integers"),
                                         (["--transports", "udp"], "unknown transport(s)")])
def test_sweep_rejects_bad_grids(argv, words, capsys):
    from lamina_net.decode import sweep

    with pytest.raises(SystemExit) as stop:
        sweep.main(argv)
    assert stop.value.code == 2
    assert words in capsys.readouterr().err


def test_cli_loopback_check(capsys):
    status, out, _ = _cli_status(["--transport", "loopback", "--check", "--ragged", "--hidden-size", "64",
                                  "--layers", "2", "--heads", "4", "--kv-heads", "2", "--batch", "3",
                                  "--prompt-len", "6",
                                  "--new-tokens", "5", "--family", "mistral"], capsys)
    assert status == 0
    assert "identical to the monolithic model's greedy generate" in out
