"""OpenAI .pt checkpoints as MODEL: the vectors equal OpenAI's own `clip` code, and a wrong file is refused.

The checkpoints come from OpenAI's model code (tests/reference.py), in each form clip.load reads; the
expected vectors come from clip.load itself.
"""

import collections
import copyreg
import io
import json
import os
import pickle
import shutil
import sys
import types
import zipfile
from pathlib import Path

import lib
import numpy as np
import pytest
import torch
import torch.jit._pickle
from conftest import FAKE_COMMIT, metadata, read_output, run_embed, save_table
from PIL import Image
from reference import (
    OPENAI_FORMS,
    clip,
    openai_clip_model,
    openai_image_embeddings,
    openai_text_embeddings,
    save_openai_checkpoint,
)
from test_corpus import written_corpus

TEXTS = [
    "a dog",
    "Two CATS   on a red sofa!",
    "café &amp; crème brûlée",
    "it’s 2024, isn't it?",
    "日本語のテキスト 🐶",
    "ΟΔΟΣ ΚΑΙ ΦΩΣ",
    "mojibake: cafÃ©",
    "word " * 100,
]


def corpus_folder(folder: Path) -> dict[str, Path]:
    """The corpus test's whole images in every 8-bit mode and format, each with its format's extension."""
    extensions = {}
    for extension, format in Image.registered_extensions().items():
        extensions.setdefault(format, extension)
    folder.mkdir()
    files = {}
    for index, (name, data) in enumerate(written_corpus().items()):
        format, mode = name.split()[:2]
        if mode not in lib.preprocess.HIGH_DEPTH_MODES and format in extensions:
            files[name] = folder / f"{index:03d}{extensions[format]}"
            files[name].write_bytes(data)
    return files


def pdf_and_palm(files: dict[str, Path]) -> list[str]:
    """The corpus files in formats Pillow writes but cannot read, which 01 does not list."""
    return [name for name in files if name.split()[0] in ("PDF", "PALM")]


@pytest.mark.parametrize("form", OPENAI_FORMS)
def test_02_embeds_every_8bit_mode_and_format_as_openai_clip_does(
    form, openai_checkpoints, collection, tmp_path
):
    checkpoint = openai_checkpoints[form]
    files = corpus_folder(tmp_path / "corpus")
    table = save_table(metadata("folder", str(tmp_path / "corpus")), collection)
    encoder = lib.load_encoder(str(checkpoint), "cpu", "fp32")
    summary = run_embed(table, encoder, chunk=64)
    ours = read_output(lib.merge_chunks(collection).path)
    by_file = dict(zip(ours["image_ids"], ours["embeddings"], strict=True))

    expected = openai_image_embeddings(checkpoint, files)
    embedded = {name: vector for name, vector in expected.items() if vector is not None}
    assert len(embedded) > 120 and len(table) == len(files) - len(pdf_and_palm(files))
    for name, vector in embedded.items():
        np.testing.assert_allclose(by_file[files[name].name], vector, atol=1e-5, err_msg=name)
    # Pillow's ICNS plugin reports RGBA before it loads a grey icon, so OpenAI's Resize of the lazily
    # opened file fails; 02 decodes first, then resizes
    only_ours = {name for name, path in files.items() if path.name in by_file and name not in embedded}
    assert only_ours == {"ICNS 1", "ICNS L", "ICNS LA", "ICNS P"}
    assert summary.embedded == len(embedded) + len(only_ours)
    assert ours["attrs"]["model_id"] == str(checkpoint)
    assert ours["attrs"]["model_revision"] == "sha256:" + lib.workspace.sha256_of_file(checkpoint)


@pytest.mark.parametrize("form", OPENAI_FORMS)
def test_text_vectors_equal_openai_encode_text_of_clip_tokenize(form, openai_checkpoints, workspace):
    encoder = lib.load_encoder(str(openai_checkpoints[form]), "cpu", "fp32")
    expected = openai_text_embeddings(openai_checkpoints[form], TEXTS)
    np.testing.assert_allclose(encoder.encode_text(TEXTS), expected, atol=1e-5)


def test_the_tokenizer_gives_clip_tokenize_s_ids(openai_checkpoints, workspace):
    encoder = lib.load_encoder(str(openai_checkpoints["state dict"]), "cpu", "fp32")
    for text, theirs in zip(TEXTS, clip.tokenize(TEXTS, truncate=True), strict=True):
        cleaned = lib.model.openai_text_cleaning(text)
        ours = encoder.tokenizer(cleaned, truncation=True, max_length=77)["input_ids"]
        assert ours == theirs[theirs != 0].tolist(), text


def test_both_forms_hold_the_same_weights(openai_checkpoints):
    read = {
        form: lib.openai_checkpoint.read_openai_weights(path) for form, path in openai_checkpoints.items()
    }
    assert [form for _, form in read.values()] == ["state dict", "TorchScript archive", "state dict"]
    state_dict, archive = read["state dict"][0], read["TorchScript archive"][0]
    assert set(state_dict) == set(archive)
    for name, tensor in state_dict.items():
        assert torch.equal(archive[name], tensor), name


def test_a_converted_checkpoint_is_read_from_the_cache_afterwards(openai_checkpoints, workspace, monkeypatch):
    path = openai_checkpoints["state dict"]
    first = lib.model.resolve_checkpoint(str(path))
    assert first.path.parent == workspace.models and (first.path / "source.json").is_file()
    assert json.loads((first.path / "source.json").read_text())["form"] == "state dict"
    monkeypatch.setattr(lib.openai_checkpoint, "read_openai_weights", pytest.fail)
    again = lib.load_encoder(str(path), "cpu", "fp32")
    assert again.checkpoint == first and again.embedding_size == 32
    assert again.preprocessing == lib.preprocess.Preprocessing(32)


@pytest.mark.parametrize("damage", ["no source record", "a truncated weights file"])
def test_a_converted_folder_that_is_not_whole_is_converted_again(damage, openai_checkpoints, workspace):
    path = openai_checkpoints["state dict"]
    folder = lib.model.resolve_checkpoint(str(path)).path
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    if damage == "no source record":
        (folder / "source.json").unlink()
    lib.model.resolve_checkpoint(str(path))
    assert (folder / "model.safetensors").read_bytes() == weights
    assert not list(workspace.models.glob(".*")), "no staging or damaged folder is left behind"
    lib.load_encoder(str(path), "cpu", "fp32")


# The original notebook's cache: ~/.cache/clip/ViT-B-32.pt


@pytest.fixture
def seed_cache(openai_checkpoints, workspace, configure, tmp_path, monkeypatch) -> Path:
    """A clip.load cache holding ViT-B-32.pt, with the tests' file standing in for OpenAI's digest."""
    cache = tmp_path / "clip-cache"
    cache.mkdir()
    path = cache / "ViT-B-32.pt"
    shutil.copy(openai_checkpoints["TorchScript archive"], path)
    published = ("ViT-B-32.pt", lib.workspace.sha256_of_file(path))
    monkeypatch.setitem(lib.openai_checkpoint.OPENAI_FILES, "ViT-B/32", published)
    configure(clip_cache=cache)
    return path


def test_an_openai_name_reads_the_original_notebooks_cached_file(seed_cache, offline_hub):
    checkpoint = lib.model.resolve_checkpoint("ViT-B/32")
    assert checkpoint.model_id == str(seed_cache) and checkpoint.openai_file == seed_cache
    assert checkpoint.revision == "sha256:" + lib.openai_checkpoint.OPENAI_FILES["ViT-B/32"][1]
    assert lib.load_encoder("ViT-B/32", "cpu").embedding_size == 32


def test_a_cached_file_that_is_not_openais_is_passed_over_for_the_hub(seed_cache, offline_hub):
    seed_cache.write_bytes(seed_cache.read_bytes() + b"another file")
    with pytest.warns(UserWarning, match="is not OpenAI's ViT-B/32 file: its SHA-256 is"):
        checkpoint = lib.model.resolve_checkpoint("ViT-B/32")
    assert checkpoint.revision == FAKE_COMMIT and checkpoint.openai_file is None


def test_a_pinned_revision_reads_the_hub_even_with_a_cached_file(seed_cache, offline_hub):
    assert lib.model.resolve_checkpoint("ViT-B/32", FAKE_COMMIT).revision == FAKE_COMMIT


def test_the_default_cache_is_clip_loads(configure, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    configure(clip_cache="~/.cache/clip")
    assert lib.settings.current_settings().clip_cache == tmp_path / ".cache" / "clip"


# Wrong files: refused with a message that names them, and nothing in them runs


class RunsCode:
    """An object whose unpickling creates a file: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def torchscript_with_data(archive: Path, data: bytes, path: Path) -> Path:
    """`archive` with its data.pkl replaced by `data`."""
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            payload = data if item.filename.endswith("/data.pkl") else source.read(item)
            target.writestr(item, payload)
    return path


def malicious_files(openai_checkpoints, folder: Path, marker: Path) -> dict[str, Path]:
    files = {"a pickle": folder / "pickle.pt", "a torch.save zip": folder / "zip.pt"}
    files["a pickle"].write_bytes(pickle.dumps(RunsCode(marker), protocol=2))
    torch.save({"visual.proj": torch.zeros(2), "payload": RunsCode(marker)}, files["a torch.save zip"])
    files["a TorchScript archive"] = torchscript_with_data(
        openai_checkpoints["TorchScript archive"],
        pickle.dumps(RunsCode(marker), protocol=2),
        folder / "ts.pt",
    )
    return files


def test_a_file_holding_code_is_refused_without_running_it(openai_checkpoints, workspace, tmp_path):
    marker = tmp_path / "it ran"
    for kind, path in malicious_files(openai_checkpoints, tmp_path, marker).items():
        with pytest.raises(
            lib.PipelineError, match=r"is refused: it holds more than plain weights \(posix.system\)"
        ):
            lib.load_encoder(str(path), "cpu")
        assert not marker.exists(), f"{kind} ran its code"
    assert not list(workspace.models.glob("*")), "nothing was converted"


@pytest.mark.parametrize("form", ["state dict", "TorchScript archive"])
def test_a_truncated_checkpoint_is_named(form, openai_checkpoints, workspace, tmp_path):
    data = openai_checkpoints[form].read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(lib.PipelineError, match=r"'.*cut.pt' cannot be read .*It may be truncated"):
        lib.load_encoder(str(path), "cpu")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")  # torch's note on the last one
@pytest.mark.parametrize(
    "content",
    [b"not weights at all", pickle.dumps(RunsCode(Path("/nonexistent/it ran")), protocol=4)],
    ids=["text", "a pickle torch does not read"],
)
def test_a_file_that_is_no_checkpoint_is_named(content, workspace, tmp_path):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(lib.PipelineError, match=r"'.*notes.pt' cannot be read as a PyTorch checkpoint \(."):
        lib.load_encoder(str(path), "cpu")


@pytest.mark.parametrize(
    "saved, message",
    [
        (
            {"fc.weight": torch.zeros(2, 2)},
            r"is not an OpenAI CLIP checkpoint: it has no visual.conv1.weight",
        ),
        ({"epoch": 3, "state_dict": {}}, r"holds a dictionary of more than tensors \(keys epoch, state_dict"),
        ([torch.zeros(1)], r"holds a list, not a CLIP state dict"),
        (
            {"vision_model.embeddings.class_embedding": torch.zeros(2)},
            r"holds transformers CLIPModel weights",
        ),
    ],
)
def test_a_checkpoint_of_something_else_is_named(saved, message, workspace, tmp_path):
    path = tmp_path / "other.pt"
    torch.save(saved, path)
    with pytest.raises(lib.PipelineError, match=message):
        lib.load_encoder(str(path), "cpu")


def test_an_empty_file_is_named(workspace, tmp_path):
    (tmp_path / "empty.pt").touch()
    with pytest.raises(lib.PipelineError, match=r"'.*empty.pt' is an empty file"):
        lib.load_encoder(str(tmp_path / "empty.pt"), "cpu")


def test_extra_or_misshapen_tensors_are_named(openai_checkpoints, workspace, tmp_path):
    weights = torch.load(openai_checkpoints["state dict"], weights_only=True)
    torch.save({**weights, "visual.head.weight": torch.zeros(2)}, tmp_path / "extra.pt")
    with pytest.raises(lib.PipelineError, match=r"it has unknown tensors visual.head.weight"):
        lib.load_encoder(str(tmp_path / "extra.pt"), "cpu")
    torch.save({**weights, "ln_final.bias": torch.zeros(3)}, tmp_path / "misshapen.pt")
    with pytest.raises(lib.PipelineError, match=r"it has misshapen ln_final.bias"):
        lib.load_encoder(str(tmp_path / "misshapen.pt"), "cpu")


def test_a_resnet_checkpoint_names_its_architecture(workspace, tmp_path):
    path = tmp_path / "resnet.pt"
    save_openai_checkpoint(openai_clip_model(vision_layers=(1, 1, 1, 1)), path, "state dict")
    with pytest.raises(lib.PipelineError, match=r"is OpenAI's ResNet CLIP a ResNet of 1-1-1-1 blocks"):
        lib.load_encoder(str(path), "cpu")
    blocks = {
        f"visual.layer{stage}.{block}.conv1.weight": torch.zeros(1)
        for stage, count in enumerate((3, 4, 6, 3), 1)
        for block in range(count)
    }
    with pytest.raises(lib.PipelineError, match=r"ResNet CLIP RN50: .*Use a ViT checkpoint \(ViT-B/32"):
        lib.openai_checkpoint.clip_config(blocks, path)


def test_a_resnet_name_is_a_parameter_error():
    with pytest.raises(lib.ParameterError, match=r"MODEL='RN50x4' is OpenAI's ResNet CLIP"):
        lib.model.resolve_checkpoint("RN50x4")


def test_a_revision_pin_on_a_pt_file_is_a_parameter_error(openai_checkpoints):
    with pytest.raises(lib.ParameterError, match=r"applies to hub models, but MODEL=.* is a local file"):
        lib.model.resolve_checkpoint(str(openai_checkpoints["state dict"]), "v1")


def test_a_missing_pt_file_is_named(workspace):
    with pytest.raises(lib.PipelineError, match=r"MODEL='models/ViT-B-32.pt': .*ViT-B-32.pt does not exist"):
        lib.model.resolve_checkpoint("models/ViT-B-32.pt")


def test_without_openais_vocabulary_the_error_says_what_to_install(
    openai_checkpoints, workspace, monkeypatch
):
    monkeypatch.setattr(lib.openai_checkpoint.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(lib.PipelineError, match=r"OpenAI's clip package is not installed: pip install -r"):
        lib.load_encoder(str(openai_checkpoints["state dict"]), "cpu")
    assert not list(workspace.models.glob("*"))


def test_the_vocabulary_file_is_openais(tmp_path, monkeypatch):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / lib.openai_checkpoint.BPE_FILE).write_bytes(b"other")
    spec = type("Spec", (), {"submodule_search_locations": [str(tmp_path / "clip")]})
    monkeypatch.setattr(lib.openai_checkpoint.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(lib.PipelineError, match=r"bpe_simple_vocab_16e6.txt.gz is not OpenAI's"):
        lib.openai_checkpoint.openai_bpe_file()


def test_reading_the_archive_needs_no_torchscript(openai_checkpoints, monkeypatch):
    monkeypatch.setattr(torch.jit, "load", pytest.fail)
    monkeypatch.setattr(torch, "load", pytest.fail)
    weights, form = lib.openai_checkpoint.read_openai_weights(openai_checkpoints["TorchScript archive"])
    assert form == "TorchScript archive" and weights["visual.proj"].shape == (64, 32)


# Archives as other versions of torch write them, and crafted ones, built with Python's pickler


class Call:
    """Pickles as a call of `function` on `args` (then `state` set on the result): pickle's REDUCE."""

    def __init__(self, function, *args, state=None):
        self.function, self.args, self.state = function, args, state

    def __reduce_ex__(self, protocol):
        return (self.function, self.args) if self.state is None else (self.function, self.args, self.state)


class StorageRecord:
    """A record of the archive's data/ folder, pickled as a persistent id."""

    def __init__(self, key: str, tensor: torch.Tensor, location: str = "cuda:0"):
        self.key, self.tensor, self.location = key, tensor, location


class ArchivePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageRecord):
            storage_class = {torch.float16: torch.HalfStorage, torch.float32: torch.FloatStorage}
            return "storage", storage_class[obj.tensor.dtype], obj.key, obj.location, obj.tensor.numel()
        return None


@pytest.fixture
def script_class(monkeypatch):
    """A class that pickles as __torch__.clip.model.CLIP, the name of a TorchScript module's class."""

    def reduce(self, protocol):
        return copyreg.__newobj__, (type(self),), self.attributes

    cls = type("CLIP", (), {"__module__": "__torch__.clip.model", "__reduce_ex__": reduce})
    for name in ("__torch__", "__torch__.clip", "__torch__.clip.model"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["__torch__.clip.model"].CLIP = cls
    return cls


def old_tensor(record: StorageRecord, size=None, stride=None, state=None) -> Call:
    """A tensor as older torch pickles it: sizes through build_intlist, wrapped by _rebuild_parameter."""
    size = list(record.tensor.shape if size is None else size)
    stride = list(record.tensor.stride() if stride is None else stride)
    build_intlist = torch.jit._pickle.build_intlist
    view = Call(
        torch._utils._rebuild_tensor_v2,
        record,
        0,
        Call(build_intlist, size),
        tuple(stride),
        False,
        collections.OrderedDict(),
        state=state,
    )
    return Call(torch._utils._rebuild_parameter, view, False, collections.OrderedDict())


def forged_archive(path: Path, script_class, attributes: dict, records: list[StorageRecord], **zip_options):
    """A TorchScript archive of one module with `attributes`, laid out as torch 1.x wrote them."""

    def module(tree: dict):
        instance = script_class()
        instance.attributes = {
            key: module(value) if isinstance(value, dict) else value for key, value in tree.items()
        }
        return instance

    buffer = io.BytesIO()
    ArchivePickler(buffer, protocol=2).dump(module(attributes))
    with zipfile.ZipFile(path, "w", **zip_options) as archive:  # no byteorder record, as torch 1.7
        archive.writestr("ViT-B-32/data.pkl", buffer.getvalue())
        archive.writestr("ViT-B-32/code/__torch__/clip/model.py", "# the archive's code, never read\n")
        archive.writestr("ViT-B-32/version", "3\n")
        for record in records:
            archive.writestr(f"ViT-B-32/data/{record.key}", record.tensor.numpy().tobytes())
    return path


def test_an_archive_as_older_torch_wrote_it_reads_to_the_same_weights(
    openai_checkpoints, script_class, workspace, tmp_path
):
    weights = torch.load(openai_checkpoints["state dict"], weights_only=True)
    records, tree = [], {}
    for index, (name, tensor) in enumerate(weights.items()):
        records.append(StorageRecord(str(index), tensor.contiguous()))
        *parents, leaf = name.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = old_tensor(records[-1])
    tree["input_resolution"] = Call(torch.jit._pickle.restore_type_tag, 32, "int")
    path = forged_archive(tmp_path / "ViT-B-32.pt", script_class, tree, records)
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read("ViT-B-32/data.pkl")
    assert all(name in pickled for name in (b"build_intlist", b"_rebuild_parameter", b"restore_type_tag"))
    assert b"cuda:0" in pickled and "ViT-B-32/byteorder" not in archive.namelist()

    read, form = lib.openai_weights.read_openai_weights(path)
    assert form == "TorchScript archive" and set(read) == set(weights)
    assert all(torch.equal(read[name], tensor) for name, tensor in weights.items())
    ours = lib.load_encoder(str(path), "cpu", "fp32").encode_text(TEXTS)
    np.testing.assert_allclose(
        ours, openai_text_embeddings(openai_checkpoints["state dict"], TEXTS), atol=1e-5
    )


def test_setting_the_state_of_a_tensor_is_refused(script_class, tmp_path):
    record = StorageRecord("0", torch.zeros(4))
    attributes = {"weight": old_tensor(record, state=(None, [10**9], [1], False))}  # would grow storage
    path = forged_archive(tmp_path / "grows.pt", script_class, attributes, [record])
    with pytest.raises(lib.PipelineError, match=r"cannot be read .*data.pkl sets the state of a Tensor"):
        lib.openai_weights.read_openai_weights(path)


@pytest.mark.parametrize("views", ["one stride-0 view", "one record viewed 1,000 times"])
def test_tensors_that_claim_more_than_the_file_holds_are_refused(views, script_class, tmp_path):
    record = StorageRecord("0", torch.zeros(1 << 16))
    if views == "one stride-0 view":
        attributes = {"weight": old_tensor(record, size=[1 << 20, 1 << 20], stride=[0, 0])}
    else:
        attributes = {f"weight{i}": old_tensor(record) for i in range(1000)}
    path = forged_archive(tmp_path / "claims.pt", script_class, attributes, [record])
    with pytest.raises(lib.PipelineError, match=r"is refused: its tensors claim [\d,]+ bytes, more than"):
        lib.openai_weights.read_openai_weights(path)


def test_a_compressed_record_is_refused_before_it_is_inflated(script_class, tmp_path):
    record = StorageRecord("0", torch.zeros(1 << 16))
    attributes = {"weight": old_tensor(record)}
    path = forged_archive(
        tmp_path / "deflated.pt", script_class, attributes, [record], compression=zipfile.ZIP_DEFLATED
    )
    with pytest.raises(lib.PipelineError, match=r"record ViT-B-32/data.pkl is compressed, which torch never"):
        lib.openai_weights.read_openai_weights(path)


def test_a_damaged_tensor_record_is_named(openai_checkpoints, workspace, tmp_path):
    data = bytearray(openai_checkpoints["TorchScript archive"].read_bytes())
    with zipfile.ZipFile(openai_checkpoints["TorchScript archive"]) as archive:
        info = next(info for info in archive.infolist() if info.filename.endswith("/data/0"))
    data[info.header_offset + 30 + len(info.filename) + 100] ^= 0xFF  # a byte inside the record
    (tmp_path / "damaged.pt").write_bytes(bytes(data))
    with pytest.raises(
        lib.PipelineError, match=r"cannot be read .*\(Bad CRC-32 for file 'TorchScript-archive/data/0'\)"
    ):
        lib.load_encoder(str(tmp_path / "damaged.pt"), "cpu")


def test_an_unreadable_pt_file_is_named(openai_checkpoints, monkeypatch):
    def denied(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(lib.model, "sha256_of_file", denied)
    with pytest.raises(lib.PipelineError, match=r"state-dict.pt cannot be read \(Permission denied\)"):
        lib.model.resolve_checkpoint(str(openai_checkpoints["state dict"]))
