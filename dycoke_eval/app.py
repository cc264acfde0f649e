"""The Hydra app: `python -m dycoke_eval [overrides]` runs one cell; `+sweep=NAME` runs a sweep of cells.

The command line's checks (group choices, the results folder, the run settings), then one job per cell
(`cells.py`) or per sample-major group of cells (`groups.py`). Every job of the process shares one
`Session`: the loaded checkpoint, its encoder cache and lmms-eval's task index. Failures end in one line
and the shell's status for them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from dycoke_eval import distributed
from dycoke_eval.cells import CellFailed, Interrupted, Session, check_cell, check_run_settings, run_cell
from dycoke_eval.config import CONF_DIR, ConfigError
from dycoke_eval.groups import GROUP_KEY, run_group


def set_hub_offline(cfg: DictConfig) -> None:
    """`hub_offline=true`: huggingface_hub, datasets and transformers read these once, when first imported, so
    they are set before anything (the checks included) imports them."""
    if cfg.hub_offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"


def check_results_dir(overrides: list[str]) -> None:
    """A results folder that is a file (or lies below one) fails when Hydra makes its run folder there, before the
    app starts, with a traceback: checked on the command line first."""
    import yaml

    given = [item.partition("=")[2] for item in overrides if item.lstrip("+").startswith("results_dir=")]
    default = yaml.safe_load((CONF_DIR / "config.yaml").read_text())["results_dir"]
    results_dir = Path(given[-1] if given else default).expanduser()
    for folder in (results_dir, *results_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"results_dir={str(results_dir)!r}: {str(folder)!r} is a file; choose a folder")


def quiet_libraries(verbose: bool) -> None:
    """Unless `verbose=true`, keep the libraries' chatter out of a run's output: our progress bars and summaries stay.

    lmms-eval's task-index DEBUG lines (loguru), dataset and weight-loading progress bars, its postprocessing
    bars and INFO lines of other libraries (`__main__` disables other libraries' tqdm bars before tqdm loads;
    ours pass `disable` explicitly). nltk's download errors (NExT-QA's utils try to fetch data on
    every load) are dropped from stderr while tasks load (`cells.filtered_stderr`).
    """
    if verbose:
        return
    import logging

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    logging.getLogger("numexpr").setLevel(logging.WARNING)


def main(cfg: DictConfig, session: Session) -> None:
    """One Hydra job: a cell, a sample-major group of cells, or a dry run's plan."""
    try:
        distributed.adopt_submitit_tasks()  # a submitit job's tasks (SLURM tasks_per_node) become a data-parallel run
        set_hub_offline(cfg)
        quiet_libraries(cfg.verbose)
        check_run_settings(cfg)
        if cfg.dry_run:  # a single cell's plan; sweeps plan all their cells in the grids sweeper
            from dycoke_eval.plans import write_plan

            check_cell(cfg)  # a plan of a cell that would be refused is no plan
            if distributed.is_main():
                write_plan([cfg], Path(cfg.results_dir) / cfg.run_name / "plan.csv")
        elif cfg.get(GROUP_KEY) is not None:  # a sweep's job for a sample-major group of cells
            run_group(cfg, session)
        else:
            run_cell(cfg, session)
    except ConfigError as error:
        refuse(error)
    except CellFailed as error:
        if _in_multirun():
            raise  # the sweeper goes on with the other cells and reports this one at the end
        sys.exit(f"dycoke_eval: {error}")
    except Interrupted as error:
        print(f"\ndycoke_eval: {error}", file=sys.stderr)
        sys.exit(130)  # the shell's status for Ctrl-C
    except KeyboardInterrupt:  # outside generation (checks, task index, model load, judging): no traceback either
        print("\ndycoke_eval: interrupted; finished samples and cells are kept: run the same command again to resume",
              file=sys.stderr)  # fmt: skip
        sys.exit(130)


USAGE_STATUS = 2  # a bad setting or name, as argparse and the shell's builtins exit: nothing ran


def refuse(error: ConfigError) -> None:
    """Exit with the one line that names the bad value and the fix."""
    print(f"dycoke_eval: {error}", file=sys.stderr)
    sys.exit(USAGE_STATUS)


def cli(session: Session | None = None) -> None:
    """The command: group choices (`method=NAME`, ...) checked before Hydra composes them, then Hydra's run or
    sweep, whose jobs in this process share `session` (a new one unless given)."""
    from dycoke_eval.config import check_group_choices

    try:
        check_group_choices(sys.argv[1:])
        check_results_dir(sys.argv[1:])
    except ConfigError as error:
        refuse(error)
    session = session or Session()

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def job(cfg: DictConfig) -> None:  # Hydra names the job after this module: `app`
        main(cfg, session)

    try:
        job()
    finally:
        distributed.close()


def run_in_process(overrides: list[str], session: Session | None = None) -> int:
    """`python -m dycoke_eval *overrides`, run in this process; returns the exit status the command would give.

    Hydra reads `overrides` from the command line exactly as it does for the command (a run or a sweep,
    its error messages), and `main` handles failures as it does there: a message on stderr and status 1.
    The run keeps what it loads in `session` (a new one unless given); it leaves the environment it sets.
    """
    argv = sys.argv
    sys.argv = [str(Path(__file__).with_name("__main__.py")), *overrides]  # what `python -m dycoke_eval` sees
    try:
        cli(session)
    except SystemExit as exit_:
        return _exit_status(exit_.code)
    finally:
        sys.argv = argv
    return 0


def _exit_status(code: Any) -> int:
    """The status the interpreter exits with for `sys.exit(code)`, printing the message as it does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
