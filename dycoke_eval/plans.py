"""Run plans: each cell's settings, planned retained ratio, eq. 8 TFLOPs and prefill bounds, before or beside a run.

The method's stages say how many visual tokens each layer sees (`plan`); the model's adapter gives the dimensions and
the video layout from the HF config (`models.planning_geometry`); `accounting` turns them into FLOPs, so every
method is counted the same way.
"""

from __future__ import annotations

from pathlib import Path

from dycoke_eval.accounting import planned_flops

PLAN_COLUMNS = ("model", "method", "k", "l", "p", "frames", "retained_ratio", "tflops", "flops_ratio")


def plan_row(cfg) -> dict[str, object]:
    """One row of a sweep's plan: the cell's settings, retained ratio, TFLOPs and FLOPs ratio to full.

    Recorded with each cell when it runs.
    """
    from hydra.utils import instantiate

    from dycoke_eval.models import planning_geometry

    method = instantiate(cfg.method)
    dims, layout = planning_geometry(cfg.model, cfg.frames)
    flops, full, retained, bounds = planned_flops(method, dims, layout)
    settings = {k: v for k, v in method.describe(layout.family).items() if k not in ("name", "paper_retained_ratio")}
    return {
        "model": cfg.model.name,
        "method": method.name,
        "k": settings.pop("k", None),
        "l": settings.pop("l", None),
        "p": settings.pop("p", None),
        "frames": cfg.frames,
        "retained_ratio": retained,
        "tflops": flops / 1e12,
        "flops_ratio": flops / full,
        **bounds,
        **settings,
    }


def write_plan(configs: list, path: Path):
    """Print the plan of these cells as a table and write it to `path` (CSV); returns it (a DataFrame)."""
    import pandas as pd

    plan = pd.DataFrame([plan_row(cfg) for cfg in configs])
    path.parent.mkdir(parents=True, exist_ok=True)
    plan.to_csv(path, index=False)
    shown = plan.drop(columns=[c for c in plan.columns if plan[c].nunique(dropna=False) <= 1 and c not in PLAN_COLUMNS])
    print(shown.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"plan: {path}")
    return plan
