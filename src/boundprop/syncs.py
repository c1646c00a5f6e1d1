"""Host reads of tensor values: when rules may branch on data, and how to count the reads.

On CPU, reading a value on the host (``bool(t.any())``, ``float(t.sum())``, ``nonzero``) costs what
any small operation costs, and several rules branch on one to skip work: ReLU's relaxation drops
its bias when no neuron is unstable, IBP skips its NaN guard when both ends sum to a finite
number. On an accelerator each such read is a *sync*: the host waits until the device has run
every kernel queued so far, and the device then idles until the host queues the next one. In a
walk of many small kernels that wait costs more than the work it saves. So every such branch asks
:func:`may_read` first (True on CPU, False elsewhere) and otherwise takes a branch-free path that
gives the same bounds.

What still reads on an accelerator, by design:

* the rows of an intermediate CROWN walk (its unstable neurons, a data-dependent shape): their
  mask is copied to the host once per walk start, and ``nonzero`` runs there;
* alpha-CROWN's stop test (improved? criterion met?), one read per iteration;
* checks that refuse what cannot be bounded (a curve such as ``exp`` with no finite linear bound on
  its interval, ``rules/curves.py: require_bounded``): inside :func:`deferred_checks` (every
  ``compute_bounds`` call) they are combined on the device and read once at the end of the call;
* checks that run once when something is first built (alpha-CROWN's window layout);
* branch and bound (``bab/``): its optimisations' stop tests every :data:`STOP_TEST_EVERY` steps
  (:func:`stop_test_due`), and per round the reads that choose what to do next (which boxes or
  domains are verified, which neurons to split, which rows to walk);
* certified training (``training/trainer.py``): its statistics, summed on the device, once per
  progress line and once per epoch.

:func:`count_syncs` counts reads on any device, CPU included (where they cost nothing, but are the
same reads an accelerator would wait on), by where they happen in boundprop's code, host copies
that bypass the dispatcher (``tolist``, ``numpy``) included;
:func:`device_paths` makes CPU tensors take the accelerator branches, so that tests and
``benchmarks/host_syncs.py`` check both without a GPU.
"""

from __future__ import annotations

import collections
import contextlib
import math
import sys
import threading
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_forced_device_paths = 0

#: aten ops that need a value on the host (CUDA syncs on each): scalar reads (``item``, ``bool``,
#: ``float``, ``int``), data-dependent output shapes, whole-tensor comparisons returning a bool
_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default, aten.equal.default,
          aten.masked_select.default, aten._unique2.default, aten.unique_consecutive.default,
          aten.unique_dim.default, aten.repeat_interleave.Tensor}


#: indexing ops: with a bool mask as an index they find its nonzero entries first (a read)
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def may_read(t: torch.Tensor) -> bool:
    """Whether code may read values of ``t`` on the host to choose a cheaper path (CPU tensors,
    unless :func:`device_paths` is active)."""
    return t.device.type == "cpu" and not _forced_device_paths


def possibly_any(mask: torch.Tensor) -> bool:
    """``bool(mask.any())`` where it may be read, else True: for branches that skip work when no
    entry holds, and give the same values when taken anyway."""
    return not may_read(mask) or bool(mask.any())


#: steps between the stop tests of an optimisation loop on an accelerator (see :func:`stop_test_due`)
STOP_TEST_EVERY = 4


def stop_test_due(step: int, t: torch.Tensor) -> bool:
    """Whether a loop should read its stop test at ``step``: every step where ``t`` may be read, every
    :data:`STOP_TEST_EVERY`-th elsewhere. For tests of a condition that, once met, stays met (a
    best-so-far bound above a threshold): reading it late only runs up to ``STOP_TEST_EVERY - 1``
    more steps, whose values are valid too."""
    return may_read(t) or step % STOP_TEST_EVERY == 0


def sums_finite(*tensors: torch.Tensor) -> bool:
    """Whether every tensor's sum is finite, so that no entry is NaN or infinite (one read each; a
    float32 sum that overflows reads as not finite: callers then take their general path)."""
    return all(math.isfinite(float(t.detach().sum())) for t in tensors)


@contextlib.contextmanager
def device_paths() -> Iterator[None]:
    """Inside: :func:`may_read` is False for every tensor, as on an accelerator."""
    global _forced_device_paths
    _forced_device_paths += 1
    try:
        yield
    finally:
        _forced_device_paths -= 1


def to_host(t: torch.Tensor) -> torch.Tensor:
    """``t.cpu()``, counted as one read by :func:`count_syncs`. While counting, the copy is a real
    one on CPU too, and reads of it are not counted (they never wait for a device).

    A ``meta`` tensor (shapes, no values) reads as all ones (True): the reads by design then take
    their widest branch (every neuron unstable, every check passed, optimisations stop at once),
    so that whole bound computations can run on ``meta`` to check what they make where
    (``tests/test_devices.py``)."""
    if t.device.type == "meta":
        return torch.ones(t.shape, dtype=t.dtype, device="cpu")
    if not _counters:
        return t.cpu()
    for counter in _counters:
        counter.note("to_host")
    host = t.detach().cpu().clone()
    _mark_host(host)
    return host


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (from :func:`to_host`) on ``device``, without waiting. While counting, a new tensor on CPU
    too, so that reads of it are counted as they would be on a device."""
    out = t.to(device, non_blocking=True)
    if _counters and out is t:
        out = t.clone()
        _host_storages.pop(out.untyped_storage().data_ptr(), None)
    return out


def read_flags(*flags: torch.Tensor | bool) -> list[bool]:
    """Several 0-dim bool tensors (or bools) as Python bools, in one host read."""
    tensors = [f for f in flags if torch.is_tensor(f)]
    if not tensors:
        return [bool(f) for f in flags]
    values = iter(to_host(torch.stack([t.reshape(()) for t in tensors])).tolist())
    return [bool(next(values)) if torch.is_tensor(f) else bool(f) for f in flags]


class DeferredChecks:
    """Checks that hold unless something cannot be bounded, read together once (see :func:`defer`)."""

    def __init__(self) -> None:
        self.ok: torch.Tensor | None = None

    def add(self, ok: torch.Tensor) -> None:
        self.ok = ok if self.ok is None else self.ok & ok

    def failed(self) -> bool:
        """Whether any check failed (one host read, if any check was deferred)."""
        return self.ok is not None and not read_flags(self.ok)[0]


_local = threading.local()  # per thread: the stack of deferred_checks / immediate_checks (None)


def _deferred() -> list[DeferredChecks | None]:
    if not hasattr(_local, "deferred"):
        _local.deferred = []
    return _local.deferred


@contextlib.contextmanager
def deferred_checks() -> Iterator[DeferredChecks]:
    """Inside, :func:`defer` keeps checks that cannot be read for free; the caller reads them once,
    at the end (``checks.failed()``), and redoes the work with the checks read where they are made
    (:func:`immediate_checks`) to raise the error that names the failing place."""
    checks, stack = DeferredChecks(), _deferred()
    immediate = bool(stack) and stack[-1] is None
    stack.append(None if immediate else checks)  # inside immediate_checks: nothing is deferred
    try:
        yield checks
    finally:
        stack.pop()


@contextlib.contextmanager
def immediate_checks() -> Iterator[None]:
    """Inside, :func:`defer` defers nothing (also within an enclosing :func:`deferred_checks`)."""
    stack = _deferred()
    stack.append(None)
    try:
        yield
    finally:
        stack.pop()


def defer(ok: torch.Tensor) -> bool:
    """Keep the 0-dim bool ``ok`` for the enclosing :func:`deferred_checks` and return True; False
    (the caller reads ``ok`` now) where it may be read for free or nothing defers."""
    stack = _deferred()
    if may_read(ok) or not stack or stack[-1] is None:
        return False
    stack[-1].add(ok)
    return True


class SyncCounter(TorchDispatchMode):
    """Counts host reads by ``(op, file:line)``, the line being the innermost frame in boundprop.

    Reads made inside ``torch.optim`` are left out: the optimisers keep their step counters on the
    CPU even for CUDA parameters, so those reads never wait for a device.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: collections.Counter[tuple[str, str]] = collections.Counter()

    def note(self, op: str) -> None:
        frame, innermost, where = sys._getframe(1), True, "?"
        while frame is not None:
            path = frame.f_code.co_filename.replace("\\", "/")
            # real code: not this module, not torch's dispatch machinery
            if not (path.endswith("/boundprop/syncs.py") or "/torch/_" in path or "/torch/utils/" in path):
                if innermost and "/torch/optim/" in path:
                    return
                innermost = False
                if "/boundprop/" in path:
                    where = f"{path.split('/boundprop/')[-1]}:{frame.f_lineno}"
                    break
            frame = frame.f_back
        self.reads[(op, where)] += 1

    @property
    def total(self) -> int:
        return sum(self.reads.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        host = bool(tensors) and all(_on_host(t) for t in tensors)
        if not host and (func in _READS or (func in _INDEXING and _bool_index(args))):
            self.note(func.overloadpacket.__name__)
        out = func(*args, **(kwargs or {}))
        if host:  # what is computed from host copies is on the host too
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    _mark_host(t)
        return out


_counters: list[SyncCounter] = []
#: storages of to_host's copies and what is computed from them alone, while counting; the tensors
#: are kept alive so that no other tensor gets their memory meanwhile
_host_storages: dict[int, torch.Tensor] = {}


def _mark_host(t: torch.Tensor) -> None:
    if t.untyped_storage().data_ptr():  # not an empty tensor (address 0)
        _host_storages[t.untyped_storage().data_ptr()] = t


def _on_host(t: torch.Tensor) -> bool:
    return t.untyped_storage().data_ptr() in _host_storages


def _counted(method):
    """``Tensor.tolist``/``Tensor.numpy`` noting a read (they copy to the host without dispatching)."""
    def read(t: torch.Tensor, *args, **kwargs):
        if not _on_host(t):
            for counter in _counters:
                counter.note(method.__name__)
        return method(t, *args, **kwargs)
    return read


#: host copies that bypass the dispatcher, counted while counting
_UNDISPATCHED = ("tolist", "numpy")


@contextlib.contextmanager
def count_syncs() -> Iterator[SyncCounter]:
    """Count the host reads made inside (``counter.total``, ``counter.reads``). Every aten op then
    passes through Python: for tests and benchmarks, not for timing."""
    counter = SyncCounter()
    originals = {} if _counters else {name: getattr(torch.Tensor, name) for name in _UNDISPATCHED}
    for name, method in originals.items():
        setattr(torch.Tensor, name, _counted(method))
    _counters.append(counter)
    try:
        with counter:
            yield counter
    finally:
        _counters.remove(counter)
        if not _counters:
            _host_storages.clear()
        for name, method in originals.items():  # the outermost counter restores them
            setattr(torch.Tensor, name, method)
