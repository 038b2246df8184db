"""--eval-context K' (issue 27, item 4; thesis §1.3.2: DT's context "may be shorter during
evaluation than the one used during training"): dt, mo_dt and trdt act on the last K' <= K steps
only."""

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import common
import dt
import mo_dt
import trdt

MODELS = {dt: dt.DecisionTransformer, mo_dt: mo_dt.MultiObjectiveDecisionTransformer,
          trdt: trdt.TrustRegionDecisionTransformer}  # fmt: skip
HORIZON = 7


class ClockEnv(gym.Env):
    """Observations that follow the clock whatever the agent does, reward 1 per step; `shift` moves
    the first observation only. Every action taken is kept in `ClockEnv.actions`."""

    actions: list = []
    shift = 0.0

    def __init__(self):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (11,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
        self.t = 0

    def clock(self):
        return (0.3 * self.t + 0.01 * np.arange(11)).astype(np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.clock() + np.float32(ClockEnv.shift), {}

    def step(self, action):
        ClockEnv.actions.append(np.array(action))
        self.t += 1
        return self.clock(), 1.0, False, False, {}


if "SeqrlClock-v0" not in gym.registry:
    gym.register("SeqrlClock-v0", entry_point=ClockEnv, max_episode_steps=HORIZON)


def state_only_model(module, K=4):
    """A small untrained model whose tokens carry nothing but the state (and the timestep): the
    return, action and region embeddings are zero, so an action can only depend on the states in its
    context, and older states reach it through nothing else."""
    torch.manual_seed(0)
    arch = dict(state_dim=11, act_dim=3, timestep_embedding=True, context_len=K, n_layer=2,
                n_head=1, n_embd=16, dropout=0.0, max_ep_len=100, rtg_scale=1000.0)  # fmt: skip
    extra = dict(policy="gaussian", gaussian_heads=True, bins=3)
    arch |= {name: value for name, value in extra.items() if name in module.ARCH}
    model = MODELS[module](**arch).eval()
    with torch.no_grad():
        for m, embed in model.embed.items():
            if m != "states":
                embed.weight.zero_()
                embed.bias.zero_()
    return model


def actions_taken(module, model, info, monkeypatch, shift: float, **flags) -> np.ndarray:
    monkeypatch.setattr(common, "make_env", lambda info, video=None: gym.make("SeqrlClock-v0"))
    monkeypatch.setattr(ClockEnv, "shift", shift)
    monkeypatch.setattr(ClockEnv, "actions", [])
    args = module.Args(eval_episodes=1, **flags)
    stats = (np.zeros(11, np.float32), np.ones(11, np.float32))
    off = torch.autocast("cpu", enabled=False)
    module.evaluate(model, info, stats, args, 3600.0, torch.device("cpu"), off)
    return np.stack(ClockEnv.actions)


@pytest.mark.parametrize("module", [dt, mo_dt, trdt], ids=lambda m: m.__name__)
def test_an_action_sees_only_the_last_k_prime_steps(module, hdf5_path, monkeypatch):
    _, info = common.load_dataset("hopper-random", (str(hdf5_path),))
    model = state_only_model(module, K=4)
    run = lambda shift, k: actions_taken(module, model, info, monkeypatch, shift, eval_context=k)
    assert len(run(0.0, None)) == HORIZON
    # K' = 2: changing s_0 changes a_0 and a_1 (s_0 is in their context), and no later action
    clean, shifted = run(0.0, 2), run(5.0, 2)
    assert not np.allclose(clean[:2], shifted[:2], atol=1e-4)
    np.testing.assert_array_equal(clean[2:], shifted[2:])
    # K' = K = 4: s_0 reaches a_2 and a_3 as well (the test can fail), and K' = K is today's
    # evaluation
    full, full_shifted = run(0.0, 4), run(5.0, 4)
    assert not np.allclose(full[2:4], full_shifted[2:4], atol=1e-4)
    np.testing.assert_array_equal(full[4:], full_shifted[4:])
    np.testing.assert_array_equal(full, run(0.0, None))


@pytest.mark.parametrize("module", [dt, mo_dt, trdt], ids=lambda m: m.__name__)
def test_eval_context_with_a_checkpoint(module, tmp_path, hdf5_path):
    """K is the checkpoint's (the --context-len flag is ignored), K' the flag's; K' > K is
    refused."""
    base = dict(env="hopper-random", dataset_path=(str(hdf5_path),), batch_size=8, n_embd=16,
                n_layer=1, n_head=1, eval_episodes=2)  # fmt: skip
    trained = module.train(module.Args(**base, context_len=4, updates=3, eval_every=0,
                                       runs_dir=str(tmp_path / "t")))  # fmt: skip
    ckpt = str(Path(trained["run_dir"]) / "model.pt")
    again = lambda **kw: module.train(
        module.Args(checkpoint=ckpt, updates=0, eval_episodes=2, **kw)
    )
    same = again(eval_context=4, runs_dir=str(tmp_path / "same"))
    assert same["returns"] == trained["returns"] and same["args"]["eval_context"] == 4
    shorter = again(eval_context=1, runs_dir=str(tmp_path / "short"))
    assert shorter["returns"] != trained["returns"] and shorter["arch"]["context_len"] == 4
    with pytest.raises(
        SystemExit,
        match=r"^error: --eval-context 5: must be <= K = 4 \(the checkpoint's context\); "
        r"or leave it out\.$",
    ):
        again(eval_context=5, context_len=20, runs_dir=str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()  # nothing left behind
    with pytest.raises(SystemExit, match=r"^error: --eval-context 0: must be >= 1"):
        module.Args(eval_context=0)
