"""`harness train`: one run with the config's values (no search), tracked like a trial."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace

from omegaconf import DictConfig, OmegaConf

from harness.backends.base import TrialResult
from harness.config import runs_dir, with_params
from harness.provenance import provenance
from harness.secrets import redact_override
from harness.study.plan import plan_study
from harness.study.trial import run_trial
from harness.tracking import MLflowTracker
from harness.tracking.records import TAG_LIMIT


@dataclass
class Trained:
    """What `harness train` made: the result, its MLflow run, the logged model (if any)."""

    result: TrialResult
    run_id: str
    model_uri: str | None = None  # models:/NAME/VERSION when registered


def train_once(
    cfg: DictConfig,
    overrides: list[str],
    name: str = "train",
    tags: Mapping[str, str] | None = None,
    with_validation: bool = False,
    register_as: str | None = None,
) -> Trained:
    """`harness train`: one run with the config's values (no search), tracked like a trial but
    as a top-level run named <name>-<time>. ``with_validation`` trains on train + validation
    (the final fit once the search is over): early stopping is then off, as the validation
    split no longer tells over-fitting apart, and the test split stays held out. A local
    model is logged, and registered under ``register_as`` when given."""
    plan = plan_study(cfg)
    # its workdir is new each time and nothing retries it: a state saved there is never read
    plan.cfg = with_params(plan.cfg, {"train.save_state": False})
    if with_validation:
        data = plan.dataset
        plan.dataset = replace(data, train=[*data.train, *data.validation])
        plan.cfg = with_params(plan.cfg, {"train.patience": 0})
    params = {key: OmegaConf.select(plan.cfg, key) for key in cfg.search.space}
    plan.prepared = plan.backend.prepare(plan.cfg, plan.dataset)
    tracker = MLflowTracker(plan.cfg, plan.dataset.file_hashes, defer_writes=False)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = runs_dir(plan.cfg) / "checkpoints" / plan.cfg.name / f"{name}-{stamp}"
    run_tags = {
        "harness.overrides": " ".join(redact_override(o) for o in overrides)[:TAG_LIMIT],
        "harness.trained_on": "train+validation" if with_validation else "train",
        **provenance(plan.dataset.file_hashes, plan.cfg.seed),
        **(tags or {}),
    }
    result, run = run_trial(
        plan,
        tracker,
        params,
        -1,
        f"{name}-{stamp}",
        workdir,
        run_tags,
        save_model=plan.cfg.tracking.log_best_model or register_as is not None,
        key=f"{name}-{uuid.uuid4().hex[:12]}",
    )
    model_uri = None
    if result.model_dir is not None:
        model_uri = tracker.log_model(
            run.run_id, plan.backend, result.model_dir, plan.cfg.data.task, register_as
        )
    shutil.rmtree(workdir, ignore_errors=True)
    return Trained(result, run.run_id, model_uri)
