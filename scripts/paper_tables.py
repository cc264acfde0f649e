"""Write the DyCoke paper's published numbers (Tables 1-7) to dycoke_eval/paper/tableN.csv.

The tables are read from the paper's text (`../shared/papers/`, tab-separated rows) rather than
retyped, so every number can be traced to its line. Each row gets our method name and settings
(method, k, l, p, frames) so reports can match it with our cells. Ratios become fractions in
[0, 1] like the plans; latencies become seconds. Formatting marks (bold, underline) are dropped:
reports recompute best and second-best.

    python scripts/paper_tables.py [--papers ../shared/papers] [--out dycoke_eval/paper]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

MVBENCH = [
    "AS",
    "AP",
    "AA",
    "FA",
    "UA",
    "OE",
    "OI",
    "OS",
    "MD",
    "AL",
    "ST",
    "AC",
    "MC",
    "MA",
    "SC",
    "FP",
    "CO",
    "EN",
    "ER",
    "CI",
    "avg",
]
QA_METRICS = [
    "activitynetqa_acc",
    "activitynetqa_score",
    "nextqa_mc",
    "perceptiontest_val",
    "videodc",
    "videomme_wo_sub",
    "videomme_w_sub",
]
TABLES = {  # table: (paper file, first line, last line (1-based, inclusive), metric columns, frames)
    1: ("dycoke-main.txt", 144, 163, ["retained_ratio", "tflops", "flops_ratio", *QA_METRICS], 32),
    2: ("dycoke-main.txt", 168, 179, ["flops_ratio", *MVBENCH], 16),
    3: (
        "dycoke-main.txt",
        222,
        246,
        ["total_latency_s", "gpu_memory_gb", "accuracy", "accuracy_std", "latency_per_example_s", "speedup"],
        None,
    ),
    4: ("dycoke-main.txt", 254, 256, ["params", "decode_ms_per_token", "videodc"], 32),
    5: ("dycoke-main.txt", 270, 284, ["k", "l", "p", "retained_ratio", *QA_METRICS], 32),
    6: (
        "dycoke-main.txt",
        289,
        291,
        ["tflops", "frames", "videomme_short", "videomme_medium", "videomme_long", "videomme_avg"],
        None,
    ),
    7: ("dycoke-supplementary.txt", 8, 19, ["flops_ratio", *MVBENCH], 32),
}
DYCOKE_K_BY_TABLE = {6: 0.7}  # Table 6 names no K; its 17.91T is DyCoke's cost at K=0.7 (Table 1, 7B)
FASTV_RATIO = {"llava_ov_72b": 0.45}
METHODS = {"Full Tokens": "full", "Full Token": "full", "FastV": "fastv", "PruMerge": "prumerge", "w/o DP": "dycoke_no_dp",
           "Random Pruning": "dycoke_random", "DyCoke": "dycoke", "Ours": "dycoke"}  # fmt: skip


def _number(text: str) -> float | str:
    text = re.sub(r"</?u>|\*\*", "", text).strip()
    if re.fullmatch(r"\d+(:\d\d){1,2}", text):  # h:mm:ss or mm:ss
        seconds = 0
        for part in text.split(":"):
            seconds = seconds * 60 + int(part)
        return float(seconds)
    match = re.fullmatch(r"(-?[\d.]+)\s*(%|G|T|s|ms/token|×|B)?", text)
    if not match:
        return text
    value = float(match.group(1))
    return value / 100 if match.group(2) == "%" else value


def _cells(text: str) -> list[str]:
    """Split a row on tabs, and "57.58 (±0.11)" / "1.19s (1.00×)" into two values."""
    values = []
    for cell in text.split("\t"):
        match = re.fullmatch(r"(.+?)\s*\((?:±)?([\d.]+)×?\)", cell.strip())
        values += [match.group(1), match.group(2)] if match else [cell]
    return values


def parse_table(table: int, papers: Path) -> pd.DataFrame:
    file, first, last, columns, frames = TABLES[table]
    lines = (papers / file).read_text().splitlines()[first - 1 : last]
    rows, model, block = [], None, 0
    for line in lines:
        label, *values = _cells(line)
        if re.match(r"LLaVA-OV-[\d.]+B", label):
            model, block = "llava_ov_" + label.removeprefix("LLaVA-OV-").lower(), block + 1
            continue
        if not any(v.strip() for v in values) or label.startswith("("):
            continue
        method = next(key for name, key in METHODS.items() if label.startswith(name))
        row = {"table": table, "model": model or "llava_ov_7b", "row": label, "method": method}
        row.update(dict(zip(columns, (_number(v) for v in values), strict=False)))
        if method.startswith("dycoke"):  # settings from Table 5's columns, else the label, else the paper's L=3, P=0.7
            row.update({key.lower(): float(value) for key, value in re.findall(r"([KLP])\s*=\s*([\d.]+)", label)})
            row.setdefault("k", DYCOKE_K_BY_TABLE.get(table))
            row.setdefault("l", 3.0)
            row.setdefault("p", 0.7)
        else:
            for key in ("k", "l", "p"):
                row.pop(key, None)
        if method == "fastv":  # DyCoke's comparisons: K=5, R=35% (45% on 72B)
            row.update(layer=5, ratio=FASTV_RATIO.get(row["model"], 0.35))
        if table == 3:
            row["frames"] = 16 if block <= 2 else 32
        elif frames is not None:
            row["frames"] = frames
        row["frames"] = int(row["frames"])
        rows.append(row)
    frame = pd.DataFrame(rows)
    leading = ["table", "model", "row", "method", "k", "l", "p", "layer", "ratio", "frames"]
    return frame[[c for c in leading if c in frame] + [c for c in frame if c not in leading]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--papers", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "papers")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "dycoke_eval" / "paper")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for table in TABLES:
        frame = parse_table(table, args.papers)
        frame.to_csv(args.out / f"table{table}.csv", index=False)
        print(f"table {table}: {len(frame)} rows -> {args.out / f'table{table}.csv'}")


if __name__ == "__main__":
    main()
