"""Entry point of the `sa2va-tui` console command."""

from sa2va_tui.app_cli import app, main

__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
