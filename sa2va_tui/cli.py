"""Entry point of the `sa2va-tui` console command."""

from __future__ import annotations

import sys

# Importing a command module registers its commands on `app`; each module is light.
from sa2va_tui.commands import (  # noqa: F401
    compare_cmds,
    config_cmds,
    model_cmds,
    report_cmds,
    run_cmds,
)
from sa2va_tui.commands.common import app

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
