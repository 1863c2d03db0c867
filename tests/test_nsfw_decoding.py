"""The NSFW backends' decoding: the batched nudenet path keeps nudenet's own decisions
(its ``_postprocess`` on the whole output is the reference), and the CLIP-MLP head reads a
one-logit head through a sigmoid and a two-class head as the softmax of class 1."""

import numpy as np
import pytest
import torch

from mmloom.filters.nsfw import ClipMlpNsfw, NudeNet


class Session:
    """Stands in for the ONNX session only: the arrays are the detector's output layout
    [B, 4 + classes, anchors], so that the decoding under test meets a chosen case (one
    anchor over the cut) that no real picture can be picked to give."""

    def __init__(self, out):
        self.out = out

    def run(self, _names, _feeds):
        return [self.out]


def nudenet_with(out: np.ndarray) -> NudeNet:
    from types import SimpleNamespace

    nn_ = NudeNet.__new__(NudeNet)
    nn_.detector = SimpleNamespace(onnx_session=Session(out), input_name="images", input_width=320, input_height=320)
    return nn_


def anchors(scores: list[list[float]], classes: int = 18) -> np.ndarray:
    """One image's output: anchor i at (40 + 30 i, 60) px, 20 x 30, with class scores ``scores[i]``."""
    o = np.zeros((4 + classes, len(scores)), np.float32)
    for i, s in enumerate(scores):
        o[:4, i] = [40 + 30 * i, 60, 20, 30]
        o[4:4 + len(s), i] = s
    return o


@pytest.mark.parametrize("scores", [
    [[0.9, 0.0], [0.1, 0.0], [0.0, 0.19]],          # exactly one anchor over nudenet's 0.2 cut
    [[0.9, 0.0], [0.0, 0.6], [0.05, 0.0]],          # two, of different classes
    [[0.1, 0.0], [0.0, 0.19]],                      # none
])
def test_batched_decoding_matches_nudenets_own(scores):
    from nudenet.nudenet import _postprocess

    one = anchors(scores)
    other = anchors([[0.0, 0.0, 0.7]])
    other = np.concatenate([other, np.zeros((other.shape[0], one.shape[1] - 1), np.float32)], axis=1)
    nn_ = nudenet_with(np.stack([one, other]))
    geometry = [(np.zeros((1, 3, 320, 320), np.float32), 1.5, 1.5, 0, 80, 480, 400)] * 2
    got = nn_.detect_inputs(geometry)
    assert len(got) == 2  # an image without detections does not end the batch
    for out, want_from in zip(got, (one, other)):
        want = _postprocess([want_from[None]], 0, 80, 1.5, 1.5, 480, 400, 320, 320)
        assert out == want
    assert len(got[0]) == sum(max(s) >= 0.2 for s in scores)


def head_file(tmp_path, outputs: int) -> str:
    from mmloom.filters.heads import MLPHead

    head = MLPHead({0: (outputs, 2)}, "relu")
    with torch.no_grad():
        head.layers[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]])[:outputs])
        head.layers[0].bias.zero_()
    path = str(tmp_path / f"nsfw-{outputs}.pt")
    torch.save(head.state_dict(), path)
    return path


def test_clip_mlp_one_logit_is_a_sigmoid_and_two_classes_a_softmax(tmp_path):
    emb = torch.tensor([[2.0, -1.0], [-0.5, 3.0]])
    one = ClipMlpNsfw(head_file(tmp_path, 1), "clip")(None, emb)
    assert one == pytest.approx(torch.sigmoid(emb[:, 0]).tolist())
    two = ClipMlpNsfw(head_file(tmp_path, 2), "clip")(None, emb)
    assert two == pytest.approx(torch.softmax(emb, dim=-1)[:, 1].tolist())  # class 1 is the NSFW class
    assert two[0] < 0.5 < two[1]
