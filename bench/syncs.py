"""Host reads: the operations that make an accelerator's stream wait for the host, counted on any device.

On a GPU, the host queues kernels ahead of the GPU until something needs a value back: a scalar
(`.item()`, `int(t)`, `bool(t)`, `.tolist()`), or an output whose size depends on the data (`nonzero`,
indexing with a boolean mask), or a Python list turned into a tensor (a host-to-device copy that waits).
Each one empties the queue, and a step with hundreds of them leaves the GPU idle (issue 14 measured a
prefill chunk at 206 ms of host time for 17 ms of GPU time). The same operations run on the CPU, so
they are counted here without a GPU: a TorchDispatchMode sees every operator, and `Tensor.tolist`
(which never dispatches on the CPU) is wrapped while counting.

    with HostReads() as reads:
        step()
    assert not reads.seen, reads.seen

With ops=True it also counts every operator the step dispatches, by the line that called it: on a GPU
each is (at least) one kernel launch, so this is the CPU's proxy for a step's launches.
"""
from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_SCALAR = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.item.default}
_DATA_SIZED = {aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default,
               aten._unique2.default, aten.nonzero_static.default}
_FROM_PYTHON = {aten.lift_fresh.default, aten.lift_fresh_copy.default}


def _has_mask(args) -> bool:
    """aten.index / index_put_'s indices (args[1], a list with None for sliced dims) hold a boolean mask."""
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])


def _where() -> str:
    """The innermost frame of this project (not torch's or transformers') that led here."""
    for frame in reversed(traceback.extract_stack()[:-1]):
        if "/torch/" not in frame.filename and "/transformers/" not in frame.filename and __file__ != frame.filename:
            return f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "?"


class HostReads(TorchDispatchMode):
    """Counts host reads while active: `seen` maps 'op at file:line' to how many times it ran; with
    ops=True, `ops` maps 'file:line' to the operators dispatched from there."""

    def __init__(self, ops: bool = False):
        super().__init__()
        self.seen: collections.Counter[str] = collections.Counter()
        self.ops: collections.Counter[str] | None = collections.Counter() if ops else None
        self._tolist = None

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        original, seen = self._tolist, self.seen

        def tolist(t, *args, **kwargs):
            seen[f"tolist at {_where()}"] += 1
            return original(t, *args, **kwargs)
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.ops is not None:
            self.ops[_where()] += 1
        if (func in _SCALAR or func in _DATA_SIZED or func in _FROM_PYTHON
                or (func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and _has_mask(args))):
            self.seen[f"{func.__name__} at {_where()}"] += 1
        return func(*args, **(kwargs or {}))
