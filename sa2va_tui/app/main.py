"""The Textual app: one dashboard over an event source (a supervisor of ours, or the log
watcher of `watch`), with keys and buttons that steer the experiments.

Thread model: the source calls `Inbox` on its own thread; the dashboard reads the
source's states on a timer (`REFRESH_HZ`) when something changed and once a second
for the clocks; anything that may block (control calls, quitting, reading a log file)
runs in a thread worker; every failure on the way ends in `Dashboard.problem`.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Callable

from rich.markup import escape
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, ContentSwitcher, Footer, RichLog
from textual.worker import Worker, WorkerState

from sa2va_tui.app.inbox import Inbox, SourceEvent
from sa2va_tui.app.logview import LogView
from sa2va_tui.app.screens import ConfirmScreen, HelpScreen
from sa2va_tui.app.source import AppSource
from sa2va_tui.app.widgets import (
    CardView,
    ExperimentCard,
    GpuPanel,
    GpuView,
    MetricsPanel,
    MetricsView,
    TALL,
    TitleBar,
    event_line,
)
from sa2va_contract.events import MASK_STAGE, Failed, PairsReady
from sa2va_contract.recovery import RestartPlan
from sa2va_tui.text import describe
from sa2va_tui.runstate import ExperimentState, StateBook

#: Redraws a second at most, however fast events arrive.
REFRESH_HZ = 4
#: Clocks (ETA, finish time) tick this often even when no event arrives.
CLOCK_S = 1.0


class Problem(Message):
    """Something the user must know went wrong (a control call, a background task, a log record)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class Note(Message):
    """A line of the app's own for the event log: a request made, quitting."""

    def __init__(self, who: str, text: str) -> None:
        super().__init__()
        self.who, self.text = who, text


class ProblemLogHandler(logging.Handler):
    """Warnings logged in this process (the supervisor's among them) become event-log
    lines, instead of text printed across the screen."""

    def __init__(self, post: Callable[[Message], object]) -> None:
        super().__init__(logging.WARNING)
        self._post = post

    def emit(self, record: logging.LogRecord) -> None:
        self._post(Problem(f"{record.name}: {record.getMessage()}"))


class Dashboard(Screen):
    """Cards, metrics, GPUs and the event log of one source; the keys act on the
    selected experiment."""

    BINDINGS = [
        Binding("tab", "select_next", "select", key_display="tab/1-9", priority=True),
        Binding("shift+tab", "select_next(-1)", "select previous", show=False, priority=True),
        *(Binding(str(n), f"select({n - 1})", f"select experiment {n}", show=False) for n in range(1, 10)),
        Binding("p", "toggle_pause", "pause/resume"),
        Binding("r", "restart", "restart"),
        Binding("s", "stop", "stop"),
        Binding("l", "toggle_log", "log"),
        Binding("question_mark,f1", "help", "help", key_display="?"),
        Binding("q", "app.quit", "quit"),
    ]
    #: Actions that need a worker of ours.
    CONTROL_ACTIONS = ("toggle_pause", "restart", "stop")

    def __init__(self, source: AppSource, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.source = source
        self._clock = clock
        self.inbox = Inbox(self.post_message)
        self.selected: str | None = None
        self.states: dict[str, ExperimentState] = {}
        self._cards: dict[str, ExperimentCard] = {}
        self._last_draw = float("-inf")
        self._tailing: str | None = None
        self._quitting = False
        self._unsubscribe: Callable[[], None] | None = None
        self._log_handler = ProblemLogHandler(self.post_message)

    # --- layout ----------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield TitleBar(id="title")
        with Horizontal(id="toolbar"):
            buttons = [("Pause", "toggle_pause"), ("Restart", "restart"), ("Stop", "stop")]
            if self.source.control is None:
                buttons = []  # watching: nothing here can pause, stop or restart them
            for label, action in (*buttons, ("Log", "toggle_log"), ("Help", "help"), ("Quit", "app.quit")):
                yield Button(label, id=action.replace("app.", ""), name=action, compact=True)
        with VerticalScroll(id="main", can_focus=False):
            yield VerticalScroll(id="cards", can_focus=False)
            with Vertical(id="side"):
                yield MetricsPanel(id="metrics")
                yield GpuPanel(id="gpus")
        with ContentSwitcher(id="bottom", initial="events"):
            yield RichLog(id="events", max_lines=2000, markup=True, wrap=True, min_width=20)
            yield LogView(id="logtail")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#metrics").border_title = "metrics"
        self.query_one("#gpus").border_title = "GPUs"
        self.query_one("#bottom").border_title = "events"
        logging.getLogger().addHandler(self._log_handler)
        self._unsubscribe = self.source.hub.subscribe(self.inbox)
        self.redraw()
        self.set_interval(1 / REFRESH_HZ, self._tick)
        if self.source.start is not None:
            self._start_source()

    def on_unmount(self) -> None:
        logging.getLogger().removeHandler(self._log_handler)
        if self._unsubscribe is not None:
            self._unsubscribe()

    @work(thread=True, exit_on_error=False, group="control")
    def _start_source(self) -> None:
        """Start the source after subscribing, so that the event log sees its first events."""
        assert self.source.start is not None
        self.source.start()

    # --- drawing ---------------------------------------------------------------------

    def _tick(self) -> None:
        now = self._clock()
        if self.inbox.take_dirty() or now - self._last_draw >= CLOCK_S:
            self.redraw()

    def redraw(self) -> None:
        """Read the source's states once and show them everywhere."""
        now = self._clock()
        self._last_draw = now
        previous = self.states.get(self.selected or "")
        states = self.source.hub.states()
        stage = self.source.hub.stage()
        # The mask stage's card comes after the experiments' (their numbers, the keys
        # that select them, stay as they were); it is selected and steered like them.
        self.states = {**states, **({MASK_STAGE: stage} if stage is not None else {})}
        if not self._cards.keys() >= self.states.keys():
            self._add_cards([name for name in self.states if name not in self._cards])
        rewards = {name: self.inbox.rewards(name) for name in states}
        for number, (name, state) in enumerate(states.items(), start=1):
            self._cards[name].show(CardView.of(number, state, rewards[name], now))
        if stage is not None:
            self._cards[MASK_STAGE].show(CardView.of_stage(len(states) + 1, stage, now))
        self.query_one(TitleBar).show(
            TitleBar.view_of(self.source.title, states, StateBook(states).finish_time(now), now))
        self.query_one(MetricsPanel).show(MetricsView.of(states, rewards))
        self.query_one(GpuPanel).show(GpuView.of(self.inbox.gpus(), states, self.source.samples_gpus))
        current = states.get(self.selected or "")
        if previous is None or current is None or previous.state != current.state:
            self._controls_changed()

    def _add_cards(self, names: list[str]) -> None:
        cards = [ExperimentCard(name) for name in names]
        self._cards.update(zip(names, cards))
        self.query_one("#cards").mount_all(cards)
        if self.selected is None and names:
            self.select(names[0])

    def _controls_changed(self) -> None:
        """The footer and the buttons follow what the selected experiment allows."""
        self.refresh_bindings()
        state = self.states.get(self.selected or "")
        for button in self.query("#toolbar Button").results(Button):
            button.disabled = not self.check_action(button.name or "", ())
            if button.id == "toggle_pause":
                button.label = "Resume" if state and state.state == "paused" else "Pause"

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action not in self.CONTROL_ACTIONS:
            return True
        if self.source.control is None:
            return False  # hidden: experiments started elsewhere are not ours to steer
        state = self.states.get(self.selected or "")
        if state is None:
            return None  # shown, greyed: there is nothing here to act on yet
        allowed = {
            "toggle_pause": state.state in ("running", "paused"),
            "stop": (state.state in ("running", "paused") and state.pid is not None) or state.state == "queued",
            # The stage is started again by `resume`, not restarted on its own.
            "restart": state.state not in ("finished", "restarting") and state.name != MASK_STAGE,
        }[action]
        return True if allowed else None

    # --- selection -------------------------------------------------------------------

    def select(self, name: str) -> None:
        if name not in self._cards:
            return
        self.selected = name
        for card_name, card in self._cards.items():
            card.set_class(card_name == name, "-selected")
        self._cards[name].scroll_visible(animate=False)
        self._controls_changed()
        if self._tailing is not None:
            self._show_log(name)

    def action_select(self, index: int) -> None:
        names = list(self._cards)
        if 0 <= index < len(names):
            self.select(names[index])

    def action_select_next(self, step: int = 1) -> None:
        names = list(self._cards)
        if names:
            at = names.index(self.selected) if self.selected in names else -step
            self.select(names[(at + step) % len(names)])

    @on(ExperimentCard.Chosen)
    def _card_chosen(self, message: ExperimentCard.Chosen) -> None:
        self.select(message.name)

    @on(Button.Pressed, "#toolbar Button")
    async def _button(self, event: Button.Pressed) -> None:
        event.stop()
        await self.run_action(event.button.name or "")

    # --- control ---------------------------------------------------------------------

    def action_toggle_pause(self) -> None:
        state = self.states.get(self.selected or "")
        if state is not None:
            self._control("resume" if state.state == "paused" else "pause", state.name)

    def action_stop(self) -> None:
        if self.selected:
            self._control("stop", self.selected)

    def action_restart(self) -> None:
        control, name = self.source.control, self.selected
        if control is None or name is None:
            return
        try:
            plan = control.restart_plan(name)
        except Exception as err:  # noqa: BLE001 - shown, not raised into the event loop
            self.problem(f"restart {name}: {err}")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._control("restart", name, plan)

        self.app.push_screen(ConfirmScreen(f"Restart {name}?", restart_question(name, plan), yes="Restart"), answered)

    @work(thread=True, exit_on_error=False, group="control")
    def _control(self, verb: str, name: str, *args: object) -> None:
        """One control call, off the event loop (a restart spawns a process)."""
        assert self.source.control is not None
        self.post_message(Note(name, f"{verb} requested"))
        try:
            getattr(self.source.control, verb)(name, *args)
        except Exception as err:  # noqa: BLE001 - any refusal is shown, none escapes
            self.post_message(Problem(f"{verb} {name}: {err}"))

    # --- quitting --------------------------------------------------------------------

    def confirm_quit(self) -> None:
        if self._quitting or isinstance(self.app.screen, ConfirmScreen):
            return
        running = [s.name for s in self.states.values() if not s.terminal and s.pid is not None]
        if self.source.control is None:
            body = "The experiments keep running; only the watching ends."
        elif running:
            body = (f"Stops {len(running)} running experiment{'s' if len(running) > 1 else ''} "
                    f"({', '.join(running)}): each saves a checkpoint first (at most "
                    f"{self.source.stop_grace_s:g} s); `sa2va-tui resume` continues them.")
        else:
            body = "No experiment is running."

        def answered(yes: bool | None) -> None:
            if yes and not self._quitting:
                self._quitting = True
                self._quit()

        self.app.push_screen(ConfirmScreen("Quit sa2va-tui?", body, yes="Quit"), answered)

    @work(thread=True, exit_on_error=False, group="quit")
    def _quit(self) -> None:
        self.post_message(Note("sa2va-tui", "stopping every worker gracefully…"))
        self.source.hub.shutdown(self.source.stop_grace_s)
        failed = any(s.state == "failed" for s in self.source.hub.states().values())
        self.app.call_from_thread(self.app.exit, return_code=1 if failed else 0)

    # --- views of the bottom panel ---------------------------------------------------

    def action_toggle_log(self) -> None:
        if self._tailing is None and self.selected:
            self._show_log(self.selected)
        else:
            self._tailing = None
            self.query_one(LogView).stop()
            self.query_one(ContentSwitcher).current = "events"
            self.query_one("#bottom").border_title = "events"

    def _show_log(self, name: str) -> None:
        path = self.source.log_path(name)
        self._tailing = name
        self.query_one(ContentSwitcher).current = "logtail"
        self.query_one("#bottom").border_title = f"log of {name}: {path}" if path else f"log of {name}: unknown"
        self.query_one(LogView).follow(Path(path) if path is not None else None)

    # --- the event log ---------------------------------------------------------------

    @on(SourceEvent)
    def _source_event(self, message: SourceEvent) -> None:
        event = message.event
        found = describe(event)
        if isinstance(event, PairsReady):
            found = f"pairs ready for {escape(event.ready_for)} ({event.pairs})", "green"
        if found is not None:
            self._log_line(event.time, event.experiment, *found)
        if isinstance(event, Failed):
            self.app.bell()
            self.notify(f"{event.experiment} failed ({event.kind}): {event.message}", severity="error",
                        markup=False)

    @on(Note)
    def _note(self, message: Note) -> None:
        self._log_line(self._clock(), message.who, escape(message.text), "dim")

    def _log_line(self, when: float, who: str, text: str, style: str = "") -> None:
        # expand: wrap at the panel's width, not at the console's default of 80 columns.
        self.query_one("#events", RichLog).write(event_line(when, who, text, style), expand=True)

    @on(Problem)
    def _problem(self, message: Problem) -> None:
        self.problem(message.text)

    def problem(self, text: str) -> None:
        """The one place where whatever went wrong is shown: a red event-log line and a toast."""
        self._log_line(self._clock(), "sa2va-tui", escape(text), "bold red")
        self.notify(text, severity="error", markup=False)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            self.problem(f"{event.worker.name}: {event.worker.error}")

    def action_help(self) -> None:
        watching = self.source.control is None
        keys = [(b.key_display or b.key, b.description, not (watching and b.action in self.CONTROL_ACTIONS))
                for b in self.BINDINGS if isinstance(b, Binding) and b.show]
        self.app.push_screen(HelpScreen(keys, watching))


def restart_question(name: str, plan: RestartPlan) -> Content:
    """What the restart confirmation says will happen."""
    origin = f"its checkpoint at step {plan.resume_step:,}" if plan.resume_step is not None else "the start"
    lines = [Content(f"{name} stops (if it runs) and a new process resumes from {origin}.")]
    if plan.after_oom and plan.batch_size != plan.previous_batch_size:
        lines.append(Content.assemble(("batch size ", "bold"), f"{plan.previous_batch_size} → ",
                                      (str(plan.batch_size), "bold $warning"),
                                      "  (halved: the last attempt ran out of GPU memory)"))
    elif plan.after_oom:
        lines.append(Content.styled(f"batch size {plan.batch_size}: no smaller size is allowed above the floor",
                                    "$warning"))
    else:
        lines.append(Content.assemble(("batch size ", "bold"), str(plan.batch_size)))
    if plan.placed_by:
        device = f"where {plan.placed_by} places it" + (" (another node if one can take it)" if plan.after_oom else "")
    else:
        device = ("CPU" if plan.gpu is None else f"GPU {plan.gpu}") + (" (most free memory now)" if plan.after_oom else "")
    lines.append(Content.assemble(("device ", "bold"), device))
    return Content("\n").join(lines)


class Sa2vaApp(App[int]):
    """sa2va-tui's dashboard over one event source."""

    CSS_PATH = "app.tcss"
    TITLE = "sa2va-tui"
    ENABLE_COMMAND_PALETTE = False
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (36, TALL)]

    def __init__(self, source: AppSource, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.source = source
        self.dashboard = Dashboard(source, clock)

    def get_default_screen(self) -> Screen:
        return self.dashboard

    async def action_quit(self) -> None:
        """Ask first, then stop the workers gracefully (ctrl+q and q both come here)."""
        self.dashboard.confirm_quit()


def run_app(source: AppSource) -> int:
    """Show `source` until the user quits; every worker is stopped on the way out, even
    if the app itself failed. Returns the exit code (1 when an experiment failed)."""
    app = Sa2vaApp(source)
    try:
        app.run()
    finally:
        if source.control is not None and not source.hub.done:
            # The app ended without its own graceful quit (it failed): say why we wait.
            print(f"sa2va-tui: stopping every experiment (at most {source.stop_grace_s:g} s)", file=sys.stderr)
        source.hub.shutdown(source.stop_grace_s)
    if app.return_code not in (0, None):
        return app.return_code
    return 1 if any(s.state == "failed" for s in source.hub.states().values()) else 0
