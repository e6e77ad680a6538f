"""The engine keywords of pn.* calls that can run on Ray (``engine``, ``ray_address``, ``workers``):
their options object, the Ray session, and inputs/outputs named by filesystem URIs under ``engine="ray"``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prefnoise.engine import RaySession, is_remote, ray_session, readable_path, require_ray, writable_path
from prefnoise.options import EngineOptions


def engine_of(engine: str | EngineOptions, ray_address: str | None = None, workers: int | None = None) -> EngineOptions:
    """The checked EngineOptions of a call's engine keywords (``engine`` may be an EngineOptions itself,
    then the other two keep their defaults). ``engine="ray"`` without Ray installed is a PrefnoiseError."""
    if isinstance(engine, EngineOptions):
        if ray_address is not None or workers is not None:
            raise TypeError("give engine=EngineOptions(...) or ray_address=/workers=, not both")
        options = engine
    else:
        options = EngineOptions(engine=engine, ray_address=ray_address, workers=workers)
    if options.distributed:
        require_ray()
    return options


@contextlib.contextmanager
def engine_session(options: EngineOptions) -> Iterator[RaySession | None]:
    """The Ray session of ``engine="ray"`` for the block (None for the local engine)."""
    if not options.distributed:
        yield None
        return
    with ray_session(options) as session:
        yield session


@contextlib.contextmanager
def engine_paths(
    options: EngineOptions, data: Any, outs: Sequence[str | Path | None], *, overwrite: bool
) -> Iterator[tuple[Any, list[str | Path | None]]]:
    """(input, outputs) as local paths for the block: under ``engine="ray"`` a filesystem URI (s3://, gs://,
    file://, ...) is read through a private copy and written by upload on success (prefnoise.engine.uris);
    the local engine, and every local path, pass through unchanged."""
    if not options.distributed:
        yield data, list(outs)
        return
    with contextlib.ExitStack() as stack:
        local_data = stack.enter_context(readable_path(data)) if isinstance(data, str | Path) else data
        local_outs = [stack.enter_context(writable_path(out, overwrite=overwrite)) for out in outs]
        yield local_data, local_outs


def name_input(src: Any, data: Any) -> None:
    """Name a remote input by its URI (not its private local copy) in messages, summaries and provenance."""
    if isinstance(data, str | Path) and is_remote(data):
        src.name = str(data)
        if src.source is not None:
            src.source.name = str(data)
