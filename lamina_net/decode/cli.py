"""``lamina-net decode``: run a causal LM with attention offloaded to attention workers.

By default everything runs on this machine: a small random-weight model built
from a config, a model worker in this process and ``--attention-workers``
worker processes, connected by lamina-net. Under torchrun (RANK/WORLD_SIZE set)
or with ``--rank/--world-size/--store`` every process runs this command; rank 0
is the model worker, the others are attention workers.

Only argparse is imported at module level (the CLI imports every subcommand to
build its parser); torch and transformers are imported in :func:`run`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # == models.FAMILIES (kept here: no torch import)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (default: a small random-weight model built from a config)")
    model.add_argument("--config", metavar="PATH", help="Hugging Face config.json (random weights)")
    model.add_argument("--model", metavar="PATH", help="local checkpoint directory (weights loaded, no download)")
    model.add_argument("--family", choices=FAMILIES, default="llama", help="built-in config family (default llama)")
    model.add_argument("--hidden-size", type=int, default=256)
    model.add_argument("--layers", type=int, default=4)
    model.add_argument("--heads", type=int, default=8, help="query heads")
    model.add_argument("--kv-heads", type=int, default=2, help="KV heads (== --heads for MHA)")
    model.add_argument("--vocab-size", type=int, default=1024)
    model.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")

    run = parser.add_argument_group("workload")
    run.add_argument("--batch", type=int, default=8, help="requests decoded together")
    run.add_argument("--prompt-len", type=int, default=32, help="prompt length (the longest, with --ragged)")
    run.add_argument("--ragged", action="store_true",
                     help="random prompt lengths in [prompt-len/2, prompt-len], left-padded")
    run.add_argument("--new-tokens", type=int, default=32)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--check", action="store_true",
                     help="compare with the monolithic model's greedy generate; exit 1 on any difference")

    pipe = parser.add_argument_group("pipeline")
    pipe.add_argument("--attention-workers", type=int, default=2, metavar="N", help="attention worker processes")
    pipe.add_argument("--micro-batches", type=int, default=2, metavar="n",
                      help="micro-batches in flight (rotational staggered pipelining); 1 = plain disaggregation")
    pipe.add_argument("--transport", default="auto", choices=("auto", "tcp", "shm", "verbs", "loopback"),
                      help="lamina-net transport; loopback = attention in this process, no network")
    pipe.add_argument("--launcher", choices=("local", "ray"), default="local",
                      help="local: attention workers as child processes of this one; ray: model and attention "
                           "workers as Ray actors in one placement group (pip install 'lamina-net[ray]')")
    pipe.add_argument("--ray-address", default=None, metavar="ADDR",
                      help="Ray cluster to join (e.g. auto or HOST:6379); default: start a one-node Ray here "
                           "that offers both resources")
    pipe.add_argument("--ray-compute-resource", default="lamina_compute", metavar="NAME",
                      help="Ray resource of the nodes that take the model worker (default lamina_compute)")
    pipe.add_argument("--ray-attention-resource", default="lamina_attention", metavar="NAME",
                      help="Ray resource of the nodes that take the attention workers (default lamina_attention)")
    pipe.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (model and attention workers)")
    pipe.add_argument("--timeout", type=float, default=30.0, help="seconds before a silent worker is an error")
    pipe.add_argument("--worker-threads", type=int, default=1, help="torch threads per local attention worker")
    pipe.add_argument("--model-threads", type=int, default=1,
                      help="torch threads of the model worker and of the monolithic reference run (default 1: "
                           "an intra-op pool that spins on cores shared with the attention workers only slows down)")
    pipe.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                      help="write the measurements (offloaded and monolithic, same run) as one JSON object to PATH; "
                           "no PATH or '-': print it instead of the text report")

    faults = parser.add_argument_group("faults")
    faults.add_argument("--recover", action="store_true",
                        help="replace a lost attention worker with a new local process or Ray actor, rebuild the KV "
                             "caches by recomputing the steps so far from the token ids, and go on")
    faults.add_argument("--kill-attention-worker", default=None, metavar="RANK@STEP",
                        help="(testing, demos) the attention worker of lamina-net rank RANK (1..N) kills itself "
                             "(SIGKILL) at forward step STEP (0: the prefill; STEP k: after k tokens)")

    dist = parser.add_argument_group("multi-host (default: torchrun's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT)")
    dist.add_argument("--rank", type=int, default=None)
    dist.add_argument("--world-size", type=int, default=None)
    dist.add_argument("--store", default=None, help="HOST:PORT of the lamina-net store (rank 0 hosts it)")
    dist.add_argument("--group", default="lamina-decode")
    dist.add_argument("--inject-fault-after", type=int, default=None, metavar="K",
                      help="(testing) attention worker 0 kills itself after K layer messages")


class UsageProblem(Exception):
    """Bad flags: reported without a traceback, exit status 2."""


def _validate(args) -> None:
    positive = {"--batch": args.batch, "--prompt-len": args.prompt_len, "--new-tokens": args.new_tokens,
                "--attention-workers": args.attention_workers, "--micro-batches": args.micro_batches,
                "--layers": args.layers, "--heads": args.heads, "--kv-heads": args.kv_heads,
                "--hidden-size": args.hidden_size, "--worker-threads": args.worker_threads,
                "--model-threads": args.model_threads}
    for flag, value in positive.items():
        if value < 1:
            raise UsageProblem(f"{flag} must be >= 1, got {value}")
    if args.timeout <= 0:
        raise UsageProblem("--timeout must be > 0")
    if args.micro_batches > args.batch:
        raise UsageProblem(f"--micro-batches {args.micro_batches} needs --batch >= {args.micro_batches} "
                           f"(each micro-batch holds at least one request)")
    if args.config and args.model:
        raise UsageProblem("give --config or --model, not both")
    args.kill_worker = None
    if args.kill_attention_worker is not None:
        rank, at, step = args.kill_attention_worker.partition("@")
        if not (at and rank.isdigit() and step.isdigit()):
            raise UsageProblem(f"--kill-attention-worker wants RANK@STEP (for example 1@5), got "
                               f"{args.kill_attention_worker!r}")
        args.kill_worker = (int(rank), int(step))
        if not 1 <= args.kill_worker[0] <= args.attention_workers:
            raise UsageProblem(f"--kill-attention-worker: rank {rank} is not an attention worker's "
                               f"(1..{args.attention_workers}; rank 0 is the model worker)")
        if args.kill_worker[1] >= args.new_tokens:
            raise UsageProblem(f"--kill-attention-worker: step {step} never runs with --new-tokens "
                               f"{args.new_tokens} (steps 0..{args.new_tokens - 1})")
    if args.transport == "loopback" and (args.recover or args.kill_worker):
        raise UsageProblem("--recover and --kill-attention-worker need attention worker processes, not loopback")
    if args.launcher != "ray" and args.ray_address:
        raise UsageProblem("--ray-address needs --launcher ray")
    if args.launcher == "ray":
        if args.transport == "loopback":
            raise UsageProblem("--launcher ray starts attention worker actors: not with --transport loopback")
        if args.rank is not None or args.world_size is not None:
            raise UsageProblem("--launcher ray places every worker itself: not with --rank/--world-size")


def _distributed_role(args) -> tuple[int, int] | None:
    """(rank, world size) when this is one process of a multi-process launch, else None."""
    rank = args.rank if args.rank is not None else os.environ.get("RANK")
    world = args.world_size if args.world_size is not None else os.environ.get("WORLD_SIZE")
    if rank is None or world is None or int(world) <= 1:
        return None
    return int(rank), int(world)


def _resolve_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{int(os.environ['LOCAL_RANK']) % max(torch.cuda.device_count(), 1)}"  # one GPU per local rank
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageProblem(f"--device {name}: CUDA is not available")
    return device


def build_model(args, device):
    """The model the run uses: a checkpoint, a config file, or a built-in small config (random weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import random_model, tiny_config

    dtype = getattr(torch, args.dtype)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager", local_files_only=True)
        return model.to(device=device, dtype=dtype).eval()
    if args.config:
        config = AutoConfig.from_pretrained(args.config, local_files_only=True)
    else:
        config = tiny_config(args.family, args.hidden_size, args.layers, args.heads, args.kv_heads, args.vocab_size)
    return random_model(config, args.seed, dtype, device)


def run(args) -> int:
    try:
        _validate(args)
        return _run(args)
    except UsageProblem as problem:
        print(f"lamina-net decode: error: {problem}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch

    from .converter import ConversionError, model_geometry
    from .link import PipelineError
    from .model_worker import pad_token_id
    from .models import random_prompts, reference_generate, timed_reference_generate
    from .partition import HeadSplitError, partition_heads

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(args.model_threads)
    device = _resolve_device(args.device)
    role = _distributed_role(args)
    if role is not None and role[0] != 0:
        from .attention_worker import run_attention_worker

        rank, world = role
        return run_attention_worker(rank, world, args.store, args.group, args.transport, str(device), args.timeout,
                                    idle_timeout=max(600.0, args.timeout))
    if role is not None:
        args.attention_workers = role[1] - 1
        if args.recover or args.kill_worker:
            raise UsageProblem("--recover and --kill-attention-worker need the local launcher (it starts the "
                               "replacement); under torchrun the launcher owns the processes")
        if args.launcher == "ray":
            raise UsageProblem("--launcher ray places every worker itself: not under torchrun")

    try:
        model = build_model(args, device)
        geometry = model_geometry(model)
        partition = partition_heads(geometry.num_q_heads, geometry.num_kv_heads, geometry.head_dim,
                                    args.attention_workers)
    except (HeadSplitError, ConversionError, ValueError, OSError) as problem:
        raise UsageProblem(str(problem)) from problem
    input_ids, attention_mask = random_prompts(args.batch, args.prompt_len, model.config.vocab_size, args.ragged,
                                               args.seed + 1, pad_token_id(model))
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    monolithic = None
    if args.check or args.json is not None:
        reference_generate(model, input_ids, attention_mask, 1)  # warm-up, so the timing below is fair
        monolithic = timed_reference_generate(model, input_ids, attention_mask, args.new_tokens)
    try:
        if role is None and args.launcher == "ray":
            from .ray_launcher import run_ray_pipeline

            result = run_ray_pipeline(
                model, input_ids, attention_mask, args.new_tokens, args.attention_workers, args.micro_batches,
                args.transport, str(device), args.timeout, args.ray_address, args.ray_compute_resource,
                args.ray_attention_resource, args.worker_threads,
                crash_worker=0 if args.inject_fault_after is not None else None,
                crash_after_messages=args.inject_fault_after, recover=args.recover, kill_worker=args.kill_worker)
        elif role is None:
            from .pipeline import run_local_pipeline

            result = run_local_pipeline(
                model, input_ids, attention_mask, args.new_tokens, args.attention_workers, args.micro_batches,
                args.transport, str(device), args.timeout, args.worker_threads,
                crash_worker=0 if args.inject_fault_after is not None else None,
                crash_after_messages=args.inject_fault_after, recover=args.recover, kill_worker=args.kill_worker)
        else:
            result = _run_distributed_model_worker(args, model, input_ids, attention_mask, role[1])
    except (ConversionError, HeadSplitError) as problem:
        raise UsageProblem(str(problem)) from problem
    except PipelineError as failure:
        print(f"lamina-net decode: pipeline failed: {failure}", file=sys.stderr)
        return 1

    mismatches = None
    if args.check:
        reference = monolithic.tokens
        width = max(reference.shape[1], result.tokens.shape[1])
        mismatches = int((_pad_to(reference, width) != _pad_to(result.tokens, width)).sum())
    _report(args, geometry, partition, device, result, mismatches, monolithic)
    return 1 if mismatches else 0


def _pad_to(tokens, width: int):
    import torch

    if tokens.shape[1] == width:
        return tokens.cpu()
    return torch.nn.functional.pad(tokens.cpu(), (0, width - tokens.shape[1]), value=-1)


def _run_distributed_model_worker(args, model, input_ids, attention_mask, world_size: int):
    import lamina_net

    from .link import ChannelLink, PipelineError
    from .model_worker import ModelWorker
    from .pipeline import PipelineResult

    try:
        with lamina_net.Endpoint(0, world_size, store=args.store, group=args.group, timeout=args.timeout) as endpoint:
            links = [ChannelLink(endpoint.channel(rank, transport=args.transport),
                                 f"attention worker {rank - 1} (rank {rank})", args.timeout)
                     for rank in range(1, world_size)]
            # Timestamps of workers on other hosts are not comparable with ours: no network split then.
            same_host = all(endpoint.choose_transport(rank)[0] == "shm" for rank in range(1, world_size))
            worker = ModelWorker(model, links, args.micro_batches, args.timeout, shared_clock=same_host)
            try:
                tokens = worker.generate(input_ids, attention_mask, args.new_tokens)
                return PipelineResult(tokens, worker.last_stats, worker.worker_stats(), links[0].channel.transport)
            finally:
                worker.close()
    except (lamina_net.LaminaError, TimeoutError) as failure:
        raise PipelineError(f"{type(failure).__name__}: {failure}") from failure


def _percentiles(samples: list[float]) -> dict:
    import numpy as np

    if not samples:
        return {"p50": None, "p99": None, "samples": 0}
    p50, p99 = np.percentile(np.asarray(samples), [50, 99]).tolist()
    return {"p50": p50, "p99": p99, "samples": len(samples)}


def measurements(stats, workers, monolithic) -> dict:
    """The ``offloaded`` / ``monolithic`` sections of the JSON report (seconds; per layer = per decode
    (micro-batch, layer) exchange for the pipeline, per decode step and layer for the monolithic model)."""
    attention = max((w.decode_attention_per_layer for w in workers), default=0.0)
    network = stats.network_per_layer
    offloaded = {
        "tokens_per_second": stats.tokens_per_second,
        "decode_tokens_per_second": stats.decode_tokens_per_second,
        "time_between_tokens_s": _percentiles(stats.token_intervals),
        "per_layer_s": {
            "network": network,  # request leg + reply leg of one message; None across hosts
            "network_request": stats.request_leg,
            "network_reply": stats.reply_leg,  # None: every reply arrived while another micro-batch computed
            "compute": stats.compute_per_layer + attention,
            "model_compute": stats.compute_per_layer,  # on the model worker
            "attention_compute": attention,  # on the attention workers (the slowest one)
            "round_trip": stats.round_trip_per_layer,
            "blocked": stats.wait_per_layer,  # the model worker waiting for replies
        },
        "network_samples": {"requests": stats.decode_requests, "replies": stats.decode_replies},
    }
    section = {"offloaded": offloaded, "monolithic": None}
    if monolithic is not None:
        section["monolithic"] = {
            "tokens_per_second": monolithic.tokens_per_second,
            "decode_tokens_per_second": monolithic.decode_tokens_per_second,
            "time_between_tokens_s": _percentiles(monolithic.token_intervals),
            "per_layer_s": {"network": 0.0, "compute": monolithic.compute_per_layer},
        }
    return section


def _report(args, geometry, partition, device, result, mismatches, monolithic) -> None:
    stats = result.stats
    attention_per_layer = max((w.decode_attention_per_layer for w in result.workers), default=0.0)
    monolithic_rate = monolithic.tokens_per_second if monolithic is not None else None
    measured = stats.bytes_per_token_per_layer
    formula = geometry.paper_formula_bytes()
    summary = {
        "model": geometry.model_type, "hidden_size": geometry.hidden_size, "layers": geometry.num_layers,
        "q_heads": geometry.num_q_heads, "kv_heads": geometry.num_kv_heads, "group_size": geometry.group_size,
        "dtype": str(geometry.dtype).replace("torch.", ""), "device": str(device),
        "attention_workers": partition.num_workers, "micro_batches": stats.micro_batches,
        "transport": result.transport, "launcher": args.launcher, "batch": stats.batch,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "tokens_per_second": stats.tokens_per_second, "decode_tokens_per_second": stats.decode_tokens_per_second,
        "prefill_seconds": stats.prefill_seconds, "wall_seconds": stats.wall_seconds,
        "round_trip_per_layer_s": stats.round_trip_per_layer, "wait_per_layer_s": stats.wait_per_layer,
        "attention_per_layer_s": attention_per_layer,
        "bytes_per_token_per_layer": measured, "formula_bytes_per_token_per_layer": formula,
        "monolithic_tokens_per_second": monolithic_rate,
        "check": None if mismatches is None else ("identical" if mismatches == 0 else f"{mismatches} tokens differ"),
        "cpu_count": os.cpu_count(),
        "recoveries": [{"worker": r.worker, "cause": r.cause, "detected_s": r.detected_s, "replace_s": r.replace_s,
                        "replay_s": r.replay_s, "replayed_steps": r.replayed_steps, "total_s": r.total_s}
                       for r in stats.recoveries],
        **measurements(stats, result.workers, monolithic),
    }
    if args.json == "-":
        print(json.dumps(summary))
        return
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
    us = 1e6
    print(f"lamina-net decode: {geometry.model_type}, hidden {geometry.hidden_size}, {geometry.num_layers} layers, "
          f"{geometry.num_q_heads} q / {geometry.num_kv_heads} kv heads (G={geometry.group_size}), "
          f"{summary['dtype']} on {device}")
    launched = " (Ray actors)" if args.launcher == "ray" else ""
    print(f"  attention workers: {partition.num_workers}{launched} over {result.transport} ({partition.describe()})")
    print(f"  micro-batches in flight: {stats.micro_batches}; batch {stats.batch} x prompt {args.prompt_len}"
          f"{' (ragged, left-padded)' if args.ragged else ''} -> {args.new_tokens} new tokens")
    print(f"  tokens/s: {stats.tokens_per_second:.1f} overall, {stats.decode_tokens_per_second:.1f} in decode "
          f"(prefill {stats.prefill_seconds * 1e3:.1f} ms, wall {stats.wall_seconds * 1e3:.1f} ms)")
    if stats.micro_batches == 1:
        comm = max(stats.round_trip_per_layer - attention_per_layer, 0.0)
        print(f"  per layer (decode): round trip {stats.round_trip_per_layer * us:.0f} us = attention "
              f"{attention_per_layer * us:.0f} us + communication ~{comm * us:.0f} us")
    else:
        # With n > 1 the round trip also spans the other micro-batches' compute, so it is
        # not split; the blocked time is what the pipelining failed to hide.
        print(f"  per layer (decode): attention {attention_per_layer * us:.0f} us on the workers; round trip "
              f"{stats.round_trip_per_layer * us:.0f} us (spans the other micro-batches' compute); "
              f"model worker blocked {stats.wait_per_layer * us:.0f} us")
    print(f"  bytes per token per layer: {measured:.0f} measured (q, k, v out + output back) vs "
          f"(2 + 2/G) * e * d = (2 + 2/{geometry.group_size}) * {geometry.element_size} * {geometry.hidden_size} "
          f"= {formula:.0f}; plus a 64-byte header per message")
    if args.json is not None:
        offloaded, mono = summary["offloaded"], summary["monolithic"]
        tbt = offloaded["time_between_tokens_s"]
        network = offloaded["per_layer_s"]["network"]
        print(f"  time between tokens: p50 {tbt['p50'] * 1e3:.2f} ms, p99 {tbt['p99'] * 1e3:.2f} ms; "
              f"per layer: network "
              f"{'n/a' if network is None else f'{network * us:.0f} us'}, compute "
              f"{offloaded['per_layer_s']['compute'] * us:.0f} us" if tbt["samples"] else "  (no decode steps)")
        mono_tbt = mono["time_between_tokens_s"]
        if mono_tbt["samples"]:
            print(f"  monolithic: {mono['tokens_per_second']:.1f} tokens/s, time between tokens p50 "
                  f"{mono_tbt['p50'] * 1e3:.2f} ms, p99 {mono_tbt['p99'] * 1e3:.2f} ms, compute per layer "
                  f"{mono['per_layer_s']['compute'] * us:.0f} us")
        print(f"  measurements written to {args.json}")
    for r in stats.recoveries:
        replay = "n/a" if r.replay_s is None else f"{r.replay_s * 1e3:.0f} ms"
        total = "n/a" if r.total_s is None else f"{r.total_s * 1e3:.0f} ms"
        print(f"  recovered attention worker {r.worker} in {total}: loss noticed {r.detected_s * 1e3:.0f} ms after "
              f"the unanswered request, replacement up {r.replace_s * 1e3:.0f} ms, {r.replayed_steps} steps "
              f"recomputed in {replay}")
    if mismatches is not None:
        verdict = "identical to" if mismatches == 0 else f"{mismatches} tokens DIFFER from"
        print(f"  check: generated tokens {verdict} the monolithic model's greedy generate "
              f"(which ran at {monolithic_rate:.1f} tokens/s in this process)")
