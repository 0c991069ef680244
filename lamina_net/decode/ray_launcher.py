"""Ray launcher: the model worker and the attention workers as Ray actors in one placement group.

The model worker's bundle asks for one unit of the compute resource, each
attention worker's for one unit of the attention resource (names
configurable; defaults :data:`COMPUTE_RESOURCE` and :data:`ATTENTION_RESOURCE`),
so Ray puts each role on the nodes that offer it. A cluster's nodes declare
them at start (``ray start --resources='{"lamina_compute": 1}'``); when this
launcher starts Ray itself (no address, Ray not initialised), the one local
node offers both.

The driver hosts the lamina-net store; every actor reaches it as a client, so
rank 0 need not run where the store is. Channels choose their transport per
pair as under any other launcher (shm on one node, verbs or tcp across nodes).
With ``recover`` the model worker actor replaces a lost attention worker with
a new actor in the same bundle (see :meth:`.model_worker.ModelWorker._recover`).

Ray is optional (``pip install "lamina-net[ray]"``); nothing here imports it
at module level.
"""
from __future__ import annotations

import os
import time
import uuid

from .link import ChannelLink, PipelineError
from .pipeline import PipelineResult, check_pipeline_arguments, stop_workers

COMPUTE_RESOURCE = "lamina_compute"
ATTENTION_RESOURCE = "lamina_attention"
_ACTOR_CPUS = 0.01  # actors are placed by the role resources, not by CPU count
_START_BOUND_S = 120.0  # placing actors is starting Python processes that import torch, not a network wait


def _import_ray():
    try:
        import ray
    except ImportError as missing:
        raise PipelineError('the Ray launcher needs Ray: pip install "lamina-net[ray]"') from missing
    return ray


def _store_client(address: str, timeout: float | None):
    from ..store import StoreClient, parse_address

    host, port = parse_address(address)
    return StoreClient(host, port, connect_timeout=timeout or 60.0)


class _AttentionActor:
    """Serves one head shard: one :func:`.attention_worker.serve` call per actor."""

    def serve(self, rank: int, world_size: int, store: str, group: str, transport: str, device: str,
              timeout: float | None, idle_timeout: float, local_world: int, threads: int,
              crash_after_messages: int | None, kill_at_step: int | None) -> int:
        import lamina_net
        import torch

        from .attention_worker import MODEL_WORKER_RANK, serve

        os.environ.setdefault("LOCAL_WORLD_SIZE", str(local_world))
        torch.set_num_threads(threads)
        with lamina_net.Endpoint(rank, world_size, store=_store_client(store, timeout), group=group,
                                 timeout=timeout) as endpoint:
            link = ChannelLink(endpoint.channel(MODEL_WORKER_RANK, transport=transport),
                               f"model worker (rank {MODEL_WORKER_RANK})", timeout)
            try:
                serve(link, device, idle_timeout, crash_after_messages, kill_at_step)
            finally:
                link.close()
        return 0

    def pid(self) -> int:
        return os.getpid()


class _ModelActor:
    """Rank 0: joins the group, runs :class:`.model_worker.ModelWorker` generate calls, replaces workers."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.endpoints: list = []
        self.links: list = []
        self.transport = ""
        self.replacements = 0

    def connect(self) -> str:
        import lamina_net
        import torch

        spec = self.spec
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(spec["local_world"]))
        torch.set_num_threads(spec["threads"])
        count = len(spec["attention"])
        endpoint = lamina_net.Endpoint(0, count + 1, store=_store_client(spec["store"], spec["timeout"]),
                                       group=spec["group"], timeout=spec["timeout"])
        self.endpoints.append(endpoint)
        for rank in range(1, count + 1):
            channel = endpoint.channel(rank, transport=spec["transport"])
            self.links.append(ChannelLink(channel, f"attention worker {rank - 1} (rank {rank})", spec["timeout"]))
        self.transport = self.links[0].channel.transport
        return self.transport

    def replace(self, index: int, failure: BaseException | None = None):
        """A new attention actor for head shard ``index`` in the lost one's bundle; returns its link."""
        import lamina_net
        import ray

        spec = self.spec
        ray.kill(spec["attention"][index], no_restart=True)  # a hung actor is replaced too
        self.replacements += 1
        group = f"{spec['group']}-r{self.replacements}"
        name = f"attention worker {index} (replacement {self.replacements})"
        actor = _attention_actor_class(ray).options(**spec["attention_options"][index]).remote()
        spec["attention"][index] = actor
        spec["serving"][index] = actor.serve.remote(1, 2, spec["store"], group, spec["transport"], spec["device"],
                                                    spec["timeout"], spec["idle_timeout"],
                                                    spec["local_worlds"][index], spec["threads"], None, None)
        try:
            endpoint = lamina_net.Endpoint(0, 2, store=_store_client(spec["store"], spec["timeout"]), group=group,
                                           timeout=max(spec["timeout"] or 0.0, _START_BOUND_S))
        except (lamina_net.LaminaError, TimeoutError) as problem:
            raise PipelineError(f"could not replace attention worker {index}: "
                                f"{type(problem).__name__}: {problem}") from problem
        self.endpoints.append(endpoint)
        link = ChannelLink(endpoint.channel(1, transport=spec["transport"]), name, spec["timeout"])
        self.links[index] = link
        return link

    def generate(self, model, input_ids, attention_mask, new_tokens: int, micro_batches: int,
                 recover: bool) -> PipelineResult:
        from .model_worker import ModelWorker

        worker = ModelWorker(model, self.links, micro_batches, self.spec["timeout"],
                             replace_worker=self.replace if recover else None)
        tokens = worker.generate(input_ids, attention_mask, new_tokens)
        return PipelineResult(tokens, worker.last_stats, worker.worker_stats(), self.transport)

    def serving(self) -> list:
        """The attention actors' serve() results, current after replacements (for the driver's report)."""
        return list(self.spec["serving"])

    def stop(self) -> None:
        stop_workers(self.links, self.spec["timeout"])
        for link in self.links:
            link.close()
        for endpoint in self.endpoints:
            try:
                endpoint.close()
            except Exception:  # closing after a failure must not hide it
                pass
        self.links, self.endpoints = [], []


def _attention_actor_class(ray):
    return ray.remote(max_restarts=0, max_concurrency=1)(_AttentionActor)


class RayCluster:
    """``count`` attention-worker actors and a model-worker actor in one placement group.

    :meth:`generate` runs one pipeline generate call on the model actor;
    the workers serve any number of calls until :meth:`close` (idempotent;
    also the context manager's exit), which stops them, removes the
    placement group and, if this object started Ray, shuts it down.
    ``model_node`` and ``attention_nodes`` are the Ray node ids of the roles.
    ``address``: None or ``"local"`` start a one-node Ray here that offers
    both resources; anything else is joined (``"auto"``, ``"HOST:PORT"``).
    Ray already initialised in this process is used as it is.
    """

    def __init__(self, count: int, transport: str = "auto", device: str = "cpu", timeout: float | None = 30.0,
                 address: str | None = None, compute_resource: str = COMPUTE_RESOURCE,
                 attention_resource: str = ATTENTION_RESOURCE, threads_per_worker: int = 1,
                 crash_worker: int | None = None, crash_after_messages: int | None = None,
                 kill_worker: tuple[int, int] | None = None):
        ray = _import_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from ..store import StoreServer

        self.count, self.timeout = count, timeout
        self._ray, self._started_ray = ray, False
        self._placement = self._store = self._model = None
        self._attention: list = []
        try:
            if not ray.is_initialized():
                init = {"include_dashboard": False, "log_to_driver": True, "object_store_memory": 256 << 20}
                if address and address != "local":
                    ray.init(address=address, log_to_driver=True)
                else:  # a new one-node Ray here, never one found running (that is what address="auto" is for)
                    ray.init(address="local", resources={compute_resource: 1, attention_resource: count}, **init)
                self._started_ray = True
            offered = ray.cluster_resources()
            for name, wanted in ((compute_resource, 1), (attention_resource, count)):
                if offered.get(name, 0) < wanted:
                    raise PipelineError(f"the Ray cluster offers {offered.get(name, 0):g} of resource {name!r}, "
                                        f"the pipeline needs {wanted} (declare it on the nodes: ray start "
                                        f"--resources='{{\"{name}\": N}}')")
            gpu = {"GPU": 1} if str(device).startswith("cuda") else {}
            bundles = [{compute_resource: 1, "CPU": _ACTOR_CPUS, **gpu}] + \
                      [{attention_resource: 1, "CPU": _ACTOR_CPUS, **gpu} for _ in range(count)]
            self._placement = placement_group(bundles, strategy="PACK", name=f"lamina-decode-{uuid.uuid4().hex[:8]}")
            ready, _ = ray.wait([self._placement.ready()], timeout=_START_BOUND_S)
            if not ready:
                raise PipelineError(f"Ray could not place the pipeline's bundles within {_START_BOUND_S:g} s: "
                                    f"{bundles}")
            nodes = ray.util.placement_group_table(self._placement)["bundles_to_node_id"]
            per_node = {node: list(nodes.values()).count(node) for node in nodes.values()}
            local_worlds = [per_node[nodes[i]] for i in range(count + 1)]
            self.model_node, self.attention_nodes = nodes[0], [nodes[i] for i in range(1, count + 1)]

            self._store = StoreServer("0.0.0.0", 0)
            store = f"{ray.util.get_node_ip_address()}:{self._store.port}"
            group = f"lamina-decode-{uuid.uuid4().hex[:8]}"

            def options(bundle: int) -> dict:
                return {"num_cpus": _ACTOR_CPUS, "num_gpus": 1 if gpu else 0,
                        "resources": {attention_resource if bundle else compute_resource: 1},
                        "scheduling_strategy": PlacementGroupSchedulingStrategy(self._placement, bundle)}

            attention_class = _attention_actor_class(ray)
            self._attention = [attention_class.options(**options(i + 1)).remote() for i in range(count)]
            idle_timeout = max(600.0, timeout or 0.0)
            serving = []
            for index, actor in enumerate(self._attention):
                rank = index + 1
                crash = crash_after_messages if crash_worker == index else None
                kill = kill_worker[1] if kill_worker is not None and kill_worker[0] == rank else None
                serving.append(actor.serve.remote(rank, count + 1, store, group, transport, str(device), timeout,
                                                  idle_timeout, local_worlds[rank], threads_per_worker, crash, kill))
            spec = {"store": store, "group": group, "transport": transport, "device": str(device),
                    "timeout": timeout, "idle_timeout": idle_timeout, "threads": threads_per_worker,
                    "local_world": local_worlds[0], "local_worlds": local_worlds[1:],
                    "attention": list(self._attention), "serving": serving,
                    "attention_options": [options(i + 1) for i in range(count)]}
            model_class = ray.remote(max_restarts=0, max_concurrency=1)(_ModelActor)
            self._model = model_class.options(**options(0)).remote(spec)
            self._serving = serving
            self.transport = self._get(self._model.connect.remote(), _START_BOUND_S + (timeout or 0.0))
        except BaseException:
            self.close()
            raise

    def _get(self, ref, bound: float | None):
        """``ray.get`` with a bound; actor and task failures become a :class:`PipelineError` with a report."""
        ray = self._ray
        try:
            return ray.get(ref, timeout=bound)
        except PipelineError as failure:  # raised in the model actor: Ray's subclass of both, with the cause
            raise self.explain(getattr(failure, "cause", None) or failure) from None
        except ray.exceptions.GetTimeoutError as late:
            raise self.explain(PipelineError(f"the model worker actor did not answer within {bound:g} s")) from late
        except ray.exceptions.RayError as failure:
            raise self.explain(PipelineError(f"the model worker actor failed: {_first_line(failure)}")) from None

    def generate(self, model, input_ids, attention_mask, new_tokens: int, micro_batches: int = 1,
                 recover: bool = False) -> PipelineResult:
        # Bounded: every exchange inside is bounded by the timeout; this adds room for recoveries.
        bound = None if self.timeout is None else 600.0 + 4 * _START_BOUND_S
        return self._get(self._model.generate.remote(model, input_ids, attention_mask, new_tokens, micro_batches,
                                                     recover), bound)

    def explain(self, failure: BaseException) -> PipelineError:
        """``failure`` with which attention worker actors have died, and how Ray saw it."""
        ray = self._ray
        serving = self._serving
        try:
            serving = ray.get(self._model.serving.remote(), timeout=5)
        except Exception:  # the model actor is gone too: the driver's list is the best there is
            pass
        deadline = time.monotonic() + 1.0  # Ray learns of a killed actor within a moment
        notes: list[str] = []
        while True:
            done, _ = ray.wait(list(serving), num_returns=len(serving), timeout=0.1)
            notes = []
            for index, ref in enumerate(serving):
                if ref in done:
                    try:
                        ray.get(ref, timeout=0)
                    except ray.exceptions.RayError as death:
                        notes.append(f"attention worker {index} (rank {index + 1}, Ray actor) died: "
                                     f"{_first_line(death)}")
            if notes or time.monotonic() > deadline:
                break
        message = str(failure)
        return PipelineError(message + (f" [{'; '.join(notes)}]" if notes else ""))

    def close(self) -> None:
        ray = self._ray
        if self._model is not None:
            try:
                ray.get(self._model.stop.remote(), timeout=self.timeout or 30.0)
            except Exception:  # a dead model actor: the workers are killed below
                pass
        for actor in self._attention + ([self._model] if self._model is not None else []):
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self._attention, self._model = [], None
        if self._placement is not None:
            ray.util.remove_placement_group(self._placement)
            self._placement = None
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> "RayCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def run_ray_pipeline(model, input_ids, attention_mask, new_tokens: int, attention_workers: int = 2,
                     micro_batches: int = 1, transport: str = "auto", worker_device: str = "cpu",
                     timeout: float | None = 30.0, address: str | None = None,
                     compute_resource: str = COMPUTE_RESOURCE, attention_resource: str = ATTENTION_RESOURCE,
                     threads_per_worker: int = 1, crash_worker: int | None = None,
                     crash_after_messages: int | None = None, recover: bool = False,
                     kill_worker: tuple[int, int] | None = None) -> PipelineResult:
    """:func:`.pipeline.run_local_pipeline` with the workers as Ray actors (see :class:`RayCluster`)."""
    check_pipeline_arguments(model, input_ids, attention_workers, micro_batches, kill_worker)
    with RayCluster(attention_workers, transport, worker_device, timeout, address, compute_resource,
                    attention_resource, threads_per_worker, crash_worker, crash_after_messages,
                    kill_worker) as cluster:
        return cluster.generate(model, input_ids, attention_mask, new_tokens, micro_batches, recover)
