"""Task metrics. Classification maths comes from scikit-learn; text-overlap metrics are the
SQuAD definitions (normalised exact match, bag-of-tokens F1)."""

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


def save_confusion_matrix(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str], path: Path, title: str
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    matrix = confusion_matrix(y_true, y_pred, labels=list(labels))
    figure, axes = plt.subplots(figsize=(1.6 + 1.1 * len(labels), 1.2 + 1.1 * len(labels)))
    ConfusionMatrixDisplay(matrix, display_labels=list(labels)).plot(ax=axes, colorbar=False)
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


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    n = max(len(references), 1)
    return {
        "exact_match": sum(map(exact_match, predictions, references)) / n,
        "token_f1": sum(map(token_f1, predictions, references)) / n,
    }


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: exp overflows past ~709 and nobody reads e^50
