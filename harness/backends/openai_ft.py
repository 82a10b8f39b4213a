"""Hosted fine-tuning trials through the OpenAI fine-tuning API: OpenAI, any server that speaks
it (``backend.base_url``), and Azure OpenAI (``backend=azure_openai``: the same API and jobs, its
training tier sent as ``trainingType``, its fine-tuned models answering through a deployment).

Per study (``prepare``): the data become chat rows (preference pairs: DPO rows), are checked as
the API would check them, counted with tiktoken, and uploaded once per study and content (the file
name carries the content hash, so a resumed study or another host finds the upload instead of
repeating it).

Per trial (``run``): one job, supervised or DPO (``train.method``; ``openai_dpo``), with the
trial's ``n_epochs``, ``batch_size``, ``learning_rate_multiplier`` (and DPO's beta), its seed, a
suffix naming study and trial, and the trial's key in its metadata. Before creating a job, the
backend looks for one carrying that key: the SDK's own retries are off for the create (they send
no idempotency key, so a create whose response was lost would be paid twice), and a study resumed
after a crash finds the job its dead process started. A create the provider refuses for every
trial (OpenAI takes no new fine-tuning jobs from 2027-01-06) stops the study (``openai_refusal``).
The job is followed with backoff (``openai_follow``: a paused job is followed on, its pause kept
out of the trial's time); its metrics events go to the reporter at their steps, and the
validation loss at each epoch end is the evaluation Optuna may prune on, which cancels the job.
A succeeded job's model is evaluated on the test split through chat completions at temperature 0,
by the same metric code as the local backend; a DPO model first on the validation pairs, where
the study optimizes how often its answers come closer to the preferred one.

Spend is what the provider billed: a trial that ends any other way (pruned, Ctrl-C, a failed job,
lost contact, a pause past backend.max_pause_hours) cancels its job and reads it back until it is
over, then reports the job's own ``trained_tokens`` x price as its ``cost_usd``. A job that
finished before the cancel landed billed every epoch, however early its trial stopped following
it.

The API key comes from the environment (``backend.api_key_env``) or a file
(``backend.api_key_file``), never from the config, so it cannot reach a logged config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

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
    Answer,
    ApiKey,
    HostedJobError,
    JobCalls,
    RefusedApiKeyError,
    Scoring,
    Waits,
    abandon_jobs,
    cancel_and_read_back,
    chat_completer,
    find_or_create,
    record_billing,
    score_chats,
    score_test_split,
)
from harness.backends.openai_dpo import base_model, check_beta, method_json
from harness.backends.openai_follow import (
    TERMINAL,
    Follower,
    decode_result_file,
    transient_errors,
)
from harness.backends.openai_refusal import refusal_or_none
from harness.chat_data import (
    Chat,
    TokenCounts,
    check_chats,
    check_examples,
    to_chats,
    to_jsonl,
    to_preference_jsonl,
    token_limit,
)
from harness.config import ConfigError, runs_dir
from harness.cost import Encoding, encoding_for, price_per_token
from harness.data import Dataset, Example, ExampleCheck
from harness.metrics import GENERATED_TEXT_METRICS

REPORTED_METRICS = ("eval/loss", "eval/token_accuracy", "eval/perplexity")
# what a job's hyperparameters may be, by the fine-tuning API (n_epochs 1-50, batch_size 1-256)
API_LIMITS: dict[str, Limit] = {"train.epochs": (1, 50), "train.batch_size": (1, 256)}
PROVIDERS = ("openai", "azure_openai")  # backend.provider: whose API the client speaks


@dataclass
class Prepared:
    """What every trial of a study shares: uploaded files, the test chats, token counts."""

    task: str
    labels: list[str]
    training_file: str
    validation_file: str
    test: list[Chat]
    file_tokens: int  # tokens in the training file: billed once per epoch
    tokens_note: str  # how they were counted (exact encoding or an estimate)
    usd_per_token: float
    max_answer_tokens: int
    n_train: int  # training examples: steps per epoch = ceil(n_train / batch_size)
    validation: list[Chat] = field(default_factory=list)  # scored after a DPO job succeeds


class OpenAIBackend:
    name = "OpenAIBackend"

    def __init__(  # no defaults: conf/backend/openai.yaml holds each value and says what it is
        self,
        *,
        provider: str,
        model: str,
        base_url: str | None,
        azure_endpoint: str | None,
        api_version: str | None,
        training_type: str | None,
        azure_deployment: str | None,
        api_key_env: str,
        api_key_file: str | None,
        organization: str | None,
        system_prompt: str,
        poll_interval_s: float,
        max_poll_interval_s: float,
        max_job_hours: float,
        max_pause_hours: float,
        request_retries: int,
        request_timeout_s: float,
        create_attempts: int,
        poll_failures: int,
        cancel_wait_s: float,
        eval_concurrency: int,
        eval_max_examples: int | None,
        create_grace_s: float,
        prices_per_1m_training_tokens: Mapping[str, float],
        example_token_limits: Mapping[str, int],
    ) -> None:
        self.provider = provider
        self.model = model
        self.base_url = base_url
        self.azure_endpoint = azure_endpoint
        self.api_version = api_version
        self.training_type = training_type
        self.azure_deployment = azure_deployment
        # a loopback Azure endpoint (the fake) is sent a placeholder key, as a loopback base_url
        self.key = ApiKey(api_key_env, api_key_file, base_url or azure_endpoint)
        self.organization = organization
        self.system_prompt = system_prompt
        self.poll_interval_s = poll_interval_s
        self.max_poll_interval_s = max_poll_interval_s
        self.max_job_s = max_job_hours * 3600
        self.max_pause_s = max_pause_hours * 3600
        self.request_retries = request_retries
        self.request_timeout_s = request_timeout_s
        self.create_attempts = max(1, create_attempts)
        self.poll_failures = max(1, poll_failures)
        self.cancel_wait_s = max(0.0, cancel_wait_s)
        self.eval_concurrency = max(1, eval_concurrency)
        self.eval_max_examples = eval_max_examples
        self.create_grace_s = create_grace_s
        self.waits = Waits(
            self.poll_interval_s,
            self.max_poll_interval_s,
            self.poll_failures,
            self.cancel_wait_s,
            self.create_attempts,
            self.create_grace_s,
        )
        self.prices = _plain("prices_per_1m_training_tokens", prices_per_1m_training_tokens)
        self.token_limits = _plain("example_token_limits", example_token_limits)
        self._client: Any = None
        self._counted: TokenCounts = {}  # chats' token counts: the file check's, reused by describe

    # the client ------------------------------------------------------------------------------
    def check_credentials(self) -> None:
        """A sweep's first check, before anything is written or counted: no key, or one the
        provider refuses, is a one-line error saying where the key was read from."""
        self.check_provider()
        self.api_key()
        self._check_key_accepted()

    def api_key(self) -> str:
        return self.key.read()

    def _check_key_accepted(self) -> None:
        """One request that needs the key (listing fine-tuning jobs, which the sweep needs
        too), not retried: a 401 or 403 is a RefusedApiKeyError. Any other failure (the server
        unreachable, a 5xx) is left to the study's own requests, which retry it."""
        import openai

        try:
            self.client.with_options(max_retries=0).fine_tuning.jobs.list(limit=1)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            where = self.azure_endpoint or self.base_url or "api.openai.com"
            raise RefusedApiKeyError(
                f"{where} refused the API key read from {self.key.source()} "
                f"(HTTP {exc.status_code}): set a valid key there; a key needs the fine-tuning "
                "permission"
            ) from None
        except openai.OpenAIError:
            pass

    @property
    def azure(self) -> bool:
        return self.provider == "azure_openai" or bool(self.azure_endpoint)

    def check_provider(self) -> None:
        """Azure OpenAI's settings are complete, and only Azure's are set for Azure: a
        ConfigError before any request otherwise."""
        if self.provider not in PROVIDERS:
            raise ConfigError(
                f"backend.provider={self.provider!r}: choose {' or '.join(PROVIDERS)} "
                "(conf/backend/openai.yaml, conf/backend/azure_openai.yaml)"
            )
        if self.provider == "azure_openai" and not self.azure_endpoint:
            raise ConfigError(
                "backend.azure_endpoint is null: backend=azure_openai needs the resource's "
                "endpoint, e.g. backend.azure_endpoint=https://NAME.openai.azure.com (Azure "
                "portal: the resource's Keys and Endpoint page)"
            )
        if self.azure and not self.api_version:
            raise ConfigError(
                "backend.api_version is null: Azure OpenAI needs an API version, e.g. "
                "backend.api_version=2025-04-01-preview"
            )
        for key, value in (
            ("training_type", self.training_type),
            ("azure_deployment", self.azure_deployment),
        ):
            if value and not self.azure:
                raise ConfigError(
                    f"backend.{key}={value!r} is Azure OpenAI's setting: use backend=azure_openai "
                    f"(with backend.azure_endpoint), or set backend.{key}=null"
                )

    @property
    def client(self) -> Any:
        if self._client is None:
            import openai

            self.check_provider()

            options: dict[str, Any] = {
                "api_key": self.api_key(),
                "max_retries": self.request_retries,
                "timeout": self.request_timeout_s,
            }
            if self.azure:
                self._client = openai.AzureOpenAI(
                    azure_endpoint=str(self.azure_endpoint), api_version=self.api_version, **options
                )
            else:
                self._client = openai.OpenAI(
                    base_url=self.base_url, organization=self.organization, **options
                )
        return self._client

    # what it declares ---------------------------------------------------------------------
    def tunable_keys(self, cfg: DictConfig) -> frozenset[str]:
        """The job's hyperparameters: all a hosted job lets a trial choose (and DPO's beta)."""
        keys = {"train.epochs", "train.batch_size", "train.learning_rate_multiplier"}
        return frozenset(keys | ({"train.dpo_beta"} if str(cfg.train.method) == "dpo" else set()))

    def hard_limits(self) -> dict[str, Limit]:
        """The API's limits of the keys every config may tune. DPO's beta, tunable under
        train.method=dpo only, is held to the API's (0, 2] by check_config instead."""
        return dict(API_LIMITS)

    def eval_metrics(self, task: str) -> tuple[str, ...]:
        """What a job reports on the validation split while it trains, whatever the task (test
        metrics are measured after the job)."""
        return REPORTED_METRICS

    def eval_metrics_on_demand(self, task: str) -> tuple[str, ...]:
        """A preference model's answers on the validation split (eval/preferred_rate,
        eval/rouge_l), scored once its DPO job succeeded, at the job's last step: the provider's
        DPO loss says little of what users prefer. Other tasks: none (the provider evaluates
        while its job trains; generated-text metrics come on the test split)."""
        return GENERATED_TEXT_METRICS.get(task, ()) if task == "preference" else ()

    # once per study -------------------------------------------------------------------------
    def prepare(self, cfg: DictConfig, dataset: Dataset) -> Prepared:
        prepared = self.describe(cfg, dataset)
        chats = to_chats(dataset, self.system_prompt)
        uploaded = {}
        # preference pairs go up as DPO rows; the name's hash tells the two kinds apart
        write = to_preference_jsonl if dataset.task == "preference" else to_jsonl
        for split in ("train", "validation"):
            content = write(chats[split])
            name = f"harness-{cfg.name}-{split}-{hashlib.sha256(content).hexdigest()[:16]}.jsonl"
            uploaded[split] = self._upload(name, content)
        prepared.training_file = uploaded["train"]
        prepared.validation_file = uploaded["validation"]
        return prepared

    def describe(self, cfg: DictConfig, dataset: Dataset) -> Prepared:
        """Converts and checks the data and counts tokens, touching no network: what
        ``harness validate`` shows and ``prepare`` uploads."""
        encoding, limit = self._encoding(cfg), token_limit(self.token_limits, self.model)
        chats = to_chats(dataset, self.system_prompt)
        keep = self.eval_max_examples or None
        counts = {
            split: check_chats(rows, split, encoding, limit, self._counted)
            for split, rows in chats.items()
        }
        try:
            usd_per_token = price_per_token(self.prices, base_model(self.model))
        except KeyError:
            raise ConfigError(
                f"no training price for model {base_model(self.model)!r}: add it to "
                f"backend.prices_per_1m_training_tokens (USD per 1M training tokens; 0 for a "
                "free server)"
            ) from None
        answers = [encoding.count(c.answer) for c in chats["train"]]
        return Prepared(
            task=dataset.task,
            labels=list(dataset.labels),
            training_file="",
            validation_file="",
            test=chats["test"][:keep],
            file_tokens=sum(counts["train"]),
            tokens_note=encoding.note,
            usd_per_token=usd_per_token,
            max_answer_tokens=max(answers) + 8,
            n_train=len(chats["train"]),
            validation=chats["validation"][:keep],
        )

    def check_config(self, cfg: DictConfig, searched: frozenset[str]) -> None:
        self.check_provider()
        check_training_method(cfg, self.name, ("sft", "dpo"))
        check_beta(cfg, searched)
        wanted = set(self.eval_metrics_on_demand(str(cfg.data.task))) & {
            str(cfg.sweep.metric),
            *cfg.sweep.objectives,
        }
        if wanted and self.azure and not self.azure_deployment:
            raise ConfigError(
                f"{sorted(wanted)[0]} is measured on the fine-tuned model's answers, which Azure "
                "OpenAI serves only through a deployment: set backend.azure_deployment, or "
                "optimize eval/loss"
            )

    def example_check(self, cfg: DictConfig) -> ExampleCheck:
        """The API's rules per example (an assistant answer, no empty message, the model's token
        limit), for ``load_dataset`` to run on each file as it is loaded: a too-long example is
        reported even where the split would fail too. Counts are kept for ``describe``."""
        encoding, limit = self._encoding(cfg), token_limit(self.token_limits, self.model)

        def check(examples: Sequence[Example], task: str, labels: Sequence[str]) -> None:
            check_examples(
                examples, task, labels, self.system_prompt, encoding, limit, self._counted
            )

        return check

    def _encoding(self, cfg: DictConfig) -> Encoding:
        return encoding_for(self.model, str(runs_dir(cfg) / "cache" / "tiktoken"))

    def _upload(self, name: str, content: bytes) -> str:
        for existing in self.client.files.list(purpose="fine-tune"):
            if existing.filename == name and existing.bytes == len(content):
                return str(existing.id)
        uploaded = self.client.files.create(file=(name, content), purpose="fine-tune")
        return str(uploaded.id)

    def estimate_cost_usd(self, cfg: DictConfig, prepared: Prepared) -> float:
        return float(cfg.train.epochs * prepared.file_tokens * prepared.usd_per_token)

    # one trial ------------------------------------------------------------------------------
    def run(self, spec: TrialSpec, reporter: Reporter) -> TrialResult:
        cfg, prepared = spec.config, spec.prepared
        key = spec.key or f"{cfg.name}-{uuid.uuid4().hex[:12]}"
        job, reattached = self._find_or_create(cfg, prepared, spec.number, key)
        follower: Follower | None = None
        try:  # from here on, any way out but success cancels the job: nobody would follow it
            follower = Follower(self, job.id, reporter, cfg, prepared)  # sets the total steps
            reporter.set_tags(
                {
                    "openai.job_id": job.id,
                    "openai.base_model": self.model,
                    "openai.trial_key": key,
                    "openai.reattached": str(reattached).lower(),
                }
            )
            job = follower.follow()
        except BaseException:  # pruned, Ctrl-C, lost contact, paused too long, tracking
            # cancelled, as nobody would follow it; the trial keeps what the job billed, which
            # is all of it where the job finished before the cancel landed
            final = self._cancel_and_read_back(job.id)
            if follower is not None:  # else the reporter refused the job's step count
                _tag_pause(reporter, follower.paused_seconds())
                record_billing(reporter, follower.billing(final))
            raise
        _tag_pause(reporter, follower.paused_seconds())
        if job.status != "succeeded":
            error = job.error
            code = getattr(error, "code", None) or "no code"
            message = getattr(error, "message", None) or "no message"
            reporter.set_tags({"openai.error_code": code, "openai.error_message": message[:4000]})
            record_billing(reporter, follower.billing(job))
            raise HostedJobError(f"fine-tuning job {job.id} {job.status}: {code}: {message}")
        try:
            result = self._results(spec, reporter, job, follower)
        except BaseException:  # its files, scoring or tracking failed: the job billed in full
            record_billing(reporter, follower.billing(job))
            raise
        # the time the provider held the job paused: the study leaves it out of the trial's
        # train/seconds (its capacity, not the trial's cost in time)
        paused = follower.paused_seconds()
        if paused:
            result.metrics["paused_seconds"] = paused
        return result

    def _jobs_carrying(self, key: str) -> list[Any]:
        """Every job started under this trial key. The key is checked on each job too, not
        only trusted to the server's metadata filter."""
        listed = self.client.fine_tuning.jobs.list(metadata={"harness_trial_key": key})
        return [job for job in listed if (job.metadata or {}).get("harness_trial_key") == key]

    def _find_job(self, key: str) -> Any:
        """A job carrying this trial key that is not failed or cancelled, or None."""
        jobs = self._jobs_carrying(key)
        return next((job for job in jobs if job.status not in ("failed", "cancelled")), None)

    def _find_or_create(self, cfg: DictConfig, prepared: Prepared, number: int, key: str):
        """(job, True) when a job with this trial's key already runs or succeeded, else (a new
        job, False): hosted.find_or_create's loop, with OpenAI's calls."""
        return find_or_create(
            key,
            self._find_job,
            lambda: self._create_job(cfg, prepared, number, key),
            transient_errors(),
            self.waits,
            "a fine-tuning job",
        )

    def _create_job(self, cfg: DictConfig, prepared: Prepared, number: int, key: str) -> Any:
        """One create request, not retried by the SDK (it would send no idempotency key)."""
        suffix = re.sub(r"[^a-zA-Z0-9-]", "-", f"{cfg.name}-t{number}")[-40:].strip("-")
        metadata = {
            "harness_study": str(cfg.name)[:512],
            "harness_trial": str(number),
            "harness_trial_key": key,
        }
        import openai

        # Azure's training tier is a top-level create field the OpenAI SDK does not know
        extra = {"trainingType": self.training_type} if self.azure and self.training_type else None
        try:
            job = self.client.with_options(max_retries=0).fine_tuning.jobs.create(
                model=self.model,
                training_file=prepared.training_file,
                validation_file=prepared.validation_file,
                method=method_json(cfg),
                seed=int(cfg.seed),
                suffix=suffix or None,
                metadata=metadata,
                extra_body=extra,
            )
        except openai.APIStatusError as exc:
            refused = refusal_or_none(exc, self.azure)
            if refused is not None:  # every next trial would get the same answer
                raise refused from None
            raise
        if (job.metadata or {}).get("harness_trial_key") != key:
            # a server that drops metadata: a lost create answer, or a crash, cannot be found
            # again by the trial's key, and a retry would pay for a second job
            logging.getLogger("harness").warning(
                "%s kept no metadata on job %s: harness cannot find this trial's job again "
                "after a lost answer or a crash; a retried trial may start a second job",
                self.azure_endpoint or self.base_url or "the API",
                job.id,
            )
        return job

    def abandon(self, key: str) -> float | None:
        """Cancels the jobs of a trial that will not be followed again (its process died and no
        retry follows), so they stop costing money. Returns what every job carrying its key
        billed in USD, by the provider's account once each is over (None: no such job, or no
        figure): the backend cannot reach the dead trial's records, so the caller keeps it."""

        def read_back(job: Any) -> Any:
            return job if job.status in TERMINAL else self._cancel_and_read_back(job.id) or job

        return abandon_jobs(key, self._jobs_carrying(key), read_back, self._billed_usd, "OpenAI")

    def _billed_usd(self, job: Any) -> float | None:
        if job.status not in TERMINAL or job.trained_tokens is None:
            return None
        return float(job.trained_tokens * price_per_token(self.prices, base_model(self.model)))

    def _cancel_and_read_back(self, job_id: str) -> Any | None:
        """hosted.cancel_and_read_back with OpenAI's calls: read back without the SDK's retries
        and their own backoff (the loop's wait is the bound)."""
        client = self.client.with_options(
            max_retries=0, timeout=max(1.0, min(self.request_timeout_s, self.cancel_wait_s))
        )
        calls = JobCalls(
            job_id,
            self.client.fine_tuning.jobs.cancel,
            client.fine_tuning.jobs.retrieve,
            lambda job: job.status in TERMINAL,
            "OpenAI",
        )
        return cancel_and_read_back(calls, self.waits)

    def _results(
        self, spec: TrialSpec, reporter: Reporter, job: Any, follower: Follower
    ) -> TrialResult:
        prepared = spec.prepared
        spec.workdir.mkdir(parents=True, exist_ok=True)
        artifacts, checkpoints = self._job_files(spec, job, follower)
        bill = follower.billing(job)
        reporter.set_tags(
            {
                **bill.tags(),
                "openai.fine_tuned_model": str(job.fine_tuned_model),
                "openai.checkpoints": ",".join(str(c["model"]) for c in checkpoints)[:4000],
            }
        )
        ask = self._answerer(spec, reporter, str(job.fine_tuned_model))
        evaluation: dict[str, float] = {}
        test: dict[str, float] = {}
        if ask is not None:
            # pruned at it, or Ctrl-C: run() records that the job billed in full
            evaluation = self._validation_scores(spec, reporter, ask, follower.last_step)
            scoring = Scoring(prepared.task, prepared.labels, prepared.test, self.eval_concurrency)
            title = f"{spec.config.name} trial {spec.number}"
            test, scored = score_test_split(ask, scoring, spec.workdir, title)
            artifacts += scored
        metrics = {
            **follower.final_eval,
            **evaluation,
            **test,
            "cost_usd": bill.usd,
            "trained_tokens": float(bill.tokens),
        }
        hosted = {
            "id": str(job.fine_tuned_model),
            "job_id": str(job.id),
            "base_model": self.model,
            "provider": "azure-openai" if self.azure else "openai-api",
        }
        return TrialResult(metrics, artifacts, None, follower.last_step, hosted)

    def _answerer(
        self, spec: TrialSpec, reporter: Reporter, model: str
    ) -> Callable[[Chat], Answer] | None:
        """What asks the fine-tuned model one prompt, through chat completions at temperature
        0; None where it cannot be asked (the run's tag says why). Azure serves a fine-tuned
        model only once it is deployed: it is asked through backend.azure_deployment, and only
        where that deployment answers as this trial's model (another trial's, or a base
        model, would score the wrong model)."""
        cfg, prepared = spec.config, spec.prepared
        limit = (
            prepared.max_answer_tokens
            if prepared.task == "classification"
            else int(cfg.train.max_new_tokens)
        )
        skipped = ""
        if self.azure and not self.azure_deployment:
            skipped = (
                "Azure OpenAI needs a deployment of the fine-tuned model before it answers; "
                "deploy it and set backend.azure_deployment, or score it with harness train"
            )
        elif self.azure:
            served = self._deployed_model(str(self.azure_deployment), limit, int(cfg.seed))
            if served and served != model:
                skipped = (
                    f"the deployment {self.azure_deployment} (backend.azure_deployment) serves "
                    f"{served}, not this trial's model {model}: deploy it there to score it"
                )
        if skipped:
            reporter.set_tags({"harness.test_skipped": skipped})
            return None
        asked = self.azure_deployment if self.azure else model
        return chat_completer(self.client, str(asked), limit, int(cfg.seed))

    def _validation_scores(
        self, spec: TrialSpec, reporter: Reporter, ask: Callable[[Chat], Answer], step: int
    ) -> dict[str, float]:
        """A preference model's eval/preferred_rate and eval/rouge_l on the validation split,
        reported at the job's last step, where the study optimizes one (they cost a chat
        request per pair): the evaluation a DPO study is judged and pruned by."""
        prepared = spec.prepared
        wanted = self.eval_metrics_on_demand(prepared.task)
        if not prepared.validation or not set(wanted) & optimized_metrics(spec):
            return {}
        scoring = Scoring(prepared.task, [], prepared.validation, self.eval_concurrency)
        scores, _ = score_chats(ask, scoring)
        evaluation = {name: scores[name.removeprefix("eval/")] for name in wanted}
        reporter.report(step, evaluation)  # may raise TrialPruned
        return evaluation

    def _deployed_model(self, deployment: str, max_tokens: int, seed: int) -> str:
        """The model an Azure deployment answers as (its answers' ``model`` field)."""
        answer = self.client.chat.completions.create(
            model=deployment,
            messages=[{"role": "user", "content": "ping"}],
            temperature=0,
            max_tokens=max_tokens,
            seed=seed,
        )
        return str(answer.model or "")

    def _job_files(
        self, spec: TrialSpec, job: Any, follower: Follower
    ) -> tuple[list[Path], list[dict[str, Any]]]:
        """The job's result CSV (its rows reported where no event did) and its checkpoints,
        written to the trial's folder: (the files, the checkpoints)."""
        artifacts = []
        if job.result_files:
            raw = self.client.files.content(job.result_files[0]).content
            text = decode_result_file(raw)
            path = spec.workdir / "result.csv"
            path.write_text(text, encoding="utf-8")
            artifacts.append(path)
            follower.report_result_rows(text)
        checkpoints = [
            {
                "id": c.id,
                "step": c.step_number,
                "model": c.fine_tuned_model_checkpoint,
                "metrics": c.metrics.model_dump() if c.metrics else {},
            }
            for c in self.client.fine_tuning.jobs.checkpoints.list(job.id)
        ]
        path = spec.workdir / "checkpoints.json"
        path.write_text(json.dumps(checkpoints, indent=2), encoding="utf-8")
        artifacts.append(path)
        return artifacts, checkpoints


def _tag_pause(reporter: Reporter, paused: float) -> None:
    """Labels the trial's run with the time its job was seen paused, where it was."""
    if paused:
        reporter.set_tags({"openai.paused_seconds": f"{paused:.1f}"})


def _plain(key: str, mapping: Any) -> dict[str, Any]:
    if isinstance(mapping, DictConfig):
        return dict(OmegaConf.to_container(mapping))  # type: ignore[arg-type]
    if not isinstance(mapping, Mapping):
        raise ConfigError(
            f"backend.{key} must be a mapping of model names to values, not {mapping!r}; "
            f"conf/backend/openai.yaml shows it (leave the key out to keep those values)"
        )
    return dict(mapping)


# the protocols, checked by mypy without building one (every argument comes from the YAML)
_: type[Backend] = OpenAIBackend
_paid: type[PaidBackend] = OpenAIBackend
