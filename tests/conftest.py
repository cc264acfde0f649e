"""Shared offline world for the tests: the tiny checkpoint and the fixture tasks, built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dycoke_eval.offline.fixtures import ensure_offline_world
from dycoke_eval.offline.tiny_model import ensure_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def offline_dir(tmp_path_factory) -> Path:
    """A private offline dir laid out as the app expects (`<dir>/tiny-llava-onevision`, `<dir>/world`)."""
    root = tmp_path_factory.mktemp("offline")
    ensure_tiny_checkpoint(root / "tiny-llava-onevision")
    world = ensure_offline_world(root / "world")
    # lmms-eval's task utils read HF_HOME when they are imported, so set it before any task loads.
    os.environ.update(HF_HOME=str(world.hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(offline_dir) -> Path:
    return offline_dir / "tiny-llava-onevision"


@pytest.fixture(scope="session")
def world(offline_dir):
    return ensure_offline_world(offline_dir / "world")


def run_module(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """Run `python -m <args>` in a fresh interpreter, as a user would from a shell (never with a real judge key)."""
    environment = {**os.environ, "OPENAI_API_KEY": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, env=environment, timeout=600)
