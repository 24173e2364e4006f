"""`worker setup --print-gcloud`: the least-privilege bindings and the commands printed from them."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.e2e.harness import worker_cli
from worker.cli import cli
from worker.core.catalog import Catalog, JobKind
from worker.core.settings import Settings
from worker.ops.gcloud import gcloud_commands, gcloud_script
from worker.ops.iam import Binding, PushTarget, iam_bindings, push_target
from worker.ops.provision import SetupOptions

WORKER = "worker@acme.iam.gserviceaccount.com"
WEBAPP = "webapp@acme.iam.gserviceaccount.com"


def settings() -> Settings:
    return Settings(project="acme", region="us-central1", catalog_dir=None)


def catalog() -> Catalog:
    return Catalog(
        {
            "account-scoring": JobKind(kind="account-scoring", service="account-scoring"),
            "echo": JobKind(kind="echo", service="echo", region="europe-west1"),
        }
    )


def roles_of(bindings: list[Binding], member: str) -> set[tuple[str, str]]:
    return {(b.role, b.resource) for b in bindings if b.member == member}


def test_each_principal_gets_only_what_it_uses() -> None:
    bindings = iam_bindings(settings(), catalog(), WORKER, WEBAPP, project_number="123")
    assert roles_of(bindings, f"serviceAccount:{WORKER}") == {
        ("roles/pubsub.subscriber", "projects/acme/subscriptions/jobs-worker"),
        ("roles/pubsub.viewer", "projects/acme/subscriptions/jobs-worker"),
        # The batch lane: pulled like the jobs subscription; its topic takes the batch
        # kinds' children and the jobs marked lane=batch that the worker moves there.
        ("roles/pubsub.subscriber", "projects/acme/subscriptions/jobs-batch-worker"),
        ("roles/pubsub.viewer", "projects/acme/subscriptions/jobs-batch-worker"),
        ("roles/pubsub.publisher", "projects/acme/topics/jobs-batch"),
        ("roles/pubsub.publisher", "projects/acme/topics/job-results"),
        ("roles/pubsub.publisher", "projects/acme/topics/jobs-dead-letter"),
        ("roles/run.viewer", "projects/acme/locations/us-central1/services/account-scoring"),
        ("roles/run.invoker", "projects/acme/locations/us-central1/services/account-scoring"),
        ("roles/run.viewer", "projects/acme/locations/europe-west1/services/echo"),
        ("roles/run.invoker", "projects/acme/locations/europe-west1/services/echo"),
        ("roles/pubsub.publisher", "projects/acme/topics/worker-control"),
        ("roles/pubsub.subscriber", "projects/acme/topics/worker-control"),
        ("projects/acme/roles/workerControlChannel", "projects/acme"),
        # Jobs at a time: create tasks on the queue, name itself as their OAuth account,
        # and (as that account, the default) publish the jobs back.
        ("roles/cloudtasks.enqueuer", "projects/acme/locations/us-central1/queues/jobs-delayed"),
        ("roles/iam.serviceAccountUser", f"projects/acme/serviceAccounts/{WORKER}"),
        ("roles/pubsub.publisher", "projects/acme/topics/jobs"),
    }
    # Nothing on the whole project but the control channel's custom role: Cloud Run roles
    # are granted per service, and creating a subscription is checked on the project.
    on_project = [b.role for b in bindings if b.resource == "projects/acme"]
    assert on_project == ["projects/acme/roles/workerControlChannel"]
    assert roles_of(bindings, "serviceAccount:service-123@gcp-sa-pubsub.iam.gserviceaccount.com") == {
        ("roles/pubsub.publisher", "projects/acme/topics/jobs-dead-letter"),
        ("roles/pubsub.subscriber", "projects/acme/subscriptions/jobs-worker"),
        ("roles/pubsub.subscriber", "projects/acme/subscriptions/jobs-batch-worker"),
    }
    assert roles_of(bindings, f"serviceAccount:{WEBAPP}") == {
        ("roles/pubsub.publisher", "projects/acme/topics/jobs"),
        ("roles/pubsub.publisher", "projects/acme/topics/jobs-batch"),
        ("roles/pubsub.subscriber", "projects/acme/subscriptions/job-results-webapp"),
    }
    assert all(b.why for b in bindings)


def test_google_telemetry_exporters_add_their_write_roles_on_the_project() -> None:
    plain = iam_bindings(settings(), catalog(), WORKER, WEBAPP, project_number="123")
    traced = iam_bindings(
        settings(), catalog(), WORKER, WEBAPP, project_number="123", telemetry=("gcp_trace", "prometheus")
    )
    both = iam_bindings(
        settings(), catalog(), WORKER, WEBAPP, project_number="123", telemetry=("gcp_trace", "gcp_monitoring")
    )
    added = lambda more: [(b.role, b.resource) for b in more if b not in plain]  # noqa: E731
    assert added(traced) == [("roles/cloudtrace.agent", "projects/acme")]
    assert added(both) == [
        ("roles/cloudtrace.agent", "projects/acme"),
        ("roles/monitoring.metricWriter", "projects/acme"),
    ]


def test_commands_create_resources_as_setup_does_then_bind() -> None:
    options = SetupOptions(max_delivery_attempts=7, min_backoff_s=5, max_backoff_s=300, ack_deadline_s=90)
    commands = gcloud_commands(settings(), catalog(), WORKER, WEBAPP, options, project_number="123")
    assert commands[0] == "gcloud pubsub topics create jobs --project=acme"
    assert (
        "gcloud pubsub subscriptions create jobs-worker --project=acme --topic=jobs --ack-deadline=90 "
        "--message-retention-duration=7d --dead-letter-topic=jobs-dead-letter --max-delivery-attempts=7 "
        "--min-retry-delay=5s --max-retry-delay=300s"
    ) in commands
    assert (
        "gcloud run services add-iam-policy-binding echo --region=europe-west1 --project=acme "
        f"--member=serviceAccount:{WORKER} --role=roles/run.invoker"
    ) in commands
    assert (
        "gcloud pubsub topics add-iam-policy-binding jobs-dead-letter --project=acme "
        "--member=serviceAccount:service-123@gcp-sa-pubsub.iam.gserviceaccount.com "
        "--role=roles/pubsub.publisher"
    ) in commands
    assert (
        "gcloud run services add-iam-policy-binding echo --region=europe-west1 --project=acme "
        f"--member=serviceAccount:{WORKER} --role=roles/run.viewer"
    ) in commands
    on_project = [c for c in commands if c.startswith("gcloud projects add-iam-policy-binding")]
    assert len(on_project) == 1 and "--role=projects/acme/roles/workerControlChannel" in on_project[0]
    bindings = iam_bindings(settings(), catalog(), WORKER, WEBAPP)
    assert len([c for c in commands if "add-iam-policy-binding" in c]) == len(bindings)


def test_project_number_is_looked_up_when_unknown_and_extensions_come_last() -> None:
    extra = "gcloud scheduler jobs create pubsub nightly-scoring --schedule='0 3 * * *'"
    commands = gcloud_commands(settings(), catalog(), WORKER, WEBAPP, extra_commands=[extra])
    assert commands[0].startswith('PROJECT_NUMBER="$(gcloud projects describe acme')
    assert '--member="serviceAccount:service-${PROJECT_NUMBER}@gcp-sa-pubsub.iam.gserviceaccount.com"' in (
        "\n".join(commands)
    )
    assert commands[-1] == extra


def test_printed_script_is_valid_shell_with_a_reason_per_binding(tmp_path: Path) -> None:
    script = gcloud_script(settings(), catalog(), WORKER, WEBAPP)
    path = tmp_path / "setup.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    assert f"# {WORKER} roles/run.invoker: call the service with an ID token minted for its URL" in script


def test_setup_print_gcloud_prints_without_touching_pubsub() -> None:
    env = {**os.environ, "GOOGLE_CLOUD_PROJECT": "acme", "PUBSUB_EMULATOR_HOST": "127.0.0.1:9"}
    done = worker_cli(env, "setup", "--print-gcloud", "--worker-sa", WORKER, "--max-delivery-attempts", "10")
    assert done.returncode == 0, done.stderr
    assert "--max-delivery-attempts=10" in done.stdout
    assert f"--member=serviceAccount:{WORKER} --role=roles/pubsub.subscriber" in done.stdout
    assert "--member=serviceAccount:webapp@acme.iam.gserviceaccount.com --role=roles/pubsub.publisher" in (
        done.stdout
    )
    assert "created" not in done.stdout


def test_operators_get_what_the_dead_letter_tools_and_doctor_need_and_no_more() -> None:
    base = iam_bindings(settings(), catalog(), WORKER, WEBAPP)
    with_ops = iam_bindings(
        settings(), catalog(), WORKER, WEBAPP, operators=["user:alice@acme.com", "group:ops@acme.com"]
    )
    assert with_ops[: len(base)] == base
    for member in ("user:alice@acme.com", "group:ops@acme.com"):
        assert roles_of(with_ops, member) == {
            ("roles/pubsub.subscriber", "projects/acme/subscriptions/jobs-dead-letter-ops"),
            ("roles/pubsub.publisher", "projects/acme/topics/jobs"),
            ("roles/pubsub.publisher", "projects/acme/topics/jobs-batch"),
            ("roles/pubsub.publisher", "projects/acme/topics/worker-control"),
            ("roles/pubsub.subscriber", "projects/acme/topics/worker-control"),
            ("projects/acme/roles/workerControlChannel", "projects/acme"),
            ("roles/cloudtasks.viewer", "projects/acme/locations/us-central1/queues/jobs-delayed"),
            ("roles/cloudtasks.taskDeleter", "projects/acme/locations/us-central1/queues/jobs-delayed"),
            ("roles/pubsub.publisher", "projects/acme/topics/job-results"),
        }
    assert len(with_ops) == len(base) + 2 * len(roles_of(with_ops, "user:alice@acme.com"))
    # acting as the worker reaches all it may do: only when asked for, by name
    trusted = iam_bindings(
        settings(),
        catalog(),
        WORKER,
        WEBAPP,
        operators=["user:alice@acme.com"],
        operators_can_impersonate=True,
    )
    assert roles_of(trusted, "user:alice@acme.com") - roles_of(with_ops, "user:alice@acme.com") == {
        ("roles/iam.serviceAccountTokenCreator", f"projects/acme/serviceAccounts/{WORKER}")
    }


def test_an_operator_must_be_written_as_an_iam_member() -> None:
    with pytest.raises(ValueError, match=r"user:alice@example\.com"):
        iam_bindings(settings(), catalog(), WORKER, WEBAPP, operators=["alice@acme.com"])


@pytest.mark.parametrize(
    "member",
    [
        "user:a@example.com\ngcloud projects add-iam-policy-binding acme --role=roles/owner",
        "user:a@example.com; rm -rf ~",
        "user:a@example.com #",
        "user:'a'@example.com",
        "user:",
        "user:a@b@c.com",
        "user:a@example.com\r",
        "user:-a@example.com",
    ],
)
def test_an_operator_that_would_add_a_line_or_a_word_to_the_script_is_refused(member: str) -> None:
    with pytest.raises(ValueError, match="is not an email address or domain"):
        iam_bindings(settings(), catalog(), WORKER, WEBAPP, operators=[member])
    env = {**os.environ, "GOOGLE_CLOUD_PROJECT": "acme", "PUBSUB_EMULATOR_HOST": "127.0.0.1:9"}
    done = worker_cli(env, "setup", "--print-gcloud", "--operator", member)
    assert done.returncode == 2 and not done.stdout


def test_no_project_wide_grant_but_the_ones_the_guide_justifies() -> None:
    """Every printed `gcloud projects add-iam-policy-binding`, with and without a run_job kind,
    operators and telemetry: the control channel's subscriptions (docs/deploy.md, "Trust model")
    and the two write-only telemetry roles. No project-level run.viewer, no Pub/Sub predefined role."""
    from worker.core.runjob import RunJobSpec

    with_job = Catalog(
        {
            **catalog(),
            "rescore": JobKind(kind="rescore", handler="run_job", run_job=RunJobSpec(job="rescore-all")),
        }
    )
    justified = {
        (f"serviceAccount:{WORKER}", "projects/acme/roles/workerControlChannel"),
        ("user:a@example.com", "projects/acme/roles/workerControlChannel"),
        (f"serviceAccount:{WORKER}", "roles/cloudtrace.agent"),
        (f"serviceAccount:{WORKER}", "roles/monitoring.metricWriter"),
    }
    for kinds in (catalog(), with_job):
        for impersonate in (False, True):
            bindings = iam_bindings(
                settings(),
                kinds,
                WORKER,
                WEBAPP,
                operators=["user:a@example.com"],
                operators_can_impersonate=impersonate,
                telemetry={"gcp_trace", "gcp_monitoring"},
                push=push(),
            )
            project_wide = {(b.member, b.role) for b in bindings if b.resource == "projects/acme"}
            assert project_wide <= justified
            commands = gcloud_commands(
                settings(), kinds, WORKER, WEBAPP, operators=["user:a@example.com"], project_number="1"
            )
            printed = [c for c in commands if c.startswith("gcloud projects add-iam-policy-binding")]
            assert printed and all("workerControlChannel" in c for c in printed), printed
    # and that role attaches to no topic and deletes nothing: on a project, those would reach
    # every topic (job-results, another team's) and every subscription (jobs-worker's backlog)
    from worker.ops.iam import CONTROL_PERMISSIONS

    assert set(CONTROL_PERMISSIONS) == {
        "pubsub.subscriptions.create",
        "pubsub.subscriptions.consume",
        "pubsub.subscriptions.get",
    }


def test_setup_print_gcloud_grants_operators() -> None:
    env = {**os.environ, "GOOGLE_CLOUD_PROJECT": "acme", "PUBSUB_EMULATOR_HOST": "127.0.0.1:9"}
    done = worker_cli(
        env, "setup", "--print-gcloud", "--worker-sa", WORKER, "--operator", "user:alice@acme.com"
    )
    assert done.returncode == 0, done.stderr
    impersonation = (
        f"gcloud iam service-accounts add-iam-policy-binding {WORKER} --project=acme "
        "--member=user:alice@acme.com --role=roles/iam.serviceAccountTokenCreator"
    )
    assert impersonation not in done.stdout
    trusted = worker_cli(
        env,
        "setup",
        "--print-gcloud",
        "--worker-sa",
        WORKER,
        "--operator",
        "user:alice@acme.com",
        "--operator-can-impersonate",
    )
    assert trusted.returncode == 0 and impersonation in trusted.stdout
    alone = worker_cli(env, "setup", "--print-gcloud", "--operator-can-impersonate")
    assert alone.returncode == 2 and "needs at least one --operator" in alone.stderr
    assert (
        "gcloud pubsub subscriptions add-iam-policy-binding jobs-dead-letter-ops --project=acme "
        "--member=user:alice@acme.com --role=roles/pubsub.subscriber"
    ) in done.stdout
    reason = (
        "# alice@acme.com roles/pubsub.publisher: republish dead-lettered jobs (worker replay, batch lane)"
    )
    assert reason in done.stdout
    assert "gcloud tasks queues create jobs-delayed --location=us-central1 --project=acme" in done.stdout
    assert (
        "gcloud tasks queues add-iam-policy-binding jobs-delayed --location=us-central1 --project=acme "
        f"--member=serviceAccount:{WORKER} --role=roles/cloudtasks.enqueuer"
    ) in done.stdout
    assert (
        f"gcloud iam service-accounts add-iam-policy-binding {WORKER} --project=acme "
        f"--member=serviceAccount:{WORKER} --role=roles/iam.serviceAccountUser"
    ) in done.stdout


def test_setup_refuses_an_operator_it_cannot_grant() -> None:
    env = {**os.environ, "GOOGLE_CLOUD_PROJECT": "acme", "PUBSUB_EMULATOR_HOST": "127.0.0.1:9"}
    bare = worker_cli(env, "setup", "--print-gcloud", "--operator", "alice@acme.com")
    assert bare.returncode == 2 and "user:alice@example.com" in bare.stderr and not bare.stdout
    without_print = worker_cli(env, "setup", "--operator", "user:alice@acme.com")
    assert without_print.returncode == 2 and "--print-gcloud" in without_print.stderr


PUSH_ENDPOINT = "https://webapp-abc123-uc.a.run.app/pubsub/results"


def push() -> PushTarget:
    return push_target(settings(), PUSH_ENDPOINT)


def test_push_gives_the_push_account_invoker_and_the_pubsub_agent_token_creation() -> None:
    bindings = iam_bindings(settings(), catalog(), WORKER, WEBAPP, project_number="123", push=push())
    assert roles_of(bindings, "serviceAccount:results-push@acme.iam.gserviceaccount.com") == {
        ("roles/run.invoker", "projects/acme/locations/us-central1/services/webapp"),
    }
    assert (
        "roles/iam.serviceAccountTokenCreator",
        "projects/acme/serviceAccounts/results-push@acme.iam.gserviceaccount.com",
    ) in roles_of(bindings, "serviceAccount:service-123@gcp-sa-pubsub.iam.gserviceaccount.com")
    # The web app no longer pulls, so it may no longer read the subscription.
    webapp = roles_of(bindings, f"serviceAccount:{WEBAPP}")
    assert webapp == {
        ("roles/pubsub.publisher", "projects/acme/topics/jobs"),
        ("roles/pubsub.publisher", "projects/acme/topics/jobs-batch"),
    }


def test_push_endpoint_must_be_https() -> None:
    with pytest.raises(ValueError, match="https"):
        push_target(settings(), "http://webapp.example.com/push")


def test_setup_prints_the_push_subscription_and_refuses_push_without_print(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "acme")
    runner = CliRunner()
    done = runner.invoke(
        cli,
        [
            "setup",
            "--print-gcloud",
            "--webapp-push-endpoint",
            PUSH_ENDPOINT,
            "--webapp-push-sa",
            "pusher@acme.iam.gserviceaccount.com",
            "--webapp-service",
            "portal",
        ],
    )
    assert done.exit_code == 0, done.output
    assert (
        f"--push-endpoint={PUSH_ENDPOINT} --push-auth-service-account=pusher@acme.iam.gserviceaccount.com "
        f"--push-auth-token-audience={PUSH_ENDPOINT}"
    ) in done.output
    assert (
        "gcloud run services add-iam-policy-binding portal --region=us-central1 --project=acme "
        "--member=serviceAccount:pusher@acme.iam.gserviceaccount.com --role=roles/run.invoker"
    ) in done.output
    without_print = runner.invoke(cli, ["setup", "--webapp-push-endpoint", PUSH_ENDPOINT])
    assert without_print.exit_code == 2 and "--print-gcloud" in without_print.output
    plain_http = runner.invoke(
        cli, ["setup", "--print-gcloud", "--webapp-push-endpoint", "http://x.example/p"]
    )
    assert plain_http.exit_code == 2 and "https" in plain_http.output
    sa_alone = runner.invoke(cli, ["setup", "--print-gcloud", "--webapp-push-sa", "a@b.c"])
    assert sa_alone.exit_code == 2 and "--webapp-push-endpoint" in sa_alone.output


@pytest.mark.skipif(
    shutil.which("gcloud") is None, reason="gcloud is not installed (apt-get install google-cloud-cli)"
)
def test_every_flag_of_the_push_subscription_exists_in_the_installed_gcloud() -> None:
    # The bindings it adds use the same commands and flags as every other binding.
    script = gcloud_script(settings(), catalog(), WORKER, WEBAPP, push=push())
    (command,) = [line for line in script.splitlines() if line.startswith("gcloud") and "--push-" in line]
    words = shlex.split(command)
    assert words[:4] == ["gcloud", "pubsub", "subscriptions", "create"]
    flags = {word.split("=", 1)[0] for word in words if word.startswith("--")}
    assert {"--push-endpoint", "--push-auth-service-account", "--push-auth-token-audience"} <= flags
    done = subprocess.run(
        [*words[:4], "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PAGER": "cat", "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"},
    )
    assert done.returncode == 0, done.stderr
    known = set(re.findall(r"--[a-z][a-z0-9-]*", done.stdout))
    assert flags <= known, sorted(flags - known)


def test_a_run_job_kind_gets_the_least_role_that_runs_with_overrides_on_its_job_only() -> None:
    from worker.core.runjob import RunJobSpec

    kinds = {
        "rescore": JobKind(
            kind="rescore", handler="run_job", region="europe-west1", run_job=RunJobSpec(job="rescore-all")
        ),
    }
    bindings = iam_bindings(
        settings(), Catalog(kinds), WORKER, WEBAPP, project_number="1", operators=["user:ops@acme.com"]
    )
    worker = roles_of(bindings, f"serviceAccount:{WORKER}")
    assert (
        "roles/run.jobsExecutorWithOverrides",
        "projects/acme/locations/europe-west1/jobs/rescore-all",
    ) in worker
    assert ("roles/pubsub.publisher", "projects/acme/topics/jobs") in worker  # the follow-ups
    assert not {r for r, _ in worker} & {"roles/run.developer", "roles/run.admin", "roles/run.invoker"}
    operator = roles_of(bindings, "user:ops@acme.com")
    assert ("roles/run.jobsExecutor", "projects/acme/locations/europe-west1/jobs/rescore-all") in operator
    assert ("roles/pubsub.publisher", "projects/acme/topics/job-results") in operator
    commands = gcloud_commands(settings(), Catalog(kinds), WORKER, WEBAPP, project_number="1")
    assert (
        "gcloud run jobs add-iam-policy-binding rescore-all --region=europe-west1 --project=acme "
        f"--member=serviceAccount:{WORKER} --role=roles/run.jobsExecutorWithOverrides"
    ) in commands


def test_the_builder_quotes_every_word_and_value_for_the_shell() -> None:
    from worker.core.gcloud_command import gcloud, grant

    assert gcloud("run", "services", "list", project="p", region="europe-west1") == (
        "gcloud run services list --project=p --region=europe-west1"
    )
    assert gcloud(
        "scheduler",
        "jobs",
        "create",
        "pubsub",
        "n",
        time_zone="Etc/UTC",
        schedule="0 2 * * *",
        message_body='{"a": 1}',
        location=None,
    ) == (
        "gcloud scheduler jobs create pubsub n --time-zone=Etc/UTC --schedule='0 2 * * *' "
        "--message-body='{\"a\": 1}'"
    )
    # A member naming a shell variable is double-quoted so the shell expands it; one
    # with a quote in it is escaped, never able to end the argument.
    assert grant("serviceAccount:s-${PROJECT_NUMBER}@x", "roles/r", "projects/p/topics/t") == (
        "gcloud pubsub topics add-iam-policy-binding t --project=p "
        '--member="serviceAccount:s-${PROJECT_NUMBER}@x" --role=roles/r'
    )
    assert "--member='user:o'\"'\"'brien@x'" in grant("user:o'brien@x", "roles/r", "projects/p")
    with pytest.raises(ValueError, match="no gcloud command"):
        grant("user:a@x", "roles/r", "projects/p/buckets/b")


def test_every_printed_gcloud_command_comes_from_the_one_builder() -> None:
    import ast
    import re

    by_hand = re.compile(r"\bgcloud (projects|pubsub|run|iam|auth|services|scheduler)\b")
    root = Path(__file__).parents[2] / "worker"
    found = []
    for path in root.rglob("*.py"):
        if path.name == "gcloud_command.py":
            continue
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and by_hand.search(node.value):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {node.value[:60]!r}")
    assert not found, "written by hand instead of worker.core.gcloud_command.gcloud():\n" + "\n".join(found)
