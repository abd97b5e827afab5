"""The recipe's sections besides the model and the passes: `export`, `evaluate` and `gates`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import TypeAdapter, ByteSize, Field, PositiveInt, ValidationError, model_validator

from ..cpu import Target
from ..data.spec import DataSpec
from ..schema import Strict

__all__ = ["SafetensorsExport", "OnnxExport", "ExportSpec", "SpeedSpec", "EvaluateSpec", "Threshold", "GatesSpec"]

_BYTES: TypeAdapter[ByteSize] = TypeAdapter(ByteSize)


class SafetensorsExport(Strict):
    """safetensors export settings."""

    max_shard_size: ByteSize = Field(
        ByteSize(2_000_000_000),
        ge=4096,
        description="Largest shard file, as bytes or a string such as `500MB` or `2GiB`; larger models are "
        "split into model-0000i-of-0000N.safetensors with model.safetensors.index.json.",
    )


class OnnxExport(Strict):
    """ONNX export settings: Hugging Face models through optimum-onnx, any other module through torch.onnx."""

    opset: int = Field(18, ge=13, le=23, description="ONNX opset version.")
    atol: float = Field(
        1e-4, ge=0, description="Absolute tolerance of the check against torch: after export, ONNX Runtime runs the "
        "example inputs and every output must be within atol + rtol * |torch value| of torch's, or the run fails."
    )
    rtol: float = Field(1e-3, ge=0, description="Relative tolerance of that check.")
    dynamic_axes: bool = Field(
        True, description="Batch (and, for token inputs, sequence) dimensions are dynamic; false fixes the example "
        "inputs' shapes."
    )


class ExportSpec(Strict):
    """Which artifact formats to write."""

    safetensors: SafetensorsExport = Field(
        default_factory=SafetensorsExport, description="safetensors export (always written)."
    )
    onnx: OnnxExport | None = Field(
        None, description="Also write model.onnx with its weights in model.onnx.data, aligned for memory mapping "
        "(`onnx: {}` for the defaults)."
    )


class SpeedSpec(Strict):
    """How speed is measured. Baseline and artifact alternate (A B B A ...) so machine noise cancels."""

    batch_sizes: list[PositiveInt] = Field([1, 8], min_length=1, description="Batch sizes for latency runs.")
    sequence_lengths: list[PositiveInt] = Field(
        [128], min_length=1, description="Sequence lengths for text models (inputs padded/truncated to each)."
    )
    warmup: int = Field(3, ge=0, le=1000, description="Untimed calls per model before each configuration.")
    rounds: PositiveInt = Field(
        10, le=10000, description="Alternating rounds per configuration; each model runs `calls` timed calls a round."
    )
    calls: PositiveInt = Field(3, le=10000, description="Timed calls per model per round.")
    load_runs: int = Field(
        3, ge=0, le=100,
        description="Fresh processes per model for load timing, cold (files evicted from the page cache) and "
        "warm each; 0 skips load timing.",
    )
    threads: PositiveInt | None = Field(
        None, description="torch / ONNX Runtime intra-op threads for every timed run (default: torch's default)."
    )


class GenerationSpec(Strict):
    """How a causal language model is evaluated: text scores, greedy continuations and generation speed.

    Perplexity, next-token agreement and KL divergence to the baseline on the evaluation text, greedy
    continuations, and generation speed with the KV cache; ignored for other models. Rounds come from
    `evaluate.speed`."""

    window: PositiveInt = Field(128, le=8192, description="Tokens per perplexity window (each window is scored "
                                "from its start, without earlier context).")
    max_tokens: PositiveInt = Field(16384, le=10_000_000, description="At most this many tokens of the evaluation "
                                    "text are scored (at least one window).")
    batch_windows: PositiveInt = Field(
        8, le=1024, description="Windows per forward pass (with `evaluate.data.batch_size`, the smaller counts): the logits "
        "of a batch are batch x window x vocabulary floats, per model.")
    prompts: PositiveInt = Field(8, le=1024, description="Greedy continuations compared: the first `prompt_tokens` tokens "
                                 "of this many windows of the evaluation text.")
    prompt_tokens: PositiveInt = Field(32, le=8192, description="Tokens of each continuation's prompt.")
    new_tokens: PositiveInt = Field(32, le=8192, description="Greedy tokens generated after each prompt.")
    prompt_lengths: list[PositiveInt] = Field(
        [128, 512], min_length=1, description="Prompt lengths at which time to first token is measured (batch 1; "
        "lengths beyond the model's positions are refused).")
    decode_batch_sizes: list[PositiveInt] = Field(
        [1, 8], min_length=1, description="Batch sizes at which decoding speed (tokens/s with the KV cache) is "
        "measured.")
    decode_tokens: PositiveInt = Field(32, le=8192, description="Tokens decoded (timed) per decoding-speed run, after an "
                                       "untimed prompt of `prompt_tokens` tokens.")


    @model_validator(mode="after")
    def _sizes(self) -> GenerationSpec:
        if self.max_tokens < self.window:
            raise ValueError(f"max_tokens {self.max_tokens} is less than one window of {self.window} tokens; raise "
                             "max_tokens or lower window")
        for name in ("prompt_lengths", "decode_batch_sizes"):
            big = [v for v in getattr(self, name) if v > (131072 if name == "prompt_lengths" else 1024)]
            if big:
                raise ValueError(f"{name}: {big} is beyond what one evaluation can hold in memory; use smaller values")
        return self


class EvaluateSpec(Strict):
    """Evaluation of the artifact against the uncompressed model, on the same data, device and threads."""

    devices: list[Literal["cpu", "cuda"]] = Field(
        ["cpu"], min_length=1,
        description="Devices to measure on (`all` = cpu and cuda). Without a GPU, cuda is skipped with a notice "
        "(see `require_cuda`).",
    )
    require_cuda: bool = Field(False, description="Fail (exit 1) instead of skipping when CUDA is not available.")
    data: DataSpec = Field(
        default_factory=DataSpec,
        description="Accuracy and fidelity data: the mapping below, or shorthand `digits`, `text-pairs`, "
        "`file.jsonl`, `file.csv` or `module:function`.",
    )
    speed: SpeedSpec = Field(default_factory=SpeedSpec, description="Speed measurement settings (see below).")
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec, description="Causal language models: text, continuations and generation "
        "speed (see below); `speed.batch_sizes` and `speed.sequence_lengths` do not apply to them.")

    @model_validator(mode="before")
    @classmethod
    def _all_devices(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("devices") == "all":
            return {**data, "devices": ["cpu", "cuda"]}
        return data


class Threshold(Strict):
    """A gate threshold, optionally limited to one device and artifact format."""

    value: float = Field(description="The threshold.")
    device: Literal["cpu", "cuda"] | None = Field(None, description="Device the gate applies to (all if unset).")
    format: Literal["safetensors", "onnx"] | None = Field(None, description="Artifact format (all if unset).")
    target: Target | None = Field(
        None, description="int8 ONNX: the CPU family whose (emulated) arithmetic the gate applies to "
        "(x86-avx2, x86-vnni, arm64). Unset: accuracy, fidelity and size gates apply to every target the artifact "
        "was quantized for, and to the row measured on this machine.")

    @model_validator(mode="after")
    def _target_fits(self) -> Threshold:
        if self.target is not None and (self.device == "cuda" or self.format == "safetensors"):
            raise ValueError(f"target {self.target} names a CPU family of an int8 ONNX artifact; it cannot go with "
                             f"{'device cuda' if self.device == 'cuda' else 'format safetensors'} (drop one of them)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _bare_number(cls, data: Any) -> Any:
        # `min_speedup: 1.5` is shorthand for `min_speedup: {value: 1.5}`.
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return {"value": data}
        if not isinstance(data, dict):
            raise ValueError(f"expected a number, or a mapping such as {{value: 1.5, device: cpu}}; got {data!r}")
        return data


class GatesSpec(Strict):
    """Release gates: a missed gate makes the run exit with code 3 (artifacts are kept)."""

    max_accuracy_drop: Threshold | None = Field(
        None, description="Largest drop of the task metric (baseline minus artifact), in percentage points."
    )
    min_fidelity: Threshold | None = Field(
        None, description="Smallest cosine similarity of artifact to baseline outputs, over every example (the "
        "minimum, not the mean)."
    )
    min_speedup: Threshold | None = Field(
        None, description="Smallest speedup (baseline p50 latency / artifact p50 latency), at the worst of the "
        "measured batch sizes and sequence lengths."
    )
    max_size_bytes: Threshold | None = Field(
        None, description="Largest size of the artifact's model files, in bytes (`50MB`, `1.5GiB` accepted)."
    )
    min_compression: Threshold | None = Field(
        None, description="Smallest ratio of baseline model bytes to artifact model bytes."
    )
    max_load_ms: Threshold | None = Field(
        None, description="Longest cold load (open to ready to run, files evicted from the page cache; median of "
        "`evaluate.speed.load_runs` fresh processes), in ms."
    )
    max_perplexity_increase: Threshold | None = Field(
        None, description="Causal LMs: largest increase of perplexity on the evaluation text over the baseline's, "
        "in percent (5 allows 100 -> 105).")
    min_token_agreement: Threshold | None = Field(
        None, description="Causal LMs: smallest share of positions of the evaluation text where the artifact's most "
        "likely next token is the baseline's, in percent (e.g. 95).")
    min_decode_speedup: Threshold | None = Field(
        None, description="Causal LMs: smallest decoding speedup (artifact tokens/s with the KV cache over the "
        "baseline's), at the worst of `evaluate.generation.decode_batch_sizes`.")

    @model_validator(mode="after")
    def _sensible_values(self) -> GatesSpec:
        for name in ("min_speedup", "max_size_bytes", "min_compression", "max_load_ms", "min_decode_speedup"):
            threshold = getattr(self, name)
            if threshold is not None and threshold.value <= 0:
                raise ValueError(f"{name}: {threshold.value:g} can never be measured; use a positive number")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop.value < 0:
            raise ValueError(f"max_accuracy_drop: {self.max_accuracy_drop.value:g} points would demand a better model "
                             "than the baseline; use 0 for no drop at all")
        if self.min_fidelity is not None and not -1 <= self.min_fidelity.value <= 1:
            raise ValueError(f"min_fidelity: {self.min_fidelity.value:g} is not a cosine similarity; use a number "
                             "in [-1, 1], such as 0.995")
        if self.max_perplexity_increase is not None and self.max_perplexity_increase.value < 0:
            raise ValueError(f"max_perplexity_increase: {self.max_perplexity_increase.value:g} % would demand a "
                             "better model than the baseline; use 0 for no increase at all")
        agreement = self.min_token_agreement
        if agreement is not None and not 1 < agreement.value <= 100:
            hint = f"; {agreement.value:g} reads as {agreement.value:g} %, write {agreement.value * 100:g} for " \
                   f"{agreement.value:.0%}" if 0 < agreement.value <= 1 else ""
            raise ValueError(f"min_token_agreement: {agreement.value:g} is not a percentage in (1, 100]{hint}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _sizes(cls, data: Any) -> Any:
        # Sizes read better as `50MB` than 50000000; ByteSize understands both.
        if isinstance(data, dict) and isinstance(data.get("max_size_bytes"), (str, dict)):
            raw = data["max_size_bytes"]
            value = raw.get("value") if isinstance(raw, dict) else raw
            if isinstance(value, str):
                try:
                    size = int(_BYTES.validate_python(value))
                except ValidationError:
                    raise ValueError(f"max_size_bytes: {value!r} is not a size; write e.g. 50000000, 50MB or "
                                     "1.5GiB") from None
                data = {**data, "max_size_bytes": {**raw, "value": size} if isinstance(raw, dict) else size}
        return data
