"""Run a compressor bundle with nothing but numpy and onnxruntime (and the `tokenizers` package for text models).

`compress pack` copies this file into every bundle as run.py. It must not import compressor, torch or
transformers: the bundle runs where only the inference runtime is installed.

    python run.py "a sentence" "another one"      text models: prints the outputs (embeddings: mean-pooled)
    python run.py --input x.npy                    a model with one input: the array is that input
    python run.py --input inputs.npz               any model: one array per input, by the input's name
    python run.py --save out.npz ...               also write every output to an .npz file

    python run.py "Once upon a time" "The" --max-new-tokens 32     causal LMs: continue prompts (greedy)
    python run.py "Once" --sample --seed 7 --top-k 40 --top-p 0.9  seeded sampling (also --temperature T)

Causal LM bundles (generate.py and decoding.py beside this file) batch prompts with left padding; a single
prompt's text streams to stderr as it comes (--no-stream: not), the JSON document holds every prompt's tokens.

It follows the `compress` command's contract: exit 0 with one JSON document on stdout; on a problem, one paragraph on
stderr saying what was wrong and what would work, and exit 2 when the input or the command line is at fault, 1 when
the bundle or ONNX Runtime is (130 when interrupted). The JSON is always valid: non-finite output values are written
as null and counted in `non_finite`. Inputs are checked against the model's graph first (names, rank, fixed sizes,
number types, no NaN or infinity, at least one example); pickled arrays are never loaded.

From Python:

    from run import Bundle
    bundle = Bundle("path/to/bundle")
    vectors = bundle.embed(["a sentence"])         # text-embedding models: mean-pooled over real tokens
    outputs = bundle.run({"x": array})             # any model: {output name: array}; InputError on bad input
    out = bundle.generate(["Once upon a time"], max_new_tokens=16)   # causal LMs; out["text"][0]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}
_FLOATS = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(double)": np.float64}
_INTS = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}
_MAX_INPUT_BYTES = 1 << 31  # an input file larger than this is not an input someone meant to give


class BundleError(Exception):
    """The bundle (or ONNX Runtime) cannot do the work: exit code 1."""

    exit_code = EXIT_RUNTIME


class InputError(BundleError, ValueError):
    """What was given to the model is not what it takes: exit code 2."""

    exit_code = EXIT_USAGE


def _first_line(exc: BaseException) -> str:
    try:
        text = str(exc).strip().splitlines()
    except Exception:  # noqa: BLE001 - a message that cannot even be turned into text
        text = []
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _session(model: Path, options: Any, providers: list[str], quiet: bool) -> tuple[Any, str | None]:
    """ONNX Runtime's session, and a note when CUDA was asked for but could not start. CUDA first loads pip's
    nvidia-* libraries (onnxruntime >= 1.21's preload_dlls; torch, imported first, would too). ``quiet`` (run.py's
    own process): what they print, a CUDA fallback included, is kept off stdout, which holds the result."""
    cuda, printed = "CUDAExecutionProvider" in providers, io.StringIO()
    with contextlib.redirect_stdout(printed) if quiet and cuda else contextlib.nullcontext():
        if cuda and hasattr(ort, "preload_dlls"):
            with contextlib.suppress(Exception):  # best effort: a provider that cannot start is noted below
                ort.preload_dlls()
        session = ort.InferenceSession(str(model), sess_options=options, providers=providers)
    if not cuda or "CUDAExecutionProvider" in session.get_providers():
        return session, None
    why = [x.strip() for x in printed.getvalue().splitlines() if "EP Error" in x or "Failed to load" in x] + [
        'python -c "import onnxruntime; onnxruntime.print_debug_info()" may say why']
    return session, (f"ONNX Runtime could not start its CUDA provider ({why[0]}); running on "
                     f"{', '.join(session.get_providers())}. With a GPU: pip install 'onnxruntime-gpu[cuda,cudnn]'.")


class Bundle:
    """An unpacked bundle: its ONNX Runtime session, tokenizer (text models) and settings (bundle.json)."""

    def __init__(self, path: str | Path = HERE, providers: list[str] | None = None, quiet: bool = False) -> None:
        """``providers``: ONNX Runtime's, in order (default: the bundle's); ``quiet``: run.py's own process (see
        _session). A CUDA provider that could not start is in ``notes`` (and a warning, unless ``quiet``)."""
        self.path = Path(path)
        try:
            info = json.loads((self.path / "bundle.json").read_text(encoding="utf-8"))
            if not isinstance(info, dict) or not isinstance(info.get("model"), str):
                raise ValueError("not a bundle description (no `model`)")
        except (OSError, ValueError) as exc:
            raise BundleError(f"{self.path / 'bundle.json'} cannot be read ({_first_line(exc)}); unpack the bundle "
                              "again, or pack it again with `compress pack`") from None
        self.info: dict[str, Any] = info
        self.generates = isinstance(info.get("generation"), dict)  # a causal language model: see generate()
        available = ort.get_available_providers()
        # Only providers this onnxruntime build has: asking for CUDA where it is absent only prints errors.
        wanted = providers or self.info.get("providers") or ["CPUExecutionProvider"]
        self.providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        level = self.info.get("graph_optimization", "all")
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS.get(level, "ORT_ENABLE_ALL"))
        model = self.path / self.info["model"]
        try:
            self.session, note = _session(model, options, self.providers, quiet)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own classes for a missing or damaged model
            raise BundleError(f"ONNX Runtime cannot load {model} ({_first_line(exc)}); unpack the bundle again, or "
                              "pack it again with `compress pack`") from None
        self.notes = [note] if note else []
        if note and not quiet:
            warnings.warn(note, RuntimeWarning, stacklevel=2)
        self.providers = self.session.get_providers()  # what the session runs on, not what was asked for
        self.tokenizer = None
        spec = self.info.get("tokenizer")
        if spec and not isinstance(spec, dict):
            raise BundleError(f"{self.path / 'bundle.json'}: `tokenizer` is not a mapping; pack the bundle again")
        if spec:
            try:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(str(self.path / spec["file"]))
                if self.generates:  # prompts are never cut, and generate.py pads them on the left
                    tok.no_truncation()
                    tok.no_padding()
                else:
                    tok.enable_truncation(max_length=int(spec["max_length"]))
                    tok.enable_padding(pad_id=int(spec["pad_id"]), pad_token=spec["pad_token"])
            except ImportError:
                raise BundleError("this is a text model and needs the `tokenizers` package: "
                                  "pip install tokenizers") from None
            except Exception as exc:  # noqa: BLE001 - tokenizers raises its own Exception for a damaged file
                raise BundleError(f"the tokenizer {spec.get('file')} cannot be loaded ({_first_line(exc)})") from None
            self.tokenizer = tok

    def describe_inputs(self) -> str:
        """The model's inputs as ``name: type [dims]``, for messages."""
        return "; ".join(f"{a.name}: {a.type} {list(a.shape)}" for a in self.session.get_inputs())

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Token inputs for ``texts``, padded to the longest, as the model's graph inputs ask."""
        if self.tokenizer is None:
            raise InputError(f"this bundle's model takes no text (its inputs: {self.describe_inputs()}); give "
                             "arrays: --input x.npy (one input) or --input inputs.npz (one array per input name)")
        if not texts:
            raise InputError("no texts given; give at least one")
        batch = self.tokenizer.encode_batch(list(texts))
        columns = {"input_ids": [e.ids for e in batch], "attention_mask": [e.attention_mask for e in batch],
                   "token_type_ids": [e.type_ids for e in batch]}
        feed = {}
        for arg in self.session.get_inputs():
            if arg.name not in columns:
                raise BundleError(f"the model's input {arg.name!r} cannot be made from text")
            feed[arg.name] = np.asarray(columns[arg.name], dtype=_INTS.get(arg.type, np.int64))
        return feed

    def check(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """``inputs`` checked against the graph and converted to the types it declares; InputError naming the
        first problem otherwise."""
        if not isinstance(inputs, dict):
            raise InputError(f"inputs are a dict of arrays by input name, not {type(inputs).__name__}")
        args = self.session.get_inputs()
        missing = [a.name for a in args if a.name not in inputs]
        unknown = sorted(set(inputs) - {a.name for a in args})
        if missing or unknown:
            raise InputError(f"the model takes the inputs {self.describe_inputs()}; "
                             + (f"missing: {', '.join(missing)}" if missing else f"unknown: {', '.join(unknown)}"))
        feed = {}
        for arg in args:
            value = inputs[arg.name]
            try:
                value = np.asarray(value)
            except (TypeError, ValueError) as exc:
                raise InputError(f"input {arg.name!r} is not an array ({_first_line(exc)})") from None
            where = f"input {arg.name!r} (shape {list(value.shape)}, {value.dtype})"
            dims = list(arg.shape)
            if value.ndim != len(dims):
                raise InputError(f"{where}: the model takes rank {len(dims)}, {arg.type} {dims}")
            for i, (want, got) in enumerate(zip(dims, value.shape)):
                if isinstance(want, int) and want > 0 and want != got:
                    raise InputError(f"{where}: dimension {i} must be {want} ({arg.type} {dims})")
            if value.size == 0:
                raise InputError(f"{where} is empty; give at least one example")
            if arg.type in _FLOATS:
                if value.dtype.kind not in "biuf":
                    raise InputError(f"{where}: the model takes numbers ({arg.type})")
                value = value.astype(_FLOATS[arg.type])
                if not np.isfinite(value).all():
                    bad = tuple(int(i) for i in np.argwhere(~np.isfinite(value))[0])
                    raise InputError(f"{where} holds NaN or infinity (first at {list(bad)}, possibly after "
                                     f"conversion to {value.dtype}); give finite values")
            elif arg.type in _INTS:
                if value.dtype.kind not in "biu":
                    raise InputError(f"{where}: the model takes integers ({arg.type}); token ids and class "
                                     "indices are never fractional")
                value = value.astype(_INTS[arg.type])
            elif arg.type == "tensor(bool)":
                if value.dtype.kind != "b":
                    raise InputError(f"{where}: the model takes booleans ({arg.type})")
            feed[arg.name] = value
        return feed

    def run(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """The model's outputs by name. Inputs are checked first (see :meth:`check`); float inputs are given the
        float type the graph declares."""
        feed = self.check(inputs)
        names = [o.name for o in self.session.get_outputs()]
        try:
            return dict(zip(names, self.session.run(names, feed)))
        except Exception as exc:  # noqa: BLE001 - e.g. a token id past the vocabulary: ORT's own error classes
            raise BundleError(f"ONNX Runtime failed on these inputs ({_first_line(exc)}); the model takes "
                              f"{self.describe_inputs()}") from None

    def embed(self, texts: list[str]) -> np.ndarray:
        """Sentence embeddings: the first output mean-pooled over real tokens (float32, not normalized)."""
        feed = self.encode(texts)
        hidden = next(iter(self.run(feed).values())).astype(np.float32)
        mask = feed["attention_mask"].astype(np.float32)[..., None]
        return (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)

    def generate(self, prompts: list[str], max_new_tokens: int = 32, *, sample: bool = False, seed: int = 0,
                 top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0, on_text: Any = None) -> dict[str, Any]:
        """Continue each prompt (a causal language model's bundle): greedy, or with ``sample`` a draw seeded by
        ``seed`` after temperature, top-k (0: all) and top-p; several prompts run as one left-padded batch, each
        stopping at the end-of-text token. ``on_text(str)`` gets a single prompt's text as it comes. Returns
        {"prompts", "prompt_tokens", "tokens" (new ids), "text" (new text), "stopped", "settings"}; InputError for
        bad prompts or settings (generate.py says more)."""
        if not self.generates or self.tokenizer is None:
            raise InputError(f"this bundle's model does not generate text (task {self.info.get('task')!r}; only "
                             "causal language models do); " + _what_works(self))
        gen, decoding, spec = _sibling("generate"), _sibling("decoding"), self.info["generation"]
        try:
            settings = gen.Settings(max_new_tokens, sample, seed, top_k, top_p, temperature)
            decoder = decoding.OrtDecoder(self.session)
            return gen.generate(decoder, self.tokenizer, prompts, settings, eos_id=spec.get("eos_token_id"),
                                pad_id=int(self.info["tokenizer"]["pad_id"]), max_positions=spec.get("max_positions"),
                                on_text=on_text)
        except gen.PromptError as exc:
            raise InputError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own error classes, or a graph without a cache
            raise BundleError(f"generation failed ({_first_line(exc)}); the model takes "
                              f"{self.describe_inputs()}") from None


# The bundle's other modules, by file name in a bundle and, for running this file in place, in compressor.
_SIBLINGS = {"generate": ("generate.py", "bundle_generate.py"), "decoding": ("decoding.py",)}


def _sibling(name: str) -> Any:
    """The module ``name`` (generate, decoding) from this file's folder, loaded by path: run.py works from any
    working directory, run or imported, and never picks up another module of that name from sys.path."""
    key = f"_compressor_bundle_{name}_{abs(hash(str(HERE)))}"
    if key in sys.modules:
        return sys.modules[key]
    path = next((HERE / f for f in _SIBLINGS[name] if (HERE / f).is_file()), None)
    if path is None:
        raise BundleError(f"{HERE / _SIBLINGS[name][0]} is missing: this bundle generates text with it; unpack "
                          "the bundle again, or pack it again with `compress pack`")
    spec = importlib.util.spec_from_file_location(key, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - a damaged file: whatever it raises
        del sys.modules[key]
        raise BundleError(f"{path} cannot be loaded ({_first_line(exc)}); unpack the bundle again") from None
    return module


def _what_works(bundle: Bundle) -> str:
    """What this bundle takes on the command line, for messages."""
    if bundle.generates:
        return ('it generates text: give prompts, e.g. python run.py "Once upon a time" --max-new-tokens 32 '
                "(--sample --seed S --top-k K --top-p P --temperature T for seeded sampling)")
    if bundle.tokenizer is not None:
        return 'give texts, e.g. python run.py "a sentence" "another one"'
    return "give arrays: --input x.npy (a model with one input) or --input inputs.npz (one array per input name)"


def read_inputs(path: str, bundle: Bundle) -> dict[str, np.ndarray]:
    """The arrays in a .npy (the model's single input) or .npz (arrays by input name) file; never a pickle."""
    p = Path(path)
    names = [a.name for a in bundle.session.get_inputs()]
    if not p.is_file():
        raise InputError(f"--input {path}: {'not a regular file' if p.exists() else 'no such file'}")
    if p.stat().st_size > _MAX_INPUT_BYTES:
        raise InputError(f"--input {path}: larger than {_MAX_INPUT_BYTES >> 30} GiB; give a smaller batch")
    suffix = p.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise InputError(f"--input {path}: give a .npy file (a model with one input) or an .npz file (one array "
                         f"per input: {', '.join(names)}), as numpy.save / numpy.savez write them")
    try:
        loaded = np.load(p, allow_pickle=False)  # pickles run code when loaded: refused, whatever the file says
        if (suffix == ".npz") != isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"the file holds {'one array' if suffix == '.npz' else 'an archive of arrays'}")
        if suffix == ".npz":
            with loaded:
                return {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise InputError(f"--input {path} is not a numpy {suffix} array file ({_first_line(exc)}); write it with "
                         f"numpy.{'save' if suffix == '.npy' else 'savez'} (object arrays and pickles are refused)"
                         ) from None
    if len(names) != 1:
        raise InputError(f"--input {path}: the model takes {len(names)} inputs ({', '.join(names)}); give an .npz "
                         "file holding one array per input name")
    return {names[0]: loaded}


def summarize(bundle: Bundle, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """What run.py prints: each output's shape, dtype, first values and how many values are not finite."""
    described = {}
    for name, value in outputs.items():
        flat = np.asarray(value, dtype=np.float64).reshape(-1)
        described[name] = {"shape": list(value.shape), "dtype": str(value.dtype),
                           "head": [float(v) if np.isfinite(v) else None for v in flat[:8].round(6).tolist()],
                           "non_finite": int((~np.isfinite(flat)).sum())}  # JSON has no NaN or infinity: null
    return {"bundle": bundle.info.get("name"), "target": bundle.info.get("target"), "providers": bundle.providers,
            "outputs": described}


def _save(path: str, outputs: dict[str, np.ndarray]) -> None:
    target = Path(path)
    if target.suffix.lower() != ".npz":
        raise InputError(f"--save {path}: outputs are saved as an .npz file; name it *.npz")
    if target.exists() and not target.is_file():
        raise InputError(f"--save {path} exists and is not a file")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}.npz")
    try:
        # numpy.savez's layout, one .npy member per output (savez itself takes `file`, which an output may be named)
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, value in outputs.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
        os.replace(tmp, target)  # whole or not at all
    except OSError as exc:
        raise BundleError(f"--save {path}: cannot write it ({exc.strerror or exc})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.texts and args.input:
        parser.error("give texts or --input, not both")
    if not args.texts and not args.input:
        parser.error("give texts (text models; prompts for language models) or --input FILE.npy / FILE.npz")
    ort.set_default_logger_severity(4)  # run.py's own process: a problem is one paragraph, not ONNX Runtime's logs
    bundle = Bundle(HERE, providers=args.provider, quiet=True)
    for note in bundle.notes:
        print(f"note: {note}", file=sys.stderr)
    if bundle.generates:
        return _generate(bundle, args)
    options = ("max_new_tokens", "sample", "seed", "top_k", "top_p", "temperature", "no_stream")
    given = [f"--{n.replace('_', '-')}" for n in options if getattr(args, n) not in (None, False)]
    if given:
        raise InputError(f"{', '.join(given)}: only bundles of causal language models generate, and this one's "
                         f"model does not (task {bundle.info.get('task')!r}); " + _what_works(bundle))
    feed = bundle.encode(args.texts) if args.texts else read_inputs(args.input, bundle)
    outputs = bundle.run(feed)
    if bundle.info.get("pooling") == "mean" and "attention_mask" in feed:
        first = next(iter(outputs.values())).astype(np.float32)
        mask = np.asarray(feed["attention_mask"]).astype(np.float32)[..., None]
        outputs["embedding"] = (first * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
    summary = summarize(bundle, outputs)
    if args.save:
        _save(args.save, outputs)
        summary["saved"] = args.save
    print(json.dumps(summary, indent=2, allow_nan=False))
    return 0


def _generate(bundle: Bundle, args: argparse.Namespace) -> int:
    """run.py for a bundle that generates: the continuations as one JSON document; a single prompt's text streams
    to stderr as it comes (stdout stays one document)."""
    if args.input or args.save:
        raise InputError(f"{'--input' if args.input else '--save'}: this bundle's model takes no arrays and "
                         f"writes none; {_what_works(bundle)}; the tokens and text come in the JSON document")
    shown: list[str] = []

    def show(text: str) -> None:  # the prompt first, once there is text to follow it
        sys.stderr.write(text if shown else args.texts[0] + text)
        sys.stderr.flush()
        shown.append(text)

    streaming = not args.no_stream and len(args.texts) == 1
    out = bundle.generate(args.texts, **_sibling("generate").cli_settings(args), on_text=show if streaming else None)
    if shown:
        sys.stderr.write("\n")
    print(json.dumps({"bundle": bundle.info.get("name"), "target": bundle.info.get("target"),
                      "providers": bundle.providers, **out}, indent=2, allow_nan=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Run this compressor bundle with ONNX Runtime. Exit codes: 0 ok, "
                                     "1 the bundle or ONNX Runtime failed, 2 bad input or usage.")
    parser.add_argument("texts", nargs="*", help="input texts (text models)")
    parser.add_argument("--input", help=".npy file (a model with one input) or .npz file (one array per input name)")
    parser.add_argument("--provider", action="append", help="execution provider to use (repeatable); default: "
                        "the bundle's target providers that this onnxruntime has")
    parser.add_argument("--save", help="write every output to this .npz file")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    lm = parser.add_argument_group("causal language models (bundles that generate; the texts are prompts)")
    lm.add_argument("--max-new-tokens", type=int, help="tokens to generate after each prompt (default 32)")
    lm.add_argument("--sample", action="store_true", help="sample the tokens (seeded) instead of greedy decoding")
    lm.add_argument("--seed", type=int, help="--sample: the seed (default 0); the same seed gives the same tokens")
    lm.add_argument("--top-k", type=int, help="--sample: draw from the K likeliest tokens (default 0: all)")
    lm.add_argument("--top-p", type=float, help="--sample: draw from the likeliest tokens holding this much "
                    "probability, in (0, 1] (default 1)")
    lm.add_argument("--temperature", type=float, help="--sample: divide the logits by this (default 1)")
    lm.add_argument("--no-stream", action="store_true", help="do not stream a single prompt's text to stderr")
    args = parser.parse_args(argv)
    try:
        return _main(args, parser)
    except BundleError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one paragraph, never a traceback, unless --debug
        if args.debug:
            raise
        print(f"error: {_first_line(exc)}\n(an unexpected failure; run again with --debug for the traceback, and "
              "please report it)", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
