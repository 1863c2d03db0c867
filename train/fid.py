"""FID and KID of generated pictures against real ones, for `mmloom eval` on real data.

torchmetrics computes both (``FrechetInceptionDistance``, ``KernelInceptionDistance``)
on torch-fidelity's port of the 2015 TensorFlow Inception, the network every published
FID uses. torchmetrics fetches its weights on first use; mmloom never downloads, so the
weights come from the user (``mmloom eval --inception FILE``) or from torch hub's cache,
where an earlier download by torchmetrics or torch-fidelity left them. Without them eval
says so instead of printing a number.

The weights file is read once, by mmloom, with ``torch.load(weights_only=True)``
(torch-fidelity's own loader unpickles whatever the file holds), its SHA-256 checked
against the prefix in its name where the name carries one (torch hub's ``NAME-HASH.pth``
convention, as the standard file's ``6726825d``), and the verified tensors are handed to
torch-fidelity through a private copy. A file with another hash still computes, and the
result says that it is not the standard network: its FID is not comparable with
published figures.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import warnings

import torch

from mmloom.errors import UserError

STANDARD_NAME = "weights-inception-2015-12-05-6726825d.pth"
STANDARD_SHA256_PREFIX = "6726825d"


def find_inception(path: str | None = None) -> str | None:
    """The Inception weights to use: ``path`` if given (must exist), else the standard
    file in torch hub's cache if a download put it there, else None."""
    if path:
        if not os.path.isfile(path):
            raise UserError(f"--inception {path}: no such file")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", STANDARD_NAME)
    return cached if os.path.isfile(cached) else None


def load_inception(path: str):
    """torch-fidelity's InceptionV3 feature extractor (2048-d pool features) with the
    weights in ``path``, verified as the module docstring says. Returns (module, sha256)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    m = re.search(r"-([0-9a-f]{8,64})\.pth?$", os.path.basename(path))
    if m and not digest.startswith(m.group(1)):
        raise UserError(f"{path}: SHA-256 {digest[:16]}... does not match the {m.group(1)} in its name (corrupt or not that file)")
    try:
        with warnings.catch_warnings():  # the restricted unpickler's note on pickle protocols
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any refusal of the restricted unpickler
        raise UserError(f"{path}: not a plain tensor state dict (refused by torch.load(weights_only=True): "
                        f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state dict of tensors (torch-fidelity's InceptionV3)")
    with tempfile.TemporaryDirectory(prefix="mmloom-inception-") as d:
        own = os.path.join(d, "inception.pth")
        torch.save(state, own)  # tensors only: what torch-fidelity unpickles is what mmloom verified
        try:
            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=own)
        except RuntimeError as e:  # missing / unexpected keys, wrong shapes
            raise UserError(f"{path}: not torch-fidelity's InceptionV3 weights ({str(e).splitlines()[0][:200]})") from None
    return net, digest


def _uint8(images) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).contiguous()


def fid_kid(real: list, fakes: dict[str, list], inception: str, batch_size: int = 32) -> dict:
    """FID and KID (mean and std over subsets) of each condition's pictures in ``fakes``
    against the ``real`` pictures, all PIL images (torchmetrics resizes them to 299 px).
    KID's subsets hold min(1000, n) pictures (n: the fewest of any set), 100 of them."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    net, digest = load_inception(inception)
    out: dict = {"inception": os.path.abspath(inception), "sha256": digest,
                 "standard": digest.startswith(STANDARD_SHA256_PREFIX), "real": len(real)}
    x_real = _uint8(real)
    k = min([1000, len(x_real), *(len(v) for v in fakes.values())])
    with warnings.catch_warnings():  # KID's note that it keeps every feature in memory
        warnings.simplefilter("ignore")
        # reset_real_features=False: the real pictures' features are computed once, and reset() between conditions keeps them
        fid = FrechetInceptionDistance(feature=net, reset_real_features=False)
        kid = KernelInceptionDistance(feature=net, subsets=100, subset_size=k, reset_real_features=False)
        for metric in (fid, kid):
            for i in range(0, len(x_real), batch_size):
                metric.update(x_real[i:i + batch_size], real=True)
        for name, images in fakes.items():
            x_fake = _uint8(images)
            for metric in (fid, kid):
                for i in range(0, len(x_fake), batch_size):
                    metric.update(x_fake[i:i + batch_size], real=False)
            kid_mean, kid_std = kid.compute()
            out[name] = {"fid": round(float(fid.compute()), 4), "kid": round(float(kid_mean), 6),
                         "kid_std": round(float(kid_std), 6), "n": len(images)}
            fid.reset()
            kid.reset()
    return out


def describe(result: dict) -> str:
    conds = [k for k, v in result.items() if isinstance(v, dict) and "fid" in v]
    which = "the standard FID Inception" if result["standard"] else \
        f"Inception weights {result['sha256'][:8]}, NOT the standard 6726825d: not comparable with published FIDs"
    return (f"FID / KID against the {result['real']} held-out pictures ({which}): "
            + ", ".join(f"{k} {result[k]['fid']:.2f} / {result[k]['kid']:.4f}" for k in conds))


def fid_note() -> str:
    return ("FID/KID not computed: no Inception weights (mmloom never downloads them): give --inception FILE "
            f"(torch-fidelity's {STANDARD_NAME}), or place it in torch hub's cache ({os.path.join(torch.hub.get_dir(), 'checkpoints')})")
