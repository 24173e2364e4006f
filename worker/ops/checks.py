"""What `worker doctor` reports: one check per step of the chain, grouped per target.

A module of its own so the per-target checks (doctor.py for services, jobcheck.py for
Cloud Run jobs) share the shapes without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Check:
    """One step of the chain: `ok`, what was found, why it broke, how to fix it."""

    step: str
    ok: bool
    summary: str
    why: list[str] = field(default_factory=list)
    fix: list[str] = field(default_factory=list)


@dataclass
class ServiceReport:
    service: str
    region: str
    checks: list[Check] = field(default_factory=list)
    what: str = "service"  # or "Cloud Run job" (worker/ops/jobcheck.py)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)
