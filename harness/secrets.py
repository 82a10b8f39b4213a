"""Secrets never shown: the one place that decides what is a secret and masks it.

A secret is a URL's password (whatever characters it holds: ``/``, ``@``, ``%``-escapes), the
value of a URL query or DSN parameter named like a password, token, secret or key
(``?sslpassword=``, ``password=``, ``access_token=``), a config value under such a key, an
OpenAI-style ``sk-`` key, and any secret value harness has read in this process (``remember``):
those are masked wherever they show up, decoded or not, e.g. in a driver's error message.
Every text harness prints or stores goes through ``redact_text`` (or ``redact`` for a config,
``redact_override`` for a command-line override); child processes get secrets through their
environment, never on their command line (``ps`` shows that to every user of the host).
"""

from __future__ import annotations

import contextlib
import difflib
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
# A name whose last word names a secret: api_key, openai_api_key, token, client_secret,
# sslpassword, PASSWD... but not max_new_tokens, tokenizer_source or api_key_env.
SECRET_NAME = re.compile(r"(password|passwd|pwd|token|secret|key)$", re.IGNORECASE)
SECRET_WORDS = ("password", "passwd", "token", "secret", "api_key", "apikey", "access_key")
TYPO_SIMILARITY = 0.85  # api_kye, pasword, tokn: yes; max_new_tokens: no
# A URL with a password: the userinfo runs to the URL's last '@' (SQLAlchemy reads a password
# holding '/', '?' or ':' so; one with a raw '@' is masked whole too), the URL to whitespace.
URL_USERINFO = re.compile(
    r"(?P<head>[a-z][a-z0-9+.-]*://[^:/?#@\s]*):(?P<password>\S*)@", re.IGNORECASE
)
# name=value in a URL's query or a libpq DSN (`host=db password=pw`); the value runs to the
# next '&', '#' or whitespace, or is quoted
SECRET_PARAM = re.compile(
    r"(?P<name>(?<![\w.-])[\w.-]*(?:password|passwd|pwd|token|secret|key))="
    r"(?P<value>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^&#\s]+)",
    re.IGNORECASE,
)
# API keys quoted in provider error messages ("Incorrect API key provided: sk-proj-****abcd")
API_KEY = re.compile(r"(?<![\w-])sk-[A-Za-z0-9_*-]{4,}")
URL_DELIMITERS = re.compile(r"[/?#:@&=\s]")
# Values remembered as secrets are masked wherever they appear; shorter ones would mask common
# words too (they are still masked where a pattern above finds them).
MIN_REMEMBERED = 4
# A piece of a secret (between URL delimiters; see forms) is remembered only from this long:
# short pieces (`train` of `train/2024`) are words of configs and paths too, which they would
# mask in config.yaml and messages.
MIN_PIECE = 8

_known: set[str] = set()


def redact_text(text: str) -> str:
    """``text`` with every secret it holds replaced by ***."""
    text = redact_patterns(text)
    for secret in sorted(_known, key=len, reverse=True):  # a longer one may contain a shorter
        text = text.replace(secret, MASK)
    return text


def first_line(exc: BaseException) -> str:
    """The first line of an error's text, secrets masked: what a one-line message quotes."""
    text = str(exc).strip()
    return redact_text(text.splitlines()[0]) if text else ""


def redact_patterns(text: str) -> str:
    """``text`` with the secrets its own form shows (URL passwords, secret parameters, sk- keys)
    replaced by ***."""
    text = URL_USERINFO.sub(rf"\g<head>:{MASK}@", text)
    text = SECRET_PARAM.sub(rf"\g<name>={MASK}", text)
    return API_KEY.sub(f"sk-{MASK}", text)


def redact_override(line: str) -> str:
    """A command-line override safe to log, print or store: `backend.api_key=***`. By its own
    form only (a secret key's value, URL passwords, secret parameters), not by remembered
    values: stored overrides are replayed (`+from_best`, reproduce commands), and a
    remembered value that is also a word of them (a password `train`) would mangle them."""
    key, sep, _ = line.partition("=")
    if sep and is_secret_name(key.lstrip("+~")):
        return f"{key}={MASK}"
    return redact_patterns(line)


def redact(value: Any, key: str = "") -> Any:
    """A copy of a plain container with values under secret-looking keys masked and secrets
    in strings (URL passwords, query passwords) removed."""
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if value is not None and is_secret_name(key):
        return MASK
    return redact_text(value) if isinstance(value, str) else value


def redact_error(message: str, overrides: Iterable[str]) -> str:
    """An error message fit to print: secrets redacted, and the value of each override whose
    key looks like a secret's, misspelt ones included (Hydra's "Could not override
    'backend.api_kye'... use +backend.api_kye=VALUE" quotes the value back)."""
    for line in overrides:
        key, sep, value = line.partition("=")
        if sep and value and looks_secret_name(key.lstrip("+~")):
            message = message.replace(value, MASK)
    return redact_text(message)


def is_secret_name(key: str) -> bool:
    """A config key or query parameter whose value is a secret: its last word names one."""
    return bool(SECRET_NAME.search(key.rsplit(".", 1)[-1]))


def looks_secret_name(key: str) -> bool:
    """A secret's name, or a misspelling of one (`api_kye`, `pasword`)."""
    last = key.rsplit(".", 1)[-1].lower()
    return is_secret_name(last) or any(
        difflib.SequenceMatcher(None, last[-len(word) - 2 :], word).ratio() >= TYPO_SIMILARITY
        for word in SECRET_WORDS
    )


def remember(secret: str) -> None:
    """From now on ``secret`` is masked wherever this process prints or stores it."""
    secret = secret.strip()
    if len(secret) >= MIN_REMEMBERED:
        _known.add(secret)


def remember_config(container: Any, key: str = "") -> None:
    """Remembers every secret of a resolved config (``OmegaConf.to_container(cfg,
    resolve=True)``): URL passwords and secret query values, raw and %-decoded, and values
    under secret-looking keys, so an error that quotes one decoded is masked too."""
    if isinstance(container, Mapping):
        for name, value in container.items():
            remember_config(value, str(name))
    elif isinstance(container, list):
        for value in container:
            remember_config(value, key)
    elif isinstance(container, str):
        if is_secret_name(key):
            remember(container)
        password, public = parsed_url(container)
        found = [*secrets_in(container), *password]
        for secret in found:
            for form in forms(secret):
                # one also written in the URL's public parts (postgres:postgres@) would mask them
                if form not in public:
                    remember(form)


def forms(secret: str) -> set[str]:
    """A secret as it may be shown: as written, %-decoded, and the pieces between a URL's
    delimiters, which another parser may show alone (http.client reads `u:pw/x@h` as the host
    `u` with the port `pw`)."""
    shown = {secret, urllib.parse.unquote(secret)}
    pieces = {piece for form in shown for piece in URL_DELIMITERS.split(form)}
    return shown | {piece for piece in pieces if len(piece) >= MIN_PIECE}


def secrets_in(text: str) -> list[str]:
    """The URL passwords and secret parameter values written in ``text``."""
    found = [match["password"] for match in URL_USERINFO.finditer(text)]
    for match in SECRET_PARAM.finditer(text):
        value = match["value"]
        if value[:1] in "'\"" and value[-1:] == value[:1]:
            value = value[1:-1]
        found.append(value)
    return [secret for secret in found if secret]


def parsed_url(value: str) -> tuple[list[str], str]:
    """The password of a URL as SQLAlchemy (Optuna's and MLflow's stores) reads it, which may
    hold what the patterns stop at (a raw space), and the value's public parts: all but its
    secrets, by position."""
    if re.match(r"[a-z][a-z0-9+.-]*://", value, re.IGNORECASE):
        import sqlalchemy

        with contextlib.suppress(Exception):  # not a URL SQLAlchemy reads: nothing reads it
            url = sqlalchemy.engine.make_url(value)
            if url.password:
                public = url.render_as_string(hide_password=True)
                return [str(url.password)], redact_patterns(public)
    return [], redact_patterns(value)


def remember_resolved(cfg: Any) -> None:
    """``remember_config`` of an OmegaConf config; a value that does not resolve (an unset
    environment variable) is left for the command to report."""
    from omegaconf import OmegaConf

    with contextlib.suppress(Exception):
        remember_config(OmegaConf.to_container(cfg, resolve=True))
