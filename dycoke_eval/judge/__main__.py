"""Judge or re-judge saved results without loading any model.

    python -m dycoke_eval.judge RESULTS_DIR [judge.model=...] [judge.base_url=...] [judge.concurrency=...]

Every cell folder below RESULTS_DIR (a folder holding results.json) is judged with the settings
of `conf/judge/` (default gpt4o_mini) and updated in place, and the resulting scores are printed
per task; a rendered report of the results folder is rendered again with them. A judge that cannot
be reached, or refuses the key, stops the run at once with one line. Cached replies (from the same
endpoint and model) cost nothing. A sample that cannot be judged now keeps its earlier verdict.
Exits 1 when nothing could be judged or a cell's earlier judgements could not be read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dycoke_eval.config import ConfigError, compose_option


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dycoke_eval.judge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="judge.<key>=<value>, or judge=<option> to pick another config")
    args = parser.parse_args(argv)
    from hydra.utils import instantiate

    from dycoke_eval.judge.cells import format_judge_summary, judge_cell
    from dycoke_eval.judge.client import Judge, JudgeUnavailable
    from dycoke_eval.store import CellError, cells_below

    option = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("judge=")), "gpt4o_mini")
    overrides = dict(o.split("=", 1) for o in args.overrides if o.startswith("judge."))
    try:
        settings = instantiate(compose_option("judge", option, overrides))
    except ConfigError as error:
        print(f"dycoke_eval.judge: {error}", file=sys.stderr)
        return 2
    if not settings.enabled():
        print(f"dycoke_eval.judge: no judge configured: set ${settings.api_key_env} or judge.base_url=...", file=sys.stderr)
        return 2
    cells = cells_below(args.results_dir)
    if not cells:
        print(f"dycoke_eval.judge: no readable results.json below {args.results_dir}", file=sys.stderr)
        return 2
    judge = Judge(settings)
    status, asked, judged = 0, 0, 0
    for cell in cells:
        try:
            summary = judge_cell(cell, judge)
        except CellError as error:
            print(f"dycoke_eval.judge: skipped {error}", file=sys.stderr)
            status = 1
            continue
        except JudgeUnavailable as error:  # no later cell could be judged either
            print(f"dycoke_eval.judge: {error}; earlier verdicts are kept", file=sys.stderr)
            status = 1
            break
        if summary:
            print(f"{cell.path}:\n{format_judge_summary(summary)}")
        asked += sum(s["judged_now"] + s["failed_now"] for s in summary.values())
        judged += sum(s["judged_now"] for s in summary.values())
    if judged:
        rerender_reports([cell.path for cell in cells])
    if asked and not judged:
        print(
            f"dycoke_eval.judge: nothing could be judged: all {asked} requests to {settings.endpoint()} failed; "
            "earlier verdicts are kept",
            file=sys.stderr,
        )
        return 1
    return status


def rerender_reports(cell_dirs: list[Path]) -> None:
    """The tables show judged columns from the cells' results: a results folder whose report was rendered is rendered
    again now; for one that has none yet, the command that renders it is printed."""
    from dycoke_eval.report import render_report

    roots = dict.fromkeys(path.parent.parent for path in cell_dirs if path.parent.name == "cells")
    for root in roots:
        if (root / "report").is_dir():
            render_report(root)
        else:
            print(f"tables with the judged columns: python -m dycoke_eval.report {root}")


if __name__ == "__main__":
    sys.exit(main())
