"""Issue 29 item 4: rgdt.py's models and evaluate() carry no analysis hooks; benchmarks/
rgdt_analysis.py recomputes the attention with forward hooks. On a fixed tiny model of each kind it
must give the arrays the old `return_attn` / `recorder` path gave (tests/data/
rgdt_attention_reference.json, written by tests/data/rgdt_attention_reference.py at 5815f1d): the
raw per-layer weights on dataset segments, the probe summary of Fig. 2.2 and aim (3), and a
checkpoint's attention during an Alg. 2 evaluation. The old path took an explicit softmax where
the model now runs scaled_dot_product_attention: the same weights up to float32 rounding."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import rgdt

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "benchmarks"))
import rgdt_analysis  # noqa: E402

sys.path.insert(0, str(ROOT / "data"))
import reference_arrays  # noqa: E402

spec = importlib.util.spec_from_file_location(
    "reference", ROOT / "data" / "rgdt_attention_reference.py"
)
reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reference)
ARCH = reference.ARCH
REFERENCE = reference_arrays.load(ROOT / "data" / "rgdt_attention_reference.json")


def new_arrays(kind: str, hdf5_path) -> dict:
    """What reference.old_arrays computes for one kind, through today's code."""
    episodes, info = common.load_dataset("hopper-random", (str(hdf5_path),))
    data = rgdt.make_dataset(episodes, torch.device("cpu"), ARCH["rtg_scale"])
    arch, out = {**ARCH, "arch": kind}, {}
    model = rgdt_analysis.make_predictor(arch, kind, 1, torch.device("cpu"))
    steps = rgdt_analysis.probe_steps(data, arch["state_len"], 4, 2)
    b = rgdt.gather_segments(data, steps, arch["return_len"], arch["state_len"])
    with torch.no_grad(), rgdt_analysis.captured_attention(model) as calls:
        model(b[model.conditioning], b["states"], b["mask"])
    (attns,) = calls
    for i, att in enumerate(attns):
        out[f"{kind}_raw_self_{i}"] = att["self"].numpy()
        if att["cross"] is not None:
            out[f"{kind}_raw_cross_{i}"] = att["cross"].numpy()
    probe = rgdt_analysis.probe_attention(model, data, rgdt_analysis.probe_steps(data, 4, 64, 3))
    out[f"{kind}_probe_self_maps"] = np.array(probe["self_maps"])
    out[f"{kind}_probe_cross_maps"] = np.array(probe["cross_maps"])
    torch.manual_seed(0)
    inv = rgdt.make_models(arch, "cpu")[1].eval()
    ckpt = {"arch": arch, "model": model.state_dict(), "inverse_dynamics": inv.state_dict()}
    stats = zip(("state_mean", "state_std"), data["state_stats"])
    ckpt |= {k: torch.as_tensor(v) for k, v in stats}
    ckpt |= {"best_returns": torch.as_tensor(rgdt.best_return_sequence(episodes))}
    ckpt["args"] = {"target_return": None}
    args = rgdt_analysis.Args(env="hopper-random", eval_episodes=2, seeds=(0,))
    ev = rgdt_analysis.checkpoint_attention(ckpt, info, args, torch.device("cpu"))
    out[f"{kind}_eval_self_maps"] = np.array(ev["self_maps"])
    out[f"{kind}_eval_cross_maps"] = np.array(ev["cross_maps"])
    out[f"{kind}_eval_samples"] = np.array(ev["samples"])
    out[f"{kind}_eval_returns"] = np.array(ev["returns"])
    return out


@pytest.mark.parametrize("kind", ["seq2seq", "gpt"])
def test_hooks_give_the_attention_of_the_old_return_attn_path(kind, hdf5_path):
    new = new_arrays(kind, hdf5_path)
    old = {k: v for k, v in REFERENCE.items() if k.startswith(f"{kind}_")}
    assert sorted(new) == sorted(old)
    for key, value in old.items():
        assert new[key].shape == value.shape, key
        # returns: whole hopper episodes, each action from the same weights
        rtol = 1e-4 if key.endswith("returns") else 1e-5
        np.testing.assert_allclose(new[key], value, rtol=rtol, atol=1e-6, err_msg=key)
    assert new[f"{kind}_eval_samples"] > 0


def test_the_hooks_leave_the_model_as_it_was():
    torch.manual_seed(0)
    arch = {**ARCH, "arch": "seq2seq"}
    model = rgdt.make_models(arch, "cpu")[0].eval()
    g = torch.Generator().manual_seed(1)
    returns, states = torch.randn(2, 6, 1, generator=g), torch.randn(2, 4, 11, generator=g)
    before = model(returns, states)[0]
    with rgdt_analysis.captured_attention(model) as calls:
        inside = model(returns, states)[0]
        model(returns, states[:, 1:])  # a short context: one list per forward
    assert [len(c) for c in calls] == [2, 2] and calls[1][0]["self"].shape == (2, 2, 3, 3)
    torch.testing.assert_close(inside, before, rtol=0, atol=0)  # the model's path is unchanged
    model(returns, states)
    assert len(calls) == 2  # and the hooks are gone
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("kind", ["seq2seq", "gpt"])
def test_recomputed_weights_are_the_ones_the_model_applied(kind):
    """Each layer's weights, applied to the module's own values, give the module's output (what
    its scaled_dot_product_attention computed); causal over states, rows that sum to one."""
    torch.manual_seed(0)
    model = rgdt.make_models({**ARCH, "arch": kind}, "cpu")[0].eval()
    g = torch.Generator().manual_seed(1)
    T = 4
    width = 6 if kind == "seq2seq" else T
    returns, states = torch.randn(2, width, 1, generator=g), torch.randn(2, T, 11, generator=g)
    mask = torch.tensor([[False, True, True, True], [True] * 4])
    layers = model.decoder if kind == "seq2seq" else model.blocks
    seen = []
    hook = layers[1].self_attn.register_forward_hook(lambda m, a, out: seen.append((a, out)))
    with torch.no_grad(), rgdt_analysis.captured_attention(model) as calls:
        model(returns, states, mask)
    hook.remove()
    (attns,), ((x, context, _), out) = calls, seen[0]
    att = attns[1]["self"]
    B, n, C = x.shape
    v = layers[1].self_attn.kv(context).split(C, dim=2)[1].view(B, n, 2, C // 2).transpose(1, 2)
    y = layers[1].self_attn.proj((att @ v).transpose(1, 2).reshape(B, n, C))
    torch.testing.assert_close(y, out, rtol=1e-5, atol=1e-6)
    tokens = T if kind == "seq2seq" else 2 * T
    assert att.shape == (2, 2, tokens, tokens) and (att.triu(1) == 0).all()
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 2, tokens))
    pad = 1 if kind == "seq2seq" else 2  # the padded step's tokens: seen by later ones never
    hidden = att[0, :, pad:, :pad]
    assert (hidden == 0).all()
    if kind == "seq2seq":
        cross = attns[0]["cross"]
        assert cross.shape == (2, 2, T, 6) and (cross > 0).all()
        torch.testing.assert_close(cross.sum(-1), torch.ones(2, 2, T))
    else:
        assert attns[0]["cross"] is None
