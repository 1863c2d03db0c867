"""The Python API (mmloom/api.py): keyword arguments are the stage's config keys,
validated like the YAML; the README example runs in tests/test_snippets.py."""

import pytest

import mmloom.api as mm
from mmloom.errors import UserError


def test_keyword_arguments_are_config_keys_validated_at_the_door(tmp_path):
    root = str(tmp_path / "ds")
    cfg = mm.config(root, section="select", min_clip_score=0.28, max_people=None, semantic_dedup_threshold=0.9)
    assert (cfg.select.min_clip_score, cfg.select.max_people, cfg.select.semantic_dedup_threshold) == (0.28, None, 0.9)
    assert mm.config(root, section="score", clip={"model": "x/y"}).score.clip.model == "x/y"
    assert mm.config(root, section="score", clip={"model": "x/y"}).score.clip.store_embeddings is True  # the rest kept
    with pytest.raises(UserError, match="min_clip_scor"):
        mm.config(root, section="select", min_clip_scor=0.3)
    with pytest.raises(UserError, match="semantic_dedup_threshold"):
        mm.config(root, section="select", semantic_dedup_threshold=1.5)


def test_every_stage_and_command_has_its_function():
    from mmloom.curate.stages import NAMES

    assert set(NAMES) | {"run", "browse", "stats", "query"} <= set(mm.__all__)
