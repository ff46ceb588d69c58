"""Count the collectives a rank actually hands to ``torch.distributed``.

``CommCounter`` is the measuring side of the cost model (``lightning_phantom.cost.model``):
it records what was issued, the cost model predicts it, and the tests hold the two equal
to the byte. Two paths reach the network and both are watched:

* the c10d Python API (``dist.all_gather_into_tensor`` & co.), used by the phantom
  operator (``lightning_phantom.ops.comm``), which looks the functions up as
  ``dist.<name>`` at call time. Patching the ``torch.distributed`` attributes for the
  duration of the ``with`` block catches them, ``async_op=True`` included. A reference
  taken before the block (``from torch.distributed import all_reduce``) is not seen.
* the functional collectives (``torch.ops._c10d_functional.*``) that DTensor, and so
  Lightning's ``ModelParallelStrategy`` tensor parallelism, issues. They never pass
  through the Python API, so a ``TorchDispatchMode`` watches them. The mode defers every
  DTensor op (returns ``NotImplemented``) so that DTensor desugars it into local ops
  and collectives *with the mode still active*; otherwise a redistribution done inside
  DTensor's own dispatch would be invisible. Collectives issued during backward are
  seen too: autograd runs backward under the caller's dispatch modes (checked on CPU,
  where backward runs on the caller's thread; device threads inherit the same state).

Sent bytes follow the ring-algorithm convention the cost model uses (per rank, p =
group size, "bytes" = the local payload given to the call):

==================  ==============================  ========================================
op                  payload (``numel``)             sent bytes
==================  ==============================  ========================================
all_gather          this rank's input               (p-1) * bytes
reduce_scatter      the full input (p shards)       (p-1)/p * bytes
all_reduce          the tensor                      2(p-1)/p * bytes
broadcast           the tensor                      (p-1)/p * bytes (ring mean; see below)
all_to_all          this rank's input               bytes minus the chunk kept locally
==================  ==============================  ========================================

A broadcast has no symmetric ring cost: a pipelined chain moves p-1 copies of the
message in all, and we charge each rank the mean. Neither the phantom operator nor
DTensor tensor parallelism broadcasts during a step, so this never enters a comparison.

A group of size 1 is *recorded* (the call was made, and a missing bypass is worth seeing
in ``calls``) with 0 sent bytes, which the formulas above give by themselves.

Sums are ``fractions.Fraction`` so that totals compare exactly with the cost model.
Only this rank's view is recorded; summing over ranks is the caller's business.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

try:  # private: only LocalFlopCounterMode needs it, so its absence must not break CommCounter
    from torch.utils.flop_counter import _FlopCounterMode
except ImportError:  # pragma: no cover - torch internals moved
    _FlopCounterMode = TorchDispatchMode

# torch.distributed function -> collective kind (the key of ``calls``). torch 2.13 renamed
# the tensor forms ``all_gather_single`` / ``reduce_scatter_single`` (the old names call the
# new ones); both are patched where they exist, and the depth guard counts such a call once.
C10D_COLLECTIVES = {
    "all_gather_single": "all_gather",
    "reduce_scatter_single": "reduce_scatter",
    "all_gather_into_tensor": "all_gather",
    "all_gather": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_reduce": "all_reduce",
    "broadcast": "broadcast",
    "all_to_all_single": "all_to_all",
}

# torch.ops._c10d_functional op -> collective kind. In-place, ``_out`` and ``_coalesced``
# variants carry the same payload arguments as the plain op.
FUNCTIONAL_COLLECTIVES = {
    "all_reduce": "all_reduce",
    "all_reduce_": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "all_reduce_coalesced_": "all_reduce",
    "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_out": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "all_to_all_single": "all_to_all",
    "broadcast": "broadcast",
    "broadcast_": "broadcast",
}

# Which argument of each c10d function holds the payload (see the table above).
_C10D_PAYLOAD_ARG = {
    "all_gather_single": "input_tensor",
    "reduce_scatter_single": "input",
    "all_gather_into_tensor": "input_tensor",
    "all_gather": "tensor",
    "reduce_scatter_tensor": "input",
    "all_reduce": "tensor",
    "broadcast": "tensor",
    "all_to_all_single": "input",
}

_local = threading.local()  # .depth: >0 while inside a patched c10d call on this thread
_patch_lock = threading.Lock()
_active: list["CommCounter"] = []  # counters whose c10d path is live, outermost first
_originals: dict[str, Callable] = {}
_signature = functools.lru_cache(maxsize=None)(inspect.signature)  # once per patched function


def ring_sent_bytes(op: str, group_size: int, payload_bytes: int, kept_bytes: int = 0) -> Fraction:
    """Bytes one rank sends for one collective under the ring convention of the module table.

    ``kept_bytes`` only matters for all_to_all: the part of the input a rank keeps for itself.
    """
    p = group_size
    if p < 1:
        raise ValueError(f"group_size must be >= 1, got {p}")
    if op == "all_gather":
        return Fraction((p - 1) * payload_bytes)
    if op in ("reduce_scatter", "broadcast"):
        return Fraction((p - 1) * payload_bytes, p)
    if op == "all_reduce":
        return Fraction(2 * (p - 1) * payload_bytes, p)
    if op == "all_to_all":
        return Fraction(payload_bytes - kept_bytes) if p > 1 else Fraction(0)
    raise ValueError(f"unknown collective {op!r}; expected one of {sorted(set(C10D_COLLECTIVES.values()))}")


def current_phase() -> str:
    """'backward' while autograd's engine runs a node on this thread, else 'forward'.

    Anything outside backward (optimizer step, metric sync) also reads 'forward'.
    """
    return "backward" if torch._C._current_autograd_node() is not None else "forward"


@dataclass(frozen=True)
class CommRecord:
    """One collective as this rank issued it (one record per tensor of a coalesced call)."""

    op: str  # collective kind: all_gather, reduce_scatter, all_reduce, broadcast, all_to_all
    api: str  # what was called, e.g. "dist.all_gather_into_tensor", "_c10d_functional.all_reduce"
    group_size: int
    numel: int  # payload elements, as defined in the module table
    element_size: int  # bytes per element
    sent_bytes: Fraction
    phase: str  # "forward" or "backward" (see ``current_phase``)
    ranks: tuple[int, ...] = ()  # global ranks of the process group: tells axes of equal size apart

    @property
    def payload_bytes(self) -> int:
        return self.numel * self.element_size


@dataclass(frozen=True)
class CommSummary:
    """Totals over a set of records."""

    records: tuple[CommRecord, ...]

    @property
    def sent_bytes(self) -> Fraction:
        return sum((r.sent_bytes for r in self.records), Fraction(0))

    @property
    def payload_bytes(self) -> int:
        return sum(r.payload_bytes for r in self.records)

    @property
    def calls(self) -> Counter:
        return Counter(r.op for r in self.records)


def _group_ranks(group) -> tuple[int, ...]:
    try:
        return tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
    except (RuntimeError, ValueError):  # a group this rank does not know by handle
        return ()


def _record(op: str, api: str, tensor: torch.Tensor, group, group_size: int, kept_numel: int = 0) -> CommRecord:
    n, e = tensor.numel(), tensor.element_size()
    sent = ring_sent_bytes(op, group_size, n * e, kept_numel * e)
    return CommRecord(op, api, group_size, n, e, sent, current_phase(), _group_ranks(group))


def _kept_numel(tensor: torch.Tensor, input_splits: Optional[Iterable[int]], rank: int, size: int) -> int:
    """Elements of an all_to_all input that stay on this rank (its own chunk along dim 0)."""
    if tensor.dim() == 0 or tensor.shape[0] == 0:
        return 0
    per_row = tensor.numel() // tensor.shape[0]
    splits = list(input_splits) if input_splits else []
    rows = int(splits[rank]) if splits else tensor.shape[0] // size
    return rows * per_row


def _c10d_record(name: str, fn: Callable, args: tuple, kwargs: dict) -> list[CommRecord]:
    bound = _signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    group = a.get("group")
    size = dist.get_world_size(group)
    tensor = a[_C10D_PAYLOAD_ARG[name]]
    op = C10D_COLLECTIVES[name]
    kept = 0
    if op == "all_to_all":
        kept = _kept_numel(tensor, a.get("input_split_sizes"), dist.get_rank(group), size)
    return [_record(op, f"dist.{name}", tensor, group, size, kept)]


def _counting(name: str, original: Callable) -> Callable:
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if getattr(_local, "depth", 0) == 0 and _active:
            records = _c10d_record(name, original, args, kwargs)
            for counter in _active:
                counter._records.extend(records)
        # Depth keeps a collective from being counted twice should torch route this call
        # through another patched function or a functional op.
        _local.depth = getattr(_local, "depth", 0) + 1
        try:
            return original(*args, **kwargs)
        finally:
            _local.depth -= 1

    return wrapper


def _resolve_group(group_name: Any):
    if isinstance(group_name, dist.ProcessGroup):
        return group_name
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _functional_records(name: str, func, args: tuple, kwargs: dict) -> list[CommRecord]:
    schema = func._schema
    values = {arg.name: v for arg, v in zip(schema.arguments, args)}
    values.update(kwargs)
    group = _resolve_group(values["group_name"])
    size = group.size()
    op = FUNCTIONAL_COLLECTIVES[name]
    tensors = values["inputs"] if "inputs" in values else [values["input"]]
    api = f"_c10d_functional.{name}"
    records = []
    for t in tensors:
        kept = 0
        if op == "all_to_all":
            kept = _kept_numel(t, values.get("input_split_sizes"), group.rank(), size)
        records.append(_record(op, api, t, group, size, kept))
    return records


def _is_dtensor_type(t: type) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return issubclass(t, DTensor)


def _is_fake(args: tuple) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(a, FakeTensor) for a in args)


class _FunctionalCollectiveMode(TorchDispatchMode):
    """Records ``_c10d_functional`` collectives into one counter."""

    def __init__(self, counter: "CommCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):  # no collective of its own
            return func(*args, **kwargs)
        # Let DTensor run first, with this mode still on the stack, so that the local ops
        # and collectives it desugars into come back here (see the module docstring).
        if any(_is_dtensor_type(t) for t in types):
            return NotImplemented
        packet = func._overloadpacket
        if (
            getattr(packet, "_qualified_op_name", "").startswith("_c10d_functional::")
            and getattr(_local, "depth", 0) == 0
            and not _is_fake(args)  # shape propagation, not communication
        ):
            name = packet._qualified_op_name.split("::", 1)[1]
            if name in FUNCTIONAL_COLLECTIVES:
                self.counter._records.extend(_functional_records(name, func, args, kwargs))
        return func(*args, **kwargs)


class CommCounter:
    """Record every collective this rank issues inside ``with CommCounter() as comm:``.

    ``comm.records`` lists them; ``comm.sent_bytes`` (Fraction), ``comm.calls`` (Counter
    by collective kind) and ``comm.payload_bytes`` total them; ``comm.summary(phase=...)``
    restricts the totals to "forward" or "backward".

    The c10d path patches module attributes, so it is process-wide while any counter is
    open (a collective issued by another thread meanwhile is counted too); the functional
    path is a dispatch mode and follows this thread and its autograd backward. Counters
    nest: each open counter records everything issued inside it. Not re-entrant: a
    counter can be entered once at a time.
    """

    def __init__(self) -> None:
        self._records: list[CommRecord] = []
        self._mode: Optional[_FunctionalCollectiveMode] = None

    def __enter__(self) -> "CommCounter":
        if self._mode is not None:
            raise RuntimeError("this CommCounter is already open; create a new one to nest counters")
        self._records.clear()
        with _patch_lock:
            if not _active:
                for name in C10D_COLLECTIVES:
                    if not hasattr(dist, name):  # e.g. the *_single names before torch 2.13
                        continue
                    _originals[name] = getattr(dist, name)
                    setattr(dist, name, _counting(name, _originals[name]))
            _active.append(self)
        self._mode = _FunctionalCollectiveMode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._mode.__exit__(*exc)
        finally:
            self._mode = None
            with _patch_lock:
                _active.remove(self)
                if not _active:
                    for name, original in _originals.items():
                        setattr(dist, name, original)
                    _originals.clear()

    @property
    def records(self) -> list[CommRecord]:
        return list(self._records)

    def summary(self, phase: Optional[str] = None, group=None) -> CommSummary:
        """Totals of the records in ``phase`` (None: both) issued on ``group`` (None: any group)."""
        if phase not in (None, "forward", "backward"):
            raise ValueError(f"phase must be None, 'forward' or 'backward', got {phase!r}")
        ranks = None if group is None else _group_ranks(group)
        return CommSummary(tuple(r for r in self._records if (phase is None or r.phase == phase)
                                 and (ranks is None or r.ranks == ranks)))

    @property
    def sent_bytes(self) -> Fraction:
        return self.summary().sent_bytes

    @property
    def payload_bytes(self) -> int:
        return self.summary().payload_bytes

    @property
    def calls(self) -> Counter:
        return self.summary().calls

    def __repr__(self) -> str:
        return f"CommCounter(calls={dict(self.calls)}, sent_bytes={self.sent_bytes})"


class _LocalFlopMode(_FlopCounterMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(_is_dtensor_type(t) for t in types):
            return NotImplemented
        if _is_fake(args):  # DTensor's shape propagation computes nothing
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


class LocalFlopCounterMode(FlopCounterMode):
    """A ``FlopCounterMode`` that counts the matmul FLOPs this rank itself executes.

    It differs from ``FlopCounterMode`` in three ways, each a case where the plain
    counter's total is not what the rank computes:

    * DTensor: the plain counter sees DTensor ops before DTensor shards them and counts
      the *logical* (global) matmul, p times the rank's share for evenly sharded tensor
      parallelism. This one defers DTensor ops, as ``CommCounter`` does, and counts the
      local mm/addmm DTensor desugars into, skipping the fake-tensor ops of DTensor's
      shape propagation.
    * In-place matmuls: ``addmm_`` and ``baddbmm_`` have no formula in torch's registry
      (torch 2.13) and count 0; the phantom operator accumulates decompressed ghosts with
      ``addmm_``, so they get the formulas of ``addmm`` and ``baddbmm`` here.
    * Attention on CPU: ``F.scaled_dot_product_attention`` runs
      ``_scaled_dot_product_flash_attention_for_cpu`` (and its backward), which torch's registry
      does not know (torch 2.13): they get the formulas of the CUDA flash kernel, the same
      products (forward QKᵀ and PV; backward the scores recomputed and four products).
    * Otherwise, on plain tensors, it counts exactly what ``FlopCounterMode`` does.
    """

    def __init__(self, mods=None, depth: int = 2, display: bool = False, custom_mapping=None) -> None:
        if _FlopCounterMode is TorchDispatchMode:  # pragma: no cover
            raise RuntimeError(
                "LocalFlopCounterMode needs torch.utils.flop_counter._FlopCounterMode, missing in torch "
                f"{torch.__version__}; use FlopCounterMode and divide DTensor counts by the TP size."
            )
        aten = torch.ops.aten
        # The registry holds shape-wrapped formulas; custom_mapping wraps again, so pass the raw one.
        same = ((aten.addmm_, aten.addmm), (aten.baddbmm_, aten.baddbmm),
                (aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention),
                (aten._scaled_dot_product_flash_attention_for_cpu_backward,
                 aten._scaled_dot_product_flash_attention_backward))
        mapping = {op: flop_registry[base].__wrapped__ for op, base in same}
        mapping.update(custom_mapping or {})
        super().__init__(mods=mods, depth=depth, display=display, custom_mapping=mapping)

    def __enter__(self):
        # FlopCounterMode.__enter__ with the deferring mode in place of its own (torch 2.4-2.13).
        self.flop_counts.clear()
        self.mod_tracker.__enter__()
        self.mode = _LocalFlopMode(self)
        self.mode.__enter__()
        return self
