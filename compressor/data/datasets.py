"""Data sets: the built-in sets and user files, turned into batches of model inputs plus what to score, and the
calibration and training batches the passes and exporters use. Below passes, export and evaluate, which all
read it; it imports nothing of compressor's above its foundations.

Three shapes of data, each with its metric:

- classification: batches of inputs and a label per example -> top-1 accuracy (digits, `{text, label}` rows,
  numeric rows with a `label`, or a user function yielding `labels`);
- retrieval: query/passage pairs -> top-1 retrieval accuracy of the paired passage among all passages (the
  built-in text-pairs set, `{query, passage}` rows);
- inputs only: no metric, used for fidelity against the baseline (the artifact's example inputs).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CompressorError, UsageError
from ..manifest import Manifest

__all__ = ["EvalData", "build_data", "build_fitting_data", "check_data_file", "builtin_text_pairs", "TEXT_PAIRS",
           "CALIBRATION_TEXTS", "tokenizer_for", "read_text_documents"]

TEXT_PAIRS = Path(__file__).resolve().parent / "text_pairs.jsonl"
# Unlabeled sentences on topics disjoint from TEXT_PAIRS: quantization calibrates on these and is scored on those.
CALIBRATION_TEXTS = Path(__file__).resolve().parent / "calibration_texts.jsonl"
MAX_ROWS = 1_000_000


@dataclass
class EvalData:
    """Batches to run through both models, and how to score the outputs."""

    name: str
    metric: str | None  # "top1_accuracy", "retrieval_top1" or None (fidelity only)
    batches: list[dict[str, torch.Tensor]]
    labels: torch.Tensor | None = None  # classification: one class index per example
    pairs: int | None = None  # retrieval: outputs[:pairs] are queries, outputs[pairs:2*pairs] their passages
    texts: list[str] = field(default_factory=list)  # sample texts (speed inputs for text models)

    @property
    def examples(self) -> int:
        """Examples scored (pairs for retrieval)."""
        if self.pairs is not None:
            return self.pairs
        return sum(next(iter(b.values())).shape[0] for b in self.batches) if self.batches else 0


def tokenizer_for(artifact: Path) -> Any | None:
    """The tokenizer saved with a text model's artifact, or None."""
    if not (artifact / "tokenizer_config.json").is_file() and not (artifact / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(artifact), local_files_only=True)
    except Exception:  # noqa: BLE001 - broken tokenizer files raise OSError, ValueError, even TypeError
        return None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def build_data(
    spec: Any,
    *,
    artifact: Path,
    manifest: Manifest,
    example_inputs: dict[str, torch.Tensor],
    base_dir: Path,
    data_file: Path | None = None,
) -> EvalData:
    """The evaluation data an ``evaluate.data`` section asks for (see DataSpec), or the model's built-in set.
    ``data_file`` is read instead of the artifact's copy of ``evaluate.data.path``: `compress run` passes the
    user's own file (the same bytes), so an error names the file the user can fix."""
    if spec.path is not None and data_file is None:
        data_file = _data_file(spec.path, artifact, manifest)
    return _build(spec, artifact, manifest.task, manifest.source, example_inputs, base_dir, data_file)


def _build(spec: Any, artifact: Path, task: str | None, source: dict[str, Any],
           example_inputs: dict[str, torch.Tensor], base_dir: Path, data_file: Path | None) -> EvalData:
    builtin = spec.builtin
    if builtin is None and spec.path is None and spec.function is None:
        if source.get("kind") == "zoo" and str(source.get("name", "")).startswith("digits"):
            builtin = "digits"
        elif task == "text-embedding" and tokenizer_for(artifact) is not None:
            builtin = "text-pairs"
    if builtin in ("digits", "digits-train"):
        data = _digits(example_inputs, spec.batch_size, spec.limit, train=builtin == "digits-train")
    elif builtin in ("calibration-text", "held-out-text", "train-text"):
        texts = _builtin_texts(builtin)
        texts = texts[: spec.limit] if spec.limit is not None else texts
        tok = _need_tokenizer(artifact, f"the {builtin} sentences")
        unit = "sentences" if builtin == "calibration-text" else "documents"
        data = EvalData(name=f"{builtin} (built in, {len(texts)} {unit})", metric=None,
                        batches=_tokenize(texts, tok, example_inputs, spec.batch_size), texts=texts[:64])
    elif builtin == "text-pairs":
        data = _pairs_data("text-pairs (built in)", builtin_text_pairs(), artifact, example_inputs, spec)
    elif data_file is not None:
        data = _file_data(data_file, artifact, example_inputs, spec)
    elif spec.function is not None:
        data = _function_data(spec.function, base_dir, spec.limit, set(example_inputs))
    else:
        data = EvalData(name="example inputs", metric=None, batches=[dict(example_inputs)])
    if not data.batches:
        raise UsageError(f"evaluation data {data.name} has no examples")
    return data


# ---------------------------------------------------------------------------------------------- built-in sets


def builtin_text_pairs() -> list[dict[str, str]]:
    """The shipped query/passage pairs (compressor/data/text_pairs.jsonl)."""
    return _read_jsonl(TEXT_PAIRS)


def _builtin_texts(name: str) -> list[str]:
    """The unlabeled built-in texts: the calibration sentences, or the zoo LM's held-out/training documents (256)."""
    if name in ("held-out-text", "train-text"):
        from ..tinylm import held_out_texts, training_texts

        return (held_out_texts() if name == "held-out-text" else training_texts())[:256]
    return [_field("calibration-text (built in)", r, "text", str) for r in _read_jsonl(CALIBRATION_TEXTS)]


def build_fitting_data(
    spec: Any,
    *,
    artifact: Path,
    task: str | None,
    source: dict[str, Any],
    example_inputs: dict[str, torch.Tensor],
    base_dir: Path,
) -> EvalData:
    """Data a model is fitted on, not scored on: calibration batches for quantization (see CalibrationSpec) and
    training batches for `recover` and `prune`'s activation importance. Unset: the digits training split for
    digits models, the shipped calibration sentences for text encoders, else the example inputs. Never the
    built-in evaluation sets, so that nothing is tuned on what it is scored on."""
    if spec.builtin is None and spec.path is None and spec.function is None:
        builtin = None
        if source.get("kind") == "zoo" and str(source.get("name", "")).startswith("digits"):
            builtin = "digits-train"
        elif "input_ids" in example_inputs and tokenizer_for(artifact) is not None:
            builtin = "calibration-text"
        spec = spec.model_copy(update={"builtin": builtin})
    if spec.path is not None:  # relative to the recipe, not to an artifact as for `compress eval`
        path = (base_dir / spec.path).resolve()
        if not path.is_file():
            raise UsageError(f"the calibration data file {path} does not exist (paths are relative to the recipe)")
        return _file_data(path, artifact, example_inputs, spec)
    return _build(spec, artifact, task, source, example_inputs, base_dir, None)


def _digits(example_inputs: dict[str, torch.Tensor], batch_size: int, limit: int | None,
            train: bool = False) -> EvalData:
    from ..zoo import digits_split

    if len(example_inputs) != 1:
        raise UsageError(f"the digits data set fits models with one input tensor; this model takes "
                         f"{', '.join(example_inputs)}")
    (name, example), = example_inputs.items()
    if example[0].numel() != 64:
        raise UsageError(f"the digits data set has 8x8 = 64 pixels per example; this model's input {name!r} has "
                         f"{example[0].numel()} values per example (shape {list(example.shape)})")
    x_train, x_test, y_train, y_test = digits_split("digits-mlp")  # reshaped below to the model's layout
    x = torch.from_numpy(x_train if train else x_test).to(example.dtype).reshape(-1, *example.shape[1:])
    y = torch.from_numpy(y_train if train else y_test)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    batches = [{name: x[i:i + batch_size]} for i in range(0, len(x), batch_size)]
    split = "training" if train else "held-out"
    return EvalData(name=f"digits ({split} split, {len(x)} images)", metric="top1_accuracy", batches=batches,
                    labels=y)


# ---------------------------------------------------------------------------------------------- user files


def _data_file(path: str, artifact: Path, manifest: Manifest) -> Path:
    # `compress run` copies the file into the artifact, so an artifact evaluates the same wherever it is.
    copied = manifest.evaluation.data_file if manifest.evaluation is not None else None
    if copied and (artifact / copied).is_file():
        return artifact / copied
    raise UsageError(f"the evaluation data file {path} is not in the artifact ({artifact}/eval/); re-run "
                     "`compress run`, which copies it there")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read evaluation data {path}: {exc}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{lineno}: expected a JSON object such as {{\"query\": ..., \"passage\": ...}}, "
                             f"got {type(row).__name__}")
        row["__line__"] = lineno
        rows.append(row)
        if len(rows) > MAX_ROWS:
            raise UsageError(f"{path}: more than {MAX_ROWS:,} rows; use evaluate.data.limit or a smaller file")
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read evaluation data {path}: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    for row in reader:
        if None in row:
            raise UsageError(f"{path}:{reader.line_num}: more values than the header has columns")
        row = dict(row)
        row["__line__"] = reader.line_num
        rows.append(row)
        if len(rows) > MAX_ROWS:
            raise UsageError(f"{path}: more than {MAX_ROWS:,} rows; use evaluate.data.limit or a smaller file")
    return rows


def read_text_documents(path: Path) -> list[str]:
    """The documents of a user's text file: ``.txt`` paragraphs, or the ``text`` of every ``.jsonl``/``.csv`` row."""
    if path.suffix.lower() in (".jsonl", ".csv"):
        rows = _read_jsonl(path) if path.suffix.lower() == ".jsonl" else _read_csv(path)
        if not rows:
            raise UsageError(f"evaluation text {path} has no rows; give rows of {{\"text\": ...}}")
        return [_field(path, row, "text", str) for row in rows]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read evaluation text {path}: {exc}; give a UTF-8 .txt file") from None
    docs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    if not docs:
        raise UsageError(f"evaluation text {path} is empty; give a .txt file with some prose in it")
    return docs


def check_data_file(path: Path) -> str:
    """Read a user data file and tell its kind (``pairs``, ``text``, ``numeric``, ``lm-text``); UsageError naming
    file:line otherwise. `compress run` calls this before any long work."""
    if path.suffix.lower() == ".txt":
        read_text_documents(path)
        return "lm-text"
    kind = _read_rows(path)[1]
    if kind == "lm-text":
        read_text_documents(path)  # every row's text a string, now rather than after the passes
    return kind


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], str]:
    """The rows of a JSONL/CSV data file and their kind, every row checked to be of the first row's kind."""
    rows = _read_jsonl(path) if path.suffix.lower() == ".jsonl" else _read_csv(path)
    if not rows:
        raise UsageError(f"evaluation data {path} has no rows")
    kind = _kind(path, rows[0])
    for row in rows[1:]:
        if _kind(path, row) != kind:
            raise UsageError(f"{path}:{row['__line__']}: this row has the columns {sorted(set(row) - {'__line__'})}, "
                             f"unlike the first row ({kind} rows)")
    return rows, kind


def _kind(path: Path, row: dict[str, Any]) -> str:
    keys = set(row) - {"__line__"}
    if {"query", "passage"} <= keys:
        return "pairs"
    if {"text", "label"} <= keys:
        return "text"
    if "label" in keys:
        return "numeric"
    if "text" in keys:  # text without labels (other columns such as an id ignored): what a causal LM is scored on
        return "lm-text"
    raise UsageError(f"{path}:{row['__line__']}: cannot tell what the rows hold (columns: {', '.join(sorted(keys))});"
                     " use query/passage pairs, text/label rows, a label with numeric inputs, or text rows alone "
                     "(causal LMs)")


def _file_data(path: Path, artifact: Path, example_inputs: dict[str, torch.Tensor], spec: Any) -> EvalData:
    kind = "lm-text" if path.suffix.lower() == ".txt" else None
    rows, kind = ([], kind) if kind else _read_rows(path)
    if kind == "lm-text":
        raise UsageError(f"{path}: text alone (no labels, no pairs) is what a causal language model is scored on; "
                         "this model is not one. Give query/passage pairs, text/label rows or labelled inputs")
    if spec.limit is not None:
        rows = rows[: spec.limit]
    if kind == "pairs":
        return _pairs_data(path.name, rows, artifact, example_inputs, spec)
    if kind == "text":
        return _text_classification(path, rows, artifact, example_inputs, spec)
    return _numeric_classification(path, rows, example_inputs, spec)


def _field(path: Any, row: dict[str, Any], key: str, kind: type) -> Any:
    value = row.get(key)
    if kind is str and not isinstance(value, str):
        raise UsageError(f"{path}:{row['__line__']}: {key!r} must be a string, got {value!r}")
    if kind is int:
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise UsageError(f"{path}:{row['__line__']}: {key!r} must be a class index (integer), got {value!r}") \
                from None
        if value < 0:
            raise UsageError(f"{path}:{row['__line__']}: {key!r} must be >= 0, got {value}")
    return value


def _tokenize(texts: list[str], tokenizer: Any, example_inputs: dict[str, torch.Tensor], batch_size: int
              ) -> list[dict[str, torch.Tensor]]:
    limit = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=limit,
                        return_tensors="pt")
        batches.append({k: v for k, v in enc.items() if k in example_inputs})
    return batches


def _need_tokenizer(artifact: Path, what: str) -> Any:
    tok = tokenizer_for(artifact)
    if tok is None:
        raise UsageError(f"{what} are text, but the artifact {artifact} has no tokenizer files; text data needs a "
                         "Hugging Face model whose directory holds its tokenizer")
    return tok


def _pairs_data(name: str, rows: list[dict[str, Any]], artifact: Path, example_inputs: dict[str, torch.Tensor],
                spec: Any) -> EvalData:
    where = name if name.endswith("(built in)") else Path(name)
    queries = [_field(where, r, "query", str) for r in rows]
    passages = [_field(where, r, "passage", str) for r in rows]
    if spec.limit is not None:
        queries, passages = queries[: spec.limit], passages[: spec.limit]
    tok = _need_tokenizer(artifact, f"the rows of {name}")
    batches = _tokenize(queries, tok, example_inputs, spec.batch_size)
    batches += _tokenize(passages, tok, example_inputs, spec.batch_size)
    return EvalData(name=f"{name} ({len(queries)} query/passage pairs)", metric="retrieval_top1", batches=batches,
                    pairs=len(queries), texts=passages[:64])


def _text_classification(path: Path, rows: list[dict[str, Any]], artifact: Path,
                         example_inputs: dict[str, torch.Tensor], spec: Any) -> EvalData:
    texts = [_field(path, r, "text", str) for r in rows]
    labels = torch.tensor([_field(path, r, "label", int) for r in rows])
    tok = _need_tokenizer(artifact, f"the rows of {path.name}")
    return EvalData(name=f"{path.name} ({len(texts)} labelled texts)", metric="top1_accuracy",
                    batches=_tokenize(texts, tok, example_inputs, spec.batch_size), labels=labels, texts=texts[:64])


def _numeric_classification(path: Path, rows: list[dict[str, Any]], example_inputs: dict[str, torch.Tensor],
                            spec: Any) -> EvalData:
    labels = torch.tensor([_field(path, r, "label", int) for r in rows])
    per_input: dict[str, list[torch.Tensor]] = {name: [] for name in example_inputs}
    for row in rows:
        if path.suffix.lower() == ".csv":
            # CSV: every column but `label` is one value of the model's single input, in column order.
            if len(example_inputs) != 1:
                raise UsageError(f"{path}: CSV rows fill one input tensor, but the model takes "
                                 f"{', '.join(example_inputs)}; use JSONL with one key per input")
            values = {next(iter(example_inputs)): [v for k, v in row.items() if k not in ("label", "__line__")]}
        else:
            missing = [n for n in example_inputs if n not in row]
            if missing:
                raise UsageError(f"{path}:{row['__line__']}: no value for the model input(s) {', '.join(missing)}; "
                                 f"each row needs `label` and {', '.join(example_inputs)}")
            values = {n: row[n] for n in example_inputs}
        for name, raw in values.items():
            example = example_inputs[name]
            try:
                t = torch.tensor(_floats(raw) if example.dtype.is_floating_point else raw, dtype=example.dtype)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise UsageError(f"{path}:{row['__line__']}: input {name!r}: {exc}") from None
            if t.numel() != example[0].numel():
                raise UsageError(f"{path}:{row['__line__']}: input {name!r} has {t.numel()} values, the model "
                                 f"expects {example[0].numel()} (shape {list(example.shape[1:])})")
            per_input[name].append(t.reshape(example.shape[1:]))
    stacked = {n: torch.stack(v) for n, v in per_input.items()}
    bs = spec.batch_size
    batches = [{n: t[i:i + bs] for n, t in stacked.items()} for i in range(0, len(labels), bs)]
    return EvalData(name=f"{path.name} ({len(labels)} labelled rows)", metric="top1_accuracy", batches=batches,
                    labels=labels)


def _floats(raw: Any) -> Any:
    if isinstance(raw, list) and raw and isinstance(raw[0], str):
        return [float(v) for v in raw]
    return raw


def _function_data(spec: str, base_dir: Path, limit: int | None, accepted: set[str]) -> EvalData:
    from ..usercode import import_factory

    func = import_factory(spec, base_dir, key="evaluate.data.function")
    try:
        produced = func()
        batches: list[dict[str, torch.Tensor]] = []
        labels: list[torch.Tensor] = []
        count = 0
        for i, batch in enumerate(produced):
            if not isinstance(batch, dict) or not all(isinstance(v, torch.Tensor) for v in batch.values()):
                raise UsageError(f"{spec}: batch {i} is {type(batch).__name__}; each batch must be a dict of "
                                 "tensors (the forward() arguments, plus an optional `labels`)")
            batch = dict(batch)
            label = batch.pop("labels", None)
            if (label is None) != (not labels) and i > 0:
                raise UsageError(f"{spec}: batch {i} {'lacks' if label is None else 'has'} `labels` unlike batch 0")
            if not batch:
                raise UsageError(f"{spec}: batch {i} holds no input tensors")
            if set(batch) != accepted:
                raise UsageError(f"evaluate.data.function {spec}: batch {i} has the inputs {sorted(batch)}, but the "
                                 f"model takes {sorted(accepted)} (the names of its example inputs)")
            if label is not None and label.numel() != next(iter(batch.values())).shape[0]:
                raise UsageError(f"evaluate.data.function {spec}: batch {i} has {label.numel()} labels for "
                                 f"{next(iter(batch.values())).shape[0]} examples; give one label per example")
            size = next(iter(batch.values())).shape[0]
            if limit is not None and count + size > limit:  # exactly the first `limit` examples
                keep = limit - count
                batch = {k: v[:keep] for k, v in batch.items()}
                label = None if label is None else label.reshape(-1)[:keep]
                size = keep
            if label is not None:
                labels.append(label.reshape(-1).long())
            batches.append(batch)
            count += size
            if limit is not None and count >= limit:
                break
    except UsageError:
        raise
    except (Exception, SystemExit) as exc:  # the user's code failed (sys.exit() included): a runtime failure, named
        raise CompressorError(f"the evaluation data function {spec} raised {type(exc).__name__}: {exc}") from exc
    label_tensor = torch.cat(labels) if labels else None
    return EvalData(name=f"{spec} ({len(batches)} batches)", metric="top1_accuracy" if labels else None,
                    batches=batches, labels=label_tensor)
