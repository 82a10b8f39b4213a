"""Hosted fine-tuning trials on Together (together.ai) through its official SDK, ``together``.

Per study (``prepare``): the data become chat rows (preference rows for DPO), are checked as the
API would check them, counted with tiktoken (an estimate: Together counts with the model's own
tokenizer), and uploaded once per study and content. The base model's limits are read once and
the search space checked against them; Together's price estimate is compared with harness's
arithmetic (together_data).

Per trial (``run``): one job with the trial's absolute ``learning_rate``, ``n_epochs``,
``batch_size``, ``warmup_ratio``, ``weight_decay``, LoRA rank, alpha and dropout (adapter=lora;
adapter=none trains every weight) or DPO's beta, its seed, and a suffix that marks the trial
key: found again before every create, so a lost answer or a killed process never pays for a
second job (together_jobs). The job is followed to its end (together_follow); an evaluation of
the validation file is what Optuna may prune on, which cancels the job. A completed job's model
(its ``model_output_name``) answers the test split through chat completions at temperature 0,
scored by the same metric code as every backend.

Spend is what Together billed: a trial that ends any other way cancels its job and reads it back
until it is over, then reports the job's own ``total_price`` as its ``cost_usd``.

The API key comes from the environment (``backend.api_key_env``) or a file
(``backend.api_key_file``), never from the config.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from harness.backends.base import (
    Backend,
    Limit,
    PaidBackend,
    Reporter,
    TrialResult,
    TrialSpec,
    check_training_method,
    optimized_metrics,
)
from harness.backends.hosted import (
    ApiKey,
    HostedJobError,
    ProviderRefusedError,
    RefusedApiKeyError,
    Scoring,
    chat_completer,
    record_billing,
    score_chats,
    score_test_split,
)
from harness.backends.together_data import (
    EstimateCheck,
    Prepared,
    check_space,
    compare_estimate,
    nested_prices,
    read_model_limits,
    upload,
)
from harness.backends.together_follow import NANODOLLARS_PER_USD, Follower, Limits
from harness.backends.together_jobs import (
    TERMINAL,
    JobShape,
    Patience,
    abandon_trial_jobs,
    cancel_and_read_back,
    find_or_create,
    job_request,
    refusal_message,
    suffix_for,
    training_type_arguments,
)
from harness.chat_data import (
    TokenCounts,
    check_chats,
    check_examples,
    to_chats,
    to_jsonl,
    to_preference_jsonl,
)
from harness.chat_data import token_limit as limit_for
from harness.config import ConfigError, runs_dir
from harness.cost import Encoding, encoding_for, price_per_token
from harness.data import Dataset, Example, ExampleCheck
from harness.metrics import GENERATED_TEXT_METRICS

SFT_KEYS = frozenset(
    {
        "train.learning_rate",
        "train.epochs",
        "train.batch_size",
        "train.warmup_ratio",
        "train.weight_decay",
    }
)
LORA_KEYS = frozenset({"lora.r", "lora.alpha", "lora.dropout"})
REPORTED_METRICS = ("eval/loss", "eval/perplexity")
# adapter=NAME -> Together's training type, and the price table's key for it
TRAINING_TYPES = {"lora": ("Lora", "lora"), "none": ("Full", "full")}


class TogetherBackend:
    name = "TogetherBackend"

    def __init__(  # no defaults: conf/backend/together.yaml holds each value and says what it is
        self,
        *,
        model: str,
        base_url: str | None,
        api_key_env: str,
        api_key_file: str | None,
        system_prompt: str,
        poll_interval_s: float,
        max_poll_interval_s: float,
        max_job_hours: float,
        max_pause_hours: float,
        request_retries: int,
        request_timeout_s: float,
        create_attempts: int,
        create_grace_s: float,
        poll_failures: int,
        cancel_wait_s: float,
        eval_concurrency: int,
        eval_max_examples: int | None,
        n_evals_per_epoch: int,
        n_checkpoints: int,
        lora_trainable_modules: str,
        estimate_tolerance: float,
        prices_per_1m_training_tokens: Mapping[str, Any],
        example_token_limits: Mapping[str, int],
        hard_limits: Mapping[str, Sequence[float | None]],
    ) -> None:
        if n_evals_per_epoch < 1:
            raise ConfigError(
                f"backend.n_evals_per_epoch={n_evals_per_epoch}: at least 1; the evaluations "
                "are what pruning and the objective rest on"
            )
        self.model, self.base_url = model, base_url
        self.key = ApiKey(api_key_env, api_key_file, base_url)
        self.system_prompt = system_prompt
        self.patience = Patience(
            poll_interval_s,
            max_poll_interval_s,
            max(1, poll_failures),
            max(0.0, cancel_wait_s),
            request_timeout_s,
            max(1, create_attempts),
            create_grace_s,
        )
        self.limits = Limits(max_job_hours * 3600, max_pause_hours * 3600)
        self.request_retries = request_retries
        self.eval_concurrency = max(1, eval_concurrency)
        self.eval_max_examples = eval_max_examples
        self.shape = JobShape(n_evals_per_epoch, n_checkpoints, lora_trainable_modules)
        self.estimate_tolerance = estimate_tolerance
        self.prices = nested_prices(prices_per_1m_training_tokens)
        self.token_limits = {str(k): int(v) for k, v in dict(example_token_limits).items()}
        self._hard_limits = _limits(hard_limits)
        self._client: Any = None
        self._counted: TokenCounts = {}  # chats' token counts: the file check's, reused
        self._usd_per_token: float | None = None  # the study's price, once described

    # the client ------------------------------------------------------------------------------
    def check_credentials(self) -> None:
        """A sweep's first check: no key, or one Together refuses, is a one-line error saying
        where the key was read from (never the key)."""
        self.key.read()
        self._check_key_accepted()

    def api_key(self) -> str:
        return self.key.read()

    def _check_key_accepted(self) -> None:
        """One request that needs the key (listing fine-tuning jobs, which every trial does
        too), not retried: 401 or 403 is a RefusedApiKeyError; any other failure is left to
        the study's own requests, which retry it."""
        import together

        try:
            self.client.with_options(max_retries=0).fine_tuning.list()
        except (together.AuthenticationError, together.PermissionDeniedError) as exc:
            raise RefusedApiKeyError(
                f"{self.base_url or 'api.together.ai'} refused the API key read from "
                f"{self.key.source()} (HTTP {exc.status_code}): set a valid key there; the "
                "key's account needs fine-tuning access"
            ) from None
        except together.TogetherError:
            pass

    @property
    def client(self) -> Any:
        if self._client is None:
            import together

            self._client = together.Together(
                api_key=self.api_key(),
                base_url=self.base_url,  # None: TOGETHER_BASE_URL, else api.together.ai
                max_retries=self.request_retries,
                timeout=self.request_timeout_s,
            )
        return self._client

    @property
    def request_timeout_s(self) -> float:
        return self.patience.request_timeout_s

    # what it declares ---------------------------------------------------------------------
    def tunable_keys(self, cfg: DictConfig) -> frozenset[str]:
        """The job's hyperparameters: LoRA's with adapter=lora, DPO's beta with
        train.method=dpo."""
        keys = set(SFT_KEYS)
        if str(cfg.adapter.name) in ("lora", "qlora"):  # qlora: check_config says what to use
            keys |= LORA_KEYS
        if str(cfg.train.method) == "dpo":
            keys.add("train.dpo_beta")
        return frozenset(keys)

    def hard_limits(self) -> dict[str, Limit]:
        return dict(self._hard_limits)

    def eval_metrics(self, task: str) -> tuple[str, ...]:
        """What a job reports on the validation file while it trains (the DPO loss for
        preference data: its perplexity means nothing)."""
        return ("eval/loss",) if task == "preference" else REPORTED_METRICS

    def eval_metrics_on_demand(self, task: str) -> tuple[str, ...]:
        """Preference data: how often the tuned model's answer to a validation prompt is nearer
        the preferred answer (and its ROUGE-L to it), measured once, after the job, when the
        study optimizes one of them: a held-out task metric, not the DPO loss."""
        return GENERATED_TEXT_METRICS["preference"] if task == "preference" else ()

    def example_check(self, cfg: DictConfig) -> ExampleCheck:
        """The API's rules per example, for ``load_dataset`` to run on each file as it is
        loaded; counts are kept for ``describe``."""
        encoding, limit = self._encoding(cfg), limit_for(self.token_limits, self.model)

        def check(examples: Sequence[Example], task: str, labels: Sequence[str]) -> None:
            check_examples(
                examples, task, labels, self.system_prompt, encoding, limit, self._counted
            )

        return check

    def check_config(self, cfg: DictConfig, searched: frozenset[str]) -> None:
        check_training_method(cfg, self.name, ("sft", "dpo"))
        adapter = str(cfg.adapter.name)
        if adapter not in TRAINING_TYPES:
            raise ConfigError(
                f"adapter={adapter}: Together trains LoRA adapters (adapter=lora) or every "
                "weight (adapter=none); it takes no 4-bit base of your choosing (QLoRA). Use "
                "adapter=lora."
            )
        if adapter == "lora":
            _check_lora(cfg, searched)

    def _encoding(self, cfg: DictConfig) -> Encoding:
        return encoding_for(self.model, str(runs_dir(cfg) / "cache" / "tiktoken"))

    # once per study -------------------------------------------------------------------------
    def describe(self, cfg: DictConfig, dataset: Dataset) -> Prepared:
        """Converts and checks the data and counts tokens, touching no network: what
        ``harness validate`` shows and ``prepare`` uploads."""
        encoding, limit = self._encoding(cfg), limit_for(self.token_limits, self.model)
        chats = to_chats(dataset, self.system_prompt)
        counts = {
            split: check_chats(rows, split, encoding, limit, self._counted)
            for split, rows in chats.items()
        }
        training_type, method = TRAINING_TYPES[str(cfg.adapter.name)][0], str(cfg.train.method)
        answers = [encoding.count(c.answer) for c in chats["train"]]
        self._usd_per_token = self._price(cfg)  # what abandon() prices a bare token count at
        return Prepared(
            task=dataset.task,
            labels=list(dataset.labels),
            training_file="",
            validation_file="",
            test=chats["test"][: self.eval_max_examples or None],
            validation=chats["validation"][: self.eval_max_examples or None],
            file_tokens=sum(counts["train"]),
            validation_tokens=sum(counts["validation"]),
            tokens_note=f"{encoding.note}; Together counts with the model's own tokenizer",
            usd_per_token=self._usd_per_token,
            max_answer_tokens=max(answers) + 8,
            n_train=len(chats["train"]),
            training_type=training_type,
            method=method,
            n_evals_per_epoch=self.shape.n_evals_per_epoch,
        )

    def _price(self, cfg: DictConfig) -> float:
        kind, method = TRAINING_TYPES[str(cfg.adapter.name)][1], str(cfg.train.method)
        try:
            return price_per_token(self.prices.get(kind, {}).get(method, {}), self.model)
        except KeyError:
            raise ConfigError(
                f"no training price for model {self.model!r} ({kind}, {method}): add it to "
                f"backend.prices_per_1m_training_tokens.{kind}.{method} (USD per 1M training "
                "tokens; Together's prices page lists them)"
            ) from None

    def prepare(self, cfg: DictConfig, dataset: Dataset) -> Prepared:
        prepared = self.describe(cfg, dataset)
        chats = to_chats(dataset, self.system_prompt)
        folder = runs_dir(cfg) / "cache" / "together"
        rows = to_preference_jsonl if prepared.method == "dpo" else to_jsonl
        # checks first: a model Together does not train, a space past its limits, before
        # anything is uploaded
        prepared.model_limits = read_model_limits(
            self.client, self.model, lambda exc: refusal_message(self.model, exc)
        )
        check_space(cfg, prepared.model_limits, prepared.training_type, prepared.method)
        for split in ("train", "validation"):
            content = rows(chats[split])
            digest = hashlib.sha256(content).hexdigest()[:16]
            file_id = upload(
                self.client, folder, f"harness-{cfg.name}-{split}-{digest}.jsonl", content
            )
            setattr(prepared, "training_file" if split == "train" else "validation_file", file_id)
        epochs = int(cfg.train.epochs)
        check = EstimateCheck(
            self.estimate_cost_usd(cfg, prepared),
            epochs,
            prepared.n_evals(epochs),
            self.estimate_tolerance,
            _estimate_training_type(cfg, prepared.training_type, self.shape.lora_modules),
        )
        compare_estimate(self.client, prepared, check, self.model)
        return prepared

    def estimate_cost_usd(self, cfg: DictConfig, prepared: Prepared) -> float:
        """Together bills the tokens a job processes: each epoch's training file and each
        evaluation's validation file (its pricing page), at the price of the model's size."""
        return float(prepared.billed_tokens(int(cfg.train.epochs)) * prepared.usd_per_token)

    # one trial ------------------------------------------------------------------------------
    def run(self, spec: TrialSpec, reporter: Reporter) -> TrialResult:
        cfg, prepared = spec.config, spec.prepared
        key = spec.key or f"{cfg.name}-{uuid.uuid4().hex[:12]}"
        suffix = suffix_for(str(cfg.name), key)
        request = job_request(cfg, prepared, self.model, suffix, self.shape)
        job, reattached = find_or_create(self.client, self.patience, key, request, self.model)
        follower: Follower | None = None
        try:  # from here on, any way out but success cancels the job: nobody would follow it
            follower = Follower(self.client, self.patience, job.id, reporter, cfg, prepared)
            reporter.set_tags(
                {
                    "together.job_id": str(job.id),
                    "together.base_model": self.model,
                    "together.trial_key": key,
                    "together.suffix": suffix,
                    "together.reattached": str(reattached).lower(),
                    **prepared.estimate_tags,
                }
            )
            job = follower.follow(self.limits)
        except BaseException:  # pruned, Ctrl-C, lost contact, paused too long, tracking
            final = cancel_and_read_back(self.client, self.patience, job.id)
            if follower is not None:  # else the reporter refused the job's step count
                record_billing(reporter, follower.billing(final))
                _tag_pauses(reporter, follower)
            raise
        if job.status != "completed":
            message = follower.error_message or "Together gave no error message"
            reporter.set_tags({"together.error_message": message[:4000]})
            record_billing(reporter, follower.billing(job))
            _tag_pauses(reporter, follower)
            raise HostedJobError(f"Together fine-tuning job {job.id} {job.status}: {message}")
        try:
            follower.finish_steps()
            return self._results(spec, reporter, job, follower)
        except BaseException:  # its files, scoring or tracking failed: the job billed in full
            record_billing(reporter, follower.billing(job))
            raise

    def _results(
        self, spec: TrialSpec, reporter: Reporter, job: Any, follower: Follower
    ) -> TrialResult:
        spec.workdir.mkdir(parents=True, exist_ok=True)
        bill = follower.billing(job)
        output = str(job.x_model_output_name)
        reporter.set_tags({**bill.tags(), "together.output_model": output})
        path = spec.workdir / "together_job.json"
        path.write_text(json.dumps(job.model_dump(mode="json"), indent=2), encoding="utf-8")
        self._score_validation(spec, reporter, output, follower, bill.usd)
        test, artifacts = self._score_test(spec, reporter, output)
        paused = follower.pauses.seconds(time.monotonic())
        metrics = {
            **follower.final_eval,
            **test,
            "cost_usd": bill.usd,
            "trained_tokens": float(bill.tokens),
            "paused_seconds": paused,  # left out of the trial's train/seconds (study/trial.py)
        }
        hosted = {
            "id": output,
            "job_id": str(job.id),
            "base_model": self.model,
            "provider": "together",
        }
        return TrialResult(metrics, [path, *artifacts], None, follower.last_step, hosted)

    def _score_validation(
        self, spec: TrialSpec, reporter: Reporter, output: str, follower: Follower, usd: float
    ) -> None:
        """A preference study that optimizes a held-out task metric (eval/preferred_rate) has
        it measured once the job is over, on the validation split: one evaluation at the job's
        last step, with what the job billed, so pruning on it keeps the cost."""
        wanted = set(self.eval_metrics_on_demand(spec.prepared.task))
        if not wanted & optimized_metrics(spec):
            return
        import together

        prepared = spec.prepared
        ask = chat_completer(
            self.client, output, int(spec.config.train.max_new_tokens), int(spec.config.seed)
        )
        scoring = Scoring(prepared.task, [], prepared.validation, self.eval_concurrency)
        try:
            scores, _ = score_chats(ask, scoring)
        except (together.NotFoundError, together.BadRequestError) as exc:
            # every next trial would pay for a job whose objective cannot be measured either
            raise ProviderRefusedError(
                f"Together does not answer with the fine-tuned model {output} (HTTP "
                f"{exc.status_code}): the study's objective ({spec.metric}) is measured by "
                "asking it the validation prompts, so every trial would pay for a job it cannot "
                "score. Choose a base model whose LoRA adapters Together serves (serverless "
                f"LoRA inference), or optimize eval/loss; this trial's job billed ${usd:.4f}"
            ) from exc
        measured = {f"eval/{k}": v for k, v in scores.items() if f"eval/{k}" in wanted}
        follower.final_eval.update(measured)
        reporter.report(follower.last_step, {**follower.final_eval, "cost_usd": usd})

    def _score_test(
        self, spec: TrialSpec, reporter: Reporter, output: str
    ) -> tuple[dict[str, float], list[Path]]:
        """The fine-tuned model's test/* metrics through chat completions. A model Together
        does not serve (a LoRA of a base without serverless adapters needs a dedicated
        endpoint) is said in a tag: the paid job's results are kept."""
        import together

        cfg, prepared = spec.config, spec.prepared
        limit = (  # a label is short; generated text and preferred answers take max_new_tokens
            prepared.max_answer_tokens
            if prepared.task == "classification"
            else int(cfg.train.max_new_tokens)
        )
        ask = chat_completer(self.client, output, limit, int(cfg.seed))
        scoring = Scoring(prepared.task, prepared.labels, prepared.test, self.eval_concurrency)
        try:
            return score_test_split(ask, scoring, spec.workdir, f"{cfg.name} trial {spec.number}")
        except (together.NotFoundError, together.BadRequestError) as exc:
            reporter.set_tags(
                {
                    "harness.test_skipped": f"Together does not answer with {output} "
                    f"(HTTP {exc.status_code}): deploy it on a dedicated endpoint and score it "
                    "with harness train"[:4000]
                }
            )
            return {}, []

    def abandon(self, key: str) -> float | None:
        """Cancels the jobs of a trial that will not be followed again (its process died and no
        retry follows), so they stop costing money. Returns what every job carrying its key
        billed in USD once over (None: no such job, or no figure)."""
        return abandon_trial_jobs(self.client, self.patience, key, self._billed_usd)

    def _billed_usd(self, job: Any) -> float | None:
        """What a job over billed, by Together's account (its token count x price where it
        gives no price); None for a job not over, or with no figure."""
        if job.status not in TERMINAL:
            return None
        if job.total_price is not None:
            return float(job.total_price / NANODOLLARS_PER_USD)
        if job.token_count is not None and self._usd_per_token is not None:
            return float(job.token_count * self._usd_per_token)
        return None


def _tag_pauses(reporter: Reporter, follower: Follower) -> None:
    """A stopped job's time spent pre-empted, on its trial's run."""
    import contextlib

    paused = follower.pauses.seconds(time.monotonic())
    with contextlib.suppress(Exception):  # the trial's own ending is what goes on up
        reporter.set_tags(
            {
                "together.paused_seconds": f"{paused:.1f}",
                "together.restarts": str(follower.pauses.restarts),
            }
        )


def _check_lora(cfg: DictConfig, searched: frozenset[str]) -> None:
    """LoRA as Together trains it: no DoRA, no rank-stabilized scaling, an integer alpha, every
    linear layer (backend.lora_trainable_modules)."""
    from harness.search import to_distributions

    for knob in ("dora", "rslora"):
        if bool(cfg.lora[knob]):
            raise ConfigError(f"lora.{knob}=true: Together's LoRA has no {knob}; set it false")
    if str(cfg.lora.target_modules) != "all_linear":
        raise ConfigError(
            f"lora.target_modules={cfg.lora.target_modules}: Together adapts the modules named "
            "in backend.lora_trainable_modules (all-linear, or the model's module names); "
            "keep lora.target_modules=all_linear"
        )
    alpha = (
        to_distributions({"lora.alpha": cfg.search.space["lora.alpha"]}).get("lora.alpha")
        if "lora.alpha" in searched
        else None
    )
    import optuna

    if isinstance(alpha, optuna.distributions.FloatDistribution) or (
        alpha is None and float(cfg.lora.alpha) != int(float(cfg.lora.alpha))
    ):
        raise ConfigError(
            "lora.alpha: Together takes an integer alpha; search it with choice(16, 32, 64) or "
            "int(interval(8, 64)), or give a whole number"
        )


def _estimate_training_type(cfg: DictConfig, training_type: str, modules: str) -> dict[str, Any]:
    """The training type as the price estimate's request names it."""
    if training_type != "Lora":
        return {"type": "Full"}
    arguments = training_type_arguments(cfg, training_type, modules)
    return {
        "type": "Lora",
        "lora_r": arguments["lora_r"],
        "lora_alpha": arguments["lora_alpha"],
        "lora_dropout": arguments["lora_dropout"],
        "lora_trainable_modules": modules,
    }


def _limits(mapping: Mapping[str, Sequence[float | None]]) -> dict[str, Limit]:
    """backend.hard_limits: key -> [low, high] (null: open), for keys this backend tunes."""
    known = SFT_KEYS | LORA_KEYS
    limits: dict[str, Limit] = {}
    for key, pair in dict(mapping).items():
        if key not in known or len(list(pair)) != 2:
            raise ConfigError(
                f"backend.hard_limits.{key}={pair}: give [low, high] (null for an open end) of "
                f"a key Together tunes: {', '.join(sorted(known))}"
            )
        low, high = list(pair)
        limits[str(key)] = (
            None if low is None else float(low),
            None if high is None else float(high),
        )
    return limits


# the protocols, checked by mypy without building one (every argument comes from the YAML)
_: type[Backend] = TogetherBackend
_paid: type[PaidBackend] = TogetherBackend
