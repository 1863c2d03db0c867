"""FLOP counting for MFU (train/flops.py): grouped-query attention on the fused SDPA
kernels, and a count that fails does not stop training."""

import pytest
import torch
import torch.utils.flop_counter as F

from mmloom.train.flops import _sdpa_gqa_backward, flop_counter, flops_per_sample

aten = torch.ops.aten


def strict_count(query_shape, key_shape, value_shape):
    """torch's sdpa_flop_count before 2.15: equal heads or an AssertionError (torch 2.11
    raised this on an H200 in the MUMU step, whose Idefics2 has 8 key/value heads for 32)."""
    b, h, s_q, d = query_shape
    b2, h2, s_k, d2 = key_shape
    b3, h3, s3, dv = value_shape
    assert b == b2 == b3 and h == h2 == h3 and d == d2 and s_k == s3, "sdpa_flop_count: query/key/value shapes are incompatible"
    return F.bmm_flop((b * h, s_q, d), (b * h, d, s_k)) + F.bmm_flop((b * h, s_q, s_k), (b * h, s_k, dv))


def meta(*shape):
    return torch.empty(*shape, device="meta", dtype=torch.bfloat16)


@pytest.mark.parametrize("op", ["_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention"])
def test_gqa_attention_counts_as_its_widened_keys(monkeypatch, op):
    monkeypatch.setattr(F, "sdpa_flop_count", strict_count)
    fn = getattr(aten, op)
    args = (None, False) if "efficient" in op else ()
    q, k = meta(2, 8, 16, 32), meta(2, 2, 16, 32)  # 4 query heads per key/value head
    with pytest.raises(AssertionError, match="incompatible"):  # the old formula: the attack on the count
        with F.FlopCounterMode(display=False):
            fn(q, k, k.clone(), *args)
    with flop_counter() as c:
        fn(q, k, k.clone(), *args)
    wide = meta(2, 8, 16, 32)
    with F.FlopCounterMode(display=False) as ref:
        fn(q, wide, wide.clone(), *args)
    assert c.get_total_flops() == ref.get_total_flops() == 2 * 2 * (2 * 8 * 16 * 16 * 32)


def test_gqa_backward_formula_widens_keys_and_values():
    q, kv, g = (2, 8, 16, 32), (2, 2, 16, 32), (2, 8, 16, 32)
    assert _sdpa_gqa_backward(g, q, kv, kv) == F.sdpa_backward_flop_count(g, q, q, q) > 0
    assert _sdpa_gqa_backward(g, q, q, q) == F.sdpa_backward_flop_count(g, q, q, q)


def test_counts_a_model_forward_and_backward_per_sample():
    lin = torch.nn.Linear(8, 4, bias=False)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, batch):
            return {"loss": self.lin(batch["x"]).sum()}

    m = M()
    n = 3
    flops = flops_per_sample(m, {"x": torch.randn(n, 8), "prompts": [None] * n})
    assert flops == 2 * (2 * 8 * 4)  # forward 2mnk per sample, backward the weight gradient (the input needs none)
    assert lin.weight.grad is None  # the count leaves no gradients behind


def test_a_count_that_fails_warns_and_returns_none():
    class Broken(torch.nn.Module):
        def forward(self, batch):
            raise RuntimeError("kernel without a formula")

    with pytest.warns(UserWarning, match="no MFU is reported.*kernel without a formula"):
        assert flops_per_sample(Broken(), {"prompts": [None]}) is None
