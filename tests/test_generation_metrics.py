"""Generated-text metrics (BLEU, ROUGE-L beside exact match and token F1): their values, on the
test split of every generation trial, at evaluations when the study optimizes one of them, and
the completions they score (batched, greedy or seeded sampling)."""

from __future__ import annotations

import math

import pytest

from harness.backends.base import optimized_metrics
from harness.backends.generation import Decoding, complete, text_metrics_at_evaluations
from harness.backends.local import LocalBackend
from harness.config import ConfigError, with_params
from harness.data import load_dataset
from harness.metrics import corpus_bleu, generation_metrics, mean_rouge_l
from harness.study import plan_study
from tests.helpers import RecordingReporter, trial_spec

TEXT_METRICS = ("bleu", "rouge_l", "exact_match", "token_f1")
TINY = {"train.epochs": 1, "train.batch_size": 8, "train.learning_rate": 3e-3}


# --- the metrics ------------------------------------------------------------------------------


def test_bleu_is_sacrebleus_corpus_bleu_on_the_0_to_100_scale():
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    # by hand: unigram precision 2/2, bigram 1/1, no longer n-grams in the prediction (left out
    # of the mean), brevity penalty exp(1 - 3/2)
    assert corpus_bleu(["the cat"], ["the cat sat"]) == pytest.approx(100 * math.exp(-0.5))
    # a corpus of short answers is not scored 0 whatever it says
    assert corpus_bleu(["yes", "no"], ["yes", "no"]) == pytest.approx(100)
    assert corpus_bleu(["dog"], ["cat"]) == 0.0
    assert corpus_bleu([], []) == 0.0


def test_rouge_l_is_the_mean_f_measure_of_the_longest_common_subsequence():
    # LCS 3 of 3 predicted and 4 expected tokens: P = 1, R = 0.75, F = 2PR/(P+R) = 6/7
    assert mean_rouge_l(["the cat sat"], ["the cat sat down"]) == pytest.approx(6 / 7)
    assert mean_rouge_l(["the cat sat", "a b"], ["the cat sat down", "a b"]) == pytest.approx(
        (6 / 7 + 1) / 2
    )
    # stemmed: "cats running" and "cat runs" are the same two stems
    assert mean_rouge_l(["cats running"], ["cat runs"]) == pytest.approx(1.0)
    # LCS "b c" of 3 and 3 tokens (order matters, not just overlap): 2/3
    assert mean_rouge_l(["a b c"], ["b c a"]) == pytest.approx(2 / 3)


def test_generation_metrics_has_all_four_on_their_scales():
    scores = generation_metrics(["The cat sat.", "no idea"], ["the cat sat", "paris"])
    assert set(scores) == set(TEXT_METRICS)
    assert scores["exact_match"] == pytest.approx(0.5)  # normalised: case and punctuation
    assert scores["token_f1"] == pytest.approx(0.5)
    assert scores["rouge_l"] == pytest.approx(0.5)
    assert 0 < scores["bleu"] < 100


# --- what a study may optimize ------------------------------------------------------------------


def test_the_plan_accepts_a_generated_text_metric_for_a_local_generation_study(make_cfg):
    for metric in ("eval/rouge_l", "eval/bleu", "eval/exact_match", "eval/token_f1"):
        cfg = make_cfg("study=faq_chat_tiny", f"sweep.metric={metric}", "sweep.direction=maximize")
        assert plan_study(cfg).objectives == [(metric, "maximize")]
    two = "sweep.objectives={eval/bleu: maximize, eval/loss: minimize}"
    assert plan_study(make_cfg("study=faq_chat_tiny", two)).objectives[0] == (
        "eval/bleu",
        "maximize",
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["study=sentiment_tiny", "sweep.metric=eval/bleu"],
            r"sweep.metric=eval/bleu is not measured at evaluations of a classification task by "
            r"backend LocalBackend \(eval/bleu scores generated text: a metric of generation "
            r"tasks\); choose one of eval/loss, eval/accuracy",
        ),
        (
            [
                "study=sentiment_tiny",
                "sweep.objectives={eval/f1: maximize, eval/rouge_l: maximize}",
            ],
            r"sweep.objectives: 'eval/rouge_l' is not a metric trials report \(eval/rouge_l "
            r"scores generated text",
        ),
        # the fake generates no text: it does not claim what it cannot measure
        (
            ["study=faq_chat_tiny", "backend=fake", "sweep.metric=eval/rouge_l"],
            r"by backend FakeBackend \(eval/rouge_l needs text generated at each evaluation, "
            r"which this backend does not do; test/rouge_l is measured on the test split\)",
        ),
    ],
)
def test_a_generated_text_metric_no_evaluation_measures_is_refused_before_any_trial(
    make_cfg, runs, overrides, message
):
    with pytest.raises(ConfigError, match=message):
        plan_study(make_cfg(*overrides))
    assert not runs.exists()  # refused before anything was written


def test_evaluations_generate_text_only_when_the_study_optimizes_a_text_metric(make_cfg, tmp_path):
    def spec(*overrides):
        return trial_spec(make_cfg("study=faq_chat_tiny", *overrides), None, tmp_path)

    assert not text_metrics_at_evaluations(spec())  # eval/loss
    assert text_metrics_at_evaluations(spec("sweep.metric=eval/token_f1"))
    both = spec("sweep.objectives={eval/loss: minimize, eval/bleu: maximize}")
    assert optimized_metrics(both) == {"eval/loss", "eval/bleu"}
    assert text_metrics_at_evaluations(both)


# --- completions ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random tiny GPT-2 and its tokenizer (trained on the bundled FAQ chats), with prompts
    of several lengths."""
    import torch

    from harness.backends.families import build_model
    from harness.config import load_config

    runs = tmp_path_factory.mktemp("runs")
    cfg = load_config(["study=faq_chat_tiny", f"paths.runs_dir={runs}"])
    data = LocalBackend().prepare(cfg, load_dataset(cfg.data))
    torch.manual_seed(0)
    model = build_model(cfg, data).eval()
    prompts = (data.test.inputs + data.validation.inputs)[:12]
    assert len({len(p) for p in prompts}) > 3  # batches really are padded
    return model, data.tokenizer, prompts


GREEDY = Decoding(max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0)


def test_batched_greedy_completions_equal_one_prompt_at_a_time(tiny_model):
    model, tokenizer, prompts = tiny_model
    batched = complete(model, tokenizer, prompts, GREEDY, max_prompt_tokens=100, batch_size=8)
    alone = [
        complete(model, tokenizer, [p], GREEDY, max_prompt_tokens=100, batch_size=1)[0]
        for p in prompts
    ]
    assert batched == alone
    assert any(batched)  # the random model says something


def test_sampled_completions_are_seeded_and_differ_from_greedy(tiny_model):
    import torch

    model, tokenizer, prompts = tiny_model

    def run(decoding):
        return complete(model, tokenizer, prompts, decoding, max_prompt_tokens=100, batch_size=8)

    sampled = Decoding(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=7)
    torch.manual_seed(123)
    first = run(sampled)
    after = torch.rand(3)  # the global RNG is as sampling found it
    assert run(sampled) == first  # deterministic for a seed
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)
    assert run(Decoding(8, 1.0, 0.95, seed=8)) != first  # the seed matters
    assert sum(a != b for a, b in zip(first, run(GREEDY), strict=True)) > len(prompts) // 2


# --- trials -----------------------------------------------------------------------------------


def _trial(make_cfg, tmp_path, *overrides, params=TINY, metric=None):
    cfg = with_params(make_cfg("study=faq_chat_tiny", "train.max_new_tokens=8", *overrides), params)
    backend = LocalBackend()
    prepared = backend.prepare(cfg, load_dataset(cfg.data))
    reporter = RecordingReporter(str(cfg.sweep.metric))
    result = backend.run(trial_spec(cfg, prepared, tmp_path), reporter)
    evals = [m for _, m in reporter.calls if "eval/loss" in m]
    return result, evals


@pytest.mark.slow
def test_a_generation_trial_reports_bleu_and_rouge_on_the_test_split_only(make_cfg, tmp_path):
    result, evals = _trial(make_cfg, tmp_path)  # sweep.metric=eval/loss
    for name in TEXT_METRICS:
        assert f"test/{name}" in result.metrics
    assert 0.0 <= result.metrics["test/bleu"] <= 100.0
    assert 0.0 <= result.metrics["test/rouge_l"] <= 1.0
    # no generated text at evaluations: the objective does not need it
    assert evals and not any(f"eval/{name}" in m for m in evals for name in TEXT_METRICS)


@pytest.mark.slow
def test_optimizing_rouge_l_makes_each_evaluation_generate_and_report_text_metrics(
    make_cfg, tmp_path
):
    result, evals = _trial(
        make_cfg,
        tmp_path,
        "sweep.metric=eval/rouge_l",
        "sweep.direction=maximize",
        params={**TINY, "train.epochs": 2, "train.patience": 0},
    )
    assert len(evals) == 2
    for evaluation in evals:
        for name in TEXT_METRICS:
            assert f"eval/{name}" in evaluation
        assert 0.0 <= evaluation["eval/rouge_l"] <= 1.0
        assert 0.0 <= evaluation["eval/bleu"] <= 100.0
    # the kept model is the best evaluation by eval/rouge_l
    assert result.metrics["eval/rouge_l"] == max(e["eval/rouge_l"] for e in evals)


@pytest.mark.slow
def test_sampling_changes_only_the_test_outputs_and_is_deterministic(make_cfg, tmp_path):
    sampling = ("train.temperature=1.0", "train.top_p=0.9", "sweep.metric=eval/token_f1")
    first, first_evals = _trial(make_cfg, tmp_path / "1", *sampling)
    again, _ = _trial(make_cfg, tmp_path / "2", *sampling)
    greedy, greedy_evals = _trial(make_cfg, tmp_path / "3", "sweep.metric=eval/token_f1")
    assert first.metrics == pytest.approx(again.metrics)
    # evaluations stay greedy (a steady objective): the same as the greedy trial's
    assert first_evals == greedy_evals
    assert first.metrics["test/loss"] == greedy.metrics["test/loss"]
