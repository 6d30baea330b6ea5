"""The layers, read from the sources' imports: the kernel layer (ssse_ext) imports nothing from
ssse; the core (python/ssse except cli/ and experiments/; the service included) imports no
experiment, no CLI and no benchmark; the experiments and the CLI use only public names of ssse
and ssse_ext. And the command stays thin: short functions in short files."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL = sorted((ROOT / "ssse_ext").rglob("*.py"))
ENTRY = ("__main__.py",)  # ``python -m ssse``
CORE = sorted(p for p in (ROOT / "python" / "ssse").glob("*.py") if p.name not in ENTRY) + \
    sorted((ROOT / "python" / "ssse" / "curvature").glob("*.py"))
CLI = sorted((ROOT / "python" / "ssse" / "cli").rglob("*.py"))  # the command
CLIENTS = sorted((ROOT / "python" / "ssse" / "experiments").glob("*.py")) + CLI + \
    [ROOT / "python" / "ssse" / name for name in ENTRY]
#: The longest function and the longest file of the command: it parses, calls the library,
#: prints; logic that grows past these belongs in the library.
MAX_CLI_FUNCTION_LINES = 80
MAX_CLI_FILE_LINES = 600

#: What the core must not import (the modules and everything below them).
NOT_IN_CORE = ("ssse.experiments", "ssse.cli", "ssse_ext.bench")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "python":
        parts = parts[1:]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """``(line, module, names)`` for every import of the file, at any depth (lazy imports
    too), with relative imports resolved: ``from .x import a, b`` in ssse/cli.py gives
    ``(n, "ssse.x", ["a", "b"])``; ``import a.b`` gives ``(n, "a.b", [])``."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            yield node.lineno, module, [alias.name for alias in node.names]


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def layer_violations(path: Path, forbidden) -> list[str]:
    bad = []
    for line, module, names in imports(path):
        # `from ssse import cli` names the module in `names`
        targets = [module] + [f"{module}.{n}" for n in names]
        hit = next((f for f in forbidden for t in targets if within(t, f)), None)
        if hit:
            bad.append(f"{where(path, line)} imports {hit}")
    return bad


def private_violations(path: Path) -> list[str]:
    bad = []
    for line, module, names in imports(path):
        if not (within(module, "ssse") or within(module, "ssse_ext")):
            continue
        if within(module, "ssse.experiments"):  # the experiments' own helpers
            continue
        private = [p for p in module.split(".") + names
                   if p.startswith("_") and not p.startswith("__")]
        if private:
            bad.append(f"{where(path, line)} imports the private {', '.join(private)} "
                       f"(from {module})")
    return bad


def test_the_sources_are_found():
    names = {p.name for p in CORE}
    assert {"gradients.py", "erasure.py", "baselines.py", "metrics.py", "io.py", "models.py",
            "training.py", "data.py", "plots.py", "model.py", "__init__.py"} <= names
    assert {"fisher.py", "validation.py", "bench.py"} <= {p.name for p in KERNEL}
    assert {"service.py", "files.py"} <= names
    assert {"common.py", "demo.py", "parser.py", "entry.py", "erase.py"} <= \
        {p.name for p in CLIENTS}
    assert not (ROOT / "python" / "ssse" / "cli.py").exists()


@pytest.mark.parametrize("path", KERNEL, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_kernel_layer_imports_nothing_from_ssse(path):
    bad = layer_violations(path, ("ssse",))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", KERNEL, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_kernel_layer_imports_no_torch_nn(path):
    # tensors only: models and their layers are the model-level library's
    bad = layer_violations(path, ("torch.nn",))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", KERNEL, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_kernel_layer_knows_no_models_or_data(path):
    # what a model and a batch are is the model-level library's (ssse.batches): the kernel
    # layer neither checks modules nor reads (X, y) pairs
    tree = ast.parse(path.read_text())
    names = {"check_module", "check_data", "check_reiterable", "is_pair", "named_parameters",
             "Module"}
    bad = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}" for node in ast.walk(tree)
           if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names]
    bad += [f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in names]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_the_core_imports_no_experiment_cli_or_benchmark(path):
    bad = layer_violations(path, NOT_IN_CORE)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_core_imports_no_private_name_of_another_module(path):
    # what one module needs of another is public; the old private module names stay only as
    # deprecated aliases for callers outside
    if path.name == "_utils.py":
        pytest.skip("a deprecated alias of a public module")
    bad = private_violations(path)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", CLIENTS, ids=lambda p: p.name)
def test_experiments_and_cli_import_no_private_name(path):
    bad = private_violations(path)
    assert not bad, "\n".join(bad)


def test_a_bad_import_is_reported_with_its_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    core = tmp_path / "python" / "ssse"
    core.mkdir(parents=True)
    bad = core / "metrics.py"
    bad.write_text("import torch\n\n\ndef f():\n    from .experiments.common import timed\n")
    client = core / "cli.py"
    client.write_text("from ssse.gradients import _grad_stream\nfrom ._utils import FlatModel\n"
                      "from .experiments.common import _private_helper\n")
    kernel = tmp_path / "ssse_ext" / "fisher.py"
    kernel.parent.mkdir()
    kernel.write_text("from ssse import metrics\n")
    assert layer_violations(bad, NOT_IN_CORE) == [
        "python/ssse/metrics.py:5 imports ssse.experiments"]
    assert private_violations(client) == [
        "python/ssse/cli.py:1 imports the private _grad_stream (from ssse.gradients)",
        "python/ssse/cli.py:2 imports the private _utils (from ssse._utils)"]
    assert layer_violations(kernel, ("ssse",)) == ["ssse_ext/fisher.py:1 imports ssse"]


def long_functions(path: Path, limit: int) -> list[str]:
    """``file:line name (n lines)`` for every function or method of ``path`` longer than
    ``limit`` lines of code: decorators included, the docstring not (a public function's
    arguments are documented where it is defined, however many it has)."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            n = node.end_lineno - first + 1
            doc = node.body[0] if node.body else None
            if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and \
                    isinstance(doc.value.value, str):
                n -= doc.end_lineno - doc.lineno + 1
            if n > limit:
                bad.append(f"{where(path, first)} {node.name} ({n} lines)")
    return bad


CORE_AND_EXPERIMENTS = CORE + sorted((ROOT / "python" / "ssse" / "experiments").glob("*.py"))


@pytest.mark.parametrize("path", CORE_AND_EXPERIMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_has_no_long_function_or_file(path):
    bad = long_functions(path, MAX_CLI_FUNCTION_LINES)
    lines = len(path.read_text().splitlines())
    if lines > MAX_CLI_FILE_LINES:
        bad.append(f"{path.relative_to(ROOT)} has {lines} lines")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", CLI, ids=lambda p: str(p.relative_to(ROOT / "python")))
def test_the_command_has_no_long_function_or_file(path):
    bad = long_functions(path, MAX_CLI_FUNCTION_LINES)
    assert not bad, "\n".join(bad)
    n = len(path.read_text().splitlines())
    assert n <= MAX_CLI_FILE_LINES, f"{path.relative_to(ROOT)} has {n} lines"


def test_a_long_function_is_reported_with_its_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    path = tmp_path / "long.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(4))
    path.write_text(f"import os\n\n\n@staticmethod\ndef f():\n{body}\n\ndef g():\n    pass\n")
    assert long_functions(path, 5) == ["long.py:4 f (6 lines)"]
    assert long_functions(path, 6) == []


#: The longest function and the longest file of the kernel layer.
MAX_KERNEL_FUNCTION_LINES = 80
MAX_KERNEL_FILE_LINES = 600


@pytest.mark.parametrize("path", KERNEL, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_kernel_layer_has_no_long_function_or_file(path):
    bad = long_functions(path, MAX_KERNEL_FUNCTION_LINES)
    assert not bad, "\n".join(bad)
    n = len(path.read_text().splitlines())
    assert n <= MAX_KERNEL_FILE_LINES, f"{path.relative_to(ROOT)} has {n} lines"


def test_a_torch_nn_import_in_the_kernel_layer_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    kernel = tmp_path / "ssse_ext" / "blocks" / "kfac.py"
    kernel.parent.mkdir(parents=True)
    kernel.write_text("import torch\nfrom torch import nn\n\n\ndef f():\n"
                      "    import torch.nn.functional as F\n")
    assert layer_violations(kernel, ("torch.nn",)) == [
        "ssse_ext/blocks/kfac.py:2 imports torch.nn",
        "ssse_ext/blocks/kfac.py:6 imports torch.nn"]
