"""Nothing committed is ever overwritten by a command (issue 25). Every analysis writes to a new
folder under runs/ by default; a folder that already holds files (benchmarks/results/... in
particular) is refused unless --force; an output path that cannot be written is refused with one
line, before any work, leaving nothing behind."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import attention  # noqa: E402
import grad_cosines  # noqa: E402
import iem_analysis  # noqa: E402
import rgdt_analysis  # noqa: E402
import target_sweep  # noqa: E402
import tt_analysis  # noqa: E402

import common  # noqa: E402
import dt  # noqa: E402
import sample_complexity  # noqa: E402
import theory_mgf  # noqa: E402
import theory_tpg  # noqa: E402

COMMITTED = ROOT / "benchmarks" / "results"
IEM_SUMMARY = str(COMMITTED / "iem" / "summary.json")


def snapshot(folder: Path) -> dict:
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, hdf5_path):
    """A 3-update dt.py run, for the scripts that analyse checkpoints."""
    runs = tmp_path_factory.mktemp("ckpt")
    a = dt.Args(env="hopper-random", dataset_path=(str(hdf5_path),), updates=3, batch_size=4,
                n_embd=16, n_layer=1, n_head=1, context_len=4, eval_every=0, eval_episodes=1,
                runs_dir=str(runs))  # fmt: skip
    return Path(dt.train(a)["run_dir"])


@pytest.fixture
def torch_defaults():
    """theory_mgf's main() sets float64 for its eta^3 checks; the other tests must not inherit
    it."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


def tiny_runs(data: Path, ckpt: Path, out=None, **kw) -> dict:
    """Each script's smallest run, writing to `out` (None: its default). `data` holds
    hopper-random.hdf5, `ckpt` is a dt.py run for attention and target_sweep. The values are called
    only when picked."""
    hdf5 = str(data / "hopper-random.hdf5")
    tt_budget = dict(dt_updates=2, tt_updates=2, beam_width=2, horizon=1, eval_episodes=2,
                     eval_max_steps=6, error_episodes=2, error_steps=4, windows=2,
                     beam_widths=(1, 2), cost_reps=1)  # fmt: skip
    sizes = "--n-layer 1 --n-head 1 --n-embd 16 --batch-size 4"
    sc = dict(n_seeds=3, slack_seeds=5, slack_points=10)
    return {
        "iem_analysis": lambda: iem_analysis.main(
            iem_analysis.Args(
                quick=True, data_dir=str(data / "babyai"), attention_states=3, out=out, **kw
            )
        ),
        "tt_analysis": lambda: tt_analysis.main(
            tt_analysis.Args(
                env="hopper-random",
                dataset_path=hdf5,
                paper_speed=False,
                iem_summary=IEM_SUMMARY,
                out=out,
                **tt_budget,
                **kw,
            )
        ),
        "rgdt_analysis": lambda: rgdt_analysis.main(
            rgdt_analysis.Args(
                env="hopper-random",
                dataset_path=(hdf5,),
                updates=4,
                batch_size=8,
                log_every=2,
                out=out,
                **kw,
            )
        ),
        "attention": lambda: attention.main(
            attention.Args(runs=(f"dt={ckpt}",), eval_episodes=1, out=out, **kw)
        ),
        "target_sweep": lambda: target_sweep.main(
            target_sweep.Args(runs=(f"dt={ckpt}",), targets=(10.0,), eval_episodes=1, out=out, **kw)
        ),
        "grad_cosines": lambda: grad_cosines.main(
            grad_cosines.Args(
                method="trdt",
                env="hopper-random",
                dataset_path=(hdf5,),
                updates=2,
                every=1,
                sizes=sizes,
                out=out,
                **kw,
            )
        ),
        "theory_mgf": lambda: theory_mgf.main(theory_mgf.Args(quick=True, out_dir=out or "", **kw)),
        "theory_tpg": lambda: theory_tpg.main(
            theory_tpg.Args(steps=10, trials=1, seed=0, out_dir=out, **kw)
        ),
        "sample_complexity": lambda: sample_complexity.main(
            sample_complexity.Args(**sc, out_dir=out, **kw)
        ),
    }


# The new folder each script makes under runs/ by default: runs/{prefix}__{unix time}
PREFIX = {
    "iem_analysis": "iem_analysis_quick",
    "tt_analysis": "tt_analysis",
    "rgdt_analysis": "rgdt_analysis",
    "attention": "attention",
    "target_sweep": "target_sweep",
    "grad_cosines": "grad_cosines__trdt__joint__0",
    "theory_mgf": "theory_mgf__1",
    "theory_tpg": "theory_tpg__0",
    "sample_complexity": "sample_complexity__0",
}


@pytest.fixture
def data(tmp_path, hdf5_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "hopper-random.hdf5").write_bytes(hdf5_path.read_bytes())
    return d


@pytest.mark.parametrize("script", list(PREFIX))
def test_a_default_run_writes_only_a_new_folder_under_runs(
    script, tmp_path, data, checkpoint, monkeypatch, torch_defaults
):
    """Run from a fresh working folder, as a newcomer runs the README's commands from a clone: all
    the run writes lies under runs/, its outputs in a new runs/{prefix}__{time}; nothing committed
    changes."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    committed = snapshot(COMMITTED)
    monkeypatch.chdir(cwd)
    tiny_runs(data, checkpoint)[script]()
    assert [p.name for p in cwd.iterdir()] == ["runs"]
    prefix = PREFIX[script]
    made = [p for p in (cwd / "runs").iterdir() if p.name.startswith(prefix + "__")]
    assert len(made) == 1 and made[0].name[len(prefix) + 2 :].isdigit() and any(made[0].iterdir())
    assert snapshot(COMMITTED) == committed


@pytest.fixture
def dummy(tmp_path):
    """Inputs that pass each script's own checks but are never read: the output folder comes
    first."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "hopper-random.hdf5").write_bytes(b"not read")
    (d / "model.pt").write_bytes(b"not read either")
    return d


@pytest.mark.parametrize("script", list(PREFIX))
def test_a_folder_that_holds_files_is_refused_without_force(
    script, tmp_path, dummy, torch_defaults
):
    out = tmp_path / "results"
    out.mkdir()
    (out / "summary.json").write_text("committed")
    with pytest.raises(
        SystemExit,
        match=rf"^error: --out(-dir)? {out}: the folder exists and holds files; .*--force",
    ):
        tiny_runs(dummy, dummy, str(out))[script]()
    assert [p.name for p in out.iterdir()] == ["summary.json"] and (
        out / "summary.json"
    ).read_text() == "committed"


@pytest.mark.parametrize("script", ["iem_analysis", "theory_tpg", "sample_complexity"])
def test_force_writes_into_a_folder_that_holds_files(script, tmp_path, data, torch_defaults):
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("someone else's")
    (out / "summary.json").write_text("{}")
    tiny_runs(data, None, str(out), force=True)[script]()
    assert (out / "keep.txt").read_text() == "someone else's" and (
        out / "summary.json"
    ).read_text() != "{}"


def unwritable(tmp_path) -> Path:
    """A place no folder can be made: a read-only folder, or /proc for root (who ignores the
    bits)."""
    if os.geteuid() == 0:
        return Path("/proc/seqrl-no-such-folder/out")
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o500)
    return ro / "out"


@pytest.mark.parametrize(
    "script", ["theory_mgf", "theory_tpg", "sample_complexity", "iem_analysis", "grad_cosines"]
)
@pytest.mark.parametrize("case", ["under a file", "unwritable"])
def test_an_output_path_that_cannot_be_made_is_one_line(
    script, case, tmp_path, dummy, torch_defaults
):
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "a-file" / "out" if case == "under a file" else unwritable(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    message = (
        "is a file, so no folder can be made under it"
        if case == "under a file"
        else "cannot write in"
    )
    with pytest.raises(SystemExit, match=rf"^error: --out(-dir)? {out}: .*{message}"):
        tiny_runs(dummy, dummy, str(out))[script]()
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("case", ["existing", "under a file", "unwritable"])
def test_sample_complexity_exits_non_zero_on_a_bad_out_dir(case, tmp_path):
    """From the shell: one line on stderr, no traceback, a non-zero exit status, nothing made."""
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "summary.json").write_text("{}")
    (tmp_path / "a-file").write_text("x")
    out = {"existing": tmp_path / "existing", "under a file": tmp_path / "a-file" / "out"}.get(case)
    out = out or unwritable(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    cmd = [sys.executable, str(ROOT / "sample_complexity.py"), "--out-dir", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode != 0 and res.stderr.startswith(f"error: --out-dir {out}: ")
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_the_output_folder_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = common.output_folder(None, "x_analysis")
    assert (
        default.parent == Path("runs")
        and default.name.startswith("x_analysis__")
        and not default.exists()
    )
    (tmp_path / "empty").mkdir()
    # an empty folder holds nothing to overwrite
    assert common.output_folder("empty", "x") == Path("empty")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.png").write_bytes(b"")
    with pytest.raises(SystemExit, match="^error: --where full: the folder exists and holds files"):
        common.output_folder("full", "x", flag="--where")
    assert common.output_folder("full", "x", force=True) == Path("full")
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit, match="^error: --out f: is a file, not a folder"):
        common.output_folder("f", "x")
    with pytest.raises(
        SystemExit, match="^error: --out f/a/b: f is a file, so no folder can be made under it"
    ):
        common.output_folder("f/a/b", "x")
    with pytest.raises(SystemExit, match="cannot write in"):
        common.output_folder(str(unwritable(tmp_path)), "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "f", "full"] + (
        ["read-only"] if os.geteuid() else []
    )
