"""The CPU training path of the DT family's dropout and attention (issue 28 item 5): on a CPU,
dropout() draws its masks from uniform fp32 numbers instead of F.dropout's bernoulli_, and
SelfAttention writes SDPA's math out so that its attention dropout does the same. Same method:
the same rate at the same places, and with the masks taken away the written-out attention is
SDPA's; evaluation (no dropout) still runs SDPA."""

import importlib

import pytest
import torch

FILES = ["dt", "mo_dt", "trdt"]
MODEL = {"dt": "DecisionTransformer", "mo_dt": "MultiObjectiveDecisionTransformer",
         "trdt": "TrustRegionDecisionTransformer"}  # fmt: skip


@pytest.mark.parametrize("module", FILES)
def test_written_out_attention_is_sdpas_without_the_masks(module, monkeypatch):
    mod = importlib.import_module(module)
    torch.manual_seed(0)
    attn = mod.SelfAttention(32, 2, dropout=0.1)
    x = torch.randn(4, 12, 32)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[0, :2] = False  # a left-padded segment: padded keys masked
    allowed = mod.attention_mask(4, 3, mask, x.device)
    want = attn.eval()(x, allowed)  # p = 0: SDPA's fused kernel
    monkeypatch.setattr(mod, "dropout", lambda x, p, training: x)  # every mask all ones
    got = attn.train()(x, allowed)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_zeroes_at_rate_p_and_scales_the_rest(dtype):
    from dt import dropout

    p, x = 0.1, torch.ones(1000, 1000, dtype=dtype)
    torch.manual_seed(1)
    y = dropout(x, p, True)
    assert y.dtype == dtype and y.shape == x.shape
    zeroed = (y == 0).double().mean().item()
    assert abs(zeroed - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5  # five standard deviations
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))  # F.dropout's scale
    torch.manual_seed(1)
    assert torch.equal(dropout(x, p, True), y)  # the global generator: seeded runs repeat
    # gradients through the same mask, as F.dropout's
    x = torch.ones(100, 100, dtype=dtype, requires_grad=True)
    y = dropout(x, p, True)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())


def test_dropout_is_f_dropout_where_it_does_nothing_or_everything():
    from dt import dropout

    x = torch.randn(50, 50)
    assert torch.equal(dropout(x, 0.1, False), x)  # evaluation
    assert torch.equal(dropout(x, 0.0, True), x)
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))  # F.dropout's p = 1


@pytest.mark.parametrize("module", FILES)
def test_every_dropout_of_the_model_is_the_cpu_one(module):
    """The embedding, attention-residual and MLP dropouts are Dropout (an nn.Dropout, so code that
    looks for nn.Dropout still finds them); none is left on F.dropout's bernoulli_ path."""
    mod = importlib.import_module(module)
    arch = {k: getattr(mod.Args(), k) for k in mod.ARCH} | {"state_dim": 11, "act_dim": 3}
    model = getattr(mod, MODEL[module])(**arch)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 1 + 2 * len(model.blocks)
    assert all(type(m) is mod.Dropout for m in drops)


def test_without_own_masks_it_is_f_dropout(monkeypatch):
    """benchmarks/ops.py counts CUDA's kernels by answering no in own_masks: then dropout() is
    F.dropout, draw for draw."""
    import dt

    x = torch.randn(50, 50)
    monkeypatch.setattr(dt, "own_masks", lambda x: False)
    torch.manual_seed(3)
    got = dt.dropout(x, 0.1, True)
    torch.manual_seed(3)
    assert torch.equal(got, torch.nn.functional.dropout(x, 0.1, True))
