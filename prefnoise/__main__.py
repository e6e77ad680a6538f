"""``python -m prefnoise`` and the ``prefnoise`` script: the CLI, once the address-space limit lets it load."""

from __future__ import annotations

import signal
import sys
from typing import Any

from prefnoise.resources import address_space_problem

EXIT_SIGNAL_BASE = 128  # a command stopped by signal N exits 128 + N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)
STARTUP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_at_startup(signum: int, frame: Any) -> None:
    """A signal while the libraries load (seconds; minutes on a loaded machine): nothing is written yet,
    so stop at once with the documented exit code and one line, never a traceback or a raw signal death."""
    what = "Interrupted" if signum == signal.SIGINT else f"Terminated ({signal.Signals(signum).name})"
    sys.stderr.write(f"{what} while starting; no output was written.\n")
    raise SystemExit(EXIT_SIGNAL_BASE + signum)


def run() -> None:
    """Refuse in one line an address-space limit (ulimit -v) too small to load the libraries; run the CLI."""
    for sig in STARTUP_SIGNALS:  # each command installs its own handlers once it runs (prefnoise.cli.common)
        signal.signal(sig, stop_at_startup)
    problem = address_space_problem()
    if problem is not None:
        print(f"Error: {problem}", file=sys.stderr)
        sys.exit(2)
    from prefnoise.cli import main  # reason: loads polars/pyarrow, which crash under a too-small limit

    signal.signal(signal.SIGINT, signal.default_int_handler)  # commands catch Ctrl-C as KeyboardInterrupt
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside a command (parsing the options): nothing was written
        sys.stderr.write("Interrupted; no output was written.\n")
        sys.exit(EXIT_SIGNAL_BASE + signal.SIGINT)


if __name__ == "__main__":
    run()
