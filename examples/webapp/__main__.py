"""`python -m examples.webapp`: run the reference web app on 127.0.0.1.

make dev        # shell 1: worker dev (writes .worker-dev.env, pushes results to :8090)
make webapp     # shell 2: this, with --env-file .worker-dev.env; open http://127.0.0.1:8090
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path


def read_env_file(path: str) -> dict[str, str]:
    """The `export NAME=value` lines `worker dev` writes."""
    env = {}
    for line in Path(path).read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            env[name] = value
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.webapp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--env-file", help="read `worker dev`'s environment from this file first")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8090")))
    parser.add_argument("--db", help="SQLite file for results [WEBAPP_DB or webapp.sqlite3]")
    args = parser.parse_args(argv)
    if args.env_file:
        if not Path(args.env_file).exists():
            sys.exit(
                f"{args.env_file} does not exist: start `make dev` (worker dev) first, it writes the file"
            )
        # Set before google.auth or the Pub/Sub client is imported (GCE_METADATA_HOST is read once).
        os.environ.update(read_env_file(args.env_file))

    from examples.webapp.app import WebappConfig, create_app

    config = WebappConfig.from_env(db_path=args.db)
    app = create_app(config)
    print(
        f"Reference web app on http://{args.host}:{args.port} (results pushed to {config.audience})",
        flush=True,
    )
    app.run(host=args.host, port=args.port, threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()
