"""WebDataset shards: 01's index of them, and 02's range reads of their images against whole files.

    python benchmarks/shards.py                      # 10 shards of 1,000 photos (320x240), this machine
    python benchmarks/shards.py --shards 20 --samples 500

Each sample is a photo with a .txt and a .json member, and each shard has img2dataset's .parquet
beside it. The shards are on local disk and on a loopback S3 (moto's server, in this process's
machine), and the same photos as single files on both. Prints one JSON object:
  index          01's build of the image table from the shards: the first time (local shards read
                 header by header, S3 ones end to end) and again (the cached indexes, one request per
                 shard that finds it unchanged), in seconds and samples per second
  fetch_img_s    images per second that 02's fetcher reads with FETCH_THREADS threads (the median of
                 REPEATS turns): members of the shards by range reads, and the same photos as files or
                 objects of their own
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import time

import pandas as pd
from workload import lib, loopback_s3, synthetic_jpeg, temporary_workspace, webdataset_tar

BUCKET = "benchmark-shards"
FETCH_THREADS = 16
FETCHED = 2000  # images read in each fetch measurement
REPEATS = 3  # turns of the fetch measurements; the median is reported


def shard_files(shards: int, samples: int) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(shard and listing files by name, the same photos as single files by name)."""
    files, photos = {}, {}
    for number in range(shards):
        members = {}
        for index in range(number * samples, (number + 1) * samples):
            key = f"{number:05d}/{index:09d}"
            photo = synthetic_jpeg(index, 320, 240)
            record = json.dumps({"key": key, "width": 320, "height": 240}).encode()
            members[key] = {"jpg": photo, "txt": f"photo {index}".encode(), "json": record}
            photos[f"photos/{index:09d}.jpg"] = photo
        files[f"shards/{number:05d}.tar"] = webdataset_tar(members)
        listing = pd.DataFrame({"key": list(members), "caption": [f"a photo {key}" for key in members]})
        buffer = io.BytesIO()
        listing.to_parquet(buffer, index=False)
        files[f"shards/{number:05d}.parquet"] = buffer.getvalue()
    return files, photos


def timed(action) -> tuple[float, object]:
    began = time.perf_counter()
    result = action()
    return time.perf_counter() - began, result


def index_figures(pattern: str, endpoint: str | None) -> tuple[dict, pd.DataFrame]:
    """01's table from the shards, the first time and again with their cached indexes; and the table."""
    params = lib.MetadataParams("webdataset", "validation", pattern, "s3", s3_endpoint_url=endpoint)
    first, table = timed(lambda: lib.build_image_table(params))
    again, _ = timed(lambda: lib.build_image_table(params))
    figures = {"samples": len(table), "first_s": round(first, 2), "again_s": round(again, 2)}
    return {**figures, "samples_per_s": round(len(table) / first)}, table


def fetch_rate(fetcher: lib.Fetcher, locations: list[str]) -> float:
    """Images per second read by FETCH_THREADS threads of `fetcher`, after a warm-up read."""
    fetcher.fetch(locations[0])
    with concurrent.futures.ThreadPoolExecutor(FETCH_THREADS) as pool:
        seconds, _ = timed(lambda: list(pool.map(fetcher.fetch, locations)))
    return round(len(locations) / seconds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--samples", type=int, default=1000, help="samples per shard")
    args = parser.parse_args()
    files, photos = shard_files(args.shards, args.samples)
    pattern = f"{{00000..{args.shards - 1:05d}}}.tar"
    server, endpoint = loopback_s3(BUCKET, {**files, **photos})
    report: dict = {"shards": args.shards, "samples_per_shard": args.samples, "fetch_threads": FETCH_THREADS}
    try:
        with temporary_workspace() as workspace:
            for name, data in {**files, **photos}.items():
                (workspace.root / name).parent.mkdir(parents=True, exist_ok=True)
                (workspace.root / name).write_bytes(data)
            local_index, members = index_figures(str(workspace.root / "shards" / pattern), None)
            s3_index, _ = index_figures(f"s3://{BUCKET}/shards/{pattern}", endpoint)
            report["index"] = {"local": local_index, "s3": s3_index}
            ranges = members["location"].tolist()[:FETCHED]
            names = sorted(photos)[:FETCHED]
            local, remote = (
                lib.Fetcher(pool_size=FETCH_THREADS),
                lib.Fetcher(endpoint, pool_size=FETCH_THREADS),
            )
            reads = {
                "local_ranges": (local, ranges),
                "local_files": (local, [str(workspace.root / name) for name in names]),
                "s3_ranges": (
                    remote,
                    [location.replace(str(workspace.root), f"s3://{BUCKET}") for location in ranges],
                ),
                "s3_objects": (remote, [f"s3://{BUCKET}/{name}" for name in names]),
            }
            rates = {name: [] for name in reads}
            for _ in range(REPEATS):  # in turns, so that no kind of read has the machine to itself
                for name, (fetcher, locations) in reads.items():
                    rates[name].append(fetch_rate(fetcher, locations))
            report["fetch_img_s"] = {name: sorted(values)[len(values) // 2] for name, values in rates.items()}
    finally:
        server.stop()
    report["device"] = lib.environment.describe_device("cpu")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
