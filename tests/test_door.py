"""Inputs checked at the door (issue 11, items 8-13 and 15), through the CLI: each bad input is
one clear error (exit 2) naming the key, file and line or expression, before anything is
written (nothing under runs/ created or changed, in a fresh folder and beside a study), and the
same input gets the same verdict from every command that reads it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness import config, data
from harness.checks import ALLOW_ENV
from harness.cli import main
from harness.study import load_study
from tests.helpers import OPENAI_TEST_SETTINGS, snapshot

FAKE = ("backend=fake", "sampler=random", "pruner=none")
SHORT_LINES = 1024  # data.MAX_LINE_BYTES in these tests: a long line without writing megabytes


def rows(labels: list, label_field: str = "label") -> str:
    """40 JSONL rows cycling through ``labels`` (JSON values, written as they are)."""
    return "".join(
        json.dumps({"text": f"row {i}", label_field: labels[i % len(labels)]}) + "\n"
        for i in range(40)
    )


def write_inputs(folder: Path) -> dict[str, Path]:
    """One input of each kind of problem, by name."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a_folder").mkdir()
    (folder / "loop_a").symlink_to(folder / "loop_b")
    (folder / "loop_b").symlink_to(folder / "loop_a")
    long_line = folder / "long_line.jsonl"
    two_rows = "".join(rows(["a", "b"]).splitlines(keepends=True)[:2])
    long_line.write_text(two_rows + '{"text": "' + "x" * SHORT_LINES + '", "label": "a"}\n')
    nan = folder / "nan.jsonl"
    nan.write_text(rows(["a", "b", float("nan")]))  # json writes NaN, as pandas does
    infinity = folder / "infinity.csv"
    infinity.write_text("text,label\none,a\ntwo,b\nthree,Infinity\n")
    return {
        "folder": folder / "a_folder",
        "loop": folder / "loop_a",
        "device": Path("/dev/zero"),
        "long line": long_line,
        "nan": nan,
        "infinity": infinity,
    }


# (id, the data file's name in write_inputs, what the error says; {path} is the file)
DATA_CASES = [
    ("folder", "folder", "{path}: a directory"),
    ("symlink loop", "loop", "{path}: cannot open: a loop of symbolic links"),
    ("device", "device", "/dev/zero: not a regular file"),
    ("long line", "long line", "{path}:3: line longer than 1,024 bytes"),
    ("NaN label", "nan", "{path}:3: label nan is not a finite number"),
    ("Infinity label", "infinity", "{path}:4: label 'Infinity' is not a finite number"),
]

# (id, command words after `harness`, what stderr says)
CONFIG_CASES = [
    (
        "+typo",
        ["sweep", *FAKE, "+trian.epochs=3"],
        "unknown config key 'trian.epochs' in '+trian.epochs=3': harness's config has no "
        "free-form keys, so it would be ignored (did you mean train.epochs?)",
    ),
    ("+new key", ["sweep", *FAKE, "+new.key=1"], "unknown config key 'new.key'"),
    ("++typo", ["sweep", *FAKE, "++trian.epochs=3"], "unknown config key 'trian.epochs'"),
    (
        "+typo in a section",
        ["train", *FAKE, "+sweep.n_trial=3"],
        "(did you mean sweep.n_trials?)",
    ),
    (
        "typo",
        ["sweep", *FAKE, "trian.epochs=3"],
        "Could not override 'trian.epochs': no such key in harness's config (did you mean "
        "train.epochs?)",
    ),
    (
        "batch 0",
        ["sweep", *FAKE, "train.batch_size=0"],
        "train.batch_size must be at least 1, not 0",
    ),
    (
        "negative rate",
        ["sweep", *FAKE, "train.learning_rate=-0.001"],
        "train.learning_rate must be greater than 0, not -0.001",
    ),
    ("rate nan", ["sweep", *FAKE, "train.learning_rate=nan"], "must be greater than 0, not nan"),
    ("length 0", ["train", *FAKE, "train.max_length=0"], "train.max_length must be at least 1"),
    (
        "timeout",
        ["sweep", *FAKE, "sweep.timeout_s=-5"],
        "sweep.timeout_s must be greater than 0 (or null), not -5",
    ),
    ("dropout", ["validate", *FAKE, "train.dropout=1.5"], "train.dropout must be between 0 and 1"),
    (
        "searched rate",
        ["sweep", *FAKE, "train.learning_rate=interval(-1e-3, 1e-3)"],
        "search space train.learning_rate=interval(-1e-3, 1e-3): -0.001 is outside the values "
        "train.learning_rate can take; it must be greater than 0",
    ),
    (
        "searched choice",
        ["sweep", *FAKE, "train.batch_size=choice(0, 8)"],
        "search space train.batch_size=choice(0, 8): 0 is outside",
    ),
    (
        "searched range",
        ["sweep", *FAKE, "train.warmup_ratio=range(0.0, 2.0, 0.5)"],
        "1.5 is outside the values train.warmup_ratio can take; it must be between 0 and 1",
    ),
    (
        "name a path",
        ["sweep", *FAKE, "name=../../../../victim"],
        "name='../../../../victim' is not a study name: use letters, digits and - _ . only, "
        "not starting with '.'",
    ),
    ("name hidden", ["sweep", *FAKE, "name=.x"], "name='.x' is not a study name"),
    ("name in report", ["report", "name=a/b"], "name='a/b' is not a study name"),
    (
        "continue from a path",
        ["sweep", *FAKE, "name=next", "sweep.continue_from=../x"],
        "sweep.continue_from='../x' is not a study name",
    ),
    (
        "target open",
        ["validate", "backend._target_=builtins.open", "+backend.file=x", "+backend.mode=w"],
        "backend._target_='builtins.open' is not a class harness instantiates",
    ),
    (
        "target makedirs",
        ["sweep", *FAKE, "backend._target_=os.makedirs", "+backend.name=x"],
        f"in the environment variable {ALLOW_ENV} (comma-separated",
    ),
    (
        "nested target",
        ["sweep", *FAKE, "+backend.helper._target_=os.system"],
        "backend.helper._target_='os.system' is not a class harness instantiates",
    ),
    (
        "test backend not listed",
        ["sweep", *FAKE, "backend._target_=tests.helpers.FlakyBackend"],
        "backend._target_='tests.helpers.FlakyBackend' is not a class",
    ),
    (
        "unset environment variable",
        ["sweep", *FAKE, "seed=${oc.env:HARNESS_TEST_UNSET}"],
        'seed: KeyError raised while resolving interpolation: "Environment variable '
        "'HARNESS_TEST_UNSET' not found\"",
    ),
    ("huge integer", ["sweep", *FAKE, "seed=1" + "0" * 400], "seed must be"),
]


@pytest.fixture(scope="module")
def a_study(tmp_path_factory) -> Path:
    """A runs folder holding a 3-trial fake sweep of the default study."""
    runs = tmp_path_factory.mktemp("template") / "runs"
    assert main(["sweep", *FAKE, f"paths.runs_dir={runs}", "sweep.n_trials=3"]) == 0
    return runs


def stores(runs: Path) -> dict[str, str]:
    """snapshot(runs) but the tokenizer cache, which a hosted backend's credential check fills
    (tiktoken's encodings) before the data is read: no study's state."""
    return {k: v for k, v in snapshot(runs).items() if not k.startswith("cache")}


def refused(words: list[str], runs: Path, capsys) -> str:
    """Runs ``harness WORDS`` on ``runs``; asserts exit 2 and that nothing there changed."""
    before = stores(runs)
    code = main([*words, f"paths.runs_dir={runs}"])
    error = capsys.readouterr().err
    assert code == 2, error
    assert stores(runs) == before
    assert "Traceback" not in error
    return error


@pytest.mark.parametrize("beside_a_study", [False, True], ids=["fresh", "beside-a-study"])
@pytest.mark.parametrize(("case", "words", "says"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_a_bad_setting_is_refused_before_anything_is_written(
    case, words, says, beside_a_study, a_study, tmp_path, capsys, monkeypatch
):
    if case == "test backend not listed":
        monkeypatch.delenv(ALLOW_ENV)
    runs = tmp_path / "runs"
    if beside_a_study:
        shutil.copytree(a_study, runs)
    before = snapshot(tmp_path)
    assert says in refused(words, runs, capsys)
    assert snapshot(tmp_path) == before  # nor anywhere beside runs/ (name=../victim)


def test_a_study_name_that_is_a_path_leaves_the_victim_alone(tmp_path, capsys):
    victim = tmp_path / "victim"
    (victim / "trial-0000").mkdir(parents=True)
    (victim / "trial-0000" / "model.bin").write_text("precious")
    runs = tmp_path / "deep" / "runs"
    before = snapshot(tmp_path)
    error = refused(["sweep", *FAKE, "name=../../victim", "sweep.n_trials=1"], runs, capsys)
    assert "is not a study name" in error
    assert snapshot(tmp_path) == before


def commands_reading(path: Path, fake_openai) -> dict[str, list[str]]:
    """Every command that reads a data file, on ``path``."""
    given = f"data.path={path}"
    hosted = [f"backend.base_url={fake_openai.base_url}", *OPENAI_TEST_SETTINGS]
    return {
        "sweep": ["sweep", *FAKE, given],
        "train": ["train", *FAKE, given],
        "validate": ["validate", *FAKE, given],
        "validate FILE": ["validate", str(path)],
        "hosted sweep": ["sweep", "study=tickets_openai", *hosted, given],
    }


@pytest.mark.parametrize(("case", "name", "says"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_a_bad_data_file_gets_one_verdict_from_every_command(
    case, name, says, a_study, tmp_path, capsys, monkeypatch, fake_openai
):
    monkeypatch.setattr(data, "MAX_LINE_BYTES", SHORT_LINES)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-door")
    path = write_inputs(tmp_path / "data")[name]
    runs = tmp_path / "runs"
    shutil.copytree(a_study, runs)
    for command, words in commands_reading(path, fake_openai).items():
        error = refused(words, runs, capsys)
        assert says.format(path=path) in error, command
    assert fake_openai.api.files == {} and fake_openai.api.jobs == {}


def test_numeric_labels_name_one_class_each(tmp_path, capsys):
    """1, 1.0 and "1.0" are one class, "1"; 0.50 is "0.5"; a code with leading zeros stays."""
    path = tmp_path / "numbers.jsonl"
    path.write_text(rows([1, 1.0, "1.0", 0.50, "0.5", "007", "1e5000"]))
    assert main(["validate", *FAKE, str(path), f"paths.runs_dir={tmp_path / 'runs'}"]) == 0
    out = capsys.readouterr().out
    table = [line.split("│")[1].strip() for line in out.splitlines() if line.count("│") == 5]
    assert sorted(table) == ["0.5", "007", "1", "1e5000"]  # 1e5000: kept as written


def broken_studies(tmp_path: Path, monkeypatch) -> Path:
    """A studies folder (as HARNESS_HOME gives one) with the bundled studies and one whose
    YAML does not parse at its line 4."""
    studies = tmp_path / "studies"
    shutil.copytree(config.STUDIES_DIR, studies, ignore=shutil.ignore_patterns("data"))
    broken = studies / "broken.yaml"
    broken.write_text("# @package _global_\nname: broken\nsweep:\n  n_trials: [3\n")
    monkeypatch.setattr(config, "STUDIES_DIR", studies)
    return broken


@pytest.mark.parametrize("command", ["sweep", "train", "validate", "best", "report"])
def test_a_broken_study_file_is_named_with_its_line_when_it_is_used(
    command, tmp_path, capsys, monkeypatch
):
    broken = broken_studies(tmp_path, monkeypatch)
    runs = tmp_path / "runs"
    error = refused([command, "study=broken"], runs, capsys)
    assert f"{broken}:5: YAML syntax error:" in error, error
    assert error.count("\n") == 1  # one line, no parser traceback


def test_a_broken_study_file_leaves_the_other_studies_working(tmp_path, capsys, monkeypatch):
    broken_studies(tmp_path, monkeypatch)
    assert main(["sweep", "study=spam_tiny", "--cfg", "job"]) == 0
    assert "name: spam_tiny" in capsys.readouterr().out


def test_a_broken_conf_file_is_named_with_its_line(tmp_path, capsys, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(config.CONF_DIR, conf)
    (conf / "data" / "broken.yaml").write_text("name: broken\nformat: [jsonl\n")
    monkeypatch.setattr(config, "CONF_DIR", conf)
    error = refused(["validate", "data=broken"], tmp_path / "runs", capsys)
    assert f"{conf / 'data' / 'broken.yaml'}:3: YAML syntax error:" in error
    assert main(["validate", "data=spam", "--cfg", "job"]) == 0  # the other files still load


def test_legitimate_plus_overrides_still_work(capsys):
    """`++` sets a schema key; `+` adds a backend argument or a command switch."""
    words = ["++train.epochs=5", "+backend.example_token_limits.gpt-9=100", "+from_best=true"]
    assert main(["train", "study=tickets_openai", *words, "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 5" in out and "gpt-9: 100" in out and "from_best: true" in out


def test_a_backend_listed_on_purpose_runs(tmp_path, monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "mypkg.Other, tests.helpers.ArtifactBackend")
    words = [
        *FAKE,
        "backend._target_=tests.helpers.ArtifactBackend",
        "sweep.n_trials=1",
        f"paths.runs_dir={tmp_path / 'runs'}",
    ]
    assert main(["sweep", *words]) == 0
    study = load_study(config.load_config(words))
    assert [t.state.name for t in study.trials] == ["COMPLETE"]


def test_every_range_names_a_numeric_schema_key():
    cfg = config.load_config([])
    for key in config.VALID_RANGES:
        value = cfg
        for part in key.split("."):
            value = value[part]
        allowed = value is None or isinstance(value, int | float)
        assert allowed or (config.VALID_RANGES[key].auto and value == "auto"), key
