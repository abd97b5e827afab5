"""Adversarial checks of compressor.load's fast path: the empty build, the read-ahead thread and its lookup hooks."""

from __future__ import annotations

import threading

import pytest
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


class _Helper:
    def __init__(self) -> None:
        self.table = torch.empty(4).fill_(1.0)


class _KeptInContainers(nn.Module):
    """Keeps tensors made by torch.empty where no attribute or buffer shows them: a list, a dict, a helper."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.cache = [torch.empty(4).fill_(2.0)]
        self.state = {"k": torch.empty(2).fill_(3.0)}
        self.helper = _Helper()


def test_build_empty_keeps_real_tensors_from_torch_empty_kept_in_a_container():
    module = build_empty(_KeptInContainers)
    assert module.linear.weight.is_meta  # still no parameter allocated
    assert torch.equal(module.cache[0], torch.full((4,), 2.0))  # on meta it would have no values at all
    assert torch.equal(module.state["k"], torch.full((2,), 3.0))
    assert torch.equal(module.helper.table, torch.ones(4))


def test_build_empty_of_transformers_models_still_takes_the_fast_way(monkeypatch):
    """A transformers model is built on the first try (its initialisation is skipped by no_init_weights, or runs
    on meta), with its buffers computed."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    import compressor.model as model

    plain_builds: list[int] = []
    real = model.parameters_on_meta
    monkeypatch.setattr(model, "parameters_on_meta", lambda: plain_builds.append(1) or real())
    configs = [
        (LlamaForCausalLM, LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1)),
        (BertModel, BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)),
    ]
    for cls, config in configs:
        module = build_empty(lambda: cls(config))
        assert all(p.is_meta for p in module.parameters())
        assert not any(b.is_meta for b in module.buffers())
    assert not plain_builds


def test_a_register_parameter_replaced_and_put_back_around_a_build_end_leaves_builds_working():
    """Another patcher replaces nn.Module.register_parameter while a build runs and puts back what it found (the
    build's replacement) after the build ended: the next build must not take its own replacement for torch's
    (which then called itself), and a patch someone else installs meanwhile is not overwritten."""
    from unittest import mock

    original = nn.Module.register_parameter
    inside, done = threading.Event(), threading.Event()

    def build() -> nn.Module:
        inside.set()
        assert done.wait(10)
        return nn.Linear(2, 2)

    worker = threading.Thread(target=lambda: build_empty(build))
    try:
        worker.start()
        assert inside.wait(10)
        patch = mock.patch.object(nn.Module, "register_parameter", autospec=True,
                                  side_effect=nn.Module.register_parameter)
        patch.start()
        done.set()
        worker.join(10)
        assert nn.Module.register_parameter is not original  # the other patcher's, left alone by the build
        patch.stop()  # puts back the build's replacement, after the build ended
        module = build_empty(lambda: nn.Linear(2, 2))
        assert module.weight.is_meta and not nn.Linear(2, 2).weight.is_meta
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


class _Huge(nn.Module):
    """A parameter no machine can allocate (2**46 float32 values, 256 TiB: more than x86-64's user address space),
    as one fused expert tensor of 40 GB is on a machine of 24 GB, and a buffer its constructor computes."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.Parameter(torch.empty(2**46))
        self.register_buffer("scale", torch.ones(2).mul_(2.0), persistent=False)


def test_build_empty_builds_a_parameter_larger_than_memory_without_allocating_it():
    """Real torch.empty allocations, never written, cost no memory, but the kernel must still grant their address
    space: where it will not, the build allocates nothing."""
    module = build_empty(_Huge)
    assert module.experts.is_meta and module.experts.shape == (2**46,)
    assert torch.equal(module.scale, torch.full((2,), 2.0))
    assert not nn.Linear(2, 2).weight.is_meta  # nothing left patched


class _Devices(torch.overrides.TorchFunctionMode):
    """Records the device every torch.empty call asks for, as a default device's mode would see it."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.empty:
            self.asked.append(str((kwargs or {}).get("device")))
        return func(*args, **(kwargs or {}))


def test_build_empty_under_a_default_device_allocates_nothing_there():
    """Under torch.set_default_device("cuda") or `with torch.device(...)` (a torch function mode), a constructor's
    torch.empty with no device would allocate on that device, a GPU's memory, before its parameter moves to meta:
    build_empty makes those tensors on meta instead."""
    with _Devices() as outer:
        module = build_empty(lambda: nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)))
    assert outer.asked and set(outer.asked) == {"meta"}
    assert all(p.is_meta for p in module.parameters())
    with _Devices() as outer:  # the check sees what it should: a plain build asks for no device
        nn.Linear(8, 4)
    assert outer.asked and set(outer.asked) == {"None"}


def test_builds_in_two_threads_leave_transformers_initialisation_on(tmp_path, monkeypatch):
    """transformers' no_init_weights turns a module-wide flag off and puts back the value it found: two artifact
    builds overlapping in threads (A in, B in, A out, B out) left it off for the rest of the process, so that every
    model built afterwards, anywhere in it, came out uninitialised. compressor's builds take turns."""
    import transformers
    import transformers.modeling_utils as modeling_utils
    from transformers import BertConfig, BertModel

    from compressor.sources.hf import hf_architecture

    BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path)
    inside, overlapped = [], []
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    real_init = BertModel.__init__

    def init(self, *args, **kwargs):  # the real constructor, paused so that builds would go A in, B in, A out, B out
        inside.append(1)
        overlapped.append(len(inside) > 1)
        if threading.current_thread().name == "A":
            a_in.set()
            b_in.wait(0.5)  # B cannot come in while A builds, where builds take turns
        else:
            b_in.set()
            a_out.wait(10)
        try:
            real_init(self, *args, **kwargs)
        finally:
            inside.pop()

    def run(name: str) -> None:
        built.append(build_empty(lambda: hf_architecture(tmp_path, "AutoModel")))
        if name == "A":
            a_out.set()

    monkeypatch.setattr(BertModel, "__init__", init)
    built: list[nn.Module] = []
    first = threading.Thread(target=run, args=("A",), name="A")
    first.start()
    assert a_in.wait(10)
    second = threading.Thread(target=run, args=("B",), name="B")
    second.start()
    first.join(10)
    second.join(10)
    monkeypatch.undo()
    left, modeling_utils._init_weights = modeling_utils._init_weights, True  # the other tests' models are initialised
    assert len(built) == 2 and all(p.is_meta for m in built for p in m.parameters())
    assert overlapped == [False, False]
    assert left is True
    fresh = transformers.BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=32))
    assert fresh.embeddings.word_embeddings.weight.abs().sum() > 0 and fresh.pooler.dense.bias.abs().sum() == 0


def test_a_build_context_that_fails_to_open_leaves_no_lock_held(monkeypatch):
    """The lock builds take turns by is released when the context fails while opening: left held, every later
    build in any other thread would wait for good."""
    import compressor.model as model
    from compressor.sources import hf

    def broken() -> None:
        raise RuntimeError("no mode today")

    monkeypatch.setattr(model, "skip_init_on_meta", broken)
    with pytest.raises(RuntimeError, match="no mode today"):
        hf._uninitialised(skip_on_meta=True)
    free: list[bool] = []
    other = threading.Thread(target=lambda: free.append(hf._NO_INIT.acquire(timeout=5) and (hf._NO_INIT.release()
                                                                                             or True)))
    other.start()
    other.join(10)
    assert free == [True]
