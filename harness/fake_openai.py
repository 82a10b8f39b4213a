"""A loopback fake of the OpenAI fine-tuning API, for tests and free dry runs.

The real ``openai`` SDK talks to it over HTTP (``base_url="http://127.0.0.1:PORT/v1"``). It keeps
state like the service: files (multipart upload, content), fine-tuning jobs (create, list with
metadata filters, retrieve, cancel), events newest first with pagination, checkpoints, result
files, and chat completions for the models its jobs produce.

Jobs move through validating_files -> queued -> running -> succeeded on the server's clock
(``Timing``). Their loss curves follow the hyperparameters: an optimum learning-rate multiplier
near 2, divergence above 5, under-fitting with too few epochs and over-fitting (validation loss
rising) with too many, so a search over it has something to find. A fine-tuned model answers
chat requests by nearest neighbour over its training file, and answers wrongly as often as its
final validation loss says it should: better hyperparameters, better test accuracy.

Preference tuning (``method={"type": "dpo", ...}``) trains on preference rows (``{"input":
{"messages"}, "preferred_output", "non_preferred_output"}``); its ``beta`` ("auto" or in (0, 2])
shapes the curve too, best near ``DPO_BEST_BETA``, worse towards either end. A DPO model answers
the preferred answer of the training pair nearest the prompt as often as its final loss says,
otherwise that pair's non-preferred answer: better hyperparameters, a higher preferred rate.

A cancel lands ``Timing.cancel_s`` after it is asked (the job trains on meanwhile, and may
finish); a job cancelled mid-run reports the tokens of the steps it did as ``trained_tokens``, and
one that finished first stays succeeded with every epoch's tokens, the cancel refused as the API
refuses it.

Faults can be injected (``Faults``): 5xx and 429 answers, jobs that fail half-way, job creates
whose response is never sent (the job exists; the client sees a dropped connection), cancels
that arrive only once their job has finished, a provider that refuses every new job (as OpenAI
does past its fine-tuning cutoff), and jobs paused at a step for a span of the server clock and
then resumed (as Azure's Developer training tier pauses jobs when its spot capacity is taken).

Azure OpenAI's layout is served too (``/openai/...``, the key in ``api-key``); a fine-tuned
model answers there only through a deployment (``deployments``, or ``auto_deploy``: each new model
deployed under one name).

``RequestClock`` makes jobs move with the requests made rather than with wall time, so a test
sees the same job states on a loaded machine as on an idle one.
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import email.policy
import hashlib
import itertools
import json
import math
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

DROP = object()  # a handler's answer meaning: close the connection, send nothing
DEPLOYED_MODEL = "x-fake-deployed-model"  # (internal) the model a deployment's request reaches
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Timing:
    validate_s: float = 0.05  # validating_files
    queue_s: float = 0.05  # queued
    step_s: float = 0.01  # one training step
    cancel_s: float = 0.0  # a cancel lands this long after it is asked; the job trains on meanwhile


class RequestClock:
    """A server clock that moves ``tick`` seconds each time it is read, which every job request
    does once: jobs progress as the client polls them, whatever the wall clock says."""

    def __init__(self, tick: float = 1.0) -> None:
        self.now, self.tick = 0.0, tick
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            self.now += self.tick
            return self.now


@dataclass
class Faults:
    error_rate: float = 0.0  # share of requests answered 500
    rate_limit_rate: float = 0.0  # share of requests answered 429
    fail_jobs: frozenset[int] = frozenset()  # creation numbers (1, 2, ...) of jobs that fail
    job_failure_rate: float = 0.0  # chance that any other job fails half-way
    drop_create_responses: int = 0  # the next N job creates: job made, response never sent
    ignore_metadata_filter: bool = False  # as some API-compatible servers do: list all jobs
    drop_metadata: bool = False  # jobs keep no metadata, as a server may that does not know it
    # the next N job creates: job made, but a gateway in front answers 504 (the answer lost) ...
    gateway_timeout_creates: int = 0
    gateway_lag_s: float = 0.0  # ... and lists the job only this long after (wall clock)
    # the next N cancels arrive only once their job has finished: it succeeds, billed in full
    finish_before_cancel: int = 0
    # every job create refused as a provider that no longer trains answers: "403" (permission
    # denied) or "400" (the model cannot be fine-tuned); "" takes jobs
    refuse_jobs: str = ""
    pause_jobs: frozenset[int] = frozenset()  # creation numbers of jobs the system pauses ...
    pause_at_step: int = 1  # ... once this step is done ...
    pause_s: float = 0.0  # ... for this span of the server clock, then resumes
    seed: int = 0


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str = ""):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
        }


@dataclass
class Job:
    id: str
    number: int  # creation order, from 1
    created_at: int
    started: float  # server clock at creation
    model: str
    training_file: str
    validation_file: str | None
    n_epochs: int
    batch_size: int
    lr_multiplier: float
    seed: int
    suffix: str | None
    metadata: dict[str, str]
    examples: list[tuple[str, str]]  # (last user message, assistant answer) of the training file
    file_tokens: int
    steps_per_epoch: int
    invalid_reason: str | None = None  # the training file breaks a rule: fails validation
    fail_at_step: int | None = None
    pause_at_step: int | None = None  # paused by the system after this step (Faults.pause_jobs)
    pause_s: float = 0.0
    cancel_at: float | None = None  # server time when a requested cancel lands
    status: str = "validating_files"
    steps_done: int = 0
    error: dict[str, Any] | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    trained_tokens: int | None = None
    result_files: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # oldest first
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # oldest first
    last_metrics: dict[str, float] = field(default_factory=dict)
    pause_seen: bool = False  # its pause began (events said so)
    method: str = "supervised"  # or "dpo": preference tuning
    beta: float | None = None  # dpo: how far the model may move from its base
    rejected: list[str] = field(default_factory=list)  # dpo: each example's non-preferred answer

    @property
    def recipe(self) -> tuple[object, ...]:
        """What makes a job reproducible: the same data, hyperparameters and seed give the same
        curve and the same answers, as the seed promises."""
        recipe = (self.training_file, self.n_epochs, self.batch_size, self.lr_multiplier, self.seed)
        return recipe if self.method != "dpo" else (*recipe, self.beta)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.n_epochs

    def json(self) -> dict[str, Any]:
        hyperparameters = {
            "n_epochs": self.n_epochs,
            "batch_size": self.batch_size,
            "learning_rate_multiplier": self.lr_multiplier,
        }
        return {
            "id": self.id,
            "object": "fine_tuning.job",
            "created_at": self.created_at,
            "error": self.error or {"code": None, "message": None, "param": None},
            "fine_tuned_model": self.fine_tuned_model,
            "finished_at": self.finished_at,
            "hyperparameters": hyperparameters,
            "method": self._method_json(hyperparameters),
            "model": self.model,
            "organization_id": "org-harness-fake",
            "result_files": self.result_files,
            "seed": self.seed,
            "status": self.status,
            "trained_tokens": self.trained_tokens,
            "training_file": self.training_file,
            "validation_file": self.validation_file,
            "estimated_finish": None,
            "integrations": [],
            "metadata": self.metadata or None,
            "suffix": self.suffix,
        }

    def _method_json(self, hyperparameters: dict[str, Any]) -> dict[str, Any]:
        if self.method != "dpo":
            return {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
        return {"type": "dpo", "dpo": {"hyperparameters": {**hyperparameters, "beta": self.beta}}}


# --- the simulated training -------------------------------------------------------------------


def train_loss(job: Job, step: int) -> float:
    """Smooth training loss after ``step`` steps; how fast it falls depends on the multiplier
    (and a little on the batch size); above a multiplier of 5 training diverges."""
    epochs_done = step / job.steps_per_epoch
    rate = 0.8 * min(job.lr_multiplier, 3.0) * (16 / job.batch_size) ** 0.15
    loss = 0.18 + 2.4 * math.exp(-rate * epochs_done)
    if job.lr_multiplier > 5.0:
        loss += 0.35 * (job.lr_multiplier - 5.0) * max(0.0, epochs_done - 0.2)
    if job.method == "dpo":  # a poor beta costs more the longer the job trains
        loss += beta_penalty(job.beta) * (1.0 - math.exp(-epochs_done))
    return loss


DPO_BEST_BETA = 0.2  # the fake's best beta: OpenAI's "auto" (0.1) is close, not best
DPO_AUTO_BETA = 0.1


def beta_penalty(beta: float | None) -> float:
    """Extra loss of a DPO job for its beta: 0 at DPO_BEST_BETA, growing with the log-distance
    from it (0.1 and 0.4 cost ~0.06; 0.01 ~1.1: the model drifts far from its base; 2 ~0.64:
    it barely moves)."""
    return 0.12 * math.log((beta or DPO_AUTO_BETA) / DPO_BEST_BETA) ** 2


def valid_loss(job: Job, step: int) -> float:
    """Training loss plus a generalisation gap that grows past ~2.5 epochs (over-fitting), faster
    with larger multipliers."""
    epochs_done = step / job.steps_per_epoch
    overfit = 0.05 * max(0.0, epochs_done - 2.5) ** 2 * min(job.lr_multiplier, 3.0) / 2
    return train_loss(job, step) + 0.12 + overfit


def token_accuracy(loss: float) -> float:
    return max(0.0, min(1.0, 1.0 - loss / 2.8))


def skill(final_valid_loss: float) -> float:
    """How often a fine-tuned model answers as its training data would: ~0.95 at the best
    reachable loss, falling to a few percent for a model that learned nothing."""
    return max(0.02, min(0.97, math.exp(-1.1 * (final_valid_loss - 0.3))))


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def _knn_answer(examples: list[tuple[str, str]], prompt: str, k: int = 5) -> str:
    """The answer the k training examples most similar to ``prompt`` vote for, votes weighted
    by TF-IDF cosine similarity: a stand-in for what fine-tuning on them teaches."""
    documents = [_words(text) for text, _ in examples]
    frequency: dict[str, int] = {}
    for words in documents:
        for word in words:
            frequency[word] = frequency.get(word, 0) + 1
    idf = {w: math.log((1 + len(documents)) / (1 + n)) + 1 for w, n in frequency.items()}
    asked = _words(prompt)

    def norm(words: set[str]) -> float:
        return math.sqrt(sum(idf.get(w, 1.0) ** 2 for w in words)) or 1.0

    asked_norm = norm(asked)
    scored = sorted(
        (
            (sum(idf[w] ** 2 for w in asked & words) / (asked_norm * norm(words)), index)
            for index, words in enumerate(documents)
        ),
        reverse=True,
    )[:k]
    votes: dict[str, float] = {}
    for score, index in scored:
        answer = examples[index][1]
        votes[answer] = votes.get(answer, 0.0) + score
    return max(votes, key=lambda answer: votes[answer])


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from its inputs."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def parse_training_file(content: bytes) -> tuple[list[tuple[str, str]], list[list[dict]], str]:
    """(user, answer) pairs, the chats, and '' or why the file breaks the API's rules. A file of
    preference rows gives (user, preferred answer) pairs, and chats holding every message billed
    (the input, both answers); ``parse_rows`` keeps the non-preferred answers too."""
    pairs, chats, _, invalid = parse_rows(content)
    return pairs, chats, invalid


def parse_rows(content: bytes) -> tuple[list[tuple[str, str]], list[list[dict]], list[str], str]:
    """(user, answer) pairs, chats, the non-preferred answers of preference rows ([] for chat
    rows), and '' or why the file breaks the API's rules. Chat rows and preference rows do not
    mix in one file."""
    pairs: list[tuple[str, str]] = []
    chats: list[list[dict]] = []
    rejected: list[str] = []
    lines = content.decode("utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if rejected or (not pairs and _is_preference_row(line)):
            row = _preference_row(line, number)
            if isinstance(row, str):
                return [], [], [], row
            pairs.append(row[0])
            rejected.append(row[1])
            chats.append(row[2])
            continue
        try:
            messages = json.loads(line)["messages"]
            roles = [m["role"] for m in messages]
            contents = [m["content"] for m in messages]
        except (ValueError, KeyError, TypeError):
            return [], [], [], f"line {number}: not a chat example with 'messages'"
        if "assistant" not in roles:
            return [], [], [], f"line {number}: example has no assistant message"
        if any(r not in ("system", "user", "assistant", "tool", "developer") for r in roles):
            return [], [], [], f"line {number}: unrecognised role"
        users = [c for r, c in zip(roles, contents, strict=True) if r == "user"]
        user = users[-1] if users else ""
        pairs.append((str(user), str(contents[roles.index("assistant", len(roles) - 1)])))
        chats.append(messages)
    if len(pairs) < 10:
        return [], [], [], f"training file has {len(pairs)} examples; at least 10 are required"
    return pairs, chats, rejected, ""


def _method_mismatch(method: str, preference_rows: bool) -> str:
    """Why a job's method cannot train on its file's rows, as the API says it; '' if it can."""
    if method == "dpo" and not preference_rows:
        return (
            "line 1: a DPO training example needs 'input', 'preferred_output' and "
            "'non_preferred_output'"
        )
    if method != "dpo" and preference_rows:
        return "line 1: not a chat example with 'messages' (preference rows train with dpo)"
    return ""


def _is_preference_row(line: str) -> bool:
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and "preferred_output" in row


def _preference_row(line: str, number: int) -> tuple[tuple[str, str], str, list[dict]] | str:
    """((user, preferred), non-preferred, every message billed) of one DPO row, or why the API
    would refuse it: an input that does not end with a user message, an output that is not one
    assistant message with text."""
    try:
        row = json.loads(line)
        messages = list(row["input"]["messages"])
        outputs = [row["preferred_output"], row["non_preferred_output"]]
    except (ValueError, KeyError, TypeError):
        return (
            f"line {number}: a DPO example needs 'input' ({{'messages': [...]}}), "
            "'preferred_output' and 'non_preferred_output'"
        )
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
        return f"line {number}: the input's last message must be the user's"
    answers = []
    for output in outputs:
        ok = isinstance(output, list) and len(output) == 1 and isinstance(output[0], dict)
        if not ok or output[0].get("role") != "assistant" or not output[0].get("content"):
            return f"line {number}: each output must be exactly one assistant message with content"
        answers.append(output[0])
    user = str(messages[-1].get("content", ""))
    return (user, str(answers[0]["content"])), str(answers[1]["content"]), [*messages, *answers]


# --- the server state -------------------------------------------------------------------------


class FakeOpenAI:
    """The API's state and request handling, independent of the HTTP plumbing."""

    terminal: ClassVar[tuple[str, ...]] = TERMINAL  # a job's final statuses, by this API's names

    def __init__(
        self,
        timing: Timing | None = None,
        faults: Faults | None = None,
        api_key: str | None = None,
        base64_results: bool = True,
        clock: Callable[[], float] = time.monotonic,
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.timing = timing or Timing()
        self.faults = faults or Faults()
        self.api_key = api_key  # None: any bearer token is accepted (but one must be sent)
        self.base64_results = base64_results
        self.clock = clock
        self.log = log
        self.lock = threading.RLock()
        self.rng = random.Random(self.faults.seed)
        self.files: dict[str, StoredFile] = {}
        self.jobs: dict[str, Job] = {}
        self.ids = itertools.count(1)
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.chat_requests: list[dict[str, Any]] = []
        self.responses: list[int] = []  # status of every answer sent, in order
        self.job_requests: list[dict[str, Any]] = []  # the body of every job create, in order
        self.key_headers: list[str] = []  # the header each request's key came in, in order
        # Azure OpenAI deployments: name -> the fine-tuned model it serves. With auto_deploy
        # set, each job that succeeds is deployed under that name, replacing the model before
        # (as a user's script that deploys each new model would)
        self.deployments: dict[str, str] = {}
        self.auto_deploy: str | None = None
        # job id -> when (time.monotonic) a job whose create a gateway timed out is first listed
        self.listed_from: dict[str, float] = {}

    def _id(self, prefix: str) -> str:
        salt = hashlib.sha1(str(time.time()).encode()).hexdigest()[:10]
        return f"{prefix}-{next(self.ids):06d}{salt}"

    # dispatch ----------------------------------------------------------------------------------
    def handle(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: Mapping[str, str],
        body: bytes,
    ) -> tuple[int, Any, dict[str, str]]:
        # Azure OpenAI's layout: /openai/... ; /openai/deployments/NAME/... needs a deployment,
        # which this fake (like Azure, for a model nobody deployed) does not have
        deployment = re.match(r"^/openai/deployments/([^/]+)/", path)
        path = re.sub(r"^/openai(/deployments/[^/]+)?/", "/v1/", path)
        with self.lock:
            self.requests.append((method, path))
            key = headers.get("api-key") or headers.get("authorization", "").removeprefix("Bearer ")
            self.key_headers.append("api-key" if headers.get("api-key") else "authorization")
            if not key or (self.api_key is not None and key != self.api_key):
                raise ApiError(401, "Incorrect API key provided.", "invalid_api_key")
            if deployment and deployment.group(1) not in self.deployments:
                message = f"The API deployment {deployment.group(1)} does not exist."
                raise ApiError(404, message, "DeploymentNotFound")
            if deployment:  # answers as the model deployed under that name
                headers = {**headers, DEPLOYED_MODEL: self.deployments[deployment.group(1)]}
            draw = self.rng.random()
            if draw < self.faults.rate_limit_rate:
                raise ApiError(429, "Rate limit reached (injected).", "rate_limit_exceeded")
            if draw < self.faults.rate_limit_rate + self.faults.error_rate:
                raise ApiError(500, "The server had an error (injected).", "server_error")
            for pattern, verb, handler in self.routes:
                match = re.fullmatch(pattern, path)
                if match and verb == method:
                    return handler(self, *match.groups(), query=query, body=body, headers=headers)
            raise ApiError(404, f"Unknown request URL: {method} {path}", "unknown_url")

    # files -------------------------------------------------------------------------------------
    def create_file(self, query, body, headers):
        fields = _multipart(headers.get("content-type", ""), body)
        if "file" not in fields:
            raise ApiError(400, "'file' is a required property", param="file")
        filename, content = fields["file"]
        purpose = fields.get("purpose", ("", b""))[1].decode()
        name = filename or "upload"
        stored = StoredFile(self._id("file"), name, purpose, content, int(time.time()))
        self.files[stored.id] = stored
        return 200, stored.json(), {}

    def list_files(self, query, body, headers):
        purpose = query.get("purpose", [None])[0]
        files = [f.json() for f in self.files.values() if purpose in (None, f.purpose)]
        return 200, _page(list(reversed(files)), query), {}

    def get_file(self, file_id, query, body, headers):
        return 200, self._file(file_id).json(), {}

    def file_content(self, file_id, query, body, headers):
        return 200, self._file(file_id).content, {}

    def delete_file(self, file_id, query, body, headers):
        self._file(file_id)
        del self.files[file_id]
        return 200, {"id": file_id, "object": "file", "deleted": True}, {}

    def _file(self, file_id: str) -> StoredFile:
        if file_id not in self.files:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return self.files[file_id]

    # jobs --------------------------------------------------------------------------------------
    def create_job(self, query, body, headers):
        request = json.loads(body or b"{}")
        self.job_requests.append(request)
        model = request.get("model")
        if not model:
            raise ApiError(400, "Missing required parameter: 'model'.", param="model")
        if self.faults.refuse_jobs:
            raise _refusal(self.faults.refuse_jobs, str(model))
        training = self._file(str(request.get("training_file")))
        validation_id = request.get("validation_file")
        if validation_id:
            self._file(validation_id)
        n_epochs, batch_size, multiplier = _hyperparameters(request)
        method, beta = _method(request)
        metadata = {} if self.faults.drop_metadata else _metadata(request)
        pairs, chats, rejected, invalid = parse_rows(training.content)
        invalid = invalid or _method_mismatch(method, bool(rejected))
        number = len(self.jobs) + 1
        steps_per_epoch = max(1, math.ceil(len(pairs) / batch_size))
        fails = number in self.faults.fail_jobs or self.rng.random() < self.faults.job_failure_rate
        tokens = _billed_tokens(chats)
        job = Job(
            id=self._id("ftjob"),
            number=number,
            created_at=int(time.time()),
            started=self.clock(),
            model=str(model),
            training_file=training.id,
            validation_file=validation_id,
            n_epochs=n_epochs,
            batch_size=batch_size,
            lr_multiplier=multiplier,
            seed=int(request.get("seed") or 0),
            suffix=request.get("suffix"),
            metadata=metadata,
            examples=pairs,
            file_tokens=tokens,
            steps_per_epoch=steps_per_epoch,
            invalid_reason=invalid or None,
            fail_at_step=(steps_per_epoch * n_epochs) // 2 + 1 if fails else None,
            pause_at_step=self.faults.pause_at_step if number in self.faults.pause_jobs else None,
            pause_s=self.faults.pause_s,
            method=method,
            beta=beta,
            rejected=rejected,
        )
        self.jobs[job.id] = job
        self._event(job, f"Validating training file: {training.id}")
        self.log(
            f"job {number} {job.id} created: n_epochs={n_epochs} batch_size={batch_size} "
            f"learning_rate_multiplier={multiplier:.4g} metadata={job.metadata}"
            + (f" method=dpo beta={beta:.4g}" if beta is not None else "")
        )
        if self.faults.drop_create_responses > 0:
            self.faults.drop_create_responses -= 1
            return 200, DROP, {}
        self.time_out_at_gateway(job.id)
        return 200, job.json(), {}

    def time_out_at_gateway(self, job_id: str) -> None:
        """Under the gateway fault: the job is made, but answered 504 and listed only later."""
        if self.faults.gateway_timeout_creates <= 0:
            return
        self.faults.gateway_timeout_creates -= 1
        self.listed_from[job_id] = time.monotonic() + self.faults.gateway_lag_s
        raise ApiError(504, "Gateway Timeout (injected)", "gateway_timeout")

    def listed(self, job_id: str) -> bool:
        return time.monotonic() >= self.listed_from.get(job_id, 0.0)

    def list_jobs(self, query, body, headers):
        wanted = {
            key[len("metadata[") : -1]: values[0]
            for key, values in query.items()
            if key.startswith("metadata[") and key.endswith("]")
        }
        if self.faults.ignore_metadata_filter:
            wanted = {}
        jobs = []
        for job in reversed(list(self.jobs.values())):  # newest first
            if self.listed(job.id) and all(job.metadata.get(k) == v for k, v in wanted.items()):
                self._advance(job)
                jobs.append(job.json())
        return 200, _page(jobs, query), {}

    def get_job(self, job_id, query, body, headers):
        job = self._job(job_id)
        self._advance(job)
        return 200, job.json(), {}

    def cancel_job(self, job_id, query, body, headers):
        job = self._job(job_id)
        if self.faults.finish_before_cancel > 0 and job.status not in TERMINAL:
            self.faults.finish_before_cancel -= 1
            self._progress(job, math.inf)  # the cancel arrives after the job's last step
        now = self.clock()
        self._advance(job, now)
        if job.status in TERMINAL:
            raise ApiError(400, f"Job {job_id} has already completed with status {job.status}.")
        if job.cancel_at is None:
            job.cancel_at = now + self.timing.cancel_s
        self._advance(job, now)  # lands at once without a cancel delay
        return 200, job.json(), {}

    def _cancel(self, job: Job) -> None:
        job.status = "cancelled"
        job.finished_at = int(time.time())
        self.log(f"job {job.number} {job.id} cancelled at step {job.steps_done}")
        # The billable tokens of the steps it trained, as OpenAI reports them. (Azure says it
        # charges nothing for cancelled jobs; clients should take trained_tokens as the truth.)
        job.trained_tokens = round(job.file_tokens * job.steps_done / job.steps_per_epoch)
        self._event(job, "Fine-tuning job cancelled")

    def list_events(self, job_id, query, body, headers):
        job = self._job(job_id)
        self._advance(job)
        return 200, _page(list(reversed(job.events)), query, default_limit=20), {}

    def list_checkpoints(self, job_id, query, body, headers):
        job = self._job(job_id)
        self._advance(job)
        return 200, _page(list(reversed(job.checkpoints)), query, default_limit=10), {}

    def _job(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise ApiError(404, f"No fine-tuning job found with id {job_id}", param="fine_tune_id")
        return self.jobs[job_id]

    def _event(self, job: Job, message: str, data: dict | None = None, level: str = "info"):
        job.events.append(
            {
                "id": f"ftevent-{job.id[6:]}-{len(job.events):05d}",
                "object": "fine_tuning.job.event",
                "created_at": int(time.time()),
                "level": level,
                "message": message,
                "data": data,
                "type": "metrics" if data else "message",
            }
        )

    def _advance(self, job: Job, now: float | None = None) -> None:
        """Brings a job up to the server clock (``now``, else read): status changes, steps and
        their events, up to the moment a requested cancel lands, which it then does."""
        if job.status in self.terminal:
            return
        now = self.clock() if now is None else now
        lands = job.cancel_at is not None and now >= job.cancel_at
        if job.cancel_at is not None:
            now = min(now, job.cancel_at)
        self._progress(job, now - job.started)
        if lands and job.status not in self.terminal:
            self._cancel(job)

    def _progress(self, job: Job, elapsed: float) -> None:
        """Moves a job on to ``elapsed`` seconds after its creation (math.inf: to its end)."""
        if job.status in TERMINAL:
            return
        t = self.timing
        if elapsed < t.validate_s:
            return
        if job.invalid_reason:
            self._finish(
                job,
                "failed",
                {
                    "code": "invalid_training_file",
                    "message": f"Invalid training file: {job.invalid_reason}",
                    "param": "training_file",
                },
            )
            return
        if job.status == "validating_files":
            job.status = "queued"
            self._event(job, "Files validated, moving job to queued state")
        if elapsed < t.validate_s + t.queue_s:
            return
        if job.status == "queued":
            job.status = "running"
            self._event(job, "Fine-tuning job started")
        training = elapsed - t.validate_s - t.queue_s
        pause_from = math.inf if job.pause_at_step is None else job.pause_at_step * t.step_s
        resumed = training >= pause_from + job.pause_s
        if resumed:  # the pause took no training time
            training -= job.pause_s
        steps = (training if resumed else min(training, pause_from)) / t.step_s
        if job.status == "paused" and resumed:  # its span is over: it trains on
            self._resume(job)
        target = job.total_steps if steps >= job.total_steps else int(steps)
        while job.steps_done < target:
            job.steps_done += 1
            step = job.steps_done
            if job.fail_at_step is not None and step >= job.fail_at_step:
                self._finish(
                    job,
                    "failed",
                    {
                        "code": "server_error",
                        "message": "The job failed due to an internal error (injected).",
                        "param": None,
                    },
                )
                return
            self._step_event(job, step)
            if step == job.pause_at_step and not job.pause_seen:
                self._pause(job)
                if resumed:  # a read long after: the whole pause lies behind it
                    self._resume(job)
        if job.steps_done >= job.total_steps:
            self._succeed(job)

    def _pause(self, job: Job) -> None:
        job.status, job.pause_seen = "paused", True
        self.log(f"job {job.number} {job.id} paused by the system at step {job.steps_done}")
        self._event(job, "Fine-tuning job paused: training capacity was pre-empted")

    def _resume(self, job: Job) -> None:
        job.status = "running"
        self.log(f"job {job.number} {job.id} resumed at step {job.steps_done}")
        self._event(job, "Fine-tuning job resumed")

    def _step_event(self, job: Job, step: int) -> None:
        noise = 0.04 * (_unit(job.recipe, step) - 0.5) * (8 / job.batch_size) ** 0.5
        train = train_loss(job, step) + noise
        valid = valid_loss(job, step) + 1.5 * noise
        metrics = {
            "step": step,
            "train_loss": round(train, 5),
            "train_mean_token_accuracy": round(token_accuracy(train), 5),
            "valid_loss": round(valid, 5),
            "valid_mean_token_accuracy": round(token_accuracy(valid), 5),
            "total_steps": job.total_steps,
        }
        if step % job.steps_per_epoch == 0:  # epoch end: the whole validation file
            full = valid_loss(job, step)
            metrics["full_valid_loss"] = round(full, 5)
            metrics["full_valid_mean_token_accuracy"] = round(token_accuracy(full), 5)
            job.last_metrics = metrics
            epoch = step // job.steps_per_epoch
            if epoch > job.n_epochs - 3:  # the API keeps the last three epochs' checkpoints
                job.checkpoints.append(
                    {
                        "id": f"ftckpt-{job.id[6:]}-{epoch}",
                        "object": "fine_tuning.job.checkpoint",
                        "created_at": int(time.time()),
                        "fine_tuning_job_id": job.id,
                        "fine_tuned_model_checkpoint": f"{self._model_name(job)}:ckpt-step-{step}",
                        "metrics": metrics,
                        "step_number": step,
                    }
                )
        self._event(job, f"Step {step}/{job.total_steps}: training loss={train:.4f}", metrics)

    def _model_name(self, job: Job) -> str:
        suffix = re.sub(r"[^a-z0-9-]", "-", (job.suffix or "").lower())[:40]
        return f"ft:{job.model}:harness-fake:{suffix}:{job.id[6:14]}"

    def _succeed(self, job: Job) -> None:
        rows = ["step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"]
        for event in job.events:
            d = event["data"]
            if d:
                rows.append(
                    f"{d['step']},{d['train_loss']},{d['train_mean_token_accuracy']},"
                    f"{d['valid_loss']},{d['valid_mean_token_accuracy']}"
                )
        csv_bytes = ("\n".join(rows) + "\n").encode()
        content = base64.b64encode(csv_bytes) if self.base64_results else csv_bytes
        result = StoredFile(
            self._id("file"), "step_metrics.csv", "fine-tune-results", content, int(time.time())
        )
        self.files[result.id] = result
        job.result_files = [result.id]
        job.fine_tuned_model = self._model_name(job)
        job.trained_tokens = job.file_tokens * job.n_epochs
        self._event(job, f"New fine-tuned model created: {job.fine_tuned_model}")
        if self.auto_deploy:
            self.deployments[self.auto_deploy] = job.fine_tuned_model
        self._finish(job, "succeeded", None)
        self._event(job, "The job has successfully completed")

    def _finish(self, job: Job, status: str, error: dict | None) -> None:
        job.status, job.error, job.finished_at = status, error, int(time.time())
        self.log(f"job {job.number} {job.id} {status}" + (f": {error['message']}" if error else ""))
        if error:
            self._event(job, error["message"], level="error")

    # chat --------------------------------------------------------------------------------------
    def chat(self, query, body, headers):
        request = json.loads(body or b"{}")
        model = headers.get(DEPLOYED_MODEL) or str(request.get("model", ""))
        messages = request.get("messages") or []
        if not messages:
            raise ApiError(400, "'messages' must be a non-empty array", param="messages")
        self.chat_requests.append({"model": model, "temperature": request.get("temperature")})
        job = next((j for j in self.jobs.values() if j.fine_tuned_model == model), None)
        if model.startswith("ft:") and job is None:
            raise ApiError(404, f"The model '{model}' does not exist", "model_not_found", "model")
        users = [m.get("content", "") for m in messages if m.get("role") == "user"]
        prompt = str(users[-1]) if users else ""
        if job is None:  # a base model: knows nothing of the data, answers verbosely
            answer = "I am not sure which category this is."
        else:
            answer = self._answer(job, prompt)
        prompt_tokens = sum(4 + len(str(m.get("content", "")).split()) for m in messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(answer.split()),
            "total_tokens": prompt_tokens + len(answer.split()),
        }
        return (
            200,
            {
                "id": self._id("chatcmpl"),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "logprobs": None,
                        "message": {"role": "assistant", "content": answer, "refusal": None},
                    }
                ],
                "usage": usage,
            },
            {},
        )

    def _answer(self, job: Job, prompt: str) -> str:
        """What the training data says (a TF-IDF-weighted vote of the 5 most similar training
        examples), or, as often as the model's loss says it should be wrong, another answer
        from the training file."""
        nearest = _knn_answer(job.examples, prompt)
        final = job.last_metrics.get("full_valid_loss", valid_loss(job, job.total_steps))
        if _unit(job.recipe, prompt) < skill(final):
            return nearest
        if job.method == "dpo":  # the pair's other answer: what preference tuning unlearns
            return dict(zip((a for _, a in job.examples), job.rejected, strict=True))[nearest]
        others = sorted({a for _, a in job.examples} - {nearest})
        return others[int(_unit(job.recipe, prompt, "wrong") * len(others))] if others else nearest

    routes: ClassVar[list[tuple[str, str, Callable[..., tuple[int, Any, dict[str, str]]]]]] = [
        (r"/v1/files", "POST", create_file),
        (r"/v1/files", "GET", list_files),
        (r"/v1/files/([\w-]+)", "GET", get_file),
        (r"/v1/files/([\w-]+)", "DELETE", delete_file),
        (r"/v1/files/([\w-]+)/content", "GET", file_content),
        (r"/v1/fine_tuning/jobs", "POST", create_job),
        (r"/v1/fine_tuning/jobs", "GET", list_jobs),
        (r"/v1/fine_tuning/jobs/([\w-]+)", "GET", get_job),
        (r"/v1/fine_tuning/jobs/([\w-]+)/cancel", "POST", cancel_job),
        (r"/v1/fine_tuning/jobs/([\w-]+)/events", "GET", list_events),
        (r"/v1/fine_tuning/jobs/([\w-]+)/checkpoints", "GET", list_checkpoints),
        (r"/v1/chat/completions", "POST", chat),
    ]


def _refusal(kind: str, model: str) -> ApiError:
    """What a provider that no longer takes fine-tuning jobs answers a create. The bodies are
    modelled, not captured: OpenAI's 403 once fine-tuning was closed to an organisation (users
    reported a permission-denied answer; its exact message is not published), and the 400 it
    has long given for a model that cannot be fine-tuned (openai-cookbook issue 657)."""
    if kind == "403":
        return ApiError(
            403,
            "Your organization does not have access to fine-tuning: new fine-tuning jobs are "
            "no longer accepted.",
            "fine_tuning_not_available",
        )
    message = f"Model {model} is not available for fine-tuning or does not exist."
    return ApiError(400, message, "model_not_available", "model")


def _hyperparameters(request: Mapping[str, Any]) -> tuple[int, int, float]:
    """A job request's (n_epochs, batch_size, learning_rate_multiplier), "auto" resolved."""
    method = request.get("method") or {}
    kind = method.get("type") or "supervised"  # dpo jobs hold theirs under "dpo"
    hp = ((method.get(kind) or {}).get("hyperparameters")) or {}
    n_epochs = _setting(hp, "n_epochs", 3, int, 1, 50)
    batch_size = _setting(hp, "batch_size", 8, int, 1, 256)
    multiplier = _setting(hp, "learning_rate_multiplier", 2.0, float, 1e-9, 1e9)
    return n_epochs, batch_size, multiplier


def _method(request: Mapping[str, Any]) -> tuple[str, float | None]:
    """A job request's method type and, for dpo, its beta ("auto" resolved), refused with a
    400 as the API refuses them: an unknown type, a beta outside (0, 2]."""
    method = request.get("method") or {}
    kind = method.get("type") or "supervised"
    if kind not in ("supervised", "dpo"):
        raise ApiError(400, f"Invalid method type: {kind!r}", param="method.type")
    if kind == "supervised":
        return kind, None
    hp = ((method.get("dpo") or {}).get("hyperparameters")) or {}
    value = hp.get("beta", "auto")
    if value == "auto":
        return kind, DPO_AUTO_BETA
    try:
        beta = float(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"Invalid value for beta: {value!r}", param="beta") from None
    if not 0.0 < beta <= 2.0:
        raise ApiError(400, "beta must be greater than 0 and at most 2", param="beta")
    return kind, beta


def _metadata(request: Mapping[str, Any]) -> dict[str, str]:
    """A job request's metadata as strings; at most 16 pairs, as the real API allows."""
    metadata = request.get("metadata") or {}
    if not isinstance(metadata, dict) or len(metadata) > 16:
        raise ApiError(400, "metadata must be an object of at most 16 pairs", param="metadata")
    return {str(k): str(v) for k, v in metadata.items()}


def _billed_tokens(chats: list[list[dict]]) -> int:
    """Billed tokens, simulated: ~4 characters a token plus a per-message overhead."""
    return sum(2 + sum(4 + len(str(m.get("content", ""))) // 4 for m in chat) for chat in chats)


def _setting(hp: Mapping[str, Any], key: str, auto: Any, kind: type, low: float, high: float):
    value = hp.get(key, "auto")
    if value == "auto":
        return auto
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"Invalid value for {key}: {value!r}", param=key) from None
    if not low <= number <= high:
        raise ApiError(400, f"{key} must be between {low:g} and {high:g}", param=key)
    return number


def _page(items: list[dict[str, Any]], query: dict[str, list[str]], default_limit: int = 20):
    """A cursor page: items after the one whose id is ``after``, at most ``limit``."""
    limit = int(query.get("limit", [default_limit])[0])
    after = query.get("after", [None])[0]
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "has_more": len(items) > limit,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    }


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str, bytes]]:
    """name -> (filename, bytes) of a multipart/form-data body, parsed by the stdlib."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    fields: dict[str, tuple[str, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if name:
            data = payload if isinstance(payload, bytes) else b""
            fields[str(name)] = (part.get_filename() or "", data)
    return fields


# --- HTTP -------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the fake is used in tests and dry runs

    def _body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _serve(self) -> None:
        url = urlsplit(self.path)
        body = self._body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            status, payload, extra = self.server.api.handle(
                self.command, url.path.rstrip("/"), parse_qs(url.query), headers, body
            )
        except ApiError as exc:
            status, extra = exc.status, {"retry-after-ms": "20"} if exc.status >= 429 else {}
            error = {
                "message": exc.message,
                "type": "invalid_request_error",
                "param": exc.param or None,
                "code": exc.code,
            }
            payload = {"error": error}
        except Exception as exc:  # a bug in the fake: answer 500 rather than hang the client
            status, extra = 500, {}
            payload = {
                "error": {
                    "message": f"fake server error: {exc!r}",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
        if payload is DROP:
            self.close_connection = True
            return
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.server.api.responses.append(status)
        self.send_response(status)
        kind = "application/octet-stream" if isinstance(payload, bytes) else "application/json"
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(data)))
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _serve


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    api: FakeOpenAI


class FakeOpenAIServer:
    """Runs a ``FakeOpenAI`` on 127.0.0.1 in a background thread; use as a context manager."""

    def __init__(self, api: FakeOpenAI | None = None, port: int = 0) -> None:
        self.api = api or FakeOpenAI()
        self.httpd = _Server(("127.0.0.1", port), _Handler)
        self.httpd.api = self.api
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.started = False

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAIServer:
        self.thread.start()
        self.started = True
        return self

    def stop(self) -> None:
        if self.started:  # shutdown() waits for serve_forever, which never ran otherwise
            self.httpd.shutdown()
            self.thread.join(timeout=5)
        self.httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever(argv: list[str]) -> int:
    """`harness fake-openai`: serves until Ctrl-C, printing a line per job event that matters."""
    options = _serve_options(argv)
    api = _api_from_options(options)
    server = FakeOpenAIServer(api, port=options.port).start()
    print(
        f"fake OpenAI API on {server.base_url} (Ctrl-C stops it). A free dry run of a hosted "
        f"study:\n  harness sweep study=tickets_openai backend.base_url={server.base_url} "
        "backend.poll_interval_s=0.5",
        flush=True,
    )
    return serve_until_interrupted(server)


def serve_until_interrupted(server: FakeOpenAIServer) -> int:
    """Waits on a started fake's server thread until Ctrl-C, then stops it and says what it
    made (`harness fake-openai`, `harness fake-together`)."""
    api = server.api
    try:
        while server.thread.is_alive():
            server.thread.join(timeout=1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        print(f"stopped: {len(api.jobs)} jobs created, {len(api.files)} files", flush=True)
    return 0


def _serve_options(argv: list[str]) -> argparse.Namespace:
    """The command line of `harness fake-openai`: port, timings and injected faults."""
    parser = argparse.ArgumentParser(
        prog="harness fake-openai",
        description="A loopback fake of the OpenAI fine-tuning API, for free dry runs: "
        "harness sweep study=tickets_openai backend.base_url=http://127.0.0.1:PORT/v1",
    )
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--step-seconds", type=float, default=0.05, help="time per training step")
    parser.add_argument("--queue-seconds", type=float, default=0.5, help="time queued")
    parser.add_argument(
        "--cancel-seconds", type=float, default=0.0, help="time a cancel takes to land"
    )
    parser.add_argument("--api-key", default=None, help="accept only this key (default: any)")
    parser.add_argument("--error-rate", type=float, default=0.0, help="share answered 500")
    parser.add_argument("--rate-limit-rate", type=float, default=0.0, help="share answered 429")
    parser.add_argument("--job-failure-rate", type=float, default=0.0, help="jobs that fail")
    parser.add_argument("--drop-creates", type=int, default=0, help="job creates left unanswered")
    parser.add_argument("--plain-results", action="store_true", help="result CSV not base64")
    parser.add_argument(
        "--refuse-jobs",
        choices=("403", "400"),
        default="",
        help="refuse every job create as a provider that no longer trains: 403 (permission "
        "denied) or 400 (the model cannot be fine-tuned)",
    )
    parser.add_argument(
        "--pause-jobs",
        default="",
        help="creation numbers (1,2,...) of jobs the system pauses, as Azure's Developer tier may",
    )
    parser.add_argument("--pause-at-step", type=int, default=1, help="... after this step")
    parser.add_argument("--pause-seconds", type=float, default=5.0, help="... for this long")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _api_from_options(options: argparse.Namespace) -> FakeOpenAI:
    """The fake API that `harness fake-openai` serves, logging each job event to stdout."""
    return FakeOpenAI(
        Timing(
            validate_s=options.queue_seconds / 2,
            queue_s=options.queue_seconds,
            step_s=options.step_seconds,
            cancel_s=options.cancel_seconds,
        ),
        Faults(
            error_rate=options.error_rate,
            rate_limit_rate=options.rate_limit_rate,
            job_failure_rate=options.job_failure_rate,
            drop_create_responses=options.drop_creates,
            refuse_jobs=options.refuse_jobs,
            pause_jobs=frozenset(int(n) for n in options.pause_jobs.split(",") if n.strip()),
            pause_at_step=options.pause_at_step,
            pause_s=options.pause_seconds,
            seed=options.seed,
        ),
        api_key=options.api_key,
        base64_results=not options.plain_results,
        log=lambda line: print(line, flush=True),
    )
