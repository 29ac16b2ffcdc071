"""The package's shape: one module per seam, imports down the flow, the notebooks on its API alone."""

import ast
import re
import types

import lib
import nbformat
from conftest import REPO

FLOW = [
    "errors",
    "settings",
    "workspace",
    "storage",
    "params",
    "progress",
    "downloads",
    "fetch",
    "shards",
    "sources",
    "table",
    "preprocess",
    "device_jpeg",
    "openai_weights",
    "openai_checkpoint",
    "onnx_tower",
    "onednn",
    "model",
    "cluster",
    "chunkfile",
    "claims",
    "plan",
    "embed",
    "executor",
    "ray_worker",
    "ray_executor",
    "merge",
    "nearest",
    "display",
    "export",
    "vector_index",
    "subset",
    "app",
    "environment",
]
PACKAGE = REPO / "notebooks" / "lib"


def package_imports(module: str) -> set[str]:
    """The modules of the package that `module` imports."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
    return found


def test_every_module_is_placed_in_the_flow_and_none_is_long():
    assert sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__") == sorted(FLOW)
    for module in FLOW:
        source = (PACKAGE / f"{module}.py").read_text()
        assert len(source.splitlines()) <= 500, module
        assert ast.get_docstring(ast.parse(source)), f"{module} opens with a docstring"


def test_imports_point_down_the_flow():
    for position, module in enumerate(FLOW):
        later = package_imports(module) - set(FLOW[:position])
        assert not later, f"{module} imports {later}, which come after it"


def test_the_api_docstring_lists_the_modules_in_the_order_of_the_flow():
    listed = re.findall(r"^    (\w+) {2,}", lib.__doc__, re.MULTILINE)
    assert [name for name in listed if name in FLOW] == FLOW


def test_the_notebooks_use_only_the_api():
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        source = "\n".join(cell.source for cell in nbformat.read(path, as_version=4).cells)
        used = set(re.findall(r"\blib\.(\w+)", source))
        assert used <= set(lib.__all__), f"{path.name} uses {used - set(lib.__all__)}"
        modules = {name for name in used if isinstance(getattr(lib, name), types.ModuleType)}
        assert not modules, f"{path.name} reaches into {modules}: the notebooks call the API"
    assert all(hasattr(lib, name) for name in lib.__all__)
