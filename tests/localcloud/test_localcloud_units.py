"""Unit tests of the local cloud's pure parts: functions, IAM table, emulator prerequisites."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from localcloud.functions import account_scoring, accounts_source
from localcloud.iam import RUN_INVOKER, IamPolicy
from localcloud.pubsub import group_members
from localcloud.services import LocalService

from localcloud import PubSubEmulator, member_for, score_account


def test_score_account_formula() -> None:
    account = {"account_id": "a", "employees": 250, "industry": "Software", "region": "emea"}
    # 10 + floor(6 * log10(251)) = 14, + software 20, + emea 8
    assert score_account(account) == 52
    assert score_account({"account_id": "a", "annual_revenue": 1_000_000}) == 10 + 24
    assert score_account({"account_id": "a", "industry": "mining", "region": "mars"}) == 10 + 5 + 3
    top = {
        "account_id": "a",
        "employees": 10**9,
        "annual_revenue": 1e12,
        "industry": "software",
        "region": "na",
    }
    assert score_account(top) == 100


def test_score_account_without_features_hashes_the_id() -> None:
    expected = int(hashlib.sha256(b"acct-7").hexdigest()[:8], 16) % 101
    assert score_account({"account_id": "acct-7"}) == expected
    assert score_account({"account_id": "acct-7", "employees": None}) == expected


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"account_id": 7},
        {"account_id": ""},
        {"account_id": "a", "employees": True},
        {"account_id": "a", "employees": -1},
        {"account_id": "a", "annual_revenue": "1"},
        {"account_id": "a", "industry": 3},
    ],
)
def test_account_scoring_rejects_bad_accounts(bad: dict) -> None:
    with pytest.raises(ValueError):
        score_account(bad)
    assert account_scoring(bad, {})[0] == 400


def test_account_scoring_needs_a_json_object() -> None:
    assert account_scoring(["a"], {})[0] == 400
    assert account_scoring({"account_id": "x"}, {}) == (
        200,
        {"account_id": "x", "score": score_account({"account_id": "x"}), "model": "local-v1"},
    )


def test_accounts_source_pages() -> None:
    info = {"total_accounts": 3}
    assert accounts_source({}, info) == (
        200,
        {
            "account_ids": ["acct-000000", "acct-000001", "acct-000002"],
            "next_page_token": None,
            "total_size": 3,
        },
    )
    assert accounts_source({"page_size": 2, "page_token": "2"}, info)[1] == {
        "account_ids": ["acct-000002"],
        "next_page_token": None,
        "total_size": 3,
    }
    assert accounts_source({"page_token": "nope"}, info)[0] == 400
    assert accounts_source({"page_size": 0}, info)[0] == 400
    assert accounts_source(None, info)[0] == 400


def test_iam_project_grants_apply_to_every_resource() -> None:
    iam = IamPolicy("p")
    member = member_for("w@p.iam.gserviceaccount.com")
    assert member == "serviceAccount:w@p.iam.gserviceaccount.com"
    assert member_for("dev@example.com") == "user:dev@example.com"
    assert not iam.allowed(member, RUN_INVOKER, "run.service:s")
    iam.grant(member, RUN_INVOKER, "projects/p")
    assert iam.allowed(member, RUN_INVOKER, "run.service:s")
    iam.revoke(member, RUN_INVOKER, "projects/p")
    iam.grant(member, RUN_INVOKER, "run.service:s")
    assert iam.allowed(member, RUN_INVOKER, "run.service:s")
    assert not iam.allowed(member, RUN_INVOKER, "run.service:other")


def test_unknown_builtin_function_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown function"):
        LocalService("s", "no-such-function", "us-central1", 1)


def test_emulator_without_gcloud_names_the_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    emulator = PubSubEmulator()
    with pytest.raises(RuntimeError) as failure:
        emulator.start()
    message = str(failure.value)
    assert "google-cloud-cli-pubsub-emulator" in message
    assert "openjdk-17-jre-headless" in message
    assert str(emulator.log_path) in message
    assert "gcloud is not on PATH" in emulator.log_path.read_text()
    shutil.rmtree(emulator.log_path.parent)
    assert emulator.pgid is None


def test_group_members_of_a_missing_group_is_empty() -> None:
    assert group_members(2**22 + 12345) == []
