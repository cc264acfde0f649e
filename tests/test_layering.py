"""The core (methods, compression, plumbing, models, accounting) is a library: it imports without the harness's hosts."""

import subprocess
import sys

CORE = ["dycoke_eval.methods", "dycoke_eval.compression.dispatcher", "dycoke_eval.compression.stages",
        "dycoke_eval.plumbing.attention", "dycoke_eval.plumbing.cache", "dycoke_eval.plumbing.hooks",
        "dycoke_eval.plumbing.counting", "dycoke_eval.models", "dycoke_eval.accounting",
        "dycoke_eval.offline.real_size", "dycoke_eval.timing", "dycoke_eval.config"]  # fmt: skip
BLOCKED = ("lmms_eval", "hydra", "omegaconf", "av")

PROGRAM = f"""
import importlib, importlib.abc, pkgutil, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"the core imported {{name}}")

sys.meta_path.insert(0, Blocked())
for module in {CORE!r}:
    importlib.import_module(module)
import dycoke_eval.methods as methods
for info in pkgutil.iter_modules(methods.__path__):
    importlib.import_module(f"dycoke_eval.methods.{{info.name}}")
"""


def test_the_core_imports_without_lmms_eval_hydra_omegaconf_or_pyav():
    """What `scripts/bench_gpu.py` needs on a GPU machine that has only torch and transformers."""
    proc = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
