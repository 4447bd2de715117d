"""Decode plans: a sequence's decode step recorded once as the native calls it makes, and run again for each
new token by one call into csrc/plan.c, so that the Python and torch code around the kernels runs once a
sequence instead of once a token. The math stays in the model files: recording runs them.

    plan, logits = DecodePlan.record(network, cache, token, position)  # (None, None): not one, run it yourself
    logits = plan.run(token, position)

While a step is recorded, every native entry point the step calls goes through `call`, which appends it to
the plan with its arguments (the buffers' addresses among them), and a TorchFunctionMode sees the torch
functions in between: allocations and views cost nothing at run time, an addition of float32 tensors
becomes a native step, and anything else makes the step unplannable (a reference twin running where a kernel would,
gpt-oss's routing): the engine then keeps running it in Python. The plan keeps every tensor the step made
alive, so that its steps find them at the same addresses on every run; the token's id goes into the
embedding's input buffer, and the attention steps read its position (csrc/plan.c).
"""

import ctypes
import logging
import threading

import torch
from torch.overrides import TorchFunctionMode

from trillm.native.build import check, load

log = logging.getLogger("trillm")


class PlanUnsupported(Exception):
    """The step does something a plan cannot replay."""


class Recording(threading.local):
    recorder: "DecodePlan | None" = None


RECORDING = Recording()


def recorder() -> "DecodePlan | None":
    """The plan being recorded on this thread, if any."""
    return RECORDING.recorder


def call(function, *arguments):
    """function(*arguments) for a native entry point (a ctypes function, or a functools.partial of one);
    while a step is recorded, appended to the plan as well."""
    if RECORDING.recorder is not None:
        RECORDING.recorder.add_call(function, arguments)
    return function(*arguments)


# The torch functions a step may call between its native ones: what a run need not repeat (reading a
# tensor's metadata, allocating, viewing memory that is already there), and additions and the
# concatenation of single rows (StackedLinear's, for files that mix types in q/k/v), which become steps.
# (What the three families' decode steps call; a step calling anything else falls back to Python.)
METADATA = {"__get__", "data_ptr", "is_contiguous", "numel", "stride"}
ALLOCATIONS = {"empty", "empty_like"}
VIEWS = {"view", "reshape", "__getitem__", "to", "float", "contiguous", "flatten"}
ADDITIONS = {"add", "__add__", "add_", "__iadd__"}


class StepFunctions(TorchFunctionMode):
    """The torch functions of the step being recorded: see the module's docstring."""

    def __init__(self, plan: "DecodePlan"):
        super().__init__()
        self.plan = plan

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        out = func(*args, **kwargs)
        if name in METADATA or name in ALLOCATIONS:
            pass
        elif name in VIEWS:
            for view in out if isinstance(out, (list, tuple)) else [out]:
                if view.untyped_storage().data_ptr() != args[0].untyped_storage().data_ptr():
                    raise PlanUnsupported(f"{name} copied its input")
        elif name in ADDITIONS and not kwargs and self.addable(*args[:2], out):
            self.plan.add_step("trillm_add", [args[0].data_ptr(), args[1].data_ptr(), out.numel(), out.data_ptr()])
        elif name == "cat" and all(self.one_row(t) for t in (*args[0], out)):
            offset = 0
            for part in args[0]:
                self.plan.add_step("trillm_copy", [part.data_ptr(), part.numel(), out.data_ptr() + 4 * offset])
                offset += part.numel()
        else:
            raise PlanUnsupported(f"torch function {name}")
        self.plan.keep(out)
        return out

    @staticmethod
    def one_row(t) -> bool:
        return t.dtype == torch.float32 and t.is_contiguous() and t.numel() == t.shape[-1]

    @staticmethod
    def addable(a, b, out) -> bool:
        return all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.is_contiguous()
                   and t.numel() == out.numel() for t in (a, b, out))


class DecodePlan:
    """One sequence's decode step as native steps (csrc/plan.c), over its cache and this network."""

    def __init__(self, network, cache):
        self.lib = load()
        self.network, self.cache = network, cache
        self.ids = torch.zeros(1, 1, dtype=torch.int64)  # the embedding's input: the token of each run
        self.kept: list[torch.Tensor] = []
        self.handle = ctypes.c_void_p(self.lib.trillm_plan_new())
        if not self.handle:
            raise MemoryError("no memory for a decode plan")
        self.position = None  # while recording
        self.logits = None

    def __del__(self):
        if getattr(self, "handle", None):
            self.lib.trillm_plan_free(self.handle)

    @classmethod
    def record(cls, network, cache, token: int, position: int) -> tuple["DecodePlan | None", torch.Tensor | None]:
        """Run the decode step of `token` at `position`, recording it: (the plan, the step's logits (vocab,)),
        or (None, None) where the step cannot be a plan, for the caller to run as the model's forward (the
        cache slots a half-recorded step wrote are written anew then)."""
        if load() is None or getattr(cache, "rope", None) is None:
            return None, None
        plan = cls(network, cache)
        plan.ids.fill_(token)
        plan.position = position
        RECORDING.recorder = plan
        try:
            with StepFunctions(plan):
                plan.logits = network(plan.ids, cache, position, last_only=True)
        except PlanUnsupported as reason:
            log.debug("trillm: this sequence's decode steps run in Python, not as a plan: %s", reason)
            plan = None
        finally:
            RECORDING.recorder = None
        if plan is None:
            return None, None
        plan.position = None
        return plan, plan.logits[0, -1].clone()

    def run(self, token: int, position: int) -> torch.Tensor:
        """The decode step of `token` at `position`: its logits (vocab,), a copy (the next run overwrites
        the plan's own)."""
        if not 0 <= position < self.cache.max_length:  # as the model's own step says it (layers.cache_slot)
            raise ValueError(f"position {position} is past the cache's {self.cache.max_length} positions")
        self.ids.fill_(token)
        check(self.lib.trillm_plan_run(self.handle, position))
        return self.logits[0, -1].clone()

    # ---- recording ----------------------------------------------------------------------------------

    def keep(self, out):
        self.kept.extend(t for t in (out if isinstance(out, (list, tuple)) else [out]) if isinstance(t, torch.Tensor))

    def add_step(self, name: str, integers: list[int], floats: list[float] = ()):
        integers = (ctypes.c_int64 * len(integers))(*integers)
        floats = (ctypes.c_float * len(floats))(*floats)
        code = self.lib.trillm_plan_add(self.handle, name.encode(), integers, len(integers), floats, len(floats))
        if code == -1:
            raise PlanUnsupported(f"no plan step for {name}")
        check(code)

    def add_call(self, function, arguments):
        """A call of a native entry point: its integer arguments (pointers, sizes) and float ones apart."""
        bound = getattr(function, "args", ())  # a functools.partial's own
        function = getattr(function, "func", function)
        integers, floats = [], []
        for kind, value in zip(function.argtypes, (*bound, *arguments)):
            (floats if kind is ctypes.c_float else integers).append(0 if value is None else value)
        self.add_step(function.__name__, integers, floats)

    def add_attention(self, qkv, cos, keys, values, sinks, position: int, num_heads: int, kv_heads: int,
                      window: int | None, out):
        """ops.attend_one_token's call, as a step that takes each run's position (csrc/plan.c)."""
        cos_table, sin_table = self.cache.rope
        head_dim = qkv.shape[-1]
        if position != self.position or cos.data_ptr() != cos_table.data_ptr() + position * head_dim * 4:
            raise PlanUnsupported("attention without the cache's rotation tables at the step's position")
        self.add_step("attention_at_position",
                      [qkv.data_ptr(), cos_table.data_ptr(), sin_table.data_ptr(), keys.data_ptr(), values.data_ptr(),
                       0 if sinks is None else sinks.data_ptr(), qkv.shape[0], num_heads, kv_heads, head_dim,
                       keys.shape[2], window or 0, keys.stride(0), keys.stride(1), out.data_ptr(), cos_table.shape[0]],
                      [head_dim ** -0.5])
