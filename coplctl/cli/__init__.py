"""The `coplctl` command line. Each module defines its commands on its own ``app = typer.Typer(...)``:
``typer.Typer(name="data", help=...)`` for a command group (``coplctl data simulate``), a plain
``typer.Typer()`` for top-level commands (``coplctl train``); add a new module to the list below. Options
that several commands take are defined once in ``common.py``. Commands import heavy libraries only inside
their bodies, so `coplctl --help` and `coplctl methods` start fast."""

from __future__ import annotations

import errno
import os
import sys
from typing import Annotated

import typer

from coplctl.cli import adapt, bench, data, export, graph, methods, model, plot
from coplctl.cli.common import err, examples
from coplctl.core.errors import CoplError

app = typer.Typer(
    name="coplctl",
    help="Personalized reward models: CoPL and its competitors, trained, adapted and benchmarked.",
    epilog=examples("coplctl benchmark quick",
                    "coplctl data simulate --variant uf-p-4 --annotations avg --out data/uf-p-4-avg",
                    "coplctl data inspect data/uf-p-4-avg",
                    "coplctl graph train --data data/uf-p-4-avg --out runs/gcf",
                    "coplctl adapt --model runs/gcf --user-file new_users.jsonl --out runs/new_users",
                    "coplctl methods"),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"coplctl {version('coplctl')}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Personalized reward models: CoPL and its competitors, trained, adapted and benchmarked."""


for module in (model, adapt, export, bench, methods, data, graph, plot):  # in the order `coplctl --help` lists them
    app.add_typer(module.app)


def _usage_line(e: Exception) -> str:
    """One line for a usage error: what is wrong, and where to find help."""
    msg = " ".join(e.format_message().split())  # type: ignore[attr-defined]
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else "coplctl"
    return f"coplctl: {msg} (see '{path} --help')"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings (e.g. a collapsed MoLE gate) as one yellow line, without source locations."""
    err.print(f"warning: {message}", style="yellow", markup=False, highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: known errors become one line and a non-zero exit code, warnings one
    yellow line.

    Set COPLCTL_DEBUG=1 to see full tracebacks.
    """
    import warnings

    debug = bool(os.environ.get("COPLCTL_DEBUG"))
    with warnings.catch_warnings():  # restores the caller's warning display afterwards
        if not debug:
            warnings.showwarning = _show_warning
        code = _run(argv, debug)
    if argv is None:
        sys.exit(code)
    return code


#: an output that cannot be written (stdout on a full disk, a read-only target): one line, not a traceback
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EIO}


def _run(argv: list[str] | None, debug: bool) -> int:
    from coplctl.core.files import not_unicode

    for i, arg in enumerate(sys.argv[1:] if argv is None else argv, 1):
        problem = not_unicode(arg)
        if problem:  # bytes that are not UTF-8 reach Python as lone surrogates
            err.print(f"error: command-line argument {i} ({arg.encode('utf-8', 'replace').decode()[:60]!r}) "
                      f"{problem}", style="red", markup=False, highlight=False, soft_wrap=True)
            return 2
    try:
        rv = app(args=argv, prog_name="coplctl", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
        sys.stdout.flush()  # a full disk behind stdout shows here, inside the error handling
    except CoplError as e:
        if debug:
            raise
        err.print(f"error: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
        code = 1
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted", style="red")
        code = 130
    except OSError as e:
        if debug or e.errno not in _OUTPUT_ERRNOS:
            raise
        err.print(f"error: cannot write the output ({e.strerror or e})", style="red", markup=False, highlight=False)
        code = 1
    except Exception as e:
        # Usage errors (click's, or the copy vendored by recent typer) carry exit_code + format_message.
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # a group called without a command: show its help
            ctx = getattr(e, "ctx", None)
            typer.echo(ctx.get_help() if ctx is not None else e.format_message())
            code = 0
        else:
            err.print(_usage_line(e), style="red", markup=False, highlight=False, soft_wrap=True)
            code = e.exit_code
    return code
