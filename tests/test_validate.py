"""One data validator for every entry point: `harness validate FILE` and `harness sweep
data.path=FILE` give a file the same verdict, through the loader (issue 10, items 2 and 3)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from harness.cli import main
from tests.helpers import write

TICKETS = Path(__file__).resolve().parents[1] / "studies" / "data" / "tickets.jsonl"
REAL = Path("/work/shared/data/real")


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error(capsys, *args: str) -> str:
    """The message of a refused command (exit 2, `harness CMD: error: MESSAGE` on stderr)."""
    code, _, err = run(capsys, *args)
    assert code == 2, err
    found = re.search(rf"harness {args[0]}: error: (.*)", err, re.DOTALL)
    assert found, err
    return found.group(1).strip()


def sweep_error(capsys, runs: Path, *overrides: str) -> str:
    return error(capsys, "sweep", "backend=fake", f"paths.runs_dir={runs}", *overrides)


def ticket_rows(per_label: dict[str, int]) -> list[dict]:
    """Real rows of the bundled tickets set, the first N of each label asked for."""
    wanted, rows = Counter(per_label), []
    for line in TICKETS.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        label = row["messages"][-1]["content"]
        if wanted[label] > 0:
            wanted[label] -= 1
            rows.append(row)
    assert not +wanted, "tickets.jsonl has fewer rows of a label than asked"
    return rows


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


# 12 valid rows, 5 labels of 2-3 rows: too few for a stratified split to fill every split
SMALL = {
    "account_access": 3,
    "billing": 3,
    "bug_report": 2,
    "data_recovery": 2,
    "feature_request": 2,
}


# item 1 -------------------------------------------------------------------------------------------
def test_latin1_csv_gets_the_loaders_verdict_from_validate_and_sweep(tmp_path, capsys):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\nfine,a\nok,b\ncaf\u00e9 cr\u00e8me,a\n".encode("latin-1"))
    said = error(capsys, "validate", str(path))
    assert said.startswith(f"{path}:4: not UTF-8 text (byte 0xe9 at offset 26)"), said
    assert sweep_error(capsys, tmp_path / "runs", f"data.path={path}") == said


def test_missing_file_is_named_by_validate(tmp_path, capsys):
    path = tmp_path / "nowhere.jsonl"
    assert error(capsys, "validate", str(path)) == f"{path}: file not found"


# item 2 -------------------------------------------------------------------------------------------
def test_chat_rows_with_a_small_label_set_are_classification(tmp_path, capsys):
    path = jsonl(tmp_path / "tickets40.jsonl", ticket_rows(dict.fromkeys(SMALL, 8)))
    code, out, err = run(capsys, "validate", str(path), f"paths.runs_dir={tmp_path / 'runs'}")
    assert code == 0, err
    assert "(classification, detected: the final answers of its 40 chat rows are 5 short" in out
    for label in SMALL:  # the label balance table: 8 rows each, split 6 / 1 / 1
        assert re.search(rf"│ {label}\s+│\s+6 │\s+1 │\s+1 │", out), out


def test_free_text_chat_answers_are_generation_and_the_task_can_be_forced(tmp_path, capsys):
    runs = f"paths.runs_dir={tmp_path / 'runs'}"
    dolly = REAL / "dolly_open_qa" / "chat_500.jsonl"
    code, out, err = run(capsys, "validate", str(dolly), runs)
    assert code == 0, err
    assert "(generation, detected: the final answers of its 500 chat rows are free text" in out
    assert "label balance" not in out
    code, out, err = run(capsys, "validate", str(TICKETS), "data.task=generation", runs)
    assert code == 0, err
    assert "(generation, data.task on the command line)" in out


def test_text_label_and_prompt_completion_files_are_detected(tmp_path, capsys):
    runs = f"paths.runs_dir={tmp_path / 'runs'}"
    code, out, err = run(capsys, "validate", str(REAL / "sst2" / "test.jsonl"), runs)
    assert code == 0, err
    assert "(classification, detected: text/label rows)" in out and "positive" in out
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(20)]
    code, out, err = run(capsys, "validate", str(jsonl(tmp_path / "pc.jsonl", rows)), runs)
    assert code == 0, err
    assert "(generation, detected: prompt/completion rows)" in out


def test_chat_classification_file_with_one_label_fails_naming_the_file(tmp_path, capsys):
    path = jsonl(tmp_path / "billing.jsonl", ticket_rows({"billing": 20}))
    said = error(capsys, "validate", str(path))
    assert said.startswith(f"{path}: only one class in training data: ['billing']"), said
    assert sweep_error(capsys, tmp_path / "runs", "data=tickets", f"data.path={path}") == said


# item 3 -------------------------------------------------------------------------------------------
def test_mixed_row_formats_are_refused_at_the_first_differing_line(tmp_path, capsys):
    rows = ticket_rows(dict.fromkeys(SMALL, 3))
    rows.insert(6, {"prompt": "Where is my invoice?", "completion": "billing"})
    path = jsonl(tmp_path / "mixed.jsonl", rows)
    expected = (
        f'{path}:7: this row is prompt/completion ({{"prompt", "completion"}}) but line 1 is '
        'chat ({"messages": [...]}); one format per file'
    )
    assert error(capsys, "validate", str(path)) == expected
    assert sweep_error(capsys, tmp_path / "runs", "data=tickets", f"data.path={path}") == expected
    text_rows = [{"text": f"fine {i}", "label": "ab"[i % 2]} for i in range(5)]
    path = jsonl(tmp_path / "mixed2.jsonl", [*text_rows, rows[6], *text_rows])
    assert error(capsys, "validate", str(path)).startswith(
        f'{path}:6: this row is prompt/completion ({{"prompt", "completion"}}) but line 1 is '
        'text/label ({"text", "label"})'
    )


# item 4 -------------------------------------------------------------------------------------------
def test_label_missing_from_the_training_file_names_both_files(tmp_path, capsys):
    train = jsonl(tmp_path / "train.jsonl", ticket_rows({"billing": 6, "bug_report": 6}))
    rows = ticket_rows({"billing": 2, "data_recovery": 2})
    validation = jsonl(tmp_path / "val.jsonl", rows)
    line = 1 + [r["messages"][-1]["content"] for r in rows].index("data_recovery")
    said = sweep_error(
        capsys,
        tmp_path / "runs",
        "data=tickets",
        "data.path=null",
        f"data.train={train}",
        f"data.validation={validation}",
    )
    assert said.startswith(
        f"{validation}:{line}: labels ['data_recovery'] not in training data ({train})"
    ), said


# item 5 -------------------------------------------------------------------------------------------
def test_small_file_says_counts_minimum_and_the_split_files_alternative(tmp_path, capsys):
    path = jsonl(tmp_path / "t12.jsonl", ticket_rows(SMALL))
    said = sweep_error(capsys, tmp_path / "runs", "data=tickets", f"data.path={path}")
    assert said == (
        f"{path}: 12 rows split by data.validation_fraction=0.15 and data.test_fraction=0.15 "
        "(per label: 5 labels of 2 to 3 rows) give train 12, validation 0, test 0; every split "
        "needs at least 1 row and a label needs at least 4 rows to give one to every split. Add "
        "rows, raise data.validation_fraction / data.test_fraction, or give the splits as "
        "files: data.path=null data.train=TRAIN_FILE data.validation=VALIDATION_FILE "
        "(data.test=TEST_FILE optional)"
    )
    assert error(capsys, "validate", str(path)) == said
    # the alternative it names works on the very same file
    validation = jsonl(tmp_path / "v.jsonl", ticket_rows(dict.fromkeys(SMALL, 4))[-5:])
    code, out, err = run(
        capsys,
        "validate",
        "data=tickets",
        "data.path=null",
        f"data.train={path}",
        f"data.validation={validation}",
        f"paths.runs_dir={tmp_path / 'runs'}",
    )
    assert code == 0, err
    assert "rows: train 12, validation 5, test 5" in out


# item 6 -------------------------------------------------------------------------------------------
def test_truncation_notice_lists_the_first_offending_lines(tmp_path, capsys):
    long_lines = [3, 8, 9, 15, 21, 26, 30]  # 1-based lines of the long rows
    rows = [
        {
            "text": " ".join(f"word{j}" for j in range(150)) if i + 1 in long_lines else "short",
            "label": "ab"[i % 2],
        }
        for i in range(30)
    ]
    path = jsonl(tmp_path / "long.jsonl", rows)
    code, out, err = run(
        capsys, "validate", str(path), "train.max_length=64", f"paths.runs_dir={tmp_path / 'r'}"
    )
    assert code == 0, err
    notice = re.search(r"(\d+) of 30 examples exceed train\.max_length=64 .*: (.*)", out)
    assert notice and notice.group(1) == "7", out
    listed = re.findall(rf"{re.escape(str(path))}:(\d+) \((\d+) tokens\)", notice.group(2))
    assert [int(line) for line, _ in listed] == long_lines[:5]
    assert all(int(tokens) > 64 for _, tokens in listed)
    assert notice.group(2).endswith("and 2 more")


# item 7 -------------------------------------------------------------------------------------------
def long_ticket_file(tmp_path: Path) -> Path:
    """12 rows (too few for the split), the 5th with 200,000 characters: ~100,000 tokens."""
    rows = ticket_rows(SMALL)
    rows[4]["messages"][1]["content"] = " ".join("abcdefghij"[i % 10] for i in range(100_000))
    return jsonl(tmp_path / "long_ticket.jsonl", rows)


def test_hosted_token_limit_is_checked_before_the_split(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-never-sent")
    path = long_ticket_file(tmp_path)
    runs = f"paths.runs_dir={tmp_path / 'runs'}"
    said = error(capsys, "validate", "study=tickets_openai", str(path), runs)
    found = re.fullmatch(
        rf"{re.escape(str(path))}:5: (\d+) tokens \(tiktoken o200k_base\); the model's limit "
        r"per example is 65536\. Shorten it or drop it\.",
        said,
    )
    assert found and int(found.group(1)) > 65536, said
    sweep = error(capsys, "sweep", "study=tickets_openai", f"data.path={path}", runs)
    assert sweep == said
    # the same file without the long row: the split-size error is what is left
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    del rows[4]
    short = jsonl(tmp_path / "short.jsonl", rows)
    assert "give train 11, validation 0" in error(
        capsys, "validate", "study=tickets_openai", str(short), runs
    )


def test_hosted_validate_counts_each_example_once(tmp_path, capsys, monkeypatch):
    """The load-time check counts the tokens; describe() reuses them for the cost table."""
    from harness.cost import Encoding

    counted = []
    count_chat = Encoding.count_chat
    monkeypatch.setattr(
        Encoding,
        "count_chat",
        lambda self, messages: counted.append(1) or count_chat(self, messages),
    )
    code, out, err = run(
        capsys, "validate", "study=tickets_openai", f"paths.runs_dir={tmp_path / 'runs'}"
    )
    assert code == 0, err
    assert "rows: train 155, validation 35, test 35 (total 225)" in out
    assert len(counted) == 225


@pytest.mark.parametrize("task", ["classification", "generation"])
def test_forced_task_reaches_the_loader(tmp_path, capsys, task):
    rows = ticket_rows(dict.fromkeys(SMALL, 4))
    path = jsonl(tmp_path / "t20.jsonl", rows)
    code, out, err = run(
        capsys, "validate", str(path), f"data.task={task}", f"paths.runs_dir={tmp_path / 'r'}"
    )
    assert code == 0, err
    assert f"({task}, data.task on the command line)" in out
    assert ("label balance" in out) == (task == "classification")
