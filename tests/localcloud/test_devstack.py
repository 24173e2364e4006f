"""`worker dev`'s printer of results, fed from several subscriber threads at once."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from localcloud.devstack import DEV_RUN_JOB, ResultPrinter, add_dev_services, write_dev_catalog

from tests.doubles import result
from worker.core.catalog import Catalog, default_catalog_dir

TOTAL = 200


class Message:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.acked = False

    def ack(self) -> None:
        self.acked = True


def test_a_batchs_progress_never_prints_backwards(monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []

    def slow_echo(text: str, **_: Any) -> None:
        time.sleep(random.uniform(0, 0.002))  # a terminal write, long enough for threads to interleave
        lines.append(text)

    monkeypatch.setattr("click.echo", slow_echo)
    printer = ResultPrinter()
    children = [
        Message(result(f"b:{i}", batch={"id": "b", "index": i, "total": TOTAL}).to_bytes())
        for i in range(TOTAL)
    ]
    threads = [
        threading.Thread(target=lambda part=children[n::8]: [printer.show(m) for m in part]) for n in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    shown = [json.loads(line[line.index("{") :]) for line in lines]
    finished = [TOTAL - progress["outstanding"] for progress in shown]
    assert finished == sorted(finished) and finished[-1] == TOTAL
    assert shown[-1]["done"] and not any(p["done"] for p in shown[:-1])
    assert all(m.acked for m in children)


def test_a_result_without_id_or_kind_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    monkeypatch.setattr("click.echo", lambda text, **_: lines.append(text))
    rejected = result(
        None, "rejected", kind=None, response=None, error={"code": "invalid_json", "message": "x"}
    )
    ResultPrinter().show(Message(rejected.to_bytes()))
    assert "  (no job id)  (no kind)  " in lines[0] and "None" not in lines[0]


class Cloud:
    """The part of LocalCloud that add_dev_services uses."""

    def __init__(self) -> None:
        self.services: dict[str, Any] = {}

    def add_service(self, name: str, function: str) -> Any:
        service = self.services[name] = type("Service", (), {"function": function, "total_accounts": 1000})()
        return service


@pytest.mark.parametrize(("fire_batch", "accounts"), [(0, 25), (7, 7)])
def test_the_dev_accounts_source_has_accounts_without_fire_batch(fire_batch: int, accounts: int) -> None:
    cloud = Cloud()
    add_dev_services(cloud, fire_batch)
    assert set(cloud.services) == {"account-scoring", "echo", "accounts-source"}
    assert cloud.services["accounts-source"].total_accounts == accounts


def test_the_dev_catalog_adds_a_run_job_kind_to_the_shipped_ones(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "gone.toml").write_text("a kind of an earlier run, removed since")
    write_dev_catalog(tmp_path / "jobs", default_catalog_dir())
    catalog = Catalog.load(tmp_path / "jobs")
    shipped = {path.stem for path in default_catalog_dir().glob("*.toml")}
    assert set(catalog) == shipped | {DEV_RUN_JOB}
    assert catalog.run_jobs("us-central1") == {(DEV_RUN_JOB, "us-central1")}
