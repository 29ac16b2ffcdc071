"""The model alone on the CPU with glibc's default allocator settings, and with keep_freed_memory().

    python benchmarks/allocator.py                 # random ViT-B/32, batches of 32, 3 turns each
    python benchmarks/allocator.py --batch-size 64 --batches 4 --repeats 2

lib calls keep_freed_memory() when it loads a model onto the CPU. Each setting runs in processes of
its own (mallopt holds for a process's life), taking turns. Each process runs the model alone
(CLIPModel.get_image_features on ready tensors) for a warm-up batch and then --batches more, and
reports img/s and minor page faults per batch. Prints JSON with every turn and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from workload import MODEL_HELP, lib, model_path

SETTINGS = ("glibc_defaults", "keep_freed_memory")


def minor_page_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def model_alone(setting: str, model: str, batch_size: int, batches: int) -> dict:
    """img/s and page faults per batch of the model on random tensors, in this process."""
    from transformers import CLIPModel

    if setting == "keep_freed_memory":
        lib.settings.keep_freed_memory()
    clip = CLIPModel.from_pretrained(model_path(model)).eval()
    size = clip.config.vision_config.image_size
    pixels = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        clip.get_image_features(pixel_values=pixels)  # warm-up
        faults, began = minor_page_faults(), time.perf_counter()
        for _ in range(batches):
            clip.get_image_features(pixel_values=pixels)
        seconds = time.perf_counter() - began
    return {
        "img_s": round(batches * batch_size / seconds, 1),
        "page_faults_per_batch": round((minor_page_faults() - faults) / batches),
        "process": os.getpid(),
        "freed_memory_kept": lib.settings.keep_freed_memory.cache_info().currsize == 1,
    }


def in_a_process(setting: str, model: str, batch_size: int, batches: int) -> dict:
    """model_alone in a fresh process of this script."""
    options = [f"--model={model}", f"--batch-size={batch_size}", f"--batches={batches}"]
    command = [sys.executable, __file__, f"--setting={setting}", *options]
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(finished.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="random", help=MODEL_HELP)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="timed batches, after one warm-up batch")
    parser.add_argument("--repeats", type=int, default=3, help="processes per setting, taking turns")
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    if args.setting:
        print(json.dumps(model_alone(args.setting, args.model, args.batch_size, args.batches)))
        return
    turns: dict[str, list[dict]] = {setting: [] for setting in SETTINGS}
    for _ in range(args.repeats):
        for setting in SETTINGS:
            turns[setting].append(in_a_process(setting, args.model, args.batch_size, args.batches))
    medians = {setting: statistics.median(run["img_s"] for run in runs) for setting, runs in turns.items()}
    report = {
        "device": lib.environment.describe_device("cpu"),
        "model": args.model,
        "batch_size": args.batch_size,
        "turns": turns,
        "median_img_s": medians,
        "speedup": round(medians["keep_freed_memory"] / medians["glibc_defaults"], 2),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
