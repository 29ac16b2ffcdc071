"""02 with EXECUTOR='ray', the driver's side: chunks handed to workers, one per GPU (or CPU share).

Each worker (ray_worker) loads the model once and runs the local executor's per-chunk pipeline. The
driver hands chunks to the workers that are up, relays their progress and adds up their summaries.
A worker that dies (its process, or its node) is restarted by Ray and its chunk handed out again;
chunk files are written whole under a claim, so a chunk that runs twice replaces only itself.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any

from . import executor
from .chunkfile import ChunkInfo
from .cluster import WorkerLayout, connect, worker_layout
from .errors import PipelineError, first_line
from .executor import (
    RunSummary,
    prepare_chunk_folder,
    run_chunk_plan,
)
from .model import ClipEncoder
from .params import EmbedParams
from .plan import RunPlan
from .progress import RunProgress
from .ray_worker import ChunkWorker, NotStarted, ProgressInbox, WorkerReply, WorkerSpec
from .settings import current_settings
from .storage import lease
from .table import ImageTable
from .workspace import collection

ATTEMPTS_PER_CHUNK = 3  # a chunk whose worker dies this many times under it stops the run
RESTARTS_PER_WORKER = 8  # Ray starts a dead worker again this many times
POLL_SECONDS = 0.5  # how often the driver relays the workers' progress
NO_WORKER_WARNING_SECONDS = 120  # with no worker up by then, the driver says what the workers ask for


def embed_chunks(table: ImageTable, encoder: ClipEncoder, plan: RunPlan, params: EmbedParams) -> RunSummary:
    """02's run: on this machine with EXECUTOR='local', else on the Ray workers of RAY_ADDRESS."""
    if params.executor == "local":
        return executor.embed_chunks(table, encoder, plan, params)
    return _embed_on_ray(table, encoder, plan, params)


def _embed_on_ray(table: ImageTable, encoder: ClipEncoder, plan: RunPlan, params: EmbedParams) -> RunSummary:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    chunks = plan.chunks
    summary = prepare_chunk_folder(table, chunks, encoder.embedding_size)
    if not chunks.todo and not chunks.retry:
        return summary
    connect(params.ray_address)
    layout = worker_layout(params.device, params.cpus_per_worker)
    hub_commit = None if encoder.checkpoint.revision.startswith("sha256:") else encoder.checkpoint.revision
    # the inbox dies only with the driver's node, which ends the run anyway
    driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    inbox = ray.remote(num_cpus=0, scheduling_strategy=driver_node)(ProgressInbox).remote()
    output = collection(params.output_dir, params.s3_endpoint_url)
    spec = WorkerSpec(
        current_settings(),
        dataclasses.replace(params, device=layout.device, model_revision=hub_commit),
        chunks.folder,
        chunks.signature,
        ray.put(table),
        inbox,
        output,
    )
    began = time.perf_counter()
    count = min(layout.workers, len(chunks.todo) + len(chunks.retry))
    summary.workers = count
    with (
        lease(output, "02_embed"),
        RunProgress(chunks.rows_to_do) as progress,
        RayWorkers(spec, layout, count, progress, summary) as workers,
    ):
        run_chunk_plan(workers, chunks, params.chunk, progress)
    summary.seconds = time.perf_counter() - began
    return summary


@dataclasses.dataclass
class _Task:
    """A call to hand to whichever worker is free: `method` with `args`."""

    method: str
    args: tuple
    attempts: int = 0
    call: int = 0  # the number of its latest call

    def __str__(self) -> str:
        if self.method == "retry":
            return f"the retry of {self.args[0].path.name}"
        if self.method == "write_unproven":
            return "the writing of the chunks it held"
        return f"rows [{self.args[0]}, {self.args[1]})"


@dataclasses.dataclass
class _Worker:
    """The driver's view of one worker: its actor, whether it is up, and what it holds."""

    actor: Any
    number: int
    starting: Any  # the reference of its `start` call until it answers; None once it is up
    where: dict | None = None
    held: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    kept: list[tuple] = dataclasses.field(default_factory=list)  # the counts of the chunks it holds
    starts: int = 1
    dead: bool = False

    def __str__(self) -> str:
        place = f" (pid {self.where['pid']} on {self.where['host']})" if self.where else ""
        return f"Ray worker {self.number}{place}"


class RayWorkers:
    """The driver's side of the Ray workers: a ChunkWriter's three methods, run on the workers."""

    def __init__(
        self, spec: WorkerSpec, layout: WorkerLayout, count: int, progress: RunProgress, summary: RunSummary
    ):
        import ray

        actor = ray.remote(ChunkWorker).options(
            num_cpus=layout.cores,
            num_gpus=1 if layout.device == "cuda" else 0,
            max_restarts=RESTARTS_PER_WORKER,
            max_task_retries=0,  # the driver hands a lost chunk out again, knowing what it had counted
        )
        print(f"Starting {count} of {layout} (each loads the model)")
        self._spec, self._cores, self._gpus = spec, layout.cores, layout.device == "cuda"
        self._workers = []
        for number in range(1, count + 1):
            handle = actor.remote()
            self._workers.append(_Worker(handle, number, self._start(handle)))
        self._inbox = spec.inbox
        self._progress = progress
        self._summary = summary
        self._calls = 0
        self._relayed: dict[int, list[tuple]] = {}  # the counts of each call under way
        self._lost: set[int] = set()  # calls whose worker died: their late counts are dropped
        self._proven = False  # a worker reached an image: the run's reachability check is passed
        self._began = time.monotonic()
        self._warned = False

    def __enter__(self) -> RayWorkers:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """Stop the workers (their claims go with their processes) and the inbox."""
        import ray

        for worker in self._workers:
            ray.kill(worker.actor, no_restart=True)
        ray.kill(self._inbox, no_restart=True)

    def embed_all(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Embed the row ranges on the workers; return the ranges another run is at work on."""
        return self._run([_Task("embed", (start, end)) for start, end in ranges])

    def retry_all(self, chunks: list[ChunkInfo]) -> None:
        """Retry the finished chunks' failed rows on the workers."""
        self._run([_Task("retry", (info,)) for info in chunks])

    def write_unproven(self) -> list[tuple[int, int]]:
        """Have each worker write the chunks it holds; what a lost worker held is embedded again."""
        import ray

        holding = [worker for worker in self._workers if worker.held and not worker.dead]
        busy, again = [], []
        for worker in holding:
            task = _Task("write_unproven", ())
            reference = self._call(worker, task)
            ray.wait([reference])
            self._relay()  # its counts, which reach the inbox before its reply
            reply = self._outcome(reference, worker, task)
            if reply is None:
                again += [_Task("embed", held) for held in worker.held]
                worker.held = []
            else:
                busy += reply.busy
        return busy + self._run(again)

    def _run(self, tasks: list[_Task]) -> list[tuple[int, int]]:
        """Hand the tasks to the workers that are up, one each at a time; return the busy ranges."""
        import ray

        queue, running, busy = collections.deque(tasks), {}, []
        while queue or running:
            for worker in self._idle(running):
                if not queue:
                    break
                task = queue.popleft()
                running[self._call(worker, task)] = (worker, task)
            starting = {worker.starting: worker for worker in self._workers if worker.starting}
            done, _ = ray.wait([*running, *starting], num_returns=1, timeout=POLL_SECONDS)
            self._relay()
            self._warn_if_none_is_up()
            for ref in done:
                if ref in starting:
                    self._came_up(starting[ref])
                    continue
                worker, task = running.pop(ref)
                reply = self._outcome(ref, worker, task)
                if reply is None:
                    queue.extendleft([task, *(_Task("embed", held) for held in worker.held)])
                    worker.held = []
                else:
                    busy += reply.busy
        self._relay()
        return busy

    def _warn_if_none_is_up(self) -> None:
        """Say so, once, when no worker has come up for a long while: the cluster may lack their room."""
        if self._warned or any(worker.where for worker in self._workers):
            return
        if time.monotonic() - self._began > NO_WORKER_WARNING_SECONDS:
            self._warned = True
            print(
                f"No Ray worker is up after {NO_WORKER_WARNING_SECONDS} s: Ray may have no room for them "
                f"(each asks for {self._cores} CPU core(s){' and a GPU' if self._gpus else ''}). "
                "`ray status` on the head node shows what the cluster has and what waits; 02 goes on waiting."
            )

    def _idle(self, running: dict) -> list[_Worker]:
        working = {id(worker) for worker, _ in running.values()}
        up = [worker for worker in self._workers if worker.where and not worker.starting and not worker.dead]
        idle = [worker for worker in up if id(worker) not in working]
        if not up and all(worker.dead for worker in self._workers):
            raise PipelineError(
                "Every Ray worker died, and Ray could not start them again: see the workers' logs (under "
                "/tmp/ray/session_latest/logs on their nodes) for why; 02 run again resumes from the chunks "
                "written."
            )
        return idle

    def _start(self, actor: Any) -> Any:
        """Have a worker (or the one Ray started in place of a dead one) load the model: the reference."""
        return actor.start.remote(self._spec, self._cores)

    def _call(self, worker: _Worker, task: _Task) -> Any:
        self._calls += 1
        self._relayed[self._calls] = []
        reference = getattr(worker.actor, task.method).remote(self._calls, self._proven, *task.args)
        task.call = self._calls
        return reference

    def _came_up(self, worker: _Worker) -> None:
        """Note a worker that answered; an error it met while starting stops the run."""
        import ray

        try:
            worker.where = ray.get(worker.starting)
        except ray.exceptions.RayActorError as error:  # it died while loading the model
            worker.starting = None
            if worker.starts > RESTARTS_PER_WORKER:
                worker.dead = True
                return
            worker.starts += 1
            print(f"{worker} was lost while starting ({first_line(error)}): Ray starts it again")
            worker.starting = self._start(worker.actor)
        except ray.exceptions.RayTaskError as error:
            raise _worker_error(error) from None
        else:
            worker.starting = None
            print(f"{worker} is up, on {worker.where['device']}")

    def _outcome(self, reference: Any, worker: _Worker, task: _Task) -> WorkerReply | None:
        """A call's reply, added to the run's summary; None when its worker died under it."""
        import ray

        try:
            reply = ray.get(reference)
        except ray.exceptions.RayActorError as error:
            self._worker_lost(worker, task, error)
            return None
        except ray.exceptions.RayTaskError as error:  # what the worker raised, a PipelineError say
            if not isinstance(error.cause, NotStarted):
                raise _worker_error(error) from None
            self._worker_lost(worker, task, error.cause)  # it died while idle
            return None
        events = self._relayed.pop(task.call)
        worker.kept = worker.kept + events if reply.held else []
        self._summary.absorb(reply.summary)
        self._proven |= reply.proven
        worker.held = reply.held
        return reply

    def _worker_lost(self, worker: _Worker, task: _Task, error: Exception) -> None:
        """Take back the counts of the lost call and of the chunks the worker held; start it again."""
        events = self._relayed.pop(task.call) + worker.kept
        worker.kept = []
        self._lost.add(task.call)
        self._progress.take_back(
            [reason for _, name, value in events if name == "add" for reason in value],
            sum(value for _, name, value in events if name == "add_elsewhere"),
        )
        task.attempts += 1
        problem = first_line(error)
        if task.attempts >= ATTEMPTS_PER_CHUNK:
            raise PipelineError(
                f"{task} lost its Ray worker {task.attempts} times (the last: {problem}). See the workers' "
                "logs (/tmp/ray/session_latest/logs on their nodes) for why they die, memory say; 02 run "
                "again resumes from the chunks written."
            )
        print(
            f"{worker} was lost during {task} ({problem}): Ray starts it again; the rows are embedded again"
        )
        worker.where, worker.starting = None, self._start(worker.actor)

    def _relay(self) -> None:
        """Apply the workers' progress events to the run's progress, keeping each call's counts."""
        import ray

        for event in ray.get(self._inbox.take.remote()):
            call, name, value = event
            if call in self._lost:
                continue
            if call in self._relayed:
                self._relayed[call].append(event)
            getattr(self._progress, name)(value)


def _worker_error(error: Any) -> Exception:
    """What a worker raised: a PipelineError as it is; anything else with the worker's traceback."""
    return error.cause if isinstance(error.cause, PipelineError) else error
