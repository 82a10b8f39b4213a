"""Task metrics. Classification maths comes from scikit-learn; text-overlap metrics are the
SQuAD definitions (normalised exact match, bag-of-tokens F1), sacrebleu's corpus BLEU and
rouge-score's ROUGE-L, so the numbers are the ones those libraries' users know."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

# What every backend reports on the validation split at each evaluation, by task: the metrics a
# study may optimize (sweep.metric).
EVAL_METRICS = {
    "classification": ("eval/loss", "eval/accuracy", "eval/precision", "eval/recall", "eval/f1"),
    "generation": ("eval/loss", "eval/perplexity", "eval/token_accuracy"),
}

# Metrics of generated text on the validation split, by task: measuring them means generating a
# completion of every validation prompt at each evaluation, so a backend that can (local)
# measures them only when the study optimizes one of them (see Backend.eval_metrics_on_demand).
GENERATED_TEXT_METRICS = {
    "generation": ("eval/bleu", "eval/rouge_l", "eval/exact_match", "eval/token_f1"),
    # a preference (DPO) model's answers, against the pair's preferred and non-preferred ones
    "preference": ("eval/preferred_rate", "eval/rouge_l"),
}

# What scoring a model's answers on a held-out split gives, by task (unprefixed: test/<name>
# once a hosted job is over, as harness.backends.hosted.score_chats measures them).
SCORED_METRICS = {
    "classification": ("accuracy", "precision", "recall", "f1"),
    "generation": ("exact_match", "token_f1", "bleu", "rouge_l"),
    "preference": ("preferred_rate", "rouge_l"),
}


def classification_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]
) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 over ``labels``."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=list(labels), average="macro", zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }


# A confusion matrix with a number in each cell is drawn up to this many labels; past it
# (BANKING77's 77 intents drew an 86-inch figure, ~18 s of CPU a trial) the cells are colours
# on a capped figure.
ANNOTATED_LABELS = 20
MAX_MATRIX_INCHES = 16.0


def save_confusion_matrix(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str], path: Path, title: str
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    matrix = confusion_matrix(y_true, y_pred, labels=list(labels))
    n = len(labels)
    annotated = n <= ANNOTATED_LABELS
    # numbered cells need ~1.1 inch each; past ANNOTATED_LABELS the cells are colours only
    side = 1.1 * n if annotated else min(MAX_MATRIX_INCHES, 0.2 * n)
    figure, axes = plt.subplots(figsize=(1.6 + side, 1.2 + side))
    ConfusionMatrixDisplay(matrix, display_labels=list(labels)).plot(
        ax=axes,
        colorbar=not annotated,
        include_values=annotated,
        xticks_rotation="horizontal" if annotated else "vertical",
    )
    if not annotated:
        axes.tick_params(labelsize=5)
    axes.set_title(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _normalise(text: str) -> list[str]:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def exact_match(prediction: str, reference: str) -> float:
    return float(_normalise(prediction) == _normalise(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = _normalise(prediction), _normalise(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU on its usual 0-100 scale (13a tokenization, exp smoothing), one
    reference per prediction. effective_order: n-gram orders no prediction is long enough to
    have are left out of the mean, so a corpus of answers shorter than 4 tokens is not scored 0
    whatever it says; on longer text it changes nothing."""
    from sacrebleu.metrics import BLEU

    if not predictions:
        return 0.0
    bleu = BLEU(effective_order=True)
    return float(bleu.corpus_score(list(predictions), [list(references)]).score)


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """rouge-score's ROUGE-L F-measure (Porter stemming) on the 0-1 scale, one per example.
    Its tokenizer keeps only ASCII letters and digits: text in other scripts scores 0."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    return [
        scorer.score(reference, prediction)["rougeL"].fmeasure
        for prediction, reference in zip(predictions, references, strict=True)
    ]


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """ROUGE-L F-measure (``rouge_l_scores``), mean over examples."""
    scores = rouge_l_scores(predictions, references)
    return sum(scores) / len(scores) if scores else 0.0


def preference_metrics(
    answers: Sequence[str], preferred: Sequence[str], rejected: Sequence[str]
) -> dict[str, float]:
    """A preference-tuned model's answers against each pair's two answers, 0-1 scales:
    preferred_rate, the share of answers closer (ROUGE-L F1) to the preferred answer than to
    the non-preferred one, a tie counting half (an answer like neither is no evidence either
    way); rouge_l, the mean ROUGE-L F1 against the preferred answers."""
    if not answers:
        return {"preferred_rate": 0.0, "rouge_l": 0.0}
    to_preferred = rouge_l_scores(answers, preferred)
    to_rejected = rouge_l_scores(answers, rejected)
    wins = [
        1.0 if p > r else 0.5 if p == r else 0.0
        for p, r in zip(to_preferred, to_rejected, strict=True)
    ]
    return {
        "preferred_rate": sum(wins) / len(wins),
        "rouge_l": sum(to_preferred) / len(to_preferred),
    }


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Generated text against the expected completions. Scales: bleu 0-100 (as sacrebleu and
    papers report it); rouge_l, exact_match and token_f1 0-1."""
    n = max(len(references), 1)
    return {
        "exact_match": sum(map(exact_match, predictions, references)) / n,
        "token_f1": sum(map(token_f1, predictions, references)) / n,
        "bleu": corpus_bleu(predictions, references),
        "rouge_l": mean_rouge_l(predictions, references),
    }


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: exp overflows past ~709 and nobody reads e^50
