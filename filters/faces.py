"""Face count and boxes from detectors that ship their weights: OpenCV's Haar cascade or
nudenet's face classes. MUMU section 4 keeps realistic images with 0 or 1 people; the face
count is the people proxy (a face detector, not a person detector: backs are not counted).
Both are scorers of ``face_count`` and ``face_boxes`` (`filters.base.Scorer`)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

COLUMNS = {"face_count": pa.int32(), "face_boxes": pa.list_(pa.list_(pa.int32()))}


def _columns(boxes: list[list[list[int]]]) -> dict[str, list]:
    return {"face_count": [len(b) for b in boxes], "face_boxes": boxes}


class OpenCvFaces:
    columns = COLUMNS
    needs_clip = None

    def __init__(self, min_size: int = 24):
        import cv2

        if not hasattr(cv2, "CascadeClassifier"):  # OpenCV 5 moved the Haar cascades out of the main package
            raise RuntimeError(f"faces.backend opencv: OpenCV {getattr(cv2, '__version__', '?')} has no CascadeClassifier "
                               "(OpenCV 5 dropped it); install opencv-python-headless<5 as mmloom's lock does, or set faces.backend: none")
        path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
        self.cascade = cv2.CascadeClassifier(path)
        self.cv2, self.min_size = cv2, min_size
        self.version = f"opencv {cv2.__version__} haarcascade_frontalface_default"
        self.meta = {c: {"model": "faces/opencv", "version": self.version} for c in COLUMNS}

    def prepare(self, batch) -> None:
        batch.ready(("grey",), lambda: [np.asarray(im.convert("L")) for im in batch.images])

    def score(self, batch) -> dict[str, list]:
        return _columns(self(batch.ready(("grey",), lambda: [np.asarray(im.convert("L")) for im in batch.images])))

    def __call__(self, images, detections=None) -> list[list[list[int]]]:
        """Of PIL images or of their grey levels (2-D arrays)."""
        out = []
        for im in images:
            gray = im if isinstance(im, np.ndarray) else np.asarray(im.convert("L"))
            found = self.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(self.min_size, self.min_size))
            out.append([[int(x), int(y), int(x + w), int(y + h)] for x, y, w, h in found])
        return out


class NudeNetFaces:
    columns = COLUMNS
    needs_clip = None

    def __init__(self, nudenet, min_score: float = 0.4):
        self.nn, self.min_score = nudenet, min_score
        self.version = f"{nudenet.version} FACE_* classes (score >= {min_score})"
        self.meta = {c: {"model": "faces/nudenet", "version": self.version} for c in COLUMNS}

    def score(self, batch) -> dict[str, list]:
        return _columns(self(batch.images, batch.detections(self.nn)))

    def __call__(self, images, detections=None) -> list[list[list[int]]]:
        from .nsfw import NUDENET_FACES

        dets = detections if detections is not None else self.nn.detect(images)
        return [[[d["box"][0], d["box"][1], d["box"][0] + d["box"][2], d["box"][1] + d["box"][3]]
                 for d in ds if d["class"] in NUDENET_FACES and d["score"] >= self.min_score] for ds in dets]

