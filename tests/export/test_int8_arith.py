"""The int8 arithmetic emulator against ONNX Runtime's own kernels on the machine at hand, whichever CPU family
it is (compressor.cpu.local_target): its emulation reproduces ONNX Runtime exactly, the other family's differs
where (and only where) the arithmetic says it must, and pair-safe weights compute the same on every family.

Nothing here is skipped for the CPU: every test runs on AVX2-only and on VNNI machines alike."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.cpu import ARITHMETIC, TARGETS, local_target, machine_cpu, target_of
from compressor.export.int8_arith import (PAIR_LIMIT, dynamic_quantize, matmul_integer, pair_safe, risky_pairs,
                                          safe_any_order)
from compressor.export.int8_emulate import emulate, products, switchable

HERE = ARITHMETIC[local_target()]
OTHER = "exact" if HERE == "saturating-pairs" else "saturating-pairs"


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _matmul_integer_model(b: np.ndarray, zero: int) -> onnx.ModelProto:
    """MatMulInteger with a constant int8 weight, as the quantizer writes it (ONNX Runtime prepacks it)."""
    k, n = b.shape
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "a_zero"], ["y"], name="mm")], "mm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, n])],
        [numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.array(zero, np.uint8), "a_zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _ort_int32(a: np.ndarray, b: np.ndarray, zero: int) -> np.ndarray:
    return _session(_matmul_integer_model(b, zero)).run(None, {"a": a})[0]


@pytest.fixture(scope="module")
def minilm_layer() -> tuple[np.ndarray, np.ndarray]:
    """Real MiniLM data: hidden states after the embeddings of a few sentences (the input of layer 0's query,
    key and value products) and the int8 per-column weight of layer 0's FFN input product."""
    import torch

    from compressor.zoo import minilm_path
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["The quick brown fox jumps over the lazy dog.", "A model that ships must hold its numbers.",
                 "Int8 kernels differ between processors."], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch, output_hidden_states=True).hidden_states[1]  # after layer 0: FFN-sized inputs
    x = hidden.reshape(-1, hidden.shape[-1]).numpy()
    w = model.encoder.layer[1].intermediate.dense.weight.detach().numpy().T  # (384, 1536): x @ w
    scale = np.abs(w).max(axis=0) / 127
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return x, q


def test_this_machine_has_a_target_family_and_says_which():
    cpu = machine_cpu()
    assert cpu["target"] in TARGETS
    assert target_of("x86_64", ["avx2"]) == "x86-avx2"
    assert target_of("x86_64", ["avx2", "avx512f", "avx512bw"]) == "x86-avx2"  # AVX-512 without VNNI saturates
    assert target_of("x86_64", ["avx2", "avx512_vnni"]) == "x86-vnni"
    assert target_of("x86_64", ["avx2", "avx_vnni"]) == "x86-vnni"
    assert target_of("aarch64", []) == "arm64"
    text = "processor: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n"
    parsed = machine_cpu(text)
    assert parsed["flags"] == ["avx2", "avx512_vnni", "avx512f"] and parsed["model"] == "Some CPU"


def test_dynamic_quantize_reproduces_onnxruntime_bit_for_bit(minilm_layer):
    x, _ = minilm_layer
    graph = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])], "dql",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])],
                              [helper.make_tensor_value_info(n, t, None) for n, t in
                               (("q", TensorProto.UINT8), ("s", TensorProto.FLOAT), ("z", TensorProto.UINT8))])
    session = _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8))
    rng = np.random.default_rng(0)
    for data in (x, x * 7.3 + 0.2, rng.standard_normal((5, 33)).astype(np.float32) * 3, np.abs(x), -np.abs(x)):
        q, s, z = session.run(None, {"x": data.astype(np.float32)})
        mq, ms, mz = dynamic_quantize(data)
        assert ms == s and mz == z
        np.testing.assert_array_equal(mq, q)


def test_emulator_for_this_cpu_reproduces_onnxruntime_on_real_minilm_activations(minilm_layer):
    x, q = minilm_layer
    a, _, zero = dynamic_quantize(x)
    got = _ort_int32(a, q, int(zero))
    np.testing.assert_array_equal(matmul_integer(a, q, zero, 0, HERE), got)
    # Plain int8 MiniLM weights have risky pairs; whether this data hits them decides if the other family differs.
    assert len(risky_pairs(q)[0]) > 0  # plain int8 MiniLM weights can saturate ...
    safe, _ = pair_safe(q.astype(np.float32))
    np.testing.assert_array_equal(_ort_int32(a, safe, int(zero)), matmul_integer(a, safe, zero, 0, OTHER))  # ... these cannot


@pytest.mark.parametrize("shape", [(1, 64, 16), (2, 64, 16), (17, 384, 96), (33, 37, 19), (4, 1030, 8)])
def test_emulator_for_this_cpu_reproduces_onnxruntime_on_inputs_made_to_saturate(shape):
    m, k, n = shape
    rng = np.random.default_rng(k)
    a = rng.integers(180, 256, (m, k), dtype=np.uint8)  # large activations ...
    b = rng.integers(60, 128, (k, n), dtype=np.int8) * np.where(rng.random((k, n)) < 0.2, -1, 1).astype(np.int8)
    for zero in (0, 128, 255):
        got = _ort_int32(a, b, zero)
        np.testing.assert_array_equal(matmul_integer(a, b, zero, 0, HERE), got)
        exact = matmul_integer(a, b, zero, 0, "exact")
        saturated = matmul_integer(a, b, zero, 0, "saturating-pairs")
        assert (exact != saturated).mean() > 0.5  # ... with same-sign weights: most sums saturate somewhere


def test_saturating_pairs_match_hand_computed_cases():
    a = np.array([[255, 255, 255, 255, 1, 2]], np.uint8)
    b = np.array([[127], [127], [-127], [-127], [100], [-50]], np.int8)
    # pairs (0,1): 64770 -> 32767; (2,3): -64770 -> -32768; (4,5): 100 - 100 = 0
    assert matmul_integer(a, b, 0, 0, "saturating-pairs")[0, 0] == 32767 - 32768 + 0
    assert matmul_integer(a, b, 0, 0, "exact")[0, 0] == 64770 - 64770 + 0
    # The zero point is subtracted after the pairs saturate: raw activations decide.
    assert matmul_integer(a, b, 255, 0, "saturating-pairs")[0, 0] == -1 - 255 * int(b.astype(np.int64).sum())
    # Opposite signs never saturate: 255 * 127 fits in int16.
    a2 = np.array([[255, 255]], np.uint8)
    b2 = np.array([[127], [-127]], np.int8)
    assert matmul_integer(a2, b2, 0, 0, "saturating-pairs")[0, 0] == 0
    # A same-sign pair at the limit fits: 255 * 128 = 32640.
    b3 = np.array([[64], [64]], np.int8)
    assert matmul_integer(a2, b3, 0, 0, "saturating-pairs")[0, 0] == 32640
    assert len(risky_pairs(b3)[0]) == 0 and len(risky_pairs(np.array([[64], [65]], np.int8))[0]) == 1
    # Odd K: the last position pairs with MLAS's zero padding.
    a4 = np.array([[255, 255, 255]], np.uint8)
    b4 = np.array([[1], [1], [127]], np.int8)
    assert matmul_integer(a4, b4, 0, 0, "saturating-pairs")[0, 0] == 510 + 255 * 127
    # uint8 weights run through 16-bit widening: exact everywhere.
    b5 = np.array([[255], [255]], np.uint8)
    assert matmul_integer(a2, b5, 0, 0, "saturating-pairs")[0, 0] == 2 * 255 * 255


def test_graph_emulation_matches_the_numpy_emulator_and_onnxruntime():
    rng = np.random.default_rng(3)
    for k in (64, 37, 1030):  # one chunk, odd K, several float32 chunks
        a = rng.integers(150, 256, (9, k), dtype=np.uint8)
        b = rng.integers(-127, 128, (k, 24), dtype=np.int8)
        model = _matmul_integer_model(b, 131)
        for arithmetic in ("exact", "saturating-pairs"):
            got = _session(emulate(model, arithmetic)).run(None, {"a": a})[0]
            np.testing.assert_array_equal(got, matmul_integer(a, b, 131, 0, arithmetic))
        np.testing.assert_array_equal(_session(emulate(model, HERE)).run(None, {"a": a})[0],
                                      _session(model).run(None, {"a": a})[0])


def test_pair_safe_weights_compute_the_same_on_every_family(minilm_layer):
    x, q = minilm_layer
    w = q.astype(np.float32) * 0.01
    safe, safe_scale = pair_safe(w, importance=(x ** 2).mean(axis=0))
    assert len(risky_pairs(safe)[0]) == 0
    assert safe_scale.shape == (w.shape[1],)
    # Better than ONNX Runtime's own remedy for saturation, 7-bit weights (reduce_range), by the weighted error.
    importance = (x ** 2).mean(axis=0)[:, None]
    seven = np.abs(w).max(axis=0) / 63
    seven_bit = np.clip(np.rint(w / seven), -64, 63) * seven
    assert ((safe * safe_scale - w) ** 2 * importance).sum() < 0.8 * ((seven_bit - w) ** 2 * importance).sum()
    a = np.full((4, w.shape[0]), 255, np.uint8)  # the worst input there is
    a[1] = 0
    a[2, ::2] = 255
    a[2, 1::2] = 0
    assert np.array_equal(matmul_integer(a, safe, 7, 0, "exact"), matmul_integer(a, safe, 7, 0, "saturating-pairs"))
    np.testing.assert_array_equal(_ort_int32(a, safe, 7), matmul_integer(a, safe, 7, 0, "exact"))


def test_safe_any_order_bounds_every_pair_a_kernel_could_form():
    rng = np.random.default_rng(5)
    q = rng.integers(-127, 128, (8, 3, 3, 3), dtype=np.int8)  # Conv (out, in, kh, kw)
    scale = np.full(8, 0.02, np.float32)
    safe, new_scale = safe_any_order(q, scale, axis=0)
    flat = safe.reshape(8, -1).astype(np.int32)
    for row in flat:
        pos, neg = np.sort(row[row > 0])[-2:], np.sort(-row[row < 0])[-2:]
        assert pos.sum() <= PAIR_LIMIT and neg.sum() <= PAIR_LIMIT
    assert (new_scale >= scale).all()
    assert np.abs(safe * new_scale[:, None, None, None] - q * scale[:, None, None, None]).max() <= new_scale.max()
    shared, one = safe_any_order(q, np.array(0.02, np.float32), axis=0)
    assert one.shape == () and np.abs(shared.astype(np.int32)).max() <= PAIR_LIMIT


def test_switchable_products_move_to_float_on_request(tmp_path):
    """A dynamic int8 model from ONNX Runtime's quantizer: each product can be swapped to float compute on its
    int8 weights through its own boolean input, in one session."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((32, 48)).astype(np.float32)
    w2 = rng.standard_normal((48, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(tmp_path / "f.onnx"))
    quantize_dynamic(tmp_path / "f.onnx", tmp_path / "q.onnx", weight_type=QuantType.QInt8, per_channel=True)
    model = onnx.load(str(tmp_path / "q.onnx"))
    found = products(model)
    assert len(found) == 2 and all(p.weight_scale for p in found)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    by_output = {p.output: p.node for p in found}
    graph2, switches = switchable(model, {by_output["h"]: w1, by_output["y"]: w2})
    session = _session(emulate(graph2, HERE))  # this CPU's arithmetic: comparable with the real session
    off = {s: np.array(False) for s in switches.values()}
    on = {s: np.array(True) for s in switches.values()}
    int8 = session.run(None, {"x": x, **off})[0]
    floats = session.run(None, {"x": x, **on})[0]
    np.testing.assert_allclose(floats, np.maximum(x @ w1, 0) @ w2, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(int8, _session(model).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)
    assert np.abs(int8 - floats).max() > 1e-3  # int8 really is int8
