"""The Model that flows through the pipeline: an nn.Module plus what is needed to store and rebuild it."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .encodings import Dense, Encoding, dtype_from_name

__all__ = ["Model", "ExportPlan", "CastPlan", "QuantizePlan", "install_bridges", "install_dtype_bridge",
           "remove_bridges", "find_aliases", "skip_init_on_meta", "parameters_on_meta", "build_empty"]


@dataclass
class CastPlan:
    """What `cast` asks of the ONNX exporter: trace the float32 view, then narrow the checked graph to ``dtype``
    (compressor.export.onnx_cast), keeping ``kept_modules`` in float32."""

    index: int  #: the pass's position in the recipe, for error messages
    dtype: str  #: "float16" or "bfloat16"
    float32_io: bool  #: whether the graph's inputs and outputs stay float32
    kept_modules: list[str]  #: modules that run in float32 inside the narrowed graph


@dataclass
class QuantizePlan:
    """What an int8 `quantize` pass asks of the ONNX exporter: quantize the checked float graph
    (compressor.export.onnx_quant)."""

    index: int  #: the pass's position in the recipe, for error messages
    config: Any  #: the pass's QuantizeConfig (compressor.passes.quantize; this layer cannot name it)


@dataclass
class ExportPlan:
    """Work the passes hand to the exporters: the contract between the two layers. A pass that changes only the
    module's tensors leaves it empty."""

    onnx_cast: CastPlan | None = None
    onnx_quantize: QuantizePlan | None = None
    tensor_parallel: Any = None  #: the `shard` pass's TPPlan (compressor.passes.tp_plan): rank files are written
    #: 4-bit `quantize`: ONNX Runtime's MatMulNBits accuracy level for the shipped graph (4: int8 activations, the
    #: fast CPU path; 0: float32). The export is checked at level 0 whatever this says.
    lowbit_accuracy_level: int = 0


@dataclass
class Model:
    """A model in the pipeline.

    ``module`` holds the effective values (what the stored form decodes to), so running it measures the real
    compressed model. ``encodings`` says how each tensor (by state-dict name) is stored. ``aliases`` maps tied
    tensor names to the one name that is stored. ``dtype_bridges`` maps module names ("" is the root) to the
    dtype they run in and the dtype their outputs are given back in, so that modules kept in float32 run
    inside a float16 model.
    """

    module: nn.Module
    source: dict[str, Any]
    example_inputs: dict[str, torch.Tensor]
    task: str = "generic"
    files_dir: Path | None = None
    encodings: dict[str, Encoding] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    dtype_bridges: dict[str, dict[str, str]] = field(default_factory=dict)
    # Linear, Conv and BatchNorm modules whose shape a pass changed (structured pruning): {module name: their size
    # attributes, e.g. in_features/out_features}; the loader rebuilds them at these sizes before loading weights.
    resized: dict[str, dict[str, int]] = field(default_factory=dict)
    # Attention heads removed (structured pruning): {attention module name: original head indices}; the loader
    # removes them again with the module's own prune_heads.
    pruned_heads: dict[str, list[int]] = field(default_factory=dict)
    export: ExportPlan = field(default_factory=ExportPlan)

    def __post_init__(self) -> None:
        if not self.aliases:
            self.aliases = find_aliases(self.module)
        for name in self.tensors():
            self.encodings.setdefault(name, Dense())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor (parameters and persistent buffers) by name, tied duplicates left out."""
        state = self.module.state_dict()
        return {k: v for k, v in state.items() if k not in self.aliases}

    def stored(self) -> dict[str, torch.Tensor]:
        """The tensors as written to disk: each tensor's encoded parts, named ``<name><suffix>``."""
        out: dict[str, torch.Tensor] = {}
        for name, tensor in self.tensors().items():
            for suffix, part in self.encodings[name].encode(tensor.detach()).items():
                out[name + suffix] = part
        return out

    def stored_nbytes(self) -> int:
        """Bytes of all stored tensors."""
        return sum(self.encodings[name].stored_nbytes(t.detach()) for name, t in self.tensors().items())

    def numel(self, names: list[str] | None = None) -> int:
        """Number of scalars in the named tensors (all tensors if ``names`` is None)."""
        tensors = self.tensors()
        return sum(tensors[n].numel() for n in (tensors if names is None else names))

    def check_encodings(self, names: list[str]) -> None:
        """Cheap contract check after a pass: each decoded tensor has the module tensor's shape and dtype."""
        tensors = self.tensors()
        for name in names:
            t = tensors[name].detach()
            decoded = self.encodings[name].decode(self.encodings[name].encode(t))
            if decoded.shape != t.shape or decoded.dtype != t.dtype:
                raise TypeError(
                    f"encoding of {name} decodes to {tuple(decoded.shape)} {decoded.dtype}, but the module holds "
                    f"{tuple(t.shape)} {t.dtype}; a pass must keep the module and its encodings in step"
                )

    def install_bridges(self) -> None:
        """(Re)install every recorded dtype bridge on the module."""
        install_bridges(self.module, self.dtype_bridges)

    @contextmanager
    def float32_view(self) -> Iterator[nn.Module]:
        """The module with its float16/bfloat16 tensors widened to float32 and no dtype bridges, for as long as the
        block runs; then narrowed back and bridged again. Widening and narrowing back are both exact, so the view
        computes the cast model's weights in float32 (what a narrowed ONNX graph is checked against)."""
        narrow: list[tuple[torch.Tensor, torch.dtype]] = []
        seen: set[int] = set()
        for tensor in (*self.module.parameters(), *self.module.buffers()):
            if id(tensor) in seen or tensor.dtype not in (torch.float16, torch.bfloat16):
                continue  # a tied tensor appears once; float32 and integer tensors are left alone
            seen.add(id(tensor))
            narrow.append((tensor, tensor.dtype))
        remove_bridges(self.module)
        try:
            for tensor, _ in narrow:
                tensor.data = tensor.data.float()
            yield self.module
        finally:
            for tensor, dtype in narrow:
                tensor.data = tensor.data.to(dtype)
            self.install_bridges()


def install_bridges(module: nn.Module, bridges: dict[str, dict[str, str]]) -> None:
    """Install dtype bridges as recorded in a Model / manifest: ``{module name: {"run": dtype, "out": dtype}}``.

    "out" absent means: give outputs back in the float dtype the inputs came in (used at the root). The bridges
    follow the model's narrow tensors: once ``module.float()``, ``.half()`` or ``.to(dtype)`` has converted them,
    every bridge runs in, and hands on, the dtype they were converted to (``install_dtype_bridge``'s ``follow``)."""
    modules = dict(module.named_modules())
    root = bridges.get("")
    narrow = dtype_from_name(root["run"]) if root else None
    follow = next((t for t in (*module.parameters(), *module.buffers())
                   if t.is_floating_point() and t.dtype == narrow), None) if narrow is not None else None
    for name, spec in bridges.items():
        out = spec.get("out")
        install_dtype_bridge(modules[name], dtype_from_name(spec["run"]), dtype_from_name(out) if out else None,
                             follow=follow)


def remove_bridges(module: nn.Module) -> None:
    """Remove every dtype bridge installed on ``module`` and its submodules."""
    for sub in module.modules():
        handles = getattr(sub, _BRIDGE_ATTR, None)
        if handles is not None:
            for handle in handles:
                handle.remove()
            object.__delattr__(sub, _BRIDGE_ATTR)


def find_aliases(module: nn.Module) -> dict[str, str]:
    """Tied tensors: ``{duplicate name: first name}`` for state-dict entries that are the same tensor object."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, dict):
        if type(obj) is dict:
            return {k: _cast_floats(v, dtype) for k, v in obj.items()}
        for k in list(obj.keys()):  # ModelOutput and other dict subclasses: update in place, keep the type
            obj[k] = _cast_floats(obj[k], dtype)
        return obj
    if type(obj) in (list, tuple):
        return type(obj)(_cast_floats(v, dtype) for v in obj)
    return obj


def _first_float_dtype(obj: Any) -> torch.dtype | None:
    if isinstance(obj, torch.Tensor):
        return obj.dtype if obj.is_floating_point() else None
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for item in items:
        found = _first_float_dtype(item)
        if found is not None:
            return found
    return None


_BRIDGE_ATTR = "_compressor_bridge"


class _Bridge:
    """One module's dtype bridge: what it runs in and hands on, and the dtypes its calls came in. The hooks are
    partials of module-level functions over it, so a bridged model still deep-copies (the copy's bridges follow
    the copy's tensors) and pickles."""

    def __init__(self, run: torch.dtype, out: torch.dtype | None, follow: torch.Tensor | None,
                 own: torch.Tensor | None) -> None:
        self.run, self.out, self.follow, self.own = run, out, follow, own
        self.narrow = follow.dtype if follow is not None else None
        self.own_dtype = own.dtype if own is not None else None
        self.incoming: list[torch.dtype | None] = []

    def now(self) -> tuple[torch.dtype, torch.dtype | None]:
        """(run, out): as installed, or, once the model was converted whole (``model.float()``, ``.half()``), the
        dtype it was converted to, for both (``out`` stays None: back to the caller's dtype). Converted: the
        followed narrow tensor has another dtype (``.float()`` leaves the float32 modules as they were), or the
        module's own first float tensor has (``.half()`` of a float16 model leaves the narrow tensors as they
        were)."""
        if self.follow is not None and self.follow.dtype != self.narrow:
            converted = self.follow.dtype
        elif self.own is not None and self.own.dtype != self.own_dtype:
            converted = self.own.dtype
        else:
            return self.run, self.out
        return converted, converted if self.out is not None else None


def _bridge_in(bridge: _Bridge, _mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    run, _ = bridge.now()
    bridge.incoming.append(_first_float_dtype((args, kwargs)))
    return _cast_floats(args, run), _cast_floats(kwargs, run)


def _bridge_out(bridge: _Bridge, _mod: nn.Module, _args: Any, _kwargs: Any, output: Any) -> Any:
    run, out = bridge.now()
    back = bridge.incoming.pop() if bridge.incoming else None
    target = out or back
    return output if target is None or target == run else _cast_floats(output, target)


def install_dtype_bridge(module: nn.Module, dtype: torch.dtype, out_dtype: torch.dtype | None = None,
                         follow: torch.Tensor | None = None) -> None:
    """Run ``module`` in ``dtype``: cast its float inputs to ``dtype`` and its float outputs to ``out_dtype``,
    or, when that is None, back to the dtype the inputs came in. Idempotent (a second call replaces the first).
    ``follow``: a tensor of the model in its narrow dtype; once it has been converted to another dtype (with the
    rest of the model: ``model.float()``), the bridge runs in and hands on that dtype instead, since the layers
    between the bridges hold it now."""
    old = getattr(module, _BRIDGE_ATTR, None)
    if old is not None:
        for handle in old:
            handle.remove()
    own = next((t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()), None)
    bridge = _Bridge(dtype, out_dtype, follow, own)
    handles = (
        module.register_forward_pre_hook(partial(_bridge_in, bridge), with_kwargs=True),
        module.register_forward_hook(partial(_bridge_out, bridge), with_kwargs=True, always_call=True),
    )
    object.__setattr__(module, _BRIDGE_ATTR, handles)


# What a constructor does to a parameter that only sets its values: on the meta device there are none, and torch
# runs these there through its Python reference implementations (about 0.6 ms a call: a BERT's 43 normal_ calls
# took longer than mapping its weights). Shape-changing in-place ops are not here: they must still run.
_VALUE_ONLY = ("normal_", "uniform_", "fill_", "zero_", "random_", "exponential_", "bernoulli_", "log_normal_",
               "cauchy_", "geometric_", "copy_", "erfinv_", "clamp_", "mul_", "add_", "sub_", "div_", "abs_",
               "sqrt_", "neg_", "exp_", "log_", "clamp_min_", "clamp_max_", "masked_fill_", "index_fill_")


def _value_only() -> frozenset[Any]:
    """The functions skipped on meta tensors: the Tensor methods above and every in-place torch.nn.init function
    (kaiming_uniform_, trunc_normal_, orthogonal_, ...), as torch dispatches them to a TorchFunctionMode."""
    methods = {getattr(torch.Tensor, n) for n in _VALUE_ONLY if hasattr(torch.Tensor, n)}
    inits = {getattr(nn.init, n) for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")}
    return frozenset(methods | {f for f in inits if callable(f)})


class _SkipInitOnMeta(torch.overrides.TorchFunctionMode):
    """Initialisation of a meta tensor is a no-op (it returns the tensor, as the in-place op would)."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped = _value_only()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if func in self.skipped:
            target = args[0] if args else (kwargs or {}).get("tensor")
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **(kwargs or {}))


def build_empty(build: Callable[[], nn.Module]) -> nn.Module:
    """What ``parameters_on_meta`` gives for ``build()``, faster where ``build`` skips initialisation itself, as a
    transformers module's does (the ``no_init_weights`` that ``sources.hf`` enters): parameters move to meta as they
    are registered, and no torch function mode watches the build. A mode sees every torch call of the build in
    Python, about 540 for MiniLM (1.5-2 ms of its 10 ms warm load). The constructors' ``torch.empty`` allocations
    are real but never written, so no page of them is ever mapped in, and each is freed as its parameter moves
    (MiniLM's build 7.2 -> 6.4 ms, the 0.25B Llama's 10.9 -> 10.0 ms, medians of alternating fresh processes).
    Buffers and every other tensor a constructor computes are real and computed, as with ``parameters_on_meta``.

    Built with ``torch.empty`` on meta instead (``_build_with_empty_on_meta``): while a torch function mode is
    active (``torch.set_default_device``, ``with torch.device(...)``: the allocations would go to that device, a
    GPU's among them), and where the first way fails, as when the kernel will not grant a parameter's address
    space (one fused expert tensor of 40 GB on a machine of 24)."""
    if not _function_modes():
        try:
            with _parameters_moved(nullcontext()):
                return build()
        except Exception:  # noqa: BLE001 - built again below, where a real error is raised again
            pass
    return _build_with_empty_on_meta(build)


def _function_modes() -> int:
    """How many torch function modes this thread has active; 1 where this torch cannot say (a private function)."""
    count = getattr(torch._C, "_len_torch_function_stack", None)
    return count() if callable(count) else 1


class _EmptyOnMeta(torch.overrides.TorchFunctionMode):
    """``torch.empty`` with no device makes a meta tensor. Every meta tensor a torch function returns, other than a
    parameter, is remembered weakly (``kept``): one still alive once the build is over was kept somewhere, maybe
    where no attribute or buffer shows it (a list, a dict, a helper object, a cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[weakref.ref[torch.Tensor]] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.empty and kwargs.get("device") is None and "out" not in kwargs:
            kwargs = {**kwargs, "device": "meta"}
        result = func(*args, **kwargs)
        for t in (result if isinstance(result, (tuple, list)) else (result,)):
            if isinstance(t, torch.Tensor) and t.is_meta and not isinstance(t, nn.Parameter):
                self.made.append(weakref.ref(t))
        return result

    def kept(self, module: nn.Module) -> bool:
        """Whether a meta tensor made during the build, other than a parameter's, is still alive."""
        params = {id(p) for _, p in module.named_parameters(remove_duplicate=False)}
        return any((t := ref()) is not None and id(t) not in params for ref in self.made)


def _build_with_empty_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with the layers' ``torch.empty`` allocations made on meta in the first place (nothing allocated
    at all; parameters made otherwise, ``torch.ones``, move to meta as they are registered). That is only right when
    every tensor the constructors compute and keep came from elsewhere: a module with a buffer on meta, a meta
    tensor made during the build that is still held anywhere but as a parameter (an attribute, a list, a helper
    object), or a build that fails this way, is built again with ``parameters_on_meta``, whose result (or error) is
    returned."""
    try:
        mode = _EmptyOnMeta()
        with _parameters_moved(mode):
            module = build()
        # A tensor left on meta was made during the build, so ``kept`` sees it, unless it came back re-wrapped (a
        # Parameter registered as a buffer, a subclass): the buffers are looked at too
        if not mode.kept(module) and not any(b.is_meta for b in module.buffers()):
            return module
    except Exception:  # noqa: BLE001 - rebuilt below, where a real error is raised again
        pass
    with parameters_on_meta():
        return build()


def skip_init_on_meta() -> torch.overrides.TorchFunctionMode:
    """A context in which initialising a meta tensor does nothing: for building a module whose values come from a
    file afterwards (loading an artifact, streaming a model larger than memory). Real tensors (buffers a
    constructor computes) are initialised as usual."""
    return _SkipInitOnMeta()


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules whose parameters live on the meta device: no memory, and no initialisation (their values come
    from a file: an artifact being loaded, a source being streamed).

    Buffers stay real: non-persistent ones (e.g. BERT's position_ids, rotary inv_freq) are not in the file and must
    be computed by the module's own constructor, so only tensors on meta skip initialisation.
    """
    with _parameters_moved(skip_init_on_meta()):
        yield


_MOVING = threading.local()  # .depth: how many _parameters_moved contexts this thread is inside
_PATCH_LOCK = threading.Lock()
_PATCH: list[Any] = []  # [the register_parameter replaced, the number of contexts open in all threads]
_REGISTER = nn.Module.register_parameter  # torch's, for a replacement someone else put back after the last one out


def _register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    """nn.Module.register_parameter while a thread is inside ``_parameters_moved``: in that thread, the parameter
    moves to meta as it is registered; in every other thread, the method replaced, unchanged."""
    (_PATCH[0] if _PATCH else _REGISTER)(module, name, param)
    if getattr(_MOVING, "depth", 0) and param is not None and not param.is_meta:
        module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)


@contextmanager
def _parameters_moved(mode: AbstractContextManager[Any]) -> Iterator[None]:
    """Every parameter registered inside, by this thread, moves to meta as it is registered (so that a
    constructor's own later references see the meta one), with ``mode`` entered: a torch function mode (this
    thread's alone too), or ``nullcontext()`` for none. The method is replaced once for all the threads inside at
    a time, and put back by the last one out: each thread replacing and restoring it alone left it replaced for
    good when two loads overlapped (the second saved the first's replacement as the original), and moved other
    threads' parameters meanwhile."""
    with _PATCH_LOCK:
        if not _PATCH:
            # Ours may still be there: someone who replaced it while a build ran put it back after the build
            # ended. Saved as the original, it would call itself.
            current = nn.Module.register_parameter
            _PATCH[:] = [_REGISTER if current is _register_parameter else current, 0]
            nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign]
        _PATCH[1] += 1
    _MOVING.depth = getattr(_MOVING, "depth", 0) + 1
    try:
        with mode:
            yield
    finally:
        _MOVING.depth -= 1
        with _PATCH_LOCK:
            _PATCH[1] -= 1
            if not _PATCH[1]:
                if nn.Module.register_parameter is _register_parameter:  # not someone else's since
                    nn.Module.register_parameter = _PATCH[0]  # type: ignore[method-assign]
                _PATCH.clear()
