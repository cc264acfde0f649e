"""Local copies of the papers' tasks (DyCoke's and FastVID's): a handful of documents each, in the real schemas.

Every fixture task is a YAML that `include:`s lmms-eval's **built-in** task YAML and only swaps
the dataset for a local JSON file, so lmms-eval's own doc_to_text, process_results and
aggregation do the work. Videos are written where the built-in utils look for them, under
`<root>/hf_home`, which the app exports as `HF_HOME`. The built-in YAMLs' location depends on
where lmms-eval is installed, so the task YAMLs are written at build time, never committed.

The GPT-judged tasks (ActivityNet-QA, VideoDC) keep their prompts and documents but record
predictions for `dycoke_eval.judge` instead of calling lmms-eval's inline judge (see task_configs.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dycoke_eval.config import lmms_eval_tasks_dir
from dycoke_eval.offline.videos import write_video
from dycoke_eval.task_configs import environment_id, task_yaml

WORLD_VERSION = 5  # bump when documents or layout change so cached worlds are rebuilt


@dataclass(frozen=True)
class FixtureTask:
    name: str
    builtin_yaml: str  # relative to lmms_eval/tasks
    split: str
    video_dir: str  # relative to HF_HOME: where the built-in utils look for videos
    video_file: Callable[[dict], str]
    docs: tuple[dict, ...]


def _activitynet_docs():
    rows = [
        ("fix01", "what is the person doing", "walking", 0),
        ("fix02", "is the square red", "no", 3),
        ("fix03", "how many objects are there", "1", 7),
    ]
    return tuple(
        {"video_name": v, "question": q, "answer": a, "question_id": f"v_{v}_{i}", "type": t}
        for i, (v, q, a, t) in enumerate(rows)
    )


def _videomme_docs():
    """One video per duration class (short, medium, long), so the per-duration breakdown has every class."""
    common = {"domain": "Knowledge", "sub_category": "Humanity & History", "url": ""}
    questions = [
        ("short", "Temporal Perception", "Which way does the square move?", ["A. Left", "B. Right", "C. Up", "D. Down"], "B"),
        ("medium", "Counting Problem", "How many squares appear?", ["A. 1", "B. 2", "C. 3", "D. 4"], "A"),
        ("long", "Attribute Perception", "What shape moves?", ["A. Circle", "B. Star", "C. Square", "D. Line"], "C"),
    ]
    return tuple(
        {
            **common,
            "video_id": f"{i + 1:03d}",
            "duration": duration,
            "videoID": f"fixvmme{i}",
            "question_id": f"{i + 1:03d}-1",
            "task_type": task,
            "question": q,
            "options": opts,
            "answer": ans,
        }
        for i, (duration, task, q, opts, ans) in enumerate(questions)
    )


def _longvideobench_docs():
    """longvideobench/LongVideoBench's validation rows: five option fields ("N/A" past the last), the answer's index,
    the duration group in seconds (15, 60, 600, 3600), and the subtitle file and offset the `_i` variant reads."""
    rows = [
        ("fixlvb0", 8.2, 15, "T2O", "Which way does the square move?", ["Left", "Right", "Up", "Down", "N/A"], 1),
        ("fixlvb1", 47.5, 60, "E2O", "What is on the gradient?", ["A square", "A circle", "Nothing", "N/A", "N/A"], 0),
        ("fixlvb2", 312.0, 600, "S2A", "What colour is the background?", ["Black", "A gradient", "White", "Red", "Blue"], 1),
    ]
    return tuple(
        {
            "video_id": video,
            "id": f"{video}_0",
            "video_path": f"{video}.mp4",
            "subtitle_path": f"{video}_en.json",
            "correct_choice": answer,
            "question": question,
            **{f"option{j}": option for j, option in enumerate(options)},
            "duration": duration,
            "duration_group": group,
            "question_category": category,
            "topic_category": "NP-News-Programs",
            "starting_timestamp_for_subtitles": 0.0,
        }
        for video, duration, group, category, question, options, answer in rows
    )


def _mlvu_dev_docs():
    """sy1998/MLVU_dev rows: the options are written into the question ("(A) ..."), the answer is their letter."""
    rows = [
        ("count", "How many times does the square cross the frame?", ["1", "2", "3", "4"], "B"),
        ("order", "What happens first?", ["The square moves", "The screen fades", "Text appears", "Nothing"], "A"),
        ("plotQA", "What is the moving object?", ["A circle", "A star", "A square", "A line"], "C"),
    ]
    return tuple(
        {
            "video_name": f"fixmlvu{i}.mp4",
            "duration": 200.0 + 100 * i,
            "question": question + "".join(f"\n({chr(ord('A') + j)}) {c}" for j, c in enumerate(candidates)),
            "candidates": candidates,
            "answer": answer,
            "task_type": task_type,
            "question_id": f"{task_type}_{i}",
        }
        for i, (task_type, question, candidates, answer) in enumerate(rows)
    )


def _nextqa_docs():
    options = ["it waits", "it moves across", "it disappears", "it turns", "it stops"]
    return tuple(
        {
            "video": 4000 + i,
            "frame_count": 40,
            "width": 64,
            "height": 48,
            "question": q,
            "answer": a,
            "qid": i,
            "type": "TN",
            **{f"a{j}": o for j, o in enumerate(options)},
        }
        for i, (q, a) in enumerate([("what does the square do", 1), ("what happens at the end", 4), ("what happens first", 0)])
    )


def _perceptiontest_docs():
    return tuple(
        {
            "video_name": f"video_fix{i}",
            "question_id": f"video_fix{i}_0",
            "question": q,
            "options": ["left", "right", "nowhere"],
            "answer_id": a,
            "area": "physics",
            "reasoning": "descriptive",
            "tag": ["motion"],
        }
        for i, (q, a) in enumerate([("Where does the object move?", 1), ("Where does it end?", 0), ("Where does it start?", 2)])
    )


def _videodc_docs():
    return tuple(
        {"video_name": f"v_fixdc{i}", "question": q, "answer": a}
        for i, (q, a) in enumerate(
            [
                ("Describe the following video in detail.", "A square moves across a gradient."),
                ("Can you describe the video?", "A bright block slides to the right."),
                ("What happens in the video?", "An object moves steadily."),
            ]
        )
    )


def _mvbench_docs(sub_task: str):
    candidates = ["moving left", "moving right", "not moving"]
    return tuple(
        {"video": f"fix_{sub_task}_{i}.mp4", "question": q, "candidates": candidates, "answer": candidates[i % 3]}
        for i, q in enumerate(["What is the object doing?", "How does the object move?", "What happens?"])
    )


FIXTURE_TASKS: tuple[FixtureTask, ...] = (
    FixtureTask(
        "fixture_activitynetqa",
        "activitynetqa/activitynetqa_generation.yaml",
        "test",
        "activitynetqa/all_test",
        lambda d: f"v_{d['video_name']}.mp4",
        _activitynet_docs(),
    ),
    FixtureTask(
        "fixture_videomme", "videomme/videomme.yaml", "test", "videomme/data", lambda d: f"{d['videoID']}.mp4", _videomme_docs()
    ),
    FixtureTask(
        "fixture_videomme_w_subtitle",
        "videomme/videomme_w_subtitle.yaml",
        "test",
        "videomme/data",
        lambda d: f"{d['videoID']}.mp4",
        _videomme_docs(),
    ),
    FixtureTask(
        "fixture_nextqa_mc_test",
        "nextqa/nextqa_mc_test.yaml",
        "test",
        "nextqa/NExTVideo",
        lambda d: f"{d['video']}.mp4",
        _nextqa_docs(),
    ),
    FixtureTask(
        "fixture_perceptiontest_val_mc",
        "perceptiontest/val/perceptiontest_mc.yaml",
        "validation",
        "perceptiontest_val/videos",
        lambda d: f"{d['video_name']}.mp4",
        _perceptiontest_docs(),
    ),
    FixtureTask(
        "fixture_video_dc499",
        "video_detail_description/video_detail_description.yaml",
        "test",
        "videochatgpt/Test_Videos",
        lambda d: f"{d['video_name']}.mp4",
        _videodc_docs(),
    ),
    FixtureTask(
        "fixture_longvideobench_val_v",
        "longvideobench/longvideobench_val_v.yaml",
        "validation",
        "datasets/longvideobench/videos",  # the built-in YAML's cache_dir, then its default video_subdir
        lambda d: d["video_path"],
        _longvideobench_docs(),
    ),
    FixtureTask("fixture_mlvu_dev", "mlvu/mlvu_dev.yaml", "test", "mlvu", lambda d: d["video_name"], _mlvu_dev_docs()),
    FixtureTask(
        "fixture_mvbench_action_antonym",
        "mvbench/mvbench_action_antonym.yaml",
        "train",
        "mvbench_video/ssv2_video_mp4",
        lambda d: d["video"],
        _mvbench_docs("action_antonym"),
    ),
    FixtureTask(
        "fixture_mvbench_object_shuffle",
        "mvbench/mvbench_object_shuffle.yaml",
        "train",
        "mvbench_video/perception/videos",
        lambda d: d["video"],
        _mvbench_docs("object_shuffle"),
    ),
)
FIXTURE_TASK_NAMES = tuple(task.name for task in FIXTURE_TASKS)


@dataclass(frozen=True)
class OfflineWorld:
    root: Path

    @property
    def hf_home(self) -> Path:
        return self.root / "hf_home"

    @property
    def task_dir(self) -> Path:
        """This environment's fixture task YAMLs (they include its lmms-eval's built-in YAMLs by absolute path)."""
        return self.root / "tasks" / environment_id()

    def video_path(self, task: FixtureTask, doc: dict) -> Path:
        return self.hf_home / task.video_dir / task.video_file(doc)


def ensure_offline_world(root: str | Path) -> OfflineWorld:
    """Build the fixture world under `root` unless an up-to-date one is already there.

    The videos and data are the same for every environment and are stamped once (`world.json`); the
    task YAMLs are per environment (`OfflineWorld.task_dir`, stamped there), so virtual environments
    sharing a home directory never rebuild each other's. Every file is written atomically, the stamps last.
    """
    from dycoke_eval.store import write_json_atomic, write_text_atomic

    world = OfflineWorld(Path(root))
    shared = world.root / "world.json"
    if not _stamped(shared, {"world_version": WORLD_VERSION}):
        (world.root / "data").mkdir(parents=True, exist_ok=True)
        for task in FIXTURE_TASKS:
            write_text_atomic(_data_file(world, task), "".join(json.dumps(doc) + "\n" for doc in task.docs))
            for doc in task.docs:
                path = world.video_path(task, doc)
                write_video(path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}"), name=path.stem).replace(path)
        write_json_atomic(shared, {"world_version": WORLD_VERSION})
    own = world.task_dir / "tasks.json"
    stamp = {"world_version": WORLD_VERSION, "lmms_eval_tasks": str(lmms_eval_tasks_dir().resolve())}
    if not _stamped(own, stamp):
        world.task_dir.mkdir(parents=True, exist_ok=True)
        for task in FIXTURE_TASKS:
            text = task_yaml(task.name, task.builtin_yaml, {task.split: str(_data_file(world, task))})
            write_text_atomic(world.task_dir / f"{task.name}.yaml", text)
        write_json_atomic(own, stamp)
    return world


def _data_file(world: OfflineWorld, task: FixtureTask) -> Path:
    return world.root / "data" / f"{task.name}.jsonl"


def _stamped(marker: Path, stamp: dict) -> bool:
    try:
        return json.loads(marker.read_text()) == stamp
    except (OSError, json.JSONDecodeError):
        return False


def main() -> int:
    """`eval "$(python -m dycoke_eval.offline.fixtures)"`: build the offline world and tiny model if needed, export their paths.

    The offline dir is the app's (`$DYCOKE_OFFLINE_DIR`, else ~/.cache/dycoke-eval/offline); the
    exports are what lmms-eval's own CLI needs to run a fixture task on the tiny model.
    """
    import shlex

    from omegaconf import OmegaConf

    from dycoke_eval.config import CONF_DIR
    from dycoke_eval.offline.tiny_model import ensure_tiny_checkpoint

    offline_dir = Path(OmegaConf.load(CONF_DIR / "config.yaml").offline_dir)
    world = ensure_offline_world(offline_dir / "world")
    tiny = ensure_tiny_checkpoint(offline_dir / "tiny-llava-onevision")
    exports = {"HF_HOME": world.hf_home, "HF_HUB_OFFLINE": 1, "HF_DATASETS_OFFLINE": 1, "DYCOKE_TASKS": world.task_dir,
               "DYCOKE_TINY": tiny}  # fmt: skip
    print("\n".join(f"export {name}={shlex.quote(str(value))}" for name, value in exports.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
