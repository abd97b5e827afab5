"""Adversarial checks of compressor.load's fast path: the empty build, the read-ahead thread and its lookup hooks."""

from __future__ import annotations

import threading

import torch
from torch import nn

from compressor.model import build_empty


def test_overlapping_builds_in_two_threads_leave_register_parameter_as_it_was_and_other_threads_alone():
    """Two loads building at once (A starts, B starts, A ends, B ends): each thread replacing and restoring
    nn.Module.register_parameter alone left the first one's replacement installed for good, so that every module
    built afterwards, anywhere in the process, had its parameters on meta; and a thread that only builds a plain
    module while a load runs must get real parameters."""
    original = nn.Module.register_parameter
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    built: dict[str, nn.Module] = {}

    def build_a() -> nn.Module:
        a_in.set()
        assert b_in.wait(10)
        return nn.Linear(2, 2)

    def build_b() -> nn.Module:
        b_in.set()
        assert a_out.wait(10)
        return nn.Linear(2, 2)

    def run_a() -> None:
        built["a"] = build_empty(build_a)
        a_out.set()

    first = threading.Thread(target=run_a)
    first.start()
    assert a_in.wait(10)
    second = threading.Thread(target=lambda: built.setdefault("b", build_empty(build_b)))
    second.start()
    assert b_in.wait(10)
    during = nn.Linear(3, 3)  # this thread builds no artifact: its module is its own
    first.join(10)
    second.join(10)
    try:
        assert not during.weight.is_meta
        assert built["a"].weight.is_meta and built["b"].weight.is_meta
        assert nn.Module.register_parameter is original
        assert not nn.Linear(2, 2).weight.is_meta
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
