"""Engines a command can run on: ``--engine ray`` runs blocks of a table on a Ray cluster through Ray Data.

Ray is optional (``pip install 'prefnoise[ray]'``): this package imports it only inside a session.
The API other stages build on: :func:`ray_session` (start or join Ray), :func:`map_blocks` (work on each
block, results back in input order), :func:`readable_path` / :func:`writable_path` (any pyarrow
filesystem URI as a local path with the local safety rules).
"""

from prefnoise.engine.blocks import BlockFailed, BlockInfo, map_blocks
from prefnoise.engine.session import RAY_MISSING, RaySession, ray_session, require_ray
from prefnoise.engine.uris import (
    check_remote_output,
    filesystem_of,
    is_remote,
    local_path,
    readable_path,
    uri_scheme,
    writable_path,
)

__all__ = [
    "RAY_MISSING",
    "BlockFailed",
    "BlockInfo",
    "RaySession",
    "check_remote_output",
    "filesystem_of",
    "is_remote",
    "local_path",
    "map_blocks",
    "ray_session",
    "readable_path",
    "require_ray",
    "uri_scheme",
    "writable_path",
]
