"""A classification trial's confusion matrix stays a readable, cheap figure with many labels."""

from __future__ import annotations

import random

from PIL import Image

from harness.metrics import ANNOTATED_LABELS, MAX_MATRIX_INCHES, save_confusion_matrix


def _drawn(tmp_path, n_labels: int) -> tuple[int, int]:
    labels = [f"intent_{i}" for i in range(n_labels)]
    rng = random.Random(0)
    truth = [rng.choice(labels) for _ in range(400)]
    guess = [rng.choice(labels) for _ in range(400)]
    path = save_confusion_matrix(truth, guess, labels, tmp_path / f"{n_labels}.png", "test")
    return Image.open(path).size


def test_few_labels_get_numbered_cells_and_many_a_capped_figure(tmp_path):
    width, _ = _drawn(tmp_path, 3)
    assert width == int((1.6 + 1.1 * 3) * 100)  # 1.1 inch a numbered cell, at 100 dpi
    width, height = _drawn(tmp_path, 77)  # BANKING77: 86 inches a side before the cap
    assert ANNOTATED_LABELS < 77
    assert width <= (1.6 + MAX_MATRIX_INCHES) * 100 and height <= (1.2 + MAX_MATRIX_INCHES) * 100
