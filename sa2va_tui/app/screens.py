"""The dialogs over the dashboard: a confirmation and the help screen."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from sa2va_tui.analysis import legend


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question with what the answer will do; dismisses with True for yes."""

    BINDINGS = [
        Binding("y,enter", "answer(True)", "yes", show=False),
        Binding("n,escape", "answer(False)", "no", show=False),
    ]

    def __init__(self, title: str, body: Content | str, yes: str = "Yes", no: str = "Cancel") -> None:
        super().__init__()
        self._title, self._body, self._yes, self._no = title, body, yes, no

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog") as dialog:
            dialog.border_title = self._title
            yield Static(self._body, id="question")
            with Horizontal(id="answers"):
                yield Button(f"{self._yes} (y)", variant="primary", id="yes", compact=True)
                yield Button(f"{self._no} (n)", id="no", compact=True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class HelpScreen(ModalScreen[None]):
    """Every key, whether it is available here, and how to read the hints."""

    BINDINGS = [Binding("escape,question_mark,q,f1", "dismiss", "close")]

    def __init__(self, keys: list[tuple[str, str, bool]], watching: bool) -> None:
        super().__init__()
        self._keys = keys
        self._watching = watching

    def compose(self) -> ComposeResult:
        lines = [Content.styled("Keys", "bold")]
        for key, description, available in self._keys:
            text = Content.assemble((f"  {key:<10}", "bold $accent"), description)
            lines.append(text if available else text.stylize("$text-disabled") + Content.styled(
                "  (unavailable when watching)", "$text-muted"))
        lines += [
            Content("  mouse     click a card to select it, a button to act on it"),
            Content.styled("Hints (values that call for a look are yellow in the table)", "bold"),
            *(Content(f"  {rule}") for rule in legend()),
        ]
        if self._watching:
            lines.append(Content.styled(
                "Watching logs of experiments started elsewhere: they cannot be paused, stopped or restarted here.",
                "$warning"))
        with Vertical(id="dialog") as dialog:
            dialog.border_title = "Help"
            dialog.border_subtitle = "esc to close"
            yield Static(Content("\n").join(lines))
