"""The single-file design repeats some code on purpose; a repeated block must stay the same, byte
for byte, in every method file that has it (dt.py -> mo_dt.py -> trdt.py are diffs of each other),
so that a fix reaches all copies."""

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD_FILES = ["dt.py", "mo_dt.py", "trdt.py", "rgdt.py", "tt.py", "iem.py"]
# Plumbing and shared ideas: wherever a method file defines one of these names, it is dt.py's code.
LIKE_DT = [
    "check_flags", "setup", "bf16_native", "load_checkpoint", "load_data", "make_run_dir",
    "log_metrics", "git_commit", "make_eval_envs", "returns_to_go", "masked_mean",
    "bounded_log_std", "head_loss", "start_tracking", "finish_tracking",
    # runs that survive: signals, atomic checkpoints, exact resume
    "catch_stop_signals", "restore_signals", "signals_deferred", "save_atomic", "training_state",
    "restore_training_state", "resumed_args", "trim_metrics", "save_due", "stop_message",
    "log_losses", "record_config", "fit_weights",
    # honest timing (issue 28 item 4): one wait for the device per measured interval
    "wait_for", "run_timing",
]  # fmt: skip
# The model and batch blocks of the Chapter 1 siblings, and the pieces only two of them share.
SAME = {
    ("dt.py", "mo_dt.py", "trdt.py"): [
        "dropout",
        "own_masks",
        "Dropout",
        "SelfAttention",
        "Block",
        "attention_mask",
        "sample_batch",
        "act",
        # the Chapter 1 siblings' run plumbing
        "open_run",
        "start_run",
        "read_inputs",
        "load_weights",
        "announce",
        "log_score",
        "checkpoint_frame",
        "make_checkpoint",
        "stops_reported",
    ],
    ("mo_dt.py", "trdt.py"): ["Lamb", "make_optimizer", "update"],
    ("dt.py", "rgdt.py"): ["make_optimizer"],
    ("dt.py", "mo_dt.py", "trdt.py", "rgdt.py", "iem.py"): ["Stopwatch"],  # tt.py times its own way
    ("dt.py", "mo_dt.py", "trdt.py", "iem.py"): ["compiled_update"],
}


@functools.cache
def blocks(path: Path) -> dict:
    """Top-level functions and classes of a file: name -> exact source text."""
    text = path.read_text()
    tree = ast.parse(text)
    return {
        n.name: ast.get_source_segment(text, n)
        for n in tree.body
        if isinstance(n, (ast.FunctionDef, ast.ClassDef))
    }


def existing(files):
    return [f for f in files if (ROOT / f).exists()]


@pytest.mark.parametrize("name", LIKE_DT)
def test_plumbing_is_dt_pys_wherever_it_appears(name):
    reference = blocks(ROOT / "dt.py")[name]
    users = [f for f in existing(METHOD_FILES[1:]) if name in blocks(ROOT / f)]
    assert users or name in ("make_eval_envs",), f"{name} is used by dt.py only: not a shared block"
    for f in users:
        assert blocks(ROOT / f)[name] == reference, (
            f"{f}'s {name} differs from dt.py's: change both, or rename it"
        )


@pytest.mark.parametrize(
    "files, name", [(files, name) for files, names in SAME.items() for name in names]
)
def test_sibling_blocks_are_identical(files, name):
    sources = {f: blocks(ROOT / f).get(name) for f in existing(files)}
    assert all(sources.values()), (
        f"{name} missing in {[f for f, s in sources.items() if s is None]}"
    )
    assert len(set(sources.values())) == 1, f"{name} differs between {', '.join(sources)}"


def diff_lines(a: str, b: str) -> int:
    import difflib

    lines = difflib.unified_diff(
        (ROOT / a).read_text().splitlines(), (ROOT / b).read_text().splitlines(), n=0
    )
    return sum(1 for line in lines if line[:1] in "+-" and not line.startswith(("+++", "---")))


def test_siblings_are_readable_diffs():
    """trdt.py is mo_dt.py plus action regions, mo_dt.py is dt.py plus heads (issue 14's
    targets)."""
    assert diff_lines("mo_dt.py", "trdt.py") <= 150
    assert diff_lines("dt.py", "mo_dt.py") <= 250


def test_method_files_stand_alone():
    for f in existing(METHOD_FILES):
        text = (ROOT / f).read_text()
        assert "../shared" not in text, f"{f} mentions the workspace's ../shared"
        assert "import benchmarks" not in text and "from benchmarks" not in text, (
            f"{f} imports benchmarks/"
        )
