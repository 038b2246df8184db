"""The reader's layout of the method files (issue 29): the method first, in the same named steps in
every sibling, with the run infrastructure under one banner below `train`; short functions and
lines everywhere a reader goes (the top-level files and benchmarks/)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD_FILES = ["dt.py", "mo_dt.py", "trdt.py", "rgdt.py", "tt.py", "iem.py"]
BANNER = "# --- PLUMBING"
READ_FILES = sorted(ROOT.glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))


def functions(path: Path) -> list:
    tree = ast.parse(path.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def length(node) -> int:
    return node.end_lineno - node.lineno + 1


def top_level(path: Path) -> dict:
    tree = ast.parse(path.read_text())
    return {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("name", METHOD_FILES)
def test_one_plumbing_banner_below_train(name):
    lines = (ROOT / name).read_text().splitlines()
    banners = [i + 1 for i, line in enumerate(lines) if line.startswith(BANNER)]
    assert len(banners) == 1, f"{name}: {len(banners)} PLUMBING banners, expected one"
    train = top_level(ROOT / name)["train"]
    assert banners[0] > train.end_lineno, f"{name}: the banner (line {banners[0]}) is above train"


@pytest.mark.parametrize("name", METHOD_FILES)
def test_the_same_steps_in_every_sibling(name):
    defs = top_level(ROOT / name)
    steps = ["sample_batch", "update", "evaluate", "train"]
    steps += ["act"] if name in ("dt.py", "mo_dt.py", "trdt.py", "rgdt.py") else ["plan"]
    missing = [s for s in steps if s not in defs]
    assert not missing, f"{name} lacks {missing}"
    assert length(defs["train"]) <= 60, (
        f"{name}: train is {length(defs['train'])} lines (at most 60)"
    )


@pytest.mark.parametrize("name", METHOD_FILES)
def test_no_analysis_hooks_in_the_model_path(name):
    text = (ROOT / name).read_text()
    for word in ("return_attn", "recorder"):
        assert text.count(word) == 0, (
            f"{name} still has {word}: benchmarks/ capture attention with hooks"
        )


@pytest.mark.parametrize("path", READ_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_over_80_lines(path):
    long = [(f.name, length(f)) for f in functions(path) if length(f) > 80]
    assert not long, f"{path.name}: functions over 80 lines: {long}"
