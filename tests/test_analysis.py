"""benchmarks/claims.py (the verdict rule), attention.py (Fig. 1.1-1.3) and grad_cosines.py (Chapter
3)."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import attention  # noqa: E402
import claims  # noqa: E402
import grad_cosines  # noqa: E402

import dt  # noqa: E402
import mo_dt  # noqa: E402
import trdt  # noqa: E402


def tiny(tmp_path, hdf5_path, **kw) -> dict:
    """Args of a 3-update run of any method file on the test's hopper data."""
    base = dict(env="hopper-random", dataset_path=(str(hdf5_path),), updates=3, batch_size=4,
                n_embd=16, n_layer=1, n_head=1, context_len=4, eval_every=0, eval_episodes=1,
                runs_dir=str(tmp_path / "runs"))  # fmt: skip
    return base | kw


def results_of(
    method,
    args,
    name="hopper-medium-replay",
    source="d4rl",
    mean=79.4,
    std=0.0,
    updates=100_000,
    **kw,
):
    """A results.json as the method files write it."""
    arch = {
        k: getattr(args, k)
        for k in args.__class__.__dataclass_fields__
        if k in getattr(sys.modules[method], "ARCH")
    }
    domain = name.split("-")[0]
    target = (
        args.target_return
        if args.target_return is not None
        else sys.modules[method].TARGET_RETURNS[domain]
    )
    return dict(
        method=method,
        args=vars(args),
        arch=arch,
        dataset=dict(name=name, source=source),
        target_return=target,
        normalized_mean=mean,
        normalized_std=std,
        returns=[0.0] * 10,
        updates=updates,
        trained_updates=updates,
        **kw,
    )


def test_the_verdict_rule():
    assert (
        claims.verdict(79.0, 80.0, 1.0) == "reproduced"
        and claims.verdict(78.5, 80.0, 1.0) == "partly"
    )
    assert claims.verdict(77.0, 80.0, 1.0) == "not reproduced"


def test_table_1_3_is_judged_only_at_table_1_1_and_1_2():
    verdict = lambda **kw: claims.score_claim(
        results_of("mo_dt", mo_dt.Args(**kw.pop("args", {})), **kw)
    )["verdict"]  # noqa: E731
    # Table 1.3 MO-DT hopper-medium-replay: 79.43 ± 5.2
    assert verdict(mean=79.43 - 5.0) == "reproduced" and verdict(mean=79.43 + 10.0) == "partly"
    assert verdict(mean=60.0) == "not reproduced"
    assert verdict(updates=10).startswith(
        "not comparable: differs from the thesis's configuration in updates"
    )
    assert "lambdas" in verdict(args=dict(lambdas=(0.5, 0.25, 0.25)))
    # DT's target, not 7200
    assert "target_return (Table 1.2)" in verdict(args=dict(target_return=3600.0))
    assert "timestep_embedding" in verdict(args=dict(timestep_embedding=True))
    assert verdict(source="replica").endswith("(replica (not D4RL) data, not the thesis's files)")
    trdt_verdict = claims.score_claim(results_of("trdt", trdt.Args(bins=5), mean=97.8))["verdict"]
    assert "bins" in trdt_verdict
    # no thesis number
    assert claims.score_claim(results_of("mo_dt", mo_dt.Args(), name="hopper-random")) is None


def test_dt_without_a_printed_spread_is_judged_with_ours():
    res = results_of("dt", dt.Args(), mean=80.0, std=5.0)  # Table 1.3 DT: 82.7, no ±
    assert claims.score_claim(res)["verdict"] == "reproduced"
    gauss = results_of("dt", dt.Args(policy="gaussian"), mean=80.0, std=1.0)  # ODT-O: 86.64
    assert (
        claims.method_of(gauss) == "dt-gaussian"
        and claims.score_claim(gauss)["verdict"] == "not reproduced"
    )


def test_table_2_1_is_judged_only_at_the_section_2_4_configuration():
    base = dict(
        method="rgdt",
        dataset=dict(name="hopper-medium", source="d4rl"),
        target_return=None,
        returns=[0.0] * 10,
        updates=150_000,
        trained_updates=150_000,
        inv_updates=200_000,
        trained_inv_updates=200_000,
    )
    args = {**claims.SECTION_2_4, "exp_name": "rgdt"}
    verdict = lambda mean=90.0, **kw: claims.score_claim(  # noqa: E731
        {
            **base,
            "args": {**args, **kw.pop("args", {})},
            "normalized_mean": mean,
            "normalized_std": 5.0,
            **kw,
        }
    )["verdict"]
    # Table 2.1 prints no spread: ours over the episodes; hopper-medium 93.2
    assert (
        verdict() == "reproduced"
        and verdict(mean=85.0) == "partly"
        and verdict(mean=80.0) == "not reproduced"
    )
    assert "full_context_loss" in verdict(args=dict(full_context_loss=True))
    assert "n_embd" in verdict(args=dict(n_embd=128)) and "lr" in verdict(args=dict(lr=1e-3))
    assert "updates, inv_updates" in verdict(trained_updates=2000, trained_inv_updates=2000)


def test_later_blocks_predominantly_on_actions():
    mods = ["rtg", "states", "actions"]
    claim = claims.later_blocks_claim("mo_dt", [[0.4, 0.4, 0.2], [0.2, 0.3, 0.5]], mods, 5)
    assert claim["claim"].startswith("Fig. 1.2") and claim["verdict"] == "reproduced"
    # more action mass than in block 1 is not "predominantly actions": states still lead in the
    # later blocks
    assert claims.later_blocks_claim(
        "mo_dt", [[0.4, 0.5, 0.1], [0.2, 0.5, 0.3], [0.2, 0.4, 0.4]], mods, 5
    )["verdict"] == ("not reproduced")
    assert (
        claims.later_blocks_claim(
            "mo_dt", [[0.4, 0.5, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6]], mods, 5
        )["verdict"]
        == "partly"
    )
    trdt_mods = ["rtg", "states", "regions", "actions"]
    claim = claims.later_blocks_claim(
        "trdt", [[0.4, 0.4, 0.1, 0.1], [0.2, 0.2, 0.3, 0.3]], trdt_mods, 5
    )
    assert (
        claim["verdict"] == "reproduced"
        and "block 2: rtg 0.20, states 0.20, regions 0.30, actions 0.30" in claim["ours"]
    )
    assert claims.later_blocks_claim(
        "trdt", [[0.4, 0.4, 0.1, 0.1], [0.25, 0.45, 0.15, 0.15]], trdt_mods, 5
    )["verdict"] == ("not reproduced")
    assert claims.later_blocks_claim("mo_dt", [[0.4, 0.4, 0.2], [0.2, 0.3, 0.5]], mods, 0)[
        "verdict"
    ].startswith("not measured")


def test_attention_recorder_on_hand_made_weights(tmp_path):
    """Two heads, K = 2; head 0: s_1 -> g_1, s_2 -> s_1 and s_2 halves;
    head 1: s_1 -> g_1 and s_1 halves, s_2 -> a_1."""
    M, K = 3, 2
    g, s, a = 0, 1, 2  # token order (g_t, s_t, a_t), Eq. 1.1
    att = torch.zeros(2, 2, M * K, M * K)  # (N, nh, T, T); the second sample is a finished episode
    att[0, 0, s, g] = 1.0
    att[0, 0, M + s, [s, M + s]] = 0.5
    att[0, 1, s, [g, s]] = 0.5
    att[0, 1, M + s, a] = 1.0
    att[1] = 7.0  # garbage: must not be counted
    rec = attention.AttentionRecorder(1, 2, K, dt.MODALITIES)
    rec([att], torch.tensor([True, False]))
    out = rec.summary()
    assert out["modality_mass_mean"] == [pytest.approx([0.375, 0.375, 0.25])]
    # across heads, not rows
    assert out["modality_mass_std_across_heads"] == [pytest.approx([0.125, 0.125, 0.25])]
    assert out["entropy_per_head"] == [pytest.approx([math.log(2) / 2] * 2)] and out["samples"] == 1
    maps = np.array(out["state_row_maps"][0])  # averaged over heads
    assert (
        maps.shape == (K, M * K) and maps[0, g] == 0.75 and maps[0, s] == 0.25 and maps[1, a] == 0.5
    )
    attention.plot_one(out, tmp_path / "a.png", "hand-made")
    assert (tmp_path / "a.png").stat().st_size > 0


def test_attention_comparison_from_checkpoints(tmp_path, hdf5_path):
    base = tiny(tmp_path, hdf5_path, n_layer=2, n_head=2)
    runs = {
        m: Path(mod.train(mod.Args(**base))["run_dir"]) for m, mod in (("dt", dt), ("trdt", trdt))
    }
    out = tmp_path / "cmp"
    summary = attention.main(
        attention.Args(
            runs=(f"dt={runs['dt']}", f"trdt={runs['trdt'] / 'model.pt'}"),
            out=str(out),
            eval_episodes=3,
        )
    )
    assert len(summary["models"]) == 2 and (out / "attention_comparison.png").stat().st_size > 0
    assert (out / "dt_0.png").stat().st_size > 0 and json.loads((out / "trdt_1.json").read_text())[
        "samples"
    ] > 0
    for s, k in zip(summary["models"].values(), (3, 4)):
        assert len(s["modality_mass_mean"]) == 2 and len(s["modalities"]) == k
        assert abs(sum(s["modality_mass_mean"][0]) - 1) < 1e-4
    assert [c["claim"][:8] for c in summary["claims"]] == ["Fig. 1.1", "Fig. 1.3"]
    # beside a random-init control on the same contexts, with one of the three verdicts
    assert all(
        c["verdict"] in ("holds", "does not hold", "not decidable at this budget")
        for c in summary["claims"]
    )
    control = json.loads((out / "dt_0_control.json").read_text())
    assert control["samples"] == json.loads((out / "dt_0.json").read_text())["samples"]
    assert all("control_modality_mass_mean" in s for s in summary["models"].values())
    with pytest.raises(SystemExit, match="holds files; .* --force"):
        attention.main(attention.Args(runs=(f"dt={runs['dt']}",), out=str(out)))
    with pytest.raises(SystemExit, match="expected method=run_folder"):
        attention.main(attention.Args(runs=(f"ppo={runs['dt']}",), out=str(tmp_path / "x")))


def test_gradient_cosines_are_true_cosines_on_the_shared_parameters():
    torch.manual_seed(0)
    arch = dict(
        state_dim=3,
        act_dim=2,
        gaussian_heads=True,
        timestep_embedding=False,
        context_len=4,
        n_layer=1,
        n_head=1,
        n_embd=8,
        dropout=0.0,
        max_ep_len=10,
        rtg_scale=1.0,
    )
    model = mo_dt.MultiObjectiveDecisionTransformer(**arch)
    shared = grad_cosines.shared_parameters(model)
    # every head has a weight and a bias
    assert len(shared) == len(list(model.parameters())) - 2 * len(mo_dt.TASKS)
    x = dict(
        rtg=torch.randn(2, 4, 1),
        states=torch.randn(2, 4, 3),
        actions=torch.rand(2, 4, 2) * 2 - 1,
        timesteps=torch.arange(4).repeat(2, 1),
    )
    preds = model(x)
    losses = {k: preds[k][0].square().mean() for k in mo_dt.TASKS}
    scaled = {"action": losses["action"], "state": 3 * losses["action"], "return": losses["return"]}
    res = grad_cosines.task_gradient_cosines(model, scaled)
    # the same loss scaled: cosine 1, not a stale value
    assert res["cos_action_state"] == pytest.approx(1.0, abs=1e-5)
    assert res["grad_norm_state"] == pytest.approx(3 * res["grad_norm_action"], rel=1e-5)
    assert abs(res["cos_action_return"]) < 0.999


def test_gradient_cosine_benchmark_end_to_end(tmp_path, hdf5_path):
    sizes = "--n-layer 1 --n-head 1 --n-embd 16 --batch-size 4 --warmup-steps 2"
    args = grad_cosines.Args(method="trdt", env="hopper-random", dataset_path=(str(hdf5_path),),
                             updates=6, every=3, sizes=sizes, out=str(tmp_path / "gc"),
                             schedule="alternating")  # fmt: skip
    summary = grad_cosines.main(args)
    assert [h["step"] for h in summary["history"]] == [0, 3, 5] and len(
        [k for k in summary["history"][0] if "cos_" in k]
    ) == 6
    assert (tmp_path / "gc" / "grad_cosines.png").stat().st_size > 0 and summary["claims"][0][
        "claim"
    ].startswith("Ch. 3")
    with pytest.raises(SystemExit, match="holds files; .* --force"):
        grad_cosines.main(args)


def test_target_sweep_evaluates_a_checkpoint_at_each_target(tmp_path, hdf5_path):
    import target_sweep

    base = tiny(tmp_path, hdf5_path)
    run = Path(dt.train(dt.Args(**base))["run_dir"])
    out = tmp_path / "sweep"
    res = target_sweep.main(
        target_sweep.Args(
            runs=(f"dt={run}",), targets=(3600.0, 10.0), eval_episodes=2, out=str(out)
        )
    )
    rows = res["results"][0]["rows"]
    assert [r["target"] for r in rows] == [3600.0, 10.0] and all(
        len(r["lengths"]) == 2 for r in rows
    )
    assert (out / "target_sweep.png").stat().st_size > 0 and res["results"][0][
        "trained_updates"
    ] == 3
    with pytest.raises(SystemExit, match="holds files; .* --force"):
        target_sweep.main(target_sweep.Args(runs=(f"dt={run}",), out=str(out)))


def test_curves_read_a_stopped_run_up_to_its_last_line(tmp_path):
    """benchmarks/curves.py: a run killed mid-write (no results.json, last line cut) still gives its
    curve."""
    import curves

    run = tmp_path / "job" / "runs" / "hopper-medium-replay__dt__0__1"
    run.mkdir(parents=True)
    (run / "config.json").write_text(
        json.dumps(dict(method="dt", args=dict(env="hopper-medium-replay", updates=50)))
    )
    rows = [dict(step=0, eval_normalized=4.0, eval_normalized_std=0.1), dict(step=0, loss=0.5),
            dict(step=10, loss=0.3), dict(step=20, eval_normalized=30.0, eval_normalized_std=5.0),
            dict(step=30, eval_normalized=12.0, eval_normalized_std=1.0)]  # fmt: skip
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 40, "lo'
    )
    out = tmp_path / "curves"
    res = curves.main(curves.Args(runs=(f"DT={tmp_path / 'job'}",), out=str(out)))
    (r,) = res["runs"]
    assert [e["step"] for e in r["evals"]] == [0, 20, 30] and [e["loss"] for e in r["losses"]] == [
        0.5,
        0.3,
    ]
    assert r["final"] == dict(step=30, normalized=12.0) and r["best"] == dict(
        step=20, normalized=30.0
    )
    assert not r["finished"] and r["dataset"] == "hopper-medium-replay"
    assert (
        "| DT | dt | hopper-medium-replay | 30 of 50 | 12.0 (at 30) | 30.0 (20) | no (stopped) |"
        in (out / "curves.md").read_text()
    )
    assert (out / "curves.png").stat().st_size > 0 and json.loads(
        (out / "curves.json").read_text()
    )["runs"]
    with pytest.raises(SystemExit, match="nothing is overwritten"):
        curves.main(curves.Args(runs=(f"DT={run}",), out=str(out)))
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        curves.main(curves.Args(runs=(f"DT={tmp_path / 'curves'}",), out=str(tmp_path / "c2")))
    with pytest.raises(SystemExit, match="expected label=folder"):
        curves.main(curves.Args(runs=(str(run),), out=str(tmp_path / "c3")))


def test_eval_context_sweeps_a_checkpoint_over_k_prime(tmp_path, hdf5_path):
    """benchmarks/eval_context.py (issue 27, item 4): a DT and a TRDT checkpoint (K = 4) at K' = 1,
    2 and K; K' = 8 > K is left out; K' = K is the method file's own evaluation."""
    import eval_context

    runs = {
        m: Path(mod.train(mod.Args(**tiny(tmp_path, hdf5_path)))["run_dir"])
        for m, mod in (("dt", dt), ("trdt", trdt))
    }
    out = tmp_path / "ctx"
    args = eval_context.Args(runs=(f"dt={runs['dt']}", f"trdt={runs['trdt']}"), contexts=(1, 2, 8),
                             eval_episodes=2, controls=2, out=str(out))  # fmt: skip
    res = eval_context.main(args)
    saved = json.loads((out / "eval_context.json").read_text())
    assert (out / "eval_context.png").stat().st_size > 0 and saved["results"] == json.loads(
        json.dumps(res["results"])
    )
    for r in res["results"]:
        assert (
            [row["context"] for row in r["rows"]] == [1, 2, 4]
            and r["skipped"] == [8]
            and r["K"] == 4
        )
        assert all(len(row["normalized"]) == 2 for row in r["rows"]) and len(r["control_rows"]) == 2
        assert r["verdict"]["verdict"] in ("holds", "does not hold", "not decidable at this budget")
    ckpt = dt.load_checkpoint(str(runs["dt"] / "model.pt"), torch.device("cpu"))
    model = dt.DecisionTransformer(**ckpt["arch"])
    model.load_state_dict(ckpt["model"])
    stats = (ckpt["state_mean"].numpy(), ckpt["state_std"].numpy())
    settings = dt.Args(checkpoint="x", updates=0, eval_episodes=2)
    off = torch.autocast("cpu", enabled=False)
    plain = dt.evaluate(model, ckpt["dataset"], stats, settings, 3600.0, torch.device("cpu"), off)
    assert res["results"][0]["rows"][-1]["normalized"] == pytest.approx(plain["normalized"])
    with pytest.raises(SystemExit, match="holds files; .* --force"):
        eval_context.main(args)


def test_eval_context_verdict_and_bad_input(tmp_path):
    import eval_context

    def rows(short, full, k=(1, 20)):
        return [dict(context=k[0], normalized=short, normalized_mean=float(np.mean(short))),
                dict(context=k[1], normalized=full,
                     normalized_mean=float(np.mean(full)))]  # fmt: skip

    flat = [rows([2.0, 2.1, 1.9], [2.0, 2.1, 1.9])] * 3  # random-init controls: no drop
    assert (
        eval_context.shorter_hurts(rows([10.0, 12.0, 11.0], [30.0, 33.0, 31.0]), flat, 20)[
            "verdict"
        ]
        == "holds"
    )
    assert eval_context.shorter_hurts(rows([30.0, 33.0, 31.0], [30.0, 32.0, 31.0]), flat, 20)[
        "verdict"
    ] == ("does not hold")
    noisy = rows([10.0, 40.0, 11.0], [30.0, 12.0, 31.0])  # a drop the episodes do not agree on
    assert eval_context.shorter_hurts(noisy, flat, 20)["verdict"] == "not decidable at this budget"
    # a drop of 0.4 on every episode: consistent, but under one normalized point it does not hurt
    assert (
        eval_context.shorter_hurts(rows([2.3] * 3, [2.7] * 3), flat, 20)["verdict"]
        == "does not hold"
    )
    # random inits that drop all ways
    varied = [rows([2.0] * 3, [2.0 + d] * 3) for d in (-15.0, 0.0, 15.0)]
    assert eval_context.shorter_hurts(rows([10.0, 12.0, 11.0], [30.0, 33.0, 31.0]), varied, 20)[
        "verdict"
    ] == ("not decidable at this budget")
    with pytest.raises(SystemExit, match="--contexts"):
        eval_context.Args(runs=("dt=x",), contexts=(0, 2))
    with pytest.raises(SystemExit, match="expected method=run_folder"):
        eval_context.main(eval_context.Args(runs=(f"ppo={tmp_path}",), out=str(tmp_path / "o")))
    with pytest.raises(SystemExit, match="no model.pt there"):
        eval_context.main(eval_context.Args(runs=(f"dt={tmp_path}",), out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()
