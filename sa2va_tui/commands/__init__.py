"""Every CLI command module; importing this package registers them all on the app."""

from sa2va_tui.commands import config_cmds  # noqa: F401
from sa2va_tui.commands import model_cmds  # noqa: F401
from sa2va_tui.commands import run_cmds  # noqa: F401
from sa2va_tui.commands import report_cmds  # noqa: F401
