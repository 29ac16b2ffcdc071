"""OpenAI's own CLIP checkpoints (`.pt` files, as `clip.load` reads them) as transformers directories.

02's model step (model.resolve_checkpoint) hands a `.pt` file here, or the original notebook's cached
`~/.cache/clip/<name>.pt` when its SHA-256 is the one OpenAI publishes. Its tensors, read as data only
(openai_weights), are mapped onto transformers' `CLIPModel`, its configuration derived from their
shapes, and written once under .cache/models/ with CLIP's own BPE vocabulary and OpenAI's
preprocessing, so that later loads read the converted directory.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import PipelineError
from .openai_weights import read_openai_weights
from .preprocess import OPENAI_MEAN, OPENAI_STD
from .settings import current_settings
from .workspace import (
    check_free_space,
    check_writable,
    current_workspace,
    read_json,
    sha256_of_file,
    write_json,
)

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
    if _is_whole(folder):
        return
    weights, form = read_openai_weights(path)
    config = clip_config(weights, path)
    state = transformers_weights(weights, config, path)
    print(f"Converting {path} ({form}) into {folder} once; later loads read that folder.")
    source = {"source": str(path), "sha256": folder.name.removeprefix(f"{CONVERSION}-"), "form": form}
    _write_folder(folder, config, state, source)


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
            f"only tokenizer of OpenAI checkpoints, has {VOCABULARY_SIZE}. Save the model as a "
            "transformers directory with its own tokenizer, and set MODEL to that directory."
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
    if f"{blocks}0.mlp.c_fc.weight" not in weights:
        raise _not_clip(path, f"it has no {blocks}0.mlp.c_fc.weight")
    if width % 64:
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
    if weights and all(name.startswith("module.") for name in weights):
        raise _not_clip(
            path,
            "its names start with 'module.', as a DataParallel wrapper saves them; save "
            "model.module.state_dict() instead",
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
# what OpenAI's TorchScript files hold besides weights, and a scripted model's text mask
_NOT_WEIGHTS = re.compile(r"input_resolution|context_length|vocab_size|(.*\.)?attn_mask")


def transformers_weights(
    weights: dict[str, torch.Tensor], config: Any, path: Path
) -> dict[str, torch.Tensor]:
    """OpenAI's tensors under CLIPModel's names, checked against the model `config` describes."""
    from transformers import CLIPModel

    mapped, origin, unknown = {}, {}, []
    for name, tensor in weights.items():
        if _NOT_WEIGHTS.fullmatch(name):
            continue
        renamed = _renamed(name, tensor)
        if not renamed:
            unknown.append(name)
        mapped.update(renamed)
        origin.update(dict.fromkeys(renamed, name))
    with torch.device("meta"):
        expected = {name: tuple(tensor.shape) for name, tensor in CLIPModel(config).state_dict().items()}
    missing = sorted(set(expected) - set(mapped))
    misshapen = sorted(
        origin[name] for name in set(expected) & set(mapped) if tuple(mapped[name].shape) != expected[name]
    )
    problems = [("unknown tensors", unknown), ("misshapen", misshapen), ("nothing for CLIPModel's", missing)]
    for problem, names in problems:
        if names:
            listed = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
            raise _not_clip(path, f"it has {problem} {listed}")
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


def _is_whole(folder: Path) -> bool:
    """Whether `folder` holds every file its source.json lists, each of the size it lists."""
    sizes = read_json(folder / "source.json").get("sizes")
    if not isinstance(sizes, dict):
        return False
    return all(
        (folder / name).is_file() and (folder / name).stat().st_size == size for name, size in sizes.items()
    )


_STAGING_LIFETIME = 24 * 3600  # seconds: a staging folder this old belongs to a conversion that died


def _write_folder(folder: Path, config: Any, state: dict[str, torch.Tensor], source: dict) -> None:
    """Write a converted checkpoint beside `folder` and rename it into place; source.json marks it whole."""
    from safetensors.torch import save_file

    check_writable(folder.parent)
    _remove_dead_staging(folder.parent)
    needed = sum(tensor.nbytes for tensor in state.values()) + (8 << 20)
    check_free_space(folder.parent, needed, f"the converted checkpoint {folder.name}")
    staging = folder.parent / f".{folder.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(staging)
        image_size = config.vision_config.image_size
        write_json(staging / "preprocessor_config.json", _preprocessor_config(image_size))
        openai_tokenizer(config.text_config.max_position_embeddings).save_pretrained(staging)
        for written in staging.iterdir():
            with open(written, "rb") as file:
                os.fsync(file.fileno())
        sizes = {path.name: path.stat().st_size for path in staging.iterdir()}
        write_json(staging / "source.json", {**source, "sizes": sizes})
        _set_aside(folder)
        _rename_into_place(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_dead_staging(models: Path) -> None:
    for staging in models.glob(f".{CONVERSION}-*"):
        if time.time() - staging.stat().st_mtime > _STAGING_LIFETIME:
            shutil.rmtree(staging, ignore_errors=True)


def _set_aside(folder: Path) -> None:
    """Remove a folder that is not whole (damaged, or edited by hand), renaming it first, so that a
    whole one another process renames into place meanwhile is never the one removed."""
    if folder.exists() and not _is_whole(folder):
        aside = folder.parent / f".{folder.name}.damaged-{uuid.uuid4().hex[:8]}"
        try:
            folder.rename(aside)
        except FileNotFoundError:  # another process set it aside first
            return
        shutil.rmtree(aside, ignore_errors=True)


def _rename_into_place(staging: Path, folder: Path) -> None:
    try:
        staging.rename(folder)
    except OSError:
        if not _is_whole(folder):  # else another process converted the same file first
            raise
        return
    directory = os.open(folder.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
