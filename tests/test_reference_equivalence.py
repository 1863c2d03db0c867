"""Reference equivalence: mmloom against diffusers' own pipelines for the released
checkpoints. Each test builds the parts in the released on-disk layout (the published
config.json with widths shrunk: same block types, same key names) with tiny random
weights, saves them with ``save_pretrained``, loads the directory through mmloom (the
family's ``build`` from a TrainConfig, which loads through mmloom/models.py) and asserts
that mmloom's noise prediction for the same latents, timestep and contexts, and one short
guided sampling run (same scheduler settings, same seed), equal the diffusers reference.

The contexts are mmloom's own (open_clip, or the multilingual text encoder), handed to the
reference pipeline in place of its encoders: these tests check the UNets, the context
mapping, the schedule and the guidance, not that open_clip equals transformers' CLIP.
A swapped context, a renamed key or a wrong schedule makes them fail."""

import re

import pytest
import torch

from mmloom.train.config import TrainConfig
from mmloom.train.diffusion import start_noise
from mmloom.train.families import get_family

STEPS = 3
# the released Stable Diffusion / Versatile Diffusion sampler settings (scheduler_config.json)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def _build(family: str, model: dict):
    cfg = TrainConfig.model_validate({"family": family, "model": model, "data": {"resolution": 64}})
    fam = get_family(family)
    m = fam.build(cfg.model, cfg).eval()
    return fam, m


def _capture_latents(model):
    """mmloom's final latents (the reference pipelines return theirs with output_type='latent')."""
    seen = []
    decode = type(model.ae).decode.__get__(model.ae)

    def spy(latents):
        seen.append(latents.detach().clone())
        return decode(latents)

    model.ae.decode = spy
    return seen


# -- Versatile Diffusion -------------------------------------------------------------------------
# the released shi-labs/versatile-diffusion image_unet (SD 1.4's) and text_unet (FCResBlocks,
# flat in_channels [768, 1, 1]) with widths shrunk; the same four-level block structure
VD_BLOCKS = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=2, attention_head_dim=8, norm_num_groups=8,
                 cross_attention_dim=32)  # 32: the tiny CLIP's embedding width (768 released)


@pytest.fixture(scope="module")
def vd_dir(tmp_path_factory, tiny_cache):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel

    root = tmp_path_factory.mktemp("vd")
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                         down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                         up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **VD_BLOCKS).save_pretrained(root / "image_unet")
    UNetFlatConditionModel(sample_size=8, in_channels=[32, 1, 1], out_channels=[32, 1, 1],
                           down_block_types=("CrossAttnDownBlockFlat",) * 3 + ("DownBlockFlat",),
                           up_block_types=("UpBlockFlat",) + ("CrossAttnUpBlockFlat",) * 3, **VD_BLOCKS).save_pretrained(root / "text_unet")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(8, 16, 16, 16), latent_channels=4, norm_num_groups=8, sample_size=64).save_pretrained(root / "vae")
    DDIMScheduler(**SD_SCHEDULER).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module")
def vd_model(vd_dir):
    return _vd_model(vd_dir, mix_rate=0.3)


def _vd_model(root, **over):
    mc = {"backbone": {"path": str(root), "subfolder": "image_unet"}, "text_backbone": {"path": str(root), "subfolder": "text_unet"},
          "autoencoder": {"path": str(root), "subfolder": "vae"}, "encoder": {"path": "tiny:clip"},
          "flows": ["text_to_image", "image_variation"], **over}
    return _build("versatile", mc)[1]


def _vd_pipeline(kind: str, root, text_len: int):
    """The diffusers pipeline, its parts loaded from ``root`` (each pipeline rewires the UNets)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, UNet2DConditionModel, VersatileDiffusionDualGuidedPipeline,
                           VersatileDiffusionImageVariationPipeline, VersatileDiffusionTextToImagePipeline)
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    parts = dict(image_unet=UNet2DConditionModel.from_pretrained(root, subfolder="image_unet"),
                 vae=AutoencoderKL.from_pretrained(root, subfolder="vae"),
                 scheduler=DDIMScheduler.from_pretrained(root, subfolder="scheduler"))
    text_unet = UNetFlatConditionModel.from_pretrained(root, subfolder="text_unet")
    # the text encoder only sets the text context's length (the contexts are mmloom's)
    te = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                    max_position_embeddings=text_len, vocab_size=10, projection_dim=8))
    if kind == "text_to_image":
        pipe = VersatileDiffusionTextToImagePipeline(tokenizer=None, text_encoder=te, text_unet=text_unet, **parts)
    elif kind == "image_variation":
        pipe = VersatileDiffusionImageVariationPipeline(image_feature_extractor=None, image_encoder=None, **parts)
    else:
        pipe = VersatileDiffusionDualGuidedPipeline(tokenizer=None, image_feature_extractor=None, text_encoder=te, image_encoder=None,
                                                    text_unet=text_unet, **parts)
        for m in pipe.image_unet.modules():  # diffusers 0.42's DualTransformer2DModel lacks the encoder_attention_mask its blocks pass
            if type(m).__name__ == "DualTransformer2DModel":
                m.forward = (lambda f: lambda *a, encoder_attention_mask=None, **k: f(*a, **k))(m.forward)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("release,folder,what", [
    ("vd", "text_unet", "text UNet"), ("vd", "image_unet", "image UNet"),
    ("kandinsky", "unet", "UNet"), ("kandinsky-prior", "prior", "model.prior_model"),
])
def test_a_renamed_key_stops_the_load(request, tmp_path, release, folder, what):
    """from_pretrained alone would warn and leave the weight random; mmloom refuses, for
    each model it loads in a released layout (VD's two UNets, Kandinsky's decoder UNet, the
    shared path of every family's UNet, and its prior), naming the part and the key."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mmloom.errors import UserError

    fixture, build = {"vd": ("vd_dir", lambda r: _vd_model(r)), "kandinsky": ("kandinsky_dir", lambda r: _kandinsky_decoder(r)),
                      "kandinsky-prior": ("prior_dir", lambda r: _released_prior(r))}[release]
    root = tmp_path / release
    shutil.copytree(request.getfixturevalue(fixture), root)
    f = root / folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    key = next(k for k in sd if k.endswith("to_k.weight"))
    sd[key.replace("to_k", "to_key")] = sd.pop(key)
    save_file(sd, f)
    with pytest.raises(UserError, match=rf"{re.escape(what)} .*\({folder}\).*missing " + re.escape(key)):
        build(root)


@pytest.mark.parametrize("kind", ["text_to_image", "image_variation", "dual_guided"])
def test_versatile_matches_the_released_pipelines(vd_dir, vd_model, kind):
    from PIL import Image

    mix = 0.3  # text weight of dual-context blending (diffusers' text_to_image_strength)
    model = vd_model
    red = Image.new("RGB", (64, 64), (200, 30, 30))
    tctx, ictx = model.text_context(["a red circle"]), model.image_context([red])
    tu, iu = model.uncond_context("text", 1), model.uncond_context("image", 1)
    pipe = _vd_pipeline(kind, vd_dir, tctx.shape[1])
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([617])
    with torch.no_grad():
        if kind == "text_to_image":
            ours, ref = model.unet(x, t, "image", "text", tctx), pipe.image_unet(x, t, encoder_hidden_states=tctx).sample
            pipe._encode_prompt = lambda *a, **k: torch.cat([tu, tctx])
            prompt, call = ["a red circle"], dict(prompt="a red circle")
        elif kind == "image_variation":
            ours, ref = model.unet(x, t, "image", "image", ictx), pipe.image_unet(x, t, encoder_hidden_states=ictx).sample
            pipe._encode_prompt = lambda *a, **k: torch.cat([iu, ictx])
            prompt, call = [red], dict(image=red)
        else:
            pipe.set_transformer_params(mix, ("text", "image"))
            ours = model.unet.blend(x, t, "image", ictx, tctx, mix)
            ref = pipe.image_unet(x, t, encoder_hidden_states=torch.cat([tctx, ictx], dim=1)).sample
            pipe._encode_text_prompt = lambda *a, **k: torch.cat([tu, tctx])
            pipe._encode_image_prompt = lambda *a, **k: torch.cat([iu, ictx])
            prompt, call = ["a red circle", red], dict(prompt="a red circle", image=red, text_to_image_strength=mix)
    assert ours.abs().mean() > 1e-3
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)

    seen = _capture_latents(model)
    model.generate([prompt], steps=STEPS, guidance=7.5, seeds=[5])
    latents = start_noise((4, 8, 8), [5], "cpu")
    with torch.no_grad():
        ref_lat = pipe(**call, height=64, width=64, num_inference_steps=STEPS, guidance_scale=7.5, latents=latents,
                       output_type="latent").images
    torch.testing.assert_close(seen[0], ref_lat, atol=1e-4, rtol=1e-4)


# -- Kandinsky 2.1 decoder ---------------------------------------------------------------------------
# kandinsky-community/kandinsky-2-1: unet/ (4 levels, out_channels 8, encoder_hid_dim the text
# encoder's width), text_encoder/ (MultilingualCLIP, XLM-R), tokenizer/, movq/, scheduler/ (DDIM)
K_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                   set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon", thresholding=False)


@pytest.fixture(scope="module")
def kandinsky_dir(tmp_path_factory, tiny_cache):
    from diffusers import DDIMScheduler
    from transformers import AutoTokenizer

    from mmloom.testkit.tiny_train import make_tiny_mclip, make_tiny_unet_kandinsky, make_tiny_vq

    root = tmp_path_factory.mktemp("kandinsky")
    make_tiny_unet_kandinsky(str(root / "unet"), clip_dim=32, text_width=48, levels=4)
    make_tiny_mclip(str(root / "text_encoder"), hidden=48, dim=32)
    AutoTokenizer.from_pretrained(root / "text_encoder").save_pretrained(root / "tokenizer")
    make_tiny_vq(str(root / "movq"))
    DDIMScheduler(**K_SCHEDULER).save_pretrained(root / "scheduler")
    return root


def _kandinsky_decoder(root, sampler="ddim"):
    r = str(root)
    mc = {"stage": "decoder", "encoder": {"path": "tiny:clip"}, "backbone": {"path": r, "subfolder": "unet"},
          "text_encoder": {"path": r, "subfolder": "text_encoder", "tokenizer_subfolder": "tokenizer"},
          "autoencoder": {"path": r, "subfolder": "movq", "type": "vq"}, "sampling": {"sampler": sampler}}
    return _build("kandinsky", mc)[1]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_kandinsky_decoder_matches_the_released_pipeline(kandinsky_dir, sampler):
    """Same text through the same multilingual encoder, same image embeddings: the same
    epsilon (the first 4 of 8 channels); DDIM drops the learned variance, DDPM
    (learned_range) uses the conditional one, as diffusers' KandinskyPipeline."""
    from diffusers import DDIMScheduler, DDPMScheduler, KandinskyPipeline, UNet2DConditionModel, VQModel
    from diffusers.pipelines.kandinsky.text_encoder import MultilingualCLIP
    from transformers import AutoTokenizer

    model = _kandinsky_decoder(kandinsky_dir, sampler)
    sched = DDIMScheduler.from_pretrained(kandinsky_dir, subfolder="scheduler")
    if sampler == "ddpm":
        sched = DDPMScheduler.from_config(sched.config, variance_type="learned_range")
    pipe = KandinskyPipeline(text_encoder=MultilingualCLIP.from_pretrained(kandinsky_dir, subfolder="text_encoder"),
                             tokenizer=AutoTokenizer.from_pretrained(kandinsky_dir, subfolder="tokenizer"),
                             unet=UNet2DConditionModel.from_pretrained(kandinsky_dir, subfolder="unet"), scheduler=sched,
                             movq=VQModel.from_pretrained(kandinsky_dir, subfolder="movq"))
    pipe.set_progress_bar_config(disable=True)
    assert_kandinsky_decoder_is_the_pipeline(model, pipe)


def assert_kandinsky_decoder_is_the_pipeline(model, pipe):
    """mmloom's decoder ``model`` and a diffusers ``KandinskyPipeline``: the same prediction
    for the same latents, timestep, text (each through its own encoder) and image
    embedding, and the same final latents of a short guided run with the same seed
    (tests/test_export.py checks an exported pipeline with it)."""
    prompt = "a red circle on the beach"
    img = model.clip.texts([prompt], normalize=False)  # no prior: the text embedding stands in (Table 3's "no prior"), CLIP's own scale
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([617])
    with torch.no_grad():
        ours = model.unet(x, t, **model._condition([prompt], img)).sample
        pooled, states, _ = pipe._encode_prompt(prompt, "cpu", 1, False)
        ref = pipe.unet(sample=x, timestep=t, encoder_hidden_states=states,
                        added_cond_kwargs={"text_embeds": pooled, "image_embeds": img}).sample
    assert ours.shape[1] == 8 and ours.abs().mean() > 1e-3
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model._eps(ours), ref[:, :4])

    seen = _capture_latents(model)
    model.generate([[prompt]], steps=STEPS, guidance=5.0, seeds=[5], size=64)  # not the default 4: the guidance asked for is used
    ref_lat = []
    decode = pipe.movq.decode
    pipe.movq.decode = lambda lat, **k: (ref_lat.append(lat.clone()), decode(lat, **k))[1]
    with torch.no_grad():
        pipe(prompt, image_embeds=img, negative_image_embeds=model.black[None], height=64, width=64, num_inference_steps=STEPS,
             guidance_scale=5.0, latents=start_noise((4, 8, 8), [5], "cpu"), generator=torch.Generator().manual_seed(5),
             output_type="pt")
    torch.testing.assert_close(seen[0], ref_lat[0], atol=1e-4, rtol=1e-4)


# -- Kandinsky 2.1 prior -------------------------------------------------------------------------------
# kandinsky-community/kandinsky-2-1-prior: prior/ (diffusers PriorTransformer, clip_mean/clip_std
# inside), scheduler/ (UnCLIPScheduler); the text and image encoders are CLIP ViT-L/14 (text
# tokens as wide as the embedding), here tiny:clip-l's open_clip contexts handed to the pipeline


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory, tiny_cache):
    from mmloom.testkit.tiny_train import make_tiny_kandinsky_prior

    return make_tiny_kandinsky_prior(str(tmp_path_factory.mktemp("kandinsky-prior")), dim=32)


def _released_prior(root, stats="checkpoint", shards=""):
    cfg = TrainConfig.model_validate({"family": "kandinsky", "data": {"resolution": 64, "shards": shards}, "model": {
        "stage": "prior", "prior": "released", "encoder": {"path": "tiny:clip-l"}, "prior_model": {"path": str(root), "subfolder": "prior"},
        "prior_stats": stats}})
    return get_family("kandinsky").build(cfg.model, cfg).eval()


def _prior_pipeline(root, model):
    """diffusers' KandinskyPriorPipeline on the saved parts; its prompt encoding replaced by
    mmloom's contexts (uncond first, as the pipeline concatenates them)."""
    from diffusers import KandinskyPriorPipeline, PriorTransformer, UnCLIPScheduler

    pipe = KandinskyPriorPipeline(prior=PriorTransformer.from_pretrained(root, subfolder="prior"), image_encoder=None, text_encoder=None,
                                  tokenizer=None, scheduler=UnCLIPScheduler.from_pretrained(root, subfolder="scheduler"),
                                  image_processor=None)
    pipe.set_progress_bar_config(disable=True)

    def encode(prompt, device, n, cfg_on, negative_prompt=None):
        states, mask, pooled = model.text(list(prompt))
        if not cfg_on:
            return pooled, states, mask.bool()
        us, um, up = model.text([""] * len(prompt))
        return torch.cat([up, pooled]), torch.cat([us, states]), torch.cat([um, mask]).bool()

    pipe._encode_prompt = encode
    pipe.get_zero_embed = lambda n, device=None: torch.zeros(n, 32)
    return pipe


def test_kandinsky_prior_matches_the_released_pipeline(prior_dir):
    """The released prior layout loads through mmloom (clip_mean/clip_std included), and the
    same text embeddings give the same image embedding as KandinskyPriorPipeline for a
    few-step run with the same seed (UnCLIPScheduler's variance noise, guidance 5, then the
    released denormalization, post_process_latents)."""
    model = _released_prior(prior_dir)
    pipe = _prior_pipeline(prior_dir, model)
    prompts = ["a red circle on the beach", "a dog", "a cat"]  # three: a batch split in halves, not thirds
    ours = model.prior_embed(prompts, guidance=5.0, steps=STEPS, seed=3)  # not the default 4: the guidance asked for is used
    with torch.no_grad():
        ref = pipe(prompts, num_inference_steps=STEPS, guidance_scale=5.0, generator=torch.Generator().manual_seed(3)).image_embeds
    assert ours.shape == (3, 32) and (ours[0] - ours[1]).abs().max() > 1e-3  # the text matters
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    # the checkpoint's statistics are the normalization, and they move the result
    assert torch.equal(model.norm.mean, pipe.prior.clip_mean[0]) and torch.equal(model.norm.std, pipe.prior.clip_std[0])
    assert (model.norm.std - 1).abs().max() > 0.1 and model.norm.mean.abs().max() > 0.1


def test_kandinsky_prior_normalization_and_its_inverse_are_the_released_ones(prior_dir):
    """Training normalizes the target with (x - clip_mean) / clip_std, the inverse of what
    the released pipeline applies to its samples (post_process_latents); the loss equals
    one computed by hand with diffusers' parts. Changing the normalization, its inverse or
    where the statistics live fails here."""
    from diffusers import PriorTransformer, UnCLIPScheduler

    model = _released_prior(prior_dir)
    ref_prior = PriorTransformer.from_pretrained(prior_dir, subfolder="prior").eval()
    sched = UnCLIPScheduler.from_pretrained(prior_dir, subfolder="scheduler")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 32, generator=g) * 0.7 + 0.3
    z = model.norm(x)
    torch.testing.assert_close(z, (x - ref_prior.clip_mean) / ref_prior.clip_std)
    torch.testing.assert_close(ref_prior.post_process_latents(z), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.norm.inverse(z), x, atol=1e-5, rtol=1e-5)

    batch = {"captions": ["a dog", "a cat", "a red circle"], "clip_image": x}
    model.cfg.cond_dropout = 0.0
    torch.manual_seed(7)
    loss = model(batch)["loss"]
    torch.manual_seed(7)
    torch.rand(3)  # the dropout draw
    t = torch.randint(0, 1000, (3,))
    x0 = (x - ref_prior.clip_mean) / ref_prior.clip_std
    noised = sched.add_noise(x0, torch.randn_like(x0), t)
    states, mask, pooled = model.text(batch["captions"])
    with torch.no_grad():
        pred = ref_prior(noised, timestep=t, proj_embedding=pooled, encoder_hidden_states=states, attention_mask=mask).predicted_image_embedding
    torch.testing.assert_close(loss.detach(), torch.nn.functional.mse_loss(pred, x0))
    # the statistics are frozen: the optimizer never moves them
    names = {n for n, p in model.prior.named_parameters() if p.requires_grad}
    assert "clip_mean" not in names and "clip_std" not in names and "proj_in.weight" in names


def test_kandinsky_prior_writes_the_selected_samples_statistics_into_the_released_layout(prior_dir, tmp_path):
    """prior_stats: dataset (the paper): the dataset's statistics land in prior.clip_mean /
    clip_std before the first step, so save_pretrained gives a prior the released pipeline
    denormalizes with them."""
    import io
    import tarfile

    import numpy as np

    from diffusers import PriorTransformer

    rng = np.random.default_rng(0)
    emb = rng.normal(loc=np.linspace(-1, 1, 32), scale=np.linspace(0.5, 2, 32), size=(12, 32)).astype(np.float32)
    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tar:
        for i, e in enumerate(emb):
            for name, data in ((f"{i:04d}.clip_image.npy", _npy(e)), (f"{i:04d}.txt", b"a dog")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    model = _released_prior(prior_dir, stats="dataset", shards=str(tmp_path / "shard-000000.tar"))
    assert int(model.norm.count) == 0
    model.fit_normalizer()
    assert int(model.norm.count) == 12
    np.testing.assert_allclose(model.prior.clip_mean[0].numpy(), emb.mean(0), atol=1e-5)
    np.testing.assert_allclose(model.prior.clip_std[0].numpy(), emb.std(0), atol=1e-4)
    model.prior.save_pretrained(tmp_path / "out")
    back = PriorTransformer.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(back.clip_std, model.prior.clip_std)


def _npy(a) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


# -- the Stable Diffusion UNets MUMU and M-VADER start from ---------------------------------------------
# the released unet/config.json of SD 1.x (CompVis/stable-diffusion-v1-4, runwayml/stable-diffusion-v1-5),
# SD 2.x (stabilityai/stable-diffusion-2-base: per-level heads, linear projections) and SDXL
# (stabilityai/stable-diffusion-xl-base-1.0: 3 levels, several transformer layers, text_time), widths shrunk
SD_UNETS = {
    "sd1": dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                block_out_channels=(16, 16, 32, 32), attention_head_dim=8),
    "sd2": dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                block_out_channels=(16, 16, 32, 32), attention_head_dim=(2, 2, 4, 4), use_linear_projection=True),
    "sdxl": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(16, 32, 32),
                 transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
}


def _sd_dir(root, kind: str):
    from diffusers import UNet2DConditionModel

    from mmloom.testkit.tiny_train import make_tiny_vae

    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=32, norm_num_groups=8,
                         **SD_UNETS[kind]).save_pretrained(root / "unet")
    make_tiny_vae(str(root / "vae"))
    return root


def _sd_pipeline(root, kind: str, sampler: str):
    from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)

    sched = DDIMScheduler(**SD_SCHEDULER) if sampler == "ddim" else PNDMScheduler.from_config(SD_SCHEDULER, skip_prk_steps=True)
    parts = dict(vae=AutoencoderKL.from_pretrained(root, subfolder="vae"), unet=UNet2DConditionModel.from_pretrained(root, subfolder="unet"),
                 scheduler=sched)
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, add_watermarker=False,
                                         **parts)
    else:
        pipe = StableDiffusionPipeline(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _contexts(seed: int, pooled: bool):
    g = torch.Generator().manual_seed(seed)
    ctx, uctx = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    pool, upool = (torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g)) if pooled else (None, None)
    return ctx, uctx, pool, upool


@pytest.mark.parametrize("family,kind", [("mumu", "sd1"), ("mumu", "sd2"), ("mumu", "sdxl"), ("mvader", "sd1")])
def test_sd_unets_match_the_stable_diffusion_pipelines(tmp_path, tiny_cache, family, kind):
    """MUMU (DDIM) and M-VADER (PNDM) on a released-layout SD UNet: for the same contexts
    (the LM side stood in for), the same noise prediction and the same short guided run as
    diffusers' StableDiffusion(XL)Pipeline with the released scheduler settings."""
    root = _sd_dir(tmp_path, kind)
    mc = {"encoder": {"path": "tiny:vlm", "image_size": 64}, "backbone": {"path": str(root), "subfolder": "unet"},
          "autoencoder": {"path": str(root), "subfolder": "vae"}}
    if family == "mumu":
        mc.update(adapter_layers=1, adapter_heads=2)
    fam, model = _build(family, mc)
    sampler, guidance = model.cfg.sampling.sampler, model.cfg.sampling.guidance
    pipe = _sd_pipeline(root, kind, sampler)
    ctx, uctx, pool, upool = _contexts(3, kind == "sdxl")
    ones = torch.ones(1, ctx.shape[1], dtype=torch.long)
    if family == "mumu":  # the VLM and adapter stood in for; the LoRA starts as the identity
        model.condition = lambda prompts: (uctx, ones, upool) if prompts == [[""]] else (ctx, ones, pool)
    else:  # the new key/value projections take the released ones, the LM stood in for
        for name, mod in model.unet.named_modules():
            if name.endswith("attn2"):
                ref = pipe.unet.get_submodule(name)
                mod.to_k.weight.data.copy_(ref.to_k.weight)
                mod.to_v.weight.data.copy_(ref.to_v.weight)
        model.encode = lambda prompts: (uctx, ones) if prompts == [[""]] else (ctx, ones)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([617])
    extra = {"added_cond_kwargs": model._added(pool, 1, 64, 64, "cpu")} if family == "mumu" and kind == "sdxl" else {}
    with torch.no_grad():
        ours = model.unet(x, t, encoder_hidden_states=ctx, encoder_attention_mask=ones, **extra).sample
        ref = pipe.unet(x, t, encoder_hidden_states=ctx, **extra).sample
    assert ours.abs().mean() > 1e-3
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)

    seen = _capture_latents(model)
    fam.generate(model, [["a red circle"]], steps=STEPS, seeds=[5], size=64)
    call = dict(prompt_embeds=ctx, negative_prompt_embeds=uctx)
    if kind == "sdxl":
        call.update(pooled_prompt_embeds=pool, negative_pooled_prompt_embeds=upool)
    with torch.no_grad():
        ref_lat = pipe(**call, height=64, width=64, num_inference_steps=STEPS, guidance_scale=guidance,
                       latents=start_noise((4, 8, 8), [5], "cpu"), output_type="latent").images
    torch.testing.assert_close(seen[0], ref_lat, atol=1e-4, rtol=1e-4)
