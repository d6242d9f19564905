"""The floors hold: no import cycle inside cbam_deploy, no import hidden in a function body except of an
optional heavy dependency (with a comment saying why), and the import-linter contracts (.importlinter)
are kept. grimp, which import-linter uses, sees every import, those in function bodies too."""

from __future__ import annotations

import ast
import io
from contextlib import redirect_stdout
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cbam_deploy"

# Imported inside functions on purpose: optional extras or heavy libraries that only one path needs.
OPTIONAL = {"openvino", "nncf", "tensorrt", "onnxconverter_common", "cuda", "captum", "grpc", "tritonclient",
            "starlette", "uvicorn", "prometheus_client", "pydantic", "yaml", "matplotlib", "onnxruntime", "ncnn", "pnnx",
            "torchao", "timm", "safetensors", "ultralytics"}
# Modules of cbam_deploy that exist to hold an optional dependency (the gRPC endpoint imports grpc).
OPTIONAL_MODULES = {"cbam_deploy.serve.grpc_server"}
# The entry point installs the Ctrl-C handler first, then imports the command line.
ENTRY_POINT = PACKAGE / "__main__.py"


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every set of modules that import each other in a circle (strongly connected components of two or
    more modules, or a module importing itself)."""
    modules = sorted(graph.modules)
    imports = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for start in modules:
        if start in index:
            continue
        work = [(start, iter(imports[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(imports[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in imports[node]:
                    cycles.append(sorted(component))
    return cycles


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    graph = grimp.ImportGraph()
    for importer, imported in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=importer, imported=imported)
    assert import_cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_no_import_cycle_inside_the_package():
    graph = grimp.build_graph("cbam_deploy", cache_dir=None)  # imports in function bodies count too
    assert len(graph.modules) > 40
    assert import_cycles(graph) == []


def _lazy_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, imported module, the line's text) for every import inside a function body."""
    source = path.read_text()
    lines = source.splitlines()
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if in_function and isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name, lines[child.lineno - 1]) for alias in child.names)
            elif in_function and isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                found.append((child.lineno, base, lines[child.lineno - 1]))
            visit(child, inside)

    visit(ast.parse(source), False)
    return found


def test_only_optional_heavy_dependencies_are_imported_in_function_bodies():
    wrong, silent = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, imported, text in _lazy_imports(path):
            where = f"{path.relative_to(ROOT)}:{line} imports {imported}"
            if imported.split(".")[0] not in OPTIONAL and imported not in OPTIONAL_MODULES and path != ENTRY_POINT:
                wrong.append(where)
            elif "#" not in text:
                silent.append(where + " without a comment saying why")
    assert wrong == [], "imports in function bodies (move them to the top; a cycle means a module is on the wrong floor)"
    assert silent == []


def test_the_import_contracts_are_kept():
    from importlinter.cli import lint_imports

    output = io.StringIO()
    with redirect_stdout(output), pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        code = lint_imports(config_filename=str(ROOT / ".importlinter"))
    assert code == 0, output.getvalue()[-3000:]
    contracts = (ROOT / ".importlinter").read_text().count("[importlinter:contract:")
    assert contracts >= 2 and f"Contracts: {contracts} kept, 0 broken." in output.getvalue()


def test_every_format_is_one_package_with_its_modules_on_their_floors():
    """Each built-in format has its package, its row (``plugin``) with its build step (or is the root the
    export writes), and every module of the package named as a layer of the floors contract (so a new
    module cannot sit on no floor)."""
    from cbam_deploy.formats import BUILTIN, Format, formats, get

    config = (ROOT / ".importlinter").read_text()
    assert {module.split(".")[2] for module in BUILTIN} == set(formats())
    for fmt in formats():
        folder = PACKAGE / "backends" / fmt
        assert (folder / "plugin.py").is_file() and (folder / "runner.py").is_file(), fmt
        assert get(fmt).root or type(get(fmt)).make is not Format.make, fmt
        assert f"cbam_deploy.backends.{fmt}\n" in config.replace(")", "").replace("(", "") + "\n", fmt
        for module in folder.glob("*.py"):
            if module.stem != "__init__":
                assert f"backends.{fmt}.{module.stem}" in config, f"{module} sits on no floor of .importlinter"


# --- a format is reached only through its row ---------------------------------------------------------

def _format_names() -> set[str]:
    from cbam_deploy import formats

    return set(formats.formats()) | set(formats.recipes()) | set(formats.all_runtimes())


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def format_name_comparisons(source: str, names: set[str]) -> list[int]:
    """Lines comparing something with a format, recipe or runtime name (``== "onnx"``, ``in ("ncnn", ...)``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for operand in operands:
                values = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                if any(isinstance(v, ast.Constant) and v.value in names for v in values):
                    found.append(node.lineno)
        elif isinstance(node, ast.match_case) and isinstance(node.pattern, ast.MatchValue) and \
                isinstance(node.pattern.value, ast.Constant) and node.pattern.value.value in names:
            found.append(node.pattern.lineno)
    return found


def format_package_imports(path: Path) -> list[str]:
    """The format packages (cbam_deploy.backends.<format>) a module imports."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    imported = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            imported += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return sorted({m for m in imported if m.startswith("cbam_deploy.backends.") and m.split(".")[2] != "base"})


def test_the_detectors_find_what_they_look_for():
    assert format_name_comparisons('if artifact.format == "onnx":\n    pass\n', {"onnx"}) == [1]
    assert format_name_comparisons('x = fmt in ("ncnn", "executorch")\n', {"ncnn"}) == [1]
    assert format_name_comparisons('match fmt:\n    case "onnx":\n        pass\n', {"onnx"}) == [2]
    assert format_name_comparisons('x = path.suffix == ".onnx"\n', {"onnx"}) == []


def test_no_core_module_names_a_format_or_imports_a_format_package():
    names = _format_names()
    assert {"onnx", "openvino", "ncnn", "executorch", "tensorrt", "ort-cpu"} <= names
    comparisons, imports = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "backends":
            continue  # the format packages and what they share
        comparisons += [f"{relative}:{line}" for line in format_name_comparisons(path.read_text(), names)]
        imports += [f"{relative} imports {m}" for m in format_package_imports(path)]
    assert comparisons == [], "compare with a format's row (cbam_deploy.formats), not its name"
    assert imports == [], "reach a format through the registry (cbam_deploy.formats), not its package"
