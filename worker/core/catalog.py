"""The job catalog: what each kind of job calls, loaded from TOML files in `jobs/`.

What a job calls is decided here, never by the job: a job names its kind, and the
kind names a Cloud Run service and a fixed path. Nobody who can publish a job can
point the worker's identity anywhere else.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import jsonschema
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from worker.core.errors import ConfigError, InvalidJobError
from worker.core.logs import scrub
from worker.core.runjob import RunJobSpec

DEFAULT_RETRYABLE_STATUSES = (429, 500, 502, 503, 504)
_SERVICE_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,47}[a-z0-9])?$")
_KIND_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


class BatchSpec(BaseModel):
    """How a batch kind fans out: one `child_kind` job per account id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    child_kind: str
    page_size: int = Field(500, ge=1, le=1000)
    max_ids: int = Field(1_000_000, ge=1)  # the most children one batch job may make
    # May a job of this kind page through the source (`{"source": true}` or no payload)?
    # A 73-byte message then fans out to up to max_ids children: say so only for a kind
    # whose publishers are trusted with that (the nightly scheduler job), not the web app.
    page_source: bool = False


class BreakerSpec(BaseModel):
    """When a target service's circuit breaker opens, and how it probes its way closed.

    It opens after `failures` failed calls in a row, or when more than `error_rate` of
    the calls in the last `window_s` seconds failed (once `min_calls` were made); it
    stays open `open_s` seconds, then lets `probes` calls through and closes when they
    all succeed. A failure is a 5xx, a timeout or a refused connection; a 429 is the
    adaptive limit's business, not the breaker's.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    failures: int = Field(default=5, ge=1, le=1000)
    error_rate: float = Field(default=0.5, gt=0, le=1)
    window_s: float = Field(default=10.0, gt=0, le=3600)
    min_calls: int = Field(default=20, ge=1, le=100_000)
    open_s: float = Field(default=5.0, gt=0, le=3600)
    probes: int = Field(default=3, ge=1, le=100)


class JobKind(BaseModel):
    """One kind of job. `service` and `path` fix where its calls go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    description: str = ""
    handler: Literal["call", "batch", "run_job"] = "call"
    service: str | None = None
    region: str | None = None
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    path: str = "/"
    timeout_s: float = Field(30.0, gt=0, le=3600)
    attempts: int = Field(4, ge=1, le=20)
    backoff_initial_s: float = Field(0.2, ge=0)
    backoff_max_s: float = Field(10.0, ge=0)
    retry_on: tuple[int, ...] = DEFAULT_RETRYABLE_STATUSES
    retry_on_timeout: bool = True
    payload_schema: dict[str, Any] | None = None
    batch: BatchSpec | None = None
    # Protection of the called service, per worker instance (docs/contract.md).
    max_concurrency: int | None = Field(None, gt=0, le=100_000)
    rate_per_s: float | None = Field(None, gt=0, le=100_000)
    rate_burst: int | None = Field(None, gt=0, le=100_000)
    breaker: BreakerSpec = Field(default_factory=BreakerSpec)
    run_job: RunJobSpec | None = None  # worker/core/runjob.py
    # Jobs at a time: a 429/503 whose Retry-After is beyond backoff_max_s puts the job off
    # (Cloud Tasks) until then, at most defer_max_s ahead, instead of using attempts.
    defer_on_retry_after: bool = False
    defer_max_s: float = Field(86_400.0, gt=0, le=30 * 86_400)
    _validator: Any = PrivateAttr(None)

    @field_validator("kind")
    @classmethod
    def _kind_name(cls, value: str) -> str:
        if not _KIND_RE.fullmatch(value):
            raise ValueError("must be lower-case letters, digits and dashes, starting with a letter")
        return value

    @field_validator("service")
    @classmethod
    def _service_name(cls, value: str | None) -> str | None:
        if value is not None and not _SERVICE_NAME_RE.fullmatch(value):
            raise ValueError("must be a Cloud Run service name (lower-case, digits, dashes)")
        return value

    @field_validator("path")
    @classmethod
    def _safe_path(cls, value: str) -> str:
        # The path is appended to the resolved service URL: it must stay on that host.
        if not value.startswith("/") or value.startswith("//"):
            raise ValueError("must start with a single '/'")
        if any(c in value for c in " @\\#?%") or "://" in value or not value.isprintable():
            raise ValueError(
                "must be a plain path (no spaces, control characters, '@', '#', '?', '%', '\\' or scheme): "
                "a percent-encoding or a query is decoded by the service into what the catalog did not say"
            )
        if {"..", "."} & set(value.split("/")):
            raise ValueError("must not contain '..' or '.' segments")
        return value

    @field_validator("retry_on")
    @classmethod
    def _statuses(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        for status in value:
            if not 400 <= status <= 599 or status in (401, 403):
                raise ValueError(f"{status} cannot be retried (4xx/5xx only; 401 and 403 never)")
        return value

    @field_validator("payload_schema")
    @classmethod
    def _schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                jsonschema.Draft202012Validator.check_schema(value)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
        return value

    @model_validator(mode="after")
    def _handler_fields(self) -> JobKind:
        if self.handler == "call" and not self.service:
            raise ValueError("a 'call' kind needs a 'service'")
        if self.handler == "batch" and self.batch is None:
            raise ValueError("a 'batch' kind needs a [batch] table")
        if self.rate_burst is not None and self.rate_per_s is None:
            raise ValueError("'rate_burst' needs a 'rate_per_s'")
        if (self.handler == "run_job") != (self.run_job is not None):
            raise ValueError("a 'run_job' kind needs a [run_job] table, and only it may have one")
        if self.run_job is not None:
            _check_placeholders_described(self.run_job.fields(), self.payload_schema)
        return self

    @property
    def burst(self) -> int:
        """The token bucket's size: `rate_burst`, else max(1, rate_per_s)."""
        if self.rate_burst is not None:
            return self.rate_burst
        return max(1, int(self.rate_per_s or 1))

    def longest_run_s(self, longest_wait_s: float) -> float:
        """The longest one run of a job of this kind takes in process: every attempt
        timing out, and between them the longest backoff or a server's Retry-After of
        up to `longest_wait_s` (what the invoker sleeps through)."""
        return self.attempts * self.timeout_s + (self.attempts - 1) * max(self.backoff_max_s, longest_wait_s)

    def model_post_init(self, __context: Any) -> None:
        # Built once per kind at load, not once per job on the hot path.
        self._validator = (
            jsonschema.Draft202012Validator(self.payload_schema) if self.payload_schema else None
        )

    def check_payload(self, payload: Any) -> None:
        """Raise InvalidJobError if the payload does not match the kind's schema."""
        if self.payload_schema is None:
            return  # before touching a private attribute: pydantic's slow path (~4% of CPU)
        validator = self._validator
        try:
            error = jsonschema.exceptions.best_match(validator.iter_errors(payload))
        except RecursionError:
            raise InvalidJobError("invalid_payload", "payload is nested too deeply") from None
        if error is not None:
            raise InvalidJobError(
                "invalid_payload", f"payload does not match kind {self.kind!r}: {schema_rule(error)}"
            )


def _check_placeholders_described(fields: set[str], schema: dict[str, Any] | None) -> None:
    """Every payload field a [run_job] template reads must be bounded by the payload_schema:
    a type, and for a string a pattern, maxLength, enum or const (what reaches the job's
    args and env is then what the catalog allows, not whatever a publisher sends)."""
    if not fields:
        return
    properties = (schema or {}).get("properties") or {}
    for name in sorted(fields):
        rule = properties.get(name)
        if not isinstance(rule, dict) or not ({"type", "enum", "const"} & rule.keys()):
            raise ValueError(
                f"[run_job] reads payload field {name!r}: describe it in [payload_schema.properties.{name}] "
                "with a type (and for a string a pattern or maxLength)"
            )
        types = rule.get("type")
        stringy = types == "string" or (isinstance(types, list) and "string" in types)
        if stringy and not ({"pattern", "maxLength", "enum", "const"} & rule.keys()):
            raise ValueError(
                f"[run_job] reads string field {name!r}: bound it in [payload_schema.properties.{name}] "
                'with a pattern (e.g. "^[a-z0-9-]{1,64}$") or a maxLength'
            )


def schema_rule(error: jsonschema.ValidationError) -> str:
    """Where a payload breaks its schema and which rule, never the offending value: jsonschema's
    own message quotes it (`'password=...' is not of type 'integer'`), and this one reaches
    results, dead letters and logs. The rule's value is the catalog's, not the publisher's."""
    where = "/".join(_path_part(p) for p in error.absolute_path) or "payload"
    if error.validator == "required" and isinstance(error.instance, dict):
        # The names are the schema's: saying which is missing quotes nothing of the payload.
        missing = [n for n in error.validator_value if n not in error.instance]
        return f"{where}: " + ", ".join(f"{_rule_value(n)[1:-1]!r} is a required property" for n in missing)
    if error.validator in ("additionalProperties", "unevaluatedProperties"):
        return f"{where}: a property not in the schema is present ({error.validator}: false)"
    return f"{where}: breaks the rule {error.validator} {_rule_value(error.validator_value)}"


def _path_part(part: Any) -> str:
    # Keys are the publisher's: a schema's own names are short identifiers, others are cut.
    text = str(part)
    return scrub(text) if len(text) <= 64 and text.isprintable() else "<key>"


def _rule_value(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


class Catalog(Mapping[str, JobKind]):
    """All job kinds, by name. Loaded once at start-up; a broken file stops start-up."""

    def __init__(self, kinds: dict[str, JobKind], source: Path | None = None) -> None:
        self._kinds = kinds
        self.source = source
        for kind in kinds.values():
            if kind.batch and kind.batch.child_kind not in kinds:
                raise ConfigError(
                    f"{source}: kind {kind.kind!r}: batch.child_kind {kind.batch.child_kind!r} "
                    f"is not in the catalog (known: {', '.join(sorted(kinds))})"
                )

    def __getitem__(self, name: str) -> JobKind:
        return self._kinds[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._kinds)

    def __len__(self) -> int:
        return len(self._kinds)

    def lookup(self, name: str) -> JobKind:
        """The kind for a job, or InvalidJobError naming the known kinds."""
        try:
            return self._kinds[name]
        except KeyError:
            raise InvalidJobError(
                "unknown_kind",
                f"unknown kind {name[:128]!r}; known kinds: {', '.join(sorted(self._kinds))}",
            ) from None

    def longest_run_s(self, longest_wait_s: float) -> float:
        """The longest run of any kind (`JobKind.longest_run_s`)."""
        return max((k.longest_run_s(longest_wait_s) for k in self._kinds.values()), default=0.0)

    def services(self, default_region: str) -> set[tuple[str, str]]:
        """(service, region) of every kind that calls one."""
        return {(k.service, k.region or default_region) for k in self._kinds.values() if k.service}

    def run_jobs(self, default_region: str) -> set[tuple[str, str]]:
        """(Cloud Run job, region) of every kind that runs one."""
        return {(k.run_job.job, k.region or default_region) for k in self._kinds.values() if k.run_job}

    @classmethod
    def load(cls, directory: Path) -> Catalog:
        if not directory.is_dir():
            raise ConfigError(
                f"job catalog {directory} is not a directory; set WORKER_CATALOG_DIR "
                "to the folder holding the *.toml job kinds"
            )
        kinds: dict[str, JobKind] = {}
        for file in sorted(directory.glob("*.toml")):
            kind = _load_file(file)
            if kind.kind in kinds:
                raise ConfigError(f"{file}: kind {kind.kind!r} is defined twice")
            kinds[kind.kind] = kind
        if not kinds:
            raise ConfigError(f"job catalog {directory} has no *.toml job kinds")
        return cls(kinds, directory)


def _load_file(file: Path) -> JobKind:
    try:
        raw = tomllib.loads(file.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read job kind: {exc}") from None
    try:
        return JobKind.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(file)"
        raise ConfigError(f"{file}: field {field!r}: {err['msg']}") from None


def default_catalog_dir() -> Path:
    """`jobs/` of a source checkout, else the copy packaged into the wheel."""
    package = Path(__file__).resolve().parents[1]
    checkout = package.parent / "jobs"
    if checkout.is_dir():
        return checkout
    return package / "_catalog"
