"""`mmloom export` as whole diffusers pipeline directories (Versatile Diffusion, the
Kandinsky decoder and released prior) and the open_clip -> transformers CLIP converter
they need. Tiny random-weight models in the released layouts, their trainable weights
moved off their sources (as training would), exported with the family's ``export``; the
directory is loaded back with ``DiffusionPipeline.from_pretrained`` and must predict what
the run's model predicts, and sample what ``generate`` samples, for the same inputs.
The per-part export (MUMU, M-VADER) is tests/test_train.py's."""

import json
from pathlib import Path

import pytest
import torch

from mmloom.configbase import load_model
from mmloom.errors import UserError
from mmloom.train.config import TrainConfig
from mmloom.train.diffusion import start_noise
from mmloom.train.families import get_family
from test_reference_equivalence import _capture_latents, assert_kandinsky_decoder_is_the_pipeline  # the same checks as the released layout's

ROOT = Path(__file__).parent.parent
STEPS = 2


def _config(config: str, **over):
    cfg = load_model(TrainConfig, ROOT / "configs" / "train" / f"{config}.yaml", {"data.shards": "", **over})
    if cfg.family == "kandinsky":
        cfg.model.prior_checkpoint = None  # no prior run: the CLIP text embedding stands in
    return cfg


def _build(config: str, **over):
    cfg = _config(config, **over)
    fam = get_family(cfg.family)
    model = fam.build(cfg.model, cfg).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # "trained": every trainable weight moved off its source
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return fam, model


def _run_dir(cfg, model, run: Path) -> Path:
    """A run directory as `mmloom train` leaves it: train_config.yaml and one sealed checkpoint."""
    import yaml

    from mmloom.train import parts
    from mmloom.train.loop import write_manifest

    ck = run / "checkpoints" / "step_00000001"
    parts.save_trained(model, str(ck))
    write_manifest(str(ck))
    (ck / "DONE").write_text("")
    (run / "train_config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return run


def _export(fam, model, out):
    written = fam.export(model, str(out))
    assert (out / "model_index.json").exists() and "model_index.json" in written
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    return written, pipe


# -- the converter -----------------------------------------------------------------------------
def test_open_clip_converts_to_transformers_clip_with_the_same_embeddings(tiny_cache, tmp_path):
    """Tokens, per-token states, pooled embeddings, pixels and image embeddings of the
    converted text/vision models, tokenizer and image processor equal open_clip's."""
    from PIL import Image
    from transformers import AutoTokenizer

    from mmloom import clip_convert
    from mmloom.clip import ClipEmbedder
    from mmloom.testkit.tiny_train import resolve_tiny

    clip = ClipEmbedder(resolve_tiny("tiny:clip"))
    texts = ["a red circle", "Wow! Two DOGS, running on the beach !", ""]  # "!" is the pad token's text, still a "!"
    clip_convert.tokenizer(clip).save_pretrained(tmp_path / "tokenizer")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, clip.tokenizer(texts))
    states, _mask, pooled = clip.text_states(texts)
    with torch.no_grad():
        out = clip_convert.text_model(clip)(input_ids=ids)
    torch.testing.assert_close(out.last_hidden_state, states, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.nn.functional.normalize(out.text_embeds, dim=-1), pooled, atol=1e-5, rtol=1e-4)
    im = Image.new("RGB", (90, 70), (200, 30, 30))
    im.paste((20, 90, 200), (10, 10, 50, 40))
    x = clip.inputs([im])
    torch.testing.assert_close(clip_convert.image_processor(clip)(images=[im], return_tensors="pt").pixel_values, x,
                               atol=2e-2, rtol=0)  # PIL vs torchvision bicubic rounding
    with torch.no_grad():
        emb = clip_convert.vision_model(clip)(pixel_values=x).image_embeds
    torch.testing.assert_close(torch.nn.functional.normalize(emb, dim=-1), clip.images(x), atol=1e-5, rtol=1e-4)


def test_the_converter_refuses_a_tower_it_cannot_map(tiny_cache):
    import open_clip

    from mmloom import clip_convert
    from mmloom.clip import ClipEmbedder
    from mmloom.testkit.tiny_train import resolve_tiny

    clip = ClipEmbedder(resolve_tiny("tiny:clip"))
    clip.model = open_clip.CLIP(embed_dim=32, vision_cfg={"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
                                text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})
    with pytest.raises(UserError, match="image tower cannot be converted.*ModifiedResNet is not a ViT"):
        clip_convert.vision_model(clip)
    clip_convert.text_model(clip)  # its text tower still converts


# -- Versatile Diffusion ---------------------------------------------------------------------------
def test_versatile_exports_a_pipeline_that_predicts_and_samples_as_the_run(tiny_cache, tmp_path):
    from PIL import Image

    from mmloom.train.families.versatile import text_latent_shape

    fam, model = _build("versatile-tiny")
    written, pipe = _export(fam, model, tmp_path / "vd")
    assert type(pipe).__name__ == "VersatileDiffusionPipeline"
    assert {"image_unet", "text_unet", "vae", "text_encoder", "image_encoder", "tokenizer", "image_feature_extractor",
            "scheduler", "conditioning.safetensors"} <= set(written)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "vd" / "conditioning.safetensors"), "pt") as f:  # no diffusers home: the text VAE's heads
        assert {k.split(".")[0] for k in f.keys()} == {"text_vae"}
    red = Image.new("RGB", (64, 64), (200, 30, 30))
    tctx, ictx = model.text_context(["a red circle"]), model.image_context([red])
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([617])
    xt = torch.randn(1, *text_latent_shape(pipe.text_unet), generator=g)  # one text VAE latent
    from diffusers import VersatileDiffusionImageVariationPipeline, VersatileDiffusionTextToImagePipeline

    t2i = VersatileDiffusionTextToImagePipeline(**{k: v for k, v in pipe.components.items() if k not in
                                                   ("image_encoder", "image_feature_extractor")})
    t2i._swap_unet_attention_blocks()  # back: from_components swapped them in; the noise checks below use the saved layout
    iv = VersatileDiffusionImageVariationPipeline(**{k: v for k, v in pipe.components.items() if k in
                                                     ("image_feature_extractor", "image_encoder", "image_unet", "vae", "scheduler")})
    with torch.no_grad():
        for output, kind, ctx, unet, lat in (("image", "image", ictx, pipe.image_unet, x), ("text", "text", tctx, pipe.text_unet, xt)):
            ours = model.unet(lat, t, output, kind, ctx)
            assert ours.abs().mean() > 1e-3
            torch.testing.assert_close(unet(lat, t, encoder_hidden_states=ctx).sample, ours, atol=1e-5, rtol=1e-4)
        # the pipelines' own (converted) encoders give mmloom's contexts
        torch.testing.assert_close(t2i._encode_prompt(["a red circle"], "cpu", 1, False, None), tctx, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(iv._encode_prompt([red], "cpu", 1, False, None), ictx, atol=1e-3, rtol=1e-3)

    seen = _capture_latents(model)
    model.generate([["a red circle"]], steps=STEPS, guidance=7.5, seeds=[5])
    with torch.no_grad():
        ref = pipe.text_to_image("a red circle", height=64, width=64, num_inference_steps=STEPS, guidance_scale=7.5,
                                 latents=start_noise((4, 8, 8), [5], "cpu"), output_type="latent").images
    torch.testing.assert_close(ref, seen[0], atol=1e-4, rtol=1e-4)
    assert any("text VAE" in n for n in fam.export_notes(model))  # the card says what has no diffusers home


# -- Kandinsky ---------------------------------------------------------------------------------------
def test_kandinsky_decoder_exports_a_pipeline_that_predicts_and_samples_as_the_run(tiny_cache, tmp_path):
    fam, model = _build("kandinsky-decoder-tiny")
    written, pipe = _export(fam, model, tmp_path / "kd")
    assert type(pipe).__name__ == "KandinskyPipeline" and {"unet", "movq", "text_encoder", "tokenizer", "scheduler"} <= set(written)
    assert_kandinsky_decoder_is_the_pipeline(model, pipe)
    notes = " ".join(fam.export_notes(model))  # the card says how to drive the pipeline
    assert "`KandinskyPipeline`" in notes and "negative_image_embeds" in notes and "KandinskyPriorPipeline" not in notes


def test_kandinsky_released_prior_run_exports_a_prior_pipeline(tiny_cache, tmp_path):
    """`mmloom export RUN` end to end: the run's checkpoint -> a KandinskyPriorPipeline
    directory with its card, the run's statistics in prior.clip_mean / clip_std."""
    from diffusers import DiffusionPipeline

    from mmloom.cli import main

    over = {"model.prior": "released", "model.prior_stats": "checkpoint", "model.encoder.path": "tiny:clip-l",
            "model.prior_model": {"path": "tiny:kandinsky-prior", "subfolder": "prior"}}
    fam, model = _build("kandinsky-prior-tiny", **over)
    with torch.no_grad():  # the run's own statistics, not the source checkpoint's
        model.norm.fit(torch.randn(32) * 0.3, torch.rand(32) + 0.5, 10)
    run = _run_dir(_config("kandinsky-prior-tiny", **over), model, tmp_path / "run")
    assert main(["export", str(run), "--out", str(tmp_path / "kp")]) == 0
    index = json.loads((tmp_path / "kp" / "model_index.json").read_text())
    assert index["_class_name"] == "KandinskyPriorPipeline"
    written = json.loads((tmp_path / "kp" / "conditioning.json").read_text())["parts"]
    assert {"prior", "scheduler", "text_encoder", "tokenizer", "image_encoder", "image_processor"} <= set(written)
    assert "so the pipeline reproduces the run" in (tmp_path / "kp" / "README.md").read_text()
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "kp"))
    pipe.set_progress_bar_config(disable=True)
    assert torch.equal(pipe.prior.clip_mean[0], model.norm.mean) and torch.equal(pipe.prior.clip_std[0], model.norm.std)
    prompts = ["a red circle on the beach", "a dog"]
    tokens, mask, pooled = model.text(prompts)
    with torch.no_grad():  # the pipeline's converted encoder gives mmloom's prior inputs, at CLIP's own scale
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        enc = pipe.text_encoder(ids.input_ids)
        torch.testing.assert_close(enc.last_hidden_state, tokens, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(enc.text_embeds, pooled, atol=1e-5, rtol=1e-4)
        assert torch.equal(ids.attention_mask.bool(), mask)
        x, t = torch.randn(2, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([500, 20])
        ours = model._run_prior(x, t, tokens, mask, pooled)
        ref = pipe.prior(x, timestep=t, proj_embedding=pooled, encoder_hidden_states=tokens, attention_mask=mask).predicted_image_embedding
    torch.testing.assert_close(ref, ours, atol=1e-5, rtol=1e-4)

    ours = model.prior_embed(prompts, guidance=4.0, steps=STEPS, seed=3)
    with torch.no_grad():
        ref = pipe(prompts, num_inference_steps=STEPS, guidance_scale=4.0, generator=torch.Generator().manual_seed(3)).image_embeds
    torch.testing.assert_close(ref, ours, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("prior", ["diffusion", "residual", "linear"])
def test_a_prior_no_pipeline_runs_is_exported_as_before(tiny_cache, tmp_path, prior):
    fam, model = _build("kandinsky-prior-tiny", **{"model.prior": prior})  # mmloom's own priors
    written = fam.export(model, str(tmp_path / "p"))
    assert written == ["conditioning.safetensors"] and not (tmp_path / "p" / "model_index.json").exists()
    assert any("no diffusers pipeline runs it" in n for n in fam.export_notes(model))

