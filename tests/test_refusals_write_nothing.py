"""Every row of README's "When something is wrong" table, through the CLI: one clear error
(exit 2) and not a file under runs/ created or changed, in a fresh folder and beside a study
that already exists there."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from harness.cli import main
from tests.helpers import snapshot

FAKE = ("backend=fake", "sampler=random", "pruner=none")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_data_files(folder: Path) -> None:
    """Data files, one per kind of problem (and one good file of other data)."""
    folder.mkdir(parents=True, exist_ok=True)

    def rows(labels: str, prefix: str = "row") -> str:
        return "".join(
            f'{{"text": "{prefix} {i}", "label": "{labels[i % len(labels)]}"}}\n' for i in range(40)
        )

    (folder / "empty.jsonl").write_text("")
    (folder / "malformed.jsonl").write_text(
        "".join(rows("ab").splitlines(keepends=True)[:3]) + '{"text": oops}\n'  # line 4
    )
    (folder / "one_class.jsonl").write_text(rows("a"))
    (folder / "other.jsonl").write_text(rows("xy", "other"))
    (folder / "latin1.csv").write_bytes("text,label\nfine,a\ncaf\xe9 au lait,b\n".encode("latin-1"))


# (id, command words after `harness`, what stderr says, needs an existing study to be wrong)
def rows(data: Path, runs: Path) -> list[tuple[str, list[str], str, bool]]:
    fake = ["sweep", *FAKE]
    return [
        ("unknown key", [*fake, "trian.epochs=3"], "Could not override 'trian.epochs'", False),
        (
            "unparsable",
            [*fake, "train.lr=interval(1e-5"],
            "bad override 'train.lr=interval(1e-5'",
            False,
        ),
        ("reversed", [*fake, "train.dropout=interval(0.5, 0.1)"], "low <= high", False),
        ("log from 0", [*fake, "train.learning_rate=tag(log, interval(0, 1))"], "low > 0", False),
        ("empty choice", [*fake, "train.batch_size=choice()"], "empty choice", False),
        (
            "untunable",
            ["sweep", "study=tickets_openai", "train.dropout=interval(0.0, 0.3)"],
            "cannot tune train.dropout",
            False,
        ),
        ("no file", [*fake, f"data.path={data / 'no.jsonl'}"], "file not found", False),
        (
            "empty file",
            [*fake, f"data.path={data / 'empty.jsonl'}"],
            "empty file (no records)",
            False,
        ),
        (
            "malformed",
            [*fake, f"data.path={data / 'malformed.jsonl'}"],
            ":4: malformed JSON",
            False,
        ),
        ("not UTF-8", [*fake, f"data.path={data / 'latin1.csv'}"], ":3: not UTF-8 text", False),
        ("one class", [*fake, f"data.path={data / 'one_class.jsonl'}"], "only one class", False),
        ("no API key", ["sweep", "study=tickets_openai"], "no API key", False),
        (
            "API key file a device",  # read whole, it never ended
            ["sweep", "study=tickets_openai", "backend.api_key_file=/dev/zero"],
            "backend.api_key_file: /dev/zero is not a regular file",
            False,
        ),
        (
            "storage unreachable",
            [*fake, f"storage.url=postgresql://u:pw@127.0.0.1:{free_port()}/x"],
            "cannot open the Optuna storage postgresql://u:***@",
            False,
        ),
        (
            "tracking unreachable",
            [*fake, f"tracking.uri=http://127.0.0.1:{free_port()}"],
            "cannot reach the MLflow tracking server",
            False,
        ),
        ("no trials", [*fake, "sweep.n_trials=0"], "sweep.n_trials must be at least 1", False),
        (
            "workers on SQLite",
            [*fake, "sweep.n_workers=2", f"storage.url=sqlite:///{runs}/optuna.db"],
            "SQLite is",
            False,
        ),
        (
            "unreported objective",
            [*fake, "sweep.objectives={eval/speed: maximize, eval/f1: maximize}"],
            "'eval/speed' is not a metric trials report",
            False,
        ),
        (
            "warm start outside",
            [*fake, "sweep.enqueue=[{train.learning_rate: 5.0}]"],
            "train.learning_rate=5.0 is outside its range",
            False,
        ),
        (
            "champion before a sweep",
            ["train", "study=spam_tiny", "+from_best=true"],
            "no study named 'spam_tiny'",
            False,
        ),
        (
            "report before a sweep",
            ["report", "study=spam_tiny"],
            "no study named 'spam_tiny'",
            False,
        ),
        (
            "other data",
            [*fake, f"data.path={data / 'other.jsonl'}"],
            "is not the study this command describes",
            True,
        ),
        ("other backend", ["sweep"], "backend: FakeBackend -> LocalBackend", True),
        (
            "new choices",
            [*fake, "sweep.n_trials=5", "train.batch_size=choice(4, 8, 16, 32)"],
            "sweep.continue_from=sentiment_tiny",
            True,
        ),
    ]


@pytest.fixture(scope="module")
def a_study(tmp_path_factory) -> Path:
    """A runs folder holding a 3-trial fake sweep of the default study."""
    runs = tmp_path_factory.mktemp("template") / "runs"
    assert main(["sweep", "--quiet", *FAKE, f"paths.runs_dir={runs}", "sweep.n_trials=3"]) == 0
    return runs


CASES = [
    pytest.param(row, beside, id=f"{row}-{'beside-a-study' if beside else 'fresh'}")
    for row, _, _, needs_study in rows(Path("data"), Path("runs"))
    for beside in ((True,) if needs_study else (False, True))
]


@pytest.mark.parametrize(("row", "beside_a_study"), CASES)
def test_a_refused_command_writes_nothing(
    row, beside_a_study, a_study, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    runs = tmp_path / "runs"
    write_data_files(tmp_path / "data")
    _, words, says, _ = next(r for r in rows(tmp_path / "data", runs) if r[0] == row)
    if beside_a_study:
        shutil.copytree(a_study, runs)
    before = snapshot(runs)
    code = main([*words, f"paths.runs_dir={runs}"])
    error = capsys.readouterr().err
    assert code == 2, error
    assert says in error
    assert snapshot(runs) == before
