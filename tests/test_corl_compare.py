"""benchmarks/corl_compare.py without CORL: its one-line errors for a bad --corl, our side's timing
on a tiny config, and the whole run against a stand-in CORL file (seconds)."""

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import corl_compare as cc  # noqa: E402

TINY = dict(n_layer=1, n_head=1, n_embd=16, batch_size=4, context_len=5)

# A stand-in with CORL's constructor and forward signatures and its top-level imports (d4rl, gym,
# pyrallis: stubbed where not installed); its model is one linear layer, nothing of CORL's.
FAKE_CORL = textwrap.dedent("""
    import d4rl  # noqa: F401
    import gym
    import pyrallis
    import torch
    import torch.nn as nn


    def wrap_env(env: gym.Env, scale: float = 1.0):  # an annotation evaluated at import, as CORL's
        return env


    class DecisionTransformer(nn.Module):
        def __init__(self, state_dim, action_dim, seq_len=10, episode_len=1000, embedding_dim=128,
                     num_layers=4, num_heads=8, attention_dropout=0.0, residual_dropout=0.0,
                     embedding_dropout=0.0, max_action=1.0):
            super().__init__()
            self.net = nn.Linear(state_dim + action_dim + 1, action_dim)

        def forward(self, states, actions, returns_to_go, time_steps, padding_mask=None):
            x = torch.cat([states, actions, returns_to_go[..., None]], -1)
            return torch.tanh(self.net(x))


    @pyrallis.wrap()
    def train(config):
        pass
""")


def error_of(fn, *a) -> str:
    with pytest.raises(SystemExit) as e:
        fn(*a)
    return str(e.value)


def test_corl_path_errors_name_the_flag_the_value_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(cc.ENV_VAR, raising=False)
    msg = error_of(cc.corl_path, None)
    assert msg.startswith("error: --corl not given and $SEQRL_CORL unset") and "git clone" in msg
    msg = error_of(cc.corl_path, str(tmp_path / "nowhere.py"))
    assert msg.startswith(f"error: --corl {tmp_path / 'nowhere.py'}: no such file")
    assert "\n" not in msg and "algorithms/offline/dt.py" in msg
    monkeypatch.setenv(cc.ENV_VAR, str(tmp_path))  # a folder that is no CORL checkout
    msg = error_of(cc.corl_path, None)
    assert msg.startswith(f"error: $SEQRL_CORL {tmp_path}: no such file")
    (tmp_path / "other.py").write_text("x = 1\n")
    msg = error_of(cc.import_corl, tmp_path / "other.py")
    assert "defines no DecisionTransformer class" in msg
    (tmp_path / "broken.py").write_text("raise ValueError('boom')\n")
    assert "importing it failed (ValueError: boom)" in error_of(
        cc.import_corl, tmp_path / "broken.py"
    )


def test_our_side_times_dt_py_steps_on_a_tiny_config():
    args = cc.Args(**TINY, rounds=2, warmup_rounds=1, steps=2)
    mods = cc.import_ours(())
    c = cc.ours("dt", mods["dt"], args, cc.fake_episodes(0, n=4), "fp32")
    before = [p.detach().clone() for p in c.model.parameters()]
    cc.run_rounds([c], args)
    assert len(c.wall) == len(c.cpu) == 2 and all(t > 0 for t in c.wall)
    assert c.sched.last_epoch == 6  # 3 rounds of 2 steps, each with the scheduler's step
    assert any((p != b).any() for p, b in zip(c.model.parameters(), before))  # it trained


def test_a_whole_run_against_a_stand_in_corl_writes_ratios_and_stubs(tmp_path, monkeypatch):
    fake = tmp_path / "CORL" / cc.CORL_FILE
    fake.parent.mkdir(parents=True)
    fake.write_text(FAKE_CORL)
    monkeypatch.setenv(cc.ENV_VAR, str(tmp_path / "CORL"))  # a checkout: the file is found in it
    args = cc.Args(**TINY, rounds=3, warmup_rounds=1, steps=1, precisions=("fp32",), profile=True,
                   profile_steps=1, out=str(tmp_path / "out"))  # fmt: skip
    report = cc.main(args)
    (written,) = (tmp_path / "out").iterdir()
    assert json.loads(written.read_text())["rows"] == report["rows"]
    stubbed = report["corl"]["stubbed"]
    assert importlib.util.find_spec("pyrallis") is not None or "pyrallis" in stubbed
    assert not any(m in sys.modules for m in stubbed)  # the stubs left with the import
    dt_row, corl_row = report["rows"]
    assert (dt_row["name"], corl_row["name"]) == ("dt", "corl")
    ratio = dt_row["cpu_ratio_vs_corl"]
    assert ratio["min"] <= ratio["median"] <= ratio["max"] and "cpu_ratio_vs_corl" not in corl_row
    assert len(report["per_round"]["corl/fp32"]["cpu_s"]) == 3
    assert report["threads"] == 1 and report["load_before"]["loadavg"]
    dt_prof, corl_prof = report["profiles"]
    for prof in (dt_prof, corl_prof):
        for phase in ("forward", "backward", "clip", "optimizer"):
            assert prof["phase_ms_per_step"][phase] > 0, (prof["name"], phase)
    assert (
        dt_prof["phase_ms_per_step"]["sample"] > 0
        and "sample" not in corl_prof["phase_ms_per_step"]
    )
