"""Run one experiment in the foreground, for debugging: no supervisor, events printed.

    python -m experiments.run_one -c configs/quick.yaml prompt_rl --out /tmp/prompt_rl

Ctrl+C asks the experiment to save and stop, as the supervisor's stop does.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from experiments.harness import Control, WorkerContext, run_experiment
from sa2va_contract.config import ConfigError, load_config
from sa2va_contract.events import Event, Failed
from sa2va_contract.kinds import resolve_entry


def _print_event(event: Event) -> None:
    fields = {k: v for k, v in event.to_dict().items() if k not in ("type", "experiment", "time")}
    print(f"[{event.experiment}] {event.type}: " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)


class PrintSink:
    """Prints every event; progress and phase, which may come every step, once a second."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def emit(self, event: Event) -> None:
        if event.supersedes:
            now = time.monotonic()
            if now - self._last.get(event.type, 0.0) < 1.0:
                return
            self._last[event.type] = now
        _print_event(event)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.run_one", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="experiment name in the config (a kind or a variant)")
    parser.add_argument("-c", "--config", type=Path, help="YAML config (default: built-in defaults)")
    parser.add_argument("-s", "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--out", type=Path, required=True, help="the experiment's folder")
    parser.add_argument("--resume", type=Path, help="checkpoint to resume from")
    parser.add_argument("--batch-size", type=int, help="override the batch size (as OOM recovery does)")
    parser.add_argument("--gpu", type=int, help="the GPU to use (default: CPU)")
    parser.add_argument("--entry", help="'module:function' to run instead of the kind's registered entry")
    args = parser.parse_args(argv)
    if args.gpu is not None:
        # As in a supervised worker: set before the experiment imports torch.
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    experiments = config.experiments()
    if args.name not in experiments:
        print(f"error: {args.name!r} is not an enabled experiment (enabled: {', '.join(experiments)})", file=sys.stderr)
        return 2
    experiment = experiments[args.name]

    control = Control()
    signal.signal(signal.SIGINT, lambda *_: control.stop("interrupted"))
    ctx = WorkerContext(
        name=args.name, config=config, experiment=experiment, exp_dir=args.out, sink=PrintSink(),
        control=control, gpu=args.gpu, resume_from=args.resume, batch_size_override=args.batch_size,
    )
    outcome = run_experiment(ctx, args.entry or resolve_entry(experiment.kind))
    _print_event(outcome)
    return 1 if isinstance(outcome, Failed) else 0


if __name__ == "__main__":
    sys.exit(main())
