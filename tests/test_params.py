"""Notebook parameters: every bad name or value is an error that names it and says what is allowed."""

import lib
import pytest

EMBED_DEFAULTS = {
    "OUTPUT_DIR": "OUTPUT",
    "START": 0,
    "END": None,
    "CHUNK": 10000,
    "GPU_BATCH_SIZE": "auto",
    "NUM_WORKERS": "auto",
    "MODEL": "ViT-B/32",
    "MODEL_REVISION": None,
    "DEVICE": "auto",
    "PRECISION": "auto",
    "PREPROCESS": "exact",
    "EXIF_TRANSPOSE": False,
    "APPLY_ROTATION": False,
    "MAX_PIXELS": 100_000_000,
    "S3_ENDPOINT_URL": None,
    "RETRY_FAILED": False,
    "STOP_IF_UNREACHABLE": True,
    "S3_ANONYMOUS": False,
    "EXECUTOR": "local",
    "RAY_ADDRESS": None,
    "CPUS_PER_WORKER": "auto",
    "STORAGE_DTYPE": "float32",
}


METADATA_DEFAULTS = {
    "OUTPUT_DIR": "OUTPUT",
    "DATASET": "openimages-v7",
    "SPLIT": "validation",
    "SOURCE": None,
    "FETCH": "s3",
    "S3_ENDPOINT_URL": None,
    "S3_ANONYMOUS": False,
}


MERGE_DEFAULTS = {
    "OUTPUT_DIR": "OUTPUT",
    "OUTPUT_FILE": None,
    "CLEANUP": False,
    "S3_ENDPOINT_URL": None,
    "STORAGE_DTYPE": "float32",
}


def test_defaults_are_valid():
    params = lib.read_parameters(lib.EmbedParams, dict(EMBED_DEFAULTS))
    assert params.chunk == 10000 and params.end is None
    assert lib.read_parameters(lib.MetadataParams, dict(METADATA_DEFAULTS)).dataset == "openimages-v7"
    assert lib.read_parameters(lib.MergeParams, {**MERGE_DEFAULTS, "CLEANUP": True}).cleanup
    assert (
        lib.read_parameters(lib.SetupParams, {"OUTPUT_DIR": "OUTPUT", "DEVICE": "cuda:1"}).device == "cuda:1"
    )


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("START", -1, "integer >= 0"),
        ("START", 1.5, "integer >= 0"),
        ("START", True, "integer >= 0"),
        ("END", 0, "integer >= 1"),
        ("CHUNK", 0, "integer >= 1"),
        ("CHUNK", "100", "integer >= 1"),
        ("GPU_BATCH_SIZE", 0, "integer >= 1"),
        ("NUM_WORKERS", -4, "integer >= 1"),
        ("NUM_WORKERS", "many", "integer >= 1, or 'auto'"),
        ("GPU_BATCH_SIZE", 64.0, "integer >= 1, or 'auto'"),
        ("MODEL", "", "non-empty string"),
        ("MODEL", None, "non-empty string"),
        ("MODEL_REVISION", "", "non-empty string or None"),
        ("PREPROCESS", "quick", "'exact', 'fast', 'pad'"),
        ("EXIF_TRANSPOSE", "yes", "True or False"),
        ("APPLY_ROTATION", 1, "True or False"),
        ("MAX_PIXELS", 0, "integer >= 1"),
        ("RETRY_FAILED", "True", "True or False"),
        ("DEVICE", "gpu", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("DEVICE", "cuda:x", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("PRECISION", "fp8", "'auto', 'fp32', 'fp16', 'bf16'"),
        ("S3_ENDPOINT_URL", "localhost:9000", "http(s) URL"),
        ("S3_ENDPOINT_URL", 9000, "non-empty string or None"),
        ("S3_ANONYMOUS", "yes", "True or False"),
        ("EXECUTOR", "spark", "'local', 'ray'"),
        ("RAY_ADDRESS", "", "non-empty string or None"),
        ("CPUS_PER_WORKER", 0, "integer >= 1, or 'auto'"),
    ],
)
def test_bad_embed_values_name_parameter_value_and_what_is_allowed(name, value, allowed):
    namespace = {**EMBED_DEFAULTS, name: value}
    with pytest.raises(lib.ParameterError) as error:
        lib.read_parameters(lib.EmbedParams, namespace)
    assert f"{name}={value!r}" in str(error.value)
    assert allowed in str(error.value)


def test_ray_gives_each_worker_its_own_gpu_so_one_named_gpu_is_an_error():
    with pytest.raises(lib.ParameterError, match="DEVICE='cuda:1' names one GPU, and EXECUTOR='ray' gives"):
        lib.read_parameters(lib.EmbedParams, {**EMBED_DEFAULTS, "EXECUTOR": "ray", "DEVICE": "cuda:1"})


def test_the_seeds_explicit_sizes_still_work():
    params = lib.read_parameters(
        lib.EmbedParams, {**EMBED_DEFAULTS, "GPU_BATCH_SIZE": 512, "NUM_WORKERS": 32}
    )
    assert (params.gpu_batch_size, params.num_workers) == (512, 32)


def test_end_must_be_after_start():
    with pytest.raises(lib.ParameterError, match=r"END=5 is not allowed: use an integer >= 11"):
        lib.read_parameters(lib.EmbedParams, {**EMBED_DEFAULTS, "START": 10, "END": 5})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATASET", "coco"),
        ("SPLIT", "val"),
        ("FETCH", "ftp"),
        ("SOURCE", ""),
    ],
)
def test_bad_metadata_values(name, value):
    with pytest.raises(lib.ParameterError, match=rf"{name}={value!r} is not allowed"):
        lib.read_parameters(lib.MetadataParams, {**METADATA_DEFAULTS, name: value})


def test_folder_table_and_webdataset_need_a_source():
    for dataset in ("folder", "table", "webdataset"):
        with pytest.raises(lib.ParameterError, match="SOURCE=None is not allowed"):
            lib.read_parameters(lib.MetadataParams, {**METADATA_DEFAULTS, "DATASET": dataset})


def test_table_source_may_map_columns_to_json_lists():
    source = {"image_id": "image_ids.json", "url": "image_urls.json"}
    params = lib.read_parameters(
        lib.MetadataParams, {**METADATA_DEFAULTS, "DATASET": "table", "SOURCE": source}
    )
    assert params.source == source
    with pytest.raises(lib.ParameterError, match="must include 'image_id' and 'url'"):
        lib.read_parameters(
            lib.MetadataParams, {**METADATA_DEFAULTS, "DATASET": "table", "SOURCE": {"url": "u.json"}}
        )


def test_merge_values():
    with pytest.raises(lib.ParameterError, match="CLEANUP='yes' is not allowed: use True or False"):
        lib.read_parameters(lib.MergeParams, {**MERGE_DEFAULTS, "CLEANUP": "yes"})


@pytest.mark.parametrize(
    ("params_class", "defaults"), [(lib.EmbedParams, EMBED_DEFAULTS), (lib.MergeParams, MERGE_DEFAULTS)]
)
def test_storage_dtype_is_float32_or_float16(params_class, defaults):
    assert (
        lib.read_parameters(params_class, {**defaults, "STORAGE_DTYPE": "float16"}).storage_dtype == "float16"
    )
    for value in ("fp16", "bfloat16", None):
        with pytest.raises(
            lib.ParameterError,
            match=rf"STORAGE_DTYPE={value!r} is not allowed: use one of 'float32', 'float16'",
        ):
            lib.read_parameters(params_class, {**defaults, "STORAGE_DTYPE": value})


def test_unknown_parameter_names_suggest_the_closest():
    namespace = {**EMBED_DEFAULTS, "CHUNKS": 500}
    with pytest.raises(lib.ParameterError, match=r"Unknown parameter CHUNKS=500: did you mean CHUNK\?"):
        lib.read_parameters(lib.EmbedParams, namespace)


def test_parameters_of_other_stages_are_accepted():
    """One params/*.yaml feeds every stage, so 02 must accept DATASET and OUTPUT_FILE."""
    namespace = {**EMBED_DEFAULTS, **METADATA_DEFAULTS, **MERGE_DEFAULTS}
    assert lib.read_parameters(lib.EmbedParams, namespace).model == "ViT-B/32"


def test_lowercase_and_private_names_are_not_parameters():
    namespace = {**EMBED_DEFAULTS, "table": 1, "_": 2, "In": [], "np": object()}
    assert lib.read_parameters(lib.EmbedParams, namespace).start == 0


def test_a_deleted_parameter_is_reported():
    namespace = dict(EMBED_DEFAULTS)
    del namespace["CHUNK"]
    with pytest.raises(lib.ParameterError, match="Parameter CHUNK is not defined"):
        lib.read_parameters(lib.EmbedParams, namespace)


def test_parameter_errors_show_without_a_traceback_in_notebooks():
    error = lib.ParameterError("CHUNK=0 is not allowed")
    assert error._render_traceback_() == ["ParameterError: CHUNK=0 is not allowed"]


def test_a_notebooks_own_upper_case_variable_is_only_warned_about():
    """A researcher's MY_THRESHOLD, defined in a cell after the parameters, is not a typo of a parameter."""
    namespace = {**EMBED_DEFAULTS, "MY_THRESHOLD": 0.3, "In": ["", "MY_THRESHOLD = 0.3"]}
    with pytest.warns(UserWarning, match="MY_THRESHOLD is not a parameter of any stage"):
        assert lib.read_parameters(lib.EmbedParams, namespace).start == 0


def test_a_name_papermill_injected_that_no_stage_knows_is_refused():
    injected = "# Parameters\nMY_THRESHOLD = 0.3\n"
    namespace = {**EMBED_DEFAULTS, "MY_THRESHOLD": 0.3, "In": ["", "import lib", injected]}
    with pytest.raises(lib.ParameterError, match=r"Unknown parameter MY_THRESHOLD=0.3: the parameters are"):
        lib.read_parameters(lib.EmbedParams, namespace)


def test_an_own_variable_close_to_a_parameter_is_taken_for_a_typo():
    with pytest.raises(lib.ParameterError, match=r"Unknown parameter DEVICES='cpu': did you mean DEVICE\?"):
        lib.read_parameters(lib.EmbedParams, {**EMBED_DEFAULTS, "DEVICES": "cpu", "In": ["DEVICES = 'cpu'"]})
