"""Telling a provider's refusal to train at all from a job create that failed for this trial alone.

A create answered 403, or 400/404 naming the model or the organisation as unable to fine-tune, is
what every next trial would get too (OpenAI stopped taking new fine-tuning jobs on 2027-01-06; a
model retired from fine-tuning; an Azure resource whose region or tier does not train the model):
it becomes a ProviderRefusedError, which stops the study with one message saying what the provider
answered and where training goes on. A 429 or 5xx is retried elsewhere; a refused hyperparameter
(``param`` n_epochs, batch_size, beta, ...) fails only the trial that sampled it.
"""

from __future__ import annotations

import re
from typing import Any

from harness.backends.hosted import ProviderRefusedError

# what remains when OpenAI (or a server speaking its API) refuses new jobs
OPENAI_REMAINS = (
    "OpenAI stopped taking new fine-tuning jobs on 2027-01-06 for every organisation; still "
    "training: backend=azure_openai (Azure OpenAI, same API), backend=together; fine-tuned "
    "models keep serving"
)
AZURE_REMAINS = (
    "Azure OpenAI trains a model only where the resource's region and training tier offer "
    "it: check the model's fine-tuning regions, try another backend.training_type "
    "(GlobalStandard, Standard, Developer) or resource, or backend=together; fine-tuned "
    "models keep serving"
)
# a create refused for the model or the organisation, not for one trial's values
REFUSING_CODES = frozenset(
    {
        "model_not_available",
        "model_not_found",
        "fine_tuning_not_available",
        "unsupported_model",
        "invalid_base_model",
        "permission_denied",
    }
)
REFUSING_WORDS = re.compile(
    r"not available for fine-?tuning|cannot be fine-?tuned|does not support fine-?tuning|"
    r"(no|not have) access to (create )?fine-?tuning|no longer (accepts?|available|supported)",
    re.IGNORECASE,
)
# a refused value of these is the sampled trial's: the next trial may be fine
TRIAL_PARAMS = frozenset(
    {"n_epochs", "batch_size", "learning_rate_multiplier", "beta", "hyperparameters", "seed"}
)


def refusal_or_none(exc: Exception, azure: bool) -> ProviderRefusedError | None:
    """A ProviderRefusedError for a job create the provider refused for every trial, with
    what it answered (status, code, message) and what still trains; None for anything else."""
    import openai

    if not isinstance(exc, openai.APIStatusError):
        return None
    status, code, message, param = _error_fields(exc)
    if status == 403:
        refused = True
    elif status in (400, 404) and param not in TRIAL_PARAMS:
        refused = code in REFUSING_CODES or bool(REFUSING_WORDS.search(message))
    else:
        refused = False
    if not refused:
        return None
    who = "Azure OpenAI" if azure else "the OpenAI API"
    remains = AZURE_REMAINS if azure else OPENAI_REMAINS
    return ProviderRefusedError(
        f"{who} refused to create a fine-tuning job (HTTP {status}, code {code or 'none'}: "
        f"{message or 'no message'}). {remains}."
    )


def _error_fields(exc: Any) -> tuple[int, str, str, str]:
    """(status, code, message, param) of an API error; its body is {"error": {...}} or the
    error object itself, depending on the SDK's parsing."""
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
    code = str(error.get("code") or getattr(exc, "code", None) or "")
    message = str(error.get("message") or getattr(exc, "message", "") or "")
    param = str(error.get("param") or getattr(exc, "param", None) or "")
    return int(exc.status_code), code, message, param
