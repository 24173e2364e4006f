"""`worker doctor`: walk the identity chain and say where it breaks, with the fix.

The chain: credentials -> (per service) URL from the Cloud Run Admin API -> an ID
token minted for that URL -> a real HTTPS call with it. Each step reports what it
found; a broken step says why and prints the gcloud command that mends it, with
the project, region, service and principal filled in. Tokens are decoded (without
verification) to show `aud`, `email` and `exp`; they are never printed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from worker.core.errors import ConfigError, JobError
from worker.core.gcloud_command import gcloud, grant
from worker.core.roles import RUN_INVOKER, RUN_VIEWER
from worker.core.settings import Settings
from worker.gcp.identity import ADC_LOGIN, TOKEN_CREATOR, IdentityTokenSource, Principal, build_token_source
from worker.ops.checks import Check, ServiceReport

STORY_401 = (
    "Cloud Run answers 401 unless the bearer is an OIDC ID token, signed by Google, whose "
    f"`aud` is the service URL. User credentials ({ADC_LOGIN}) "
    "hold an OAuth access token and an ID token whose `aud` is gcloud's OAuth client, so "
    "Cloud Run refuses both; only a service account can mint an ID token for any audience "
    "(on Cloud Run through the metadata server, elsewhere through a key file or by "
    "impersonation)."
)
_CALL_TIMEOUT_S = 15.0


@dataclass
class Diagnosis:
    """The checks that do not depend on a service (credentials), then each service's."""

    checks: list[Check]
    services: list[ServiceReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks) and bool(self.services) and all(s.ok for s in self.services)


async def diagnose(
    settings: Settings,
    services: list[tuple[str, str]],
    *,
    run_client: Any,
    worker_sa: str,
    audience: str | None = None,
    catalog: Any = None,
    run_jobs: list[tuple[str, str]] = (),  # type: ignore[assignment]
    jobs_client: Any = None,
    tasks_client: Any = None,
) -> Diagnosis:
    """Check the chain for each (service, region); `audience` overrides the token's audience.

    `run_client` is a callable returning a `run_v2.ServicesClient`: it is only built
    once the credentials are known to be usable.
    """
    try:
        tokens = build_token_source(settings.impersonate_service_account, settings.iam_api_endpoint)
    except ConfigError as exc:
        return Diagnosis(_credentials_failure(settings, str(exc), worker_sa))
    principal = tokens.principal
    diagnosis = Diagnosis([Check("credentials", True, principal.describe())])
    from worker.gcp.resolver import ServiceResolver

    resolver = ServiceResolver(
        run_client(), settings.project, ttl_s=0, allow_insecure_loopback=settings.local_run_api
    )
    async with aiohttp.ClientSession() as session:
        for service, region in services:
            report = ServiceReport(service, region)
            diagnosis.services.append(report)
            url_check, url = await _resolve(resolver, settings, principal, service, region)
            report.checks.append(url_check)
            if url is None:
                continue
            if catalog is not None:
                from worker.ops.limits import kind_lines, target_line

                capacity = resolver.capacity(service, region)
                own = [
                    f"{name} {line}"
                    for name in sorted(catalog)
                    if catalog[name].service == service
                    for line in kind_lines(catalog[name], settings.max_instances)
                ]
                summary = "; ".join([target_line(settings, catalog, service, region, capacity), *own])
                report.checks.append(Check("limits", True, summary))
            token_check, token = await _mint(tokens, settings, principal, audience or url, url)
            report.checks.append(token_check)
            if token is None:
                continue
            report.checks.append(
                await _call(session, settings, principal, service, region, url, token, audience)
            )
    if run_jobs:
        from worker.ops.jobcheck import check_run_job

        client = jobs_client()
        for job, region in run_jobs:
            diagnosis.services.append(await check_run_job(client, settings, _member(principal), job, region))
    if tasks_client is not None:  # jobs at a time: may the worker put jobs off on its queue
        from worker.ops.delay import check_delay_queue

        member = _member(principal)
        diagnosis.services.append(
            await check_delay_queue(tasks_client(), settings, member, principal.email or worker_sa)
        )
    return diagnosis


def _credentials_failure(settings: Settings, error: str, worker_sa: str) -> list[Check]:
    """No token source: explain, and for user credentials tell the 401 story."""
    found = _credentials_file()
    project = settings.project
    if found is not None and found[2].get("type") == "authorized_user":
        origin, path, info = found
        user = str(info.get("account") or "YOUR_EMAIL")
        return [
            Check("credentials", True, f"user credentials of {user} ({origin}={path})"),
            Check(
                "ID token",
                False,
                "user credentials cannot mint one",
                why=[STORY_401, "This is the 401 the web app saw when it called the function directly."],
                fix=[
                    grant(f"user:{user}", TOKEN_CREATOR, f"projects/{project}/serviceAccounts/{worker_sa}"),
                    f"export WORKER_IMPERSONATE_SERVICE_ACCOUNT={worker_sa}",
                ],
            ),
        ]
    return [
        Check(
            "credentials",
            False,
            "no credentials that can mint ID tokens",
            why=[error],
            fix=[
                grant("user:YOUR_EMAIL", TOKEN_CREATOR, f"projects/{project}/serviceAccounts/{worker_sa}"),
                gcloud("auth", "application-default", "login", impersonate_service_account=worker_sa),
            ],
        )
    ]


def _credentials_file() -> tuple[str, Path, dict[str, Any]] | None:
    """(origin, path, contents) of the credentials file google-auth would read, if any."""
    candidates = [("GOOGLE_APPLICATION_CREDENTIALS", os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"))]
    if not os.environ.get("GCE_METADATA_HOST"):
        # The order identity.build_token_source reads them in: gcloud's file, then metadata.
        config = os.environ.get("CLOUDSDK_CONFIG") or str(Path.home() / ".config" / "gcloud")
        candidates.append(("gcloud ADC", str(Path(config) / "application_default_credentials.json")))
    for origin, name in candidates:
        if not name or not Path(name).is_file():
            continue
        try:
            info = json.loads(Path(name).read_text("utf-8"))
        except (OSError, ValueError):
            return None
        return (origin, Path(name), info) if isinstance(info, dict) else None
    return None


def _source_member() -> str:
    """The member impersonating the worker's account, as far as its credentials file says."""
    found = _credentials_file()
    info = found[2] if found else {}
    if info.get("type") == "impersonated_service_account":
        info = info.get("source_credentials") or {}
    if info.get("client_email"):
        return f"serviceAccount:{info['client_email']}"
    return f"user:{info.get('account') or 'YOUR_EMAIL'}"


def _member(principal: Principal) -> str:
    email = principal.email or "WORKER_SA"
    kind = "serviceAccount" if email.endswith(".gserviceaccount.com") or email == "WORKER_SA" else "user"
    return f"{kind}:{email}"


async def _resolve(
    resolver: Any, settings: Settings, principal: Principal, service: str, region: str
) -> tuple[Check, str | None]:
    try:
        url = await resolver.resolve(service, region)
    except JobError as exc:
        list_services = gcloud("run", "services", "list", project=settings.project, region=region)
        fix = {
            # Granted per service, roles/run.viewer cannot tell "denied" from "does not
            # exist" (Cloud Run answers 403 for both): the list shows which it is.
            "permission_denied": [
                grant(
                    _member(principal),
                    RUN_VIEWER,
                    f"projects/{settings.project}/locations/{region}/services/{service}",
                ),
                list_services,
            ],
            "service_not_found": [list_services],
        }.get(exc.code, [])
        summary = f"the Admin API did not give a URL ({exc.code})"
        return Check("service URL", False, summary, [exc.message], fix), None
    return Check("service URL", True, f"{url} (Cloud Run Admin API)"), url


async def _mint(
    tokens: IdentityTokenSource, settings: Settings, principal: Principal, audience: str, url: str
) -> tuple[Check, str | None]:
    try:
        token = await tokens.token(audience)
    except JobError as exc:
        fix = []
        if exc.code == "token_creator_missing" and principal.email:
            account = f"projects/{settings.project}/serviceAccounts/{principal.email}"
            fix.append(grant(_source_member(), TOKEN_CREATOR, account))
        return Check("ID token", False, f"cannot mint one for {audience}", [exc.message], fix), None
    note = "" if audience == url else " (--audience: not the service URL)"
    return Check("ID token", True, describe_token(token) + note), token


def describe_token(token: str) -> str:
    """aud, email and expiry of a JWT, read without verifying it; never the token itself."""
    from google.auth import jwt

    try:
        claims = jwt.decode(token, verify=False)
    except (ValueError, TypeError):
        return "not a JWT (an access token?)"
    exp = claims.get("exp")
    expires = ""
    if isinstance(exp, int | float):
        at = datetime.fromtimestamp(exp, UTC)
        minutes = int((at - datetime.now(UTC)).total_seconds() // 60)
        expires = f" exp={at.isoformat(timespec='seconds')} (in {minutes} min)"
    return f"aud={claims.get('aud')} email={claims.get('email', '(none)')}{expires}"


async def _call(
    session: aiohttp.ClientSession,
    settings: Settings,
    principal: Principal,
    service: str,
    region: str,
    url: str,
    token: str,
    audience: str | None,
) -> Check:
    # GET, not the kind's method: a probe must not run the function's work. Cloud
    # Run checks the token before the request reaches the function either way.
    target = url.rstrip("/") + "/"
    # The local cloud's services are plain http on loopback: say what was called.
    label = "HTTPS call" if target.startswith("https://") else "HTTP call"
    try:
        async with session.get(
            target,
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=_CALL_TIMEOUT_S),
            allow_redirects=False,
        ) as response:
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Check(label, False, f"GET {target} did not answer", [f"{type(exc).__name__}: {exc}"])
    where = {"region": region, "project": settings.project}
    if status == 401:
        if audience and audience != url:
            return Check(
                label,
                False,
                f"GET {target} -> 401 Unauthorized: the token's audience is wrong",
                [
                    STORY_401,
                    f"the token's aud is {audience}, but {service} accepts only its URL {url} "
                    "(or a custom audience configured on the service). Mint the token for the URL "
                    "(google.oauth2.id_token.fetch_id_token(request, URL)), or add the audience:",
                ],
                [gcloud("run", "services", "update", service, **where, add_custom_audiences=audience)],
            )
        return Check(
            label,
            False,
            f"GET {target} -> 401 Unauthorized: the service did not accept the token",
            [STORY_401, "The token was minted for the service URL: is it expired, or not Google-signed?"],
        )
    if status == 403:
        return Check(
            label,
            False,
            f"GET {target} -> 403 Forbidden: {principal.email} may not invoke {service}",
            [f"the token is valid, but {_member(principal)} lacks roles/run.invoker on {service}."],
            [
                grant(
                    _member(principal),
                    RUN_INVOKER,
                    f"projects/{settings.project}/locations/{region}/services/{service}",
                )
            ],
        )
    if status >= 500:
        return Check(
            label,
            False,
            f"GET {target} -> {status}: the token was accepted, but the service failed",
            ["look at the service's logs: " + gcloud("run", "services", "logs", "read", service, **where)],
        )
    return Check(
        label,
        True,
        f"GET {target} -> {status}: the service accepted the token"
        + ("" if status < 300 else " (the function's own answer to an empty GET)"),
    )


def render(diagnosis: Diagnosis, project: str) -> list[tuple[str, str | None]]:
    """Lines to print, each with a style: "ok", "fail", "fix" or None."""
    lines: list[tuple[str, str | None]] = [(f"Identity chain in project {project}", None)]
    for check in diagnosis.checks:
        lines += _render_check(check, "")
    if not diagnosis.services:
        lines.append(("  (services not checked: there is no identity to check them with)", None))
    for report in diagnosis.services:
        lines.append((f"{report.what} {report.service} ({report.region})", None))
        for check in report.checks:
            lines += _render_check(check, "  ")
    if diagnosis.ok:
        lines.append(("The identity chain works end to end.", "ok"))
    else:
        broken = [c.step for c in _all_checks(diagnosis) if not c.ok]
        lines.append((f"The identity chain is broken at: {', '.join(broken)}.", "fail"))
    return lines


def _render_check(check: Check, indent: str) -> list[tuple[str, str | None]]:
    mark, style = ("ok  ", "ok") if check.ok else ("FAIL", "fail")
    lines: list[tuple[str, str | None]] = [(f"{indent}{mark} {check.step}: {check.summary}", style)]
    lines += [(f"{indent}     why: {why}", None) for why in check.why]
    lines += [(f"{indent}     fix: {fix}", "fix") for fix in check.fix]
    return lines


def _all_checks(diagnosis: Diagnosis) -> list[Check]:
    return diagnosis.checks + [c for s in diagnosis.services for c in s.checks]
