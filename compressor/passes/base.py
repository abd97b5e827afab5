"""The Pass contract and the pass registry.

A pass is a class with a ``name`` (its recipe key), a pydantic ``Config`` (extra keys forbidden, every field
described) and an ``apply`` method. The base class does what every pass needs so that each pass only writes
``apply``: it times the pass, measures stored bytes before and after, and checks what ``apply`` returned.

Pass modules must not import torch at module level: ``compress validate`` and ``compress passes`` read their
``Config`` without loading torch.
"""

from __future__ import annotations

import difflib
import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from ..errors import CompressorError
from ..manifest import PassReport

if TYPE_CHECKING:  # pragma: no cover
    from ..model import Model

__all__ = [
    "Context",
    "Pass",
    "PassConfig",
    "PassReport",
    "PassResult",
    "available_passes",
    "get_pass",
    "register_pass",
    "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "compressor.passes"
# Built-in pass modules, imported on first use of the registry (they are light: no torch at import).
_BUILTIN_MODULES = ("compressor.passes.cast", "compressor.passes.quantize", "compressor.passes.prune",
                    "compressor.passes.share", "compressor.passes.recover", "compressor.passes.shard")


class PassConfig(BaseModel):
    """Base for pass configs: inert, frozen, unknown keys rejected when the recipe is parsed."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # every number finite


@dataclass
class PassResult:
    """What ``Pass.apply`` returns: the names of the tensors it changed and pass-specific figures."""

    touched: list[str]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """Run-wide settings a pass may need."""

    seed: int = 0
    log: Any = None  # compressor.log.Reporter; Any keeps this module free of rich
    base_dir: Any = None  # the recipe's directory (pathlib.Path): data files are relative to it
    original: Any = None  # a copy of the uncompressed module, kept when a pass has `needs_original` (distillation)
    # A streamed model (on the meta device): read(name) gives one tensor's value as the passes so far left it, and
    # scratch is a directory beside the artifact for what a pass computes ahead of the write (removed after it).
    read: Any = None
    scratch: Any = None
    group: Any = None  # compressor.stream.Group: this process's place in a torchrun launch (streamed runs)

    def info(self, message: str) -> None:
        if self.log is not None:
            self.log.info(message)


class Pass(ABC):
    """Base class of every compression pass. Subclasses set ``name``, ``Config``, ``summary`` and ``apply``."""

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]]
    summary: ClassVar[str] = ""
    # Passes that must not come earlier in the recipe than this one: {earlier pass name: why}.
    must_not_follow: ClassVar[Mapping[str, str]] = {}
    # Set (to the reason) when the pass must be the recipe's last.
    must_be_last: ClassVar[str | None] = None
    # True: the pipeline keeps a copy of the uncompressed module in ``Context.original`` (e.g. a distillation teacher).
    needs_original: ClassVar[bool] = False

    def __init__(self, config: PassConfig, index: int = 0) -> None:
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.index = index

    def __call__(self, model: Model, ctx: Context) -> PassReport:
        before = model.stored_nbytes()
        start = time.perf_counter()
        result = self.apply(model, ctx)
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            raise TypeError(
                f"pass {self.name!r}: apply() returned {type(result).__name__}; it must return a PassResult"
            )
        unknown = [n for n in result.touched if n not in model.encodings]
        if unknown:
            raise TypeError(f"pass {self.name!r} reported tensors the model does not have: {unknown[:5]}")
        model.check_encodings(result.touched)
        return PassReport(
            name=self.name,
            index=self.index,
            config=self.config.model_dump(mode="json"),
            tensors_touched=len(result.touched),
            params_touched=model.numel(result.touched),
            bytes_before=before,
            bytes_after=model.stored_nbytes(),
            seconds=round(seconds, 4),
            details=result.details,
        )

    def memory(self) -> tuple[float, float]:
        """(working, after): the peak memory this pass adds while it runs, and the model's bytes after it, each as a
        multiple of the model's bytes when the pass starts. A run adds these up before loading the model and refuses
        one that will not fit (compressor/budget.py). Default, for passes that do not say: a whole copy while it
        runs, the same size after."""
        return 1.0, 1.0

    def runs_layers(self) -> bool:
        """Whether, streamed, this pass runs the model's decoder layers (it reads values with ``ctx.read``): the
        streamed model is then built with the buffers its constructor computes. Default: no."""
        return False

    def stream_memory(self, model: Model) -> int:
        """Bytes this pass holds beside the stream's tensors in flight when ``model`` (on the meta device) is
        streamed: a pass that runs the model a decoder layer at a time holds a layer and the calibration
        activations. Default: nothing (a per-tensor pass works on the tensors in flight)."""
        return 0

    def stream_problem(self) -> str | None:
        """None when this pass can stream a model larger than memory (compressor/stream.py): ``apply`` decides from
        the model's names, shapes, dtypes and encodings alone, so it runs on a module on the meta device, and it
        changes a tensor only by giving it a new encoding and the value ``decode(encode(value))`` under it, which
        streaming replays one tensor at a time. Otherwise a sentence saying why not. Default: it reads values."""
        return f"{self.name} reads the weights' values, which a streamed model does not hold all at once"

    def check(self, model: Model) -> None:
        """Refuse (RecipeError) what cannot work on this model, such as a pattern matching no module. The pipeline
        calls every pass's check after loading the model and before the first pass runs, so a mistake in the last
        pass costs no minutes of work. Default: nothing to check."""

    @abstractmethod
    def apply(self, model: Model, ctx: Context) -> PassResult:
        """Change ``model`` in place: its module holds the effective values, ``model.encodings`` their storage."""


_REGISTRY: dict[str, type[Pass]] = {}
_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{cls.__name__}: set `name` to the pass's recipe key (an identifier)")
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        raise TypeError(f"{cls.__name__}: set `Config` to a pydantic model (subclass PassConfig)")
    if config.model_config.get("extra") != "forbid":
        raise TypeError(f"{cls.__name__}.Config must forbid extra keys; subclass PassConfig")
    undocumented = [f for f, info in config.model_fields.items() if not info.description]
    if undocumented:
        raise TypeError(f"{cls.__name__}.Config fields need a description: {', '.join(undocumented)}")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise TypeError(f"two passes are named {name!r}: {existing.__module__} and {cls.__module__}")
    _REGISTRY[name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not pass silently, but must say which one
            raise CompressorError(
                f"could not load the pass plugin {ep.name!r} ({ep.value}) from the "
                f"{ENTRY_POINT_GROUP!r} entry-point group: {exc}. Fix or uninstall that package."
            ) from exc
        if cls.__dict__.get("name") is None or _REGISTRY.get(cls.name) is not cls:
            register_pass(cls)


def available_passes() -> dict[str, type[Pass]]:
    """All registered passes, built-in and from the ``compressor.passes`` entry-point group, by name."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as ``name``; KeyError with close matches and the full list otherwise."""
    passes = available_passes()
    if name in passes:
        return passes[name]
    close = difflib.get_close_matches(name, passes, n=3)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise KeyError(f"no pass named {name!r}; {hint}available passes: {', '.join(passes)}")
