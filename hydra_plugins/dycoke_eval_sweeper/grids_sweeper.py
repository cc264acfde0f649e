"""`hydra/sweeper=grids`: Hydra's basic sweeper over a union of grids instead of one product.

A paper table is not one Cartesian product (72B has no K=0.3 and uses FastV at 45%), so a sweep
lists several grids. `params` applies to every grid, and each grid's cells are the product of
its own values. Command-line overrides *narrow* the sweep: for a key that a grid sets, only the
cells with a matching value are kept (`model=llava_ov_0.5b` drops the 7B and 72B cells); other
overrides apply to every cell (`limit=50`). Cells are ordered by model and frame count, so the
basic launcher, which runs jobs in one process, loads each checkpoint once. Launching is left to
the configured launcher (basic, joblib, submitit_slurm, ...).

Cells that differ only in their method form a sample-major group (`dycoke_eval/groups.py`) and run as
one job, which decodes and encodes each video once for all of them; `hydra.sweeper.sample_major=false`
runs one job per cell instead. `measure=true` cells are never grouped.
"""

import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional  # noqa: UP035 - the dataclass needs typing types for OmegaConf

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from dycoke_eval import distributed
from dycoke_eval.cells import CellFailed
from dycoke_eval.groups import group_override, sample_major_groups

GROUPING_KEYS = ("model", "frames")  # cells sharing these run next to each other


@dataclass
class GridsSweeperConf:
    _target_: str = "hydra_plugins.dycoke_eval_sweeper.grids_sweeper.GridsSweeper"
    max_batch_size: Optional[int] = None  # noqa: UP045
    sample_major: bool = True  # one job per group of cells differing only in method: each video decoded and encoded once
    report: bool = True  # render the paper tables the sweep has data for when it ends (else: python -m dycoke_eval.report)
    params: Optional[Dict[str, str]] = None  # noqa: UP006, UP045
    grids: List[Any] = field(default_factory=list)  # noqa: UP006


ConfigStore.instance().store(group="hydra/sweeper", name="grids", node=GridsSweeperConf, provider="dycoke_eval")


def _choices(parser: OverridesParser, assignments: list[str]) -> dict[str, list[str]]:
    """{key: [value strings]} for `key=a,b` style assignments (sweeps expanded, plain values kept)."""
    choices: dict[str, list[str]] = {}
    for override in parser.parse_overrides(assignments):
        key = override.get_key_element()
        if override.is_sweep_override():
            choices[key] = list(override.sweep_string_iterator())
        else:
            choices[key] = [override.get_value_element_as_str()]
    return choices


def expand_grids(
    parser: OverridesParser, params: dict[str, Any] | None, grids: list[dict[str, Any]], arguments: list[str]
) -> list[list[str]]:
    """Every cell of the sweep as a list of `key=value` overrides, narrowed by `arguments`, grouped by model."""
    common = [f"{k}={v}" for k, v in (params or {}).items()]
    narrowing = _choices(parser, arguments)
    cells: list[list[str]] = []
    for grid in grids:
        values = _choices(parser, common + [f"{k}={v}" for k, v in grid.items()])
        for key, allowed in narrowing.items():
            if key in values:
                values[key] = [value for value in values[key] if value in allowed]
            else:
                values[key] = allowed
        for combination in itertools.product(*values.values()):
            cell = [f"{key}={value}" for key, value in zip(values, combination, strict=True)]
            if cell not in cells:
                cells.append(cell)

    def grouping(cell: list[str]) -> tuple[str, ...]:
        settings = dict(assignment.split("=", 1) for assignment in cell)
        return tuple(settings.get(key, "") for key in GROUPING_KEYS)

    return sorted(cells, key=grouping)  # stable: the grid order is kept within a group


def say(line: str) -> None:
    """A sweep's progress line, printed once however many processes run the sweep."""
    if distributed.is_main():
        print(line)


class GridsSweeper(BasicSweeper):
    def __init__(
        self,
        max_batch_size: int | None,
        params: dict[str, str] | None = None,
        grids: list | None = None,
        sample_major: bool = True,
        report: bool = True,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = [dict(grid) for grid in OmegaConf.to_container(grids)] if grids is not None else [{}]
        self.sample_major = sample_major
        self.report = report

    def _configs(self, cells: list[list[str]]) -> list:
        """Each cell's resolved config, loaded as the launcher loads a job's."""
        return [self.hydra_context.config_loader.load_sweep_config(self.config, cell) for cell in cells]

    def _jobs(self, cells: list[list[str]]) -> list[list[str]]:
        """One job per sample-major group (its first cell's overrides, naming the others), or one per cell."""
        if not self.sample_major:
            return cells
        configs = self._configs(cells)
        groups = sample_major_groups(configs)
        say(f"sweep: {len(groups)} sample-major groups: " + ", ".join(str(len(group)) + " cells" for group in groups))
        return [[*cells[group[0]], group_override([cells[i] for i in group[1:]])] for group in groups]

    def _write_plan(self, cells: list[list[str]]) -> list:
        """dry_run=true: each cell's plan row (dycoke_eval.accounting), as a table and a CSV; nothing is launched."""
        from dycoke_eval.plans import write_plan

        if distributed.is_main():
            write_plan(self._configs(cells), Path(self.config.results_dir) / self.config.run_name / "plan.csv")
        return []

    def sweep(self, arguments: list[str]) -> Any:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        cells = expand_grids(parser, self.params, self.grids, arguments)
        if not cells:
            self._refuse_empty(parser, arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        say(f"sweep: {len(cells)} cells")
        if self.config.get("dry_run"):
            return self._write_plan(cells)
        self.overrides = list(self.split_overrides_to_chunks(self._jobs(cells), self.max_batch_size))
        returns, failed, initial_job_idx = [], [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            tic = time.perf_counter()
            self.validate_batch_is_legal(batch)
            results = self._launch(batch, initial_job_idx)
            for result in results:
                try:
                    _ = result.return_value  # raise if a job failed
                except CellFailed as error:  # every sample of that cell failed: go on with the others
                    failed.append(str(error))
            initial_job_idx += len(batch)
            returns.append(results)
            say(f"sweep: batch of {len(batch)} jobs done in {time.perf_counter() - tic:.1f} s")
        if self.report and distributed.is_main():  # every process ran its shard of each cell; rank 0 wrote them
            self._render_report()
        if failed:
            sys.exit(f"sweep: {len(failed)} cells failed entirely and are not complete:\n" + "\n".join(failed))
        return returns

    def _refuse_empty(self, parser: OverridesParser, arguments: list[str]) -> None:
        """Overrides that narrow the sweep to no cell end it in one line naming the values its cells have."""
        narrowing = _choices(parser, arguments)
        every = [
            dict(assignment.split("=", 1) for assignment in cell) for cell in expand_grids(parser, self.params, self.grids, [])
        ]
        has = {key: sorted({cell[key] for cell in every if key in cell}) for key in narrowing}
        given = " ".join(f"{key}={','.join(narrowing[key])}" for key, values in has.items() if values)
        named = "; ".join(f"{key} in {', '.join(values)}" for key, values in has.items() if values)
        print(
            f"dycoke_eval: {given}: sweep {self.config.run_name} has no cell with these settings (its cells have {named}); "
            "narrow it to those, or run these cells without +sweep",
            file=sys.stderr,
        )
        sys.exit(2)

    def _launch(self, batch: list, initial_job_idx: int) -> list:
        """The launcher's jobs; one that died (killed, preempted, out of memory) ends the sweep in one line: every
        answer it journaled is kept, and the same command resumes."""
        try:
            return self.launcher.launch(batch, initial_job_idx=initial_job_idx)
        except Exception as error:
            if type(error).__name__ not in ("UncompletedJobError", "FailedJobError"):  # submitit's, imported only with it
                raise
            reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
            sys.exit(
                f"sweep: a job stopped before finishing ({reason}); its finished samples are saved in the cells' journals: "
                "run the same command again to resume"
            )

    def _render_report(self) -> None:
        """A paper table's sweep (its run_name names a CSV of dycoke_eval/paper) renders that table; other sweeps
        render every table they have data for."""
        from dycoke_eval.report import PAPER_DIR, render_report

        name = str(self.config.run_name)
        tables = [name] if (PAPER_DIR / f"{name}.csv").is_file() else None
        render_report(Path(self.config.results_dir), tables)
