"""benchmarks/run.py continues a job that stopped half way instead of starting it over (issue 24,
item 5): locally and under --ray, the job's run goes on from its last checkpoint to the result it
would have had."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from resume_check import without_timing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import run  # noqa: E402

# A preset of one job per method, long enough to be stopped half way, short enough for a test.
# fmt: skip
PRESET = dict(
    datasets=["hopper-medium-replay"],
    seeds=[0],
    common=["--eval-episodes", "1", "--eval-every", "300", "--log-every", "50"],
    flags={
        "bc": ["--updates", "1000", "--hidden", "16", "--batch-size", "8"],
        "dt": [
            "--updates",
            "600",
            "--n-layer",
            "1",
            "--n-head",
            "1",
            "--n-embd",
            "16",
            "--batch-size",
            "4",
            "--context-len",
            "5",
            "--warmup-steps",
            "10",
        ],
    },
)
UPDATES = {"bc": 1000, "dt": 600}


def use_preset(m: pytest.MonkeyPatch, root: Path, data: Path):
    """The test preset in run.PRESETS, reading `data`; returns the Args of one method's job."""
    m.setitem(run.PRESETS, "resume-test", PRESET)
    m.setattr(run, "source_hash", lambda script: "code")  # others may edit the code meanwhile
    return lambda method, out, **kw: run.Args(
        preset="resume-test",
        data_dir=str(data),
        out=str(root / out),
        methods=(method,),
        jobs=1,
        **kw,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory, hdf5_path):
    """One data folder for every job here: its path is part of each job's command, hence of its
    key."""
    folder = tmp_path_factory.mktemp("data")
    shutil.copy(hdf5_path, folder / "hopper-medium-replay.hdf5")
    return folder


@pytest.fixture
def preset(tmp_path, data, monkeypatch):
    return use_preset(monkeypatch, tmp_path, data)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, data):
    """The job of each method run once without a stop (the reference), shared by the tests of this
    file."""
    root, done = tmp_path_factory.mktemp("whole"), {}

    def get(method: str) -> run.Args:
        with pytest.MonkeyPatch.context() as m:
            args = use_preset(m, root, data)(method, "whole")
            if method not in done:
                done[method] = run.main(args)
        return args

    return get


def stop_after_first_checkpoint(cmd, cwd, log, env):
    """run.job_process: the job runs until its first checkpoint is on disk, then gets SIGTERM (the
    job alone, as from a cluster's time limit); its exit code."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
    runs, deadline = Path(cmd[cmd.index("--runs-dir") + 1]), time.time() + 180
    try:
        while not list(runs.glob("*/model.pt")):
            assert proc.poll() is None and time.time() < deadline, (
                "the job ended before its first checkpoint"
            )
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()


def metric_lines(path: Path) -> list[dict]:
    return [without_timing(json.loads(line)) for line in path.read_text().splitlines()]


def stop_a_job(args: run.Args, monkeypatch) -> tuple[Path, list[dict], int]:
    """Run the preset with its job stopped half way; returns the job's stopped run, its metrics
    lines at the checkpoint, and the updates the checkpoint holds."""
    import torch

    with monkeypatch.context() as m:
        m.setattr(run, "job_process", stop_after_first_checkpoint)
        with pytest.raises(SystemExit, match="1 job"):
            run.main(args)
    (job,) = run.plan(args)
    (stopped,) = (job["folder"] / "runs").iterdir()
    assert not run.is_done(job) and not (stopped / "results.json").exists()
    state = torch.load(stopped / "model.pt", weights_only=True)["resume"]
    assert "interrupted (SIGTERM)" in (job["folder"] / "log.txt").read_text()
    return (
        stopped,
        metric_lines(stopped / "metrics.jsonl")[: state["metrics_lines"]],
        state["updates_done"],
    )


def assert_continued(
    args: run.Args, stopped: Path, before: list[dict], done: int, whole: run.Args
) -> dict:
    """The job finished in the run it had begun, from its checkpoint: its metrics start with the
    stopped run's lines, write no step twice, and equal those of the same job never stopped."""
    (job,) = run.plan(args)
    assert run.is_done(job) and [p.name for p in (job["folder"] / "runs").iterdir()] == [
        stopped.name
    ]
    log = (job["folder"] / "log.txt").read_text()
    # the second attempt's command (a Ray node's paths)
    resumed_with = log.split("\n$ ")[2].split("\n")[0]
    assert (
        log.count("\n$ ") == 2
        and "--resume " in resumed_with
        and resumed_with.endswith(stopped.name)
    )
    lines = metric_lines(job["folder"] / "metrics.jsonl")
    assert lines[: len(before)] == before and len(lines) > len(before)
    kinds = [(x["step"], "eval_normalized" in x) for x in lines]
    assert len(kinds) == len(set(kinds)), "a step was written twice"
    res = json.loads((job["folder"] / "results.json").read_text())
    assert res["trained_updates"] == res["updates"] == UPDATES[job["method"]]
    assert [r["at_update"] for r in res["resumed"]] == [done] and 0 < done < res["updates"]
    (never_stopped,) = run.plan(whole)  # the same folder name: the same command and code key
    assert never_stopped["folder"].name == job["folder"].name
    # not started over: the same run
    assert lines == metric_lines(never_stopped["folder"] / "metrics.jsonl")
    return res


@pytest.mark.parametrize("method", ["bc", "dt"])
def test_a_stopped_job_continues_from_its_checkpoint_when_the_preset_is_rerun(
    preset, whole, monkeypatch, method
):
    args = preset(method, "out")
    stopped, before, done = stop_a_job(args, monkeypatch)
    run.main(run.Args(**{**vars(args), "dry_run": True}))
    finished = run.main(args)
    assert len(finished) == 1 and finished[0]["ok"]
    res = assert_continued(args, stopped, before, done, whole(method))
    assert run.main(args) == []  # finished: nothing runs again
    # equal bit for bit at the precision the job took: bf16 where native or forced (CI's
    if method == "dt":
        import torch  # second pass), fp32 elsewhere; no tolerance either way

        import dt

        assert (
            res["bf16"]
            == dt.bf16_native(torch.device("cpu"))
            == res["benchmark"]["machine"]["bf16"]
        )


DRIVER = """
import sys
sys.path.insert(0, "benchmarks")
import run
flags = ["--updates", "1000000", "--n-layer", "1", "--n-head", "1", "--n-embd", "16",
         "--batch-size", "4", "--context-len", "5", "--warmup-steps", "10", "--log-every", "1"]
run.PRESETS["signal-test"] = dict(datasets=["hopper-medium-replay"], seeds=[0],
                                 common=["--eval-episodes", "1", "--eval-every", "0"],
                                 flags={"dt": flags})
run.main(run.Args(preset="signal-test", data_dir=sys.argv[1], out=sys.argv[2], methods=("dt",),
                  jobs=1))
"""


def alive(marker: str) -> list[str]:
    """Command lines of the processes on this machine that contain `marker`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found += [text] if marker in text else []
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="lists processes through /proc")
@pytest.mark.parametrize("to", ["run.py alone", "its process group"])
def test_a_stop_signal_to_run_py_stops_its_jobs_with_a_checkpoint(to, data, tmp_path):
    """SIGTERM sent to run.py alone (`kill PID`, a container's PID 1) reaches its running job, which
    saves a checkpoint and exits, instead of running on unwatched; sent to the whole process group
    the job gets two copies and still stops once, cleanly. Either way the next run continues it."""
    out = tmp_path / "out"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(data), str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group: killpg reaches it and its job, not pytest
    )
    deadline = time.time() + 180
    try:
        # the job is training: its metrics log has an update's line
        while not any('"loss"' in m.read_text() for m in out.glob("*/runs/*/metrics.jsonl")):
            assert driver.poll() is None and time.time() < deadline, driver.communicate()
            time.sleep(0.1)
        if to == "run.py alone":
            os.kill(driver.pid, signal.SIGTERM)
        else:
            os.killpg(driver.pid, signal.SIGTERM)
        _, err = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode != 0 and "interrupted: finished jobs are kept" in err, err
    (folder,) = out.iterdir()
    assert not alive(str(folder)), "a job outlived run.py"
    log = (folder / "log.txt").read_text()
    assert log.count("interrupted (SIGTERM)") == 1 and "Traceback" not in log, log
    (stopped,) = (folder / "runs").iterdir()
    assert (stopped / "model.pt").is_file() and not (stopped / "results.json").exists()
    job = dict(folder=folder, cmd=["dt.py"])
    assert run.stopped_run(job) == stopped  # the next run of the preset continues it


def test_a_method_file_without_resume_starts_over(preset, monkeypatch, tmp_path):
    """A stopped run of a script that has no --resume (an older method file) is left alone: a new
    run."""
    args = preset("bc", "out")
    (job,) = run.plan(args)
    old = job["folder"] / "runs" / "old"
    old.mkdir(parents=True)
    (old / "model.pt").write_bytes(b"x")
    (old / "config.json").write_text("{}")
    assert run.stopped_run(job) == old
    script = tmp_path / "code" / "benchmarks" / "bc.py"
    script.parent.mkdir(parents=True)
    script.write_text("class Args:\n    updates: int = 1\n")
    assert run.stopped_run(job, root=tmp_path / "code") is None
    assert run.takes_resume(ROOT / "dt.py") and run.takes_resume(ROOT / "benchmarks" / "bc.py")


def test_a_ray_task_gets_the_stopped_run_continues_it_and_sends_it_back(preset, whole, monkeypatch):
    """ray_job and land, called directly (no cluster): the task is given the stopped run's files,
    continues the run in its scratch folder, and what it sends back lands as the job's finished
    folder."""
    args = preset("bc", "out")
    stopped, before, done = stop_a_job(args, monkeypatch)
    (job,) = run.plan(args)
    shipped = run.stopped_run_files(job)
    assert f"runs/{stopped.name}/model.pt" in shipped and not any(
        k.endswith(".tmp") for k in shipped
    )
    r, files = run.ray_job(job, 1, shipped)
    assert (
        r["ok"]
        and f"runs/{stopped.name}/results.json" in files
        and "--resume" in files["log.txt"].decode()
    )
    assert run.land(job, r, files, "abc", "auto")["ok"]
    res = assert_continued(args, stopped, before, done, whole("bc"))
    assert res["benchmark"]["ray"]["address"] == "auto"


RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(
    not RAY and not os.environ.get("SEQRL_REQUIRE_RAY"),
    reason='needs the ray extra: pip install -e ".[ray]"',
)


@needs_ray
def test_a_stopped_job_continues_through_ray(preset, whole, monkeypatch):
    """`--ray local`: the stopped job's run is shipped to the task, continued there and landed
    here."""
    import functools

    import ray

    args = preset("bc", "out")
    stopped, before, done = stop_a_job(args, monkeypatch)
    monkeypatch.setattr(ray, "init", functools.partial(ray.init, num_cpus=1, log_to_driver=False))
    try:
        finished = run.main(run.Args(**{**vars(args), "jobs": 0, "ray": "local"}))
    finally:
        ray.shutdown()
    assert len(finished) == 1 and finished[0]["ok"], finished
    res = assert_continued(args, stopped, before, done, whole("bc"))
    assert res["benchmark"]["ray"]["address"] == "local"
