"""compressor.load's fast path (issue #20): the architecture built without initialising weights, one private map
per file sliced into views, tensors assigned directly, and the weights read ahead in the order the model uses them.
"""

from __future__ import annotations

import json
import threading
import struct
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import compressor
from compressor.errors import ArtifactError
from compressor.evaluate import pagecache
from compressor.loading import readahead
from compressor.loading import tensors as loading_tensors
from compressor.loading.pages import advise
from compressor.model import build_empty, parameters_on_meta
from compressor.pipeline import run_recipe
from compressor.recipe import load_recipe
from compressor.safetensors_io import map_file, read_header


@pytest.fixture(scope="module")
def llama_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Llama (seeded random weights, a few MB) compressed with no passes: float32 safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("loading")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).eval().save_pretrained(tmp / "src", safe_serialization=True)
    recipe = tmp / "r.yaml"
    recipe.write_text(f"name: l\nmodel: {{source: hf, path: {tmp / 'src'}, auto_class: AutoModelForCausalLM}}\n"
                      "passes: []\n")
    out = tmp / "art"
    run_recipe(load_recipe(recipe), out)
    return out


class _MetaInits(torch.overrides.TorchFunctionMode):
    """Records every in-place op that reaches torch with a meta tensor as its target."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        target = args[0] if args else (kwargs or {}).get("tensor")
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("__") and isinstance(target, torch.Tensor) and target.is_meta:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


class _Initialised(nn.Module):
    """Initialises its parameters the ways models do, and computes buffers with the same in-place ops."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)  # kaiming_uniform_ / uniform_ in reset_parameters
        self.table = nn.Parameter(torch.empty(5, 3))
        nn.init.trunc_normal_(self.table, std=0.02)
        self.table.data.normal_(0, 1)
        self.register_buffer("scale", torch.ones(4).mul_(3), persistent=False)
        self.register_buffer("offset", nn.init.constant_(torch.empty(2), 2.0))


def test_parameters_are_built_on_meta_without_initialisation_and_buffers_are_computed():
    with _MetaInits() as outside, parameters_on_meta():
        module = _Initialised()
    assert all(p.is_meta for p in module.parameters())
    assert outside.seen == []  # no initialisation of a meta tensor reached torch
    assert torch.equal(module.scale, torch.full((4,), 3.0))  # buffers: real, from the constructor's own ops
    assert torch.equal(module.offset, torch.full((2,), 2.0))
    with _MetaInits() as outside:  # the check itself sees what it should: initialising meta tensors without it
        with torch.device("meta"):
            _Initialised()
    assert {"normal_", "uniform_"} <= set(outside.seen) or "kaiming_uniform_" in outside.seen


def test_build_empty_gives_what_parameters_on_meta_gives_with_the_ties_kept(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_utils import no_init_weights

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)

    def build() -> nn.Module:
        with no_init_weights():
            model = LlamaForCausalLM(config)
        model.tie_weights()
        model.model.norm.weight = model.model.layers[0].input_layernorm.weight  # a tie of a torch.ones parameter
        return model

    import compressor.model as model_module

    with monkeypatch.context() as patch:  # the first way must do: building again the plain way would raise
        patch.setattr(model_module, "parameters_on_meta", None)
        with _MetaInits() as outside:
            fast = build_empty(build)
    with parameters_on_meta():
        plain = build()
    assert outside.seen == []
    assert [(n, p.shape, p.dtype, p.is_meta) for n, p in fast.named_parameters()] == \
        [(n, p.shape, p.dtype, p.is_meta) for n, p in plain.named_parameters()]
    assert all(p.is_meta for p in fast.parameters())
    assert fast.lm_head.weight is fast.model.embed_tokens.weight
    assert fast.model.norm.weight is fast.model.layers[0].input_layernorm.weight
    assert all(isinstance(p, nn.Parameter) for p in fast.parameters())
    fast_buffers, plain_buffers = dict(fast.named_buffers()), dict(plain.named_buffers())
    assert set(fast_buffers) == set(plain_buffers) and fast_buffers
    for name, buf in fast_buffers.items():  # the rotary frequencies: computed, not on meta
        assert not buf.is_meta and torch.equal(buf, plain_buffers[name]), name


class _FromEmpty(nn.Module):
    """Keeps values computed from torch.empty: a buffer, a plain attribute, a number. A build that made
    torch.empty's tensors on meta could not give them."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("offset", torch.empty(2).fill_(2.0), persistent=False)
        self.steps = torch.empty(3).fill_(1.0)  # a plain attribute
        self.count = int(torch.empty(4).fill_(1.0).sum().item())  # fails on meta


def test_build_empty_keeps_what_constructors_compute_from_torch_empty():
    module = build_empty(_FromEmpty)
    assert module.linear.weight.is_meta and module.count == 4
    assert torch.equal(module.offset, torch.full((2,), 2.0)) and torch.equal(module.steps, torch.ones(3))

    class _OnlyBuffer(_FromEmpty):  # a buffer alone, which nothing reads during the build
        def __init__(self) -> None:
            nn.Module.__init__(self)
            self.linear = nn.Linear(3, 2)
            self.register_buffer("offset", torch.empty(2).fill_(2.0), persistent=False)

    module = build_empty(_OnlyBuffer)
    assert module.linear.weight.is_meta and torch.equal(module.offset, torch.full((2,), 2.0))

    class _Rewrapped(nn.Module):  # buffers re-wrapped (a Parameter as a buffer, a subclass)
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2)
            self.register_buffer("as_parameter", nn.Parameter(torch.empty(2).fill_(3.0), requires_grad=False))
            self.register_buffer("subclass", torch.Tensor._make_subclass(torch.Tensor, torch.empty(2).fill_(4.0)))

    module = build_empty(_Rewrapped)
    assert module.linear.weight.is_meta
    assert torch.equal(module.as_parameter, torch.full((2,), 3.0))
    assert torch.equal(module.subclass, torch.full((2,), 4.0))
    with pytest.raises(ZeroDivisionError):  # an error of the plain build is the caller's
        build_empty(lambda: 1 // 0)


def test_build_empty_builds_with_no_torch_function_mode_and_skips_no_initialisation_itself():
    """A mode sees every torch call of a build in Python (about 540 for MiniLM, 1.5-2 ms of its warm load), so
    build_empty pushes none; initialising a meta parameter still works where the builder does not skip it (a
    digits MLP), only slower, and gives the plain build's parameters."""
    modes: list[int] = []

    def build() -> nn.Module:
        modes.append(torch._C._len_torch_function_stack())
        return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))

    module = build_empty(build)
    assert modes == [0]
    with parameters_on_meta():
        plain = build()
    assert [(n, p.shape, p.is_meta) for n, p in module.named_parameters()] == \
        [(n, p.shape, p.is_meta) for n, p in plain.named_parameters()]
    assert all(p.is_meta for p in module.parameters()) and not nn.Linear(2, 2).weight.is_meta


def test_loading_an_artifact_initialises_nothing_and_gives_the_stored_values(llama_artifact):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    with _MetaInits() as outside:
        model = compressor.load(llama_artifact)
    assert outside.seen == []
    stored = load_file(str(llama_artifact / "model.safetensors"))
    state = model.state_dict()
    assert set(stored) <= set(state)
    for name, value in stored.items():
        assert torch.equal(state[name], value), name
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    reference = AutoModelForCausalLM.from_pretrained(str(llama_artifact)).eval()
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert not any(p.requires_grad is False and p.is_floating_point() for p in model.parameters())


def test_a_loaded_model_pickles_to_its_own_size_and_back(llama_artifact):
    """Each mapped tensor has a storage of its own bytes: pickling one layer writes that layer, not the whole file
    once per tensor (as views on one storage spanning the file did), and the unpickled model computes the same."""
    import pickle

    model = compressor.load(llama_artifact)
    layer = model.model.layers[0]
    own = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert own < (llama_artifact / "model.safetensors").stat().st_size / 2
    assert len(pickle.dumps(layer)) < own * 1.1 + 100_000
    whole = pickle.dumps(model)
    assert len(whole) < (llama_artifact / "model.safetensors").stat().st_size * 1.1 + 100_000
    twin = pickle.loads(whole)
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.inference_mode():
        assert torch.equal(twin(input_ids=ids).logits, model(input_ids=ids).logits)


def test_an_artifact_lays_its_weights_out_in_the_order_the_model_reads_them(llama_artifact):
    header, _ = read_header(llama_artifact / "model.safetensors")
    by_offset = [n for _, n in sorted((i["data_offsets"][0], n) for n, i in header.items() if n != "__metadata__")]
    model = compressor.load(llama_artifact, read_ahead=False)
    assert by_offset == [n for n in model.state_dict() if n in header]
    assert by_offset[:2] == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]


def test_a_tensor_of_another_shape_is_refused_naming_it(llama_artifact, tmp_path):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(llama_artifact, art)
    path = art / "model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = "model.layers.0.mlp.down_proj.weight"  # [128, 256] -> [256, 128]: same bytes, same header length
    assert header[name]["shape"] == [128, 256]
    text = data[8:8 + n].decode()
    entry = json.dumps(header[name], separators=(",", ":"))
    assert entry in text or json.dumps(header[name]) in text
    old = entry if entry in text else json.dumps(header[name])
    text = text.replace(old, old.replace("[128,256]", "[256,128]").replace("[128, 256]", "[256, 128]"))
    data[8:8 + n] = text.encode()
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"do not fit the model's architecture.*down_proj"):
        compressor.load(art)


def _write_safetensors(path: Path, entries: list[tuple[str, str, list[int], bytes]]) -> None:
    """A safetensors file laid out exactly as given (no alignment), to test reading what other writers make."""
    header, at, body = {}, 0, b""
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(raw)]}
        at += len(raw)
        body += raw
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def test_map_file_copies_unaligned_tensors_and_never_writes_to_the_file(tmp_path):
    values = torch.arange(5, dtype=torch.float32) + 0.5
    path = tmp_path / "w.safetensors"
    # Three bytes first: the float32 tensor starts at an offset no float32 view may take.
    _write_safetensors(path, [("a", "U8", [3], bytes([1, 2, 3])), ("b", "F32", [5], values.numpy().tobytes())])
    before = path.read_bytes()
    tensors, (address, length) = map_file(path)
    assert torch.equal(tensors["a"], torch.tensor([1, 2, 3], dtype=torch.uint8))
    assert torch.equal(tensors["b"], values)
    assert address <= tensors["a"].data_ptr() < address + length  # a view on the map
    assert tensors["a"].untyped_storage().nbytes() == 3  # with a storage of its own bytes only
    assert not address <= tensors["b"].data_ptr() < address + length  # unaligned: a copy, not in the map
    tensors["a"].add_(1)  # a private map: the write stays in this process
    tensors["b"].mul_(2)
    assert path.read_bytes() == before
    from safetensors.torch import load_file

    assert {k: v.tolist() for k, v in load_file(str(path)).items()} == {"a": [1, 2, 3], "b": values.tolist()}


def _resident(path: Path) -> float:
    fraction = pagecache.resident_fraction([path])
    if fraction is None:
        pytest.skip("mincore is not available here")
    return fraction


def _mapped_bytes(path: Path) -> int:
    """The bytes of ``path`` this process's maps hold in memory (the Rss of its mappings in /proc/self/smaps)."""
    total, current = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
            current = line.rstrip().endswith(str(path))
        elif current and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


MADV_RANDOM = 1  # madvise: expect page references in random order, so no read-around


def _cold(path: Path) -> None:
    import gc

    gc.collect()  # models of earlier tests still mapping the file would keep its pages
    pagecache.evict([path])
    if not pagecache.can_evict() or _resident(path) > 0.05:
        pytest.skip("the page cache cannot be emptied of this file here (tmpfs, or no posix_fadvise)")


def test_read_ahead_reads_the_weights_in_the_background_and_only_when_asked(llama_artifact):
    weights = llama_artifact / "model.safetensors"
    _cold(weights)
    model = compressor.load(llama_artifact, read_ahead=False)
    time.sleep(0.3)
    assert _resident(weights) < 0.5  # a lazy map: only the header was read
    del model
    _cold(weights)
    model = compressor.load(llama_artifact)
    header, start = read_header(weights)
    # The embedding table comes first (the model's order) and is left to its lookups: everything after it.
    rest = (start + header["model.embed_tokens.weight"]["data_offsets"][1], weights.stat().st_size)
    deadline = time.monotonic() + 30
    while pagecache.resident_fraction([weights], rest) < 0.99 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pagecache.resident_fraction([weights], rest) >= 0.99  # every weight read, with no forward pass
    # into the page cache, not into the model's map: populating the map from a second thread slowed the forward
    # pass on the same address space 2-3x on some machines
    assert _mapped_bytes(weights) < 0.1 * weights.stat().st_size, _mapped_bytes(weights)
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3]]))


@pytest.fixture(scope="module")
def big_table_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer Llama with a large vocabulary's table (32 MB, rows of 1 KiB), compressed with no passes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("table")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32768, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).eval().save_pretrained(tmp / "src", safe_serialization=True)
    recipe = tmp / "r.yaml"
    recipe.write_text(f"name: l\nmodel: {{source: hf, path: {tmp / 'src'}, auto_class: AutoModelForCausalLM}}\n"
                      "passes: []\n")
    run_recipe(load_recipe(recipe), tmp / "art")
    return tmp / "art"


def test_an_embedding_table_is_not_read_ahead(big_table_artifact):
    """A large vocabulary's table (32 MB here, a tenth of a small LM's bytes): read ahead, it would be read whole
    for a few tokens' rows. Also: the read-ahead of the LM head beside it does not spill into it."""
    art = big_table_artifact
    weights = art / "model.safetensors"
    header, start = read_header(weights)
    table = tuple(start + o for o in header["model.embed_tokens.weight"]["data_offsets"])
    head = tuple(start + o for o in header["lm_head.weight"]["data_offsets"])
    _cold(weights)
    model = compressor.load(art)
    readers = [t for t in threading.enumerate() if t.name == "compressor-read-ahead"]
    assert model.model.embed_tokens._forward_pre_hooks or not any(t.is_alive() for t in readers)  # while it reads
    for reader in readers:
        reader.join(30)
    assert not model.model.embed_tokens._forward_pre_hooks  # no hook left once it has finished
    deadline = time.monotonic() + 30
    while pagecache.resident_fraction([weights], head) < 0.99 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pagecache.resident_fraction([weights], head) >= 0.99  # the LM head is read whole, and ahead
    time.sleep(0.2)
    assert pagecache.resident_fraction([weights], table) < 0.05
    # The forward pass's page faults make the kernel read around them: up to 16 MB from the table's start for its
    # first rows here, and, now and then (a page after the table not yet in the cache: the kernel drops advice
    # it cannot serve at once), megabytes of the table's end before a fault in the layer after it. That is the
    # kernel's, not the loader's; without it (MADV_RANDOM) the pass must read the rows it looks up and nothing
    # more of the table.
    for parameter in model.parameters():
        assert advise(parameter.data_ptr(), parameter.numel() * parameter.element_size(), MADV_RANDOM)
    with torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert pagecache.resident_fraction([weights], (table[0], table[0] + 4096)) == 1
    assert pagecache.resident_fraction([weights], table) < 0.05
    assert pagecache.resident_fraction([weights], (table[1] - (1 << 20), table[1])) == 0


def test_a_model_used_before_loads_warm_with_its_table_mostly_on_disk(big_table_artifact, monkeypatch):
    """After a first use the page cache holds the weights and only the rows the lookups read: a warm load, which
    returns without ordering the model's tensors for a read-ahead it will not start."""
    from compressor.loading import readahead

    weights = big_table_artifact / "model.safetensors"
    header, start = read_header(weights)
    lo, hi = (start + o for o in header["model.embed_tokens.weight"]["data_offsets"])
    _cold(weights)
    with open(weights, "rb") as f:  # what a forward pass leaves: everything but the table, and a row of it
        f.read(lo + 1024)
        f.seek(hi)
        f.read()
    assert pagecache.resident_fraction([weights], (lo, hi)) < 0.5
    assert pagecache.resident_fraction([weights], (hi, weights.stat().st_size)) == 1

    def no_ordering(module):
        raise AssertionError("a warm load ordered its tensors")

    monkeypatch.setattr(readahead, "in_use_order", no_ordering)
    before = set(threading.enumerate())
    model = compressor.load(big_table_artifact)
    assert not [t for t in threading.enumerate() if t.name == "compressor-read-ahead" and t not in before]
    with torch.inference_mode():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 32768)


def test_a_lookup_queues_the_reads_of_its_rows_while_the_read_ahead_thread_runs(big_table_artifact):
    """The rows a lookup needs are queued together when it is called (its page faults would otherwise each wait
    behind the read-ahead's queue); the hook does nothing for indices the lookup refuses, leaves the model
    copyable and picklable, and goes when the thread finishes."""
    import copy
    import pickle

    weights = big_table_artifact / "model.safetensors"
    header, start = read_header(weights)
    lo, hi = (start + o for o in header["model.embed_tokens.weight"]["data_offsets"])

    def rows(*indices: int) -> float:
        return min(pagecache.resident_fraction([weights], (lo + i * 1024, lo + (i + 1) * 1024)) for i in indices)

    _cold(weights)
    model = compressor.load(big_table_artifact, read_ahead=False)
    assert not model.model.embed_tokens._forward_pre_hooks  # none without a read-ahead thread
    embed = model.model.embed_tokens
    hooks = readahead._Hooks()  # what a read-ahead thread still reading holds
    hooks.add(embed, embed.weight.data_ptr())
    (hook,) = embed._forward_pre_hooks.values()
    before = pagecache.resident_fraction([weights], (lo, hi))  # a page or two, read with the header
    hook(embed, (torch.tensor([[40000, -1]]),))  # indices the lookup refuses: nothing queued, nothing raised
    hook(embed, (torch.tensor([[0.5]]),))
    time.sleep(0.2)
    assert pagecache.resident_fraction([weights], (lo, hi)) == before < 0.01
    hook(embed, (torch.tensor([[5, 30000, 5]]),))
    deadline = time.monotonic() + 10
    while rows(5, 30000) < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rows(5, 30000) == 1  # queued without a fault, nothing copied
    assert rows(16000) == 0 and rows(7232) == 0  # not the rest of the table
    twin = copy.deepcopy(model)  # the hook holds integers only
    assert pickle.loads(pickle.dumps(model)).model.embed_tokens.weight.shape == embed.weight.shape
    with torch.inference_mode():
        ids = torch.tensor([[7, 9]])
        assert torch.equal(twin(input_ids=ids).logits, model(input_ids=ids).logits)
    hooks.close()  # the thread finishing
    assert not embed._forward_pre_hooks and embed.weight.data_ptr() not in readahead._READING
    hooks.add(embed, embed.weight.data_ptr())  # too late: not registered
    assert not embed._forward_pre_hooks


def test_a_copy_made_while_the_thread_reads_drops_its_copy_of_the_lookup_hook():
    """A deep copy made during the read carries a copy of the table's hook, which nothing would remove: it removes
    itself at its first call (the copy's table lies elsewhere), and the copy computes as the original does; the
    original's goes when the thread finishes. The model compiles meanwhile too."""
    import copy

    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    embed = model[0]
    hooks = readahead._Hooks()
    hooks.add(embed, embed.weight.data_ptr())
    try:
        twin = copy.deepcopy(model)
        assert len(twin[0]._forward_pre_hooks) == 1
        ids = torch.tensor([[1, 2, 3]])
        with torch.no_grad():
            assert torch.equal(twin(ids), model(ids))
            assert not twin[0]._forward_pre_hooks and len(embed._forward_pre_hooks) == 1
            assert torch.equal(torch.compile(model, backend="eager")(ids), twin(ids))
    finally:
        hooks.close()
        torch._dynamo.reset()
    assert not embed._forward_pre_hooks and embed.weight.data_ptr() not in readahead._READING


def test_only_an_embedding_no_other_module_uses_is_left_to_its_lookups():
    from transformers import LlamaConfig, LlamaForCausalLM

    for tied in (False, True):
        config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
        model = LlamaForCausalLM(config)
        order = readahead.in_use_order(model)
        table = model.model.embed_tokens.weight
        assert any(t is table for t in order) == tied  # a tied LM head reads all of it
        assert order[0] is (table if tied else model.model.layers[0].self_attn.q_proj.weight)
        assert order[-1] is (table if tied else model.lm_head.weight)


def test_read_ahead_stays_off_when_the_weights_would_not_fit_in_memory(llama_artifact, monkeypatch):
    weights = llama_artifact / "model.safetensors"
    maps: dict[int, Path] = {}
    stored = loading_tensors.load_tensors(llama_artifact, ["model.safetensors"], maps)
    assert len(maps) == 1
    assert readahead.read_ahead([torch.zeros(3)], maps) is None  # no tensor on a map: nothing to read
    _cold(weights)
    monkeypatch.setattr(readahead, "available_memory", lambda: (1 << 20, "a test's 1 MiB"))
    thread = readahead.read_ahead(list(stored.values()), maps)
    assert thread is not None
    thread.join(30)
    assert _resident(weights) < 0.5  # it looked, and read nothing
    monkeypatch.undo()
    readahead.read_ahead(list(stored.values()), maps).join(30)
    assert _resident(weights) >= 0.99


def test_read_ahead_reads_itself_what_the_kernel_dropped_of_its_advice(llama_artifact, monkeypatch):
    # The thread queues reads (posix_fadvise) and waits for a byte per step; the kernel may drop the advice
    # silently (memory pressure, a file system without read-ahead), and then the thread reads the rest itself.
    weights = llama_artifact / "model.safetensors"
    maps: dict[int, Path] = {}
    stored = loading_tensors.load_tensors(llama_artifact, ["model.safetensors"], maps)
    _cold(weights)
    monkeypatch.setattr(readahead.os, "posix_fadvise", lambda *args: None)  # every piece of advice dropped
    thread = readahead.read_ahead(list(stored.values()), maps)
    assert thread is not None
    thread.join(30)
    _, start = read_header(weights)
    assert pagecache.resident_fraction([weights], (start, weights.stat().st_size)) >= 0.99


def test_read_ahead_starts_no_thread_when_every_page_is_already_cached(llama_artifact):
    weights = llama_artifact / "model.safetensors"
    maps: dict[int, Path] = {}
    stored = loading_tensors.load_tensors(llama_artifact, ["model.safetensors"], maps)
    pagecache.warm([weights])
    if _resident(weights) < 1.0:
        pytest.skip("the page cache does not hold the whole file here")
    assert readahead.read_ahead(list(stored.values()), maps) is None  # a warm load: nothing to read
    _cold(weights)
    thread = readahead.read_ahead(list(stored.values()), maps)
    assert thread is not None
    thread.join(30)


def test_the_cuda_threads_share_every_tensor_once_balanced_by_bytes(llama_artifact):
    """The plan load_tensors_cuda gives its threads (the copies need a GPU; the plan is plain arithmetic)."""
    weights = json.loads((llama_artifact / "manifest.json").read_text())["model"]["weights"]
    header, _ = read_header(llama_artifact / weights[0])
    sizes = {n: i["data_offsets"][1] - i["data_offsets"][0] for n, i in header.items() if n != "__metadata__"}
    plan = loading_tensors._balanced(llama_artifact, weights)
    assert 1 <= len(plan) <= loading_tensors.CUDA_THREADS
    assigned = [(name, nbytes) for part in plan for _, name, nbytes in part]
    assert sorted(assigned) == sorted(sizes.items())  # each tensor once, with its own byte count
    loads = [sum(n for *_, n in part) for part in plan]
    # Largest first onto the least-loaded thread: no thread carries more than the mean plus the largest tensor.
    assert max(loads) <= sum(loads) / len(loads) + max(sizes.values())
