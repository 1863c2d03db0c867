"""FLOPs of one training step, counted once at start-up, for MFU.

torch's FlopCounterMode counts the matmul/conv FLOPs of a real forward and backward pass
on one batch (run under a forked RNG and with gradients cleared afterwards, so training
is unaffected). MFU = FLOPs per sample x samples/s / peak FLOP/s of the devices.
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


def flops_per_sample(model: torch.nn.Module, batch: dict) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    n = len(batch["prompts"])
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
        loss = model(batch)["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / max(n, 1)
