"""02 with EXECUTOR='ray': workers, one per GPU (or per CPUS_PER_WORKER cores), embed whole chunks.

Each worker is a Ray actor that loads the model once and runs the local executor's per-chunk
pipeline: claim, fetch threads, decode, encode, write. The driver hands chunks to the workers that
are up, relays their progress and adds up their summaries. A worker that dies (its process, or its
node) is restarted by Ray and its chunk handed out again; chunk files are written whole under a
claim, so a chunk that runs twice replaces only itself.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
import time
from pathlib import Path
from typing import Any

from . import executor
from .chunkfile import ChunkInfo, describe_difference, signature_of
from .cluster import WorkerLayout, connect, worker_layout
from .errors import PipelineError
from .executor import (
    ChunkWriter,
    RunSummary,
    SourceCheck,
    chunk_attributes,
    image_loader,
    prepare_chunk_folder,
    run_chunk_plan,
)
from .model import ClipEncoder, load_encoder
from .params import EmbedParams
from .plan import RunPlan, image_recipe, run_signature, with_machine_sizes
from .progress import RunProgress
from .settings import Settings, configure, current_settings
from .table import ImageTable

ATTEMPTS_PER_CHUNK = 3  # a chunk whose worker dies this many times under it stops the run
RESTARTS_PER_WORKER = 8  # Ray starts a dead worker again this many times
POLL_SECONDS = 0.5  # how often the driver relays the workers' progress


def embed_chunks(table: ImageTable, encoder: ClipEncoder, plan: RunPlan, params: EmbedParams) -> RunSummary:
    """02's run: on this machine with EXECUTOR='local', else on the Ray workers of RAY_ADDRESS."""
    if params.executor == "local":
        return executor.embed_chunks(table, encoder, plan, params)
    return _embed_on_ray(table, encoder, plan, params)


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What every worker starts from: the driver's settings, its parameters and the plan's signature."""

    settings: Settings
    params: EmbedParams  # with the workers' device, and a hub model pinned to the driver's commit
    folder: Path  # the chunk folder
    signature: dict  # what the plan's chunks share, which each worker's vectors must match
    table: Any  # the image table, in Ray's object store
    inbox: Any  # the actor that collects the workers' progress for the driver


def _embed_on_ray(table: ImageTable, encoder: ClipEncoder, plan: RunPlan, params: EmbedParams) -> RunSummary:
    import ray

    chunks = plan.chunks
    summary = prepare_chunk_folder(table, chunks, encoder.embedding_size)
    if not chunks.todo and not chunks.retry:
        return summary
    connect(params.ray_address)
    layout = worker_layout(params.device, params.cpus_per_worker)
    hub_commit = None if encoder.checkpoint.revision.startswith("sha256:") else encoder.checkpoint.revision
    inbox = ray.remote(num_cpus=0)(ProgressInbox).remote()
    spec = WorkerSpec(
        current_settings(),
        dataclasses.replace(params, device=layout.device, model_revision=hub_commit),
        chunks.folder,
        chunks.signature,
        ray.put(table),
        inbox,
    )
    began = time.perf_counter()
    count = min(layout.workers, len(chunks.todo) + len(chunks.retry))
    with (
        RunProgress(chunks.rows_to_do) as progress,
        RayWorkers(spec, layout, count, progress, summary) as workers,
    ):
        run_chunk_plan(workers, chunks, params.chunk, progress)
    summary.seconds = time.perf_counter() - began
    return summary


class ProgressInbox:
    """A Ray actor that keeps the workers' progress events until the driver takes them."""

    def __init__(self) -> None:
        self._events: list[tuple] = []

    def put(self, event: tuple) -> None:
        self._events.append(event)

    def take(self) -> list[tuple]:
        events, self._events = self._events, []
        return events


class _RelayedProgress:
    """A worker's RunProgress: each count goes to the driver's inbox, tagged with the call it belongs to."""

    def __init__(self, inbox: Any):
        self._inbox = inbox
        self.call = 0  # the driver's number of the call under way

    def add(self, reasons: list[str | None]) -> None:
        self._inbox.put.remote((self.call, "add", reasons))

    def add_elsewhere(self, rows: int) -> None:
        self._inbox.put.remote((self.call, "add_elsewhere", rows))

    def chunk_written(self, name: str) -> None:
        self._inbox.put.remote((self.call, "chunk_written", name))


@dataclasses.dataclass(frozen=True)
class WorkerReply:
    """What a worker's call did: ranges another run is at work on, its summary, the chunks it holds."""

    busy: list[tuple[int, int]]
    summary: RunSummary
    held: list[tuple[int, int]]  # embedded, not yet written: the run has not yet proven it reaches images


class NotStarted(Exception):
    """A call to a worker that Ray started again, in place of a dead one, before it was given the run."""


class ChunkWorker:
    """A Ray actor: `start` loads the model once, then whole chunks are claimed, embedded and written.

    Ray starts a worker that died again without its state; the driver then calls `start` again.
    """

    def __init__(self) -> None:
        self._writer: ChunkWriter | None = None

    def start(self, spec: WorkerSpec, cores: int) -> dict:
        """Load the model and check its vectors; return where this worker runs."""
        self._writer = _start_writer(spec, cores)
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": str(self._writer.encoder.device)}

    def embed(self, call: int, start: int, end: int) -> WorkerReply:
        return self._reply(self._started(call).embed(start, end))

    def write_unproven(self, call: int) -> WorkerReply:
        return self._reply(self._started(call).write_unproven())

    def retry(self, call: int, info: ChunkInfo) -> WorkerReply:
        self._started(call).retry(info)
        return self._reply([])

    def _started(self, call: int) -> ChunkWriter:
        """The writer, its progress tagged with the driver's number of this call."""
        if self._writer is None:
            raise NotStarted("Ray started this worker again after it died, without the run's model")
        self._writer.progress.call = call
        return self._writer

    def _reply(self, busy: list[tuple[int, int]]) -> WorkerReply:
        summary, self._writer.summary = self._writer.summary, RunSummary(0)
        return WorkerReply(busy, summary, [(result.start, result.end) for result in self._writer.unproven])


def _start_writer(spec: WorkerSpec, cores: int) -> ChunkWriter:
    """Load the model on this worker's device and check that it makes the plan's vectors."""
    import ray
    import torch

    configure(**{**vars(spec.settings), "cores": cores})
    if spec.params.device == "cpu":
        torch.set_num_threads(cores)
    table = ray.get(spec.table)
    params = spec.params
    encoder = load_encoder(params.model, params.device, params.precision, params.model_revision)
    params = with_machine_sizes(params, encoder)
    recipe = image_recipe(encoder, params)
    signature = run_signature(encoder, recipe, table)
    if signature_of(signature) != signature_of(spec.signature):
        difference = describe_difference(spec.signature, signature, ("the plan", "this worker"))
        raise PipelineError(
            f"The Ray worker on {socket.gethostname()} makes vectors unlike the plan's ({difference}): give "
            "every node of the cluster the same model files and versions of this pipeline."
        )
    loader = image_loader(recipe, params)
    return ChunkWriter(
        spec.folder,
        table,
        encoder,
        loader,
        params.gpu_batch_size,
        chunk_attributes(encoder, recipe, table, params.model),
        _RelayedProgress(spec.inbox),
        SourceCheck(loader.fetcher.s3_access, enabled=params.stop_if_unreachable),
        RunSummary(0),
    )


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
        return f"rows [{self.args[0]}, {self.args[1]})"


@dataclasses.dataclass
class _Worker:
    """The driver's view of one worker: its actor, whether it is up, and what it holds."""

    actor: Any
    number: int
    starting: Any  # the reference of its `start` call until it answers; None once it is up
    where: dict | None = None
    held: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    dead: bool = False

    def __str__(self) -> str:
        place = f" (pid {self.where['pid']} on {self.where['host']})" if self.where else ""
        return f"Ray worker {self.number}{place}"


class RayWorkers:
    """The driver's side of the Ray workers: a ChunkWriter's three methods, run on all workers at once."""

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
        self._spec, self._cores = spec, layout.cores
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
        holding = [worker for worker in self._workers if worker.held and not worker.dead]
        busy, again = [], []
        for worker in holding:
            task = _Task("write_unproven", ())
            reply = self._outcome(self._call(worker, task), worker, task)
            if reply is None:
                again += [_Task("embed", held) for held in worker.held]
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
            starting = {
                worker.starting: worker for worker in self._workers if worker.starting and not worker.dead
            }
            done, _ = ray.wait([*running, *starting], num_returns=1, timeout=POLL_SECONDS)
            self._relay()
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
        return busy

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
        reference = getattr(worker.actor, task.method).remote(self._calls, *task.args)
        task.call = self._calls
        return reference

    def _came_up(self, worker: _Worker) -> None:
        """Note a worker that answered; an error it met while starting stops the run."""
        import ray

        try:
            worker.where = ray.get(worker.starting)
        except ray.exceptions.RayTaskError as error:
            raise error.cause from None
        except ray.exceptions.RayActorError:
            worker.dead = True  # Ray gave up starting it again
        else:
            print(f"{worker} is up, on {worker.where['device']}")
        worker.starting = None

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
                raise error.cause from None
            self._worker_lost(worker, task, error.cause)  # it died while idle
            return None
        self._relayed.pop(task.call)
        self._summary.absorb(reply.summary)
        worker.held = reply.held
        return reply

    def _worker_lost(self, worker: _Worker, task: _Task, error: Exception) -> None:
        """Take back the counts of the lost call, and have Ray's restart of the worker noticed."""
        events = self._relayed.pop(task.call)
        self._lost.add(task.call)
        self._progress.take_back(
            [reason for _, name, value in events if name == "add" for reason in value],
            sum(value for _, name, value in events if name == "add_elsewhere"),
        )
        task.attempts += 1
        problem = str(error).splitlines()[0]
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
