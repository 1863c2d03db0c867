"""The MLP heads on CLIP embeddings (filters/heads.py) in LAION's layout: Linear modules at
the checkpoint's indices, the activation (NSFW head) or nothing (aesthetic v2) between
them and never after the last one."""

import pytest
import torch
from torch import nn

from mmloom.errors import UserError
from mmloom.filters.heads import MLPHead, load_head, save_head


def chain(head: MLPHead, x: torch.Tensor, relu: bool) -> torch.Tensor:
    lins = [m for m in head.layers if isinstance(m, nn.Linear)]
    for i, m in enumerate(lins):
        x = x @ m.weight.T + m.bias
        if relu and i < len(lins) - 1:
            x = torch.relu(x)
    return x


@pytest.mark.parametrize("activation,between", [("relu", nn.ReLU), ("none", nn.Identity)])
def test_saved_head_is_linear_layers_with_the_activation_between(tmp_path, activation, between):
    path = str(tmp_path / "head.pt")
    save_head(path, [8, 6, 4, 1], activation)
    head, resolved = load_head(path, "head", ("head.pt",), activation)
    assert resolved == path
    assert [type(m) for m in head.layers] == [nn.Linear, between, nn.Linear, between, nn.Linear]
    assert (head.in_dim, head.out_dim) == (8, 1)
    assert [tuple(m.weight.shape) for m in head.layers if isinstance(m, nn.Linear)] == [(6, 8), (4, 6), (1, 4)]
    x = torch.randn(64, 8)
    with torch.no_grad():
        out = head(x)
        assert torch.allclose(out, chain(head, x, activation == "relu"), atol=1e-6)
        assert not torch.allclose(out, chain(head, x, activation != "relu"), atol=1e-6)  # the activation matters


def test_relu_head_output_is_not_clamped():
    """No activation after the last Linear: a probability head's logit can be negative."""
    head = MLPHead({0: (4, 3), 2: (1, 4)}, "relu")
    with torch.no_grad():
        head.layers[2].weight.zero_()
        head.layers[2].bias.fill_(-5.0)
        assert (head(torch.zeros(2, 3)) == -5.0).all()


def test_laion_aesthetic_layout_loads_at_its_indices():
    """LAION's aesthetic predictor v2: Linear at 0, 2, 4, 6, 7 (dropouts between, no activation)."""
    sd = {}
    for i, (o, n) in {0: (16, 8), 2: (8, 16), 4: (4, 8), 6: (2, 4), 7: (1, 2)}.items():
        sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"] = torch.randn(o, n), torch.randn(o)
    head = MLPHead.from_state_dict(sd, "none", "aesthetic.pth")
    assert [type(m) for m in head.layers] == [nn.Linear, nn.Identity, nn.Linear, nn.Identity, nn.Linear, nn.Identity, nn.Linear, nn.Linear]
    assert (head.in_dim, head.out_dim) == (8, 1)
    assert torch.equal(head.layers[7].weight, sd["layers.7.weight"])


def test_a_checkpoint_without_layers_names_the_file_and_its_keys():
    with pytest.raises(UserError, match=r"nsfw\.pt: not an MLP head checkpoint .*'fc\.weight'"):
        MLPHead.from_state_dict({"fc.weight": torch.zeros(1, 2)}, "relu", "nsfw.pt")


def test_aesthetic_head_saved_in_laions_exact_shapes(tmp_path):
    """save_aesthetic_head: LAION's aesthetic predictor v2, 768-1024-128-64-16-1, Linear at 0, 2, 4, 6, 7."""
    from mmloom.filters.aesthetic import save_aesthetic_head

    path = str(tmp_path / "aesthetic.pth")
    save_aesthetic_head(path)
    sd = torch.load(path, weights_only=True)
    shapes = {k: tuple(v.shape) for k, v in sd.items() if k.endswith("weight")}
    assert shapes == {"layers.0.weight": (1024, 768), "layers.2.weight": (128, 1024), "layers.4.weight": (64, 128),
                      "layers.6.weight": (16, 64), "layers.7.weight": (1, 16)}


def test_aesthetic_scores_are_clipped_to_one_to_ten(tmp_path):
    """The predictor's output is a rating on LAION's 1-10 scale: below 1 reads 1, above 10 reads 10, between unchanged."""
    from mmloom.filters.aesthetic import AestheticScorer, save_aesthetic_head

    path = str(tmp_path / "aesthetic.pth")
    save_aesthetic_head(path, in_dim=4)
    a = AestheticScorer(path, "clip")
    last = a.head.layers[7]
    with torch.no_grad():
        for i, m in enumerate(a.head.layers):
            if isinstance(m, nn.Linear) and i != 7:
                m.weight.copy_(torch.eye(*m.weight.shape))
                m.bias.zero_()
        last.weight.zero_()
        last.weight[0, 0] = 1.0
        last.bias.zero_()
    emb = torch.tensor([[-3.0, 0, 0, 0], [0.5, 0, 0, 0], [1.0, 0, 0, 0], [4.25, 0, 0, 0], [10.0, 0, 0, 0], [12.0, 0, 0, 0]])
    assert a(None, emb) == [1.0, 1.0, 1.0, 4.25, 10.0, 10.0]
