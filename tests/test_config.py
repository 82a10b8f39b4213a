import dataclasses
import inspect
import typing
from pathlib import Path

import pytest
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from harness.config import (
    CONF_DIR,
    STUDIES_DIR,
    ConfigError,
    HarnessConfig,
    load_config,
    with_params,
)
from harness.search import to_distributions

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def test_conf_has_the_groups_the_design_names():
    assert {"backend", "model", "data", "search", "sampler", "pruner", "tracking"} <= set(GROUPS)


EVERY_OPTION = [
    f"{group}={path.stem}" for group in GROUPS for path in sorted((CONF_DIR / group).glob("*.yaml"))
] + [f"study={path.stem}" for path in sorted(STUDIES_DIR.glob("*.yaml"))]


@pytest.mark.parametrize("override", EVERY_OPTION)
def test_every_config_file_composes(override):
    cfg = load_config([override])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert cfg.name


def test_study_overlay_selects_its_data_and_search():
    cfg = load_config(["study=faq_chat_tiny"])
    assert cfg.name == "faq_chat_tiny"
    assert cfg.data.task == "generation"
    assert cfg.sweep.metric == "eval/loss" and cfg.sweep.direction == "minimize"
    assert cfg.train.max_length == 128


def test_command_line_overrides_win_over_the_study():
    cfg = load_config(["study=faq_chat_tiny", "train.max_length=32", "sweep.n_trials=3"])
    assert cfg.train.max_length == 32 and cfg.sweep.n_trials == 3


def test_bad_type_fails_at_composition():
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(["train.batch_size=lots"])


def test_unknown_key_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"train\.learning_rat"):
        load_config(["train.learning_rat=0.1"])


def test_unknown_study_lists_the_available_ones():
    with pytest.raises(ConfigError, match="sentiment_tiny"):
        load_config(["study=nope"])


def test_sweep_override_searches_a_key_and_plain_value_fixes_one():
    default = load_config([])
    assert "train.epochs" in default.search.space
    cfg = load_config(
        [
            "train.epochs=3",
            "train.max_length=range(32, 97, 32)",
            "train.learning_rate=tag(log, interval(1e-5, 1e-2))",
        ]
    )
    assert cfg.train.epochs == 3
    assert cfg.search.space["train.epochs"] == "3"  # a plain value: fixed, out of the search
    assert "train.epochs" not in to_distributions(cfg.search.space)
    assert cfg.search.space["train.max_length"] == "range(32, 97, 32)"  # added
    assert cfg.search.space["train.learning_rate"] == "tag(log, interval(1e-5, 1e-2))"  # replaced


def test_the_last_override_of_a_key_wins():
    searched = load_config(["train.epochs=3", "train.epochs=range(1, 6)"])
    assert searched.search.space["train.epochs"] == "range(1, 6)"
    fixed = load_config(["train.epochs=range(1, 6)", "train.epochs=3"])
    assert fixed.search.space["train.epochs"] == "3" and fixed.train.epochs == 3


def test_sweep_override_of_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.nope'"):
        load_config(["train.nope=choice(1,2)"])


def test_with_params_applies_dotted_keys_with_schema_types():
    cfg = load_config([])
    trial = with_params(cfg, {"train.learning_rate": 0.01, "train.batch_size": 8})
    assert trial.train.learning_rate == 0.01 and trial.train.batch_size == 8
    assert cfg.train.batch_size == 16  # the original is untouched
    with pytest.raises(Exception, match="batch_size"):
        with_params(cfg, {"train.batch_size": "many"})


def test_studies_carry_their_launch_command_and_global_package():
    for path in Path(STUDIES_DIR).glob("*.yaml"):
        text = path.read_text()
        assert text.startswith("# @package _global_"), path
        assert "harness sweep" in text, path


def schema_fields(node=HarnessConfig, prefix=""):
    """(dotted key, dataclass field) for every field of the schema, sections' fields included."""
    hints = typing.get_type_hints(node)
    for f in dataclasses.fields(node):
        yield prefix + f.name, f
        if dataclasses.is_dataclass(hints[f.name]):
            yield from schema_fields(hints[f.name], f"{prefix}{f.name}.")


def test_the_schema_has_no_defaults_every_value_is_in_the_yaml():
    with_default = [
        key
        for key, f in schema_fields()
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert with_default == []
    assert len(list(schema_fields())) > 80  # the walk reached every section's fields


BACKENDS = sorted(path.stem for path in (CONF_DIR / "backend").glob("*.yaml"))


@pytest.mark.parametrize("name", BACKENDS)
def test_a_backend_takes_every_argument_from_its_yaml_and_has_no_defaults(name):
    cfg = load_config([f"backend={name}"])
    cls = get_class(cfg.backend._target_)
    parameters = inspect.signature(cls).parameters.values()
    assert [p.name for p in parameters if p.default is not inspect.Parameter.empty] == []
    assert {p.name for p in parameters} == set(cfg.backend) - {"_target_"}
    assert isinstance(instantiate(cfg.backend), cls)  # the YAML's values are what it takes


def targets(node, where: str = "") -> list[tuple[str, object]]:
    """Every node of a composed config that names a `_target_`, with its dotted key."""
    found = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            found.append((where, node))
        for key in node:
            found += targets(node[key], f"{where}.{key}".lstrip("."))
    elif isinstance(node, ListConfig):
        for index, item in enumerate(node):
            found += targets(item, f"{where}[{index}]")
    return found


@pytest.mark.parametrize("override", EVERY_OPTION)
def test_every_target_of_every_config_instantiates(override, monkeypatch):
    """Composing checks a config's keys and types; instantiating checks that its `_target_`s
    exist and take the keys the config gives them (no network: a dummy API key)."""
    from hydra.utils import instantiate

    monkeypatch.setenv("OPENAI_API_KEY", "sk-dummy-not-sent")
    cfg = load_config([override])
    found = targets(cfg)
    assert found, "no _target_ in the config"
    for key, node in found:
        assert instantiate(node) is not None, key
