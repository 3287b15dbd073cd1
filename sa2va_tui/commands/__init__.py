"""The CLI commands, one module per area; `sa2va_tui.cli` registers them all on the app."""
