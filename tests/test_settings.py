"""Settings are set through lib.configure, and only prepare_process changes libraries process-wide."""

import subprocess
import sys

import lib
import pytest
from conftest import REPO

IMPORT_CHANGES_NOTHING = """
import logging, sys, warnings
import PIL.Image
sys.path.insert(0, sys.argv[1])
pillow_limit = PIL.Image.MAX_IMAGE_PIXELS
import lib

def pillow_filters():
    return [f for f in warnings.filters if str(getattr(f[3], "pattern", f[3])).startswith("PIL")]

assert PIL.Image.MAX_IMAGE_PIXELS == pillow_limit, "import lib changed Pillow's pixel limit"
assert not pillow_filters(), "import lib filtered Pillow's warnings"
assert logging.getLogger("urllib3.connectionpool").level == logging.NOTSET
assert lib.settings.keep_freed_memory.cache_info().currsize == 0, "import lib changed glibc's allocator"
with warnings.catch_warnings():
    lib.prepare_process()
    assert pillow_filters()
assert not pillow_filters()
lib.prepare_process()
lib.prepare_process()
assert PIL.Image.MAX_IMAGE_PIXELS is None and len(pillow_filters()) == 1, "once, however often it is called"
assert logging.getLogger("urllib3.connectionpool").level == logging.ERROR
assert lib.settings.keep_freed_memory.cache_info().currsize == 0, "glibc's allocator only for CPU inference"
lib.prepare_process(cpu_inference=True)
assert lib.settings.keep_freed_memory.cache_info().currsize == 1
print("ok")
"""


def test_import_lib_changes_no_library_until_prepare_process_is_called():
    command = [sys.executable, "-c", IMPORT_CHANGES_NOTHING, str(REPO / "notebooks")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


def test_decoding_an_image_lifts_pillows_limit_for_the_runs_own():
    """decode_image checks MAX_PIXELS itself: Pillow's own limit (89M pixels) must not refuse first."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import io, PIL.Image, lib; "
        "buffer = io.BytesIO(); PIL.Image.new('L', (8, 8)).save(buffer, 'PNG'); "
        "lib.preprocess.decode_image(buffer.getvalue()); print(PIL.Image.MAX_IMAGE_PIXELS)"
    )
    command = [sys.executable, "-c", code, str(REPO / "notebooks")]
    assert subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip() == "None"


def test_the_default_root_is_the_repository_and_relative_paths_start_there():
    assert lib.settings.Settings().root == REPO
    assert lib.workspace.resolve_path("OUTPUT/x.h5") == lib.settings.current_settings().root / "OUTPUT/x.h5"


def test_configure_changes_what_the_stages_read_and_returns_what_it_replaced(configure):
    before = configure(fetch_deadline=7, http_timeout=(2, 3))
    assert before.fetch_deadline == 300 and before.http_timeout == (10, 60)
    fetcher = lib.Fetcher()
    assert (fetcher._deadline, fetcher._timeout) == (7, (2, 3))
    assert lib.downloads.http_retry().backoff_factor == 0.5
    configure(**vars(before))
    assert lib.settings.current_settings() == before


def test_an_unknown_setting_is_named_with_the_settings_there_are(configure):
    with pytest.raises(TypeError, match=r"no setting fetch_dedline: the settings are root, "):
        configure(fetch_dedline=60)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"http_timeout": 10}, r"http_timeout=10 is not allowed: use \(seconds to connect, seconds between"),
        ({"fetch_deadline": 0}, r"fetch_deadline=0 is not allowed: use a number > 0"),
        ({"retry_backoff": -1}, r"retry_backoff=-1 is not allowed: use seconds >= 0"),
        ({"search_block_bytes": "big"}, r"search_block_bytes='big' is not allowed"),
    ],
)
def test_a_bad_setting_is_refused_with_what_is_allowed(configure, change, message):
    with pytest.raises(ValueError, match=message):
        configure(**change)


def test_a_root_given_as_text_becomes_a_resolved_path(configure, tmp_path):
    configure(root=str(tmp_path / "repo" / ".." / "repo"))
    assert lib.workspace.current_workspace().downloads == tmp_path / "repo" / ".cache" / "downloads"


def test_configured_restores_the_settings_after_its_block():
    before = lib.settings.current_settings()
    with lib.settings.configured(search_block_bytes=64) as inside:
        assert inside.search_block_bytes == 64 == lib.settings.current_settings().search_block_bytes
        lib.configure(fetch_deadline=5)
    assert lib.settings.current_settings() == before


def test_configured_cores_size_the_process_as_a_ray_worker_is_sized(configure):
    configure(cores=3)
    assert lib.settings.cpu_cores() == 3
    with pytest.raises(ValueError, match="cores=0 is not allowed"):
        configure(cores=0)
