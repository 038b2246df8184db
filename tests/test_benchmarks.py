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
    assert "| hopper-medium-replay | 85.0 ± 5.0 (n=2) | 97.82 ± 2.30 |" in text  # the thesis's ± beside its mean
    assert "| walker2d-medium | 70.0 ± 0.0 (n=1) | 75.89 ± 7.26 |" in text
    assert "| **total** (same rows) | 155.0 | 173.71 |" in text  # thesis total over the same two rows
    assert "| thesis's printed total (all rows) | — | 726.77 |" in text
    assert "| hopper-medium | 50.0 ± 0.0 (n=1) | 93.20 |" in text and "539.0" in text
    assert "| hopper-medium-replay | 40.0 ± 0.0 (n=1) | — |" in text
    assert "replica (not D4RL)" in text and "abcdef1234" in text
    assert "wall time per seed 1.0 min (median)" in text  # TRDT: 1, 2 and 1 minutes (seed 1 took 2)
    col = summary["columns"]["TRDT"]
    assert col["curves"]["hopper-medium-replay"] == dict(steps=[0, 10], mean=[1.5, 5.5], std=[0.5, 0.5])
    prov = col["stats"]["walker2d-medium"]["provenance"]  # every number carries its own provenance
    assert prov["data"] == ["replica (not D4RL)"] and prov["seeds"] == [1] and prov["device"] == ["cpu"] and prov["updates"] == [10]
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


def test_aggregate_never_averages_replica_with_official_d4rl(tmp_path):
    fake_result(tmp_path, "dt", "hopper-medium", 0, 10.0, source="replica")
    fake_result(tmp_path, "dt", "hopper-medium", 1, 80.0, source="d4rl")
    summary = aggregate.main(aggregate.Args(folders=(str(tmp_path),)))
    assert {k: c["stats"]["hopper-medium"]["mean"] for k, c in summary["columns"].items()} == {
        "DT [--data replica]": 10.0, "DT [--data d4rl]": 80.0}


def test_aggregate_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no benchmark results.json"):
        aggregate.main(aggregate.Args(folders=(str(tmp_path),)))
    with pytest.raises(SystemExit, match="no such folder"):
        aggregate.main(aggregate.Args(folders=(str(tmp_path / "nope"),)))
    with pytest.raises(SystemExit, match="at least one results folder"):
        aggregate.main(aggregate.Args(folders=()))


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
    data = write_tiny_data(tmp_path / "data", hdf5_path, names=("hopper-medium", "hopper-expert", "walker2d-medium"))
    assert run.dataset_paths("hopper-medium-expert", str(data)) == [str((data / f"hopper-{l}.hdf5").resolve()) for l in ("medium", "expert")]
    with pytest.raises(SystemExit, match="no file for walker2d-medium-replay"):
        run.dataset_paths("walker2d-medium-replay", str(data))
    with pytest.raises(SystemExit, match="no file for walker2d-medium-expert .*-medium and -expert"):  # expert missing
        run.dataset_paths("walker2d-medium-expert", str(data))
    with pytest.raises(SystemExit, match="no such folder"):
        run.dataset_paths("hopper-medium", str(tmp_path / "nope"))


def test_preset_datasets_without_a_local_file_are_skipped_named_ones_are_errors(tmp_path, hdf5_path, capsys):
    data = write_tiny_data(tmp_path / "data", hdf5_path, names=("hopper-medium", "hopper-expert"))
    jobs = run.plan(run.Args(preset="thesis", data_dir=str(data), out=str(tmp_path / "out"), methods=("dt", "rgdt"), seeds=(0,)))
    assert sorted((j["method"], j["dataset"]) for j in jobs) == [
        ("dt", "hopper-medium"), ("dt", "hopper-medium-expert"), ("rgdt", "hopper-medium"), ("rgdt", "hopper-medium-expert")]
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no file for walker2d-medium"):
        run.plan(run.Args(preset="thesis", data_dir=str(data), methods=("dt",), datasets=("walker2d-medium",)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no jobs"):
        run.plan(run.Args(preset="thesis", data_dir=str(tmp_path / "empty"), methods=("dt",)))


def test_thesis_preset_is_the_thesis_configuration(tmp_path):
    """The preset passes no flags to MO-DT, TRDT, RGDT and DT: their defaults must be Tables 1.1-1.2, §2.4
    and the DT paper's, on Table 1.3's nine datasets (Table 2.1's six for RGDT), 10 seeds."""
    jobs = run.plan(run.Args(preset="thesis", out=str(tmp_path)))
    for m in run.METHODS:
        mine = [j for j in jobs if j["method"] == m]
        assert {j["dataset"] for j in mine} == set(run.TABLE_2_1 if m == "rgdt" else run.TABLE_1_3)
        assert sorted({j["seed"] for j in mine}) == list(range(10)) and len(mine) == 10 * len({j["dataset"] for j in mine})
    assert len(run.TABLE_1_3) == 9 and len(run.TABLE_2_1) == 6 and set(run.TABLE_2_1) < set(run.TABLE_1_3)
    sys.path.insert(0, str(ROOT))
    import dt
    import mo_dt
    import rgdt
    import trdt

    table_1_1 = dict(n_layer=4, n_head=4, n_embd=256, context_len=20, dropout=0.1, batch_size=256, lr=1e-4, weight_decay=1e-3,
                     grad_clip=0.25, warmup_steps=10_000, updates=100_000)
    for mod in (mo_dt, trdt):
        assert {k: getattr(mod.Args(), k) for k in table_1_1} == table_1_1, mod.__name__
        assert mod.TARGET_RETURNS == {"halfcheetah": 12000, "walker2d": 10000, "hopper": 7200}  # Table 1.2
    assert trdt.Args().bins == 3 and trdt.Args().lambdas == pytest.approx((0.25,) * 4) and mo_dt.Args().lambdas == pytest.approx((1 / 3,) * 3)
    sec_2_4 = dict(n_embd=64, n_head=2, n_enc_layer=2, n_layer=3, return_len=20, state_len=5, lr=5e-4, warmup_steps=10_000,
                   weight_decay=1e-3, dropout=0.1, updates=150_000, batch_size=256, inv_hidden=512, inv_layers=2, inv_lr=1e-4,
                   inv_weight_decay=1e-4, inv_dropout=0.1, inv_updates=200_000, inv_batch_size=1024)
    assert {k: getattr(rgdt.Args(), k) for k in sec_2_4} == sec_2_4
    dt_paper = dict(n_layer=3, n_head=1, n_embd=128, context_len=20, dropout=0.1, batch_size=64, lr=1e-4, weight_decay=1e-4,
                    grad_clip=0.25, warmup_steps=10_000, updates=100_000)
    assert {k: getattr(dt.Args(), k) for k in dt_paper} == dt_paper
    assert dt.TARGET_RETURNS == {"hopper": 3600, "walker2d": 5000, "halfcheetah": 6000}
    odt = next(j["cmd"] for j in jobs if j["method"] == "dt-gaussian")
    assert " ".join(odt).endswith("--policy gaussian --eval-episodes 10 --eval-every 10000 "
                                  "--n-layer 4 --n-head 4 --n-embd 512 --batch-size 256 --weight-decay 5e-4")


def test_bad_runner_input_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown dataset 'hopper-mediun'"):
        run.plan(run.Args(datasets=("hopper-mediun",), out=str(tmp_path)))
    with pytest.raises(SystemExit, match="no such folder"):
        run.plan(run.Args(data_dir=str(tmp_path / "nope"), out=str(tmp_path)))
    with pytest.raises(SystemExit, match="--jobs -1"):
        run.plan(run.Args(jobs=-1, out=str(tmp_path)))


def test_a_failed_or_killed_job_leaves_no_results_and_runs_again(tmp_path):
    job = dict(method="dt", dataset="hopper-medium", seed=0, key="k", code="c", folder=tmp_path / "job")
    r = run.run_job(dict(job, cmd=["-c", "import sys; sys.exit(3)"]), threads=1)
    assert not r["ok"] and "exit code 3" in r["error"] and not run.is_done(job)
    r = run.run_job(dict(job, cmd=["-c", "pass"]), threads=1)  # exits 0 but wrote no run: fails, the batch goes on
    assert not r["ok"] and "log.txt" in r["error"] and not run.is_done(job)


def test_finished_jobs_are_skipped_and_unfinished_ones_rerun(tmp_path, hdf5_path, monkeypatch):
    data = write_tiny_data(tmp_path / "data", hdf5_path)
    args = run.Args(preset="smoke", data_dir=str(data), out=str(tmp_path / "out"), methods=("dt",), seeds=(0, 1, 2), jobs=1)
    jobs = run.plan(args)
    jobs[0]["folder"].mkdir(parents=True)
    (jobs[0]["folder"] / "results.json").write_text("{}")  # finished
    jobs[1]["folder"].mkdir(parents=True)
    (jobs[1]["folder"] / "log.txt").write_text("killed half way")  # interrupted: no results.json
    ran = []
    monkeypatch.setattr(run, "run_job", lambda job, threads, gpu: ran.append(job["seed"]) or dict(job, ok=True, score=0.0))
    run.main(args)
    assert sorted(ran) == [1, 2]
    assert (jobs[0]["folder"] / "results.json").read_text() == "{}"  # untouched


def test_jobs_spread_over_every_gpu(tmp_path, hdf5_path, monkeypatch):
    import torch

    data = write_tiny_data(tmp_path / "data", hdf5_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    used = []
    monkeypatch.setattr(run, "run_job", lambda job, threads, gpu: used.append(gpu) or dict(job, ok=True, score=0.0))
    run.main(run.Args(preset="smoke", data_dir=str(data), out=str(tmp_path / "out"), methods=("dt",), seeds=tuple(range(8))))
    assert sorted(used) == ["0"] * 4 + ["1"] * 4  # 4 jobs per GPU by default, each GPU as busy as the other
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")  # the user's GPUs, not the first two
    used.clear()
    run.main(run.Args(preset="smoke", data_dir=str(data), out=str(tmp_path / "out"), methods=("dt",), seeds=(0, 1)))
    assert sorted(used) == ["2", "5"]


def test_speed_benchmark_end_to_end(tmp_path, hdf5_path, monkeypatch, capsys):
    import speed

    data = write_tiny_data(tmp_path / "data", hdf5_path)
    monkeypatch.setattr(speed, "CONFIGS", {("dt", "tiny"): ("dt.py", ["--n-layer", "1", "--n-head", "1", "--n-embd", "16", "--batch-size", "8"])})
    report = speed.main(speed.Args(data_dir=str(data), dataset="hopper-medium-replay", updates=2, eval_episodes=2, methods=("dt",),
                                   device="cpu", out_dir=str(tmp_path / "out")))
    (row,) = report["rows"]
    assert row["method"] == "dt" and row["updates"] == 2 and row["train_updates_per_s"] > 0
    assert row["vectorized_speedup"] == pytest.approx(row["eval_env_steps_per_s"] / row["eval_single_env_steps_per_s"])
    (out,) = (tmp_path / "out").glob("speed__cpu__*.json")
    saved = json.loads(out.read_text())
    assert saved["rows"] == report["rows"] and saved["device"] == "cpu" and saved["dataset_source"] == "local file" and "git_commit" in saved
    assert "| dt | tiny |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="choose from dt"):
        speed.main(speed.Args(methods=("ppo",)))


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
