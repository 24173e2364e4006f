"""OAuth2 (token endpoint, certs) and IAM Credentials, on one "googleapis" port.

- `POST /token`: the JWT-bearer grant of service-account key files (an access token,
  or an ID token when the assertion carries `target_audience`) and the refresh-token
  grant of authorized-user files (an access token plus an ID token whose `aud` is the
  OAuth client id: the token users wrongly send to Cloud Run).
- `GET /oauth2/v1/certs`: `{kid: x509 PEM}`, what `id_token.verify_token` reads.
- `POST /v1/projects/-/serviceAccounts/SA:generateIdToken|generateAccessToken`:
  impersonation, allowed to holders of roles/iam.serviceAccountTokenCreator.
"""

from __future__ import annotations

import re
import time
from typing import Any

from aiohttp import web

from localcloud.authority import TOKEN_LIFETIME_S, TokenAuthority
from localcloud.iam import TOKEN_CREATOR, IamPolicy, member_for
from localcloud.recording import Recorder, bearer_token

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CERTS_PATH = "/oauth2/v1/certs"
# google-auth addresses ID-token assertions to Google's endpoint whatever the key
# file's token_uri says, so the local endpoint accepts that audience as its own.
GOOGLE_TOKEN_AUDIENCES = (
    "https://oauth2.googleapis.com/token",
    "https://www.googleapis.com/oauth2/v4/token",
)
TOKEN_PATH = "/token"
USER_SCOPES = (
    "openid https://www.googleapis.com/auth/userinfo.email https://www.googleapis.com/auth/cloud-platform"
)
_PERMISSIONS = {
    "generateIdToken": "iam.serviceAccounts.getOpenIdToken",
    "generateAccessToken": "iam.serviceAccounts.getAccessToken",
}
_MAX_LIFETIME_S = 43200


def google_error(code: int, message: str, status: str) -> web.Response:
    """An error in the JSON shape google-api-core maps to its exception classes."""
    response = web.json_response({"error": {"code": code, "message": message, "status": status}}, status=code)
    if code == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="https://accounts.google.com/"'
    return response


def unauthenticated() -> web.Response:
    return google_error(
        401,
        "Request had invalid authentication credentials. Expected OAuth 2 access token, "
        "login cookie or other valid authentication credential.",
        "UNAUTHENTICATED",
    )


def _oauth_error(error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=400)


async def _form(request: web.Request) -> dict[str, str]:
    # google-auth posts form-encoded bodies, but some flows send JSON (use_json=True).
    if request.content_type == "application/json":
        try:
            body = await request.json()
        except ValueError:
            return {}
        return {k: str(v) for k, v in body.items()} if isinstance(body, dict) else {}
    return {k: str(v) for k, v in (await request.post()).items()}


def _is_true(value: Any) -> bool:
    # google-auth sends "includeEmail": "true" as a string, the IAM client a real bool.
    return value is True or (isinstance(value, str) and value.lower() == "true")


def _rfc3339(epoch: float) -> str:
    # No fractional seconds: google-auth parses expireTime with "%Y-%m-%dT%H:%M:%SZ".
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def build_googleapis_app(
    token_uri: str, authority: TokenAuthority, iam: IamPolicy, recorder: Recorder
) -> web.Application:
    """The OAuth2 and IAM Credentials app; `token_uri` is the audience assertions must carry."""

    async def token(request: web.Request) -> web.Response:
        form = await _form(request)
        grant_type = form.get("grant_type", "")
        if grant_type == JWT_BEARER:
            try:
                claims = authority.verify_signed_by_key_file(
                    form.get("assertion", ""), audience=[token_uri, *GOOGLE_TOKEN_AUDIENCES]
                )
            except ValueError as exc:
                return _oauth_error("invalid_grant", f"Invalid JWT Signature. ({exc})")
            email = str(claims["iss"])
            target_audience = claims.get("target_audience")
            if target_audience:
                return web.json_response({"id_token": authority.mint_id_token(email, str(target_audience))})
            return web.json_response(
                {
                    "access_token": authority.mint_access_token(email),
                    "expires_in": TOKEN_LIFETIME_S - 1,
                    "token_type": "Bearer",
                }
            )
        if grant_type == "refresh_token":
            try:
                user = authority.user_for_refresh(
                    form.get("client_id", ""),
                    form.get("client_secret", ""),
                    form.get("refresh_token", ""),
                )
            except ValueError as exc:
                return _oauth_error("invalid_grant", str(exc))
            return web.json_response(
                {
                    "access_token": authority.mint_access_token(user.email),
                    "expires_in": TOKEN_LIFETIME_S - 1,
                    "token_type": "Bearer",
                    "scope": USER_SCOPES,
                    "id_token": authority.mint_id_token(user.email, user.client_id, azp=user.client_id),
                }
            )
        return _oauth_error("unsupported_grant_type", f"Invalid grant_type: {grant_type}")

    async def certs(_request: web.Request) -> web.Response:
        return web.Response(body=authority.certs_json, content_type="application/json")

    async def service_account_method(request: web.Request) -> web.Response:
        target, _, method = request.match_info["name"].rpartition(":")
        if method not in _PERMISSIONS or not target:
            return google_error(404, "Method not found.", "NOT_FOUND")
        bearer = bearer_token(request)
        principal = authority.principal_for_bearer(bearer) if bearer else None
        if principal is None:
            return unauthenticated()
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return google_error(400, "Invalid JSON payload received.", "INVALID_ARGUMENT")
        if not iam.allowed(member_for(principal), TOKEN_CREATOR, f"serviceAccount:{target}"):
            return google_error(
                403,
                f"Permission '{_PERMISSIONS[method]}' denied on resource (or it may not exist).",
                "PERMISSION_DENIED",
            )
        if method == "generateIdToken":
            audience = body.get("audience")
            if not audience:
                return google_error(400, "Audience cannot be empty.", "INVALID_ARGUMENT")
            minted = authority.mint_id_token(
                target, str(audience), include_email=_is_true(body.get("includeEmail"))
            )
            return web.json_response({"token": minted})
        lifetime = _lifetime_seconds(body.get("lifetime"))
        if lifetime is None:
            return google_error(400, "Invalid lifetime.", "INVALID_ARGUMENT")
        expires_at = time.time() + lifetime
        return web.json_response(
            {
                "accessToken": authority.mint_access_token(target, lifetime),
                "expireTime": _rfc3339(expires_at),
            }
        )

    app = web.Application(middlewares=[recorder.middleware("iam")])
    app.router.add_post(TOKEN_PATH, token)
    app.router.add_get(CERTS_PATH, certs)
    app.router.add_post("/v1/projects/{project}/serviceAccounts/{name}", service_account_method)
    return app


def _lifetime_seconds(value: Any) -> int | None:
    """Seconds of a protobuf Duration in JSON ("3600s", "3600.5s"); default one hour."""
    if value in (None, ""):
        return TOKEN_LIFETIME_S
    match = re.fullmatch(r"(\d+)(?:\.\d+)?s", str(value))
    if match is None or not 0 < int(match.group(1)) <= _MAX_LIFETIME_S:
        return None
    return int(match.group(1))
