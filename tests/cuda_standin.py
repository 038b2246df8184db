"""A CPU stand-in for one CUDA device (issue 28 item 7): `--device cuda` runs on a machine without
a GPU, and every place where a real GPU would refuse the code or wait for it is written down.

Tensors "sent to cuda" are CPU tensors whose storage is tracked (a weak set: views, autograd's
shallow copies and `param.data = ...` share the storage, so they stay tracked). `.device` says
cuda:0 for them, so code that follows `x.device` builds its tensors where a GPU run would. A
TorchDispatchMode sees every aten op (forward and backward) and

- records a *violation* where a real GPU would raise: an op mixing tracked and untracked CPU
  tensors (a 0-dim CPU tensor is a scalar, which CUDA accepts; a CPU index tensor into a device
  tensor is a copy, not an error), a random op whose generator is on the other device, `.numpy()`
  of a device tensor;
- records a *sync* where the host waits for the device: item/bool/int/float (_local_scalar_dense),
  `.tolist()`, data-dependent shapes (nonzero, masked_select, boolean-mask indexing, unique,
  repeat_interleave without output_size), device -> host copies, host -> device copies from
  pageable memory (cudaMemcpy waits for the stream; pinned memory with non_blocking does not),
  and `torch.cuda.synchronize()`.

Each event carries the file:line of the innermost frame in one of `sources` (the method files),
the phases it happened in (`watch` wraps a method file's sample_batch, update, evaluate, act/plan
and save_atomic; optimizer steps are seen through torch's global step hooks) and the number of
updates done so far. What it cannot see: kernels' own timing, torch.save's device -> host copies
(serialization reads storages directly), and compiled code (--compile).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import types
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch.optim.optimizer import register_optimizer_step_post_hook as post_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook as pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
VIOLATIONS = ("device mismatch", "generator mismatch", "numpy of a device tensor")
SYNCS = ("item", "tolist", "data-dependent shape", "d2h copy", "h2d copy", "synchronize")
# The phases `watch` opens, by the method files' step names (tests/test_layout.py keeps them).
PHASE_OF = {"sample_batch": "sample", "sample_transitions": "sample", "update": "update"}
PHASE_OF |= {"update_inverse": "update", "evaluate": "evaluate", "act": "act", "plan": "act"}
PHASE_OF |= {"save_atomic": "save"}
OPTIMIZER = "optimizer.step"
aten = torch.ops.aten
# ops whose output size depends on the data: the host reads it back before it can go on
SHAPE_SYNC = {aten.nonzero, aten.masked_select, aten.unique_consecutive, aten.unique_dim}
SHAPE_SYNC |= {aten._unique, aten._unique2, aten.unique_dim_consecutive, aten.bincount}
SHAPE_SYNC |= {aten.argwhere, aten.equal}
INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
RANDOM_FUNCTIONS = "rand randn randint randperm multinomial normal bernoulli poisson".split()
RANDOM_METHODS = "random_ uniform_ normal_ bernoulli_ exponential_ geometric_ log_normal_ cauchy_"
RANDOM_METHODS = RANDOM_METHODS.split() + ["multinomial"]


@dataclass(frozen=True)
class Event:
    """One violation or sync: its kind (VIOLATIONS, SYNCS), what did it, where (file:line
    function), inside which phases, after how many updates."""

    kind: str
    what: str
    site: str
    phases: tuple
    window: int

    def __str__(self) -> str:
        inside = "/".join(self.phases) or "-"
        return f"{self.kind}: {self.what} at {self.site} [{inside}, after update {self.window}]"


def _is_cuda_device(device) -> bool:
    if device is None or isinstance(device, int):
        return False  # an int is an index: cuda:N as torch reads it, never used here
    return torch.device(device).type == "cuda"


class CudaStandIn:
    """`with CudaStandIn() as gpu:` -- `--device cuda` accepted, its tensors tracked, its
    violations and syncs in `gpu.events`. `sources`: the files whose lines events are attributed
    to (default: the repository's top-level .py files and the caller's test file)."""

    def __init__(self, sources=None, bf16: bool = True):
        default = [*ROOT.glob("*.py"), *(ROOT / "tests").glob("test_*.py")]
        self.sources = {str(Path(p).resolve()) for p in (sources or default)}
        self.bf16 = bf16  # what torch.cuda.is_bf16_supported answers (an H100/H200: True)
        self.events: list[Event] = []
        self.phases: list[str] = []
        self.updates = 0  # update calls finished: an event's window
        self.phase_windows = defaultdict(set)  # phase -> the windows in which it started
        self.calls = Counter()  # phase -> how many times it started
        # tracked storages (UntypedStorage hashes and compares by identity; storages are kept
        # alive, and so are their Python objects, as long as a tensor uses them)
        self._cuda = weakref.WeakKeyDictionary()
        self._pinned = weakref.WeakKeyDictionary()
        self._undo: list = []
        self._stack = contextlib.ExitStack()

    # --- tracking ----------------------------------------------------------------------------
    def is_cuda(self, t) -> bool:
        """Whether a tensor lives on the stand-in device (its storage is tracked)."""
        try:
            return t.untyped_storage() in self._cuda
        except (RuntimeError, NotImplementedError):  # no storage (sparse, nested)
            return False

    def track(self, tree, on: bool = True) -> None:
        """Every tensor in a nested structure onto the device (`on`) or back to the host."""
        if isinstance(tree, torch.Tensor):
            leaves = [tree]
        elif isinstance(tree, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in tree):
            leaves = tree
        else:
            leaves = [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]
        for t in leaves:
            storage = t.untyped_storage()
            if on:
                self._cuda[storage] = True
            else:
                self._cuda.pop(storage, None)

    def is_pinned(self, t) -> bool:
        return t.untyped_storage() in self._pinned

    # --- events ------------------------------------------------------------------------------
    def _site(self) -> str:
        frame = sys._getframe(2)
        while frame is not None:
            code = frame.f_code
            if code.co_filename in self.sources:
                name = os.path.basename(code.co_filename)
                return f"{name}:{frame.f_lineno} {code.co_name}"
            frame = frame.f_back
        return "outside the sources"

    def record(self, kind: str, what: str) -> None:
        assert kind in VIOLATIONS + SYNCS, kind
        self.events.append(Event(kind, what, self._site(), tuple(self.phases), self.updates))

    def violations(self) -> list[Event]:
        return [e for e in self.events if e.kind in VIOLATIONS]

    def syncs(self, inside=None, outside=()) -> list[Event]:
        """Syncs in phase `inside` (None: anywhere), in none of the phases `outside`."""
        return [
            e
            for e in self.events
            if e.kind in SYNCS
            and (inside is None or inside in e.phases)
            and not set(outside) & set(e.phases)
        ]

    @staticmethod
    def table(events) -> str:
        """Events counted by kind and site, most frequent first: an assertion's message."""
        counts = Counter(f"{e.kind}: {e.what} at {e.site}" for e in events)
        return "\n".join(f"{n:5d} x {line}" for line, n in counts.most_common())

    def reset(self) -> None:
        self.events.clear()
        self.phase_windows.clear()
        self.calls.clear()
        self.updates = 0

    # --- phases ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str):
        self.phases.append(name)
        try:
            yield
        finally:
            self.phases.pop()

    def watch(self, module) -> None:
        """Phases around a method file's steps (PHASE_OF) for as long as the stand-in is on."""
        for name, phase in PHASE_OF.items():
            fn = getattr(module, name, None)
            if callable(fn):
                self._set(module, name, self._in_phase(fn, phase))

    def _in_phase(self, fn, phase: str):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self.phase_windows[phase].add(self.updates)
            self.calls[phase] += 1
            with self.phase(phase):
                out = fn(*args, **kwargs)
            self.updates += phase == "update"
            return out

        return wrapper

    # --- on and off --------------------------------------------------------------------------
    def _set(self, owner, name: str, value) -> None:
        """Replace owner.name until __exit__ (attributes that were inherited are deleted again)."""
        own = isinstance(owner, type)  # a class: only its own attribute, not an inherited one
        old = owner.__dict__.get(name, _MISSING) if own else getattr(owner, name, _MISSING)
        self._undo.append((owner, name, old))
        setattr(owner, name, value)

    def __enter__(self) -> CudaStandIn:
        self._patch_cuda_module()
        self._patch_classes()
        self._patch_load()
        self._patch_tensor()
        self._patch_factories()
        self._patch_random()
        self._stack.callback(pre_hook(self._opt_pre).remove)
        self._stack.callback(post_hook(self._opt_post).remove)
        self._stack.enter_context(_Dispatch(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        for owner, name, old in reversed(self._undo):
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)
        self._undo.clear()

    def _opt_pre(self, opt, args, kwargs):
        self.phases.append(OPTIMIZER)

    def _opt_post(self, opt, args, kwargs):
        if self.phases and self.phases[-1] == OPTIMIZER:
            self.phases.pop()

    # --- patches -----------------------------------------------------------------------------
    def _patch_cuda_module(self) -> None:
        """torch.cuda answers as for one device; synchronize is a sync."""
        cuda, rng = torch.cuda, torch.zeros(16, dtype=torch.uint8)
        # an H200's (the device a GPU check would run on), for code that sizes itself by them
        properties = types.SimpleNamespace(name="CPU stand-in for CUDA", major=9, minor=0)
        properties.total_memory, properties.multi_processor_count = 141 * 2**30, 132
        answers = {
            "is_available": lambda: True,
            "device_count": lambda: 1,
            "current_device": lambda: 0,
            "_lazy_init": lambda: None,
            "is_bf16_supported": lambda including_emulation=True: self.bf16,
            "get_device_name": lambda device=None: "CPU stand-in for CUDA",
            "get_device_capability": lambda device=None: (9, 0),
            "get_device_properties": lambda device=None: properties,
            "mem_get_info": lambda device=None: (properties.total_memory, properties.total_memory),
            "manual_seed": lambda seed: None,
            "manual_seed_all": lambda seed: None,
            "seed_all": lambda: None,
            "get_rng_state": lambda device="cuda": rng.clone(),
            "get_rng_state_all": lambda: [rng.clone()],
            "set_rng_state": lambda state, device="cuda": None,
            "set_rng_state_all": lambda states: None,
            "synchronize": lambda device=None: self.record("synchronize", "torch.cuda.synchronize"),
            "empty_cache": lambda: None,
            "memory_allocated": lambda device=None: 0,
            "max_memory_allocated": lambda device=None: 0,
            "reset_peak_memory_stats": lambda device=None: None,
        }
        for name, fn in answers.items():
            self._set(cuda, name, fn)
        original = torch._C._group_tensors_by_device_and_dtype
        self._set(torch._C, "_group_tensors_by_device_and_dtype", self._regroup(original))

    def _patch_classes(self) -> None:
        """torch.autocast("cuda") computes with the CPU's; torch.Generator(device="cuda") makes a
        CPU generator that says cuda:0; random states are set from the host only, as with CUDA."""
        standin = self

        class Autocast(torch.amp.autocast_mode.autocast):
            """CUDA's bf16 autocast, computed by the CPU's."""

            def __init__(self, device_type, *args, **kwargs):
                super().__init__("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

        class Generator(torch._C.Generator):
            """A CPU generator that says it is on cuda:0 when made for cuda."""

            def __new__(cls, device="cpu"):
                gen = super().__new__(cls)
                gen.on_cuda = _is_cuda_device(device)
                return gen

            @property
            def device(self):
                return CUDA if self.on_cuda else CPU

            def set_state(self, state):
                if standin.is_cuda(state):  # CUDA takes a generator's state from the host only
                    standin.record("device mismatch", "Generator.set_state(a device tensor)")
                return super().set_state(state)

        set_rng_state = torch.set_rng_state

        def host_rng_state(state):
            if standin.is_cuda(state):
                standin.record("device mismatch", "torch.set_rng_state(a device tensor)")
            return set_rng_state(state)

        self._set(torch, "autocast", Autocast)
        self._set(torch, "Generator", Generator)
        self._set(torch, "set_rng_state", host_rng_state)

    def _patch_load(self) -> None:
        """torch.load(map_location=cuda): loaded on the host, then onto the device."""
        standin, load = self, torch.load

        def standin_load(f, map_location=None, **kwargs):
            if isinstance(map_location, (str, torch.device)) and _is_cuda_device(map_location):
                out = load(f, map_location="cpu", **kwargs)
                standin.track(out)
                standin.record("h2d copy", "torch.load onto cuda")
                return out
            return load(f, map_location=map_location, **kwargs)

        self._set(torch, "load", standin_load)

    def _regroup(self, original):
        """torch groups tensors by their real device (CPU for all): split the groups by the
        stand-in's device, so that clipping and optimizers move nothing between them."""

        def regroup(tensorlistlist, with_indices=False):
            out = {}
            for (device, dtype), (lists, idx) in original(tensorlistlist, with_indices).items():
                on = [t is not None and self.is_cuda(t) for t in lists[0]]
                for flag in sorted(set(on)):
                    keep = [i for i, f in enumerate(on) if f == flag]
                    sub = [[ts[i] for i in keep] if ts else ts for ts in lists]
                    out[(CUDA if flag else device, dtype)] = (
                        sub,
                        [idx[i] for i in keep] if idx else idx,
                    )
            return out

        return regroup

    def _patch_tensor(self) -> None:
        """.device, .is_cuda, get_device, to/cuda/cpu, numpy, tolist, pin_memory of tensors."""
        base, s = torch._C.TensorBase, self
        real_device = base.__dict__["device"].__get__

        def device(t):
            d = real_device(t)
            return CUDA if d.type == "cpu" and s.is_cuda(t) else d

        def numpy(t, *args, **kwargs):
            if s.is_cuda(t):
                s.record("numpy of a device tensor", f"numpy() of {tuple(t.shape)}")
            return base.numpy(t, *args, **kwargs)

        def tolist(t):
            if s.is_cuda(t):
                s.record("tolist", f"tolist() of {tuple(t.shape)}")
            return base.tolist(t)

        def pin_memory(t, device=None):
            out = base.clone(t)
            s._pinned[out.untyped_storage()] = True
            return out

        self._set(torch.Tensor, "device", property(device))
        self._set(torch.Tensor, "is_cuda", property(lambda t: s.is_cuda(t)))
        self._set(torch.Tensor, "get_device", lambda t: 0 if s.is_cuda(t) else -1)
        self._set(torch.Tensor, "to", lambda t, *args, **kwargs: s._to(t, *args, **kwargs))
        self._set(
            torch.Tensor,
            "cuda",
            lambda t, device=None, non_blocking=False: s._to(t, CUDA, non_blocking=non_blocking),
        )
        self._set(torch.Tensor, "cpu", lambda t, memory_format=torch.preserve_format: s._to(t, CPU))
        self._set(torch.Tensor, "numpy", numpy)
        self._set(torch.Tensor, "tolist", tolist)
        self._set(torch.Tensor, "pin_memory", pin_memory)
        self._set(torch.Tensor, "is_pinned", lambda t, device=None: s.is_pinned(t))

    def _to(self, t, *args, **kwargs):
        """Tensor.to: onto the device a tracked copy (a sync unless pinned and non_blocking), off
        it an untracked copy (a sync); within a device what torch does."""
        other = next((a for a in args if isinstance(a, torch.Tensor)), None)
        copy = kwargs.pop("copy", False)
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if other is not None:
            device = other.device
        base = torch._C.TensorBase.to
        if device is None:
            return base(t, *args, copy=copy, **kwargs)
        fmt = memory_format if memory_format is not None else torch.preserve_format
        how = dict(dtype=dtype, non_blocking=non_blocking, copy=copy, memory_format=fmt)
        out = base(t, CPU, **how)
        was, wants = self.is_cuda(t), _is_cuda_device(device)
        if was == wants:
            if was:
                self.track(out)
            return out
        if out.untyped_storage() is t.untyped_storage():
            out = torch._C.TensorBase.clone(out)
        self.track(out, on=wants)
        if wants and not (non_blocking and self.is_pinned(t)):
            self.record("h2d copy", f"to(cuda) of {tuple(t.shape)}")
        elif not wants:
            self.record("d2h copy", f"to(cpu) of {tuple(t.shape)}")
        return out

    def _patch_factories(self) -> None:
        """torch.tensor and torch.as_tensor with device=cuda: built on the host, then copied."""
        for name in ("tensor", "as_tensor"):
            self._set(torch, name, self._factory(getattr(torch, name), name))

    def _factory(self, make, name: str):
        def factory(data, dtype=None, device=None, **kwargs):
            if device is None:
                return make(data, dtype=dtype, **kwargs)
            if isinstance(data, torch.Tensor) and self.is_cuda(data) != _is_cuda_device(device):
                return self._to(data, device, dtype=dtype, copy=name == "tensor")
            out = make(data, dtype=dtype, device=CPU, **kwargs)
            if _is_cuda_device(device) and not self.is_cuda(out):
                shared = (
                    isinstance(data, torch.Tensor)
                    and data.untyped_storage() is out.untyped_storage()
                )
                out = torch._C.TensorBase.clone(out) if shared or name == "as_tensor" else out
                self.track(out)
                self.record("h2d copy", f"torch.{name}(..., device=cuda) of {tuple(out.shape)}")
            return out

        return factory

    def _patch_random(self) -> None:
        """Random ops: the generator on the op's device, as CUDA requires."""
        for name in RANDOM_FUNCTIONS:
            self._set(torch, name, self._checked(getattr(torch, name), f"torch.{name}"))
        for name in RANDOM_METHODS:
            method = getattr(torch._C.TensorBase, name)
            self._set(torch.Tensor, name, self._checked(method, f"Tensor.{name}"))

    def _checked(self, fn, name: str):
        def random_op(*args, **kwargs):
            gen = kwargs.get("generator")
            if gen is not None:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                on = _is_cuda_device(kwargs.get("device")) or any(self.is_cuda(t) for t in tensors)
                gen_on = getattr(gen, "on_cuda", False)
                if on != gen_on:
                    where = ("cuda", "cpu")
                    what = f"{name}: a {where[not gen_on]} generator for a {where[not on]} op"
                    self.record("generator mismatch", what)
            return fn(*args, **kwargs)

        return random_op


_MISSING = object()


def _shape(t) -> str:
    return f"{tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


class _Dispatch(TorchDispatchMode):
    """Every aten op: device kwargs onto the host (outputs tracked), mixing and syncs recorded."""

    def __init__(self, standin: CudaStandIn):
        super().__init__()
        self.s = standin

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        s, kwargs, packet = self.s, dict(kwargs or {}), func.overloadpacket
        device = kwargs.get("device")
        to_cuda = _is_cuda_device(device)
        if to_cuda:
            kwargs["device"] = CPU
        pinned = bool(kwargs.get("pin_memory"))
        if pinned:
            kwargs["pin_memory"] = False
        tensors = _tensors(args, kwargs)
        on = [s.is_cuda(t) for t in tensors]
        if any(on) or to_cuda:
            self.check(func, packet, args, kwargs, tensors, on)
        out = func(*args, **kwargs)
        if pinned:
            s._pinned[out.untyped_storage()] = True
        # a new tensor is on the device when made there or from device tensors; a written one
        # stays where it is (an explicit device="cpu" is how Tensor.to reaches here: see _to)
        if to_cuda or (any(on) and not _written(func, args, kwargs)):
            s.track(out)
        return out

    def check(self, func, packet, args, kwargs, tensors, on) -> None:
        s = self.s
        if packet is aten._local_scalar_dense:
            s.record("item", "item()/bool()/float()/int()")
        elif packet in SHAPE_SYNC or (
            packet is aten.repeat_interleave and kwargs.get("output_size") is None
        ):
            s.record("data-dependent shape", str(packet))
        if packet is aten.copy_:  # across devices a copy is legal: a transfer
            into, src = s.is_cuda(args[0]), args[1]
            if into and not s.is_cuda(src) and src.dim() > 0:
                if not (len(args) > 2 and args[2] and s.is_pinned(src)):
                    s.record("h2d copy", f"copy_ of {_shape(src)} into the device")
            elif not into and s.is_cuda(src):
                s.record("d2h copy", f"copy_ of {_shape(src)} to the host")
            return
        if packet in INDEX_OPS:  # host index tensors into a device tensor are copied over
            indices = [i for i in args[1] if isinstance(i, torch.Tensor)] if len(args) > 1 else []
            if any(i.dtype in (torch.bool, torch.uint8) for i in indices):
                s.record("data-dependent shape", f"{packet} with a boolean mask")
            if s.is_cuda(args[0]) and not all(s.is_cuda(i) for i in indices):
                s.record("h2d copy", f"{packet} with index tensors on the host")
            if not s.is_cuda(args[0]) and any(s.is_cuda(i) for i in indices):
                s.record("device mismatch", f"{func}(a host tensor indexed by device tensors)")
            tensors = [t for t in tensors if all(t is not i for i in indices)]
            on = [s.is_cuda(t) for t in tensors]
        host = [t for t, c in zip(tensors, on) if not c and t.dim() > 0]
        written = _written(func, args, kwargs)
        if (any(on) and host) or (any(on) and any(not s.is_cuda(t) for t in written)):
            shapes = ", ".join(f"{'cuda' if c else 'cpu'} {_shape(t)}" for t, c in zip(tensors, on))
            s.record("device mismatch", f"{func}({shapes})")


def _tensors(args, kwargs) -> list:
    """The tensor arguments of an aten op (Tensor, Tensor[] and Tensor?[] arguments; no deeper
    nesting exists in aten schemas)."""
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [t for t in a if isinstance(t, torch.Tensor)]
    return out


@functools.cache
def _write_slots(func) -> tuple:
    """The positions and names of the arguments an op writes into (in-place self, out=)."""
    schema = func._schema.arguments
    return tuple(
        (i, a.name) for i, a in enumerate(schema) if a.alias_info and a.alias_info.is_write
    )


def _written(func, args, kwargs) -> list:
    """The tensors an op writes into."""
    slots = _write_slots(func)
    if not slots:
        return []
    values = [args[i] if i < len(args) else kwargs.get(name) for i, name in slots]
    return _tensors(values, {})
