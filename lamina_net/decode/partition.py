"""Head-wise partitioning of attention across attention workers.

The KV cache is split by KV head (as in Lamina: chosen over request-wise
splitting for load balance, every worker works on every batch). Query heads
follow their KV head, so a worker holding KV heads ``[a, b)`` also computes the
query heads ``[a*G, b*G)`` where ``G`` is the GQA group size. When the number of
workers does not divide the number of KV heads the split is uneven (sizes differ
by at most one); more workers than KV heads is refused, because a worker with no
heads would have nothing to do.
"""
from __future__ import annotations

from dataclasses import dataclass


class HeadSplitError(ValueError):
    """The attention heads cannot be partitioned over the requested workers."""


@dataclass(frozen=True)
class HeadShard:
    """The heads one attention worker owns (half-open ranges)."""

    worker: int
    kv_heads: tuple[int, int]
    q_heads: tuple[int, int]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def num_q_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]


@dataclass(frozen=True)
class HeadPartition:
    """How the attention heads of every layer are spread over the workers."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    shards: tuple[HeadShard, ...]

    @property
    def group_size(self) -> int:
        """GQA group size G: query heads per KV head (1 for MHA)."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def num_workers(self) -> int:
        return len(self.shards)

    @property
    def is_even(self) -> bool:
        return len({s.num_kv_heads for s in self.shards}) == 1

    def describe(self) -> str:
        parts = [f"worker {s.worker}: kv heads {s.kv_heads[0]}..{s.kv_heads[1] - 1}, "
                 f"q heads {s.q_heads[0]}..{s.q_heads[1] - 1}" for s in self.shards]
        return "; ".join(parts)


def partition_heads(num_q_heads: int, num_kv_heads: int, head_dim: int, num_workers: int) -> HeadPartition:
    """Split ``num_kv_heads`` KV heads (and their query groups) over ``num_workers``.

    Raises :class:`HeadSplitError` with an explanation when no split exists.
    """
    if num_workers < 1:
        raise HeadSplitError(f"need at least one attention worker, got {num_workers}")
    if num_kv_heads < 1 or num_q_heads < 1:
        raise HeadSplitError(f"bad head counts: {num_q_heads} query heads, {num_kv_heads} KV heads")
    if num_q_heads % num_kv_heads:
        raise HeadSplitError(
            f"{num_q_heads} query heads is not a multiple of {num_kv_heads} KV heads (not MHA/GQA)")
    if num_workers > num_kv_heads:
        raise HeadSplitError(
            f"cannot split {num_kv_heads} KV heads over {num_workers} attention workers: the KV cache "
            f"is partitioned by head, so at most {num_kv_heads} workers can be used")
    group = num_q_heads // num_kv_heads
    base, extra = divmod(num_kv_heads, num_workers)
    shards = []
    start = 0
    for worker in range(num_workers):
        count = base + (1 if worker < extra else 0)
        shards.append(HeadShard(worker, (start, start + count), (start * group, (start + count) * group)))
        start += count
    return HeadPartition(num_q_heads, num_kv_heads, head_dim, tuple(shards))
