"""Per-sample scores of FastVID's benchmarks, and a row's difference from vanilla over the samples both cells scored.

A column's value is a mean of means: the mean over its parts (Avg: the four benchmarks) of the mean over each
part's groups of the pooled per-sample scores (MVBench: every subtask's samples pooled, as lmms-eval weights a
group by size; MLVU and VideoMME: their questions, or one duration's). `column_scores` turns a cell's logged
samples into these strata, {(part, group): {sample key: score in points}}; `paired_difference` pairs two cells'
strata sample by sample (the same task and doc_id) and gives the difference of the column and its 95% interval
(`stratified_interval`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scipy import stats

Strata = dict[tuple[str, str], dict[tuple[str, int], float]]  # (part, group) -> {(task, doc_id): score in points}
LEVEL = 0.95


def _mvbench(value: dict) -> tuple[str, float] | None:
    """MVBench: its 0/1 `score`; an empty answer is left out, as lmms-eval's accuracy leaves it out."""
    return None if value["pred_answer"] == "" else ("", 100.0 * value["score"])


def _longvideobench(value: dict) -> tuple[str, float]:
    """LongVideoBench: the parsed choice equals the answer (lmms-eval's `eval_multi_choice`)."""
    return "", 100.0 * (value["parsed_pred"] == value["answer"])


def _mlvu(value: dict) -> tuple[str, float]:
    """MLVU: the extracted letter equals the answer, pooled over all questions as FastVID's lmms-eval (0.3.0 `mlvu`)
    scored it; 0.7.3's `mlvu_dev` score is instead the mean over task types (`breakdowns.mlvu_dev_accuracies`)."""
    return "", 100.0 * (value["pred_answer"] == value["answer"])


def _videomme(value: dict) -> tuple[str, float]:
    """VideoMME: the extracted letter equals the answer, as its aggregation compares them; grouped by duration."""
    return value["duration"], 100.0 * (value["pred_answer"] == value["answer"])


# column -> (the per-sample metric lmms-eval logs, how to score it); which tasks count: `benchmark`
SAMPLE_METRICS: dict[str, tuple[str, Callable[[dict], tuple[str, float] | None]]] = {
    "mvbench": ("mvbench_accuracy", _mvbench),
    "longvideobench": ("lvb_acc", _longvideobench),
    "mlvu": ("mlvu_percetion_score", _mlvu),  # sic: lmms-eval's spelling
    "videomme_wo_sub": ("videomme_perception_score", _videomme),
}
TASKS = {"longvideobench_val_v": "longvideobench", "mlvu_dev": "mlvu", "videomme": "videomme_wo_sub"}
BENCHMARKS = tuple(SAMPLE_METRICS)
AVERAGE = "avg_score"  # FastVID's Avg.: the mean of the four BENCHMARKS
PAIRED = (*BENCHMARKS, "videomme_short", "videomme_medium", "videomme_long", AVERAGE)  # what `column_scores` gives


def benchmark(task: str) -> str | None:
    """The benchmark column a task's samples count towards (lmms-eval's task name, fixture_/_deferred dropped)."""
    return "mvbench" if task.startswith("mvbench_") else TASKS.get(task)


def column_scores(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Strata]:
    """{column: strata} of one cell from its logged samples ({task: rows of samples_<task>.jsonl}, tasks as
    `benchmark` names them): the four benchmarks, VideoMME by duration, and Avg where all four have samples."""
    groups: dict[str, Strata] = defaultdict(lambda: defaultdict(dict))
    for task, rows in samples.items():
        column = benchmark(task)
        if column is None:
            continue
        metric, score = SAMPLE_METRICS[column]
        for row in rows:
            scored = score(row[metric])
            if scored is not None:
                groups[column][(column, scored[0])][(task, int(row["doc_id"]))] = scored[1]
    columns: dict[str, Strata] = {column: dict(strata) for column, strata in groups.items()}
    if "videomme_wo_sub" in columns:  # overall: every question pooled; each duration: its own
        by_duration = columns["videomme_wo_sub"]
        pooled = {key: value for scores in by_duration.values() for key, value in scores.items()}
        columns["videomme_wo_sub"] = {("videomme_wo_sub", ""): pooled}
        for (_, duration), scores in by_duration.items():
            columns[f"videomme_{duration}"] = {("videomme_wo_sub", ""): scores}
    if all(column in columns for column in BENCHMARKS):
        columns[AVERAGE] = {key: scores for column in BENCHMARKS for key, scores in columns[column].items()}
    return columns


def estimate(strata: Strata) -> float:
    """The column's value from its strata: mean over parts of the mean over groups of the mean score."""
    return sum(weight * sum(scores.values()) / len(scores) for weight, scores in _weighted(strata))


def _weighted(strata: Strata) -> list[tuple[float, Any]]:
    """(weight, stratum) pairs: parts weigh the same, and the groups of a part share its weight equally."""
    groups = defaultdict(list)
    for part, group in strata:
        groups[part].append(group)
    return [(1 / len(groups) / len(groups[part]), strata[(part, group)]) for part, group in strata]


@dataclass(frozen=True)
class PairedDifference:
    """A row's column minus vanilla's over the samples both scored, in points, with its 95% interval."""

    mean: float
    low: float
    high: float
    samples: int  # paired samples

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        """'-1.2 [-2.9, +0.5]', with ' *' where the interval excludes 0."""
        return f"{self.mean:+.1f} [{self.low:+.1f}, {self.high:+.1f}]" + (" *" if self.excludes_zero else "")


def paired_difference(ours: Strata, vanilla: Strata) -> PairedDifference | None:
    """Our column minus vanilla's over the samples in both (same stratum, task and doc_id), with its interval.

    Strata with no common sample are left out (the weights are over those left); None where nothing pairs
    or a stratum has fewer than two pairs (no variance to estimate).
    """
    paired = {}
    for stratum, scores in ours.items():
        common = sorted(scores.keys() & vanilla.get(stratum, {}).keys())
        if common:
            paired[stratum] = {key: scores[key] - vanilla[stratum][key] for key in common}
    if not paired or min(len(diffs) for diffs in paired.values()) < 2:
        return None
    mean, low, high = stratified_interval([(weight, list(diffs.values())) for weight, diffs in _weighted(paired)])
    return PairedDifference(mean, low, high, sum(len(diffs) for diffs in paired.values()))


def stratified_interval(strata: list[tuple[float, list[float]]], level: float = LEVEL) -> tuple[float, float, float]:
    """(estimate, low, high) of sum_h w_h * mean(d_h) over independent strata of paired differences d_h.

    The variance is sum_h w_h^2 s_h^2 / n_h (s_h: the sample standard deviation) and the interval a t interval
    with Welch-Satterthwaite degrees of freedom; for one stratum of weight 1 that is the paired t interval
    (lmms-eval's `paired_ttest`, scipy's `ttest_rel`). Every stratum needs two differences or more.
    """
    terms = []  # (w_h^2 s_h^2 / n_h, n_h)
    total = 0.0
    for weight, diffs in strata:
        n = len(diffs)
        mean = sum(diffs) / n
        variance = sum((d - mean) ** 2 for d in diffs) / (n - 1)
        total += weight * mean
        terms.append((weight**2 * variance / n, n))
    spread = sum(term for term, _ in terms)
    if spread == 0:  # every pair differs by the same amount in every stratum
        return total, total, total
    freedom = spread**2 / sum(term**2 / (n - 1) for term, n in terms)
    half = stats.t.ppf(0.5 + level / 2, freedom) * math.sqrt(spread)
    return total, total - half, total + half
