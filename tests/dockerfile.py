"""Read the Dockerfile and .dockerignore the way Docker does, for tests that cannot run Docker.

Only the subset this repository uses: stages, ARG defaults in FROM, line continuations,
exec-form JSON arguments; .dockerignore patterns with `*`, `**` and `!`, where the last
matching pattern wins and a pattern matching a directory covers everything inside it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, else None."""
        try:
            value = json.loads(self.args)
        except ValueError:
            return None
        return value if isinstance(value, list) else None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def _logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    return lines


def parse_dockerfile(path: Path = REPO / "Dockerfile") -> list[Stage]:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest).split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            stages[-1].instructions.append(Instruction(keyword, rest))
    return stages


class DockerIgnore:
    def __init__(self, path: Path = REPO / ".dockerignore") -> None:
        self.rules: list[tuple[bool, re.Pattern[str], str]] = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            pattern = line.lstrip("!").strip("/")
            self.rules.append((negated, re.compile(_translate(pattern)), pattern))

    def excluded(self, relative: str) -> bool:
        parts = relative.strip("/").split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        verdict = False
        for negated, regex, _ in self.rules:
            if any(regex.fullmatch(c) for c in candidates):
                verdict = not negated
        return verdict

    def may_include_below(self, directory: str) -> bool:
        """Whether a `!` rule could bring back something inside an excluded directory."""
        prefix = directory.strip("/") + "/"
        return any(negated and pattern.startswith(prefix) for negated, _, pattern in self.rules)


def _translate(pattern: str) -> str:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return out


def build_context(destination: Path, source: Path = REPO) -> Path:
    """Copy what `docker build` would send as its context: the files .dockerignore keeps."""
    ignore = DockerIgnore(source / ".dockerignore")
    for root, dirs, files in os.walk(source):
        here = Path(root).relative_to(source).as_posix()
        prefix = "" if here == "." else here + "/"
        # Prune .venv, .git and the like instead of walking thousands of files.
        dirs[:] = [d for d in dirs if not ignore.excluded(prefix + d) or ignore.may_include_below(prefix + d)]
        for name in files:
            if not ignore.excluded(prefix + name):
                target = destination / (prefix + name)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(root) / name, target)
    return destination
