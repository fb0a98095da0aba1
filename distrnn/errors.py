"""User-facing errors: one exception type, printed by every entry point as one line.

Set DISTRNN_DEBUG=1 (or pass --debug to `distrnn`) to see the traceback instead.
"""

from __future__ import annotations

import os
import sys

import click


class DistrnnError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""

    exit_code = 1


class ConfigError(DistrnnError):
    exit_code = 2


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's first non-empty line (or its type), short enough for a one-line message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:limit]


def debug_enabled() -> bool:
    return os.environ.get("DISTRNN_DEBUG", "") not in ("", "0", "false")


def run_cli(command: click.Command, prog: str, args: list[str] | None = None) -> None:
    """Run a Click command; bad input ends in one line on stderr and a non-zero exit, no traceback."""
    try:
        command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:  # usage errors: Click would print usage + blank line + error
        if debug_enabled():
            raise
        ctx = getattr(e, "ctx", None)
        click.echo(f"{prog}: error: {e.format_message()} (see {ctx.command_path if ctx else prog} --help)", err=True)
        sys.exit(e.exit_code)
    except click.Abort:
        sys.exit(130)
    except DistrnnError as e:
        if debug_enabled():
            raise
        # Every rank of a run raises the same error; one copy is enough.
        if os.environ.get("RANK", "0") == "0":
            click.echo(f"{prog}: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)
