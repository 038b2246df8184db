"""The README's commands are what a reader runs first: every script they name exists, and every flag
they pass is one that script's --help lists (a renamed or removed flag must take the README with
it)."""

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = re.findall(r"^\s*python3? (\S+\.py)(.*)$", (ROOT / "README.md").read_text(), re.M)


@functools.cache
def help_text(script: str) -> str:
    env = dict(os.environ, COLUMNS="200")
    out = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, f"{script} --help failed:\n{out.stderr[-2000:]}"
    return out.stdout


def test_the_readme_has_commands():
    assert len(COMMANDS) >= 20 and {"dt.py", "mo_dt.py", "trdt.py", "rgdt.py"} <= {
        s for s, _ in COMMANDS
    }


@pytest.mark.parametrize("script", sorted({s for s, _ in COMMANDS}))
def test_readme_commands_use_flags_the_script_has(script):
    assert (ROOT / script).is_file(), f"the README runs {script}, which does not exist"
    flags = {
        f
        for s, rest in COMMANDS
        if s == script
        for f in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest.split("#")[0])
    }
    text = help_text(script)
    unknown = sorted(f for f in flags if f not in text and f.replace("--no-", "--", 1) not in text)
    assert not unknown, f"the README passes {unknown} to {script}, whose --help does not list them"
