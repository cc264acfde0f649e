"""Kernel launches and host syncs of a block of tensor code, counted on any device, the CPU included.

On an accelerator every aten op that computes is a kernel launch, and some ops make the host wait for the
device: reading a value (`.item()`, `int(t)`, `bool(t)`: `_local_scalar_dense`), an output whose size
depends on the data (`nonzero`, boolean-mask indexing, `masked_select`, `unique`), `torch.equal`. The CPU
runs the same ops through the same dispatcher, so counting them there tells what a GPU would pay without
one. Views and aliases are metadata, not launches. `.tolist()` does not pass through the dispatcher and is
not seen: the code under count uses tensor ops.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING_OPS = frozenset({
    "_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select", "_unique2", "unique_dim",
    "unique_consecutive",
})  # fmt: skip
METADATA_OPS = frozenset({"detach", "alias", "lift_fresh", "_to_copy_noop"})


@dataclass
class OpCounts:
    """What a block launched: `ops` (kernels), `syncs` (waits for the device), and each syncing op by name."""

    ops: int = 0
    syncs: int = 0
    syncing: Counter = field(default_factory=Counter)


def _is_boolean_index(name: str, args: tuple) -> bool:
    """`t[mask]`: aten.index with a boolean index tensor, whose output size is the mask's count."""
    if name != "index" or len(args) < 2:
        return False
    return any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in args[1] or ())


class count_ops(TorchDispatchMode):  # noqa: N801 - used as a context manager, like torch's own modes
    """`with count_ops() as counted: ...` then `counted.counts` holds the block's kernels and syncs."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = OpCounts()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in METADATA_OPS:
            self.counts.ops += 1
        if name in SYNCING_OPS or _is_boolean_index(name, args):
            self.counts.syncs += 1
            self.counts.syncing[name] += 1
        return func(*args, **(kwargs or {}))
