"""``python -m prefnoise`` and the ``prefnoise`` script: the CLI, once the address-space limit lets it load."""

from __future__ import annotations

import sys

from prefnoise.resources import address_space_problem


def run() -> None:
    """Refuse in one line an address-space limit (ulimit -v) too small to load the libraries; run the CLI."""
    problem = address_space_problem()
    if problem is not None:
        print(f"Error: {problem}", file=sys.stderr)
        sys.exit(2)
    from prefnoise.cli import main  # reason: loads polars/pyarrow, which crash under a too-small limit

    main()


if __name__ == "__main__":
    run()
