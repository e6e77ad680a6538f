"""A Ray session for ``--engine ray``: Ray is optional (``prefnoise[ray]``), started quietly or joined.

Ray is imported inside the functions here (never at module import): the local engine must not pay for
it, and a missing Ray must be a one-line error naming the extra, not an ImportError at startup.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefnoise.errors import PrefnoiseError
from prefnoise.options.engine import EngineOptions

RAY_MISSING = "--engine ray needs Ray: pip install 'prefnoise[ray]'"
LOCAL = "local"  # ray.init's address for "start a new local cluster" (ignores RAY_ADDRESS)
# Whether Ray's Python loggers and warnings reach stderr. Off: a library's noise is not the user's to act on
# (the CLI turns it on with --debug). Ray Data's progress bars stay off either way (prefnoise draws its own),
# and so does the forwarding of the workers' output (it would land on the command's stdout).
RAY_OUTPUT: ContextVar[bool] = ContextVar("ray_output", default=False)


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or a PrefnoiseError (exit 2) naming the ``prefnoise[ray]`` extra."""
    try:
        import ray  # ray: optional (the prefnoise[ray] extra), loaded only for --engine ray
        import ray.data  # noqa: F401  # ray.data: the engine runs on Ray Data, which ray[data] brings
    except ImportError:
        raise PrefnoiseError(RAY_MISSING) from None
    return ray


@dataclass(frozen=True)
class RaySession:
    """A running Ray session: ``workers`` is how many blocks run at once (the local cluster's CPU slots,
    ``--workers`` when given, else the joined cluster's CPUs); ``started`` whether prefnoise started it."""

    workers: int
    started: bool
    address: str | None


def _quiet_ray_data(ray: Any) -> None:
    """Ray Data without progress bars and start-up lines on the console (stdout stays the command's); its
    loggers quiet unless :data:`RAY_OUTPUT`."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True  # blocks come back in input order: outputs equal local
    for name in ("print_on_execution_start", "enable_operator_progress_bars"):
        with contextlib.suppress(AttributeError):  # attributes of recent Ray Data only
            setattr(context, name, False)
    if not RAY_OUTPUT.get():
        for name in ("ray", "ray.data", "ray._private", "ray.data._internal"):
            logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet_ray_warnings() -> Iterator[None]:
    """Ray's Python warnings (deprecations of its own settings, fewer blocks than workers) silenced in the
    block, unless :data:`RAY_OUTPUT`. Deprecations too when Ray attributes them to its caller: only Ray's
    calls run in these blocks, and Ray's import puts its deprecations in front of any earlier filter."""
    with warnings.catch_warnings():
        if not RAY_OUTPUT.get():
            warnings.filterwarnings("ignore", module=r"ray(\.|$)")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def _runtime_env() -> dict[str, Any] | None:
    """Workers import prefnoise as the driver does: the driver's PYTHONPATH, led by this package's parent
    directory when prefnoise runs from a source tree (an installed prefnoise is each node's own install: a
    site-packages directory on their path could shadow the packages of another node's environment)."""
    root = Path(__file__).resolve().parents[2]
    installed = root.name in ("site-packages", "dist-packages")
    path = os.environ.get("PYTHONPATH", "")
    parts = [*([] if installed else [str(root)]), *[p for p in path.split(os.pathsep) if p and p != str(root)]]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(parts)}} if parts else None


def _init(ray: Any, options: EngineOptions) -> None:
    """Start a local Ray with ``options.workers`` CPUs, or join ``options.ray_address``, quietly."""
    # log_to_driver stays off even with RAY_OUTPUT: the workers' stdout would land on the command's stdout;
    # their output stays in Ray's session logs (/tmp/ray/session_latest/logs)
    quiet = {"include_dashboard": False, "logging_level": logging.INFO if RAY_OUTPUT.get() else logging.ERROR,
             "log_to_driver": False, "configure_logging": True}
    try:
        if options.ray_address is None:
            ray.init(address=LOCAL, num_cpus=options.workers, runtime_env=_runtime_env(), **quiet)
        else:  # a joined cluster's workers too: the driver's code where its nodes can reach it
            ray.init(address=options.ray_address, runtime_env=_runtime_env(), **quiet)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = options.ray_address or "a local cluster"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PrefnoiseError(f"--engine ray: cannot start or join Ray at {where} ({reason})") from None


@contextlib.contextmanager
def ray_session(options: EngineOptions) -> Iterator[RaySession]:
    """Ray for the block: a Ray already initialised in this process is used as it is (and left running);
    otherwise a local cluster with ``options.workers`` CPUs is started, or ``options.ray_address`` joined,
    and shut down (disconnected) at the end. Nothing is printed on stdout."""
    ray = require_ray()
    started = not ray.is_initialized()
    with quiet_ray_warnings():
        if started:
            _init(ray, options)
    try:
        with quiet_ray_warnings():
            _quiet_ray_data(ray)
        cpus = int(ray.cluster_resources().get("CPU", 1)) or 1
        workers = min(options.workers, cpus) if options.workers else cpus
        yield RaySession(workers=max(workers, 1), started=started, address=options.ray_address)
    finally:
        if started:
            ray.shutdown()
