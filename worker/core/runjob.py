"""A `run_job` kind's table: which Cloud Run job it runs, and how a payload becomes its overrides.

    [run_job]
    job = "rescore"                        # the Cloud Run job (region: the kind's, else WORKER_REGION)
    args = ["--account={account_id}"]      # container args; {field} is a top-level payload field
    env = { MODE = "{mode}" }              # merged into the container's env
    task_count = "{shards}"                # an int, or one {field} holding an int (default: the job's)
    task_timeout_s = 3600                  # per task, the same way (default: the job's)

Everything is checked when the catalog loads; a payload that does not fit (a field
missing, an object where a value goes, a task count out of range) is rejected before
anything runs. The payload only ever fills values: the job, region and container are
the catalog's.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.core.errors import InvalidJobError

# The env the worker adds to every execution it starts: how it finds that execution again.
JOB_ID_ENV = "WORKER_JOB_ID"
REPLAY_ENV = "WORKER_REPLAY_COUNT"
RESERVED_ENV = (JOB_ID_ENV, REPLAY_ENV)
MAX_TASK_COUNT = 10_000
MAX_TASK_TIMEOUT_S = 168 * 3600
MAX_RENDERED_BYTES = 32_768
_JOB_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ONE_FIELD_RE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_FORMATTER = string.Formatter()
# Env a payload-filled value must never set: the loader, the interpreter, Google's
# libraries and credentials, proxies, and what Cloud Run sets itself.
_DANGEROUS_ENV_RE = re.compile(r"^(LD_.*|PATH|PYTHON.*|GOOGLE_.*|.*_PROXY|K_.*|PORT|CLOUD_RUN_.*)$", re.I)
# C0 and C1 control characters and DEL: a newline, NUL or escape code in an arg or env value
# is never a value a payload means.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def template_fields(text: str) -> list[str]:
    """The {field} names in `text` (ValueError unless every placeholder is a plain field)."""
    names = []
    try:
        parsed = list(_FORMATTER.parse(text))
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not _FIELD_RE.fullmatch(name) or spec or conversion:
            raise ValueError(
                f"{text!r}: placeholder {{{name}}} must name a top-level payload field, like {{account_id}}"
            )
        names.append(name)
    return names


class RunJobSpec(BaseModel):
    """The `[run_job]` table of a kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: str
    container: str | None = None
    args: tuple[str, ...] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    task_count: int | str | None = None
    task_timeout_s: int | str | None = None
    poll_initial_s: float = Field(10.0, ge=1, le=3600)
    poll_max_s: float = Field(300.0, ge=1, le=3600)
    # The most a payload may ask for when task_count / task_timeout_s is a {field}.
    max_task_count: int = Field(100, ge=1, le=MAX_TASK_COUNT)
    max_task_timeout_s: int = Field(24 * 3600, ge=1, le=MAX_TASK_TIMEOUT_S)

    @field_validator("job")
    @classmethod
    def _job_name(cls, value: str) -> str:
        if not _JOB_NAME_RE.fullmatch(value):
            raise ValueError("must be a Cloud Run job name (lower-case letters, digits, dashes)")
        return value

    @field_validator("args")
    @classmethod
    def _args(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for arg in value or ():
            template_fields(arg)
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _ENV_NAME_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not an environment variable name")
            if name in RESERVED_ENV or name.startswith("CLOUD_RUN_"):
                raise ValueError(f"{name!r} is set by the worker or by Cloud Run; pick another name")
            if _DANGEROUS_ENV_RE.fullmatch(name):
                raise ValueError(
                    f"{name!r} changes how the job's process loads, connects or authenticates "
                    "(LD_*, PATH, PYTHON*, GOOGLE_*, *_PROXY, K_*, PORT, CLOUD_RUN_*); pick another name"
                )
            template_fields(text)
        return value

    @field_validator("task_count", "task_timeout_s")
    @classmethod
    def _count(cls, value: int | str | None, info: Any) -> int | str | None:
        if isinstance(value, str):
            if not _ONE_FIELD_RE.fullmatch(value):
                raise ValueError("must be an integer, or one {field} of the payload holding one")
        elif value is not None:
            high = MAX_TASK_COUNT if info.field_name == "task_count" else MAX_TASK_TIMEOUT_S
            if not 1 <= value <= high:
                raise ValueError(f"must be between 1 and {high}")
        return value

    def fields(self) -> set[str]:
        """Every payload field the template reads."""
        texts = [*(self.args or ()), *self.env.values()]
        texts += [v for v in (self.task_count, self.task_timeout_s) if isinstance(v, str)]
        return {name for text in texts for name in template_fields(text)}


@dataclass(frozen=True)
class Overrides:
    """What RunJob is asked to override, rendered from one payload."""

    args: list[str] | None
    env: dict[str, str]
    task_count: int | None
    task_timeout_s: int | None


def render(spec: RunJobSpec, kind: str, payload: Any, job_id: str, replay_count: int) -> Overrides:
    """The overrides for `payload`, or InvalidJobError saying why it does not fit the template."""
    values = _values(spec, kind, payload)
    args = [_fill(arg, values, kind) for arg in spec.args] if spec.args is not None else None
    for template, arg in zip(spec.args or (), args or (), strict=True):
        if arg.startswith("-") and not template.startswith("-"):
            # `{tenant}` filled with `--delete-everything` would be an option, not a value.
            raise InvalidJobError(
                "invalid_payload",
                f"payload does not fit kind {kind!r}: the argument {template!r} may not start with '-'",
            )
    env = {name: _fill(text, values, kind) for name, text in spec.env.items()}
    size = sum(len(a.encode()) for a in args or ()) + sum(len(v.encode()) for v in env.values())
    if size > MAX_RENDERED_BYTES:
        raise InvalidJobError(
            "invalid_payload",
            f"kind {kind!r}: the args and env rendered from this payload are {size} bytes, over "
            f"{MAX_RENDERED_BYTES}; pass a reference (a bucket path, an id) instead of the data",
        )
    env[JOB_ID_ENV] = job_id
    env[REPLAY_ENV] = str(replay_count)
    return Overrides(
        args=args,
        env=env,
        task_count=_number(spec.task_count, values, kind, "task_count", spec.max_task_count),
        task_timeout_s=_number(spec.task_timeout_s, values, kind, "task_timeout_s", spec.max_task_timeout_s),
    )


def _values(spec: RunJobSpec, kind: str, payload: Any) -> dict[str, str | int | float | bool]:
    wanted = spec.fields()
    if not wanted:
        return {}
    if not isinstance(payload, dict):
        raise InvalidJobError(
            "invalid_payload",
            f"kind {kind!r} fills its job's args/env from payload fields {sorted(wanted)}: "
            f"the payload must be a JSON object, got {type(payload).__name__}",
        )
    missing = sorted(wanted - payload.keys())
    if missing:
        raise InvalidJobError(
            "invalid_payload", f"payload does not fit kind {kind!r}: missing field(s) {missing}"
        )
    values = {}
    for name in wanted:
        value = payload[name]
        if value is None or isinstance(value, dict | list):
            raise InvalidJobError(
                "invalid_payload",
                f"payload does not fit kind {kind!r}: field {name!r} must be a string, number or "
                f"boolean, got {type(value).__name__ if value is not None else 'null'}",
            )
        values[name] = value
    return values


def _fill(text: str, values: dict[str, str | int | float | bool], kind: str) -> str:
    filled = []
    for literal, name, _, _ in _FORMATTER.parse(text):
        filled.append(literal)
        if name is not None:
            value = _text(values[name])
            if _CONTROL_RE.search(value):
                raise InvalidJobError(
                    "invalid_payload",
                    f"payload does not fit kind {kind!r}: field {name!r} holds a control character "
                    "(newline, NUL, escape...): send plain text",
                )
            filled.append(value)
    return "".join(filled)


def _text(value: str | int | float | bool) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _number(value: int | str | None, values: dict[str, Any], kind: str, what: str, high: int) -> int | None:
    if not isinstance(value, str):
        return value
    name = _ONE_FIELD_RE.fullmatch(value).group(1)  # type: ignore[union-attr]  # checked at load
    got = values[name]
    if isinstance(got, bool) or not isinstance(got, int) or not 1 <= got <= high:
        raise InvalidJobError(
            "invalid_payload",
            f"payload does not fit kind {kind!r}: field {name!r} ({what}) must be an integer "
            f"from 1 to {high}, got {json.dumps(got)[:40]}",
        )
    return got
