"""benchmarks/device_check.sh, dry-run on the CPU with tiny settings, so that the script a GPU
session runs cannot rot; and benchmarks/speed.py, which it calls: a failing measurement is recorded
and the others go on, the JSON is rewritten after each one, a rerun skips what is done."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import speed  # noqa: E402

TINY = ["--n-layer", "1", "--n-head", "1", "--n-embd", "16", "--batch-size", "8", "--threads", "1"]


def data_dir(tmp_path, hdf5_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(hdf5_path, data / "hopper-medium-replay.hdf5")  # the replica's name
    return data


def check(out: Path, data: Path, part: str, budget: int) -> dict:
    env = dict(os.environ, DRY_RUN="1", BUDGET_S=str(budget))
    p = subprocess.run(["bash", "benchmarks/device_check.sh", part, str(out), str(data)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=budget + 120)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr + (out / "device_check.log").read_text()[-3000:]
    return json.loads((out / "device_check.json").read_text())


def test_device_check_dry_run_measures_trains_resumes_and_keeps_its_budget(tmp_path, hdf5_path):
    data, out = data_dir(tmp_path, hdf5_path), tmp_path / "out"
    report = check(out, data, "speed", 120)
    (row,) = report["rows"]
    assert row["status"] == "ok" and row["method"] == "dt"
    assert row["config"].startswith("thesis size")
    assert row["vectorized_speedup"] > 0  # 2 episodes at once against one at a time
    report = check(out, data, "train", 60)
    train = report["train"]
    first = train["updates_saved"]
    assert first > 0 and train["evaluations"][0]["step"] == 0 and not train["finished"]
    assert (out / train["run"] / "model.pt").exists()
    report = check(out, data, "all", 80)  # speed: already measured; train: resumed
    assert report["rows"] == [row]
    assert report["train"]["updates_saved"] > first and len(report["train"]["calls"]) == 2
    assert json.loads((out / train["run"] / "config.json").read_text())["resumed"]
    for call, budget in zip(report["calls"], (120, 60, 80)):
        assert call["seconds"] <= budget + 15 and call["dry_run"]  # stopped inside its budget
    files = [f for f in out.rglob("*") if f.is_file()]  # what a device call can bring back
    assert len(files) <= 8 and all(len(f.relative_to(out).parts) <= 3 for f in files)


def test_device_check_refuses_a_data_dir_without_the_replica(tmp_path):
    cmd = ["bash", "benchmarks/device_check.sh", str(tmp_path / "o"), str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "hopper-medium-replay.hdf5: no such file" in p.stderr
    assert not (tmp_path / "o").exists()


def run_speed(data: Path, out: Path, **kw) -> dict:
    args = dict(data_dir=str(data), dataset="hopper-medium-replay", updates=2, eval_episodes=2,
                methods=("dt",), device="cpu", single=False, out=str(out))  # fmt: skip
    return speed.main(speed.Args(**(args | kw)))


def test_speed_records_a_failure_goes_on_and_reruns_skip_it(tmp_path, hdf5_path, monkeypatch):
    data, out = data_dir(tmp_path, hdf5_path), tmp_path / "speed.json"
    configs = {("dt", "bad"): ("dt.py", ["--n-layer", "0"]), ("dt", "tiny"): ("dt.py", TINY)}
    monkeypatch.setattr(speed, "CONFIGS", configs)
    monkeypatch.setattr(speed, "cuda_graph_flags", lambda script: None)  # as today's method files
    report = run_speed(data, out, precisions=("fp32", "bf16 + CUDA graph"))
    rows = {(r["config"], r["precision"]): r for r in report["rows"]}
    bad, good = rows["bad", "fp32"], rows["tiny", "fp32"]
    assert bad["status"] == "failed" and "--n-layer" in bad["error"] and bad["attempts"] == 1
    assert good["status"] == "ok" and good["train_updates_per_s"] > 0
    graph = rows["tiny", "bf16 + CUDA graph"]
    assert graph["status"] == "unsupported" and "not supported by this code" in graph["error"]
    assert json.loads(out.read_text())["rows"] == report["rows"]
    measured = []
    real = speed.measure_row
    counted = lambda todo, *a: measured.append(todo[0]) or real(todo, *a)
    monkeypatch.setattr(speed, "measure_row", counted)
    again = run_speed(data, out, precisions=("fp32", "bf16 + CUDA graph"))
    assert measured == [("dt", "bad")]  # only the failed one, once more
    assert [r for r in again["rows"] if r["config"] == "tiny"] == [good, graph]
    run_speed(data, out, precisions=("fp32", "bf16 + CUDA graph"))
    assert measured == [("dt", "bad")]  # failed twice: not tried a third time


def test_speed_stops_at_its_budget_and_a_rerun_finishes(tmp_path, hdf5_path, monkeypatch):
    data, out = data_dir(tmp_path, hdf5_path), tmp_path / "speed.json"
    monkeypatch.setattr(speed, "CONFIGS", {("dt", "tiny"): ("dt.py", TINY)})
    (row,) = run_speed(data, out, precisions=("fp32",), budget_s=2.0)["rows"]
    assert row["status"] == "stopped (budget)" and "attempts" not in row  # killed by the budget
    (row,) = run_speed(data, out, precisions=("fp32",))["rows"]
    assert row["status"] == "ok"


def test_compile_time_is_reported_apart_or_the_speed_is_marked(capsys, tmp_path):
    reported = speed.compile_timing({"compile_time_s": 42.0}, compiled=True)
    assert reported["compile_time_s"] == 42.0 and "train_speed_note" not in reported
    unreported = speed.compile_timing({"train_updates_per_s": 0.2}, compiled=True)
    assert unreported["compile_time_s"] is None and "compile time" in unreported["train_speed_note"]
    assert speed.compile_timing({"train_updates_per_s": 9.0}, compiled=False) == {}
    common = dict(method="dt", config="c", status="ok", eval_env_steps_per_s=1.0)
    compiled = dict(common, precision="bf16 + compile", train_updates_per_s=0.2, **unreported)
    rows = [dict(common, precision="fp32", train_updates_per_s=100.0), compiled]
    speed.derived(rows, "fp32")
    assert rows[0]["speedup_vs_fp32"] == 1.0 and rows[1]["speedup_vs_fp32"] is None  # not compared
    report = dict(rows=rows, precisions=["fp32", "bf16 + compile"], config=dict(eval_episodes=10),
                  device="cuda", gpu="a GPU")  # fmt: skip
    speed.print_table(report, tmp_path / "x.json")
    assert "| (0.20)* |" in capsys.readouterr().out


def test_speed_writes_under_runs_by_default():
    assert Path(speed.Args().out_dir) == ROOT / "runs"
    assert "../shared" not in Path(speed.__file__).read_text()
