"""The Hydra app: `python -m dycoke_eval [overrides]` runs one cell; `+sweep=NAME` runs a sweep of cells.

A cell is model x method x frames x task set. It prepares the environment (offline switches,
HF_HOME, the tiny checkpoint and fixture tasks when asked for), checks every name before any
model is loaded, evaluates through lmms-eval's `simple_evaluate`, and writes the cell's folder.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from dycoke_eval.config import CONF_DIR, ConfigError, group_options
from dycoke_eval.groups import GROUP_KEY, Companion, run_group


class CellFailed(Exception):
    """Every sample of a cell failed: nothing was measured, and the cell is not recorded as complete."""


class Interrupted(Exception):
    """Ctrl-C during a cell: its journal keeps every finished sample, and the same command resumes."""

    def __init__(self, cell_dir: Path) -> None:
        from dycoke_eval.store import SampleJournal, journal_path

        saved = len(SampleJournal(journal_path(cell_dir)))
        super().__init__(
            f"interrupted: {saved} finished samples of cell {cell_dir.name} are saved; "
            "run the same command again to resume where it stopped"
        )


def prepare_environment(cfg: DictConfig) -> list[Path]:
    """Set the process environment lmms-eval and HF read at import; write task YAMLs and offline assets.

    Returns the folders of our task YAMLs, for lmms-eval's TaskManager. Under several processes rank 0 writes
    them first and the others then find them in place.
    """
    from dycoke_eval.distributed import main_process_first

    with main_process_first():
        return _prepare_environment(cfg)


def set_hub_offline(cfg: DictConfig) -> None:
    """`hub_offline=true`: huggingface_hub, datasets and transformers read these once, when first imported, so
    they are set before anything (the checks included) imports them."""
    if cfg.hub_offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"


def builds_tiny(model_cfg: DictConfig, offline_dir: str) -> bool:
    """A tiny random checkpoint is built only where a tiny model config keeps it, in the offline folder: a
    `model.pretrained` pointed elsewhere names a real checkpoint, which must exist (`locate_checkpoint`)."""
    pretrained = Path(model_cfg.pretrained).expanduser().resolve()
    return bool(model_cfg.build_tiny) and pretrained.is_relative_to(Path(offline_dir).expanduser().resolve())


def _prepare_environment(cfg: DictConfig) -> list[Path]:  # `main` has set the hub's offline switches first
    from dycoke_eval.task_configs import write_deferred_judge_tasks

    task_dirs = [write_deferred_judge_tasks(Path(cfg.offline_dir) / "tasks")]
    if cfg.tasks.local_fixtures:
        from dycoke_eval.offline.fixtures import ensure_offline_world

        world = ensure_offline_world(Path(cfg.offline_dir) / "world")
        os.environ["HF_HOME"] = str(world.hf_home)
        task_dirs.append(world.task_dir)
    elif cfg.hf_home:
        os.environ["HF_HOME"] = str(Path(cfg.hf_home).expanduser())
    else:
        os.environ.setdefault("HF_HOME", str(Path("~/.cache/huggingface").expanduser()))
    if builds_tiny(cfg.model, cfg.offline_dir):
        from dycoke_eval.offline.tiny_model import ensure_tiny_checkpoint

        ensure_tiny_checkpoint(cfg.model.pretrained)
        if cfg.model.get("siglip_head"):
            from dycoke_eval.offline.tiny_model import ensure_tiny_siglip_head

            ensure_tiny_siglip_head(cfg.model.siglip_head)
    return task_dirs


def check_cell(cfg: DictConfig):
    """Check a cell's settings before anything slow (task index, model load), in about a second; returns its method.

    Frames, prompt form and task names (against the task YAMLs) are checked first, then the method's
    settings, then the method against the model's HF config (its known `architecture`, no download).
    """
    check_run_settings(cfg)
    check_task_names(list(cfg.tasks.names), Path(cfg.offline_dir))

    from dycoke_eval.compression.stages import ModelInfo, routes_attention
    from dycoke_eval.config import check_routable
    from dycoke_eval.models import adapter_class, checkpoint_config

    method = build_method(cfg.method)
    if routes_attention(method):
        check_routable(cfg.model.attn_implementation, method.name)
    if cfg.static_decoding:
        from dycoke_eval.compression.dispatcher import Compressor

        Compressor(None, method).check_static_decoding()
    if cfg.model.get("architecture"):  # known without a download; other checkpoints are checked when they load
        config = checkpoint_config(cfg.model.architecture, cfg.model.pretrained)
        adapter = adapter_class(config, cfg.model.pretrained, cfg.model.get("adapter"))
        signals = adapter.available_signals(config, bool(cfg.model.get("siglip_head")))
        method.validate_for(ModelInfo(adapter.dimensions(config).layers, signals))
    return method


def check_run_settings(cfg: DictConfig) -> None:
    """The run settings every cell and dry run uses: frames, prompt form and limit (lmms-eval reads a limit below 1 as
    a fraction of each task, any other number as a count, and a negative one as no limit at all)."""
    from dycoke_eval.prompts import PROMPT_FORMS

    if isinstance(cfg.frames, bool) or not isinstance(cfg.frames, int) or cfg.frames < 1:
        raise ConfigError(f"frames={cfg.frames!r}: sample an integer number of frames >= 1 per video (the papers use 16 or 32)")
    if cfg.prompt not in PROMPT_FORMS:
        raise ConfigError(f"prompt={cfg.prompt!r}; use one of {', '.join(PROMPT_FORMS)}")
    if not isinstance(cfg.static_decoding, bool):
        raise ConfigError(f"static_decoding={cfg.static_decoding!r}: true or false")
    limit = cfg.limit
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 < limit
                              or (isinstance(limit, float) and limit >= 1)):  # fmt: skip
        raise ConfigError(
            f"limit={limit!r}: give a number of documents per task (an integer >= 1), a fraction in (0, 1), "
            "or limit=null for every document"
        )


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


def build_method(method_cfg):
    """`instantiate(method_cfg)`, with a bad setting reported as the ConfigError the method raised (not Hydra's wrapper)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(method_cfg)
    except InstantiationException as error:
        if isinstance(error.__cause__, ConfigError):
            raise error.__cause__ from None
        raise


def check_task_names(names: list[str], offline_dir: Path) -> None:
    """Refuse unknown task names at once: a quick scan of the task YAMLs, then lmms-eval's full index, kept on disk."""
    ours = own_task_names()
    if all(name in ours for name in names) or not (set(names) - ours - declared_task_names()):
        return
    known = ours | indexed_task_names(offline_dir)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(_unknown_tasks_message(unknown, sorted(known)))


def own_task_names() -> set[str]:
    """The tasks whose YAMLs this project writes: the fixture copies and the deferred-judge variants."""
    from dycoke_eval.offline.fixtures import FIXTURE_TASK_NAMES
    from dycoke_eval.task_configs import DEFERRED_TASKS

    return {*FIXTURE_TASK_NAMES, *DEFERRED_TASKS}


def declared_task_names() -> set[str]:
    """Names declared by a `task:`, `group:` or `tag:` line of lmms-eval's task YAMLs (a fraction of a second).

    Some tasks are generated from templates and appear only in lmms-eval's full index.
    """
    from dycoke_eval.config import lmms_eval_tasks_dir

    names = set()
    for path in lmms_eval_tasks_dir().rglob("*.yaml"):
        for line in path.read_text(errors="ignore").splitlines():
            key, _, value = line.partition(":")
            if key in ("task", "group", "tag") and value.strip() and not value.strip().startswith(("!", "[")):
                names.add(value.strip().strip("'\""))
    return names


def indexed_task_names(offline_dir: Path) -> set[str]:
    """Every name lmms-eval's TaskManager knows, built once per lmms-eval version and kept in `offline_dir`."""
    import json
    from importlib import metadata

    from dycoke_eval.store import write_json_atomic

    path = offline_dir / f"lmms-eval-{metadata.version('lmms-eval')}-task-names.json"
    if path.exists():
        return set(json.loads(path.read_text()))
    names = sorted(task_manager([]).all_tasks)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, names)
    return set(names)


def _unknown_tasks_message(unknown: list[str], known: list[str]) -> str:
    hints = {name: difflib.get_close_matches(name, known, n=3) for name in unknown}
    names = "; ".join(f"unknown task {name!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for name, h in hints.items())
    return (
        f"{names}; task sets: tasks={','.join(group_options('tasks'))}, and any of lmms-eval's {len(known)} tasks "
        "(`python -m lmms_eval tasks` lists them)"
    )


def quiet_libraries(verbose: bool) -> None:
    """Unless `verbose=true`, keep the libraries' chatter out of a run's output: our progress bars and summaries stay.

    lmms-eval's task-index DEBUG lines (loguru), dataset and weight-loading progress bars, its postprocessing
    bars and INFO lines of other libraries (`__main__` disables other libraries' tqdm bars before tqdm loads;
    ours pass `disable` explicitly). nltk's download errors (NExT-QA's utils try to fetch data on
    every load) are dropped from stderr while tasks load (`filtered_stderr`).
    """
    if verbose:
        return
    import logging

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    logging.getLogger("numexpr").setLevel(logging.WARNING)


NOISE_PREFIXES = ("[nltk_data]", "Postprocessing:")  # stderr lines a quiet run drops (nltk's errors, lmms-eval's bars)


class filtered_stderr:  # noqa: N801 - used as a context manager, like contextlib's
    """Within the block, stderr lines starting with one of NOISE_PREFIXES are dropped (unless verbose)."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose

    def __enter__(self):
        self.dropping = False  # print() writes a line's text and its newline separately
        if not self.verbose:
            self.stream, sys.stderr = sys.stderr, self
        return self

    def __exit__(self, *exc) -> None:
        if not self.verbose:
            sys.stderr = self.stream

    def write(self, text: str) -> int:
        kept = []
        for line in text.splitlines(keepends=True):
            if line.lstrip("\r").startswith(NOISE_PREFIXES) or (self.dropping and line == "\n"):
                self.dropping = not line.endswith("\n")
                continue
            self.dropping = False
            kept.append(line)
        if kept:
            self.stream.write("".join(kept))
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def resolve_tasks(names: list[str], task_dirs: list[Path], seed: int = 0):
    """A TaskManager that knows our task YAMLs, after checking every requested name exists; `seed` seeds the
    scorers that draw from `random` (`scoring.py`). Only our own tasks: lmms-eval's built-in ones are not indexed."""
    manager = task_manager(task_dirs, seed, builtins=not set(names) <= own_task_names())
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ConfigError(_unknown_tasks_message(unknown, sorted(manager.all_tasks)))
    return manager


_TASK_MANAGERS: dict[tuple, Any] = {}


def task_manager(task_dirs: list[Path], seed: int = 0, builtins: bool = True):
    """lmms-eval's TaskManager for `task_dirs`, seeding scorers that draw (`scoring.py`); one per process per folders.

    With `builtins` it also indexes all of lmms-eval's ~2,000 task YAMLs (about 8 s of CPU), and every cell
    of a sweep asks for the same one; our own tasks (fixtures, deferred judging) include their built-in
    YAMLs by path, so a run of only those indexes its folders alone. The key holds the folders and their
    YAMLs' names and text, so a task
    written or renamed in them later is still found. The index is all a reused manager carries over;
    the tasks themselves are loaded afresh from their YAMLs by each evaluation.
    """
    import collections

    from dycoke_eval.scoring import SeededScoringTaskManager

    include = [str(path) for path in task_dirs]
    key = (builtins, *((path, _yaml_texts(Path(path))) for path in include))
    if (manager := _TASK_MANAGERS.get(key)) is None:
        manager = _TASK_MANAGERS[key] = SeededScoringTaskManager(include_path=include, include_defaults=builtins)
    manager.task_group_map = collections.defaultdict(list)  # per-load bookkeeping (duplicate subtasks), fresh as a new one's
    manager.seed, manager.seeded = seed, set()  # this run's
    return manager


def _yaml_texts(folder: Path) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(path), path.read_text()) for path in folder.rglob("*.yaml") if path.is_file()))


def run_cell(cfg: DictConfig, companions: Sequence[Companion] = (), clear_journal: bool = True) -> Path:
    """Evaluate one cell and write its folder; returns the folder.

    `companions`: the other cells of its sample-major group, answered from the same
    encoder passes into their own journals. `clear_journal=False` keeps the journal under `force=true`: a
    group empties its cells' journals before its first cell runs, and the others then read what it wrote.
    """
    from hydra.utils import instantiate

    from dycoke_eval import distributed
    from dycoke_eval.store import cell_directory, is_complete

    cell_dir = cell_directory(cfg)
    if is_complete(cell_dir, cfg) and not cfg.force:  # answered from the store: the model stack is not even imported
        if distributed.is_main():
            show_complete_cell(cell_dir)
            if (settings := instantiate(cfg.judge)).enabled():
                judge_saved_cell(cell_dir, settings)  # finishes judging a run that died while judging; cached replies are free
        return cell_dir
    method = check_cell(cfg)  # before anything slow

    from dycoke_eval import checkpoints
    from dycoke_eval.encoder_cache import ENCODER_CACHE
    from dycoke_eval.groups import ENCODER_PASSES
    from dycoke_eval.plans import plan_row
    from dycoke_eval.plumbing.attention import kernel_name
    from dycoke_eval.provenance import hardware
    from dycoke_eval.store import format_efficiency, journal_path, write_cell

    if cfg.force and clear_journal:
        clear_journals([cell_dir])
    task_dirs = prepare_environment(cfg)
    if not cfg.model.get("random_weights"):
        checkpoints.locate_checkpoint(cfg.model.pretrained)  # before the task index and the model load
    task_manager = resolve_tasks(list(cfg.tasks.names), task_dirs, cfg.seed)

    from lmms_eval.evaluator import simple_evaluate

    from dycoke_eval.wrapper import CompressedVideoLM

    lm = CompressedVideoLM(
        pretrained=cfg.model.pretrained,
        frames=cfg.frames,
        method=method,
        device=cfg.model.device,
        dtype=cfg.model.dtype,
        attn_implementation=cfg.model.attn_implementation,
        prompt=cfg.prompt,
        device_map=cfg.model.get("device_map"),
        measure=cfg.measure,
        random_weights_architecture=cfg.model.architecture if cfg.model.get("random_weights") else None,
        adapter=cfg.model.get("adapter"),
        siglip_head=cfg.model.get("siglip_head"),
        max_new_tokens=generation_cap(cfg),
        journal=str(journal_path(cell_dir, distributed.rank())),
        companions=companions,
        prefetch_depth=cfg.prefetch_depth,
        prefetch_workers=cfg.prefetch_workers,
        preprocess_device=cfg.preprocess_device,
        static_decoding=cfg.static_decoding,
        seed=cfg.seed,
    )
    if builds_tiny(cfg.model, cfg.offline_dir) and distributed.is_main():
        print(f"model: {cfg.model.name} (RANDOM weights: its accuracies are meaningless; the run exercises the path)")
    if cfg.model.get("random_weights") and distributed.is_main():
        print(f"model: {cfg.model.name} with RANDOM weights at real dimensions: latency and memory only, accuracy is meaningless")
    if cfg.measure:
        lm.warm_up(cfg.warmup)
        ENCODER_CACHE.capacity_bytes = 0  # measured cells pay for their own video decode and encoder
    else:
        ENCODER_CACHE.capacity_bytes = int(cfg.encoder_cache_mb * 2**20)
    cache_before = (ENCODER_CACHE.hits, ENCODER_CACHE.seconds_saved, ENCODER_PASSES.done)
    with filtered_stderr(cfg.verbose), interruptible(cell_dir), task_data_errors():
        output = simple_evaluate(
            model=lm,
            tasks=list(cfg.tasks.names),
            limit=cfg.limit,
            task_manager=task_manager,
            log_samples=True,
            random_seed=cfg.seed,
            numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed,
            bootstrap_iters=0,
        )
    records = _gather_records(lm)
    counts = distributed.summed(
        {
            "passes": ENCODER_PASSES.done - cache_before[2],
            "hits": ENCODER_CACHE.hits - cache_before[0],
            "saved": ENCODER_CACHE.seconds_saved - cache_before[1],
        }
    )
    machines = distributed.gather(hardware())
    if not distributed.is_main():
        return Path()
    runtime = {
        "device": str(lm.device),
        "dtype": str(lm.model.dtype),
        "attn_implementation": kernel_name(lm.adapter.language_model),
        "attention_kernels": sorted({r["method_stats"].get("attention_kernel") for r in records} - {None})
        or [kernel_name(lm.adapter.language_model)],
        "prompt": cfg.prompt,
        "max_new_tokens": lm.max_new_tokens,  # the cap in force, the checkpoint's own included
        "random_weights": bool(cfg.model.get("random_weights")),
        "measured": bool(cfg.measure),
        "processes": len(machines),
        "hardware_by_rank": machines,
        "seeded_scorers": sorted(task_manager.seeded),  # tasks whose scorer's random draws are seeded per document
    }
    write_cell(cell_dir, cfg, output, records, method.describe(), plan_row(cfg), runtime)
    if cfg.measure:
        print(format_efficiency(cell_dir.name, records))
    resumed = sum(record["from_journal"] for record in records)
    group = f" (and {len(companions)} more cells of its group)" if companions else ""
    processes = f" over {len(machines)} processes" if len(machines) > 1 else ""
    print(
        f"cell {cell_dir.name}: {len(records) - resumed} samples generated, {resumed} resumed from its journal, "
        f"{counts['passes']} encoder passes{group}, {counts['hits']} encoder-cache hits "
        f"({counts['saved']:.1f} s saved){processes}; "
        f"checkpoint loads in this process: {checkpoints.LOAD_COUNT}"
    )
    failures = [r for r in records if r["status"] != "ok"]
    if failures and len(failures) == len(records):
        reasons = [f"{r['task']} doc {r['doc_id']} ({r['video_path'] or 'video not located'}): {r['error']}" for r in failures]
        raise CellFailed(
            f"cell {cell_dir.name}: all {len(records)} samples failed, so it is not complete. Reasons:\n  "
            + "\n  ".join(reasons[:10] + ([f"... and {len(reasons) - 10} more"] if len(reasons) > 10 else []))
        )
    if failures:
        print(
            f"cell {cell_dir.name}: {len(failures)} samples FAILED and the cell is not complete; "
            "run the same command again to retry them"
        )
    judge_saved_cell(cell_dir, instantiate(cfg.judge))
    return cell_dir


def show_complete_cell(cell_dir: Path) -> None:
    """A finished cell's metrics, as its run printed them, read from its folder."""
    from dycoke_eval.store import CellError, format_summary, read_cell

    print(f"cell {cell_dir.name}: complete, skipped (force=true reruns it)")
    try:
        cell = read_cell(cell_dir)
    except CellError as error:
        print(f"  its results cannot be shown: {error}")
        return
    print(format_summary(cell_dir, cell.metrics, cell.summaries))


def generation_cap(cfg: DictConfig) -> int | None:
    """New tokens per answer: the run's `max_new_tokens` and the model's `generation_cap`, whichever is smaller."""
    caps = [cap for cap in (cfg.max_new_tokens, cfg.model.get("generation_cap")) if cap]
    return min(caps) if caps else None


def judge_saved_cell(cell_dir: Path, settings) -> None:
    """Judge the cell's GPT-judged tasks now if a judge is configured; otherwise say how to later."""
    from dycoke_eval.judge.cells import format_judge_summary, judge_cell
    from dycoke_eval.judge.client import Judge, JudgeUnavailable, judge_label

    later = f"judge later with: python -m dycoke_eval.judge {cell_dir}"
    if not settings.enabled():
        print(f"judge: not configured (no ${settings.api_key_env}, no judge.base_url): judged metrics stay 'not judged'; {later}")
        return
    try:
        summary = judge_cell(cell_dir, Judge(settings))
    except JudgeUnavailable as error:  # the cell's answers are saved; only its judged metrics wait
        print(f"judge: {error}; judged metrics stay as they were; {later}")
        return
    if summary:
        print(f"judge ({judge_label(settings.endpoint(), settings.model)}):\n{format_judge_summary(summary)}")


def clear_journals(cell_dirs: Sequence[Path]) -> None:
    """`force=true`: rank 0 removes every process's journal of the cells, before any process appends to one."""
    from dycoke_eval import distributed
    from dycoke_eval.store import journal_files

    if distributed.is_main():
        for cell_dir in cell_dirs:
            for journal in journal_files(cell_dir):
                journal.unlink()
    distributed.barrier()


def _gather_records(lm) -> list[dict[str, Any]]:
    """Every process's sample records, in the order one process records them: task by task, documents in order."""
    from dycoke_eval import distributed

    per_rank = distributed.gather(lm.records_as_dicts())
    records = [record for rank_records in per_rank for record in rank_records]
    task_order = {task: index for index, task in enumerate(dict.fromkeys(record["task"] for record in records))}
    return sorted(records, key=lambda record: (task_order[record["task"]], record["doc_id"]))


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        from dycoke_eval.distributed import adopt_submitit_tasks

        adopt_submitit_tasks()  # a submitit job's tasks (SLURM tasks_per_node) become the ranks of a data-parallel run
        set_hub_offline(cfg)
        quiet_libraries(cfg.verbose)
        check_run_settings(cfg)
        if cfg.dry_run:  # a single cell's plan; sweeps plan all their cells in the grids sweeper
            from dycoke_eval import distributed
            from dycoke_eval.plans import write_plan

            if distributed.is_main():
                write_plan([cfg], Path(cfg.results_dir) / cfg.run_name / "plan.csv")
        elif cfg.get(GROUP_KEY) is not None:  # a sweep's job for a sample-major group of cells
            run_group(cfg)
        else:
            run_cell(cfg)
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


def cli() -> None:
    """The command: group choices (`method=NAME`, ...) checked before Hydra composes them, then `main`."""
    from dycoke_eval.config import check_group_choices

    try:
        check_group_choices(sys.argv[1:])
        check_results_dir(sys.argv[1:])
    except ConfigError as error:
        refuse(error)
    main()


@contextmanager
def task_data_errors() -> Iterator[None]:
    """A task whose data cannot be loaded (lmms-eval loads each task's dataset as the evaluation starts, retrying)
    becomes one line naming the task, its dataset, where it was looked for and how to get it."""
    try:
        yield
    except Exception as error:
        from lmms_eval.api.task import Task

        loading, traceback = [], error.__traceback__
        while traceback is not None:  # a Task's frames while it loads its dataset: its constructor and `download`
            frame = traceback.tb_frame
            if isinstance(frame.f_locals.get("self"), Task) and frame.f_code.co_name in ("__init__", "download"):
                loading.append(frame.f_locals["self"])
            traceback = traceback.tb_next
        if not loading:
            raise
        task, cause = loading[-1], _root_cause(error)
        from dycoke_eval.checkpoints import hub_offline

        offline = hub_offline()
        raise ConfigError(
            f"task {task.config.task!r}: its data {task.config.dataset_path!r} could not be loaded from "
            f"HF_HOME={os.environ.get('HF_HOME')} ({type(cause).__name__}{', the hub is offline' if offline else ''}); "
            f"download it where the hub is reachable (`hf download {task.config.dataset_path} --repo-type dataset`, "
            "videos as the task's lmms-eval README says) and point hf_home= at that folder"
        ) from None


def _root_cause(error: BaseException) -> BaseException:
    """The first failure under retries (tenacity's RetryError) and re-raises."""
    while True:
        attempt = getattr(error, "last_attempt", None)
        inner = attempt.exception() if attempt is not None else (error.__cause__ or error.__context__)
        if inner is None:
            return error
        error = inner


@contextmanager
def interruptible(cell_dir: Path) -> Iterator[None]:
    """Ctrl-C inside the block becomes `Interrupted`: one line saying what is saved, not a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(cell_dir) from None


def run_in_process(overrides: list[str]) -> int:
    """`python -m dycoke_eval *overrides`, run in this process; returns the exit status the command would give.

    Hydra reads `overrides` from the command line exactly as it does for the command (a run or a sweep,
    its error messages), and `main` handles failures as it does there: a message on stderr and status 1.
    The process keeps what a run leaves behind: the environment it sets, the loaded checkpoint, the
    encoder cache and the task index (the caller isolates runs where that matters, as the tests do).
    """
    argv = sys.argv
    sys.argv = [str(Path(__file__).with_name("__main__.py")), *overrides]  # what `python -m dycoke_eval` sees
    try:
        cli()
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
