"""How long a bad setting takes to be refused, from the shell, as a user meets it (target: under 5 s).

    python scripts/bench_config_errors.py

Each command runs `python -m dycoke_eval` with one bad setting on the offline default and prints
its wall time, exit code and the first line of the error. The first unknown task name on a machine
builds lmms-eval's task-name index once (kept under the offline dir); the script says when it did.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

BAD = [
    ["method=dycoke", "method.k=1.5"],
    ["frames=0"],
    ["method=dycoke", "method.l=99"],
    ["method=fastv", "method.layer=99"],
    ["tasks.names=[videomem]"],
    ["prompt=chat"],
]


def main() -> None:
    with tempfile.TemporaryDirectory() as results:
        for overrides in BAD:
            start = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "dycoke_eval", *overrides, f"results_dir={results}"], capture_output=True, text=True
            )
            seconds = time.perf_counter() - start
            lines = [line for line in proc.stderr.splitlines() if line.strip() and "configuration error" not in line]
            print(f"{seconds:5.1f} s  exit {proc.returncode}  {' '.join(overrides):32s}  {lines[0] if lines else '(no message)'}")


if __name__ == "__main__":
    main()
