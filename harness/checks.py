"""Checks of a composed config that every command makes before it reads or writes anything:
each knob within its valid range (``harness.config.VALID_RANGES``), study names that are names
(never paths), and only allowed classes behind a ``_target_``. Each raises ConfigError naming
the key, the value and what to do."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from harness.config import CONF_DIR, VALID_RANGES, ConfigError


def check_config(cfg: DictConfig) -> None:
    check_ranges(cfg)
    check_study_names(cfg)
    check_targets(cfg)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_ranges(cfg: DictConfig) -> None:
    """Every knob of VALID_RANGES holds a value its range allows."""
    for key, valid in VALID_RANGES.items():
        try:
            value = OmegaConf.select(cfg, key)
        except InterpolationResolutionError as exc:  # ${oc.env:UNSET}
            raise ConfigError(f"{key}: {exc}".splitlines()[0]) from None
        # a knob that may be auto has no type of its own in the schema: anything else is refused
        checked = value is None or _is_number(value) or valid.auto
        if checked and not (valid.holds(value) and not isinstance(value, bool)):
            raise ConfigError(f"{key} must be {valid.describe()}, not {value}")


def check_space_ranges(
    space: Mapping[str, Any], distributions: Mapping[str, Any], fixed: Mapping[str, Any]
) -> None:
    """Every value a search space fixes, and both ends of every searched range (each choice of
    a list), within the key's valid range: a trial would otherwise fail on it, one by one."""
    from harness.search import extremes

    for key, valid in VALID_RANGES.items():
        values = extremes(distributions[key]) if key in distributions else []
        values += [fixed[key]] if key in fixed else []
        for value in values:
            if _is_number(value) and not valid.holds(value):
                raise ConfigError(
                    f"search space {key}={space[key]}: {value} is outside the values "
                    f"{key} can take; it must be {valid.describe()}"
                )


# A study's name becomes file and folder names under paths.runs_dir (its journal, checkpoints,
# report): a name, never a path.
STUDY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
NAME_RULE = "letters, digits and - _ . only, not starting with '.'"


def check_study_name(name: Any, setting: str) -> None:
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name):
        raise ConfigError(f"{setting}={name!r} is not a study name: use {NAME_RULE}")


def check_study_names(cfg: DictConfig) -> None:
    """The study's name and the names of the studies it takes trials from."""
    check_study_name(cfg.name, "name")
    if cfg.sweep.continue_from is not None:
        check_study_name(cfg.sweep.continue_from, "sweep.continue_from")
    for entry in cfg.sweep.enqueue:
        if isinstance(entry, DictConfig) and "from_study" in entry:
            check_study_name(entry.from_study, "sweep.enqueue from_study")


# Classes a config may name in a `_target_` beyond harness's own backends: set on purpose by
# whoever runs harness, never by a config or an override (which are what is checked).
ALLOW_ENV = "HARNESS_BACKENDS"


def harness_classes() -> frozenset[str]:
    """The backends harness ships: the `_target_` of each conf/backend/*.yaml (what
    `backend=NAME` picks), read as text (a broken file there is reported where it is used)."""
    found = (
        re.search(r"^_target_:\s*(\S+)", path.read_text(encoding="utf-8"), re.MULTILINE)
        for path in (CONF_DIR / "backend").glob("*.yaml")
    )
    return frozenset(match[1] for match in found if match)


def allowed_targets() -> frozenset[str]:
    extra = re.split(r"[,\s]+", os.environ.get(ALLOW_ENV, "").strip())
    return harness_classes() | {name for name in extra if name}


def check_targets(cfg: DictConfig) -> None:
    """A `_target_` is instantiated as given (hydra.utils.instantiate): from a config or an
    override it could name any callable (builtins.open, os.makedirs). Only harness's backends
    and the classes listed in $HARNESS_BACKENDS are taken."""
    allowed = allowed_targets()
    for where, target in _targets(_container(cfg)):
        if target not in allowed:
            raise ConfigError(
                f"{where}={target!r} is not a class harness instantiates: only harness's own "
                "backends (backend=fake|local|openai) and classes listed on purpose in the "
                f"environment variable {ALLOW_ENV} (comma-separated, e.g. "
                f"{ALLOW_ENV}=mypkg.backends.MyBackend)"
            )
    for key in cfg.search.space:
        if str(key).rsplit(".", 1)[-1] == "_target_":
            raise ConfigError(
                f"search space {key}: a class is chosen with backend=NAME, not searched or fixed "
                "in search.space"
            )


def _container(cfg: DictConfig) -> Any:
    """The config as plain values, interpolations resolved where they can be (an unresolved
    `${...}` target is refused as it reads)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that does not resolve (its own error comes later)
        return OmegaConf.to_container(cfg, resolve=False)


def _targets(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, value) of every `_target_` in a config tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield where, str(value)
            else:
                yield from _targets(value, where)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _targets(value, f"{path}[{index}]")
