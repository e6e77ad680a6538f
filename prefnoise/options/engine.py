"""Where a command runs: this process (``local``) or a Ray cluster (``ray``), shared by every command that
can run on Ray (``--engine``, ``--ray-address``, ``--workers``)."""

from __future__ import annotations

from dataclasses import dataclass

from prefnoise.options.ranges import OptionError, Options

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class EngineOptions(Options):
    """``engine``: ``local`` (one process, the default) or ``ray`` (Ray Data; needs ``prefnoise[ray]``).
    ``ray_address``: join that running cluster (``auto``, ``ray://host:10001``, ``host:6379``) instead of
    starting a local one. ``workers``: CPU slots of the local cluster, and at most that many blocks at once."""

    engine: str = "local"
    ray_address: str | None = None
    workers: int | None = None

    def check(self) -> None:
        """``engine`` names an engine; ``ray_address`` and ``workers`` apply to ``ray`` only."""
        if self.engine not in ENGINES:
            raise OptionError("engine", f"must be one of: {', '.join(ENGINES)}; got {self.engine!r}")
        if self.engine != "ray":
            for name in ("ray_address", "workers"):
                if getattr(self, name) is not None:
                    raise OptionError(name, f"applies to {{engine}}=ray only (got engine {self.engine!r})",
                                      mentions=("engine",))
        if self.ray_address is not None and not self.ray_address.strip():
            raise OptionError("ray_address", "is empty; give the cluster's address or leave it out")

    @property
    def distributed(self) -> bool:
        """Whether the work runs on Ray."""
        return self.engine == "ray"
