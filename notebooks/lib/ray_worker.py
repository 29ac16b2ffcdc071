"""02 with EXECUTOR='ray', a worker's side: a Ray actor that loads the model once, then embeds chunks.

Each chunk goes through the local executor's ChunkWriter (claim, fetch threads, decode, encode,
write); its counts go to the driver's inbox as they are made, tagged with the driver's call.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

from .chunkfile import ChunkInfo, describe_difference, signature_of
from .errors import PipelineError
from .executor import ChunkWriter, RunSummary, chunk_writer, image_loader
from .model import load_encoder
from .params import EmbedParams
from .plan import image_recipe, run_signature, with_machine_sizes
from .settings import Settings, configure
from .workspace import Collection


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What every worker starts from: the driver's settings, its parameters and the plan's signature."""

    settings: Settings
    params: EmbedParams  # with the workers' device, and a hub model pinned to the driver's commit
    folder: Path  # the chunk folder
    signature: dict  # what the plan's chunks share, which each worker's vectors must match
    table: Any  # the image table, in Ray's object store
    inbox: Any  # the actor that collects the workers' progress for the driver
    output: Collection  # where chunk files go: staged here, and uploaded if it is on object storage


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
        self._sent: list[Any] = []
        self.call = 0  # the driver's number of the call under way

    def add(self, reasons: list[str | None]) -> None:
        self._send("add", reasons)

    def add_elsewhere(self, rows: int) -> None:
        self._send("add_elsewhere", rows)

    def chunk_written(self, name: str) -> None:
        self._send("chunk_written", name)

    def _send(self, name: str, value: Any) -> None:
        self._sent.append(self._inbox.put.remote((self.call, name, value)))

    def flush(self) -> None:
        """Wait until the inbox holds every count sent: a call's reply comes after its counts."""
        import ray

        ray.get(self._sent)
        self._sent = []


@dataclasses.dataclass(frozen=True)
class WorkerReply:
    """What a worker's call did: ranges another run is at work on, its summary, the chunks it holds."""

    busy: list[tuple[int, int]]
    summary: RunSummary
    held: list[tuple[int, int]]  # embedded, not yet written: the run has not yet proven it reaches images
    proven: bool  # whether the worker has reached an image (SourceCheck)


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

    def embed(self, call: int, proven: bool, start: int, end: int) -> WorkerReply:
        return self._reply(self._started(call, proven).embed(start, end))

    def write_unproven(self, call: int, proven: bool) -> WorkerReply:
        return self._reply(self._started(call, proven).write_unproven())

    def retry(self, call: int, proven: bool, info: ChunkInfo) -> WorkerReply:
        self._started(call, proven).retry(info)
        return self._reply([])

    def _started(self, call: int, proven: bool) -> ChunkWriter:
        """The writer, its counts tagged with the driver's number of this call.

        `proven`: another worker of the run has reached an image, so this one's chunks need not wait.
        """
        if self._writer is None:
            raise NotStarted("Ray started this worker again after it died, without the run's model")
        self._writer.progress.call = call
        self._writer.reach.proven |= proven
        return self._writer

    def _reply(self, busy: list[tuple[int, int]]) -> WorkerReply:
        self._writer.progress.flush()
        summary, self._writer.summary = self._writer.summary, RunSummary(0)
        held = [(result.start, result.end) for result in self._writer.unproven]
        return WorkerReply(busy, summary, held, self._writer.reach.proven)


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
    signature = run_signature(encoder, recipe, table, params.storage_dtype)
    if signature_of(signature) != signature_of(spec.signature):
        difference = describe_difference(spec.signature, signature, ("the plan", "this worker"))
        raise PipelineError(
            f"The Ray worker on {socket.gethostname()} makes vectors unlike the plan's ({difference}): give "
            "every node of the cluster the same model files and versions of this pipeline."
        )
    progress = _RelayedProgress(spec.inbox)
    loader = image_loader(recipe, params)
    return chunk_writer(spec.output, spec.folder, table, encoder, loader, params, progress, RunSummary(0))
