"""Recipe validation: every mistake a user can make is reported with file:line:col, the key path and a fix,
exit code 2 and no traceback, before any model (or torch) is loaded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from compressor.errors import EXIT_USAGE, RecipeError
from compressor.recipe import Threshold, load_recipe, parse_recipe

from conftest import ROOT, run_cli

SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))

# id -> (recipe bytes/text, extra files {relative path: bytes}, expected problems).
# Each expected problem is (line, col or None, key path or None, substrings the message or hint must hold);
# "{dir}" in a substring stands for the directory holding the recipe.
BROKEN: dict[str, tuple[str | bytes, dict[str, bytes], list[tuple[int, int | None, str | None, list[str]]]]] = {
    "yaml-syntax": (
        "name: x\nmodel:\n  source: zoo\n  name: digits-mlp: oops\n",
        {},
        [(4, 19, None, ["YAML syntax error", "mapping values are not allowed", "check indentation"])],
    ),
    "misspelt-top-level-key": (
        "name: x\nmodle: {source: zoo, name: digits-mlp}\n",
        {},
        [(2, 1, "modle", ["unknown key 'modle'", "did you mean 'model'?", "valid keys:"])],
    ),
    "misspelt-pass-parameter": (
        "name: x\nmodel: {source: zoo, name: digits-mlp}\npasses:\n  - cast:\n      dtyp: float16\n",
        {},
        [(5, 7, "passes[0].cast.dtyp", ["unknown key 'dtyp'", "did you mean 'dtype'?", "keep_norms"])],
    ),
    "misspelt-pass-name": (
        "name: x\nmodel: {source: zoo, name: digits-mlp}\npasses:\n  - cats: {dtype: float16}\n",
        {},
        [(4, 5, "passes[0]", ["no pass named 'cats'", "did you mean 'cast'?", "available passes: cast"])],
    ),
    "wrong-type": (
        "name: x\nmodel: {source: zoo, name: digits-mlp}\npasses:\n  - cast:\n      keep_norms: maybe\n",
        {},
        [(5, 19, "passes[0].cast.keep_norms", ["valid boolean", "'maybe'", "keep_norms: Keep normalization"])],
    ),
    "invalid-literal": (
        "name: x\nmodel: {source: zoo, name: digits-mlp}\npasses:\n  - cast: {dtype: float8}\n",
        {},
        [(4, 19, "passes[0].cast.dtype", ["'float8' is not a valid value", "did you mean 'float16'?",
                                           "valid values: float16, bfloat16"])],
    ),
    "out-of-range": (
        "name: x\nmodel: {source: zoo, name: digits-mlp}\nexport:\n  safetensors:\n    max_shard_size: 10\n",
        {},
        [(5, 21, "export.safetensors.max_shard_size", ["greater than or equal to 4096", "got 10", "500MB"])],
    ),
    "hf-path-missing": (
        "name: x\nmodel:\n  source: hf\n  path: ./nowhere\n",
        {},
        [(4, 9, "model.path", ["no such directory: {dir}/nowhere", "local Hugging Face model directory"])],
    ),
    "hf-pickle-only": (
        "name: x\nmodel:\n  source: hf\n  path: ckpt\n",
        {"ckpt/config.json": b"{}", "ckpt/pytorch_model.bin": b"not really a pickle"},
        [(4, 9, "model.path", ["has no *.safetensors weights", "pytorch_model.bin", "pickle",
                               "safe_serialization=True"])],
    ),
    "unknown-source": (
        "name: x\nmodel:\n  source: hff\n  path: x\n",
        {},
        [(3, 3, "model", ["unknown source 'hff'", "did you mean 'hf'?", "valid sources: hf, python, zoo"])],
    ),
    "python-bad-factory-and-no-inputs": (
        "name: x\nmodel:\n  source: python\n  factory: not a factory\n",
        {},
        [
            (3, 3, "model.inputs", ["missing required key 'inputs'", "inputs: Example inputs"]),
            (4, 12, "model.factory", ["expected `package.module:function`", "'not a factory'"]),
        ],
    ),
    "empty-file": ("", {}, [(1, None, None, ["the recipe is empty", "a minimal recipe:"])]),
    "only-a-comment": ("# nothing here\n", {}, [(1, None, None, ["the recipe is empty"])]),
    "binary-file": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x01", {},
                    [(1, None, None, ["binary file, not a YAML recipe"])]),
    "not-utf8": (b"name: x\ndescription: caf\xe9\n", {},
                 [(2, None, None, ["not UTF-8 text", "0xe9", "a recipe is a UTF-8 YAML file"])]),
    "top-level-list": ("- name: x\n- model: y\n", {}, [(1, 1, None, ["a mapping of keys, not a list"])]),
    "duplicate-key": (
        "name: x\nmodel: {source: zoo, name: digits-mlp}\nname: y\n",
        {},
        [(3, 1, None, ["duplicate key 'name' (first given on line 1)", "remove or merge"])],
    ),
    "pass-item-with-two-keys": (
        "name: x\nmodel: {source: zoo, name: digits-mlp}\npasses:\n  - cast: {}\n    keep: []\n",
        {},
        [(4, 5, "passes[0]", ["exactly one key", "got a mapping with 2 keys", "give each pass its own list item"])],
    ),
    "repeated-cast": (
        "name: x\nmodel: {source: zoo, name: digits-mlp}\npasses:\n  - cast: {dtype: float16}\n"
        "  - cast: {dtype: bfloat16}\n",
        {},
        [(5, 5, "passes[1]", ["'cast' cannot come after 'cast' (passes[0])", "keep a single 'cast'"])],
    ),
    "bad-name": (
        "name: a b\nmodel: {source: zoo, name: digits-mlp}\n",
        {},
        [(1, 7, "name", ["'a b' cannot name a directory portably", "e.g. 'minilm-fp16'"])],
    ),
    "threshold-as-string": (
        'name: x\nmodel: {source: zoo, name: digits-mlp}\ngates:\n  min_speedup: "1.5"\n',
        {},
        [(4, 16, "gates.min_speedup", ["expected a number, or a mapping", "'1.5'"])],
    ),
}


def _write_case(tmp_path: Path, case: str) -> tuple[Path, list[tuple[int, int | None, str | None, list[str]]]]:
    text, files, expected = BROKEN[case]
    for rel, content in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(content)
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    resolved = [(ln, col, kp, [s.replace("{dir}", str(tmp_path.resolve())) for s in subs])
                for ln, col, kp, subs in expected]
    return path, resolved


def _location(path: Path, line: int, col: int | None) -> str:
    return f"{path}:{line}:{col}: " if col is not None else f"{path}:{line}: "


# ------------------------------------------------------------------------------------------ shipped recipes


def test_there_are_shipped_recipes():
    assert SHIPPED, "recipes/*.yaml is empty"


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_validates(recipe: Path):
    result = run_cli("validate", str(recipe))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
    parsed = load_recipe(recipe)
    assert parsed.steps or parsed.export.onnx is not None, "a shipped recipe must compress or convert something"
    assert parsed.base_dir == recipe.parent.resolve()


# ------------------------------------------------------------------------------------------ broken recipes


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_recipe_cli(tmp_path: Path, case: str):
    path, expected = _write_case(tmp_path, case)
    result = run_cli("validate", str(path))
    assert result.returncode == EXIT_USAGE, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "unexpected failure" not in result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("error: invalid recipe")
    for line, col, key_path, substrings in expected:
        where = _location(path, line, col)
        assert where in result.stderr, f"{where!r} not in:\n{result.stderr}"
        if key_path is not None:
            assert f"{where}{key_path}: " in result.stderr, result.stderr
        for sub in substrings:
            assert sub in result.stderr, f"{sub!r} not in:\n{result.stderr}"


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_recipe_api(tmp_path: Path, case: str):
    path, expected = _write_case(tmp_path, case)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    err = info.value
    assert err.exit_code == EXIT_USAGE
    for line, col, key_path, substrings in expected:
        matches = [p for p in err.problems if (p.line, p.col) == (line, col)
                   and (key_path is None or p.path == key_path)]
        assert matches, f"no problem at {line}:{col} {key_path}: {[str(p) for p in err.problems]}"
        text = "\n".join(str(p) for p in matches)
        assert all(p.file == str(path) for p in matches)
        for sub in substrings:
            assert sub in text


def test_nonexistent_recipe_path(tmp_path: Path):
    missing = tmp_path / "no" / "such.yaml"
    result = run_cli("validate", str(missing))
    assert result.returncode == EXIT_USAGE
    assert "Traceback" not in result.stderr
    assert f"no such recipe file: {missing}" in result.stderr
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(missing)


def test_directory_given_as_recipe(tmp_path: Path):
    with pytest.raises(RecipeError, match="is a directory"):
        load_recipe(tmp_path)


def test_oversized_recipe_is_refused_before_parsing(tmp_path: Path):
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"# " + b"x" * (1 << 20) + b"\n")
    with pytest.raises(RecipeError, match="too large for a recipe"):
        load_recipe(path)


def test_parse_recipe_accepts_text_and_a_utf8_bom():
    for data in ("name: x\nmodel: {source: zoo, name: digits-mlp}\n",
                 b"\xef\xbb\xbfname: x\nmodel: {source: zoo, name: digits-mlp}\n"):
        recipe = parse_recipe(data)
        assert recipe.name == "x"
        assert recipe.model.source == "zoo"
        assert recipe.steps == []


def test_all_problems_reported_sorted_by_line(tmp_path: Path):
    # Pass problems (checked after the schema) come first in the file, schema problems after: the report
    # must still be in file order.
    path = tmp_path / "many.yaml"
    path.write_text(
        "name: x\n"                                   # 1
        "passes:\n"                                   # 2
        "  - cast:\n"                                 # 3
        "      dtyp: float16\n"                       # 4
        "      keep_norms: maybe\n"                   # 5
        "model: {source: zoo, name: digits-mlp}\n"    # 6
        "export:\n"                                   # 7
        "  safetensors:\n"                            # 8
        "    max_shard_size: 10\n"                    # 9
        "gates:\n"                                    # 10
        "  min_speedup: fast\n"                       # 11
        "sede: 3\n"                                   # 12
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    problems = info.value.problems
    assert [(p.line, p.path) for p in problems] == [
        (4, "passes[0].cast.dtyp"),
        (5, "passes[0].cast.keep_norms"),
        (9, "export.safetensors.max_shard_size"),
        (11, "gates.min_speedup"),
        (12, "sede"),
    ]
    assert "did you mean 'seed'?" in str(problems[-1])

    result = run_cli("validate", str(path))
    assert result.returncode == EXIT_USAGE
    assert "Traceback" not in result.stderr
    assert "invalid recipe (5 problems)" in result.stderr
    positions = [result.stderr.index(f"{path}:{line}:") for line in (4, 5, 9, 11, 12)]
    assert positions == sorted(positions)


def test_each_problem_reported_once():
    with pytest.raises(RecipeError) as info:
        parse_recipe("name: x\nmodel: {source: zoo, name: digits-mlp}\npasses:\n  - cast\n")
    assert [p.path for p in info.value.problems] == ["passes[0]"]


@pytest.mark.parametrize("value", ["!custom foo", "!!int abc", "2001-02-30"], ids=["unknown-tag", "bad-int", "bad-date"])
def test_yaml_construction_error_is_a_recipe_error(tmp_path: Path, value: str):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: x\nmodel: {{source: zoo, name: digits-mlp}}\nseed: {value}\n")
    result = run_cli("validate", str(path))
    assert result.returncode == EXIT_USAGE, result.stderr
    assert f"{path}:3:" in result.stderr
    with pytest.raises(RecipeError):
        load_recipe(path)


# ---------------------------------------------------------------------------------------- relative paths


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    """A directory that passes the hf source's checks: MiniLM's config.json and a tiny real safetensors file."""
    from safetensors.torch import save_file
    import torch

    from compressor.zoo import minilm_path

    d = tmp_path / "models" / "mini"
    d.mkdir(parents=True)
    shutil.copy(minilm_path() / "config.json", d / "config.json")
    save_file({"w": torch.zeros(2, 2)}, str(d / "model.safetensors"))
    return d


HF_RECIPE = "name: mini\nmodel:\n  source: hf\n  path: ../models/mini\n"


def test_relative_paths_resolve_against_the_recipe_directory(tmp_path: Path, hf_dir: Path, monkeypatch):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    path = recipes / "mini.yaml"
    path.write_text(HF_RECIPE)
    elsewhere = tmp_path / "a" / "b"  # ../models/mini from here does not exist
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)  # the current directory must not matter

    recipe = load_recipe(path)
    assert recipe.model.source == "hf"
    assert recipe.base_dir == recipes.resolve()
    assert recipe.resolve(recipe.model.path).resolve() == hf_dir.resolve()
    assert recipe.resolve("/abs/file") == Path("/abs/file")

    # parse_recipe anchors at base_dir, else at the current directory (where ../models/mini does not exist).
    assert parse_recipe(HF_RECIPE, base_dir=recipes).model.path == "../models/mini"
    with pytest.raises(RecipeError, match="no such directory"):
        parse_recipe(HF_RECIPE)

    for cwd, arg in ((ROOT, str(path)), (recipes, "mini.yaml"), (tmp_path, "recipes/mini.yaml")):
        result = run_cli("validate", arg, cwd=cwd)
        assert result.returncode == 0, (cwd, result.stderr)
        assert "valid (hf model; no passes)" in result.stdout


# ---------------------------------------------------------------------------------------- no torch on validate

_PROBE = r"""
import json, sys
sys.argv = ["compress", *json.loads(sys.argv[1])]
from compressor.cli import main
try:
    main()
    code = 0
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print("PROBE " + json.dumps({"code": code, "heavy": heavy}))
"""


def probe_cli(*args: str) -> dict:
    """Run compressor.cli.main() in a fresh interpreter; report its exit code and which heavy modules it loaded."""
    result = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(list(args))], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("PROBE ")]
    assert lines, (result.stdout, result.stderr)
    return json.loads(lines[-1][len("PROBE "):])


@pytest.mark.parametrize("which", ["shipped", "hf", "broken"])
def test_validate_does_not_import_torch(tmp_path: Path, hf_dir: Path, which: str):
    if which == "shipped":
        path, code = SHIPPED[0], 0
    elif which == "hf":
        path, code = tmp_path / "recipes" / "mini.yaml", 0
        path.parent.mkdir()
        path.write_text(HF_RECIPE + "passes:\n  - cast: {dtype: bfloat16}\n")
    else:
        path, code = tmp_path / "broken.yaml", EXIT_USAGE
        path.write_text("name: x\nmodel: {source: zoo, name: digits-mlp}\npasses:\n  - cast: {dtyp: float16}\n")
    out = probe_cli("validate", str(path))
    assert out == {"code": code, "heavy": []}


def test_help_does_not_import_torch():
    assert probe_cli("--help") == {"code": 0, "heavy": []}


# ---------------------------------------------------------------------------------------- Threshold shorthand


def test_threshold_shorthand():
    recipe = parse_recipe(
        "name: x\nmodel: {source: zoo, name: digits-mlp}\ngates:\n"
        "  min_speedup: 1.5\n  max_size_bytes: 1000000\n  min_fidelity: {value: 0.99, device: cpu}\n"
    )
    gates = recipe.gates
    assert gates is not None
    assert gates.min_speedup == Threshold(value=1.5)
    assert gates.min_speedup.value == 1.5 and gates.min_speedup.device is None and gates.min_speedup.format is None
    assert gates.max_size_bytes.value == 1_000_000
    assert gates.min_fidelity == Threshold(value=0.99, device="cpu")
    assert gates.max_accuracy_drop is None
    assert Threshold.model_validate(2) == Threshold(value=2.0)


@pytest.mark.parametrize("value", ["true", "[1.5]", '"1.5"'])
def test_threshold_rejects_non_numbers(value: str):
    with pytest.raises(RecipeError, match="expected a number, or a mapping"):
        parse_recipe(f"name: x\nmodel: {{source: zoo, name: digits-mlp}}\ngates:\n  min_speedup: {value}\n")


# ---------------------------------------------------------------------------------- third-party passes


@pytest.fixture
def registry():
    """The pass registry, restored to its previous contents after the test."""
    from compressor.passes import available_passes
    from compressor.passes.base import _REGISTRY

    available_passes()  # load the built-ins first, so the snapshot holds them
    before = dict(_REGISTRY)
    try:
        yield _REGISTRY
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(before)


def _make_pass(name: str, config: type[BaseModel]):
    from compressor.passes import Pass, PassResult

    class ThirdParty(Pass):
        summary = "Does nothing, for tests."

        def apply(self, model, ctx):  # pragma: no cover - never run here
            return PassResult(touched=[])

    ThirdParty.name = name
    ThirdParty.Config = config
    return ThirdParty


def test_third_party_pass_registration(registry):
    from compressor.docs import pass_table, recipe_reference
    from compressor.passes import PassConfig, available_passes, get_pass, register_pass

    class PruneConfig(PassConfig):
        """Settings of the test pass."""

        amount: float = Field(0.5, ge=0, le=1, description="Fraction of weights to zero.")
        scope: str = Field("global", description="Where to rank weights.")

    cls = _make_pass("tp_prune", PruneConfig)
    assert register_pass(cls) is cls
    assert register_pass(cls) is cls  # registering the same class again is harmless
    assert get_pass("tp_prune") is cls
    assert "tp_prune" in available_passes() and "cast" in available_passes()
    with pytest.raises(KeyError, match="did you mean 'tp_prune'"):
        get_pass("tp_prun")

    recipe = parse_recipe("name: x\nmodel: {source: zoo, name: digits-mlp}\npasses:\n"
                          "  - tp_prune: {amount: 0.25}\n  - cast: {}\n")
    assert [s.name for s in recipe.steps] == ["tp_prune", "cast"]
    assert recipe.steps[0].config == PruneConfig(amount=0.25)
    with pytest.raises(RecipeError) as info:
        parse_recipe("name: x\nmodel: {source: zoo, name: digits-mlp}\npasses:\n  - tp_prune: {amont: 2}\n")
    (problem,) = info.value.problems
    assert (problem.line, problem.path) == (4, "passes[0].tp_prune.amont")
    assert "did you mean 'amount'?" in problem.hint

    assert "tp_prune: Does nothing, for tests." in pass_table()
    assert "amount (float, default 0.5)" in pass_table()
    assert "#### pass `tp_prune`" in recipe_reference()


def test_third_party_pass_registration_is_checked(registry):
    from compressor.passes import PassConfig, register_pass

    class Undescribed(PassConfig):
        amount: float = 0.5
        scope: str = Field("global", description="Where.")

    with pytest.raises(TypeError, match=r"Config fields need a description: amount"):
        register_pass(_make_pass("tp_undescribed", Undescribed))

    class Lenient(BaseModel):
        amount: float = Field(0.5, description="Fraction.")

    with pytest.raises(TypeError, match=r"Config must forbid extra keys; subclass PassConfig"):
        register_pass(_make_pass("tp_lenient", Lenient))

    class Reopened(PassConfig):
        model_config = ConfigDict(extra="allow", frozen=True)
        amount: float = Field(0.5, description="Fraction.")

    with pytest.raises(TypeError, match=r"must forbid extra keys"):
        register_pass(_make_pass("tp_reopened", Reopened))

    class Fine(PassConfig):
        amount: float = Field(0.5, description="Fraction.")

    with pytest.raises(TypeError, match=r"set `name` to the pass's recipe key"):
        register_pass(_make_pass("not an identifier", Fine))
    with pytest.raises(TypeError, match=r"set `Config` to a pydantic model"):
        register_pass(_make_pass("tp_noconfig", dict))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"two passes are named 'cast'"):
        register_pass(_make_pass("cast", Fine))

    assert not [n for n in registry if n.startswith("tp_") or n == "not an identifier"]
    assert registry["cast"].__module__ == "compressor.passes.cast"


@pytest.mark.parametrize("passes", [
    ["quantize: {mode: weight-only}", "cast: {dtype: float16}"],
    ["share: {bits: 4}", "prune: {sparsity: 0.5}"],
    ["cast: {dtype: float16}", "prune: {sparsity: 0.5}", "quantize: {mode: weight-only}"],
    ["cast: {dtype: float16}", "recover: {steps: 2}", "prune: {sparsity: 0.5}"],
    ["share: {bits: 4}", "recover: {steps: 2}", "prune: {sparsity: 0.5}"],
])
def test_a_pass_order_hint_never_suggests_an_order_that_is_refused_too(passes):
    """The hint either names an order that validates, or says the pair does not combine, or names the one move."""
    from compressor.recipe import parse_recipe

    head = "name: x\nmodel: {source: zoo, name: digits-mlp}\npasses:\n"
    with pytest.raises(RecipeError) as err:
        parse_recipe(head + "".join(f"  - {p}\n" for p in passes))
    hint = str(err.value).splitlines()[-1].strip()
    if hint.startswith("an order that works: "):
        names = hint.removeprefix("an order that works: ").split(" -> ")
        by_name = {p.split(":")[0]: p for p in passes}
        parse_recipe(head + "".join(f"  - {by_name[n]}\n" for n in names))  # raises if the hint was wrong
    else:
        assert "do not combine in either order" in hint or hint.startswith("put "), hint
