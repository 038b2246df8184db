"""The multi-tensor optimizers (issue 28, item 2): mo_dt/trdt's LAMB is the per-tensor LAMB it
replaced, in a fixed number of ops whatever the model's size, and reads no tensor value on the host;
dt.py's AdamW is torch's fused one."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

import dt
import mo_dt
import trdt


class PerTensorLamb(torch.optim.Optimizer):
    """mo_dt.py's LAMB before it went multi-tensor (commit 6bc220c), verbatim: the reference."""

    def __init__(
        self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (beta1, beta2), step = group["betas"], group.get("step", 0) + 1
            group["step"] = (
                # one count per group, as in timm (a head without a gradient skips, the count not)
                step
            )
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + group["eps"])
                update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
                p.sub_(update * (trust * group["lr"]))


def parameter_sets(seed=0):
    """Two copies of the same tensors in a decay and a no-decay group: matrices of very different
    norms, vectors, and a zero vector (a LayerNorm bias at the start: its trust ratio is 1)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 4), (16, 8), (3, 16), (8,), (4,), (16,)]
    tensors = [torch.randn(s, generator=g) for s in shapes]
    tensors[1] *= 30.0
    tensors[-1].zero_()
    copies = [[torch.nn.Parameter(t.clone()) for t in tensors] for _ in range(2)]
    return [[dict(params=ps[:3], weight_decay=0.1), dict(params=ps[3:])] for ps in copies]


def flat(opt):
    return [p for group in opt.param_groups for p in group["params"]]


@pytest.mark.parametrize("cls", [mo_dt.Lamb, trdt.Lamb])
def test_multi_tensor_lamb_is_the_per_tensor_lamb_over_20_steps(cls):
    ours, theirs = parameter_sets()
    new, old = cls(ours, lr=1e-2, eps=1e-8), PerTensorLamb(theirs, lr=1e-2, eps=1e-8)
    g = torch.Generator().manual_seed(1)
    for step in range(20):
        grads = [torch.randn(p.shape, generator=g) for p in flat(new)]
        for opt in (new, old):
            for i, (p, grad) in enumerate(zip(flat(opt), grads)):
                skip = step % 5 == 4 and i == 2  # now and then a head without a gradient
                p.grad = None if skip else grad.clone()
            for group in opt.param_groups:
                group["lr"] = 1e-2 * min(1.0, (step + 1) / 5)  # a warmup moves the rate
            opt.step()
    for a, b in zip(flat(new), flat(old)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(new.state[a][k], old.state[b][k], rtol=1e-6, atol=1e-6)
    counts = [[g["step"] for g in opt.param_groups] for opt in (new, old)]
    assert counts == [[20, 20]] * 2
    start = flat(cls(parameter_sets()[0], lr=1e-2))
    assert not torch.allclose(start[1], flat(new)[1], rtol=1e-3)  # it moved
    assert not torch.equal(start[-1], flat(new)[-1])  # the zero vector too


def top_level_ops(fn) -> int:
    """Aten ops called by fn whose profiler parents hold no other aten op (aten::linear counts
    once, not again with its addmm)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("counted"):
            fn()
    count = 0
    for e in prof.events():
        parents, p = [], e.cpu_parent
        while p is not None:
            parents.append(p.name)
            p = p.cpu_parent
        top = not any(name.startswith("aten::") for name in parents)
        count += e.name.startswith("aten::") and top and "counted" in parents
    return count


def trained_once(module, model_cls, **arch):
    """A model of the file at its default width, its optimizer after three steps (its state
    exists), and gradients."""
    args = module.Args()
    full = {k: getattr(args, k) for k in module.ARCH} | {"state_dim": 11, "act_dim": 3} | arch
    model = model_cls(**full)
    opt, _ = module.make_optimizer(model, args)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    return opt


# fmt: skip
@pytest.mark.parametrize(
    "module, model_cls, limit",
    [
        (mo_dt, mo_dt.MultiObjectiveDecisionTransformer, 40),
        (trdt, trdt.TrustRegionDecisionTransformer, 40),
        (dt, dt.DecisionTransformer, 40),
    ],
)
def test_an_optimizer_step_is_a_few_multi_tensor_ops_whatever_the_depth(module, model_cls, limit):
    """The per-tensor loops took 458 (dt's AdamW) and 1216 (mo_dt's LAMB) top-level aten ops per
    step at the default config; a GPU launches about a kernel per op: the count must not grow."""
    opts = [trained_once(module, model_cls, n_layer=n) for n in (1, 4)]
    counts = [top_level_ops(opt.step) for opt in opts]
    assert counts[0] == counts[1] <= limit, counts


class ReadsBack(TorchDispatchMode):
    """Every op that hands a tensor's value to Python (a host-device sync on a GPU)."""

    SYNCS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "allclose"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("module, model_cls", [(mo_dt, mo_dt.MultiObjectiveDecisionTransformer),
                                               (trdt, trdt.TrustRegionDecisionTransformer),
                                               (dt, dt.DecisionTransformer)])  # fmt: skip
def test_an_optimizer_step_reads_no_tensor_value_on_the_host(module, model_cls):
    opt = trained_once(module, model_cls, n_layer=1)
    with ReadsBack() as mode:
        opt.step()
    assert mode.seen == []
    with ReadsBack() as mode:  # the check can fail: a Python branch on a tensor is seen
        bool(opt.param_groups[0]["params"][0].norm() > 0)
    assert mode.seen


def test_dt_uses_the_fused_adamw():
    opt = trained_once(dt, dt.DecisionTransformer, n_layer=1)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
