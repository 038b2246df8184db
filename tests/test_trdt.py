import copy
import dataclasses
import itertools
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
import torch.nn.functional as F

import common
import trdt
from test_mo_dt import BF16, fed_back_returns

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
    return trdt.Args(**{**base, **kw})


# --- action regions (Eq. 1.11-1.12) ---------------------------------------------------------------


def bin_of(x, bins):
    """The bin of each scalar in x, read off its ordinal code (k + 1 leading ones)."""
    return trdt.encode_regions(x[..., None], bins).sum(-1).long() - 1


def test_ordinal_code_of_three_bins_by_hand():
    a = torch.tensor([[-0.9, 0.0, 0.9]])  # bins 0, 1, 2 of [-1, -1/3), [-1/3, 1/3), [1/3, 1]
    assert trdt.encode_regions(a, 3).tolist() == [[1, 0, 0, 1, 1, 0, 1, 1, 1]]
    # bins [-1, 0), [0, 1]: 0.0 goes up
    assert trdt.encode_regions(a, 2).tolist() == [[1, 0, 1, 1, 1, 1]]
    assert trdt.encode_regions(a.double(), 3).dtype == torch.float64


@pytest.mark.parametrize("bins", [2, 3, 5])
def test_ordinal_encoding_round_trips_every_bin_and_dimension(bins):
    m_a = 3
    # every bin in every dimension, jointly
    ks = torch.tensor(list(itertools.product(range(bins), repeat=m_a)))
    centres = -1 + (2 * ks.float() + 1) / bins
    code = trdt.encode_regions(centres, bins)
    assert code.shape == (bins**m_a, bins * m_a)
    assert (trdt.decode_regions(code, bins) == ks).all()
    # ordinal: bin k has exactly k+1 leading ones, so the code distance of two bins is |k - k'|
    assert (code.view(-1, m_a, bins).sum(-1) == ks + 1).all()
    assert (code.view(-1, m_a, bins).diff(dim=-1) <= 0).all()  # the ones lead
    # decoding thresholds probabilities at 0.5
    assert (trdt.decode_regions(0.3 + 0.4 * code, bins) == ks).all()


def test_bins_cover_the_action_box_and_edges_go_up():
    edges = trdt.region_edges(3)
    assert torch.equal(edges, torch.tensor([-1 / 3, 1 / 3]))  # the float32 literals, exactly
    assert trdt.region_edges(4, dtype=torch.float64).tolist() == [-0.5, 0.0, 0.5]
    below = torch.nextafter(edges, torch.tensor(-2.0))
    # an edge goes to the upper bin
    assert bin_of(edges, 3).tolist() == [1, 2] and bin_of(below, 3).tolist() == [0, 1]
    # outside: outer bins
    assert bin_of(torch.tensor([-1.0, 1.0, -1.5, 1.5, -50.0]), 3).tolist() == [0, 2, 0, 2, 0]
    grid = torch.linspace(-1, 1, 3001)
    counts = torch.bincount(bin_of(grid, 3), minlength=3)
    # three equal bins, nothing left out
    assert counts.sum() == 3001 and (counts - 1000).abs().max() <= 1
    # inconsistent code: valid prefix
    assert trdt.decode_regions(torch.tensor([1.0, 0.0, 1.0]), 3).tolist() == [0]
    assert trdt.decode_regions(torch.tensor([0.0, 0.0, 0.0]), 3).tolist() == [0]


# --- data -----------------------------------------------------------------------------------------


def episodes(lengths=(3, 30)):
    eps = []
    for i, n in enumerate(lengths):
        obs = np.stack([np.arange(n), np.full(n, 100.0 * i)], 1).astype(np.float32)  # obs[:, 0] = t
        actions = np.stack([np.linspace(-1, 1, n), np.full(n, 0.5 * i)], 1).astype(np.float32)
        eps.append(
            dict(
                observations=obs,
                actions=actions,
                rewards=np.arange(1, n + 1, dtype=np.float32),
                terminated=True,
            )
        )
    return eps


def test_next_state_and_next_return_targets_regions_and_masks():
    data = trdt.make_dataset(
        episodes(), torch.device("cpu"), rtg_scale=1.0, max_ep_len=1000, bins=3
    )
    steps = data["steps"]
    assert steps["has_next"].tolist() == [True, True, False] + [True] * 29 + [False]
    # Alg. 1 line 8
    torch.testing.assert_close(steps["regions"], trdt.encode_regions(steps["actions"], 3))
    assert steps["regions"].shape == (33, 6)
    b = trdt.sample_batch(data, 200, 5, torch.Generator().manual_seed(0))
    assert set(b) == set(steps) | {"mask"}  # every per-step tensor is gathered
    mean, std = data["state_stats"]
    unnorm = lambda s: s[..., 0] * float(std[0]) + float(mean[0])
    for i in range(200):
        m, t = b["mask"][i], b["timesteps"][i]
        nm = m & b["has_next"][i]
        n = 3 if b["states"][i][m][0, 1] < 0 else 30  # the episode, from the second state feature
        assert (nm == (m & (t != n - 1))).all()  # only the episode's last step has no next state
        np.testing.assert_allclose(
            unnorm(b["next_states"][i][nm]).numpy(), (t[nm] + 1).numpy(), atol=1e-4
        )
        assert (b["next_states"][i][~nm] == 0).all()
        # rewards are 1..n, so g_t = sum_{k > t} k and g_{t+1} = g_t - r_t = g_t - (t + 1)
        g = b["rtg"][i][m, 0]
        np.testing.assert_allclose(b["next_rtg"][i][m, 0].numpy(), (g - (t[m] + 1)).numpy())
    # the 3-step episode's last steps were drawn
    assert (b["mask"] & ~b["has_next"]).any() and (~b["mask"]).any()
    torch.testing.assert_close(
        b["regions"][b["mask"]], trdt.encode_regions(b["actions"][b["mask"]], 3)
    )
    assert (b["regions"][~b["mask"]] == 0).all()


def test_state_normalisation_can_come_from_a_checkpoint():
    eps = episodes((4,))
    own = trdt.make_dataset(eps, torch.device("cpu"), rtg_scale=1.0, max_ep_len=10, bins=3)
    mean, std = np.full(2, 1.0, np.float32), np.full(2, 2.0, np.float32)
    given = trdt.make_dataset(
        eps, torch.device("cpu"), rtg_scale=1.0, max_ep_len=10, bins=3, state_stats=(mean, std)
    )
    torch.testing.assert_close(
        given["steps"]["states"], torch.as_tensor((eps[0]["observations"] - 1.0) / 2.0)
    )
    np.testing.assert_array_equal(given["state_stats"][0], mean)
    np.testing.assert_array_equal(given["state_stats"][1], std)
    assert not torch.allclose(own["steps"]["states"], given["steps"]["states"])
    torch.testing.assert_close(given["steps"]["next_states"][:3], given["steps"]["states"][1:])


# --- model: causality (§1.4.2, "we do not condition a_t on region_t") -----------------------------


def small_model(gaussian=True, dropout=0.0, **kw):
    torch.manual_seed(0)
    arch = dict(
        state_dim=3,
        act_dim=2,
        bins=3,
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
    return trdt.TrustRegionDecisionTransformer(**{**arch, **kw}).eval()


def random_inputs(B=2, K=6):
    g = torch.Generator().manual_seed(1)
    actions = torch.rand(B, K, 2, generator=g) * 2 - 1
    return dict(
        rtg=torch.randn(B, K, 1, generator=g),
        states=torch.randn(B, K, 3, generator=g),
        regions=trdt.encode_regions(actions, 3),
        actions=actions,
        timesteps=torch.arange(K).repeat(B, 1),
        mask=torch.ones(B, K, dtype=torch.bool),
    )


def outputs(model, x, **kw):
    """Every tensor the heads give, by name: action_mean, action_log_std, region_logits, state_mean,
    ..."""
    preds = model(x, **kw)
    names = {
        "action": ("mean", "log_std"),
        "state": ("mean", "log_std"),
        "return": ("mean", "log_std"),
        "region": ("logits", None),
    }
    return {
        f"{task}_{n}": v
        for task, pair in preds.items()
        for n, v in zip(names[task], pair)
        if v is not None
    }


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
    out = outputs(model, x)
    assert set(out) == set(ACTION_SIDE) | {h for h in NEXT_SIDE if gaussian or h.endswith("mean")}
    assert out["region_logits"].shape == (2, 6, 6) and out["action_mean"].abs().max() <= 1
    for key, steps in (
        ("regions", T),
        ("actions", T),
        ("regions", slice(T, None)),
        ("actions", slice(T, None)),
        ("rtg", slice(T + 1, None)),
        ("states", slice(T + 1, None)),
    ):
        out2 = outputs(model, perturbed(x, key, steps))
        for h in ACTION_SIDE:
            # up to t: unchanged
            torch.testing.assert_close(out2[h][:, : T + 1], out[h][:, : T + 1])
            if key in ("rtg", "states") or isinstance(steps, slice):
                # later ones see it: can fail
                assert not torch.allclose(out2[h][:, T + 1 :], out[h][:, T + 1 :])
    # visible tokens matter
    for key, steps in (("states", T), ("rtg", T), ("regions", T - 1), ("actions", T - 1)):
        out2 = outputs(model, perturbed(x, key, steps))
        for h in ACTION_SIDE:
            assert not torch.allclose(out2[h][:, T], out[h][:, T]), (key, h)


@pytest.mark.parametrize("gaussian", [True, False])
def test_next_state_and_return_heads_never_see_s_next_or_g_next(gaussian):
    model = small_model(gaussian)
    x = random_inputs()
    out = outputs(model, x)
    heads = [h for h in NEXT_SIDE if h in out]
    assert len(heads) == (4 if gaussian else 2)
    for key in ("states", "rtg", "regions", "actions"):
        out2 = outputs(model, perturbed(x, key, slice(T + 1, None)))
        for h in heads:
            torch.testing.assert_close(out2[h][:, : T + 1], out[h][:, : T + 1])
            assert not torch.allclose(out2[h][:, T + 1 :], out[h][:, T + 1 :])
    # a_t's token has seen all four tokens of step t
    for key in ("actions", "regions", "states", "rtg"):
        out2 = outputs(model, perturbed(x, key, T))
        for h in heads:
            assert not torch.allclose(out2[h][:, T], out[h][:, T]), (key, h)


def test_padding_is_invisible_and_matches_a_shorter_context():
    model, x = small_model(), random_inputs()
    x["mask"][:, :2] = False
    out = outputs(model, x)
    y = {k: v.clone() for k, v in x.items()}
    for k in ("rtg", "states", "regions", "actions"):
        y[k][:, :2] = 9.0
    padded = outputs(model, y)
    # evaluation: no padding
    short = outputs(model, {k: v[:, 2:] for k, v in x.items() if k != "mask"})
    for h in out:
        torch.testing.assert_close(padded[h][:, 2:], out[h][:, 2:])
        torch.testing.assert_close(short[h], out[h][:, 2:])
    # the test can fail: without the mask 9s leak
    leaky = outputs(model, {k: v for k, v in y.items() if k != "mask"})
    assert not torch.allclose(leaky["action_mean"][:, 2:], out["action_mean"][:, 2:])


def test_attention_weights_captured_by_hooks_are_causal():
    model, x = small_model(), random_inputs()
    x["mask"][0, :2] = False
    preds, atts = attention.forward_attention(model, x)
    torch.testing.assert_close(preds["action"][0], outputs(model, x)["action_mean"])
    assert len(atts) == 2 and atts[0].shape == (2, 2, 24, 24)
    torch.testing.assert_close(atts[1].sum(-1), torch.ones(2, 2, 24))
    assert all((a.triu(1) == 0).all() for a in atts)
    # padding gets no weight
    assert all((a[0, :, 8:, :8] == 0).all() and (a[1, :, 8:, :8] > 0).any() for a in atts)


def test_no_timestep_embedding_by_default_and_mse_ablation_keeps_a_gaussian_action_head():
    assert trdt.Args().timestep_embedding is False and trdt.Args().gaussian_heads is True
    x = random_inputs()
    # the same tokens, told they happen 7 steps later
    later = {**x, "timesteps": x["timesteps"] + 7}
    model = small_model()
    assert model.embed_t is None and not any(
        n.startswith("embed_t") for n, _ in model.named_parameters()
    )
    for h, v in outputs(model, x).items():
        torch.testing.assert_close(outputs(model, later)[h], v)
    with_t = small_model(timestep_embedding=True)
    assert not torch.allclose(
        outputs(with_t, x)["action_mean"], outputs(with_t, later)["action_mean"]
    )
    preds = small_model(gaussian=False)(x)
    assert (
        preds["action"][1] is not None and preds["state"][1] is None and preds["return"][1] is None
    )
    assert preds["region"][1] is None and preds["region"][0].shape == (2, 6, 6)  # Bernoulli logits


# --- losses (Eq. 1.4, 1.7, 1.8, 1.13) -------------------------------------------------------------


def test_losses_on_a_hand_computed_batch():
    # one segment of 2 steps, step 2 padded; 1-d actions, states and returns; 3 region bits
    batch = dict(
        actions=torch.tensor([[[0.5], [7.0]]]),
        mask=torch.tensor([[True, False]]),
        next_states=torch.tensor([[[2.0], [7.0]]]),
        has_next=torch.tensor([[True, True]]),
        next_rtg=torch.tensor([[[1.0], [7.0]]]),
        regions=torch.tensor([[[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]]),
    )
    zeros = torch.zeros(1, 2, 1)
    logits = torch.tensor([[[0.0, 0.0, math.log(3.0)], [9.0, 9.0, 9.0]]])
    preds = {
        "action": (zeros, zeros),
        "state": (zeros, torch.full((1, 2, 1), math.log(2.0))),
        "return": (zeros, None),
        "region": (logits, None),
    }
    c = 0.5 * math.log(2 * math.pi)
    losses = trdt.task_losses(preds, batch)
    assert list(losses) == list(trdt.TASKS)
    assert losses["action"].item() == pytest.approx(0.5 * 0.25 + c)
    assert losses["state"].item() == pytest.approx(0.5 * (2 / 2) ** 2 + math.log(2) + c)
    assert losses["return"].item() == pytest.approx(1.0)  # squared error
    # Bernoulli NLL summed over bits: logit 0 -> log 2 per bit; logit log 3 (p = 3/4) on a 1 bit ->
    # log 4/3
    assert losses["region"].item() == pytest.approx(2 * math.log(2) + math.log(4 / 3), rel=1e-6)
    # no next state at all: 0, not NaN
    nothing = dict(batch, has_next=torch.zeros(1, 2, dtype=torch.bool))
    assert trdt.task_losses(preds, nothing)["state"].item() == 0.0
    both = dict(batch, mask=torch.ones(1, 2, dtype=torch.bool))  # step 2 counts once it is real
    assert trdt.task_losses(preds, both)["region"].item() > 9


def test_task_losses_use_the_right_targets_and_masks():
    model = small_model()
    x = random_inputs(B=1, K=3)
    batch = dict(
        x,
        next_states=torch.randn(1, 3, 3),
        next_rtg=torch.randn(1, 3, 1),
        mask=torch.tensor([[False, True, True]]),
        has_next=torch.tensor([[True, True, False]]),
    )
    preds = model(batch)
    losses = trdt.task_losses(preds, batch)
    one = lambda m, s, target: 0.5 * ((target - m) / s.exp()) ** 2 + s + 0.5 * math.log(2 * math.pi)
    exp_action = one(*preds["action"], x["actions"])[0, 1:].sum() / 2
    torch.testing.assert_close(losses["action"], exp_action)
    exp_state = one(*preds["state"], batch["next_states"])[0, 1].sum()
    # only the one real step with a next state counts
    torch.testing.assert_close(losses["state"], exp_state)
    exp_return = one(*preds["return"], batch["next_rtg"])[0, 1:].sum() / 2
    torch.testing.assert_close(losses["return"], exp_return)
    exp_region = (
        F.binary_cross_entropy_with_logits(
            preds["region"][0][0, 1:], x["regions"][0, 1:], reduction="sum"
        )
        / 2
    )
    torch.testing.assert_close(losses["region"], exp_region)


# --- loss weights and schedules (Eq. 1.14, Chapter 3) ---------------------------------------------


def test_lambda_validation():
    assert trdt.Args(lambdas=(0.4, 0.3, 0.2, 0.1)).lambdas == (0.4, 0.3, 0.2, 0.1)
    trdt.Args(lambdas=(1.0, 0.0, 0.0, 1e-7))  # within 1e-6 of the simplex
    assert sum(trdt.Args().lambdas) == pytest.approx(1.0)
    for bad in (
        (0.5, 0.5),
        (1 / 3,) * 3,
        (0.5, 0.5, 0.5, -0.5),
        (0.3, 0.3, 0.3, 0.3),
        (float("nan"), 0, 0, 1),
    ):
        message = f"--lambdas {' '.join(map(str, bad))}: need 4 non-negative weights summing to 1"
        with pytest.raises(
            SystemExit, match=re.escape(message) + r".*\(action, state, return, region\)"
        ):
            trdt.Args(lambdas=bad)


def shared(model):
    """The parameters every task trains (all but the heads, theta_DT, theta_s, theta_g, theta_r of
    Eq. 1.14)."""
    return torch.cat(
        [p.detach().flatten() for n, p in model.named_parameters() if not n.startswith("heads.")]
    )


def one_update(schedule, lambdas):
    """Both schedules from the same weights, LAMB state and batch (dropout 0, so no randomness)."""
    model = small_model(state_dim=2).train()
    data = trdt.make_dataset(
        episodes((10, 12)), torch.device("cpu"), rtg_scale=10.0, max_ep_len=50, bins=3
    )
    batch = trdt.sample_batch(data, 4, 6, torch.Generator().manual_seed(0))
    opt, _ = trdt.make_optimizer(model, trdt.Args(lr=1e-3))
    lambdas = dict(zip(trdt.TASKS, lambdas))
    losses, grad_norm = trdt.update(
        model, opt, batch, lambdas, schedule, grad_clip=0.25, autocast=NO_AUTOCAST
    )
    return model, losses, grad_norm


def test_alternating_and_joint_schedules_make_different_updates():
    start = small_model(state_dim=2)
    joint, lj, nj = one_update("joint", (0.25,) * 4)
    alt, la, na = one_update("alternating", (0.25,) * 4)
    assert set(lj) == set(la) == set(trdt.TASKS) and nj > 0 and na > 0
    # the later tasks' gradients see the moved weights
    assert not torch.allclose(shared(joint), shared(alt))
    assert not torch.allclose(shared(joint), shared(start))
    # the first task step starts from the same point
    assert lj["action"].item() == pytest.approx(la["action"].item())
    assert lj["state"].item() != pytest.approx(la["state"].item())  # the second one does not
    # with all weight on one task the two schedules are the same algorithm: identical shared weights
    joint1, _, _ = one_update("joint", (1.0, 0.0, 0.0, 0.0))
    alt1, losses, _ = one_update("alternating", (1.0, 0.0, 0.0, 0.0))
    torch.testing.assert_close(shared(joint1), shared(alt1))
    # a task with lambda 0 takes no step: LAMB's weight decay would move its head even on a zero
    # gradient
    assert set(losses) == {"action"}
    for task in ("state", "return", "region"):
        assert torch.equal(alt1.heads[task].weight, start.heads[task].weight), task
    assert not torch.equal(alt1.heads["action"].weight, start.heads["action"].weight)


def sgd_update(model, batch, schedule, lr, lambdas):
    m = copy.deepcopy(model)
    lambdas = dict(zip(trdt.TASKS, lambdas))
    trdt.update(
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
    for task, w in zip(trdt.TASKS, lam):
        loss = w * trdt.task_losses(m(batch), batch)[task]
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
    batch = dict(
        x,
        next_states=torch.randn(2, 3, 3, generator=g64, dtype=torch.float64),
        next_rtg=torch.randn(2, 3, 1, generator=g64, dtype=torch.float64),
        has_next=torch.ones(2, 3).bool(),
    )
    lam = (0.4, 0.3, 0.2, 0.1)
    params = list(model.parameters())
    theta = torch.cat([p.detach().flatten() for p in params])
    losses = trdt.task_losses(model(batch), batch)
    flat = lambda gs: torch.cat([g.flatten() for g in gs])
    g = [
        torch.autograd.grad(w * losses[k], params, create_graph=True, materialize_grads=True)
        for k, w in zip(trdt.TASKS, lam)
    ]
    eta = 1e-3
    joint = sgd_update(model, batch, "joint", eta, lam)
    # Eq. 1.14
    torch.testing.assert_close(joint, (theta - eta * sum(flat(gi) for gi in g)).detach())
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
    opt, _ = trdt.make_optimizer(model, trdt.Args(weight_decay=0.5))
    decayed, plain = opt.param_groups
    assert type(opt) is trdt.Lamb and opt.defaults["eps"] == 1e-8
    assert decayed["weight_decay"] == 0.5 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_lamb_is_timms_and_moves_every_tensor_by_lr_times_its_norm():
    """trdt.py's copy of LAMB (test_mo_dt.py checks it against timm's step by step): uncapped trust
    ratio, so the first step of every tensor is exactly lr * ||w|| long, however large ||w||."""
    model = small_model(timestep_embedding=True).train()
    with torch.no_grad():
        model.heads["region"].weight.mul_(500)  # ||w|| in the hundreds, above any cap of 10
    opt, _ = trdt.make_optimizer(model, trdt.Args(lr=1e-3, warmup_steps=0))
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
    assert moved > 10 and before["heads.region.weight"].norm() > 100


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
    dict(), dict(schedule="alternating", lambdas=(0.4, 0.3, 0.2, 0.1)), dict(gaussian_heads=False),
    dict(rtg_update="subtract"), dict(bins=5), dict(n_head=1, timestep_embedding=True),
], ids=["joint", "alternating-weighted",
        "mse-heads", "subtract", "bins5", "one-head-timesteps"])  # fmt: skip
def test_end_to_end_with_evaluation(tmp_path, hdf5_path, flags):
    every = 0 if flags else 10  # the variants evaluate once, at the end, to keep the suite fast
    res = trdt.train(tiny_args(tmp_path, hdf5_path, eval_every=every, **flags))
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
    assert (
        saved["method"] == "trdt" and saved["target_return"] == 7200.0 and saved["device"] == "cpu"
    )
    assert saved["normalized_mean"] == pytest.approx(
        np.mean(common.normalized_score(saved["dataset"], saved["returns"]))
    )
    assert (
        saved["train_updates_per_s"] > 0
        and saved["eval_env_steps_per_s"] > 0
        and saved["trained_updates"] == 20
    )
    args = trdt.Args(**{**tiny_args(tmp_path, hdf5_path).__dict__, **flags})
    arch = {**{k: getattr(args, k) for k in trdt.ARCH}, "state_dim": 11, "act_dim": 3}
    assert saved["arch"] == arch and saved["args"]["schedule"] == args.schedule
    lines = read_metrics(run)
    assert [line["step"] for line in lines if "eval_normalized" in line] == (
        [0, 10, 20] if every else [20]
    )
    # the region head's thresholded guess against the region taken, in every evaluation's line
    accuracies = [line["eval_region_accuracy"] for line in lines if "eval_normalized" in line]
    assert all(0 <= a <= 1 for a in accuracies) and accuracies[-1] == saved["region_accuracy"]
    losses = [line for line in lines if "loss" in line]
    assert [line["step"] for line in losses] == [0, 5, 10, 15, 19]
    for line in losses:  # every task loss, separately, and the weighted total
        assert np.isfinite([line[f"loss_{k}"] for k in trdt.TASKS]).all() and line["grad_norm"] > 0
        assert line["loss"] == pytest.approx(
            sum(w * line[f"loss_{k}"] for k, w in zip(trdt.TASKS, args.lambdas))
        )
    # linear warmup
    assert 0 < losses[0]["lr"] < args.lr and losses[-1]["lr"] == pytest.approx(args.lr)
    ckpt = torch.load(run / "model.pt", weights_only=True)  # plain data
    assert ckpt["method"] == "trdt" and ckpt["arch"] == arch and ckpt["trained_updates"] == 20
    model = trdt.TrustRegionDecisionTransformer(**ckpt["arch"])
    model.load_state_dict(ckpt["model"])
    assert model.heads["region"].out_features == 3 * args.bins


def run_losses(res):
    return [line["loss_action"] for line in read_metrics(res["run_dir"]) if "loss" in line]


def spy_on_batches(module, monkeypatch):
    """Every batch the training loop draws, as the states it gathered."""
    batches, sample = [], module.sample_batch

    def spy(*args, **kwargs):
        batch = sample(*args, **kwargs)
        batches.append(batch["states"].clone())
        return batch

    monkeypatch.setattr(module, "sample_batch", spy)
    return batches


def test_schedules_see_the_same_batches_but_train_differently(tmp_path, hdf5_path, monkeypatch):
    kw = dict(eval_every=0, eval_episodes=1, updates=6, log_every=1, dropout=0.0)
    batches, runs = spy_on_batches(trdt, monkeypatch), {}
    for name, flags in (
        ("a", {}),
        ("b", {}),
        ("c", dict(schedule="alternating")),
        ("d", dict(seed=1)),
    ):
        start = len(batches)
        runs[name] = trdt.train(tiny_args(tmp_path / name, hdf5_path, **kw, **flags))
        runs[name]["batches"] = torch.stack(batches[start:])
    a, b, c, d = (runs[k] for k in "abcd")
    assert run_losses(a) == run_losses(b) and a["returns"] == b["returns"]  # same seed, same run
    assert torch.equal(a["batches"], b["batches"]) and torch.equal(a["batches"], c["batches"])
    # same first batch, same initial weights
    assert run_losses(a)[0] == pytest.approx(run_losses(c)[0], rel=1e-6)
    # then the schedules part ways
    assert run_losses(a)[1:] != pytest.approx(run_losses(c)[1:], rel=1e-6)
    assert not torch.equal(a["batches"], d["batches"])  # --seed seeds the batch sampler too
    assert run_losses(a)[0] != pytest.approx(run_losses(d)[0], rel=1e-6)


def test_ctrl_c_saves_the_model_trained_so_far(tmp_path, hdf5_path, monkeypatch):
    update, done = trdt.update, []

    def interrupted_after_3(*args, **kwargs):
        if len(done) == 3:
            raise KeyboardInterrupt
        done.append(1)
        return update(*args, **kwargs)

    monkeypatch.setattr(trdt, "update", interrupted_after_3)
    with pytest.raises(
        SystemExit,
        match=r"interrupted \(Ctrl-C\): .*model\.pt holds 3 updates; continue with "
        r"`python trdt\.py --resume .*, or evaluate it with `python trdt\.py --checkpoint ",
    ):
        trdt.train(tiny_args(tmp_path, hdf5_path, eval_every=0))
    (run,) = (tmp_path / "runs").iterdir()
    # no results: not evaluated
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.jsonl", "model.pt"}
    saved = torch.load(run / "model.pt", weights_only=True)
    assert saved["trained_updates"] == 3 and saved["method"] == "trdt"
    trdt.TrustRegionDecisionTransformer(**saved["arch"]).load_state_dict(saved["model"])


def test_a_checkpoint_alone_evaluates_and_trains_on(tmp_path, hdf5_path):
    data = tmp_path / "hopper.hdf5"
    shutil.copy(hdf5_path, data)
    trained = trdt.train(tiny_args(tmp_path, data, eval_every=0))
    ckpt = Path(trained["run_dir"]) / "model.pt"
    # evaluating needs only the checkpoint: its dataset facts, architecture and state normalisation
    data.unlink()
    res = trdt.train(
        trdt.Args(
            checkpoint=str(ckpt),
            updates=0,
            eval_episodes=2,
            n_layer=5,
            bins=7,
            runs_dir=str(tmp_path / "ev"),
        )
    )
    assert (
        res["returns"] == trained["returns"]
        and res["trained_updates"] == 20
        and res["updates"] == 0
    )
    assert res["arch"]["n_layer"] == 2 and res["arch"]["bins"] == 3  # the flags' sizes are ignored
    assert not (Path(res["run_dir"]) / "model.pt").exists()  # nothing trained, nothing saved
    subtract = trdt.train(
        trdt.Args(
            checkpoint=str(ckpt),
            updates=0,
            eval_episodes=2,
            rtg_update="subtract",
            runs_dir=str(tmp_path / "ev2"),
        )
    )
    # an evaluation flag: it acts
    assert subtract["returns"] != pytest.approx(trained["returns"], rel=1e-6)
    from conftest import random_rollouts, write_hdf5

    other = write_hdf5(tmp_path / "other.hdf5", random_rollouts(steps=300, seed=1))
    more = trdt.train(
        tiny_args(
            tmp_path, other, checkpoint=str(ckpt), updates=5, eval_every=0, bins=7, exp_name="more"
        )
    )
    assert more["trained_updates"] == 25 and more["updates"] == 5 and more["arch"]["bins"] == 3
    saved, old = (
        torch.load(p, weights_only=True) for p in (Path(more["run_dir"]) / "model.pt", ckpt)
    )
    assert saved["trained_updates"] == 25 and saved["method"] == "trdt"
    # the checkpoint's state normalisation
    torch.testing.assert_close(saved["state_mean"], old["state_mean"])
    torch.testing.assert_close(saved["state_std"], old["state_std"])
    episodes_, _ = common.load_dataset("hopper-random", (str(other),))
    own_mean = np.concatenate([ep["observations"] for ep in episodes_]).mean(0)
    assert not np.allclose(saved["state_mean"].numpy(), own_mean, atol=1e-3)  # the test can fail
    assert not torch.equal(
        saved["model"]["heads.region.weight"], old["model"]["heads.region.weight"]
    )


# --- inference (§1.4.3, Alg. 1 lines 14-26) -------------------------------------------------------


def spied_evaluation(tmp_path, hdf5_path, env_rewards, rtg_scale=400.0, **kw):
    """Evaluate an untrained model while recording every forward pass and every reward of the two
    envs."""
    # args.rtg_scale stays 1000: the model's scale must be used
    args = tiny_args(tmp_path, hdf5_path, **kw)
    _, info = common.load_dataset(args.env, args.dataset_path)
    torch.manual_seed(0)
    model = trdt.TrustRegionDecisionTransformer(
        state_dim=11,
        act_dim=3,
        bins=3,
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
    res = trdt.evaluate(model, info, stats, args, 3600.0, torch.device("cpu"), NO_AUTOCAST)
    assert len(env_rewards) == first + 3 and env_rewards[-1] == []
    logs = env_rewards[first : first + 2]
    # a finished env is reset and stepped on
    rewards = [log[:n] for log, n in zip(logs, res["lengths"])]
    assert res["returns"] == pytest.approx([sum(r) for r in rewards]) and min(res["lengths"]) > 1
    return calls, rewards, res


class RegionStub(torch.nn.Module):
    """Stands in for the model in evaluate(): acts 0, the middle region of b = 3 in every dimension.
    Its region head names regions 1, 1, 2 up to step 4 (two dimensions of three right) and 0, 0, 0
    from step 5 on (none right)."""

    def __init__(self):
        super().__init__()
        self.K, self.rtg_scale, self.max_ep_len, self.bins = 3, 1000.0, 1000, 3
        self.dims = {"rtg": 1, "states": 11, "regions": 9, "actions": 3}

    def forward(self, x):
        B, K = x["states"].shape[:2]
        early = (x["timesteps"] < 5)[..., None]
        regions = torch.where(early, torch.tensor([1, 1, 2]), torch.tensor([0, 0, 0]))
        logits = 20 * trdt.encode_regions(-1 + (2 * regions + 1) / 3, 3) - 10
        zeros = torch.zeros(B, K, 3)
        return {"action": (zeros, zeros), "region": (logits, None), "return": (x["rtg"], None)}


def test_evaluation_reports_how_often_the_predicted_region_is_taken():
    """decode_regions' use: region_accuracy counts each episode's own steps, not the steps its env
    runs on after the episode ended."""
    info = dict(common.D4RL_TABLE["hopper"], env_kwargs={})
    settings = trdt.EvalSettings(eval_episodes=2, rtg_update="subtract")
    stats = (np.zeros(11, np.float32), np.ones(11, np.float32))
    res = trdt.evaluate(
        RegionStub(), info, stats, settings, 3600.0, torch.device("cpu"), NO_AUTOCAST
    )
    lengths = np.array(res["lengths"])
    assert lengths.min() > 5  # both episodes outlive the early steps
    expected = (2 / 3) * np.minimum(lengths, 5).sum() / lengths.sum()
    assert res["region_accuracy"] == pytest.approx(expected)


def test_inference_follows_alg_1(tmp_path, hdf5_path, env_rewards):
    calls, rewards, res = spied_evaluation(tmp_path, hdf5_path, env_rewards)
    steps = max(res["lengths"])
    # per step: the action forward, then (not after the last) the return forward
    assert len(calls) == 2 * steps - 1
    for t in range(steps):
        x, a_pred, _ = calls[2 * t]
        # the last K steps, no padding
        assert x["rtg"].shape[1] == min(t + 1, 3) and "mask" not in x
        assert x["timesteps"][:, -1].tolist() == [t, t]
        # a_t and its region: unknown
        assert (x["regions"][:, -1] == 0).all() and (x["actions"][:, -1] == 0).all()
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
            # the executed action (Eq. 1.15) ...
            torch.testing.assert_close(y["actions"][:, -1], a_pred.clamp(-1, 1))
            # its region
            torch.testing.assert_close(
                y["regions"][:, -1], trdt.encode_regions(a_pred.clamp(-1, 1), 3)
            )
            # (Alg. 1 line 20)
            torch.testing.assert_close(y["regions"][:, :-1], x["regions"][:, :-1])
            torch.testing.assert_close(y["actions"][:, :-1], x["actions"][:, :-1])
    regions = torch.cat([c[0]["regions"][:, -1] for c in calls[1::2]])
    assert len(set(map(tuple, regions.tolist()))) > 1  # the regions vary: the test can fail
    returns = [c[2][:, 0] for c in calls[1::2]]
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
        torch.testing.assert_close(
            calls[t][0]["regions"][:, -2], trdt.encode_regions(calls[t][0]["actions"][:, -2], 3)
        )


def test_a_return_fed_back_under_bf16_is_the_fp32_heads(tmp_path, hdf5_path):
    """Issue 28: in bf16 a fed-back return-to-go above ~500 could not move by one step's reward."""
    args = tiny_args(tmp_path, hdf5_path)
    _, info = common.load_dataset(args.env, args.dataset_path)
    model = small_model(state_dim=11, act_dim=3, context_len=3, rtg_scale=400.0, max_ep_len=1000)
    fed, fp32 = fed_back_returns(trdt, model, args, info)
    torch.testing.assert_close(fed, fp32)  # fp32's tolerance
    with BF16:
        preds = small_model()(random_inputs())
    assert {t.dtype for pred in preds.values() for t in pred if t is not None} == {torch.float32}


# --- arguments, checkpoints, run folders ----------------------------------------------------------


@pytest.mark.parametrize("bad, message", [
    (dict(bins=1), "--bins 1: must be >= 2"),
    (dict(bins=0), "--bins 0: must be >= 2"),
    (dict(batch_size=0), "--batch-size 0: must be > 0"),
    (dict(n_layer=0), "--n-layer 0: must be > 0"),
    (dict(max_ep_len=0), "--max-ep-len 0: must be > 0"),
    (dict(grad_clip=0.0), "--grad-clip 0.0: must be > 0"),
    (dict(log_every=0), "--log-every 0: must be > 0"),
    (dict(lr=float("nan")), "--lr nan: must be > 0"),
    (dict(weight_decay=-1e-3), "--weight-decay -0.001: must be >= 0"),
    (dict(seed=-1), "--seed -1: must be >= 0"),
    (dict(updates=-5), "--updates -5: must be >= 0"),
    (dict(dropout=-0.1), "--dropout -0.1: must be in [0, 1)"),
    (dict(target_return=float("nan")), "--target-return nan: pass a finite return"),
    (dict(n_embd=30, n_head=4), "--n-embd 30 must be divisible by --n-head 4"),
    (dict(updates=0), "--updates 0 trains nothing; add --checkpoint"),
    (dict(lambdas=(0.7, 0.1, 0.1, 0.2)),
     "--lambdas 0.7 0.1 0.1 0.2: need 4 non-negative weights summing to 1"),
    (dict(lambdas=(0.5, 0.5, 0.0)), "--lambdas 0.5 0.5 0.0: need 4 non-negative weights"),
])  # fmt: skip
def test_bad_flags_name_the_flag_and_its_value(tmp_path, hdf5_path, bad, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        tiny_args(tmp_path, hdf5_path, **bad)


def test_bad_inputs_get_clear_errors_and_leave_nothing_behind(tmp_path, hdf5_path):
    def refused(match, **kw):
        with pytest.raises(SystemExit, match=match):
            trdt.train(tiny_args(tmp_path, hdf5_path, **kw))

    refused("no such file", updates=0, checkpoint=str(tmp_path / "none.pt"))
    refused("unknown dataset 'hopper-mediun'", env="hopper-mediun")
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    refused(
        "not a checkpoint torch can read as data",
        updates=0,
        checkpoint=str(tmp_path / "garbage.pt"),
    )
    # a pickled object
    torch.save(dict(method="trdt", model=torch.nn.Linear(1, 1)), tmp_path / "code.pt")
    refused(
        "not a checkpoint torch can read as data", updates=0, checkpoint=str(tmp_path / "code.pt")
    )
    # another method's checkpoint: dt.py's (no region token), mo_dt.py's (no region token or head)
    for method in ("dt", "mo_dt"):
        torch.save(
            dict(method=method, model={}, arch={}, trained_updates=1), tmp_path / f"{method}.pt"
        )
        refused(
            f"written by {method}, not trdt.py",
            updates=0,
            checkpoint=str(tmp_path / f"{method}.pt"),
        )
    torch.save(dict(model={}), tmp_path / "nameless.pt")
    refused(
        "written by another program, not trdt.py",
        updates=0,
        checkpoint=str(tmp_path / "nameless.pt"),
    )
    # the right kind of checkpoint, trained on another env
    walker = dict(name="walker2d-medium", env_id="Walker2d-v4", obs_dim=17, act_dim=6, path=None)
    torch.save(
        dict(method="trdt", model={}, dataset=walker, trained_updates=1), tmp_path / "walker.pt"
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
    monkeypatch.setattr(trdt.time, "time", lambda: 1234.0)
    args = tiny_args(tmp_path, hdf5_path, updates=2, eval_every=0)
    run = Path(args.runs_dir) / "hopper-random__trdt__0__1234"
    run.mkdir(parents=True)
    (run / "results.json").write_text("precious")
    with pytest.raises(SystemExit, match="already exists"):
        trdt.train(args)
    assert [p.name for p in run.iterdir()] == ["results.json"] and (
        run / "results.json"
    ).read_text() == "precious"


def test_cli_help_explains_every_flag():
    """Every Args field has a docstring, and --help shows each one in full next to its flag."""
    import ast

    cmd = [sys.executable, "trdt.py", "--help"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    flat = " ".join(out.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())
    args_class = next(
        n
        for n in ast.parse((ROOT / "trdt.py").read_text()).body
        if getattr(n, "name", "") == "Args"
    )
    docs = {
        a.target.id: b.value.value
        for a, b in zip(args_class.body, args_class.body[1:])
        if isinstance(a, ast.AnnAssign)
        and isinstance(b, ast.Expr)
        and isinstance(b.value.value, str)
    }
    assert set(docs) == {f.name for f in dataclasses.fields(trdt.Args)}, (
        "a field without a docstring"
    )
    for name, doc in docs.items():
        assert "--" + name.replace("_", "-") in flat and " ".join(doc.split()) in flat, name
    # usage examples
    assert "--no-gaussian-heads" in flat and "--checkpoint runs/RUN/model.pt --updates 0" in flat


def test_defaults_are_table_1_1_and_1_2():
    a = trdt.Args()
    table_1_1 = dict(
        bins=3,
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
        lambdas=(0.25, 0.25, 0.25, 0.25),
        schedule="joint",
        rtg_update="model",
        target_return=None,
    )
    assert {k: getattr(a, k) for k in table_1_1} == table_1_1
    # Table 1.2
    assert trdt.TARGET_RETURNS == {"hopper": 7200.0, "walker2d": 10000.0, "halfcheetah": 12000.0}
    assert trdt.THESIS == {  # Table 1.3, TRDT column
        "halfcheetah-medium": 43.20,
        "hopper-medium": 65.89,
        "walker2d-medium": 75.89,
        "halfcheetah-medium-replay": 42.61,
        "hopper-medium-replay": 97.82,
        "walker2d-medium-replay": 86.94,
        "halfcheetah-medium-expert": 94.37,
        "hopper-medium-expert": 111.53,
        "walker2d-medium-expert": 108.52,
    }
    model = small_model()
    assert isinstance(model.blocks[0].mlp[1], torch.nn.ReLU)  # Table 1.1: ReLU
    # no positional embedding
    assert not any("pos" in n or "embed_t" in n for n, _ in model.named_parameters())
