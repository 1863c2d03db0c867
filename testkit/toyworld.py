"""The toy world: rendered pictures of a few kinds of objects with captions that name them
and the boxes that hold them, for showing that a family learns its conditioning.

Four colours x four shapes. Every picture holds ``OBJECTS`` objects side by side, left to
right in the order the caption names them ("a red circle beside a blue square"), on a
low-saturation background that varies from picture to picture (flat or a gentle
gradient, with grain), so an object is told from the background by its saturation
alone. Objects are drawn large enough for the build stage's crop rules (150x150 px at
least, MUMU section 4) at ``SIZE`` px. Everything is seeded: the same seed gives the
same pictures, captions and boxes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# name -> RGB; saturated, with hues far apart (the analyzer tells them by hue)
COLOURS = {"red": (220, 40, 40), "yellow": (235, 205, 30), "green": (40, 170, 60), "blue": (40, 80, 225)}
SHAPES = ("circle", "square", "triangle", "star")
SIZE = 512  # picture side in pixels
OBJECTS = 2  # objects per picture, side by side
MIN_OBJECT, MAX_OBJECT = 170, 230  # object side in pixels (crop rules: >= 150x150, <= 75% of the picture)
TEMPLATES = ("a {0} beside a {1}", "a {0} and a {1}", "a {0} next to a {1}", "a {0} to the left of a {1}")
WORDS = sorted({*COLOURS, *SHAPES, *" ".join(TEMPLATES).replace("{0}", "").replace("{1}", "").split()})


@dataclass(frozen=True)
class ToyObject:
    colour: str
    shape: str
    box: tuple[float, float, float, float]  # x0 y0 x1 y1 in pixels

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    caption: str
    objects: list[ToyObject]  # left to right = caption order


def shape_polygon(shape: str, box) -> list[tuple[float, float]] | None:
    """The outline of ``shape`` inside ``box`` (None: a circle, drawn as an ellipse)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        return None
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":
        return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
    # a five-pointed star (inner radius 0.45 of the outer), scaled to fill the box
    unit = [((1.0 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
             (1.0 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    ux0, uy0 = min(p[0] for p in unit), min(p[1] for p in unit)
    uw, uh = max(p[0] for p in unit) - ux0, max(p[1] for p in unit) - uy0
    return [(x0 + (px - ux0) / uw * (x1 - x0), y0 + (py - uy0) / uh * (y1 - y0)) for px, py in unit]


def draw_object(d: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    poly = shape_polygon(shape, box)
    if poly is None:
        d.ellipse(box, fill=fill)
    else:
        d.polygon(poly, fill=fill)


def background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A low-saturation background: flat or a gradient between two greyish tones, with grain."""
    def tone():
        v = rng.uniform(40, 215)
        tint = rng.uniform(-18, 18, size=3)  # saturation well below the objects'
        return np.clip(v + tint, 0, 255)

    a, b = tone(), tone() if rng.random() < 0.5 else None
    if b is None:
        arr = np.broadcast_to(a, (h, w, 3)).astype(np.float32)
    else:
        t = np.linspace(0, 1, h if rng.random() < 0.5 else w, dtype=np.float32)
        t = t[:, None, None] if len(t) == h else t[None, :, None]
        arr = (a * (1 - t) + b * t).astype(np.float32)
        arr = np.broadcast_to(arr, (h, w, 3))
    arr = arr + rng.normal(0, 4, size=(h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def render_scene(seed: int, size: int = SIZE, objects: int = OBJECTS) -> Scene:
    """One picture: ``objects`` random objects side by side, caption and boxes."""
    rng = np.random.default_rng([seed, 1])  # objects and caption: the same at every size
    img = Image.fromarray(background(np.random.default_rng([seed, 0]), size, size))
    d = ImageDraw.Draw(img)
    cell = size / objects
    scale = size / SIZE
    objs = []
    for k in range(objects):
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        side = min(cell - 4, rng.uniform(MIN_OBJECT, MAX_OBJECT) * scale)
        x0 = k * cell + rng.uniform(2, max(2.0, cell - side - 2))
        y0 = rng.uniform(2, max(2.0, size - side - 2))
        box = (round(x0, 1), round(y0, 1), round(x0 + side, 1), round(y0 + side, 1))
        jitter = rng.integers(-12, 13, size=3)
        draw_object(d, shape, box, tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter)))
        objs.append(ToyObject(colour, shape, box))
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))] if objects == 2 else None
    phrases = [o.phrase for o in objs]
    caption = template.format(*phrases) if template else "a " + " beside a ".join(phrases)
    return Scene(img, caption, objs)


def scene_boxes(scene: Scene) -> list[dict]:
    """The boxes supplied with a picture's metadata: one {phrase, box} record per object
    (the way COCO or Objects365 annotations come), in pixels of the picture."""
    return [{"phrase": o.phrase, "box": list(o.box)} for o in scene.objects]


def parse_caption(caption: str) -> list[tuple[str, str]]:
    """(colour, shape) pairs named by a toy caption, in caption order (left to right)."""
    words = caption.lower().replace(",", " ").split()
    out = []
    for a, b in zip(words, words[1:]):
        if a in COLOURS and b in SHAPES:
            out.append((a, b))
    return out


def toy_pixels(seeds, resolution: int):
    """[N, 3, r, r] pictures in [-1, 1], rendered at twice ``resolution`` then downsampled (fast, smooth edges)."""
    import torch

    arrs = [np.asarray(render_scene(s, size=2 * resolution).image.resize((resolution, resolution), Image.BICUBIC)) for s in seeds]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def make_toy_vae(path: str, resolution: int = 32, seconds: float = 120.0, max_steps: int = 3000, seed: int = 0,
                 factor: int = 4, echo=print) -> str:
    """A tiny diffusers AutoencoderKL (tiny:vae's layout; ``factor`` 4 or 8), trained to
    reconstruct toy pictures for at most ``seconds``: the frozen autoencoder every family
    decodes with must draw the toy world, or no family can score (a random-weight decoder
    is not the inverse of its encoder). Saved with ``save_pretrained``; loads like any VAE."""
    import time

    import torch
    from diffusers import AutoencoderKL

    blocks = {4: (16, 32, 32), 8: (8, 16, 16, 16)}[factor]
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                        up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks, latent_channels=4,
                        norm_num_groups=8, sample_size=resolution)
    data = toy_pixels(range(10_000_000, 10_000_000 + 1024), resolution)  # seeds no toy world dataset uses
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    start, step, loss = time.time(), 0, float("nan")
    vae.train()
    while step < max_steps and time.time() - start < seconds:
        x = data[torch.randint(0, len(data), (16,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss_t = torch.nn.functional.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss_t.backward()
        opt.step()
        step, loss = step + 1, loss_t.item()
    vae.eval()
    with torch.no_grad():  # scale latents to unit variance, as Stable Diffusion's scaling_factor does
        std = float(vae.encode(data[:256]).latent_dist.mode().std())
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(path)
    echo(f"[toy vae] {step} steps in {time.time() - start:.0f} s, reconstruction loss {loss:.4f}, scaling factor {1 / std:.3f}")
    return path


def make_toy_clip(path: str, seconds: float = 180.0, max_steps: int = 4000, seed: int = 0, batch: int = 64,
                  n: int = 2048, echo=print) -> str:
    """``tiny:clip``'s open_clip model (same architecture and 32-d embeddings, so the score
    stage's tiny aesthetic and NSFW heads still fit it) trained contrastively (CLIP's
    symmetric InfoNCE, learned temperature) on toy pictures and their captions for at
    most ``seconds``. A random-weight CLIP gives every toy caption nearly the same token
    states (cosine 0.96-0.98 between captions that differ in their colour words) and
    every toy picture nearly the same embedding, so a family conditioned on CLIP (Versatile
    Diffusion's contexts, Kandinsky's prior and decoder) has nothing to follow; a released
    CLIP tells real objects apart, and this one tells the toy objects apart, the stand-in
    for it that the toy world needs, as `make_toy_vae` stands in for a released
    autoencoder. Pictures go through the model's own preprocessing (as the score stage
    feeds it) from 256 px renders of seeds no toy world dataset uses. Saved in
    `make_open_clip`'s format: loads by path through `ClipEmbedder` like any open_clip
    directory."""
    import time

    import torch

    from mmloom.clip import ClipEmbedder, make_open_clip

    make_open_clip(path, seed=seed)
    clip = ClipEmbedder(path)
    model = clip.model
    scenes = [render_scene(s, size=256) for s in range(20_000_000, 20_000_000 + n)]
    images = torch.stack([clip.preprocess(sc.image) for sc in scenes])
    tokens = clip.tokenizer([sc.caption for sc in scenes])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    start, step, loss, acc = time.time(), 0, float("nan"), float("nan")
    model.train()
    while step < max_steps and time.time() - start < seconds:
        idx = torch.randperm(n, generator=g)[:batch]
        img = torch.nn.functional.normalize(model.encode_image(images[idx]), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokens[idx]), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        # captions can repeat within a batch (16 objects, 4 templates): a duplicate caption is a right answer too
        same = tokens[idx].unsqueeze(1).eq(tokens[idx].unsqueeze(0)).all(-1).float()
        soft = same / same.sum(1, keepdim=True)
        loss_t = (torch.nn.functional.cross_entropy(logits, soft) + torch.nn.functional.cross_entropy(logits.T, soft.T)) / 2
        opt.zero_grad()
        loss_t.backward()
        opt.step()
        step, loss = step + 1, loss_t.item()
        acc = float(same[torch.arange(len(idx)), logits.argmax(1)].mean())  # the caption picked is the picture's own
    model.eval()
    torch.save(model.state_dict(), os.path.join(path, "open_clip_pytorch_model.bin"))
    echo(f"[toy clip] {step} steps of {batch} in {time.time() - start:.0f} s, contrastive loss {loss:.3f}, "
         f"image -> caption top-1 in the last batch {acc:.2f}")
    return path
