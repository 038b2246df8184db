import dataclasses
import functools
import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import aggregate  # noqa: E402
import run  # noqa: E402


def fake_result(
    folder: Path,
    method: str,
    dataset: str,
    seed: int,
    score: float,
    cmd_extra=(),
    code="c0de",
    source="replica",
    curve=((0, 1.0), (10, 5.0)),
):
    cmd = [run.METHODS[method]["script"], "--env", dataset, "--seed", str(seed), *cmd_extra]
    job = folder / f"{method}__{dataset}__s{seed}__{abs(hash((tuple(cmd), code))) % 10**8}"
    job.mkdir(parents=True)
    # What a results.json holds that aggregate.py and claims.py read: its method file, the flags
    # (TRDT's lambdas and bins for the comparability check), the dataset and the runner's record.
    res = dict(
        method=run.METHODS[method]["script"].split("/")[-1].removesuffix(".py"),
        args=dict(exp_name=method, lambdas=[0.25] * 4, bins=3),
        target_return=None,
        normalized_mean=score,
        updates=10,
        device="cpu",
        wall_time_s=60.0 * (seed + 1),
        git_commit="abcdef1234567",
        dataset=dict(source=source, name=dataset),
        benchmark=dict(
            method=method,
            dataset=dataset,
            seed=seed,
            cmd=cmd,
            code_sha256=code,
            label=run.METHODS[method]["label"],
        ),
    )
    (job / "results.json").write_text(json.dumps(res))
    (job / "metrics.jsonl").write_text(
        "\n".join(json.dumps(dict(step=s, eval_normalized=v + seed)) for s, v in curve)
    )
    return job


def test_aggregate_builds_the_table_with_thesis_columns_and_totals(tmp_path):
    for seed, score in [(0, 80.0), (1, 90.0)]:
        fake_result(tmp_path, "trdt", "hopper-medium-replay", seed, score)
    fake_result(tmp_path, "trdt", "walker2d-medium", 0, 70.0)
    fake_result(tmp_path, "rgdt", "hopper-medium", 0, 50.0)
    # not a Table 2.1 row: listed, thesis "—"
    fake_result(tmp_path, "rgdt", "hopper-medium-replay", 0, 40.0)
    summary = aggregate.main(aggregate.Args(folders=(str(tmp_path),), reps=50))
    text = (tmp_path / "tables.md").read_text()
    # mean over seeds [95% bootstrap CI] (n), the thesis's ± beside its mean
    assert "| hopper-medium-replay | 85.0 [80.0, 90.0] (n=2) | 97.82 ± 2.30 |" in text
    assert "| walker2d-medium | 70.0 [70.0, 70.0] (n=1) | 75.89 ± 7.26 |" in text
    # thesis total over the same two rows
    assert "| **total of means** (same rows) | 155.0 | 173.71 |" in text
    assert "| thesis's printed total (all rows) | — | 726.77 |" in text
    assert "| hopper-medium | 50.0 [50.0, 50.0] (n=1) | 93.20 |" in text and "539.0" in text
    assert "| hopper-medium-replay | 40.0 [40.0, 40.0] (n=1) | — |" in text
    assert "replica (not D4RL)" in text and "abcdef1234" in text
    assert "wall time per seed 1.0 min (median)" in text  # TRDT: 1, 2 and 1 minutes (seed 1 took 2)
    col = summary["columns"]["TRDT"]
    cv = col["curves"]["hopper-medium-replay"]
    # the IQM of two seeds is their mean
    assert {k: cv[k] for k in ("steps", "mean", "std", "iqm")} == dict(
        steps=[0, 10], mean=[1.5, 5.5], std=[0.5, 0.5], iqm=[1.5, 5.5]
    )
    # its CI: from either seed to the other
    assert cv["lo"] == [1.0, 5.0] and cv["hi"] == [2.0, 6.0]
    prov = col["stats"]["walker2d-medium"]["provenance"]  # every number carries its own provenance
    assert (
        prov["data"] == ["replica (not D4RL)"]
        and prov["seeds"] == [1]
        and prov["device"] == ["cpu"]
        and prov["updates"] == [10]
    )
    assert (tmp_path / "scores.png").stat().st_size > 0 and (
        tmp_path / "curves.png"
    ).stat().st_size > 0


def test_aggregate_never_averages_different_configs_or_code(tmp_path):
    fake_result(tmp_path, "dt", "hopper-medium", 0, 10.0)
    fake_result(tmp_path, "dt", "hopper-medium", 1, 20.0)
    fake_result(tmp_path, "dt", "hopper-medium", 0, 60.0, cmd_extra=("--updates", "5"))
    newest = fake_result(tmp_path, "dt", "hopper-medium", 0, 99.0, code="other") / "results.json"
    # the newest code: the column; the others: History
    os.utime(newest, (newest.stat().st_mtime + 100,) * 2)
    summary = aggregate.main(aggregate.Args(folders=(str(tmp_path),), reps=50))
    (col,) = summary["columns"].values()
    means = sorted(
        [col["stats"]["hopper-medium"]["mean"]] + [h["stats"]["mean"] for h in summary["history"]]
    )
    assert means == [15.0, 60.0, 99.0] and col["stats"]["hopper-medium"]["mean"] == 99.0
    labels = sorted(h["label"] for h in summary["history"])
    assert labels[0] == "DT [--updates 5]"  # a reader sees what differs, not a hash
    assert (
        labels[1].startswith("DT [defaults, code ")
        and labels[1] != f"DT [defaults, code {col['config']}]"
    )
    assert "### History" in (tmp_path / "tables.md").read_text()


def test_aggregate_never_averages_replica_with_official_d4rl(tmp_path):
    fake_result(tmp_path, "dt", "hopper-medium", 0, 10.0, source="replica")
    fake_result(tmp_path, "dt", "hopper-medium", 1, 80.0, source="d4rl")
    summary = aggregate.main(aggregate.Args(folders=(str(tmp_path),)))
    assert {k: c["stats"]["hopper-medium"]["mean"] for k, c in summary["columns"].items()} == {
        "DT [--data replica]": 10.0,
        "DT [--data d4rl]": 80.0,
    }


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
    base = dict(
        preset="smoke", data_dir=str(data), out=str(tmp_path / "out"), methods=("dt",), seeds=(0,)
    )
    a = run.plan(run.Args(**base))[0]
    assert run.plan(run.Args(**base))[0]["folder"] == a["folder"]  # deterministic
    assert run.plan(run.Args(**base, extra="--updates 7"))[0]["folder"] != a["folder"]
    monkeypatch.setattr(run, "source_hash", lambda script: "edited")
    assert run.plan(run.Args(**base))[0]["folder"] != a["folder"]


def test_medium_expert_is_medium_plus_expert_and_missing_files_are_named(tmp_path, hdf5_path):
    data = write_tiny_data(
        tmp_path / "data", hdf5_path, names=("hopper-medium", "hopper-expert", "walker2d-medium")
    )
    assert run.dataset_paths("hopper-medium-expert", str(data)) == [
        str((data / f"hopper-{lvl}.hdf5").resolve()) for lvl in ("medium", "expert")
    ]
    with pytest.raises(SystemExit, match="no file for walker2d-medium-replay"):
        run.dataset_paths("walker2d-medium-replay", str(data))
    with pytest.raises(
        SystemExit, match="no file for walker2d-medium-expert .*-medium and -expert"
    ):
        # expert missing
        run.dataset_paths("walker2d-medium-expert", str(data))
    with pytest.raises(SystemExit, match="no such folder"):
        run.dataset_paths("hopper-medium", str(tmp_path / "nope"))


def test_preset_datasets_without_a_local_file_are_skipped_named_ones_are_errors(
    tmp_path, hdf5_path, capsys
):
    data = write_tiny_data(tmp_path / "data", hdf5_path, names=("hopper-medium", "hopper-expert"))
    jobs = run.plan(
        run.Args(
            preset="thesis",
            data_dir=str(data),
            out=str(tmp_path / "out"),
            methods=("dt", "rgdt"),
            seeds=(0,),
        )
    )
    assert sorted((j["method"], j["dataset"]) for j in jobs) == [
        ("dt", "hopper-medium"),
        ("dt", "hopper-medium-expert"),
        ("rgdt", "hopper-medium"),
        ("rgdt", "hopper-medium-expert"),
    ]
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no file for walker2d-medium"):
        run.plan(
            run.Args(
                preset="thesis", data_dir=str(data), methods=("dt",), datasets=("walker2d-medium",)
            )
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no jobs"):
        run.plan(run.Args(preset="thesis", data_dir=str(tmp_path / "empty"), methods=("dt",)))


def test_thesis_preset_is_the_thesis_configuration(tmp_path):
    """The preset passes no flags to MO-DT, TRDT, RGDT and DT: their defaults must be Tables
    1.1-1.2, §2.4 and the DT paper's, on Table 1.3's nine datasets (Table 2.1's six for RGDT), 10
    seeds."""
    jobs = run.plan(run.Args(preset="thesis", out=str(tmp_path)))
    # Fig. 2.3's ablation runs where it is named
    assert "rgdt-full" not in {j["method"] for j in jobs}
    for m in [m for m, spec in run.METHODS.items() if spec.get("default", True)]:
        mine = [j for j in jobs if j["method"] == m]
        datasets = {j["dataset"] for j in mine}
        assert datasets == set(run.TABLE_2_1 if m == "rgdt" else run.TABLE_1_3)
        assert sorted({j["seed"] for j in mine}) == list(range(10))
        assert len(mine) == 10 * len(datasets)
    assert len(run.TABLE_1_3) == 9 and len(run.TABLE_2_1) == 6
    assert set(run.TABLE_2_1) < set(run.TABLE_1_3)
    sys.path.insert(0, str(ROOT))
    import dt
    import mo_dt
    import rgdt
    import trdt

    table_1_1 = dict(n_layer=4, n_head=4, n_embd=256, context_len=20, dropout=0.1, batch_size=256,
                     lr=1e-4, weight_decay=1e-3, grad_clip=0.25, warmup_steps=10_000,
                     updates=100_000)  # fmt: skip
    for mod in (mo_dt, trdt):
        assert {k: getattr(mod.Args(), k) for k in table_1_1} == table_1_1, mod.__name__
        table_1_2 = {"halfcheetah": 12000, "walker2d": 10000, "hopper": 7200}
        assert mod.TARGET_RETURNS == table_1_2
    assert trdt.Args().bins == 3 and trdt.Args().lambdas == pytest.approx((0.25,) * 4)
    assert mo_dt.Args().lambdas == pytest.approx((1 / 3,) * 3)
    sec_2_4 = dict(n_embd=64, n_head=2, n_enc_layer=2, n_layer=3, return_len=20, state_len=5,
                   lr=5e-4, warmup_steps=10_000, weight_decay=1e-3, dropout=0.1, updates=150_000,
                   batch_size=256, inv_hidden=512, inv_layers=2, inv_lr=1e-4,
                   inv_weight_decay=1e-4, inv_dropout=0.1, inv_updates=200_000,
                   inv_batch_size=1024)  # fmt: skip
    assert {k: getattr(rgdt.Args(), k) for k in sec_2_4} == sec_2_4
    dt_paper = dict(n_layer=3, n_head=1, n_embd=128, context_len=20, dropout=0.1, batch_size=64,
                    lr=1e-4, weight_decay=1e-4, grad_clip=0.25, warmup_steps=10_000,
                    updates=100_000)  # fmt: skip
    assert {k: getattr(dt.Args(), k) for k in dt_paper} == dt_paper
    assert dt.TARGET_RETURNS == {"hopper": 3600, "walker2d": 5000, "halfcheetah": 6000}
    odt = next(j["cmd"] for j in jobs if j["method"] == "dt-gaussian")
    assert " ".join(odt).endswith(
        "--policy gaussian --eval-episodes 10 --eval-every 10000 "
        "--n-layer 4 --n-head 4 --n-embd 512 --batch-size 256 --weight-decay 5e-4"
    )


def test_bad_runner_input_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown dataset 'hopper-mediun'"):
        run.plan(run.Args(datasets=("hopper-mediun",), out=str(tmp_path)))
    with pytest.raises(SystemExit, match="no such folder"):
        run.plan(run.Args(data_dir=str(tmp_path / "nope"), out=str(tmp_path)))
    with pytest.raises(SystemExit, match="--jobs -1"):
        run.plan(run.Args(jobs=-1, out=str(tmp_path)))
    with pytest.raises(SystemExit, match=r"^error: --seeds 0 -1: every seed must be >= 0"):
        run.plan(run.Args(seeds=(0, -1), out=str(tmp_path)))


def test_a_failed_or_killed_job_leaves_no_results_and_runs_again(tmp_path):
    job = dict(
        method="dt", dataset="hopper-medium", seed=0, key="k", code="c", folder=tmp_path / "job"
    )
    r = run.run_job(dict(job, cmd=["-c", "import sys; sys.exit(3)"]), threads=1)
    assert not r["ok"] and "exit code 3" in r["error"] and not run.is_done(job)
    # exits 0 but wrote no run: fails, the batch goes on
    r = run.run_job(dict(job, cmd=["-c", "pass"]), threads=1)
    assert not r["ok"] and "log.txt" in r["error"] and not run.is_done(job)


def test_a_failed_job_is_reported_with_its_own_last_error_line(tmp_path):
    """The one line that says why (a method file's `error: ...`, else a traceback's exception) is
    printed, from the job's last attempt only."""
    job = dict(
        method="dt", dataset="hopper-medium", seed=0, key="k", code="c", folder=tmp_path / "job"
    )
    bad_flag = "import sys; print('loading'); sys.exit('error: --lr -1.0: must be > 0.')"
    r = run.run_job(dict(job, cmd=["-c", bad_flag]), threads=1)
    assert r["why"] == "error: --lr -1.0: must be > 0."
    assert run.report(r).endswith(
        f"FAILED (exit code 1, see {job['folder'] / 'log.txt'}): error: --lr -1.0: must be > 0."
    )
    # the next attempt
    r = run.run_job(dict(job, cmd=["-c", "raise RuntimeError('out of memory')"]), threads=1)
    assert r["why"] == "RuntimeError: out of memory" and "--lr" not in run.report(r)
    assert run.run_job(dict(job, cmd=["-c", "import sys; sys.exit(2)"]), threads=1)["why"] is None


def test_finished_jobs_are_skipped_and_unfinished_ones_rerun(tmp_path, hdf5_path, monkeypatch):
    data = write_tiny_data(tmp_path / "data", hdf5_path)
    args = run.Args(
        preset="smoke",
        data_dir=str(data),
        out=str(tmp_path / "out"),
        methods=("dt",),
        seeds=(0, 1, 2),
        jobs=1,
    )
    jobs = run.plan(args)
    jobs[0]["folder"].mkdir(parents=True)
    (jobs[0]["folder"] / "results.json").write_text("{}")  # finished
    jobs[1]["folder"].mkdir(parents=True)
    (jobs[1]["folder"] / "log.txt").write_text("killed half way")  # interrupted: no results.json
    ran = []
    monkeypatch.setattr(
        run,
        "run_job",
        lambda job, threads, gpu: ran.append(job["seed"]) or dict(job, ok=True, score=0.0),
    )
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
    monkeypatch.setattr(
        run, "run_job", lambda job, threads, gpu: used.append(gpu) or dict(job, ok=True, score=0.0)
    )
    out = str(tmp_path / "out")

    def smoke(seeds):
        return run.Args(preset="smoke", data_dir=str(data), out=out, methods=("dt",), seeds=seeds)

    run.main(smoke(tuple(range(8))))
    # 4 jobs per GPU by default, each GPU as busy as the other
    assert sorted(used) == ["0"] * 4 + ["1"] * 4
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")  # the user's GPUs, not the first two
    used.clear()
    run.main(smoke((0, 1)))
    assert sorted(used) == ["2", "5"]


def test_speed_benchmark_end_to_end(tmp_path, hdf5_path, monkeypatch, capsys):
    import speed

    data = write_tiny_data(tmp_path / "data", hdf5_path)
    monkeypatch.setattr(
        speed,
        "CONFIGS",
        {
            ("dt", "tiny"): (
                "dt.py",
                ["--n-layer", "1", "--n-head", "1", "--n-embd", "16", "--batch-size", "8"],
            )
        },
    )
    report = speed.main(
        speed.Args(
            data_dir=str(data),
            dataset="hopper-medium-replay",
            updates=2,
            eval_episodes=2,
            methods=("dt",),
            device="cpu",
            out_dir=str(tmp_path / "out"),
        )
    )
    # one row per precision this CPU offers: fp32 always, bf16 too where it is native (AVX512-BF16,
    # AMX)
    assert [r["precision"] for r in report["rows"]] == list(report["precisions"])
    assert report["precisions"][0] == "fp32" and set(report["precisions"]) <= {"fp32", "bf16"}
    assert ("bf16" in report["precisions"]) == report["cpu_bf16_native"]
    row = report["rows"][0]
    assert row["method"] == "dt" and row["updates"] == 2 and row["train_updates_per_s"] > 0
    assert row["vectorized_speedup"] == pytest.approx(
        row["eval_env_steps_per_s"] / row["eval_single_env_steps_per_s"]
    )
    assert all(r["bf16_used"] == (r["precision"] == "bf16") for r in report["rows"])
    (out,) = (tmp_path / "out").glob("speed__cpu__*.json")
    saved = json.loads(out.read_text())
    assert (
        saved["rows"] == report["rows"]
        and saved["device"] == "cpu"
        and saved["dataset_source"] == "local file"
        and "git_commit" in saved
    )
    assert "| dt | tiny |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="choose from dt"):
        speed.main(speed.Args(methods=("ppo",)))


def test_issue_26_presets_list_their_jobs(tmp_path, hdf5_path, capsys):
    """--dry-run of table13-hmr (Table 1.3's hopper-medium-replay row, 5 seeds) and table21-hm
    (Table 2.1's hopper-medium row and Fig. 2.3, 3 seeds) lists each method x seed once, with the
    issue's budgets."""
    data = write_tiny_data(
        tmp_path / "data", hdf5_path, names=("hopper-medium-replay", "hopper-medium")
    )
    dt_size = (
        "--n-layer 3 --n-head 1 --n-embd 128 --batch-size 64 --updates 10000 --warmup-steps 1000"
    )
    fp32 = " --no-bf16"  # the results presets run in fp32 on every machine
    rgdt = "--eval-episodes 20 --updates 30000 --inv-updates 50000 --eval-every 5000"
    # fmt: skip
    expect = {
        "table13-hmr": {
            m: ("--eval-episodes 20 --eval-every 1000 " + f)
            for m, f in [
                ("dt", dt_size + fp32),
                ("mo_dt", dt_size + fp32),
                ("trdt", dt_size + fp32),
                ("bc", "--updates 10000"),
                ("bc-10", "--updates 10000"),
            ]
        },
        "table21-hm": {
            "rgdt": rgdt + fp32,
            "rgdt-full": rgdt + fp32,
            "dt": f"--eval-episodes 20 {dt_size} --eval-every 1000" + fp32,
            "bc-10": "--eval-episodes 20 --updates 10000 --eval-every 1000",
        },
    }
    for preset, seeds, dataset in (("table13-hmr", range(5), "hopper-medium-replay"),
                                   ("table21-hm", range(3), "hopper-medium")):  # fmt: skip
        args = run.Args(preset=preset, data_dir=str(data), out=str(tmp_path / preset), dry_run=True)
        capsys.readouterr()
        assert run.main(args) == []
        listed = [
            line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")
        ]
        jobs = run.plan(args)
        assert sorted((j["method"], j["seed"]) for j in jobs) == sorted(
            (m, s) for m in expect[preset] for s in seeds
        )
        assert sorted(name for _, name in listed) == sorted(j["folder"].name for j in jobs)
        assert all(state == "todo" and name.split("__")[1] == dataset for state, name in listed)
        for j in jobs:
            flags = " ".join(
                j["cmd"][j["cmd"].index("auto") + 1 : j["cmd"].index("--dataset-path")]
            )
            assert flags.endswith(expect[preset][j["method"]]), (preset, j["method"], flags)
            assert ("--full-context-loss" in j["cmd"]) == (j["method"] == "rgdt-full")
            assert ("--top-pct" in j["cmd"]) == (j["method"] == "bc-10")


def test_unknown_preset_or_method(tmp_path):
    with pytest.raises(SystemExit, match="unknown --preset"):
        run.plan(run.Args(preset="huge"))
    with pytest.raises(SystemExit, match="unknown method"):
        run.plan(run.Args(methods=("ppo",)))


@pytest.fixture(scope="module")
def smoke_here(tmp_path_factory, hdf5_path):
    """The smoke preset (one seed) run here as subprocesses, one torch thread each (as the Ray jobs
    get), and aggregated: shared by the local and the Ray end-to-end tests."""
    root = tmp_path_factory.mktemp("smoke")
    data = write_tiny_data(root / "data", hdf5_path)
    methods = tuple(m for m, spec in run.METHODS.items() if (ROOT / spec["script"]).exists())
    args = run.Args(preset="smoke", data_dir=str(data), out=str(root / "here"), methods=methods,
                    seeds=(0,), jobs=os.cpu_count() or 1)  # fmt: skip
    finished = run.main(args)
    summary = aggregate.main(aggregate.Args(folders=(args.out,)))
    return dict(args=args, finished=finished, summary=summary, methods=methods, data=data)


def test_smoke_preset_end_to_end(smoke_here):
    args, finished, methods = smoke_here["args"], smoke_here["finished"], smoke_here["methods"]
    assert len(finished) == len(methods) and all(r["ok"] for r in finished)
    assert {"bc", "bc-10", "dt", "rgdt"} <= set(methods)
    assert run.main(args) == []  # all finished: nothing runs again
    # run.py's rgdt-full is RGDT with --full-context-loss: its own column, of method rgdt
    assert {c["method"] for c in smoke_here["summary"]["columns"].values()} == {
        m.removesuffix("-full") for m in methods
    }
    out = Path(args.out)
    res = json.loads(next(out.glob("dt__*/results.json")).read_text())
    assert (
        res["benchmark"]["seed"] == 0
        and res["dataset"]["source"] == "file"
        and res["updates"] == 40
    )
    machine = res["benchmark"]["machine"]  # where the number was measured (issue 26)
    assert (
        machine["cpu"]
        and machine["torch"] == res["torch"]
        and machine["device"] == res["device"] == "cpu"
    )
    assert isinstance(machine["bf16"], bool) and machine["bf16"] == res["bf16"]
    assert json.loads(next(out.glob("dt__*/config.json")).read_text())["machine"] == machine
    res = json.loads(next(out.glob("bc-10__*/results.json")).read_text())
    assert (
        res["method"] == "bc"
        and res["args"]["exp_name"] == "bc-10"
        and res["args"]["top_pct"] == 10
    )
    assert res["updates"] == 40 and res["args"]["hidden"] == [32, 32] and len(res["returns"]) == 3
    assert res["run_dir"] == str(
        out / next(out.glob("bc-10__*")).name / "runs" / Path(res["run_dir"]).name
    )
    tables = (out / "tables.md").read_text()
    assert "| BC (ours) | BC (thesis) | 10%BC (ours) | 10%BC (thesis) | DT (ours) |" in tables
    t21 = (
        "| 10%BC (ours) | 10%BC (thesis) | DT (ours) | DT (thesis) | RGDT (ours) | RGDT (thesis) |"
    )
    assert t21 in tables  # Table 2.1: the thesis's 10% BC and DT columns beside RGDT


def comparable(tables: str) -> str:
    """tables.md without what two runs of the same jobs may differ in: wall times, and the commit
    (in this shared checkout others commit while the tests run; the Ray jobs' commit is checked on
    its own)."""
    return re.sub(
        r"commit [0-9a-f]+",
        "commit -",
        re.sub(r"; wall time per seed [0-9.]+ min \(median\)", "", tables),
    )


RAY = importlib.util.find_spec("ray") is not None
# CI installs the extra and sets SEQRL_REQUIRE_RAY=1, so that the Ray test cannot be skipped there
# unseen.
needs_ray = pytest.mark.skipif(
    not RAY and not os.environ.get("SEQRL_REQUIRE_RAY"),
    reason='needs the ray extra: pip install -e ".[ray]"',
)
# One round of 2 jobs on 2 CPUs, both table layouts, a script in benchmarks/ (importing dt.py and
# claims.py) and one at the top: what the engine does not depend on (the method) is the local smoke
# test's.
RAY_METHODS = ("bc-10", "rgdt")


@needs_ray
def test_smoke_preset_through_ray_gives_the_same_jobs_folders_and_tables(
    smoke_here, tmp_path, monkeypatch
):
    """`--ray local` with a local Ray instance of 2 CPUs and 1 (logical) GPU runs the smoke preset
    (10%BC and RGDT) as Ray tasks, 2 jobs per GPU: the same job folders (same keys), the same
    numbers and tables as the same jobs run here, and a rerun resumes (runs nothing, starts no
    Ray)."""
    import ray

    # The instance run.py starts gets 2 CPUs whatever this machine has; the rest is run.py's own
    # ray.init.
    monkeypatch.setattr(
        ray, "init", functools.partial(ray.init, num_cpus=2, num_gpus=1, log_to_driver=False)
    )
    args = dataclasses.replace(
        smoke_here["args"],
        out=str(tmp_path / "ray"),
        methods=RAY_METHODS,
        jobs=0,
        ray="local",
        gpus_per_job=0.5,
    )
    try:
        finished = run.main(args)
    finally:
        ray.shutdown()  # run.py disconnects itself; this only matters when it failed half way
    assert len(finished) == len(RAY_METHODS) and all(r["ok"] for r in finished), finished
    assert run.main(args) == [] and not ray.is_initialized()  # resumed: every job already finished
    here, there = tmp_path / "here", Path(args.out)
    for job in Path(smoke_here["args"].out).glob("*__*"):  # the same jobs, run here by the fixture
        if job.name.split("__")[0] in RAY_METHODS:
            shutil.copytree(job, here / job.name)
    assert sorted(p.name for p in there.glob("*__*")) == sorted(p.name for p in here.glob("*__*"))
    local = aggregate.main(aggregate.Args(folders=(str(here),)))
    summary = aggregate.main(aggregate.Args(folders=(args.out,)))
    assert {c["method"] for c in summary["columns"].values()} == set(RAY_METHODS)
    for label, col in local["columns"].items():
        assert summary["columns"][label]["stats"]["hopper-medium-replay"][
            "per_seed"
        ] == pytest.approx(col["stats"]["hopper-medium-replay"]["per_seed"]), label
    tables = (there / "tables.md").read_text()
    assert "### Table 1.3 layout" in tables and "### Table 2.1 layout" in tables
    assert comparable(tables) == comparable((here / "tables.md").read_text())
    bc_job = next(there.glob("bc-10__*"))
    res = json.loads((bc_job / "results.json").read_text())
    assert res["benchmark"]["ray"]["address"] == "local" and res["git_commit"]
    # the commit the driver saw: HEAD then, an ancestor of HEAD if others committed since
    import subprocess

    assert (
        subprocess.run(
            ["git", "merge-base", "--is-ancestor", res["git_commit"], "HEAD"], cwd=ROOT
        ).returncode
        == 0
    )
    assert Path(res["run_dir"]).parent == bc_job / "runs" and Path(res["run_dir"]).is_dir()
    assert (bc_job / "metrics.jsonl").read_text() and "$ " in (bc_job / "log.txt").read_text()


def test_ray_without_the_extra_is_a_clear_error(tmp_path, hdf5_path, monkeypatch):
    data = write_tiny_data(tmp_path / "data", hdf5_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as without the extra
    args = run.Args(
        preset="smoke", data_dir=str(data), out=str(tmp_path / "out"), methods=("bc",), ray="auto"
    )
    with pytest.raises(
        SystemExit, match=r'--ray needs Ray, an optional extra: pip install -e "\.\[ray\]"'
    ):
        run.main(args)
    assert run.main(dataclasses.replace(args, dry_run=True)) == []  # listing jobs needs no Ray


@needs_ray
def test_ray_without_a_cluster_or_already_connected_is_a_clear_error(
    tmp_path, hdf5_path, monkeypatch
):
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray connection of this process is already open")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # no record of an earlier local cluster to find
    data = write_tiny_data(tmp_path / "data", hdf5_path)
    args = run.Args(
        preset="smoke", data_dir=str(data), out=str(tmp_path / "out"), methods=("bc",), ray="auto"
    )
    with pytest.raises(SystemExit, match="--ray auto: cannot connect .*ray start --head"):
        run.main(args)
    # e.g. a notebook that called ray.init itself
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    with pytest.raises(
        SystemExit, match="Ray is already initialized in this process; run.py connects by itself"
    ):
        run.main(args)


# fmt: skip
@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(gpus_per_job=0.25), "--cpus-per-job / --gpus-per-job size Ray tasks; add --ray"),
        (dict(cpus_per_job=2.0), "--cpus-per-job / --gpus-per-job size Ray tasks; add --ray"),
        (dict(ray="auto", jobs=4), "--jobs 4 is for jobs on this machine"),
        (dict(ray="auto", cpus_per_job=0.0), "--cpus-per-job 0.0: must be > 0"),
        (dict(ray="auto", gpus_per_job=-1.0), "--gpus-per-job -1.0: must be a fraction in"),
        (dict(ray="auto", gpus_per_job=1.5), "--gpus-per-job 1.5: must be a fraction in"),
        (
            dict(ray="auto", device="cuda"),
            "--device cuda with --ray needs GPUs reserved: add --gpus-per-job",
        ),
    ],
)
def test_bad_ray_flags_are_clear_errors(tmp_path, bad, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        run.plan(run.Args(out=str(tmp_path), **bad))


def test_a_ray_jobs_files_land_in_its_folder_results_last(tmp_path):
    """What a Ray task sends back becomes the same job folder a local job leaves; a failed task's
    log is kept (no results.json: it runs again) and its error names this folder, not the node's
    scratch folder."""
    job = dict(
        method="bc",
        dataset="hopper-medium",
        seed=0,
        key="k",
        code="c",
        folder=tmp_path / "out" / "job",
    )
    res = dict(
        normalized_mean=12.5,
        run_dir="/scratch/x/job/runs/R",
        git_commit=None,
        benchmark=dict(method="bc"),
    )
    files = {"results.json": json.dumps(res).encode(), "log.txt": b"$ python bc.py\n",
             "metrics.jsonl": b"{}\n", "runs/R/config.json": b"{}"}  # fmt: skip
    r = run.land(job, dict(ok=True, scratch="/scratch/x/job", node="n1"), files, "abc123", "auto")
    assert r["ok"] and r["score"] == 12.5 and run.is_done(job)
    saved = json.loads((job["folder"] / "results.json").read_text())
    assert saved["run_dir"] == str(job["folder"] / "runs" / "R") and saved["git_commit"] == "abc123"
    assert saved["benchmark"]["ray"] == dict(address="auto", node="n1")
    assert (job["folder"] / "runs" / "R" / "config.json").read_text() == "{}"
    failed = dict(job, folder=tmp_path / "out" / "job2")
    err = dict(ok=False, error="exit code 1, see /scratch/y/job2/log.txt",
               scratch="/scratch/y/job2", node="n2",
               why="error: --resume /scratch/y/job2/runs/R: no model.pt there yet")  # fmt: skip
    r = run.land(failed, err, {"log.txt": b"Traceback"}, "abc123", "auto")
    assert (
        not r["ok"] and not run.is_done(failed) and str(failed["folder"] / "log.txt") in r["error"]
    )
    assert r["why"] == f"error: --resume {failed['folder']}/runs/R: no model.pt there yet"
    assert "n2" in r["error"] and (failed["folder"] / "log.txt").read_text() == "Traceback"


def test_bc_jobs_hash_the_plumbing_they_import_and_method_keys_are_unchanged(tmp_path):
    """bc.py imports dt.py's plumbing and claims.py's numbers: editing those is a new bc job. The
    method files' code hash is still exactly (script, common.py), so no finished job of theirs is
    orphaned."""
    import hashlib

    for script in ("dt.py", "rgdt.py"):
        h = hashlib.sha256(
            (ROOT / script).read_bytes() + (ROOT / "common.py").read_bytes()
        ).hexdigest()
        assert run.source_hash(script) == h
    parts = ("benchmarks/bc.py", "common.py", "dt.py", "benchmarks/claims.py")
    h = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in parts)).hexdigest()
    assert run.source_hash("benchmarks/bc.py") == h
    # The presets' existing commands, as before BC joined them (their keys hash these).
    cpu = run.plan(run.Args(preset="cpu", out=str(tmp_path)))
    assert next(j["cmd"] for j in cpu if j["method"] == "dt" and j["seed"] == 0) == ["dt.py",
                "--env", "hopper-medium-replay", "--seed", "0", "--exp-name", "dt", "--device",
                "auto", "--eval-episodes", "10", "--eval-every", "500", "--n-layer", "3",
                "--n-head", "1", "--n-embd", "128", "--batch-size", "64", "--updates", "2000",
                "--warmup-steps", "500"]  # fmt: skip
    long = run.plan(run.Args(preset="cpu-long", out=str(tmp_path)))
    assert next(j["cmd"] for j in long if j["method"] == "rgdt" and j["seed"] == 1) == ["rgdt.py",
                "--env", "hopper-medium-replay", "--seed", "1", "--exp-name", "rgdt", "--device",
                "auto", "--eval-episodes", "10", "--eval-every", "1000", "--updates", "10000",
                "--inv-updates", "10000", "--warmup-steps", "1000"]  # fmt: skip
    for preset, updates in (("cpu", "10000"), ("cpu-long", "100000")):
        jobs = run.plan(run.Args(preset=preset, out=str(tmp_path)))
        bcs = [j for j in jobs if j["method"] in ("bc", "bc-10")]
        assert len(bcs) == 4 and all(j["cmd"][0] == "benchmarks/bc.py" for j in bcs)
        assert all(j["cmd"][j["cmd"].index("--updates") + 1] == updates for j in bcs)
        assert all(("--top-pct" in j["cmd"]) == (j["method"] == "bc-10") for j in bcs)


def test_bc_columns_beside_the_thesis_baselines(tmp_path):
    """BC and 10%BC stand in Table 1.3's layout beside the thesis's quoted BC / 10% BC columns, and
    10%BC in Table 2.1's (only beside RGDT); the printed totals are the thesis's."""
    fake_result(tmp_path, "bc", "hopper-medium-replay", 0, 20.0)
    fake_result(tmp_path, "bc", "hopper-medium-replay", 1, 30.0)
    fake_result(tmp_path, "bc-10", "hopper-medium-replay", 0, 50.0, cmd_extra=("--top-pct", "10"))
    fake_result(tmp_path, "dt", "hopper-medium-replay", 0, 60.0)
    aggregate.main(aggregate.Args(folders=(str(tmp_path),), reps=50))
    text = (tmp_path / "tables.md").read_text()
    assert (
        "| BC (ours) | BC (thesis) | 10%BC (ours) | 10%BC (thesis) | DT (ours) | DT (thesis) |"
        in text
    )
    assert (
        "| hopper-medium-replay | 25.0 [20.0, 30.0] (n=2) | 18.10 | 50.0 [50.0, 50.0] (n=1) | "
        "75.90 | "
        "60.0 [60.0, 60.0] (n=1) |" in text
    )
    assert "| thesis's printed total (all rows) | — | 466.7 | — | 666.2 | — | 672.6 |" in text
    assert "### Table 2.1 layout" not in text  # no RGDT: 10%BC would only repeat Table 1.3's column
    fake_result(tmp_path, "rgdt", "hopper-medium", 0, 70.0)
    fake_result(tmp_path, "bc-10", "hopper-medium", 0, 40.0, cmd_extra=("--top-pct", "10"))
    # replaces its own tables
    aggregate.main(aggregate.Args(folders=(str(tmp_path),), reps=50, force=True))
    t21 = (tmp_path / "tables.md").read_text().split("### Table 2.1")[1]
    assert "| dataset | 10%BC (ours) | 10%BC (thesis) | RGDT (ours) | RGDT (thesis) |" in t21
    assert (
        "| hopper-medium | 40.0 [40.0, 40.0] (n=1) | 56.90 | 70.0 [70.0, 70.0] (n=1) | 93.20 |"
        in t21
    )
    assert "| thesis's printed total (all rows) | — | 487.2 | — | 539.0 |" in t21


def test_thesis_baseline_numbers_are_table_1_3_and_2_1():
    from claims import TABLE_2_1, THESIS

    assert round(sum(THESIS["bc"].values()), 1) == 466.7  # Table 1.3's printed BC total
    assert round(sum(THESIS["bc-10"].values()), 1) == 666.2  # and 10% BC total
    # Table 2.1's 10% BC, total 487.2
    table_2_1 = dict(zip(TABLE_2_1, [42.5, 56.9, 75.0, 92.9, 110.9, 109.0]))
    assert {d: THESIS["bc-10"][d] for d in TABLE_2_1} == table_2_1 and round(
        sum(table_2_1.values()), 1
    ) == 487.2
    assert (
        THESIS["bc"]["hopper-medium-replay"] == 18.1
        and THESIS["bc-10"]["walker2d-medium-replay"] == 62.5
    )
