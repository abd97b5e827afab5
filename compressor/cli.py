"""The `compress` command. Only click is imported at start-up; each command imports what it needs."""

from __future__ import annotations

import math

import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from . import __version__
from .errors import EXIT_RUNTIME, CompressorError

if TYPE_CHECKING:  # pragma: no cover - `compress --help` imports neither pydantic models nor torch
    from .report_format import Report

__all__ = ["main", "cli"]


def _fail(exc: BaseException, debug: bool) -> NoReturn:
    if debug:
        import traceback

        traceback.print_exception(exc)
    if isinstance(exc, CompressorError):
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        click.echo("interrupted; nothing was left half-written", err=True)
        sys.exit(130)
    click.echo(
        f"error: {type(exc).__name__}: {exc}\n(an unexpected failure; run again with --debug for the traceback, "
        "and please report it)",
        err=True,
    )
    sys.exit(EXIT_RUNTIME)


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Refuse NaN and infinity in a float option (click's FloatRange lets NaN through: it compares false)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx=ctx, param=param)
    return value


def _guarded(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn exceptions into one paragraph and the documented exit code."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return func(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException):
            raise
        except (Exception, KeyboardInterrupt) as exc:
            _fail(exc, debug)

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


def _sigterm(_signum: int, _frame: Any) -> None:
    # Let the staging context manager clean up on `kill` as it does on Ctrl-C.
    raise KeyboardInterrupt


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="compress")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
def cli(debug: bool) -> None:
    """Compress PyTorch models by recipe and export artifacts for fast memory-mapped loading.

    Exit codes: 0 ok, 1 runtime failure, 2 invalid recipe or usage, 3 a release gate failed.
    """


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@_guarded
def validate(recipe: Path) -> None:
    """Check RECIPE without loading any model (exit 0 valid, 2 invalid)."""
    from .recipe import load_recipe

    parsed = load_recipe(recipe)
    steps = " -> ".join(s.name for s in parsed.steps) or "no passes"
    click.echo(f"{recipe}: valid ({parsed.model.source} model; {steps})")


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Artifact directory (default: artifacts/<recipe name>/, or $COMPRESS_OUTPUT_ROOT/<name>).")
@click.option("-q", "--quiet", is_flag=True, help="Print only warnings, errors and the result line.")
@click.option("--stream", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Stream the model tensor by tensor from its safetensors files instead of loading it whole: memory "
                   "bounded by the largest tensor (by a decoder layer for 4-bit AWQ, scale estimation and ratio < 1, "
                   "which run one layer at a time), same bytes. auto: when the whole model would not fit in memory "
                   "and the recipe can stream (an hf source; cast, weight-only int8 and 4-bit, and shard; no ONNX "
                   "export); "
                   "always: stream or say why not (exit 2). Under torchrun the run always streams, the tensors "
                   "divided between the processes.")
@_guarded
def run(recipe: Path, output: Path | None, quiet: bool, stream: str) -> None:
    """Run RECIPE: load the model, apply its passes, export the artifact."""
    from .log import Reporter
    from .pipeline import run_recipe
    from .recipe import load_recipe

    parsed = load_recipe(recipe)
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        result = run_recipe(parsed, output, Reporter(quiet=quiet), stream=stream)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result is None:
        return  # a torchrun rank other than 0: its share is written, rank 0 reports
    size = sum(f.bytes for f in result.manifest.files.values())
    wrote = f"wrote {result.out_dir} ({len(result.manifest.files) + 1} files, {size:,} bytes)"
    if result.report is not None:
        if not quiet:
            click.echo(wrote)
        _finish_evaluation(result.report, result.out_dir, quiet, result.manifest.name)
    else:
        click.echo(wrote)


def _finish_evaluation(report: Report, where: Path, quiet: bool = False, name: str | None = None) -> None:
    """Print the summary (quiet: the result line only); a missed gate exits 3 (everything has been written by
    now)."""
    from .errors import EXIT_GATE
    from .evaluate.report import gate_failure, result_line, summary_lines

    if not quiet:
        for line in summary_lines(report):
            click.echo(line)
    click.echo(result_line(report, where, name))
    if report.passed is False:
        if quiet:
            sys.exit(EXIT_GATE)  # the result line said which gates failed
        raise gate_failure(report, where)


@cli.command(name="eval")
@click.argument("artifact", type=click.Path(file_okay=False, path_type=Path))
@click.option("--baseline", metavar="SOURCE_OR_DIR",
              help="What to compare with: an artifact directory, a Hugging Face model directory or zoo:NAME "
                   "(default: the source recorded in the artifact).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "all"]), default=None,
              help="Devices to measure (default: the recipe's evaluate.devices). Without a GPU, `all` measures CPU "
                   "and says that CUDA was skipped.")
@click.option("--no-gates", is_flag=True, help="Measure and report only; do not check the recipe's gates.")
@click.option("--no-speed", is_flag=True,
              help="Accuracy, fidelity and size only: no latency or load timing (speed gates cannot pass).")
@click.option("--tp", type=click.IntRange(2, 64), default=None, metavar="N",
              help="Run a tensor-parallel artifact (the `shard` pass) on N processes (gloo on CPU, NCCL on CUDA) and "
                   "compare it with the same artifact loaded whole; writes tp-report.json. Exit 3 when the minimum "
                   "cosine is below --min-cosine.")
@click.option("--min-cosine", type=click.FloatRange(-1, 1), default=None, callback=_finite,
              help="With --tp: the lowest acceptable cosine similarity to the whole model (default 0.9999).")
@click.option("--limit", type=click.IntRange(1), default=None, metavar="N",
              help="Use only the first N examples (pairs, for retrieval) of the evaluation data: a quick check.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the result line (errors still go to stderr).")
@_guarded
def eval_(artifact: Path, baseline: str | None, device: str | None, no_gates: bool, no_speed: bool,
          tp: int | None, min_cosine: float | None, limit: int | None, quiet: bool) -> None:
    """Evaluate ARTIFACT (a directory written by `compress run`) against its baseline; writes report.json,
    report.md, junit.xml and report.png into it. Exit 3 when a gate of its recipe is missed."""
    from .errors import UsageError
    from .evaluate.settings import recorded_settings
    from .manifest import read_manifest

    if min_cosine is not None and tp is None:
        raise UsageError("--min-cosine applies to --tp runs; gates of the recipe set thresholds otherwise")
    manifest = read_manifest(artifact)
    spec, gates = recorded_settings(artifact, manifest, gates=not (no_gates or tp), limit=limit)
    if tp is not None:
        _eval_tp(artifact, tp, device, min_cosine, baseline, spec, quiet)
        return
    from .evaluate import evaluate_artifact
    from .evaluate.subjects import baseline_from_argument, baseline_from_manifest
    from .log import Reporter
    log = Reporter(quiet=quiet)
    with log.active():  # a zoo baseline trained at first use reports through it
        subject = baseline_from_argument(baseline, manifest) if baseline else baseline_from_manifest(artifact,
                                                                                                    manifest)
    devices = None if device is None else (["cpu", "cuda"] if device == "all" else [device])
    previous = signal.signal(signal.SIGTERM, _sigterm)  # temporary files and child processes are cleaned up
    try:
        with log.active():
            report = evaluate_artifact(artifact, baseline=subject, spec=spec, gates=gates, devices=devices,
                                       log=log, raise_on_gate=False, measure_speed=not no_speed)
    finally:
        signal.signal(signal.SIGTERM, previous)
    _finish_evaluation(report, artifact, quiet, manifest.name)


def _eval_tp(artifact: Path, world: int, device: str | None, min_cosine: float | None, baseline: str | None,
             spec: Any, quiet: bool) -> None:
    """`compress eval --tp`: run the artifact tensor-parallel, compare with it whole, exit 3 below min cosine."""
    from .errors import EXIT_GATE, GateFailure, UsageError
    from .evaluate.runner import env_devices
    from .evaluate.tp import DEFAULT_MIN_COSINE, evaluate_tp, tp_summary_lines
    from .log import Reporter

    if baseline is not None:
        raise UsageError("--tp compares the artifact with itself loaded whole; drop --baseline")
    if device == "all":
        raise UsageError("--tp runs on one kind of device: --device cpu (gloo) or --device cuda (NCCL)")
    if device is None:
        from_env = env_devices()
        if from_env is not None and len(from_env) > 1:
            raise UsageError("$COMPRESS_DEVICE=all, but --tp runs on one kind of device: give --device cpu (gloo) "
                             "or --device cuda (NCCL)")
        device = (from_env or ["cpu"])[0]
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        report = evaluate_tp(artifact, world, device=device, spec=spec,
                             min_cosine=DEFAULT_MIN_COSINE if min_cosine is None else min_cosine,
                             log=Reporter(quiet=quiet))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not quiet:
        for line in tp_summary_lines(report):
            click.echo(line)
    fid = report["fidelity"]
    click.echo(f"{artifact.name}: tp {world} {'passed' if report['passed'] else 'FAILED'} (cos min "
               f"{fid['cos_min']:.7f} >= {report['min_cosine']}: {'yes' if report['passed'] else 'no'}); report: "
               f"{artifact / 'tp-report.json'}")
    if not report["passed"]:
        if quiet:
            sys.exit(EXIT_GATE)
        raise GateFailure(f"tensor-parallel output differs from the whole model: min cosine "
                          f"{report['fidelity']['cos_min']:.6f} < {report['min_cosine']}")


@cli.command()
@click.argument("artifact", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--no-hashes", is_flag=True, help="Check sizes and structure only (fast; misses same-size edits).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the result line.")
@_guarded
def verify(artifact: Path, as_json: bool, no_hashes: bool, quiet: bool) -> None:
    """Check ARTIFACT against its manifest: every file's sha256, missing and extra files, safetensors headers and
    ONNX external-data references. Exit 0 when intact, 1 otherwise."""
    import json

    from .verify import verify_artifact

    result = verify_artifact(artifact, hashes=not no_hashes)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        if not quiet:
            for problem in result["problems"]:
                click.echo(f"  {problem}")
        checked = sum(1 for f in result["files"].values() if f["status"] == "ok")
        how = "sha256" if not no_hashes else "sizes"
        click.echo(f"{artifact}: intact ({checked} files, {how} and structure checked)" if result["ok"] else
                   f"{artifact}: {len(result['problems'])} problem(s)")
    if not result["ok"]:
        sys.exit(EXIT_RUNTIME)


@cli.command()
@click.argument("artifact", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_guarded
def inspect(artifact: Path, as_json: bool) -> None:
    """Summarize ARTIFACT: source, recipe, passes and their effect, tensors by encoding and dtype, sizes per file,
    the ONNX export, the tensor-parallel split, gates and their last results."""
    import json

    from .inspect import inspect_artifact, render_text

    summary = inspect_artifact(artifact)
    click.echo(json.dumps(summary, indent=2) if as_json else render_text(summary))


@cli.command()
@click.argument("artifact", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="The bundle to write (a .zip; default: <artifact>-<target>.zip beside the artifact, or under "
                   "$COMPRESS_BUNDLE_DIR).")
@click.option("--target", default="cpu-x86_64", show_default=True, metavar="TARGET",
              help="Device class: picks the model format, dtype and execution providers (see --list-targets).")
@click.option("--dtype", type=click.Choice(["auto", "keep", "float16"]), default="auto", show_default=True,
              help="auto: the target's choice; keep: as exported; float16: narrow a float32 export.")
@click.option("--list-targets", is_flag=True, help="Describe every target and exit.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the result line.")
@_guarded
def pack(artifact: Path | None, output: Path | None, target: str, dtype: str, list_targets: bool,
         quiet: bool) -> None:
    """Pack ARTIFACT's ONNX model into a deterministic zip bundle for a device: the model (ONNX or ORT format),
    tokenizer, manifest, bundle.json and run.py, a runner needing only numpy and onnxruntime (+ tokenizers); a causal
    language model's run.py generates (python run.py "prompt" --max-new-tokens N)."""
    import os

    from .errors import UsageError
    from .log import Reporter
    from .pack import pack_artifact, targets_text

    if list_targets:
        click.echo(targets_text())
        return
    if artifact is None:
        raise UsageError("give the artifact directory to pack (or --list-targets)")
    if output is None:
        root = Path(os.environ.get("COMPRESS_BUNDLE_DIR") or artifact.resolve().parent)
        output = root / f"{artifact.resolve().name}-{target}.zip"
    result = pack_artifact(artifact, output, target, dtype, log=Reporter(quiet=quiet))
    click.echo(f"wrote {result['bundle']} ({result['bytes']:,} bytes, sha256 {result['sha256']}; {target}, "
               f"{result['model_format']}, {result['dtype'].split(' ')[0]})")


@cli.command(name="passes")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_guarded
def passes_(as_json: bool) -> None:
    """List every pass with its parameters, types, defaults and descriptions."""
    from .docs import pass_table

    click.echo(pass_table(as_json=as_json))


def main() -> None:
    """Run the CLI as a function: SystemExit carries the exit code (what scripts and tests call)."""
    cli(prog_name="compress")


def console() -> None:
    """Console-script entry point (`compress`, `python -m compressor`). Once a command that imported torch has
    finished and its output is flushed, the process ends without the interpreter's teardown: with torch and
    transformers imported that takes about a second, spent finalizing modules after every file is in place."""
    import os

    from .process import claim

    claim()
    try:
        main()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    if "torch" not in sys.modules:  # a light command (validate, --help): the usual exit costs nothing
        raise SystemExit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # `compress ... | head`: the reader has gone, nothing left to say
        pass
    os._exit(int(code or 0))
