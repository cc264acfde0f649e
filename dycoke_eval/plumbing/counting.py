"""Kernel launches and host syncs of a block of tensor code, counted on any device, the CPU included.

On an accelerator every aten op that computes is a kernel launch, and some ops make the host wait for the
device: reading a value (`.item()`, `int(t)`, `bool(t)`: `_local_scalar_dense`), an output whose size
depends on the data (`nonzero`, boolean-mask indexing, `masked_select`, `unique`), `torch.equal`. The CPU
runs the same ops through the same dispatcher, so counting them there tells what a GPU would pay without
one. Views and aliases are metadata, not launches. Kernels are seen where they reach the dispatcher; a
value read into Python (`int(t)`, `.item()`, `.tolist()`) at the tensor method, where `torch.inference_mode`
cannot hide it. A copy to the host (`.cpu()`, `.numpy()`) does nothing on the CPU and is not seen.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

DATA_SIZED_OPS = frozenset(
    {
        "nonzero",
        "equal",
        "masked_select",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
    }
)  # fmt: skip  ops whose output size or value the host needs before it can go on
VALUE_READS = frozenset({"__int__", "__bool__", "__float__", "__index__", "item", "tolist"})  # a tensor's value to Python
METADATA_OPS = frozenset({"detach", "alias", "lift_fresh", "_to_copy_noop", "_local_scalar_dense", "is_nonzero", "item"})


@dataclass
class OpCounts:
    """What a block launched: `ops` (kernels), `syncs` (waits for the device), and each syncing op by name."""

    ops: int = 0
    syncs: int = 0
    syncing: Counter = field(default_factory=Counter)

    def sync(self, name: str) -> None:
        self.syncs += 1
        self.syncing[name] += 1


def _data_sized(name: str, args: tuple, kwargs: dict) -> bool:
    """An op whose output size (or work) the host learns from the data: `DATA_SIZED_OPS` (`torch.where(cond)` alone
    is `nonzero`), `t[mask]` and `t[mask] = v` (index and index_put with a boolean index), `repeat_interleave` by a
    tensor of repeats without its `output_size`."""
    if name in ("index", "index_put", "index_put_") and len(args) >= 2:
        return any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in args[1] or ())
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else args[0]
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    return name in DATA_SIZED_OPS


class _Kernels(TorchDispatchMode):
    """aten ops as they reach the device: launches, and the ones whose output size depends on the data."""

    def __init__(self, counts: OpCounts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in METADATA_OPS:
            self.counts.ops += 1
        if _data_sized(name, args, kwargs or {}):
            self.counts.sync(name)
        return func(*args, **(kwargs or {}))


class _ValueReads(TorchFunctionMode):
    """A tensor's value read into Python (`int(t)`, `bool(t)`, `.item()`, `.tolist()`): seen at the tensor method,
    since under `torch.inference_mode` the read does not reach the dispatcher."""

    def __init__(self, counts: OpCounts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in VALUE_READS:
            self.counts.sync(name)
        return func(*args, **(kwargs or {}))


class count_ops:  # noqa: N801 - used as a context manager, like torch's own modes
    """`with count_ops() as counted: ...` then `counted.counts` holds the block's kernels and syncs."""

    def __init__(self) -> None:
        self.counts = OpCounts()
        self._modes = (_ValueReads(self.counts), _Kernels(self.counts))

    def __enter__(self) -> count_ops:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
