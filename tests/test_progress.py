"""Progress: tqdm bars where someone watches, lines at a bounded rate when headless."""

import re
import time
import types

import lib
import pytest


def test_headless_progress_prints_a_line_every_interval_even_while_nothing_arrives(capsys):
    with lib.progress.RunProgress(100, lines=True, interval=0.25) as progress:
        progress.add([None] * 10 + ["http 404"] * 3 + ["timeout"])
        time.sleep(1.1)  # a stalled source: no row arrives
        progress.chunk_written("chunk_000000000_000000014.h5")
    lines = capsys.readouterr().out.splitlines()
    timed = [line for line in lines if "written" not in line]
    assert 3 <= len(timed) <= 5, "one line per interval, and no more"
    rate, rest = (
        r"\[02\] 14 of 100 rows \(14\.0%\), [\d.]+ img/s",
        r", 4 failed \(most: http 404, 3\), about .+ left",
    )
    pattern = rate + rest
    assert all(re.fullmatch(pattern, line) for line in timed), timed
    assert lines[-1].startswith("[02] chunk_000000000_000000014.h5 written; 14 of 100 rows")


def test_chunks_written_closer_together_than_the_gap_share_a_line(capsys):
    """A small CHUNK on a fast GPU writes several chunks a second: not several lines a second."""
    with lib.progress.RunProgress(100, lines=True, interval=60, gap=0.5) as progress:
        for n in range(4):  # the first at once, the next three within the gap
            progress.add([None] * 10)
            progress.chunk_written(f"chunk_{n}.h5")
        time.sleep(0.6)
        progress.chunk_written("chunk_4.h5")  # past the gap: a line with the three that waited
        progress.chunk_written("chunk_5.h5")  # the last, in the line printed at the end
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("; ")[0] for line in lines] == [
        "[02] chunk_0.h5 written",
        "[02] 4 chunks written, the last chunk_4.h5",
        "[02] chunk_5.h5 written",
    ]


def test_progress_where_someone_watches_is_a_bar_not_lines(capsys):
    with lib.progress.RunProgress(100, lines=False, interval=0.05) as progress:
        progress.add([None] * 100)
        time.sleep(0.3)
        progress.chunk_written("chunk_000000000_000000100.h5")
    assert "[02]" not in capsys.readouterr().out


@pytest.mark.parametrize(("allow_stdin", "watched"), [(True, True), (False, False)])
def test_a_kernel_whose_front_end_can_answer_input_is_watched(monkeypatch, allow_stdin, watched):
    """JupyterLab, VS Code and Colab answer input() and render widgets; papermill and nbval do neither."""
    import IPython

    shell = types.SimpleNamespace(kernel=types.SimpleNamespace(_allow_stdin=allow_stdin))
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    assert lib.progress.watched() is watched


def test_rows_of_lost_work_are_taken_back_and_counted_again():
    progress = lib.progress.RunProgress(10, lines=True)
    progress.add([None, "http 404", None])
    progress.add_elsewhere(2)
    progress.take_back([None, "http 404"], elsewhere=2)
    assert (progress.done, progress.elsewhere, dict(progress.failed)) == (1, 0, {})
    progress.add([None, "http 404"])
    line = progress.line()
    assert line.startswith("3 of 10 rows (30.0%)") and "1 failed (most: http 404, 1)" in line
