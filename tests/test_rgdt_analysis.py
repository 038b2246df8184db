"""benchmarks/rgdt_analysis.py: Fig. 2.2 (state correlation, the decoder-only GPT's full-context vs
final-token attention), §2.4 aim (3) (seq2seq against decoder-only: score, held-out NLL, attention,
verdict) and the decoder attention of a trained rgdt.py checkpoint."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import rgdt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import rgdt_analysis  # noqa: E402


# what every analysis writes; a checkpoint adds the attention figure
OUTPUTS = {"fig2_2.png", "fig2_2.json", "aim3.png", "aim3.json", "metrics.jsonl", "args.json"}


def test_state_correlation_on_a_hand_made_sequence():
    # one dim alternates +1, -1: corr(k) = (-1)^k
    x = np.array([1, -1, 1, -1, 1, -1, 1, -1], np.float64)[:, None]
    corr = rgdt_analysis.state_correlation(x, np.zeros(8, int), np.full(8, 8), 3)
    np.testing.assert_allclose(corr[:, 0], [1, -1, 1, -1])
    # pairs never cross an episode boundary: two episodes (0..3, 4..7) with the same ramp
    ramp = np.array([0, 1, 2, 3, 0, 1, 2, 3], np.float64)[:, None]
    c = rgdt_analysis.state_correlation(ramp, np.repeat([0, 4], 4), np.repeat([4, 8], 4), 1)
    # (0,1), (1,2), (2,3) twice: perfectly correlated; (3,0) would break it
    np.testing.assert_allclose(c[1, 0], 1.0)


def regime(newest_two, entropy):
    return dict(final_row_newest_two=newest_two, final_row_entropy=entropy, uniform_entropy=1.6)


def fig(corr, full, final, control=(0.4, 1.6), **per_seed):
    att = dict(full_context=regime(*full), final_token=regime(*final), control=regime(*control))
    return dict(correlation_mean=corr, attention=att | ({"per_seed": per_seed} if per_seed else {}))


def test_fig_2_2_claims_on_hand_made_summaries():
    verdicts = lambda f: [c["verdict"] for c in rgdt_analysis.fig_2_2_claims(f, 3)]  # noqa: E731
    assert verdicts(fig([1.0, 0.9, 0.8, 0.7], (0.8, 1.0), (0.5, 1.5))) == ["holds", "holds"]
    # nearer than the final-token GPT but not 1.2x beyond the untrained one: nothing learned to
    # decide on
    assert verdicts(fig([1.0, 0.9, 0.95, 0.7], (0.8, 1.0), (0.5, 1.5), control=(0.7, 1.6)))[1] == (
        "not decidable at this budget"
    )
    assert verdicts(fig([1.0, 0.9, 0.95, 0.7], (0.4, 1.6), (0.5, 1.5))) == [
        "does not hold",
        "does not hold",
    ]
    # a seed-to-seed spread larger than the gap: not decidable
    spread = dict(near_gap=[0.6, -0.2], entropy_gap=[0.5, 0.5])
    assert (
        verdicts(fig([1.0, 0.9, 0.8, 0.7], (0.8, 1.0), (0.5, 1.5), **spread))[1]
        == "not decidable at this budget"
    )
    c = rgdt_analysis.fig_2_2_claims(fig([1.0, 0.9, 0.8, 0.7], (0.8, 1.0), (0.5, 1.5)), 3)
    assert (
        c[1]["control"] == "newest 2 steps 0.400, entropy 1.600"
        and "(a property of the data)" in c[0]["control"]
    )


def aim(seq2seq, gpt, nll=(-5.0, -4.0), control_nll=(3.0, 3.0)):
    """Aim (3)'s numbers: per-seed scores of seq2seq and GPT, their NLLs and the controls'."""
    n = len(seq2seq)
    per = {
        "seq2seq_score": seq2seq,
        "gpt_score": gpt,
        "seq2seq_control_score": [1.0] * n,
        "gpt_control_score": [1.0] * n,
    }
    per |= {"seq2seq_nll": [nll[0]] * n, "gpt_nll": [nll[1]] * n}
    per |= {"seq2seq_control_nll": [control_nll[0]] * n, "gpt_control_nll": [control_nll[1]] * n}
    return {"per_seed": per, **{k: float(np.mean(v)) for k, v in per.items()}}


def test_aim_3_claims_need_seeds_and_learned_models():
    verdicts = lambda a: [c["verdict"] for c in rgdt_analysis.aim_3_claims(a)]  # noqa: E731
    assert verdicts(aim([50.0, 52.0, 51.0], [30.0, 33.0, 31.0])) == ["holds", "holds"]
    assert (
        verdicts(aim([30.0, 31.0, 29.0], [50.0, 52.0, 51.0], nll=(-4.0, -5.0)))
        == ["does not hold"] * 2
    )
    # spread
    assert (
        verdicts(aim([50.0, 20.0, 51.0], [30.0, 40.0, 31.0]))[0] == "not decidable at this budget"
    )
    one = rgdt_analysis.aim_3_claims(aim([50.0], [30.0]))
    assert [c["verdict"] for c in one] == [
        "not decidable at this budget"
    ] * 2 and "one seed" in one[0]["ours"]
    untrained = rgdt_analysis.aim_3_claims(
        aim([50.0, 52.0], [30.0, 31.0], control_nll=(-4.95, 3.0))
    )
    assert (
        untrained[0]["verdict"] == "not decidable at this budget"
        and "did not learn" in untrained[0]["ours"]
    )


def tiny(tmp_path, hdf5_path, **kw):
    base = dict(
        env="hopper-random",
        dataset_path=(str(hdf5_path),),
        out=str(tmp_path / "out"),
        updates=10,
        inv_updates=10,
        batch_size=8,
        eval_episodes=2,
        log_every=5,
    )
    return rgdt_analysis.Args(**{**base, **kw})


def test_fig_2_2_and_aim_3_from_a_dataset(tmp_path, hdf5_path, monkeypatch, capsys):
    # the indicator each update of the three predictors trains with
    flags, state_loss = ([], rgdt.state_loss)

    def recording_loss(*a):
        flags.append(a[-1])
        return state_loss(*a)

    monkeypatch.setattr(rgdt, "state_loss", recording_loss)
    res = rgdt_analysis.main(tiny(tmp_path, hdf5_path))
    # GPT full-context, GPT final-token, seq2seq
    assert flags == [True] * 10 + [False] * 10 + [False] * 10
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == OUTPUTS
    fig = json.loads((out / "fig2_2.json").read_text())
    # k = 0..K_r
    assert fig["correlation_mean"][0] == pytest.approx(1.0) and len(fig["correlation_mean"]) == 21
    for regime in ("final_token", "full_context", "control"):
        maps = np.array(fig["attention"][regime]["self_maps"])  # the GPT's state rows, per step
        # §2.4's 3 layers
        assert maps.shape == (3, 5, 5) and np.allclose(maps.sum(-1), 1.0, atol=1e-5)
        assert np.allclose(np.triu(maps, 1), 0)  # causal over steps
    # same init, same batches: only the indicator differs, and it must change what the GPT attends
    # to
    assert not np.allclose(
        fig["attention"]["final_token"]["self_maps"], fig["attention"]["full_context"]["self_maps"]
    )
    three = {"holds", "does not hold", "not decidable at this budget"}
    assert {c["verdict"] for c in res["claims"]} <= three and len(res["claims"]) == 4
    assert res["claims"][2]["verdict"] == "not decidable at this budget"  # one seed
    aim3 = json.loads((out / "aim3.json").read_text())
    assert len(aim3["per_seed"]["seq2seq_score"]) == 1 and np.isfinite(aim3["gpt_nll"])
    seq2seq = aim3["per_seed_models"][0]["seq2seq"]["attention"]
    # the translator's cross-attention on K_r returns
    assert np.array(seq2seq["cross_maps"]).shape == (3, 5, 20)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["phase"] == "analyze_gpt_full_context"] == [
        0,
        5,
        9,
    ]
    assert [line["step"] for line in lines if line["phase"] == "analyze_inverse"] == [0, 5, 9]
    printed = capsys.readouterr().out
    assert (
        "| thesis claim" in printed
        and "random-init control" in printed
        and "§2.4 aim (3)" in printed
    )
    before = (out / "fig2_2.json").read_text()
    with pytest.raises(SystemExit, match="holds files; .* --force"):
        rgdt_analysis.main(tiny(tmp_path, hdf5_path))
    assert (out / "fig2_2.json").read_text() == before  # never overwritten
    # unless asked: a new log, not one appended to
    rgdt_analysis.main(tiny(tmp_path, hdf5_path, force=True))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["phase"] == "analyze_gpt_full_context"] == [
        0,
        5,
        9,
    ]


def test_held_out_episodes_are_never_trained_on(tmp_path, hdf5_path, monkeypatch):
    seen = []
    make_dataset = rgdt.make_dataset
    monkeypatch.setattr(
        rgdt,
        "make_dataset",
        lambda eps, *a, **k: seen.append(len(eps)) or make_dataset(eps, *a, **k),
    )
    args = tiny(tmp_path, hdf5_path)
    ckpt, info, arch, sets = rgdt_analysis.prepare(args, rgdt.torch.device("cpu"))
    train, held = seen
    assert held == (train + held) // 10 and len(sets["held"]["states"]) < len(
        sets["train"]["states"]
    )
    # train's scale
    np.testing.assert_array_equal(sets["held"]["state_stats"][0], sets["train"]["state_stats"][0])


def test_attention_of_a_checkpoint(tmp_path, hdf5_path):
    args = dict(
        env="hopper-random",
        dataset_path=(str(hdf5_path),),
        updates=6,
        inv_updates=4,
        batch_size=8,
        n_embd=32,
        n_enc_layer=1,
        n_layer=2,
        n_head=2,
        inv_hidden=32,
        eval_every=0,
        eval_episodes=2,
        runs_dir=str(tmp_path / "runs"),
    )
    trained = rgdt.train(rgdt.Args(**args))
    ckpt = str(Path(trained["run_dir"]) / "model.pt")
    res = rgdt_analysis.main(
        rgdt_analysis.Args(
            checkpoint=ckpt,
            out=str(tmp_path / "a"),
            updates=4,
            inv_updates=4,
            batch_size=8,
            eval_episodes=2,
        )
    )
    out = tmp_path / "a"
    assert {p.name for p in out.iterdir()} == OUTPUTS | {"attention.png", "attention.json"}
    att = json.loads((out / "attention.json").read_text())
    # same weights, same env seeds -> the same episodes as rgdt.py's own evaluation of the
    # checkpoint in fp32, up to float noise (the analysis takes the explicit softmax). The training
    # run's evaluation is no reference: in bf16, where the CPU has it, hopper's episodes drift apart
    # by percents
    alone = rgdt.train(
        rgdt.Args(
            checkpoint=ckpt, updates=0, bf16=False, eval_episodes=2, runs_dir=str(tmp_path / "e")
        )
    )
    assert att["returns"] == pytest.approx(alone["returns"], rel=1e-4)
    self_maps, cross = np.array(att["self_maps"]), np.array(att["cross_maps"])
    # the checkpoint's architecture
    assert self_maps.shape == (2, 5, 5) and cross.shape == (2, 5, 20)
    assert (
        np.allclose(np.triu(self_maps, 1), 0)
        and np.allclose(cross.sum(-1), 1.0, atol=1e-5)
        and att["samples"] > 0
    )
    # Fig. 2.2 at its size too
    assert np.array(res["attention"]["final_token"]["self_maps"]).shape == (2, 5, 5)
    assert np.array(res["aim3"]["per_seed"]["seq2seq_nll"]).shape == (1,)


def test_bad_flags_are_named(tmp_path, hdf5_path):
    with pytest.raises(SystemExit, match="--updates 0: must be > 0"):
        tiny(tmp_path, hdf5_path, updates=0)
    with pytest.raises(SystemExit, match="no such file"):
        rgdt_analysis.main(tiny(tmp_path, hdf5_path, checkpoint=str(tmp_path / "none.pt")))
    with pytest.raises(SystemExit, match="--held-out-every 1: must be >= 2"):
        tiny(tmp_path, hdf5_path, held_out_every=1)
    with pytest.raises(SystemExit, match="--held-out-every 100000: .* leave none to hold out"):
        rgdt_analysis.main(tiny(tmp_path, hdf5_path, held_out_every=100_000))
    with pytest.raises(SystemExit, match="--seeds"):
        tiny(tmp_path, hdf5_path, seeds=())
    assert not (tmp_path / "out").exists()


def test_resume_continues_a_stopped_analysis_and_combines_seeds_run_apart(
    tmp_path, hdf5_path, monkeypatch
):
    straight = rgdt_analysis.main(tiny(tmp_path, hdf5_path, out=str(tmp_path / "a"), seeds=(0, 1)))
    out = tmp_path / "b"
    calls, update = [], rgdt.update

    # a stop in the second predictor of seed 0, after its lines at steps 0 and 5
    def stopped(*a, **kw):
        calls.append(1)
        if len(calls) == 17:
            raise KeyboardInterrupt
        return update(*a, **kw)

    monkeypatch.setattr(rgdt, "update", stopped)
    with pytest.raises(KeyboardInterrupt):
        rgdt_analysis.main(tiny(tmp_path, hdf5_path, out=str(out), seeds=(0,), resume=True))
    monkeypatch.setattr(rgdt, "update", update)
    assert sorted(p.name for p in (out / "models").iterdir()) == [
        "seed0_gpt_full_context.pt",
        "seed0_inverse.pt",
    ]
    # another seed apart
    rgdt_analysis.main(tiny(tmp_path, hdf5_path, out=str(out), seeds=(1,), resume=True))
    with pytest.raises(SystemExit, match=r"--resume .*other flags \(updates\)"):
        rgdt_analysis.main(
            tiny(tmp_path, hdf5_path, out=str(out), seeds=(0, 1), resume=True, updates=11)
        )
    combined = rgdt_analysis.main(
        tiny(tmp_path, hdf5_path, out=str(out), seeds=(0, 1), resume=True)
    )
    assert combined["aim3"] == straight["aim3"] and combined["claims"] == straight["claims"]

    def log(folder):  # the same lines, none twice, whatever order the processes wrote them in
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return sorted(lines, key=lambda x: (x["seed"], x["phase"], x["step"]))

    assert log(out) == log(tmp_path / "a") and len(log(out)) == 2 * 4 * 3
