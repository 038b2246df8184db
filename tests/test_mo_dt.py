import json
import math
import subprocess
from dataclasses import asdict
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import mo_dt

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(tmp_path, hdf5_path, **kw):
    base = dict(env="hopper-random", dataset_path=(str(hdf5_path),), updates=20, batch_size=8, n_embd=32, n_layer=2,
                n_head=2, warmup_steps=5, eval_every=10, eval_episodes=2, runs_dir=str(tmp_path / "runs"), log_every=5,
                grad_cos_every=10)
    return mo_dt.Args(**{**base, **kw})


def episodes(lengths=(3, 4), dim=2):
    """State of step t in episode i = (1000 i + t) in every dimension; reward 1 per step; action = i."""
    eps = []
    for i, n in enumerate(lengths):
        eps.append(dict(observations=np.repeat(np.arange(n, dtype=np.float32)[:, None] + 1000 * i, dim, 1),
                        actions=np.full((n, 1), float(i), np.float32), rewards=np.ones(n, np.float32), terminated=True))
    return eps


def test_next_state_and_return_targets_are_masked_at_episode_ends():
    data = mo_dt.make_dataset(episodes((3, 4)), torch.device("cpu"), rtg_scale=1.0, max_ep_len=100)
    assert data["has_next"].tolist() == [True, True, False, True, True, True, False]
    np.testing.assert_allclose(data["next_rtg"].numpy(), [2, 1, 0, 3, 2, 1, 0])  # g_{t+1} = g_t - r_t, 0 at the end
    raw = lambda x: x * data["state_std"][0] + data["state_mean"][0]  # undo the normalization
    b = mo_dt.sample_batch(data, 256, 5, torch.Generator().manual_seed(0))
    for i in range(256):
        m, nm = b["mask"][i], b["next_mask"][i]
        assert m[-1] and nm[-1] == (b["rtg"][i, -1, 0] > 1)  # the last real step has no next state iff g_t = r_t
        assert not nm[~m].any() and (nm[m][:-1]).all()  # only the episode's last step and padding lose the target
        s, ns = raw(b["states"][i, :, 0]), raw(b["next_states"][i, :, 0])
        np.testing.assert_allclose(ns[nm].numpy(), s[nm].numpy() + 1, atol=1e-3)  # s_{t+1}, same episode
        assert (b["next_states"][i][~nm] == 0).all()
        np.testing.assert_allclose(b["next_rtg"][i][m, 0].numpy(), b["rtg"][i][m, 0].numpy() - 1)


def small_model(gaussian=True):
    torch.manual_seed(0)
    return mo_dt.MultiObjectiveDecisionTransformer(3, 2, n_layer=2, n_head=2, n_embd=16, dropout=0.0, max_ep_len=50,
                                                   gaussian_heads=gaussian).eval()


def random_inputs(B=2, K=6):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, K, 1, generator=g), torch.randn(B, K, 3, generator=g), torch.randn(B, K, 2, generator=g),
            torch.arange(K).repeat(B, 1), torch.ones(B, K, dtype=torch.bool))


def perturbed(inputs, which, t):
    rtg, s, a = (x.clone() for x in inputs[:3])
    {"g": rtg, "s": s, "a": a}[which][:, t:] += 5.0
    return (rtg, s, a, *inputs[3:])


@pytest.mark.parametrize("gaussian", [True, False])
def test_causality_each_head_sees_exactly_its_context(gaussian):
    model, inputs, t = small_model(gaussian), random_inputs(), 2
    base, _ = model(*inputs)
    pred = lambda inp, task: model(*inp)[0][task][0]
    # a_t (from the s_t token) must not see a_t or anything after it ...
    for which, start in (("a", t), ("s", t + 1), ("g", t + 1)):
        out = pred(perturbed(inputs, which, start), "action")
        torch.testing.assert_close(out[:, : t + 1], base["action"][0][:, : t + 1])
        assert not torch.allclose(out[:, t + 1:], base["action"][0][:, t + 1:])  # later predictions do see it
    # ... but must see s_t and g_t
    for which in ("s", "g"):
        assert not torch.allclose(pred(perturbed(inputs, which, t), "action")[:, t], base["action"][0][:, t])
    # s_{t+1}, g_{t+1} (from the a_t token) must not see s_{t+1}, g_{t+1} or later, but must see a_t
    for task in ("state", "return"):
        for which in ("s", "g"):
            out = pred(perturbed(inputs, which, t + 1), task)
            torch.testing.assert_close(out[:, : t + 1], base[task][0][:, : t + 1])
            assert not torch.allclose(out[:, t + 1:], base[task][0][:, t + 1:])
        assert not torch.allclose(pred(perturbed(inputs, "a", t), task)[:, t], base[task][0][:, t])
    assert (base["state"][1] is None) == (not gaussian) and base["state"][0].shape == (2, 6, 3)
    assert base["return"][0].shape == (2, 6, 1) and base["action"][0].abs().max() <= 1


def test_padded_positions_do_not_leak():
    model, (rtg, s, a, ts, mask) = small_model(), random_inputs()
    mask[:, :2] = False
    base, _ = model(rtg, s, a, ts, mask)
    rtg2, s2, a2 = rtg.clone(), s.clone(), a.clone()
    rtg2[:, :2], s2[:, :2], a2[:, :2] = 9.0, 9.0, 9.0
    out, _ = model(rtg2, s2, a2, ts, mask)
    for task in mo_dt.TASKS:
        torch.testing.assert_close(out[task][0][:, 2:], base[task][0][:, 2:])


def test_losses_on_a_hand_computed_batch():
    # one segment of 2 steps; 1-d actions, states and returns; step 2 has no next state
    batch = dict(actions=torch.tensor([[[0.5], [0.0]]]), mask=torch.tensor([[True, True]]),
                 next_states=torch.tensor([[[2.0], [0.0]]]), next_mask=torch.tensor([[True, False]]),
                 next_rtg=torch.tensor([[[1.0], [0.0]]]))
    zeros = torch.zeros(1, 2, 1)
    preds = {"action": (zeros, zeros), "state": (zeros, torch.full((1, 2, 1), math.log(2.0))), "return": (zeros, zeros)}
    c = 0.5 * math.log(2 * math.pi)
    losses = mo_dt.task_losses(preds, batch)
    assert losses["action"].item() == pytest.approx((0.5 * 0.25 + c + c) / 2)  # mean over the 2 real steps
    assert losses["state"].item() == pytest.approx(0.5 * (2 / 2) ** 2 + math.log(2) + c)  # only step 1 counts
    assert losses["return"].item() == pytest.approx((0.5 + c + c) / 2)
    mse = mo_dt.task_losses({k: (v[0], None) for k, v in preds.items()}, batch)
    assert [mse[k].item() for k in mo_dt.TASKS] == pytest.approx([0.125, 4.0, 0.5])
    nothing = dict(batch, next_mask=torch.zeros(1, 2, dtype=torch.bool))  # no next state at all: 0, not NaN
    assert mo_dt.task_losses(preds, nothing)["state"].item() == 0.0


def test_lambda_validation():
    assert mo_dt.loss_weights((0.5, 0.25, 0.25)) == (0.5, 0.25, 0.25)
    assert sum(mo_dt.loss_weights(mo_dt.Args().lambdas)) == pytest.approx(1.0)  # the default: uniform
    with pytest.raises(SystemExit, match="needs 3 weights"):
        mo_dt.loss_weights((0.5, 0.5))
    with pytest.raises(SystemExit, match="non-negative"):
        mo_dt.loss_weights((1.5, -0.25, -0.25))
    with pytest.raises(SystemExit, match="sum to 1"):
        mo_dt.loss_weights((0.4, 0.4, 0.4))


def one_update(schedule, lambdas):
    """Both schedules from the same weights, optimizer state and batch (dropout 0, so no randomness)."""
    model = small_model()
    data = mo_dt.make_dataset(episodes((10, 12), dim=3), torch.device("cpu"), rtg_scale=10.0, max_ep_len=50)
    data["actions"] = torch.rand(len(data["actions"]), 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = mo_dt.sample_batch(data, 4, 6, torch.Generator().manual_seed(0))
    opt, _ = mo_dt.make_optimizer(model.train(), mo_dt.Args(lr=1e-3))
    losses_on = lambda b: mo_dt.task_losses(model(b["rtg"], b["states"], b["actions"], b["timesteps"], b["mask"])[0], b)
    losses, _ = mo_dt.update(model, opt, losses_on, batch, dict(zip(mo_dt.TASKS, lambdas)), schedule, grad_clip=0.25)
    return model, losses


def test_alternating_and_joint_schedules_make_different_updates():
    start = small_model()
    joint, lj = one_update("joint", (1 / 3,) * 3)
    alt, la = one_update("alternating", (1 / 3,) * 3)
    shared = lambda m: torch.cat([p.detach().flatten() for p in mo_dt.shared_parameters(m)])
    assert not torch.allclose(shared(joint), shared(alt))  # the later tasks' gradients see the moved weights
    assert not torch.allclose(shared(joint), shared(start))
    assert lj["action"].item() == pytest.approx(la["action"].item())  # the first task step starts from the same point
    assert lj["state"].item() != pytest.approx(la["state"].item())  # the second one does not
    # with all weight on one task the two schedules are the same algorithm: identical shared weights
    joint1, _ = one_update("joint", (1.0, 0.0, 0.0))
    alt1, losses = one_update("alternating", (1.0, 0.0, 0.0))
    torch.testing.assert_close(shared(joint1), shared(alt1))
    assert set(losses) == {"action"}


def test_gradient_cosines_on_shared_parameters():
    model = small_model().train()
    data = mo_dt.make_dataset(episodes((10, 12), dim=3), torch.device("cpu"), rtg_scale=10.0, max_ep_len=50)
    data["actions"] = torch.rand(len(data["actions"]), 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    b = mo_dt.sample_batch(data, 4, 6, torch.Generator().manual_seed(0))
    losses = mo_dt.task_losses(model(b["rtg"], b["states"], b["actions"], b["timesteps"], b["mask"])[0], b)
    out = mo_dt.task_gradient_cosines(model, losses)
    assert set(out) == {"grad_norm_action", "grad_norm_state", "grad_norm_return", "cos_action_state", "cos_action_return", "cos_state_return"}
    assert all(-1 <= out[k] <= 1 for k in out if k.startswith("cos_"))
    head_names = {n for n, _ in model.named_parameters() if n.startswith("heads.")}
    assert len(mo_dt.shared_parameters(model)) == len(list(model.parameters())) - len(head_names) and head_names
    # the same loss twice has cosine 1 with itself: the quantity is a true cosine, not a stale value
    same = mo_dt.task_gradient_cosines(model, {"action": losses["action"], "state": losses["action"] * 3, "return": losses["return"]})
    assert same["cos_action_state"] == pytest.approx(1.0, abs=1e-5)


def test_optimizer_is_lamb_and_decays_matrices_only():
    opt, _ = mo_dt.make_optimizer(small_model(), mo_dt.Args(weight_decay=0.5))
    decayed, plain = opt.param_groups
    assert type(opt).__name__ == "Lamb"
    assert decayed["weight_decay"] == 0.5 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])


def read_metrics(run):
    return [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("flags", [dict(), dict(schedule="alternating"), dict(gaussian_heads=False), dict(rtg_update="subtract"),
                                   dict(n_head=1)], ids=["joint", "alternating", "mse-heads", "subtract", "one-head"])
def test_end_to_end_with_evaluation(tmp_path, hdf5_path, flags):
    evals = [0, 10, 20] if not flags else [20]  # the ablations evaluate once, at the end, to keep CI fast
    res = mo_dt.train(tiny_args(tmp_path, hdf5_path, attention=True, eval_every=10 if not flags else 0, **flags))
    run = Path(res["run_dir"])
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.jsonl", "results.json", "model.pt", "attention.png", "attention.json"}
    saved = json.loads((run / "results.json").read_text())
    dt_keys = {"returns", "lengths", "normalized", "return_mean", "normalized_mean", "normalized_std", "updates",
               "train_updates_per_s", "eval_env_steps_per_s", "wall_time_s", "run_dir", "device", "git_commit", "dataset",
               "args", "run_name", "torch"}
    assert dt_keys <= set(saved) and len(saved["returns"]) == 2 and saved["dataset"]["source"] == "file"
    assert saved["normalized_mean"] == pytest.approx(np.mean(common.normalized_score(saved["dataset"], saved["returns"])))
    assert saved["train_updates_per_s"] > 0 and saved["eval_env_steps_per_s"] > 0
    lines = read_metrics(run)
    assert [l["step"] for l in lines if "eval_normalized" in l] == evals
    losses = [l for l in lines if "loss" in l]
    assert [l["step"] for l in losses] == [0, 5, 10, 15, 19]
    for l in losses:  # every task loss, separately, and the weighted total
        assert l["loss"] == pytest.approx(sum(l[f"loss_{k}"] for k in mo_dt.TASKS) / 3, rel=1e-5)
    cos = [l for l in lines if "cos_action_state" in l]
    assert [l["step"] for l in cos] == [0, 10, 19] and all(-1 <= l["cos_state_return"] <= 1 for l in cos)
    att = json.loads((run / "attention.json").read_text())
    assert np.allclose(np.array(att["modality_mass_mean"]).sum(1), 1.0, atol=1e-4) and att["samples"] > 0
    n_head = flags.get("n_head", 2)
    assert np.array(att["modality_mass_per_head"]).shape == (2, n_head, 3) and np.array(att["entropy_per_head"]).shape == (2, n_head)
    claims = [c["claim"] for c in saved["claims"]]
    assert any(c.startswith("Fig. 1.2") for c in claims) and any(c.startswith("Ch. 3") for c in claims)


def test_return_head_drives_inference_and_checkpoint_attention(tmp_path, hdf5_path):
    trained = mo_dt.train(tiny_args(tmp_path, hdf5_path, eval_every=0, grad_cos_every=0))
    ckpt = str(Path(trained["run_dir"]) / "model.pt")
    again = mo_dt.train(tiny_args(tmp_path, hdf5_path, updates=0, checkpoint=ckpt, exp_name="again", attention=True,
                                  n_layer=5, context_len=4))
    # same weights and env seeds -> same episodes (up to float noise: analysis uses an explicit softmax)
    assert again["returns"] == pytest.approx(trained["returns"], rel=1e-4)
    assert again["trained_updates"] == 20 and "model trained 20 updates" in again["claims"][0]["verdict"]
    run = Path(again["run_dir"])
    assert not (run / "model.pt").exists() and np.array(json.loads((run / "attention.json").read_text())["state_row_maps"]).shape == (2, 20, 60)
    subtract = mo_dt.train(tiny_args(tmp_path, hdf5_path, updates=0, checkpoint=ckpt, exp_name="subtract", rtg_update="subtract"))
    assert subtract["returns"] != pytest.approx(trained["returns"], rel=1e-6)  # a different return-to-go rule acts


def test_bad_arguments_get_clear_errors(tmp_path, hdf5_path):
    with pytest.raises(SystemExit, match="--lambdas must sum to 1"):
        mo_dt.train(tiny_args(tmp_path, hdf5_path, lambdas=(0.5, 0.5, 0.5)))
    with pytest.raises(SystemExit, match="--lambdas needs 3 weights"):
        mo_dt.train(tiny_args(tmp_path, hdf5_path, lambdas=(0.25,) * 4))
    with pytest.raises(SystemExit, match="--batch-size must be > 0"):
        mo_dt.train(tiny_args(tmp_path, hdf5_path, batch_size=0))
    with pytest.raises(SystemExit, match="--grad-cos-every"):
        mo_dt.train(tiny_args(tmp_path, hdf5_path, grad_cos_every=-1))
    with pytest.raises(SystemExit, match="divisible by --n-head"):
        mo_dt.train(tiny_args(tmp_path, hdf5_path, n_embd=30, n_head=4))
    with pytest.raises(SystemExit, match="pass --checkpoint"):
        mo_dt.train(tiny_args(tmp_path, hdf5_path, updates=0))
    with pytest.raises(SystemExit, match="--grad-clip must be > 0"):
        mo_dt.train(tiny_args(tmp_path, hdf5_path, grad_clip=0.0))
    with pytest.raises(SystemExit, match="--weight-decay must be >= 0"):
        mo_dt.train(tiny_args(tmp_path, hdf5_path, weight_decay=-1e-3))
    with pytest.raises(SystemExit, match="no such file"):
        mo_dt.train(tiny_args(tmp_path, hdf5_path, updates=0, checkpoint=str(tmp_path / "none.pt")))
    with pytest.raises(SystemExit, match="unknown dataset 'hopper-mediun'"):
        mo_dt.train(tiny_args(tmp_path, hdf5_path, env="hopper-mediun"))
    assert not (tmp_path / "runs").exists()  # every bad argument is caught before a run folder is made


def test_foreign_checkpoints_and_bad_devices_get_clear_errors(tmp_path, hdf5_path):
    walker = tmp_path / "walker.pt"  # the right kind of checkpoint, trained on another env
    torch.save(dict(model={}, args=asdict(mo_dt.Args()), dataset=dict(name="walker2d-medium", obs_dim=17, act_dim=6)), walker)
    with pytest.raises(SystemExit, match="trained on walker2d-medium .* pass the --env it was trained on"):
        mo_dt.train(tiny_args(tmp_path, hdf5_path, updates=0, checkpoint=str(walker)))
    foreign = tmp_path / "foreign.pt"  # dt.py's checkpoints have no Gaussian-heads flag; trdt.py's have --bins
    for args in (dict(policy="deterministic"), dict(asdict(mo_dt.Args()), bins=3)):
        torch.save(dict(model={}, args=args, dataset=dict(name="hopper-random", obs_dim=11, act_dim=3)), foreign)
        with pytest.raises(SystemExit, match="not a model.pt written by mo_dt.py"):
            mo_dt.train(tiny_args(tmp_path, hdf5_path, updates=0, checkpoint=str(foreign)))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="torch cannot read it"):
        mo_dt.train(tiny_args(tmp_path, hdf5_path, updates=0, checkpoint=str(tmp_path / "junk.pt")))
    with pytest.raises(SystemExit, match="is not a device"):
        mo_dt.train(tiny_args(tmp_path, hdf5_path, device="gpu"))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="sees no CUDA GPU"):
            mo_dt.train(tiny_args(tmp_path, hdf5_path, device="cuda"))
    assert not (tmp_path / "runs").exists()


def test_state_normalisation_can_come_from_a_checkpoint(hdf5_path):
    eps, _ = common.load_dataset("hopper-random", [str(hdf5_path)])
    own = mo_dt.make_dataset(eps, torch.device("cpu"), 1.0, 1000)
    mean, std = np.ones(11, np.float32), np.full(11, 2.0, np.float32)
    given = mo_dt.make_dataset(eps, torch.device("cpu"), 1.0, 1000, state_stats=(mean, std))
    obs = np.concatenate([ep["observations"] for ep in eps])
    torch.testing.assert_close(given["states"][: len(obs)], torch.as_tensor((obs - 1.0) / 2.0))
    assert given["state_mean"] is mean and not torch.allclose(own["states"], given["states"])


def test_an_existing_run_folder_is_never_overwritten(tmp_path, hdf5_path, monkeypatch):
    monkeypatch.setattr(mo_dt.time, "time", lambda: 1234.0)
    args = tiny_args(tmp_path, hdf5_path, updates=2, eval_every=0)
    run = Path(args.runs_dir) / "hopper-random__mo_dt__0__1234"
    run.mkdir(parents=True)
    (run / "results.json").write_text("precious")
    with pytest.raises(SystemExit, match="refusing to overwrite"):
        mo_dt.train(args)
    assert (run / "results.json").read_text() == "precious"


def test_cli_help_and_table_1_1_defaults():
    out = subprocess.run([sys.executable, "mo_dt.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for flag in ("--lambdas", "--no-gaussian-heads", "--schedule", "--rtg-update", "--grad-cos-every", "--attention", "--checkpoint"):
        assert flag in out
    a = mo_dt.Args()
    assert {k: getattr(a, k) for k in mo_dt.TABLE_1_1} == mo_dt.TABLE_1_1
    assert mo_dt.TARGET_RETURNS == {"hopper": 7200.0, "walker2d": 10000.0, "halfcheetah": 12000.0}
    assert sum(v[0] for v in mo_dt.THESIS_TABLE_1_3.values()) == pytest.approx(705.37)


def test_claims_verdicts():
    info = dict(name="hopper-medium-replay", source="d4rl")  # Table 1.3: 79.43 ± 5.2
    thesis = mo_dt.Args()
    verdict = lambda score, n=100_000, args=thesis: mo_dt.claims_table(
        args, asdict(args), n, info, dict(normalized_mean=score, normalized_std=0.0), None, [])[0]["verdict"]
    assert verdict(79.43 - 5.0) == "reproduced" and verdict(79.43 + 10.0) == "partly" and verdict(60.0) == "not reproduced"
    assert verdict(79.4, n=10).startswith("not comparable: differs from Table 1.1 in updates")
    assert "lambdas" in verdict(79.4, args=mo_dt.Args(lambdas=(0.5, 0.25, 0.25)))
    assert "target_return (Table 1.2)" in verdict(79.4, args=mo_dt.Args(target_return=3600.0))  # DT's target, not 7200
    assert "timestep_embedding" in verdict(79.4, args=mo_dt.Args(timestep_embedding=True))
    att = dict(samples=5, modality_mass_mean=[[0.4, 0.4, 0.2], [0.2, 0.3, 0.5]])
    rows = mo_dt.claims_table(thesis, asdict(thesis), 100_000, dict(info, name="x"), dict(normalized_mean=0.0, normalized_std=0.0), att, [])
    assert rows[0]["claim"].startswith("Fig. 1.2") and rows[0]["verdict"] == "reproduced"
    # more action mass than in block 1 is not "predominantly actions": states still lead in the later blocks
    for masses, verdict_ in (([[0.4, 0.5, 0.1], [0.2, 0.5, 0.3], [0.2, 0.4, 0.4]], "not reproduced"),
                             ([[0.4, 0.5, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6]], "partly")):
        rows = mo_dt.claims_table(thesis, asdict(thesis), 100_000, dict(info, name="x"), dict(normalized_mean=0.0, normalized_std=0.0),
                                  dict(att, modality_mass_mean=masses), [])
        assert rows[0]["verdict"] == verdict_
    empty = mo_dt.claims_table(thesis, asdict(thesis), 100_000, dict(info, name="x"), dict(normalized_mean=0.0, normalized_std=0.0),
                              dict(att, samples=0), [])
    assert empty[0]["verdict"].startswith("not measured")  # episodes shorter than K: no attention was recorded


def test_attention_recorder_on_hand_made_weights(tmp_path):
    """Two heads, K = 2; head 0: s_1 -> g_1, s_2 -> s_1 and s_2 halves; head 1: s_1 -> g_1 and s_1 halves, s_2 -> a_1."""
    M, K = 3, 2
    g, s, a = 0, 1, 2  # token order (g_t, s_t, a_t), Eq. 1.1
    att = torch.zeros(2, 2, M * K, M * K)  # (N, nh, T, T); the second sample is a finished episode
    att[0, 0, s, g] = 1.0
    att[0, 0, M + s, [s, M + s]] = 0.5
    att[0, 1, s, [g, s]] = 0.5
    att[0, 1, M + s, a] = 1.0
    att[1] = 7.0  # garbage: must not be counted
    rec = mo_dt.AttentionRecorder(1, 2, K)
    rec.add([att], torch.tensor([True, False]))
    out = rec.report(tmp_path, "hand-made")
    assert out["modality_mass_mean"] == [pytest.approx([0.375, 0.375, 0.25])]
    assert out["modality_mass_std_across_heads"] == [pytest.approx([0.125, 0.125, 0.25])]  # across heads, not rows
    assert out["entropy_per_head"] == [pytest.approx([math.log(2) / 2] * 2)] and out["samples"] == 1
    maps = np.array(out["state_row_maps"][0])  # averaged over heads
    assert maps.shape == (K, M * K) and maps[0, g] == 0.75 and maps[0, s] == 0.25 and maps[1, a] == 0.5
    assert (tmp_path / "attention.png").stat().st_size > 0 and json.loads((tmp_path / "attention.json").read_text()) == out


def spied_evaluation(tmp_path, hdf5_path, env_rewards, **kw):
    """Evaluate an untrained model while recording every forward pass and every reward of the two envs."""
    args = tiny_args(tmp_path, hdf5_path, context_len=3, target_return=3600.0, **kw)
    _, info = common.load_dataset(args.env, args.dataset_path)
    torch.manual_seed(0)
    model = mo_dt.MultiObjectiveDecisionTransformer(info["obs_dim"], info["act_dim"], 2, 2, 16, 0.0, 1000, True)
    calls, forward = [], model.forward

    def spy(*x, **k):
        preds, attns = forward(*x, **k)
        calls.append(([v.clone() for v in x], preds["action"][0][:, -1].clone(), preds["return"][0][:, -1].clone()))
        return preds, attns

    model.forward = spy
    res = mo_dt.evaluate(model, info, np.zeros(info["obs_dim"]), np.ones(info["obs_dim"]), args, torch.device("cpu"), seed=0)
    return calls, env_rewards[:2], res


def test_inference_follows_alg_1(tmp_path, hdf5_path, env_rewards):
    calls, rewards, res = spied_evaluation(tmp_path, hdf5_path, env_rewards)
    steps = max(res["lengths"])
    assert len(calls) == 2 * steps - 1  # per step: the action forward, then (not after the last) the return forward
    for t in range(steps):
        (rtg, states, actions, _), a_pred, _ = calls[2 * t]
        assert rtg.shape[1] == min(t + 1, 3) and (actions[:, -1] == 0).all()  # last K steps; a_t not yet known
        if t == 0:
            assert (rtg[:, 0] == 3.6).all()  # g_1 = target return / rtg scale (Eq. 1.15)
        else:  # Eq. 1.16, Alg. 1 line 23: g_t is what the return head said on the a_{t-1} token
            torch.testing.assert_close(rtg[:, -1, 0], calls[2 * t - 1][2][:, 0])
        if t + 1 < steps:
            (_, states2, actions2, _), _, _ = calls[2 * t + 1]
            torch.testing.assert_close(states2, states)
            torch.testing.assert_close(actions2[:, -1], a_pred.clamp(-1, 1))  # the executed action (Eq. 1.17: the mean)
    assert [len(r) for r in rewards] == res["lengths"] and res["returns"] == pytest.approx([sum(r) for r in rewards])


def test_inference_with_the_subtraction_rule(tmp_path, hdf5_path, env_rewards):
    calls, rewards, res = spied_evaluation(tmp_path, hdf5_path, env_rewards, rtg_update="subtract")
    assert len(calls) == max(res["lengths"])  # one forward per step: no return-head pass
    for t in range(1, len(calls)):
        for i in range(2):
            if t < res["lengths"][i]:  # DT's rule g_{t+1} = g_t - r_t (in units of --rtg-scale)
                assert calls[t][0][0][i, -1, 0].item() == pytest.approx(calls[t - 1][0][0][i, -1, 0].item() - rewards[i][t - 1] / 1000, abs=1e-5)


def lamb_reference(w, grads, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """timm's LAMB (the ODT code's) step by step in float64 numpy: bias-corrected Adam, decay added to the
    update, trust ratio ||w|| / ||update|| with no cap."""
    (b1, b2), m, v = betas, np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        update = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + weight_decay * w
        w_norm, u_norm = np.linalg.norm(w), np.linalg.norm(update)
        w = w - lr * (w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0) * update
    return w


@pytest.mark.parametrize("scale, weight_decay", [(20.0, 0.1), (0.05, 0.0), (0.0, 0.1)])
def test_lamb_step_is_timms_without_a_cap(scale, weight_decay):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 3, generator=g, dtype=torch.float64) * scale  # scale 20: ||w|| ~ 70, above any cap of 10
    grads = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    p = torch.nn.Parameter(w0.clone())
    opt = mo_dt.Lamb([dict(params=[p], weight_decay=weight_decay)], lr=0.01)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    np.testing.assert_allclose(p.detach().numpy(), lamb_reference(w0.numpy(), [x.numpy() for x in grads], 0.01, weight_decay),
                               rtol=1e-12, atol=1e-15)


def test_make_optimizer_moves_every_tensor_by_lr_times_its_norm():
    """The trust ratio makes the first step of every tensor exactly lr * ||w|| long, however large ||w||."""
    model = small_model().train()
    with torch.no_grad():
        model.heads["state"].weight.mul_(500)  # ||w|| in the hundreds, like a timestep embedding table
    opt, _ = mo_dt.make_optimizer(model, mo_dt.Args(lr=1e-3, warmup_steps=0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    preds, _ = model(*random_inputs())
    sum(m.sum() + (0 if s is None else s.sum()) for m, s in preds.values()).backward()
    opt.step()
    for n, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0 and before[n].norm() > 0:  # a zero tensor takes a plain Adam step
            assert (p.detach() - before[n]).norm().item() == pytest.approx(1e-3 * before[n].norm().item(), rel=1e-4), n


def test_no_timestep_embedding_by_default_as_table_1_1_says():
    assert mo_dt.Args().timestep_embedding is False and mo_dt.TABLE_1_1["timestep_embedding"] is False
    model, inputs = small_model(), random_inputs()
    assert not any(n.startswith("embed_t") for n, _ in model.named_parameters())
    later = (*inputs[:3], inputs[3] + 7, *inputs[4:])
    torch.testing.assert_close(model(*inputs)[0]["action"][0], model(*later)[0]["action"][0])
    torch.manual_seed(0)
    with_t = mo_dt.MultiObjectiveDecisionTransformer(3, 2, 2, 2, 16, 0.0, 50, True, timestep_embedding=True).eval()
    assert not torch.allclose(with_t(*inputs)[0]["action"][0], with_t(*later)[0]["action"][0])


def test_mse_ablation_switches_the_state_and_return_heads_only():
    """Fig. 1.4a ablates the Gaussian heads for states and returns; the action head stays Gaussian."""
    preds, _ = small_model(gaussian=False)(*random_inputs())
    assert preds["action"][1] is not None and preds["state"][1] is None and preds["return"][1] is None
    preds, _ = small_model(gaussian=True)(*random_inputs())
    assert all(log_std is not None for _, log_std in preds.values())
