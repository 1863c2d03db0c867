"""Mutation-proof tests (issue 15): each mechanism a paper specifies, checked so that a
change to it fails here. Each test recomputes the paper's formula or number on its own
(not through the code it checks) on tiny random-weight models, and checks what the model
actually did: the tensors reaching the UNet, the loss it returned, the chain Algorithm 1
walked. README, "Mutation testing", lists the mutants each test was seen to kill."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmloom.train.config import TrainConfig
from mmloom.train.families import get_family


def _build(family, mc, resolution=64):
    cfg = TrainConfig.model_validate({"family": family, "model": mc, "data": {"resolution": resolution}})
    fam = get_family(family)
    return fam, fam.build(cfg.model, cfg), cfg.model


TINY = {"backbone": {"path": "tiny:unet", "subfolder": None}, "autoencoder": {"path": "tiny:vae", "subfolder": None}}


def _schedule(T, start=1e-4, end=0.02):
    """MT-Diffusion's E.1 schedule (DDPM's linear betas) and Theorem 2's alpha~_t with
    appendix E's w_t = t / (T - t), written out here from the paper."""
    betas = np.linspace(start, end, T)
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    w = np.array([t / (T - t) for t in range(T)])
    at, prev = np.zeros(T), 0.0
    for t in range(T):
        prev = np.sqrt(alphas[t]) * (w[t] + prev)  # alpha~_t = sqrt(alpha_t) (w_t + alpha~_{t-1})
        at[t] = prev
    return betas, alphas, abar, w, at


def _record(module, into: list):
    """Record (args, output) of every call of ``module``'s forward."""
    return module.register_forward_hook(lambda _m, args, out: into.append((args, out)))



def test_training_timesteps_are_uniform_over_all_T_one_per_sample():
    """Every family draws its training steps through `diffusion.draw_timesteps`: t uniform
    over 0..T-1 (0 included, T not), one per sample of the batch's first axis."""
    from mmloom.train.diffusion import draw_timesteps

    torch.manual_seed(0)
    t = draw_timesteps(4, torch.zeros(8000, 3, 2))
    assert t.shape == (8000,) and t.dtype == torch.long and set(t.tolist()) == {0, 1, 2, 3}
    assert (torch.bincount(t, minlength=4).float() / 8000 - 0.25).abs().max() < 0.02

# -- MT-Diffusion ---------------------------------------------------------------------------------
def test_mtdiffusion_training_aggregates_the_modality_into_z_t_and_weighs_the_head_by_lambda(tiny_cache, monkeypatch):
    """Training's z_t is equation 4's marginal with E(x) aggregated (not plain DDPM noising),
    the noise predictor's target is eps, and the loss is equation 6 with lambda = 0.1."""
    fam, model, mc = _build("mtdiffusion", {**TINY, "task": "masked_image", "condition_on_data": False})
    assert mc.loss_weight == 0.1 and mc.task_weight == "ratio"  # equation 6, appendix E
    with pytest.raises(Exception, match="loss_weight"):  # lambda weighs a loss: never negative
        _build("mtdiffusion", {**TINY, "loss_weight": -0.5})
    calls, encoded, heads = [], [], []
    _record(model.unet, calls)
    real_encode, real_head = model.ae.encode, model._head
    monkeypatch.setattr(model.ae, "encode", lambda px, *g: encoded.append((px, real_encode(px, *g))) or encoded[-1][1])
    monkeypatch.setattr(model, "_head", lambda: heads.append(real_head()) or heads[-1])
    g = torch.Generator().manual_seed(0)
    B = 5  # not 4, the latent channels: a batch size read off the wrong axis must show
    eps = torch.randn(B, 4, 8, 8, generator=g)
    real_randn_like = torch.randn_like
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: eps.clone() if x.shape == eps.shape else real_randn_like(x, **kw))
    pixels = torch.rand(B, 3, 64, 64, generator=g) * 2 - 1
    t = torch.tensor([0, 10, 250, 500, 999])
    with torch.no_grad():
        out = model({"pixels": pixels, "timesteps": t})
    (pix0, z0), (masked, e) = encoded  # E(image) is z_0; E(masked image) is the aggregated e
    assert torch.equal(pix0, pixels) and ((masked == pixels) | (masked == 0)).all()
    _betas, _alphas, abar, _w, at = _schedule(1000)
    c = lambda arr: torch.tensor(arr[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)  # noqa: E731
    expect = c(np.sqrt(abar)) * z0 + c(at) * e + c(np.sqrt(1 - abar)) * eps
    (args, pred), = calls
    assert torch.allclose(args[0], expect, rtol=1e-4, atol=1e-3) and torch.equal(args[1], t)
    assert at[999] > 100 and c(at)[4].item() * e.abs().mean() > 10  # the aggregated term is not small
    mse, head = F.mse_loss(pred.sample, eps), F.mse_loss(heads[0], e)
    assert torch.isclose(out["mse"], mse) and torch.isclose(out["head"], head)
    assert torch.isclose(out["loss"], mse + 0.1 * head)
    # without fixed steps, t is drawn uniformly from all T steps, 0 included, one per sample
    drawn = []
    real_randint = torch.randint
    monkeypatch.setattr(torch, "randint", lambda *a, **kw: drawn.append(a) or real_randint(*a, **kw))
    with torch.no_grad():
        model({"pixels": pixels})
    assert (0, 1000, (B,)) in drawn


def test_mtdiffusion_algorithm1_walks_equation_5_with_the_heads_estimates(tiny_cache, monkeypatch):
    """Algorithm 1 (appendix C) on a T = 4 schedule, step by step: z_T from the forward
    marginal, each z_{t-1} = 1/sqrt(a_t) (z_t - (1 - a_t)/sqrt(1 - abar_t) eps) - w_t e
    + sqrt(beta~_t) n (no noise at t = 0), e re-estimated by the head at every step."""
    T = 4
    fam, model, _ = _build("mtdiffusion", {**TINY, "task": "masked_image", "condition_on_data": False,
                                           "schedule": {"num_train_timesteps": T}})
    model.eval()

    def const(*size, generator=None, dtype=None, device=None, **kw):  # every draw 0.5: the chain is checkable
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        return torch.full(tuple(shape), 0.5, dtype=dtype or torch.float32, device=device)

    monkeypatch.setattr(torch, "randn", const)
    calls, estimates, decoded = [], [], []
    _record(model.unet, calls)
    real_est, real_decode = model._estimate, model.ae.decode
    monkeypatch.setattr(model, "_estimate", lambda: estimates.append(real_est()) or estimates[-1])
    monkeypatch.setattr(model.ae, "decode", lambda z: decoded.append(z) or real_decode(z))
    fam.generate(model, [["a cat"]], seeds=[0], size=64)
    betas, alphas, abar, w, at = _schedule(T)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    assert len(calls) == T and [int(a[1]) for a, _ in calls] == list(range(T - 1, -1, -1))
    e0 = torch.full((1, 4, 8, 8), 0.5)  # the missing modality starts random
    z = at[T - 1] * e0 + np.sqrt(1 - abar[T - 1]) * 0.5  # z_T: the forward marginal from z_0 = 0
    for (args, out), est, t in zip(calls, estimates, range(T - 1, -1, -1)):
        assert torch.allclose(args[0], z.float(), rtol=1e-4, atol=1e-4), t
        z = (args[0] - (1 - alphas[t]) / np.sqrt(1 - abar[t]) * out.sample) / np.sqrt(alphas[t]) - w[t] * est
        if t > 0:
            z = z + np.sqrt(beta_tilde[t]) * 0.5
    assert torch.allclose(decoded[0], z.float(), rtol=1e-4, atol=1e-4)


# -- M-VADER -----------------------------------------------------------------------------------------
def test_mvader_conditions_on_the_image_or_the_caption_as_drawn(tiny_cache, monkeypatch):
    """Section 3.2: a pair drawn 'image' is conditioned on its picture alone, 'caption' on
    its caption alone, 'empty' (embedding dropout) on the empty prompt."""
    from mmloom.train.diffusion import to_pil

    fam, model, mc = _build("mvader", {**TINY, "encoder": {"path": "tiny:vlm", "image_size": 64}})
    assert (mc.image_prob, mc.sampling.sampler, mc.sampling.guidance, mc.sampling.steps) == (0.2, "pndm", 8.0, 50)
    seen = []
    real = model.encode
    monkeypatch.setattr(model, "draw_conditions", lambda n: ["image", "caption", "empty"][:n])
    monkeypatch.setattr(model, "encode", lambda prompts: seen.append(prompts) or real(prompts))
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        out = model({"pixels": pixels, "captions": ["a red cat", "a man", "a dog"]})
    (prompts,) = seen
    assert prompts[1] == ["a man"] and prompts[2] == [""]
    assert torch.isclose(out["image_conditioned"], torch.tensor(1 / 3))  # the logged share of image-conditioned pairs
    assert len(prompts[0]) == 1 and np.array_equal(np.asarray(prompts[0][0]), np.asarray(to_pil(pixels[:1])[0]))


def test_mvader_samples_with_pndm_at_guidance_8(tiny_cache, monkeypatch):
    """Section 3.3: PNDM, 50 steps, guidance 8.0 reach the sampler when nothing overrides them."""
    import mmloom.train.families.mvader as mv

    fam, model, _ = _build("mvader", {**TINY, "encoder": {"path": "tiny:vlm", "image_size": 64}})
    got = {}

    def fake(sched, steps, shape, seeds, device, guidance, cond, uncond):
        got.update(sched=type(sched).__name__, steps=steps, guidance=guidance)
        return torch.zeros(len(seeds), *shape)

    monkeypatch.setattr(mv, "guided_sample", fake)
    fam.generate(model.eval(), [["a cat"]], seeds=[0], size=64)
    assert got == {"sched": "PNDMScheduler", "steps": 50, "guidance": 8.0}
    # the bounds: 1 step and guidance below 1 are allowed, no steps and a negative probability are not
    mv.Sampling(steps=1, guidance=0.5)
    for bad in ({"sampling": {"steps": 0}}, {"sampling": {"guidance": -0.5}}, {"image_prob": -0.1}, {"image_prob": 1.1}):
        with pytest.raises(Exception, match="steps|guidance|image_prob"):
            mv.Config.model_validate(bad)


# -- MUMU -----------------------------------------------------------------------------------------------
def test_mumu_bypasses_the_perceiver_one_token_per_patch_and_rank_8_lora(tiny_cache):
    """Section 3: the perceiver resampler is bypassed, so every vision patch is a token of
    the prompt; Table 1: LoRA of rank 8 in the connector, the language model and the UNet."""
    from PIL import Image

    from mmloom.train.encoders import ProjectionOnly

    fam, model, mc = _build("mumu", {**TINY, "encoder": {"path": "tiny:vlm", "image_size": 64}, "adapter_layers": 1,
                                     "adapter_heads": 2})
    assert mc.lora_rank == 8 and mc.encoder.bypass_resampler
    enc = model.encoder
    assert isinstance(enc.inner.connector, ProjectionOnly)
    vc = enc.model.config.vision_config
    patches = (64 // vc.patch_size) ** 2
    assert enc.processor.image_seq_len == patches
    with torch.no_grad():
        h1, _ = enc([["a"]])
        h2, _ = enc([["a", Image.new("RGB", (64, 64), "red")]])
    image_id = enc.processor.tokenizer.convert_tokens_to_ids(enc.image_token)
    assert int((enc.last_input_ids == image_id).sum()) == patches  # tokens per image: one per patch
    assert h2.shape[1] - h1.shape[1] >= patches
    ranks = {n.rsplit(".lora_A", 1)[0]: p.shape[0] for n, p in model.named_parameters() if ".lora_A" in n}
    assert ranks and set(ranks.values()) == {8}
    assert any(n.startswith("unet.") for n in ranks) and any(".connector." in n for n in ranks)
    assert any("text_model" in n for n in ranks)


def test_mumu_sdxl_conditioning_is_the_pictures_size_and_the_adapters_masked_mean(tiny_cache):
    """On an SDXL UNet, MUMU's adapter also gives SDXL's pooled text embedding: the mean of
    its output over the prompt's real tokens (padding left out), through its linear pool;
    and SDXL's size conditioning (time_ids) is (height, width, 0, 0, height, width) of the
    training pictures: a non-square batch shows a swapped or misread axis."""
    from types import SimpleNamespace

    from mmloom.train.families.mumu import Adapter

    torch.manual_seed(0)
    ad = Adapter(8, 8, 1, 2, pooled_dim=4).eval()
    h = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    with torch.no_grad():
        x, pooled = ad(h, mask)
        want = torch.stack([ad.pool(x[0, :3].mean(0)), ad.pool(x[1].mean(0)), ad.pool(x[2, 0])])
    assert torch.allclose(pooled, want, atol=1e-6)
    # the paper's "non-causal transformer" as chosen (docstring): pre-norm layers, GELU, a 4x MLP
    block = ad.blocks.layers[0]
    assert block.norm_first and block.linear1.out_features == 4 * 8 and block.activation is F.gelu
    assert block.self_attn.num_heads == 2 and block.dropout.p == 0.0

    fam, model, _ = _build("mumu", {"backbone": {"path": "tiny:unet-sdxl", "subfolder": None},
                                    "autoencoder": {"path": "tiny:vae", "subfolder": None},
                                    "encoder": {"path": "tiny:vlm", "image_size": 64}, "adapter_layers": 1, "adapter_heads": 2})
    assert model.sdxl
    seen = []
    model.unet.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["added_cond_kwargs"]), with_kwargs=True)
    batch = {"pixels": torch.rand(3, 3, 64, 32) * 2 - 1, "prompts": [SimpleNamespace(parts=["a red circle"])] * 3}
    model(batch)
    assert seen[0]["time_ids"].tolist() == [[64, 32, 0, 0, 64, 32]] * 3
    assert seen[0]["text_embeds"].shape == (3, model.unet.config.projection_class_embeddings_input_dim
                                            - 6 * model.unet.config.addition_time_embed_dim)


def test_mumu_trains_only_lora_and_the_adapter_drops_prompts_at_cond_dropout_and_sizes_by_stage(tiny_cache, monkeypatch):
    """Table 1: everything frozen but the LoRA weights (connector, LM, UNet) and the adapter;
    the vision tower has no trainable weight. A prompt is replaced by the empty one when
    its uniform draw falls below cond_dropout (0.1). The VLM sees crops at the prompt
    stage's size (stage 1 crop_size, stage 2 stage2_crop_size) unless encoder.image_size is
    set; sampling without a size makes the UNet's own."""
    from types import SimpleNamespace

    fam, model, mc = _build("mumu", {**TINY, "encoder": {"path": "tiny:vlm"}, "adapter_layers": 1, "adapter_heads": 2})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("adapter.") for n in trainable)
    assert any(n.startswith("adapter.") for n in trainable) and not any(p.requires_grad for p in model.encoder.vision_parameters())
    assert model.encoder.processor.image_processor.size["longest_edge"] == 252  # prompt.crop_size (stage 1)
    assert (mc.cond_dropout, fam.Config().adapter_layers, fam.Config().adapter_heads) == (0.1, 16, 16)  # section 3: 16 layers
    assert not model.unet.is_gradient_checkpointing  # only when loop.gradient_checkpointing asks
    assert fam.demo.prompt_images == 2 and fam.demo_prompt([]) == "a red circle"
    assert fam.demo_prompt(["p.jpg", "q.jpg"]) == "a photo of <image:p.jpg> thing 0 and <image:q.jpg> thing 1"
    seen = []
    real = model.condition
    monkeypatch.setattr(model, "condition", lambda prompts: seen.append(prompts) or real(prompts))
    batch = {"pixels": torch.rand(2, 3, 64, 64) * 2 - 1, "prompts": [SimpleNamespace(parts=["a red circle"])] * 2}
    for draw, dropped in ((0.09, True), (0.11, False)):
        real_rand = torch.rand
        monkeypatch.setattr(torch, "rand", lambda *a, draw=draw, **k: torch.full(a if a and isinstance(a[0], int) else a[0], draw))
        with torch.no_grad():
            model(batch)
        monkeypatch.setattr(torch, "rand", real_rand)
        assert seen[-1] == ([[""]] * 2 if dropped else [["a red circle"]] * 2), draw
    side = model.unet.config.sample_size * model.ae.downscale
    grad = []  # sampling builds no autograd graph (its memory at SDXL size)
    hook = model.unet.register_forward_hook(lambda *_: grad.append(torch.is_grad_enabled()))
    assert fam.generate(model.eval(), [["a red circle"]], steps=1, seeds=[0])[0].size == (side, side)
    hook.remove()
    assert grad and not any(grad)
    cfg = TrainConfig.model_validate({"family": "mumu", "model": {**TINY, "encoder": {"path": "tiny:vlm"}, "adapter_layers": 1,
                                                                  "adapter_heads": 2},
                                      "prompt": {"stage": 2, "crop_size": 128, "stage2_crop_size": 96}, "data": {"resolution": 64}})
    stage2 = fam.build(cfg.model, cfg)
    assert stage2.encoder.processor.image_processor.size["longest_edge"] == 96


def test_mumu_tokens_per_image_follow_the_configured_image_size(tiny_cache, tmp_path):
    """With ``image_size`` set below the vision tower's own (64 in the tiny VLM), a picture
    is (image_size / patch)^2 tokens: the size read is the configured one; and the LoRA
    rank must be positive (1 allowed, 0 not)."""
    from PIL import Image

    from mmloom.testkit.tiny_train import resolve_tiny
    from mmloom.train.encoders import VLMEncoder

    import json
    import shutil

    src = resolve_tiny("tiny:vlm")
    assert VLMEncoder(src).processor.image_processor.size["longest_edge"] == 64  # no image_size: as saved
    ref = shutil.copytree(src, tmp_path / "vlm")  # Idefics2-8b's processor splits images: the encoder must not
    cfg = json.loads((ref / "processor_config.json").read_text())
    cfg["image_processor"]["do_image_splitting"] = True
    (ref / "processor_config.json").write_text(json.dumps(cfg))
    enc = VLMEncoder(str(ref), image_size=32)
    assert enc.processor.image_processor.do_image_splitting is False
    vc = enc.model.config.vision_config
    assert vc.image_size == 64 and enc.processor.image_seq_len == (32 // vc.patch_size) ** 2 == 4
    with torch.no_grad():
        enc([["a", Image.new("RGB", (32, 32), "red")]])
    image_id = enc.processor.tokenizer.convert_tokens_to_ids(enc.image_token)
    assert int((enc.last_input_ids == image_id).sum()) == 4
    mumu = {**TINY, "encoder": {"path": "tiny:vlm", "image_size": 64}}
    TrainConfig.model_validate({"family": "mumu", "model": {**mumu, "lora_rank": 1}})
    with pytest.raises(Exception, match="lora_rank"):
        TrainConfig.model_validate({"family": "mumu", "model": {**mumu, "lora_rank": 0}})
    for key in ("adapter_layers", "adapter_heads"):  # an adapter needs a layer and a head (1 is enough)
        TrainConfig.model_validate({"family": "mumu", "model": {**mumu, key: 1}})
        with pytest.raises(Exception, match=key):
            TrainConfig.model_validate({"family": "mumu", "model": {**mumu, key: 0}})


# -- Versatile Diffusion ------------------------------------------------------------------------------------
VD = {"backbone": {"path": "tiny:unet", "subfolder": None}, "text_backbone": {"path": "tiny:text-unet", "subfolder": None},
      "autoencoder": {"path": "tiny:vae", "subfolder": None}, "text_vae": "tiny:text-vae", "encoder": {"path": "tiny:clip"}}


def test_versatile_default_rates_are_four_flow_5e5_times_table_1s_scales():
    """Section 4.2: four-flow VD trains at 5e-5; Table 1 scales it per layer group (4-flow
    row: Data(I) 0.2, Data(T) 1.0, Ctx(I) 1.0, Ctx(T) 1.0, Global 0.1)."""
    from mmloom.train.families import get_family

    lr = get_family("versatile").Config().lr
    scales = {"data_image": 0.2, "data_text": 1.0, "context_image": 1.0, "context_text": 1.0, "global_layers": 0.1}
    assert set(type(lr).model_fields) == set(scales)
    for group, scale in scales.items():
        assert getattr(lr, group) == pytest.approx(5e-5 * scale, rel=1e-12), group


def test_versatile_schedule_is_sds_scaled_linear():
    """Section 4.2: SD's betas, square-root-linear from 8.5e-4 to 1.2e-2 over 1000 steps."""
    from mmloom.train.diffusion import ddpm
    from mmloom.train.families.versatile import Config

    betas = ddpm(Config().schedule).betas.double().numpy()
    expect = np.linspace(8.5e-4 ** 0.5, 1.2e-2 ** 0.5, 1000) ** 2
    assert np.allclose(betas, expect, rtol=1e-5)


def test_versatile_contexts_are_divided_by_the_pooled_norm(tiny_cache):
    """Both contexts are CLIP's projected tokens divided by the norm of the pooled
    embedding (text: the end-of-text token; image: the global vector, token 0)."""
    from PIL import Image

    _fam, model, _ = _build("versatile", VD)
    with torch.no_grad():
        text = model.text_context(["a red circle", "a blue square on a table"])
        states, _m, _p = model.clip.text_states(["a red circle", "a blue square on a table"])
        raw = states.float().cpu() @ model.clip.model.text_projection.float().cpu()
        if raw.shape[-1] != text.shape[-1]:
            raw = states.float().cpu() @ model.clip.model.text_projection.weight.T.float().cpu()
        eot = model.clip.tokenizer(["a red circle", "a blue square on a table"]).argmax(dim=-1)
        for b in range(2):
            pooled = raw[b, eot[b]]
            assert torch.allclose(text[b].cpu(), raw[b] / pooled.norm(), atol=1e-5)
            assert torch.isclose(text[b, eot[b]].norm(), torch.tensor(1.0), atol=1e-5)
        img = model.image_context([Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")])
    assert torch.allclose(img[:, 0].norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(img[:, 1].norm(dim=-1), torch.ones(2), atol=1e-2)  # one scale for all tokens, not per token
    assert model.clip.model.visual.output_tokens is False  # the tower is left as found (clip.images needs it so)
    assert not model.text_context(["a"]).requires_grad and not model.image_context([Image.new("RGB", (64, 64))]).requires_grad


def test_versatile_contexts_do_not_depend_on_clips_scale(tiny_cache, monkeypatch):
    """Dividing by the pooled norm makes each context independent of CLIP's output scale:
    features shrunk 1000x (pooled norms far below 1) give the same contexts; the norm is
    floored at 1e-6, so all-zero features give a zero context."""
    from PIL import Image

    _fam, model, _ = _build("versatile", VD)
    texts, images = ["a red circle", "a dog"], [Image.new("RGB", (64, 64), "red")]
    with torch.no_grad():
        text, img = model.text_context(texts), model.image_context(images)
        real_states, visual = model.clip.text_states, model.clip.model.visual
        real_visual = visual.forward
        monkeypatch.setattr(model.clip, "text_states", lambda t: (lambda s, m, p: (s * 1e-3, m, p * 1e-3))(*real_states(t)))
        monkeypatch.setattr(visual, "forward", lambda x: tuple(o * 1e-3 for o in real_visual(x)))
        small_text, small_img = model.text_context(texts), model.image_context(images)
        # a degenerate CLIP whose outputs are all zero: a zero context, not 0 / 0
        monkeypatch.setattr(model.clip, "text_states", lambda t: (lambda s, m, p: (s * 0, m, p * 0))(*real_states(t)))
        monkeypatch.setattr(visual, "forward", lambda x: tuple(o * 0 for o in real_visual(x)))
        zero_text, zero_img = model.text_context(texts), model.image_context(images)
    assert torch.allclose(small_text, text, atol=1e-5) and torch.allclose(small_img, img, atol=1e-5)
    assert torch.equal(zero_text, torch.zeros_like(text)) and torch.equal(zero_img, torch.zeros_like(img))


@pytest.mark.parametrize("n,rate,expect", [
    (16, 0.5, set(range(0, 16, 2))), (16, 0.25, {0, 4, 8, 12}), (10, 0.3, {0, 3, 7}), (8, 1.0, set(range(8))), (8, 0.0, set()),
    (8, 0.125, {0}), (8, 0.05, set()),
])
def test_versatile_layer_mixing_spreads_round_rate_n_text_layers(n, rate, expect):
    """A.2's layer-level mixing at intermediate rates: round(rate n) of the n context
    layers take the text context, spread evenly from the first."""
    from mmloom.train.families.versatile import text_layers

    assert text_layers(n, rate) == expect


def test_versatile_layer_mixing_routes_each_layer_to_its_context(tiny_cache, monkeypatch):
    """At rate 0.75 the UNet runs with the text context in exactly the scheduled layers
    (0.75, not 0.5: a rate read as 1 - rate must change the layers)."""
    from mmloom.train.families import versatile as vd

    _fam, model, _ = _build("versatile", VD)
    used = []
    real = vd._WithContext.forward

    def spy(self, hidden_states, encoder_hidden_states=None, **kw):
        kind = "text" if self.ctx is tctx else "image"
        index = [i for i, m in enumerate(model.unet.context[kind]) if m is self.layer]
        used.append((index, kind))
        return real(self, hidden_states, encoder_hidden_states, **kw)

    monkeypatch.setattr(vd._WithContext, "forward", spy)
    ictx, tctx = torch.randn(1, 5, 32), torch.randn(1, 7, 32)
    n = len(model.unet.paths)
    with torch.no_grad():
        model.unet.blend(torch.randn(1, 4, 8, 8), torch.tensor([500]), "image", ictx, tctx, 0.75, "layer")
    assert sorted(i for (i,), _k in used) == list(range(n))  # each layer once, its own context's layer
    text = {i for (i,), k in used if k == "text"}
    assert text == vd.text_layers(n, 0.75) and len(text) == round(0.75 * n) and 0 < len(text) < n
    mixed = []  # attention-level mixing: every context layer pair sees both contexts, weighed by the rate
    real_mix = vd.AttentionMix.forward
    monkeypatch.setattr(vd.AttentionMix, "forward", lambda self, h, *a, **kw: mixed.append(
        (self.image_ctx is ictx, self.text_ctx is tctx, self.rate)) or real_mix(self, h, *a, **kw))
    with torch.no_grad():
        model.unet.blend(torch.randn(1, 4, 8, 8), torch.tensor([500]), "image", ictx, tctx, 0.75, "attention")
    assert mixed == [(True, True, 0.75)] * n


def _flat_unet(blocks=(32, 64), down=("CrossAttnDownBlock2D", "DownBlock2D"), up=("UpBlock2D", "CrossAttnUpBlock2D")):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, block_out_channels=blocks, down_block_types=down, up_block_types=up,
                                layers_per_block=1, cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8)


def test_versatile_refuses_unets_whose_layers_cannot_be_shared():
    """Section 3.2 shares the context and global layers between the flows, so the two UNets
    must have their cross-attention blocks in the same places and the same widths; either
    mismatch, in either order, is one clear error (kills the `!=` -> `<`, `>`, `is` mutants)."""
    from mmloom.errors import UserError
    from mmloom.train.families.versatile import MultiFlowUNet

    swapped = {"down": ("DownBlock2D", "CrossAttnDownBlock2D"), "up": ("CrossAttnUpBlock2D", "UpBlock2D")}
    for image, text in ((_flat_unet(), _flat_unet(**swapped)), (_flat_unet(**swapped), _flat_unet())):
        with pytest.raises(UserError, match="same block layout"):
            MultiFlowUNet(image, text)
    for a, b in (((32, 64), (64, 64)), ((64, 64), (32, 64))):
        with pytest.raises(UserError, match="same block_out_channels"):
            MultiFlowUNet(_flat_unet(a), _flat_unet(b))


def test_versatile_each_shared_layer_exists_once():
    """The context layers and the global layers (time embedding) are taken out of both UNets
    and kept once (the text UNet's time embedding dropped): each parameter has one name, so
    a checkpoint and an export hold every layer once and a flow can only reach a context
    layer through ``flow`` (kills skipping the loop that empties the UNets' slots)."""
    from mmloom.train.families.versatile import MultiFlowUNet

    m = MultiFlowUNet(_flat_unet(), _flat_unet())
    assert len(list(m.named_parameters(remove_duplicate=False))) == len(list(m.parameters()))
    keys = m.state_dict().keys()
    for kind in ("image", "text"):
        assert not [k for k in keys if k.startswith(f"data.{kind}.time_embedding")]
        assert not [k for k in keys for p in m.paths if k.startswith(f"data.{kind}.{p}.")]
    assert [k for k in keys if k.startswith("global_layers.")] and [k for k in keys if k.startswith("context.text.")]


# -- Kandinsky 2.1 ------------------------------------------------------------------------------------------
def test_kandinsky_prior_learns_normalized_embeddings_and_returns_them_denormalized(tiny_cache):
    """Section 4: the prior's target is the image embedding normalized element-wise,
    (x - mean) / std with the dataset's statistics; what it predicts is mapped back,
    x std + mean, before the decoder sees it."""
    mc = {"stage": "prior", "encoder": {"path": "tiny:clip"}, "prior": "linear", "cond_dropout": 0.0}
    _fam, model, _ = _build("kandinsky", mc)
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(model.dim, generator=g), torch.rand(model.dim, generator=g) + 0.5
    model.norm.fit(mean, std, 10)
    emb = torch.randn(3, model.dim, generator=g) * 2 + 1
    captions = ["a red cat", "a man", "a dog"]
    with torch.no_grad():
        loss = model({"captions": captions, "clip_image": emb})["loss"]
        _tok, _mask, pooled = model.text(captions)
        pred = pooled @ model.prior.proj.weight.T + model.prior.proj.bias
        assert torch.isclose(loss, F.mse_loss(pred, (emb - mean) / std), rtol=1e-5)
        assert torch.allclose(model.prior_embed(captions), pred * std + mean, atol=1e-5)


def test_kandinsky_prior_fits_its_statistics_once_before_the_first_step(tiny_cache, monkeypatch):
    """Unfitted statistics (count 0) are fitted from the dataset before the first step,
    fitted ones (count n) and the released checkpoint's own (count -1) never again;
    cond_dropout 1 gives every sample the empty caption."""
    mc = {"stage": "prior", "encoder": {"path": "tiny:clip"}, "prior": "linear", "cond_dropout": 1.0}
    _fam, model, _ = _build("kandinsky", mc)
    fits, texts = [], []
    monkeypatch.setattr(model, "fit_normalizer", lambda: fits.append(1) or model.norm.fit(torch.zeros(model.dim), torch.ones(model.dim), 10))
    real_text = model.text
    monkeypatch.setattr(model, "text", lambda t: texts.append(list(t)) or real_text(t))
    batch = {"captions": ["a red cat", "a man"], "clip_image": torch.randn(2, model.dim)}
    assert int(model.norm.count) == 0
    with torch.no_grad():
        model(batch)
        model(batch)
        assert fits == [1] and int(model.norm.count) == 10
        model.norm.count.fill_(-1)
        model(batch)
    assert fits == [1] and texts == [["", ""]] * 3


def test_kandinsky_released_prior_statistics_floor_and_normalize(tiny_cache):
    """The released prior's statistics (PriorStats, in the prior's clip_mean / clip_std):
    a zero spread is floored at 1e-6, and normalizing is (x - clip_mean) / clip_std."""
    from torch import nn

    from mmloom.train.families.kandinsky import PriorStats

    prior = nn.Module()
    prior.clip_mean, prior.clip_std = nn.Parameter(torch.zeros(1, 3)), nn.Parameter(torch.ones(1, 3))
    stats = PriorStats(prior, from_checkpoint=False)
    stats.fit(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 0.5]), 4)
    assert torch.equal(stats.std, torch.tensor([1e-6, 2.0, 0.5])) and torch.equal(prior.clip_std[0], stats.std)
    assert torch.equal(prior.clip_mean[0], torch.tensor([1.0, 2.0, 3.0])) and int(stats.count) == 4
    z = stats(torch.tensor([[1.0, 4.0, 4.0], [1.0, -2.0, 2.5]]))
    assert torch.allclose(z, torch.tensor([[0.0, 1.0, 2.0], [0.0, -2.0, -1.0]]))


def test_kandinsky_diffusion_prior_returns_denormalized_embeddings(tiny_cache, monkeypatch):
    """The diffusion prior samples in the normalized space and maps back: with the
    statistics' mean at 100 and std 0.01, the sampled embeddings sit at 100."""
    mc = {"stage": "prior", "encoder": {"path": "tiny:clip"}, "prior": "diffusion", "prior_layers": 1, "prior_heads": 2,
          "prior_width": 32}
    _fam, model, _ = _build("kandinsky", mc)
    model.norm.fit(torch.full((model.dim,), 100.0), torch.full((model.dim,), 0.01), 10)
    with torch.no_grad():
        out = model.prior_embed(["a red cat"], steps=2)
    assert (out - 100).abs().max() < 1.0
    drawn = []  # training: t uniform over all T steps, 0 included, one per sample
    real_randint = torch.randint
    monkeypatch.setattr(torch, "randint", lambda *a, **kw: drawn.append(a) or real_randint(*a, **kw))
    with torch.no_grad():
        model({"captions": ["a", "b", "c"], "clip_image": torch.randn(3, model.dim)})
    assert (0, 1000, (3,)) in drawn


def test_kandinsky_diffusion_prior_guides_its_x0_at_prior_guidance(tiny_cache, monkeypatch):
    """The diffusion prior samples with classifier-free guidance on its x0 prediction,
    u + g (c - u), the conditional pass on the prompt and the unconditional on the empty
    text, sampling.prior_guidance (4) and prior_steps (25) unless told. A stand-in prior
    predicts 1 for a prompt and 0.25 for the empty text (values where c - u and c u
    differ): DDIM's last step lands on the guided x0 (within its final alpha, alpha~_0 of
    the cosine schedule), denormalized."""
    mc = {"stage": "prior", "encoder": {"path": "tiny:clip"}, "prior": "diffusion", "prior_layers": 1, "prior_heads": 2,
          "prior_width": 32}
    _fam, model, _ = _build("kandinsky", mc)
    model.norm.fit(torch.full((model.dim,), 3.0), torch.full((model.dim,), 2.0), 10)
    empty = model.text([""])[2]
    calls = []

    def prior(tokens, mask, pooled, x, t):
        uncond = torch.isclose(pooled, empty.expand_as(pooled), atol=1e-4).all(-1)
        calls.append((int(t[0]), uncond.tolist()))
        return torch.where(uncond[:, None], 0.25, 1.0).expand_as(x)

    monkeypatch.setattr(model.prior, "forward", prior)
    with torch.no_grad():
        for guidance, steps, x0 in ((None, None, 0.25 + 4 * 0.75), (1.0, 5, 1.0), (0.0, 5, 0.25), (7.0, 5, 0.25 + 7 * 0.75)):
            calls.clear()
            out = model.prior_embed(["a red cat", "a man"], guidance=guidance, steps=steps, seed=1)
            assert out.shape == (2, model.dim)
            assert torch.allclose(out, torch.full_like(out, x0 * 2.0 + 3.0), atol=0.1), (guidance, out[:, :3])
            n = steps or 25
            assert len(calls) == 2 * n and sorted({c[1][0] for c in calls}) == [False, True]
            assert all(c[1] == [c[1][0]] * 2 for c in calls)  # the two prompts, each pass conditional or not
            ts = [c[0] for c in calls[::2]]
            assert ts == sorted(set(ts), reverse=True) and len(ts) == n


def test_kandinsky_diffusion_prior_reads_its_query_and_ignores_padding():
    """mmloom's diffusion prior (section 4's transformer encoder; the layout is mmloom's):
    one sequence of [text tokens, pooled text, time, noised embedding, query], padding
    masked out and the four appended positions always attended; the predicted x0 is
    the final norm's output at the query, the last position."""
    from mmloom.train.families.kandinsky import DiffusionPrior

    torch.manual_seed(0)
    prior = DiffusionPrior(dim=8, text_width=6, width=16, layers=2, heads=2).eval()
    g = torch.Generator().manual_seed(1)
    tokens, pooled, noised = torch.randn(2, 5, 6, generator=g), torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    t = torch.tensor([10, 500])
    seen = {}
    prior.norm.register_forward_hook(lambda _m, _i, out: seen.update(h=out))
    prior.time_mlp.register_forward_hook(lambda _m, inp, _o: seen.update(time=inp[0]))
    with torch.no_grad():
        out = prior(tokens, mask, pooled, noised, t)
        assert seen["h"].shape == (2, 5 + 4, 16) and torch.equal(out, prior.out(seen["h"][:, -1]))
        # the time's sinusoids, cosines first (a saved prior's time_mlp reads them in this order)
        freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(8) / 8)
        args = t[:, None].float() * freqs
        assert torch.allclose(seen["time"], torch.cat([args.cos(), args.sin()], dim=-1), atol=1e-6)
        padded = tokens.clone()
        padded[0, 3:] = 100.0
        again = prior(padded, mask, pooled, noised, t)
        assert torch.allclose(again[0], out[0], atol=1e-5) and torch.allclose(again[1], out[1])
        other = tokens.clone()
        other[0, 2] += 1.0  # a token the mask keeps
        assert not torch.allclose(prior(other, mask, pooled, noised, t)[0], out[0], atol=1e-4)
        for args in ((tokens, mask, pooled + 1, noised, t), (tokens, mask, pooled, noised + 1, t), (tokens, mask, pooled, noised, t + 100)):
            changed = prior(*args)  # the pooled text, the noised embedding and the time each reach x0
            assert not torch.allclose(changed, out, atol=1e-4)
        alone = prior(tokens[1:], mask[1:], pooled[1:], noised[1:], t[1:])
        assert torch.allclose(alone[0], out[1], atol=1e-5)  # samples do not see each other
        # no dropout: training computes what sampling does
        assert torch.allclose(prior.train()(tokens, mask, pooled, noised, t), out, atol=1e-6)
        prior.eval()
        # pre-norm layers: x + attention(norm1(x)), then + MLP(norm2(.)) (GELU, 4x wide)
        seq = torch.randn(2, 9, 16, generator=g)
        layer = prior.blocks.layers[0]
        a = layer.norm1(seq)
        h = seq + layer.self_attn(a, a, a, need_weights=False)[0]
        h = h + layer.linear2(torch.nn.functional.gelu(layer.linear1(layer.norm2(h))))
        assert layer.linear1.out_features == 4 * 16 and torch.allclose(layer(seq), h, atol=1e-5)
        with pytest.raises(Exception, match="must divide"):
            DiffusionPrior(dim=8, text_width=6, width=18, layers=1, heads=4)
    # the learned query starts small and centred (std 0.02, the usual transformer init)
    q = DiffusionPrior(dim=8, text_width=6, width=1024, layers=1, heads=2).query.detach()
    assert abs(float(q.mean())) < 0.003 and 0.018 < float(q.std()) < 0.022


def test_kandinsky_small_priors_are_a_linear_map_and_a_residual_mlp():
    """The two baseline priors read the pooled text only: ``linear`` one linear map,
    ``residual`` an MLP whose blocks each add to the stream (with a block's last layer at
    zero it adds nothing, and the prior is its input and output maps alone)."""
    from mmloom.train.families.kandinsky import LinearPrior, ResidualPrior

    torch.manual_seed(0)
    pooled, tokens, mask = torch.randn(3, 8), torch.randn(3, 5, 6), torch.ones(3, 5)
    linear = LinearPrior(8)
    assert torch.equal(linear(tokens, mask, pooled), linear.proj(pooled))
    res = ResidualPrior(8, blocks=2, width=16)
    with torch.no_grad():
        full = res(tokens, mask, pooled)
        assert torch.equal(full, res(tokens * 0, mask, pooled))  # the tokens are not read
        for b in res.blocks:
            b[-1].weight.zero_()
            b[-1].bias.zero_()
        assert torch.allclose(res(tokens, mask, pooled), res.out(res.inp(pooled)), atol=1e-6)
        assert not torch.allclose(full, res(tokens, mask, pooled), atol=1e-4)


def test_kandinsky_normalizer_guards_a_constant_dimension():
    """A coordinate with zero spread over the dataset keeps a finite scale (std floored at
    1e-6), so normalizing never divides by zero or flips a sign."""
    from mmloom.train.families.kandinsky import Normalizer

    norm = Normalizer(3)
    norm.fit(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 0.5]), 4)
    assert torch.equal(norm.std, torch.tensor([1e-6, 2.0, 0.5]))
    z = norm(torch.tensor([[1.0, 4.0, 4.0]]))
    assert torch.isfinite(z).all() and torch.allclose(z, torch.tensor([[0.0, 1.0, 2.0]]))


# -- Kandinsky's MoVQ -------------------------------------------------------------------------------------------
def test_movq_decoding_quantizes(tiny_cache):
    """Kandinsky 2.1 (section 3): MoVQ decodes quantized latents (the codebook's nearest
    entries), not the raw ones."""
    from mmloom.train.diffusion import Autoencoder

    ae = Autoencoder("tiny:vq", None, "vq")
    z = torch.randn(1, ae.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        quantized, *_ = ae.model.quantize(z)
        assert not torch.allclose(quantized, z, atol=1e-3)
        raw = ae.model.decode(z, force_not_quantize=True).sample.clamp(-1, 1)
        via_codebook = ae.model.decode(quantized, force_not_quantize=True).sample.clamp(-1, 1)
        got = ae.decode(z)
    assert torch.allclose(got, via_codebook, atol=1e-5) and not torch.allclose(got, raw, atol=1e-3)


def test_autoencoder_decode_unscales_and_clamps_to_the_pixel_range(tiny_cache, monkeypatch):
    """KL latents are divided by the scaling factor before decoding (VQ's factor is 1),
    the KL decoder is called without VQ's arguments, the pixels are clamped to [-1, 1]
    and no gradient is tracked; the schedule's bounds refuse T = 1 and zero betas."""
    from types import SimpleNamespace

    from mmloom.train.diffusion import Autoencoder, ScheduleConfig

    ae = Autoencoder("tiny:vae", None, "kl")
    assert ae.scale not in (0.0, 1.0)
    assert not ae.decode(torch.randn(1, ae.latent_channels, 8, 8, requires_grad=True)).requires_grad
    seen = []
    monkeypatch.setattr(ae.model, "decode", lambda z, **kw: seen.append((z, kw)) or SimpleNamespace(
        sample=torch.tensor([-3.0, -0.5, 0.5, 3.0])))
    z = torch.ones(1, ae.latent_channels, 8, 8)
    out = ae.decode(z)
    ((got, kw),) = seen
    assert torch.allclose(got, z / ae.scale) and kw == {}
    assert torch.equal(out, torch.tensor([-1.0, -0.5, 0.5, 1.0]))
    for bad in ({"num_train_timesteps": 1}, {"beta_start": 0}, {"beta_end": 0}):
        with pytest.raises(Exception, match=next(iter(bad))):
            ScheduleConfig(**bad)


# -- curation: the aspect-ratio lower bound ------------------------------------------------------------------
def test_aspect_ratio_lower_bound_is_0_6_inclusive():
    """VD section 4.1: images with width/height below 0.6 are dropped, exactly 0.6 is kept;
    the same bound at ingest (pandas) and at selection (SQL)."""
    import duckdb
    import pandas as pd

    from mmloom.curate.config import PrefilterConfig, SelectConfig
    from mmloom.curate.rules import PREFILTER, SELECT, failure_reasons, sql_rules

    assert PrefilterConfig().min_aspect == 0.6 and SelectConfig().min_aspect == 0.6
    for section in (PrefilterConfig, SelectConfig):  # a bound of 0 would let every picture through
        with pytest.raises(Exception, match="min_aspect"):
            section(min_aspect=0)
    w, h = [600, 599, 1000], [1000, 1000, 1000]  # 0.6 kept, 0.599 dropped, 1 kept (areas all allowed)
    only_size = PrefilterConfig(min_clip_similarity=None, max_nsfw=None, max_watermark=None)
    reasons = failure_reasons(PREFILTER, only_size, pd.DataFrame({"width": w, "height": h}))
    assert reasons[0] == "" and reasons[1].startswith("aspect 0.599 < 0.6") and reasons[2] == ""
    (rule,) = [r for r in sql_rules(SELECT, SelectConfig()) if r.name == "min_aspect"]
    con = duckdb.connect()
    con.register("t", pd.DataFrame({"original_width": w, "original_height": h}))
    assert [r[0] for r in con.execute(f"select {rule.passes} from t").fetchall()] == [True, False, True]


def test_versatile_unconditional_image_is_what_the_released_pipelines_feed_clip(tiny_cache):
    """B.1 (a): the unconditional image context is CLIP of an all-zero (black) image. The
    released pipelines pass ``np.zeros((512, 512, 3)) + 0.5`` to their CLIPImageProcessor,
    which rescales it by 1/255 as it does any image (0.498 / 255 = 0.002), so what reaches
    CLIP there is black too: mmloom's CLIP input equals the reference's within 0.01, and a
    mid-grey picture would be 1.8 away."""
    from transformers import CLIPImageProcessor

    _fam, model, _ = _build("versatile", VD)
    seen = []
    hook = model.clip.model.visual.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        model.uncond_context("image", 1)
    finally:
        hook.remove()
    (ours,) = seen
    ref = CLIPImageProcessor()(images=[np.zeros((512, 512, 3)) + 0.5], return_tensors="pt").pixel_values
    mid_grey = CLIPImageProcessor()(images=[np.full((512, 512, 3), 128, np.uint8)], return_tensors="pt").pixel_values
    ours_px, ref_px = ours[0, :, 0, 0].float().cpu(), ref[0, :, 0, 0]
    assert torch.allclose(ours[0].float().cpu(), ours_px[:, None, None].expand_as(ours[0]))  # one colour
    assert torch.allclose(ours_px, ref_px, atol=1e-2)
    assert (ours_px - mid_grey[0, :, 0, 0]).abs().min() > 1.0
