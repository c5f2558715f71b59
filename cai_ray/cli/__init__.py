"""The `cai-ray` command line. Each command group lives in its own module with a `register`.

Modules keep heavy imports (torch, transformers, ray) inside their command functions, so
`cai-ray --help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cai_ray.errors import CaiRayError

# module name -> registers its sub-commands on the shared sub-parser
COMMAND_MODULES = ("constitution", "model", "generate", "run", "serve", "eval", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cai-ray",
        description="Constitutional AI on Ray: critique/revise, AI feedback, preference models, RL.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"cai_ray.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CaiRayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        # A stage that failed mid-stream leaves Ray Data's threads running; as the process
        # exits they log shutdown warnings with tracebacks, which would bury the error above.
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    from cai_ray import __version__

    return f"cai-ray {__version__}"


if __name__ == "__main__":
    sys.exit(main())
