"""What makes audit's stacked fold models cheaper without changing a number (issue 23 item 2): the finiteness
check's fast path, glibc keeping freed memory, OpenMP threads sleeping instead of spinning."""

from __future__ import annotations

import os
import platform
import signal

import pytest
import torch
from torch import nn

import prefnoise.__main__ as entry
from prefnoise.training.finite import first_nonfinite_parameter
from prefnoise.training.memory import keep_freed_memory


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_first_nonfinite_parameter_names_the_broken_weight(bad):
    model = _model()
    assert first_nonfinite_parameter(model) is None
    with torch.no_grad():
        model[2].weight[0, 1] = bad
    assert first_nonfinite_parameter(model) == "2.weight"


def test_opposite_infinities_and_huge_finite_weights():
    model = _model()
    with torch.no_grad():
        model[0].weight.fill_(3.0e38)  # finite, its float32 sum would overflow: the float64 sum does not
    assert first_nonfinite_parameter(model) is None
    with torch.no_grad():
        model[0].bias[0], model[0].bias[1] = float("inf"), float("-inf")  # the sum is nan
    assert first_nonfinite_parameter(model) == "0.bias"


def test_frozen_parameters_are_not_checked():
    model = _model()
    model[0].weight.requires_grad_(False)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    assert first_nonfinite_parameter(model) is None


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_is_set_on_glibc():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # once is enough; a second call changes nothing


def test_the_cli_lets_openmp_threads_sleep_unless_the_user_chose(monkeypatch):
    import prefnoise.cli

    monkeypatch.setattr(prefnoise.cli, "main", lambda: None)
    ended = []
    monkeypatch.setattr(entry, "end_process", ended.append)  # the real one ends the process (os._exit)
    handlers = {sig: signal.getsignal(sig) for sig in (*entry.STARTUP_SIGNALS, signal.SIGINT)}
    try:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        entry.run()
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
        monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
        entry.run()
        assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
        assert ended == [0, 0]
    finally:  # run() installs its own signal handlers: the test process gets its own back
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
