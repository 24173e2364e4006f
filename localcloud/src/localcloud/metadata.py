"""The metadata server, as Cloud Run's: the worker's identity, its access and ID tokens.

google-auth reaches it through GCE_METADATA_HOST (paths) and GCE_METADATA_IP (ping).
It reads the `content-type` header of every answer and checks `Metadata-Flavor:
Google` on the ping, so both are on every response, errors included.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from localcloud.authority import TOKEN_LIFETIME_S, TokenAuthority
from localcloud.recording import Recorder

ROOT = "/computeMetadata/v1/"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
_TEXT = "application/text"
_SA_ENTRIES = "aliases\nemail\nidentity\nscopes\ntoken\n"


@dataclass(frozen=True)
class MetadataIdentity:
    project: str
    project_number: str
    region: str
    email: str


def _text(body: str, status: int = 200, content_type: str = _TEXT) -> web.Response:
    return web.Response(text=body, status=status, content_type=content_type)


def _not_found() -> web.Response:
    return _text(
        "<!DOCTYPE html>\n<html><head><title>Error 404 (Not Found)!!1</title></head>"
        "<body><p><b>404.</b> That's an error.</p></body></html>\n",
        status=404,
        content_type="text/html",
    )


def build_metadata_app(
    identity: MetadataIdentity, authority: TokenAuthority, recorder: Recorder
) -> web.Application:
    """An aiohttp app answering the metadata paths google-auth 2.63 uses."""

    def account_info() -> dict[str, object]:
        return {"aliases": ["default"], "email": identity.email, "scopes": [CLOUD_PLATFORM_SCOPE]}

    def simple_values() -> dict[str, str]:
        number = identity.project_number
        return {
            "project/project-id": identity.project,
            "project/numeric-project-id": number,
            "universe/universe-domain": "googleapis.com",
            "instance/region": f"projects/{number}/regions/{identity.region}",
            "instance/zone": f"projects/{number}/zones/{identity.region}-1",
            "instance/id": number + "0001",
        }

    def service_account(account: str, leaf: str, request: web.Request) -> web.Response:
        if account not in ("default", identity.email):
            return _not_found()
        recursive = request.query.get("recursive", "").lower() == "true"
        if leaf == "":
            return web.json_response(account_info()) if recursive else _text(_SA_ENTRIES)
        if leaf == "email":
            return _text(identity.email)
        if leaf == "aliases":
            return _text("default\n")
        if leaf == "scopes":
            return _text(CLOUD_PLATFORM_SCOPE + "\n")
        if leaf == "token":
            token = authority.mint_access_token(identity.email)
            return web.json_response(
                {"access_token": token, "expires_in": TOKEN_LIFETIME_S - 1, "token_type": "Bearer"}
            )
        if leaf == "identity":
            audience = request.query.get("audience", "")
            if not audience:
                return _text("non-empty audience parameter required", status=400)
            full = request.query.get("format", "standard") == "full"
            return _text(authority.mint_id_token(identity.email, audience, include_email=full))
        return _not_found()

    async def handle(request: web.Request) -> web.Response:
        if request.path == "/":
            return _text("computeMetadata/\n")
        if request.headers.get("Metadata-Flavor") != "Google":
            return _text("Missing required header: Metadata-Flavor\n", status=403, content_type="text/html")
        if not request.path.startswith(ROOT):
            return _not_found()
        relative = request.path[len(ROOT) :]
        if relative in simple_values():
            return _text(simple_values()[relative])
        parts = relative.split("/")
        if parts[:2] != ["instance", "service-accounts"]:
            return _not_found()
        rest = parts[2:]
        if rest in ([], [""]):
            if request.query.get("recursive", "").lower() == "true":
                return web.json_response({"default": account_info(), identity.email: account_info()})
            return _text(f"default/\n{identity.email}/\n")
        if len(rest) == 1 or (len(rest) == 2 and rest[1] == ""):
            return service_account(rest[0], "", request)
        if len(rest) == 2:
            return service_account(rest[0], rest[1], request)
        return _not_found()

    async def add_flavor(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Metadata-Flavor"] = "Google"
        response.headers.setdefault("Server", "Metadata Server for VM")

    app = web.Application(middlewares=[recorder.middleware("metadata")])
    app.on_response_prepare.append(add_flavor)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
