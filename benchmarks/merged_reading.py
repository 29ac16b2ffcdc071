"""Peak memory of 03's reading cells on a merged file of many rows, against reading it whole.

    python benchmarks/merged_reading.py                         # 2,000,000 rows of 16 dimensions
    python benchmarks/merged_reading.py --rows 2000000 --dimension 512

03 shows the original notebook's reading snippet from the datasets' shapes and first rows. This
runs those cells, as committed in notebooks/03_merge.ipynb, on a synthetic merged file (written
once under .cache/benchmarks/), and for comparison the snippet that reads every url and vector.
Peaks are traced allocations (tracemalloc: numpy arrays and Python objects). Prints JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tracemalloc
import types
from pathlib import Path

import nbformat
from workload import CACHE, REPO, merged_layout

READ_EVERYTHING = """
import h5py
with h5py.File(report.path, "r") as f:
    urls = f["urls"][:]
    embeddings = f["embeddings"][:]
    image_ids = f["image_ids"][:]
"""


def reading_cells() -> list[str]:
    """The code cells of 03_merge.ipynb after the one that merges."""
    cells = nbformat.read(REPO / "notebooks" / "03_merge.ipynb", as_version=4).cells
    merge = next(n for n, cell in enumerate(cells) if "lib.merge_chunks(" in cell.source)
    return [cell.source for cell in cells[merge + 1 :] if cell.cell_type == "code"]


def traced_run(codes: list[str], namespace: dict) -> tuple[float, str]:
    """Run the codes in turn: the peak of traced allocations meanwhile (MiB), and what they print."""
    printed = io.StringIO()
    tracemalloc.start()
    with contextlib.redirect_stdout(printed):
        for code in codes:
            exec(code, namespace)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return round(peak / 2**20, 1), printed.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dimension", type=int, default=16)
    args = parser.parse_args()
    path = CACHE / f"merged-{args.rows}x{args.dimension}.h5"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        merged_layout(path, args.rows, args.dimension)
    report = types.SimpleNamespace(path=path, embedded=args.rows)
    figures = {
        "rows": args.rows,
        "dimension": args.dimension,
        "file_mb": round(Path(path).stat().st_size / 1e6, 1),
        "reading_cells_peak_mib": traced_run(reading_cells(), {"report": report})[0],
        "reading_everything_peak_mib": traced_run([READ_EVERYTHING], {"report": report})[0],
    }
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
