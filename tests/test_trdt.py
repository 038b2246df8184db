import copy
from dataclasses import asdict
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import trdt

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(tmp_path, hdf5_path, **kw):
    base = dict(env="hopper-random", dataset_path=(str(hdf5_path),), updates=20, batch_size=8, n_embd=32, n_layer=2,
                n_head=2, warmup_steps=5, eval_every=10, eval_episodes=2, runs_dir=str(tmp_path / "runs"), log_every=5,
                grad_cos_every=10)
    return trdt.Args(**{**base, **kw})


# --- action regions (Eq. 1.11-1.12) -----------------------------------------------------------------


def test_ordinal_code_of_three_bins_by_hand():
    a = torch.tensor([[-0.9, 0.0, 0.9]])  # bins 0, 1, 2 of [-1, -1/3), [-1/3, 1/3), [1/3, 1]
    assert trdt.encode_regions(a, 3).tolist() == [[1, 0, 0, 1, 1, 0, 1, 1, 1]]


@pytest.mark.parametrize("bins", [2, 3, 5])
def test_ordinal_encoding_round_trips_every_bin_and_dimension(bins):
    m_a = 3
    ks = torch.tensor(list(itertools.product(range(bins), repeat=m_a)))  # every bin in every dimension, jointly
    centres = -1 + (2 * ks.float() + 1) / bins
    code = trdt.encode_regions(centres, bins)
    assert code.shape == (bins ** m_a, bins * m_a)
    assert (trdt.action_bins(centres, bins) == ks).all()
    assert (trdt.decode_regions(code, bins) == ks).all()
    # ordinal: bin k has exactly k+1 leading ones, so the code distance of two bins is |k - k'|
    assert (code.view(-1, m_a, bins).sum(-1) == ks + 1).all()
    # decoding thresholds probabilities at 0.5
    assert (trdt.decode_regions(0.3 + 0.4 * code, bins) == ks).all()


def test_bins_cover_the_action_box_and_edges_go_up():
    edges = trdt.region_edges(3)
    assert torch.equal(edges, torch.tensor([-1 / 3, 1 / 3]))  # the float32 literals, exactly
    below = torch.nextafter(edges, torch.tensor(-2.0))
    assert trdt.action_bins(edges, 3).tolist() == [1, 2] and trdt.action_bins(below, 3).tolist() == [0, 1]
    assert trdt.action_bins(torch.tensor([-1.0, 1.0, -1.5, 1.5]), 3).tolist() == [0, 2, 0, 2]
    grid = torch.linspace(-1, 1, 3001)
    counts = torch.bincount(trdt.action_bins(grid, 3), minlength=3)
    assert counts.sum() == 3001 and (counts - 1000).abs().max() <= 1  # three equal bins, nothing left out
    assert trdt.decode_regions(torch.tensor([1.0, 0.0, 1.0]), 3).tolist() == [0]  # inconsistent code: valid prefix


# --- data ---------------------------------------------------------------------------------------------


def episodes(lengths=(3, 30)):
    eps = []
    for i, n in enumerate(lengths):
        obs = np.stack([np.arange(n), np.full(n, 100.0 * i)], 1).astype(np.float32)  # obs[:, 0] = t
        eps.append(dict(observations=obs, actions=np.full((n, 1), 0.5 * i, np.float32),
                        rewards=np.arange(1, n + 1, dtype=np.float32), terminated=True))
    return eps


def test_next_state_and_next_return_targets_and_masks():
    data = trdt.make_dataset(episodes(), torch.device("cpu"), rtg_scale=1.0, max_ep_len=1000, bins=3)
    b = trdt.sample_batch(data, 200, 5, torch.Generator().manual_seed(0))
    unnorm = lambda s: s[..., 0] * float(data["state_std"][0]) + float(data["state_mean"][0])
    for i in range(200):
        m, nm, t = b["mask"][i], b["next_mask"][i], b["timesteps"][i]
        n = 3 if b["states"][i][m][0, 1] < 0 else 30  # the episode, from the second state feature
        assert (nm == (m & (t != n - 1))).all()  # only the episode's last step has no next state
        np.testing.assert_allclose(unnorm(b["next_states"][i][nm]).numpy(), (t[nm] + 1).numpy(), atol=1e-4)
        assert (b["next_states"][i][~nm] == 0).all()
        # rewards are 1..n, so g_t = sum_{k > t} k and g_{t+1} = g_t - r_t = g_t - (t + 1)
        g = b["rtg"][i][m, 0]
        np.testing.assert_allclose(b["next_rtg"][i][m, 0].numpy(), (g - (t[m] + 1)).numpy())
    assert b["next_mask"].sum() < b["mask"].sum()  # the 3-step episode's last steps were drawn
    assert (b["regions"][b["mask"]].view(-1, 1, 3).sum(-1) >= 1).all() and (b["regions"][~b["mask"]] == 0).all()


# --- model: causality (§1.4.2, "we do not condition a_t on region_t") --------------------------------


def small_model(gaussian=True, dropout=0.0, timestep_embedding=False):
    torch.manual_seed(0)
    return trdt.TrustRegionDecisionTransformer(3, 2, n_layer=2, n_head=2, n_embd=16, dropout=dropout, max_ep_len=50,
                                               bins=3, gaussian_heads=gaussian, timestep_embedding=timestep_embedding).eval()


def random_inputs(B=2, K=6):
    g = torch.Generator().manual_seed(1)
    actions = torch.rand(B, K, 2, generator=g) * 2 - 1
    return dict(rtg=torch.randn(B, K, 1, generator=g), states=torch.randn(B, K, 3, generator=g),
                regions=trdt.encode_regions(actions, 3), actions=actions, timesteps=torch.arange(K).repeat(B, 1))


def run(model, x, **kw):
    return model(x["rtg"], x["states"], x["regions"], x["actions"], x["timesteps"], **kw)


def perturbed(x, key, steps):
    y = {k: v.clone() for k, v in x.items()}
    y[key][:, steps] = 1.0 - y[key][:, steps] if key == "regions" else y[key][:, steps] + 3.0
    return y


T = 2
ACTION_SIDE = ("action_mean", "action_log_std", "region_logits")  # read off s_t
NEXT_SIDE = ("state_mean", "state_log_std", "return_mean", "return_log_std")  # read off a_t


@pytest.mark.parametrize("gaussian", [True, False])
def test_action_and_region_predictions_never_see_region_t_a_t_or_later(gaussian):
    model = small_model(gaussian)
    x = random_inputs()
    out = run(model, x)
    heads = [h for h in ACTION_SIDE if out[h] is not None]
    for key, steps in (("regions", T), ("actions", T), ("regions", slice(T, None)), ("actions", slice(T, None)),
                       ("rtg", slice(T + 1, None)), ("states", slice(T + 1, None))):
        out2 = run(model, perturbed(x, key, steps))
        for h in heads:
            torch.testing.assert_close(out2[h][:, :T + 1], out[h][:, :T + 1])  # up to t: unchanged
            if key in ("rtg", "states") or isinstance(steps, slice):
                assert not torch.allclose(out2[h][:, T + 1:], out[h][:, T + 1:])  # later ones see it: the test can fail
    for key, steps in (("states", T), ("rtg", T), ("regions", T - 1), ("actions", T - 1)):  # visible tokens matter
        out2 = run(model, perturbed(x, key, steps))
        for h in heads:
            assert not torch.allclose(out2[h][:, T], out[h][:, T]), (key, h)


@pytest.mark.parametrize("gaussian", [True, False])
def test_next_state_and_return_heads_never_see_s_next_or_g_next(gaussian):
    model = small_model(gaussian)
    x = random_inputs()
    out = run(model, x)
    heads = [h for h in NEXT_SIDE if out[h] is not None]
    for key in ("states", "rtg"):
        out2 = run(model, perturbed(x, key, slice(T + 1, None)))
        for h in heads:
            torch.testing.assert_close(out2[h][:, :T + 1], out[h][:, :T + 1])
            assert not torch.allclose(out2[h][:, T + 1:], out[h][:, T + 1:])
    for key in ("actions", "regions", "states", "rtg"):  # a_t's token has seen all four tokens of step t
        out2 = run(model, perturbed(x, key, T))
        for h in heads:
            assert not torch.allclose(out2[h][:, T], out[h][:, T]), (key, h)


def test_padding_is_invisible_and_attention_weights_match_the_fast_path():
    model = small_model()
    x = random_inputs()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, :2] = False
    out = run(model, x, mask=mask)
    y = {k: v.clone() for k, v in x.items()}
    for k in ("rtg", "states", "regions", "actions"):
        y[k][:, :2] = 9.0
    torch.testing.assert_close(run(model, y, mask=mask)["action_mean"][:, 2:], out["action_mean"][:, 2:])
    short = model(*(x[k][:, 2:] for k in ("rtg", "states", "regions", "actions", "timesteps")))
    torch.testing.assert_close(short["return_mean"], out["return_mean"][:, 2:])
    slow = run(model, x, return_attn=True)
    torch.testing.assert_close(slow["action_mean"], run(model, x)["action_mean"], atol=1e-5, rtol=1e-5)
    att = slow["attns"][0]
    assert att.shape == (2, 2, 24, 24) and (att.triu(1) == 0).all()


# --- losses (Eq. 1.4, 1.7, 1.8, 1.13) ----------------------------------------------------------------


def test_losses_on_a_hand_computed_batch():
    mask = torch.tensor([[True, False]])
    mean = torch.tensor([[[0.0, 1.0], [5.0, 5.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    log_std = torch.tensor([[[0.0, math.log(2.0)], [0.0, 0.0]]])
    assert trdt.nll_loss(mean, None, target, mask).item() == pytest.approx(0.5)  # (1 + 0) / 2 dims, step 2 masked
    # dim 0: 0.5 * 1 + 0 + c; dim 1: 0 + log 2 + c; c = 0.5 log 2 pi
    assert trdt.nll_loss(mean, log_std, target, mask).item() == pytest.approx(0.5 + math.log(2) + math.log(2 * math.pi), rel=1e-6)
    # Bernoulli NLL summed over bits: logits 0 -> log 2 per bit; logit log 3 (p = 3/4) on a 1 bit -> log 4/3
    logits = torch.tensor([[[0.0, 0.0, math.log(3.0)], [9.0, 9.0, 9.0]]])
    bits = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])
    assert trdt.region_loss(logits, bits, mask).item() == pytest.approx(2 * math.log(2) + math.log(4 / 3), rel=1e-6)
    assert trdt.nll_loss(mean, None, target, torch.zeros(1, 2, dtype=torch.bool)).item() == 0.0  # no NaN when empty


def test_task_losses_use_the_right_targets_and_masks():
    model = small_model()
    x = random_inputs(B=1, K=3)
    batch = dict(x, next_states=torch.randn(1, 3, 3), next_rtg=torch.randn(1, 3, 1),
                 mask=torch.tensor([[False, True, True]]), next_mask=torch.tensor([[False, True, False]]))
    losses, out = trdt.task_losses(model, batch)
    assert list(losses) == list(trdt.TASKS)
    one = lambda m, s, target: 0.5 * ((target - m) / s.exp()) ** 2 + s + 0.5 * math.log(2 * math.pi)
    exp_state = one(out["state_mean"][0, 1], out["state_log_std"][0, 1], batch["next_states"][0, 1]).sum()
    torch.testing.assert_close(losses["state"], exp_state)  # only the one step with a next state counts
    exp_return = one(out["return_mean"][0, 1:], out["return_log_std"][0, 1:], batch["next_rtg"][0, 1:]).sum() / 2
    torch.testing.assert_close(losses["return"], exp_return)
    exp_region = F.binary_cross_entropy_with_logits(out["region_logits"][0, 1:], x["regions"][0, 1:], reduction="sum") / 2
    torch.testing.assert_close(losses["region"], exp_region)


# --- loss weights and schedules (Eq. 1.14, Chapter 3) --------------------------------------------------


def test_lambda_validation():
    trdt.check_lambdas((0.25, 0.25, 0.25, 0.25))
    trdt.check_lambdas((1.0, 0.0, 0.0, 1e-7))  # within 1e-6 of the simplex
    for bad, msg in (((0.5, 0.5), "needs 4 weights"), ((0.5, 0.5, 0.5, -0.5), "non-negative"),
                     ((0.3, 0.3, 0.3, 0.3), "sum to 1"), ((float("nan"), 0, 0, 1), "non-negative")):
        with pytest.raises(SystemExit, match=msg):
            trdt.check_lambdas(bad)


def sgd_update(model, batch, schedule, lr, lambdas=(0.25, 0.25, 0.25, 0.25)):
    m = copy.deepcopy(model)
    trdt.update(m, torch.optim.SGD(m.parameters(), lr=lr), batch, lambdas, schedule, grad_clip=1e9)
    return torch.cat([p.detach().flatten() for p in m.parameters()])


@torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)  # the math kernel has a double backward
def test_joint_is_one_step_on_the_weighted_sum_and_alternating_matches_thm_3():
    # float64: the O(eta^2) gap must stand well above rounding. The expansion holds only where no ReLU changes
    # sign between the two step sizes; these weights (seed 0 with the timestep table) have no such kink.
    model = small_model(timestep_embedding=True).double()
    x = {k: (v.double() if v.is_floating_point() else v) for k, v in random_inputs(B=2, K=4).items()}
    batch = dict(x, next_states=torch.randn(2, 4, 3, dtype=torch.float64), next_rtg=torch.randn(2, 4, 1, dtype=torch.float64),
                 mask=torch.ones(2, 4, dtype=torch.bool), next_mask=torch.ones(2, 4, dtype=torch.bool))
    lam = (0.4, 0.3, 0.2, 0.1)
    params = list(model.parameters())
    theta = torch.cat([p.detach().flatten() for p in params])
    losses, _ = trdt.task_losses(model, batch)
    flat = lambda gs: torch.cat([g.flatten() for g in gs])
    g = [torch.autograd.grad(w * losses[k], params, create_graph=True, materialize_grads=True) for k, w in zip(trdt.TASKS, lam)]
    eta = 1e-5
    joint = sgd_update(model, batch, "joint", eta, lam)
    torch.testing.assert_close(joint, (theta - eta * sum(flat(gi) for gi in g)).detach())  # Eq. 1.14
    # Thm 3: stepping on the tasks in turn = the joint step + eta^2 sum_j H_j sum_{i<j} g_i + O(eta^3),
    # H_j v computed as the gradient of <g_j, v> with v held fixed
    second = 0
    for j in range(1, 4):
        v = [sum(g[i][n] for i in range(j)).detach() for n in range(len(params))]
        second = second + flat(torch.autograd.grad(sum((gj * vn).sum() for gj, vn in zip(g[j], v)), params, retain_graph=True, materialize_grads=True))
    rel = []
    for e in (2e-6, 1e-6):
        gap = sgd_update(model, batch, "alternating", e, lam) - sgd_update(model, batch, "joint", e, lam)
        rel.append(((gap - e ** 2 * second.detach()).norm() / gap.norm()).item())
    assert rel[1] < 0.01 and 1.6 < rel[0] / rel[1] < 2.4  # the rest is O(eta^3): relative error halves with eta
    # a task with lambda 0 takes no step: with all weight on the action task the heads of the others stay put
    m = copy.deepcopy(model)
    trdt.update(m, torch.optim.SGD(m.parameters(), lr=eta), batch, (1.0, 0.0, 0.0, 0.0), "alternating", grad_clip=1e9)
    assert torch.equal(m.head_state.weight, model.head_state.weight) and not torch.equal(m.head_action.weight, model.head_action.weight)


def test_gradient_cosines_on_shared_parameters():
    model = small_model()
    x = random_inputs()
    batch = dict(x, next_states=torch.randn(2, 6, 3), next_rtg=torch.randn(2, 6, 1),
                 mask=torch.ones(2, 6, dtype=torch.bool), next_mask=torch.ones(2, 6, dtype=torch.bool))
    losses, _ = trdt.task_losses(model, batch)
    names = [n for n, p in model.named_parameters() if any(p is q for q in trdt.shared_parameters(model))]
    assert names and not any(n.startswith("head_") for n in names) and "embed_r.weight" in names
    res = trdt.task_gradient_cosines(model, dict(losses, state=losses["action"] * 3))  # a task paired with itself
    cos = {k: v for k, v in res.items() if k.startswith("cos_")}
    assert len(cos) == 6 and cos["cos_action_state"] == pytest.approx(1.0, abs=1e-5)
    assert all(abs(c) <= 1 + 1e-6 for c in cos.values()) and abs(cos["cos_action_return"]) < 0.999
    assert res["grad_norm_state"] == pytest.approx(3 * res["grad_norm_action"], rel=1e-5)


def test_lamb_decays_matrices_only():
    opt, _ = trdt.make_optimizer(small_model(), trdt.Args(weight_decay=0.5))
    decayed, plain = opt.param_groups
    assert type(opt) is trdt.Lamb and opt.defaults["eps"] == 1e-8
    assert decayed["weight_decay"] == 0.5 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])


# --- end to end ---------------------------------------------------------------------------------------


RESULT_KEYS = {"returns", "lengths", "normalized", "return_mean", "normalized_mean", "normalized_std", "updates",
               "train_updates_per_s", "eval_env_steps_per_s", "wall_time_s", "run_dir", "device", "git_commit",
               "dataset", "args", "run_name", "torch", "claims", "choices", "trained_updates"}


@pytest.mark.parametrize("flags", [dict(), dict(schedule="alternating"), dict(gaussian_heads=False),
                                   dict(rtg_update="subtract"), dict(bins=5), dict(n_head=1, attention=True)],
                         ids=["joint", "alternating", "mse-heads", "subtract", "bins5", "one-head-attention"])
def test_end_to_end_with_evaluation(tmp_path, hdf5_path, flags):
    every = 10 if not flags else 0  # evaluation during training once; every variant is evaluated at the end
    res = trdt.train(tiny_args(tmp_path, hdf5_path, eval_every=every, **flags))
    run_dir = Path(res["run_dir"])
    files = {"config.json", "metrics.jsonl", "results.json", "model.pt"}
    assert {p.name for p in run_dir.iterdir()} == files | ({"attention.png", "attention.json"} if "attention" in flags else set())
    saved = json.loads((run_dir / "results.json").read_text())
    assert set(saved) == RESULT_KEYS  # a benchmark runner reads the same keys as dt.py's
    assert len(saved["returns"]) == 2 and saved["dataset"]["source"] == "file"
    assert saved["normalized_mean"] == pytest.approx(np.mean(common.normalized_score(saved["dataset"], saved["returns"])))
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "eval_normalized" in l] == ([0, 10, 20] if every else [20])
    losses = [l for l in lines if "loss" in l]
    assert losses and all(np.isfinite([l[f"loss_{k}"] for k in trdt.TASKS]).all() for l in losses)
    assert all(0 <= l["region_acc"] <= 1 for l in losses)
    assert [l["step"] for l in losses] == [0, 5, 10, 15, 19]
    lam = trdt.Args().lambdas if "lambdas" not in flags else flags["lambdas"]
    for l in losses:  # every task loss, separately, and the weighted total
        assert l["loss"] == pytest.approx(sum(w * l[f"loss_{k}"] for k, w in zip(trdt.TASKS, lam)), rel=1e-5)
    cos = [l for l in lines if "cos_action_region" in l]
    assert [l["step"] for l in cos] == [0, 10, 19] and all(len([k for k in l if k.startswith("cos_")]) == 6 for l in cos)
    claims = [c["claim"] for c in saved["claims"]]
    assert any(c.startswith("Ch. 3") for c in claims) and any(c.startswith("Fig. 1.3") for c in claims) == ("attention" in flags)
    if "attention" in flags:
        att = json.loads((run_dir / "attention.json").read_text())
        assert np.array(att["modality_mass_per_head"]).shape == (2, 1, 4) and np.array(att["entropy_per_head"]).shape == (2, 1)


def test_schedules_see_the_same_batches_but_train_differently(tmp_path, hdf5_path):
    kw = dict(eval_every=0, eval_episodes=1, updates=6, log_every=1, grad_cos_every=0, dropout=0.0)
    a = trdt.train(tiny_args(tmp_path / "a", hdf5_path, **kw))
    b = trdt.train(tiny_args(tmp_path / "b", hdf5_path, **kw))
    c = trdt.train(tiny_args(tmp_path / "c", hdf5_path, schedule="alternating", **kw))
    losses = lambda r: [l["loss_action"] for l in map(json.loads, (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()) if "loss" in l]
    assert losses(a) == losses(b)  # same seed, same run
    assert losses(a)[0] == pytest.approx(losses(c)[0], rel=1e-6)  # same first batch, same initial weights
    assert losses(a)[1:] != pytest.approx(losses(c)[1:], rel=1e-6)  # then the schedules part ways


def test_checkpoint_evaluation_with_attention_analysis(tmp_path, hdf5_path):
    trained = trdt.train(tiny_args(tmp_path, hdf5_path, eval_every=0, grad_cos_every=0))
    ckpt = Path(trained["run_dir"]) / "model.pt"
    res = trdt.train(tiny_args(tmp_path, hdf5_path, updates=0, checkpoint=str(ckpt), attention=True, context_len=4,
                               n_layer=5, bins=7, exp_name="analysis"))
    run_dir = Path(res["run_dir"])
    assert res["trained_updates"] == 20 and "20 updates" in res["claims"][0]["verdict"]
    assert res["returns"] == pytest.approx(trained["returns"], rel=1e-4)  # same weights and env seeds
    assert (run_dir / "attention.png").stat().st_size > 0 and not (run_dir / "model.pt").exists()
    att = json.loads((run_dir / "attention.json").read_text())
    assert att["modalities"] == ["return", "state", "region", "action"] and att["samples"] > 0
    mass = np.array(att["modality_mass_mean"])
    assert mass.shape == (2, 4) and np.allclose(mass.sum(1), 1.0, atol=1e-4)  # 2 blocks, from the checkpoint
    assert np.array(att["state_row_maps"]).shape == (2, 20, 80) and np.array(att["entropy_per_head"]).shape == (2, 2)


def test_bad_arguments_get_clear_errors(tmp_path, hdf5_path):
    for kw, msg in ((dict(batch_size=0), "--batch-size must be > 0"), (dict(bins=1), "--bins must be >= 2"),
                    (dict(lambdas=(0.5, 0.5, 0.5)), "--lambdas needs 4 weights"),
                    (dict(lambdas=(0.7, 0.1, 0.1, 0.2)), "sum to 1"), (dict(grad_cos_every=-1), "--grad-cos-every"),
                    (dict(n_embd=30, n_head=4), "divisible by --n-head"), (dict(updates=0), "pass --checkpoint"),
                    (dict(grad_clip=0.0), "--grad-clip must be > 0"), (dict(weight_decay=-1e-3), "--weight-decay must be >= 0"),
                    (dict(checkpoint=str(tmp_path / "none.pt"), updates=0), "no such file"),
                    (dict(env="hopper-mediun"), "unknown dataset 'hopper-mediun'")):
        with pytest.raises(SystemExit, match=msg):
            trdt.train(tiny_args(tmp_path, hdf5_path, **kw))
    assert not (tmp_path / "runs").exists()  # every bad argument is caught before a run folder is made


def test_foreign_checkpoints_and_bad_devices_get_clear_errors(tmp_path, hdf5_path):
    walker = tmp_path / "walker.pt"  # the right kind of checkpoint, trained on another env
    torch.save(dict(model={}, args=asdict(trdt.Args()), dataset=dict(name="walker2d-medium", obs_dim=17, act_dim=6)), walker)
    with pytest.raises(SystemExit, match="trained on walker2d-medium .* pass the --env it was trained on"):
        trdt.train(tiny_args(tmp_path, hdf5_path, updates=0, checkpoint=str(walker)))
    foreign = tmp_path / "foreign.pt"  # dt.py's checkpoints have no Gaussian-heads flag
    torch.save(dict(model={}, args=dict(policy="deterministic"), dataset=dict(name="hopper-random", obs_dim=11, act_dim=3)), foreign)
    with pytest.raises(SystemExit, match="not a model.pt written by trdt.py"):
        trdt.train(tiny_args(tmp_path, hdf5_path, updates=0, checkpoint=str(foreign)))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="torch cannot read it"):
        trdt.train(tiny_args(tmp_path, hdf5_path, updates=0, checkpoint=str(tmp_path / "junk.pt")))
    with pytest.raises(SystemExit, match="is not a device"):
        trdt.train(tiny_args(tmp_path, hdf5_path, device="gpu"))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="sees no CUDA GPU"):
            trdt.train(tiny_args(tmp_path, hdf5_path, device="cuda"))
    assert not (tmp_path / "runs").exists()


def test_state_normalisation_can_come_from_a_checkpoint(hdf5_path):
    eps, _ = common.load_dataset("hopper-random", [str(hdf5_path)])
    own = trdt.make_dataset(eps, torch.device("cpu"), 1.0, 1000, 3)
    mean, std = np.ones(11, np.float32), np.full(11, 2.0, np.float32)
    given = trdt.make_dataset(eps, torch.device("cpu"), 1.0, 1000, 3, state_stats=(mean, std))
    obs = np.concatenate([ep["observations"] for ep in eps])
    torch.testing.assert_close(given["states"][: len(obs)], torch.as_tensor((obs - 1.0) / 2.0))
    assert given["state_mean"] is mean and not torch.allclose(own["states"], given["states"])


def test_an_existing_run_folder_is_never_overwritten(tmp_path, hdf5_path, monkeypatch):
    monkeypatch.setattr(trdt.time, "time", lambda: 1234.0)
    args = tiny_args(tmp_path, hdf5_path, updates=2, eval_every=0)
    run_dir = Path(args.runs_dir) / "hopper-random__trdt__0__1234"
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text("precious")
    with pytest.raises(SystemExit, match="refusing to overwrite"):
        trdt.train(args)
    assert (run_dir / "results.json").read_text() == "precious"


def test_cli_help_explains_every_flag():
    out = subprocess.run([sys.executable, "trdt.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for flag in ("--lambdas", "--gaussian-heads", "--no-gaussian-heads", "--schedule", "--rtg-update", "--grad-cos-every",
                 "--bins", "--attention", "--checkpoint", "--eval-async"):
        assert flag in out
    assert "Eq. 1.16" in out and "Thm 3" in out


def test_table_1_1_and_1_2_defaults():
    a = trdt.Args()
    assert {k: getattr(a, k) for k in trdt.TABLE_1_1} == trdt.TABLE_1_1
    assert trdt.TABLE_1_1 == dict(bins=3, n_layer=4, n_head=4, n_embd=256, context_len=20, dropout=0.1, batch_size=256,
                                  lr=1e-4, weight_decay=1e-3, grad_clip=0.25, warmup_steps=10_000, updates=100_000,
                                  gaussian_heads=True, timestep_embedding=False, schedule="joint", rtg_update="model")
    assert a.lambdas == (0.25,) * 4  # uniform on the simplex
    assert isinstance(small_model().blocks[0].mlp[1], torch.nn.ReLU)
    assert not any("pos" in n for n, _ in small_model().named_parameters())  # no positional embedding
    assert trdt.TARGET_RETURNS == {"hopper": 7200.0, "walker2d": 10000.0, "halfcheetah": 12000.0}
    assert sum(v[0] for v in trdt.THESIS_TABLE_1_3.values()) == pytest.approx(726.77)


def test_claims_verdicts():
    info = dict(name="hopper-medium-replay", source="d4rl")  # Table 1.3: 97.82 ± 2.3
    thesis = trdt.Args()
    verdict = lambda score, n=100_000, args=thesis: trdt.claims_table(
        args, asdict(args), n, info, dict(normalized_mean=score, normalized_std=0.0), None, [])[0]["verdict"]
    assert verdict(97.82 - 2.2) == "reproduced" and verdict(97.82 + 4.5) == "partly" and verdict(90.0) == "not reproduced"
    assert verdict(97.8, n=10).startswith("not comparable: differs from Table 1.1 in updates")
    assert "lambdas" in verdict(97.8, args=trdt.Args(lambdas=(0.7, 0.1, 0.1, 0.1)))
    assert "target_return (Table 1.2)" in verdict(97.8, args=trdt.Args(target_return=3600.0))
    assert "timestep_embedding" in verdict(97.8, args=trdt.Args(timestep_embedding=True))
    assert "replica data" in trdt.claims_table(thesis, asdict(thesis), 100_000, dict(info, source="replica"),
                                              dict(normalized_mean=97.8, normalized_std=0.0), None, [])[0]["verdict"]
    assert trdt.claims_table(thesis, asdict(thesis), 1, dict(name="hopper-random", source="d4rl"),
                             dict(normalized_mean=1.0, normalized_std=0.0), None, []) == []
    # Fig. 1.3: later blocks put more mass on actions and regions together than on states or returns
    att = dict(samples=5, modality_mass_mean=[[0.4, 0.4, 0.1, 0.1], [0.2, 0.2, 0.3, 0.3]])
    rows = trdt.claims_table(thesis, asdict(thesis), 100_000, dict(info, name="x"), dict(normalized_mean=0.0, normalized_std=0.0), att, [])
    assert rows[0]["claim"].startswith("Fig. 1.3") and rows[0]["verdict"] == "reproduced"
    assert "block 2: return 0.20, state 0.20, region 0.30, action 0.30" in rows[0]["ours"]
    more_than_block_1 = dict(att, modality_mass_mean=[[0.4, 0.4, 0.1, 0.1], [0.25, 0.45, 0.15, 0.15]])  # but states lead
    rows = trdt.claims_table(thesis, asdict(thesis), 100_000, dict(info, name="x"), dict(normalized_mean=0.0, normalized_std=0.0),
                             more_than_block_1, [])
    assert rows[0]["verdict"] == "not reproduced"
    empty = trdt.claims_table(thesis, asdict(thesis), 100_000, dict(info, name="x"), dict(normalized_mean=0.0, normalized_std=0.0),
                              dict(att, samples=0), [])
    assert empty[0]["verdict"].startswith("not measured")  # episodes shorter than K: no attention was recorded
    cos = [dict(step=0, cos_action_state=0.5, cos_action_return=0.2), dict(step=9, cos_action_state=0.1, cos_action_return=0.3)]
    rows = trdt.claims_table(thesis, asdict(thesis), 100_000, dict(info, name="x"), dict(normalized_mean=0.0, normalized_std=0.0), None, cos)
    assert rows[0]["claim"].startswith("Ch. 3") and rows[0]["verdict"] == "partly"


def test_attention_recorder_on_hand_made_weights(tmp_path):
    """Two heads, K = 2; head 0: s_1 -> g_1, s_2 -> s_1 and s_2 halves; head 1: s_1 -> g_1 and s_1 halves, s_2 -> a_1."""
    M, K = len(trdt.MODALITIES), 2
    g, s, a = (trdt.MODALITIES.index(m) for m in ("return", "state", "action"))
    att = torch.zeros(2, 2, M * K, M * K)  # (N, nh, T, T); the second sample is a finished episode
    att[0, 0, s, g] = 1.0
    att[0, 0, M + s, [s, M + s]] = 0.5
    att[0, 1, s, [g, s]] = 0.5
    att[0, 1, M + s, a] = 1.0
    att[1] = 7.0  # garbage: must not be counted
    rec = trdt.AttentionRecorder(1, 2, K)
    rec.add([att], torch.tensor([True, False]))
    out = rec.report(tmp_path, "hand-made")
    mass = {m: (out["modality_mass_mean"][0][i], out["modality_mass_std_across_heads"][0][i]) for i, m in enumerate(trdt.MODALITIES)}
    assert mass["return"] == pytest.approx((0.375, 0.125)) and mass["state"] == pytest.approx((0.375, 0.125))
    assert mass["action"] == pytest.approx((0.25, 0.25)) and mass["region"] == (0.0, 0.0)
    assert out["entropy_per_head"] == [pytest.approx([math.log(2) / 2] * 2)] and out["samples"] == 1
    maps = np.array(out["state_row_maps"][0])  # averaged over heads
    assert maps.shape == (K, M * K) and maps[0, g] == 0.75 and maps[0, s] == 0.25 and maps[1, a] == 0.5
    assert (tmp_path / "attention.png").stat().st_size > 0 and json.loads((tmp_path / "attention.json").read_text()) == out


def spied_evaluation(tmp_path, hdf5_path, env_rewards, **kw):
    """Evaluate an untrained model while recording every forward pass and every reward of the two envs."""
    args = tiny_args(tmp_path, hdf5_path, context_len=3, target_return=3600.0, **kw)
    _, info = common.load_dataset(args.env, args.dataset_path)
    torch.manual_seed(0)
    model = trdt.TrustRegionDecisionTransformer(info["obs_dim"], info["act_dim"], 2, 2, 16, 0.0, 1000, 3, True)
    calls, forward = [], model.forward

    def spy(*x, **k):
        out = forward(*x, **k)
        calls.append(([v.clone() for v in x], out["action_mean"][:, -1].clone(), out["return_mean"][:, -1].clone()))
        return out

    model.forward = spy
    res = trdt.evaluate(model, info, np.zeros(info["obs_dim"]), np.ones(info["obs_dim"]), args, torch.device("cpu"), seed=0)
    return calls, env_rewards[:2], res


def test_inference_follows_alg_1(tmp_path, hdf5_path, env_rewards):
    calls, rewards, res = spied_evaluation(tmp_path, hdf5_path, env_rewards)
    steps = max(res["lengths"])
    assert len(calls) == 2 * steps - 1  # per step: the action forward, then (not after the last) the return forward
    for t in range(steps):
        (rtg, states, regions, actions, _), a_pred, _ = calls[2 * t]
        assert rtg.shape[1] == min(t + 1, 3)  # the last K steps
        assert (regions[:, -1] == 0).all() and (actions[:, -1] == 0).all()  # a_t is predicted before ā_t, a_t exist
        if t == 0:
            assert (rtg[:, 0] == 3.6).all()  # g_1 = target return / rtg scale
        else:  # Eq. 1.16, Alg. 1 line 23: g_t is what the return head said on the a_{t-1} token
            torch.testing.assert_close(rtg[:, -1, 0], calls[2 * t - 1][2][:, 0])
        if t + 1 < steps:
            (_, states2, regions2, actions2, _), _, _ = calls[2 * t + 1]
            torch.testing.assert_close(states2, states)
            torch.testing.assert_close(actions2[:, -1], a_pred.clamp(-1, 1))  # the executed action ...
            torch.testing.assert_close(regions2[:, -1], trdt.encode_regions(actions2[:, -1], 3))  # ... and its region (line 20)
            torch.testing.assert_close(regions2[:, :-1], regions[:, :-1])
    assert [len(r) for r in rewards] == res["lengths"] and res["returns"] == pytest.approx([sum(r) for r in rewards])


def test_inference_with_the_subtraction_rule(tmp_path, hdf5_path, env_rewards):
    calls, rewards, res = spied_evaluation(tmp_path, hdf5_path, env_rewards, rtg_update="subtract")
    assert len(calls) == max(res["lengths"])  # one forward per step: no return-head pass
    for t in range(1, len(calls)):
        for i in range(2):
            if t < res["lengths"][i]:  # DT's rule g_{t+1} = g_t - r_t (in units of --rtg-scale)
                assert calls[t][0][0][i, -1, 0].item() == pytest.approx(calls[t - 1][0][0][i, -1, 0].item() - rewards[i][t - 1] / 1000, abs=1e-5)


def test_no_timestep_embedding_by_default_and_mse_ablation_keeps_a_gaussian_action_head():
    assert trdt.Args().timestep_embedding is False
    model = small_model()
    assert not any(n.startswith("embed_t") for n, _ in model.named_parameters())
    out = small_model(gaussian=False)(**random_inputs())
    assert out["action_log_std"] is not None and out["state_log_std"] is None and out["return_log_std"] is None


def test_lamb_is_the_same_code_as_mo_dt():
    import inspect

    import mo_dt

    assert inspect.getsource(trdt.Lamb) == inspect.getsource(mo_dt.Lamb)
    assert inspect.getsource(trdt.make_optimizer) == inspect.getsource(mo_dt.make_optimizer)
