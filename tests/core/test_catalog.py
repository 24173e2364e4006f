"""The catalog decides where calls go: a kind's path must stay on the resolved host."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.core.catalog import Catalog, default_catalog_dir
from worker.core.errors import ConfigError


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "path",
    [
        "/../admin",
        "/a/../../etc",
        "..",
        "//evil.example/steal",
        "@evil.example",
        "/@evil.example",
        "https://evil.example/",
        "http://127.0.0.1:1/",
        "evil.example/x",
        "/ok\r\nX-Injected: 1",
        "/ok\nHost: evil.example",
        "/a path",
        "/tab\there",
        "/back\\slash",
        "/frag#x",
        "",
        # encodings and queries the service would decode into another path (issue 24)
        "/%2e%2e/admin",
        "/%2E%2E/admin",
        "/a%2fb",
        "/a%5c..",
        "/score?admin=1",
        "/a/./b",
        "/nul\x00",
    ],
)
def test_a_path_that_could_leave_the_service_is_refused_naming_file_and_field(
    tmp_path: Path, path: str
) -> None:
    # TOML basic strings need escapes for control characters and backslashes.
    escaped = (
        path.replace("\\", "\\\\")
        .replace("\r", "\\r")
        .replace("\n", "\\n")
        .replace("\t", "\\t")
        .replace("\x00", "\\u0000")
    )
    file = write(tmp_path, "bad", f'kind = "bad"\nservice = "svc"\npath = "{escaped}"\n')
    with pytest.raises(ConfigError) as err:
        Catalog.load(tmp_path)
    message = str(err.value)
    assert str(file) in message and "'path'" in message, message


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ('url = "https://evil.example"', "url"),
        ('host = "evil.example"', "host"),
        ('[headers]\nHost = "evil.example"', "headers"),
    ],
)
def test_unknown_fields_are_refused(tmp_path: Path, extra: str, field: str) -> None:
    file = write(tmp_path, "k", f'kind = "k"\nservice = "svc"\n{extra}\n')
    with pytest.raises(ConfigError) as err:
        Catalog.load(tmp_path)
    assert str(file) in str(err.value) and repr(field) in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('kind = "k"\nservice = "Evil.Example"\n', "service"),
        ('kind = "k"\nservice = "svc/../x"\n', "service"),
        ('kind = "K K"\nservice = "svc"\n', "kind"),
        ('kind = "k"\n', "(file)"),
        ('kind = "k"\nservice = "svc"\nretry_on = [403]\n', "retry_on"),
    ],
)
def test_other_bad_fields_are_named(tmp_path: Path, text: str, field: str) -> None:
    file = write(tmp_path, "k", text)
    with pytest.raises(ConfigError) as err:
        Catalog.load(tmp_path)
    assert str(file) in str(err.value) and repr(field) in str(err.value), str(err.value)


def test_a_valid_catalog_loads(tmp_path: Path) -> None:
    write(tmp_path, "score", 'kind = "score"\nservice = "scoring"\npath = "/v1/score:run"\nmethod = "PUT"\n')
    write(tmp_path, "echo", 'kind = "echo"\nservice = "echo"\n')
    catalog = Catalog.load(tmp_path)
    assert sorted(catalog) == ["echo", "score"]
    assert catalog["score"].path == "/v1/score:run" and catalog["echo"].path == "/"
    assert catalog.services("us-central1") == {("scoring", "us-central1"), ("echo", "us-central1")}


def test_the_shipped_catalog_loads() -> None:
    catalog = Catalog.load(default_catalog_dir())
    assert {"account-scoring", "echo"} <= set(catalog)
    for kind in catalog.values():
        assert kind.path.startswith("/") and not kind.path.startswith("//")


# -- no secret leaves (issue 24): a schema error names the path and the rule, not the value.


@pytest.mark.parametrize(
    ("schema", "payload", "names"),
    [
        (
            {"type": "object", "properties": {"n": {"type": "integer"}}},
            {"n": "password=hunter2"},
            "n: breaks the rule type",
        ),
        ({"type": "object", "properties": {"n": {"maxLength": 3}}}, {"n": "hunter2-secret"}, "maxLength 3"),
        ({"type": "object", "properties": {"n": {"pattern": "^[a-z]+$"}}}, {"n": "HUNTER2"}, "pattern"),
        ({"type": "object", "properties": {"n": {"enum": ["a", "b"]}}}, {"n": "hunter2"}, 'enum ["a", "b"]'),
        ({"type": "object", "additionalProperties": False}, {"hunter2": 1}, "not in the schema"),
        ({"type": "object", "required": ["account_id"]}, {"x": "hunter2"}, "'account_id' is a required"),
        ({"type": "integer"}, "api_key=hunter2", "payload: breaks the rule type"),
    ],
)
def test_a_schema_error_never_quotes_the_payload(schema: dict, payload: object, names: str) -> None:
    from worker.core.catalog import JobKind
    from worker.core.errors import InvalidJobError

    kind = JobKind(kind="k", service="svc", payload_schema=schema)
    with pytest.raises(InvalidJobError) as caught:
        kind.check_payload(payload)
    assert "hunter2" not in caught.value.message.lower() and names in caught.value.message
