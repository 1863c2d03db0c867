"""FLOPs of one training step, counted once at start-up, for MFU.

torch's FlopCounterMode counts the matmul/conv FLOPs of a real forward and backward pass
on one batch (run under a forked RNG and with gradients cleared afterwards, so training
is unaffected). MFU = FLOPs per sample x samples/s / peak FLOP/s of the devices.

Grouped-query attention (Idefics2's Mistral: 8 key/value heads for 32 query heads) reaches
the fused SDPA kernels on a GPU with fewer key/value heads than query heads, and torch's
formulas before 2.15 assert equal heads: on torch 2.11 (an H200, 2026-11-29) that stopped
the MUMU step at its first batch. ``flop_counter`` gives those kernels formulas that widen
the key/value shapes to the query's heads, which is what the kernels compute; a count that
still fails is reported and the run goes on without MFU.
"""

from __future__ import annotations

import torch

# dense bf16 peak FLOP/s per device (vendor figures)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for k, v in PEAK_TFLOPS.items():
            if k in name:
                return v * 1e12
    return None


def _widen(q: tuple, kv: tuple) -> tuple:
    """A key/value shape [B, H_kv, S, D] with the query's heads, [B, H_q, S, D]."""
    return (kv[0], q[1], *kv[2:]) if len(q) == 4 and len(kv) == 4 else kv


def _sdpa_gqa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, _widen(query_shape, key_shape), _widen(query_shape, value_shape))


def _sdpa_gqa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    q = query_shape
    return sdpa_backward_flop_count(grad_out_shape, q, _widen(q, key_shape), _widen(q, value_shape))


def flop_counter():
    """torch's FlopCounterMode with grouped-query-attention-aware SDPA formulas (module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    names = ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention")
    mapping = {}
    for name in names:
        for op, formula in ((name, _sdpa_gqa), (name + "_backward", _sdpa_gqa_backward)):
            if hasattr(aten, op):  # the kernels a torch version has
                mapping[getattr(aten, op)] = formula
    return FlopCounterMode(display=False, custom_mapping=mapping)


def flops_per_sample(model: torch.nn.Module, batch: dict, autocast=None) -> float | None:
    """FLOPs of one forward and backward per sample of ``batch``; None (with a warning)
    when they cannot be counted: MFU is a measurement, not a reason to stop training."""
    import contextlib
    import warnings

    n = len(batch["prompts"])
    try:
        with torch.random.fork_rng(devices=[]), flop_counter() as counter:
            with autocast or contextlib.nullcontext():
                loss = model(batch)["loss"]
            loss.backward()
    except Exception as e:  # noqa: BLE001 - any failure of the count, reported once
        warnings.warn(f"FLOPs per sample could not be counted, so no MFU is reported ({type(e).__name__}: {e})", stacklevel=2)
        return None
    finally:
        model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / max(n, 1)
