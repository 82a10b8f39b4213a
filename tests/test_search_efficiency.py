"""The statistics of benchmarks/search_efficiency.py on hand-made numbers (no training)."""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks.search_efficiency_stats import (
    Outcome,
    best_found,
    curve_band,
    spread,
    stratified_sample,
    summarise,
    verdict,
)


def outcome(steps: list[int], values: list[float | None], tests: list[float | None]) -> Outcome:
    study = Outcome()
    for s, v, t in zip(steps, values, tests, strict=True):
        study.add(s, v, t, {})
    return study


def test_steps_to_target_count_every_trial_up_to_the_first_that_reached_it() -> None:
    study = outcome([100, 200, 50, 400], [0.5, None, 0.8, 0.9], [0.4, None, 0.7, 0.6])
    assert study.steps_to(0.5) == 100
    assert study.steps_to(0.7) == 350  # the pruned trial's 200 steps count too
    assert study.steps_to(0.85) == 750
    assert study.steps_to(0.95) is None
    assert (study.used, study.best, study.pruned) == (750, 0.9, 1)


def test_best_so_far_is_known_only_when_a_trial_ends() -> None:
    study = outcome([100, 200, 50], [0.5, None, 0.8], [None, None, None])
    assert [study.best_at(s) for s in (0, 99, 100, 349, 350, 10_000)] == [
        None,
        None,
        0.5,
        0.5,
        0.8,
        0.8,
    ]


def test_chosen_trial_is_the_first_best_unless_the_method_named_one() -> None:
    study = outcome([10, 10, 10], [0.7, 0.9, 0.9], [0.1, 0.2, 0.3])
    assert (study.chosen_index, study.chosen_test) == (1, 0.2)
    study.chosen = 2  # e.g. the Trainer's study called its last trial best
    assert study.chosen_test == 0.3
    assert outcome([10], [None], [None]).chosen_test is None


def test_a_missed_target_counts_as_the_budget_and_makes_a_lower_bound() -> None:
    odd = summarise([100, None, 300], budget=1000)
    assert odd["median"] == (300, False)
    assert odd["mean"] == (pytest.approx(1400 / 3), True)
    even = summarise([100, None, 200, None], budget=1000)
    assert even["median"] == (600, True)  # the middle two: 200 and a miss counted as 1000
    # a seed may pass the budget with the trial that crosses it: misses still sort last
    assert summarise([1200, None, None], budget=1000)["median"] == (1000, True)


@pytest.mark.parametrize(
    ("ours", "random", "answer", "bound", "ratio"),
    [
        ((100, False), (300, False), "met", "", 1 / 3),
        ((150, False), (300, False), "met", "", 0.5),  # at most half: met
        ((200, False), (300, False), "NOT met", "", 2 / 3),
        ((100, False), (1000, True), "met", "<= ", 0.1),  # random's true steps only larger
        ((600, False), (1000, True), "UNDECIDED", "<= ", 0.6),
        ((400, True), (1000, False), "UNDECIDED", ">= ", 0.4),
        ((600, True), (1000, False), "NOT met", ">= ", 0.6),
        ((1000, True), (1000, True), "UNDECIDED", "~", 1.0),
    ],
)
def test_goal_verdict(
    ours: tuple[float, bool], random: tuple[float, bool], answer: str, bound: str, ratio: float
) -> None:
    assert verdict(ours, random) == (pytest.approx(ratio), bound, answer)


def test_spread_gives_median_extremes_and_quartiles() -> None:
    assert spread([5.0, 1.0, 3.0, 2.0, 4.0]) == {
        "median": 3.0,
        "min": 1.0,
        "max": 5.0,
        "q1": 2.0,
        "q3": 4.0,
    }
    assert spread([0.7])["median"] == spread([0.7])["q3"] == 0.7


def test_curve_band_starts_once_every_seed_has_a_finished_trial() -> None:
    seeds = [outcome([100, 100], [0.5, 0.9], [None] * 2), outcome([150], [0.7], [None])]
    band = curve_band(seeds, [50, 100, 150, 200])
    assert band[:2] == [None, None]  # at 100 only the first seed has a value
    assert band[2] is not None and (band[2]["min"], band[2]["max"]) == (0.5, 0.7)
    assert band[3] is not None and band[3]["median"] == pytest.approx(0.8)


def test_best_found_names_the_method_and_seed() -> None:
    results = {
        "random": {0: outcome([10], [0.6], [None]), 1: outcome([10], [0.8], [None])},
        "default": {0: outcome([10], [None], [None])},
    }
    assert best_found(results) == (0.8, "random", 1)


def test_stratified_sample_keeps_each_label_share_and_is_seeded() -> None:
    records = [{"label": "a"} for _ in range(60)] + [{"label": "b"} for _ in range(30)]
    records += [{"label": "c"} for _ in range(10)]
    sample = stratified_sample(records, 20, seed=3, label_field="label")
    assert Counter(r["label"] for r in sample) == {"a": 12, "b": 6, "c": 2}
    assert sample == stratified_sample(records, 20, seed=3, label_field="label")
    rare = stratified_sample(records, 5, seed=0, label_field="label")  # c's share is 0.5 row
    assert len(rare) == 5 and Counter(r["label"] for r in rare)["c"] == 1
    with pytest.raises(ValueError, match="between 3 and 100"):
        stratified_sample(records, 2, seed=0, label_field="label")
