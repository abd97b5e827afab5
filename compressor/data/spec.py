"""The recipe schema of data: evaluation data, calibration data and training data (a built-in set, a JSONL/CSV
file or a Python function). `data/datasets.py` turns them into batches."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from ..schema import Strict

__all__ = ["BUILTIN_DATA", "DataSpec", "CalibrationSpec", "TrainingDataSpec"]


BUILTIN_DATA = ("digits", "digits-train", "text-pairs", "calibration-text", "held-out-text")
DATA_SUFFIXES = (".jsonl", ".csv", ".txt")


class DataSpec(Strict):
    """Data for accuracy and fidelity: a built-in set, a JSONL/CSV file or a Python function (at most one)."""

    builtin: Literal["digits", "digits-train", "text-pairs", "calibration-text", "held-out-text",
                     "train-text"] | None = Field(
        None,
        description="A data set shipped with compressor: `digits` (scikit-learn digits, held-out split; digits "
        "models), `digits-train` (its training split), `text-pairs` (240 query/passage pairs; text encoders, "
        "scored by top-1 retrieval), `calibration-text` (256 unlabeled sentences on other topics) or `held-out-text` "
        "(the zoo LM's held-out documents, English prose from CPython; causal LMs) or `train-text` (the zoo LM's "
        "training documents: 4-bit calibration of tiny-lm, its default there). Unset with no "
        "`path`/`function`: chosen from the model (held-out-text for causal LMs), or fidelity on the example inputs "
        "if none fits.",
    )
    path: str | None = Field(
        None,
        description="A JSONL, CSV or text file, relative to the recipe. Rows are `{query, passage}` pairs (text "
        "encoders, retrieval), `{text, label}` (text classifiers), `{label, <input>: [numbers]}` / CSV columns "
        "`label,f0,f1,...` (tensor models), or `{text}` (causal LMs: the text scored by perplexity); a `.txt` "
        "file is text for a causal LM, paragraphs (separated by blank lines) being its documents. `compress run` "
        "copies it into the artifact (`eval/`), so "
        "`compress eval` needs nothing else.",
    )
    function: str | None = Field(
        None,
        description="`module:function` (module importable from the recipe's directory) returning an iterable "
        "of batches: dicts of input tensors for forward(), plus an optional `labels` tensor of class indices.",
    )
    limit: PositiveInt | None = Field(None, description="Use only the first N examples (quick checks).")
    batch_size: PositiveInt = Field(32, description="Batch size for the accuracy and fidelity passes.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # `data: digits`, `data: eval.jsonl` and `data: mymod:batches` are shorthand for the mapping forms.
        if isinstance(data, str):
            if data in BUILTIN_DATA:
                return {"builtin": data}
            if data.lower().endswith(DATA_SUFFIXES):
                return {"path": data}
            if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", data):
                return {"function": data}
            raise ValueError(f"{data!r} is not a built-in data set ({', '.join(BUILTIN_DATA)}), a .jsonl/.csv/.txt "
                             "file or a module:function")
        return data

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        given = [k for k in ("builtin", "path", "function") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of builtin, path and function, not {' and '.join(given)}")
        if self.path is not None and not self.path.lower().endswith(DATA_SUFFIXES):
            raise ValueError(f"path {self.path!r}: only .jsonl, .csv and .txt files are read")
        if self.function is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.function):
            raise ValueError(f"function {self.function!r}: write it as module:function, e.g. mydata:batches")
        return self


class CalibrationSpec(DataSpec):
    """Calibration data for int8 ONNX quantization (`quantize` with mode dynamic or static): a built-in set, a
    JSONL/CSV file or a Python function, as for `evaluate.data`. Unset: the digits training split for digits
    models, `calibration-text` for text encoders, else the example inputs. Labels, if any, are not used."""

    limit: PositiveInt | None = Field(128, description="Use only the first N examples (calibration needs few).")


class TrainingDataSpec(DataSpec):
    """Training data for the `recover` pass: a built-in set, a JSONL/CSV file or a Python function, as for
    `evaluate.data`. Unset: the digits training split for digits models, `calibration-text` for text encoders, else
    the example inputs. Labels are used when the data has them; the uncompressed model's outputs always are."""

    batch_size: PositiveInt = Field(64, description="Examples per training step.")
