"""User-facing errors: one exception type, printed by every entry point as one line.

Who prints: an error is printed once, by the rank that had it, naming the rank when it is not the
main one (`distrnn.train: error on rank 1 (node n2): ...`). Errors that every rank raises by
construction (`shared`: config errors, an agreed stop) are printed by rank 0 only; `Quiet` is
raised by ranks that stop because another rank failed and already printed why.

Set DISTRNN_DEBUG=1 (or pass --debug to `distrnn`) to see the traceback instead.
"""

from __future__ import annotations

import os
import socket

import click

# Every distrnn command's Click context: -h as well as --help.
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


class DistrnnError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""

    exit_code = 1
    shared = False  # raised identically on every rank: printed by rank 0 only


class ConfigError(DistrnnError):
    exit_code = 2
    shared = True


class PeerUnresponsive(DistrnnError):
    """Another rank stopped answering (hung or frozen); it was named, and stopped where it could be."""

    exit_code = 3


class PeerLost(DistrnnError):
    """Another rank (or its machine) is gone: the connection to it closed. Restarting may not meet it again."""

    exit_code = 4


class Quiet(DistrnnError):
    """This rank stops because another rank failed; that rank prints the reason."""

    def __init__(self, exit_code: int = 1):
        super().__init__("")
        self.exit_code = exit_code


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's first non-empty line (or its type), short enough for a one-line message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:limit]


def debug_enabled() -> bool:
    return os.environ.get("DISTRNN_DEBUG", "") not in ("", "0", "false")


def this_rank() -> int:
    """The global rank set by the launcher (torchrun); 0 in a single process."""
    return int(os.environ.get("RANK", "0"))


def host_name() -> str:
    """This machine's short host name (`n2` for n2.cluster.local): how distrnn names a machine to people and
    to the other ranks (errors, the run folder's hold, heartbeats, the rank timing)."""
    return socket.gethostname().split(".")[0]


def where() -> str:
    """'' on rank 0; ' on rank R (node H)' elsewhere, so a multi-node log says who failed."""
    rank = this_rank()
    return "" if rank == 0 else f" on rank {rank} (node {host_name()})"


def print_error(prog: str, error: DistrnnError) -> None:
    if isinstance(error, Quiet) or (error.shared and this_rank() != 0):
        return
    click.echo(f"{prog}: error{where()}: {error}", err=True)


def exit_status(code: object) -> int:
    """What a process exits with for `sys.exit(code)`: None is 0, an int itself, anything else 1."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def run_cli(command: click.Command, prog: str, args: list[str] | None = None) -> int:
    """Run a Click command and return its exit status: the one place exit codes are decided. Bad input
    ends in one line on stderr and a non-zero status, no traceback."""
    try:
        command.main(args=args, prog_name=prog, standalone_mode=False)
    except SystemExit as e:  # a command that ends with sys.exit (the launcher, with its workers' status)
        return exit_status(e.code)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:  # usage errors: Click would print usage + blank line + error
        if debug_enabled():
            raise
        ctx = getattr(e, "ctx", None)
        if this_rank() == 0:  # every rank parses the same command line
            click.echo(f"{prog}: error: {e.format_message()} (see {ctx.command_path if ctx else prog} --help)",
                       err=True)
        return e.exit_code
    except click.Abort:
        return 130
    except DistrnnError as e:
        if debug_enabled() and not isinstance(e, Quiet):
            raise
        print_error(prog, e)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0
