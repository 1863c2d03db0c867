"""Open-vocabulary grounding of caption phrases with Grounding DINO: the transformers
port (``ground.backend: transformers``) or IDEA-Research's own package, groundingdino-py
(``ground.backend: groundingdino``, its released checkpoints as they are). Both give the
same detections.

The prompt is the clean caption itself, so each box comes back tied to the caption
tokens it matched; token offsets turn those into a character span of the clean caption
(widened to whole words) and the phrase is that slice. Images in a batch each have
their own caption. Head boxes for person boxes come from OpenCV's face cascade (ships
its weights) or from the detector prompted with "head".
"""

from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image

from mmloom.errors import UserError
from mmloom.models import fingerprint, hf_pretrained, inference_autocast, package_version
from .scoring import resolve_device


def _word_bounds(text: str, s: int, e: int) -> tuple[int, int]:
    """``text[s:e]`` widened to whole words: a detector's span covers tokens, which can be
    parts of a word; letters, digits, apostrophes and hyphens count as the word's."""
    is_word = lambda ch: ch.isalnum() or ch in "'-"  # noqa: E731
    while s > 0 and is_word(text[s - 1]):
        s -= 1
    while e < len(text) and is_word(text[e]):
        e += 1
    return s, e


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class GroundingDino:
    def __init__(self, ref: str, box_threshold: float, text_threshold: float, device: str = "auto"):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.device = resolve_device(device)
        self.processor = hf_pretrained(AutoProcessor, ref, "grounding model")
        self.model = hf_pretrained(AutoModelForZeroShotObjectDetection, ref, "grounding model").to(self.device).eval()
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.ref = ref
        self.version = f"transformers {package_version('transformers')} {type(self.model).__name__}, weights {fingerprint(ref)}"

    @staticmethod
    def prompt_text(caption: str) -> str:
        """Grounding DINO's convention (lowercase, ending in '.') without moving offsets."""
        low = caption.lower()
        text = low if len(low) == len(caption) else caption
        return text if text.endswith(".") else text + "."

    def _inputs(self, images, texts: list[str]):
        """The model's inputs for a batch (the processor: resize, normalize, pad, tokenize):
        CPU work, page-locked when the model is on a GPU."""
        inputs = self.processor(images=images, text=texts, padding="longest", return_tensors="pt")
        if self.device.startswith("cuda"):
            inputs = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in inputs.items()}
        return inputs

    def _forward(self, texts: list[str], inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(token probabilities [B, Q, T], boxes [B, Q, 4] as normalized cx cy w h) for
        ``inputs``, what `_inputs` made of a batch's pictures and these texts (in `prepare`)."""
        inputs = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in inputs.items()}
        with inference_autocast(self.device):
            out = self.model(**inputs)
        return out.logits.float().sigmoid().cpu(), out.pred_boxes.float().cpu()

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def prepare(self, images, captions: list[str]) -> dict:
        """A batch's CPU work (prompt texts, their token offsets, the model's inputs), so
        that a worker thread can prepare batch i+1 while the model runs batch i
        (`curate.ground.GroundWorker.run`)."""
        texts = [self.prompt_text(c) for c in captions]
        offsets = [self.tokenizer(t, return_offsets_mapping=True)["offset_mapping"] for t in texts]
        return {"texts": texts, "offsets": offsets, "inputs": self._inputs(images, texts)}

    @torch.no_grad()
    def detect(self, images, captions: list[str], prepared: dict | None = None) -> list[list[dict]]:
        """Per image: boxes (pixels, x0 y0 x1 y1) with phrase, span (in the caption), score.
        ``prepared``: what `prepare` made of these images and captions."""
        prep = prepared if prepared is not None else self.prepare(images, captions)
        probs, boxes = self._forward(prep["texts"], prep["inputs"])
        results = []
        # numpy, not torch, from here: a random-weight or poorly matched detector proposes
        # hundreds of boxes per image, and a torch op per token per box made this loop the
        # stage's bottleneck (issue 16); comparisons stay in float32, as torch made them
        box_thr, text_thr = np.float32(self.box_threshold), np.float32(self.text_threshold)
        probs_np, boxes_np = probs.numpy(), boxes.numpy()
        n_tok = probs_np.shape[-1]
        for b, (im, cap, offsets) in enumerate(zip(images, captions, prep["offsets"])):
            valid = np.zeros(n_tok, dtype=bool)
            for t, (s, e) in enumerate(offsets[:n_tok]):
                valid[t] = e > s and e <= len(cap) and any(ch.isalnum() for ch in cap[s:e])
            W, H = im.size
            found = []
            masked = np.where(valid, probs_np[b], np.float32(0))  # [Q, T]: caption tokens only
            for q in np.flatnonzero(masked.max(-1) >= box_thr).tolist():  # the rest are never boxes
                p = masked[q]
                score = float(p.max())
                if score < self.box_threshold:  # the float32 filter above lets a few too many through
                    continue
                best = int(p.argmax())
                lo = hi = best
                while lo - 1 >= 0 and valid[lo - 1] and p[lo - 1] > text_thr:
                    lo -= 1
                while hi + 1 < len(p) and valid[hi + 1] and p[hi + 1] > text_thr:
                    hi += 1
                s, e = _word_bounds(cap, offsets[lo][0], offsets[hi][1])
                cx, cy, w, h = boxes_np[b, q].tolist()
                box = [max(0.0, (cx - w / 2) * W), max(0.0, (cy - h / 2) * H), min(W, (cx + w / 2) * W), min(H, (cy + h / 2) * H)]
                if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                    continue
                found.append({"phrase": cap[s:e], "span": [s, e], "box": [round(v, 1) for v in box],
                              "score": round(score, 4), "text_score": round(float(probs[b, q, lo:hi + 1].mean()), 4)})
            results.append(found)
        return results


class OriginalGroundingDino(GroundingDino):
    """Grounding DINO from IDEA-Research's package (groundingdino-py), loading its released
    checkpoints (``groundingdino_swint_ogc.pth``: ``{"model": state_dict}``) as they are.

    Three things differ from the package's own loading, each for a reason said here:
    its settings files are Python, so they are read as ``NAME = literal`` lines and never
    run (a model directory must not choose code); the checkpoint is read with
    ``weights_only`` (or from safetensors); and its BERT wrapper calls methods that
    transformers 5 removed, so the text encoder is wrapped by ``_Bert`` below, with the
    same submodule names (``bert.embeddings...``) so the released weights load unchanged.
    BERT and its tokenizer load through mmloom's one model path. Images are resized and
    normalized as the package's inference does (shorter side 800, longer at most 1333,
    ImageNet mean and deviation).
    """

    def __init__(self, section, box_threshold: float, text_threshold: float, device: str = "auto"):
        from mmloom.models import load_state_dict, resolve_file

        self.device = resolve_device(device)
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.section = section
        model, self._tokenizer = self.build(section)
        path = resolve_file(section.weights, "grounding checkpoint", ("groundingdino_swint_ogc.pth", "model.safetensors"))
        state = {k.removeprefix("module."): v for k, v in load_state_dict(path).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(f"grounding checkpoint {path} does not fit ground.groundingdino.config {section.config!r}: "
                            f"{len(missing)} missing ({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
        self.model = model.to(self.device).eval()
        self.ref = section.weights
        self.version = (f"groundingdino-py {package_version('groundingdino-py')} {section.config}, "
                        f"weights {fingerprint(section.weights)}, text {fingerprint(section.text_encoder)}")

    @staticmethod
    def build(section):
        """(the package's model for ``section.config``, randomly initialised, with BERT's
        weights from ``section.text_encoder``; the tokenizer)."""
        import types
        from unittest import mock

        from transformers import AutoTokenizer, BertModel

        try:
            from groundingdino.models import build_model
            from groundingdino.models.GroundingDINO import groundingdino as gd
        except ImportError as e:
            raise UserError(f"ground.backend groundingdino needs the groundingdino-py package ({e}); "
                            "pip install 'mmloom[groundingdino]'") from None
        settings = read_literal_settings(section.config)
        settings["use_checkpoint"] = settings["use_transformer_ckpt"] = False  # training-time memory savers only
        tokenizer = hf_pretrained(AutoTokenizer, section.text_encoder, "grounding text encoder")
        bert = hf_pretrained(BertModel, section.text_encoder, "grounding text encoder", attn_implementation="eager")
        with mock.patch.object(gd, "BertModelWarper", _Bert), \
                mock.patch.object(gd.get_tokenlizer, "get_tokenlizer", lambda _name: tokenizer), \
                mock.patch.object(gd.get_tokenlizer, "get_pretrained_language_model", lambda _name: bert):
            return build_model(types.SimpleNamespace(**settings)), tokenizer

    @property
    def tokenizer(self):
        return self._tokenizer

    def _inputs(self, images, texts: list[str]) -> list[torch.Tensor]:
        """Each picture as the package's inference feeds it (``util.inference.load_image``:
        ``RandomResize([800], max_size=1333)``, ``ToTensor``, ``Normalize``), its sizes
        computed as the package's ``datasets.transforms.resize`` does: the shorter side to
        ``image_size``, or, where the longer would pass ``max_size``, to ``round(max_size *
        shorter / longer)``; the longer side in proportion, truncated. So a 400 x 300
        picture is fed at 1066 x 800, as the released model's authors fed it. One change:
        no side under a pixel (the package fails on a picture more than 2,666 times as wide
        as high)."""
        import torchvision.transforms.functional as TF

        tensors = []
        for im in images:
            w, h = im.size
            size = self.section.image_size
            if max(w, h) / min(w, h) * size > self.section.max_size:
                size = int(round(self.section.max_size * min(w, h) / max(w, h)))
            ow, oh = (size, int(size * h / w)) if w < h else (int(size * w / h), size)
            im = im.resize((max(1, ow), max(1, oh)), Image.BILINEAR)
            tensors.append(TF.normalize(TF.to_tensor(im), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
        return tensors

    def _forward(self, texts: list[str], inputs) -> tuple[torch.Tensor, torch.Tensor]:
        from groundingdino.util.misc import nested_tensor_from_tensor_list

        tensors = [t.to(self.device) for t in inputs]
        with inference_autocast(self.device):
            out = self.model(nested_tensor_from_tensor_list(tensors), captions=texts)
        return out["pred_logits"].float().sigmoid().cpu(), out["pred_boxes"].float().cpu()


class _Bert(torch.nn.Module):
    """groundingdino-py's BertModelWarper for transformers 5: the same submodules (so the
    checkpoint's ``bert.*`` keys load), the caption's block-diagonal attention mask applied
    as an additive mask, returning what the package reads (``last_hidden_state``)."""

    def __init__(self, bert_model):
        super().__init__()
        self.config = bert_model.config
        self.embeddings, self.encoder, self.pooler = bert_model.embeddings, bert_model.encoder, bert_model.pooler

    def forward(self, input_ids, attention_mask, token_type_ids=None, position_ids=None, **_):
        h = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        mask = attention_mask if attention_mask.dim() == 3 else attention_mask[:, None, :]
        additive = (1.0 - mask[:, None].to(h.dtype)) * torch.finfo(h.dtype).min
        seq = self.encoder(h, attention_mask=additive)[0]
        return {"last_hidden_state": seq, "pooler_output": self.pooler(seq) if self.pooler is not None else None}


PACKAGE_CONFIGS = {"SwinT_OGC": "GroundingDINO_SwinT_OGC.py", "SwinB_cfg": "GroundingDINO_SwinB_cfg.py"}


def read_literal_settings(name: str) -> dict:
    """A groundingdino settings file (``NAME = literal`` lines): one of the package's own by
    name, or a local file. Read with ``ast.literal_eval``, never executed."""
    import ast
    import os

    if name in PACKAGE_CONFIGS:
        import groundingdino

        path = os.path.join(os.path.dirname(groundingdino.__file__), "config", PACKAGE_CONFIGS[name])
    else:
        path = os.path.expanduser(name)
        if not os.path.isfile(path):
            raise UserError(f"ground.groundingdino.config {name!r}: neither {' nor '.join(PACKAGE_CONFIGS)} nor a file")
    try:
        tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    except (SyntaxError, ValueError, OSError) as e:
        raise UserError(f"{path}: not a settings file ({e})") from None
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise UserError(f"{path}:{node.lineno}: only NAME = literal lines are read (nothing is executed)")
        try:
            out[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise UserError(f"{path}:{node.lineno}: {node.targets[0].id} is not a literal (nothing is executed)") from None
    return out


def make_detector(cfg) -> GroundingDino:
    """The detector ``ground.backend`` names, from the ground section ``cfg``."""
    if cfg.backend == "groundingdino":
        return OriginalGroundingDino(cfg.groundingdino, cfg.box_threshold, cfg.text_threshold, cfg.device)
    return GroundingDino(cfg.model, cfg.box_threshold, cfg.text_threshold, cfg.device)


def is_person(phrase: str, person_words: list[str]) -> bool:
    words = set(re.findall(r"[a-z]+", phrase.lower()))
    return bool(words & {w.lower() for w in person_words})


class HeadFinder:
    """A head box inside a person box."""

    def __init__(self, source: str, expand: float, detector: GroundingDino | None = None):
        self.source, self.expand, self.detector = source, expand, detector
        if source == "face":
            from .faces import OpenCvFaces

            self.faces = OpenCvFaces(min_size=12)
            self.version = self.faces.version
        else:
            self.version = f"{detector.ref} prompted with 'head'" if detector else "none"

    def __call__(self, image, person_box) -> list[float] | None:
        x0, y0, x1, y1 = [int(round(v)) for v in person_box]
        if x1 - x0 < 8 or y1 - y0 < 8:
            return None
        crop = image.crop((x0, y0, x1, y1))
        if self.source == "face":
            faces = self.faces([crop])[0]
            if not faces:
                return None
            fx0, fy0, fx1, fy1 = max(faces, key=lambda f: (f[2] - f[0]) * (f[3] - f[1]))
            cx, cy = (fx0 + fx1) / 2, (fy0 + fy1) / 2 - 0.1 * (fy1 - fy0)  # heads extend upwards (hair)
            half = self.expand * max(fx1 - fx0, fy1 - fy0) / 2
            box = [cx - half, cy - half, cx + half, cy + half]
        elif self.source == "detector" and self.detector is not None:
            dets = self.detector.detect([crop], ["head"])[0]
            if not dets:
                return None
            box = max(dets, key=lambda d: d["score"])["box"]
        else:
            return None
        w, h = x1 - x0, y1 - y0
        box = [max(0.0, box[0]), max(0.0, box[1]), min(w, box[2]), min(h, box[3])]
        return [round(box[0] + x0, 1), round(box[1] + y0, 1), round(box[2] + x0, 1), round(box[3] + y0, 1)]


class SuppliedBoxes:
    """Boxes that come with the metadata (as COCO or Objects365 annotations do), turned into
    the detector's records: phrase, span in the clean caption, box in the downloaded
    picture's pixels, score 1.

    The value is hostile input: a list of ``{"phrase": str, "box": [x0, y0, x1, y1]}``
    records (or its JSON text, at most ``max_bytes``), boxes in pixels of the original
    picture. Types, finiteness and bounds are checked, at most ``max_boxes`` records are
    read (a value with more is refused whole), and a phrase must occur in the clean caption
    (whole words, case-insensitive; the k-th record of a phrase takes its k-th occurrence).
    Each refused record (or value) is counted by reason, never raised.
    """

    version = "boxes supplied with the metadata"

    def __init__(self, max_boxes: int = 64, max_bytes: int = 65536, max_phrase: int = 200):
        self.max_boxes, self.max_bytes, self.max_phrase = max_boxes, max_bytes, max_phrase

    def records(self, value) -> tuple[list | None, str | None]:
        """(list of raw records, None) or (None, why the whole value is refused)."""
        import json

        if value is None:
            return None, "no_boxes"
        if isinstance(value, (bytes, bytearray, str)):
            if len(value) > self.max_bytes:
                return None, "boxes_too_long"
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                return None, "boxes_not_json"
        if not isinstance(value, (list, tuple)):
            return None, "boxes_not_a_list"
        if len(value) > self.max_boxes:
            return None, "too_many_boxes"
        return list(value), None

    def detect(self, value, caption: str, original_size, image_size) -> tuple[list[dict], dict[str, int]]:
        """Records for one sample and the count of refused ones per reason."""
        import math
        from collections import Counter

        why: Counter = Counter()
        recs, refused = self.records(value)
        if refused:
            why[refused] += 1
            return [], dict(why)
        try:
            OW, OH = float(original_size[0]), float(original_size[1])
        except (TypeError, ValueError):
            OW = OH = float("nan")
        if not (OW > 0 and OH > 0 and math.isfinite(OW) and math.isfinite(OH)):
            why["no_original_size"] += len(recs)
            return [], dict(why)
        W, H = image_size
        used: Counter = Counter()
        found = []
        for r in recs:
            phrase = r.get("phrase") if isinstance(r, dict) else None
            box = r.get("box") if isinstance(r, dict) else None
            if not isinstance(phrase, str) or not phrase.strip() or len(phrase) > self.max_phrase:
                why["bad_phrase"] += 1
                continue
            if (not isinstance(box, (list, tuple)) or len(box) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
                why["bad_box"] += 1
                continue
            x0, y0, x1, y1 = (float(v) for v in box)
            if not (0 <= x0 < x1 <= OW + 1 and 0 <= y0 < y1 <= OH + 1):
                why["box_out_of_bounds"] += 1
                continue
            key = " ".join(phrase.lower().split())
            spans = phrase_spans(caption, key)
            if used[key] >= len(spans):
                why["phrase_not_in_caption"] += 1
                continue
            s, e = spans[used[key]]
            used[key] += 1
            sx, sy = W / OW, H / OH
            b = [round(min(W, x0 * sx), 1), round(min(H, y0 * sy), 1), round(min(W, x1 * sx), 1), round(min(H, y1 * sy), 1)]
            found.append({"phrase": caption[s:e], "span": [s, e], "box": b, "score": 1.0, "text_score": 1.0})
        return found, dict(why)


def phrase_spans(caption: str, phrase: str) -> list[tuple[int, int]]:
    """Where ``phrase`` (lowercase, single spaces) occurs in ``caption`` as whole words."""
    words = [re.escape(w) for w in phrase.split()]
    if not words:
        return []
    pat = re.compile(r"(?<![\w'-])" + r"\s+".join(words) + r"(?![\w'-])", re.IGNORECASE)
    return [(m.start(), m.end()) for m in pat.finditer(caption)]
