"""benchmarks/device_check.sh, dry-run on the CPU with tiny settings, so that the script a GPU session runs
once cannot rot."""

import json
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_dry_run_writes_one_json_with_every_part(tmp_path, hdf5_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(hdf5_path, data / "hopper-medium-replay.hdf5")  # the replica's name
    out = tmp_path / "out"
    env = dict(os.environ, DRY_RUN="1")
    p = subprocess.run(["bash", "benchmarks/device_check.sh", str(out), str(data)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads((out / "device_check.json").read_text())
    assert report["speed"]["rows"] and report["speed"]["rows"][0]["vectorized_speedup"] > 0
    assert sorted(c["config"]["method"] for c in report["runs"].values()) == ["dt", "mo_dt", "trdt"]
    for run in report["runs"].values():  # stopped by its time limit (SIGINT): the model and every metric kept
        assert run["model_saved"] and run["evaluations"] and run["evaluations"][0]["step"] == 0
    bad = subprocess.run(["bash", "benchmarks/device_check.sh", str(out), str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True)  # fmt: skip
    assert bad.returncode == 2 and "hopper-medium-replay.hdf5: no such file" in bad.stderr
