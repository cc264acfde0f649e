"""What each method costs an accelerator, counted on any machine: kernel launches and host syncs at real size.

    python scripts/bench_gpu.py --cpu-counts [--sizes ov video] [--methods fastvid prunevid]

`--cpu-counts` runs each method's selection before the LLM (`Compressor.select`, as the evaluation wrapper
calls it) once to warm up and once under `plumbing.counting.count_ops`, on random video tokens and encoder
signals at LLaVA-OneVision-7B's size (32 x 196 x 3584) and LLaVA-Video-7B's (64 x 169 x 3584), and prints
one line per layout and method:

    counts <layout> <method> pre_llm ops=N syncs=M [syncing ops]

An op is a kernel launch on a GPU; a sync is a point where the host waits for the device (a value read,
a data-dependent output size). Only torch and transformers are needed. The decode-step counts and the
timed GPU figures the issue asks for are not here yet.
"""

from __future__ import annotations

import argparse

import torch

from dycoke_eval.compression.dispatcher import Compressor
from dycoke_eval.config import instantiate_method
from dycoke_eval.offline.real_size import SIZES, random_encoded_video
from dycoke_eval.plumbing.counting import count_ops

PRE_LLM_METHODS = {  # label -> (config, overrides): every method with a stage before the LLM
    "dycoke K=0.7": ("dycoke", {"method.k": 0.7}),
    "dycoke_ttm K=0.9": ("dycoke_ttm", {"method.k": 0.9}),
    "prumerge": ("prumerge", {}),
    "prumerge_official": ("prumerge_official", {}),
    "fastvid R=25%": ("fastvid", {"method.retention": 0.25}),
    "visionzip after_pooling R=25%": ("visionzip", {"method.form": "after_pooling", "method.retention": 0.25}),
    "visionzip in_encoder R=25%": ("visionzip", {"method.form": "in_encoder", "method.retention": 0.25}),
    "prunevid": ("prunevid", {}),
    "random": ("random", {}),
    "pooling": ("pooling", {}),
}


def pre_llm_counts(size: str, name: str, overrides: dict) -> tuple[int, int, dict[str, int]]:
    """(ops, syncs, syncing ops by name) of one video's selection before the LLM, after a warm-up call."""
    encoded = random_encoded_video(size)
    compressor = Compressor(None, instantiate_method(name, overrides))
    with torch.inference_mode():
        compressor.select(encoded, "counts")
        with count_ops() as counted:
            compressor.select(encoded, "counts")
    return counted.counts.ops, counted.counts.syncs, dict(counted.counts.syncing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-counts", action="store_true", required=True, help="count ops and syncs (any machine)")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=sorted(SIZES))
    parser.add_argument("--methods", nargs="+", default=None, help="configs to count (default: every pre-LLM method)")
    args = parser.parse_args()
    chosen = {label: spec for label, spec in PRE_LLM_METHODS.items() if not args.methods or spec[0] in args.methods}
    for size in args.sizes:
        for label, (name, overrides) in chosen.items():
            ops, syncs, syncing = pre_llm_counts(size, name, overrides)
            which = " ".join(f"{op}:{count}" for op, count in sorted(syncing.items()))
            print(f"counts {size} {label.replace(' ', '_')} pre_llm ops={ops} syncs={syncs} {which}".rstrip(), flush=True)


if __name__ == "__main__":
    main()
