"""Inputs and outputs named by any pyarrow filesystem URI (``s3://``, ``gs://``, ``hdfs://``, ``file://``).

A local path (or a ``file://`` URI) is used as it is, with every safety rule of :mod:`prefnoise.outputs`
(lock, no-replace publish, temporary + rename, umask). A remote input is copied into a private local
directory first; a remote output is written locally by the same writer (so its bytes equal a local
run's), then uploaded under a temporary name and moved onto its name, and only when the destination does
not exist yet, or with ``overwrite``.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from prefnoise.errors import PrefnoiseError

FILE_SCHEME = "file"


def uri_scheme(path: str | Path) -> str | None:
    """The URI scheme of ``path`` (``s3``, ``file``, ...), or None for a plain path (a drive letter is none)."""
    text = str(path)
    if "://" not in text:
        return None
    scheme = text.split("://", 1)[0]
    return scheme.lower() if scheme.isidentifier() or scheme.replace("+", "").isalnum() else None


def is_remote(path: str | Path) -> bool:
    """Whether ``path`` is a URI of a filesystem other than this machine's."""
    scheme = uri_scheme(path)
    return scheme is not None and scheme != FILE_SCHEME


def local_path(path: str | Path) -> str | Path:
    """``path`` as this machine's path: a ``file://`` URI becomes its path, anything else is returned as is."""
    if uri_scheme(path) == FILE_SCHEME:
        return unquote(urlparse(str(path)).path)
    return path


def filesystem_of(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a URI, or a one-line PrefnoiseError for one pyarrow cannot open."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, ValueError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PrefnoiseError(f"{uri}: cannot open this filesystem URI ({reason})") from None


def _kind(fs: pafs.FileSystem, path: str) -> Any:
    try:
        return fs.get_file_info(path).type
    except (pa.ArrowException, OSError) as error:
        raise PrefnoiseError(f"{path}: cannot reach it ({str(error).strip().splitlines()[0]})") from None


@contextlib.contextmanager
def readable_path(path: str | Path) -> Iterator[str | Path]:
    """A local path holding the input ``path``: itself when local, else a private copy removed at the end."""
    if not is_remote(path):
        yield local_path(path)
        return
    fs, inside = filesystem_of(str(path))
    kind = _kind(fs, inside)
    if kind == pafs.FileType.NotFound:
        raise PrefnoiseError(f"{path}: not found; check the URI and its credentials")
    staging = Path(tempfile.mkdtemp(prefix="prefnoise-in-"))
    try:
        target = staging / (PurePosixPath(inside).name or "input")
        pafs.copy_files(inside, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield str(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_remote_output(dest: str | Path, *, overwrite: bool, flag: str = "OUT") -> None:
    """Refuse a remote ``dest`` that is a directory, or that exists without ``overwrite``."""
    if not is_remote(dest):
        return
    fs, inside = filesystem_of(str(dest))
    kind = _kind(fs, inside)
    if kind == pafs.FileType.Directory:
        raise PrefnoiseError(f"{flag} {dest}: is a directory; give a file name")
    if kind == pafs.FileType.File and not overwrite:
        raise PrefnoiseError(f"{flag} {dest}: exists; pass --overwrite to replace it, or choose another name")


@contextlib.contextmanager
def writable_path(dest: str | Path | None, *, overwrite: bool, flag: str = "OUT") -> Iterator[str | Path | None]:
    """A local path to write ``dest`` to: itself when local (or None), else a private local file whose
    content is uploaded to ``dest`` when the block succeeds (under a temporary name, then moved)."""
    if dest is None or not is_remote(dest):
        yield None if dest is None else local_path(dest)
        return
    check_remote_output(dest, overwrite=overwrite, flag=flag)
    fs, inside = filesystem_of(str(dest))
    staging = Path(tempfile.mkdtemp(prefix="prefnoise-out-"))
    try:
        local = staging / PurePosixPath(inside).name
        yield str(local)
        check_remote_output(dest, overwrite=overwrite, flag=flag)  # again: another writer may have come
        parent = str(PurePosixPath(inside).parent)
        fs.create_dir(parent, recursive=True)
        temporary = f"{parent}/.{PurePosixPath(inside).name}.prefnoise-{uuid.uuid4().hex[:12]}"
        pafs.copy_files(str(local), temporary, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        try:
            fs.move(temporary, inside)
        except BaseException:
            with contextlib.suppress(Exception):  # best effort: the upload failed already
                fs.delete_file(temporary)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
