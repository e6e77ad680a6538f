"""The test run's own set-up: the xdist groups that keep one Ray cluster and the timing-sensitive signal
tests on one worker take effect."""

from __future__ import annotations

import pytest


@pytest.mark.xdist_group("signals")
def test_xdist_groups_take_effect(request: pytest.FixtureRequest) -> None:
    """Under ``--dist loadgroup`` a grouped test's id carries its group: that suffix is what sends every
    test of the group to one worker. Without it (pytest 9.2 with xdist 3.8) the groups split silently:
    two workers each started a Ray cluster, and the signal tests ran at once."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not under xdist's --dist loadgroup")
    assert request.node.nodeid.endswith("@signals"), request.node.nodeid
