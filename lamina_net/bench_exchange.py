"""``lamina-net bench exchange``: the network traffic of attention-offloaded decoding.

One model-side rank (rank 0) and N attention-side ranks. Per layer the model
side sends each attention rank its head shard of q and the new token's k and
v, and each attention rank sends its shard of the attention output back; a
decode step is L such layers. Message sizes come from the planner's model
shapes (lamina_net.plan): per rank B * (H / N) * d * e bytes of q and of the
output and B * (H_kv / N) * d * e of k and of v, which summed over the ranks
is the planner's (2 q_dim + 2 kv_dim) * e * B bytes per layer.

lamina-net moves it with one batch of puts per rank into pre-registered
buffers (Channel.put_many: q, k, then v carrying the signal; the output put
signals the model rank's word for that rank); the same exchange runs over
torch.distributed isend/irecv (Gloo on CPU, NCCL when every rank has a GPU)
for the ratio. No attention is
computed: the benchmark times the traffic alone. Data are checked once at the
end (every byte of the last layer's shards, both ways).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass

from . import bench_report
from .errors import UsageError

DEFAULT_MODEL = "llama3-70b"


@dataclass(frozen=True)
class ExchangeShape:
    """Bytes per attention rank per layer, for one model, batch and split."""

    model: str
    batch: int
    attention_ranks: int
    layers: int
    q_bytes: int    # q shard sent to each rank (also the size of its output shard coming back)
    kv_bytes: int   # k shard (and as much again for v)
    out_bytes: int

    @property
    def inbox_bytes(self) -> int:
        return self.q_bytes + 2 * self.kv_bytes

    @property
    def layer_bytes(self) -> int:
        """Bytes that cross the link per layer, both directions, all ranks."""
        return self.attention_ranks * (self.inbox_bytes + self.out_bytes)


def exchange_shape(model: str = DEFAULT_MODEL, batch: int = 300, attention_ranks: int = 2,
                   layers: int | None = None, dtype: str | None = None) -> ExchangeShape:
    """Shard sizes for ``model`` (a planner preset or config.json) split head-wise over the ranks."""
    from .plan import PlanError, load_model

    for name, value in (("batch", batch), ("attention_ranks", attention_ranks)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    try:
        spec = load_model(model, dtype)
    except PlanError as e:
        raise UsageError(str(e)) from None
    if spec.num_kv_heads % attention_ranks:
        raise UsageError(f"{spec.name}: {spec.num_kv_heads} key/value heads cannot be split evenly over "
                         f"{attention_ranks} attention ranks (head-wise partition)")
    if layers is None:
        layers = spec.num_layers
    if isinstance(layers, bool) or not isinstance(layers, int) or not 0 < layers <= spec.num_layers:
        raise UsageError(f"layers must be in [1, {spec.num_layers}] for {spec.name}, got {layers!r}")
    q = batch * (spec.num_heads // attention_ranks) * spec.head_dim * spec.dtype_bytes
    kv = batch * (spec.num_kv_heads // attention_ranks) * spec.head_dim * spec.dtype_bytes
    shape = ExchangeShape(spec.name, batch, attention_ranks, layers, q, kv, q)
    # The planner's own figure for the same traffic: the split must not lose or invent bytes.
    assert shape.layer_bytes == spec.network_bytes_per_token_per_layer * batch
    return shape


def _pattern(seed: int, nbytes: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def _summary(values_ns: list[int]) -> dict:
    from .bench_cli import _percentile

    values = sorted(v / 1e3 for v in values_ns)
    return {"p50": _percentile(values, 0.5), "p99": _percentile(values, 0.99), "min": values[0],
            "mean": sum(values) / len(values), "n": len(values)}


# ---------------------------------------------------------------- lamina-net

def lamina_rank(rank: int, world_size: int, store: str, transport: str, shape: ExchangeShape, steps: int,
                warmup: int, timeout: float, group: str, show_progress: bool = False) -> dict | None:
    """One rank of the exchange over lamina-net; rank 0 (the model side) returns the timings."""
    import numpy as np

    from . import Endpoint
    from .core import Access, Put

    n = shape.attention_ranks
    with Endpoint(rank, world_size, store, group=group, timeout=timeout) as ep:
        if rank == 0:
            # Sources, one shard per rank side by side; outputs land in `out`, rank i's at (i-1)*out_bytes.
            q_src = ep.alloc(n * shape.q_bytes)
            k_src = ep.alloc(n * shape.kv_bytes)
            v_src = ep.alloc(n * shape.kv_bytes)
            for region, seed in ((q_src, 1), (k_src, 2), (v_src, 3)):
                region.array[:] = _pattern(seed, region.nbytes)
            out = ep.alloc(n * shape.out_bytes, np.uint8, Access.REMOTE_WRITE)
            out_sig = ep.alloc(n, np.uint64, Access.REMOTE_ATOMIC)
            ep.publish("x-out", out)
            ep.publish("x-out-sig", out_sig)
            peers = list(range(1, n + 1))
            chans = [ep.channel(p, transport) for p in peers]
            inbox = [ep.lookup(p, "x-in") for p in peers]
            in_sig = [ep.lookup(p, "x-in-sig") for p in peers]
            # Per rank, one batch (one write on tcp): q, k, then v with the
            # signal, which covers q and k too (puts apply in order).
            batches = [[Put(q_src, inbox[i], 0, src_offset=i * shape.q_bytes, nbytes=shape.q_bytes),
                        Put(k_src, inbox[i], shape.q_bytes, src_offset=i * shape.kv_bytes, nbytes=shape.kv_bytes),
                        Put(v_src, inbox[i], shape.q_bytes + shape.kv_bytes, src_offset=i * shape.kv_bytes,
                            nbytes=shape.kv_bytes, signal=in_sig[i])]
                       for i in range(n)]
        else:
            inbox_region = ep.alloc(shape.inbox_bytes, np.uint8, Access.REMOTE_WRITE)
            sig = ep.alloc(1, np.uint64, Access.REMOTE_ATOMIC)
            out_src = ep.alloc(shape.out_bytes)
            out_src.array[:] = _pattern(100 + rank, shape.out_bytes)
            ep.publish("x-in", inbox_region)
            ep.publish("x-in-sig", sig)
            ch = ep.channel(0, transport)
            remote_out, remote_out_sig = ep.lookup(0, "x-out"), ep.lookup(0, "x-out-sig")
        ep.barrier("x-start")
        layer_ns, step_ns = [], []
        total = (warmup + steps) * shape.layers
        count = 0
        with bench_report.progress(total if show_progress else 0, f"exchange {transport}") as bar:
            for step in range(warmup + steps):
                t_step = time.perf_counter_ns()
                for _ in range(shape.layers):
                    count += 1
                    if rank == 0:
                        t0 = time.perf_counter_ns()
                        for ch_i, batch in zip(chans, batches):
                            ch_i.put_many(batch)
                        for i, ch_i in enumerate(chans):
                            out_sig.wait(8 * i, value=count, timeout=timeout, channel=ch_i)
                        if step >= warmup:
                            layer_ns.append(time.perf_counter_ns() - t0)
                        bar.update()
                    else:
                        sig.wait(0, value=count, timeout=timeout, channel=ch)
                        ch.put(out_src, remote_out, (rank - 1) * shape.out_bytes, signal=remote_out_sig,
                               signal_offset=8 * (rank - 1))
                if step >= warmup and rank == 0:
                    step_ns.append(time.perf_counter_ns() - t_step)
        # Every byte of the last layer, both ways (the model side checks the outputs, each rank its inbox).
        if rank == 0:
            for i in range(n):
                got = out.array[i * shape.out_bytes:(i + 1) * shape.out_bytes]
                if not np.array_equal(got, _pattern(101 + i, shape.out_bytes)):
                    raise RuntimeError(f"exchange: the output from attention rank {i + 1} arrived corrupted")
        else:
            i = rank - 1
            want = np.concatenate([_pattern(1, n * shape.q_bytes)[i * shape.q_bytes:(i + 1) * shape.q_bytes],
                                   _pattern(2, n * shape.kv_bytes)[i * shape.kv_bytes:(i + 1) * shape.kv_bytes],
                                   _pattern(3, n * shape.kv_bytes)[i * shape.kv_bytes:(i + 1) * shape.kv_bytes]])
            if not np.array_equal(inbox_region.array, want):
                raise RuntimeError(f"exchange: attention rank {rank} received corrupted q/k/v")
        ep.barrier("x-done")
        if rank != 0:
            return None
        return {"transport": chans[0].transport, "layer_ns": layer_ns, "step_ns": step_ns}


def _lamina_main(queue, *args) -> None:
    from .bench_cli import _report

    _report(queue, lamina_rank, args)


# ---------------------------------------------------------------- torch.distributed

def torch_rank(rank: int, world_size: int, port: int, backend: str, shape: ExchangeShape, steps: int,
               warmup: int, timeout: float) -> dict | None:
    """The same exchange over torch.distributed isend/irecv; rank 0 returns the timings."""
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        device = "cpu"
        if backend == "nccl":
            device = f"cuda:{rank % torch.cuda.device_count()}"
            torch.cuda.set_device(device)
        n = shape.attention_ranks
        if rank == 0:
            q = torch.zeros((n, shape.q_bytes), dtype=torch.uint8, device=device)
            k = torch.zeros((n, shape.kv_bytes), dtype=torch.uint8, device=device)
            v = torch.zeros((n, shape.kv_bytes), dtype=torch.uint8, device=device)
            out = torch.zeros((n, shape.out_bytes), dtype=torch.uint8, device=device)
        else:
            q = torch.zeros(shape.q_bytes, dtype=torch.uint8, device=device)
            k = torch.zeros(shape.kv_bytes, dtype=torch.uint8, device=device)
            v = torch.zeros(shape.kv_bytes, dtype=torch.uint8, device=device)
            out = torch.full((shape.out_bytes,), rank, dtype=torch.uint8, device=device)
        dist.barrier()
        layer_ns, step_ns = [], []
        for step in range(warmup + steps):
            t_step = time.perf_counter_ns()
            for _ in range(shape.layers):
                t0 = time.perf_counter_ns()
                if rank == 0:
                    reqs = []
                    for i in range(n):
                        reqs += [dist.isend(q[i], i + 1), dist.isend(k[i], i + 1), dist.isend(v[i], i + 1)]
                    reqs += [dist.irecv(out[i], i + 1) for i in range(n)]
                else:
                    reqs = [dist.irecv(q, 0), dist.irecv(k, 0), dist.irecv(v, 0)]
                    for r in reqs:
                        r.wait()
                    reqs = [dist.isend(out, 0)]
                for r in reqs:
                    r.wait()
                if device != "cpu":
                    torch.cuda.synchronize()
                if step >= warmup and rank == 0:
                    layer_ns.append(time.perf_counter_ns() - t0)
            if step >= warmup and rank == 0:
                step_ns.append(time.perf_counter_ns() - t_step)
        if rank == 0 and not all(bool((out[i] == i + 1).all()) for i in range(n)):
            raise RuntimeError(f"exchange over {backend}: an output arrived corrupted")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return {"transport": backend, "layer_ns": layer_ns, "step_ns": step_ns} if rank == 0 else None


def _torch_main(queue, *args) -> None:
    from .bench_cli import _report

    _report(queue, torch_rank, args)


def pick_backend(world_size: int) -> tuple[str | None, str]:
    """(backend, why not): NCCL when every rank can have a GPU of its own, else Gloo on CPU tensors."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        return None, "torch is not installed (pip install torch)"
    if not dist.is_available():
        return None, "this torch build has no torch.distributed"
    if torch.cuda.is_available() and dist.is_nccl_available():
        if torch.cuda.device_count() >= world_size:
            return "nccl", ""
        # NCCL refuses two ranks on one GPU; say so and measure Gloo instead.
        print(f"bench exchange: NCCL needs {world_size} GPUs, {torch.cuda.device_count()} present; "
              "using Gloo on CPU tensors", file=sys.stderr)
    if not dist.is_gloo_available():
        return None, "this torch build has no Gloo backend"
    return "gloo", ""


# ---------------------------------------------------------------- CLI

def add_arguments(sub) -> None:
    ex = sub.add_parser("exchange", help="the decode exchange: q/k/v head shards out to N attention ranks and the "
                                         "attention output back, per layer, against torch.distributed")
    ex.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"planner preset (llama-33b, llama-65b, llama3-70b) or a config.json (default {DEFAULT_MODEL})")
    ex.add_argument("--batch", default="300",
                    help="decode batch size; comma-separated for a sweep (e.g. 1,32,300; default 300)")
    ex.add_argument("--attention-ranks", type=int, default=2, help="attention-side ranks N (default 2)")
    ex.add_argument("--layers", type=int, help="layers per decode step (default: the model's; fewer for a quick run)")
    ex.add_argument("--dtype", help="element type override (default: the model's)")
    ex.add_argument("--steps", type=int, default=5, help="measured decode steps (default 5)")
    ex.add_argument("--warmup", type=int, default=1, help="unmeasured decode steps first (default 1)")
    ex.add_argument("--transport", default="shm,tcp",
                    help="comma-separated: shm, tcp, verbs, auto (default shm,tcp)")
    ex.add_argument("--baseline", default="torch", choices=["torch", "none"],
                    help="torch: the same exchange over torch.distributed (NCCL when every rank has a GPU, else "
                         "Gloo); none: lamina-net only")
    ex.add_argument("--timeout", type=float, default=60.0, help="bound in seconds for each wait")
    ex.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    ex.add_argument("--plot", metavar="PATH.png", help="per-layer time against bytes per layer (needs matplotlib)")


def _record(system: str, result: dict, shape: ExchangeShape, steps: int) -> dict:
    per_layer, per_step = _summary(result["layer_ns"]), _summary(result["step_ns"])
    return {"bench": "exchange", "system": system, "metric": "latency", "transport": result["transport"],
            "op": "exchange", "path": "host", "size_bytes": shape.layer_bytes, **asdict(shape), "steps": steps,
            "per_layer_us": per_layer, "per_step_us": per_step,
            "p50_us": per_layer["p50"], "p99_us": per_layer["p99"],
            "gb_per_s": shape.layer_bytes / (per_layer["p50"] * 1e3) if per_layer["p50"] > 0 else None}


def run_exchange(args: argparse.Namespace) -> int:
    from .bench_cli import _free_port, _run_pair

    try:
        batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"lamina-net bench exchange: --batch must be comma-separated integers, got {args.batch!r}")
    if args.steps <= 0 or args.warmup < 0 or not args.timeout > 0:
        raise SystemExit("lamina-net bench exchange: --steps must be > 0, --warmup >= 0, --timeout > 0")
    transports = [t.strip() for t in args.transport.split(",") if t.strip()]
    for t in transports:
        if t not in ("shm", "tcp", "verbs", "auto"):
            raise SystemExit(f"lamina-net bench exchange: unknown transport {t!r} (shm, tcp, verbs, auto)")
    try:
        shapes = [exchange_shape(args.model, b, args.attention_ranks, args.layers, args.dtype) for b in batches]
    except UsageError as e:
        raise SystemExit(f"lamina-net bench exchange: {e}")
    if not shapes:
        raise SystemExit("lamina-net bench exchange: --batch is empty")
    world = args.attention_ranks + 1
    backend, why_not = pick_backend(world) if args.baseline == "torch" else (None, "")
    if args.baseline == "torch" and backend is None:
        print(f"bench exchange: torch baseline skipped: {why_not}", file=sys.stderr)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Every wait inside is bounded by --timeout; this only catches a rank stuck outside them.
    wait_s = args.timeout * (3 + args.warmup + args.steps) + 60
    records = []
    single = len(shapes) * (len(transports) + (backend is not None)) == 1
    with bench_report.progress(0 if single else len(shapes) * (len(transports) + (backend is not None)),
                               "bench exchange") as bar:
        for shape in shapes:
            step_args = (shape, args.steps, args.warmup, args.timeout)
            ours = []
            for t in transports:
                store = f"127.0.0.1:{_free_port()}"
                group = f"exchange-{os.getpid()}-{t}-{shape.batch}"
                result = _run_pair(_lamina_main, lambda r: (r, world, store, t, *step_args, group, single),
                                   f"{t} exchange", wait_s, nranks=world)
                ours.append(_record("lamina-net", result, shape, args.steps))
                bar.update()
            base = None
            if backend is not None:
                port = _free_port()
                try:
                    result = _run_pair(_torch_main, lambda r: (r, world, port, backend, *step_args),
                                       f"{backend} exchange", wait_s, nranks=world)
                    base = _record(f"torch-{backend}", result, shape, args.steps)
                except RuntimeError as e:  # the baseline failing must not lose lamina-net's figures
                    print(f"bench exchange: {backend} baseline failed: {e}", file=sys.stderr)
                bar.update()
            for r in ours:
                if base is not None:
                    r[f"{backend}_per_layer_p50_us"] = base["per_layer_us"]["p50"]
                    r[f"ratio_vs_{backend}"] = r["per_layer_us"]["p50"] / base["per_layer_us"]["p50"]
                    r[f"ratio_vs_{backend}_per_step"] = r["per_step_us"]["p50"] / base["per_step_us"]["p50"]
            records += ours + ([base] if base is not None else [])
    print_table(records)
    bench_report.emit(records, args, "exchange", "bytes per layer (q, k, v out and attention output back)")
    return 0


def print_table(records: list[dict], file=sys.stdout) -> None:
    if not records:
        return
    r0 = records[0]
    print(f"model {r0['model']}, {r0['attention_ranks']} attention ranks, {r0['layers']} layers per step, "
          f"{r0['steps']} steps", file=file)
    header = (f"{'system':<11} {'transport':<9} {'batch':>6} {'bytes/layer':>12} {'layer p50':>10} "
              f"{'layer p99':>10} {'step p50':>11} {'step p99':>11} {'GB/s':>7} {'vs base':>8} {'speedup':>8}")
    print(header, file=file)
    print("-" * len(header), file=file)
    for r in records:
        ratio = next((v for k, v in r.items() if k.startswith("ratio_vs_") and not k.endswith("_per_step")), None)
        cells = f"{ratio:8.3f} {1 / ratio:7.1f}x" if ratio else f"{'-':>8} {'-':>8}"
        gbps = f"{r['gb_per_s']:7.2f}" if r.get("gb_per_s") else f"{'-':>7}"
        print(f"{r['system']:<11} {r['transport']:<9} {r['batch']:>6} {r['size_bytes']:>12} "
              f"{r['per_layer_us']['p50']:10.1f} {r['per_layer_us']['p99']:10.1f} {r['per_step_us']['p50']:11.1f} "
              f"{r['per_step_us']['p99']:11.1f} {gbps} {cells}", file=file)
    print("times in us; layer: q, k, v head shards to every attention rank (one batch of puts per rank, "
          "Channel.put_many, into registered buffers; the last put signals) and each rank's attention output "
          "back; step: all layers. vs base = lamina-net layer p50 / the torch.distributed layer p50, same "
          "shapes, this run; speedup = its inverse", file=file)
