"""OpenAI's own CLIP checkpoints (`.pt` files, as `clip.load` reads them) as transformers directories.

02's model step (model.resolve_checkpoint) hands a `.pt` file here, or the original notebook's cached
`~/.cache/clip/<name>.pt` when its SHA-256 is the one OpenAI publishes. The weights are read as data
only, never running pickled code; they are mapped onto transformers' `CLIPModel`, its configuration
derived from their shapes, and written once under .cache/models/ with CLIP's own BPE vocabulary and
OpenAI's preprocessing, so that later loads read the converted directory.
"""

from __future__ import annotations

import collections
import gzip
import importlib.util
import io
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import PipelineError
from .preprocess import OPENAI_MEAN, OPENAI_STD
from .settings import current_settings
from .workspace import check_free_space, check_writable, current_workspace, sha256_of_file, write_json

OPENAI_FILES = {  # each name's file in clip.load's cache, and the SHA-256 its download URL names
    "ViT-B/32": ("ViT-B-32.pt", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"),
    "ViT-B/16": ("ViT-B-16.pt", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"),
    "ViT-L/14": ("ViT-L-14.pt", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"),
    "ViT-L/14@336px": (
        "ViT-L-14-336px.pt",
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
    ),
}
RESNET_NAMES = {  # OpenAI's ResNet CLIPs, by the residual blocks of their four stages
    (3, 4, 6, 3): "RN50",
    (3, 4, 23, 3): "RN101",
    (4, 6, 10, 6): "RN50x4",
    (6, 8, 18, 8): "RN50x16",
    (3, 15, 36, 10): "RN50x64",
}
VIT_NAMES = ", ".join(OPENAI_FILES)
CONVERSION = "openai-v1"  # the converted directories' name prefix: a new version converts afresh

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"  # CLIP's vocabulary, as OpenAI's clip package ships it
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
BPE_MERGES = 49152 - 256 - 2  # the merges clip.tokenize uses, after the file's header line
VOCABULARY_SIZE = 256 * 2 + BPE_MERGES + 2  # bytes, bytes ending a word, merges, start and end


def cached_openai_file(name: str) -> tuple[Path, str] | None:
    """The original notebook's `clip.load(name)` download and its SHA-256, when it is OpenAI's file."""
    file_name, published = OPENAI_FILES[name]
    path = current_settings().clip_cache / file_name
    if not path.is_file():
        return None
    digest = sha256_of_file(path)
    if digest != published:
        warnings.warn(
            f"{path} is not OpenAI's {name} file: its SHA-256 is {digest}, OpenAI publishes {published}. "
            "Using the Hugging Face hub's copy instead; delete the file to let clip.load download it again.",
            stacklevel=2,
        )
        return None
    return path, digest


def converted_folder(digest: str) -> Path:
    """Where the OpenAI `.pt` file whose SHA-256 is `digest` is kept in transformers' format."""
    return current_workspace().models / f"{CONVERSION}-{digest}"


def convert_openai_checkpoint(path: Path, folder: Path) -> None:
    """Convert an OpenAI `.pt` file into `folder` (its converted_folder) unless that is there, whole."""
    if (folder / "source.json").is_file():
        return
    weights, form = read_openai_weights(path)
    config = clip_config(weights, path)
    state = transformers_weights(weights, config, path)
    print(f"Converting {path} ({form}) into {folder} once; later loads read that folder.")
    _write_folder(folder, config, state, {"source": str(path), "sha256": folder.name[-64:], "form": form})


# Reading a .pt file as data


def read_openai_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a `.pt` file, a TorchScript archive or a state dict, and which form it was.

    Nothing in the file runs: state dicts go through torch's weights-only unpickler, and archives
    through one that knows only modules, tensors and dictionaries (torch.jit.load would run their code).
    """
    if path.stat().st_size == 0:
        raise PipelineError(f"MODEL={str(path)!r} is an empty file: copy or download the checkpoint again.")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if _is_torchscript(archive):
                    return _torchscript_tensors(archive), "TorchScript archive"
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _unreadable(path, error) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as error:
        raise _unreadable(path, error) from None
    return _state_dict(loaded, path), "state dict"


def _unreadable(path: Path, error: Exception) -> PipelineError:
    refused = re.search(r"GLOBAL (\S+)|data\.pkl refers to (\S+)", str(error))
    if refused:
        return PipelineError(
            f"MODEL={str(path)!r} is refused: it holds more than plain weights "
            f"({refused.group(1) or refused.group(2)}), and reading that could run code. Only plain "
            "weights are read: a state dict, or OpenAI's TorchScript archive."
        )
    return PipelineError(
        f"MODEL={str(path)!r} cannot be read as a PyTorch checkpoint ({_first_line(error)}). It may "
        "be truncated (compare its size with the original's) or not a checkpoint at all."
    )


def _first_line(error: Exception) -> str:
    """What went wrong, without torch's advice on weights_only (which is not for users to follow here)."""
    message = str(error)
    detail = re.search(r"WeightsUnpickler error: \s*(.+)", message)
    first = detail.group(1) if detail else message.splitlines()[0] if message else type(error).__name__
    return first.split(". ")[0][:200]


def _state_dict(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """A loaded object that must be a flat mapping of names to tensors."""
    if isinstance(loaded, dict) and all(isinstance(value, torch.Tensor) for value in loaded.values()):
        return {str(name): tensor for name, tensor in loaded.items()}
    if isinstance(loaded, dict):
        keys = ", ".join(map(str, list(loaded)[:8]))
        raise PipelineError(
            f"MODEL={str(path)!r} holds a dictionary of more than tensors (keys {keys}), such as a "
            "training checkpoint: save its model's state_dict() alone and use that file."
        )
    raise PipelineError(
        f"MODEL={str(path)!r} holds a {type(loaded).__name__}, not a CLIP state dict or TorchScript archive."
    )


def _is_torchscript(archive: zipfile.ZipFile) -> bool:
    return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptModule:
    """A module of a TorchScript archive: the attributes its data.pkl lists, and none of its code."""

    def __setstate__(self, state: Any) -> None:
        self.attributes = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2 over a storage read as a flat tensor."""
    return torch.as_strided(storage, size, stride, offset)


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript archive's data.pkl into modules and tensors; every other global is refused."""

    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(prefix + "data.pkl")))
        self._archive = archive
        self._prefix = prefix

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__."):
            return _ScriptModule
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[module, name]
        raise pickle.UnpicklingError(f"data.pkl refers to {module}.{name}")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"data.pkl refers to an unknown record {pid!r}")
        _, dtype, key, _location, count = pid
        data = self._archive.read(f"{self._prefix}data/{key}")
        if not isinstance(dtype, torch.dtype) or len(data) != count * dtype.itemsize:
            raise ValueError(f"the tensor record data/{key} holds {len(data)} bytes, not {count} values")
        return torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)


def _torchscript_tensors(archive: zipfile.ZipFile) -> dict[str, torch.Tensor]:
    """Every tensor attribute of an archive's modules, named by its path as state_dict() names it."""
    prefix = next(name for name in archive.namelist() if name.endswith("data.pkl"))[: -len("data.pkl")]
    if archive.read(prefix + "byteorder").strip() not in (b"", b"little"):
        raise ValueError("the archive was written on a big-endian machine")
    root = _DataOnlyUnpickler(archive, prefix).load()
    if not isinstance(root, _ScriptModule):
        raise ValueError("its data.pkl holds no TorchScript module")
    return dict(_module_tensors(root))


def _module_tensors(module: _ScriptModule, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    for name, value in module.attributes.items():
        if isinstance(value, torch.Tensor):
            yield prefix + name, value
        elif isinstance(value, _ScriptModule):
            yield from _module_tensors(value, f"{prefix}{name}.")


# OpenAI's names and shapes -> transformers' CLIPModel

_REQUIRED = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "positional_embedding")
_REQUIRED += ("token_embedding.weight", "text_projection", "ln_final.weight")
_TOWERS = {"vision": "visual.transformer.resblocks.", "text": "transformer.resblocks."}


def clip_config(weights: dict[str, torch.Tensor], path: Path) -> Any:
    """The CLIPConfig of OpenAI ViT weights, derived from their shapes as OpenAI's build_model does."""
    from transformers import CLIPConfig

    _refuse_other_architectures(weights, path)
    vision_width, _, patch, _ = weights["visual.conv1.weight"].shape
    grid = round((weights["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    context_length, text_width = weights["positional_embedding"].shape
    vocabulary = weights["token_embedding.weight"].shape[0]
    if vocabulary != VOCABULARY_SIZE:
        raise PipelineError(
            f"MODEL={str(path)!r}: its text tower has {vocabulary} tokens, but CLIP's BPE vocabulary, the "
            f"only tokenizer of OpenAI checkpoints, has {VOCABULARY_SIZE}."
        )
    text = _tower(weights, "text", text_width, path)
    text.update(vocab_size=vocabulary, max_position_embeddings=context_length)
    text.update(bos_token_id=vocabulary - 2, eos_token_id=vocabulary - 1, pad_token_id=vocabulary - 1)
    vision = _tower(weights, "vision", vision_width, path)
    vision.update(image_size=patch * grid, patch_size=patch)
    embedding_size = weights["text_projection"].shape[1]
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embedding_size)


def _tower(weights: dict[str, torch.Tensor], tower: str, width: int, path: Path) -> dict:
    """One transformer's configuration: width, depth, heads (width / 64, as OpenAI's), MLP size."""
    blocks = _TOWERS[tower]
    depth = len({name[len(blocks) :].split(".")[0] for name in weights if name.startswith(blocks)})
    if width % 64 or not depth:
        raise _not_clip(
            path, f"its {tower} transformer ({depth} blocks of width {width}) has no 64-wide heads"
        )
    return {
        "hidden_size": width,
        "intermediate_size": weights[f"{blocks}0.mlp.c_fc.weight"].shape[0],
        "num_attention_heads": width // 64,
        "num_hidden_layers": depth,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }


def _refuse_other_architectures(weights: dict[str, torch.Tensor], path: Path) -> None:
    if "visual.layer1.0.conv1.weight" in weights:
        blocks = tuple(
            len({name.split(".")[2] for name in weights if name.startswith(f"visual.layer{stage}.")})
            for stage in range(1, 5)
        )
        name = RESNET_NAMES.get(blocks, "a ResNet of {}-{}-{}-{} blocks".format(*blocks))
        raise PipelineError(
            f"MODEL={str(path)!r} is OpenAI's ResNet CLIP {name}: its image tower is a modified ResNet, "
            f"which transformers' CLIPModel does not have. Use a ViT checkpoint ({VIT_NAMES})."
        )
    if any(name.startswith(("vision_model.", "text_model.")) for name in weights):
        raise PipelineError(
            f"MODEL={str(path)!r} holds transformers CLIPModel weights: set MODEL to the directory that "
            "holds it with its config.json."
        )
    missing = [name for name in _REQUIRED if name not in weights]
    if missing:
        raise _not_clip(path, f"it has no {', '.join(missing)}")


def _not_clip(path: Path, problem: str) -> PipelineError:
    return PipelineError(
        f"MODEL={str(path)!r} is not an OpenAI CLIP checkpoint: {problem}. Use one of OpenAI's ViT files "
        f"({VIT_NAMES}) or a fine-tune saved in their format."
    )


_RENAMED = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK_PARTS = {
    "attn.out_proj.": "self_attn.out_proj.",
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
_LAYERS = {
    "visual.transformer.resblocks.": "vision_model.encoder.layers.",
    "transformer.resblocks.": "text_model.encoder.layers.",
}
_NOT_WEIGHTS = re.compile(r"input_resolution|context_length|vocab_size|(.*\.)?attn_mask")  # OpenAI's extras


def transformers_weights(
    weights: dict[str, torch.Tensor], config: Any, path: Path
) -> dict[str, torch.Tensor]:
    """OpenAI's tensors under CLIPModel's names, checked against the model `config` describes."""
    from transformers import CLIPModel

    mapped, unknown = {}, []
    for name, tensor in weights.items():
        if _NOT_WEIGHTS.fullmatch(name):
            continue
        renamed = _renamed(name, tensor)
        mapped.update(renamed)
        if not renamed:
            unknown.append(name)
    with torch.device("meta"):
        expected = {name: tuple(tensor.shape) for name, tensor in CLIPModel(config).state_dict().items()}
    missing = sorted(set(expected) - set(mapped))
    misshapen = sorted(
        name for name in set(expected) & set(mapped) if tuple(mapped[name].shape) != expected[name]
    )
    for problem, names in (("unknown tensors", unknown), ("no", missing), ("misshapen", misshapen)):
        if names:
            raise _not_clip(
                path, f"it has {problem} {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            )
    return {name: tensor.contiguous().clone() for name, tensor in mapped.items()}


def _renamed(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One OpenAI tensor as CLIPModel's tensor(s); {} for a name OpenAI's models do not have."""
    if name in _RENAMED:
        return {_RENAMED[name]: tensor}
    if name in _TRANSPOSED:
        return {_TRANSPOSED[name]: tensor.t()}
    for old, new in _LAYERS.items():
        if name.startswith(old):
            index, _, part = name[len(old) :].partition(".")
            layer = f"{new}{index}."
            if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = part.rsplit("_", 1)[1]
                return {
                    f"{layer}self_attn.{q}_proj.{kind}": t
                    for q, t in zip("qkv", tensor.chunk(3), strict=True)
                }
            for old_part, new_part in _BLOCK_PARTS.items():
                if part.startswith(old_part):
                    return {layer + new_part + part[len(old_part) :]: tensor}
    return {}


# CLIP's BPE tokenizer and the converted folder


def openai_bpe_file() -> Path:
    """CLIP's BPE vocabulary as OpenAI's clip package (clip-anytorch) installs it, checked by its digest."""
    spec = importlib.util.find_spec("clip")  # finds the package without importing it
    folders = (spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0]) / BPE_FILE if folders else None
    if path is None or not path.is_file() or sha256_of_file(path) != BPE_SHA256:
        found = (
            f"{path} is not OpenAI's" if path and path.is_file() else "OpenAI's clip package is not installed"
        )
        raise PipelineError(
            f"OpenAI checkpoints are tokenized with CLIP's own BPE vocabulary ({BPE_FILE}), and {found}: "
            "pip install -r requirements.txt (it installs clip-anytorch, OpenAI's clip package)."
        )
    return path


def openai_tokenizer(context_length: int) -> Any:
    """CLIP's BPE tokenizer, its vocabulary built from OpenAI's file in the order clip.tokenize builds it."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.decompress(openai_bpe_file().read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : BPE_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(merge) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocabulary = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocabulary, merges=merges, model_max_length=context_length)


def _preprocessor_config(image_size: int) -> dict:
    """transformers' CLIPImageProcessor settings for OpenAI's transform (02 applies its own, exactly)."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": image_size},
        "crop_size": {"height": image_size, "width": image_size},
        "resample": 3,  # bicubic
        "image_mean": list(OPENAI_MEAN),
        "image_std": list(OPENAI_STD),
    }


def _write_folder(folder: Path, config: Any, state: dict[str, torch.Tensor], source: dict) -> None:
    """Write a converted checkpoint beside `folder` and rename it into place; source.json marks it whole."""
    from safetensors.torch import save_file

    check_writable(folder.parent)
    needed = sum(tensor.nbytes for tensor in state.values()) + (8 << 20)
    check_free_space(folder.parent, needed, f"the converted checkpoint {folder.name}")
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(staging)
        write_json(
            staging / "preprocessor_config.json", _preprocessor_config(config.vision_config.image_size)
        )
        openai_tokenizer(config.text_config.max_position_embeddings).save_pretrained(staging)
        for written in staging.iterdir():
            with open(written, "rb") as file:
                os.fsync(file.fileno())
        write_json(staging / "source.json", source)
        if folder.exists() and not (folder / "source.json").is_file():
            shutil.rmtree(folder)  # not whole: a copy or an edit by hand, never a rename of this code
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "source.json").is_file():  # else another process converted it first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
