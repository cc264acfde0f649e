"""Where the Hydra configs live and how methods are built from them.

The Hydra app composes everything from `conf/`; the lmms-eval CLI path (`--model_args method=...`)
composes the same `conf/method/<name>.yaml` here, so there is one source of method settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A bad setting, reported at start with the bad value and the fix (no traceback)."""


def group_options(group: str) -> list[str]:
    """The option names of a config group, e.g. `group_options("method")`."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def instantiate_method(name: str, overrides: dict[str, Any] | None = None):
    """Build the method `name` from `conf/method/<name>.yaml`, with `method.<key>` overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    if name not in group_options("method"):
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(group_options('method'))}")
    override_list = [f"+method={name}", *(f"{key}={value}" for key, value in (overrides or {}).items())]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: compose without re-initialising
        cfg = compose(overrides=override_list)
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(overrides=override_list)
    return instantiate(cfg.method)
