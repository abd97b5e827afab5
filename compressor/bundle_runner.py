"""Run a compressor bundle with nothing but numpy and onnxruntime (and the `tokenizers` package for text models).

`compress pack` copies this file into every bundle as run.py. It must not import compressor, torch or
transformers: the bundle runs where only the inference runtime is installed.

    python run.py "a sentence" "another one"      text models: prints the outputs (embeddings: mean-pooled)
    python run.py --input x.npy                    other models: the array is the model's (first) input
    python run.py --save out.npz ...               also write every output to an .npz file

From Python:

    from run import Bundle
    bundle = Bundle("path/to/bundle")
    vectors = bundle.embed(["a sentence"])         # text-embedding models: mean-pooled over real tokens
    outputs = bundle.run({"x": array})             # any model: {output name: array}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}
_FLOATS = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(double)": np.float64}
_INTS = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


class Bundle:
    """An unpacked bundle: its ONNX Runtime session, tokenizer (text models) and settings (bundle.json)."""

    def __init__(self, path: str | Path = HERE, providers: list[str] | None = None) -> None:
        self.path = Path(path)
        self.info: dict[str, Any] = json.loads((self.path / "bundle.json").read_text())
        available = ort.get_available_providers()
        # Only providers this onnxruntime build has: asking for CUDA where it is absent only prints errors.
        wanted = providers or self.info["providers"]
        self.providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        level = self.info.get("graph_optimization", "all")
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
        self.session = ort.InferenceSession(str(self.path / self.info["model"]), sess_options=options,
                                            providers=self.providers)
        self.tokenizer = None
        spec = self.info.get("tokenizer")
        if spec:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(self.path / spec["file"]))
            tok.enable_truncation(max_length=int(spec["max_length"]))
            tok.enable_padding(pad_id=int(spec["pad_id"]), pad_token=spec["pad_token"])
            self.tokenizer = tok

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Token inputs for ``texts``, padded to the longest, as the model's graph inputs ask."""
        if self.tokenizer is None:
            raise ValueError("this bundle's model takes no text; give arrays to run()")
        batch = self.tokenizer.encode_batch(list(texts))
        columns = {"input_ids": [e.ids for e in batch], "attention_mask": [e.attention_mask for e in batch],
                   "token_type_ids": [e.type_ids for e in batch]}
        feed = {}
        for arg in self.session.get_inputs():
            if arg.name not in columns:
                raise ValueError(f"the model's input {arg.name!r} cannot be made from text")
            feed[arg.name] = np.asarray(columns[arg.name], dtype=_INTS.get(arg.type, np.int64))
        return feed

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's outputs by name; float inputs are given the float type the graph declares."""
        feed = {}
        for arg in self.session.get_inputs():
            value = np.asarray(inputs[arg.name])
            kind = _FLOATS.get(arg.type)
            feed[arg.name] = value.astype(kind) if kind is not None and value.dtype.kind == "f" else value
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feed)))

    def embed(self, texts: list[str]) -> np.ndarray:
        """Sentence embeddings: the first output mean-pooled over real tokens (float32, not normalized)."""
        feed = self.encode(texts)
        hidden = next(iter(self.run(feed).values())).astype(np.float32)
        mask = feed["attention_mask"].astype(np.float32)[..., None]
        return (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run this compressor bundle with ONNX Runtime.")
    parser.add_argument("texts", nargs="*", help="input texts (text models)")
    parser.add_argument("--input", help=".npy file: the model's input array (models without a tokenizer)")
    parser.add_argument("--provider", action="append", help="execution provider to use (repeatable); default: "
                        "the bundle's target providers that this onnxruntime has")
    parser.add_argument("--save", help="write every output to this .npz file")
    args = parser.parse_args(argv)
    bundle = Bundle(HERE, providers=args.provider)
    if args.texts:
        feed = bundle.encode(args.texts)
    elif args.input:
        feed = {bundle.session.get_inputs()[0].name: np.load(args.input)}
    else:
        parser.error("give texts (text models) or --input FILE.npy")
    outputs = bundle.run(feed)
    if bundle.info.get("pooling") == "mean" and "attention_mask" in feed:
        first = next(iter(outputs.values())).astype(np.float32)
        mask = feed["attention_mask"].astype(np.float32)[..., None]
        outputs["embedding"] = (first * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
    summary = {"bundle": bundle.info["name"], "target": bundle.info["target"], "providers": bundle.providers,
               "outputs": {n: {"shape": list(v.shape), "dtype": str(v.dtype),
                               "head": np.asarray(v, dtype=np.float64).reshape(-1)[:8].round(6).tolist()}
                           for n, v in outputs.items()}}
    if args.save:
        np.savez(args.save, **outputs)
        summary["saved"] = args.save
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
