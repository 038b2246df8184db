import copy
import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import mo_dt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import attention  # noqa: E402  (benchmarks/: the hooks that capture attention)

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def tiny_args(tmp_path, hdf5_path, **kw):
    base = dict(
        env="hopper-random",
        dataset_path=(str(hdf5_path),),
        updates=20,
        batch_size=8,
        n_embd=32,
        n_layer=2,
        n_head=2,
        warmup_steps=5,
        eval_every=10,
        eval_episodes=2,
        runs_dir=str(tmp_path / "runs"),
        log_every=5,
    )
    return mo_dt.Args(**{**base, **kw})


# --- data: targets and masks (Eq. 1.7, 1.8) -------------------------------------------------------


def episodes(lengths=(3, 4), dim=2):
    """State of step t in episode i = (1000 i + t) in every dimension; reward 1 per step; action =
    i."""
    eps = []
    for i, n in enumerate(lengths):
        eps.append(
            dict(
                observations=np.repeat(np.arange(n, dtype=np.float32)[:, None] + 1000 * i, dim, 1),
                actions=np.full((n, 1), float(i), np.float32),
                rewards=np.ones(n, np.float32),
                terminated=True,
            )
        )
    return eps


def test_next_state_and_return_targets_are_masked_at_episode_ends():
    data = mo_dt.make_dataset(episodes((3, 4)), torch.device("cpu"), rtg_scale=1.0, max_ep_len=100)
    steps = data["steps"]
    assert steps["has_next"].tolist() == [True, True, False, True, True, True, False]
    # g_{t+1} = g_t - r_t, 0 after an episode's last step
    np.testing.assert_allclose(steps["next_rtg"][:, 0].numpy(), [2, 1, 0, 3, 2, 1, 0])
    assert (steps["next_states"][~steps["has_next"]] == 0).all()
    mean, std = data["state_stats"]
    raw = lambda x: x * float(std[0]) + float(mean[0])  # undo the normalization
    b = mo_dt.sample_batch(data, 256, 5, torch.Generator().manual_seed(0))
    assert set(b) == set(steps) | {"mask"}  # every per-step tensor is gathered
    for i in range(256):
        m, nm = b["mask"][i], b["mask"][i] & b["has_next"][i]
        # the last real step has no next state iff g_t = r_t
        assert m[-1] and nm[-1] == (b["rtg"][i, -1, 0] > 1)
        # only the episode's last step and padding lose it
        assert not b["has_next"][i][~m].any() and nm[m][:-1].all()
        s, ns = raw(b["states"][i, :, 0]), raw(b["next_states"][i, :, 0])
        # s_{t+1}, same episode
        np.testing.assert_allclose(ns[nm].numpy(), s[nm].numpy() + 1, atol=1e-3)
        assert (b["next_states"][i][~nm] == 0).all()
        np.testing.assert_allclose(b["next_rtg"][i][m, 0].numpy(), b["rtg"][i][m, 0].numpy() - 1)
        assert (b["next_rtg"][i][~m] == 0).all()
    # both kinds of masked step were drawn
    assert (b["mask"] & ~b["has_next"]).any() and (~b["mask"]).any()


def test_state_normalisation_can_come_from_a_checkpoint():
    eps = episodes((4,))
    own = mo_dt.make_dataset(eps, torch.device("cpu"), rtg_scale=1.0, max_ep_len=10)
    mean, std = np.full(2, 1.0, np.float32), np.full(2, 2.0, np.float32)
    given = mo_dt.make_dataset(
        eps, torch.device("cpu"), rtg_scale=1.0, max_ep_len=10, state_stats=(mean, std)
    )
    torch.testing.assert_close(
        given["steps"]["states"], torch.as_tensor((eps[0]["observations"] - 1.0) / 2.0)
    )
    np.testing.assert_array_equal(given["state_stats"][0], mean)
    np.testing.assert_array_equal(given["state_stats"][1], std)
    assert not torch.allclose(own["steps"]["states"], given["steps"]["states"])
    # the next-state targets are on the same scale as the states
    torch.testing.assert_close(given["steps"]["next_states"][:3], given["steps"]["states"][1:])


# --- model: each head sees exactly its context ----------------------------------------------------


def small_model(gaussian=True, dropout=0.0, **kw):
    torch.manual_seed(0)
    arch = dict(
        state_dim=3,
        act_dim=2,
        gaussian_heads=gaussian,
        timestep_embedding=False,
        context_len=6,
        n_layer=2,
        n_head=2,
        n_embd=16,
        dropout=dropout,
        max_ep_len=50,
        rtg_scale=1.0,
    )
    return mo_dt.MultiObjectiveDecisionTransformer(**{**arch, **kw}).eval()


def random_inputs(B=2, K=6):
    g = torch.Generator().manual_seed(1)
    return dict(
        rtg=torch.randn(B, K, 1, generator=g),
        states=torch.randn(B, K, 3, generator=g),
        actions=torch.randn(B, K, 2, generator=g),
        timesteps=torch.arange(K).repeat(B, 1),
        mask=torch.ones(B, K, dtype=torch.bool),
    )


def changed(x, key, t, by=5.0):
    """A copy of the inputs with `key` changed at step t (an int) or from step t on (a slice)."""
    y = {k: v.clone() for k, v in x.items()}
    y[key][:, t] += by
    return y


@pytest.mark.parametrize("gaussian", [True, False])
def test_causality_each_head_sees_exactly_its_context(gaussian):
    model, x, t = small_model(gaussian), random_inputs(), 2
    base = model(x)
    pred = lambda y, task: model(y)[task][0]
    # a_t (read off the s_t token) must not see a_t or anything after it ...
    for key, first in (("actions", t), ("states", t + 1), ("rtg", t + 1)):
        out = pred(changed(x, key, slice(first, None)), "action")
        torch.testing.assert_close(out[:, : t + 1], base["action"][0][:, : t + 1])
        # later predictions do see it
        assert not torch.allclose(out[:, t + 1 :], base["action"][0][:, t + 1 :])
    # ... but must see s_t and g_t
    for key in ("states", "rtg"):
        assert not torch.allclose(pred(changed(x, key, t), "action")[:, t], base["action"][0][:, t])
    # s_{t+1}, g_{t+1} (read off the a_t token) must not see s_{t+1}, g_{t+1} or later, but all of
    # step t
    for task in ("state", "return"):
        for key in ("states", "rtg"):
            out = pred(changed(x, key, slice(t + 1, None)), task)
            torch.testing.assert_close(out[:, : t + 1], base[task][0][:, : t + 1])
            assert not torch.allclose(out[:, t + 1 :], base[task][0][:, t + 1 :])
        for key in ("actions", "states", "rtg"):
            assert not torch.allclose(pred(changed(x, key, t), task)[:, t], base[task][0][:, t]), (
                task,
                key,
            )
    assert (base["state"][1] is None) == (not gaussian) and base["state"][0].shape == (2, 6, 3)
    assert base["return"][0].shape == (2, 6, 1) and base["action"][0].abs().max() <= 1


def test_padded_positions_do_not_leak_and_match_a_shorter_context():
    model, x = small_model(), random_inputs()
    x["mask"][:, :2] = False  # two padded steps on the left
    base = model(x)
    y = {k: v.clone() for k, v in x.items()}
    for k in ("rtg", "states", "actions"):
        y[k][:, :2] = 9.0
    out = model(y)
    # evaluation: short contexts, no padding
    short = model({k: v[:, 2:] for k, v in x.items() if k != "mask"})
    for task in mo_dt.TASKS:
        torch.testing.assert_close(out[task][0][:, 2:], base[task][0][:, 2:])
        torch.testing.assert_close(short[task][0], base[task][0][:, 2:])
    # the test can fail: without the mask 9s leak
    no_mask = model({k: v for k, v in y.items() if k != "mask"})
    assert not torch.allclose(no_mask["action"][0][:, 2:], base["action"][0][:, 2:])


def test_attention_weights_captured_by_hooks_are_causal():
    model, x = small_model(), random_inputs()
    x["mask"][0, :2] = False
    preds, atts = attention.forward_attention(model, x)
    for task, plain in model(x).items():
        for f, s in zip(plain, preds[task]):
            torch.testing.assert_close(f, s)
    assert len(atts) == 2 and atts[0].shape == (2, 2, 18, 18)
    torch.testing.assert_close(atts[1].sum(-1), torch.ones(2, 2, 18))
    assert all((a.triu(1) == 0).all() for a in atts)
    # padding gets no weight
    assert all((a[0, :, 6:, :6] == 0).all() and (a[1, :, 6:, :6] > 0).any() for a in atts)


# --- losses (Eq. 1.4, 1.7, 1.8) and the heads -----------------------------------------------------


def test_losses_on_a_hand_computed_batch():
    # one segment of 2 steps; 1-d actions, states and returns; step 2 has no next state
    batch = dict(
        actions=torch.tensor([[[0.5], [0.0]]]),
        mask=torch.tensor([[True, True]]),
        next_states=torch.tensor([[[2.0], [0.0]]]),
        has_next=torch.tensor([[True, False]]),
        next_rtg=torch.tensor([[[1.0], [0.0]]]),
    )
    zeros = torch.zeros(1, 2, 1)
    preds = {
        "action": (zeros, zeros),
        "state": (zeros, torch.full((1, 2, 1), math.log(2.0))),
        "return": (zeros, zeros),
    }
    c = 0.5 * math.log(2 * math.pi)
    losses = mo_dt.task_losses(preds, batch)
    assert list(losses) == list(mo_dt.TASKS)
    # mean over the 2 real steps
    assert losses["action"].item() == pytest.approx((0.5 * 0.25 + c + c) / 2)
    # only step 1 counts
    assert losses["state"].item() == pytest.approx(0.5 * (2 / 2) ** 2 + math.log(2) + c)
    assert losses["return"].item() == pytest.approx((0.5 + c + c) / 2)
    mse = mo_dt.task_losses({k: (v[0], None) for k, v in preds.items()}, batch)
    assert [mse[k].item() for k in mo_dt.TASKS] == pytest.approx([0.125, 4.0, 0.5])
    padded = dict(batch, mask=torch.tensor([[False, True]]))  # a padded step counts for no task
    assert [mo_dt.task_losses(preds, padded)[k].item() for k in mo_dt.TASKS] == pytest.approx(
        [c, 0.0, c]
    )
    # no next state at all: 0, not NaN
    nothing = dict(batch, has_next=torch.zeros(1, 2, dtype=torch.bool))
    assert mo_dt.task_losses(preds, nothing)["state"].item() == 0.0
    assert mo_dt.bounded_log_std(torch.tensor([-1e9, 0.0, 1e9])).tolist() == pytest.approx(
        [-5.0, -1.5, 2.0]
    )


def test_mse_ablation_switches_the_state_and_return_heads_only():
    """Fig. 1.4a ablates the Gaussian heads for states and returns; the action head stays
    Gaussian."""
    preds = small_model(gaussian=False)(random_inputs())
    assert (
        preds["action"][1] is not None and preds["state"][1] is None and preds["return"][1] is None
    )
    preds = small_model(gaussian=True)(random_inputs())
    assert all(log_std is not None for _, log_std in preds.values())


def test_no_timestep_embedding_by_default_and_the_flag_adds_it():
    assert mo_dt.Args().timestep_embedding is False  # Table 1.1: "positional embedding: No"
    x = random_inputs()
    # the same tokens, told they happen 7 steps later
    later = changed(x, "timesteps", slice(None), by=7)
    model = small_model()
    assert model.embed_t is None and not any(
        n.startswith("embed_t") for n, _ in model.named_parameters()
    )
    for task in mo_dt.TASKS:
        torch.testing.assert_close(model(x)[task][0], model(later)[task][0])
    with_t = small_model(timestep_embedding=True)
    assert not torch.allclose(with_t(x)["action"][0], with_t(later)["action"][0])


# --- loss weights and schedules (Eq. 1.9, 1.10, Chapter 3) ----------------------------------------


def test_lambda_validation():
    assert mo_dt.Args(lambdas=(0.5, 0.25, 0.25)).lambdas == (0.5, 0.25, 0.25)
    mo_dt.Args(lambdas=(1.0, 0.0, 1e-7))  # within 1e-6 of the simplex
    assert sum(mo_dt.Args().lambdas) == pytest.approx(1.0)
    for bad in (
        (0.5, 0.5),
        (0.25,) * 4,
        (1.5, -0.25, -0.25),
        (0.4, 0.4, 0.4),
        (float("nan"), 0.5, 0.5),
        (float("inf"), 0.0, 0.0),
    ):
        message = f"--lambdas {' '.join(map(str, bad))}: need 3 non-negative weights summing to 1"
        with pytest.raises(SystemExit, match=re.escape(message) + r".*\(action, state, return\)"):
            mo_dt.Args(lambdas=bad)


def shared(model):
    """The parameters every task trains (all but the heads, theta_DT, theta_s, theta_g of
    Eq. 1.9)."""
    return torch.cat(
        [p.detach().flatten() for n, p in model.named_parameters() if not n.startswith("heads.")]
    )


def one_update(schedule, lambdas):
    """Both schedules from the same weights, optimizer state and batch (dropout 0, so no
    randomness)."""
    model = small_model().train()
    data = mo_dt.make_dataset(
        episodes((10, 12), dim=3), torch.device("cpu"), rtg_scale=10.0, max_ep_len=50
    )
    steps = data["steps"]
    steps["actions"] = (
        torch.rand(len(steps["actions"]), 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    )
    batch = mo_dt.sample_batch(data, 4, 6, torch.Generator().manual_seed(0))
    opt, _ = mo_dt.make_optimizer(model, mo_dt.Args(lr=1e-3))
    losses, grad_norm = mo_dt.update(
        model,
        opt,
        batch,
        dict(zip(mo_dt.TASKS, lambdas)),
        schedule,
        grad_clip=0.25,
        autocast=NO_AUTOCAST,
    )
    return model, losses, grad_norm


def test_alternating_and_joint_schedules_make_different_updates():
    start = small_model()
    joint, lj, nj = one_update("joint", (1 / 3,) * 3)
    alt, la, na = one_update("alternating", (1 / 3,) * 3)
    assert set(lj) == set(la) == set(mo_dt.TASKS) and nj > 0 and na > 0
    # the later tasks' gradients see the moved weights
    assert not torch.allclose(shared(joint), shared(alt))
    assert not torch.allclose(shared(joint), shared(start))
    # the first task step starts from the same point
    assert lj["action"].item() == pytest.approx(la["action"].item())
    assert lj["state"].item() != pytest.approx(la["state"].item())  # the second one does not
    # with all weight on one task the two schedules are the same algorithm: identical shared weights
    joint1, _, _ = one_update("joint", (1.0, 0.0, 0.0))
    alt1, losses, _ = one_update("alternating", (1.0, 0.0, 0.0))
    torch.testing.assert_close(shared(joint1), shared(alt1))
    # a task with lambda 0 takes no step: LAMB's weight decay would move its head even on a zero
    # gradient
    assert set(losses) == {"action"}
    for task in ("state", "return"):
        assert torch.equal(alt1.heads[task].weight, start.heads[task].weight), task
    assert not torch.equal(alt1.heads["action"].weight, start.heads["action"].weight)


def sgd_update(model, batch, schedule, lr, lambdas):
    m = copy.deepcopy(model)
    lambdas = dict(zip(mo_dt.TASKS, lambdas))
    mo_dt.update(
        m, torch.optim.SGD(m.parameters(), lr=lr), batch, lambdas, schedule, 1e9, NO_AUTOCAST
    )
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def relu_signs(model, theta, batch):
    """Which ReLU units of the blocks are on, with the weights set to theta."""
    m, signs = copy.deepcopy(model), []
    torch.nn.utils.vector_to_parameters(theta, m.parameters())
    for block in m.blocks:
        block.mlp[1].register_forward_hook(lambda module, inputs, out: signs.append(inputs[0] > 0))
    with torch.no_grad():
        m(batch)
    return torch.cat([s.flatten() for s in signs])


def alternating_by_hand(model, batch, lam, eta):
    """Ch. 3's sequential regime written out: one SGD step on lambda_i L_i per task, in the order of
    TASKS, each from where the last one left the weights; the weights after every step."""
    m, thetas = copy.deepcopy(model), []
    for task, w in zip(mo_dt.TASKS, lam):
        loss = w * mo_dt.task_losses(m(batch), batch)[task]
        grads = torch.autograd.grad(loss, list(m.parameters()), materialize_grads=True)
        with torch.no_grad():
            for p, gp in zip(m.parameters(), grads):
                p -= eta * gp
        thetas.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    return thetas


@torch.nn.attention.sdpa_kernel(
    torch.nn.attention.SDPBackend.MATH
)  # the math kernel has a double backward
def test_joint_is_one_step_on_the_weighted_sum_and_alternating_matches_thm_3():
    # float64: the O(eta^2) gap must stand well above rounding. head_loss computes in float32 (for
    # autocast) which leaves a relative floor of about 1e-7 / eta, so eta cannot be tiny; log-stds
    # are held at 0 (sigma 1), as a random head's bounded log-std reaches e^-4 and its 1/sigma^2
    # gradients would be huge. The expansion holds only where no ReLU changes sign between the two
    # step sizes; these weights (seed 0 with the timestep table) and this batch have no such kink at
    # every point of both paths, which is checked, not assumed.
    model = small_model(timestep_embedding=True).double()
    with torch.no_grad():
        for task, head in model.heads.items():
            if model.gaussian[task]:
                d = head.out_features // 2
                # bounded_log_std(0.458...) = 0
                head.weight[d:], head.bias[d:] = (0.0, math.atanh(5 / 3.5 - 1))
    g64 = torch.Generator().manual_seed(8)
    x = {
        k: (v.double() if v.is_floating_point() else v) for k, v in random_inputs(B=2, K=3).items()
    }
    x["actions"] = x["actions"].tanh()  # in the action box
    batch = dict(
        x,
        next_states=torch.randn(2, 3, 3, generator=g64, dtype=torch.float64),
        next_rtg=torch.randn(2, 3, 1, generator=g64, dtype=torch.float64),
        has_next=torch.ones(2, 3).bool(),
    )
    lam = (0.5, 0.3, 0.2)
    params = list(model.parameters())
    theta = torch.cat([p.detach().flatten() for p in params])
    losses = mo_dt.task_losses(model(batch), batch)
    flat = lambda gs: torch.cat([g.flatten() for g in gs])
    g = [
        torch.autograd.grad(w * losses[k], params, create_graph=True, materialize_grads=True)
        for k, w in zip(mo_dt.TASKS, lam)
    ]
    eta = 1e-3
    joint = sgd_update(model, batch, "joint", eta, lam)
    torch.testing.assert_close(joint, (theta - eta * sum(flat(gi) for gi in g)).detach())  # Eq. 1.9
    alternating = sgd_update(model, batch, "alternating", 0.05, lam)
    torch.testing.assert_close(alternating, alternating_by_hand(model, batch, lam, 0.05)[-1])
    # Thm 3: stepping on the tasks in turn = the joint step + eta^2 sum_j H_j sum_{i<j} g_i +
    # O(eta^3), H_j v computed as the gradient of <g_j, v> with v held fixed
    second = 0
    for j in range(1, len(lam)):
        v = [sum(g[i][n] for i in range(j)).detach() for n in range(len(params))]
        dot = sum((gj * vn).sum() for gj, vn in zip(g[j], v))
        second = second + flat(
            torch.autograd.grad(dot, params, retain_graph=True, materialize_grads=True)
        )
    rel, signs = [], relu_signs(model, theta, batch)
    for e in (2 * eta, eta):
        alternating, joint = (sgd_update(model, batch, s, e, lam) for s in ("alternating", "joint"))
        for point in alternating_by_hand(model, batch, lam, e) + [joint]:
            assert torch.equal(relu_signs(model, point, batch), signs), (
                "a ReLU kink: choose other weights or batch"
            )
        gap = alternating - joint
        rel.append(((gap - e**2 * second.detach()).norm() / gap.norm()).item())
    # the rest is O(eta^3): relative error halves with eta
    assert rel[1] < 0.01 and 1.6 < rel[0] / rel[1] < 2.4


# --- optimizer: LAMB (Table 1.1) ------------------------------------------------------------------


def test_optimizer_is_lamb_and_decays_matrices_only():
    model = small_model()
    opt, sched = mo_dt.make_optimizer(model, mo_dt.Args(weight_decay=0.5, lr=1e-3, warmup_steps=4))
    decayed, plain = opt.param_groups
    assert (
        type(opt) is mo_dt.Lamb
        and opt.defaults["eps"] == 1e-8
        and opt.defaults["betas"] == (0.9, 0.999)
    )
    assert decayed["weight_decay"] == 0.5 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert sched.get_last_lr()[0] == pytest.approx(1e-3 / 4)  # linear warmup


def lamb_reference(w, grads, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """timm's LAMB (the ODT code's) step by step in float64 numpy: bias-corrected Adam, decay added
    to the update, trust ratio ||w|| / ||update|| with no cap."""
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
    # scale 20: ||w|| ~ 70, above any cap of 10
    w0 = torch.randn(4, 3, generator=g, dtype=torch.float64) * scale
    grads = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    p = torch.nn.Parameter(w0.clone())
    opt = mo_dt.Lamb([dict(params=[p], weight_decay=weight_decay)], lr=0.01)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    expected = lamb_reference(w0.numpy(), [x.numpy() for x in grads], 0.01, weight_decay)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-12, atol=1e-15)


def test_make_optimizer_moves_every_tensor_by_lr_times_its_norm():
    """The trust ratio makes the first step of every tensor exactly lr * ||w|| long, however large
    ||w||."""
    model = small_model(timestep_embedding=True).train()
    with torch.no_grad():
        # ||w|| in the hundreds, like a timestep embedding table
        model.heads["state"].weight.mul_(500)
    opt, _ = mo_dt.make_optimizer(model, mo_dt.Args(lr=1e-3, warmup_steps=0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    preds = model(random_inputs())
    sum(m.sum() + (0 if s is None else s.sum()) for m, s in preds.values()).backward()
    opt.step()
    moved = 0
    for n, p in model.named_parameters():
        # a zero tensor: a plain Adam step
        if p.grad is not None and p.grad.abs().sum() > 0 and before[n].norm() > 0:
            assert (p.detach() - before[n]).norm().item() == pytest.approx(
                1e-3 * before[n].norm().item(), rel=1e-4
            ), n
            moved += 1
    assert moved > 10 and before["heads.state.weight"].norm() > 100


# --- training and evaluation end to end -----------------------------------------------------------


# What a benchmark runner reads from results.json (dt.py's results have the same keys).
RESULT_KEYS = set(
    "method args arch dataset target_return device threads git_commit torch returns lengths"
    " normalized return_mean normalized_mean normalized_std eval_env_steps_per_s updates"
    " trained_updates run_dir train_updates_per_s wall_time_s".split()
)


def read_metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("flags", [
    dict(), dict(schedule="alternating", lambdas=(0.5, 0.3, 0.2)), dict(gaussian_heads=False),
    dict(rtg_update="subtract"), dict(n_head=1), dict(timestep_embedding=True),
], ids=["joint", "alternating-weighted",
        "mse-heads", "subtract", "one-head", "timestep-embedding"])  # fmt: skip
def test_end_to_end_with_evaluation(tmp_path, hdf5_path, flags):
    every = 0 if flags else 10  # the variants evaluate once, at the end, to keep the suite fast
    res = mo_dt.train(tiny_args(tmp_path, hdf5_path, eval_every=every, **flags))
    run = Path(res["run_dir"])
    assert {p.name for p in run.iterdir()} == {
        "config.json",
        "metrics.jsonl",
        "results.json",
        "model.pt",
    }
    saved = json.loads((run / "results.json").read_text())
    assert (
        RESULT_KEYS <= set(saved)
        and len(saved["returns"]) == 2
        and saved["dataset"]["source"] == "file"
    )
    # Table 1.2's hopper target
    assert (
        saved["method"] == "mo_dt" and saved["target_return"] == 7200.0 and saved["device"] == "cpu"
    )
    assert saved["normalized_mean"] == pytest.approx(
        np.mean(common.normalized_score(saved["dataset"], saved["returns"]))
    )
    assert (
        saved["train_updates_per_s"] > 0
        and saved["eval_env_steps_per_s"] > 0
        and saved["trained_updates"] == 20
    )
    args = mo_dt.Args(**{**tiny_args(tmp_path, hdf5_path).__dict__, **flags})
    arch = {**{k: getattr(args, k) for k in mo_dt.ARCH}, "state_dim": 11, "act_dim": 3}
    assert saved["arch"] == arch and saved["args"]["schedule"] == args.schedule
    lines = read_metrics(run)
    assert [line["step"] for line in lines if "eval_normalized" in line] == (
        [0, 10, 20] if every else [20]
    )
    losses = [line for line in lines if "loss" in line]
    assert [line["step"] for line in losses] == [0, 5, 10, 15, 19]
    for line in losses:  # every task loss, separately, and the weighted total
        assert np.isfinite([line[f"loss_{k}"] for k in mo_dt.TASKS]).all() and line["grad_norm"] > 0
        assert line["loss"] == pytest.approx(
            sum(w * line[f"loss_{k}"] for k, w in zip(mo_dt.TASKS, args.lambdas))
        )
    # linear warmup
    assert 0 < losses[0]["lr"] < args.lr and losses[-1]["lr"] == pytest.approx(args.lr)
    ckpt = torch.load(run / "model.pt", weights_only=True)  # plain data
    assert ckpt["method"] == "mo_dt" and ckpt["arch"] == arch and ckpt["trained_updates"] == 20
    mo_dt.MultiObjectiveDecisionTransformer(**ckpt["arch"]).load_state_dict(ckpt["model"])


def run_losses(res):
    return [line["loss"] for line in read_metrics(res["run_dir"]) if "loss" in line]


def spy_on_batches(module, monkeypatch):
    """Every batch the training loop draws, as the states it gathered."""
    batches, sample = [], module.sample_batch

    def spy(*args, **kwargs):
        batch = sample(*args, **kwargs)
        batches.append(batch["states"].clone())
        return batch

    monkeypatch.setattr(module, "sample_batch", spy)
    return batches


def test_same_seed_same_run(tmp_path, hdf5_path, monkeypatch):
    batches, runs = spy_on_batches(mo_dt, monkeypatch), {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        start = len(batches)
        runs[name] = mo_dt.train(tiny_args(tmp_path / name, hdf5_path, eval_every=0, seed=seed))
        runs[name]["batches"] = torch.stack(batches[start:])
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert (
        run_losses(a) == run_losses(b)
        and a["returns"] == b["returns"]
        and torch.equal(a["batches"], b["batches"])
    )
    # --seed seeds the sampler
    assert run_losses(a) != run_losses(c) and not torch.equal(a["batches"], c["batches"])


def test_ctrl_c_saves_the_model_trained_so_far(tmp_path, hdf5_path, monkeypatch):
    update, done = mo_dt.update, []

    def interrupted_after_3(*args, **kwargs):
        if len(done) == 3:
            raise KeyboardInterrupt
        done.append(1)
        return update(*args, **kwargs)

    monkeypatch.setattr(mo_dt, "update", interrupted_after_3)
    with pytest.raises(
        SystemExit,
        match=r"interrupted \(Ctrl-C\): .*model\.pt holds 3 updates; continue with "
        r"`python mo_dt\.py --resume .*, or evaluate it with `python mo_dt\.py --checkpoint ",
    ):
        mo_dt.train(tiny_args(tmp_path, hdf5_path, eval_every=0))
    (run,) = (tmp_path / "runs").iterdir()
    # no results: not evaluated
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.jsonl", "model.pt"}
    saved = torch.load(run / "model.pt", weights_only=True)
    assert saved["trained_updates"] == 3 and saved["method"] == "mo_dt"
    mo_dt.MultiObjectiveDecisionTransformer(**saved["arch"]).load_state_dict(saved["model"])


def test_a_checkpoint_alone_evaluates_and_trains_on(tmp_path, hdf5_path):
    data = tmp_path / "hopper.hdf5"
    shutil.copy(hdf5_path, data)
    trained = mo_dt.train(tiny_args(tmp_path, data, eval_every=0))
    ckpt = Path(trained["run_dir"]) / "model.pt"
    # evaluating needs only the checkpoint: its dataset facts, architecture and state normalisation
    data.unlink()
    res = mo_dt.train(
        mo_dt.Args(
            checkpoint=str(ckpt),
            updates=0,
            eval_episodes=2,
            n_layer=5,
            context_len=4,
            runs_dir=str(tmp_path / "ev"),
        )
    )
    assert (
        res["returns"] == trained["returns"]
        and res["trained_updates"] == 20
        and res["updates"] == 0
    )
    # the flags' sizes are ignored
    assert res["arch"]["n_layer"] == 2 and res["arch"]["context_len"] == 20
    assert not (Path(res["run_dir"]) / "model.pt").exists()  # nothing trained, nothing saved
    # the return rule is an evaluation flag, not part of the checkpoint: DT's rule gives other
    # episodes
    subtract = mo_dt.train(
        mo_dt.Args(
            checkpoint=str(ckpt),
            updates=0,
            eval_episodes=2,
            rtg_update="subtract",
            runs_dir=str(tmp_path / "ev2"),
        )
    )
    assert subtract["returns"] != pytest.approx(trained["returns"], rel=1e-6)
    # training on, on other data of the same env: the checkpoint's state normalisation is kept
    from conftest import random_rollouts, write_hdf5

    other = write_hdf5(tmp_path / "other.hdf5", random_rollouts(steps=300, seed=1))
    more = mo_dt.train(
        tiny_args(
            tmp_path,
            other,
            checkpoint=str(ckpt),
            updates=5,
            eval_every=0,
            n_layer=3,
            exp_name="more",
        )
    )
    assert more["trained_updates"] == 25 and more["updates"] == 5 and more["arch"]["n_layer"] == 2
    saved, old = (
        torch.load(p, weights_only=True) for p in (Path(more["run_dir"]) / "model.pt", ckpt)
    )
    assert saved["trained_updates"] == 25 and saved["method"] == "mo_dt"
    torch.testing.assert_close(saved["state_mean"], old["state_mean"])
    torch.testing.assert_close(saved["state_std"], old["state_std"])
    episodes_, _ = common.load_dataset("hopper-random", (str(other),))
    own_mean = np.concatenate([ep["observations"] for ep in episodes_]).mean(0)
    assert not np.allclose(saved["state_mean"].numpy(), own_mean, atol=1e-3)  # the test can fail
    assert not torch.equal(
        saved["model"]["heads.action.weight"], old["model"]["heads.action.weight"]
    )


# --- inference (§1.4.3, Alg. 1 lines 14-26) -------------------------------------------------------


def spied_evaluation(tmp_path, hdf5_path, env_rewards, rtg_scale=400.0, **kw):
    """Evaluate an untrained model while recording every forward pass and every reward of the two
    envs."""
    # args.rtg_scale stays 1000: the model's scale must be used
    args = tiny_args(tmp_path, hdf5_path, **kw)
    _, info = common.load_dataset(args.env, args.dataset_path)
    torch.manual_seed(0)
    model = mo_dt.MultiObjectiveDecisionTransformer(
        state_dim=11,
        act_dim=3,
        gaussian_heads=True,
        timestep_embedding=False,
        context_len=3,
        n_layer=2,
        n_head=2,
        n_embd=16,
        dropout=0.0,
        max_ep_len=1000,
        rtg_scale=rtg_scale,
    )
    calls, forward = [], model.forward

    def spy(x):
        preds = forward(x)
        calls.append(
            (
                {k: v.clone() for k, v in x.items()},
                preds["action"][0][:, -1],
                preds["return"][0][:, -1],
            )
        )
        return preds

    model.forward = spy
    stats = (np.zeros(11, np.float32), np.ones(11, np.float32))
    # the envs evaluate makes from here on: the two episodes', then a probe
    first = len(env_rewards)
    res = mo_dt.evaluate(model, info, stats, args, 3600.0, torch.device("cpu"), NO_AUTOCAST)
    assert len(env_rewards) == first + 3 and env_rewards[-1] == []
    logs = env_rewards[first : first + 2]
    # a finished env is reset and stepped on
    rewards = [log[:n] for log, n in zip(logs, res["lengths"])]
    assert res["returns"] == pytest.approx([sum(r) for r in rewards]) and min(res["lengths"]) > 1
    return calls, rewards, res


def test_inference_follows_alg_1(tmp_path, hdf5_path, env_rewards):
    calls, rewards, res = spied_evaluation(tmp_path, hdf5_path, env_rewards)
    steps = max(res["lengths"])
    # per step: the action forward, then (not after the last) the return forward
    assert len(calls) == 2 * steps - 1
    for t in range(steps):
        x, a_pred, _ = calls[2 * t]
        # the last K steps, no padding
        assert x["rtg"].shape[1] == min(t + 1, 3) and "mask" not in x
        # a_t not yet known
        assert x["timesteps"][:, -1].tolist() == [t, t] and (x["actions"][:, -1] == 0).all()
        if t == 0:
            # g_1 = target return / the model's rtg scale
            assert (x["rtg"][:, 0, 0] == 3600.0 / 400.0).all()
        else:  # Eq. 1.16, Alg. 1 line 23: g_t is what the return head said on the a_{t-1} token
            torch.testing.assert_close(x["rtg"][:, -1, 0], calls[2 * t - 1][2][:, 0])
            torch.testing.assert_close(
                x["rtg"][:, :-1], calls[2 * t - 1][0]["rtg"][:, -x["rtg"].shape[1] + 1 :]
            )
        if t + 1 < steps:
            y, _, _ = calls[2 * t + 1]
            torch.testing.assert_close(y["states"], x["states"])
            torch.testing.assert_close(y["rtg"], x["rtg"])
            # the executed action (Eq. 1.15)
            torch.testing.assert_close(y["actions"][:, -1], a_pred.clamp(-1, 1))
            torch.testing.assert_close(y["actions"][:, :-1], x["actions"][:, :-1])
    returns = [c[2][:, 0] for c in calls[1::2]]
    # the return head's guesses change: the test can fail
    assert not torch.allclose(returns[0], returns[-1])


def test_inference_with_the_subtraction_rule(tmp_path, hdf5_path, env_rewards):
    calls, rewards, res = spied_evaluation(tmp_path, hdf5_path, env_rewards, rtg_update="subtract")
    assert len(calls) == max(res["lengths"])  # one forward per step: no return-head pass
    assert (calls[0][0]["rtg"][:, 0, 0] == 9.0).all()
    for t in range(1, len(calls)):
        for i in range(2):
            # DT's rule g_{t+1} = g_t - r_t, in units of the model's rtg scale
            if t < res["lengths"][i]:
                g, g_before = (
                    calls[t][0]["rtg"][i, -1, 0].item(),
                    calls[t - 1][0]["rtg"][i, -1, 0].item(),
                )
                assert g == pytest.approx(g_before - rewards[i][t - 1] / 400.0, abs=1e-5)


# forced, whatever the CPU: the path every GPU takes
BF16 = torch.autocast("cpu", dtype=torch.bfloat16)


def fed_back_returns(module, model, args, info) -> tuple:
    """Evaluate under bf16 autocast. For each return forward (Eq. 1.16): the return-to-go the loop
    fed back, and the return head applied in plain fp32 to that forward's final hidden state."""
    hidden, calls, forward, body = [], [], model.forward, []
    model.ln_f.register_forward_hook(lambda m, i, out: hidden.append(out))
    model.blocks[0].register_forward_hook(lambda m, i, out: body.append(out.dtype))

    def spy(x):
        calls.append({k: v.clone() for k, v in x.items()})
        return forward(x)

    model.forward = spy
    stats = (np.zeros(11, np.float32), np.ones(11, np.float32))
    module.evaluate(model, info, stats, args, 3600.0, torch.device("cpu"), BF16)
    assert set(body) == {torch.bfloat16}  # the transformer itself ran in bf16
    read, fed, fp32 = module.MODALITIES.index("actions"), [], []
    # the return forwards; the next call holds what they fed back
    for c in range(1, len(calls) - 1, 2):
        B, K = calls[c]["states"].shape[:2]
        h = hidden[c].reshape(B, K, len(module.MODALITIES), -1)[:, -1, read].float()
        with torch.no_grad():
            fp32.append(model.heads["return"](h)[:, 0])
        fed.append(calls[c + 1]["rtg"][:, -1, 0])
    assert len(fed) > 3
    return torch.stack(fed), torch.stack(fp32)


def test_a_return_fed_back_under_bf16_is_the_fp32_heads(tmp_path, hdf5_path):
    """Issue 28: in bf16 a fed-back return-to-go above ~500 could not move by one step's reward."""
    args = tiny_args(tmp_path, hdf5_path)
    _, info = common.load_dataset(args.env, args.dataset_path)
    model = small_model(state_dim=11, act_dim=3, context_len=3, rtg_scale=400.0, max_ep_len=1000)
    fed, fp32 = fed_back_returns(mo_dt, model, args, info)
    torch.testing.assert_close(fed, fp32)  # fp32's tolerance
    with BF16:
        preds = small_model()(random_inputs())
    assert {t.dtype for pred in preds.values() for t in pred if t is not None} == {torch.float32}


# --- arguments, checkpoints, run folders ----------------------------------------------------------


@pytest.mark.parametrize("bad, message", [
    (dict(batch_size=0), "--batch-size 0: must be > 0"),
    (dict(context_len=0), "--context-len 0: must be > 0"),
    (dict(grad_clip=0.0), "--grad-clip 0.0: must be > 0"),
    (dict(grad_clip=-1.0), "--grad-clip -1.0: must be > 0"),
    (dict(rtg_scale=0.0), "--rtg-scale 0.0: must be > 0"),
    (dict(eval_episodes=0), "--eval-episodes 0: must be > 0"),
    (dict(lr=float("nan")), "--lr nan: must be > 0"),
    (dict(weight_decay=-1e-3), "--weight-decay -0.001: must be >= 0"),
    (dict(warmup_steps=-1), "--warmup-steps -1: must be >= 0"),
    (dict(eval_every=-1), "--eval-every -1: must be >= 0"),
    (dict(seed=-1), "--seed -1: must be >= 0"),
    (dict(threads=-2), "--threads -2: must be >= 0"),
    (dict(updates=-5), "--updates -5: must be >= 0"),
    (dict(dropout=1.0), "--dropout 1.0: must be in [0, 1)"),
    (dict(target_return=float("inf")), "--target-return inf: pass a finite return"),
    (dict(n_embd=30, n_head=4), "--n-embd 30 must be divisible by --n-head 4"),
    (dict(updates=0), "--updates 0 trains nothing; add --checkpoint"),
    (dict(lambdas=(0.5, 0.5, 0.5)),
     "--lambdas 0.5 0.5 0.5: need 3 non-negative weights summing to 1"),
    (dict(lambdas=(0.25,) * 4), "--lambdas 0.25 0.25 0.25 0.25: need 3 non-negative weights"),
])  # fmt: skip
def test_bad_flags_name_the_flag_and_its_value(tmp_path, hdf5_path, bad, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        tiny_args(tmp_path, hdf5_path, **bad)


def test_bad_inputs_get_clear_errors_and_leave_nothing_behind(tmp_path, hdf5_path):
    def refused(match, **kw):
        with pytest.raises(SystemExit, match=match):
            mo_dt.train(tiny_args(tmp_path, hdf5_path, **kw))

    refused("no such file", updates=0, checkpoint=str(tmp_path / "none.pt"))
    refused("unknown dataset 'hopper-mediun'", env="hopper-mediun")
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    refused(
        "not a checkpoint torch can read as data",
        updates=0,
        checkpoint=str(tmp_path / "garbage.pt"),
    )
    # a pickled object
    torch.save(dict(method="mo_dt", model=torch.nn.Linear(1, 1)), tmp_path / "code.pt")
    refused(
        "not a checkpoint torch can read as data", updates=0, checkpoint=str(tmp_path / "code.pt")
    )
    # another method's checkpoint: dt.py's (no state or return heads), trdt.py's (region tokens and
    # head)
    for method in ("dt", "trdt"):
        torch.save(
            dict(method=method, model={}, arch={}, trained_updates=1), tmp_path / f"{method}.pt"
        )
        refused(
            f"written by {method}, not mo_dt.py",
            updates=0,
            checkpoint=str(tmp_path / f"{method}.pt"),
        )
    torch.save([1, 2], tmp_path / "list.pt")
    refused(
        "written by another program, not mo_dt.py", updates=0, checkpoint=str(tmp_path / "list.pt")
    )
    # the right kind of checkpoint, trained on another env
    walker = dict(name="walker2d-medium", env_id="Walker2d-v4", obs_dim=17, act_dim=6, path=None)
    torch.save(
        dict(method="mo_dt", model={}, dataset=walker, trained_updates=1), tmp_path / "walker.pt"
    )
    refused(
        r"trained on walker2d-medium \(Walker2d-v4\), not on data of Hopper-v4",
        checkpoint=str(tmp_path / "walker.pt"),
    )
    refused("is not a device", device="gpu")
    if not torch.cuda.is_available():
        refused("sees no CUDA GPU", device="cuda")
    assert not (tmp_path / "runs").exists()  # no run folder is left behind by a refused run
    (tmp_path / "file").write_text("")
    refused(
        "--runs-dir .*file/x: cannot make a run folder there", runs_dir=str(tmp_path / "file" / "x")
    )


def test_an_existing_run_folder_is_never_overwritten(tmp_path, hdf5_path, monkeypatch):
    monkeypatch.setattr(mo_dt.time, "time", lambda: 1234.0)
    args = tiny_args(tmp_path, hdf5_path, updates=2, eval_every=0)
    run = Path(args.runs_dir) / "hopper-random__mo_dt__0__1234"
    run.mkdir(parents=True)
    (run / "results.json").write_text("precious")
    with pytest.raises(SystemExit, match="already exists"):
        mo_dt.train(args)
    assert [p.name for p in run.iterdir()] == ["results.json"] and (
        run / "results.json"
    ).read_text() == "precious"


def test_cli_help_explains_every_flag():
    """Every Args field has a docstring, and --help shows each one in full next to its flag."""
    import ast

    cmd = [sys.executable, "mo_dt.py", "--help"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    flat = " ".join(out.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())
    args_class = next(
        n
        for n in ast.parse((ROOT / "mo_dt.py").read_text()).body
        if getattr(n, "name", "") == "Args"
    )
    docs = {
        a.target.id: b.value.value
        for a, b in zip(args_class.body, args_class.body[1:])
        if isinstance(a, ast.AnnAssign)
        and isinstance(b, ast.Expr)
        and isinstance(b.value.value, str)
    }
    assert set(docs) == {f.name for f in dataclasses.fields(mo_dt.Args)}, (
        "a field without a docstring"
    )
    for name, doc in docs.items():
        assert "--" + name.replace("_", "-") in flat and " ".join(doc.split()) in flat, name
    # usage examples
    assert "--no-gaussian-heads" in flat and "--checkpoint runs/RUN/model.pt --updates 0" in flat


def test_defaults_are_table_1_1_and_1_2():
    a = mo_dt.Args()
    table_1_1 = dict(
        n_layer=4,
        n_head=4,
        n_embd=256,
        context_len=20,
        dropout=0.1,
        batch_size=256,
        lr=1e-4,
        weight_decay=1e-3,
        grad_clip=0.25,
        warmup_steps=10_000,
        updates=100_000,
        gaussian_heads=True,
        timestep_embedding=False,
        lambdas=(1 / 3, 1 / 3, 1 / 3),
        schedule="joint",
        rtg_update="model",
        target_return=None,
    )
    assert {k: getattr(a, k) for k in table_1_1} == table_1_1
    # Table 1.2
    assert mo_dt.TARGET_RETURNS == {"hopper": 7200.0, "walker2d": 10000.0, "halfcheetah": 12000.0}
    assert mo_dt.THESIS == {  # Table 1.3, MO-DT column
        "halfcheetah-medium": 43.34,
        "hopper-medium": 67.45,
        "walker2d-medium": 78.56,
        "halfcheetah-medium-replay": 40.93,
        "hopper-medium-replay": 79.43,
        "walker2d-medium-replay": 81.3,
        "halfcheetah-medium-expert": 94.57,
        "hopper-medium-expert": 111.71,
        "walker2d-medium-expert": 108.08,
    }
    model = small_model()
    assert isinstance(model.blocks[0].mlp[1], torch.nn.ReLU)  # Table 1.1: ReLU
    # no positional embedding
    assert not any("pos" in n or "embed_t" in n for n, _ in model.named_parameters())
