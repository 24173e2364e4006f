"""The control channel's messages, and the pause/resume/status verbs' argument handling."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from worker.cli import cli
from worker.cli.control import parse_duration
from worker.core.pauses import PauseBook, PauseEntry
from worker.gcp.control import ControlChannel, encode


class Future:
    def add_done_callback(self, callback: Any) -> None:
        return None


class Publisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], dict[str, str]]] = []

    def publish(self, topic: str, data: bytes, **attrs: str) -> Future:
        self.sent.append((topic, json.loads(data), attrs))
        return Future()


def channel(replica: str = "me") -> tuple[ControlChannel, Publisher]:
    publisher = Publisher()
    ch = ControlChannel(
        publisher,
        None,
        project="p",
        topic="worker-control",
        pauses=PauseBook(),
        status=lambda: {"paused": {}, "targets": {}},
        replica=replica,
    )
    return ch, publisher


def test_orders_change_the_pause_book() -> None:
    ch, _ = channel()
    ch.handle(encode("pause", entry=PauseEntry("score", True, at=1.0).to_json()))
    assert ch.pauses.is_paused("score")
    ch.handle(encode("resume", entry=PauseEntry("score", False, at=2.0).to_json()))
    assert not ch.pauses.is_paused("score")


def test_a_new_instance_learns_what_the_others_know() -> None:
    old, old_out = channel("old")
    old.handle(encode("pause", entry=PauseEntry("score", True, at=1.0).to_json()))
    old.handle(encode("hello", replica="new"))
    topic, state, attrs = old_out.sent[-1]
    assert topic == "projects/p/topics/worker-control" and attrs == {"op": "state"}
    new, _ = channel("new")
    new.handle(json.dumps(state).encode())
    assert new.pauses.is_paused("score")
    old.handle(encode("hello", replica="old"))
    assert len(old_out.sent) == 1, "no answer to its own hello"


def test_status_requests_are_answered_with_the_request_id() -> None:
    ch, out = channel()
    ch.handle(encode("status", request_id="abc"))
    _, reply, attrs = out.sent[-1]
    assert attrs == {"op": "status-reply"}
    assert reply == {
        "op": "status-reply",
        "request_id": "abc",
        "replica": "me",
        "status": {"paused": {}, "targets": {}},
    }


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b'{"op": 1}',
        encode("pause", entry={"kind": 1}),
        encode("state", replica="x", entries=[{"kind": "k"}]),
    ],
)
def test_bad_control_messages_are_ignored(data: bytes) -> None:
    ch, out = channel()
    ch.handle(data)
    assert ch.pauses.paused() == {} and out.sent == []


def test_durations() -> None:
    assert [parse_duration(t) for t in ("90", "90s", "15m", "2h", "1d", "0.5h")] == [
        90,
        90,
        900,
        7200,
        86400,
        1800,
    ]
    for bad in ("", "soon", "-5m", "0s", "5w"):
        with pytest.raises(ValueError):
            parse_duration(bad)


@pytest.fixture()
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test-project")
    (tmp_path / "score.toml").write_text('kind = "score"\nservice = "scoring"\n')
    (tmp_path / "echo.toml").write_text('kind = "echo"\nservice = "echo"\n')
    monkeypatch.setenv("WORKER_CATALOG_DIR", str(tmp_path))
    return CliRunner()


def test_pausing_an_unknown_kind_exits_2_naming_the_known_kinds(runner: CliRunner) -> None:
    for verb in ("pause", "resume"):
        done = runner.invoke(cli, [verb, "scoer"])
        assert done.exit_code == 2, done.output
        assert "unknown kind 'scoer'; known kinds: echo, score" in done.output


def test_a_bad_duration_exits_2(runner: CliRunner) -> None:
    done = runner.invoke(cli, ["pause", "score", "--for", "a while"])
    assert done.exit_code == 2
    assert "--for: 'a while' is not a duration such as 90s" in done.output


class Stream(concurrent.futures.Future):  # type: ignore[type-arg]
    """A streaming pull future: fails when the test says so, cancelled at close."""


class Subscriber:
    """The calls ControlChannel makes of a SubscriberClient; each subscribe is a new Stream."""

    def __init__(self) -> None:
        self.streams: list[Stream] = []
        self.created: list[str] = []
        self.deleted: list[str] = []

    @staticmethod
    def subscription_path(project: str, name: str) -> str:
        return f"projects/{project}/subscriptions/{name}"

    def create_subscription(self, request: dict[str, Any]) -> None:
        self.created.append(request["name"])

    def subscribe(self, subscription: str, callback: Any) -> Stream:
        self.streams.append(Stream())
        return self.streams[-1]

    def delete_subscription(self, subscription: str, **_: Any) -> None:
        self.deleted.append(subscription)


def test_the_channel_says_down_with_the_reason_when_its_stream_dies_and_reconnects() -> None:
    from google.api_core import exceptions

    from worker.core.backoff import Backoff

    subscriber, publisher = Subscriber(), Publisher()
    ch = ControlChannel(
        publisher,
        subscriber,
        project="p",
        topic="worker-control",
        pauses=PauseBook(),
        status=lambda: {},
        replica="me",
        reconnect=Backoff(0.02, 0.05),
    )

    async def scenario() -> None:
        await ch.start()
        assert ch.state == "listening" and len(subscriber.created) == 1
        # The subscription was deleted under the worker: the stream ends with NotFound.
        subscriber.streams[0].set_exception(exceptions.NotFound("Resource not found (resource=sub)."))
        await until(lambda: ch.state == "down")
        assert ch.down_reason is not None and "NotFound" in ch.down_reason
        assert not ch.listening
        # After the backoff: the subscription made again, a new stream, hello again.
        await until(lambda: ch.state == "listening")
        assert len(subscriber.streams) == 2 and len(subscriber.created) == 2
        assert ch.reconnects == 1 and ch.down_reason is None
        assert [sent[2]["op"] for sent in publisher.sent] == ["hello", "hello"]
        await ch.close()
        assert ch.state == "off" and subscriber.streams[1].cancelled()

    asyncio.run(scenario())


async def until(condition: Any, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)
