"""The ``srigl-compile`` click group, its error handling and the executable's entry point (the commands
register themselves on ``main`` from their own modules)."""

from __future__ import annotations

import functools
import os
import sys
import warnings

import click

from ..errors import SRigLError

__all__ = ["main", "console_main", "friendly_errors"]


def friendly_errors(command):
    """Turn srigl_compile's typed errors into one clean line and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SRigLError as err:
            raise click.ClickException(str(err)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """Train PyTorch models sparse with SRigL and compile them into fast condensed kernels.

    Start with `srigl-compile demo`.
    """


def console_main() -> None:
    """The ``srigl-compile`` executable: restart once with OMP_WAIT_POLICY=PASSIVE unless the user chose one.

    torch's OpenMP threads otherwise spin after each parallel region and take the cores TVM's kernels need; the
    variable is read when the OpenMP runtime loads, i.e. before any of our code runs, hence the restart.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        if not sys.argv[0].endswith("__main__.py"):  # (the restart runs -m: keep the name the user typed in help)
            os.environ[_PROG_VARIABLE] = os.path.basename(sys.argv[0])
        os.execv(sys.executable, [sys.executable, "-m", "srigl_compile", *sys.argv[1:]])
    warnings.showwarning = _one_line_warning
    main(prog_name=os.environ.pop(_PROG_VARIABLE, None))


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A command's warnings as one line each, without the source line Python would show (the library's or
    click's: a command line has no line of the user's to point at)."""
    label = "Warning" if category is UserWarning else category.__name__
    click.echo(f"{label}: {message}", err=True)


_PROG_VARIABLE = "_SRIGL_COMPILE_PROG"
