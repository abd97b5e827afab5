"""Deep Compression on the zoo models: `prune`, `share` and `recover` keep their promises (exact sparsity, one
threshold, N:M groups, at most 2**bits values, zeros that stay zero, a loss that goes down), recipes are refused
before any work when they cannot apply, and the shipped recipe gives a 40x smaller LeNet-300-100 that loads to
the accuracy it reports."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch

import compressor
from compressor.encodings import Codebook, Dense, Sparse
from compressor.errors import RecipeError
from compressor.log import Reporter
from compressor.passes.base import Context, get_pass
from compressor.sources.zoo import load_zoo
from compressor.zoo import digits_accuracy
from conftest import ROOT, read_report, run_cli

MLP_WEIGHTS = ["fc1.weight", "fc2.weight", "fc3.weight"]
MLP_BIASES = ["fc1.bias", "fc2.bias", "fc3.bias"]
CNN_WEIGHTS = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
FP32_BYTES = 202_440  # the digits MLP's 50,610 float32 parameters


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is fastest, and on a busy 2-core machine two threads fight each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mlp_source():
    return load_zoo("digits-mlp")


@pytest.fixture(scope="module")
def cnn_source():
    return load_zoo("digits-cnn")


@pytest.fixture
def mlp(mlp_source):
    """A fresh digits MLP (LeNet-300-100) for each test."""
    return copy.deepcopy(mlp_source)


def make(name: str, index: int = 0, **config):
    cls = get_pass(name)
    return cls(cls.Config(**config), index=index)


def run(model, name: str, ctx: Context | None = None, **config):
    """Check and apply one pass the way the pipeline does; returns its PassReport."""
    pass_ = make(name, **config)
    pass_.check(model)
    return pass_(model, ctx or Context(seed=0))


def weights(model, names=None) -> dict[str, torch.Tensor]:
    tensors = model.tensors()
    return {n: tensors[n].detach().clone() for n in (names or tensors)}


def zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


def distinct_nonzero(t: torch.Tensor) -> int:
    return torch.unique(t[t != 0]).numel()


def fp16_exact(t: torch.Tensor) -> bool:
    return torch.equal(t.half().float(), t)


def decoded(model) -> dict[str, torch.Tensor]:
    """Every tensor as its stored form decodes."""
    stored = model.stored()
    out = {}
    for name, enc in model.encodings.items():
        parts = {k[len(name):]: v for k, v in stored.items() if k == name or k.startswith(name + ".__")}
        out[name] = enc.decode(parts)
    return out


# ------------------------------------------------------------------------------------------ prune


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9, 0.95])
def test_layer_prune_hits_the_sparsity_exactly_per_tensor(mlp, sparsity):
    before = weights(mlp)
    total = mlp.numel()
    report = run(mlp, "prune", sparsity=sparsity)
    after = weights(mlp)
    for name in MLP_WEIGHTS:
        w, w0 = after[name], before[name]
        assert zeros(w0) == 0
        assert zeros(w) == round(sparsity * w.numel()), name
        kept = w != 0
        assert torch.equal(w[kept], w0[kept])  # survivors unchanged
        # Magnitude pruning within the layer: nothing kept is smaller than anything pruned.
        assert w0[kept].abs().min() >= w0[~kept].abs().max()
        assert isinstance(mlp.encodings[name], Sparse)
    for name in MLP_BIASES:
        assert torch.equal(after[name], before[name]) and isinstance(mlp.encodings[name], Dense)
    details = report.details
    assert details["pattern"] == "unstructured" and details["scope"] == "layer"
    assert details["sparsity_per_layer"] == {n: round(zeros(after[n]) / after[n].numel(), 6) for n in MLP_WEIGHTS}
    assert details["sparsity_overall"] == round(sum(zeros(t) for t in after.values()) / total, 6)
    selected = sum(after[n].numel() for n in MLP_WEIGHTS)
    assert details["sparsity_selected"] == round(sum(zeros(after[n]) for n in MLP_WEIGHTS) / selected, 6)
    assert report.tensors_touched == 3 and report.params_touched == selected
    assert report.bytes_after < report.bytes_before
    # What is stored decodes to what the module computes with.
    for name, t in decoded(mlp).items():
        assert torch.equal(t, after[name]), name


def test_global_prune_uses_one_threshold_across_layers(mlp):
    before = weights(mlp, MLP_WEIGHTS)
    report = run(mlp, "prune", sparsity=0.8, scope="global")
    after = weights(mlp, MLP_WEIGHTS)
    kept = torch.cat([before[n][after[n] != 0].abs() for n in MLP_WEIGHTS])
    pruned = torch.cat([before[n][after[n] == 0].abs() for n in MLP_WEIGHTS])
    assert kept.min() >= pruned.max()
    assert pruned.numel() == round(0.8 * (kept.numel() + pruned.numel()))
    per_layer = report.details["sparsity_per_layer"]
    assert report.details["scope"] == "global"
    assert len(set(per_layer.values())) == 3  # layers lose different shares under one threshold
    for name in MLP_WEIGHTS:
        assert per_layer[name] == round(zeros(after[name]) / after[name].numel(), 6)


def test_per_type_sparsity_first_matching_key_wins(mlp):
    report = run(mlp, "prune", sparsity={"fc1": 0.9, "Linear": 0.5})
    after = weights(mlp, MLP_WEIGHTS)
    expected = {"fc1.weight": 0.9, "fc2.weight": 0.5, "fc3.weight": 0.5}
    for name, target in expected.items():
        assert zeros(after[name]) == round(target * after[name].numel()), name
    assert report.details["sparsity_per_layer"] == expected


def test_weights_matching_no_sparsity_key_stay_dense(mlp):
    before = weights(mlp, MLP_WEIGHTS)
    run(mlp, "prune", sparsity={"fc2": 0.7, "fc1": 0.6})
    after = weights(mlp, MLP_WEIGHTS)
    assert zeros(after["fc1.weight"]) == round(0.6 * 19200)
    assert zeros(after["fc2.weight"]) == round(0.7 * 30000)
    assert torch.equal(after["fc3.weight"], before["fc3.weight"])
    assert isinstance(mlp.encodings["fc3.weight"], Dense)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (1, 2)])
def test_n_m_keeps_exactly_n_in_every_group_of_m_along_the_input(mlp, n, m):
    before = weights(mlp, MLP_WEIGHTS)
    report = run(mlp, "prune", pattern=f"{n}:{m}")
    for name in MLP_WEIGHTS:
        w, w0 = mlp.tensors()[name], before[name]
        groups = w.reshape(w.shape[0], -1, m)  # consecutive weights of a row: the input dimension
        assert bool(((groups != 0).sum(-1) == n).all()), name
        # The n largest magnitudes of each group stay.
        g0 = w0.abs().reshape(w.shape[0], -1, m)
        kept_min = torch.where(groups != 0, g0, torch.inf).amin(-1)
        pruned_max = torch.where(groups == 0, g0, -torch.inf).amax(-1)
        assert bool((kept_min >= pruned_max).all()), name
        assert report.details["sparsity_per_layer"][name] == round(1 - n / m, 6)
    assert report.details["pattern"] == f"{n}:{m}" and report.details["scope"] == "group"


def test_n_m_refuses_a_layer_whose_width_m_does_not_divide(mlp):
    prune = make("prune", index=3, pattern="4:8")  # fc2 has 300 inputs, fc3 100: neither a multiple of 8
    with pytest.raises(RecipeError) as info:
        prune.check(mlp)
    assert info.value.problems[0].path == "passes[3].prune.pattern"
    assert "fc2.weight has 300 weights per output row" in str(info.value)
    before = weights(mlp)
    run(mlp, "prune", pattern="4:8", exclude=["fc2", "fc3"])
    after = weights(mlp)
    assert zeros(after["fc1.weight"]) == 300 * 64 // 2
    assert torch.equal(after["fc2.weight"], before["fc2.weight"])


def test_exclude_leaves_a_layer_dense(mlp):
    before = weights(mlp)
    report = run(mlp, "prune", sparsity=0.9, exclude=["fc3"])
    after = weights(mlp)
    assert torch.equal(after["fc3.weight"], before["fc3.weight"])
    assert isinstance(mlp.encodings["fc3.weight"], Dense)
    assert set(report.details["sparsity_per_layer"]) == {"fc1.weight", "fc2.weight"}
    assert zeros(after["fc1.weight"]) == round(0.9 * 19200)


def test_modules_selects_by_name_glob(mlp):
    before = weights(mlp)
    run(mlp, "prune", sparsity=0.5, modules=["fc[12]"])
    after = weights(mlp)
    assert zeros(after["fc1.weight"]) == 9600 and zeros(after["fc2.weight"]) == 15000
    assert torch.equal(after["fc3.weight"], before["fc3.weight"])


def test_pruning_twice_keeps_the_earlier_zeros(mlp):
    run(mlp, "prune", sparsity=0.5)
    first = {n: t == 0 for n, t in weights(mlp, MLP_WEIGHTS).items()}
    report = run(mlp, "prune", sparsity={"fc1": 0.8, "Linear": 0.7})
    for name, was_zero in first.items():
        now = mlp.tensors()[name]
        assert bool((now[was_zero] == 0).all()), name
        target = 0.8 if name == "fc1.weight" else 0.7
        assert zeros(now) == round(target * now.numel()), name
    assert report.details["sparsity_per_layer"]["fc1.weight"] == 0.8


def test_a_lower_second_target_reports_the_real_sparsity(mlp):
    run(mlp, "prune", sparsity=0.8)
    report = run(mlp, "prune", sparsity=0.5)
    w = mlp.tensors()["fc1.weight"]
    assert zeros(w) == round(0.8 * w.numel())  # nothing comes back: this part holds
    assert report.details["sparsity_per_layer"]["fc1.weight"] == round(zeros(w) / w.numel(), 6)


def test_pruned_module_is_bit_identical_to_its_stored_form(mlp):
    run(mlp, "prune", sparsity=0.5)
    for name, t in decoded(mlp).items():
        assert torch.equal(t.view(torch.int32), mlp.tensors()[name].view(torch.int32)), name


def test_prune_refuses_sparsity_keys_modules_and_excludes_that_match_nothing(mlp):
    cases = [({"sparsity": {"fc7": 0.5, "Linear": 0.3}}, "passes[4].prune.sparsity", "'fc7'"),
             ({"sparsity": 0.5, "modules": ["fc9"]}, "passes[4].prune.modules", "'fc9'"),
             ({"sparsity": 0.5, "exclude": ["fc1", "conv*"]}, "passes[4].prune.exclude", "'conv*'")]
    before = weights(mlp)
    for config, path, name in cases:
        with pytest.raises(RecipeError) as info:
            make("prune", index=4, **config).check(mlp)
        assert info.value.problems[0].path == path
        assert name in str(info.value)
    assert all(torch.equal(t, before[n]) for n, t in weights(mlp).items())  # check changed nothing


@pytest.mark.parametrize("name,config", [("prune", {"sparsity": 0.5, "exclude": ["Conv2d"]}),
                                         ("share", {"exclude": ["Embedding"]})])
def test_an_exclude_naming_a_default_class_absent_from_the_model_is_refused(mlp, name, config):
    with pytest.raises(RecipeError, match="match no module"):
        make(name, **config).check(mlp)


# ------------------------------------------------------------------------------------------ recipe checks


def _recipe(tmp_path: Path, *passes: str) -> Path:
    path = tmp_path / "recipe.yaml"
    body = "".join(f"  - {p}\n" for p in passes)
    path.write_text(f"name: t\nmodel: {{source: zoo, name: digits-mlp}}\npasses:\n{body}")
    return path


@pytest.mark.parametrize("step,field,words", [
    ("prune: {sparsity: 1.2}", "passes[0].prune.sparsity", "1.2"),
    ("prune: {sparsity: 1.0}", "passes[0].prune.sparsity", "[0, 1)"),
    ("prune: {sparsity: -0.1}", "passes[0].prune.sparsity", "-0.1"),
    ("prune: {sparsity: {fc1: 0.5, Linear: 2}}", "passes[0].prune.sparsity", "'Linear'"),
    ("prune: {sparsity: {}}", "passes[0].prune.sparsity", "empty"),
    ("share: {bits: 0}", "passes[0].share.bits", "0"),
    ("share: {bits: 9}", "passes[0].share.bits", "9"),
    ("prune: {pattern: '4:2'}", "passes[0].prune.pattern", "4:2"),
    ("prune: {pattern: '2-4'}", "passes[0].prune.pattern", "2-4"),
    ("prune: {pattern: '2:4', sparsity: 0.5}", "passes[0].prune", "sparsity"),
    ("prune: {sparsity: {fc1: 0.5}, scope: global}", "passes[0].prune", "one number"),
    ("prune: {}", "passes[0].prune", "sparsity"),
])
def test_validate_refuses_bad_settings_naming_the_field(tmp_path, step, field, words):
    result = run_cli("validate", str(_recipe(tmp_path, step)))
    assert result.returncode == 2, result.stderr
    assert f"{field}:" in result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_refuses_prune_after_share(tmp_path):
    result = run_cli("validate", str(_recipe(tmp_path, "share: {bits: 4}", "prune: {sparsity: 0.5}")))
    assert result.returncode == 2
    assert "passes[1]" in result.stderr and "share" in result.stderr


@pytest.mark.parametrize("step,message", [
    ("prune: {sparsity: 0.5, modules: [fc9]}", "passes[2].prune.modules: pattern(s) 'fc9' match no module"),
    ("prune: {sparsity: 0.5, exclude: ['nothing*']}", "passes[2].prune.exclude: pattern(s) 'nothing*' match no module"),
    ("prune: {sparsity: {fc7: 0.9, Linear: 0.5}}", "passes[2].prune.sparsity: sparsity key(s) 'fc7' match no"),
    ("share: {bits: 4, modules: [Conv2d]}", "passes[2].share.modules: pattern(s) 'Conv2d' match no module"),
], ids=["prune-modules", "prune-exclude", "prune-sparsity-key", "share-modules"])
def test_run_refuses_a_pattern_matching_nothing_before_any_pass(tmp_path, step, message):
    # The recover before it would take many minutes: exiting at once shows nothing ran.
    recipe = _recipe(tmp_path, "prune: {sparsity: 0.5}", "recover: {steps: 1000000}", step)
    out = tmp_path / "art" / "out"
    start = time.monotonic()
    result = run_cli("run", str(recipe), "-o", str(out), timeout=300)
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - start < 120
    assert message in result.stderr
    assert "pass 1/3" not in result.stderr  # no pass started
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no staging leftovers either


# ------------------------------------------------------------------------------------------ share


@pytest.fixture(scope="module")
def mlp_pruned(mlp_source):
    model = copy.deepcopy(mlp_source)
    run(model, "prune", sparsity={"fc1": 0.9, "fc2": 0.9, "fc3": 0.7})
    return model


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_share_after_prune_keeps_zeros_and_at_most_2_to_the_bits_values(mlp_pruned, bits):
    model = copy.deepcopy(mlp_pruned)
    before = weights(model)
    report = run(model, "share", bits=bits)
    after = weights(model)
    for name in MLP_WEIGHTS:
        w, w0 = after[name], before[name]
        assert torch.equal(w == 0, w0 == 0), name  # pruned zeros stay, no survivor became zero
        assert 2 <= distinct_nonzero(w) <= 1 << bits, name
        assert fp16_exact(w), name
        assert model.encodings[name] == Codebook(list(w.shape), bits, "float32", "float16", sparse=True)
        info = report.details["per_tensor"][name]
        assert distinct_nonzero(w) <= info["centroids"] <= 1 << bits and info["values"] == int((w0 != 0).sum())
        # Each value moved to a centroid near it: the error is small against the weights' spread.
        assert 0 < info["relative_error"] < (0.5 if bits == 2 else 0.15), name
    for name in MLP_BIASES:
        assert torch.equal(after[name], before[name]) and isinstance(model.encodings[name], Dense)
    assert report.tensors_touched == 3 and report.bytes_after < report.bytes_before
    for name, t in decoded(model).items():  # +0.0 zeros now: the stored form is bit-identical
        assert torch.equal(t.view(torch.int32), after[name].view(torch.int32)), name


def test_share_reports_the_centroids_it_stores(mlp_pruned):
    model = copy.deepcopy(mlp_pruned)
    report = run(model, "share", bits=4, init="linear")
    for name in MLP_WEIGHTS:
        w = model.tensors()[name]
        blob = model.encodings[name].encode(w)[".__shared"]
        stored = int.from_bytes(bytes(blob[0:2].tolist()), "little")  # the codebook's centroid count
        assert stored == distinct_nonzero(w)
        assert report.details["per_tensor"][name]["centroids"] == stored, name


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_every_init_shares_the_dense_model_without_losing_accuracy(mlp, init):
    base = digits_accuracy(mlp.module, "digits-mlp")
    report = run(mlp, "share", bits=4, init=init, include_bias=True)
    after = weights(mlp)
    assert report.details["init"] == init and report.tensors_touched == 6
    for name, t in after.items():
        assert torch.unique(t).numel() <= 16, name
        assert fp16_exact(t), name
        enc = mlp.encodings[name]
        assert isinstance(enc, Codebook) and not enc.sparse and enc.bits == 4
    assert digits_accuracy(mlp.module, "digits-mlp") >= base - 2
    for name, t in decoded(mlp).items():
        assert torch.equal(t, after[name]), name


def test_random_init_is_deterministic_in_the_seed(mlp_pruned):
    results = []
    for seed in (0, 0, 1):
        model = copy.deepcopy(mlp_pruned)
        run(model, "share", Context(seed=seed), bits=3, init="random", iterations=3)
        results.append(weights(model, MLP_WEIGHTS))
    same, other = results[0], results[2]
    assert all(torch.equal(same[n], results[1][n]) for n in MLP_WEIGHTS)
    assert not all(torch.equal(same[n], other[n]) for n in MLP_WEIGHTS)


def test_share_with_a_float32_codebook_stores_float32_centroids(mlp_pruned):
    model = copy.deepcopy(mlp_pruned)
    run(model, "share", bits=4, codebook_dtype="float32", modules=["fc3"])
    w = model.tensors()["fc3.weight"]
    assert model.encodings["fc3.weight"].codebook_dtype == "float32"
    assert not fp16_exact(w)  # k-means means, not rounded to float16
    assert distinct_nonzero(w) <= 16
    assert torch.equal(decoded(model)["fc3.weight"], w)


# ------------------------------------------------------------------------------------------ recover


@pytest.fixture(scope="module")
def recovered(mlp_source, tmp_path_factory):
    """digits-mlp pruned to 90% at once, then recovered: (model before recovery, model after, recover report,
    context with the original)."""
    model = copy.deepcopy(mlp_source)
    ctx = Context(seed=0, base_dir=tmp_path_factory.mktemp("recover"))
    ctx.original = copy.deepcopy(model.module).eval()
    run(model, "prune", ctx, sparsity=0.9)
    pruned = copy.deepcopy(model)
    report = run(model, "recover", ctx, steps=800, lr=1e-3)
    return pruned, model, report, ctx


def test_recover_keeps_every_pruned_zero(recovered):
    pruned, model, report, _ = recovered
    before, after = weights(pruned), weights(model)
    for name in MLP_WEIGHTS:
        assert torch.equal(after[name] == 0, before[name] == 0), name  # same zeros, no new ones
        assert not torch.equal(after[name], before[name]), name  # the survivors trained
        assert isinstance(model.encodings[name], Sparse)
    for name in MLP_BIASES:
        assert not torch.equal(after[name], before[name]), name
    details = report.details
    assert details["steps"] == 800 and details["sparse_masked"] == 3 and details["tensors_trained"] == 6
    assert details["labels"] is True and details["codebooks_trained"] == 0
    assert report.bytes_after == report.bytes_before  # same sparsity, same storage
    assert not any(p.requires_grad for p in model.module.parameters())


def test_recover_lowers_the_loss_and_regains_the_accuracy(recovered, mlp_source):
    pruned, model, report, _ = recovered
    assert report.details["loss_last"] < report.details["loss_first"]
    original = digits_accuracy(mlp_source.module, "digits-mlp")
    assert digits_accuracy(pruned.module, "digits-mlp") < original - 10  # 90% at once hurts ...
    assert digits_accuracy(model.module, "digits-mlp") >= original - 2  # ... and recovery brings it back


def test_recover_after_share_trains_centroids_only(recovered):
    _, model, _, ctx = recovered
    model = copy.deepcopy(model)
    run(model, "share", ctx, bits=4, include_bias=True)
    before = weights(model)
    report = run(model, "recover", ctx, steps=150, lr=3e-4)
    after = weights(model)
    for name, t in after.items():
        t0 = before[name]
        assert torch.equal(t == 0, t0 == 0), name
        assert distinct_nonzero(t) <= distinct_nonzero(t0) <= 16, name
        assert fp16_exact(t), name
        # Trained quantization: weights that shared a centroid still share one.
        _, assign0 = torch.unique(t0, return_inverse=True)
        for c in torch.unique(assign0):
            assert torch.unique(t[assign0 == c]).numel() == 1, name
    assert any(not torch.equal(after[n], before[n]) for n in after)  # centroids moved
    assert report.details["codebooks_trained"] == 6
    assert report.details["loss_last"] < report.details["loss_first"]
    for name, t in decoded(model).items():  # still encodable: every value is a float16 centroid
        assert torch.equal(t, after[name]), name


def test_recover_refuses_a_freeze_pattern_matching_nothing(mlp):
    with pytest.raises(RecipeError) as info:
        make("recover", index=2, freeze=["fc9"]).check(mlp)
    assert info.value.problems[0].path == "passes[2].recover.freeze"


def test_recover_leaves_frozen_modules_alone(recovered):
    _, model, _, ctx = recovered
    model = copy.deepcopy(model)
    before = weights(model)
    report = run(model, "recover", ctx, steps=20, lr=1e-3, freeze=["fc1"])
    after = weights(model)
    assert torch.equal(after["fc1.weight"], before["fc1.weight"]) and torch.equal(after["fc1.bias"], before["fc1.bias"])
    assert not torch.equal(after["fc2.weight"], before["fc2.weight"])
    assert report.details["tensors_trained"] == 4


# ------------------------------------------------------------------------------------------ digits CNN


def test_cnn_prunes_convolutions_too_and_shares(cnn_source):
    model = copy.deepcopy(cnn_source)
    before = weights(model)
    report = run(model, "prune", sparsity=0.6)
    assert set(report.details["sparsity_per_layer"]) == set(CNN_WEIGHTS)
    pruned = weights(model)
    for name in CNN_WEIGHTS:
        assert zeros(pruned[name]) == round(0.6 * pruned[name].numel()), name
        assert isinstance(model.encodings[name], Sparse)
    assert pruned["conv2.weight"].dim() == 4
    run(model, "share", bits=5)
    shared = weights(model)
    for name in CNN_WEIGHTS:
        assert torch.equal(shared[name] == 0, pruned[name] == 0), name
        assert distinct_nonzero(shared[name]) <= 32 and fp16_exact(shared[name]), name
        assert model.encodings[name] == Codebook(list(shared[name].shape), 5, sparse=True)
    for name in ("conv1.bias", "fc2.bias"):
        assert torch.equal(shared[name], before[name])
    for name, t in decoded(model).items():
        assert torch.equal(t, shared[name]), name
    assert model.stored_nbytes() * 8 < sum(t.numel() * 4 for t in before.values())
    assert digits_accuracy(model.module, "digits-cnn") > 50  # still a digits classifier


def test_cnn_n_m_groups_run_along_the_flattened_input(cnn_source):
    model = copy.deepcopy(cnn_source)
    with pytest.raises(RecipeError, match="conv1.weight has 9 weights per output row"):
        make("prune", pattern="2:4").check(model)
    run(model, "prune", pattern="2:4", exclude=["conv1"])
    w = model.tensors()["conv2.weight"]  # (32, 16, 3, 3): 144 inputs per output channel
    assert bool(((w.reshape(32, -1, 4) != 0).sum(-1) == 2).all())
    assert zeros(model.tensors()["conv1.weight"]) == 0


# ------------------------------------------------------------------------------------------ the shipped recipe


@pytest.fixture(scope="module")
def deep_compression(tmp_path_factory):
    """recipes/digits-deep-compression.yaml, run once: (artifact directory, RunResult)."""
    from compressor.pipeline import run_recipe
    from compressor.recipe import load_recipe

    out = tmp_path_factory.mktemp("dc") / "digits-deep-compression"
    result = run_recipe(load_recipe(ROOT / "recipes" / "digits-deep-compression.yaml"), out, Reporter(quiet=True))
    return out, result


@pytest.mark.slow
def test_recipe_passes_its_gates_at_40x(deep_compression):
    out, result = deep_compression
    report = read_report(out)
    assert report["passed"] is True
    assert {g["gate"]: g["status"] for g in report["gates"]} == {"max_accuracy_drop": "passed",
                                                                 "min_compression": "passed"}
    size = (out / "model.safetensors").stat().st_size
    assert size * 40 <= FP32_BYTES
    artifact = next(r for r in report["results"] if r["role"] == "artifact")
    assert artifact["size_bytes"] == size
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == result.manifest.to_json()


@pytest.mark.slow
def test_recipe_artifact_loads_to_the_reported_accuracy(deep_compression):
    out, _ = deep_compression
    report = read_report(out)
    artifact = next(r for r in report["results"] if r["role"] == "artifact")
    baseline = next(r for r in report["results"] if r["role"] == "baseline")
    module = compressor.load(out, verify_hashes=True)
    accuracy = digits_accuracy(module, "digits-mlp")
    assert accuracy == pytest.approx(artifact["accuracy"]["value"], abs=1e-9)
    assert accuracy >= baseline["accuracy"]["value"] - 0.5
    # The loaded weights are what the recipe promises: the final targets exactly, 16 shared values at most.
    state = module.state_dict()
    for name, target in {"fc1.weight": 0.93, "fc2.weight": 0.96, "fc3.weight": 0.8}.items():
        w = state[name]
        assert zeros(w) == round(target * w.numel()), name
        assert distinct_nonzero(w) <= 16 and fp16_exact(w), name
    for name in MLP_BIASES:
        assert torch.unique(state[name]).numel() <= 16, name


@pytest.mark.slow
def test_recipe_manifest_lists_codebook_encodings_and_pass_reports(deep_compression):
    _, result = deep_compression
    manifest = result.manifest.to_json()
    encodings = manifest["model"]["encodings"]
    for name in MLP_WEIGHTS:
        assert encodings[name]["kind"] == "codebook" and encodings[name]["sparse"] is True, name
        assert encodings[name]["bits"] == 4 and encodings[name]["codebook_dtype"] == "float16"
    for name in MLP_BIASES:
        assert encodings[name]["kind"] == "codebook" and encodings[name]["sparse"] is False, name
    passes = manifest["passes"]
    assert [p["name"] for p in passes] == ["prune", "recover", "prune", "recover", "share", "recover"]
    first, second = passes[0]["details"], passes[2]["details"]
    assert first["sparsity_per_layer"] == {"fc1.weight": 0.465, "fc2.weight": 0.48, "fc3.weight": 0.4}
    assert second["sparsity_per_layer"] == {"fc1.weight": 0.93, "fc2.weight": 0.96, "fc3.weight": 0.8}
    assert passes[2]["bytes_after"] < passes[0]["bytes_after"] < passes[0]["bytes_before"] == FP32_BYTES
    assert passes[4]["bytes_after"] * 40 <= FP32_BYTES  # sparse -> codebook: the share pass's part of the 40x
    for p in (passes[1], passes[3], passes[5]):
        assert p["details"]["loss_last"] < p["details"]["loss_first"]
    assert manifest["model"]["stored_bytes"] == passes[5]["bytes_after"]
