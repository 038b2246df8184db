import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import dt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import attention  # noqa: E402  (benchmarks/: the hooks that capture attention)


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
    return dt.Args(**{**base, **kw})


def test_returns_to_go_eq_1_1():
    np.testing.assert_allclose(dt.returns_to_go(np.array([1.0, 2.0, 3.0, -1.0])), [5, 4, 2, -1])


def one_episode_dataset(lengths=(5, 30), dim=2):
    eps = []
    for i, n in enumerate(lengths):
        eps.append(
            dict(
                observations=np.arange(n * dim, dtype=np.float32).reshape(n, dim) + 1000 * i,
                actions=np.full((n, 1), float(i), np.float32),
                rewards=np.ones(n, np.float32),
                terminated=True,
            )
        )
    return eps


def test_segments_are_left_padded_and_masked():
    data = dt.make_dataset(
        one_episode_dataset(lengths=(5,)), torch.device("cpu"), rtg_scale=1.0, max_ep_len=1000
    )
    b = dt.sample_batch(data, 64, 8, torch.Generator().manual_seed(0))
    for i in range(64):
        m = b["mask"][i]
        n_real = int(m.sum())
        # padding only on the left
        assert 1 <= n_real <= 5 and m[-n_real:].all() and not m[:-n_real].any()
        assert (b["states"][i][~m] == 0).all() and (b["timesteps"][i][~m] == 0).all()
        t = b["timesteps"][i][m]
        # segments end at the episode's end when short
        assert t.tolist() == list(range(5 - n_real, 5))
        # rtg = remaining steps x 1
        np.testing.assert_allclose(b["rtg"][i][m, 0].numpy(), 5 - t.numpy())


def test_segments_never_cross_episodes_and_sampling_follows_length():
    data = dt.make_dataset(
        one_episode_dataset(lengths=(5, 30)), torch.device("cpu"), rtg_scale=1.0, max_ep_len=1000
    )
    b = dt.sample_batch(data, 4000, 10, torch.Generator().manual_seed(0))
    ep_of_step = b["actions"][..., 0]  # action value = episode index
    for i in range(0, 4000, 97):
        m = b["mask"][i]
        assert len(set(ep_of_step[i][m].tolist())) == 1
    frac_long = (ep_of_step[:, -1] == 1).float().mean().item()
    assert frac_long == pytest.approx(30 / 35, abs=0.03)  # p(episode) proportional to its length


def small_model(policy="deterministic", dropout=0.0, **kw):
    torch.manual_seed(0)
    arch = dict(
        state_dim=3,
        act_dim=2,
        policy=policy,
        timestep_embedding=True,
        context_len=6,
        n_layer=2,
        n_head=2,
        n_embd=16,
        dropout=dropout,
        max_ep_len=50,
        rtg_scale=1.0,
    )
    return dt.DecisionTransformer(**{**arch, **kw}).eval()


def random_inputs(B=2, K=6):
    g = torch.Generator().manual_seed(1)
    return dict(
        rtg=torch.randn(B, K, 1, generator=g),
        states=torch.randn(B, K, 3, generator=g),
        actions=torch.randn(B, K, 2, generator=g),
        timesteps=torch.arange(K).repeat(B, 1),
        mask=torch.ones(B, K, dtype=torch.bool),
    )


def action(model, x, **kw):
    return model(x, **kw)["action"][0]


def changed(x, key, t, by=5.0):
    """A copy of the inputs with `key` changed from step t on."""
    y = {k: v.clone() for k, v in x.items()}
    y[key][:, t:] += by
    return y


@pytest.mark.parametrize("policy", ["deterministic", "gaussian"])
def test_causality_action_never_sees_its_own_or_later_tokens(policy):
    model, x, t = small_model(policy), random_inputs(), 2
    mean = action(model, x)
    # a_t and later, s_{t+1}, g_{t+1} and later
    for key, first in (("actions", t), ("states", t + 1), ("rtg", t + 1)):
        mean2 = action(model, changed(x, key, first))
        # predictions up to t unchanged
        torch.testing.assert_close(mean2[:, : t + 1], mean[:, : t + 1])
        # later ones do change: the test can fail
        assert not torch.allclose(mean2[:, t + 1 :], mean[:, t + 1 :])
    # s_t itself matters
    assert not torch.allclose(action(model, changed(x, "states", t))[:, t], mean[:, t])


def test_padded_positions_do_not_leak_and_match_a_shorter_context():
    model, x = small_model(), random_inputs()
    x["mask"][:, :2] = False  # two padded steps on the left
    mean = action(model, x)
    y = {k: v.clone() for k, v in x.items()}
    for k in ("rtg", "states", "actions"):
        y[k][:, :2] = 9.0
    torch.testing.assert_close(action(model, y)[:, 2:], mean[:, 2:])
    # evaluation feeds short contexts without padding: both must agree
    short = action(model, {k: v[:, 2:] for k, v in x.items() if k != "mask"})
    torch.testing.assert_close(short, mean[:, 2:])


def test_attention_weights_captured_by_hooks_are_causal():
    """benchmarks/attention.py recomputes the weights from each block's input (the model has no
    analysis path); the forward it watches is the plain one."""
    model, x = small_model(), random_inputs()
    preds, atts = attention.forward_attention(model, x)
    torch.testing.assert_close(preds["action"][0], model(x)["action"][0])
    assert len(atts) == 2 and atts[0].shape == (2, 2, 18, 18)
    torch.testing.assert_close(atts[1].sum(-1), torch.ones(2, 2, 18))
    assert (atts[0].triu(1) == 0).all()


def test_head_loss_on_hand_computed_values():
    mean = torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])
    target = torch.tensor([[[1.0, 1.0], [0.5, -0.5]]])
    mask = torch.tensor([[True, False]])
    # ((1)^2 + 0) / 2 dims
    assert dt.head_loss(mean, None, target, mask).item() == pytest.approx(0.5)
    log_std = torch.tensor([[[0.0, math.log(2.0)], [0.0, 0.0]]])
    # dim 0: 0.5*1 + 0 + c ; dim 1: 0 + log 2 + c ; c = 0.5 log 2pi
    expected = 0.5 + math.log(2.0) + math.log(2 * math.pi)
    assert dt.head_loss(mean, log_std, target, mask).item() == pytest.approx(expected, rel=1e-6)
    assert dt.bounded_log_std(torch.tensor([-1e9, 0.0, 1e9])).tolist() == pytest.approx(
        [-5.0, -1.5, 2.0]
    )


def test_optimizer_decays_matrices_only():
    model = small_model()
    opt, _ = dt.make_optimizer(model, dt.Args(weight_decay=0.5))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.5 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("policy", ["deterministic", "gaussian"])
def test_end_to_end_with_evaluation(tmp_path, hdf5_path, policy):
    res = dt.train(tiny_args(tmp_path, hdf5_path, policy=policy))
    run = Path(res["run_dir"])
    assert {p.name for p in run.iterdir()} == {
        "config.json",
        "metrics.jsonl",
        "results.json",
        "model.pt",
    }
    saved = json.loads((run / "results.json").read_text())
    assert (
        len(saved["returns"]) == 2
        and saved["device"] == "cpu"
        and saved["dataset"]["source"] == "file"
    )
    assert saved["dataset"]["path"] == [str(Path(hdf5_path).resolve())] and saved["wall_time_s"] > 0
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert saved["git_commit"] == (head or None) and saved["args"]["policy"] == policy
    assert saved["normalized_mean"] == pytest.approx(
        np.mean(common.normalized_score(saved["dataset"], saved["returns"]))
    )
    assert (
        saved["train_updates_per_s"] > 0
        and saved["eval_env_steps_per_s"] > 0
        and saved["trained_updates"] == 20
    )
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "eval_normalized" in line] == [0, 10, 20]
    assert [line["step"] for line in lines if "loss" in line] == [0, 5, 10, 15, 19]


def losses(res):
    lines = map(json.loads, (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines())
    return [line["loss"] for line in lines if "loss" in line]


def test_same_seed_same_run(tmp_path, hdf5_path):
    a = dt.train(tiny_args(tmp_path / "a", hdf5_path, eval_every=0))
    b = dt.train(tiny_args(tmp_path / "b", hdf5_path, eval_every=0))
    c = dt.train(tiny_args(tmp_path / "c", hdf5_path, eval_every=0, seed=1))
    assert losses(a) == losses(b) and a["returns"] == b["returns"]
    assert losses(a) != losses(c)


def test_a_checkpoint_alone_evaluates_and_trains_on(tmp_path, hdf5_path):
    trained = dt.train(tiny_args(tmp_path, hdf5_path, eval_every=0))
    ckpt = Path(trained["run_dir"]) / "model.pt"
    # only the checkpoint: its own dataset facts, architecture and state normalisation; the flags'
    # sizes are ignored
    res = dt.train(
        dt.Args(
            checkpoint=str(ckpt),
            updates=0,
            eval_episodes=2,
            n_layer=5,
            runs_dir=str(tmp_path / "ev"),
        )
    )
    assert (
        res["returns"] == trained["returns"]
        and res["arch"]["n_layer"] == 2
        and res["trained_updates"] == 20
    )
    assert not (Path(res["run_dir"]) / "model.pt").exists()  # nothing trained, nothing saved
    more = dt.train(
        tiny_args(
            tmp_path, hdf5_path, checkpoint=str(ckpt), updates=5, eval_every=0, exp_name="more"
        )
    )
    assert more["trained_updates"] == 25
    saved = torch.load(Path(more["run_dir"]) / "model.pt", weights_only=True)
    assert saved["trained_updates"] == 25 and saved["method"] == "dt"
    torch.testing.assert_close(
        saved["state_mean"], torch.load(ckpt, weights_only=True)["state_mean"]
    )


def test_state_normalisation_can_come_from_a_checkpoint():
    eps = one_episode_dataset(lengths=(4,))
    own = dt.make_dataset(eps, torch.device("cpu"), rtg_scale=1.0, max_ep_len=10)
    mean, std = np.full(2, 1.0, np.float32), np.full(2, 2.0, np.float32)
    given = dt.make_dataset(
        eps, torch.device("cpu"), rtg_scale=1.0, max_ep_len=10, state_stats=(mean, std)
    )
    torch.testing.assert_close(
        given["steps"]["states"], torch.as_tensor((eps[0]["observations"] - 1.0) / 2.0)
    )
    np.testing.assert_array_equal(given["state_stats"][0], mean)
    assert not torch.allclose(own["steps"]["states"], given["steps"]["states"])


@pytest.mark.parametrize("bad, message", [
    (dict(batch_size=0), "--batch-size 0: must be > 0"),
    (dict(grad_clip=-1.0), "--grad-clip -1.0: must be > 0"),
    (dict(grad_clip=0.0), "--grad-clip 0.0: must be > 0"),
    (dict(seed=-1), "--seed -1: must be >= 0"),
    (dict(threads=-2), "--threads -2: must be >= 0"),
    (dict(updates=-5), "--updates -5: must be >= 0"),
    (dict(lr=float("nan")), "--lr nan: must be > 0"),
    (dict(dropout=1.0), "--dropout 1.0: must be in"),
    (dict(target_return=float("nan")), "--target-return nan: pass a finite return"),
    (dict(n_embd=30, n_head=4), "divisible by --n-head"),
    (dict(updates=0), "add --checkpoint"),
])  # fmt: skip
def test_bad_flags_name_the_flag_and_its_value(tmp_path, hdf5_path, bad, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(".", r"\.")):
        tiny_args(tmp_path, hdf5_path, **bad)


def test_bad_inputs_get_clear_errors_and_leave_nothing_behind(tmp_path, hdf5_path):
    with pytest.raises(SystemExit, match="no such file"):
        dt.train(tiny_args(tmp_path, hdf5_path, updates=0, checkpoint=str(tmp_path / "none.pt")))
    with pytest.raises(SystemExit, match="unknown dataset 'hopper-mediun'"):
        dt.train(tiny_args(tmp_path, hdf5_path, env="hopper-mediun"))
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="not a checkpoint torch can read as data"):
        dt.train(tiny_args(tmp_path, hdf5_path, updates=0, checkpoint=str(tmp_path / "garbage.pt")))
    torch.save(dict(method="mo_dt", model={}), tmp_path / "mo_dt.pt")
    with pytest.raises(SystemExit, match="written by mo_dt, not dt.py"):
        dt.train(tiny_args(tmp_path, hdf5_path, updates=0, checkpoint=str(tmp_path / "mo_dt.pt")))
    # a pickled object: refused
    torch.save(dict(method="dt", model=torch.nn.Linear(1, 1)), tmp_path / "code.pt")
    with pytest.raises(SystemExit, match="not a checkpoint torch can read as data"):
        dt.train(tiny_args(tmp_path, hdf5_path, updates=0, checkpoint=str(tmp_path / "code.pt")))
    with pytest.raises(SystemExit, match="is not a device"):
        dt.train(tiny_args(tmp_path, hdf5_path, device="gpu"))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="sees no CUDA GPU"):
            dt.train(tiny_args(tmp_path, hdf5_path, device="cuda"))
    assert not (tmp_path / "runs").exists()  # no run folder is left behind by a refused run
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="--runs-dir .*file/x: cannot make a run folder there"):
        dt.train(tiny_args(tmp_path, hdf5_path, runs_dir=str(tmp_path / "file" / "x")))


def test_a_checkpoint_from_another_domain_is_refused(tmp_path, hdf5_path):
    walker = tmp_path / "walker.hdf5"
    from conftest import random_rollouts, write_hdf5

    write_hdf5(walker, random_rollouts("Walker2d-v4", steps=300))
    trained = dt.train(tiny_args(tmp_path, walker, env="walker2d-random", updates=2, eval_every=0))
    ckpt = str(Path(trained["run_dir"]) / "model.pt")
    with pytest.raises(
        SystemExit, match=r"trained on walker2d-random \(Walker2d-v4\), not on data of Hopper-v4"
    ):
        dt.train(tiny_args(tmp_path, hdf5_path, updates=0, checkpoint=ckpt))


def test_an_existing_run_folder_is_never_overwritten(tmp_path, hdf5_path, monkeypatch):
    monkeypatch.setattr(dt.time, "time", lambda: 1234.0)
    args = tiny_args(tmp_path, hdf5_path, updates=2, eval_every=0)
    run = Path(args.runs_dir) / "hopper-random__dt__0__1234"
    run.mkdir(parents=True)
    (run / "results.json").write_text("precious")
    with pytest.raises(SystemExit, match="already exists"):
        dt.train(args)
    assert (run / "results.json").read_text() == "precious"


def test_cli_help_explains_every_flag():
    """Every Args field has a docstring, and --help shows each one in full next to its flag."""
    import ast

    out = subprocess.run(
        [sys.executable, "dt.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    flat = " ".join(out.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())
    args_class = next(
        n for n in ast.parse((ROOT / "dt.py").read_text()).body if getattr(n, "name", "") == "Args"
    )
    docs = {
        a.target.id: b.value.value
        for a, b in zip(args_class.body, args_class.body[1:])
        if isinstance(a, ast.AnnAssign)
        and isinstance(b, ast.Expr)
        and isinstance(b.value.value, str)
    }
    assert set(docs) == {f.name for f in dataclasses.fields(dt.Args)}, "a field without a docstring"
    for name, doc in docs.items():
        assert "--" + name.replace("_", "-") in flat and " ".join(doc.split()) in flat, name
    assert "--checkpoint runs/RUN/model.pt --updates 0" in flat  # the usage examples are shown too


def test_defaults_are_the_original_dt_setup():
    a = dt.Args()
    assert (a.context_len, a.n_layer, a.n_head, a.n_embd, a.dropout) == (20, 3, 1, 128, 0.1)
    assert (a.lr, a.weight_decay, a.warmup_steps, a.updates, a.batch_size, a.rtg_scale) == (
        1e-4,
        1e-4,
        10_000,
        100_000,
        64,
        1000.0,
    )
    assert dt.TARGET_RETURNS == {"hopper": 3600.0, "walker2d": 5000.0, "halfcheetah": 6000.0}
    assert a.policy == "deterministic" and a.target_return is None and a.timestep_embedding


class Recorder(torch.nn.Module):
    """Stands in for the model in evaluate(): always acts 0 and records the newest g token."""

    def __init__(self, K=20, rtg_scale=10.0):
        super().__init__()
        self.K, self.rtg_scale, self.max_ep_len, self.seen = K, rtg_scale, 1000, []
        self.dims = {"rtg": 1, "states": 11, "actions": 3}

    def forward(self, x):
        self.seen.append(x["rtg"][:, -1, 0].clone())
        return {"action": (torch.zeros(*x["states"].shape[:2], 3), None)}


def evaluate(model, info, args, target_return):
    stats = (np.zeros(info["obs_dim"], np.float32), np.ones(info["obs_dim"], np.float32))
    return dt.evaluate(
        model,
        info,
        stats,
        args,
        target_return,
        torch.device("cpu"),
        torch.autocast("cpu", enabled=False),
    )


def test_evaluation_decrements_the_target_by_the_observed_reward():
    """DT's rule: g_{t+1} = g_t - r_t, fed to the model scaled by the return scale; checked against
    a replay of the same seeded envs with the same (zero) actions."""
    import gymnasium as gym

    info = dict(common.D4RL_TABLE["hopper"], env_kwargs={})
    model = Recorder()
    res = evaluate(model, info, dt.Args(eval_episodes=2, seed=3), 100.0)
    for i in range(2):
        env, rewards, done = gym.make("Hopper-v4"), [], False
        env.reset(seed=3 + 10_000 + i)  # the vector env seeds its i-th env with seed + i
        while not done:
            _, r, term, trunc, _ = env.step(np.zeros(3))
            rewards.append(r)
            done = term or trunc
        assert res["lengths"][i] == len(rewards) and res["returns"][i] == pytest.approx(
            sum(rewards)
        )
        expected = (100.0 - np.concatenate([[0.0], np.cumsum(rewards)[:-1]])) / 10.0
        np.testing.assert_allclose(
            [float(g[i]) for g in model.seen[: len(rewards)]], expected, rtol=1e-5, atol=1e-4
        )


def test_evaluation_stops_at_the_horizon_of_an_env_without_a_time_limit(monkeypatch):
    """An env that never ends by itself and has no TimeLimit: evaluation stops at the horizon
    instead of writing g_{t+1} past the end of its buffers."""
    import gymnasium as gym

    def endless(info, video=None):
        # TimeLimit stripped
        return gym.make("Hopper-v4", terminate_when_unhealthy=False, max_episode_steps=30).env

    monkeypatch.setattr(common, "make_env", endless)
    info = dict(common.D4RL_TABLE["hopper"], name="hopper-random", env_kwargs={})
    res = evaluate(Recorder(K=2), info, dt.Args(eval_episodes=2), 100.0)
    assert res["lengths"] == [1000, 1000]  # the horizon when the spec names none


def test_updates_per_second_does_not_count_evaluation(tmp_path, hdf5_path, monkeypatch):
    fast_eval = dt.evaluate

    def slow_eval(*a, **kw):
        time.sleep(0.5)
        return fast_eval(*a, **kw)

    monkeypatch.setattr(dt, "evaluate", slow_eval)
    # 3 evaluations inside the loop
    res = dt.train(tiny_args(tmp_path, hdf5_path, eval_every=5, eval_episodes=1))
    # counting 3 x 0.5 s of evaluation would give at most 13.3
    assert res["train_updates_per_s"] > 20 / 1.5


def test_timestep_embedding_is_the_dt_papers_and_can_be_switched_off():
    # DT adds a learned timestep embedding to every token
    assert dt.Args().timestep_embedding is True
    x = random_inputs()
    later = changed(x, "timesteps", 0, by=7)  # the same tokens, told they happen 7 steps later
    assert not torch.allclose(action(small_model(), x), action(small_model(), later))
    without = small_model(timestep_embedding=False)
    assert not any(n.startswith("embed_t") for n, _ in without.named_parameters())
    torch.testing.assert_close(action(without, x), action(without, later))


def test_a_few_bf16_steps_stay_close_to_fp32():
    """bf16 autocast (on by default where it is native) must not change what is learnt: the same
    updates on a fixed batch give nearly the same losses. Forced on here, whatever this CPU has."""
    data = dt.make_dataset(
        one_episode_dataset(lengths=(30, 30)), torch.device("cpu"), rtg_scale=30.0, max_ep_len=50
    )
    batch = dt.sample_batch(data, 16, 6, torch.Generator().manual_seed(0))
    runs = {}
    for bf16 in (False, True):
        model = small_model(state_dim=2, act_dim=1, dropout=0.0).train()
        opt, _ = dt.make_optimizer(model, dt.Args(lr=1e-3, warmup_steps=0))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        runs[bf16] = [
            dt.update(model, opt, batch, 1.0, autocast)[0]["action"].item() for _ in range(5)
        ]
    assert runs[True] == pytest.approx(runs[False], rel=0.05) and runs[True] != runs[False]


def test_ctrl_c_saves_the_model_trained_so_far(tmp_path, hdf5_path):
    from conftest import interrupt_after

    runs = tmp_path / "runs"
    cmd = [sys.executable, "dt.py", "--env", "hopper-random", "--dataset-path", str(hdf5_path),
           "--runs-dir", str(runs), "--updates", "1000000", "--batch-size", "4", "--n-embd", "16",
           "--n-layer", "1", "--eval-episodes", "1", "--eval-every", "1000000",
           "--threads", "1"]  # fmt: skip
    # training starts right after that line
    code, out = interrupt_after(cmd, "update 0:", tmp_path / "log.txt")
    assert code == 1 and "Traceback" not in out and "interrupted (Ctrl-C)" in out
    (run,) = runs.iterdir()
    saved = torch.load(run / "model.pt", weights_only=True)
    assert (
        0 < saved["trained_updates"] < 1_000_000
        and f"holds {saved['trained_updates']} updates" in out
    )


def fake_wandb(monkeypatch):
    """A stand-in for the wandb package that records what it is sent (no network, no account)."""
    import importlib.machinery
    import types

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.calls = {"init": [], "log": [], "summary": {}, "finished": False}
    fake.run = None

    def init(**kw):
        fake.calls["init"].append(kw)
        fake.run = types.SimpleNamespace(summary=fake.calls["summary"])

    def log(metrics, step=None):
        fake.calls["log"].append(dict(metrics))

    def finish():
        fake.calls["finished"], fake.run = True, None

    fake.init, fake.log, fake.finish = init, log, finish
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def test_track_sends_the_config_every_logged_line_and_the_results(tmp_path, hdf5_path, monkeypatch):
    wandb = fake_wandb(monkeypatch)
    res = dt.train(
        tiny_args(tmp_path, hdf5_path, track=True, wandb_project_name="p", wandb_entity="me")
    )
    run = Path(res["run_dir"])
    (init,) = wandb.calls["init"]
    assert init["project"] == "p" and init["entity"] == "me" and init["name"] == run.name
    assert (
        init["config"]["args"]["track"] is True
        and init["config"]["dataset"]["name"] == "hopper-random"
    )
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert wandb.calls["log"] == lines  # metrics.jsonl is the record; W&B gets the same history
    assert (
        wandb.calls["summary"]["normalized_mean"] == res["normalized_mean"]
        and wandb.calls["finished"]
    )


def test_track_without_wandb_is_a_clear_error(tmp_path, hdf5_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(SystemExit, match=r'--track needs wandb: pip install -e ".\[track\]"'):
        tiny_args(tmp_path, hdf5_path, track=True)


def test_capture_video_films_the_final_evaluations_first_episode(tmp_path, hdf5_path, monkeypatch):
    imageio = pytest.importorskip("imageio")  # the [video] extra; CI installs it
    # headless; the flag sets it when unset
    monkeypatch.setenv("MUJOCO_GL", os.environ.get("MUJOCO_GL", "egl"))
    res = dt.train(tiny_args(tmp_path, hdf5_path, updates=2, eval_every=0, capture_video=True))
    reader = imageio.get_reader(Path(res["run_dir"]) / "video.mp4")
    frames = [f for f in reader]
    assert frames[0].shape == (480, 480, 3)  # Hopper-v4's default render size
    # the reset frame and one per step of the first episode
    assert len(frames) == res["lengths"][0] + 1


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run file (.wandb): a 7-byte header, then LevelDB-log
    blocks of 32 KiB holding (crc32, length, type) records, each a wandb_internal Record
    protobuf."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf, rows = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                        for i in rec.history.item
                    }
                )
    return rows


def test_track_offline_history_equals_metrics_jsonl(tmp_path, hdf5_path, monkeypatch):
    wandb = pytest.importorskip("wandb")  # the [track] extra; CI installs it
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    res = dt.train(tiny_args(tmp_path, hdf5_path, track=True))
    # W&B's writer is another process: wait until it has written everything (exit does the same)
    wandb.teardown()
    run = Path(res["run_dir"])
    # a local run, synced later with `wandb sync`
    (wandb_file,) = run.glob("wandb/offline-run-*/*.wandb")
    merged = {}  # W&B keeps one row per step: the lines logged at one step, merged
    for line in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        merged.setdefault(line["step"], {}).update(line)
    rows = [
        {k: v for k, v in row.items() if not k.startswith("_")} for row in wandb_history(wandb_file)
    ]
    assert rows == [pytest.approx(m) for m in merged.values()] and len(rows) == len(merged) > 3
