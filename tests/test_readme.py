"""README is the reference for every config knob: keep it in step with the code."""

from pathlib import Path

from mmloom.curate.config import PipelineConfig, describe
from mmloom.train.config import TrainConfig
from mmloom.train.families.mumu import Config as MumuConfig


def test_readme_documents_every_config_key():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    keys = [k for k, _d, _ in describe(PipelineConfig) + describe(TrainConfig) + describe(MumuConfig, "model.") if k != "model"]
    missing = [key for key in keys if f"`{key}`" not in readme]
    assert not missing, f"README's configuration reference lacks {missing}"


def test_every_config_field_has_a_description():
    rows = describe(PipelineConfig) + describe(TrainConfig) + describe(MumuConfig, "model.")
    assert [k for k, _d, desc in rows if not desc] == []
