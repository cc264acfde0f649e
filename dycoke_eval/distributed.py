"""The processes of a data-parallel run (`accelerate launch`, torchrun): which one this is, and what they share.

lmms-eval shards each task's documents over the processes and gathers the scores on rank 0. Everything
else that a run writes or counts is decided here: rank 0 alone writes a cell's files, renders reports and
judges; counts are summed over ranks; a barrier orders a rank-0 step before the others go on.

accelerate's process state is created once per process. On a machine without CUDA it must be created with
`cpu=True`: otherwise accelerate, started under torchrun, sees no accelerator and runs undistributed, and
lmms-eval's per-rank request counts come back as one int. With CUDA each process takes its own GPU (NCCL).
Without a launcher everything here is the single-process case and costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


def adopt_submitit_tasks() -> None:
    """In a submitit job of several tasks (`hydra.launcher.tasks_per_node=8` on a SLURM node of 8 GPUs), make each
    task one rank of a data-parallel run, as `accelerate launch` would: submitit's own helper exports the
    torch.distributed variables (rank, world size, master address) from the job's environment."""
    if launched() or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)  # each rank picks its GPU by local rank


def launched() -> bool:
    """Whether a launcher started several processes (torchrun and `accelerate launch` set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def uses_cpu() -> bool:
    """Processes run on the CPU (gloo) when there is no CUDA device; accelerate must be told so."""
    import torch

    return not torch.cuda.is_available()


def process_state():
    """accelerate's PartialState for this process, created on the CPU where there is no GPU (see the module doc)."""
    from accelerate import PartialState

    return PartialState(cpu=uses_cpu())


def rank() -> int:
    return process_state().process_index if launched() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes cells, renders reports and judges."""
    return rank() == 0


def barrier() -> None:
    """Every process waits here for the others (a no-op in a single process)."""
    if launched():
        process_state().wait_for_everyone()


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (it writes shared files: task YAMLs, the offline world); the others after it."""
    if not launched():
        yield
        return
    with process_state().main_process_first():
        yield


def gather(value: T) -> list[T]:
    """`value` from every process, in rank order, on every process ([value] in a single process)."""
    if not launched():
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def close() -> None:
    """End this process's part in the run: the process group is destroyed before the interpreter exits, with every
    rank past its last collective. Left to the interpreter's teardown, gloo's worker threads may still be joinable
    when their destructors run, and the process aborts ("terminate called without an active exception") after its
    work is done, failing the whole launch."""
    if not launched():
        return
    import torch.distributed as torch_distributed

    if torch_distributed.is_available() and torch_distributed.is_initialized():
        torch_distributed.destroy_process_group()


def summed(counts: dict[str, Any]) -> dict[str, Any]:
    """Numeric counts summed over the processes (each process counts only its own shard)."""
    per_rank = gather(counts)
    return {key: sum(rank_counts[key] for rank_counts in per_rank) for key in counts}
