"""Shared offline world for the tests: the tiny checkpoint and the fixture tasks, built once per session."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dycoke_eval.offline.fixtures import ensure_offline_world
from dycoke_eval.offline.tiny_model import ensure_tiny_checkpoint, ensure_tiny_siglip_head
from dycoke_eval.task_index import TaskIndex

REPO_ROOT = Path(__file__).resolve().parent.parent
TASK_INDEX = TaskIndex()  # lmms-eval's task index, kept across the tests' runs as a process keeps it across its cells


@pytest.fixture(scope="session")
def offline_dir(tmp_path_factory) -> Path:
    """A private offline dir laid out as the app expects (`<dir>/tiny-llava-onevision`, `tiny-siglip-head`, `world`)."""
    root = tmp_path_factory.mktemp("offline")
    ensure_tiny_checkpoint(root / "tiny-llava-onevision")
    ensure_tiny_siglip_head(root / "tiny-siglip-head")
    world = ensure_offline_world(root / "world")
    # lmms-eval's task utils read HF_HOME when they are imported, so set it before any task loads.
    os.environ.update(HF_HOME=str(world.hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(offline_dir) -> Path:
    return offline_dir / "tiny-llava-onevision"


@pytest.fixture(scope="session")
def tiny_siglip_head(offline_dir) -> Path:
    """The tiny SigLIP checkpoint whose pooling head gives the probe signals (`siglip_head=` of the wrapper)."""
    return offline_dir / "tiny-siglip-head"


@pytest.fixture(scope="session")
def world(offline_dir):
    return ensure_offline_world(offline_dir / "world")


def run_module(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """Run `python -m <args>` in a fresh interpreter, as a user would from a shell (never with a real judge key)."""
    environment = {**os.environ, "OPENAI_API_KEY": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, env=environment, timeout=600)


def run_app(*overrides: str, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """`python -m dycoke_eval *overrides` in this process, as `run_module("dycoke_eval", ...)` runs it in a fresh one.

    The app's own in-process entry (`dycoke_eval.app.run_in_process`) parses the overrides as the command
    line does and gives the command's exit status. It runs in a session of its own, as a fresh process does
    (no checkpoint loaded, an empty encoder cache), except for lmms-eval's task index (`TASK_INDEX`): keeping
    that is the point. Around it, what a fresh interpreter would not share with the tests is set aside and
    put back: the environment (the run sets HF_HOME, HF_HUB_OFFLINE, ...), Hydra's global state, logging and
    the random generators.
    """
    import lmms_eval.models  # noqa: F401  it binds its log sink to sys.stdout when imported: the real one, not the capture
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from dycoke_eval.app import run_in_process
    from dycoke_eval.cells import Session

    saved_environ, saved_cwd = dict(os.environ), Path.cwd()
    saved_hydra_config = HydraConfig.instance().cfg
    saved_logging = _logging_state()
    saved_random = (random.getstate(), np.random.get_state())
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        os.environ.update({"OPENAI_API_KEY": "", **(env or {})})
        os.chdir(cwd)
        GlobalHydra.instance().clear()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), torch.random.fork_rng():
            returncode = run_in_process(list(overrides), Session(TASK_INDEX))
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_environ)
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = saved_hydra_config
        _restore_logging(saved_logging)
        random.setstate(saved_random[0])
        np.random.set_state(saved_random[1])
    return subprocess.CompletedProcess(["dycoke_eval", *overrides], returncode, stdout.getvalue(), stderr.getvalue())


def _logging_state() -> dict[logging.Logger, tuple]:
    loggers = [logging.root, *(lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    return {logger: (logger.level, list(logger.handlers), logger.propagate, logger.disabled) for logger in loggers}


def _restore_logging(state: dict[logging.Logger, tuple]) -> None:
    """Put logging back as it was before Hydra configured it for a run, closing the handlers it added."""
    for logger, (level, handlers, propagate, disabled) in state.items():
        for handler in set(logger.handlers) - set(handlers):
            handler.close()
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate, logger.disabled = propagate, disabled
