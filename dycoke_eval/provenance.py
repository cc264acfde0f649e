"""What a result needs to say about how it was made: versions, git commit, hardware."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("dycoke-eval", "lmms-eval", "torch", "transformers", "accelerate", "datasets", "hydra-core", "openai", "av")
REPO_ROOT = Path(__file__).resolve().parent.parent


def package_versions() -> dict[str, object]:
    """Python and the packages that shape results by name, then every installed distribution (`installed`) and the
    sha256 of the lock the checkout installs from (`lock_sha256`, None outside a checkout): a result can be traced
    to its whole environment, numpy, pandas and filelock included."""
    installed = {dist.metadata["Name"].lower().replace("_", "-"): dist.version for dist in metadata.distributions()}
    versions: dict[str, object] = {"python": platform.python_version(), **{name: installed.get(name) for name in PACKAGES}}
    versions["installed"] = dict(sorted(installed.items()))
    lock = REPO_ROOT / "requirements.lock"
    versions["lock_sha256"] = hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else None
    return versions


def git_state() -> dict[str, str | bool | None]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def hardware() -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info
