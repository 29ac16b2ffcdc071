"""02's run on this machine: claims each planned chunk, embeds it, writes its file, keeps the summary.

Chunks that other runs hold are waited for and what they leave undone is embedded; a run whose
first images all fail for want of a way to them (`SourceCheck`) stops before recording them. On
object storage, each chunk file is uploaded once written, under the collection's lease.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from .chunkfile import (
    FORMAT_VERSION,
    ChunkInfo,
    ChunkResult,
    chunk_path,
    find_chunks,
    read_chunk_info,
    write_chunk,
)
from .claims import (
    FileLock,
    check_not_held_here,
    chunk_ranges,
    claimed,
    overlapping,
    remove_stale_files,
    wait_for_claims,
)
from .embed import FETCH_THREADS_PER_WORKER, ImageLoader, embed_chunk, estimated_bytes, retry_chunk
from .errors import PipelineError, counted
from .fetch import Fetcher
from .model import ClipEncoder
from .params import EmbedParams
from .plan import (
    ChunkPlan,
    RunPlan,
    check_signatures,
    row_count,
    run_attributes,
    uncovered,
    with_machine_sizes,
)
from .preprocess import ImageRecipe
from .progress import RunProgress
from .storage import lease, push
from .table import ImageTable
from .workspace import Collection, check_free_space, check_writable, collection


@dataclasses.dataclass
class RunSummary:
    """What one 02 run did."""

    chunks_skipped: int
    chunks_written: int = 0
    attempted: int = 0
    embedded: int = 0
    failed_by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    chunks_retried: int = 0
    retried: int = 0
    recovered: int = 0
    seconds: float = 0.0
    waited_seconds: float = 0.0  # the encoder waiting for images (fetched, decoded, preprocessed)
    first_batch_seconds: float | None = None  # of which for the first batch: the pipeline filling up
    write_seconds: float = 0.0  # writing chunk files
    workers: int = 1  # Ray workers whose waits and writes are added up

    def add(self, result: ChunkResult) -> None:
        stats = result.stats()
        if self.first_batch_seconds is None and result.image_waits:
            self.first_batch_seconds = result.image_waits[0]
        self.waited_seconds += stats["waited_seconds"]
        self.chunks_written += 1
        self.attempted += stats["attempted"]
        self.embedded += stats["embedded"]
        self.failed_by_reason.update(stats["failed_by_reason"])

    def add_retry(self, before: ChunkInfo, after: ChunkResult) -> None:
        self.chunks_retried += 1
        self.retried += after.retried
        self.recovered += before.failed - len(after.failed.rows)

    def absorb(self, other: RunSummary) -> None:
        """Add what another part of the run did (a Ray worker's chunks); `seconds` stays the run's."""
        if self.first_batch_seconds is None:
            self.first_batch_seconds = other.first_batch_seconds
        self.failed_by_reason.update(other.failed_by_reason)
        for name in _ADDED_UP:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def __str__(self) -> str:
        attempted = self.attempted + self.retried
        rate = attempted / self.seconds if self.seconds else 0.0
        failed = sum(self.failed_by_reason.values())
        lines = [
            f"chunks written: {self.chunks_written}, already done: {self.chunks_skipped}",
            f"images attempted: {self.attempted:,}, embedded: {self.embedded:,}, failed: {failed:,}"
            f" ({rate:,.1f} img/s)",
        ]
        lines += [f"  failed, {reason}: {count:,}" for reason, count in self.failed_by_reason.most_common()]
        if self.chunks_retried:
            lines.append(
                f"failed images retried: {self.retried:,} in {self.chunks_retried} chunk(s), "
                f"recovered: {self.recovered:,}, still failed: {self.retried - self.recovered:,}"
            )
        if self.first_batch_seconds is not None:
            models = (
                "the model" if self.workers == 1 else f"the models of {self.workers} Ray workers, added up,"
            )
            lines.append(
                f"time: {self.seconds:,.1f} s; {models} waited {self.waited_seconds:,.1f} s for images "
                f"({self.first_batch_seconds:.1f} s for the first batch); writing chunk files took "
                f"{self.write_seconds:.1f} s"
            )
        return "\n".join(lines)


_ADDED_UP = (
    "chunks_skipped",
    "chunks_written",
    "attempted",
    "embedded",
    "chunks_retried",
    "retried",
    "recovered",
    "waited_seconds",
    "write_seconds",
)


def embed_chunks(table: ImageTable, encoder: ClipEncoder, plan: RunPlan, params: EmbedParams) -> RunSummary:
    """Embed every chunk the plan has to do, writing each chunk file as soon as it is complete.

    Each chunk is claimed first (a lock file beside it), so runs that share OUTPUT_DIR never write
    the same rows: a chunk claimed by another run is left to it, and waited for at the end.
    """
    params = with_machine_sizes(params, encoder)
    summary = prepare_chunk_folder(table, plan.chunks, encoder.embedding_size)
    began = time.perf_counter()
    output = collection(params.output_dir, params.s3_endpoint_url)
    with (
        lease(output, "02_embed"),
        image_loader(plan.recipe, params) as loader,
        RunProgress(plan.chunks.rows_to_do) as progress,
    ):
        writer = chunk_writer(output, plan.chunks.folder, table, encoder, loader, params, progress, summary)
        run_chunk_plan(writer, plan.chunks, params.chunk, progress)
    summary.seconds = time.perf_counter() - began
    return summary


def prepare_chunk_folder(table: ImageTable, chunks: ChunkPlan, embedding_size: int) -> RunSummary:
    """Check that the chunk folder takes the run's files and clear what interrupted runs left there.

    The run's summary starts with the chunks found done.
    """
    check_writable(chunks.folder)
    needed = estimated_bytes(table, chunks.todo, embedding_size)
    check_free_space(chunks.folder, needed, f"{row_count(chunks.todo):,} rows of chunk files")
    removed = remove_stale_files(chunks.folder)
    if removed:
        print(f"Removed {len(removed)} file(s) that an interrupted run left in {chunks.folder}")
    return RunSummary(len(chunks.done))


def chunk_writer(
    output: Collection,
    folder: Path,
    table: ImageTable,
    encoder: ClipEncoder,
    loader: ImageLoader,
    params: EmbedParams,
    progress: RunProgress,
    summary: RunSummary,
) -> ChunkWriter:
    """A run's ChunkWriter: its chunks' attributes, its reachability check, and uploads on object storage."""
    return ChunkWriter(
        folder,
        table,
        encoder,
        loader,
        params.gpu_batch_size,
        chunk_attributes(encoder, loader.recipe, table, params),
        progress,
        SourceCheck(loader.fetcher.s3_access, enabled=params.stop_if_unreachable),
        summary,
        publish=functools.partial(push, output) if output.remote else None,
    )


def chunk_attributes(
    encoder: ClipEncoder, recipe: ImageRecipe, table: ImageTable, params: EmbedParams
) -> dict:
    """What each chunk file records of how it was made: the run's attributes, MODEL and the table's source."""
    return {
        **run_attributes(encoder, recipe, table, params.storage_dtype),
        "format_version": FORMAT_VERSION,
        "model": params.model,
        "source": json.dumps(table.info),
    }


def image_loader(recipe: ImageRecipe, params: EmbedParams) -> ImageLoader:
    """The run's loader: NUM_WORKERS decoding threads, fetching through S3_ENDPOINT_URL's client."""
    fetch_threads = FETCH_THREADS_PER_WORKER * params.num_workers
    fetcher = Fetcher(params.s3_endpoint_url, pool_size=fetch_threads, s3_anonymous=params.s3_anonymous)
    lookahead = 2 * params.gpu_batch_size + fetch_threads
    return ImageLoader(fetcher, recipe, params.num_workers, lookahead)


def run_chunk_plan(writer: ChunkWriter, chunks: ChunkPlan, chunk: int, progress: RunProgress) -> None:
    """Embed the plan's chunks, then what other runs left undone of theirs, then retry failed rows.

    `writer` is this process's ChunkWriter or a pool of Ray workers: anything with its three methods.
    """
    todo = chunks.todo
    while todo:
        busy = writer.embed_all(todo)
        busy += writer.write_unproven()
        todo = _after_other_runs(busy, chunks, chunk, progress)
    writer.retry_all(chunks.retry)


REJECTED_CREDENTIALS = (
    "s3 InvalidAccessKeyId",
    "s3 SignatureDoesNotMatch",
    "s3 ExpiredToken",
    "s3 InvalidToken",
)
UNREACHABLE_REASONS = (
    "connection error",
    "timeout",
    "cannot resolve",
    "s3 AccessDenied",
    "s3 NoSuchBucket",
    "range ignored",
    *REJECTED_CREDENTIALS,
)
UNREACHABLE_AFTER = 200  # failed attempts, all for want of a way to the images, that stop a run
_UNREACHABLE_ADVICE = {
    "connection error": "nothing answers there: check the network, a proxy (HTTPS_PROXY), S3_ENDPOINT_URL "
    "and the table's locations",
    "timeout": "the server does not answer in time: check the network, a firewall or a proxy",
    "cannot resolve": "its host name cannot be resolved: is this machine offline? Check DNS and the "
    "table's locations",
    "s3 AccessDenied": "the bucket {bucket} refuses this machine, which asked {access}: give it credentials "
    "that may read the bucket (AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), or set "
    "S3_ANONYMOUS=True if the bucket is public",
    "s3 NoSuchBucket": "there is no such bucket at this endpoint: check the bucket in the table's "
    "locations and S3_ENDPOINT_URL",
    "range ignored": "the server sends whole objects where a byte range of a shard is asked for: serve the "
    "shards from one that answers Range requests (most do; Python's http.server does not)",
    **dict.fromkeys(
        REJECTED_CREDENTIALS,
        "the bucket {bucket} rejects the credentials that this machine sent, {access}: renew or correct "
        "them (AWS_PROFILE, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), or set "
        "S3_ANONYMOUS=True if the bucket is public",
    ),
}


class SourceCheck:
    """Whether a run reaches its images: first attempts that all fail for want of a way there stop it.

    A run whose first UNREACHABLE_AFTER attempts all failed with a connection-level reason stops
    with what to check, instead of recording millions of failures as finished chunks. One image
    that arrives, or fails for another reason, proves the way. RETRY_FAILED's attempts are left
    out: their rows failed before, and a retry that fails again records nothing new. `s3_access`
    says how a bucket was asked (Fetcher.s3_access).
    """

    def __init__(self, s3_access: Callable[[str], str], enabled: bool = True, limit: int = UNREACHABLE_AFTER):
        self.proven = not enabled
        self._s3_access = s3_access
        self._limit = limit
        self._reasons: collections.Counter = collections.Counter()
        self._example: str | None = None

    def add(self, locations: list[str], reasons: list[str | None]) -> None:
        """Count a batch's attempts; raise PipelineError once the limit is reached unproven."""
        if self.proven:
            return
        for location, reason in zip(locations, reasons, strict=True):
            if reason not in UNREACHABLE_REASONS:
                self.proven = True
                return
            self._reasons[reason] += 1
            self._example = self._example or location
        if self._reasons.total() >= self._limit:
            reason, _ = self._reasons.most_common(1)[0]
            failed = f"{self._reasons.total()} images of this run all failed ({counted(self._reasons)})"
            raise PipelineError(
                f"The first {failed}, e.g. {self._example} ({reason}): {self._advice(reason)}. 02 stopped "
                "and recorded none of them, so a run that can reach them embeds them all; set "
                "STOP_IF_UNREACHABLE=False to record such failures anyway."
            )

    def _advice(self, reason: str) -> str:
        advice = _UNREACHABLE_ADVICE[reason]
        if "{access}" not in advice:
            return advice
        bucket = urlparse(self._example or "").netloc
        return advice.format(bucket=bucket, access=self._s3_access(bucket))


@dataclasses.dataclass
class ChunkWriter:
    """Claims, embeds and writes one run's chunks, and keeps its summary.

    Until the run proves it reaches its images (SourceCheck), finished chunks wait in memory, without
    their claims, so that a run that stops for want of a way to them records nothing.
    """

    folder: Path
    table: ImageTable
    encoder: ClipEncoder
    loader: ImageLoader
    batch_size: int
    attrs: dict
    progress: RunProgress
    reach: SourceCheck
    summary: RunSummary
    unproven: list[ChunkResult] = dataclasses.field(default_factory=list)
    publish: Callable[[Path], None] | None = None  # uploads each chunk file written (object storage)

    def embed_all(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Embed each row range in turn; return the ranges another run is at work on."""
        return [busy for start, end in ranges for busy in self.embed(start, end)]

    def retry_all(self, chunks: list[ChunkInfo]) -> None:
        """Retry each finished chunk's failed rows in turn."""
        for info in chunks:
            self.retry(info)

    def embed(self, start: int, end: int) -> list[tuple[int, int]]:
        """Embed rows [start, end) into chunk files; return the ranges another run is at work on.

        Rows that another run finished meanwhile are skipped, and the rest of the range is embedded.
        """
        with claimed(self.folder, start, end) as claim:
            if isinstance(claim, str):
                check_not_held_here(claim)
                print(f"rows [{start}, {end}) overlap a chunk that another run is embedding ({claim})")
                return [(start, end)]
            if claim is None:
                return self._embed_rest(start, end)
            result = embed_chunk(
                self.table, start, end, self.encoder, self.loader, self.batch_size, self._observe
            )
            if self.reach.proven:
                self._write(result)
        if not self.reach.proven:
            self.unproven.append(result)
            return []
        return self.write_unproven()

    def write_unproven(self) -> list[tuple[int, int]]:
        """Write the chunks that waited, each under a claim again; return the ranges other runs hold.

        This happens once the run proves it reaches its images, or at the end of its chunks, short
        of the limit. A chunk whose rows another run finished meanwhile is dropped; one whose rows
        another run is at work on is waited for like any busy range.
        """
        busy = []
        while self.unproven:
            result = self.unproven.pop(0)
            with claimed(self.folder, result.start, result.end) as claim:
                if isinstance(claim, FileLock):
                    self._write(result)
                elif isinstance(claim, str):
                    busy.append((result.start, result.end))
        return busy

    def _write(self, result: ChunkResult) -> None:
        path = chunk_path(self.folder, result.start, result.end)
        self._write_file(path, result, self.attrs)
        self.summary.add(result)
        self.progress.chunk_written(path.name)

    def _write_file(self, path: Path, result: ChunkResult, attrs: dict) -> None:
        """Write a chunk file (under its claim), and upload it whole where the collection is remote."""
        began = time.perf_counter()
        write_chunk(path, result, attrs)
        if self.publish:
            self.publish(path)
        self.summary.write_seconds += time.perf_counter() - began

    def _observe(self, locations: list[str], reasons: list[str | None]) -> None:
        self.progress.add(reasons)
        self.reach.add(locations, reasons)

    def _count_retried(self, locations: list[str], reasons: list[str | None]) -> None:
        self.progress.add(reasons)

    def _embed_rest(self, start: int, end: int) -> list[tuple[int, int]]:
        """Embed the rows of [start, end) that no finished chunk covers; return the busy ranges."""
        finished = overlapping(chunk_ranges(self.folder), start, end)
        rest = uncovered(start, end, end - start, finished)
        self.progress.add_elsewhere(end - start - row_count(rest))
        if not rest:
            self.summary.chunks_skipped += 1
        return [busy for low, high in rest for busy in self.embed(low, high)]

    def retry(self, info: ChunkInfo) -> None:
        """Attempt a finished chunk's failed rows again and replace the chunk file whole.

        A retry loses nothing when it fails again, so it is written at once and not judged by the
        reachability check.
        """
        with claimed(self.folder, info.start, info.end, rewrite=True) as claim:
            if not isinstance(claim, FileLock):
                print(f"{info.path.name} is not retried: another run is at work on its rows ({claim})")
                return
            current = read_chunk_info(info.path)  # as it is now, under the claim
            result = retry_chunk(
                current, self.table, self.encoder, self.loader, self.batch_size, self._count_retried
            )
            self._write_file(info.path, result, current.attrs)
        self.summary.add_retry(current, result)
        self.progress.chunk_written(info.path.name)


def _after_other_runs(
    busy: list[tuple[int, int]], plan: ChunkPlan, chunk: int, progress: RunProgress
) -> list[tuple[int, int]]:
    """Wait for the runs at work on the `busy` ranges; what they left undone is this run's to do."""
    if not busy:
        return []
    print(f"Waiting for the other run(s) to finish {len(busy)} chunk(s)...")
    for start, end in busy:
        wait_for_claims(plan.folder, start, end)
    finished = find_chunks(plan.folder)
    check_signatures(finished, plan.signature)
    done = [(info.start, info.end) for info in finished]
    left = [piece for start, end in busy for piece in uncovered(start, end, chunk, done)]
    progress.add_elsewhere(row_count(busy) - row_count(left))
    return left
