import pytest

from mmloom.curate.config import load_config
from mmloom.errors import UserError


def test_defaults_are_versatile_diffusion_thresholds():
    cfg = load_config(None)
    pf = cfg.ingest.prefilter
    assert (pf.min_aspect, pf.max_aspect, pf.min_area) == (0.6, 1.6667, 0.75 * 256**2)
    assert (pf.min_clip_similarity, pf.max_nsfw, pf.max_watermark) == (0.3, 0.3, 0.3)
    assert cfg.download.disallowed_header_directives == ["noai", "noimageai"]
    assert cfg.download.allow_private_addresses is False


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "pipe.yaml"
    p.write_text("ingest:\n  prefilter:\n    min_aspekt: 0.5\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "ingest.prefilter.min_aspekt: unknown key" in str(e.value)


def test_bad_value_names_key(tmp_path):
    p = tmp_path / "pipe.yaml"
    p.write_text("download:\n  timeout: soon\n  image_size: -3\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    msg = str(e.value)
    assert "download.timeout" in msg and "'soon'" in msg and "download.image_size" in msg


def test_inconsistent_values_rejected(tmp_path):
    p = tmp_path / "pipe.yaml"
    p.write_text("ingest:\n  prefilter:\n    min_aspect: 2\n    max_aspect: 1\n")
    with pytest.raises(UserError, match="min_aspect"):
        load_config(p)


def test_rule_switched_off_with_null(tmp_path):
    p = tmp_path / "pipe.yaml"
    p.write_text("ingest:\n  prefilter:\n    max_nsfw: null\n")
    assert load_config(p).ingest.prefilter.max_nsfw is None


def test_not_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("ingest: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(UserError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name, fmt", [("laion.yaml", "laion"), ("coyo.yaml", "coyo")])
def test_ready_configs_validate(name, fmt):
    from pathlib import Path

    cfg = load_config(Path(__file__).parent.parent / "configs" / name)
    assert cfg.ingest.format == fmt and cfg.build.min_crop_area == 22500 and cfg.select.max_people == 1
    assert cfg.run.stages == ["ingest", "download", "score", "select", "ground", "build"]


def test_defaults_round_trip_through_a_saved_config_unchanged(tmp_path):
    """A saved mmloom.yaml reloads to the same values and the same hash per section, so the
    first command after a demo does not redo shards (build.min_crop_area was 22500 -> 22500.0)."""
    import yaml

    from mmloom.curate.config import PipelineConfig
    from mmloom.curate.dataset import dataset_config, save_dataset_config
    from mmloom.manifests.store import config_hash
    from mmloom.train.config import TrainConfig

    cfg = PipelineConfig()
    save_dataset_config(str(tmp_path), cfg)
    again = dataset_config(str(tmp_path), None)
    for name in PipelineConfig.model_fields:
        assert getattr(again, name).model_dump() == getattr(cfg, name).model_dump(), name
        assert config_hash(getattr(again, name).model_dump()) == config_hash(getattr(cfg, name).model_dump()), name
    t = TrainConfig()
    t2 = TrainConfig.model_validate(yaml.safe_load(yaml.safe_dump(t.model_dump(mode="json"))))
    assert t2.model_dump() == t.model_dump()
