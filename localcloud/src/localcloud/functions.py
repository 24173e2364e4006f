"""The functions local Cloud Run services run: `echo`, `account-scoring`, `accounts-source`.

A function takes `(payload, info)` and returns `(http_status, json_body)`. `payload`
is the request body parsed as JSON (None when it is not JSON); `info` describes the
request: method, path, query, headers (without credentials), body (text), email
(the verified caller), service (its name) and total_accounts (the service's knob).
Tests may register their own callables of the same shape (sync or async).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Awaitable, Callable
from typing import Any

FunctionResult = tuple[int, Any]
Function = Callable[[Any, dict[str, Any]], FunctionResult | Awaitable[FunctionResult]]

MODEL = "local-v1"
DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 1000
INDUSTRY_POINTS = {
    "software": 20,
    "finance": 18,
    "healthcare": 15,
    "manufacturing": 12,
    "retail": 10,
}
REGION_POINTS = {"na": 10, "emea": 8, "apac": 7, "latam": 5}
_FEATURES = ("employees", "annual_revenue", "industry", "region")


def _error(message: str) -> FunctionResult:
    return 400, {"error": {"code": "invalid_argument", "message": message}}


def score_account(account: dict[str, Any]) -> int:
    """The deterministic score (0..100) `account-scoring` answers for `account`.

    With none of employees, annual_revenue, industry, region present:
    int(sha256(account_id).hexdigest()[:8], 16) % 101.
    Otherwise 10, plus (each missing field adds 0):
      employees       min(30, floor(6 * log10(1 + employees)))
      annual_revenue  min(30, floor(4 * log10(1 + annual_revenue)))
      industry        INDUSTRY_POINTS[industry.lower()], 5 for any other industry
      region          REGION_POINTS[region.lower()], 3 for any other region
    capped at 100. Raises ValueError on an account the function answers 400 to.
    """
    account_id = account.get("account_id")
    if not isinstance(account_id, str) or not account_id:
        raise ValueError("account_id must be a non-empty string")
    if not any(account.get(name) is not None for name in _FEATURES):
        return int(hashlib.sha256(account_id.encode()).hexdigest()[:8], 16) % 101
    score = 10
    employees = account.get("employees")
    if employees is not None:
        if isinstance(employees, bool) or not isinstance(employees, int) or employees < 0:
            raise ValueError("employees must be a non-negative integer")
        score += min(30, math.floor(6 * math.log10(1 + employees)))
    revenue = account.get("annual_revenue")
    if revenue is not None:
        if isinstance(revenue, bool) or not isinstance(revenue, int | float) or not revenue >= 0:
            raise ValueError("annual_revenue must be a non-negative number")
        score += min(30, math.floor(4 * math.log10(1 + revenue)))
    for name, points, default in (
        ("industry", INDUSTRY_POINTS, 5),
        ("region", REGION_POINTS, 3),
    ):
        value = account.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string")
            score += points.get(value.lower(), default)
    return min(100, score)


def echo(payload: Any, info: dict[str, Any]) -> FunctionResult:
    body: dict[str, Any] = {
        "method": info["method"],
        "path": info["path"],
        "headers": info["headers"],
    }
    if payload is not None:
        body["json"] = payload
    else:
        body["body"] = info["body"]
    return 200, body


def account_scoring(payload: Any, info: dict[str, Any]) -> FunctionResult:
    if not isinstance(payload, dict):
        return _error("the body must be a JSON object with a string account_id")
    try:
        score = score_account(payload)
    except ValueError as exc:
        return _error(str(exc))
    return 200, {"account_id": payload["account_id"], "score": score, "model": MODEL}


def accounts_source(payload: Any, info: dict[str, Any]) -> FunctionResult:
    """Pages over `total_accounts` ids "acct-000000"...; the page token is the next offset,
    and every page says the total (`total_size`), so the worker pages it once."""
    if not isinstance(payload, dict):
        return _error("the body must be a JSON object")
    token = payload.get("page_token")
    size = payload.get("page_size", DEFAULT_PAGE_SIZE)
    if token is not None and (not isinstance(token, str) or not token.isdigit()):
        return _error("page_token must be null or a token from a previous page")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_PAGE_SIZE:
        return _error(f"page_size must be an integer in 1..{MAX_PAGE_SIZE}")
    total = int(info["total_accounts"])
    start = int(token) if token is not None else 0
    end = min(total, start + size)
    return 200, {
        "account_ids": [f"acct-{i:06d}" for i in range(start, end)],
        "next_page_token": str(end) if end < total else None,
        "total_size": total,
    }


BUILTIN: dict[str, Function] = {
    "echo": echo,
    "account-scoring": account_scoring,
    "accounts-source": accounts_source,
}
