"""02's wiring: the run's encoder, machine-sized batches, and the plan of chunks left to embed.

`plan_run` reads the collection's chunk folder: chunks that are done are skipped, chunks made
differently are an error that names the parameter, and the rest is cut into CHUNK-row ranges.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from .chunkfile import ChunkInfo, chunk_files, describe_difference, find_chunks, read_chunk_info, signature_of
from .cluster import connect, worker_layout
from .device_jpeg import DeviceJpegRecipe
from .errors import ParameterError, PipelineError
from .model import (
    ClipEncoder,
    described_encoder,
    library_versions,
    load_encoder,
    recorded_commit,
    resolve_device,
    resolve_precision,
)
from .params import EmbedParams
from .preprocess import ImageRecipe
from .settings import cpu_cores
from .storage import sync_chunks
from .table import ImageTable
from .workspace import DEFAULT_OUTPUT_DIR, Collection, current_workspace, resolve_path


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """Which row ranges a run finds done in a collection's chunk folder, and which it still has to embed."""

    folder: Path
    start: int
    end: int
    done: list[ChunkInfo]
    todo: list[tuple[int, int]]
    retry: list[ChunkInfo] = dataclasses.field(default_factory=list)  # done, with failed rows to retry
    signature: dict = dataclasses.field(default_factory=dict)  # what every chunk of the output shares

    @property
    def rows_to_do(self) -> int:
        """Rows to embed, and failed rows to attempt again."""
        return row_count(self.todo) + sum(info.failed for info in self.retry)

    def __str__(self) -> str:
        text = (
            f"rows [{self.start}, {self.end}): {len(self.done)} chunk(s) already done, "
            f"{len(self.todo)} to embed ({row_count(self.todo):,} rows)"
        )
        if self.retry:
            failed = sum(info.failed for info in self.retry)
            text += f", {len(self.retry)} to retry ({failed:,} failed rows)"
        return text


def run_encoder(params: EmbedParams, collection: Collection) -> ClipEncoder:
    """02's encoder: MODEL on DEVICE in PRECISION, at the revision the collection's chunks record.

    With EXECUTOR='ray', DEVICE is the Ray workers' and the encoder only describes what they load.

    With MODEL_REVISION=None, a collection whose chunks record a hub commit continues with that
    commit, even after the hub's main has moved on. PRECISION='auto' that resolves to another
    precision than the chunks record (another device) is an error naming the value that continues.
    A collection on object storage has its chunks brought into its staged copy first.
    """
    sync_chunks(collection)
    first = chunk_files(collection.chunks)[:1]
    recorded = read_chunk_info(first[0]).attrs if first else {}
    revision = params.model_revision or recorded_commit(recorded, params.model)
    if revision and params.model_revision is None:
        print(f"MODEL_REVISION=None: continuing with revision {revision}, which {collection.chunks} records")
    device = resolve_device(params.device) if params.executor == "local" else _ray_workers_device(params)
    precision = resolve_precision(params.precision, device)
    if recorded and params.precision == "auto" and precision != recorded.get("precision"):
        raise PipelineError(
            f"PRECISION='auto' is {precision!r} on {device}, but the chunks in {collection.chunks} were "
            f"made in {recorded.get('precision')!r} (on {recorded.get('device')}): set "
            f"PRECISION={recorded.get('precision')!r} to continue this collection here, or give this run "
            "another OUTPUT_DIR."
        )
    if params.executor == "ray":
        return described_encoder(params.model, device, params.precision, revision)
    return load_encoder(params.model, params.device, params.precision, revision)


def _ray_workers_device(params: EmbedParams) -> torch.device:
    """The device of the Ray workers that will embed: each loads the model itself, the driver does not."""
    connect(params.ray_address)
    layout = worker_layout(params.device, params.cpus_per_worker)
    print(f"EXECUTOR='ray': {layout}")
    return torch.device(layout.device)


CPU_BATCH_SIZE = 32  # the fastest batch on CPUs in the benchmarks' sweep (benchmarks/RESULTS.md)
CUDA_BATCH_LIMIT = 1024


def with_machine_sizes(params: EmbedParams, encoder: ClipEncoder) -> EmbedParams:
    """The parameters with GPU_BATCH_SIZE and NUM_WORKERS 'auto' resolved for this machine.

    NUM_WORKERS: one decoding thread per CPU core this process may use. GPU_BATCH_SIZE: on the
    CPU, the benchmarks' best; on CUDA, the largest power of two (up to 1024) whose forward pass
    fits in half the GPU's free memory, measured with a small batch. With EXECUTOR='ray' each
    worker sizes itself, and the driver leaves 'auto' as it is.
    """
    if encoder.on_workers:
        return params
    workers = params.num_workers if params.num_workers != "auto" else cpu_cores()
    batch = params.gpu_batch_size
    if batch == "auto":
        batch = CPU_BATCH_SIZE if encoder.device.type == "cpu" else cuda_batch_size(encoder)
    return dataclasses.replace(params, gpu_batch_size=batch, num_workers=workers)


def describe_sizes(params: EmbedParams) -> str:
    """GPU_BATCH_SIZE and NUM_WORKERS as a run uses them ('auto' is each Ray worker's own choice)."""
    batch, workers = (
        "sized by each Ray worker" if value == "auto" else value
        for value in (params.gpu_batch_size, params.num_workers)
    )
    return f"images per forward pass: {batch}; decoding threads: {workers}"


def cuda_batch_size(encoder: ClipEncoder, probe: int = 16) -> int:
    """The largest power of two up to CUDA_BATCH_LIMIT whose forward pass fits in half the free memory."""
    size = encoder.preprocessing.image_size
    torch.cuda.synchronize(encoder.device)
    torch.cuda.reset_peak_memory_stats(encoder.device)
    before = torch.cuda.memory_allocated(encoder.device)
    encoder.encode(np.zeros((probe, 3, size, size), np.float32))
    per_image = (torch.cuda.max_memory_allocated(encoder.device) - before) / probe
    free, _ = torch.cuda.mem_get_info(encoder.device)
    return batch_for_memory(free // 2, per_image, CUDA_BATCH_LIMIT)


def batch_for_memory(budget: float, per_image: float, limit: int) -> int:
    """The largest power of two, from 1 to `limit`, of images that fit in `budget` bytes."""
    fits = max(1, min(limit, int(budget // max(per_image, 1.0))))
    return 1 << (fits.bit_length() - 1)


def image_recipe(encoder: ClipEncoder, params: EmbedParams) -> ImageRecipe:
    """The encoder's preprocessing with the run's orientation options and pixel limit.

    PREPROCESS='fast' on CUDA decodes JPEGs on the GPU; on the CPU it is Pillow's draft mode.
    """
    options = (encoder.preprocessing, params.max_pixels, params.exif_transpose, params.apply_rotation)
    if params.preprocess == "fast" and encoder.device.type == "cuda":
        return DeviceJpegRecipe(*options, params.preprocess, device=str(encoder.device))
    return ImageRecipe(*options, params.preprocess)


def run_attributes(encoder: ClipEncoder, recipe: ImageRecipe, table: ImageTable, storage_dtype: str) -> dict:
    """How this run makes its vectors and stores them (STORAGE_DTYPE), as each chunk file records it."""
    return {
        **encoder.signature(),
        **recipe.describe(),
        "storage_dtype": storage_dtype,
        "table_sha256": table.info["sha256"],
        "model_id": encoder.checkpoint.model_id,
        "device": encoder.device.type,
        "runtime": encoder.runtime,
        "library_versions": json.dumps(library_versions()),
    }


def run_signature(encoder: ClipEncoder, recipe: ImageRecipe, table: ImageTable, storage_dtype: str) -> dict:
    """What every chunk of one output shares, with the model's id and the table's source to name them.

    Shared: the model, preprocessing, orientation options, precision, storage type and image table.
    """
    attributes = run_attributes(encoder, recipe, table, storage_dtype)
    return {**signature_of(attributes), "model_id": attributes["model_id"], "source": json.dumps(table.info)}


def _split_range(start: int, end: int, size: int) -> list[tuple[int, int]]:
    return [(low, min(low + size, end)) for low in range(start, end, size)]


def row_count(ranges: Iterable[tuple[int, int]]) -> int:
    return sum(end - start for start, end in ranges)


def _check_row_range(start: int, end: int | None, rows: int) -> int:
    end = rows if end is None else end
    if start >= rows or end > rows:
        raise ParameterError(
            f"START={start}, END={end} is outside the image table, which has {rows:,} rows: "
            f"use 0 <= START < END <= {rows}, or END=None for the end of the table."
        )
    return end


def check_signatures(chunks: list[ChunkInfo], signature: dict) -> None:
    for info in chunks:
        if info.signature != signature_of(signature):
            raise PipelineError(
                f"{info.path} was made differently from this run "
                f"({describe_difference(info.attrs, signature, ('recorded', 'requested'))}). Run with the "
                "recorded values to continue this collection, or give this run another OUTPUT_DIR (a "
                "collection of its own)."
            )


def uncovered(start: int, end: int, chunk: int, done: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Rows of [start, end) outside the `done` ranges, in pieces of at most `chunk` rows."""
    todo, cursor = [], start
    for low, high in sorted(done):
        if low > cursor:
            todo += _split_range(cursor, min(low, end), chunk)
        cursor = max(cursor, high)
    if cursor < end:
        todo += _split_range(cursor, end, chunk)
    return todo


def plan_chunks(
    collection: Collection,
    start: int,
    end: int | None,
    chunk: int,
    signature: dict,
    rows: int,
    retry_failed: bool = False,
) -> ChunkPlan:
    """Cover rows [start, end) with chunks of at most `chunk` rows, skipping rows already embedded.

    A chunk file made with another model, preprocessing, precision or image table is never
    reused: it is an error that says what differs. With `retry_failed`, finished chunks that
    recorded failures are planned for a retry of those rows.
    """
    end = _check_row_range(start, end, rows)
    existing = find_chunks(collection.chunks)
    if not existing:
        _check_no_earlier_chunks(collection, signature["table_sha256"])
    check_signatures(existing, signature)
    done = [info for info in existing if info.start < end and info.end > start]
    todo = uncovered(start, end, chunk, [(info.start, info.end) for info in done])
    retry = [info for info in done if info.failed] if retry_failed else []
    return ChunkPlan(collection.chunks, start, end, done, todo, retry, signature)


def _check_no_earlier_chunks(collection: Collection, table_sha256: str) -> None:
    """Say so when OUTPUT/chunks holds chunks of this table, which a new collection would embed again.

    Versions without OUTPUT_DIR kept every collection's chunks in OUTPUT/chunks and the table in
    .cache/: while that table is there, such chunks are this collection's own, and 02 stops with
    the move that continues them. Once OUTPUT/ has a table of its own, they may be its collection's
    (the demo's, say), and 02 only notes them.
    """
    shared = Collection(resolve_path(DEFAULT_OUTPUT_DIR))
    if collection == shared:
        return
    try:
        theirs = [info for info in find_chunks(shared.chunks) if info.attrs["table_sha256"] == table_sha256]
    except PipelineError:  # unreadable chunks there: not this run's to judge
        return
    if not theirs:
        return
    move = f"mkdir -p {collection.chunks} && mv {shared.chunks}/chunk_*.h5 {collection.chunks}/"
    if current_workspace().earlier_table.is_file():
        raise PipelineError(
            f"{shared.chunks} holds {len(theirs)} chunk file(s) of this image table, made by an earlier "
            f"version that kept every collection in {shared.folder}. To continue them in this collection, "
            f"move them here first: {move}. To leave them to the collection in {shared.folder} and start "
            f"this one afresh, first run 01_metadata with OUTPUT_DIR={DEFAULT_OUTPUT_DIR!r}: that moves "
            "their image table there from .cache/."
        )
    print(
        f"Note: {shared.chunks} holds {len(theirs)} chunk file(s) of this same image table, the collection "
        f"in {shared.folder}'s (or made there by an earlier version). To reuse them rather than embed their "
        f"rows again, stop now and move them here: {move}"
    )


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What one 02 run does: how it prepares each image, and which chunks it embeds or retries."""

    recipe: ImageRecipe
    chunks: ChunkPlan

    def __str__(self) -> str:
        return str(self.chunks)


def plan_run(params: EmbedParams, collection: Collection, encoder: ClipEncoder, table: ImageTable) -> RunPlan:
    """02's plan: the encoder's preprocessing with the run's options, and the chunks of [START, END) to do."""
    recipe = image_recipe(encoder, params)
    signature = run_signature(encoder, recipe, table, params.storage_dtype)
    chunks = plan_chunks(
        collection, params.start, params.end, params.chunk, signature, len(table), params.retry_failed
    )
    return RunPlan(recipe, chunks)
