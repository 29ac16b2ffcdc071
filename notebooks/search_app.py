"""Serve 04's search app from the command line: what `make app` does.

    python notebooks/search_app.py --embeddings OUTPUT/Images_Embedded.h5          # http://127.0.0.1:7860
    python notebooks/search_app.py --params params/demo.yaml --host 0.0.0.0 --port 8080

04's parameters come from its notebook's parameters cell (the defaults), then from a parameter set
(--params, as papermill -f takes it), then from the options given here. Ctrl-C stops the app.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lib
import nbformat
import yaml

NOTEBOOK = Path(__file__).resolve().parent / "04_search.ipynb"


def notebook_defaults(notebook: Path = NOTEBOOK) -> dict:
    """The parameters cell's assignments, as the notebook itself would make them."""
    cells = nbformat.read(notebook, as_version=4).cells
    cell = next(cell for cell in cells if "parameters" in cell.metadata.get("tags", []))
    namespace: dict = {}
    exec(cell.source, namespace)
    return {name: value for name, value in namespace.items() if name.isupper()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, help="a parameter set, such as params/demo.yaml")
    parser.add_argument("--embeddings", help="the merged file to search (default: OUTPUT_DIR's)")
    parser.add_argument("--output-dir", help="the collection whose merged file to search")
    parser.add_argument("--host", help="the address to serve on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, help="the port to serve on (default 7860)")
    parser.add_argument("--share", action="store_true", default=None, help="also a public Gradio link")
    args = parser.parse_args(argv)
    parameters = notebook_defaults()
    if args.params:
        if not args.params.is_file():
            parser.error(f"no parameter set {args.params}: give a YAML file such as params/demo.yaml")
        parameters.update(yaml.safe_load(args.params.read_text()) or {})
    given = {"EMBEDDINGS": args.embeddings, "OUTPUT_DIR": args.output_dir, "HOST": args.host}
    given.update(PORT=args.port, SHARE=args.share)
    parameters.update({name: value for name, value in given.items() if value is not None})
    try:
        lib.prepare_process()
        lib.app.serve(lib.read_parameters(lib.SearchParams, parameters))
    except lib.PipelineError as error:
        print(f"search app: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
