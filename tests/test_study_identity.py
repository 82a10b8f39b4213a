"""A study knows what it is: resuming it with other data, another backend or a search space
Optuna cannot follow is refused before anything is written, with the command that does the
right thing; following that command (or the report's advice) works."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import optuna

from harness.cli import main
from harness.config import load_config
from harness.storage import existing_study
from harness.tracking import tracking_uri
from tests.helpers import snapshot, study_runs

SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "sst2"
FAKE = ("backend=fake", "sampler=random", "pruner=none")


def sweep(runs: Path, *overrides: str) -> int:
    return main(["sweep", "--quiet", *FAKE, f"paths.runs_dir={runs}", *overrides])


def study_of(runs: Path, *overrides: str) -> optuna.Study:
    study = existing_study(load_config([*FAKE, f"paths.runs_dir={runs}", *overrides]))
    assert study is not None
    return study


def my_reviews(tmp_path: Path) -> Path:
    """A user's own file: 300 real SST-2 rows as a CSV with their own column names."""
    rows = [json.loads(line) for line in (SST2 / "sample_2000.jsonl").open()][:300]
    path = tmp_path / "my_reviews.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        writer.writerows([row["text"], row["label"]] for row in rows)
    return path


def refused_command(stderr: str) -> list[str]:
    """The command a refusal prints on its last line, as words."""
    line = stderr.strip().splitlines()[-1].strip()
    assert line.startswith("harness sweep "), stderr
    return shlex.split(line)[1:]


def test_new_data_under_an_old_name_is_refused_and_the_printed_command_works(
    tmp_path, runs, capsys
):
    assert sweep(runs, "sweep.n_trials=3") == 0
    data = my_reviews(tmp_path)
    before = snapshot(runs)
    user = [f"data.path={data}", "data.text_field=review", "data.label_field=sentiment"]
    assert sweep(runs, *user, "sweep.n_trials=6") == 2
    error = capsys.readouterr().err
    assert "is not the study this command describes" in error
    assert f"{data} (sha256" in error and "studies/data/sentiment.jsonl" in error
    assert "labels: negative, neutral, positive -> negative, positive" in error
    assert snapshot(runs) == before  # refused before anything was written
    assert len(study_of(runs).trials) == 3  # the old study is untouched

    words = refused_command(error)
    assert "name=my_reviews" in words
    assert main(words) == 0
    mine = study_of(runs, "name=my_reviews")
    assert len(mine.trials) == 6
    assert set(mine.user_attrs["fingerprint"]["labels"]) == {"negative", "positive"}


def test_a_backend_fake_check_never_becomes_the_real_study(runs, capsys):
    assert sweep(runs, "sweep.n_trials=3") == 0
    before = snapshot(runs)
    # the real study under the same name: refused, not 0 new trials and the fake's best
    code = main(["sweep", f"paths.runs_dir={runs}", "sweep.n_trials=3"])
    error = capsys.readouterr().err
    assert code == 2
    assert "backend: FakeBackend -> LocalBackend" in error
    assert "A backend=fake check is a study of its own" in error
    assert "name=sentiment_tiny-local" in error.splitlines()[-1]
    assert snapshot(runs) == before


def test_the_same_command_resumes(runs):
    assert sweep(runs, "sweep.n_trials=2") == 0
    assert sweep(runs, "sweep.n_trials=4") == 0
    study = study_of(runs)
    assert len(study.trials) == 4
    assert study.user_attrs["fingerprint"]["backend"] == "FakeBackend"


def test_a_wider_interval_goes_on_in_place(runs):
    narrow, wide = "interval(1e-4, 1e-3)", "interval(1e-5, 1e-2)"
    assert sweep(runs, "sweep.n_trials=3", f"train.learning_rate=tag(log, {narrow})") == 0
    assert sweep(runs, "sweep.n_trials=6", f"train.learning_rate=tag(log, {wide})") == 0
    study = study_of(runs)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 6
    assert study.trials[-1].distributions["train.learning_rate"].low == 1e-5


def test_new_choices_continue_as_a_new_study_with_the_old_trials(runs, capsys):
    """Optuna refuses a changed choice list mid-study (trials 4-7 used to FAIL in 0.0 s with no
    reason): the sweep refuses before writing and prints the continuation command, which
    carries the finished trials over under the same MLflow experiment."""
    assert sweep(runs, "sweep.n_trials=4") == 0
    before = snapshot(runs)
    assert sweep(runs, "sweep.n_trials=8", "train.batch_size=choice(4,8,16,32)") == 2
    error = capsys.readouterr().err
    assert "train.batch_size: choice(8, 16, 32) -> choice(4, 8, 16, 32)" in error
    assert snapshot(runs) == before

    words = refused_command(error)
    assert "name=sentiment_tiny-2" in words and "sweep.continue_from=sentiment_tiny" in words
    assert main(words) == 0
    continued = study_of(runs, "name=sentiment_tiny-2")
    states = [t.state.name for t in continued.trials]
    assert states == ["COMPLETE"] * 8, states
    carried = [t for t in continued.trials if "harness_carried_from" in t.user_attrs]
    assert [t.user_attrs["harness_carried_from"]["number"] for t in carried] == [0, 1, 2, 3]
    old = study_of(runs)
    assert [t.value for t in carried] == [t.value for t in old.trials]
    new_sizes = {t.params["train.batch_size"] for t in continued.trials[4:]}
    assert new_sizes <= {4, 8, 16, 32}
    # the same MLflow experiment: the old study's parent run and the new one's side by side
    uri = tracking_uri(load_config([f"paths.runs_dir={runs}"]))
    found = study_runs(uri, "sentiment_tiny", filter_string="tags.`harness.role` = 'study'")
    client, parents = found.client, found.runs
    assert sorted(r.info.run_name for r in parents) == ["sentiment_tiny", "sentiment_tiny-2"]
    # the same command again resumes the continuation: nothing carried twice
    assert main([*words, "sweep.n_trials=9"]) == 0
    assert len(study_of(runs, "name=sentiment_tiny-2").trials) == 9
    assert client.get_experiment_by_name("sentiment_tiny-2") is None
    of_the_new_study = "tags.`harness.study` = 'sentiment_tiny-2'"
    trial_runs = study_runs(uri, "sentiment_tiny", filter_string=of_the_new_study).runs
    assert len(trial_runs) == 1 + 5  # its parent and its own trials 4-8


ADVISED_SPACE = (
    "train.batch_size=choice(4,8)",  # the fake backend peaks at 16: 8 is the best edge
    "train.learning_rate=1e-3",
    "train.epochs=2",
    "train.dropout=0.1",
    "train.weight_decay=1e-4",
)


def advice_command(runs: Path, *overrides: str) -> str:
    """The one command `harness report` says follows its advice (summary.md)."""
    assert main(["report", *FAKE, f"paths.runs_dir={runs}", *overrides]) == 0
    summary = (runs / "reports" / "sentiment_tiny" / "summary.md").read_text()
    commands = [
        line.strip().strip("`")
        for line in summary.splitlines()
        if line.strip().startswith("`harness sweep")
    ]
    assert len(commands) == 1, summary
    return commands[0]


def follow(command: str) -> optuna.Study:
    """Runs the advice's command as printed; returns the study it ran."""
    assert main(shlex.split(command)[1:]) == 0
    words = shlex.split(command)
    name = next(w.split("=", 1)[1] for w in words if w.startswith("name="))
    runs = Path(next(w.split("=", 1)[1] for w in words if w.startswith("paths.runs_dir=")))
    return study_of(runs, f"name={name}")


def test_following_the_reports_advice_works(runs, capsys):
    """The report's advice is a command; run as printed, it continues the study."""
    assert sweep(runs, "sweep.n_trials=4", *ADVISED_SPACE) == 0
    command = advice_command(runs, *ADVISED_SPACE)
    assert "train.batch_size=choice(4, 8, 16)" in command
    capsys.readouterr()
    continued = follow(command)
    assert {t.state.name for t in continued.trials} == {"COMPLETE"}
    assert len(continued.trials) > 4
    assert 16 in {t.params["train.batch_size"] for t in continued.trials}


def test_the_advice_of_a_study_a_stop_rule_ended_runs_new_trials(runs, capsys):
    """Batch size 4 scores eval/f1 0.5727, 8 scores 0.6654: sweep.target=0.6 stops the study
    after its second trial. Kept in the advice's command, the target (met by the trials the
    command carries over) would stop it before its first trial: the command unsets it."""
    first = ("sweep.enqueue=[{train.batch_size: 4}, {train.batch_size: 8}]", "sweep.target=0.6")
    assert sweep(runs, "sweep.n_trials=4", *ADVISED_SPACE, *first) == 0
    assert len(study_of(runs).trials) == 2
    command = advice_command(runs, *ADVISED_SPACE, *first)
    assert "train.batch_size=choice(4, 8, 16)" in command
    capsys.readouterr()
    continued = follow(command)
    assert len(continued.trials) == 2 + 10  # the carried ones and the advice's 10 more
    assert {t.state.name for t in continued.trials} == {"COMPLETE"}
    assert 16 in {t.params["train.batch_size"] for t in continued.trials}
    assert "sweep.target=0.6" not in command
    assert command.endswith(
        "sweep.target=null name=sentiment_tiny-2 sweep.continue_from=sentiment_tiny"
    )
    summary = (runs / "reports" / "sentiment_tiny" / "summary.md").read_text()
    assert (
        "wider ranges; sweep.target=null: kept, a stop rule this study meets already could stop "
        "it before its first trial):"
    ) in summary


def test_an_error_while_sampling_is_the_trials_reason(runs, monkeypatch):
    from harness import search

    real = search.suggest
    calls = {"n": 0}

    def suggest(trial, distributions):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ValueError("CategoricalDistribution does not support dynamic value space.")
        return real(trial, distributions)

    monkeypatch.setattr(search, "suggest", suggest)
    assert sweep(runs, "sweep.n_trials=3") == 1  # 2 of 3 trials finished
    study = study_of(runs)
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(failed) == 1
    assert "does not support dynamic value space" in failed[0].user_attrs["fail_reason"]


def test_another_adapter_or_architecture_is_another_study(runs, capsys):
    assert sweep(runs, "sweep.n_trials=2") == 0
    model = study_of(runs).user_attrs["fingerprint"]["model"]
    # a GPT-2 without adapter is written as before these keys existed: older studies resume
    assert "architecture" not in model and "adapter" not in model
    before = snapshot(runs)
    for change, shown in (
        ("adapter=lora", '"adapter": "lora"'),
        ("model=tiny_llama", '"architecture": "llama"'),
    ):
        assert sweep(runs, "sweep.n_trials=3", change) == 2
        error = capsys.readouterr().err
        assert "is not the study this command describes" in error and shown in error
        assert snapshot(runs) == before
