"""The one builder of every gcloud command the worker prints.

Fix hints in error messages (identity, resolver, invoker), `worker doctor`'s fixes
and `worker setup --print-gcloud`'s script are all built here, so every printed
command is quoted for a POSIX shell the same way and can be pasted as it is.

    gcloud("run", "services", "list", project="p", region="europe-west1")
    -> "gcloud run services list --project=p --region=europe-west1"
"""

from __future__ import annotations

import re
import shlex

# A value naming a shell variable, such as serviceAccount:service-${PROJECT_NUMBER}@...:
# double-quoted so the shell expands it (shlex would quote it literally).
_EXPANDS = re.compile(r"^[\w@%+=:,./-]*\$\{[A-Z_][A-Z0-9_]*\}[\w@%+=:,./-]*$")


def quote(value: str) -> str:
    if _EXPANDS.match(value):
        return f'"{value}"'
    return shlex.quote(value)


def gcloud(*words: str, **flags: str | int | None) -> str:
    """`gcloud WORDS --flag=VALUE ...`: flags in the order given, `_` in a name written
    as `-`, None left out; every word and value quoted for the shell."""
    parts = ["gcloud", *(quote(word) for word in words)]
    parts += [
        f"--{name.replace('_', '-')}={quote(str(value))}"
        for name, value in flags.items()
        if value is not None
    ]
    return " ".join(parts)


def grant(member: str, role: str, resource: str) -> str:
    """The gcloud command that gives `member` `role` on `resource`, a full resource name:
    projects/P, projects/P/topics/T, projects/P/subscriptions/S,
    projects/P/locations/R/services/S, projects/P/locations/R/jobs/J,
    projects/P/locations/R/queues/Q or projects/P/serviceAccounts/EMAIL."""
    parts = resource.split("/")
    project = parts[1]
    if len(parts) == 2:
        # --condition=None: keeps gcloud from prompting when the policy has conditions.
        return gcloud(
            "projects", "add-iam-policy-binding", project, member=member, role=role, condition="None"
        )
    if parts[2] == "topics":
        return gcloud(
            "pubsub", "topics", "add-iam-policy-binding", parts[3], project=project, member=member, role=role
        )
    if parts[2] == "subscriptions":
        return gcloud(
            "pubsub",
            "subscriptions",
            "add-iam-policy-binding",
            parts[3],
            project=project,
            member=member,
            role=role,
        )
    if parts[2] == "locations" and parts[4] == "jobs":
        return gcloud(
            "run",
            "jobs",
            "add-iam-policy-binding",
            parts[5],
            region=parts[3],
            project=project,
            member=member,
            role=role,
        )
    if parts[2] == "locations" and parts[4] == "services":
        return gcloud(
            "run",
            "services",
            "add-iam-policy-binding",
            parts[5],
            region=parts[3],
            project=project,
            member=member,
            role=role,
        )
    if parts[2] == "locations" and parts[4] == "queues":
        return gcloud(
            "tasks",
            "queues",
            "add-iam-policy-binding",
            parts[5],
            location=parts[3],
            project=project,
            member=member,
            role=role,
        )
    if parts[2] == "serviceAccounts":
        return gcloud(
            "iam",
            "service-accounts",
            "add-iam-policy-binding",
            parts[3],
            project=project,
            member=member,
            role=role,
        )
    raise ValueError(f"no gcloud command for a binding on {resource!r}")
