"""Run the stage notebooks in order with one parameter set: what `make run` does.

    python notebooks/run_stages.py params/demo.yaml                      # 00 -> 01 -> 02 -> 03 -> 04
    python notebooks/run_stages.py params/demo.yaml 02_embed 03_merge    # some stages, in this order

Each stage runs headless with papermill, in a kernel of its own started at the repository root, and
its executed notebook is kept in OUTPUT_DIR/runs/<parameter set>/. What the cells print comes to this
process's stdout and stderr as it is printed, so `make run > run.log 2>&1` keeps every stage's output.
The first stage that fails stops the run (exit status 1) with the cell's error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import jupyter_client
import lib
import papermill
import yaml
import zmq

STAGES = ("00_setup", "01_metadata", "02_embed", "03_merge", "04_search")
NOTEBOOKS = Path(__file__).resolve().parent


class QuietKernelManager(jupyter_client.AsyncKernelManager):
    """Kernels whose messages are encrypted (CurveZMQ) or stay on this machine (IPC sockets).

    Either way a kernel does not warn, at every start, that it runs over TCP without encryption.
    """

    def __init__(self, **kwargs):
        spec = jupyter_client.kernelspec.get_kernel_spec(kwargs.get("kernel_name") or "python3")
        declared = spec.metadata.get("supported_encryption") or []  # a name, or a list of names
        encrypted = (
            "transport_encryption" in self.class_trait_names() and zmq.has("curve") and "curve" in declared
        )
        transport = {"transport_encryption": "auto"} if encrypted else {"transport": "ipc"}
        super().__init__(**transport, **kwargs)


def run_stage(stage: str, parameters: dict, executed: Path) -> None:
    """Execute one stage notebook with `parameters`, streaming what its cells print."""
    papermill.execute_notebook(
        NOTEBOOKS / f"{stage}.ipynb",
        executed,
        parameters=parameters,
        cwd=NOTEBOOKS.parent,
        progress_bar=False,
        stdout_file=sys.stdout,
        stderr_file=sys.stderr,
        kernel_manager_class=QuietKernelManager,  # papermill's client owns it, and shuts the kernel down
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("params", type=Path, help="a parameter set, such as params/demo.yaml")
    parser.add_argument("stages", nargs="*", metavar="STAGE", help=f"some of {', '.join(STAGES)}")
    args = parser.parse_args(argv)
    unknown = [stage for stage in args.stages if stage not in STAGES]
    if unknown:
        parser.error(f"no such stage: {', '.join(unknown)} (the stages are {', '.join(STAGES)})")
    if not args.params.is_file():
        parser.error(f"no parameter set {args.params}: give a YAML file such as params/demo.yaml")
    parameters = yaml.safe_load(args.params.read_text()) or {}
    output_dir = parameters.get("OUTPUT_DIR", lib.workspace.DEFAULT_OUTPUT_DIR)
    runs = lib.collection(output_dir).folder / "runs" / args.params.stem
    runs.mkdir(parents=True, exist_ok=True)
    logging.getLogger("papermill").setLevel(logging.ERROR)  # one parameter set names every stage's
    for stage in args.stages or STAGES:
        executed = runs / f"{stage}.ipynb"
        print(f"== {stage} with {args.params}; executed notebook: {executed}", flush=True)
        try:
            run_stage(stage, parameters, executed)
        except papermill.PapermillExecutionError as error:
            print(f"{stage} stopped:{error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
