"""`compress --help` and `import compressor` stay fast: no torch, transformers, onnxruntime or rich at import,
and so no GPU context. Each module imports its heavy libraries inside the functions that need them."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def _heavy_after(code: str) -> str:
    probe = code + "\nheavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'rich') if m in sys.modules]\n" \
                   "print('HEAVY:' + ','.join(heavy))\n"
    out = subprocess.run([sys.executable, "-c", "import sys\n" + probe], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    return out.rsplit("HEAVY:", 1)[1].strip()


def test_import_is_light_and_starts_no_gpu_context():
    heavy = _heavy_after("import compressor, compressor.cli, compressor.recipe, compressor.sources")
    assert heavy == "", f"importing compressor pulled in {heavy}"


def test_compress_help_and_validate_need_no_torch():
    heavy = _heavy_after("from compressor.cli import cli\n"
                         "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
                         "from compressor.recipe import load_recipe\n"
                         f"load_recipe({str(ROOT / 'recipes' / 'minilm-int8-onnx.yaml')!r})")
    assert heavy == "", f"`compress --help` and recipe validation pulled in {heavy}"


def test_transformers_comes_without_scikit_learn_and_scipy_which_stay_importable():
    # transformers imports both whenever installed, for generation tuning and detection losses compressor never
    # runs; SciPy only where compressor owns the process (the `compress` command)
    code = ("import sys\nimport compressor.process\ncompressor.process.claim()\n"
            "from compressor.sources.hf import import_transformers\n"
            "transformers = import_transformers()\ntransformers.LlamaForCausalLM, transformers.AutoModel\n"
            "print('LOADED:' + ','.join(m for m in ('sklearn', 'scipy') if m in sys.modules))\n"
            "import scipy.optimize, sklearn.datasets\nprint('IMPORTABLE')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "LOADED:\n" in out and out.rstrip().endswith("IMPORTABLE"), out


def test_a_program_that_imports_compressor_keeps_transformers_scipy_paths():
    code = ("from compressor.sources.hf import import_transformers\n"
            "print('SCIPY:', import_transformers().utils.is_scipy_available())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "SCIPY: True" in out, out
