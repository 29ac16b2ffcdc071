"""Peak memory of 02 against CHUNK: the same photos embedded with small and with large chunks.

    python benchmarks/memory.py                             # 10,000 photos, CHUNK=500 and 10000
    python benchmarks/memory.py --images 20000 --chunks 500 20000

Each run is its own process (embed_folder.py). What grows with CHUNK is the chunk's vectors and
records, not the images in flight, so the model is 'random-small' (ViT-B/32's input and embedding
sizes, a tiny transformer) and the photos are 320x240, which keeps a run short. Prints JSON.
"""

from __future__ import annotations

import argparse
import json

from throughput import whole_process
from workload import MODEL_HELP, photo_folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--chunks", type=int, nargs="+", default=[500, 10000])
    parser.add_argument("--model", default="random-small", help=MODEL_HELP)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    folder = photo_folder(args.images, 320, 240)
    options = [f"--model={args.model}", f"--workers={args.workers}", f"--batch-size={args.batch_size}"]
    runs = {
        chunk: whole_process("embed_folder.py", folder, [*options, f"--chunk={chunk}"])
        for chunk in args.chunks
    }
    peaks = [run["peak_rss_mb"] for run in runs.values()]
    report = {"images": args.images, "model": args.model, "runs_by_chunk": runs}
    print(json.dumps({**report, "peak_rss_spread_mb": round(max(peaks) - min(peaks), 1)}, indent=1))


if __name__ == "__main__":
    main()
