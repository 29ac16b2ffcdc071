"""02 as users run it: papermill 02 as a whole process, beside the script path and the original loop.

    python benchmarks/notebook_path.py                           # 1,536 photos; fp32 and int8; 3 turns
    python benchmarks/notebook_path.py --images 512 --precisions fp32 --repeats 1

In each turn the processes run one after another, never at once: the original notebooks' loop
(naive_loop.py), then for each precision papermill 02 and the script path (embed_folder.py: 01 and 02
through lib in one process). 01's image table is made once, beforehand, as 01 would make it.

Prints one JSON object: each run's wall seconds and, for papermill, where they went (process and
kernel start, each cell of 02, the first batch and the chunk writing inside the run, and what follows
the last cell: kernel shutdown and the executed notebook written); the median wall times; and for
each precision the speed-up of papermill 02 over the original loop's process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from throughput import whole_process
from workload import CACHE, REPO, lib, model_path, photo_folder

NOTEBOOK = REPO / "notebooks" / "02_embed.ipynb"
CELL_STEPS = {  # a code cell of 02 -> the step it is, by what it calls
    "import lib": "import lib",
    "load_image_table": "parameters and image table",
    "run_encoder": "model load",
    "plan_run": "plan",
    "embed_chunks": "embedding",
}
SUMMARY_RATE = re.compile(r"\(([\d,.]+) img/s\)")
SUMMARY_TIME = re.compile(
    r"waited ([\d,.]+) s for images \(([\d.]+) s for the first batch\); writing chunk files took ([\d.]+) s"
)


def prepared_collection(folder: Path) -> Path:
    """A collection holding 01's image table of `folder`, made once under .cache/benchmarks/."""
    output_dir = CACHE / f"notebook-path-{folder.name}"
    collection = lib.collection(str(output_dir))
    if not collection.table.is_file():
        metadata = lib.MetadataParams("folder", "validation", str(folder), "s3", output_dir=str(output_dir))
        lib.save_image_table(lib.build_image_table(metadata), metadata, collection)
    return output_dir


def timed_process(command: list[str]) -> tuple[float, float]:
    """Run `command` from the repository root: its start, as a Unix time, and its wall seconds."""
    started, began = time.time(), time.perf_counter()
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if finished.returncode:
        raise RuntimeError(f"{command[:4]} failed ({finished.returncode}):\n{finished.stderr[-3000:]}")
    return started, time.perf_counter() - began


def papermill_02(output_dir: Path, model: str, precision: str) -> dict:
    """papermill 02 over the collection as a fresh run (its chunks removed first): wall seconds and steps."""
    shutil.rmtree(output_dir / "chunks", ignore_errors=True)
    executed = output_dir / "runs" / f"02_embed-{precision}.ipynb"
    executed.parent.mkdir(exist_ok=True)
    parameters = {"OUTPUT_DIR": str(output_dir), "MODEL": model, "DEVICE": "cpu", "PRECISION": precision}
    options = [item for name, value in parameters.items() for item in ("-p", name, value)]
    command = [sys.executable, "-m", "papermill", str(NOTEBOOK), str(executed), *options]
    started, wall = timed_process([*command, "--log-level", "WARNING"])
    return {"wall_seconds": round(wall, 2), **notebook_steps(json.loads(executed.read_text()), started, wall)}


def notebook_steps(notebook: dict, started: float, wall: float) -> dict:
    """Where an executed notebook's process spent its time, from papermill's cell timestamps."""
    cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    first = _timestamp(cells[0]["metadata"]["papermill"]["start_time"])
    last = _timestamp(cells[-1]["metadata"]["papermill"]["end_time"])
    steps = {"process and kernel start": first - started}
    for cell in cells:
        step = next(
            (name for call, name in CELL_STEPS.items() if call in _text(cell["source"])), "other cells"
        )
        steps[step] = steps.get(step, 0.0) + cell["metadata"]["papermill"]["duration"]
        if step == "embedding":
            printed = "".join(_text(output.get("text", "")) for output in cell["outputs"])
            rate, timing = SUMMARY_RATE.search(printed), SUMMARY_TIME.search(printed)
            steps["embedding: the model waiting for images"] = float(timing[1].replace(",", ""))
            steps["embedding: of which for the first batch"] = float(timing[2])
            steps["embedding: writing chunk files"] = float(timing[3])
            embedding_rate = float(rate[1].replace(",", ""))
    steps["after the last cell"] = started + wall - last
    return {"steps": {name: round(seconds, 2) for name, seconds in steps.items()}, "img_s": embedding_rate}


def _timestamp(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


def _text(source: str | list[str]) -> str:
    return source if isinstance(source, str) else "".join(source)


def script_path(folder: Path, model: str, precision: str) -> dict:
    """01 and 02 through lib in one process (embed_folder.py), with 02's defaults for the sizes."""
    options = [f"--model={model}", "--device=cpu", f"--precision={precision}"]
    return whole_process("embed_folder.py", folder, [*options, "--batch-size=auto", "--workers=auto"])


def naive_loop(folder: Path, model: str) -> dict:
    """The original notebooks' loop as its own process, in fp32 with torch, as they ran it."""
    return whole_process("naive_loop.py", folder, [f"--model={model}"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1536)
    parser.add_argument(
        "--model", default="random", help="'random' (ViT-B/32's shape), or a checkpoint folder"
    )
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    parser.add_argument("--repeats", type=int, default=3, help="turns of every process")
    args = parser.parse_args()
    folder = photo_folder(args.images)
    model = model_path(args.model)
    output_dir = prepared_collection(folder)
    runs: dict[str, list[dict]] = {"naive loop": []}
    for _ in range(args.repeats):
        runs["naive loop"].append(naive_loop(folder, model))
        for precision in args.precisions:
            runs.setdefault(f"papermill 02, {precision}", []).append(
                papermill_02(output_dir, model, precision)
            )
            runs.setdefault(f"script, {precision}", []).append(script_path(folder, model, precision))
    medians = {name: statistics.median(run["wall_seconds"] for run in each) for name, each in runs.items()}
    speedups = {
        precision: round(medians["naive loop"] / medians[f"papermill 02, {precision}"], 2)
        for precision in args.precisions
    }
    report = {
        "device": lib.environment.describe_device("cpu"),
        "images": args.images,
        "model": args.model,
        "median_wall_seconds": medians,
        "speedup_of_papermill_02_over_the_naive_loop": speedups,
        "runs": runs,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
