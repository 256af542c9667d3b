"""`scalegen COMMAND ...`: discovers the subcommand modules in this package and dispatches.

User errors (`scalegen.errors.UserError`) become one line on stderr and exit code 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import torch.distributed

import scalegen.cli
import scalegen.families  # noqa: F401  (registers the built-in families for every command)
from scalegen.errors import UserError
from scalegen.eval.dist import barrier, is_distributed


def _leave_process_group() -> None:
    """All ranks leave the job's process group together: a rank whose gloo threads still run when the
    interpreter exits can abort ("terminate called without an active exception") after its work is done."""
    if is_distributed():
        barrier()
        torch.distributed.destroy_process_group()


def _commands() -> dict[str, object]:
    names = [m.name for m in pkgutil.iter_modules(scalegen.cli.__path__) if m.name not in ("main", "common")]
    return {name.replace("_", "-"): importlib.import_module(f"scalegen.cli.{name}") for name in sorted(names)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalegen", description=__import__("scalegen").__doc__)
    parser.add_argument("--version", action="version", version=f"scalegen {__import__('scalegen').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in _commands().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may also come after options (`eval CKPT --out D eval.iwae_k=10`): argparse
    # leaves those over; anything else left over is still an error.
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = int(args._run(args) or 0)
        _leave_process_group()
        return code
    except UserError as err:
        one_line = " ".join(part.strip() for part in str(err).splitlines())  # e.g. a YAML error's context lines
        print(f"scalegen {args.command}: error: {one_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"scalegen {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
