"""Google's own Pub/Sub emulator (`gcloud beta emulators pubsub start`), as a managed process.

gcloud starts a shell script that starts Java; only the process group holds them all,
so the emulator runs in a new session and is stopped by signalling that group.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from localcloud.ports import free_port

PACKAGES = "google-cloud-cli google-cloud-cli-pubsub-emulator openjdk-17-jre-headless"
_STOP_GRACE_S = 5.0


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ")".
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def emulator_answers(host: str, timeout: float = 1.0) -> bool:
    """True if a Pub/Sub emulator answers "Ok" at http://HOST/."""
    try:
        with urllib.request.urlopen(f"http://{host}/", timeout=timeout) as response:
            return bool(response.status == 200 and response.read().strip() == b"Ok")
    except (OSError, urllib.error.URLError):
        return False


class PubSubEmulator:
    """Start with `.start()` (or `with`); `.host` is what PUBSUB_EMULATOR_HOST takes."""

    def __init__(self, project: str = "local-project", port: int | None = None) -> None:
        self.project = project
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        # Named now (the log path goes in error messages), created only by start().
        self._workdir = Path(tempfile.gettempdir()) / f"pubsub-emulator-{uuid.uuid4().hex[:12]}"
        self.log_path = self._workdir / "emulator.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._answered = False

    @property
    def pgid(self) -> int | None:
        """The emulator's process group (its gcloud, shell and Java), while started."""
        return self._process.pid if self._process is not None else None

    def _fail(self, reason: str) -> RuntimeError:
        # Also into the log, so the file the message names exists and tells the same.
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as log:
            log.write(f"local cloud: {reason}\n")
        return RuntimeError(
            f"Pub/Sub emulator unavailable: {reason}. Install the Debian packages "
            f"{PACKAGES} (apt-get install -y {PACKAGES}). Log: {self.log_path}"
        )

    def _gcloud(self) -> str:
        gcloud = shutil.which("gcloud")
        if gcloud is None:
            raise self._fail("gcloud is not on PATH")
        try:
            java = subprocess.run(["java", "-version"], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise self._fail(f"java cannot run ({exc})") from exc
        if java.returncode != 0:
            raise self._fail("`java -version` failed")
        sdk_root = Path(os.path.realpath(gcloud)).parent.parent
        if not (sdk_root / "platform" / "pubsub-emulator").is_dir():
            raise self._fail(f"the pubsub-emulator component is missing under {sdk_root}")
        return gcloud

    def start(self, timeout: float = 60.0) -> PubSubEmulator:
        if self._process is not None:
            raise RuntimeError("emulator already started")
        gcloud = self._gcloud()
        data_dir = self._workdir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        self._answered = False
        env = dict(os.environ)
        env.update(
            # Its own gcloud config: no user settings, prompts or update checks.
            CLOUDSDK_CONFIG=str(self._workdir / "gcloud"),
            CLOUDSDK_CORE_DISABLE_PROMPTS="1",
            CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK="1",
        )
        command = [
            gcloud,
            "beta",
            "emulators",
            "pubsub",
            "start",
            f"--host-port={self.host}",
            f"--project={self.project}",
            f"--data-dir={data_dir}",
        ]
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while not emulator_answers(self.host):
            if self._process.poll() is not None:
                self.stop()
                raise self._fail(f"it exited early ({self._log_tail()})")
            if time.monotonic() > deadline:
                self.stop()
                raise self._fail(f"it did not answer on {self.host} within {timeout:.0f} s")
            time.sleep(0.2)
        self._answered = True
        return self

    def _log_tail(self) -> str:
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
        return " | ".join(tail) or "no output"

    def stop(self) -> None:
        """Terminate the whole process group: SIGTERM, then SIGKILL after 5 s.

        The work dir (log, data) is removed only after an emulator that had answered,
        so a failed start keeps the log its error message points to."""
        process, self._process = self._process, None
        atexit.unregister(self.stop)
        if process is None:
            return
        try:
            self._terminate(process)
        finally:
            if self._answered:
                shutil.rmtree(self._workdir, ignore_errors=True)

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        pgid = process.pid
        for sig, grace in ((signal.SIGTERM, _STOP_GRACE_S), (signal.SIGKILL, _STOP_GRACE_S)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if process.poll() is not None and not group_members(pgid):
                    return
                time.sleep(0.1)
        process.poll()

    def __enter__(self) -> PubSubEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
