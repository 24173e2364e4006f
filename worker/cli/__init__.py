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

Every failure goes through `common.CommandError`. Google's libraries are imported
inside the verbs, not at import time: `worker dev` must set GCE_METADATA_HOST before
google.auth is first imported.
"""

from __future__ import annotations

import click

from worker.cli import batch, control, dev, jobs, later, ops, run, setup


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Run Pub/Sub jobs against private Cloud Run services with proper ID tokens."""


for module in (run, setup, jobs, later, ops, control, batch, dev):
    for command in module.COMMANDS:
        cli.add_command(command)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
