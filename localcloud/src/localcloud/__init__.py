"""An offline Google Cloud speaking the real protocols on 127.0.0.1.

`LocalCloud` runs a metadata server, OAuth2 + IAM Credentials, the Cloud Run Admin
API and Cloud Run services, so google-auth and Google's client libraries run
unmodified against it; `PubSubEmulator` manages Google's own Pub/Sub emulator.

Names load lazily (PEP 562): `from localcloud import free_port` must not
import google.auth, because google-auth reads GCE_METADATA_HOST once, at import,
and callers pick the metadata port before setting it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from localcloud.cloud import COMPONENTS, LocalCloud
    from localcloud.functions import score_account
    from localcloud.iam import RUN_INVOKER, RUN_VIEWER, TOKEN_CREATOR, member_for
    from localcloud.ports import free_port
    from localcloud.pubsub import PubSubEmulator, emulator_answers
    from localcloud.recording import RecordedRequest, token_fingerprint
    from localcloud.services import LocalService

_EXPORTS = {
    "COMPONENTS": "cloud",
    "LocalCloud": "cloud",
    "LocalService": "services",
    "PubSubEmulator": "pubsub",
    "RUN_INVOKER": "iam",
    "RUN_VIEWER": "iam",
    "RecordedRequest": "recording",
    "TOKEN_CREATOR": "iam",
    "emulator_answers": "pubsub",
    "free_port": "ports",
    "member_for": "iam",
    "score_account": "functions",
    "token_fingerprint": "recording",
}
__all__ = [
    "COMPONENTS",
    "RUN_INVOKER",
    "RUN_VIEWER",
    "TOKEN_CREATOR",
    "LocalCloud",
    "LocalService",
    "PubSubEmulator",
    "RecordedRequest",
    "emulator_answers",
    "free_port",
    "member_for",
    "score_account",
    "token_fingerprint",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
