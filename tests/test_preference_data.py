"""Preference pairs (data.task=preference): both row shapes read, every broken row refused at its
file:line, the pairs' tokens counted as the hosted APIs bill them, the preferred rate scored by
ROUGE-L, and the loopback OpenAI fake's DPO jobs through the real openai SDK."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest

from harness.chat_data import (
    check_chat,
    check_chats,
    count_tokens,
    to_chats,
    to_preference_jsonl,
)
from harness.cli import main
from harness.config import ConfigError, load_config
from harness.cost import Encoding
from harness.data import DataError, Example, detect_task, load_dataset
from harness.metrics import preference_metrics
from tests.helpers import snapshot, write

BUNDLED = Path(__file__).resolve().parents[1] / "studies" / "data" / "preferences.jsonl"
CHARS = Encoding("chars", False, "characters / 4")  # count(text) = len(text) // 4


def data_cfg(*overrides: str):
    return load_config(["data=preferences", *overrides]).data


def openai_row(prompt: str, preferred: str, rejected: str, system: str = "") -> dict:
    turns = [{"role": "system", "content": system}] if system else []
    return {
        "input": {"messages": [*turns, {"role": "user", "content": prompt}]},
        "preferred_output": [{"role": "assistant", "content": preferred}],
        "non_preferred_output": [{"role": "assistant", "content": rejected}],
    }


def pairs(n: int, start: int = 0) -> list[dict]:
    return [
        openai_row(f"question {i} about storage", f"right answer {i}", f"wrong answer {i}")
        for i in range(start, start + n)
    ]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


# --- loading ------------------------------------------------------------------------------------


def test_the_bundled_set_is_80_varied_pairs_split_at_random():
    dataset = load_dataset(data_cfg())
    rows = dataset.train + dataset.validation + dataset.test
    assert dataset.task == "preference" and dataset.labels == []
    assert len(rows) >= 80
    assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (100, 22, 22)
    words = [set(re.findall(r"[a-z0-9]+", e.text.lower())) for e in rows]
    closest = max(len(a & b) / len(a | b) for i, a in enumerate(words) for b in words[:i])
    assert closest <= 0.5  # no two prompts share most of their words: no templated copies
    assert all(e.target != e.rejected and e.target and e.rejected for e in rows)
    assert all(e.messages[-1] == {"role": "user", "content": e.text} for e in rows)
    assert detect_task(BUNDLED, data_cfg())[0] == "preference"
    assert load_dataset(data_cfg("data.split_seed=1")).train != dataset.train


def test_openai_shape_reads_as_prompt_preferred_rejected_and_input_turns(tmp_path):
    rows = pairs(20)
    rows[0] = openai_row(
        "How big can a file be?", " 50 GB on paid plans. ", "No idea.", "Be brief."
    )
    path = write(tmp_path / "p.jsonl", jsonl(rows))
    examples = load_dataset(data_cfg(f"data.path={path}"))
    first = next(e for e in examples.train + examples.validation + examples.test if "big" in e.text)
    assert first == Example(
        "How big can a file be?",
        "50 GB on paid plans.",
        f"{path}:1",
        (
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "How big can a file be?"},
        ),
        "No idea.",
    )


def test_trl_shape_in_text_and_conversational_form_and_csv_cells(tmp_path):
    text = [{"prompt": f"q {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(12)]
    conversational = [
        {
            "prompt": [{"role": "user", "content": f"q {i}"}],
            "chosen": [{"role": "assistant", "content": f"good {i}"}],
            "rejected": [{"role": "assistant", "content": f"bad {i}"}],
        }
        for i in range(12)
    ]
    cells = io.StringIO()
    writer = csv.writer(cells)
    writer.writerow(["prompt", "chosen", "rejected"])
    for i in range(12):  # a JSON cell holds the conversational form; "[urgent]" is text
        chosen = json.dumps([{"role": "assistant", "content": f"good {i}"}])
        writer.writerow([f"[urgent] q {i}", chosen, f"bad {i}"])
    csv_text = cells.getvalue()
    openai_cells = io.StringIO()  # OpenAI's shape in CSV: each field a JSON cell
    writer = csv.writer(openai_cells)
    writer.writerow(["input", "preferred_output", "non_preferred_output"])
    for row in (openai_row(f"q {i}", f"good {i}", f"bad {i}") for i in range(12)):
        writer.writerow([json.dumps(row[name]) for name in row])
    for name, content in (
        ("text.jsonl", jsonl(text)),
        ("conv.jsonl", jsonl(conversational)),
        ("cells.csv", csv_text),
        ("openai_cells.csv", openai_cells.getvalue()),
    ):
        path = write(tmp_path / name, content)
        assert detect_task(path, data_cfg(f"data.path={path}"))[0] == "preference"
        dataset = load_dataset(data_cfg(f"data.path={path}"))
        found = {e.text: (e.target, e.rejected) for e in dataset.train + dataset.test}
        found |= {e.text: (e.target, e.rejected) for e in dataset.validation}
        prompt = "[urgent] q 3" if name == "cells.csv" else "q 3"  # "[...": text, not JSON
        assert found[prompt] == ("good 3", "bad 3"), name


def test_a_trl_row_with_a_prompt_is_a_pair_not_a_prompt_completion_row(tmp_path):
    rows = [{"prompt": f"q {i}", "chosen": f"a {i}", "rejected": f"b {i}"} for i in range(12)]
    path = write(tmp_path / "p.jsonl", jsonl(rows))
    task, why = detect_task(path, load_config([f"data.path={path}"]).data)
    assert (task, why) == ("preference", 'preference ({"prompt", "chosen", "rejected"}) rows')


def replace_line(rows: list[dict], line: int, row: dict) -> list[dict]:
    return [*rows[: line - 1], row, *rows[line:]]


def broken(**change) -> dict:
    row = openai_row("the question", "the good answer", "the bad answer")
    row.update(change)
    return row


def without(name: str) -> dict:
    row = broken()
    del row[name]
    return row


ASSISTANT = {"role": "assistant", "content": "an answer"}
BROKEN_ROWS = {
    "missing field": (without("non_preferred_output"), "missing field 'non_preferred_output'"),
    "two outputs": (
        broken(preferred_output=[ASSISTANT, ASSISTANT]),
        "'preferred_output' must be a list of exactly one assistant message, got 2 items",
    ),
    "no output": (
        broken(non_preferred_output=[]),
        "'non_preferred_output' must be a list of exactly one assistant message, got 0 items",
    ),
    "user output": (
        broken(preferred_output=[{"role": "user", "content": "x"}]),
        "'preferred_output' must be an assistant message, got role 'user'",
    ),
    "empty content": (
        broken(non_preferred_output=[{"role": "assistant", "content": "  "}]),
        "'non_preferred_output': the assistant message is empty",
    ),
    "input ends with assistant": (
        broken(input={"messages": [{"role": "user", "content": "q"}, ASSISTANT]}),
        "'input.messages' must end with the user message the answers reply to; it ends with "
        "a assistant message",
    ),
    "empty prompt": (
        broken(input={"messages": [{"role": "user", "content": " "}]}),
        "the last user message (the prompt) is empty",
    ),
    "input without messages": (broken(input={"turns": []}), "'input' must be an object"),
    "same answers": (
        broken(non_preferred_output=[{"role": "assistant", "content": "the  good answer "}]),
        "'preferred_output' and 'non_preferred_output' are the same answer",
    ),
    "trl missing rejected": (
        {"prompt": "q", "chosen": "a"},
        "missing field 'rejected'",
    ),
    "trl same answers": (
        {"prompt": "q", "chosen": "a", "rejected": "a"},
        "'chosen' and 'rejected' are the same answer",
    ),
    "chat row among pairs": (
        {"messages": [{"role": "user", "content": "q"}, ASSISTANT]},
        "this row is chat",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_ROWS))
def test_a_broken_pair_is_refused_at_its_file_and_line(tmp_path, case):
    row, message = BROKEN_ROWS[case]
    trl = case.startswith("trl")
    good = [{"prompt": f"q {i}", "chosen": f"a {i}", "rejected": f"b {i}"} for i in range(20)]
    rows = replace_line(good if trl else pairs(20), 7, row)
    path = write(tmp_path / "p.jsonl", jsonl(rows))
    with pytest.raises(DataError) as caught:
        load_dataset(data_cfg(f"data.path={path}"))
    assert str(caught.value).startswith(f"{path}:7: "), caught.value
    assert message in str(caught.value)


def test_the_task_must_fit_the_rows_both_ways(tmp_path):
    pair_file = write(tmp_path / "p.jsonl", jsonl(pairs(20)))
    chat = {"messages": [{"role": "user", "content": "q"}, ASSISTANT]}
    chat_file = write(tmp_path / "c.jsonl", jsonl([chat] * 20))
    with pytest.raises(DataError, match=rf"{pair_file}:1: .*use data.task=preference"):
        load_dataset(data_cfg(f"data.path={pair_file}", "data.task=generation"))
    with pytest.raises(DataError, match=rf"{chat_file}:1: data.task=preference needs preference"):
        load_dataset(data_cfg(f"data.path={chat_file}"))


# --- harness validate ---------------------------------------------------------------------------


def test_validate_names_the_task_and_counts_the_pairs_for_a_hosted_job(tmp_path, capsys):
    runs = f"paths.runs_dir={tmp_path / 'runs'}"
    assert main(["validate", str(BUNDLED), runs]) == 0
    out = capsys.readouterr().out
    assert "dataset preferences (preference, detected: preference (" in out
    assert "rows: train 100, validation 22, test 22 (total 144)" in out
    assert "backend=openai" in out  # where the pairs' tokens are counted
    assert main(["validate", str(BUNDLED), "backend=openai", runs]) == 0
    out = capsys.readouterr().out
    assert "hosted fine-tuning rules" in out and "100 training examples" in out
    tokens = int(re.search(r"training file: (\d+) tokens", out).group(1))
    dataset = load_dataset(data_cfg())
    answers_only = sum(len(e.target) + len(e.rejected) for e in dataset.train) // 4
    assert tokens > answers_only  # both answers are in the count, and the input too


# --- chats, token counts, the DPO file ----------------------------------------------------------


def test_a_pair_counts_its_input_and_both_answers():
    example = Example(
        "q" * 40, "p" * 80, "f.jsonl:3", ({"role": "user", "content": "q" * 40},), "r" * 120
    )
    chat = to_chats_of([example])["train"][0]
    assert chat.prompt == [{"role": "user", "content": "q" * 40}]
    assert (chat.answer, chat.rejected) == ("p" * 80, "r" * 120)
    # 3 per example, 3 per message: (3 + 10) + (3 + 20) + (3 + 30) + 3
    assert count_tokens(chat, CHARS) == 72 == CHARS.count_chat(chat.messages) + 3 + 30
    assert check_chat(chat, CHARS, 72) == 72
    with pytest.raises(DataError, match=r"f.jsonl:3: 72 tokens \(the input and both answers\)"):
        check_chat(chat, CHARS, 71)


def to_chats_of(examples: list[Example]):
    from harness.data import Dataset

    return to_chats(Dataset("preference", examples, examples, examples), "labels: {labels}")


def test_check_chats_refuses_a_pair_too_long_at_its_line_and_counts_each_once():
    examples = [
        Example(
            f"q{i}",
            f"good {i}",
            f"f.jsonl:{i + 1}",
            ({"role": "user", "content": f"q{i}"},),
            f"bad {i}",
        )
        for i in range(12)
    ]
    counted: dict = {}
    chats = to_chats_of(examples)["train"]
    counts = check_chats(chats, "train", CHARS, 100, counted)
    assert counts == [count_tokens(c, CHARS) for c in chats] and len(counted) == 12
    long = Example("q", "good", "f.jsonl:13", ({"role": "user", "content": "q"},), "bad " * 400)
    with pytest.raises(DataError, match=r"^f.jsonl:13: \d+ tokens \(the input and both"):
        check_chats(to_chats_of([*examples, long])["train"], "train", CHARS, 100, counted)


def test_the_dpo_file_reads_back_as_the_same_pairs(tmp_path):
    dataset = load_dataset(data_cfg())
    chats = to_chats(dataset, "unused for pairs: {labels}")["train"]
    content = to_preference_jsonl(chats)
    first = json.loads(content.splitlines()[0])
    assert sorted(first) == ["input", "non_preferred_output", "preferred_output"]
    assert first["preferred_output"] == [{"role": "assistant", "content": chats[0].answer}]
    path = tmp_path / "back.jsonl"
    path.write_bytes(content)
    again = load_dataset(data_cfg(f"data.path={path}"))

    def pair(e: Example) -> str:
        return json.dumps([e.messages, e.target, e.rejected])

    read = sorted(map(pair, again.train + again.validation + again.test))
    assert read == sorted(map(pair, dataset.train))


# --- the metric ---------------------------------------------------------------------------------


def test_preferred_rate_counts_answers_closer_to_the_preferred_one_a_tie_half():
    preferred = ["refunds within 14 days", "use an authenticator app"]
    rejected = ["no refunds ever", "we text you a code"]
    assert preference_metrics(preferred, preferred, rejected) == {
        "preferred_rate": 1.0,
        "rouge_l": 1.0,
    }
    as_rejected = preference_metrics(rejected, preferred, rejected)
    assert as_rejected["preferred_rate"] == 0.0
    # "refunds" shared with the preferred answer: 1 of 4 and 1 of 3 tokens -> F1 2/7
    assert as_rejected["rouge_l"] == pytest.approx((2 / 7 + 0.0) / 2)
    # an answer like neither is a tie: half a win
    neither = preference_metrics(["hello there", "we text you"], preferred, rejected)
    assert neither["preferred_rate"] == 0.25  # (0.5 + 0) / 2: the second is like the rejected
    assert preference_metrics([], [], []) == {"preferred_rate": 0.0, "rouge_l": 0.0}


def test_hosted_scoring_of_pairs_writes_expected_rejected_and_answer(tmp_path):
    from harness.backends.hosted import Scoring, score_test_split

    dataset = load_dataset(data_cfg())
    chats = to_chats(dataset, "{labels}")["test"][:4]
    answers = {
        c.source: a
        for c, a in zip(chats, [chats[0].answer, chats[1].rejected, "hm", "hm"], strict=True)
    }
    scores, files = score_test_split(
        lambda chat: (answers[chat.source], 10, 2),
        Scoring("preference", [], chats, 2),
        tmp_path,
        "t",
    )
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [sorted(r) for r in rows] == [["answer", "expected", "rejected", "source"]] * 4
    assert rows[1] == {
        "source": chats[1].source,
        "expected": chats[1].answer,
        "rejected": chats[1].rejected,
        "answer": chats[1].rejected,
    }
    expected = preference_metrics(
        [answers[c.source] for c in chats], [c.answer for c in chats], [c.rejected for c in chats]
    )
    assert scores["test/preferred_rate"] == expected["preferred_rate"]
    assert scores["test/preferred_rate"] == 0.5  # a win, a loss, two ties ("hm" is like neither)
    assert scores["test/prompt_tokens"] == 40.0 and len(files) == 1  # no confusion matrix


# --- a study's checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "fake"])
def test_a_preference_sweep_on_a_backend_without_dpo_is_refused_writing_nothing(
    tmp_path, capsys, monkeypatch, backend
):
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code = main(
        ["sweep", "data=preferences", f"backend={backend}", f"paths.runs_dir={tmp_path / 'runs'}"]
    )
    err = capsys.readouterr().err
    assert code == 2
    name = {"local": "LocalBackend", "fake": "FakeBackend"}[backend]
    assert (
        f"harness sweep: error: data.task=preference (dpo): backend '{name}' offers only sft. "
        "Preference tuning runs on hosted backends that offer it: backend=openai, "
        "backend=azure_openai or backend=together." in err
    )
    assert "KeyError" not in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_a_held_out_task_metric_may_be_the_objective_of_a_hosted_study(make_cfg):
    from harness.study.plan import _check_sweep_settings, held_out_metrics, make_backend

    cfg = make_cfg(
        "data=preferences", "backend=openai", "train.method=dpo", "sweep.metric=test/preferred_rate"
    )
    hosted = make_backend(cfg)
    assert held_out_metrics(hosted, "preference") == ("test/preferred_rate", "test/rouge_l")
    _check_sweep_settings(cfg, hosted)  # passes
    refused = make_cfg("data=preferences", "backend=openai", "sweep.metric=test/f1")
    with pytest.raises(ConfigError, match=r"test/f1 is not measured.*test/preferred_rate"):
        _check_sweep_settings(refused, make_backend(refused))
    local = make_cfg("data=sentiment", "backend=fake", "sweep.metric=test/f1")
    assert held_out_metrics(make_backend(local), "classification") == ()
    with pytest.raises(ConfigError, match=r"sweep\.metric=test/f1 is not measured"):
        _check_sweep_settings(local, make_backend(local))


# --- the loopback fake's DPO jobs ---------------------------------------------------------------


@pytest.fixture
def fake():
    """The loopback fake whose jobs move a step with each request (RequestClock): a test polls
    a job to its end without sleeping, whatever the machine's load."""
    from harness.fake_openai import FakeOpenAI, FakeOpenAIServer, RequestClock, Timing

    api = FakeOpenAI(Timing(validate_s=1, queue_s=1, step_s=1), clock=RequestClock())
    with FakeOpenAIServer(api) as server:
        yield server


def client_of(server):
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0)


def upload(client, rows: list[dict]) -> str:
    return client.files.create(file=("t.jsonl", jsonl(rows).encode()), purpose="fine-tune").id


def dpo(beta, epochs=3, multiplier=2.0) -> dict:
    hp = {"n_epochs": epochs, "batch_size": 8, "learning_rate_multiplier": multiplier}
    return {"type": "dpo", "dpo": {"hyperparameters": {**hp, "beta": beta}}}


def finished(client, job_id: str):
    for _ in range(1000):  # a step per request (RequestClock): no sleep needed
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
    raise AssertionError(f"job {job_id} never finished")


def test_a_dpo_job_is_accepted_and_its_model_answers_from_the_pairs(fake):
    client = client_of(fake)
    file_id = upload(client, pairs(20))
    job = client.fine_tuning.jobs.create(
        model="gpt-4.1-mini", training_file=file_id, method=dpo(0.2)
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    job = finished(client, job.id)
    assert job.status == "succeeded" and job.trained_tokens > 0
    answer = (
        client.chat.completions.create(
            model=job.fine_tuned_model,
            messages=[{"role": "user", "content": "question 7 about storage"}],
        )
        .choices[0]
        .message.content
    )
    assert answer in ("right answer 7", "wrong answer 7")
    auto = client.fine_tuning.jobs.create(
        model="gpt-4.1-mini", training_file=file_id, method=dpo("auto")
    )
    assert auto.method.dpo.hyperparameters.beta == 0.1  # what "auto" resolves to
    assert (
        client.fine_tuning.jobs.create(
            model="gpt-4.1-mini", training_file=file_id, method=dpo(2)
        ).method.dpo.hyperparameters.beta
        == 2.0
    )


@pytest.mark.parametrize("beta", [0, -0.1, 2.5, "high"])
def test_a_dpo_beta_outside_0_to_2_is_refused_with_a_400(fake, beta):
    import openai

    client = client_of(fake)
    file_id = upload(client, pairs(20))
    with pytest.raises(openai.BadRequestError, match="beta"):
        client.fine_tuning.jobs.create(
            model="gpt-4.1-mini", training_file=file_id, method=dpo(beta)
        )
    assert not fake.api.jobs


def test_a_job_whose_method_does_not_fit_its_rows_fails_validation(fake):
    client = client_of(fake)
    chat = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
        for i in range(12)
    ]
    dpo_on_chats = client.fine_tuning.jobs.create(
        model="gpt-4.1-mini", training_file=upload(client, chat), method=dpo(0.2)
    )
    sft_on_pairs = client.fine_tuning.jobs.create(
        model="gpt-4.1-mini", training_file=upload(client, pairs(12))
    )
    for job_id, says in (
        (dpo_on_chats.id, "needs 'input'"),
        (sft_on_pairs.id, "not a chat example"),
    ):
        job = finished(client, job_id)
        assert job.status == "failed" and job.error.code == "invalid_training_file"
        assert says in job.error.message
    two_answers = replace_line(pairs(12), 5, broken(preferred_output=[ASSISTANT, ASSISTANT]))
    job = finished(
        client,
        client.fine_tuning.jobs.create(
            model="gpt-4.1-mini", training_file=upload(client, two_answers), method=dpo(0.2)
        ).id,
    )
    assert job.status == "failed" and "line 5: each output must be exactly one" in job.error.message


def dpo_job(beta: float | None, method: str = "dpo"):
    from harness.fake_openai import Job

    return Job(
        "ftjob-x",
        1,
        0,
        0.0,
        "m",
        "file-x",
        None,
        3,
        8,
        2.0,
        0,
        None,
        {},
        [],
        0,
        steps_per_epoch=20,
        method=method,
        beta=beta,
    )


def test_beta_shapes_the_curve_with_an_optimum_near_0_2_and_sft_unchanged():
    from harness.fake_openai import train_loss, valid_loss

    final = {beta: valid_loss(dpo_job(beta), 60) for beta in (0.01, 0.05, 0.1, 0.2, 0.3, 1.0, 2.0)}
    assert min(final, key=final.get) == 0.2
    assert final[0.01] > final[0.2] + 0.8 and final[2.0] > final[0.2] + 0.4  # both ends
    assert final[0.05] > final[0.1] > final[0.2] < final[0.3] < final[1.0] < final[2.0]
    sft = dpo_job(None, method="supervised")
    assert valid_loss(sft, 60) == 0.32417314086757726  # recorded before DPO: SFT unchanged
    assert train_loss(sft, 30) == 0.3473784277682925
    assert final[0.2] == valid_loss(sft, 60)  # the best beta costs nothing


def test_the_preferred_rate_on_held_out_prompts_follows_beta(fake):
    """Held-out prompts near training ones: a DPO model with a good beta answers the preferred
    answer far more often than one with a poor beta, scored by the harness's own code."""
    from harness.backends.hosted import Scoring, chat_completer, score_chats
    from harness.chat_data import Chat

    client = client_of(fake)
    topics = [f"topic{i} subject{i} matter{i}" for i in range(30)]
    train = [
        openai_row(f"tell me about {t}", f"{t} correct fact", f"{t} wrong claim") for t in topics
    ]
    held_out = [
        Chat(
            (
                {"role": "user", "content": f"please, {t}?"},
                {"role": "assistant", "content": f"{t} correct fact"},
            ),
            f"test:{i}",
            f"{t} wrong claim",
        )
        for i, t in enumerate(topics)
    ]
    file_id = upload(client, train)
    rates = {}
    for beta in (0.2, 0.01):
        job = client.fine_tuning.jobs.create(
            model="gpt-4.1-mini", training_file=file_id, method=dpo(beta), seed=1
        )
        model = finished(client, job.id).fine_tuned_model
        scores, rows = score_chats(
            chat_completer(client, model, 32, 1), Scoring("preference", [], held_out, 2)
        )
        assert all(r["answer"] in (r["expected"], r["rejected"]) for r in rows)
        rates[beta] = scores["preferred_rate"]
    assert rates[0.2] >= 0.8 and rates[0.01] <= rates[0.2] - 0.3, rates


def test_on_the_bundled_set_better_hyperparameters_give_a_higher_held_out_preferred_rate(fake):
    """The bundled study means something on the fake: its test prompts are unseen, yet a model
    tuned well (beta 0.2, 3 epochs) answers closer to their preferred answers than one tuned
    badly (beta 0.01, 1 epoch at a tiny multiplier), as the set asks most facts more than one
    way, as support questions come. (The fake's draws depend on its file ids, which differ from
    run to run: hence a margin, not a number; over 1000 draws of ids it was never under 0.13
    for preferred_rate, 0.07 for rouge_l.)"""
    from harness.backends.hosted import Scoring, chat_completer, score_chats

    client = client_of(fake)
    chats = to_chats(load_dataset(data_cfg()), "{labels}")
    file_id = client.files.create(
        file=("train.jsonl", to_preference_jsonl(chats["train"])), purpose="fine-tune"
    ).id
    rates = {}
    for name, method in (("good", dpo(0.2)), ("bad", dpo(0.01, epochs=1, multiplier=0.05))):
        job = client.fine_tuning.jobs.create(
            model="gpt-4.1-mini", training_file=file_id, method=method, seed=0
        )
        model = finished(client, job.id).fine_tuned_model
        ask = chat_completer(client, model, 64, 0)
        held_out = chats["validation"] + chats["test"]  # 44 prompts: a margin that holds
        rates[name] = score_chats(ask, Scoring("preference", [], held_out, 2))[0]
    assert rates["good"]["preferred_rate"] >= rates["bad"]["preferred_rate"] + 0.1, rates
    assert rates["good"]["rouge_l"] > rates["bad"]["rouge_l"] + 0.05, rates
