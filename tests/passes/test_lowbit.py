"""4-bit weights (`quantize` with bits 4): NNCF's integers in the compressed-tensors layout and in ONNX Runtime's
MatMulNBits, on the zoo's trained tiny-lm and on a small untied Llama that transformers loads through
compressed-tensors."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.bitpack import pack_int32, unpack_int32
from compressor.encodings import IntGroup, encoding_from_json
from conftest import bare_environment, run_cli


# ------------------------------------------------------------------------------------------------- the encoding


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(5, 64), (3, 37), (16, 256), (1, 8), (8, 1)])  # one row/column: views
def test_packing_is_compressed_tensors_own_layout(bits, shape):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(bits * 1000 + shape[1])
    q = torch.randint(-(1 << bits - 1), 1 << bits - 1, shape, generator=g).to(torch.int8)
    assert torch.equal(pack_int32(q, bits), helpers.pack_to_int32(q, bits))
    assert torch.equal(pack_int32(q.t(), bits).t(), helpers.pack_to_int32(q, bits, packed_dim=0))
    assert torch.equal(unpack_int32(pack_int32(q, bits), bits, shape[1]), q)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(5, 64), (3, 37), (1, 8), (8, 1), (2, 3)])
def test_packing_through_bytes_gives_the_words_of_the_integer_arithmetic(bits, shape, monkeypatch):
    """The little-endian fast path and the portable int64 one write the same words and read the same values, for
    rows, for transposed views (zero points are packed along columns) and for one-row tensors."""
    import compressor.bitpack as bitpack

    g = torch.Generator().manual_seed(bits + shape[0] * 7 + shape[1])
    q = torch.randint(-(1 << bits - 1), 1 << bits - 1, shape, generator=g).to(torch.int8)
    fast = [pack_int32(v, bits) for v in (q, q.t())]
    monkeypatch.setattr(bitpack.sys, "byteorder", "big")  # the portable path
    slow = [pack_int32(v, bits) for v in (q, q.t())]
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))
    assert torch.equal(unpack_int32(fast[0], bits, shape[1]), q)
    monkeypatch.undo()
    assert torch.equal(unpack_int32(slow[0], bits, shape[1]), q)
    assert torch.equal(unpack_int32(fast[1].t().contiguous().t(), bits, shape[0]), q.t())


@pytest.mark.parametrize("symmetric", [True, False])
def test_an_intgroup_tensor_decodes_to_its_integers_times_scales_exactly_and_round_trips_json(symmetric):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (6, 256), generator=g).to(torch.int8)
    scale = (torch.rand(6, 2, generator=g) + 0.01).half()
    zero = None if symmetric else torch.randint(-8, 8, (6, 2), generator=g).to(torch.int8)
    enc = IntGroup([6, 256], 4, 128, symmetric).with_parts(q, scale, zero)
    expected = (q.float().reshape(6, 2, 128) - (0 if zero is None else zero.float()[..., None])) \
        * scale.float()[..., None]
    effective = enc.decode(enc.encode_parts())
    assert torch.equal(effective, expected.reshape(6, 256))
    assert torch.equal(enc.decode(enc.encode(effective)), effective)
    assert encoding_from_json(enc.to_json()) == enc
    with pytest.raises(ValueError, match="changed a quantized weight"):
        enc.encode(effective + 1e-3)


def test_intgroup_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="does not divide"):
        IntGroup([4, 100], 4, 64)
    with pytest.raises(ValueError, match="4 or 8"):
        IntGroup([4, 128], 3, 64)
    with pytest.raises(ValueError, match="outside the 4-bit range"):
        IntGroup([1, 64], 4, 64).with_parts(torch.full((1, 64), 9, dtype=torch.int8), torch.ones(1, 1).half())


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_streamed_intgroup_plans_from_the_shape_and_holds_one_values_integers_only_until_written(symmetric):
    """On the meta device a computed IntGroup gives its parts' shapes (the files are laid out before any value is
    read); for a value it asks the quantizer, and after the effective value is encoded it holds nothing."""
    from compressor.passes.lowbit import _int8_rows

    calls = []

    def quantizer(value):
        calls.append(1)
        q = torch.round(value * 4).clamp(-8, 7).to(torch.int8)
        return IntGroup([8, 64], 4, 32, symmetric).with_parts(
            q, torch.full((8, 2), 0.25).half(), None if symmetric else torch.zeros(8, 2, dtype=torch.int8))

    encoding = IntGroup([8, 64], 4, 32, symmetric).computed_by(quantizer)
    planned = encoding.encode(torch.empty(8, 64, device="meta"))
    value = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    parts = encoding.encode(value)
    assert {k: (list(t.shape), t.dtype) for k, t in planned.items()} == {
        k: (list(t.shape), t.dtype) for k, t in parts.items()}
    assert encoding.stored_nbytes(value) == sum(t.numel() * t.element_size() for t in parts.values())
    effective = encoding.decode(parts)
    again = encoding.encode(effective)  # the effective value: the same integers, not rounded again
    assert calls == [1] and all(torch.equal(again[k], parts[k]) for k in parts)
    assert encoding.encode(effective) and calls == [1, 1]  # forgotten once written: asked again
    table = _int8_rows(torch.empty(16, 8, device="meta"))
    rows = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(table.decode(table.encode(rows)), _int8_rows(rows).decode(_int8_rows(rows).encode_parts()))


# ------------------------------------------------------------------------------------------------ recipe checks


@pytest.mark.parametrize("extra, message", [
    ("bits: 4, mode: dynamic", "weight-only"),
    ("bits: 4, method: gptq", "OpenVINO"),
    ("bits: 4, method: [rtn, awq]", "rtn is round to nearest alone"),
    ("bits: 4, group_size: 100", "group_size 100"),
    ("bits: 4, method: minmax", "method 'minmax'"),
    ("group_size: 64", "only apply to bits 4"),
    ("mode: static, method: awq", "static mode's activation range"),
    ("bits: 4, per_channel: false", "do not apply to bits 4"),
])
def test_bad_4bit_settings_are_refused_with_what_works(tmp_path, extra, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: {source: zoo, name: tiny-lm}\npasses:\n"
                      f"  - quantize: {{{extra}}}\nexport: {{onnx: {{}}}}\n")
    proc = run_cli("validate", str(recipe))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "passes[0].quantize" in proc.stderr


# ------------------------------------------------------------------------------------------ tiny-lm, end to end


@pytest.fixture(scope="module")
def int4_lm(tiny_lm, tmp_path_factory):
    """tiny-lm at 4 bits, data-aware (AWQ + scale estimation, a tenth at int8), with the ONNX decoder."""
    from compressor.log import Reporter
    from compressor.pipeline import run_recipe
    from compressor.recipe import load_recipe

    recipe = tmp_path_factory.mktemp("r4") / "r.yaml"
    recipe.write_text("name: tiny-lm-int4\nmodel: {source: zoo, name: tiny-lm}\npasses:\n"
                      "  - quantize: {mode: weight-only, bits: 4, group_size: 128, method: [awq, scale-estimation],"
                      " ratio: 0.9}\nexport: {onnx: {}}\n")
    out = tmp_path_factory.mktemp("art") / "tiny-lm-int4"
    return run_recipe(load_recipe(recipe), out, Reporter(quiet=True))


def test_4bit_tiny_lm_stores_packed_integers_and_the_onnx_decoder_multiplies_with_matmulnbits(int4_lm):
    import onnx

    from compressor import load
    from compressor.safetensors_io import read_header

    art = int4_lm.out_dir
    manifest = json.loads((art / "manifest.json").read_text())
    encodings = manifest["model"]["encodings"]
    kinds = {(e["bits"], e["group_size"]) for e in encodings.values() if e["kind"] == "intgroup"}
    assert (4, 128) in kinds and (8, None) in kinds  # 4-bit layers, the int8 tenth and the int8 table
    details = manifest["passes"][0]["details"]
    assert details["tensors_4bit"] >= 20 and details["tensors_8bit"] >= 1
    assert details["tables"] == {"model.embed_tokens.weight": "int8 per row"}
    header, _ = read_header(art / "model.safetensors")
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    if encodings[q_proj]["bits"] == 4:
        assert header[q_proj + "_packed"]["dtype"] == "I32" and header[q_proj + "_packed"]["shape"] == [256, 32]
        assert header[q_proj + "_scale"]["dtype"] == "F16" and header[q_proj + "_scale"]["shape"] == [256, 2]
    assert q_proj not in header
    assert (art / "model.safetensors").stat().st_size < 2_000_000  # 10.5 MB in float32
    # The ONNX decoder: every Linear a MatMulNBits at the fast accuracy level, the tied table read by a Gather.
    report = manifest["onnx"]["int8_weights"]["lowbit"]
    assert report["accuracy_level"] == 4 and report["dequantized"]
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 29  # 4 layers x 7 matrices + the LM head
    assert {a.i for n in nbits for a in n.attribute if a.name == "accuracy_level"} == {4}
    assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {4, 8}
    assert not [n for n in graph.node if n.op_type == "MatMul" and "proj" in n.name]
    # Checked against torch at accuracy level 0 (the exact float arithmetic) on prefill and decode steps.
    assert max(manifest["onnx"]["int8_weights"]["check"]["max_abs_err"].values()) < 1e-4
    # compressor.load gives the effective weights: the integers times their scales.
    module = load(art)
    enc = IntGroup(**{k: v for k, v in encodings[q_proj].items() if k != "kind"})
    from safetensors.torch import load_file

    stored = load_file(art / "model.safetensors")
    parts = {s: stored[q_proj + s] for s in enc.plain_suffixes if q_proj + s in stored}
    assert torch.equal(module.state_dict()[q_proj], enc.decode(parts))


def test_the_4bit_onnx_decoder_computes_close_to_torch_and_verify_inspect_accept_it(int4_lm):
    from compressor import load
    from compressor.evaluate.subjects import OrtModule

    art = int4_lm.out_dir
    ids = torch.tensor([[5, 17, 33, 101, 250, 7, 64, 300]])
    torch_logits = load(art)(input_ids=ids).logits.detach()
    ort_logits = OrtModule(art / "model.onnx")(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    # int8 activations (accuracy level 4) round every product's input: close to torch, not equal.
    err = float((torch_logits - ort_logits).abs().max())
    assert 0 < err < 0.05 * float(torch_logits.abs().max())
    proc = run_cli("verify", str(art))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("inspect", str(art))
    assert proc.returncode == 0 and "intgroup" in proc.stdout, proc.stdout


def test_the_4bit_bundle_generates_the_sessions_greedy_tokens_with_only_onnxruntime(int4_lm, tmp_path):
    from transformers import AutoTokenizer

    from compressor.decoding import OrtDecoder
    from compressor.ort import ort_session
    from compressor.tinylm import held_out_texts

    art = int4_lm.out_dir
    packed = tmp_path / "b.zip"
    proc = run_cli("pack", str(art), "-o", str(packed), "-q")
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(packed) as zf:
        zf.extractall(tmp_path / "device")
    bundle = tmp_path / "device" / art.name
    python = bare_environment(tmp_path / "bare")
    prompt = [t for t in held_out_texts() if len(t) > 200][0][:120]
    run = subprocess.run([str(python), str(bundle / "run.py"), prompt, "--max-new-tokens", "24", "--no-stream"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)["tokens"][0]
    tok = AutoTokenizer.from_pretrained(art)
    ids = np.array([tok(prompt)["input_ids"]])
    want = OrtDecoder(ort_session(art / "model.onnx")).generate(ids, np.ones_like(ids), 24,
                                                                  eos_token_id=tok.eos_token_id)[0].tolist()
    if tok.eos_token_id in want:
        want = want[: want.index(tok.eos_token_id) + 1]
    assert got == want


# ------------------------------------------------------------------- transformers through compressed-tensors


def _quantized_untied_llama(tmp_path, quantize: str, vocab: int, layers: int, tokenizer_from=None):
    """(source dir, artifact dir): a small untied Llama (random weights, seed 0) run through `quantize`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         max_position_embeddings=128)
    src = tmp_path / "untied"
    LlamaForCausalLM(config).eval().save_pretrained(src, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json") if tokenizer_from else ():
        shutil.copy(tokenizer_from / name, src / name)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: u4\nmodel: {{source: hf, path: {src}, auto_class: AutoModelForCausalLM}}\npasses:\n"
                      f"  - quantize: {quantize}\n")
    art = tmp_path / "art"
    proc = run_cli("run", str(recipe), "--output", str(art), "-q")
    assert proc.returncode == 0, proc.stderr
    return src, art


def test_transformers_loads_the_4bit_safetensors_within_the_quantization_error(tmp_path, tiny_lm):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from compressor import load

    src, art = _quantized_untied_llama(tmp_path, "{mode: weight-only, bits: 4, group_size: 64}", vocab=1024,
                                       layers=2, tokenizer_from=tiny_lm)
    quant = json.loads((art / "config.json").read_text())["quantization_config"]
    assert quant["format"] == "pack-quantized" and quant["quant_method"] == "compressed-tensors"
    ours = load(art).eval()
    theirs = AutoModelForCausalLM.from_pretrained(art).eval()
    original = LlamaForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, f = (m(input_ids=ids).logits for m in (ours, theirs, original))
    # transformers dequantizes in float16 (the scales' dtype); compressor in float32. Both are the same integers:
    # their difference is far below what quantization itself moved the logits.
    assert float((a - b).abs().max()) < 0.1 * float((a - f).abs().max())


def test_load_can_keep_4bit_weights_packed_and_compute_what_dequantizing_computes(int4_lm):
    from compressor import load

    art = int4_lm.out_dir
    encodings = json.loads((art / "manifest.json").read_text())["model"]["encodings"]
    whole, kept = load(art), load(art, int4="keep")
    ids = torch.randint(0, 1024, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(whole(input_ids=ids).logits, kept(input_ids=ids).logits)
    q_proj = "model.layers.0.self_attn.q_proj"
    original = kept.get_submodule(q_proj).parametrizations.weight.original
    assert original.dtype == torch.int32 and original.shape[1] * 32 // encodings[q_proj + ".weight"]["bits"] == 256
    # The tied table is dequantized either way; every other low-bit matrix is held packed.
    assert kept.get_parameter("model.embed_tokens.weight").dtype == torch.float32
    packed = sum(p.numel() * p.element_size() for n, p in kept.named_parameters() if p.dtype == torch.int32)
    floats = sum(p.numel() * p.element_size() for n, p in whole.named_parameters() if "embed" not in n)
    assert packed < floats / 6
    with pytest.raises(ValueError, match="int4='packed': use 'dequantize' or 'keep'"):
        load(art, int4="packed")


def test_load_keeps_asymmetric_4bit_weights_with_their_zero_points(tmp_path):
    from compressor import load

    _, art = _quantized_untied_llama(tmp_path, "{mode: weight-only, bits: 4, group_size: 64, symmetric: false}",
                                     vocab=256, layers=1)
    whole, kept = load(art), load(art, int4="keep")
    zero = kept.get_submodule("model.layers.0.mlp.up_proj").parametrizations.weight[0].zero_point
    assert zero is not None and zero.dtype == torch.int32
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(whole(input_ids=ids).logits, kept(input_ids=ids).logits)
