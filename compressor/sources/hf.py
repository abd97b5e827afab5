"""`hf` source: a local Hugging Face model directory, loaded with transformers (never from a hub), end to end:
its recipe schema, loading it for a run, rebuilding an artifact's empty architecture from its config, and the
baseline's model and files for evaluation. Torch and transformers are imported only when used."""

from __future__ import annotations

import inspect
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, PositiveInt, ValidationInfo, field_validator

from ..errors import ArtifactError, CompressorError, Problem, RecipeError, UsageError
from ..safetensors_io import DTYPE_CODES
from ..schema import Strict, context_path, resolve_path

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from ..model import Model

__all__ = ["HFModel", "load", "lazy", "architecture", "baseline", "baseline_module", "preimport_source",
           "preimport_artifact", "load_hf", "load_hf_module", "example_text_inputs", "EXAMPLE_SENTENCES",
           "is_copied_file", "model_files", "hf_architecture", "read_config", "preimport_transformers",
           "import_transformers"]


class HFModel(Strict):
    """A local Hugging Face model directory: config.json, safetensors weights and tokenizer files."""

    source: Literal["hf"] = Field(description="`hf`: a local Hugging Face model directory.")
    path: str = Field(
        description="The model directory (config.json + *.safetensors); relative paths are resolved against "
        "the recipe file's directory. Config and tokenizer files are copied into the artifact."
    )
    auto_class: Literal[
        "AutoModel",
        "AutoModelForSequenceClassification",
        "AutoModelForTokenClassification",
        "AutoModelForCausalLM",
        "AutoModelForMaskedLM",
        "AutoModelForQuestionAnswering",
    ] = Field("AutoModel", description="transformers auto class that builds the model from its config.")
    max_length: PositiveInt = Field(
        128, le=8192, description="Sequence length of the example inputs made with the model's tokenizer."
    )

    @field_validator("path")
    @classmethod
    def _exists(cls, value: str, info: ValidationInfo) -> str:
        p = context_path(value, info)
        if not p.exists():
            raise ValueError(f"no such directory: {p}; give the path of a local Hugging Face model directory")
        if not p.is_dir():
            raise ValueError(f"{p} is a file; give the directory that holds config.json and the weights")
        if not (p / "config.json").is_file():
            raise ValueError(f"{p} has no config.json; is it a Hugging Face model directory?")
        if not any(p.glob("*.safetensors")):
            pickled = [f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            extra = (
                f" It has {', '.join(pickled)}, a pickle format this tool never loads; convert it with "
                "transformers' save_pretrained(..., safe_serialization=True)."
                if pickled
                else ""
            )
            raise ValueError(f"{p} has no *.safetensors weights.{extra}")
        return value


SPEC = HFModel


def load(spec: HFModel, base_dir: Path, seed: int) -> Model:
    """The model a recipe's `hf` section names (``seed`` is unused: example inputs are fixed sentences)."""
    return load_hf(resolve_path(spec.path, base_dir), spec.auto_class, spec.max_length,
                   source={"kind": "hf", "path": spec.path})


def architecture(root: Path, source: dict[str, Any]) -> nn.Module:
    """An artifact's empty module, from the config.json copied into it (parameters on meta: the caller's)."""
    return hf_architecture(root, source.get("auto_class", "AutoModel"))


def import_transformers() -> Any:
    """transformers, imported (the first time in this process) without scikit-learn and, under the `compress`
    command, without SciPy.

    transformers imports each whenever it is installed, for work compressor never does: scikit-learn for assisted
    generation's confidence-threshold tuning (a third of transformers' own import time, 1.3 s on these machines),
    SciPy's optimizers for the Hungarian matching of object-detection training losses (0.25-0.4 s of every
    ``compress run``). Hidden while transformers checks for them, so it records them as absent; importable again
    afterwards (the digits data set uses scikit-learn, NNCF SciPy). SciPy only where compressor owns the process
    (``compressor.process``): a program that imports compressor may use transformers' SciPy paths itself (image
    resizing, matching)."""
    import sys

    from ..process import owned

    if "transformers" not in sys.modules:
        hidden = [name for name in ("sklearn", "scipy") if name not in sys.modules and (name != "scipy" or owned())]
        for name in hidden:
            sys.modules[name] = None  # type: ignore[assignment]  # importlib.util.find_spec: "not installed"
        try:
            import transformers  # noqa: F401 - the first import, which looks for them once
        finally:
            for name in hidden:
                if sys.modules.get(name, 0) is None:
                    del sys.modules[name]
    import transformers

    return transformers


def hf_architecture(config_dir: Path, auto_class: str) -> nn.Module:
    """The module ``auto_class`` builds from the config.json in ``config_dir``, without weights."""
    transformers = import_transformers()

    auto = getattr(transformers, auto_class, None)
    if auto is None:
        raise ArtifactError(f"transformers has no {auto_class!r}; upgrade transformers")
    config = read_config(config_dir)
    with _uninitialised(skip_on_meta=False):  # the caller's parameters_on_meta skips it already
        return auto.from_config(config)


def read_config(config_dir: Path) -> Any:
    """The config in ``config_dir``: what ``AutoConfig.from_pretrained(config_dir, local_files_only=True)`` gives,
    without the string of the whole config that transformers' ``from_dict`` builds for a log line whether or not
    it is shown (it compares the config with a default one: 0.9 ms of MiniLM's 12 ms warm load). The config class
    is called on the file's dictionary as ``from_dict`` calls it; a file it would treat specially (remote code,
    version-specific config files, an unknown or missing model type, a file it cannot parse, a path in the hub's
    cache) goes through ``from_pretrained`` itself, whose errors are the user's to read. tests/test_hf_config.py
    holds the two to the same config for every architecture the project uses."""
    transformers = import_transformers()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        raw = json.loads((Path(config_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = None
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(kind, str) or kind not in CONFIG_MAPPING or "snapshots" in Path(config_dir).parts \
            or raw.keys() & {"auto_map", "configuration_files"} or (kind == "mistral" and "layer_types" in raw):
        # (the last: AutoConfig reads a Mistral config with layer types as a Ministral one)
        return transformers.AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    config = CONFIG_MAPPING[kind](**{**raw, "_commit_hash": None, "attn_implementation": None})
    if hasattr(config, "pruned_heads"):  # JSON keys are strings: from_dict makes them layer numbers again
        config.pruned_heads = {int(key): value for key, value in config.pruned_heads.items()}
    config.name_or_path = str(config_dir)
    return config


_NO_INIT = threading.RLock()  # held while a build is inside transformers' no_init_weights (see _uninitialised)


def _uninitialised(skip_on_meta: bool = True) -> Any:
    """A context for building a transformers model whose values come next: transformers' no_init_weights (no
    _init_weights, no ties) and, with ``skip_on_meta``, skip_init_on_meta. One thread at a time: no_init_weights
    puts back the module-wide flag it found, so builds overlapping in threads (A in, B in, A out, B out) left
    initialisation off for the rest of the process, and every model built afterwards uninitialised."""
    from contextlib import ExitStack

    from ..model import skip_init_on_meta

    stack = ExitStack()
    stack.enter_context(_NO_INIT)
    try:
        try:
            from transformers.modeling_utils import no_init_weights
            stack.enter_context(no_init_weights())
        except ImportError:  # pragma: no cover - moved in a later release; skip_init_on_meta still applies
            pass
        if skip_on_meta:
            stack.enter_context(skip_init_on_meta())
    except BaseException:
        stack.close()  # the lock too: left held, it would stop every later build
        raise
    return stack


def baseline(model: dict[str, Any], base_dir: Path) -> tuple[str, list[Path], list[Path]]:
    """(label, files, weight files) of the uncompressed model a recipe's `hf` section names."""
    files, weights = model_files(resolve_path(model["path"], base_dir))
    return f"hf: {model['path']}", files, weights


def baseline_module(model: dict[str, Any], base_dir: Path) -> nn.Module:
    """The uncompressed model, loaded for evaluation."""
    return load_hf_module(resolve_path(model["path"], base_dir), model.get("auto_class", "AutoModel"))


def preimport_source(model: dict[str, Any], base_dir: Path) -> None:
    """Import what loading the baseline will import, so that load timing measures the model."""
    preimport_transformers(resolve_path(model["path"], base_dir) / "config.json")


def preimport_artifact(root: Path, source: dict[str, Any]) -> None:
    """Import what rebuilding the artifact will import, so that load timing measures the model."""
    preimport_transformers(root / "config.json")


def preimport_transformers(config: Path) -> None:
    """transformers and the model's own modeling module (imported lazily at first use, which takes seconds)."""
    import importlib

    import_transformers()
    from transformers import AutoConfig, AutoModel, PreTrainedModel  # noqa: F401 - lazy submodules

    try:
        model_type = json.loads(config.read_text()).get("model_type", "")
        importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except (OSError, ValueError, ImportError):
        pass  # the loader will import (and time) it, or fail with its own clear error


def model_files(path: Path) -> tuple[list[Path], list[Path]]:
    """(every file from_pretrained reads, the weight files) of a Hugging Face model directory."""
    if not path.is_dir():
        raise UsageError(f"the baseline model directory {path} does not exist")
    # What from_pretrained reads: the top-level weights (the shards an index names, or model.safetensors) and
    # top-level config/tokenizer files; never checkpoint-*/ or other subdirectories.
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"{index} is not a valid safetensors index ({exc})") from None
        for name in names:  # shards are files of this directory: nothing elsewhere is read for it
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
                raise UsageError(f"{index} names the weight file {name!r}, which is not a file name in {path}; "
                                 "an index names the shards beside it, by file name only")
        weights = [path / n for n in names] + [index]
    else:
        weights = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else sorted(
            path.glob("*.safetensors"))
    extra = sorted(p for p in path.iterdir() if p.is_file() and p not in weights
                   and is_copied_file(p.relative_to(path)))
    return weights + extra, weights


# Fixed sentences for example inputs: deterministic, varied length, no data files needed.
EXAMPLE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Model compression trades a little accuracy for a lot of speed and memory.",
)
_SKIP_DIRS = {"onnx", "openvino", ".git", ".cache", "__pycache__"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx_data", ".ot")


def is_copied_file(rel: Path) -> bool:
    """Files of a model directory that travel into the artifact: everything but weights and their indexes."""
    if any(part in _SKIP_DIRS or part.startswith(".") for part in rel.parts):
        return False
    name = rel.name
    return not (name.endswith(_WEIGHT_SUFFIXES) or name.endswith((".safetensors.index.json", ".bin.index.json")))


def load_hf_module(path: Path, auto_class: str) -> nn.Module:
    """The model of a Hugging Face directory, loaded strictly (offline, safetensors only), in eval mode."""
    transformers = import_transformers()

    model_files(path)  # an index naming shards outside the directory is refused before transformers reads them
    cls = getattr(transformers, auto_class)
    try:
        module, info = cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True, dtype="auto",
                                           output_loading_info=True)
    except Exception as exc:  # transformers and safetensors raise many types for a bad directory
        raise CompressorError(
            f"transformers could not load the model in {path} with {auto_class}: {type(exc).__name__}: {exc}"
        ) from exc
    # transformers fills missing weights with random values and only warns; an artifact of random weights
    # must never pass as the user's model.
    bad = {k: info.get(k) or [] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(str(x) for x in v[:5])}" for k, v in bad.items() if v)
        raise RecipeError(
            Problem(f"the weights in {path} do not match the {auto_class} architecture of its config.json ({detail})",
                    path="model.path",
                    hint="use the auto_class the checkpoint was saved with, or a directory whose weights are complete")
        )
    return module.eval()


def load_hf(path: Path, auto_class: str, max_length: int, *, source: dict[str, Any], task: str | None = None) -> Model:
    """Load a Hugging Face model directory with transformers, offline, safetensors only."""
    return _as_model(path, load_hf_module(path, auto_class), auto_class, max_length, source, task)


def _as_model(path: Path, module: nn.Module, auto_class: str, max_length: int, source: dict[str, Any],
              task: str | None) -> Model:
    from ..model import Model

    config = module.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(positions, int) and positions > 0:
        max_length = min(max_length, positions)  # a model of 64 positions gets example inputs it can take
    inputs = example_text_inputs(path, module, max_length)
    if task is None:
        named = {"AutoModel": "text-embedding", "AutoModelForCausalLM": "text-generation"}
        task = named.get(auto_class) or auto_class.removeprefix("AutoModelFor").lower()
    source = dict(source, auto_class=auto_class, model_type=config.model_type,
                  architectures=list(config.architectures or []))
    return Model(module=module, source=source, example_inputs=inputs, task=task, files_dir=path)


def lazy(spec: HFModel, base_dir: Path, seed: int, buffers: bool = False
         ) -> tuple[Model, dict[str, tuple[Path, dict[str, Any], int]]]:
    """The model a recipe's `hf` section names with its module on the meta device (names, shapes, dtypes, no
    values), and where each stored tensor's values are: {state-dict name: (weight file, header entry, data start)},
    for streaming (compressor/stream.py). The dtypes are those ``load`` would give (transformers' dtype "auto").
    ValueError, saying why, where the directory's weights cannot be streamed exactly as ``load`` would load them;
    CompressorError naming the file for a weight file that cannot be read. ``buffers``: the buffers the constructors
    compute (rotary frequencies; in no file) are real, for passes that run the model's layers
    (compressor/passes/layerwise.py); otherwise on meta too (some models' are large: GPT-2's causal masks)."""
    import torch

    from ..model import parameters_on_meta

    transformers = import_transformers()
    path = resolve_path(spec.path, base_dir)
    # The weight files' headers first: they bound what the config may ask for, before it builds any module.
    found = _source_tensors(path)
    try:
        config = read_config(path)
        layers = getattr(config, "num_hidden_layers", None)
        if isinstance(layers, int) and layers > len(found):
            # Every decoder layer stores at least one tensor: a config asking for more layers than the files hold
            # tensors would only spend minutes (and memory) building modules on meta before the names disagree.
            raise ValueError(f"config.json says num_hidden_layers={layers:,}, and its weight files hold only "
                             f"{len(found):,} tensors; the config does not describe these weights")
        with parameters_on_meta() if buffers else torch.device("meta"), _uninitialised(skip_on_meta=not buffers):
            module = getattr(transformers, spec.auto_class).from_config(config).eval()
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bad config.json raises OSError, TypeError, KeyError, ...
        raise CompressorError(f"transformers could not build the model in {path} with {spec.auto_class} from its "
                              f"config.json: {type(exc).__name__}: {exc}") from None
    module.tie_weights()  # what from_config does after initialising: the ties say which tensors are stored once
    _check_dtypes(module, config, {e["dtype"] for _, e, _ in found.values()})
    prefix = getattr(module, "base_model_prefix", "")
    where: dict[str, tuple[Path, dict[str, Any], int]] = {}
    used: set[str] = set()
    seen: set[int] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        key = next((k for k in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}") if k in found), None)
        if key is None:
            if id(tensor) in seen:
                continue  # a tied tensor, stored under its first name
            raise ValueError(f"{name} is not in its weight files under that name")
        used.add(key)
        _, entry, _ = found[key]
        if list(entry["shape"]) != list(tensor.shape):
            raise ValueError(f"{key} has shape {entry['shape']} in the files, {list(tensor.shape)} in the model")
        if tensor.is_floating_point() and _DTYPES[entry["dtype"]] not in _FLOATS:
            raise ValueError(f"{key} is {_DTYPES[entry['dtype']]} in the files, where the model has a "
                             f"{str(tensor.dtype).removeprefix('torch.')} parameter (loading it whole fails too)")
        if id(tensor) not in seen:
            tensor.data = torch.empty(tuple(tensor.shape), dtype=getattr(torch, _DTYPES[entry["dtype"]]),
                                      device="meta")
            seen.add(id(tensor))
            where[name] = found[key]
    unused = sorted(set(found) - used)
    if unused:  # loading whole refuses these (unexpected keys): so does streaming
        raise ValueError(f"its weight files hold tensors the {spec.auto_class} architecture does not use: "
                         f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}")
    model = _as_model(path, module, spec.auto_class, spec.max_length, {"kind": "hf", "path": spec.path}, None)
    return model, where


def _source_tensors(path: Path) -> dict[str, tuple[Path, dict[str, Any], int]]:
    """{tensor name: (file, header entry, data start)} over a model directory's safetensors files, each name in the
    file its index names (when there is one)."""
    from ..safetensors_io import read_header

    files, index = model_files(path)[1], path / "model.safetensors.index.json"
    owner = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    found: dict[str, tuple[Path, dict[str, Any], int]] = {}
    elsewhere: dict[str, Path] = {}  # tensors a file holds that the index says another file holds
    for file in files:
        if not file.name.endswith(".safetensors"):
            continue
        try:
            header, start = read_header(file)
        except (ArtifactError, OSError) as exc:
            raise CompressorError(f"the source model's weight file {file} cannot be read: {exc}") from None
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if owner is not None and owner.get(name) != file.name:
                elsewhere.setdefault(name, file)
                continue
            if name in found:  # without an index nothing says which copy loading would take
                raise ValueError(f"{name} is in two weight files, {found[name][0].name} and {file.name}; keep one")
            found[name] = (file, entry, start)
    for name, shard in (owner or {}).items():
        if name not in found:
            held = f" (it is in {elsewhere[name].name})" if name in elsewhere else ""
            raise ValueError(f"{index} maps {name} to {shard}, which does not hold it{held}; correct the index")
    return found


def _check_dtypes(module: nn.Module, config: Any, codes: set[str]) -> None:
    """ValueError when transformers would convert some of these weights while loading them whole (dtype "auto":
    every float weight to config.json's dtype; float32 for the modules a model keeps in float32)."""
    unknown = sorted(codes - set(_DTYPES))
    if unknown:
        raise ValueError(f"its weight files hold {', '.join(unknown)} tensors, which streaming does not read")
    floats = sorted(_DTYPES[c] for c in codes if c in ("F32", "F16", "BF16", "F64"))
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    named = str(named).removeprefix("torch.") if named is not None else None
    if len(floats) > 1 or (named is not None and floats and floats != [named]):
        raise ValueError(f"its float weights are {', '.join(floats)} and config.json says {named}: transformers "
                         f"loads them all as one dtype, converting some, which streaming does not")
    kept = list(getattr(module, "_keep_in_fp32_modules", None) or []) + list(
        getattr(module, "_keep_in_fp32_modules_strict", None) or [])
    if kept and floats and floats != ["float32"]:
        raise ValueError(f"transformers loads its {', '.join(kept)} modules in float32 from {floats[0]} weights, "
                         "converting them, which streaming does not")


# safetensors dtype codes streaming reads -> torch dtype names (torch's unsigned 16-64-bit types have few kernels)
_DTYPES = {code: name for name, code in DTYPE_CODES.items() if name not in ("uint16", "uint32", "uint64")}
_FLOATS = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}


def example_text_inputs(path: Path, module: nn.Module, max_length: int) -> dict[str, torch.Tensor]:
    """Tokenized example sentences, padded to ``max_length``; random token ids if there is no tokenizer."""
    import torch

    accepted = set(inspect.signature(module.forward).parameters)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception:  # noqa: BLE001 - no or broken tokenizer files raise OSError, ValueError, even TypeError
        tokenizer = None
    if tokenizer is not None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        enc = tokenizer(list(EXAMPLE_SENTENCES), padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        return {k: v for k, v in enc.items() if k in accepted}
    vocab = int(getattr(module.config, "vocab_size", 1000))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (len(EXAMPLE_SENTENCES), max_length), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {k: v for k, v in inputs.items() if k in accepted}
