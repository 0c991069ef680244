"""Local launcher: a model worker in this process, attention workers as child processes.

The children are plain ``python -m lamina_net.decode.attention_worker``
subprocesses (not multiprocessing: a spawned child re-imports the parent's main
module, and ``python -m lamina_net`` would then rerun the CLI). They
rendezvous with this process, rank 0, through a ``"127.0.0.1:PORT"`` store on a
free port.
"""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import sys
import time
import uuid
from dataclasses import dataclass, field

import torch

from .._local_world import local_world_size
from .link import ChannelLink, Link, LoopbackLink, PipelineError
from .model_worker import DecodeStats, ModelWorker, WorkerStats
from .protocol import Kind


def free_port() -> int:
    """A TCP port that was free a moment ago (rank 0's store binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PipelineResult:
    tokens: torch.Tensor  # [batch, new tokens]
    stats: DecodeStats
    workers: list[WorkerStats] = field(default_factory=list)
    transport: str = ""


class LocalCluster:
    """``count`` attention-worker subprocesses (ranks 1..count) and this process as rank 0.

    ``links[i]`` leads to attention worker ``i``. The workers serve any number
    of :meth:`ModelWorker.generate` calls (each starts with a SETUP) until
    :meth:`close`, which stops them.
    """

    def __init__(self, count: int, transport: str = "auto", device: str = "cpu", timeout: float | None = 30.0,
                 threads_per_worker: int = 1, idle_timeout: float | None = None,
                 crash_worker: int | None = None, crash_after_messages: int | None = None,
                 kill_worker: tuple[int, int] | None = None):
        import lamina_net

        self.count, self.timeout = count, timeout
        self.transport_choice, self.device = transport, device
        self.processes: list[subprocess.Popen] = []
        self.endpoint = None
        self.links: list[Link] = []
        self.replacements = 0
        self._replacement_endpoints: list = []
        self._retired: list[subprocess.Popen] = []  # replaced workers (killed), reaped at close
        self.store = f"127.0.0.1:{free_port()}"
        self.group = f"lamina-decode-{uuid.uuid4().hex[:8]}"
        env = dict(os.environ, LAMINA_DECODE_WORKER_THREADS=str(threads_per_worker))
        env.setdefault("LOCAL_WORLD_SIZE", str(count + 1))  # every rank on this host (see _local_world)
        # The children must import this very lamina_net, wherever it was loaded
        # from: `python -m` puts the working directory first on sys.path, so
        # they start in the directory that holds this package (from a
        # checkout's root they would otherwise import the source tree).
        self._package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self._package_root, env.get("PYTHONPATH")) if p)
        self._env = env
        self._stderr_files: list = []
        self._idle_timeout = idle_timeout if idle_timeout is not None else max(600.0, timeout or 0.0)
        try:
            for rank in range(1, count + 1):
                faults = []
                if crash_worker == rank - 1 and crash_after_messages is not None:
                    faults += ["--crash-after-messages", str(crash_after_messages)]
                if kill_worker is not None and kill_worker[0] == rank:
                    faults += ["--kill-at-step", str(kill_worker[1])]
                process, stderr = self._start_worker(rank, count + 1, self.group, faults)
                self.processes.append(process)
                self._stderr_files.append(stderr)
            with local_world_size(count + 1):
                self.endpoint = lamina_net.Endpoint(0, count + 1, store=self.store, group=self.group,
                                                    timeout=timeout)
            for rank, process in enumerate(self.processes, start=1):
                self._wait_for_worker(self.endpoint, self.group, rank, process, f"attention worker {rank - 1} "
                                      f"(rank {rank})")
            for rank in range(1, count + 1):
                channel = self.endpoint.channel(rank, transport=transport)
                self.links.append(ChannelLink(channel, f"attention worker {rank - 1} (rank {rank})", timeout))
            self.transport = self.links[0].channel.transport if self.links else transport
        except BaseException as failure:
            self.close(grace=0.5)
            if isinstance(failure, (lamina_net.LaminaError, TimeoutError)):
                raise self.explain(failure) from failure
            raise

    def _start_worker(self, rank: int, world_size: int, group: str, extra: list[str]):
        """A worker process and the temporary file its stderr goes to."""
        command = [sys.executable, "-m", "lamina_net.decode.attention_worker", "--rank", str(rank),
                   "--world-size", str(world_size), "--store", self.store, "--group", group,
                   "--transport", self.transport_choice, "--device", self.device,
                   "--idle-timeout", str(self._idle_timeout)] + extra
        if self.timeout is not None:
            command += ["--timeout", str(self.timeout)]
        stderr = tempfile.TemporaryFile(mode="w+b")
        return subprocess.Popen(command, env=self._env, cwd=self._package_root, stderr=stderr), stderr

    def _wait_for_worker(self, endpoint, group: str, rank: int, process: subprocess.Popen, name: str) -> None:
        """Waits until the worker's endpoint is up; a worker that exits first fails at once."""
        # Starting a worker is importing torch and transformers, not a network
        # wait: give it at least a minute (a worker that dies is noticed at once).
        start_bound = max(self.timeout or 0.0, 60.0) if self.timeout is not None else 600.0
        deadline = time.monotonic() + start_bound
        store = endpoint._live_store()
        while True:
            try:
                store.get(f"ln/{group}/{rank}/info", 0.1)  # published by the worker's Endpoint
                return
            except TimeoutError:
                pass
            if process.poll() is not None:
                raise self.explain(PipelineError(f"{name} exited before it connected"))
            if time.monotonic() > deadline:
                raise PipelineError(f"{name} did not start within {start_bound:.3g} s")

    def replace(self, index: int, failure: BaseException | None = None) -> Link:
        """Starts a new process for attention worker ``index`` (head shard ``index``) and returns its link.

        The old process is killed if it still runs (a hung worker is replaced
        too). The replacement joins a group of its own, ``<group>-r<N>``, as
        rank 1 of 2 through the same store, so no rank of the running group
        is reused. ``self.links[index]`` becomes the new link.
        """
        import lamina_net

        old = self.processes[index]
        if old.poll() is None:
            old.kill()
        old.wait()
        self._retired.append(old)
        self.replacements += 1
        group = f"{self.group}-r{self.replacements}"
        name = f"attention worker {index} (replacement {self.replacements})"
        self._stderr_files[index].close()  # what the lost worker said is in the failure already
        process, self._stderr_files[index] = self._start_worker(1, 2, group, [])
        self.processes[index] = process
        try:
            with local_world_size(self.count + 1):
                endpoint = lamina_net.Endpoint(0, 2, store=self.store, group=group, timeout=self.timeout)
            self._replacement_endpoints.append(endpoint)
            self._wait_for_worker(endpoint, group, 1, process, name)
            link = ChannelLink(endpoint.channel(1, transport=self.transport_choice), name, self.timeout)
        except (lamina_net.LaminaError, TimeoutError) as problem:
            raise self.explain(PipelineError(f"could not replace attention worker {index}: "
                                             f"{type(problem).__name__}: {problem}")) from problem
        self.links[index] = link
        return link

    def _last_stderr_lines(self, index: int, count: int = 5) -> str:
        try:
            f = self._stderr_files[index]
            f.seek(0)
            lines = f.read().decode(errors="replace").strip().splitlines()
        except (IndexError, OSError, ValueError):
            return ""
        return " | ".join(lines[-count:])

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def describe_exits(self) -> str:
        """Which workers have exited abnormally, and how."""
        notes = []
        for index, process in enumerate(self.processes):
            code = process.poll()
            if code:
                how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
                tail = self._last_stderr_lines(index)
                notes.append(f"attention worker {index} (rank {index + 1}, pid {process.pid}) {how}" +
                             (f"; its last stderr lines: {tail}" if tail else ""))
        return "; ".join(notes)

    def explain(self, failure: BaseException) -> PipelineError:
        """``failure`` as a :class:`PipelineError` that also says which local workers died."""
        deadline = time.monotonic() + 0.5  # a killed child may need a moment to be reaped
        exits = self.describe_exits()
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
            exits = self.describe_exits()
        message = str(failure) if isinstance(failure, PipelineError) else f"{type(failure).__name__}: {failure}"
        return PipelineError(message + (f" [{exits}]" if exits else ""))

    def close(self, grace: float = 5.0) -> None:
        """Close the links and the endpoint; wait for the workers, killing those that linger."""
        for link in self.links:
            link.close()
        for endpoint in [*self._replacement_endpoints, self.endpoint]:
            if endpoint is not None:
                try:
                    endpoint.close()
                except Exception:  # closing after a failure must not hide it
                    pass
        self._replacement_endpoints, self.endpoint = [], None
        deadline = time.monotonic() + grace
        for process in self._retired:
            process.wait()  # killed when it was replaced
        for process in self.processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for index, process in enumerate(self.processes):
            if process.returncode and process.returncode > 0:
                # What the worker said is not lost with its temporary file.
                tail = self._last_stderr_lines(index, 20)
                if tail:
                    sys.stderr.write(f"[attention worker {index}] {tail}\n")
        for f in self._stderr_files:
            f.close()
        self._stderr_files = []

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.stop_workers()
        self.close(grace=5.0 if exc_type is None else 0.5)

    def stop_workers(self) -> None:
        """Ask every worker to exit (best effort)."""
        stop_workers(self.links, self.timeout)


def stop_workers(links: list[Link], timeout: float | None) -> None:
    """Sends STOP on every link (best effort: a worker already gone is skipped)."""
    stop = torch.zeros(8, dtype=torch.int64)
    stop[0] = Kind.STOP
    for link in links:
        try:
            link.send(stop, timeout)
        except PipelineError:
            pass


def check_pipeline_arguments(model, input_ids: torch.Tensor, attention_workers: int, micro_batches: int,
                             kill_worker: tuple[int, int] | None) -> None:
    """What a launcher checks before it starts any worker, so that bad input fails fast."""
    from .converter import check_convertible
    from .partition import partition_heads

    geometry = check_convertible(model)
    partition_heads(geometry.num_q_heads, geometry.num_kv_heads, geometry.head_dim, attention_workers)
    if micro_batches > input_ids.shape[0]:
        raise ValueError(f"{micro_batches} micro-batches need a batch of at least {micro_batches} requests")
    if kill_worker is not None and not 1 <= kill_worker[0] <= attention_workers:
        raise ValueError(f"kill_worker rank {kill_worker[0]} is not an attention worker's (1..{attention_workers})")


def run_local_pipeline(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, new_tokens: int,
                       attention_workers: int = 2, micro_batches: int = 1, transport: str = "auto",
                       worker_device: str = "cpu", timeout: float | None = 30.0, threads_per_worker: int = 1,
                       crash_worker: int | None = None, crash_after_messages: int | None = None,
                       recover: bool = False, kill_worker: tuple[int, int] | None = None) -> PipelineResult:
    """Generate ``new_tokens`` greedily with attention on ``attention_workers`` local processes.

    ``transport="loopback"`` serves the attention shards in this process
    instead (no lamina-net). Faults, injected for tests and demos:
    ``crash_worker``/``crash_after_messages``: that worker (index) SIGKILLs
    itself after so many layer messages; ``kill_worker=(rank, step)``: the
    worker of that rank (1..attention_workers) SIGKILLs itself at that
    forward step (0: the prefill). ``recover``: a lost worker is replaced by
    a new process and the generation goes on (``result.stats.recoveries``);
    otherwise, and when a recovery fails, raises :class:`~.link.PipelineError`.
    """
    if transport == "loopback":
        from .attention_shard import AttentionServer

        links = [LoopbackLink(AttentionServer(worker_device), f"loopback attention worker {i}")
                 for i in range(attention_workers)]
        worker = ModelWorker(model, links, micro_batches, timeout)
        tokens = worker.generate(input_ids, attention_mask, new_tokens)
        return PipelineResult(tokens, worker.last_stats, worker.worker_stats(), "loopback")

    check_pipeline_arguments(model, input_ids, attention_workers, micro_batches, kill_worker)
    with LocalCluster(attention_workers, transport, worker_device, timeout, threads_per_worker,
                      crash_worker=crash_worker, crash_after_messages=crash_after_messages,
                      kill_worker=kill_worker) as cluster:
        worker = ModelWorker(model, cluster.links, micro_batches, timeout,
                             replace_worker=cluster.replace if recover else None)
        try:
            tokens = worker.generate(input_ids, attention_mask, new_tokens)
            return PipelineResult(tokens, worker.last_stats, worker.worker_stats(), cluster.transport)
        except PipelineError as failure:
            raise cluster.explain(failure) from failure
