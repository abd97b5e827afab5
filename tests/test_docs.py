"""The README's recipe reference is generated from the schema; it must be current."""

from __future__ import annotations

from conftest import ROOT

from compressor.docs import README_END, README_START, recipe_reference


def test_readme_recipe_reference_is_current():
    text = (ROOT / "README.md").read_text()
    assert README_START in text and README_END in text
    generated = text.split(README_START, 1)[1].split(README_END, 1)[0]
    assert generated.strip() == recipe_reference().strip(), "run `python -m compressor.docs` to refresh README.md"


def test_readme_documents_exit_codes_and_layout():
    text = (ROOT / "README.md").read_text()
    for needle in ("| 0 |", "| 1 |", "| 2 |", "| 3 |", "manifest.json", "model.safetensors.index.json", "make test"):
        assert needle in text
