"""NSFW probability, three interchangeable backends behind one call:
``scorer(images, embeddings) -> list[float]`` in [0, 1], and as scorers of the ``nsfw``
column (`filters.base.Scorer`).

* ``nudenet``: nudenet's detector (ships its ONNX weights): the highest score among its
  exposed-body-part classes. Real decisions offline.
* ``clip_mlp``: an MLP head on normalized CLIP image embeddings (LAION's detector design).
* ``hf``: any Hugging Face image-classification model (labels matching ``positive_labels``),
  through `filters.hf_classifier.HfImageClassifier`.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import PROBABILITY
from .heads import load_head
from mmloom.models import fingerprint, package_version

NUDENET_EXPOSED = {
    "FEMALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED", "MALE_GENITALIA_EXPOSED",
    "BUTTOCKS_EXPOSED", "ANUS_EXPOSED",
}
NUDENET_FACES = {"FACE_FEMALE", "FACE_MALE"}


class NudeNet:
    """nudenet's detector, shared by the NSFW score and the face counter."""

    def __init__(self):
        from nudenet import NudeDetector

        self.detector = NudeDetector()
        self._share_cpus()
        self.version = f"nudenet {package_version('nudenet')} (320n.onnx)"

    def _share_cpus(self) -> None:
        """Reopen the ONNX session to use torch's CPU threads (Ray sets them to the actor's
        CPUs; onnxruntime would take every core in each actor) with idle threads sleeping
        instead of spinning, so that between its calls they leave the cores to the other
        models and to decoding. Same model file, same providers."""
        import onnxruntime as ort

        old = self.detector.onnx_session
        if not getattr(old, "_model_path", None):  # an onnxruntime that does not say: keep its session
            return
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, torch.get_num_threads())
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.detector.onnx_session = ort.InferenceSession(old._model_path, so, providers=old.get_providers())

    def detect(self, pil_images) -> list[list[dict]]:
        return self.detect_inputs(self.inputs(pil_images))

    def inputs(self, pil_images) -> list[tuple]:
        """nudenet's own letterboxing of each image (`nudenet.nudenet._read_image`, as its
        ``detect`` does it): CPU work, no model call."""
        from nudenet.nudenet import _read_image

        size = self.detector.input_width
        # nudenet converts RGBA->BGR itself, so hand it RGBA arrays
        return [_read_image(np.asarray(im.convert("RGBA")), size) for im in pil_images]

    def detect_inputs(self, prepared: list[tuple]) -> list[list[dict]]:
        """The detector on a whole batch of `inputs` in one ONNX call (as nudenet's
        ``detect_batch``), each image's output decoded by nudenet's ``_postprocess`` after
        dropping the anchors whose best class score is under its 0.2 cut (which it skips
        anyway): the detections of ``detect`` one image at a time, without a Python loop
        over every anchor."""
        from nudenet.nudenet import _postprocess

        if not prepared:
            return []
        d = self.detector
        out = d.onnx_session.run(None, {d.input_name: np.vstack([p[0] for p in prepared])})[0]  # [B, 4 + classes, anchors]
        results = []
        for j, (_blob, x_ratio, y_ratio, x_pad, y_pad, w, h) in enumerate(prepared):
            o = out[j]
            keep = o[4:].max(axis=0) >= 0.2
            if not keep.any():
                results.append([])
                continue
            o = o[:, keep]
            if o.shape[1] == 1:  # _postprocess squeezes: keep an anchor axis with a zero-score column
                o = np.concatenate([o, np.zeros_like(o)], axis=1)
            results.append(_postprocess([o[None]], x_pad, y_pad, x_ratio, y_ratio, w, h, d.input_width, d.input_height))
        return results


class NudeNetNsfw:
    columns = {"nsfw": PROBABILITY}
    needs_clip = None

    def __init__(self, nudenet: NudeNet):
        self.nn = nudenet
        self.version = nudenet.version
        self.meta = {"nsfw": {"model": "nsfw/nudenet:nudenet", "version": self.version}}

    def score(self, batch) -> dict[str, list]:
        return {"nsfw": self(batch.images, None, batch.detections(self.nn))}

    def __call__(self, images, embeddings=None, detections=None) -> list[float]:
        dets = detections if detections is not None else self.nn.detect(images)
        return [max([d["score"] for d in ds if d["class"] in NUDENET_EXPOSED], default=0.0) for ds in dets]


class ClipMlpNsfw:
    columns = {"nsfw": PROBABILITY}

    def __init__(self, ref: str, clip_ref: str):
        self.head, path = load_head(ref, "NSFW head", ("nsfw_head.pt", "model.pt", "model.pth"), "relu")
        self.needs_clip = clip_ref
        self.version = f"mlp head {fingerprint(path)} on {clip_ref}"
        self.meta = {"nsfw": {"model": f"nsfw/clip_mlp:{ref}", "version": self.version}}

    def score(self, batch) -> dict[str, list]:
        return {"nsfw": self(batch.images, batch.clip_images(self.needs_clip))}

    @torch.no_grad()
    def __call__(self, images, embeddings, detections=None) -> list[float]:
        out = self.head(embeddings)
        p = out.sigmoid()[:, 0] if out.shape[-1] == 1 else out.softmax(-1)[:, 1]
        return p.tolist()
