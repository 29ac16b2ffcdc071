"""Hostile inputs: every mode and format Pillow writes, whole and broken, never crash, hang or flood.

The corpus is decoded in a child process with a time limit, so a hang fails the test instead of
stalling the suite, and so whatever the decoders print on the process's own stderr (libtiff does,
where a notebook shows it) is caught.
"""

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import lib
import numpy as np
import PIL
from PIL import Image

N_PX = 32
MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F"]
TIFF_COMPRESSIONS = ["tiff_lzw", "tiff_adobe_deflate", "jpeg", "packbits", "group4"]
COMMON = {"JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"}
# Pillow before 13 (which Gradio, the search app's, still requires) misreads the uncompressed YCbCr
# TIFF it writes itself (subsampling 1x1) as a truncated RGB one; Pillow 13 reads it.
PILLOW_CANNOT_READ = ["TIFF YCbCr"] if int(PIL.__version__.split(".")[0]) < 13 else []
STABLE_REASONS = {
    "not an image",
    "empty body",
    "too many pixels",
    "decode: truncated file",
    "decode: corrupt data",
    "decode: EPS needs Ghostscript",
}


def sample(mode: str) -> Image.Image:
    """A 50x40 image in `mode`, with varied content."""
    rng = np.random.default_rng(len(mode))
    rgb = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    if mode in ("I", "I;16", "F"):
        values = np.arange(2000).reshape(40, 50) * 17
        return Image.fromarray(values.astype({"I": np.int32, "F": np.float32}.get(mode, np.uint16)))
    if mode == "LAB":
        return Image.frombytes("LAB", (50, 40), rng.integers(0, 256, 6000, dtype=np.uint8).tobytes())
    if mode == "PA":
        return rgb.convert("RGBA").convert("PA")
    return rgb.convert(mode)


def encode(image: Image.Image, format: str, **options) -> bytes | None:
    """The image in `format`, or None when Pillow cannot write that mode in that format."""
    buffer = io.BytesIO()
    try:
        image.save(buffer, format, **options)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return buffer.getvalue()


def written_corpus() -> dict[str, bytes]:
    """Every format Pillow can write, in every mode it accepts, and TIFFs in libtiff's compressions."""
    Image.init()
    corpus = {}
    for format in sorted(Image.SAVE):
        for mode in MODES:
            data = encode(sample(mode), format)
            if data:
                corpus[f"{format} {mode}"] = data
    for compression in TIFF_COMPRESSIONS:
        mode = "1" if compression == "group4" else "RGB"
        corpus[f"TIFF {mode} {compression}"] = encode(sample(mode), "TIFF", compression=compression)
    frames = [sample("RGB"), sample("L").convert("RGB")]
    corpus["GIF animated"] = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    corpus["PNG animated"] = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    return corpus


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height`: a decompression bomb, as far as its header goes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    data = zlib.compress(b"\0" * 100)
    idat = struct.pack(">I", len(data)) + b"IDAT" + data + struct.pack(">I", zlib.crc32(b"IDAT" + data))
    return (
        b"\x89PNG\r\n\x1a\n"
        + ihdr
        + idat
        + struct.pack(">I", 0)
        + b"IEND"
        + struct.pack(">I", zlib.crc32(b"IEND"))
    )


def broken(data: bytes) -> dict[str, bytes]:
    """Ways a file arrives damaged: cut in half, only its first bytes, bytes flipped, nothing."""
    third = len(data) // 3
    middle = bytes(b ^ 0x5A if i % 5 == 0 else b for i, b in enumerate(data[third : 2 * third]))
    return {
        "half": data[: len(data) // 2],
        "head": data[:20],
        "flipped": bytes(
            b ^ 0x5A if 16 < i < len(data) - 16 and i % 7 == 3 else b for i, b in enumerate(data)
        ),
        "flipped inside": data[:third] + middle + data[2 * third :],
        "empty": b"",
    }


def hostile_corpus() -> dict[str, bytes]:
    corpus = written_corpus()
    for name, data in list(corpus.items()):
        corpus.update({f"{name} ({damage})": bad for damage, bad in broken(data).items()})
    corpus["bomb: a PNG claiming 100000x100000"] = png_claiming(100_000, 100_000)
    corpus["html: a page served as an image"] = b"<!doctype html><html><body>Not Found</body></html>"
    return corpus


def decode_everything(folder: str) -> None:
    """Run each corpus file through 02's fetch, decode and preprocess; print the outcomes as JSON."""
    fetcher, recipe = lib.Fetcher(), lib.preprocess.ImageRecipe(lib.preprocess.Preprocessing(N_PX))
    outcomes = {}
    for index, (name, data) in enumerate(hostile_corpus().items()):
        path = Path(folder) / f"{index}.img"
        path.write_bytes(data)
        loaded = lib.embed.load_image(str(path), None, fetcher, recipe)
        ok = loaded.pixels is not None and loaded.pixels.shape == (3, N_PX, N_PX)
        outcomes[name] = "ok" if ok and np.isfinite(loaded.pixels).all() else loaded.reason
    print(json.dumps(outcomes))


def test_every_mode_and_format_pillow_writes_whole_or_broken(tmp_path):
    code = f"import conftest, test_corpus; test_corpus.decode_everything({str(tmp_path)!r})"
    child = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stderr == "", f"decoders printed: {child.stderr[:2000]}"
    outcomes = json.loads(child.stdout)

    whole = {name: outcome for name, outcome in outcomes.items() if not name.endswith(")")}
    assert len(whole) > 150
    failing = [n for n, o in whole.items() if n.split()[0] in COMMON and o != "ok"]
    assert failing == PILLOW_CANNOT_READ, "common formats embed"
    assert all(whole[name] == "decode: truncated file" for name in PILLOW_CANNOT_READ)
    unexpected = {
        name: outcome
        for name, outcome in outcomes.items()
        if outcome != "ok"
        and outcome not in STABLE_REASONS
        and not outcome.startswith("decode: unsupported mode")
    }
    assert unexpected == {}
    assert all(outcomes[name] == "empty body" for name in outcomes if name.endswith("(empty)"))
    assert outcomes["bomb: a PNG claiming 100000x100000"] == "too many pixels"
    assert outcomes["html: a page served as an image"] == "not an image"
    assert outcomes["JPEG RGB (half)"] == outcomes["PNG RGB (half)"] == "decode: truncated file"
