"""CLIP image-text similarity (the clip score) and, optionally, the normalized image and
text embeddings it is made of, as a scorer (`filters.base.Scorer`).

``clip_image_norm`` is the length of the image embedding before normalization: the
normalized embedding times it is CLIP's raw ``image_embeds``, the scale Kandinsky's
released prior and decoder were trained on (build writes that into the shards).

The score is the cosine similarity of one open_clip model's normalized image and text
embeddings; the text is the raw caption, as LAION scored it (LAION's 0.28-0.3 thresholds
were set with ViT-B-32 OpenAI). The image embeddings come from the batch's shared pass,
which the NSFW and aesthetic heads read too.
"""

from __future__ import annotations

import pyarrow as pa


class ClipScore:
    COLUMNS = {"clip_score": pa.float32(), "clip_image_embedding": pa.list_(pa.float32()),
               "clip_image_norm": pa.float32(), "clip_text_embedding": pa.list_(pa.float32())}

    def __init__(self, embedder, store_embeddings: bool = True):
        """``embedder``: the `mmloom.clip.ClipEmbedder` of the model that scores."""
        self.embedder = embedder
        self.needs_clip = embedder.ref
        self.store_embeddings = store_embeddings
        self.columns = {c: t for c, t in self.COLUMNS.items() if store_embeddings or c == "clip_score"}
        self.meta = {c: {"model": embedder.ref, "version": embedder.version} for c in self.columns}

    def prepare(self, batch) -> None:
        """Tokenize the captions ahead, in the score stage's worker thread."""
        batch.clip_tokens(self.needs_clip)

    def score(self, batch) -> dict[str, list]:
        img = batch.clip_images(self.needs_clip)
        txt = self.embedder.texts(batch.clip_tokens(self.needs_clip))  # raw captions, as LAION scored them
        out = {"clip_score": (img * txt).sum(-1).tolist()}
        if self.store_embeddings:
            out["clip_image_embedding"] = img.tolist()
            out["clip_image_norm"] = batch.clip_raw(self.needs_clip).norm(dim=-1).tolist()
            out["clip_text_embedding"] = txt.tolist()
        return out
