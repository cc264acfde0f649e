"""`python -m dycoke_eval`: the Hydra app (`app.cli`).

Unless `verbose=true` is given, other libraries' tqdm bars (lmms-eval's request building,
datasets) are switched off here: tqdm reads TQDM_DISABLE once, when it is first imported, and our
own bars pass `disable` explicitly, so they stay.
"""

import os
import sys

if not any(arg.lstrip("+").lower() in ("verbose=true", "verbose=1") for arg in sys.argv[1:]):
    os.environ.setdefault("TQDM_DISABLE", "1")

from dycoke_eval.app import cli  # noqa: E402 - after the switch above

if __name__ == "__main__":
    cli()
