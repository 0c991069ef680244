"""Rendering a Plan: the stdout table, the JSON document and the PNG plot."""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Optional

from .devices import DeviceSpec
from .errors import PlanError
from .estimate import Estimate, Plan, tokens_per_dollar_curve

KIB = 1024
GIB = 2**30


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isinf(value)) else format(value, spec)


def _device_line(role: str, device: DeviceSpec) -> str:
    return (f"{role:<9} {device.label}: {device.bf16_tflops:g} TFLOPS bf16, {device.memory_gb:g} GiB, "
            f"{device.memory_bandwidth_gbs:g} GB/s HBM, ${device.price_per_hour:.2f}/h, "
            f"{device.nic_gbps:g} Gb/s NIC")


def _at_max_batch(e: Estimate, attribute: str) -> Optional[float]:
    """A figure of the same deployment filled to its largest batch (None if nothing fits)."""
    return None if e.at_max_batch is None else getattr(e.at_max_batch, attribute)


_COLUMNS = (
    # header, width, cell(estimate)
    ("deployment", 11, lambda e: e.deployment.name),
    ("$/h", 7, lambda e: f"{e.deployment.cost_per_hour:.2f}"),
    ("max B", 6, lambda e: str(e.max_batch)),
    ("MTIME ms", 8, lambda e: f"{e.mtime_s * 1e3:.2f}"),
    ("ATIME ms", 8, lambda e: f"{e.atime_s * 1e3:.2f}"),
    ("min GB/s", 8, lambda e: _fmt(None if e.min_bandwidth is None else e.min_bandwidth / 1e9, ".1f")),
    ("NIC GB/s", 8, lambda e: _fmt(e.deployment.nic_bytes_per_s / 1e9, ".0f")),
    ("iter ms", 8, lambda e: f"{e.iteration_time_s * 1e3:.2f}"),
    ("tok/s", 7, lambda e: _fmt(e.throughput, ".0f")),
    ("tok/$", 7, lambda e: _fmt(e.tokens_per_dollar, ".0f")),
    ("tok/$ @max B", 12, lambda e: _fmt(_at_max_batch(e, "tokens_per_dollar"), ".0f")),
)


def _best_line(label: str, best: Optional[Estimate]) -> str:
    if best is None:
        return f"{label}: none fits this batch in memory"
    return (f"{label}: {best.deployment.name} at ${best.deployment.cost_per_hour:.2f}/h, "
            f"{best.throughput:.0f} tok/s, {best.tokens_per_dollar:.0f} tokens per dollar")


def format_table(plan: Plan) -> str:
    """Human-readable summary: inputs, per-model sizes, one row per deployment, the winners."""
    model, a = plan.model, plan.assumptions
    lines = [
        f"model     {model.name}: L={model.num_layers} d={model.hidden_size} heads={model.num_heads} "
        f"kv_heads={model.num_kv_heads} (G={model.group_size}) e={model.dtype_bytes} bytes, "
        f"{model.parameters / 1e9:.2f}B params = {model.weight_bytes / GIB:.1f} GiB of weights",
        f"KV cache  {model.kv_bytes_per_token_per_layer / KIB:g} KiB per token per layer, "
        f"{model.kv_bytes_per_token / KIB:g} KiB per token",
        f"network   {model.network_bytes_per_token_per_layer / KIB:g} KiB per token per layer "
        f"((2 + 2/G) * e * d), {model.network_bytes_per_token_per_layer * model.num_layers * plan.batch / 1e6:.1f}"
        f" MB per iteration at batch {plan.batch}",
        _device_line("compute", plan.compute),
        _device_line("attention", plan.attention),
        f"inputs    context {plan.context} tokens, batch {plan.batch}, alpha {plan.alpha:g}; efficiency "
        f"compute {a.compute_efficiency:g} memory {a.memory_efficiency:g} network {a.network_efficiency:g}; "
        f"memory fraction {a.memory_fraction:g}; round trip {a.round_trip_us:g} us/layer; "
        f"microbatches {a.microbatches}",
        "",
    ]
    header = "  ".join(f"{name:>{width}}" if i else f"{name:<{width}}"
                       for i, (name, width, _) in enumerate(_COLUMNS)) + "  note"
    lines += [header, "-" * len(header)]
    best = plan.best
    for e in plan.estimates:
        cells = "  ".join(f"{cell(e):>{width}}" if i else f"{cell(e):<{width}}"
                          for i, (_, width, cell) in enumerate(_COLUMNS))
        notes = list(e.notes) + (["best"] if e is best else [])
        lines.append(f"{cells}  {'; '.join(notes)}".rstrip())
    if not plan.estimates:
        lines.append("(no deployment can hold the weights; try --max-devices or bigger devices)")
    lines += ["", _best_line(f"best DOP split at batch {plan.batch}", plan.best_dop),
              _best_line(f"best homogeneous at batch {plan.batch}", plan.best_homogeneous)]
    peak = plan.best_at_max_batch
    if peak is not None:
        lines.append(_best_line("best at its own largest batch", peak.at_max_batch)
                     + f" (batch {peak.max_batch})")
    return "\n".join(lines) + "\n"


def _estimate_dict(e: Estimate) -> dict[str, Any]:
    d = e.deployment
    return {
        "name": d.name,
        "kind": "dop" if d.disaggregated else "homogeneous",
        "compute_device": d.compute.name,
        "compute_devices": d.num_compute,
        "attention_device": d.attention.name if d.disaggregated else None,
        "attention_devices": d.num_attention,
        "cost_per_hour": d.cost_per_hour,
        "max_batch": e.max_batch,
        "fits": e.fits,
        "mtime_s": e.mtime_s,
        "atime_s": e.atime_s,
        "network_bytes_per_iteration": e.network_bytes,
        "min_bandwidth_gbs": None if e.min_bandwidth is None else e.min_bandwidth / 1e9,
        "nic_bandwidth_gbs": None if not d.disaggregated else d.nic_bytes_per_s / 1e9,
        "network_time_s": e.network_time_s,
        "iteration_time_s": e.iteration_time_s,
        "throughput_tokens_per_s": e.throughput,
        "tokens_per_dollar": e.tokens_per_dollar,
        "notes": list(e.notes),
        "max_batch_throughput_tokens_per_s": _at_max_batch(e, "throughput"),
        "max_batch_tokens_per_dollar": _at_max_batch(e, "tokens_per_dollar"),
    }


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The table's numbers in SI units (seconds, bytes, GB/s = 1e9 B/s, dollars)."""
    model = plan.model
    best = {key: (None if e is None else e.deployment.name)
            for key, e in (("best", plan.best), ("best_dop", plan.best_dop),
                           ("best_homogeneous", plan.best_homogeneous),
                           ("best_at_max_batch", plan.best_at_max_batch))}
    return {
        "inputs": {"context": plan.context, "batch": plan.batch, "alpha": plan.alpha},
        "assumptions": asdict(plan.assumptions),
        "model": {
            **asdict(model),
            "group_size": model.group_size,
            "parameters": model.parameters,
            "weight_bytes": model.weight_bytes,
            "flops_per_token": model.flops_per_token,
            "kv_bytes_per_token_per_layer": model.kv_bytes_per_token_per_layer,
            "kv_bytes_per_token": model.kv_bytes_per_token,
            "network_bytes_per_token_per_layer": model.network_bytes_per_token_per_layer,
            "network_bytes_per_iteration": model.network_bytes_per_token_per_layer * model.num_layers * plan.batch,
        },
        "devices": {"compute": asdict(plan.compute), "attention": asdict(plan.attention)},
        "deployments": [_estimate_dict(e) for e in plan.estimates],
        **best,
    }


def _batch_grid(max_batch: int, points: int = 160) -> list[int]:
    """Up to ``points`` batch sizes from 1 to max_batch, denser at small batches."""
    if max_batch <= points:
        return list(range(1, max_batch + 1))
    ratio = max_batch ** (1 / (points - 1))
    return sorted({max(1, min(max_batch, round(ratio**i))) for i in range(points)} | {max_batch})


def plot_tokens_per_dollar(plan: Plan, path: str, max_dop_lines: int = 6) -> None:
    """Write a PNG of tokens per dollar against batch size, each curve up to its memory limit.

    Every homogeneous deployment is drawn (dashed); of the DOP splits only the
    ``max_dop_lines`` with the highest peak tokens per dollar, to stay legible.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlanError("--plot needs matplotlib: pip install matplotlib "
                        "(or pip install 'lamina-net[plot]')") from exc

    curves = []
    for e in plan.estimates:
        if e.max_batch < 1:
            continue
        batches = _batch_grid(e.max_batch)
        values = tokens_per_dollar_curve(plan.model, e.deployment, plan.context, plan.assumptions, batches)
        curves.append((e.deployment, batches, values, max(v for v in values if v is not None)))
    dop = sorted((c for c in curves if c[0].disaggregated), key=lambda c: c[3], reverse=True)[:max_dop_lines]
    homogeneous = [c for c in curves if not c[0].disaggregated]

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for rank, (deployment, batches, values, _) in enumerate(homogeneous + dop):
        label = (f"{deployment.name} {deployment.compute.label}+{deployment.attention.label}"
                 if deployment.disaggregated else deployment.name)
        # N x GPU curves coincide (the roofline scales cost and speed alike) and differ only in
        # where they end, so earlier ones are drawn wider to stay visible under later ones;
        # the dot marks each deployment's largest batch.
        width = 1.5 + max(0, len(homogeneous) - 1 - rank) * 1.5 if not deployment.disaggregated else 1.5
        line, = ax.plot(batches, values, "-" if deployment.disaggregated else "--", linewidth=width,
                        label=f"{label} (${deployment.cost_per_hour:.2f}/h, max batch {batches[-1]})")
        ax.plot(batches[-1:], values[-1:], "o", color=line.get_color())
    ax.axvline(plan.batch, color="grey", linestyle=":", linewidth=1, label=f"batch {plan.batch}")
    ax.set_xlabel("batch size (requests decoded together)")
    ax.set_ylabel("tokens per dollar")
    ax.set_title(f"{plan.model.name}, context {plan.context}: throughput per dollar (roofline estimate)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=110)
    except OSError as exc:
        raise PlanError(f"cannot write plot {path}: {exc}") from exc
    finally:
        plt.close(fig)
