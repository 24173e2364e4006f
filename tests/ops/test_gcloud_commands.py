"""Every gcloud command the project prints or documents exists, with every flag it uses.

The reference is the installed gcloud's own `--help`: a group's help lists its groups
and commands, a command's help its flags (`--[no-]x` is both --x and --no-x). Help
texts are cached in pytest's cache per gcloud version and command path, so only the
first run on a machine pays for the gcloud calls.

Sources: `worker setup --print-gcloud` (with an operator), every gcloud command written
in the worker's code (doctor's fix hints, error messages), the deploy script's commands
(scripts/cloud_run_deploy.py), and the fenced and inline commands of README.md and
the pages under docs/.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from scripts import cloud_run_deploy

pytestmark = pytest.mark.gcloud

REPO = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
FLAG = re.compile(r"--(\[no-\])?([a-z][a-z0-9-]*)")
SHELL_STOP = {"|", "||", "&&", ";", ">", ">>", "<", "(", ")", "2>"}


class GcloudHelp:
    """`gcloud PATH --help`, parsed, and cached on disk per gcloud version and path."""

    def __init__(self, cache_root: Path) -> None:
        assert shutil.which("gcloud"), "no gcloud: apt-get install google-cloud-cli (.ci/run does)"
        version = subprocess.run(["gcloud", "version", "--format=json"], capture_output=True, text=True)
        self._dir = cache_root / json.loads(version.stdout or "{}").get("Google Cloud SDK", "unknown")
        self._dir.mkdir(parents=True, exist_ok=True)
        self._texts: dict[tuple[str, ...], str] = {}

    def text(self, path: tuple[str, ...]) -> str:
        if path not in self._texts:
            file = self._dir / (".".join(path) or "_root")
            if not file.exists():
                done = subprocess.run(
                    ["gcloud", *path, "--help"],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"},
                    timeout=120,
                )
                file.write_text(ANSI.sub("", done.stdout) if done.returncode == 0 else "")
            self._texts[path] = file.read_text()
        return self._texts[path]

    def prefetch(self, paths: set[tuple[str, ...]]) -> None:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(self.text, sorted(paths - self._texts.keys())))

    def children(self, path: tuple[str, ...]) -> set[str]:
        """The groups and commands a group's help lists (none for a command)."""
        names, listing = set(), False
        for line in self.text(path).splitlines():
            if re.fullmatch(r"[A-Z][A-Z ]+", line):
                listing = line in ("GROUPS", "COMMANDS")
            elif listing and (m := re.fullmatch(r" {5}([a-z][a-z0-9-]*)", line)):
                names.add(m.group(1))
        return names

    def flags(self, path: tuple[str, ...]) -> set[str]:
        found = set()
        for negatable, name in FLAG.findall(self.text(path)):
            found.add(f"--{name}")
            if negatable:
                found.add(f"--no-{name}")
        return found

    def resolve(self, commands: list[list[str]]) -> list[tuple[str, ...]]:
        """Each command's path (its groups and command), fetching the helps level by level."""
        paths: list[tuple[str, ...]] = [() for _ in commands]
        walking = set(range(len(commands)))
        while walking:
            self.prefetch({paths[i] for i in walking})
            for i in list(walking):
                words, path = commands[i], paths[i]
                nxt = words[len(path)] if len(path) < len(words) else "-"
                if nxt.startswith("-") or nxt not in self.children(path):
                    walking.discard(i)
                else:
                    paths[i] = (*path, nxt)
        self.prefetch(set(paths))
        return paths


@pytest.fixture(scope="module")
def gcloud_help() -> GcloudHelp:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return GcloudHelp(cache / "cloudrun-job-worker" / "gcloud-help")


def gcloud_invocations(text: str) -> Iterator[list[str]]:
    """The argument lists of the `gcloud ...` commands in a shell snippet."""
    text = re.sub(r"\\\n\s*", " ", text)
    for line in text.splitlines():
        for chunk in re.findall(r"\$\((gcloud [^)]*)\)", line) or [line]:
            try:
                lexer = shlex.shlex(chunk, posix=True, punctuation_chars="|&;<>()")
                lexer.whitespace_split = True
                lexer.commenters = "#"
                tokens = list(lexer)
            except ValueError:
                continue
            for start, token in enumerate(tokens):
                if token == "gcloud":
                    command = []
                    for word in tokens[start + 1 :]:
                        if word in SHELL_STOP:
                            break
                        command.append(word)
                    yield command


def code_commands(source: str) -> Iterator[str]:
    """gcloud commands written as strings in Python code, f-string fields as VALUE."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.JoinedStr):
            text = "".join(
                part.value if isinstance(part, ast.Constant) and isinstance(part.value, str) else "VALUE"
                for part in node.values
            )
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        else:
            continue
        for match in re.finditer(r"gcloud [^;\n]*", text):
            yield match.group(0)


def markdown_pages() -> list[str]:
    """The README and every page it leads to, where a documented gcloud command may be."""
    pages = ["README.md", "BENCHMARKS.md", "localcloud/README.md"]
    return pages + sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").rglob("*.md"))


def documented_commands(markdown: str) -> Iterator[str]:
    yield from re.findall(r"^```(?:sh|bash|shell)?\n(.*?)^```", markdown, re.M | re.S)
    yield from re.findall(r"`(gcloud [^`]+)`", markdown)


def printed_commands() -> str:
    env = {**os.environ, "GOOGLE_CLOUD_PROJECT": "acme", "PUBSUB_EMULATOR_HOST": "127.0.0.1:9"}
    done = subprocess.run(
        [sys.executable, "-m", "worker", "setup", "--print-gcloud", "--operator", "user:alice@example.com"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def deploy_script_commands() -> list[list[str]]:
    module = cloud_run_deploy
    commands = []
    for kind in module.TARGETS:
        environ = {
            "TARGET": kind, "NAME": "job-worker", "REGION": "us-central1", "PROJECT_ID": "acme",
            "SERVICE_ACCOUNT": "worker@acme.iam.gserviceaccount.com", "IMAGE": "r/p/worker:abc",
            "MIN_INSTANCES": "1", "MAX_INSTANCES": "3", "CONCURRENCY": "10", "CPU": "1",
            "MEMORY": "512Mi", "HEALTH_PORT": "8080", "GOOGLE_CLOUD_PROJECT": "acme",
        }  # fmt: skip
        target = module.Target.from_environ(environ)
        commands += [module.digest_command(target.image), module.describe_pool_command(target)]
        commands += [module.replace_pool_command(target, "/tmp/pool.yaml")]
        if kind == "service":
            commands.append(module.service_command(target, "r/p/worker@sha256:0"))
    return [c[1:] for c in commands]


def all_commands(gcloud_help: GcloudHelp) -> dict[str, list[str]]:
    """Every gcloud invocation found, keyed by a label saying where it was found."""
    snippets: list[tuple[str, str]] = [("worker setup --print-gcloud", printed_commands())]
    for module in sorted((REPO / "worker").rglob("*.py")):
        snippets += [(str(module.relative_to(REPO)), c) for c in code_commands(module.read_text())]
    for doc in markdown_pages():
        snippets += [(doc, s) for s in documented_commands((REPO / doc).read_text())]
    found: dict[str, list[str]] = {}
    roots = gcloud_help.children(())
    for where, snippet in snippets:
        for command in gcloud_invocations(snippet):
            # Prose such as "gcloud has no credentials" is not a command.
            if command and command[0] in roots:
                found[f"{where}: gcloud {' '.join(command)}"] = command
    for command in deploy_script_commands():
        found[f"scripts/cloud_run_deploy.py: gcloud {' '.join(command)}"] = command
    return found


def command_path(gcloud_help: GcloudHelp, words: list[str]) -> tuple[str, ...]:
    (path,) = gcloud_help.resolve([words])
    return path


def test_every_printed_and_documented_gcloud_command_and_flag_exists(gcloud_help: GcloudHelp) -> None:
    commands = sorted(all_commands(gcloud_help).items())
    paths = gcloud_help.resolve([words for _, words in commands])
    problems = []
    for (where, words), path in zip(commands, paths, strict=True):
        if not path or gcloud_help.children(path):
            problems.append(f"{where}\n    `gcloud {' '.join(path)}` is not a command of gcloud here")
            continue
        unknown = sorted({w.split("=", 1)[0] for w in words if w.startswith("--")} - gcloud_help.flags(path))
        if unknown:
            problems.append(f"{where}\n    unknown flags of `gcloud {' '.join(path)}`: {unknown}")
    assert not problems, "\n".join(problems)
    # The sources were read: the printed script alone grants a dozen bindings.
    assert len(commands) > 30
    assert any("worker-pools replace" in where for where, _ in commands)


def test_the_checker_finds_a_wrong_flag_and_a_missing_command(gcloud_help: GcloudHelp) -> None:
    (good,) = gcloud_invocations("gcloud run services list --region=us-central1 --project=p")
    (bad_flag,) = gcloud_invocations("gcloud run services list --regoin=us-central1")
    (bad_command,) = gcloud_invocations("gcloud run services lists --region=us-central1")
    path = command_path(gcloud_help, good)
    assert path == ("run", "services", "list") and {"--region", "--project"} <= gcloud_help.flags(path)
    assert "--regoin" not in gcloud_help.flags(command_path(gcloud_help, bad_flag))
    assert gcloud_help.children(command_path(gcloud_help, bad_command))  # stops at a group
    (negated,) = gcloud_invocations("gcloud run deploy x --no-cpu-throttling  # a comment --bogus")
    assert negated == ["run", "deploy", "x", "--no-cpu-throttling"]
    assert "--no-cpu-throttling" in gcloud_help.flags(("run", "deploy"))
