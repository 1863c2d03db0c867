"""The training input's prefetch thread (train/data.py `Ahead`): with num_workers 0 a
background thread makes the next batches while the step runs, the same batches in the
same order as in turn, and its errors reach the training loop."""

import time

import pytest

from test_train import shards  # noqa: F401  (the fixture: two final/ shards in the build format)


def batches(shards, prefetch: int, n: int = 4):  # noqa: F811
    from mmloom.train.config import DataConfig, PromptConfig
    from mmloom.train.data import Ahead, make_loader
    from mmloom.train.prompts import PromptBuilder

    cfg = DataConfig.model_validate({"shards": shards, "resolution": 64, "shuffle_buffer": 8, "prefetch": prefetch})
    loader, _ds = make_loader(cfg, PromptBuilder(PromptConfig.model_validate({"crop_size": 64})), 2, 0)
    assert isinstance(loader, Ahead) == (prefetch > 0)
    it = iter(loader)
    out = [next(it)]
    if prefetch:  # the thread fills its queue while nobody asks
        end = time.monotonic() + 120
        while it.q.qsize() < prefetch and time.monotonic() < end:
            time.sleep(0.01)
        assert it.q.qsize() == prefetch
    out += [next(it) for _ in range(n - 1)]
    return out


def test_prefetch_thread_gives_the_batches_made_in_turn(shards):  # noqa: F811
    ahead, in_turn = batches(shards, 2), batches(shards, 0)
    assert [b["keys"] for b in ahead] == [b["keys"] for b in in_turn]
    assert all((a["pixels"] == b["pixels"]).all() for a, b in zip(ahead, in_turn))
    assert [b["last_index"] for b in ahead] == [b["last_index"] for b in in_turn]


def test_an_error_in_the_prefetch_thread_is_raised_by_next():
    from mmloom.train.data import Ahead

    def source():
        yield 1
        raise ValueError("shard unreadable")

    it = iter(Ahead(source(), 2))
    assert next(it) == 1
    with pytest.raises(ValueError, match="shard unreadable"):
        next(it)
    assert list(Ahead([1, 2, 3], 1)) == [1, 2, 3]


def test_main_image_decoded_at_reduced_scale_when_training_shrinks_it():
    """A JPEG is decoded at the smallest DCT scale that keeps both sides at least the
    training resolution; other formats, and no ``least``, decode whole."""
    import io

    from PIL import Image

    from mmloom.imageguard import open_image
    from mmloom.train.data import decode_member

    im = Image.new("RGB", (512, 384), "red")
    jpg, png = io.BytesIO(), io.BytesIO()
    im.save(jpg, "JPEG")
    im.save(png, "PNG")
    assert open_image(jpg.getvalue(), 10**8).size == (512, 384)
    assert decode_member("jpg", jpg.getvalue(), 10**8, least=64).size == (128, 96)
    assert decode_member("jpg", jpg.getvalue(), 10**8, least=150).size == (256, 192)
    assert decode_member("jpg", jpg.getvalue(), 10**8, least=200).size == (512, 384)  # 192 < 200
    assert decode_member("png", png.getvalue(), 10**8, least=64).size == (512, 384)
