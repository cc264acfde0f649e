"""Accuracies by group, from a cell's logged samples (`Cell.samples(task)`), where lmms-eval reports one number only.

Each logged sample holds, under the task's metric name, the dict its `process_results` returned; VideoMME's and
MLVU's hold `pred_answer` and `answer`, and the aggregates count a sample correct when the two are equal (as
strings, case included). Figures are percentages, as lmms-eval reports them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

VIDEOMME_DURATIONS = ("short", "medium", "long")


def videomme_durations(samples: Iterable[dict[str, Any]], metric: str = "videomme_perception_score") -> dict[str, float | None]:
    """VideoMME's accuracy per video duration and overall, as `videomme_aggregate_results` counts them.

    lmms-eval logs the per-duration figures but returns only the overall one. A duration with no
    sample is None (lmms-eval would log 0). `metric` is the same for `videomme_w_subtitle`.
    """
    by_duration = _accuracies(samples, metric, "duration")
    return {**{duration: by_duration.get(duration) for duration in VIDEOMME_DURATIONS}, "overall": by_duration.get(None)}


def mlvu_dev_accuracies(samples: Iterable[dict[str, Any]], metric: str = "mlvu_percetion_score") -> dict[str, float | None]:
    """MLVU accuracy per task type and `overall`: correct over all questions, the figure FastVID's lmms-eval reported.

    lmms-eval 0.7.3's mlvu_dev metric (the key is spelt `percetion`) is instead the mean of the task
    types' accuracies, every one of its 7 types counted (0 where none was answered).
    """
    by_type = _accuracies(samples, metric, "task_type")
    return {**{key: value for key, value in by_type.items() if key is not None}, "overall": by_type.get(None)}


def _accuracies(samples: Iterable[dict[str, Any]], metric: str, key: str) -> dict[str | None, float]:
    """Percent correct per value of `key` in each sample's metric dict, and over all samples under None."""
    counts: dict[str | None, list[int]] = defaultdict(lambda: [0, 0])  # group -> [correct, answered]
    for sample in samples:
        value = sample[metric]
        for group in (value[key], None):
            counts[group][0] += value["pred_answer"] == value["answer"]
            counts[group][1] += 1
    return {group: 100 * correct / answered for group, (correct, answered) in counts.items()}
