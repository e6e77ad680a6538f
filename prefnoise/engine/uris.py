"""Inputs and outputs named by any pyarrow filesystem URI (``s3://``, ``gs://``, ``hdfs://``, ``file://``).

A local path (or a ``file://`` URI) is used as it is, with every safety rule of :mod:`prefnoise.outputs`
(lock, no-replace publish, temporary + rename, umask). A remote input is copied into a private local
directory first; a remote output is written locally by the same writer (so its bytes equal a local
run's), then uploaded under a temporary name and moved onto its name. An existing remote file is replaced
under the local rule: only an earlier prefnoise output (a Parquet file carrying prefnoise's provenance, read
from its footer), only with ``overwrite``, and only while it is still the file checked at the start.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from prefnoise.errors import PrefnoiseError
from prefnoise.outputs import check_replaceable, stream_written_by_prefnoise

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


def _info(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except (pa.ArrowException, OSError) as error:
        raise PrefnoiseError(f"{path}: cannot reach it ({str(error).strip().splitlines()[0]})") from None


@contextlib.contextmanager
def readable_path(path: str | Path) -> Iterator[str | Path]:
    """A local path holding the input ``path``: itself when local, else a private copy removed at the end."""
    if not is_remote(path):
        yield local_path(path)
        return
    fs, inside = filesystem_of(str(path))
    if _info(fs, inside).type == pafs.FileType.NotFound:
        raise PrefnoiseError(f"{path}: not found; check the URI and its credentials")
    staging = Path(tempfile.mkdtemp(prefix="prefnoise-in-"))
    try:
        target = staging / (PurePosixPath(inside).name or "input")
        pafs.copy_files(inside, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield str(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remote_ours(fs: pafs.FileSystem, inside: str) -> bool:
    """Whether the remote file is one prefnoise wrote: its head and Parquet footer read as a local file's."""
    try:
        with fs.open_input_file(inside) as handle:
            return stream_written_by_prefnoise(handle)
    except (pa.ArrowException, OSError):  # unreadable: not provably ours
        return False


def check_remote_output(dest: str | Path, *, overwrite: bool, flag: str = "OUT") -> tuple[int, int] | None:
    """Refuse a remote ``dest`` that is a directory, or an existing file prefnoise may not replace under the
    local rule (:func:`prefnoise.outputs.check_replaceable`: only an earlier prefnoise output, and only with
    ``overwrite``). Returns the existing file's identity (size, mtime in ns) or None when there is none."""
    if not is_remote(dest):
        return None
    fs, inside = filesystem_of(str(dest))
    info = _info(fs, inside)
    if info.type == pafs.FileType.Directory:
        raise PrefnoiseError(f"{flag} {dest}: is a directory; give a file name")
    if info.type == pafs.FileType.NotFound:
        return None
    check_replaceable(dest, suffix=PurePosixPath(inside).suffix, ours=lambda: _remote_ours(fs, inside),
                      overwrite=overwrite, flag=flag)
    return info.size, info.mtime_ns


@contextlib.contextmanager
def writable_path(dest: str | Path | None, *, overwrite: bool, flag: str = "OUT") -> Iterator[str | Path | None]:
    """A local path to write ``dest`` to: itself when local (or None), else a private local file whose
    content is uploaded to ``dest`` when the block succeeds (under a temporary name, then moved onto
    ``dest``, and only while ``dest`` is still what the first check accepted)."""
    if dest is None or not is_remote(dest):
        yield None if dest is None else local_path(dest)
        return
    accepted = check_remote_output(dest, overwrite=overwrite, flag=flag)
    fs, inside = filesystem_of(str(dest))
    staging = Path(tempfile.mkdtemp(prefix="prefnoise-out-"))
    try:
        local = staging / PurePosixPath(inside).name
        yield str(local)
        if check_remote_output(dest, overwrite=overwrite, flag=flag) != accepted:  # another writer came
            raise PrefnoiseError(f"{flag} {dest}: changed while this run wrote it; nothing was replaced, "
                                 "check who else writes there and run again")
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
