"""The ``srigl-compile`` command line: demo, train, lower, bench, table.

Each command's --help says what it does, with an example. Library errors (bad sparsity, missing folder, unknown
model ...) exit with status 1 and one line naming the problem.
"""

from . import commands, demo, table  # noqa: F401  (register the commands on main)
from .app import console_main, friendly_errors, main

__all__ = ["main", "console_main", "friendly_errors"]
