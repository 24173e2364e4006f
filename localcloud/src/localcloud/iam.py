"""The local IAM table: (member, role, resource) bindings, with project-level inheritance.

Resources are written as "projects/P", "serviceAccount:EMAIL", "run.service:NAME" and
"run.job:NAME"; a role granted on the project applies to every resource in it, as in
Google Cloud. The jobs API asks for permissions (`has_permission`), which hold through
the predefined roles that contain them (`ROLE_PERMISSIONS`).
"""

from __future__ import annotations

import threading

RUN_INVOKER = "roles/run.invoker"
RUN_VIEWER = "roles/run.viewer"
TOKEN_CREATOR = "roles/iam.serviceAccountTokenCreator"


def member_for(email: str) -> str:
    """The IAM member string for a principal email."""
    kind = "serviceAccount" if email.endswith(".gserviceaccount.com") else "user"
    return f"{kind}:{email}"


class IamPolicy:
    """Thread-safe bindings; grant and revoke from any thread, checks from the servers."""

    def __init__(self, project: str) -> None:
        self.project_resource = f"projects/{project}"
        self._lock = threading.Lock()
        self._bindings: set[tuple[str, str, str]] = set()

    def grant(self, member: str, role: str, resource: str) -> None:
        with self._lock:
            self._bindings.add((member, role, resource))

    def revoke(self, member: str, role: str, resource: str) -> None:
        with self._lock:
            self._bindings.discard((member, role, resource))

    def allowed(self, member: str, role: str, resource: str) -> bool:
        with self._lock:
            return (member, role, resource) in self._bindings or (
                member,
                role,
                self.project_resource,
            ) in self._bindings

    def bindings(self) -> list[tuple[str, str, str]]:
        """All (member, role, resource) bindings, sorted, for `worker doctor`-style reports."""
        with self._lock:
            return sorted(self._bindings)


# The permissions of the predefined roles that matter here (IAM's role reference).
ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "roles/run.viewer": frozenset(
        {"run.jobs.get", "run.executions.get", "run.executions.list", "run.operations.get"}
    ),
    "roles/run.invoker": frozenset({"run.jobs.run", "run.routes.invoke"}),
    "roles/run.jobsExecutor": frozenset({"run.jobs.run", "run.executions.cancel"}),
    "roles/run.jobsExecutorWithOverrides": frozenset(
        {"run.jobs.run", "run.jobs.runWithOverrides", "run.executions.cancel"}
    ),
}
ROLE_PERMISSIONS["roles/run.developer"] = frozenset().union(*ROLE_PERMISSIONS.values())
ROLE_PERMISSIONS["roles/run.admin"] = ROLE_PERMISSIONS["roles/run.developer"]

# Cloud Tasks (localcloud/tasks.py): queues are "cloudtasks.queue:ID", service accounts
# "serviceAccount:EMAIL" (a task naming an account needs actAs on it).
_TASKS_READ = frozenset(
    {"cloudtasks.queues.get", "cloudtasks.queues.list", "cloudtasks.tasks.get", "cloudtasks.tasks.list"}
)
ROLE_PERMISSIONS.update(
    {
        "roles/cloudtasks.enqueuer": frozenset({"cloudtasks.tasks.create"}),
        "roles/cloudtasks.viewer": _TASKS_READ,
        "roles/cloudtasks.taskDeleter": frozenset({"cloudtasks.tasks.delete"}),
        "roles/cloudtasks.queueAdmin": _TASKS_READ | {"cloudtasks.queues.create", "cloudtasks.queues.update"},
        "roles/cloudtasks.admin": _TASKS_READ
        | {"cloudtasks.queues.create", "cloudtasks.queues.update"}
        | {"cloudtasks.tasks.create", "cloudtasks.tasks.delete"},
        "roles/iam.serviceAccountUser": frozenset({"iam.serviceAccounts.actAs"}),
    }
)


def has_permission(iam: IamPolicy, member: str, permission: str, resource: str) -> bool:
    return any(
        permission in permissions and iam.allowed(member, role, resource)
        for role, permissions in ROLE_PERMISSIONS.items()
    )
