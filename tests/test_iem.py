"""iem.py: bot data, masking, the energy and its minimisation, flags, runs end to end. Tiny models,
no network."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import iem

ROOT = Path(__file__).resolve().parents[1]
LEVEL = "GoToLocalS7N5"


def tiny_args(tmp_path, **kw):
    base = dict(
        env=LEVEL,
        collect=12,
        updates=6,
        batch_size=8,
        n_layer=2,
        n_head=2,
        n_embd=16,
        horizon=3,
        iterations=3,
        eval_episodes=3,
        log_every=2,
        runs_dir=str(tmp_path / "runs"),
        data_dir=str(tmp_path / "data"),
    )
    return iem.Args(**{**base, **kw})


@pytest.fixture(scope="module")
def demos_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("demos") / "demos.npz"
    iem.collect_demos(LEVEL, 6, path)
    return path


def tiny_model(horizon=4, mission_len=5):
    torch.manual_seed(0)
    return iem.MaskedPlanModel(
        grid=(7, 7),
        mission_len=mission_len,
        horizon=horizon,
        n_layer=2,
        n_head=2,
        n_embd=16,
        dropout=0.0,
    ).eval()


def start_states(n=3, mission_len=5):
    envs = [iem.make_env(LEVEL) for _ in range(n)]
    obs = [iem.reset(env, 100 + i) for i, env in enumerate(envs)]
    images = torch.as_tensor(np.stack([o["image"] for o in obs])).long()
    words = torch.tensor([iem.tokenize(o["mission"], mission_len) for o in obs])
    return images, words


def test_bot_demonstrations_succeed_and_replay(demos_path):
    """Every kept episode is the bot's success, and replaying its actions from its seed reproduces
    the stored observations and ends in success on the last action."""
    with np.load(demos_path) as z:
        d = {k: z[k] for k in z.files}
    assert len(d["lengths"]) == 6 and d["lengths"].sum() == len(d["actions"]) == len(d["images"])
    start = 0
    for seed, n in enumerate(d["lengths"]):
        env = iem.make_env(LEVEL)
        obs = iem.reset(env, seed)
        assert obs["mission"] == d["missions"][seed]
        for t in range(n):
            np.testing.assert_array_equal(obs["image"], d["images"][start + t])
            obs, r, term, trunc, _ = env.step(int(d["actions"][start + t]))
            assert (term or trunc) == (t == n - 1)
        assert r > 0
        start += n


def test_egocentric_view_centres_and_turns_to_the_agent():
    grid = np.ones((7, 7, 3), np.int64)
    grid[..., 1:] = 0
    grid[3, 2] = (iem.AGENT, 0, 0)  # agent at x=3, y=2 facing right (+x)
    grid[4, 2] = (6, 0, 0)  # a red ball straight ahead
    grid[3, 3] = (5, 2, 0)  # a blue key on its right (+y when facing +x)
    ego = iem.egocentric(torch.as_tensor(grid)[None])[0]
    R = 6
    assert ego.shape == (13, 13, 3)
    assert ego[R, R, 0] == iem.AGENT and ego[R - 1, R, 0] == 6 and ego[R, R + 1, 0] == 5
    grid[3, 2, 2] = 3  # now facing up (-y): the ball is on its right, the key behind it
    ego = iem.egocentric(torch.as_tensor(grid)[None])[0]
    assert ego[R, R + 1, 0] == 6 and ego[R + 1, R, 0] == 5
    assert ego[0, 0, 0] == 0  # off the grid: 'unseen'


def test_mask_never_leaks_the_hidden_token():
    """Changing an action changes nothing in the copies that hide it (so its own prediction cannot
    see it), and does change the predictions of the copies where it is visible (so the test can
    fail)."""
    model, (images, words) = tiny_model(), start_states()
    plan = torch.tensor([[0, 1, 2, 2], [2, 2, 0, 1], [1, 2, 2, 2]])
    for j in range(4):
        changed = plan.clone()
        changed[:, j] = (plan[:, j] + 3) % iem.N_ACTIONS
        a, hidden, C = iem.single_masks(plan, all_masked=True)
        b, _, _ = iem.single_masks(changed, all_masked=True)
        la, lb = model(images, words, a, copies=C), model(images, words, b, copies=C)
        hides_j = hidden[:, j]
        # the single copy for position j and the fully masked copy
        assert hides_j.sum() == 2 * len(plan)
        torch.testing.assert_close(la[hides_j], lb[hides_j], rtol=0, atol=0)
        assert not torch.allclose(la[~hides_j], lb[~hides_j])


def test_energy_is_the_sum_of_single_masked_nlls():
    model, (images, words) = tiny_model(), start_states()
    plan = torch.tensor([[0, 1, 2, 2], [2, 2, 0, 1], [1, 2, 2, 2]])
    expected = torch.zeros(3)
    for j in range(4):
        masked = plan.clone()
        masked[:, j] = iem.MASK
        logp = model(images, words, masked)[:, j].log_softmax(-1)
        expected -= logp[torch.arange(3), plan[:, j]]
    torch.testing.assert_close(iem.energy(model, images, words, plan), expected)


def fixed_batch(demos_path, H=4, mission_len=5, n=32):
    with np.load(demos_path) as z:
        d = {k: z[k] for k in z.files}
    data = iem.make_dataset(d, mission_len, torch.device("cpu"))
    return iem.sample_batch(data, n, H, torch.Generator().manual_seed(3))


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("all_masked", [False, True])
def test_masked_loss_is_the_mean_nll_of_the_hidden_actions(demos_path, bf16, all_masked):
    """The loss without boolean-mask indexing (issue 28) equals the formula it replaced, which cut
    out the hidden actions inside the episode, on a fixed batch, to the rounding of a sum taken in
    another order."""
    model, batch = tiny_model(), fixed_batch(demos_path)
    images, words, plan, valid = batch
    assert (~valid).any() and valid.any()  # the batch has padded steps past an episode's end
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        copies, hidden, C = iem.single_masks(plan, all_masked)
        target = hidden & valid.repeat_interleave(C, 0)
        logits = model(images, words, copies, copies=C)
        before = F.cross_entropy(logits[target].float(), plan.repeat_interleave(C, 0)[target])
        now = iem.masked_loss(model, images, words, plan, valid, all_masked)
    torch.testing.assert_close(now, before, rtol=1e-6, atol=0)


# Ops that make the host wait for the device: a boolean mask's size (nonzero, masked_select), a
# value read (item), and a tensor made from host data (torch.tensor: a copy to the device).
SYNCING = {
    "aten::nonzero",
    "aten::masked_select",
    "aten::item",
    "aten::_local_scalar_dense",
    "aten::lift_fresh",
}


def test_a_training_update_never_waits_for_the_device(demos_path):
    """Issue 28: sampling, forward, loss, backward and clipping of an update run no op that syncs a
    GPU with the host. Profiled on the CPU, where the same ops run (the optimizer's step is left
    out: on the CPU its step counters are read with item(), on CUDA they stay on the host without a
    sync)."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_model().train()
    with np.load(demos_path) as z:
        data = iem.make_dataset({k: z[k] for k in z.files}, 5, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        images, words, plan, valid = iem.sample_batch(data, 8, 4, gen)
        iem.masked_loss(model, images, words, plan, valid, True).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    ran = {e.name for e in prof.events()}
    assert "aten::embedding" in ran and not ran & SYNCING, ran & SYNCING


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Potts(torch.nn.Module):
    """A hand-made energy: p(plan) ~ exp(sum_t u[t, a_t] + sum_{s<t} J[a_s, a_t]); its single-site
    conditionals are exactly what a masked model would give, so the planner's energy is this model's
    pseudo-likelihood."""

    def __init__(self, H):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.u = torch.randn(H, iem.N_ACTIONS, generator=g)
        J = torch.randn(iem.N_ACTIONS, iem.N_ACTIONS, generator=g) * 1.5
        self.J = J + J.T

    def forward(self, images, words, plan, copies=1):
        seen = torch.nn.functional.one_hot(plan.clamp(max=iem.N_ACTIONS), iem.N_ACTIONS + 1)[
            ..., :-1
        ].float()
        field = seen @ self.J  # (N, H, A): what each visible action adds to every position
        others = field.sum(1, keepdim=True) - field  # a position does not interact with itself
        return self.u + others


def test_refinement_never_raises_the_energy_on_a_hand_made_model():
    H, B = 5, 64
    model, images, words = Potts(H), torch.zeros(B, 1), torch.zeros(B, 1, dtype=torch.long)
    planning = iem.Planning(iterations=25, resample=1, temperature=1.0, accept="lower")
    plan, trace = iem.plan(model, images, words, H, planning, seeded(0))
    assert trace.shape == (B, 26)
    # each accepted step lowers the energy or leaves it
    assert (trace[:, 1:] <= trace[:, :-1]).all()
    assert (trace[:, -1] < trace[:, 0] - 1e-3).float().mean() > 0.5  # and refinement does lower it
    # the recorded energy is the plan's
    torch.testing.assert_close(trace[:, -1], iem.energy(model, images, words, plan))
    # Without the acceptance rule (a plain Gibbs chain) the energy does rise at some steps: the rule
    # is doing work.
    gibbs = dataclasses.replace(planning, accept="all")
    _, trace_all = iem.plan(model, images, words, H, gibbs, seeded(0))
    assert (trace_all[:, 1:] > trace_all[:, :-1] + 1e-3).any()
    # BC (no refinement) is the first fill alone: the argmax of every position's unary term.
    bc, none = iem.plan(model, images, words, H, planning, torch.Generator(), refine=False)
    assert none is None and (bc == model.u.argmax(-1)).all()


def test_default_refinement_is_leaps_code_argmax_of_one_re_masked_action_always_kept():
    """LEAP's code: each iteration re-masks one random action and writes the argmax of its
    conditional, kept whatever the energy. On the hand-made model that is iterated conditional
    modes: enough iterations end in a plan where every action is the argmax of its conditional given
    the others."""
    defaults = iem.Args()
    assert (defaults.temperature, defaults.accept, defaults.resample) == (0.0, "all", 1)
    H, B = 5, 64
    model, images, words = Potts(H), torch.zeros(B, 1), torch.zeros(B, 1, dtype=torch.long)
    planning = dataclasses.replace(iem.planning_of(defaults), iterations=60)
    first, _ = iem.plan(model, images, words, H, planning, torch.Generator(), refine=False)
    plan, trace = iem.plan(model, images, words, H, planning, seeded(0))
    for j in range(H):
        masked = plan.clone()
        masked[:, j] = iem.MASK
        assert (model(images, words, masked)[:, j].argmax(-1) == plan[:, j]).all()
    assert (plan != first).any()  # refinement changed the first fill's plans
    steps = [
        iem.plan(model, images, words, H, dataclasses.replace(planning, iterations=n), g)[0]
        for n, g in ((3, torch.Generator().manual_seed(1)), (4, torch.Generator().manual_seed(1)))
    ]
    assert ((steps[0] != steps[1]).sum(1) <= 1).all()  # one iteration changes at most one action


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_leaps_rule_evaluates_the_energy_only_for_its_trace(monkeypatch, temperature):
    """Under --accept all the energy decides nothing: without the trace it is never computed, and
    the plans are the same (what the untraced planning time measures); --accept lower needs it
    either way."""
    H, B = 4, 16
    model, images, words = Potts(H), torch.zeros(B, 1), torch.zeros(B, 1, dtype=torch.long)
    calls, real = [], iem.energy
    monkeypatch.setattr(iem, "energy", lambda *a: calls.append(1) or real(*a))
    planning = iem.Planning(iterations=5, resample=1, temperature=temperature, accept="all")
    traced, trace = iem.plan(model, images, words, H, planning, seeded(2))
    assert len(calls) == 6 and trace.shape == (B, 6)
    calls.clear()
    bare, none = iem.plan(model, images, words, H, planning, seeded(2), trace=False)
    assert calls == [] and none is None and torch.equal(bare, traced)
    lower = dataclasses.replace(planning, accept="lower")
    iem.plan(model, images, words, H, lower, torch.Generator().manual_seed(2), trace=False)
    assert len(calls) == 6


DOOR = 4  # minigrid's OBJECT_TO_IDX["door"]; a door's state is 0 open, 1 closed, 2 locked


def door_states(image):
    return image[image[..., 0] == DOOR][:, 2]


@pytest.mark.parametrize("level", ["GoToObjMazeS4", "GoToObjMazeS7"])
def test_leap_maze_levels_are_built_with_every_door_open(level, tmp_path):
    """LEAP's fork builds GoToObjMazeS4 and S7 with doors_open=True; minigrid registers them
    closed."""
    import gymnasium as gym
    from minigrid.wrappers import FullyObsWrapper

    plain_closed = []
    for seed in range(3):
        ours = iem.reset(iem.make_env(level), seed)["image"]
        assert len(door_states(ours)) and (door_states(ours) == 0).all()
        plain = iem.reset(FullyObsWrapper(gym.make(iem.env_id(level))), seed)["image"]
        plain_closed.append((door_states(plain) > 0).any())
    assert any(plain_closed)  # the test could fail: minigrid's own build has closed doors
    # the paper's GoToObjMazeS4R2Close is minigrid's GoToObjMazeS4R2 as registered, doors closed
    assert (door_states(iem.reset(iem.make_env("GoToObjMazeS4R2"), 0)["image"]) > 0).any()
    # cached demos of this build have their own name, never those of minigrid's closed build
    assert iem.level_file_name(level) == f"BabyAI-{level}-v0__doors_open=True"


def test_a_checkpoint_of_the_closed_door_build_is_refused(tmp_path):
    model = tiny_model()
    arch = dict(
        grid=[10, 10], mission_len=5, horizon=4, n_layer=2, n_head=2, n_embd=16, dropout=0.0
    )
    ckpt = {
        "method": "iem",
        "env": "BabyAI-GoToObjMazeS4-v0",
        "arch": arch,
        "model": model.state_dict(),
        "args": {},
    }
    torch.save(ckpt, tmp_path / "old.pt")  # written before the doors were open: no env_args
    with pytest.raises(
        SystemExit, match=r"built with \{\}, not LEAP's \{'doors_open': True\}; train a new model"
    ):
        iem.train(
            tiny_args(tmp_path, env="GoToObjMazeS4", checkpoint=str(tmp_path / "old.pt"), updates=0)
        )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "kw, flag",
    [
        (dict(horizon=0), "--horizon"),
        (dict(resample=6, horizon=5), "--resample"),
        (dict(replan_every=9), "--replan-every"),
        (dict(replan_every=0), "--replan-every"),
        (dict(n_embd=30, n_head=4), "--n-embd"),
        (dict(temperature=-1.0), "--temperature"),
        (dict(dropout=1.0), "--dropout"),
        (dict(env="GoToNowhere"), "--env"),
        (dict(updates=0), "--updates"),
        (dict(dataset="nope.npz"), "--dataset"),
        (dict(iterations=-1), "--iterations"),
        (dict(seed=-2), "--seed"),
    ],
)
def test_bad_flags_exit_with_a_message_naming_the_flag(kw, flag):
    with pytest.raises(SystemExit) as e:
        iem.Args(**kw)
    assert str(e.value).startswith(f"error: {flag} ")


def test_cli_error_is_one_line_without_traceback():
    out = subprocess.run(
        [sys.executable, str(ROOT / "iem.py"), "--horizon", "0"], capture_output=True, text=True
    )
    assert out.returncode != 0 and out.stderr.strip() == "error: --horizon 0: must be > 0."


def test_presets_and_paper_levels_fill_unset_flags():
    a = iem.Args(env="GoToObjMazeS4")
    assert (a.horizon, a.iterations, a.replan_every, a.n_embd, a.updates, a.collect) == (
        10,
        29,
        None,
        128,
        1600,
        500,
    )
    b = iem.Args(env="BabyAI-PickupLoc-v0", preset="cpu", horizon=4)
    assert (b.horizon, b.iterations, b.n_embd, b.updates) == (4, 9, 64, 1000)


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_end_to_end_deterministic_and_checkpoint_evaluation(tmp_path):
    first = iem.train(tiny_args(tmp_path))
    run = Path(first["run_dir"])
    assert {p.name for p in run.iterdir()} == {
        "config.json",
        "metrics.jsonl",
        "results.json",
        "model.pt",
    }
    saved = json.loads((run / "results.json").read_text())
    assert (
        saved["iem"]["success_rate"] == first["iem"]["success_rate"]
        and len(saved["iem"]["returns"]) == 3
    )
    assert (
        len(saved["iem"]["energy_per_iteration"]) == 4
        and saved["bc"]["energy_per_iteration"] is None
    )
    assert saved["iem"]["planning_s_per_step_untraced"] > 0 and saved["iem"]["plans"] >= 3
    lines = read_metrics(run)
    assert [m["step"] for m in lines if "loss" in m] == [0, 2, 4, 5] and "iem_success" in lines[-1]
    assert (tmp_path / "data" / f"BabyAI-{LEVEL}-v0__bot12.npz").is_file()  # collected once, cached

    # same seed: the same run, from the cached demos
    again = iem.train(tiny_args(tmp_path, exp_name="again"))
    assert read_metrics(again["run_dir"]) == lines
    for k in ("iem", "bc"):
        assert (
            again[k]["returns"] == first[k]["returns"]
            and again[k]["lengths"] == first[k]["lengths"]
        )
    assert again["iem"]["energy_per_iteration"] == first["iem"]["energy_per_iteration"]

    # --checkpoint RUN/model.pt --updates 0 evaluates the saved model on the same episodes: the same
    # numbers, whatever the architecture flags say.
    ev = iem.train(
        tiny_args(
            tmp_path,
            exp_name="eval",
            checkpoint=str(run / "model.pt"),
            updates=0,
            n_embd=64,
            horizon=5,
        )
    )
    assert ev["arch"] == first["arch"] and ev["demos"] == 0 and "__eval-eval__" in ev["run_dir"]
    for k in ("iem", "bc"):
        assert ev[k]["returns"] == first[k]["returns"] and ev[k]["lengths"] == first[k]["lengths"]


def test_foreign_checkpoints_and_datasets_are_refused(tmp_path, demos_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"model": {}, "args": {}}, other)
    missing = tmp_path / "missing.pt"
    refused = {
        junk: "not a checkpoint torch can read",
        other: "written by another program, not iem.py",
        missing: "no such file",
    }
    for path, words in refused.items():
        with pytest.raises(SystemExit, match=words):
            iem.train(tiny_args(tmp_path, checkpoint=str(path), updates=0))
    with pytest.raises(SystemExit, match="not an .npz of images, actions, lengths, missions"):
        iem.train(tiny_args(tmp_path, dataset=str(junk)))
    with pytest.raises(SystemExit, match="are not episodes of BabyAI-GoToObjMazeS4-v0"):
        iem.train(tiny_args(tmp_path, env="GoToObjMazeS4", dataset=str(demos_path)))
    assert not (tmp_path / "runs").exists()  # every refusal comes before the run folder


def test_own_dataset_is_used_instead_of_the_bot(tmp_path, demos_path):
    res = iem.train(tiny_args(tmp_path, dataset=str(demos_path), updates=2, eval_episodes=1))
    assert res["dataset"] == str(demos_path) and res["demos"] == 6
    assert not (tmp_path / "data").exists()


def test_ctrl_c_saves_the_model_trained_so_far(tmp_path, monkeypatch):
    calls, loss = [], iem.masked_loss

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return loss(*a, **kw)

    monkeypatch.setattr(iem, "masked_loss", interrupted)
    with pytest.raises(SystemExit) as stop:
        iem.train(tiny_args(tmp_path, env="GoToObjMazeS4R2"))
    (run,) = (tmp_path / "runs").iterdir()
    assert str(stop.value) == (
        f"interrupted (Ctrl-C): {run / 'model.pt'} holds 2 updates; continue with "
        f"`python iem.py --resume {run}`, or evaluate it with "
        f"`python iem.py --checkpoint {run / 'model.pt'} --updates 0`."
    )
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["trained_updates"] == 2 and ckpt["env"] == "BabyAI-GoToObjMazeS4R2-v0"
    monkeypatch.setattr(iem, "masked_loss", loss)
    # The checkpoint evaluates alone: its level without --env, its architecture, its training flags
    # on record.
    res = iem.train(
        tiny_args(tmp_path, env=None, exp_name="eval", checkpoint=str(run / "model.pt"), updates=0)
    )
    assert (
        res["env"] == "BabyAI-GoToObjMazeS4R2-v0"
        and res["updates"] == 0
        and len(res["iem"]["returns"]) == 3
    )
    assert res["trained_with"] == ckpt["args"] and res["arch"] == ckpt["arch"]


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
        fake.run = SimpleNamespace(summary=fake.calls["summary"])

    def log(metrics, step=None):
        fake.calls["log"].append(dict(metrics))

    def finish():
        fake.calls["finished"], fake.run = True, None

    fake.init, fake.log, fake.finish = init, log, finish
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def test_track_sends_the_config_every_logged_line_and_the_results(tmp_path, monkeypatch):
    wandb = fake_wandb(monkeypatch)
    res = iem.train(
        tiny_args(tmp_path, track=True, wandb_project_name="p", wandb_entity="me", eval_episodes=1)
    )
    run = Path(res["run_dir"])
    (init,) = wandb.calls["init"]
    assert init["project"] == "p" and init["entity"] == "me" and init["name"] == run.name
    assert init["config"]["args"]["track"] is True and init["config"]["env"] == f"BabyAI-{LEVEL}-v0"
    # metrics.jsonl is the record; W&B gets the same history
    assert wandb.calls["log"] == read_metrics(run)
    assert wandb.calls["summary"]["energy_drop"] == res["energy_drop"] and wandb.calls["finished"]


def test_track_without_wandb_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(SystemExit, match=r'--track needs wandb: pip install -e ".\[track\]"'):
        tiny_args(tmp_path, track=True)
