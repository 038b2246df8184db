import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import aggregate  # noqa: E402
import run  # noqa: E402


def fake_result(folder: Path, method: str, dataset: str, seed: int, score: float, cmd_extra=(), code="c0de", source="replica",
                curve=((0, 1.0), (10, 5.0))):
    cmd = [run.METHODS[method]["script"], "--env", dataset, "--seed", str(seed), *cmd_extra]
    job = folder / f"{method}__{dataset}__s{seed}__{abs(hash((tuple(cmd), code))) % 10**8}"
    job.mkdir(parents=True)
    res = dict(normalized_mean=score, updates=10, device="cpu", wall_time_s=60.0 * (seed + 1), git_commit="abcdef1234567", dataset=dict(source=source),
               benchmark=dict(method=method, dataset=dataset, seed=seed, cmd=cmd, code_sha256=code, label=run.METHODS[method]["label"]))
    (job / "results.json").write_text(json.dumps(res))
    (job / "metrics.jsonl").write_text("\n".join(json.dumps(dict(step=s, eval_normalized=v + seed)) for s, v in curve))
    return job


def test_aggregate_builds_the_table_with_thesis_columns_and_totals(tmp_path):
    for seed, score in [(0, 80.0), (1, 90.0)]:
        fake_result(tmp_path, "trdt", "hopper-medium-replay", seed, score)
    fake_result(tmp_path, "trdt", "walker2d-medium", 0, 70.0)
    fake_result(tmp_path, "rgdt", "hopper-medium", 0, 50.0)
    fake_result(tmp_path, "rgdt", "hopper-medium-replay", 0, 40.0)  # not a Table 2.1 row: listed, thesis "—"
    summary = aggregate.main(aggregate.Args(folders=(str(tmp_path),)))
    text = (tmp_path / "tables.md").read_text()
    assert "| hopper-medium-replay | 85.0 ± 5.0 (n=2) | 97.82 |" in text
    assert "| walker2d-medium | 70.0 ± 0.0 (n=1) | 75.89 |" in text
    assert "| **total** (same rows) | 155.0 | 173.71 |" in text  # thesis total over the same two rows
    assert "| thesis's printed total (all rows) | — | 726.77 |" in text
    assert "| hopper-medium | 50.0 ± 0.0 (n=1) | 93.20 |" in text and "539.0" in text
    assert "| hopper-medium-replay | 40.0 ± 0.0 (n=1) | — |" in text
    assert "replica (not D4RL)" in text and "abcdef1234" in text
    assert "wall time per seed 1.0 min (median)" in text  # TRDT: 1, 2 and 1 minutes (seed 1 took 2)
    col = summary["columns"]["TRDT"]
    assert col["curves"]["hopper-medium-replay"] == dict(steps=[0, 10], mean=[1.5, 5.5], std=[0.5, 0.5])
    assert (tmp_path / "scores.png").stat().st_size > 0 and (tmp_path / "curves.png").stat().st_size > 0


def test_aggregate_never_averages_different_configs_or_code(tmp_path):
    fake_result(tmp_path, "dt", "hopper-medium", 0, 10.0)
    fake_result(tmp_path, "dt", "hopper-medium", 1, 20.0)
    fake_result(tmp_path, "dt", "hopper-medium", 0, 60.0, cmd_extra=("--updates", "5"))
    fake_result(tmp_path, "dt", "hopper-medium", 0, 99.0, code="other")
    summary = aggregate.main(aggregate.Args(folders=(str(tmp_path),)))
    means = sorted(c["stats"]["hopper-medium"]["mean"] for c in summary["columns"].values())
    assert means == [15.0, 60.0, 99.0]
    labels = sorted(summary["columns"])
    assert labels[0] == "DT [--updates 5]"  # a reader sees what differs, not a hash
    assert all(k.startswith("DT [defaults, code ") for k in labels[1:]) and labels[1] != labels[2]


def test_aggregate_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no benchmark results.json"):
        aggregate.main(aggregate.Args(folders=(str(tmp_path),)))


def write_tiny_data(folder: Path, hdf5_path: Path, names=("hopper-medium-replay",)):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(hdf5_path, folder / f"{n}.hdf5")
    return folder


def test_plan_keys_change_with_config_and_code(tmp_path, hdf5_path, monkeypatch):
    data = write_tiny_data(tmp_path / "data", hdf5_path)
    base = dict(preset="smoke", data_dir=str(data), out=str(tmp_path / "out"), methods=("dt",), seeds=(0,))
    a = run.plan(run.Args(**base))[0]
    assert run.plan(run.Args(**base))[0]["folder"] == a["folder"]  # deterministic
    assert run.plan(run.Args(**base, extra="--updates 7"))[0]["folder"] != a["folder"]
    monkeypatch.setattr(run, "source_hash", lambda script: "edited")
    assert run.plan(run.Args(**base))[0]["folder"] != a["folder"]


def test_medium_expert_is_medium_plus_expert_and_missing_files_are_named(tmp_path, hdf5_path):
    data = write_tiny_data(tmp_path / "data", hdf5_path, names=("hopper-medium", "hopper-expert"))
    assert run.dataset_paths("hopper-medium-expert", str(data)) == [str((data / f"hopper-{l}.hdf5").resolve()) for l in ("medium", "expert")]
    with pytest.raises(SystemExit, match="no file for walker2d-medium"):
        run.dataset_paths("walker2d-medium", str(data))


def test_finished_jobs_are_skipped_and_unfinished_ones_rerun(tmp_path, hdf5_path, monkeypatch):
    data = write_tiny_data(tmp_path / "data", hdf5_path)
    args = run.Args(preset="smoke", data_dir=str(data), out=str(tmp_path / "out"), methods=("dt",), seeds=(0, 1, 2), jobs=1)
    jobs = run.plan(args)
    jobs[0]["folder"].mkdir(parents=True)
    (jobs[0]["folder"] / "results.json").write_text("{}")  # finished
    jobs[1]["folder"].mkdir(parents=True)
    (jobs[1]["folder"] / "log.txt").write_text("killed half way")  # interrupted: no results.json
    ran = []
    monkeypatch.setattr(run, "run_job", lambda job, threads: ran.append(job["seed"]) or dict(job, ok=True, score=0.0))
    run.main(args)
    assert sorted(ran) == [1, 2]
    assert (jobs[0]["folder"] / "results.json").read_text() == "{}"  # untouched


def test_unknown_preset_or_method(tmp_path):
    with pytest.raises(SystemExit, match="unknown --preset"):
        run.plan(run.Args(preset="huge"))
    with pytest.raises(SystemExit, match="unknown method"):
        run.plan(run.Args(methods=("ppo",)))


def test_smoke_preset_end_to_end(tmp_path, hdf5_path):
    data = write_tiny_data(tmp_path / "data", hdf5_path)
    methods = tuple(m for m, spec in run.METHODS.items() if (ROOT / spec["script"]).exists())
    out = tmp_path / "out"
    args = run.Args(preset="smoke", data_dir=str(data), out=str(out), methods=methods, seeds=(0,), jobs=2)
    finished = run.main(args)
    assert len(finished) == len(methods) and all(r["ok"] for r in finished)
    assert run.main(args) == []  # all finished: nothing runs again
    summary = aggregate.main(aggregate.Args(folders=(str(out),)))
    labels = {c["method"] for c in summary["columns"].values()}
    assert labels == set(methods)
    res = json.loads(next(out.glob("dt__*/results.json")).read_text())
    assert res["benchmark"]["seed"] == 0 and res["dataset"]["source"] == "file" and res["updates"] == 40


def test_attention_comparison_from_runs_and_checkpoints(tmp_path, hdf5_path):
    sys.path.insert(0, str(ROOT))
    import attention
    import dt

    base = dict(env="hopper-random", dataset_path=(str(hdf5_path),), updates=3, batch_size=4, n_embd=16, n_layer=2, n_head=2,
                context_len=4, eval_every=0, eval_episodes=1, runs_dir=str(tmp_path / "runs"))
    with_att = Path(dt.train(dt.Args(**base, attention=True))["run_dir"])
    without = Path(dt.train(dt.Args(**base, exp_name="plain"))["run_dir"])
    out = tmp_path / "cmp"
    summary = attention.main(attention.Args(runs=(f"dt={with_att}", f"dt={without}"), out=str(out), eval_episodes=1))
    assert len(summary) == 2 and (out / "attention_comparison.png").stat().st_size > 0
    for s in summary.values():
        assert len(s["modality_mass_mean"]) == 2 and abs(sum(s["modality_mass_mean"][0]) - 1) < 1e-4
    with pytest.raises(SystemExit, match="nothing is overwritten"):
        attention.main(attention.Args(runs=(f"dt={with_att}",), out=str(out)))
    with pytest.raises(SystemExit, match="expected method=run_folder"):
        attention.main(attention.Args(runs=(f"ppo={with_att}",), out=str(tmp_path / "x")))
