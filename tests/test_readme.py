"""README is the reference for every config knob: keep it in step with the code."""

from pathlib import Path

from mmloom.curate.config import PipelineConfig, describe


def test_readme_documents_every_config_key():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [key for key, _d, _desc in describe(PipelineConfig) if f"`{key}`" not in readme]
    assert not missing, f"README's configuration reference lacks {missing}"


def test_every_config_field_has_a_description():
    assert [k for k, _d, desc in describe(PipelineConfig) if not desc] == []
