"""Imports run one way: kernels <- core <- train, eval <- the CLI module.

Every module of ``spiking_lm/``, ``kernels/``, ``train/`` and ``eval/`` is parsed (not imported), and each
``import``, ``from ... import`` (relative ones resolved) and ``importlib.import_module``/``__import__`` of a
literal string is checked against the layering:

- ``kernels/`` (``spiking_lm.kernels``) imports nothing from ``spiking_lm``;
- the core (``spiking_lm.*``) never imports ``train``, ``eval`` or the CLI, and imports ``kernels`` only from
  the neuron and attention APIs (``KERNEL_DISPATCH``);
- ``train/`` and ``eval/`` import only the core (and themselves), never each other or ``kernels``, except the eval
  tool that compiles the kernels' launched builds (``KERNEL_INSPECTION``);
- ``spiking_lm.cli`` sits on top and may import anything; nothing imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the import name it installs as (pyproject's package-dir).
FOLDERS = {
    "spiking_lm": "spiking_lm",
    "kernels": "spiking_lm.kernels",
    "train": "spiking_lm.train",
    "eval": "spiking_lm.eval",
}
TOP = "spiking_lm.cli"
# The core modules that may dispatch to the kernels: the neuron and attention APIs.
KERNEL_DISPATCH = {"spiking_lm.lif", "spiking_lm.attention", "spiking_lm.model"}
# The attention reference shares its constants with the kernels (kernels/constants.py imports nothing).
KERNEL_CONSTANTS = {"spiking_lm.kernels.constants.ROW_MAX_CURRENT"}
# eval modules that may import the kernels: the one that records their launches and compiles them offline.
KERNEL_INSPECTION = {"spiking_lm.eval.kernel_builds"}
ALLOWED = {
    "kernels": {"kernels"},
    "core": {"core"},
    "train": {"core", "train"},
    "eval": {"core", "eval"},
    "top": {"core", "kernels", "train", "eval"},
}


def layer(module: str) -> str | None:
    """The layer an import name belongs to; None outside spiking_lm (third-party or standard library)."""
    if module == TOP or module.startswith(TOP + "."):
        return "top"
    for sub in ("kernels", "train", "eval"):
        if module == f"spiking_lm.{sub}" or module.startswith(f"spiking_lm.{sub}."):
            return sub
    return "core" if module == "spiking_lm" or module.startswith("spiking_lm.") else None


def module_name(path: Path) -> str:
    """``eval/sweep.py`` -> ``spiking_lm.eval.sweep``; a package's ``__init__.py`` -> the package."""
    folder, *parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([FOLDERS[folder], *parts])


def _absolute(name: str | None, level: int, importer: str, is_package: bool) -> str:
    """The absolute name of a (possibly relative) import in module ``importer``."""
    if not level:
        return name or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - level + 1]
    return ".".join([*base, name] if name else base)


def imported_names(source: str, importer: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module or ``module.attribute``) of every import in ``source``, literal importlib strings too."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node.module, node.level, importer, is_package)
            # `from spiking_lm import train` imports the subpackage: keep the attribute in the name.
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                package = next(
                    (k.value.value for k in node.keywords if k.arg == "package" and isinstance(k.value, ast.Constant)),
                    None,
                )
                level = len(first.value) - len(first.value.lstrip("."))
                name = first.value.lstrip(".")
                found.append((node.lineno, _absolute(name, level, package or importer, package is not None)))
    return found


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("__import__", "import_module")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def violations(source: str, importer: str, is_package: bool = False) -> list[str]:
    """Each import in ``source`` that runs upward or sideways from module ``importer``."""
    own = layer(importer)
    bad = []
    for line, name in imported_names(source, importer, is_package):
        target = layer(name)
        dispatch = own == "core" and target == "kernels" and (importer in KERNEL_DISPATCH or name in KERNEL_CONSTANTS)
        inspection = target == "kernels" and importer in KERNEL_INSPECTION
        if target is None or target in ALLOWED[own] or dispatch or inspection:
            continue
        bad.append(f"{importer}:{line} imports {name} ({own} -> {target})")
    return bad


def modules() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py") if "results" not in p.parts)


def test_every_import_runs_downward():
    paths = modules()
    assert {module_name(p) for p in paths} >= {
        TOP,
        "spiking_lm.lif",
        "spiking_lm.kernels.lif",
        "spiking_lm.train.cli",
        "spiking_lm.eval.sweep",
    }
    bad = [v for p in paths for v in violations(p.read_text(), module_name(p), p.name == "__init__.py")]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "importer, source",
    [
        ("spiking_lm.eval.report", "from spiking_lm.train.logger import wandb_offline"),
        ("spiking_lm.eval.report", "from ..train import logger"),
        ("spiking_lm.eval.sweep", "import spiking_lm.train.cli"),
        ("spiking_lm.train.cli", "def f():\n    importlib.import_module('spiking_lm.eval.sweep')"),
        ("spiking_lm.train.cli", "__import__('spiking_lm.eval')"),
        ("spiking_lm.train.cli", "import_module('.sweep', package='spiking_lm.eval')"),
        ("spiking_lm.kernels.lif", "from spiking_lm.lif_reference import DEFAULT_ALPHA"),
        ("spiking_lm.kernels", "from .. import lif"),
        ("spiking_lm.data", "from spiking_lm import train"),
        ("spiking_lm.data", "from spiking_lm.kernels.lif import lif_triton"),
        ("spiking_lm.model", "from spiking_lm.cli import main"),
        ("spiking_lm.train.module", "from spiking_lm.kernels import lif"),
        ("spiking_lm.eval.kernel_resources", "import spiking_lm.kernels"),
    ],
)
def test_upward_and_sideways_imports_are_caught(importer, source):
    assert violations(source, importer, is_package=importer == "spiking_lm.kernels")


@pytest.mark.parametrize(
    "importer, source",
    [
        ("spiking_lm.lif", "from spiking_lm.kernels.lif import lif_triton"),
        (
            "spiking_lm.eval.report",
            "from spiking_lm.eval import plots\nfrom spiking_lm.wandb_mode import wandb_offline",
        ),
        ("spiking_lm.train.cli", "from .module import LitLM\nimport importlib\nimportlib.import_module(name)"),
        ("spiking_lm.cli", "from spiking_lm.train import generate\nfrom spiking_lm.eval import sweep"),
        ("spiking_lm.kernels.lif", "import triton.language as tl\nfrom . import lif"),
        ("spiking_lm.eval.kernel_builds", "import spiking_lm.kernels"),
    ],
)
def test_downward_imports_pass(importer, source):
    assert violations(source, importer) == []
