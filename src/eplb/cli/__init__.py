"""The ``eplb`` command line.

Each area registers its commands in its own module (``offline``, ``stats``, ``runtime``,
``sim``); this module only assembles the app and turns known errors into one-line messages
with exit code 2.
"""

from __future__ import annotations

import atexit
import gc
import sys

import typer

from eplb.cli import integrations, offline, runtime, sim, stats
from eplb.errors import EplbError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Expert Parallelism Load Balancer for MoE inference.")



@app.callback()
def _root() -> None:
    """Expert Parallelism Load Balancer for MoE inference."""


@app.command()
def version() -> None:
    """Print eplb's version."""
    from eplb import __version__

    print(__version__)


for _mod in (stats, offline, sim, runtime, integrations):
    _mod.register(app)


def main() -> None:
    """Console-script entry point: an :class:`eplb.errors.EplbError` (bad input or environment) becomes
    ``eplb: error: ...`` and exit code 2; anything else is a bug and stays a traceback."""
    # the interpreter's last collections walk every object torch's import made (~0.6 s of a short command);
    # frozen objects are skipped, and atexit callbacks run before that final collection
    atexit.register(gc.freeze)
    try:
        app()
    except EplbError as exc:
        print(f"eplb: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
