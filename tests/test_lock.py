"""The locked environment: the lock covers what pyproject.toml asks for, and the weekly canary runs the tests unlocked."""

import importlib.util
import re
import sys
import tomllib

import yaml
from conftest import REPO_ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock_diff = _script("lock_diff")
LOCK = (REPO_ROOT / "requirements.lock").read_text()
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_every_requirement_of_the_project_and_its_test_and_slurm_extras_is_pinned_with_hashes():
    project = PYPROJECT["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"], *project["optional-dependencies"]["slurm"]]
    pinned = {canonicalize_name(name) for name in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", LOCK, re.MULTILINE)}
    assert {canonicalize_name(Requirement(line).name) for line in wanted} <= pinned
    blocks = re.split(r"\n(?=[A-Za-z0-9])", LOCK.split("\n", 2)[2])  # one block per pinned package
    assert all("--hash=sha256:" in block for block in blocks if "==" in block)
    assert LOCK.splitlines()[1].strip() == "#    make lock"  # refreshed on purpose, by the Makefile's command


def test_the_release_that_broke_lmms_eval_is_excluded_and_not_locked():
    assert any(line.replace(" ", "").startswith("filelock<4.3") for line in PYPROJECT["project"]["dependencies"])
    (version,) = set(re.findall(r"^filelock==(\S+)", LOCK, re.MULTILINE))
    assert tuple(map(int, version.split(".")[:2])) < (4, 3)


def test_the_lock_pins_per_python_where_versions_differ():
    lock = (
        "numpy==2.4.6 ; python_full_version < '3.12' and sys_platform == 'linux' \\\n    --hash=sha256:aa\n"
        "numpy==2.5.5 ; python_full_version == '3.12.*' and sys_platform == 'linux' \\\n    --hash=sha256:bb\n"
        "six==1.16.0 \\\n    --hash=sha256:cc\n"
    )
    pins = lock_diff.locked_versions(lock)
    assert pins["six"] == "1.16.0" and pins["numpy"] == ("2.4.6" if sys.version_info < (3, 12) else "2.5.5")
    found = lock_diff.differences(pins, {"six": "1.17.0", "numpy": pins["numpy"], "extra-pkg": "1.0"})
    assert found == ["extra-pkg: locked (not in the lock), installed 1.0", "six: locked 1.16.0, installed 1.17.0"]


def test_the_weekly_canary_installs_without_the_lock_runs_make_test_and_names_what_differs_on_failure():
    workflow = yaml.safe_load((REPO_ROOT / ".github" / "workflows" / "canary.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert triggers["schedule"][0]["cron"].split()[2:] == ["*", "*", "1"]  # weekly
    (job,) = workflow["jobs"].values()
    runs = [step.get("run", "") for step in job["steps"]]
    install = next(run for run in runs if "pip install" in run and "-e" in run)
    assert "requirements.lock" not in install and ".[test,slurm]" in install
    assert any(run.strip() == "make test" for run in runs)
    (report,) = [step for step in job["steps"] if "lock_diff.py" in step.get("run", "")]
    assert report["if"] == "failure()"
    assert set(job["strategy"]["matrix"]["python"]) == {"3.11", "3.12"}
