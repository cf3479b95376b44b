"""Every file the overlay copies into ORION must run in ORION's environment.

ORION pins Python 3.8 (its README: ``conda create -n orion python=3.8``) and has no
mmengine. For each Python file of the plugin manifest, plus the installer that
may run under ORION's interpreter, this checks: vermin finds nothing newer
than 3.8; a real Python 3.8 compiles it (when pyenv has one); modern
annotations (PEP 585 ``list[int]``, PEP 604 ``X | None``) only appear under
``from __future__ import annotations`` and never in run-time expressions; and
nothing imports mmengine. A manifest file not written yet is skipped.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tools import plugin_manifest as manifest  # noqa: E402

PY38 = Path("/root/.pyenv/versions/3.8.18/bin/python")
#: Files that may run under ORION's interpreter without being copied into ORION.
INSTALLER_FILES = ["tools/plugin_manifest.py", "tools/install_into_orion.py"]
PY_FILES = manifest.plugin_python_files() + INSTALLER_FILES
BUILTIN_GENERICS = {"list", "dict", "set", "frozenset", "tuple", "type"}
BUILTIN_TYPES = BUILTIN_GENERICS | {"int", "float", "str", "bytes", "bool", "complex", "object"}


def existing(rel: str) -> Path:
    """The repository file ``rel``, skipping the test while it is not written yet."""
    path = REPO_ROOT / rel
    if not path.is_file():
        pytest.skip("not written yet: {}".format(rel))
    return path


def parse(path: Path) -> ast.Module:
    """The file's syntax tree (parsed by the running interpreter)."""
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def annotations(tree: ast.AST) -> Iterator[ast.expr]:
    """Every annotation expression: arguments, returns and annotated assignments."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for arg in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
                if arg is not None and arg.annotation is not None:
                    yield arg.annotation
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, ast.AnnAssign):
            yield node.annotation


def modern_typing(expr: ast.AST) -> Optional[str]:
    """Describe the first PEP 585 / PEP 604 construct in ``expr`` (None if there is none)."""
    for node in ast.walk(expr):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) \
                and node.value.id in BUILTIN_GENERICS:
            return "{}[...] (PEP 585)".format(node.value.id)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return "X | Y (PEP 604)"
    return None


def has_future_annotations(tree: ast.Module) -> bool:
    """Whether the module starts with ``from __future__ import annotations``."""
    return any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
               and any(alias.name == "annotations" for alias in node.names) for node in tree.body)


def runtime_modern_typing(tree: ast.Module) -> List[str]:
    """PEP 585/604 constructs evaluated at run time (outside annotations): errors on 3.8."""
    in_annotation = {id(sub) for ann in annotations(tree) for sub in ast.walk(ann)}
    found = []
    for node in ast.walk(tree):
        if id(node) in in_annotation:
            continue
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) \
                and node.value.id in BUILTIN_GENERICS:
            found.append("line {}: {}[...]".format(node.lineno, node.value.id))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            sides = [node.left, node.right]
            if any((isinstance(s, ast.Constant) and s.value is None)
                   or (isinstance(s, ast.Name) and s.id in BUILTIN_TYPES) for s in sides):
                found.append("line {}: X | Y between types".format(node.lineno))
    return found


def mmengine_imports(tree: ast.Module) -> List[str]:
    """Lines that import mmengine (statements, ``__import__`` or ``import_module`` with a literal)."""
    def is_mmengine(name: Optional[str]) -> bool:
        return bool(name) and (name == "mmengine" or name.startswith("mmengine."))

    found = []
    for node in ast.walk(tree):
        names = []  # type: List[Optional[str]]
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if fname in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += ["line {}: {}".format(node.lineno, n) for n in names if is_mmengine(n)]
    return found


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("rel", PY_FILES)
def test_vermin_finds_nothing_newer_than_python38(rel: str) -> None:
    path = existing(rel)
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from vermin import main; sys.exit(main())",
         "-t=3.8-", "--no-tips", "--violations", "--processes=1", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
    assert proc.returncode == 0, "vermin: {} needs a Python newer than 3.8:\n{}".format(rel, proc.stdout)


@pytest.mark.skipif(not PY38.exists(), reason="no Python 3.8 at {}".format(PY38))
@pytest.mark.parametrize("rel", PY_FILES)
def test_python38_compiles_it(rel: str, tmp_path: Path) -> None:
    path = existing(rel)
    proc = subprocess.run(
        [str(PY38), "-c", "import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True)",
         str(path), str(tmp_path / "out.pyc")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    assert proc.returncode == 0, "Python 3.8 cannot compile {}:\n{}".format(rel, proc.stdout)


@pytest.mark.parametrize("rel", PY_FILES)
def test_modern_annotations_need_future_import(rel: str) -> None:
    tree = parse(existing(rel))
    if has_future_annotations(tree):
        return
    found = ["line {}: {}".format(ann.lineno, modern_typing(ann)) for ann in annotations(tree) if modern_typing(ann)]
    assert not found, "{} uses modern annotations without `from __future__ import annotations`: {}".format(
        rel, "; ".join(found))


@pytest.mark.parametrize("rel", PY_FILES)
def test_no_modern_typing_evaluated_at_run_time(rel: str) -> None:
    found = runtime_modern_typing(parse(existing(rel)))
    assert not found, "{} evaluates PEP 585/604 types at run time (fails on 3.8): {}".format(
        rel, "; ".join(found))


@pytest.mark.parametrize("rel", PY_FILES)
def test_does_not_import_mmengine(rel: str) -> None:
    found = mmengine_imports(parse(existing(rel)))
    assert not found, "{} imports mmengine, which ORION does not have (import from mmcv instead): {}".format(
        rel, "; ".join(found))


def test_checks_catch_what_they_claim(tmp_path: Path) -> None:
    """The AST checks flag each construct they exist for, and accept the 3.8-safe forms."""
    bad = ast.parse("import mmengine.registry\nfrom mmengine import Config\n"
                    "A = list[int]\nB = int | None\ndef f(x: dict[str, int]) -> int | None: ...\n")
    assert len(mmengine_imports(bad)) == 2
    assert len(runtime_modern_typing(bad)) == 2
    assert not has_future_annotations(bad) and len([a for a in annotations(bad) if modern_typing(a)]) == 2
    good = ast.parse("from __future__ import annotations\nfrom typing import List\nA = List[int]\n"
                     "FLAGS = 1 | 2\ndef f(x: dict[str, int]) -> int | None: ...\n")
    assert has_future_annotations(good) and runtime_modern_typing(good) == [] and mmengine_imports(good) == []
