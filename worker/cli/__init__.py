"""The `worker` command: one click group, a module per command group.

| module | verbs |
|---|---|
| `run.py` | `run` |
| `setup.py` | `setup` (and `--print-gcloud`) |
| `jobs.py` | `enqueue`, `cancel` |
| `later.py` | `scheduled` (jobs waiting for their `not_before`) |
| `ops.py` | `dead-letters`, `replay`, `doctor` |
| `batch.py` | `batch-status` |
| `control.py` | `pause`, `resume`, `status` |
| `dev.py` | `dev` (needs the local cloud) |
| `console.py` | `console` (the operators' web page, worker/console/) |

Every failure goes through `common.CommandError`; the group (`common.Verbs`) turns a
Google library's failure in any verb into one. Google's libraries are imported
inside the verbs, not at import time: `worker dev` must set GCE_METADATA_HOST before
google.auth is first imported.
"""

from __future__ import annotations

import click

from worker.cli import batch, console, control, dev, jobs, later, ops, run, setup
from worker.cli.common import Verbs


@click.group(cls=Verbs, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--debug", is_flag=True, help="On a Google library's failure, its traceback instead of one line."
)
def cli(debug: bool) -> None:
    """Run Pub/Sub jobs against private Cloud Run services with proper ID tokens."""


for module in (run, setup, jobs, later, ops, control, batch, console, dev):
    for command in module.COMMANDS:
        cli.add_command(command)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
