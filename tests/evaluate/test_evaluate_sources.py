"""The evaluator with user models: python sources evaluated from any directory (relative weights, copied
artifacts, --baseline RECIPE.yaml), dict outputs scored on `logits`, labels checked against the output width,
data-function batches checked, top-1 agreement only for 2-D outputs, sequence lengths beyond a model's positions
refused before any work, world-readable reports, `--device cpu` leaving the recipe's cuda gates skipped, and load
ratios in report.md. Real (tiny) models only, every file in tmp_path, every command in a fresh process."""

from __future__ import annotations

import json
import os
import shutil
import stat
import textwrap
from pathlib import Path

import pytest

from conftest import assert_same_scores, read_report, run_cli

REPORT_FILES = ("report.json", "report.md", "junit.xml", "report.png")

SPEED_TINY = "{batch_sizes: [4], rounds: 2, calls: 1, warmup: 1, load_runs: 1}"
SPEED_NO_LOAD = "{batch_sizes: [4], rounds: 2, calls: 1, warmup: 1, load_runs: 0}"

MODULE = "evalsrc_tiny_models"  # imported only by the `compress` processes, never by pytest itself

# A tiny classifier 8 -> 8 (ReLU) -> 4; `kind` picks what forward() returns. Data functions read the batches the
# test wrote beside the module, so the test knows exactly what was evaluated.
MODELS = '''\
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

HERE = Path(__file__).resolve().parent


class Net(nn.Module):
    def __init__(self, kind="logits"):
        super().__init__()
        self.kind = kind
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.body(x))
        y = self.head(h)
        if self.kind == "dict":
            return {"hidden": h, "logits": y}  # hidden first: the evaluator must still score `logits`
        if self.kind == "3d":
            return y.unsqueeze(-1)  # (N, 4, 1)
        return y


def build(kind="logits"):
    return Net(kind)


def _data():
    return load_file(str(HERE / "batches.safetensors"))


def batches():
    d = _data()
    for i in range(0, d["x"].shape[0], 16):
        yield {"x": d["x"][i:i + 16], "labels": d["labels"][i:i + 16]}


def out_of_range():
    d = _data()
    labels = d["labels"].clone()
    labels[5] = 7  # a valid index into `hidden` (8 wide), not into `logits` (4 wide)
    yield {"x": d["x"], "labels": labels}


def wrong_names():
    d = _data()
    yield {"y": d["x"][:4], "labels": d["labels"][:4]}


def wrong_label_count():
    d = _data()
    yield {"x": d["x"][:4], "labels": d["labels"][:3]}
'''

EXAMPLES = 64


# ------------------------------------------------------------------------------------------------- helpers


def make_weights() -> dict:
    import torch

    gen = torch.Generator().manual_seed(1234)
    return {"body.weight": torch.randn(8, 8, generator=gen), "body.bias": 0.1 * torch.randn(8, generator=gen),
            "head.weight": torch.randn(4, 8, generator=gen), "head.bias": 0.1 * torch.randn(4, generator=gen)}


def forward(weights: dict, x):
    """The model's (hidden, logits), computed here from the weights, independently of the user's module."""
    import torch
    import torch.nn.functional as F

    h = torch.relu(F.linear(x, weights["body.weight"], weights["body.bias"]))
    return h, F.linear(h, weights["head.weight"], weights["head.bias"])


def make_data(weights: dict) -> dict:
    """64 examples; labels mostly the model's own top-1 (so accuracy is high but not 100 %)."""
    import torch

    gen = torch.Generator().manual_seed(99)
    x = torch.randn(EXAMPLES, 8, generator=gen)
    _, logits = forward(weights, x)
    noise = torch.randint(0, 4, (EXAMPLES,), generator=gen)
    keep = torch.rand(EXAMPLES, generator=gen) < 0.7
    return {"x": x.contiguous(), "labels": torch.where(keep, logits.argmax(-1), noise).contiguous()}


def top1_correct(scores, labels) -> int:
    return int((scores.argmax(-1) == labels).sum())


def write_project(directory: Path, body: str) -> tuple[Path, dict, dict]:
    """A recipe directory: the module, weights/net.safetensors, batches.safetensors, data/eval.jsonl and
    recipe.yaml (``body`` with MODULE and the speed settings filled in). Returns (recipe, weights, data)."""
    from safetensors.torch import save_file

    (directory / "weights").mkdir(parents=True)
    (directory / "data").mkdir()
    (directory / f"{MODULE}.py").write_text(MODELS)
    weights = make_weights()
    save_file(weights, str(directory / "weights" / "net.safetensors"))
    data = make_data(weights)
    save_file(data, str(directory / "batches.safetensors"))
    rows = [json.dumps({"label": int(label), "x": x.tolist()}) for x, label in zip(data["x"], data["labels"])]
    (directory / "data" / "eval.jsonl").write_text("\n".join(rows) + "\n")
    recipe = directory / "recipe.yaml"
    recipe.write_text(textwrap.dedent(body).format(module=MODULE, speed_tiny=SPEED_TINY, speed_no_load=SPEED_NO_LOAD))
    return recipe, weights, data


def python_model(kind: str) -> str:
    """The recipe's model section (weights relative to the recipe), indented for the recipe bodies below."""
    return f"""\
        model:
          source: python
          factory: "{{module}}:build"
          kwargs: {{{{kind: {kind}}}}}
          weights: weights/net.safetensors
          inputs: {{{{x: {{{{shape: [2, 8]}}}}}}}}
        """.rstrip(" ")


def a_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_table(markdown: str) -> list[str]:
    """The rows of report.md's Load table."""
    section = markdown.split("## Load", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ")]


# ------------------------------------------------------------------------------------- python source, anywhere


PYTHON_RECIPE = "        name: tiny-net\n" + python_model("logits") + """\
        passes:
          - cast: {{dtype: bfloat16}}
        evaluate:
          data: {{path: data/eval.jsonl, batch_size: 16}}
          speed: {speed_tiny}
        """


@pytest.fixture(scope="module")
def python_run(tmp_path_factory: pytest.TempPathFactory):
    """`compress run` of a python source with relative weights, from a directory that is not the recipe's, with
    one load run per mode (fresh processes that must import the factory too)."""
    base = tmp_path_factory.mktemp("python-run")
    recipe, weights, data = write_project(base / "recipe", PYTHON_RECIPE)
    out = base / "out"
    proc = run_cli("run", str(recipe), "-o", str(out), cwd=a_dir(base / "elsewhere"))
    return {"proc": proc, "out": out, "recipe": recipe, "weights": weights, "data": data, "base": base}


@pytest.fixture
def copied(python_run, tmp_path: Path) -> Path:
    """The python-source artifact copied to a new place (reports included)."""
    assert (python_run["out"] / "report.json").is_file(), python_run["proc"].stderr[-3000:]
    target = tmp_path / "copies" / "art"
    shutil.copytree(python_run["out"], target)
    return target


def test_python_source_with_relative_weights_runs_from_another_directory(python_run):
    proc, out = python_run["proc"], python_run["out"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for name in ("manifest.json", "model.safetensors", *REPORT_FILES):
        assert (out / name).is_file(), name
    assert not (python_run["base"] / "elsewhere" / "weights").exists()
    assert sorted(p.name for p in (python_run["base"] / "elsewhere").iterdir()) == []  # nothing written to the cwd

    report = read_report(out)
    recipe_dir = python_run["recipe"].parent.resolve()
    assert report["baseline"]["label"] == f"python: {MODULE}:build"
    assert report["baseline"]["spec"]["base_dir"] == str(recipe_dir)
    assert report["baseline"]["size_bytes"] == (recipe_dir / "weights" / "net.safetensors").stat().st_size
    assert report["data"]["examples"] == EXAMPLES and report["data"]["metric"] == "top1_accuracy"

    # The baseline's accuracy is the fp32 model's on the data file, computed here from the same weights.
    weights, data = python_run["weights"], python_run["data"]
    base, art = report["results"]
    expected = top1_correct(forward(weights, data["x"])[1], data["labels"])
    assert base["accuracy"]["correct"] == expected and base["accuracy"]["examples"] == EXAMPLES
    assert 0 < expected < EXAMPLES
    assert art["accuracy"]["examples"] == EXAMPLES and abs(art["accuracy"]["correct"] - expected) <= 3
    # Load timing ran in fresh processes for both (the factory imported there too).
    for row in (base, art):
        for mode in ("cold", "warm"):
            assert row["load"][mode]["load_ms"]["runs"] == 1 and row["load"][mode]["load_ms"]["median"] > 0


def test_eval_of_a_copied_python_artifact_from_a_third_directory_finds_the_baseline(python_run, copied, tmp_path):
    original = read_report(python_run["out"])
    # With speed: the load-timing processes must import the factory too (from the baseline's recipe directory).
    proc = run_cli("eval", str(copied), cwd=a_dir(tmp_path / "third"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = read_report(copied)
    assert Path(report["artifact"]["path"]) == copied.resolve()
    assert report["baseline"]["spec"] == original["baseline"]["spec"]  # found through the copied report.json
    assert report["baseline"]["size_bytes"] == original["baseline"]["size_bytes"]
    assert_same_scores(original, report)
    assert sorted(p.name for p in (tmp_path / "third").iterdir()) == []
    for row in report["results"]:
        assert row["load"]["cold"]["load_ms"]["runs"] == 1 and row["load"]["warm"]["load_ms"]["runs"] == 1
        assert len(row["latency"]) == 1


def test_eval_with_a_relative_recipe_as_baseline_from_another_directory(python_run, copied, tmp_path):
    original = read_report(python_run["out"])
    (copied / "report.json").unlink()  # no earlier report to remember the baseline by
    cwd = a_dir(tmp_path / "fourth")

    # The manifest's relative weights path cannot be resolved from here: a usage error that says what to do.
    proc = run_cli("eval", str(copied), "--no-speed", cwd=cwd)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--baseline" in proc.stderr and "Traceback" not in proc.stderr
    assert not (copied / "report.json").exists()

    recipe = os.path.relpath(python_run["recipe"], cwd)
    assert not Path(recipe).is_absolute()
    proc = run_cli("eval", str(copied), "--no-speed", "--baseline", recipe, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = read_report(copied)
    assert report["baseline"]["spec"]["base_dir"] == str(python_run["recipe"].parent.resolve())
    assert [r["accuracy"] for r in report["results"]] == [r["accuracy"] for r in original["results"]]


def test_report_md_load_table_has_the_ratio_row_when_loads_are_timed(python_run):
    out = python_run["out"]
    report = read_report(out)
    assert report["settings"]["speed"]["load_runs"] == 1
    ratios = report["results"][1]["ratios"]
    rows = load_table((out / "report.md").read_text())
    (ratio_row,) = [row for row in rows if row.startswith("| ratio baseline / safetensors |")]
    cells = [c.strip() for c in ratio_row.strip("|").split("|")]

    def shown(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}×"

    assert ratios["cold_load_speedup"] > 0 and ratios["warm_load_speedup"] > 0
    assert cells[:6] == ["ratio baseline / safetensors", "cpu", shown(ratios["cold_load_speedup"]),
                         shown(ratios["cold_first_inference_speedup"]), shown(ratios["warm_load_speedup"]),
                         shown(ratios["warm_first_inference_speedup"])]
    assert cells[6:] == ["", shown(ratios["rss_added_ratio"]), "", ""]
    # it follows the artifact's row
    names = [row.split("|")[1].strip() for row in rows[1:]]  # after the header
    assert names == ["baseline (source)", "artifact (safetensors)", "ratio baseline / safetensors"]


def test_reports_are_world_readable_under_a_normal_umask(copied, tmp_path):
    for name in REPORT_FILES:
        os.chmod(copied / name, 0o600)  # whatever the writer produces must not depend on the old files
    previous = os.umask(0o022)
    try:
        proc = run_cli("eval", str(copied), "--no-speed", "--no-gates", cwd=a_dir(tmp_path / "cwd"))
    finally:
        os.umask(previous)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in REPORT_FILES:
        mode = stat.S_IMODE(os.stat(copied / name).st_mode)
        assert mode & 0o044 == 0o044, f"{name}: {oct(mode)}"
        assert mode & 0o022 == 0, f"{name}: {oct(mode)}"  # the umask is still honoured
    assert not [p.name for p in copied.iterdir() if p.name.endswith(".tmp")]
    # --no-speed: no loads were timed, so report.md's Load table has no ratio row
    rows = load_table((copied / "report.md").read_text())
    assert len(rows) == 3 and not any("ratio baseline / safetensors" in row for row in rows)


# ------------------------------------------------------------------------------ outputs, labels, data functions


def function_recipe(kind: str, function: str, passes: str = "") -> str:
    return f"        name: tiny-{kind}\n" + python_model(kind) + passes + f"""\
        evaluate:
          data: {{{{function: "{{module}}:{function}", batch_size: 16}}}}
          speed: {{speed_no_load}}
        """


def test_dict_output_is_scored_on_logits_not_the_first_tensor(tmp_path):
    recipe, weights, data = write_project(tmp_path / "recipe", function_recipe("dict", "batches"))
    out = tmp_path / "out"
    proc = run_cli("run", str(recipe), "-o", str(out), cwd=a_dir(tmp_path / "cwd"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    hidden, logits = forward(weights, data["x"])
    expected = top1_correct(logits, data["labels"])
    on_hidden = top1_correct(hidden, data["labels"])
    assert expected != on_hidden  # the test tells the two apart

    report = read_report(out)
    assert report["data"]["name"] == f"{MODULE}:batches (4 batches)" and report["data"]["examples"] == EXAMPLES
    for row in report["results"]:  # no passes: the artifact computes what the baseline computes
        assert row["accuracy"]["correct"] == expected and row["accuracy"]["examples"] == EXAMPLES
        assert row["accuracy"]["value"] == pytest.approx(100 * expected / EXAMPLES)
    fid = report["results"][1]["fidelity"]
    assert fid["top1_agreement"] == 100.0 and fid["examples"] == EXAMPLES
    assert fid["cos_min"] == pytest.approx(1.0, abs=1e-6)


def test_labels_beyond_the_output_width_exit_2(tmp_path):
    recipe, _, _ = write_project(tmp_path / "recipe", function_recipe("dict", "out_of_range"))
    proc = run_cli("run", str(recipe), "-o", str(tmp_path / "out"), cwd=a_dir(tmp_path / "cwd"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "out of range" in proc.stderr
    assert "label 7" in proc.stderr and "output of 4 values" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.parametrize("function, problem", [
    ("wrong_names", "has the inputs ['y'], but the model takes ['x']"),
    ("wrong_label_count", "has 3 labels for 4 examples"),
])
def test_data_function_batches_that_do_not_fit_exit_2(tmp_path, function, problem):
    recipe, _, _ = write_project(tmp_path / "recipe", function_recipe("logits", function))
    proc = run_cli("run", str(recipe), "-o", str(tmp_path / "out"), cwd=a_dir(tmp_path / "cwd"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "evaluate.data.function" in proc.stderr and f"{MODULE}:{function}" in proc.stderr
    assert problem in proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected failure" not in proc.stderr
    assert not (tmp_path / "out" / "report.json").exists()


def test_top1_agreement_is_null_for_outputs_that_are_not_2d(tmp_path, python_run):
    passes = "        passes:\n          - cast: {{dtype: bfloat16}}\n"
    recipe, weights, data = write_project(tmp_path / "recipe", function_recipe("3d", "batches", passes))
    out = tmp_path / "out"
    proc = run_cli("run", str(recipe), "-o", str(out), cwd=a_dir(tmp_path / "cwd"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = read_report(out)
    assert '"top1_agreement": null' in (out / "report.json").read_text()
    fid = report["results"][1]["fidelity"]
    assert fid["top1_agreement"] is None
    assert fid["examples"] == EXAMPLES and fid["cos_min"] > 0.99  # the rest of fidelity is measured
    # (N, 4, 1) is still scored as 4 classes per example
    expected = top1_correct(forward(weights, data["x"])[1], data["labels"])
    assert report["results"][0]["accuracy"]["correct"] == expected

    # A 2-D logits model (the python run's, same weights, also cast) gets a number.
    agreement = read_report(python_run["out"])["results"][1]["fidelity"]["top1_agreement"]
    assert isinstance(agreement, float) and 90 <= agreement <= 100


# ------------------------------------------------------------------------------------------- hf: sequence lengths


def save_tiny_bert(path: Path, *, tokenizer: bool) -> Path:
    """A 1-layer BERT with 64 positions; with a word-piece tokenizer (79 tokens) or with no tokenizer files."""
    import string

    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(path, safe_serialization=True)
    assert (path / "model.safetensors").is_file()
    if tokenizer:
        from transformers import BertTokenizer

        from compressor.sources.hf import EXAMPLE_SENTENCES

        letters = list(string.ascii_lowercase)
        words = {w.strip(".,").lower() for s in EXAMPLE_SENTENCES for w in s.split()} - set(letters)
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + letters + [f"##{c}" for c in letters]
        vocab += sorted(words)
        assert len(vocab) <= 100
        vocab_file = path.parent / "vocab.txt"
        vocab_file.write_text("\n".join(vocab) + "\n")
        BertTokenizer(vocab_file=str(vocab_file), model_max_length=64).save_pretrained(path)
        vocab_file.unlink()
    assert (path / "tokenizer_config.json").exists() == tokenizer
    return path


def bert_recipe(lengths: str) -> str:
    return f"""\
name: tiny-bert
model: {{source: hf, path: bert, max_length: 16}}
evaluate:
  speed: {{batch_sizes: [2], sequence_lengths: {lengths}, rounds: 2, calls: 1, warmup: 1, load_runs: 0}}
"""


def test_sequence_lengths_beyond_the_positions_are_refused_before_any_work(tmp_path):
    save_tiny_bert(tmp_path / "recipe" / "bert", tokenizer=True)
    recipe = tmp_path / "recipe" / "recipe.yaml"
    recipe.write_text(bert_recipe("[16, 100]"))
    out = tmp_path / "out"
    proc = run_cli("run", str(recipe), "-o", str(out), cwd=a_dir(tmp_path / "cwd"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "evaluate.speed.sequence_lengths" in proc.stderr and "64" in proc.stderr and "100" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left either


def test_hf_source_without_tokenizer_files_runs_on_random_ids(tmp_path):
    save_tiny_bert(tmp_path / "recipe" / "bert", tokenizer=False)
    recipe = tmp_path / "recipe" / "recipe.yaml"
    recipe.write_text(bert_recipe("[16, 64]"))  # 64: exactly the model's positions
    out = tmp_path / "out"
    proc = run_cli("run", str(recipe), "-o", str(out), cwd=a_dir(tmp_path / "cwd"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    ids = load_file(str(out / "example_inputs.safetensors"))["input_ids"]
    assert ids.shape == (2, 16) and int(ids.max()) < 100
    report = read_report(out)
    assert report["data"]["name"] == "example inputs" and report["data"]["metric"] is None
    for row in report["results"]:
        assert [(c["batch_size"], c["seq_len"]) for c in row["latency"]] == [(2, 16), (2, 64)]


# ------------------------------------------------------------------------------------- --device and cuda gates


DEVICES_RECIPE = "        name: tiny-devices\n" + python_model("logits") + """\
        passes:
          - cast: {{dtype: bfloat16}}
        evaluate:
          devices: [cpu, cuda]
          data: {{path: data/eval.jsonl, batch_size: 16}}
          speed: {speed_no_load}
        gates:
          min_fidelity: {{value: 0.9, device: cuda}}
          max_accuracy_drop: {{value: 5, device: cpu}}
        """


def test_eval_device_cpu_skips_the_recipes_cuda_gate(tmp_path):
    recipe, _, _ = write_project(tmp_path / "recipe", DEVICES_RECIPE)
    out = tmp_path / "out"
    cwd = a_dir(tmp_path / "cwd")
    proc = run_cli("run", str(recipe), "-o", str(out), cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]  # without CUDA, the cuda gate is skipped; with it, it passes

    proc = run_cli("eval", str(out), "--device", "cpu", "--no-speed", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gates: 1 passed, 1 skipped" in proc.stdout
    report = read_report(out)
    assert report["devices"] == ["cpu"]
    (skipped,) = report["skipped"]
    assert skipped["device"] == "cuda" and "--device" in skipped["reason"]
    gates = {(g["gate"], g["device"]): g for g in report["gates"]}
    assert set(gates) == {("min_fidelity", "cuda"), ("max_accuracy_drop", "cpu")}
    assert gates["min_fidelity", "cuda"]["status"] == "skipped" and gates["min_fidelity", "cuda"]["measured"] is None
    assert gates["max_accuracy_drop", "cpu"]["status"] == "passed"
    assert report["passed"] is True
    assert [r["device"] for r in report["results"]] == ["cpu", "cpu"]
