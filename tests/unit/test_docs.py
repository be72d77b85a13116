"""Docs and docstrings cite only what is in the tree: repository paths that exist, kubetune names that import."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP = ("src", "tests", "components", "pipelines", "images", "manifests", "terraform", "benchmarks", "configs",
       "docs", "scripts", "mk", "requirements", "data")  # fmt: skip
# Paths the docs name on purpose that are not in a checkout: made by a command the same sentence gives, or a
# placeholder for the user's own file.
NOT_IN_TREE = {
    "terraform/envs/dev/terraform.tfvars",  # copied from terraform.tfvars.example by the user
    "terraform/envs/dev/backend.tf",  # copied from backend.tf.example by the user
    "configs/x.yaml",  # placeholder for the user's config
    "configs/lima/x.yaml",
}
PLACEHOLDER = re.compile(r"[A-Z]{2,}|<|\bx\.")  # terraform/envs/TF_ENV, manifests/overlays/ENV, ...

DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
SOURCES = sorted(
    p for d in ("src", "components", "pipelines", "benchmarks", "scripts") for p in (ROOT / d).rglob("*.py")
)
PATH = re.compile(r"(?<![\w/.-])((?:{})/[\w./*-]*\w)".format("|".join(TOP)))
# A dotted name in backticks (docs) or in a docstring role/literal (sources): `kubetune.x.y`, ``kubetune.x``.
NAME = re.compile(r"(?:`|:(?:mod|func|class|meth|attr|data):`~?)((?:kubetune|components|pipelines)(?:\.\w+)+)")


def _cited_paths(path: Path):
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for m in PATH.finditer(line):
            cited = m.group(1).rstrip(".")
            # a file (has an extension) or a nested folder; "data/pack counts" is prose, not a path
            if "." in cited.rsplit("/", 1)[-1] or cited.count("/") >= 2:
                yield lineno, cited


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _is_module(dotted: str) -> bool:
    top, _, rest = dotted.partition(".")
    first = rest.split(".")[0]
    base = ROOT / ("src/kubetune" if top == "kubetune" else top)
    return (base / f"{first}.py").is_file() or (base / first / "__init__.py").is_file()


@pytest.mark.parametrize("path", DOCS + SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_repository_paths_exist(path):
    missing = []
    for lineno, cited in _cited_paths(path):
        if cited in NOT_IN_TREE or PLACEHOLDER.search(cited):
            continue
        found = list(ROOT.glob(cited)) if "*" in cited else (ROOT / cited).exists()
        if not found:
            missing.append(f"{path.relative_to(ROOT)}:{lineno}: {cited}")
    assert not missing, "cited but not in the tree:\n" + "\n".join(missing)


@pytest.mark.parametrize("path", DOCS + SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_kubetune_names_import(path):
    """A name under a kubetune module must import; ``kubetune.<word>`` that is no module is an MLflow tag name
    (``kubetune.eval_loss``), and those have no second dot."""
    broken = []
    text = path.read_text(encoding="utf-8")
    for m in NAME.finditer(text):
        dotted = m.group(1)
        if (_is_module(dotted) or dotted.count(".") >= 2) and not dotted.endswith(".org") and not _resolves(dotted):
            broken.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {dotted}")
    assert not broken, "names that do not import:\n" + "\n".join(broken)


def test_the_checks_see_a_stale_citation(tmp_path):
    """The two checks above fail on a file that cites a moved module and a missing path."""
    stale = tmp_path / "stale.md"
    stale.write_text("See `kubetune.allocator.allocator_preload_env` and src/kubetune/allocator.py.\n")
    assert [c for _, c in _cited_paths(stale)] == ["src/kubetune/allocator.py"]
    assert not (ROOT / "src/kubetune/allocator.py").exists()
    assert not _resolves("kubetune.allocator.allocator_preload_env")
    assert _resolves("kubetune.cpu.allocator.allocator_preload_env")
