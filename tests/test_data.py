import json

import pytest

from harness.config import load_config
from harness.data import DataError, label_balance, load_dataset
from tests.helpers import write


def rows(n, labels=("a", "b")):
    return "".join(
        json.dumps({"text": f"example number {i}", "label": labels[i % len(labels)]}) + "\n"
        for i in range(n)
    )


def data_cfg(*overrides):
    return load_config(list(overrides)).data


def test_bundled_datasets_are_big_balanced_and_honest():
    sentiment = load_dataset(data_cfg("data=sentiment"))
    all_rows = sentiment.train + sentiment.validation + sentiment.test
    assert len(all_rows) >= 600
    assert set(label_balance(all_rows).values()) == {210}
    spam = load_dataset(data_cfg("data=spam"))
    assert len(spam.train + spam.validation + spam.test) >= 400
    assert spam.labels == ["ham", "spam"]
    faq = load_dataset(data_cfg("data=faq_chat"))
    assert len(faq.train + faq.validation + faq.test) >= 100
    assert faq.train[0].text.endswith("assistant:")


def test_seeded_split_is_stratified_and_reproducible():
    first = load_dataset(data_cfg("data=sentiment"))
    again = load_dataset(data_cfg("data=sentiment"))
    assert first.train == again.train
    assert label_balance(first.validation) == {"negative": 32, "neutral": 32, "positive": 32}
    other = load_dataset(data_cfg("data=sentiment", "data.split_seed=1"))
    assert other.train != first.train


def test_malformed_json_names_file_and_line(tmp_path):
    path = write(tmp_path / "d.jsonl", rows(3) + '{"text": "broken", \n' + rows(20))
    with pytest.raises(DataError, match=rf"{path}:4: malformed JSON"):
        load_dataset(data_cfg(f"data.path={path}"))


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write(tmp_path / "d.jsonl", rows(5) + '{"text": "no label here"}\n' + rows(20))
    with pytest.raises(DataError, match=rf"{path}:6: missing field 'label'"):
        load_dataset(data_cfg(f"data.path={path}"))


def test_configurable_field_names(tmp_path):
    text = "".join(json.dumps({"body": f"t {i}", "y": "ab"[i % 2]}) + "\n" for i in range(30))
    path = write(tmp_path / "d.jsonl", text)
    dataset = load_dataset(
        data_cfg(f"data.path={path}", "data.text_field=body", "data.label_field=y")
    )
    assert dataset.labels == ["a", "b"]


def test_empty_file(tmp_path):
    path = write(tmp_path / "d.jsonl", "\n\n")
    with pytest.raises(DataError, match="empty file"):
        load_dataset(data_cfg(f"data.path={path}"))


def test_single_class(tmp_path):
    path = write(tmp_path / "d.jsonl", rows(30, labels=("only",)))
    with pytest.raises(DataError, match="only one class"):
        load_dataset(data_cfg(f"data.path={path}"))


def test_too_few_rows(tmp_path):
    path = write(tmp_path / "d.jsonl", rows(6))
    with pytest.raises(DataError, match="too few rows: 6"):
        load_dataset(data_cfg(f"data.path={path}"))


def test_csv_with_bom_and_csv_errors_name_the_line(tmp_path):
    lines = ["text,label"] + [f'"hello, number {i}",{"ab"[i % 2]}' for i in range(30)]
    path = tmp_path / "d.csv"
    path.write_bytes("\ufeff".encode() + "\n".join(lines).encode())
    dataset = load_dataset(data_cfg(f"data.path={path}"))
    assert dataset.labels == ["a", "b"]
    assert any(e.text.startswith("hello, number") for e in dataset.train)
    bad = write(tmp_path / "bad.csv", "\n".join([*lines[:5], '"no label",', *lines[5:]]))
    with pytest.raises(
        DataError, match=rf"{bad}:6: missing field 'label'|{bad}:6: field 'label' is empty"
    ):
        load_dataset(data_cfg(f"data.path={bad}"))


def test_csv_multiline_record_is_reported_at_its_first_line(tmp_path):
    lines = ["text,label"] + [f"row {i},{'ab'[i % 2]}" for i in range(20)]
    bad = write(tmp_path / "bad.csv", "\n".join([*lines[:3], '"two\nlines",', *lines[3:]]))
    with pytest.raises(DataError, match=rf"{bad}:4: field 'label' is empty"):
        load_dataset(data_cfg(f"data.path={bad}"))


def test_explicit_split_files(tmp_path):
    train = write(tmp_path / "train.jsonl", rows(20))
    val = write(tmp_path / "val.jsonl", rows(4))
    test = write(tmp_path / "test.jsonl", rows(6))
    dataset = load_dataset(
        data_cfg(
            "data.path=null", f"data.train={train}", f"data.validation={val}", f"data.test={test}"
        )
    )
    assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (20, 4, 6)
    assert set(dataset.file_hashes) == {str(train), str(val), str(test)}


def test_label_only_in_validation_is_an_error(tmp_path):
    train = write(tmp_path / "train.jsonl", rows(20))
    val = write(tmp_path / "val.jsonl", rows(3, labels=("c",)))
    with pytest.raises(
        DataError, match=rf"{val}:1: labels \['c'\] not in training data \({train}\)"
    ):
        load_dataset(data_cfg("data.path=null", f"data.train={train}", f"data.validation={val}"))


def test_chat_rows_need_valid_roles_and_a_final_assistant_turn(tmp_path):
    good = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    }
    bad_role = {
        "messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]
    }
    no_answer = {"messages": [{"role": "user", "content": "hi"}]}
    for bad, message in ((bad_role, "needs a role"), (no_answer, "last message must be")):
        path = write(
            tmp_path / "chat.jsonl", "\n".join(json.dumps(r) for r in [good] * 12 + [bad]) + "\n"
        )
        with pytest.raises(DataError, match=rf"{path}:13: .*{message}"):
            load_dataset(data_cfg("data=faq_chat", f"data.path={path}"))


def test_prompt_completion_rows(tmp_path):
    text = "".join(
        json.dumps({"prompt": f"Q{i}?", "completion": f"A{i}."}) + "\n" for i in range(20)
    )
    path = write(tmp_path / "pc.jsonl", text)
    dataset = load_dataset(data_cfg("data=faq_chat", f"data.path={path}"))
    example = (dataset.train + dataset.validation + dataset.test)[0]
    assert example.text.startswith("Q") and example.target.startswith(" A")


def test_wrongly_encoded_file_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\nfine,a\ncaf\u00e9 cr\u00e8me,b\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv:3: not UTF-8 text \(byte 0xe9"):
        load_dataset(data_cfg(f"data.path={path}"))


def test_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match=r"nowhere\.jsonl: file not found"):
        load_dataset(data_cfg(f"data.path={tmp_path / 'nowhere.jsonl'}"))
