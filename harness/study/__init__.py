"""Studies: plan one (plan), ask a stored one (queries), run one trial (trial), run or resume a
sweep (sweep, with warmstart, objective, recovery and finish), and `harness train` (train).

The names below are re-exported for callers outside the package (tests, scripts); modules in
harness/ import from the submodule that defines a name.
"""

from harness.storage import describe_storage
from harness.study.plan import (
    COST_METRICS,
    Plan,
    check_resume,
    check_same_study,
    checked_param_sets,
    make_backend,
    plan_study,
)
from harness.study.queries import (
    FINISHED_STATES,
    RUNNING,
    SWEEP_ONLY_KEYS,
    best_trial,
    billed_key,
    count_finished,
    is_multi_objective,
    load_study,
    objectives,
    override_value,
    ranked_trials,
    reproduce_command,
    stored_objectives,
    study_spend,
)
from harness.study.recovery import owner_gone
from harness.study.sweep import Sweep
from harness.study.train import Trained, train_once
from harness.study.trial import (
    BudgetExceededError,
    ProgressCallback,
    SurplusTrialError,
    TrialOutcome,
    TrialReporter,
    describe_failure,
    run_trial,
)

__all__ = [
    "COST_METRICS",
    "FINISHED_STATES",
    "RUNNING",
    "SWEEP_ONLY_KEYS",
    "BudgetExceededError",
    "Plan",
    "ProgressCallback",
    "SurplusTrialError",
    "Sweep",
    "Trained",
    "TrialOutcome",
    "TrialReporter",
    "best_trial",
    "billed_key",
    "check_resume",
    "check_same_study",
    "checked_param_sets",
    "count_finished",
    "describe_failure",
    "describe_storage",
    "is_multi_objective",
    "load_study",
    "make_backend",
    "objectives",
    "override_value",
    "owner_gone",
    "plan_study",
    "ranked_trials",
    "reproduce_command",
    "run_trial",
    "stored_objectives",
    "study_spend",
    "train_once",
]
