"""A non-editable install into a fresh virtual environment runs the offline default, as a command from a shell.

The wheel is built from a copy of this checkout (an in-tree build would leave build/ and egg-info behind).
The new environment gets its dependencies from the running one's site-packages through a `.pth` line:
a `.pth` file's lines are added to sys.path, but `.pth` files inside the folders they name are not
processed, so the running environment's editable install of dycoke_eval (a finder set up by its own
`.pth`) stays out, and the package can only come from the wheel.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "dycoke_eval"
NOT_SOURCE = (".git", ".venv", "build", "*.egg-info", "results", "outputs", "__pycache__", ".pytest_cache")

WHERE = "import sys, dycoke_eval; print(dycoke_eval.__file__); print(sys.meta_path)"


def run(*command, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def build_wheel(root: Path) -> Path:
    source = root / "source"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", root / "wheel", source, cwd=root)
    (wheel,) = (root / "wheel").glob("dycoke_eval-*.whl")
    return wheel


def fresh_venv(root: Path, wheel: Path) -> Path:
    """A venv without pip that sees the running environment's site-packages, with the wheel installed into it."""
    venv = root / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)
    python = venv / "bin" / "python"
    site_packages = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root).stdout.strip())
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))  # the running venv's, in order
    (site_packages / "dependencies.pth").write_text("".join(f"{path}\n" for path in ours))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run(*pip, "install", "--no-deps", "--no-index", "--no-compile", "--target", site_packages, wheel, cwd=root)
    return python


@pytest.mark.slow
def test_a_wheel_installed_into_a_fresh_venv_runs_the_offline_default(offline_dir, tmp_path):
    wheel = build_wheel(tmp_path)
    shipped = set(zipfile.ZipFile(wheel).namelist())
    data = [p.relative_to(REPO_ROOT).as_posix() for pattern in ("conf/**/*.yaml", "paper/*.csv") for p in PACKAGE.glob(pattern)]
    assert data and set(data) <= shipped  # every config and the papers' numbers travel with the wheel
    assert "hydra_plugins/dycoke_eval_sweeper/grids_sweeper.py" in shipped

    python = fresh_venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"  # not the checkout: nothing can come from the working directory
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OPENAI_API_KEY="", DYCOKE_OFFLINE_DIR=str(offline_dir))
    where = run(python, "-c", WHERE, cwd=elsewhere, env=env)
    module_file, meta_path = where.stdout.splitlines()
    assert Path(module_file).is_relative_to(tmp_path / "venv"), module_file  # the wheel's copy, not the checkout's
    assert "editable" not in meta_path.lower(), meta_path  # the running venv's editable finder was not loaded

    results = tmp_path / "results"
    run(python, "-m", "dycoke_eval", f"results_dir={results}", "frames=4", cwd=elsewhere, env=env)
    (cell,) = (results / "cells").iterdir()
    assert cell.name.startswith("tiny__full__f4__fixtures__")
    assert json.loads((cell / "run.json").read_text())["complete"] is True
