"""The engine keywords of pn.* calls that can run on Ray (``engine``, ``ray_address``, ``workers``):
their options object, the Ray session, and inputs/outputs named by filesystem URIs under ``engine="ray"``."""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from prefnoise.engine import (
    RaySession,
    is_remote,
    ray_session,
    readable_path,
    require_ray,
    uri_scheme,
    writable_path,
)
from prefnoise.errors import PrefnoiseError
from prefnoise.options import EngineOptions

# Why a URI is refused: the local engine reads and writes local paths only; some paths stay local on Ray too.
URI_NEEDS_RAY = ("a filesystem URI is read and written with --engine ray only (docs/distributed.md); "
                 "add --engine ray or give a local path")
MODEL_STAYS_LOCAL = ("a filesystem URI; model directories are local paths, with --engine ray too (on every node: "
                     "docs/distributed.md), copy it to this machine")
URI_STAYS_LOCAL = "a filesystem URI; this path is local even with --engine ray (docs/distributed.md), give a local path"


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


def refuse_uris(paths: Iterable[tuple[str, Any]], why: str = URI_STAYS_LOCAL) -> None:
    """A one-line PrefnoiseError (exit 2) for the first of ``paths`` ((flag, path or None) pairs) that is a URI."""
    for flag, path in paths:
        if isinstance(path, str | Path) and uri_scheme(path) is not None:
            raise PrefnoiseError(f"{flag} {path}: {why}")


def _remote_key(uri: str | Path) -> tuple[str, str, str]:
    """(scheme, host or bucket, normalised path) of a remote URI: two names of one object compare equal."""
    parsed = urlparse(str(uri))
    return parsed.scheme.lower(), parsed.netloc, posixpath.normpath("/" + unquote(parsed.path).lstrip("/"))


def _check_remote_targets(data: Any, outs: list[tuple[str, str | Path | None]]) -> None:
    """Refuse a remote output that names the remote input or another output (locally, check_output_file
    does this; two private local copies of remote files never compare equal)."""
    seen = {_remote_key(data): None} if isinstance(data, str | Path) and is_remote(data) else {}
    for flag, dest in outs:
        if dest is None or not is_remote(dest):
            continue
        key = _remote_key(dest)
        if key in seen and seen[key] is None:
            raise PrefnoiseError(f"{flag} {dest}: is the input {data}; prefnoise never writes over an input, "
                                 "give another name")
        if key in seen:
            raise PrefnoiseError(f"{seen[key]} and {flag} name the same file; give each its own")
        seen[key] = flag


@contextlib.contextmanager
def engine_paths(
    options: EngineOptions, data: Any, outs: Sequence[str | Path | None], *, overwrite: bool,
    flags: Sequence[str] = (),
) -> Iterator[tuple[Any, list[str | Path | None]]]:
    """(input, outputs) as local paths for the block: under ``engine="ray"`` a filesystem URI (s3://, gs://,
    file://, ...) is read through a private copy and written by upload on success (prefnoise.engine.uris);
    every local path passes through unchanged, and the local engine refuses URIs (one line, exit 2).
    ``flags`` name the outputs in messages (default OUT)."""
    named = list(zip([*flags, *["OUT"] * (len(outs) - len(flags))], outs))
    if not options.distributed:
        refuse_uris([("DATA", data), *named], URI_NEEDS_RAY)
        yield data, list(outs)
        return
    _check_remote_targets(data, named)
    with contextlib.ExitStack() as stack:
        local_data = stack.enter_context(readable_path(data)) if isinstance(data, str | Path) else data
        local_outs = [stack.enter_context(writable_path(out, overwrite=overwrite, flag=flag))
                      for flag, out in named]
        yield local_data, local_outs


def name_input(src: Any, data: Any) -> None:
    """Name a remote input by its URI (not its private local copy) in messages, summaries and provenance."""
    if isinstance(data, str | Path) and is_remote(data):
        src.name = str(data)
        if src.source is not None:
            src.source.name = str(data)
