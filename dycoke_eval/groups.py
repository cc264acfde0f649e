"""Sample-major groups: the cells of a sweep that differ only in their method share each video's decode and encoder pass.

A paper table is many methods over the same videos. The grids sweeper (`hydra/sweeper=grids`) puts the
cells whose resolved configs agree in everything but `method` (model, frames, prompt, tasks, limit, run
settings) into one group, and launches one job per group: the first cell's overrides plus `+group_cells=`,
the other cells' overrides (`group_override`). The job (`run_group`) composes each cell's config as the
launcher would, then runs its first cell that is not yet complete with the others as *companions*: for
each sample that some cell of the group lacks in its journal, the video is decoded and encoded once,
capturing every encoder signal those cells' methods need, and each lacking cell's method answers from
that pass into its own journal (`CompressedVideoLM.generate_until`). The other cells then run as usual
and find every sample in their journals, so lmms-eval scores them and their folders are written exactly as
cell by cell. Nothing here depends on the encoder cache: with it off, each video is still encoded once.

Each method sees only the signals it asks for, and every per-sample choice is seeded by the sample, so an
answer does not depend on which cells share the pass. `measure=true` cells are never grouped (each pays
for its own encoder, for clean timings). Resume and `force` work per cell through the journals.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from dycoke_eval.cells import CellFailed, Session, check_cell, clear_journals, run_cell

GROUP_KEY = "group_cells"  # the job override naming a group's other cells, each by its overrides


# Forming groups (in the sweeper)


def group_key(cfg: DictConfig) -> str | None:
    """What the cells of one group share: the resolved config without `method` (and Hydra's node); None never groups."""
    if cfg.get("measure"):
        return None  # measured cells pay for their own decode and encoder
    shared = {key: _resolved(cfg, key) for key in cfg if key not in ("method", "hydra", GROUP_KEY)}
    return json.dumps(shared, sort_keys=True, default=str)


def _resolved(cfg: DictConfig, key: str) -> Any:
    value = cfg[key]
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def sample_major_groups(configs: list[DictConfig]) -> list[list[int]]:
    """The cells of each group as indices into `configs`, groups and cells in sweep order."""
    groups: dict[Any, list[int]] = {}
    for index, cfg in enumerate(configs):
        groups.setdefault(group_key(cfg) or ("alone", index), []).append(index)
    return list(groups.values())


def group_override(others: list[list[str]]) -> str:
    """`+group_cells=[[...],...]`: the other cells' overrides, each quoted so Hydra reads it back unchanged."""
    return f"+{GROUP_KEY}=[" + ",".join("[" + ",".join(map(quote, cell)) + "]" for cell in others) + "]"


def quote(text: str) -> str:
    """`text` as a single-quoted Hydra override value: quotes escaped, and backslashes that precede one or end it doubled."""
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), text) + "'"


# Running a group (in its job)


def group_members(cfg: DictConfig) -> list[DictConfig]:
    """The job's cells: its own config without `group_cells`, then each other cell composed as the launcher composes a job."""
    leader = copy.deepcopy(cfg)
    with open_dict(leader):
        del leader[GROUP_KEY]
    others = OmegaConf.to_container(cfg[GROUP_KEY], resolve=False)
    return [leader, *(compose_cell(overrides) for overrides in others)]


def compose_cell(overrides: list[str]) -> DictConfig:
    """A cell's config from its sweep overrides, as Hydra's launchers load a job's (`load_sweep_config`), Hydra's node removed."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    master = OmegaConf.create({"hydra": OmegaConf.to_container(HydraConfig.get(), resolve=False)})
    config = GlobalHydra.instance().config_loader().load_sweep_config(master, list(overrides))
    with open_dict(config):
        del config["hydra"]
    return config


def run_group(cfg: DictConfig, session: Session) -> None:
    """Run a group job's cells: the first one still to do answers every cell's missing samples, then each cell in turn.

    Every cell's settings are checked before anything slow. With `force=true` every journal is emptied first
    and each cell is recomputed. A cell in which every sample failed does not stop the others; the job
    raises `CellFailed` for them at the end.
    """
    from dycoke_eval import distributed
    from dycoke_eval.store import cell_directory, is_complete, journal_path

    members = group_members(cfg)
    journals = [journal_path(cell_directory(member), distributed.rank()) for member in members]  # this process's own
    if cfg.force:
        clear_journals([journal.parent for journal in journals])
    pending = [i for i, member in enumerate(members) if member.force or not is_complete(journals[i].parent, member)]
    methods = {i: check_cell(members[i]) for i in pending}  # a complete cell is answered from the store, unbuilt
    leader, others = pending[:1], pending[1:]  # no leader when every cell is complete: each is skipped
    companions = []  # the leader's
    if others:
        from dycoke_eval.wrapper import Companion  # the model stack, which only a group with cells to run needs

        companions = [Companion(methods[i], str(journals[i])) for i in others]
    passes, failed = [], []
    for index in leader + [i for i in range(len(members)) if i not in leader]:
        try:
            passes.append(run_cell(members[index], session, companions if index in leader else [], clear_journal=False))
        except CellFailed as error:  # no sample of it answered, so it ran no encoder pass either
            failed.append(str(error))
    counts = distributed.summed({"done": sum(p.done for p in passes), "saved": sum(p.saved for p in passes)})
    if distributed.is_main():
        described = describe_group(members)
        print(f"group of {len(members)} cells ({described}): encoder passes: {counts['done']} done, {counts['saved']} saved")
    if failed:
        raise CellFailed("\n".join(failed))


def describe_group(members: list[DictConfig]) -> str:
    """`tiny, 4 frames, fixtures: full, dycoke, ...`: what the cells share, then their methods."""
    from dycoke_eval.store import cell_method_name

    first = members[0]
    return f"{first.model.name}, {first.frames} frames, {first.tasks.name}: {', '.join(map(cell_method_name, members))}"
