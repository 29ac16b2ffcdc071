"""Kill safety: SIGKILL papermill and its kernel at several points of 02 and 03, then run again.

Whatever the point, the re-run must end with the file an uninterrupted run makes: the same rows,
the same embeddings bit for bit (on the CPU), the same failures, and no stray files.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import lib
import numpy as np
import pytest
import yaml
from conftest import BROKEN, read_output
from test_notebooks import EMBED, papermill

pytestmark = pytest.mark.notebooks
PARAMETERS = {**EMBED, "CHUNK": 4, "GPU_BATCH_SIZE": 3, "NUM_WORKERS": 2}
MERGE = {"OUTPUT_FILE": "OUTPUT/Images_Embedded.h5", "CLEANUP": False}


def descendants(pid: int) -> list[int]:
    """The process's children, their children, and so on (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


def kill_when(repo: Path, stage: str, parameters: dict, env: dict, condition: Callable[[], bool]) -> None:
    """Run a stage with papermill and SIGKILL papermill and its kernel as soon as `condition()` holds.

    papermill writes the executed notebook to `executed(repo)` after each cell.
    """
    params_file = repo.parent / f"{stage}-killed.yaml"
    params_file.write_text(yaml.safe_dump(parameters))
    executed(repo).unlink(missing_ok=True)
    command = [sys.executable, "-m", "papermill", f"notebooks/{stage}.ipynb", str(executed(repo))]
    process = subprocess.Popen(
        [*command, "-f", str(params_file)],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while process.poll() is None:
        if condition():
            for pid in [process.pid, *descendants(process.pid)]:
                os.kill(pid, signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.0005)
    pytest.fail(f"{stage} finished before the moment it was to be killed")


def executed(repo: Path) -> Path:
    return repo.parent / "killed.ipynb"


def has_printed(repo: Path, text: str) -> bool:
    """Whether the stage under way has printed `text` in a cell that finished."""
    try:
        return text in executed(repo).read_text()
    except FileNotFoundError:
        return False


def chunk_names(repo: Path, suffix: str = ".h5") -> list[str]:
    return sorted(p.name for p in (repo / "OUTPUT" / "chunks").glob(f"chunk_*{suffix}"))


def leftovers(repo: Path) -> list[str]:
    """Lock and temporary files anywhere under OUTPUT/."""
    return sorted(str(p) for p in (repo / "OUTPUT").rglob("*") if p.name.endswith((".tmp", ".lock")))


def assert_every_chunk_is_whole(repo: Path) -> None:
    for name in chunk_names(repo):
        with h5py.File(repo / "OUTPUT" / "chunks" / name, "r") as file:
            assert len(file["rows"]) == len(file["embeddings"]) and "digest" in file.attrs


def prepared_repo(repo: Path, env: dict, images: dict, folder: Path) -> Path:
    """`repo` with an image table of 40 photos and 2 broken files, made by 01."""
    folder.mkdir()
    for key, data in images.items():
        (folder / f"{key}.jpg").write_bytes(data)
    for name, data in BROKEN.items():
        (folder / name).write_bytes(data)
    papermill(repo, "01_metadata", {"DATASET": "folder", "SOURCE": str(folder)}, env)
    return repo


def same_output(path: Path, reference: Path) -> None:
    found, expected = read_output(path), read_output(reference)
    for key in ("rows", "image_ids", "urls", "failed_rows", "failed_ids", "reasons"):
        assert found[key] == expected[key], key
    np.testing.assert_array_equal(found["embeddings"], expected["embeddings"])  # bit for bit


def test_sigkill_at_any_point_of_02_and_03_then_a_rerun_gives_the_uninterrupted_result(
    repo, kernel_env, images, tmp_path
):
    clean = prepared_repo(repo, kernel_env, images, tmp_path / "photos")
    papermill(clean, "02_embed", PARAMETERS, kernel_env)
    papermill(clean, "03_merge", MERGE, kernel_env)
    killed = tmp_path / "killed"
    shutil.copytree(clean / "notebooks", killed / "notebooks")
    (killed / "OUTPUT").mkdir()
    shutil.copy(clean / "OUTPUT" / "image_table.parquet", killed / "OUTPUT")

    moments_of_02 = [
        # starting: the table is read, the model loads, no chunk is claimed yet
        lambda: has_printed(killed, "image table: ") and not chunk_names(killed, ".h5.lock"),
        lambda: len(chunk_names(killed)) >= 2 and bool(chunk_names(killed, ".h5.lock")),  # mid-chunk
        lambda: bool(chunk_names(killed, ".h5.tmp")),  # a chunk file half written
    ]
    for moment in moments_of_02:
        kill_when(killed, "02_embed", PARAMETERS, kernel_env, moment)
        assert_every_chunk_is_whole(killed)
    papermill(killed, "03_merge", MERGE, kernel_env)  # a merged file of what is done so far
    partial = (killed / MERGE["OUTPUT_FILE"]).read_bytes()
    left = [path for path in leftovers(killed) if "/chunks/" in path]  # a kill can land just after a rename
    printed = papermill(killed, "02_embed", PARAMETERS, kernel_env)
    assert "chunk(s) already done" in printed
    assert ("interrupted run" in printed) == bool(left), left  # what a kill left is removed, and said
    assert not [path for path in leftovers(killed) if "/chunks/" in path]

    merged = killed / MERGE["OUTPUT_FILE"]
    partial_file = merged.stat().st_ino
    kill_when(killed, "03_merge", MERGE, kernel_env, lambda: lib.workspace.temporary_path(merged).exists())
    assert merged.read_bytes() == partial, "a killed merge leaves the previous merged file as it was"
    cleanup = {**MERGE, "CLEANUP": True}
    kill_when(killed, "03_merge", cleanup, kernel_env, lambda: merged.stat().st_ino != partial_file)
    papermill(killed, "03_merge", cleanup, kernel_env)  # killed once the new file was in place

    same_output(merged, clean / MERGE["OUTPUT_FILE"])
    assert chunk_names(killed) == [] and leftovers(killed) == []
