"""A cell's life: checked before anything slow, run through lmms-eval, written to its folder, judged.

A cell is model x method x frames x task set. `run_cell` prepares the environment (HF_HOME, the tiny
checkpoint and fixture tasks when asked for), checks every name before any model is loaded, evaluates
through lmms-eval's `simple_evaluate`, and writes the cell's folder; a complete cell is answered from
its folder. The app runs one cell, a group job (`groups.py`) several, each with the process's `Session`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from dycoke_eval.config import ConfigError
from dycoke_eval.encoder_cache import EncoderPasses
from dycoke_eval.task_index import TaskIndex, check_task_names

if TYPE_CHECKING:
    from dycoke_eval.checkpoints import CheckpointLoader
    from dycoke_eval.wrapper import Companion


class Session:
    """What a process keeps from one cell to the next (a sweep's jobs run one after another in it).

    The loaded checkpoint with its encoder cache (`checkpoints`: consecutive cells on one model load it once),
    and lmms-eval's task index. The loader is made at the first cell that loads a model, so a command refused
    by its checks never imports torch.
    """

    def __init__(self, task_index: TaskIndex | None = None) -> None:
        self.task_index = task_index or TaskIndex()
        self._checkpoints: CheckpointLoader | None = None

    @property
    def checkpoints(self) -> CheckpointLoader:
        if self._checkpoints is None:
            from dycoke_eval.checkpoints import CheckpointLoader

            self._checkpoints = CheckpointLoader()
        return self._checkpoints


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


# Checking a cell


def check_cell(cfg: DictConfig):
    """Check a cell's settings before anything slow (task index, model load), in about a second; returns its method.

    Frames, prompt form and task names (against the task YAMLs) are checked first, then the method's
    settings, then the method against the model's HF config (its known `architecture`, no download).
    """
    check_run_settings(cfg)
    check_task_names(list(cfg.tasks.names), Path(cfg.offline_dir))

    from dycoke_eval.compression.stages import routes_attention
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
        adapter.check_settings(*(cfg.model.get(name) for name in ("min_pixels", "max_pixels", "position_numbering")))
        method.validate_for(adapter.model_info(config, bool(cfg.model.get("siglip_head"))))
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


# Preparing the environment


def prepare_environment(cfg: DictConfig) -> list[Path]:
    """Set the process environment lmms-eval and HF read at import; write task YAMLs and offline assets.

    Returns the folders of our task YAMLs, for lmms-eval's TaskManager. Under several processes rank 0 writes
    them first and the others then find them in place.
    """
    from dycoke_eval.distributed import main_process_first

    with main_process_first():
        return _prepare_environment(cfg)


def builds_tiny(model_cfg: DictConfig, offline_dir: str) -> bool:
    """A tiny random checkpoint is built only where a tiny model config keeps it, in the offline folder: a
    `model.pretrained` pointed elsewhere names a real checkpoint, which must exist (`locate_checkpoint`)."""
    pretrained = Path(model_cfg.pretrained).expanduser().resolve()
    return bool(model_cfg.build_tiny) and pretrained.is_relative_to(Path(offline_dir).expanduser().resolve())


def _prepare_environment(cfg: DictConfig) -> list[Path]:  # the app has set the hub's offline switches first
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
        from dycoke_eval.offline.architectures import TINY_QWEN
        from dycoke_eval.offline.tiny_model import ensure_tiny_checkpoint
        from dycoke_eval.offline.tiny_qwen import ensure_tiny_qwen_checkpoint

        if cfg.model.get("architecture") in TINY_QWEN:
            ensure_tiny_qwen_checkpoint(cfg.model.pretrained, TINY_QWEN[cfg.model.architecture])
        else:
            ensure_tiny_checkpoint(cfg.model.pretrained)
        if cfg.model.get("siglip_head"):
            from dycoke_eval.offline.tiny_model import ensure_tiny_siglip_head

            ensure_tiny_siglip_head(cfg.model.siglip_head)
    return task_dirs


# Running a cell


def run_cell(
    cfg: DictConfig, session: Session, companions: Sequence[Companion] = (), clear_journal: bool = True
) -> EncoderPasses:
    """Evaluate one cell and write its folder; returns this process's encoder work for it (none for a complete cell).

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
        return EncoderPasses()
    method = check_cell(cfg)  # before anything slow

    from dycoke_eval.checkpoints import locate_checkpoint
    from dycoke_eval.plans import plan_row
    from dycoke_eval.plumbing.attention import kernel_name
    from dycoke_eval.provenance import hardware
    from dycoke_eval.store import format_efficiency, journal_path, write_cell

    if cfg.force and clear_journal:
        clear_journals([cell_dir])
    task_dirs = prepare_environment(cfg)
    if not cfg.model.get("random_weights"):
        locate_checkpoint(cfg.model.pretrained)  # before the task index and the model load
    task_manager = session.task_index.resolve(list(cfg.tasks.names), task_dirs, cfg.seed)

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
        min_pixels=cfg.model.get("min_pixels"),
        max_pixels=cfg.model.get("max_pixels"),
        position_numbering=cfg.model.get("position_numbering"),
        max_new_tokens=generation_cap(cfg),
        journal=str(journal_path(cell_dir, distributed.rank())),
        companions=companions,
        prefetch_depth=cfg.prefetch_depth,
        prefetch_workers=cfg.prefetch_workers,
        preprocess_device=cfg.preprocess_device,
        static_decoding=cfg.static_decoding,
        seed=cfg.seed,
        checkpoints=session.checkpoints,
    )
    if builds_tiny(cfg.model, cfg.offline_dir) and distributed.is_main():
        print(f"model: {cfg.model.name} (RANDOM weights: its accuracies are meaningless; the run exercises the path)")
    if cfg.model.get("random_weights") and distributed.is_main():
        print(f"model: {cfg.model.name} with RANDOM weights at real dimensions: latency and memory only, accuracy is meaningless")
    if cfg.measure:
        lm.warm_up(cfg.warmup)
        lm.encoder_cache.capacity_bytes = 0  # measured cells pay for their own video decode and encoder
    else:
        lm.encoder_cache.capacity_bytes = int(cfg.encoder_cache_mb * 2**20)
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
    passes = lm.encoder_passes
    records = _gather_records(lm)
    counts = distributed.summed({"passes": passes.done, "hits": passes.cache_hits, "saved": passes.cache_seconds})
    machines = distributed.gather(hardware())
    if not distributed.is_main():
        return passes
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
    write_cell(cell_dir, cfg, output, records, method.describe(lm.adapter.family), plan_row(cfg), runtime)
    if cfg.measure:
        print(format_efficiency(cell_dir.name, records))
    resumed = sum(record["from_journal"] for record in records)
    group = f" (and {len(companions)} more cells of its group)" if companions else ""
    processes = f" over {len(machines)} processes" if len(machines) > 1 else ""
    print(
        f"cell {cell_dir.name}: {len(records) - resumed} samples generated, {resumed} resumed from its journal, "
        f"{counts['passes']} encoder passes{group}, {counts['hits']} encoder-cache hits "
        f"({counts['saved']:.1f} s saved){processes}; "
        f"checkpoint loads in this process: {session.checkpoints.loads}"
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
    return passes


def generation_cap(cfg: DictConfig) -> int | None:
    """New tokens per answer: the run's `max_new_tokens` and the model's `generation_cap`, whichever is smaller."""
    caps = [cap for cap in (cfg.max_new_tokens, cfg.model.get("generation_cap")) if cap]
    return min(caps) if caps else None


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


# A saved cell


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


# While lmms-eval evaluates


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


@contextmanager
def interruptible(cell_dir: Path) -> Iterator[None]:
    """Ctrl-C inside the block becomes `Interrupted`: one line saying what is saved, not a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(cell_dir) from None


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
