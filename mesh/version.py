"""The version every ambimesh command prints with ``--version``.

Read from the installed distribution's metadata, so a checkout, a wheel and the container
image each report what was actually installed, from one number in pyproject.toml.
"""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    try:
        number = version("ambimesh")
    except PackageNotFoundError:  # run from a tree that was never installed
        number = "unknown"
    parser.add_argument("--version", action="version", version=f"%(prog)s {number}")
