"""The cell store: the one place that reads and writes a run cell's folder.

Layout of `${results_dir}/cells/<cell>/` (cells are shared by every sweep that lists them; other
tools and the nightly read these names, so they never change):
  results.json            lmms-eval's results (metrics, configs, versions) plus a `dycoke_eval` summary per task
  samples_<task>.jsonl    lmms-eval's logged samples
  sample_records.jsonl    per sample: visual tokens, stage seconds, failures (`SampleRecord`)
  run.json                resolved config, method settings, plan, versions, git commit, hardware, runtime
  journal.jsonl           finished samples, appended as they finish, so a killed cell resumes (`SampleJournal`);
  journal.rank<r>.jsonl   under several processes, rank r's own (r > 0): no file has two writers, readers merge them
  judgements_<task>.jsonl per sample of a GPT-judged task: the verdict held and the judge (endpoint, models) that gave it

Every whole-file write goes through `write_json_atomic` / `write_jsonl_atomic`, so a reader never
sees half a file. Reading tolerates folders written before `run.json` carried a `format`
(format 1: no recorded plan, retained ratio only in `method_stats`); a folder that is not a cell
raises `CellError`, whose message names it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dycoke_eval.provenance import git_state, hardware, package_versions
from dycoke_eval.timing import PIPELINE_STAGES

FORMAT = 2  # run.json's `format`; folders without one are format 1 (no plan, no standard retained ratio)
CELL_KEYS = ("model", "method", "frames", "prompt", "tasks", "limit", "seed", "max_new_tokens")  # what makes two cells the same
NOT_SETTINGS = {"name", "paper_retained_ratio", "planned_ratio", "compile_ttm"}  # derived, plan-only or how it computes
RUN_FILE, RESULTS_FILE, RECORDS_FILE, JOURNAL_FILE = "run.json", "results.json", "sample_records.jsonl", "journal.jsonl"
JOURNAL_GLOB = "journal*.jsonl"  # every process's journal of a cell
CELL_FILES = (RUN_FILE, RESULTS_FILE, JOURNAL_FILE)  # a folder with none of these is not a cell
FORCE_HINT = "re-run it with force=true"


class CellError(Exception):
    """A folder that cannot be read as a cell; the message names the folder and what is wrong."""


# Writing whole files


def write_json_atomic(path: Path, payload: Any, sort_keys: bool = False) -> None:
    """Write JSON next to `path`, then rename over it: readers see the old file or the new one, never half of one."""
    write_text_atomic(Path(path), json.dumps(payload, indent=2, default=str, sort_keys=sort_keys))


def write_jsonl_atomic(path: Path, rows: Iterable[Any]) -> None:
    """One JSON document per line, written as `write_json_atomic` writes."""
    write_text_atomic(Path(path), "".join(json.dumps(row, default=str) + "\n" for row in rows))


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` beside `path` (a name of this process's own), then rename over it."""
    # The text is complete before anything touches the disk, so a payload that fails to serialise changes nothing.
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CellError(f"{path}: not readable as JSON ({error})") from None


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise CellError(f"{path}: line {number} is not JSON ({error})") from None
    return rows


# Per-sample records and the journal


@dataclass
class SampleRecord:
    """What the wrapper measured for one sample; one line of `sample_records.jsonl` and of the journal."""

    task: str
    doc_id: int
    status: str = "ok"  # ok | failed
    video_path: str | None = None
    error: str | None = None
    frames: int = 0
    video_frame_count: int | None = None  # frames in the video file
    sampled_indices: list[int] = field(default_factory=list)  # the frame indices that entered the model
    video_fps: float | None = None  # the video file's frame rate (Qwen-VL numbers its frames in time with it)
    token_grid: list[int] = field(default_factory=list)  # the video's tokens as [frames (or temporal patches), rows, cols]
    pixel_bounds: dict[str, int] | None = None  # min_pixels, max_pixels frames were resized within (None: a fixed size)
    visual_tokens_in: int = 0  # visual tokens that entered the LLM (newline token included)
    visual_tokens_full: int = 0  # what the full-token model would have used
    visual_tokens_by_stage: dict[str, int] = field(default_factory=dict)  # visual tokens after each compression stage, in order
    prefill_visual_by_layer: list[int] = field(default_factory=list)  # visual tokens each LLM layer processed in prefill
    decode_visual_by_layer: list[float] = field(default_factory=list)  # per layer: mean visual tokens attended per decode step
    retained_ratio: float | None = None  # the sample's standard retained ratio (None: the method did not report one)
    # the LLM's prefill TFLOPs from the visual tokens each layer processed and the prompt's text (accounting.py)
    prefill_tflops_real: float | None = None
    input_tokens: int = 0  # the prompt that entered the LLM: text and visual tokens
    output_tokens: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    method_stats: dict[str, Any] = field(default_factory=dict)
    encoder_cache_hit: bool = False  # decode and encoder skipped: features reused from an earlier cell
    encoder_shared: bool = False  # decode and encoder paid by another cell of its sample-major group, in the same pass
    memory: dict[str, float] = field(default_factory=dict)  # measure mode: peak memory (GB)
    kv_cache_bytes: int = 0  # measure mode: the cache's keys and values after generation
    decode_step_seconds: list[float] = field(default_factory=list)  # measure mode: every decode step
    from_journal: bool = False  # answered by an earlier, interrupted run of this cell

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SampleRecord:
        """Unknown keys (newer writers) are ignored and missing ones (older writers) take their defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def journal_path(cell_dir: Path, rank: int = 0) -> Path:
    """The journal that process `rank` appends to: `journal.jsonl` for rank 0 (and a single process), else its own."""
    return Path(cell_dir) / (JOURNAL_FILE if rank == 0 else f"journal.rank{rank}.jsonl")


def journal_files(cell_dir: Path) -> list[Path]:
    """Every process's journal of the cell, whatever the number of processes that wrote them."""
    return sorted(Path(cell_dir).glob(JOURNAL_GLOB))


class SampleJournal:
    """Finished samples of one cell, appended and synced one by one, so a killed run resumes where it stopped.

    Each process appends to its own file (`path`, from `journal_path`), so no file ever has two writers (safe on
    NFS too); reading merges every process's file in the folder. A cell killed under N processes thus resumes
    under M, whose shards differ: each sample is found whichever process finished it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._done: dict[str, tuple[str, SampleRecord]] = {}
        for journal in journal_files(self.path.parent):
            for line in journal.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    record = SampleRecord.from_json({**entry["record"], "from_journal": True})
                    self._done.setdefault(entry["key"], (entry["answer"], record))
                except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by the kill: redo that sample
                    continue
        self.resumed = len(self._done)

    def __len__(self) -> int:
        return len(self._done)

    def answers(self) -> dict[str, str]:
        """Every finished sample's answer, by key, whichever process wrote it."""
        return {key: answer for key, (answer, _) in self._done.items()}

    @staticmethod
    def key(task: str, doc_id: int, context: str, gen_kwargs: dict) -> str:
        payload = json.dumps([task, int(doc_id), context, gen_kwargs], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, key: str) -> tuple[str, SampleRecord] | None:
        return self._done.get(key)

    def add(self, key: str, answer: str, record: SampleRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as journal:
            journal.write(json.dumps({"key": key, "answer": answer, "record": asdict(record)}, default=str) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
        self._done[key] = (answer, record)


# A cell's identity


def method_settings(described: dict[str, Any]) -> dict[str, Any]:
    """What a method computes, from its recorded `describe()`: two cells collide only if every setting agrees."""
    return {key: value for key, value in described.items() if key not in NOT_SETTINGS}


def method_label(described: dict[str, Any]) -> str:
    """`fastv(layer=5,ratio=0.35)`: the method's name and every setting, for keys people read."""
    settings = method_settings(described)
    return f"{described['name']}({','.join(f'{key}={settings[key]}' for key in sorted(settings))})"


def cell_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved settings that make two cells the same (`CELL_KEYS`); a method's implementation flags
    (`config.IMPLEMENTATION_FLAGS`: where its data waits, not what it computes) are not among them."""
    from dycoke_eval.config import IMPLEMENTATION_FLAGS

    resolved = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(resolved.get("method"), dict):
        resolved["method"] = {k: v for k, v in resolved["method"].items() if k not in IMPLEMENTATION_FLAGS}
    config = {key: resolved.get(key) for key in CELL_KEYS}
    if resolved.get("static_decoding"):  # a static cache's padded attention can move the last bits: its own cell
        config["static_decoding"] = True
    return config


def cell_directory(cfg: DictConfig) -> Path:
    """`<model>__<method>__f<frames>__<tasks>__<hash>`, the hash over the resolved cell config.

    `<tasks>` is the task set's name only while its task list is the set's own; a list overridden
    on the command line (`tasks.names=[...]`) is named `custom`, never after a set it is not.
    """
    config = cell_config(cfg)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]
    name = f"{cfg.model.name}__{cell_method_name(cfg)}__f{cfg.frames}__{task_set_label(cfg.tasks)}__{digest}"
    return Path(cfg.results_dir) / "cells" / name


def cell_method_name(cfg: DictConfig) -> str:
    """The method's one name (its config's key), in its cell's folder as in its records and report rows: the config's
    `name`, else the name its class gives it, read without building it."""
    if cfg.method.get("name"):
        return str(cfg.method.name)
    from hydra.utils import get_class

    method_class = get_class(str(cfg.method._target_))
    default = {f.name: f.default for f in fields(method_class)}.get("name") if is_dataclass(method_class) else None
    return str(default or method_class.__name__.lower())


def task_set_label(tasks: DictConfig) -> str:
    """The task set's name, or `custom` when its names differ from the set's own list."""
    from dycoke_eval.config import CONF_DIR

    own = CONF_DIR / "tasks" / f"{tasks.name}.yaml"
    if not own.is_file() or list(OmegaConf.load(own).get("names", [])) != list(tasks.names):
        return "custom"
    return str(tasks.name)


def is_complete(cell_dir: Path, cfg: DictConfig) -> bool:
    """A finished cell made from this very config (not merely a folder of the same name); unreadable is not finished."""
    if not (cell_dir / RUN_FILE).exists():
        return False
    try:
        run = RunInfo.read(cell_dir)
    except CellError:
        return False
    return run.complete and run.cell == json.loads(json.dumps(cell_config(cfg), default=str))


# Reading


@dataclass(frozen=True)
class RunInfo:
    """run.json, typed. Every field has a default, so folders written by older versions still read."""

    cell: dict[str, Any] = field(default_factory=dict)  # the CELL_KEYS values the folder was made from
    config: dict[str, Any] = field(default_factory=dict)  # the whole resolved config
    method: dict[str, Any] = field(default_factory=dict)  # the method's describe()
    versions: dict[str, Any] = field(default_factory=dict)
    git: dict[str, Any] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)  # what the loaded model ran with
    plan: dict[str, Any] | None = None  # plans.plan_row at run time (format 2 on)
    complete: bool = False
    failed_samples: int = 0
    finished_at: str | None = None
    format: int = 1

    @classmethod
    def from_json(cls, data: Any, where: Path) -> RunInfo:
        if not isinstance(data, dict):
            raise CellError(f"{where}: run.json holds {type(data).__name__}, not a run description")
        known = {f.name: data[f.name] for f in fields(cls) if data.get(f.name) is not None}
        for name in ("cell", "config", "method", "runtime", "plan"):
            if not isinstance(known.get(name, {}), dict):
                raise CellError(f"{where}: run.json's {name!r} is not an object")
        return cls(**known)

    @classmethod
    def read(cls, cell_dir: Path) -> RunInfo:
        """The folder's run.json; a folder without one (a cell still running, or killed) reads as not complete."""
        path = cell_dir / RUN_FILE
        return cls.from_json(_read_json(path), path) if path.exists() else cls()

    @property
    def model(self) -> str | None:
        return (self.config.get("model") or {}).get("name")

    @property
    def run_name(self) -> str | None:
        return self.config.get("run_name")


@dataclass
class Cell:
    """One cell folder, read: how it was run (`run`), lmms-eval's results and our per-task summaries."""

    path: Path
    run: RunInfo
    results: dict[str, Any]  # results.json as written (the judge adds to it)
    _plan: tuple[dict[str, Any] | None, str] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def metrics(self) -> dict[str, dict[str, Any]]:
        """lmms-eval's `results` block: {task: {"metric,filter": value}}."""
        return self.results.get("results") or {}

    @property
    def summaries(self) -> dict[str, dict[str, Any]]:
        """Our per-task summary (`summarise_records`), with the judge's block where a judge ran."""
        return self.results.get("dycoke_eval") or {}

    def records(self) -> list[SampleRecord]:
        path = self.path / RECORDS_FILE
        return [SampleRecord.from_json(row) for row in _read_jsonl(path)] if path.exists() else []

    def sample_tasks(self) -> list[str]:
        """Tasks with logged samples (`samples_<task>.jsonl`)."""
        return sorted(path.stem.removeprefix("samples_") for path in self.path.glob("samples_*.jsonl"))

    def samples(self, task: str) -> list[dict[str, Any]]:
        """lmms-eval's logged samples of one task."""
        return _read_jsonl(self.path / f"samples_{task}.jsonl")

    def write_results(self, results: dict[str, Any]) -> None:
        """Replace results.json (the judge's metrics and summaries); nothing else in the folder changes."""
        write_json_atomic(self.path / RESULTS_FILE, results)
        self.results = results

    def judgements(self, task: str) -> list[dict[str, Any]]:
        """The judge's rows for one task (`judgements_<task>.jsonl`); none before a judge has run."""
        path = self.path / f"judgements_{task}.jsonl"
        return _read_jsonl(path) if path.exists() else []

    def write_judgements(self, task: str, rows: list[dict[str, Any]]) -> None:
        write_jsonl_atomic(self.path / f"judgements_{task}.jsonl", rows)

    def retained_ratio(self) -> float | None:
        """Measured retained ratio, the mean over tasks; None when the method measured none.

        Per task: `retained_ratio_mean` (the standard per-sample field); for cells written
        before it existed, the method's own `method_stats_mean.retained_ratio`.
        """
        ratios = []
        for summary in self.summaries.values():
            ratio = summary.get("retained_ratio_mean")
            if ratio is None:
                ratio = (summary.get("method_stats_mean") or {}).get("retained_ratio")
            if ratio is not None:
                ratios.append(ratio)
        return mean(ratios) if ratios else None

    def prefill_tflops_real(self) -> float | None:
        """Measured prefill TFLOPs per sample (real count, `accounting.real_prefill_flops`), the mean over tasks; None
        for cells written before samples recorded it."""
        values = [s["prefill_tflops_real_mean"] for s in self.summaries.values() if s.get("prefill_tflops_real_mean") is not None]
        return mean(values) if values else None

    def visual_token_share(self) -> float | None:
        """Mean over tasks of visual tokens entering the LLM over those of full tokens; None without token counts."""
        shares = [
            s["visual_tokens_in_mean"] / s["visual_tokens_full_mean"]
            for s in self.summaries.values()
            if s.get("visual_tokens_full_mean")
        ]
        return mean(shares) if shares else None

    def plan(self) -> dict[str, Any] | None:
        """The plan row recorded at run time; for older cells, computed from the recorded config; None if neither.

        `missing_plan()` says why there is none.
        """
        if self._plan is None:
            self._plan = self._find_plan()
        return self._plan[0]

    def missing_plan(self) -> str:
        """Why `plan()` is None, naming the cell and the fix."""
        self.plan()
        return f"cell {self.name}: no plan recorded and none can be computed ({self._plan[1]}); {FORCE_HINT}"

    def _find_plan(self) -> tuple[dict[str, Any] | None, str]:
        if self.run.plan is not None:
            return self.run.plan, ""
        if "accounting" not in (self.run.config.get("model") or {}):
            return None, "its config predates FLOPs accounting"
        from dycoke_eval.plans import plan_row

        try:  # the recorded config may name a method class or setting that no longer exists
            return plan_row(OmegaConf.create(self.run.config)), ""
        except Exception as error:  # any failure means the same thing: rerun the cell
            return None, f"plans.plan_row failed on its config: {type(error).__name__}: {error}"


def read_cell(cell_dir: Path) -> Cell:
    """The cell in `cell_dir`; raises CellError naming the folder when it is not one or cannot be read."""
    cell_dir = Path(cell_dir)
    if not cell_dir.is_dir() or not any((cell_dir / name).exists() for name in CELL_FILES):
        raise CellError(f"{cell_dir}: not a cell folder (it holds none of {', '.join(CELL_FILES)})")
    results_path = cell_dir / RESULTS_FILE
    results = _read_json(results_path) if results_path.exists() else {}
    if not isinstance(results, dict):
        raise CellError(f"{results_path}: holds {type(results).__name__}, not lmms-eval results")
    return Cell(cell_dir, RunInfo.read(cell_dir), results)


def cells_below(root: Path) -> list[Cell]:
    """Every folder at or below `root` holding a results.json (a results dir, one cell, or a parent of several)."""
    return _readable(sorted({path.parent for path in Path(root).rglob(RESULTS_FILE)}))


def _readable(folders: Iterable[Path]) -> list[Cell]:
    cells = []
    for folder in folders:
        try:
            cells.append(read_cell(folder))
        except CellError as error:
            print(f"skipped {error}", file=sys.stderr)
    return cells


class CellStore:
    """The cells under `${results_dir}/cells`."""

    def __init__(self, results_dir: str | Path) -> None:
        self.results_dir = Path(results_dir)
        self.root = self.results_dir / "cells"

    def cells(self) -> list[Cell]:
        """Every cell folder, complete or not, by name; a folder that is not a readable cell is named on stderr and skipped."""
        return _readable(sorted(p for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else [])

    def find(self, cfg: DictConfig) -> Cell | None:
        """The cell made from `cfg` (complete or not), or None if it has no folder yet."""
        path = self.root / cell_directory(cfg).name
        return read_cell(path) if path.is_dir() else None

    def write(self, cfg: DictConfig, output: dict[str, Any], records: list[dict[str, Any]], method_description: dict[str, Any],
              plan: dict[str, Any] | None, runtime: dict[str, Any]) -> Path:  # fmt: skip
        """`write_cell` into this store's folder for `cfg`; returns the folder."""
        cell_dir = self.root / cell_directory(cfg).name
        write_cell(cell_dir, cfg, output, records, method_description, plan, runtime)
        return cell_dir


# Writing a cell


def summarise_records(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task: sample and failure counts, failures with path and reason, token, ratio and stage means."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_task[record["task"]].append(record)
    summary = {}
    for task, rows in sorted(by_task.items()):
        ok = [r for r in rows if r["status"] == "ok"]
        stages = sorted({stage for r in ok for stage in r["seconds"]})
        ratios = [r["retained_ratio"] for r in ok if r.get("retained_ratio") is not None]
        summary[task] = {
            "samples": len(rows),
            "failed": len(rows) - len(ok),
            "failures": [
                {"doc_id": r["doc_id"], "video_path": r["video_path"], "error": r["error"]} for r in rows if r["status"] != "ok"
            ],
            "visual_tokens_in_mean": mean(r["visual_tokens_in"] for r in ok) if ok else None,
            "visual_tokens_full_mean": mean(r["visual_tokens_full"] for r in ok) if ok else None,
            "retained_ratio_mean": mean(ratios) if ratios else None,
            "prefill_tflops_real_mean": _mean_of(ok, "prefill_tflops_real"),
            "visual_tokens_by_stage_mean": _numeric_means([r.get("visual_tokens_by_stage", {}) for r in ok]),
            "seconds_mean": {stage: mean(r["seconds"][stage] for r in ok if stage in r["seconds"]) for stage in stages},
            "method_stats_mean": _numeric_means([r["method_stats"] for r in ok]),
            "resumed_from_journal": sum(r.get("from_journal", False) for r in rows),
            **_efficiency(ok),
            "encoder_cache_hits": sum(r.get("encoder_cache_hit", False) for r in rows),
            "encoder_shared": sum(r.get("encoder_shared", False) for r in rows),
        }
    return summary


def _mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    """The mean of a per-sample figure over the rows that recorded it (None: none did, e.g. rows of older writers)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return mean(values) if values else None


def _efficiency(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Latency per example (the pipeline stages summed), peak memory and KV-cache bytes, for measured samples."""
    measured = [r for r in rows if r.get("memory")]
    if not measured:
        return {}
    latencies = [sum(r["seconds"].get(stage, 0.0) for stage in PIPELINE_STAGES) for r in measured]
    keys = sorted({k for r in measured for k in r["memory"]})
    steps = [step for r in measured for step in r.get("decode_step_seconds", [])]
    return {
        "latency_mean_s": mean(latencies),
        "latency_total_s": sum(latencies),
        "prefill_mean_s": mean(r["seconds"].get("prefill", 0.0) for r in measured),
        "decode_step_mean_s": mean(steps) if steps else None,
        "memory_peak_gb": {k: max(r["memory"].get(k, 0.0) for r in measured) for k in keys},
        "kv_cache_bytes_mean": mean(r.get("kv_cache_bytes", 0) for r in measured),
    }


def _numeric_means(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of every numeric per-sample method figure (None where a sample had no value)."""
    keys = sorted({k for row in rows for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return {k: mean(row[k] for row in rows if isinstance(row.get(k), (int, float))) for k in keys}


def write_cell(
    cell_dir: Path,
    cfg: DictConfig,
    output: dict[str, Any],
    records: list[dict[str, Any]],
    method_description: dict[str, Any],
    plan: dict[str, Any] | None,
    runtime: dict[str, Any],
) -> None:
    """Write the cell's folder from lmms-eval's `output` and the wrapper's records (`asdict(SampleRecord)`).

    `method_description` is the method's `describe()`, `plan` its `plans.plan_row` at run
    time (kept so reports never re-instantiate method code), `runtime` what the loaded model
    actually ran with (device, dtype, attention implementation). A cell with a failed sample is
    written but not complete: the next run of the same command retries exactly the failed
    samples (the others come back from the journal).
    """
    cell_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise_records(records)
    failed = sum(task["failed"] for task in summary.values())
    for task, samples in (output.get("samples") or {}).items():
        # In document order, as one process logs them (lmms-eval gathers ranks' shards one after another).
        write_jsonl_atomic(cell_dir / f"samples_{task}.jsonl", sorted(samples, key=lambda sample: sample["doc_id"]))
    write_jsonl_atomic(cell_dir / RECORDS_FILE, records)
    results = {key: value for key, value in output.items() if key != "samples"}
    results["dycoke_eval"] = summary
    write_json_atomic(cell_dir / RESULTS_FILE, results)
    write_json_atomic(
        cell_dir / RUN_FILE,
        {
            "format": FORMAT,
            "cell": cell_config(cfg),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "method": method_description,
            "plan": plan,
            "versions": package_versions(),
            "git": git_state(),
            "hardware": hardware(),
            "runtime": runtime,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tasks": summary,
            "failed_samples": failed,
            "complete": failed == 0,  # a cell not complete is redone; its journal keeps the finished samples
        },
    )
    print(format_summary(cell_dir, output.get("results", {}), summary))


def format_summary(cell_dir: Path, metrics: dict[str, dict[str, Any]], summary: dict[str, dict[str, Any]]) -> str:
    """A line per task: its metrics, the failed samples beside them; no metric for a task without a scored sample
    (lmms-eval scores failed samples as empty answers, which is not a measurement)."""
    lines = [f"results: {cell_dir}"]
    for task, values in metrics.items():
        counts = summary.get(task, {})
        if counts.get("samples") and counts.get("failed") == counts["samples"]:
            lines.append(f"  {task}: no metric: all {counts['samples']} samples FAILED (rerunning the same command retries them)")
            continue
        shown = ", ".join(
            f"{k.split(',')[0]}={v:.4g}" if isinstance(v, float) else f"{k.split(',')[0]}={v}"
            for k, v in values.items()
            if k != "alias" and "_stderr" not in k
        )
        failed = (
            f"  [{counts['failed']} of {counts['samples']} samples FAILED: scored as empty answers here; "
            "the cell is not complete, and rerunning the same command retries them]"
            if counts.get("failed")
            else ""
        )
        lines.append(f"  {task}: {shown}{failed}")
    return "\n".join(lines)


def format_efficiency(cell: str, records: list[dict[str, Any]]) -> str:
    """One line of what the efficiency protocol measured for a cell."""
    figures = _efficiency([r for r in records if r["status"] == "ok"])
    if not figures:
        return f"cell {cell}: no measured sample"
    ok = [r for r in records if r["status"] == "ok" and r.get("memory")]
    prefill = mean(r["seconds"].get("prefill", 0.0) for r in ok)
    steps = [r["seconds"]["decode_per_token"] for r in ok if "decode_per_token" in r["seconds"]]
    decode = f", decode {mean(steps) * 1e3:.1f} ms/token" if steps else ""
    memory = ", ".join(f"{k} {v:.2f}" for k, v in figures["memory_peak_gb"].items())
    return (
        f"cell {cell}: {figures['latency_mean_s']:.3f} s per example ({figures['latency_total_s']:.1f} s in all), "
        f"prefill {prefill:.3f} s{decode}; {memory}; KV cache {figures['kv_cache_bytes_mean'] / 2**20:.1f} MiB"
    )
