"""worker.client is the web app's one import: its face is exact, and the reference web
app needs nothing behind it (as httpx's test_exported_members does)."""

from __future__ import annotations

import ast
from pathlib import Path

import worker.client

REPO = Path(__file__).resolve().parents[2]

EXPECTED = {
    "GOOGLE_CERTS_URL",
    "BatchProgress",
    "BatchRef",
    "ConfigError",
    "ErrorInfo",
    "ExecutionInfo",
    "InvalidJobError",
    "JobError",
    "JobStatus",
    "MemoryResultStore",
    "PushHandler",
    "PushRefused",
    "PushResponse",
    "PushVerifier",
    "Result",
    "ResultStore",
    "ResultWaiter",
    "ResultsReader",
    "SeenResults",
    "Settings",
    "build_job",
    "enqueue",
    "flask_view",
    "load_settings",
    "new_job_id",
    "starlette_endpoint",
    "supersedes",
}


def test_the_client_exports_exactly_its_face() -> None:
    assert set(worker.client.__all__) == EXPECTED
    for name in worker.client.__all__:
        assert getattr(worker.client, name) is not None, name


def test_the_face_holds_no_logic() -> None:
    tree = ast.parse((REPO / "worker" / "client" / "__init__.py").read_text())
    assert not [node for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)]
    assert len((REPO / "worker" / "client" / "__init__.py").read_text().splitlines()) <= 60


def test_the_reference_web_app_imports_only_the_client_face() -> None:
    for path in (REPO / "examples" / "webapp").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("worker"):
                assert node.module == "worker.client", f"{path.name} imports {node.module}"
