"""Model files are hostile too: a grounding model's settings file or checkpoint must not
run code when mmloom reads it."""

import pytest

from mmloom.errors import UserError

WORDS = "a man and his dog on the grass".split()


def test_original_package_settings_are_read_never_run(tmp_path):
    """The package's settings are Python files; a settings file that would run code is
    refused and nothing runs (a model directory must not choose code)."""
    from mmloom.filters.grounding import read_literal_settings

    marker = tmp_path / "pwned"
    for body in (f"import os\nos.system('touch {marker}')\n", f"x = open('{marker}', 'w')\n",
                 f"x = [1, __import__('os').system('touch {marker}')]\n"):
        (tmp_path / "evil.py").write_text("hidden_dim = 256\n" + body)
        with pytest.raises(UserError, match="nothing is executed"):
            read_literal_settings(str(tmp_path / "evil.py"))
        assert not marker.exists()
    assert read_literal_settings("SwinT_OGC")["backbone"] == "swin_T_224_1k"
    evil = tmp_path / "evil.py"
    evil.write_text('"""a docstring is skipped"""\nhidden_dim = 256\nnames = ["a", "b"]\n')
    assert read_literal_settings(str(evil)) == {"hidden_dim": 256, "names": ["a", "b"]}
    for body, why in ((b"a = b = 1\n", "only NAME = literal lines"), (b"x = (\n", "not a settings file"),
                      (b"x = '\xff\xfe'\n", "not a settings file")):  # chained, cut short, not UTF-8
        evil.write_bytes(body)
        with pytest.raises(UserError, match=why):
            read_literal_settings(str(evil))
    with pytest.raises(UserError, match="neither SwinT_OGC nor SwinB_cfg nor a file"):
        read_literal_settings("SwinX")


def test_original_package_checkpoint_is_read_without_pickle(tmp_path):
    """A .pth that carries a pickled object (code on load) is refused, and it does not run."""
    import pickle

    from mmloom.curate.config import OriginalDinoConfig
    from mmloom.filters.grounding import OriginalGroundingDino
    from mmloom.testkit.tiny_scoring import make_original_grounding_dino

    section = make_original_grounding_dino(str(tmp_path / "m"), WORDS)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    import torch

    torch.save({"model": {"x": torch.zeros(1)}, "args": Evil()}, tmp_path / "evil.pth", pickle_module=pickle)
    with pytest.raises(Exception, match="[Ww]eights only|weights_only|Unsupported"):
        OriginalGroundingDino(OriginalDinoConfig.model_validate({**section, "weights": str(tmp_path / "evil.pth")}), 0.0, 0.0)
    assert not marker.exists()
