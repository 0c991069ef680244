"""The model worker: runs a converted model and exchanges activations with the attention workers.

Per layer and micro-batch it packs q and the new tokens' k/v of each worker's
heads into one message per worker, posts the sends and the receive of the
reply without blocking, and *passes the turn* to the next micro-batch, which
computes its own layer up to its attention meanwhile. When the turn comes
back, the replies (attention output per head shard) are concatenated by head.
This is Lamina's rotational staggered pipelining run by one model worker as
interleaving: with ``n`` micro-batches, the attention workers compute one
micro-batch while the model worker computes another; ``n = 1`` is plain
model-attention disaggregation.

Each micro-batch runs its forward passes in its own thread (the attention
hook is called deep inside the model's code, so a thread is what can pause
there); a turn token lets exactly one of them compute at a time.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

import torch

from .converter import (CONTEXT_KWARG, ModelGeometry, PassThroughCache, cache_kwargs, forward_kwargs,
                        offload_attention)
from .link import Link, PipelineError, WorkerFailure
from .partition import HeadPartition, partition_heads
from .protocol import (DTYPE_CODES, FLAG_HAS_MASK, FLAG_RESET, HEADER_BYTES, STATS_FIELDS, TRAILER_BYTES, Kind,
                       float_bits)


@dataclass
class WorkerStats:
    """Counters an attention worker reports back (``Kind.STATS``)."""

    layer_messages: int
    attention_seconds: float
    decode_layer_messages: int
    decode_attention_seconds: float
    idle_seconds: float
    kv_bytes: int

    @property
    def decode_attention_per_layer(self) -> float:
        return self.decode_attention_seconds / self.decode_layer_messages if self.decode_layer_messages else 0.0


@dataclass
class RecoveryStats:
    """One lost attention worker, replaced during a :meth:`ModelWorker.generate` call (seconds)."""

    worker: int  # head shard index
    cause: str
    detected_s: float  # the unanswered request posted -> the loss raised here
    replace_s: float = 0.0  # replacement started, connected and set up
    replay_s: float | None = None  # every unfinished micro-batch's known steps recomputed
    replayed_steps: int = 0  # forward steps recomputed, summed over micro-batches

    @property
    def total_s(self) -> float | None:
        """Loss noticed -> generation continues where it stopped."""
        return None if self.replay_s is None else self.replace_s + self.replay_s


@dataclass
class DecodeStats:
    """What one :meth:`ModelWorker.generate` call measured on the model worker."""

    batch: int
    num_layers: int
    micro_batches: int
    wall_seconds: float = 0.0
    prefill_seconds: float = 0.0  # until every micro-batch has its first token
    generated_tokens: int = 0
    decode_tokens: int = 0  # tokens produced by decode steps (after the prefill step)
    decode_layer_calls: int = 0  # (micro-batch, layer) exchanges in decode steps
    decode_token_layers: int = 0  # sum over decode exchanges of the micro-batch size
    decode_bytes_out: int = 0  # q, k, v payload sent in decode steps
    decode_bytes_in: int = 0  # attention output received in decode steps
    header_bytes: int = 0
    decode_round_trip_seconds: float = 0.0  # sends posted -> replies in hand, summed over exchanges
    decode_wait_seconds: float = 0.0  # model worker blocked on replies, summed over exchanges
    decode_compute_seconds: float = 0.0  # model worker computing (projections, MLP, norms, head) in decode steps
    # One-way legs per message, from the reply trailer's timestamps (one host: one monotonic clock).
    # Request: posted here -> in the worker's hands. Reply: posted there -> in hand here, counted only
    # when this side was already waiting for it (otherwise its arrival time is unknown, and hidden).
    decode_request_seconds: float = 0.0
    decode_requests: int = 0
    decode_reply_seconds: float = 0.0
    decode_replies: int = 0
    shared_clock: bool = True
    token_intervals: list[float] = field(default_factory=list)  # seconds between a request's successive tokens
    workers: list[WorkerStats] = field(default_factory=list)
    recoveries: list[RecoveryStats] = field(default_factory=list)

    @property
    def decode_seconds(self) -> float:
        return max(self.wall_seconds - self.prefill_seconds, 0.0)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def bytes_per_token_per_layer(self) -> float:
        total = self.decode_bytes_out + self.decode_bytes_in
        return total / self.decode_token_layers if self.decode_token_layers else 0.0

    @property
    def round_trip_per_layer(self) -> float:
        return self.decode_round_trip_seconds / self.decode_layer_calls if self.decode_layer_calls else 0.0

    @property
    def wait_per_layer(self) -> float:
        return self.decode_wait_seconds / self.decode_layer_calls if self.decode_layer_calls else 0.0

    @property
    def compute_per_layer(self) -> float:
        """Model-worker compute per (micro-batch, layer) in decode steps (the LM head's share included)."""
        return self.decode_compute_seconds / self.decode_layer_calls if self.decode_layer_calls else 0.0

    @property
    def request_leg(self) -> float | None:
        """One-way time of a request (posted here -> in the worker's hands); None without a shared clock."""
        if not self.shared_clock or not self.decode_requests:
            return None
        return self.decode_request_seconds / self.decode_requests

    @property
    def reply_leg(self) -> float | None:
        """One-way time of a reply this side waited for; None when every reply arrived while it computed."""
        if not self.shared_clock or not self.decode_replies:
            return None
        return self.decode_reply_seconds / self.decode_replies

    @property
    def network_per_layer(self) -> float | None:
        """Request leg + reply leg of one message; a reply leg hidden behind other micro-batches counts 0."""
        if self.request_leg is None:
            return None
        return self.request_leg + (self.reply_leg or 0.0)


@dataclass
class _MicroBatchState:
    """What one micro-batch has produced; outlives its thread, so a recovery can resume it."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    generated: list[torch.Tensor] = field(default_factory=list)  # the token chosen at each step, [batch]
    finished: bool = False
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    replayed_at: float | None = None  # when its known steps were recomputed after the last recovery


def _lost_link(failure: BaseException) -> Link | None:
    """The link whose peer failed behind ``failure`` (a :class:`WorkerFailure` in its cause chain), if any."""
    while failure is not None:
        if isinstance(failure, WorkerFailure) and failure.link is not None:
            return failure.link
        failure = failure.__cause__
    return None


class _Aborted(Exception):
    """Another micro-batch failed; this one stops quietly."""


class TurnTaker:
    """Rotational turns among micro-batches: only the holder of the turn computes."""

    def __init__(self, indices: "int | list[int]"):
        self.active = list(range(indices)) if isinstance(indices, int) else list(indices)
        self.holder = self.active[0]
        self.failure: BaseException | None = None
        self.cond = threading.Condition()

    def wait_turn(self, index: int) -> None:
        with self.cond:
            while self.holder != index and self.failure is None:
                self.cond.wait()
            if self.failure is not None:
                raise _Aborted()

    def pass_turn(self, index: int) -> None:
        with self.cond:
            position = self.active.index(index)
            self.holder = self.active[(position + 1) % len(self.active)]
            self.cond.notify_all()

    def retire(self, index: int) -> None:
        with self.cond:
            position = self.active.index(index)
            self.active.remove(index)
            if self.active:
                self.holder = self.active[position % len(self.active)]
            self.cond.notify_all()

    def abort(self, failure: BaseException) -> None:
        with self.cond:
            if self.failure is None:
                self.failure = failure
            self.cond.notify_all()


class MicroBatchRunner:
    """One micro-batch's side of the exchange; the :class:`~.converter.OffloadTarget` its forwards use."""

    def __init__(self, index: int, owner: "ModelWorker", turns: TurnTaker, stats: DecodeStats):
        self.index, self.owner, self.turns, self.stats = index, owner, turns, stats
        count = len(owner.links)
        self.send_buffers: list[torch.Tensor | None] = [None] * count
        self.recv_buffers: list[torch.Tensor | None] = [None] * count
        self.pending_sends: list = [None] * count
        self.outstanding: list = []  # (post order, link, pending reply) not yet taken: drained on recovery
        self.last_posted = time.perf_counter()
        self.decoding = False
        self.computing_since = time.perf_counter()

    def _buffer(self, buffers: list, worker: int, nbytes: int) -> torch.Tensor:
        buffer = buffers[worker]
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(max(nbytes, 4096), dtype=torch.uint8, pin_memory=self.owner.pin_memory)
            buffers[worker] = buffer
        return buffer[:nbytes]

    def _send(self, worker: int, header: list[int], payload_bytes: int) -> torch.Tensor:
        """Wait for the previous send from this worker's buffer, return a header-filled message view."""
        if self.pending_sends[worker] is not None:
            self.pending_sends[worker].wait()
            self.pending_sends[worker] = None
        message = self._buffer(self.send_buffers, worker, HEADER_BYTES + payload_bytes)
        message[:HEADER_BYTES].view(torch.int64).copy_(torch.tensor(header, dtype=torch.int64))
        return message

    def begin(self, batch: int, q_len: int, valid: torch.Tensor | None, reset: bool) -> None:
        """Announce a forward step of ``q_len`` new positions (``valid``: [batch, q_len] key mask)."""
        flags = (FLAG_RESET if reset else 0) | (FLAG_HAS_MASK if valid is not None else 0)
        payload = batch * q_len if valid is not None else 0
        for worker, link in enumerate(self.owner.links):
            message = self._send(worker, [Kind.BEGIN, self.index, 0, batch, q_len, 0, 0, flags], payload)
            if valid is not None:
                message[HEADER_BYTES:].copy_(valid.reshape(-1).to(device="cpu", dtype=torch.uint8))
            self.pending_sends[worker] = link.isend(message)
            self.stats.header_bytes += HEADER_BYTES
        self.computing_since = time.perf_counter()

    def end_step(self) -> None:
        """The forward step's last compute segment (final norm, LM head, token choice)."""
        if self.decoding:
            self.stats.decode_compute_seconds += time.perf_counter() - self.computing_since

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
               sliding_window: int) -> torch.Tensor:
        owner = self.owner
        batch, _, q_len, head_dim = query.shape
        element = query.element_size()
        if query.dtype != owner.geometry.dtype:
            raise PipelineError(f"layer {layer}: activations are {query.dtype}, workers were set up for "
                                f"{owner.geometry.dtype}")
        started = time.perf_counter()
        if self.decoding:
            self.stats.decode_compute_seconds += started - self.computing_since
        receives = []
        sent = received = 0
        for worker, (link, shard) in enumerate(zip(owner.links, owner.partition.shards)):
            q_part = query[:, shard.q_heads[0]:shard.q_heads[1]]
            k_part = key[:, shard.kv_heads[0]:shard.kv_heads[1]]
            v_part = value[:, shard.kv_heads[0]:shard.kv_heads[1]]
            payload = (q_part.numel() + k_part.numel() + v_part.numel()) * element
            header = [Kind.LAYER, self.index, layer, batch, q_len, sliding_window, float_bits(scaling), 0]
            message = self._send(worker, header, payload)
            # One copy: from the model's (strided) tensors straight into the message.
            body = message[HEADER_BYTES:].view(query.dtype)
            offset = 0
            for part in (q_part, k_part, v_part):
                body[offset:offset + part.numel()].view(part.shape).copy_(part)
                offset += part.numel()
            reply_bytes = batch * q_len * shard.num_q_heads * head_dim * element
            reply = self._buffer(self.recv_buffers, worker, reply_bytes + TRAILER_BYTES)
            pending_reply = link.irecv(reply)
            posted = time.perf_counter()
            self.pending_sends[worker] = link.isend(message)
            receives.append((link, reply, pending_reply, reply_bytes, shard, posted))
            self.outstanding.append((next(owner.post_order), link, pending_reply))
            self.last_posted = posted
            sent += payload
            received += reply_bytes
        self.stats.header_bytes += (HEADER_BYTES + TRAILER_BYTES) * len(owner.links)

        # Let the next micro-batch compute while the attention workers serve this one.
        self.turns.pass_turn(self.index)
        self.turns.wait_turn(self.index)

        waited_from = time.perf_counter()
        outputs = []
        for link, reply, pending, reply_bytes, shard, posted in receives:
            arrived_while_away = pending.done()
            try:
                got = pending.wait()
            except WorkerFailure as failure:
                raise PipelineError(f"{failure} (layer {layer}, micro-batch {self.index})") from failure
            in_hand = time.perf_counter()
            if got != reply_bytes + TRAILER_BYTES:
                raise PipelineError(f"{link.peer} replied {got} bytes for layer {layer}, expected "
                                    f"{reply_bytes + TRAILER_BYTES}")
            if self.decoding:
                received_there, replied_there = reply[reply_bytes:].view(torch.float64).tolist()
                self.stats.decode_request_seconds += received_there - posted
                self.stats.decode_requests += 1
                if not arrived_while_away:
                    self.stats.decode_reply_seconds += in_hand - replied_there
                    self.stats.decode_replies += 1
            outputs.append(reply[:reply_bytes].view(query.dtype).view(batch, q_len, shard.num_q_heads, head_dim))
        self.outstanding = []
        done = time.perf_counter()
        if self.decoding:
            self.stats.decode_layer_calls += 1
            self.stats.decode_token_layers += batch * q_len
            self.stats.decode_bytes_out += sent
            self.stats.decode_bytes_in += received
            self.stats.decode_round_trip_seconds += done - started
            self.stats.decode_wait_seconds += done - waited_from
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
        # Copy out of the reply buffer: it is reused by this micro-batch's next layer.
        output = output.to(query.device, copy=True)
        self.computing_since = time.perf_counter()
        return output

    def flush(self) -> None:
        for worker, pending in enumerate(self.pending_sends):
            if pending is not None:
                pending.wait()
                self.pending_sends[worker] = None


def _eos_ids(model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def pad_token_id(model) -> int:
    """The id ``generate`` pads finished sequences with: pad, else the first EOS, else 0."""
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        eos = _eos_ids(model)
        pad = eos[0] if eos else 0
    return int(pad)


class ModelWorker:
    """Runs an unmodified Hugging Face causal LM with attention on remote workers.

    ``links[i]`` leads to the attention worker that owns head shard ``i``
    (:func:`~.partition.partition_heads`). ``micro_batches`` is the number of
    micro-batches in flight (Lamina's ``n``); a batch is split into that many
    contiguous groups of requests.
    """

    def __init__(self, model, links: list[Link], micro_batches: int = 1, timeout: float | None = None,
                 allow_untested: bool = False, shared_clock: bool = True, replace_worker=None,
                 max_recoveries: int = 3):
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        if not links:
            raise ValueError("need at least one attention worker link")
        self.model = model
        self.links = links
        self.micro_batches = micro_batches
        self.timeout = timeout
        self.geometry: ModelGeometry = offload_attention(model, allow_untested)
        self.partition: HeadPartition = partition_heads(self.geometry.num_q_heads, self.geometry.num_kv_heads,
                                                        self.geometry.head_dim, len(links))
        self.device = next(model.parameters()).device
        self.pin_memory = self.device.type == "cuda"
        self.shared_clock = shared_clock  # workers on this host: their timestamps are comparable with ours
        self.last_stats: DecodeStats | None = None
        # replace_worker(index, failure) -> Link: a new attention worker for head shard `index`
        # (None: a lost worker fails the call). At most max_recoveries per generate call.
        self.replace_worker = replace_worker
        self.max_recoveries = max_recoveries
        self.post_order = itertools.count()  # numbers the replies posted, for draining them in order
        self._resumed_at = 0.0
        self._closed = False

    def _setup_workers(self, max_tokens_per_message: int) -> None:
        dtype_name = str(self.geometry.dtype).replace("torch.", "")
        if dtype_name not in DTYPE_CODES:
            raise PipelineError(f"dtype {dtype_name} cannot be sent to attention workers")
        for link, shard in zip(self.links, self.partition.shards):
            max_payload = max_tokens_per_message * (shard.num_q_heads + 2 * shard.num_kv_heads) \
                * self.geometry.head_dim * self.geometry.element_size
            header = torch.tensor([Kind.SETUP, shard.num_q_heads, shard.num_kv_heads, self.geometry.head_dim,
                                   DTYPE_CODES[dtype_name], max_payload, self.micro_batches, 0], dtype=torch.int64)
            try:
                link.send(header, self.timeout)
            except WorkerFailure as failure:
                raise PipelineError(f"{failure} (setting up)") from failure

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 16) -> torch.Tensor:
        """Greedy decoding like ``model.generate(do_sample=False)``; returns the new tokens [batch, steps].

        Left-padded batches need ``attention_mask``. Measurements go to :attr:`last_stats`.
        With ``replace_worker`` set, a lost attention worker is replaced and
        the call goes on (see :meth:`_recover`); otherwise the loss raises.
        """
        if self._closed:
            raise PipelineError("the model worker is closed")
        if input_ids.dim() != 2:
            raise ValueError("input_ids must be [batch, prompt_len]")
        batch, prompt_len = input_ids.shape
        if self.micro_batches > batch:
            raise ValueError(f"{self.micro_batches} micro-batches need a batch of at least {self.micro_batches} "
                             f"requests, got {batch}")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        groups = torch.tensor_split(torch.arange(batch), self.micro_batches)
        max_tokens_per_message = max(len(g) for g in groups) * prompt_len
        self._setup_workers(max_tokens_per_message)

        stats = DecodeStats(batch=batch, num_layers=self.geometry.num_layers, micro_batches=self.micro_batches,
                            shared_clock=self.shared_clock)
        states = [_MicroBatchState(input_ids[rows.to(self.device)], attention_mask[rows.to(self.device)])
                  for rows in groups]
        started = time.perf_counter()
        replaying = None  # after a recovery: the micro-batches with steps to replay
        while True:
            runners, failures = self._run_micro_batches(states, stats, max_new_tokens)
            if replaying is not None:  # the run after a recovery: when had every replay caught up?
                replayed = [states[i].replayed_at for i in replaying]
                if None not in replayed:
                    stats.recoveries[-1].replay_s = max(replayed, default=self._resumed_at) - self._resumed_at
                replaying = None
            if not failures:
                break
            index, failure = failures[0]
            lost = _lost_link(failure)
            if self.replace_worker is None or lost not in self.links or \
                    len(stats.recoveries) >= self.max_recoveries:
                raise failure
            self._recover(self.links.index(lost), failure, runners[index], runners, stats, max_tokens_per_message)
            replaying = [i for i, state in enumerate(states) if not state.finished and state.generated]
            stats.recoveries[-1].replayed_steps = sum(len(states[i].generated) for i in replaying)
            for state in states:
                state.replayed_at = None

        stats.wall_seconds = time.perf_counter() - started
        stats.prefill_seconds = max(state.first_token_at for state in states) - started
        results = [torch.stack(state.generated, dim=1) for state in states]
        steps = max(r.shape[1] for r in results)
        pad = pad_token_id(self.model)
        tokens = torch.full((batch, steps), pad, dtype=torch.long, device=self.device)
        for rows, result in zip(groups, results):
            tokens[rows.to(self.device), :result.shape[1]] = result
        stats.generated_tokens = sum(r.numel() for r in results)
        stats.decode_tokens = sum(r.shape[0] * (r.shape[1] - 1) for r in results)
        self.last_stats = stats
        return tokens

    def _run_micro_batches(self, states: list["_MicroBatchState"], stats: DecodeStats, max_new_tokens: int):
        """Runs every unfinished micro-batch to its end, one thread each; returns (runners, [(index, failure)])."""
        active = [i for i, state in enumerate(states) if not state.finished]
        turns = TurnTaker(active)
        runners = {i: MicroBatchRunner(i, self, turns, stats) for i in active}
        failures: list[tuple[int, BaseException]] = []

        def run(index: int) -> None:
            try:
                turns.wait_turn(index)
                with torch.inference_mode():
                    self._generate_micro_batch(runners[index], states[index], max_new_tokens)
                    runners[index].flush()
                states[index].finished = True
                turns.retire(index)
            except _Aborted:
                pass
            except BaseException as failure:  # noqa: BLE001 - re-raised in the caller's thread
                failures.append((index, failure))
                turns.abort(failure)

        threads = [threading.Thread(target=run, args=(i,), name=f"lamina-microbatch-{i}", daemon=True)
                   for i in active]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return runners, failures

    def _recover(self, worker: int, failure: BaseException, failed_runner: MicroBatchRunner,
                 runners: dict[int, MicroBatchRunner], stats: DecodeStats, max_tokens_per_message: int) -> None:
        """Replaces attention worker ``worker`` and sets every worker up again for a replay.

        Recovery recomputes from the token ids: each unfinished micro-batch
        reruns its forward steps so far (the prompt, then one step per token
        already generated, fed its known tokens) with the cache reset on every
        worker, so the replacement's head shard and the survivors' caches are
        rebuilt by the same arithmetic as the first time, and generation goes
        on bit for bit. It costs no memory beyond the token ids; its time is
        about that of the steps replayed (the generation so far).
        """
        detected = time.perf_counter()
        recovery = RecoveryStats(worker, str(failure), detected - failed_runner.last_posted)
        lost = self.links[worker]
        # The survivors answer every request they got: take those replies, so that
        # none lands in a receive the replay posts. In posting order across the
        # micro-batches: a link matches replies to receives in the order posted.
        outstanding = sorted(entry for runner in runners.values() for entry in runner.outstanding)
        for _, link, pending in outstanding:
            if link is not lost:
                self._drain(pending, "recovering (taking a reply of the failed step)")
        for runner in runners.values():
            for index, pending in enumerate(runner.pending_sends):
                if pending is not None and self.links[index] is not lost:
                    self._drain(pending, "recovering (finishing a send of the failed step)")
        lost.close()
        replacement = self.replace_worker(worker, failure)
        self.links[worker] = replacement
        self._setup_workers(max_tokens_per_message)  # survivors drop their caches: the replay rebuilds them
        self._resumed_at = time.perf_counter()
        recovery.replace_s = self._resumed_at - detected
        stats.recoveries.append(recovery)

    def _drain(self, pending, action: str) -> None:
        try:
            with torch.inference_mode():  # the buffers were made in the micro-batch's inference mode
                pending.wait(self.timeout)
        except WorkerFailure as failure:
            raise PipelineError(f"{failure} ({action})") from failure

    def _generate_micro_batch(self, runner: MicroBatchRunner, state: "_MicroBatchState",
                              max_new_tokens: int) -> None:
        """Greedy loop mirroring ``generate``: positions from the mask, pad after EOS, stop when all finished.

        Steps whose tokens ``state`` already holds (after a recovery) are
        replayed: computed again with their known token as input, their
        choice checked against the one made the first time, nothing emitted.
        """
        input_ids, attention_mask = state.input_ids, state.attention_mask
        batch = input_ids.shape[0]
        known = len(state.generated)
        cache = PassThroughCache(self.geometry.num_layers)
        extra = {**forward_kwargs(self.model), **cache_kwargs(self.model, cache)}
        eos = torch.tensor(_eos_ids(self.model), dtype=torch.long, device=self.device)
        pad = pad_token_id(self.model)
        mask = attention_mask.long()
        position_ids = mask.cumsum(-1) - 1
        position_ids.masked_fill_(mask == 0, 1)
        step_ids, step_positions = input_ids, position_ids
        unfinished = torch.ones(batch, dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            replaying = step < known
            runner.decoding = step > 0 and not replaying
            runner.begin(batch, step_ids.shape[1], mask.bool() if step == 0 else None, reset=step == 0)
            logits = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions,
                                use_cache=True, **extra, **{CONTEXT_KWARG: runner}).logits
            next_tokens = logits[:, -1, :].argmax(dim=-1)
            runner.end_step()
            if eos.numel():
                next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
            if replaying:
                if not torch.equal(next_tokens, state.generated[step]):
                    raise PipelineError(f"recovery diverged: micro-batch {runner.index} chose other tokens at step "
                                        f"{step} than before the loss")
                if step == known - 1:
                    state.replayed_at = time.perf_counter()
            else:
                token_at = time.perf_counter()
                if step > 0:
                    runner.stats.token_intervals.append(token_at - state.last_token_at)
                state.last_token_at = token_at
                state.generated.append(next_tokens)
                if step == 0:
                    state.first_token_at = token_at
            if eos.numel():
                unfinished &= ~torch.isin(next_tokens, eos)
            if not bool(unfinished.any()):
                break
            step_ids = next_tokens[:, None]
            step_positions = step_positions[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)

    def worker_stats(self) -> list[WorkerStats]:
        """Ask every attention worker for its counters."""
        request = torch.zeros(8, dtype=torch.int64)
        request[0] = Kind.STATS
        reports = []
        for link in self.links:
            reply = torch.zeros(STATS_FIELDS, dtype=torch.float64)
            try:
                link.send(request, self.timeout)
                link.recv(reply, self.timeout)
            except WorkerFailure as failure:
                raise PipelineError(f"{failure} (collecting statistics)") from failure
            messages, seconds, decode_messages, decode_seconds, idle, kv_bytes = reply.tolist()
            reports.append(WorkerStats(int(messages), seconds, int(decode_messages), decode_seconds, idle,
                                       int(kv_bytes)))
        return reports

    def close(self, stop_workers: bool = True) -> None:
        """Tell the attention workers to exit (best effort) and close the links."""
        if self._closed:
            return
        self._closed = True
        stop = torch.zeros(8, dtype=torch.int64)
        stop[0] = Kind.STOP
        for link in self.links:
            if stop_workers:
                try:
                    link.send(stop, self.timeout)
                except PipelineError:
                    pass
            link.close()
