"""Where the Hydra configs live and how methods are built from them.

The Hydra app composes everything from `dycoke_eval/conf/`; the lmms-eval CLI path (`--model_args method=...`)
composes the same `conf/method/<name>.yaml` here, so there is one source of method settings.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

CONF_DIR = Path(__file__).resolve().parent / "conf"  # shipped inside the package: any install works


def lmms_eval_tasks_dir() -> Path:
    """lmms-eval's built-in task folder, located without importing it (that import takes seconds)."""
    import importlib.util

    return Path(importlib.util.find_spec("lmms_eval").origin).parent / "tasks"


class ConfigError(ValueError):
    """A bad setting, reported at start with the bad value and the fix (no traceback)."""


# Method settings that say where a stage keeps its data, not what it computes: recorded in neither a method's
# settings nor the identity of its cell (a cell run with either value is the same cell).
IMPLEMENTATION_FLAGS = frozenset({"offload_pruned"})

ROUTABLE_KERNELS = ("sdpa", "eager")  # kernels a routed method computes with (flash-attention takes no arbitrary mask)


def check_routable(attn_implementation: str, method: str) -> None:
    """Refuse, before any model is loaded, a kernel that a method routing attention cannot compute with."""
    if attn_implementation not in ROUTABLE_KERNELS:
        raise ConfigError(
            f"attn_implementation={attn_implementation!r}: method {method!r} computes attention through its own "
            f"function, which supports {' and '.join(ROUTABLE_KERNELS)}; set model.attn_implementation=sdpa "
            "(on a GPU, SDPA dispatches to a flash kernel itself)"
        )


GROUPS = ("model", "method", "tasks", "judge", "sweep")  # the config groups a command line chooses from


def check_group_choices(overrides: list[str]) -> None:
    """Refuse an unknown `group=NAME` on the command line in one line, with the group's options and the closest ones.

    Hydra would print its config search path over some 20 lines, before the app can say anything.
    A multirun's comma list is checked name by name; sweep expressions (`choice(...)`, globs) are left to Hydra.
    """
    import difflib

    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or any(char in value for char in "()[]{}*$"):
            continue
        options = group_options(key)
        for name in (part.strip() for part in value.split(",")):
            if name and name not in options:
                close = difflib.get_close_matches(name, options, n=2)
                hint = f"did you mean {' or '.join(close)}? " if close else ""
                raise ConfigError(f"{key}={name!r} is not a {key} config; {hint}{key} options: {', '.join(options)}")


def group_options(group: str) -> list[str]:
    """The option names of a config group, e.g. `group_options("method")`."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_option(group: str, name: str, overrides: dict[str, Any] | None = None):
    """The config of option `name` of `group`, with `<group>.<key>` overrides, outside or inside a Hydra app."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if name not in group_options(group):
        raise ConfigError(f"unknown {group} {name!r}; valid {group} options: {', '.join(group_options(group))}")
    override_list = [f"+{group}={name}", *(f"{key}={value}" for key, value in (overrides or {}).items())]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: compose without re-initialising
        return compose(overrides=override_list)[group]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(overrides=override_list)[group]


def method_from_config(name: str, settings: dict[str, Any] | None = None) -> Any:
    """The method of `conf/method/<name>.yaml` with `settings` over the file's, built as Hydra's `instantiate` builds it,
    without Hydra (a GPU machine may have only torch and transformers)."""
    values = {**_config_values(name), **(settings or {})}
    module, _, cls = values.pop("_target_").rpartition(".")
    return getattr(importlib.import_module(module), cls)(**values)


def _config_values(name: str) -> dict[str, Any]:
    """A method config's keys, composed as Hydra composes these flat files: each `defaults` entry in order, the file's
    own keys where `_self_` stands (last when it is not listed)."""
    if name not in group_options("method"):
        raise ConfigError(f"unknown method {name!r}; valid method options: {', '.join(group_options('method'))}")
    own = yaml.safe_load((CONF_DIR / "method" / f"{name}.yaml").read_text())
    entries = own.pop("defaults", [])
    values: dict[str, Any] = {}
    for entry in entries if "_self_" in entries else [*entries, "_self_"]:
        values.update(own if entry == "_self_" else _config_values(entry))
    return values


def instantiate_method(name: str, overrides: dict[str, Any] | None = None):
    """Build the method `name` from `conf/method/<name>.yaml`, with `method.<key>` overrides."""
    from hydra.utils import instantiate

    return instantiate(compose_option("method", name, overrides))
