"""The control channel's messages, and the pause/resume/status verbs' argument handling."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
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


def channel(replica: str = "me", kinds: Any = None) -> tuple[ControlChannel, Publisher]:
    publisher = Publisher()
    ch = ControlChannel(
        publisher,
        None,
        project="p",
        topic="worker-control",
        pauses=PauseBook(),
        status=lambda: {"paused": {}, "targets": {}},
        replica=replica,
        kinds=kinds,
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
    done = runner.invoke(cli, ["pause", "score", "--for", "31d"])
    assert done.exit_code == 2 and "'31d' is over 30 days" in done.output


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


# -- hostile orders (issue 24): anyone who may publish on the control topic can send these.


def order(op: str, **entry: Any) -> bytes:
    return json.dumps({"op": op, "entry": {"paused": op == "pause", **entry}}).encode()


@pytest.mark.parametrize("at", [1e300, 2**63, "Infinity", 10**400])
def test_an_order_dated_in_the_far_future_does_not_lock_resume_out(at: Any) -> None:
    ch, _ = channel(kinds={"score"})
    finite = at != "Infinity" and at < 10**309
    ch.handle(order("pause", kind="score", at=float(at) if at == "Infinity" else at), published=1000.0)
    # dated by Pub/Sub's publish_time, not the sender's clock; a non-finite date is refused
    assert ch.pauses.is_paused("score") is finite
    ch.handle(order("resume", kind="score", at=1.0), published=1001.0)
    assert not ch.pauses.is_paused("score")
    assert all(e.at <= 1001.0 for e in ch.pauses.entries())


def test_an_operator_with_a_fast_clock_cannot_outrank_a_later_resume() -> None:
    ch, _ = channel()
    ch.handle(order("pause", kind="score", at=time.time() + 86400, until=time.time() + 86400 + 60))
    entry = ch.pauses.entries()[0]
    assert entry.at <= time.time() and entry.until is not None and entry.until - entry.at == pytest.approx(60)
    ch.handle(order("resume", kind="score", at=time.time() - 3600))
    assert not ch.pauses.is_paused("score")


@pytest.mark.parametrize(
    "entry",
    [
        {"until": 1e300},  # far future
        {"until": float("nan")},
        {"until": 1000.0 + 31 * 86400},  # over 30 days
        {"until": 999.0},  # before the order
        {"kind": "k" * 64},  # over the catalog's kind names
    ],
)
def test_a_pause_with_an_unbounded_until_is_refused(entry: dict[str, Any]) -> None:
    ch, _ = channel()
    ch.handle(order("pause", **{"kind": "score", "at": 1000.0, **entry}), published=1000.0)
    assert ch.pauses.paused() == {}


def test_forged_state_messages_grow_nothing_and_the_answer_stays_small() -> None:
    ch, out = channel("victim", kinds={"score", "echo"})
    now = time.time()
    for n in range(40):
        entries = [
            {"kind": f"kind-{n}-{i}", "paused": True, "at": now, "by": "x" * 5000} for i in range(2000)
        ]
        entries += [{"kind": "score", "paused": True, "at": 1e300}]  # dated after its message
        data = json.dumps({"op": "state", "replica": "forger", "entries": entries}).encode()
        ch.handle(data[: 256 * 1024] if len(data) > 256 * 1024 else data, published=now)
    few = [{"kind": f"kind-{i}", "paused": True, "at": now, "by": "x" * 5000} for i in range(200)]
    ch.handle(json.dumps({"op": "state", "replica": "forger", "entries": few}).encode(), published=now)
    assert ch.pauses.paused() == {}, "only catalog kinds, none dated past its message"
    ch.handle(order("pause", kind="echo", at=now, by="b" * 5000), published=now)
    ch.handle(encode("hello", replica="new"))
    _, state, _ = out.sent[-1]
    assert len(json.dumps(state)) < 1000 and [e["kind"] for e in state["entries"]] == ["echo"]


def test_too_many_entries_or_too_deep_a_message_is_ignored() -> None:
    ch, _ = channel()
    entries = [{"kind": f"k{i}", "paused": True, "at": 1.0} for i in range(257)]
    ch.handle(json.dumps({"op": "state", "replica": "x", "entries": entries}).encode(), published=2.0)
    ch.handle(b"[" * 100_000 + b"]" * 100_000)
    ch.handle(order("resume", kind="score", at=1.0, paused=True))  # op and entry disagree
    assert ch.pauses.paused() == {} and ch.pauses.entries() == []


def test_without_delete_permission_status_and_shutdown_leave_the_subscription_to_expire() -> None:
    # The least-privilege role holds no subscriptions.delete (docs/deploy.md, "Trust model").
    import asyncio

    from google.api_core import exceptions

    from worker.gcp.control import ask_status

    class Done:
        def result(self, timeout: float | None = None) -> None:
            return None

    class NoDelete:
        def __init__(self) -> None:
            self.deletes = 0

        def subscription_path(self, project: str, name: str) -> str:
            return f"projects/{project}/subscriptions/{name}"

        def create_subscription(self, request: Any) -> None:
            return None

        def pull(self, **kw: Any) -> Any:
            raise exceptions.DeadlineExceeded("nothing")

        def delete_subscription(self, **kw: Any) -> None:
            self.deletes += 1
            raise exceptions.PermissionDenied("pubsub.subscriptions.delete")

    class Pub:
        def publish(self, *a: Any, **kw: Any) -> Done:
            return Done()

    subscriber = NoDelete()
    assert ask_status(Pub(), subscriber, "p", "worker-control", wait_s=0.2) == []
    ch, _ = channel()
    ch._subscriber, ch._subscription = subscriber, "projects/p/subscriptions/worker-control-x"
    asyncio.run(ch.close())
    assert subscriber.deletes == 2
