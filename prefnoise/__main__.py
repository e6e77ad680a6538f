"""``python -m prefnoise`` and the ``prefnoise`` script: the CLI, once the address-space limit lets it load."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from typing import Any, NoReturn

from prefnoise.resources import address_space_problem

EXIT_SIGNAL_BASE = 128  # a command stopped by signal N exits 128 + N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)
STARTUP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# torch's OpenMP threads sleep between parallel regions instead of spinning (read once, when torch loads; a
# value the user set wins): on a machine whose cores other processes share, spinning threads take those
# cores from the thread they wait for (4x the wall time of one audit at load 4 on 2 cores); results unchanged
OMP_WAIT_POLICY = "PASSIVE"


def stop_at_startup(signum: int, frame: Any) -> None:
    """A signal while the libraries load (seconds; minutes on a loaded machine): nothing is written yet,
    so stop at once with the documented exit code and one line, never a traceback or a raw signal death."""
    what = "Interrupted" if signum == signal.SIGINT else f"Terminated ({signal.Signals(signum).name})"
    sys.stderr.write(f"{what} while starting; no output was written.\n")
    raise SystemExit(EXIT_SIGNAL_BASE + signum)


def ignore_stop_signals_while_exiting() -> None:
    """Once the command has ended, its outputs are complete (or removed) and its exit code is set: a stop
    signal while the interpreter exits (atexit cleanup, then a second or more unloading torch) is ignored.
    Otherwise Python, which puts the default handlers back as it finalizes, ends the process raw (-2/-15) and
    the code is lost, or the startup handler prints "no output was written" after the outputs were written."""
    for sig in STARTUP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # SIG_IGN survives finalization; a Python handler does not


def run() -> None:
    """Refuse in one line an address-space limit (ulimit -v) too small to load the libraries; run the CLI."""
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)  # before anything imports torch
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
        code: Any = 0
    except KeyboardInterrupt:  # Ctrl-C outside a command (parsing the options): nothing was written
        sys.stderr.write("Interrupted; no output was written.\n")
        code = EXIT_SIGNAL_BASE + signal.SIGINT
    except SystemExit as stop:
        code = stop.code
    finally:
        ignore_stop_signals_while_exiting()
    end_process(code)


def end_process(code: Any) -> NoReturn:
    """End the process with exit status ``code`` (as ``sys.exit`` reads it) once the command is over: other
    Python threads joined and the atexit handlers run (prefnoise's locks and temporary files, the libraries'
    own), the standard streams flushed, then no interpreter teardown. Unloading torch and the other
    libraries module by module takes seconds, and a library's own thread that calls into the finalizing
    interpreter aborts the process (pyarrow's JSON read-ahead after a parse error: SIGABRT, exit -6)."""
    if code is not None and not isinstance(code, int):
        sys.stderr.write(f"{code}\n")
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()  # as the interpreter would before its atexit handlers
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    run()
