"""source -> passes -> exporters -> manifest, written atomically into the artifact directory."""

from __future__ import annotations

import gc
import os
import shutil
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .log import Reporter
from .manifest import Manifest
from .report_format import Report
from .recipe import Recipe

__all__ = ["RunResult", "default_output", "run_recipe"]

INPUTS_FILE = "example_inputs.safetensors"


@dataclass
class RunResult:
    """What a run produced."""

    out_dir: Path
    manifest: Manifest
    report: Report | None = None  # the evaluation report, when the recipe evaluates


def default_output(recipe: Recipe) -> Path:
    """``$COMPRESS_OUTPUT_ROOT/<name>`` if set, else ``artifacts/<name>`` under the current directory."""
    return Path(os.environ.get("COMPRESS_OUTPUT_ROOT", "artifacts")) / recipe.name


def run_recipe(recipe: Recipe, out_dir: Path | None = None, reporter: Reporter | None = None,
               stream: str = "auto") -> RunResult | None:
    """Run a validated recipe end to end and return where the artifact went. A recipe problem found only at run
    time (a factory that returns no module, a pattern that matches nothing in this model) is a RecipeError
    carrying the recipe's file:line:col of the key that caused it.

    ``stream``: "auto" streams a model tensor by tensor (compressor/stream.py) when the whole run would not fit in
    memory and the recipe can stream; "always" streams or refuses (exit 2) saying why it cannot; "never" loads the
    model whole. Under torchrun (``WORLD_SIZE`` > 1) the run always streams, divided between the processes; every
    rank but 0 returns None once its share is written."""
    from .errors import RecipeError

    reporter = reporter or Reporter()
    try:
        with reporter.active():
            return _run(recipe, out_dir, reporter, stream)
    except RecipeError as exc:
        raise recipe.locate(exc) from exc


def _run(recipe: Recipe, out_dir: Path | None, log: Reporter, stream: str) -> RunResult | None:
    import torch

    from .passes import get_pass
    from .staging import prepare_target
    from .stream import Group

    out = out_dir or default_output(recipe)
    group = Group.from_env()
    if group.rank == 0:
        prepare_target(out)  # fail before minutes of work, not after
    else:
        log.quiet = True  # rank 0 speaks for the launch
    _eval_data_file(recipe)
    torch.manual_seed(recipe.seed)
    passes = [get_pass(step.name)(step.config, step.index) for step in recipe.steps]
    with ExitStack() as scratch:  # a streamed run's scratch directory, removed once its weights are written
        return _compress(recipe, passes, stream, group, out, log, scratch)


def _compress(recipe: Recipe, passes: list[Any], stream: str, group: Any, out: Path, log: Reporter,
              scratch: ExitStack) -> RunResult | None:
    """The model loaded (or laid out, to stream), the passes, the artifact (staged, then put in place) and its
    evaluation; rank 0's result."""
    from functools import partial

    from .errors import CompressorError
    from .passes import Context
    from .staging import staged_dir

    model, streamed = _source(recipe, passes, stream, group, log)
    ctx = Context(seed=recipe.seed, log=log, base_dir=recipe.base_dir)
    history: dict[str, list[Any]] = {}  # each tensor's encodings, pass by pass: what streaming replays
    if streamed is not None:
        from .staging import scratch_dir

        ctx.read, ctx.group = partial(streamed.read, history=history), group
        if group.rank == 0:  # one scratch directory for the launch: rank 0's (torchrun: on the shared filesystem)
            ctx.scratch = scratch.enter_context(scratch_dir(out))
    for pass_ in passes:  # every pass's model-dependent check before the first one works
        pass_.check(model)
    if recipe.export.onnx is not None:
        from .export.onnx_lm import check_spec

        check_spec(model, recipe.export.onnx)
    if any(p.needs_original for p in passes):
        import copy

        ctx.original = copy.deepcopy(model.module).eval()
    reports = _passes(recipe, passes, model, ctx, log, history)
    if recipe.steps and streamed is None:
        chain = " -> ".join(s.name for s in recipe.steps)
        _smoke(model, f"the model no longer runs after the passes ({chain}); this is a bug in a pass, please report it")

    fill = None
    if streamed is not None:
        from .stream import fill as stream_fill

        fill = partial(stream_fill, model, streamed, history, group=group, log=log)
    if group.rank != 0:
        fill(_weight_files(recipe, model, model.stored()), Path(group.share(None)))  # type: ignore[misc]
        group.close()
        return None
    report = None
    spec = recipe.evaluation
    phase = "writing"
    try:
        # Export, evaluation and reports all happen in the staging directory; only a run that got that far
        # replaces the previous artifact, so a failure or an interrupt before then leaves it byte-identical.
        with staged_dir(out) as tmp:
            group.share(str(tmp))
            with log.step(f"writing artifact to {out}" + (" tensor by tensor" if fill else "")):
                manifest = _write(recipe, model, reports, tmp, log, fill, out)
            scratch.close()  # every rank has written its weights (fill ends with a collective)
            group.close()
            if spec is not None:
                # The source model may still map the original weight files; cold-load timing must be able to
                # evict them.
                del model, history
                ctx.original = ctx.read = None
                gc.collect()
                phase = "evaluating"
                report = _evaluate(recipe, tmp, out, log)
                phase = "writing"
    except OSError as exc:  # disk full, permissions changed mid-run: the previous artifact is untouched
        if phase != "writing":
            raise
        raise CompressorError(f"writing the artifact to {out} failed: {exc}; the previous artifact (if any) is "
                              "untouched") from exc
    return RunResult(out_dir=out, manifest=manifest, report=report)


def _source(recipe: Recipe, passes: list[Any], stream: str, group: Any, log: Reporter) -> tuple[Any, Any]:
    """The model, loaded whole (and None) or on the meta device (and where its values are, for streaming)."""
    from .sources import load_source

    streaming = _streams(recipe, passes, stream, group, log)
    if streaming:
        model, streamed = _lazy(recipe, passes, streaming, log)
    else:
        _check_memory(recipe, passes, _source_bytes(recipe), "model")  # before loading what would not fit
        with log.step(f"loading model ({_describe_source(recipe)})"):
            model = load_source(recipe.model, recipe.base_dir, recipe.seed)
        streamed = None
        loaded = model.stored_nbytes()
        log.info(f"{len(model.tensors())} tensors, {model.numel():,} parameters, {loaded:,} bytes")
        _check_memory(recipe, passes, loaded, "model (as loaded)")
    if recipe.evaluation is not None and "input_ids" in model.example_inputs:
        from .evaluate.runner import check_sequence_lengths

        config = getattr(model.module, "config", None)
        check_sequence_lengths(recipe.evaluation, config.to_dict() if hasattr(config, "to_dict") else None)
        if model.task == "text-generation":  # the evaluator checks these too, but only after the passes' work
            from .evaluate.lm_speed import check_prompt_lengths

            check_prompt_lengths(recipe.evaluation.generation, config.to_dict() if hasattr(config, "to_dict") else None)
    if streamed is None:
        _smoke(model, "the source model fails on its example inputs; for a python source check `model.inputs` "
                      "against forward()'s arguments")
    return model, streamed


def _lazy(recipe: Recipe, passes: list[Any], streaming: str, log: Reporter) -> tuple[Any, Any]:
    """The model on the meta device and a stream.Source: where its values are, and how many tensors go at once."""
    from .budget import check_fits, estimate_run, estimate_stream, fits
    from .errors import UsageError
    from .memory import human_bytes
    from .sources import lazy_source
    from .stream import Source

    with log.step(f"reading the model's layout ({_describe_source(recipe)}) onto the meta device"):
        try:
            model, where = lazy_source(recipe.model, recipe.base_dir, recipe.seed,
                                       buffers=any(p.runs_layers() for p in passes))
        except ValueError as exc:
            raise UsageError(f"this run must stream the model ({streaming}), and its weights cannot be: "
                             f"{exc}") from None
    sizes = [e["data_offsets"][1] - e["data_offsets"][0] for _, e, _ in where.values()]
    evaluate = recipe.evaluation is not None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # torchrun's processes on this machine share it
    by_layer = max([p.stream_memory(model) for p in passes] or [0])  # the passes run one after another
    streamed = estimate_stream(sum(sizes), sizes, evaluate=evaluate, processes=local, by_layer=by_layer)
    whole = estimate_run(sum(sizes), passes, False, evaluate).peak
    check_fits(streamed, "streaming the model", "" if streamed.peak_phase == "evaluating" else
               f"Loading the model whole would need about {human_bytes(whole)}.")
    # Two tensors in flight overlap one's reading and writing with the other's encoding, where memory and cores allow.
    cores = (os.cpu_count() or 1) // local
    two = estimate_stream(sum(sizes), sizes, 2, processes=local, by_layer=by_layer)
    workers = 2 if cores > 1 and fits(two) else 1
    log.info(f"{len(model.tensors())} tensors, {model.numel():,} parameters, {model.stored_nbytes():,} bytes, "
             f"streamed {workers} tensor{'s' if workers > 1 else ''} at a time ({streaming})")
    return model, Source(where, workers)


def _streams(recipe: Recipe, passes: list[Any], stream: str, group: Any, log: Reporter) -> str:
    """Why this run streams ("" when it loads the model whole); UsageError (exit 2) when it must and cannot."""
    from .budget import estimate_run, fits
    from .errors import UsageError
    from .stream import stream_problems

    if stream == "never" and group.world > 1:
        raise UsageError(f"--stream never: launched on {group.world} processes, the run divides the model's tensors "
                         "between them, which only streaming does; run it as one process to load the model whole")
    if stream == "never":
        return ""
    problems = stream_problems(recipe, passes)
    if group.world > 1 or stream == "always":
        why = f"launched on {group.world} processes" if group.world > 1 else "--stream always"
        if problems:
            raise UsageError(f"{why}: this run must stream the model, and it cannot: " + "; ".join(problems))
        return why
    size = _source_bytes(recipe)
    if size is None or problems or fits(estimate_run(size, passes, recipe.export.onnx is not None,
                                                     recipe.evaluation is not None)):
        return ""  # a whole-model run that does not fit is refused with the estimate (_check_memory)
    return "the whole model would not fit in memory"


def _passes(recipe: Recipe, passes: list[Any], model: Any, ctx: Any, log: Reporter,
            history: dict[str, list[Any]]) -> list[Any]:
    """Run the passes; their reports for the manifest. Each tensor's new encodings go to ``history``, pass by pass
    (streaming replays them)."""
    from .stream import history_of

    reports = []
    for step, pass_ in zip(recipe.steps, passes):
        before = dict(model.encodings)
        with log.step(f"pass {step.index + 1}/{len(recipe.steps)}: {step.name}"):
            report = pass_(model, ctx)
        for name in history_of(before, model):
            history.setdefault(name, []).append(model.encodings[name])
        # Wall time goes to the log, not the manifest: two runs of one recipe give identical manifests.
        reports.append(report.model_dump(mode="json", exclude={"seconds"}))
        log.info(f"{step.name}: {report.bytes_before:,} -> {report.bytes_after:,} bytes in {report.seconds:.2f}s")
    return reports


def _evaluate(recipe: Recipe, staged: Path, out: Path, log: Reporter) -> Report:
    """Evaluate the staged artifact against the recipe's source model; the report names ``out``."""
    from .errors import CompressorError
    from .evaluate import evaluate_artifact
    from .evaluate.subjects import source_subject
    from .manifest import sha256_file

    baseline = source_subject(recipe.model.model_dump(mode="json"), recipe.base_dir)
    # The user's data file is read (so that errors name it) only while it still holds the bytes copied into the
    # artifact: one edited during the run is not what the artifact will be evaluated on later.
    path = recipe.evaluation.data.path if recipe.evaluation is not None else None
    data_file = recipe.resolve(path) if path is not None else None  # checked before the passes ran
    copy = staged / "eval" / data_file.name if data_file is not None else None
    if data_file is not None and not (copy.is_file() and sha256_file(copy) == sha256_file(data_file)):
        data_file = None
    try:
        # Gate failures are the caller's to report (exit 3) after it has said what was written.
        return evaluate_artifact(staged, baseline=baseline, spec=recipe.evaluation, gates=recipe.gates,
                                 base_dir=recipe.base_dir, log=log, raise_on_gate=False, final_path=out,
                                 data_file=data_file)
    except CompressorError as exc:  # name the artifact where it will be, never the hidden staging directory
        for hidden in {str(staged.resolve()), str(staged)}:
            exc.args = tuple(a.replace(hidden, str(out)) if isinstance(a, str) else a for a in exc.args)
        raise


def _weight_files(recipe: Recipe, model: Any, stored: dict[str, Any]) -> Any:
    """The artifact's weight files, planned from the stored tensors (on the meta device when streaming), laid out
    in the order the model reads them: ``stored`` follows its state dict, whose order is that of the modules'
    registration, which is how a layered model's forward pass goes (compressor.loading.readahead reads the files
    ahead in that order)."""
    plan = model.export.tensor_parallel
    if plan is not None:
        from .export.tp import RankFiles

        return RankFiles(stored, plan, {n: e.to_json() for n, e in model.encodings.items()}, model.aliases,
                         use_order=list(stored))
    from .export.safetensors import WeightFiles

    return WeightFiles(stored, int(recipe.export.safetensors.max_shard_size), use_order=list(stored))


def _write(recipe: Recipe, model: Any, reports: list[dict[str, Any]], tmp: Path, log: Reporter,
           fill: Any = None, out: Path | None = None) -> Manifest:
    """Write the artifact's files and manifest into the staging directory ``tmp``; ``fill(files, tmp)`` writes the
    weight files when the model is streamed."""
    from .export.safetensors import write_safetensors
    from .manifest import library_versions, write_manifest
    from .sources.hf import is_copied_file

    stored = model.stored()
    weights = _weight_files(recipe, model, stored)
    plan = model.export.tensor_parallel
    with log.step(f"writing {plan.world} tensor-parallel rank files") if plan is not None else nullcontext():
        files, tp_entry = fill(weights, tmp) if fill is not None else weights.fill(tmp, stored)
    write_safetensors(tmp / INPUTS_FILE, model.example_inputs, {"format": "pt", "role": "example-inputs"})
    copied = _copy_source_files(model.files_dir, tmp, is_copied_file, out)
    if "config.json" in copied:
        from .export.compressed_tensors import add_quantization_config

        # 4-bit weights are stored in compressed-tensors' layout; their schemes make transformers/vLLM read them.
        said = add_quantization_config(tmp / "config.json", {n: e.to_json() for n, e in model.encodings.items()},
                                       model.aliases)
        if said:
            log.info(said)
    evaluation = _copy_eval_data(recipe, tmp)
    onnx_info = None
    if recipe.export.onnx is not None:
        from .export.onnx import export_onnx

        with log.step("exporting ONNX and checking it in ONNX Runtime against torch"):
            onnx_info = export_onnx(model, tmp, recipe.export.onnx, base_dir=recipe.base_dir, log=log)
        worst = max(onnx_info["check"]["max_abs_err"].values(), default=0.0)
        log.info(f"ONNX ({onnx_info['exporter']}, opset {onnx_info['opset']}): max abs error {worst:.3g} vs torch")
    body = {
        "name": recipe.name,
        "description": recipe.description,
        "recipe": recipe.model_dump(mode="json"),
        "source": model.source,
        "task": model.task,
        "versions": library_versions(),
        "passes": reports,
        "model": {
            "weights": files,
            "tensors": len(model.tensors()),
            "parameters": model.numel(),
            "stored_bytes": sum(t.numel() * t.element_size() for t in stored.values()),
            "encodings": {n: e.to_json() for n, e in sorted(model.encodings.items()) if e.kind != "dense"},
            "aliases": dict(sorted(model.aliases.items())),
            "dtype_bridges": dict(sorted(model.dtype_bridges.items())),
            "resized": dict(sorted(model.resized.items())),
            "pruned_heads": dict(sorted(model.pruned_heads.items())),
            "example_inputs": INPUTS_FILE,
            "copied_files": copied,
        },
    }
    if evaluation:
        body["evaluation"] = evaluation
    if onnx_info:
        body["onnx"] = onnx_info
    if tp_entry:
        body["tensor_parallel"] = tp_entry
    manifest = write_manifest(tmp, body, known=weights.digests)  # the weight files hashed as written
    return manifest


def _eval_data_file(recipe: Recipe) -> Path | None:
    """The recipe's evaluation data file, checked to exist."""
    from .errors import Problem, RecipeError

    spec = recipe.evaluation
    if spec is None or spec.data.path is None:
        return None
    src = recipe.resolve(spec.data.path)
    if not src.is_file():
        raise RecipeError(Problem(f"the evaluation data file {src} does not exist", path="evaluate.data.path",
                                  hint="paths are relative to the recipe file's directory"))
    from .data.datasets import check_data_file

    check_data_file(src)  # a malformed file fails now, naming the user's file, not after the passes
    return src


def _copy_eval_data(recipe: Recipe, dst: Path) -> dict[str, Any] | None:
    """Copy the recipe's evaluation data file into the artifact, so `compress eval` needs nothing outside it."""
    src = _eval_data_file(recipe)
    if src is None:
        return None
    rel = f"eval/{src.name}"
    (dst / "eval").mkdir(exist_ok=True)
    shutil.copyfile(src, dst / rel)
    return {"data_file": rel}


def _source_bytes(recipe: Recipe) -> int | None:
    """The bytes of a Hugging Face source's weight files (what loading it will hold in memory: it loads in the
    stored dtype); None for other sources, which are checked once loaded."""
    if recipe.model.source != "hf":
        return None
    from .schema import resolve_path
    from .sources.hf import model_files

    try:
        _, weights = model_files(resolve_path(recipe.model.path, recipe.base_dir))
    except Exception:  # noqa: BLE001 - loading will say what is wrong with the directory, naming it
        return None
    return sum(w.stat().st_size for w in weights if w.is_file())


def _check_memory(recipe: Recipe, passes: list[Any], model_bytes: int | None, where: str) -> None:
    """Refuse (exit 2) a run that will not fit in memory, before the work that would be lost."""
    if model_bytes is None:
        return
    from .budget import check_fits, estimate_run
    from .stream import stream_problems

    problems = stream_problems(recipe, passes)
    check_fits(estimate_run(model_bytes, passes, recipe.export.onnx is not None, recipe.evaluation is not None),
               where, "It cannot stream tensor by tensor instead: " + "; ".join(problems) + "." if problems else "")


def _describe_source(recipe: Recipe) -> str:
    spec = recipe.model
    detail = getattr(spec, "name", None) or getattr(spec, "path", None) or getattr(spec, "factory", "")
    return f"{spec.source}: {detail}"


def _copy_source_files(src: Path | None, dst: Path, wanted: Any, out: Path | None = None) -> list[str]:
    """Copy the source directory's ``wanted`` files into ``dst``; never those under the output directory ``out``
    (an artifact written inside its source directory: a rerun would copy the previous artifact into the new one)."""
    if src is None:
        return []
    copied = []
    skip = [d.resolve() for d in (out, dst) if d is not None]
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        resolved = path.resolve()
        if any(resolved == d or d in resolved.parents for d in skip):
            continue
        if path.is_file() and wanted(rel):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dst / rel)  # content only: mode and times would differ between runs
            copied.append(rel.as_posix())
    return copied


def _smoke(model: Any, what: str) -> None:
    """Run the example inputs through the module: a pass that breaks the model fails here, not in production."""
    import torch

    from .errors import CompressorError

    try:
        with torch.no_grad():
            model.module(**model.example_inputs)
    except Exception as exc:
        raise CompressorError(f"{what}: {type(exc).__name__}: {exc}") from exc
