"""The cell store: what a cell folder holds, how it is written, and which old or foreign folders it still reads."""

import json
from dataclasses import asdict

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dycoke_eval.config import CONF_DIR
from dycoke_eval.plans import plan_row
from dycoke_eval.store import (
    FORMAT,
    CellError,
    CellStore,
    SampleJournal,
    SampleRecord,
    cell_config,
    cell_directory,
    cells_below,
    is_complete,
    read_cell,
    write_cell,
    write_json_atomic,
    write_jsonl_atomic,
)

TASKS = ("fixture_videomme", "fixture_nextqa_mc_test")
RUNTIME = {"device": "cpu", "dtype": "torch.float32", "attn_implementation": "sdpa"}


def config(results_dir, *overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"results_dir={results_dir}", "frames=4", *overrides])


def record(task, doc_id, ratio=None, status="ok"):
    return asdict(
        SampleRecord(
            task, doc_id, status=status, frames=4, visual_tokens_in=30, visual_tokens_full=65, retained_ratio=ratio,
            visual_tokens_by_stage={"ttm": 30}, prefill_visual_by_layer=[30] * 8, decode_visual_by_layer=[20.5] * 8,
            seconds={"generate": 0.1}, method_stats={"retained_ratio": 0.9},
            error=None if status == "ok" else "gone", video_path=f"/videos/{doc_id}.mp4",
        )
    )  # fmt: skip


def written(results_dir, *overrides, records=None):
    """A cell written as `cells.run_cell` writes it, from a real config and method."""
    cfg = config(results_dir, "method=dycoke", "method.k=0.7", *overrides)
    output = {
        "results": {task: {"accuracy,none": 0.5} for task in TASKS},
        "samples": {task: [{"doc_id": 0, "resps": [["A"]]}, {"doc_id": 1, "resps": [["B"]]}] for task in TASKS},
        "configs": {},
    }
    if records is None:
        records = [record(task, doc, ratio=0.2 + 0.1 * doc) for task in TASKS for doc in (0, 1)]
    write_cell(cell_directory(cfg), cfg, output, records, instantiate(cfg.method).describe(), plan_row(cfg), RUNTIME)
    return cfg


def test_a_written_cell_reads_back_typed(tmp_path):
    cfg = written(tmp_path)
    (cell,) = CellStore(tmp_path).cells()
    assert cell.path == cell_directory(cfg) and cell.name.startswith("tiny__dycoke__f4__")
    assert cell.run.format == FORMAT and cell.run.complete and cell.run.failed_samples == 0
    assert cell.run.cell["frames"] == 4 and cell.run.model == "tiny" and cell.run.runtime == RUNTIME
    assert cell.run.method["name"] == "dycoke" and cell.run.method["k"] == 0.7
    assert cell.run.plan == cell.plan() == json.loads(json.dumps(plan_row(cfg)))  # recorded at run time
    assert cell.metrics == {task: {"accuracy,none": 0.5} for task in TASKS}
    assert cell.summaries["fixture_videomme"]["retained_ratio_mean"] == pytest.approx(0.25)  # the standard field
    assert cell.retained_ratio() == pytest.approx(0.25)  # not method_stats' 0.9
    assert cell.visual_token_share() == pytest.approx(30 / 65)
    records = cell.records()
    assert all(isinstance(r, SampleRecord) for r in records) and records[1].decode_visual_by_layer == [20.5] * 8
    assert cell.sample_tasks() == sorted(TASKS) and cell.samples("fixture_videomme")[1]["resps"] == [["B"]]
    assert is_complete(cell.path, cfg) and CellStore(tmp_path).find(cfg).path == cell.path
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_cell_with_a_failed_sample_is_written_but_not_complete(tmp_path):
    cfg = written(tmp_path, records=[record("fixture_videomme", 0), record("fixture_videomme", 1, status="failed")])
    cell = CellStore(tmp_path).find(cfg)
    assert not cell.run.complete and cell.run.failed_samples == 1 and not is_complete(cell.path, cfg)
    assert cell.summaries["fixture_videomme"]["retained_ratio_mean"] is None  # no sample reported one
    assert cell.retained_ratio() == pytest.approx(0.9)  # so the method's own figure stands in


def test_an_atomic_write_leaves_no_tmp_file_behind(tmp_path):
    write_json_atomic(tmp_path / "run.json", {"complete": True})
    write_jsonl_atomic(tmp_path / "rows.jsonl", ({"i": i} for i in range(3)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl", "run.json"]
    assert [json.loads(line)["i"] for line in (tmp_path / "rows.jsonl").read_text().splitlines()] == [0, 1, 2]


class Unprintable:
    def __str__(self):
        raise RuntimeError("cannot serialise")


def test_a_write_that_fails_midway_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"results": "before"})
    with pytest.raises(RuntimeError):
        write_json_atomic(path, {"results": Unprintable()})  # fails while serialising
    with pytest.raises(RuntimeError):
        write_jsonl_atomic(path, [{"ok": 1}, {"bad": Unprintable()}])
    monkeypatch.setattr("os.fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_json_atomic(path, {"results": "after"})  # fails while writing
    assert json.loads(path.read_text()) == {"results": "before"}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


LEGACY_GEOMETRY = {
    "tiny": {"accounting": {"hidden": 64, "ffn": 128, "layers": 8}, "tokens_per_frame": 16},
    "llava_ov_7b": {"accounting": {"hidden": 3584, "ffn": 18944, "layers": 28}, "tokens_per_frame": 196},
}


def legacy_cell(results_dir, name, cfg, method_stats_ratio=0.3):
    """A folder as written before run.json had `format` and `plan`, by hand."""
    cell = results_dir / "cells" / name
    cell.mkdir(parents=True)
    run = {"config": OmegaConf.to_container(cfg, resolve=True), "method": instantiate(cfg.method).describe(), "complete": True,
           "failed_samples": 0, "tasks": {}}  # fmt: skip
    run["config"]["model"].update(LEGACY_GEOMETRY[cfg.model.name])  # the hand-typed dimensions configs held then
    (cell / "run.json").write_text(json.dumps(run))
    summary = {"samples": 2, "failed": 0, "visual_tokens_in_mean": 30, "visual_tokens_full_mean": 65,
               "method_stats_mean": {"retained_ratio": method_stats_ratio}}  # fmt: skip
    (cell / "results.json").write_text(json.dumps({"results": {"videomme": {"x,none": 1}}, "dycoke_eval": {"videomme": summary}}))
    return cell


def test_a_cell_in_the_old_format_is_still_read(tmp_path):
    cfg = config(tmp_path, "model=llava_ov_7b", "method=dycoke", "method.k=0.7")
    legacy_cell(tmp_path, "old", cfg)
    (cell,) = CellStore(tmp_path).cells()
    assert cell.run.format == 1 and cell.run.plan is None and cell.run.versions == {}
    assert cell.retained_ratio() == pytest.approx(0.3)  # the legacy method_stats_mean.retained_ratio
    recorded, current = cell.plan(), plan_row(cfg)  # computed from the recorded config
    # its hand-typed dimensions have no head counts: eq. 8 as today, no real prefill count rather than a guessed one
    assert recorded["prefill_tflops_real"] is None is recorded["prefill_bound_real"]
    assert {k: v for k, v in recorded.items() if "real" not in k} == {k: v for k, v in current.items() if "real" not in k}


def test_an_old_cell_whose_plan_cannot_be_computed_says_which_cell_and_how_to_fix_it(tmp_path):
    cfg = config(tmp_path, "method=fastv")
    before_accounting = legacy_cell(tmp_path, "before_accounting", cfg)
    run = json.loads((before_accounting / "run.json").read_text())
    del run["config"]["model"]["accounting"]
    (before_accounting / "run.json").write_text(json.dumps(run))
    method_gone = legacy_cell(tmp_path, "method_gone", cfg)
    run = json.loads((method_gone / "run.json").read_text())
    run["config"]["method"]["_target_"] = "dycoke_eval.methods.gone.Gone"
    (method_gone / "run.json").write_text(json.dumps(run))
    first, second = CellStore(tmp_path).cells()
    assert first.plan() is None and second.plan() is None
    assert "before_accounting" in first.missing_plan() and "predates FLOPs accounting" in first.missing_plan()
    assert "method_gone" in second.missing_plan() and "plan_row failed" in second.missing_plan()
    assert all("force=true" in cell.missing_plan() for cell in (first, second))


def test_a_folder_that_is_not_a_cell_is_named_with_the_reason_not_a_traceback(tmp_path, capsys):
    written(tmp_path)
    cells = tmp_path / "cells"
    (cells / "notes").mkdir()
    (cells / "notes" / "todo.txt").write_text("not a cell")
    (cells / "garbled").mkdir()
    (cells / "garbled" / "run.json").write_text('{"complete": tr')
    (cells / "listed").mkdir()
    (cells / "listed" / "run.json").write_text("[1, 2]")
    with pytest.raises(CellError, match="notes: not a cell folder"):
        read_cell(cells / "notes")
    with pytest.raises(CellError, match=r"garbled/run\.json: not readable as JSON"):
        read_cell(cells / "garbled")
    (cell,) = CellStore(tmp_path).cells()  # the readable cell; the others are named and skipped
    assert cell.name.startswith("tiny__dycoke")
    err = capsys.readouterr().err
    assert all(f"skipped {cells / name}" in err for name in ("notes", "garbled", "listed")) and "Traceback" not in err
    assert "run.json holds list" in err


def test_a_cell_still_running_has_only_its_journal_and_is_not_complete(tmp_path):
    folder = tmp_path / "cells" / "running"
    SampleJournal(folder / "journal.jsonl").add("k", "A", SampleRecord("t", 0))
    (cell,) = CellStore(tmp_path).cells()
    assert not cell.run.complete and cell.metrics == {} and cell.retained_ratio() is None and cell.records() == []


def test_the_judge_finds_every_cell_below_a_folder_or_the_cell_itself(tmp_path):
    cfg = written(tmp_path)
    assert [c.path for c in cells_below(tmp_path)] == [cell_directory(cfg)]
    assert [c.path for c in cells_below(cell_directory(cfg))] == [cell_directory(cfg)]


def test_the_journal_skips_a_line_cut_short_and_reads_records_of_other_versions(tmp_path):
    path = tmp_path / "journal.jsonl"
    journal = SampleJournal(path)
    journal.add("a", "yes", SampleRecord("t", 0, visual_tokens_in=5, retained_ratio=0.5))
    old = {"task": "t", "doc_id": 1, "status": "ok", "visual_tokens_in": 7, "seconds": {}}  # written before the new fields
    newer = {**old, "doc_id": 2, "a_field_from_the_future": [1, 2]}
    with path.open("a") as handle:
        handle.write(json.dumps({"key": "b", "answer": "no", "record": old}) + "\n")
        handle.write(json.dumps({"key": "c", "answer": "no", "record": newer}) + "\n")
        handle.write('{"key": "d", "answer": "maybe", "rec')  # the kill came mid-line
    resumed = SampleJournal(path)
    assert resumed.resumed == 3 and resumed.get("d") is None
    answer, record = resumed.get("a")
    assert answer == "yes" and record.retained_ratio == 0.5 and record.from_journal
    _, record = resumed.get("b")
    assert record.visual_tokens_in == 7 and record.retained_ratio is None and record.visual_tokens_by_stage == {}
    assert resumed.get("c")[1].doc_id == 2


def test_a_sample_record_ignores_unknown_keys_and_defaults_missing_ones():
    record = SampleRecord.from_json({"task": "t", "doc_id": 3, "unknown": 1})
    assert record == SampleRecord("t", 3)
    assert SampleRecord.from_json(asdict(record)) == record


def test_a_cell_whose_task_list_was_overridden_is_not_named_after_the_task_set(tmp_path):
    assert "__fixtures__" in cell_directory(config(tmp_path)).name
    overridden = cell_directory(config(tmp_path, "tasks.names=[fixture_videomme]")).name
    assert "__custom__" in overridden and "fixtures" not in overridden


def test_where_dycokes_pruned_entries_wait_does_not_make_another_cell(tmp_path):
    """`offload_pruned` says where pruned cache entries wait (the accelerator by default, as the released code keeps
    its whole cache; the CPU on request), not what is computed: one cell either way, and no setting of the method."""
    on_device, offloaded = config(tmp_path, "method=dycoke"), config(tmp_path, "method=dycoke", "method.offload_pruned=true")
    assert on_device.method.offload_pruned is False
    assert cell_directory(on_device) == cell_directory(offloaded)
    assert "offload_pruned" not in instantiate(offloaded.method).describe()
    assert [stage.offload_pruned for stage in instantiate(on_device.method).stages() if hasattr(stage, "offload_pruned")] == [
        False
    ]


def test_static_decoding_makes_a_cell_of_its_own_and_leaves_every_other_cells_folder_as_it_was(tmp_path):
    """A static cache's padded attention can move the last bits of an answer; preprocessing on the device cannot."""
    default = config(tmp_path)
    assert "static_decoding" not in cell_config(default)  # folders made before the setting existed keep their hash
    assert cell_directory(config(tmp_path, "static_decoding=true")) != cell_directory(default)
    assert cell_directory(config(tmp_path, "preprocess_device=model")) == cell_directory(default)
