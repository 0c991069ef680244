"""Roofline estimates of decode iterations for homogeneous and disaggregated deployments.

One decode iteration advances every request of a batch of B by one token.

* MTIME(B): the non-attention part (q/k/v/o projections, FFN, LM head) on the
  compute devices, tensor parallel over ``a`` of them:
  ``max(B * FLOPs/token / (a * peak * compute_eff), weight bytes / (a * HBM * memory_eff))``.
* ATIME(B, ctx): attention over a KV cache of ``ctx`` tokens per request on
  ``b`` devices, KV heads split across them:
  ``max(attention FLOPs / (b * peak * compute_eff), B * ctx * KV bytes/token / (b * HBM * memory_eff))``.
  The memory term dominates for every preset (attention does 1-8 FLOPs per
  KV byte, far below any device's ridge point).
* Network (disaggregated only): ``(2 + 2/G) * e * d * B * L`` bytes per
  iteration plus one round trip per layer.

Tensor-parallel all-reduces, activations, kernel launch gaps and prefill are
ignored; the efficiency factors stand in for everything a roofline misses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from .devices import DeviceSpec
from .errors import PlanError
from .model import ModelSpec

# Lamina's measured kernel-to-kernel round trip for small messages (paper, 400 Gb/s RoCE).
PAPER_ROUND_TRIP_US = 33.0


@dataclass(frozen=True)
class Assumptions:
    """Knobs of the roofline model; the defaults are documented in docs/plan.md."""

    compute_efficiency: float = 0.6   # fraction of peak BF16 FLOPS skinny decode GEMMs reach
    memory_efficiency: float = 0.8    # fraction of HBM bandwidth weight/KV streaming reaches
    network_efficiency: float = 0.9   # fraction of NIC line rate (paper: 91.4% for large messages)
    memory_fraction: float = 0.9      # share of device memory usable for weights + KV cache
    round_trip_us: float = PAPER_ROUND_TRIP_US  # per layer: send q/k/v, get the output back
    microbatches: int = 1             # >1: compute and attention pools overlap on batch slices

    def __post_init__(self) -> None:
        for name in ("compute_efficiency", "memory_efficiency", "network_efficiency", "memory_fraction"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise PlanError(f"{name} must be in (0, 1], got {value}")
        if not self.round_trip_us >= 0:
            raise PlanError(f"round_trip_us must be >= 0, got {self.round_trip_us}")
        if self.microbatches < 1:
            raise PlanError(f"microbatches must be >= 1, got {self.microbatches}")


@dataclass(frozen=True)
class Deployment:
    """``num_compute`` compute devices plus ``num_attention`` attention devices.

    ``num_attention == 0`` is a homogeneous deployment: weights and KV cache
    share the compute devices (tensor parallel), nothing crosses a NIC.
    """

    compute: DeviceSpec
    num_compute: int
    attention: Optional[DeviceSpec] = None
    num_attention: int = 0

    def __post_init__(self) -> None:
        if self.num_compute < 1 or self.num_attention < 0:
            raise PlanError(f"need >= 1 compute and >= 0 attention devices, got {self.num_compute}, "
                            f"{self.num_attention}")
        if (self.attention is None) != (self.num_attention == 0):
            raise PlanError("an attention device type goes with a positive attention device count")

    @property
    def disaggregated(self) -> bool:
        return self.num_attention > 0

    @property
    def name(self) -> str:
        if self.disaggregated:
            return f"DOP({self.num_compute},{self.num_attention})"
        return f"{self.num_compute}x{self.compute.label}"

    @property
    def cost_per_hour(self) -> float:
        cost = self.num_compute * self.compute.price_per_hour
        if self.disaggregated:
            cost += self.num_attention * self.attention.price_per_hour
        return cost

    @property
    def attention_device(self) -> DeviceSpec:
        return self.attention if self.disaggregated else self.compute

    @property
    def attention_count(self) -> int:
        return self.num_attention if self.disaggregated else self.num_compute

    @property
    def nic_bytes_per_s(self) -> float:
        """Aggregate line rate between the pools: the slower side's NICs bound it."""
        if not self.disaggregated:
            return math.inf
        return min(self.num_compute * self.compute.nic_bytes_per_s,
                   self.num_attention * self.attention.nic_bytes_per_s)


@dataclass
class Estimate:
    """All figures for one deployment at one batch size; times in s, bytes, B/s."""

    deployment: Deployment
    batch: int
    context: int
    max_batch: int
    mtime_s: float
    atime_s: float
    network_bytes: float
    min_bandwidth: Optional[float]
    network_time_s: float
    iteration_time_s: float
    notes: list[str] = field(default_factory=list)
    # The same deployment filled to max_batch (set by make_plan): where its tokens per dollar peak,
    # since throughput B / (c0 + c1 * B) only grows with B.
    at_max_batch: Optional["Estimate"] = None

    @property
    def fits(self) -> bool:
        return 1 <= self.batch <= self.max_batch

    @property
    def throughput(self) -> Optional[float]:
        """Generated tokens per second, or None when the batch does not fit in memory."""
        return self.batch / self.iteration_time_s if self.fits else None

    @property
    def tokens_per_dollar(self) -> Optional[float]:
        throughput = self.throughput
        return None if throughput is None else throughput * 3600 / self.deployment.cost_per_hour


def roofline_time(flops: float, nbytes: float, device: DeviceSpec, count: int, assumptions: Assumptions) -> float:
    """Time on ``count`` devices splitting the work evenly: compute or memory bound, whichever is slower."""
    compute = flops / (count * device.flops_per_s * assumptions.compute_efficiency)
    memory = nbytes / (count * device.bandwidth_bytes_per_s * assumptions.memory_efficiency)
    return max(compute, memory)


def model_time(model: ModelSpec, batch: float, device: DeviceSpec, count: int, assumptions: Assumptions) -> float:
    """MTIME: every non-attention weight is read once and multiplied by every token."""
    return roofline_time(batch * model.flops_per_token, model.matmul_params * model.dtype_bytes,
                         device, count, assumptions)


def attention_time(model: ModelSpec, batch: float, context: int, device: DeviceSpec, count: int,
                   assumptions: Assumptions) -> float:
    """ATIME: every request reads its whole KV cache once per iteration."""
    flops = batch * model.num_layers * model.attention_flops_per_token_per_layer(context)
    nbytes = batch * context * model.kv_bytes_per_token
    return roofline_time(flops, nbytes, device, count, assumptions)


def network_bytes_per_iteration(model: ModelSpec, batch: float) -> float:
    """(2 + 2/G) * e * d * B * L: q, k, v out and the attention output back, every layer."""
    return model.network_bytes_per_token_per_layer * batch * model.num_layers


def min_network_bandwidth(network_bytes: float, mtime_s: float, atime_s: float, alpha: float) -> float:
    """Bandwidth (B/s) at which moving ``network_bytes`` takes alpha * (MTIME + ATIME)."""
    return network_bytes / (alpha * (mtime_s + atime_s))


def max_batch(model: ModelSpec, deployment: Deployment, context: int, assumptions: Assumptions) -> int:
    """Largest batch whose KV cache fits once the weights are placed (0: weights do not fit)."""
    fraction = assumptions.memory_fraction
    weight_room = deployment.num_compute * deployment.compute.memory_bytes * fraction
    if model.weight_bytes > weight_room:
        return 0
    if deployment.disaggregated:
        kv_room = deployment.num_attention * deployment.attention.memory_bytes * fraction
    else:
        kv_room = weight_room - model.weight_bytes
    return int(kv_room // (context * model.kv_bytes_per_token))


def iteration_time(model: ModelSpec, deployment: Deployment, batch: float, context: int,
                   assumptions: Assumptions) -> tuple[float, float]:
    """(iteration time, network time) for ``batch`` requests.

    Homogeneous: MTIME + ATIME on the same devices. Disaggregated with n
    microbatches of B/n: each slice goes compute -> wire -> attention -> wire
    in turn while the other slices keep the two pools busy, so an iteration
    takes the longest of n x each stage's time and one slice's full cycle.
    With n = 1 that is MTIME + ATIME + network time, nothing overlapped.
    """
    if not deployment.disaggregated:
        return (model_time(model, batch, deployment.compute, deployment.num_compute, assumptions)
                + attention_time(model, batch, context, deployment.compute, deployment.num_compute, assumptions),
                0.0)
    n = assumptions.microbatches
    wire_rate = deployment.nic_bytes_per_s * assumptions.network_efficiency
    latency = model.num_layers * assumptions.round_trip_us * 1e-6
    network_time = latency + network_bytes_per_iteration(model, batch) / wire_rate
    slice_batch = batch / n
    slice_model = model_time(model, slice_batch, deployment.compute, deployment.num_compute, assumptions)
    slice_attention = attention_time(model, slice_batch, context, deployment.attention,
                                     deployment.num_attention, assumptions)
    slice_wire = network_bytes_per_iteration(model, slice_batch) / wire_rate
    slice_cycle = slice_model + slice_attention + latency + slice_wire
    return max(n * slice_model, n * slice_attention, n * slice_wire, slice_cycle), network_time


def estimate(model: ModelSpec, deployment: Deployment, batch: int, context: int, alpha: float,
             assumptions: Assumptions = Assumptions()) -> Estimate:
    """Every figure the planner reports for one deployment at one batch size."""
    if batch < 1:
        raise PlanError(f"batch must be >= 1, got {batch}")
    if context < 1:
        raise PlanError(f"context must be >= 1, got {context}")
    if not 0 < alpha < 1:
        raise PlanError(f"alpha must be in (0, 1), got {alpha}")
    mtime = model_time(model, batch, deployment.compute, deployment.num_compute, assumptions)
    atime = attention_time(model, batch, context, deployment.attention_device, deployment.attention_count,
                           assumptions)
    iteration, network_time = iteration_time(model, deployment, batch, context, assumptions)
    notes = []
    capacity = max_batch(model, deployment, context, assumptions)
    if capacity == 0:
        notes.append("weights do not fit")
    elif batch > capacity:
        notes.append(f"batch > max {capacity}")
    min_bandwidth = None
    network_bytes = 0.0
    if deployment.disaggregated:
        network_bytes = network_bytes_per_iteration(model, batch)
        min_bandwidth = min_network_bandwidth(network_bytes, mtime, atime, alpha)
        if min_bandwidth > deployment.nic_bytes_per_s:
            notes.append("NICs too slow for alpha")
    return Estimate(deployment=deployment, batch=batch, context=context, max_batch=capacity,
                    mtime_s=mtime, atime_s=atime, network_bytes=network_bytes, min_bandwidth=min_bandwidth,
                    network_time_s=network_time, iteration_time_s=iteration, notes=notes)


def candidate_deployments(model: ModelSpec, compute: DeviceSpec, attention: DeviceSpec, max_devices: int = 8,
                          dop_splits: Optional[Sequence[tuple[int, int]]] = None,
                          tp_sizes: Optional[Sequence[int]] = None) -> list[Deployment]:
    """Homogeneous N x compute and DOP(a, b) splits to compare.

    By default N and a range over 1..max_devices dividing the attention-head
    count (tensor parallelism splits heads) and b over 1..max_devices dividing
    the KV-head count (Lamina partitions the KV cache head-wise). Explicit
    ``dop_splits``/``tp_sizes`` must satisfy the same divisibility.
    """
    if max_devices < 1:
        raise PlanError(f"max devices must be >= 1, got {max_devices}")

    def check(count: int, heads: int, what: str) -> None:
        if count < 1:
            raise PlanError(f"{what} must be >= 1, got {count}")
        if heads % count:
            raise PlanError(f"{what} = {count} does not divide the model's {heads} heads "
                            "(heads are partitioned across devices)")

    if tp_sizes is None:
        tp_sizes = [n for n in range(1, max_devices + 1) if model.num_heads % n == 0]
    if dop_splits is None:
        dop_splits = [(a, b) for a in range(1, max_devices + 1) if model.num_heads % a == 0
                      for b in range(1, max_devices + 1) if model.num_kv_heads % b == 0]
    deployments = []
    for n in tp_sizes:
        check(n, model.num_heads, "tensor-parallel size")
        deployments.append(Deployment(compute, n))
    for a, b in dop_splits:
        check(a, model.num_heads, "compute devices a")
        check(b, model.num_kv_heads, "attention devices b")
        deployments.append(Deployment(compute, a, attention, b))
    return deployments


@dataclass
class Plan:
    """Estimates for every candidate at the requested batch, and the winners by tokens per dollar."""

    model: ModelSpec
    compute: DeviceSpec
    attention: DeviceSpec
    batch: int
    context: int
    alpha: float
    assumptions: Assumptions
    estimates: list[Estimate]

    def _best(self, estimates: Iterable[Estimate]) -> Optional[Estimate]:
        feasible = [e for e in estimates if e.tokens_per_dollar is not None]
        return max(feasible, key=lambda e: e.tokens_per_dollar, default=None)

    @property
    def best_dop(self) -> Optional[Estimate]:
        return self._best(e for e in self.estimates if e.deployment.disaggregated)

    @property
    def best_homogeneous(self) -> Optional[Estimate]:
        return self._best(e for e in self.estimates if not e.deployment.disaggregated)

    @property
    def best(self) -> Optional[Estimate]:
        return self._best(self.estimates)

    @property
    def best_at_max_batch(self) -> Optional[Estimate]:
        """The deployment with the most tokens per dollar when each runs at its own largest batch."""
        filled = [e for e in self.estimates if e.at_max_batch is not None]
        return max(filled, key=lambda e: e.at_max_batch.tokens_per_dollar, default=None)


def make_plan(model: ModelSpec, compute: DeviceSpec, attention: DeviceSpec, batch: int, context: int,
              alpha: float = 0.2, assumptions: Assumptions = Assumptions(), max_devices: int = 8,
              dop_splits: Optional[Sequence[tuple[int, int]]] = None,
              tp_sizes: Optional[Sequence[int]] = None, include_unplaceable: bool = False) -> Plan:
    """Estimate every candidate deployment at ``batch``.

    Deployments that cannot even hold the weights are dropped unless
    ``include_unplaceable`` or they were asked for explicitly.
    """
    estimates = []
    for deployment in candidate_deployments(model, compute, attention, max_devices, dop_splits, tp_sizes):
        result = estimate(model, deployment, batch, context, alpha, assumptions)
        if result.max_batch > 0:
            result.at_max_batch = estimate(model, deployment, result.max_batch, context, alpha, assumptions)
        asked_for = (dop_splits if deployment.disaggregated else tp_sizes) is not None
        if result.max_batch > 0 or include_unplaceable or asked_for:
            estimates.append(result)
    return Plan(model, compute, attention, batch, context, alpha, assumptions, estimates)


def tokens_per_dollar_curve(model: ModelSpec, deployment: Deployment, context: int,
                            assumptions: Assumptions, batches: Sequence[int]) -> list[Optional[float]]:
    """Tokens per dollar at each batch size (None where the batch does not fit)."""
    # alpha only affects the min-bandwidth figure, not throughput; any valid value will do.
    return [estimate(model, deployment, b, context, 0.5, assumptions).tokens_per_dollar for b in batches]
