"""The Family contract (every registered family: shared config names, sampling defaults
from its paper, renamed keys named on load, demo configs); MT-Diffusion and Kandinsky:
the forward-aggregation closed forms against the one-step process, the posterior mean of
equation 5, masked-patch training data, the heads' stop gradients, Kandinsky's linear
prior on a known map, full-dataset normalization, the black-image unconditional input
and embedding fusion; each tiny config trains with falling loss. Random-weight models:
these test the mechanisms, not image quality."""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from pydantic import ValidationError

from mmloom.train.config import TrainConfig
from mmloom.train.families import FAMILIES, get_family
from mmloom.train.families.mtdiffusion import ForwardAggregation, mask_patches, patch_mask

LINEAR = np.linspace(1e-4, 0.02, 1000)
ROOT = Path(__file__).parent.parent


# -- the Family contract ---------------------------------------------------------------------
# each paper's sampling settings (or, where it is silent, the choice its family's docstring names)
PAPER_SAMPLING = {
    "mumu": {"sampler": "ddim", "steps": 50, "guidance": 6.0},  # MUMU 2.1: 50-step DDIM, scale unstated
    "mvader": {"sampler": "pndm", "steps": 50, "guidance": 8.0},  # M-VADER 3.3
    "versatile": {"sampler": "ddim", "steps": 50, "guidance": 7.5, "text_guidance": 2.0},  # unstated: released pipelines
    "mtdiffusion": {"sampler": "algorithm1", "steps": None, "guidance": None},  # appendix C, all T steps
    "kandinsky": {"sampler": "ddim", "steps": 100, "guidance": 4.0, "prior_steps": 25, "prior_guidance": 4.0},
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_keeps_the_contract(name):
    """One registry entry is a whole family: its Config with the shared parts under their
    shared names, its paper's sampling defaults in that config, a demo whose tiny configs
    exist, and defaults that round-trip through a saved train_config.yaml unchanged."""
    from mmloom.configbase import load_model
    from mmloom.train.families.base import Family, FamilyConfig, GuidedConfig

    fam = get_family(name)
    assert isinstance(fam, Family) and fam.name == name and issubclass(fam.Config, FamilyConfig)
    fields = fam.Config.model_fields
    assert {"backbone", "autoencoder", "schedule", "lr", "sampling"} <= set(fields)
    assert not set(fields) & {"vae", "vlm", "lm", "clip", "unet", "image_unet", "embedding_dropout", "context_dropout",
                              "text_dropout", "image_dropout", "num_train_timesteps"}
    assert not [f for f in fields if f.startswith("lr_")]
    assert issubclass(fam.Config, GuidedConfig) == (fam.sampling.guidance is not None)  # guided sampling needs dropout
    assert fam.sampling.model_dump() == PAPER_SAMPLING[name]
    cfg = TrainConfig.model_validate({"family": name})
    assert cfg.model == fam.Config() and cfg.model.sampling == fam.sampling
    saved = yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))
    again = TrainConfig.model_validate(saved)
    assert again == cfg and again.model_dump(mode="json") == saved
    for config in fam.demo.configs:
        tiny = load_model(TrainConfig, ROOT / "configs" / "train" / f"{config}.yaml")
        assert tiny.family == name and isinstance(tiny.model, fam.Config)


def test_a_sub_config_given_in_part_keeps_the_family_defaults():
    cfg = TrainConfig.model_validate({"family": "mvader", "model": {"backbone": {"path": "tiny:unet"}, "lr": {"unet": 1e-3},
                                                                   "sampling": {"steps": 20}}})
    m = cfg.model
    assert (m.backbone.path, m.backbone.subfolder) == ("tiny:unet", "unet")
    assert (m.lr.unet, m.lr.cross_attn) == (1e-3, 1e-4)
    assert (m.sampling.sampler, m.sampling.steps, m.sampling.guidance) == ("pndm", 20, 8.0)


@pytest.mark.parametrize("name,old,new", [
    ("mumu", {"vae": "x"}, "model.vae is now model.autoencoder.path"),
    ("mumu", {"lr_unett": 1e-4}, "model.lr_unett: unknown key"),
    ("mumu", {"lr": {"unett": 1e-4}}, "model.lr.unett: unknown key"),
    ("mumu", {"beta_end": 0.02}, "model.beta_end is now model.schedule.beta_end"),
    ("mvader", {"lm": "x", "embedding_dropout": 0.05}, "model.lm is now model.encoder.path, model.embedding_dropout is now model.cond_dropout"),
    ("versatile", {"lr": 5e-5}, "model.lr is now model.lr.GROUP"),
    ("versatile", {"lr_scale_global": 0.1}, "model.lr_scale_global is now model.lr.global_layers"),
    ("mtdiffusion", {"autoencoder": "x"}, "model.autoencoder is now model.autoencoder.path"),
    ("kandinsky", {"clip": "x", "prior_steps": 25}, "model.clip is now model.encoder.path, model.prior_steps is now model.sampling.prior_steps"),
])
def test_misspelt_and_renamed_family_keys_stop_the_load(name, old, new):
    from mmloom.configbase import load_model
    from mmloom.errors import UserError

    with pytest.raises(UserError, match=re.escape(new)):
        load_model(TrainConfig, data={"family": name, "model": old}, source="t.yaml")


def test_prompt_cond_dropout_moved_to_the_family_and_unknown_families_are_named():
    from mmloom.configbase import load_model
    from mmloom.errors import UserError

    with pytest.raises(UserError, match="prompt.cond_dropout is now model.cond_dropout"):
        load_model(TrainConfig, data={"prompt": {"cond_dropout": 0.1}})
    with pytest.raises(UserError, match="family: unknown model family; known: mumu, mvader"):
        load_model(TrainConfig, data={"family": "mumuu"})
    with pytest.raises(UserError, match="unknown model family 'mumuu'"):
        get_family("mumuu")




# -- MT-Diffusion: Theorem 2 ---------------------------------------------------------------
@pytest.mark.parametrize("kind,value", [("ratio", 1.0), ("constant", 1.0), ("constant", 0.3)])
def test_marginal_matches_iterating_the_one_step_forward_process(kind, value):
    agg = ForwardAggregation(LINEAR, ForwardAggregation.weights(kind, 1000, value))
    z0, e = 0.7, -1.3
    mean, var = z0, 0.0
    for t in range(1000):  # q(z_t | z_{t-1}) = N(sqrt(a_t)(z_{t-1} + w_t e), 1 - a_t), iterated exactly
        mean = np.sqrt(agg.alphas[t]) * (mean + agg.w[t] * e)
        var = agg.alphas[t] * var + agg.betas[t]
        if t in (0, 1, 10, 250, 500, 900, 999):
            closed_mean = np.sqrt(agg.abar[t]) * z0 + agg.alpha_tilde[t] * e
            assert np.isclose(mean, closed_mean, rtol=1e-9, atol=1e-9), (t, mean, closed_mean)
            assert np.isclose(var, 1 - agg.abar[t], rtol=1e-9), t

    # and sampled: 40,000 chains of the one-step process against the closed form
    g = torch.Generator().manual_seed(0)
    z0s = torch.full((40000,), z0, dtype=torch.float64)
    es = torch.full_like(z0s, e)
    z = z0s.clone()
    for t in range(60):
        tt = torch.full((len(z),), t)
        z = agg.step(z, es, tt, torch.randn(z.shape, generator=g, dtype=torch.float64))
    direct = agg.marginal(z0s, es, torch.full((len(z),), 59), torch.randn(z.shape, generator=g, dtype=torch.float64))
    assert abs(z.mean() - direct.mean()) < 0.03 and abs(z.std() - direct.std()) < 0.03


def test_posterior_mean_matches_equation_5():
    agg = ForwardAggregation(LINEAR, ForwardAggregation.weights("ratio", 1000))
    g = torch.Generator().manual_seed(1)
    for t in (1, 5, 100, 500, 999):
        z0, e, eps = (torch.randn(8, dtype=torch.float64, generator=g) for _ in range(3))
        tt = torch.full((8,), t)
        zt = agg.marginal(z0, e, tt, eps)
        eq9 = agg.posterior_mean(zt, z0, e, tt)
        eq5 = agg.posterior_mean_eps(zt, eps, e, tt)
        # independent check: Gaussian conditioning (Lemma 4) of z_{t-1} ~ q(. | z0, x) on z_t
        mu = np.sqrt(agg.abar[t - 1]) * z0 + agg.alpha_tilde[t - 1] * e
        lam, A, L = 1 / (1 - agg.abar[t - 1]), np.sqrt(agg.alphas[t]), 1 / agg.betas[t]
        S = 1 / (lam + A * A * L)
        lemma = S * (A * L * (zt - A * agg.w[t] * e) + lam * mu)
        assert torch.allclose(eq9, lemma, rtol=1e-8, atol=1e-8)
        assert torch.allclose(eq5, lemma, rtol=1e-8, atol=1e-8)
        assert np.isclose(agg.beta_tilde[t], S)


def test_task_weights_default_to_t_over_T_minus_t():
    w = ForwardAggregation.weights("ratio", 1000)
    assert w[0] == 0 and w[500] == 1.0 and w[999] == 999
    assert (ForwardAggregation.weights("constant", 10, 1.0) == 1).all()


def test_masked_patches_are_16px_and_at_most_ten():
    x = torch.ones(64, 3, 64, 64)
    m = mask_patches(x, 10, 16, torch.Generator().manual_seed(0))
    zeros = (m == 0).all(dim=1).sum(dim=(1, 2))
    assert (zeros <= 10 * 256).all() and (zeros == 0).any() and (zeros > 0).float().mean() > 0.8
    assert ((m == 0) | (m == 1)).all()
    assert torch.equal(mask_patches(x, 0, 16), x)
    # each patch's corner is a pixel of the picture, drawn uniformly: one 1-px patch at most
    # (m ~ U{0, 1}) on 4 x 4 pictures masks half of them, one pixel each, every pixel in turn
    one = patch_mask((800, 1, 4, 4), 1, 1, torch.Generator().manual_seed(0))[:, 0]
    per_image = one.sum(dim=(1, 2))
    assert set(per_image.tolist()) == {0.0, 1.0} and 0.44 < per_image.mean() < 0.56
    assert (one.sum(0) > 0).all()


def _mt(task, **over):
    mc = {"task": task, "backbone": {"path": "tiny:unet", "subfolder": None}, "autoencoder": {"path": "tiny:vae", "subfolder": None},
          "labels": ["cat", "person"], "embedding_dim": 32, "head_hidden": 16, **over}
    cfg = TrainConfig.model_validate({"family": "mtdiffusion", "model": mc, "data": {"resolution": 64}})
    return get_family("mtdiffusion"), get_family("mtdiffusion").build(cfg.model, cfg), cfg.model


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pixels": torch.rand(n, 3, 64, 64, generator=g) * 2 - 1,
            "segments": [[{"type": "image", "label": "cat" if i % 2 else "person"}] for i in range(n)],
            "captions": ["a red cat", "a man", "a ginger cat", "a woman"][:n],
            "clip_image": torch.nn.functional.normalize(torch.randn(n, 32, generator=g), dim=-1)}


@pytest.mark.slow
@pytest.mark.parametrize("task", ["masked_image", "image_label", "image_representation"])
def test_mtdiffusion_trains_and_encoders_stop_gradients(tiny_cache, task):
    fam, model, mc = _mt(task, condition_on_data=False)
    opt = torch.optim.AdamW(fam.param_groups(model, mc)[0]["params"], lr=1e-3)
    torch.manual_seed(0)
    batch = _batch()
    batch["pixels"] = batch["pixels"][:1].expand(4, -1, -1, -1)  # one picture: only x tells the samples apart

    def loss_at(t):  # equation 6's loss at a fixed step, same noise each time
        torch.manual_seed(1)
        with torch.no_grad():
            return float(model({**batch, "timesteps": torch.full((4,), t)})["loss"])

    before = loss_at(700)
    for _ in range(30):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        if task != "masked_image":  # U variant: x reaches the UNet only through E(x), whose gradient is stopped
            assert model.context.weight.grad is None
        assert all(p.grad is not None for p in model.head.parameters())
        opt.step()
    assert loss_at(700) < 0.95 * before
    # Algorithm 1 runs all T steps: sample this task's path on a T = 8 twin (T = 1000 took
    # minutes per task on 2 cores, for plumbing the smaller T exercises the same way)
    fam8, model8, _ = _mt(task, condition_on_data=False, schedule={"num_train_timesteps": 8})
    img = fam8.generate(model8.eval(), [["a cat"]], seeds=[0], size=64)[0]
    assert img.size == (64, 64)


def test_mtdiffusion_defaults_are_the_papers():
    """Section 4 and appendix E: masked images (4.1: m ~ U{0..10} patches of 16 px) seen by
    the noise predictor (MT-Diffusion-X), lambda 0.1 (equation 6), w_t = t / (T - t)
    (appendix E; the constant is equation 8's 1), DDPM's linear betas over 1000 steps and
    lr 1e-4 (E.1), E.4's 1024-d CLIP embeddings and 1024-wide MLP head, Algorithm 1 over
    all T steps without guidance (appendix C), and Stable Diffusion 2's UNet and VAE (E.4
    fine-tunes it). Each bound the family sets lets its least value through and refuses one below."""
    from mmloom.train.families.mtdiffusion import LR, Config, Sampling, Schedule

    c = Config()
    assert (c.task, c.translation_source, c.condition_on_data, c.labels) == ("masked_image", "edges", True, [])
    assert (c.max_patches, c.patch_size, c.loss_weight, c.task_weight, c.task_weight_value) == (10, 16, 0.1, "ratio", 1.0)
    assert (c.embedding_dim, c.head_hidden, c.lr.all) == (1024, 1024, 1e-4)
    s = c.schedule
    assert (s.beta_schedule, s.beta_start, s.beta_end, s.num_train_timesteps) == ("linear", 1e-4, 0.02, 1000)
    assert (c.sampling.sampler, c.sampling.steps, c.sampling.guidance) == ("algorithm1", None, None)
    assert (c.backbone.path, c.backbone.subfolder, c.autoencoder.path, c.autoencoder.subfolder, c.autoencoder.type) == (
        "stabilityai/stable-diffusion-2-base", "unet", "stabilityai/stable-diffusion-2-base", "vae", "kl")
    bounds = [(Config, "max_patches", 0), (Config, "patch_size", 1), (Config, "embedding_dim", 1), (Config, "head_hidden", 1),
              (Config, "loss_weight", 0.0), (Config, "task_weight_value", 0.0), (LR, "all", 0.0), (Sampling, "steps", 1)]
    for cls, field, least in bounds:
        assert getattr(cls.model_validate({field: least}), field) == least
        with pytest.raises(ValidationError, match=field):
            cls.model_validate({field: least - 1})
    for field in ("beta_start", "beta_end"):  # any positive beta
        assert getattr(Schedule.model_validate({field: 1e-6}), field) == 1e-6
        with pytest.raises(ValidationError, match=field):
            Schedule.model_validate({field: 0.0})


def test_mtdiffusion_label_task_needs_labels(tiny_cache):
    from mmloom.errors import UserError

    with pytest.raises(UserError, match="model.labels"):
        _mt("image_label", labels=[])


def test_mtdiffusion_task_data_reads_each_samples_label_and_unit_embedding(tiny_cache):
    """image_label: x is the class of each sample's first picture (its crop label, else its
    phrase; case-insensitive; anything else is class 0, 'other'); image_representation: x
    is each stored CLIP embedding scaled to unit length, and a stored width other than
    model.embedding_dim is refused by name."""
    from mmloom.errors import UserError

    _fam, model, _ = _mt("image_label")
    assert model.classes == ["other", "cat", "person"]
    segments = json.loads(json.dumps([  # as read from a shard: strings decoded, not the module's interned literals
        [{"type": "text", "label": "person"}, {"type": "image", "label": "Cat", "phrase": "person"}],
        [{"type": "image", "phrase": "person"}], [{"type": "image", "label": "dog"}], [{"type": "text", "label": "cat"}]]))
    x, mask = model.task_data({"segments": segments}, torch.zeros(4, 3, 64, 64))
    assert x.tolist() == [1, 2, 0, 0] and mask is None
    _fam, model, _ = _mt("image_representation")
    emb = torch.randn(3, 32, generator=torch.Generator().manual_seed(0)) * torch.tensor([[0.5], [3.0], [9.0]])
    x, mask = model.task_data({"clip_image": emb}, torch.zeros(3, 3, 64, 64))
    assert torch.allclose(x, emb / emb.norm(dim=-1, keepdim=True)) and mask is None
    for width in (16, 48):
        with pytest.raises(UserError, match=f"embedding_dim is 32 but the stored CLIP image embeddings are {width}-d"):
            model.task_data({"clip_image": torch.randn(3, width)}, torch.zeros(3, 3, 64, 64))
    with pytest.raises(UserError, match="store_embeddings"):
        model.task_data({}, torch.zeros(3, 3, 64, 64))
    _fam, model, _ = _mt("image_representation", embedding_dim=1024)  # E.4's width: ints past CPython's small-int cache
    assert model.task_data({"clip_image": torch.randn(2, 1024)}, torch.zeros(2, 3, 64, 64))[0].shape == (2, 1024)


def test_mtdiffusion_prompt_gives_x_for_its_task(tiny_cache):
    """What a prompt gives as the known x at sampling: a picture (masked image, translation
    source) as [-1, 1] pixels, a label the prompt names as its class, and for embeddings
    nothing (the head estimates it)."""
    from PIL import Image

    _fam, model, _ = _mt("image_label")
    assert model._known(["a person on a cat"], 64, "cpu").tolist() == [2]
    assert model._known(["a dog"], 64, "cpu") is None
    _fam, model, _ = _mt("image_representation")
    assert model._known(["a cat", Image.new("RGB", (8, 8))], 64, "cpu") is None
    _fam, model, _ = _mt("image_translation")
    x = model._known(["to", Image.new("RGB", (16, 16), (255, 0, 51))], 32, "cpu")
    assert x.shape == (1, 3, 32, 32) and torch.allclose(x[0, :, 5, 5], torch.tensor([1.0, -1.0, 51 / 127.5 - 1]))
    assert model._known(["no picture"], 32, "cpu") is None


def test_mtdiffusion_label_estimate_is_the_heads_class_probabilities(tiny_cache):
    """Algorithm 1 feeds E(x^) the head's estimate of the missing label: for labels, the
    softmax over the classes of the head's logits on the mid-block features, which
    context_of turns into the probability-weighted mixture of the label embeddings (a
    one-hot estimate is that label's own embedding)."""
    zt = torch.randn(2, 4, 8, 8)

    def head_on_mid(model):  # one UNet pass, then the head on its mid-block features, as Algorithm 1 reads them
        model.unet(zt, torch.tensor([3, 700]), encoder_hidden_states=model.null_context.expand(2, -1, -1))
        return model.head(model._feats["mid"].mean(dim=(2, 3)))

    _fam, model, _ = _mt("image_label")
    model.eval()
    with torch.no_grad():
        logits = head_on_mid(model)
        est = model._estimate()
        assert est.shape == (2, len(model.classes))
        assert torch.allclose(est, logits.float().softmax(-1)) and torch.allclose(est.sum(-1), torch.ones(2))
        mix = model.context_of(est)
        assert torch.allclose(mix[:, 0], est @ model.context.weight, atol=1e-6)
        one_hot = torch.nn.functional.one_hot(torch.tensor([1]), len(model.classes)).float()
        assert torch.allclose(model.context_of(one_hot), model.context_of(torch.tensor([1])), atol=1e-6)
    # with no label in the prompt, Algorithm 1 starts from the uniform distribution over the
    # classes (the paper "randomly initializes" x; this is mmloom's start for a label), then the head's
    fam, label_model, _ = _mt("image_label", schedule={"num_train_timesteps": 3})
    seen, real_encode = [], label_model.encode
    label_model.encode = lambda x, like, *g: seen.append(x.clone()) or real_encode(x, like, *g)
    fam.generate(label_model.eval(), [["a photo"]], seeds=[0], size=64)
    assert torch.equal(seen[0], torch.full((1, 3), 1 / 3)) and len(seen) == 4  # the start, then one estimate per step
    # an embedding's estimate is the head's output as it is (E.4's regression target)
    _fam, model, _ = _mt("image_representation")
    model.eval()
    with torch.no_grad():
        out = head_on_mid(model)
        assert torch.equal(model._estimate(), out.float())


def test_mtdiffusion_samples_all_T_steps_without_guidance_only(tiny_cache):
    """Algorithm 1 runs all T steps and has no classifier-free guidance: other settings are
    refused by name rather than ignored."""
    from mmloom.errors import UserError

    fam, model, _ = _mt("masked_image", schedule={"num_train_timesteps": 4})
    for steps in (50, 3):  # more or fewer
        with pytest.raises(UserError, match=f"all T = 4 steps; {steps} steps"):
            fam.generate(model.eval(), [["a cat"]], steps=steps, seeds=[0], size=64)
    with pytest.raises(UserError, match="no classifier-free guidance"):
        fam.generate(model, [["a cat"]], guidance=6.0, seeds=[0], size=64)
    assert fam.generate(model, [["a cat"]], steps=4, seeds=[0], size=64)[0].size == (64, 64)
    # seeds: one per prompt, 0, 1, ... unless given; the size: the UNet's sample size in pixels unless given
    pix = lambda imgs: [np.asarray(im) for im in imgs]  # noqa: E731
    two = pix(fam.generate(model, [["a cat"], ["a cat"]]))
    assert [p.shape for p in two] == [(64, 64, 3)] * 2 and not np.array_equal(*two)
    assert all(np.array_equal(a, b) for a, b in zip(two, pix(fam.generate(model, [["a cat"], ["a cat"]], seeds=[0, 1]))))
    assert all(np.array_equal(a, b) for a, b in zip(two[::-1], pix(fam.generate(model, [["a cat"], ["a cat"]], seeds=[1, 0]))))
    # T compared by value: above 256, CPython's ints are distinct objects
    _fam, long, _ = _mt("masked_image", schedule={"num_train_timesteps": 300})
    assert fam.generate(long.eval(), [["a cat"]], steps=300, seeds=[0], size=64)[0].size == (64, 64)


def test_mtdiffusion_x_widens_the_unet_with_zero_channels_in_the_released_layout(tiny_cache, tmp_path):
    """MT-Diffusion-X on pictures: SD 2 inpainting's 9 input channels (latent, mask, E(x))
    for masked_image, InstructPix2Pix's 8 for image_translation; the new channels start at
    zero, so the widened UNet predicts what the plain one does until training moves them."""
    from mmloom.train.diffusion import load_unet

    plain = load_unet("tiny:unet", None)
    zt = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for task, channels in (("masked_image", 9), ("image_translation", 8)):
        _, model, _ = _mt(task)
        assert model.unet.config.in_channels == channels and model.unet.conv_in.in_channels == channels
        assert torch.equal(model.unet.conv_in.weight[:, :4], plain.conv_in.weight)
        ctx = model.null_context.detach()
        e, mask = torch.randn(1, 4, 8, 8), torch.ones(1, 1, 64, 64)
        with torch.no_grad():
            widened = model.unet(model._unet_input(zt, e, mask), 5, encoder_hidden_states=ctx).sample
            base = plain(zt, 5, encoder_hidden_states=ctx).sample
        assert torch.allclose(widened, base, atol=1e-5)
        inp = model._unet_input(zt, e, mask)
        assert torch.equal(inp[:, :4], zt) and torch.equal(inp[:, -4:], e)  # the released channel order
    _, u, _ = _mt("masked_image", condition_on_data=False)
    assert u.unet.config.in_channels == 4  # MT-Diffusion-U: (z_t, t) only
    # a UNet already in that layout loads as it is; a UNet of another width is refused, naming both
    from mmloom.errors import UserError

    model.unet.save_pretrained(tmp_path / "u8")  # image_translation's 8
    u8 = {"path": str(tmp_path / "u8"), "subfolder": None}
    _, again, _ = _mt("image_translation", backbone=u8)
    assert again.unet.config.in_channels == 8 and torch.equal(again.unet.conv_in.weight, model.unet.conv_in.weight)
    with pytest.raises(UserError, match="the UNet has 8 input channels; MT-Diffusion-X on masked_image needs 4 \\(widened here\\) or 9"):
        _mt("masked_image", backbone=u8)


def test_mtdiffusion_u_context_is_one_learned_token(tiny_cache):
    """What the noise predictor cross-attends to when x is not a context (pictures go in as
    channels; MT-Diffusion-U sees no x): one learned token of the UNet's context width,
    initialized at N(0, 0.02^2) (mmloom's choice: SD's UNet needs a context, the paper's
    noise predictor has none), the same for every sample of a batch."""
    for task, over, x in (("masked_image", {}, torch.zeros(3, 3, 64, 64)), ("image_label", {"condition_on_data": False}, torch.tensor([0, 1, 2]))):
        torch.manual_seed(0)
        _, model, _ = _mt(task, **over)
        cross = model.unet.config.cross_attention_dim
        null = model.null_context
        assert null.shape == (1, 1, cross) and null.requires_grad
        assert 0.01 < float(null.std()) < 0.04 and abs(float(null.mean())) < 0.02
        ctx = model._denoiser_context(x, 3)
        assert ctx.shape == (3, 1, cross) and torch.equal(ctx, null.expand(3, 1, cross))


def test_mtdiffusion_contexts_of_labels_and_embeddings(tiny_cache):
    """x as cross-attention context (4.2, E.4): a label is its embedding row, a label
    estimate (class probabilities, Algorithm 1) the mixture of the rows, a CLIP embedding
    its linear map; one token each. MT-Diffusion-X's noise predictor sees that context,
    -U's the null token. E(x) runs the UNet on zeros at t = 0 with the context, one step
    per sample, without gradients."""
    g = torch.Generator().manual_seed(0)
    _, model, _ = _mt("image_label")
    labels, probs = torch.tensor([2, 0, 1]), torch.softmax(torch.randn(3, 3, generator=g), -1)
    assert torch.equal(model.context_of(labels), model.context.weight[labels].unsqueeze(1))
    assert torch.allclose(model.context_of(probs), (probs @ model.context.weight).unsqueeze(1))
    assert torch.equal(model._denoiser_context(labels, 3), model.context_of(labels))
    like = torch.zeros(3, 4, 8, 8)
    e = model.encode(labels, like)
    with torch.no_grad():
        ref = model.unet(like, torch.zeros(3, dtype=torch.long), encoder_hidden_states=model.context_of(labels)).sample
    assert torch.equal(e, ref) and not e.requires_grad
    _, u, _ = _mt("image_label", condition_on_data=False)
    assert torch.equal(u._denoiser_context(labels, 3), u.null_context.expand(3, 1, -1))
    _, rep, _ = _mt("image_representation")
    emb = torch.randn(3, 32, generator=g)
    assert torch.allclose(rep.context_of(emb), rep.context(emb).unsqueeze(1)) and rep.context_of(emb).shape == (3, 1, 32)


def test_mtdiffusion_heads_read_the_last_level_of_a_deeper_unet(tiny_cache, tmp_path):
    """The label and embedding heads read the middle block's features, as wide as the
    UNet's last level (SD's 1280 of 320, 640, 1280, 1280): a three-level UNet whose widths
    all differ trains a step. MT-Diffusion-U refuses a UNet whose input is not the latents'."""
    from diffusers import UNet2DConditionModel

    from mmloom.errors import UserError

    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 48),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                         attention_head_dim=8, norm_num_groups=8).save_pretrained(tmp_path / "deep")
    deep = {"path": str(tmp_path / "deep"), "subfolder": None}
    for task in ("image_label", "image_representation"):
        _, model, _ = _mt(task, backbone=deep)
        assert model.head[0].normalized_shape == (48,)
        assert bool(torch.isfinite(model(_batch(2))["loss"]))
    for channels in (2, 8):  # narrower or wider than the 4 latent channels
        UNet2DConditionModel(**{**dict(UNet2DConditionModel.load_config(tmp_path / "deep")), "in_channels": channels}).save_pretrained(
            tmp_path / f"in{channels}")
        with pytest.raises(UserError, match=f"the UNet has {channels} input channels but the autoencoder's latents have 4"):
            _mt("masked_image", condition_on_data=False, backbone={"path": str(tmp_path / f"in{channels}"), "subfolder": None})


def test_mtdiffusion_x_sees_the_masked_picture_in_training(tiny_cache):
    """X's noise prediction depends on x: the gradient reaches the widened input channels
    (with U's layout it cannot), and the patch mask rides in channel 4."""
    fam, model, mc = _mt("masked_image", max_patches=4)
    out = model({**_batch(2), "timesteps": torch.tensor([300, 600])})
    out["loss"].backward()
    g = model.unet.conv_in.weight.grad
    assert g[:, 4:].abs().sum() > 0
    torch.manual_seed(0)
    x, mask = model.task_data(_batch(2), _batch(2)["pixels"])
    assert torch.equal(x == 0, (mask.bool() | (_batch(2)["pixels"] == 0)).expand_as(x))


def test_mtdiffusion_translation_sources():
    """E.1's source pictures: grayscale by the luma weights, Canny edges, the first crop."""
    from PIL import Image

    from mmloom.train.families.mtdiffusion import translation_source

    px = -torch.ones(2, 3, 32, 32)
    px[:, 0] = 1.0  # red
    px[:, :, 8:24, 8:24] = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1)  # a green square
    gray = translation_source("grayscale", px)
    assert gray.shape == px.shape and torch.allclose(gray[0, :, 0, 0], torch.full((3,), 0.299 - 0.587 - 0.114))
    rgb = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]  # ITU-R 601, as Pillow's "L"
    assert torch.allclose(translation_source("grayscale", rgb), luma.unsqueeze(1).expand(-1, 3, -1, -1))
    edges = translation_source("edges", px)
    assert (edges[0, 0, 6:10, 16] == 1.0).any() and edges[0, 0, 16, 16] == -1.0  # an edge on the border, none inside
    assert (edges[0, 0, :, 2] == -1.0).all()  # none in the flat red
    blue = Image.new("RGB", (10, 10), (0, 90, 255))
    over = px * 1.5  # a target outside [-1, 1] is clamped, not wrapped around in 8 bits
    crop = translation_source("crop", over, [["a ", blue, " thing"], ["no crop"]])
    assert torch.allclose(crop[0, :, 16, 16], torch.tensor([-1.0, 90 / 127.5 - 1, 1.0]))
    assert torch.equal(crop[1], px[1])  # no crop: the target itself


@pytest.mark.parametrize("task", ["image_translation"])
def test_mtdiffusion_translation_trains_and_generates(tiny_cache, task):
    fam, model, mc = _mt(task, translation_source="grayscale")
    out = model(_batch(2))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(p.grad is not None for p in model.head.parameters())
    fam8, model8, _ = _mt(task, translation_source="grayscale", schedule={"num_train_timesteps": 4})
    from PIL import Image

    src = Image.new("RGB", (64, 64), (90, 90, 90))
    a, b = (fam8.generate(model8.eval(), [[p]], seeds=[0], size=64)[0] for p in (src, Image.new("RGB", (64, 64), (250, 250, 250))))
    assert a.size == (64, 64) and a.tobytes() != b.tobytes()  # the source steers the sample


def test_mtdiffusion_representation_starts_from_a_random_embedding_one_picture_per_prompt(tiny_cache):
    """E.4 with no embedding given: Algorithm 1 starts x at a random direction of unit
    length, as the training embeddings are (the prompt's seed draws it, first), replaces it
    each step with the head's estimate, and each prompt gives one picture."""
    fam, model, _ = _mt("image_representation", schedule={"num_train_timesteps": 4})
    model.eval()
    encode, seen, grad = model.encode, [], []
    model.encode = lambda x, like, *g: seen.append(x) or grad.append(torch.is_grad_enabled()) or encode(x, like, *g)
    pics = fam.generate(model, [["a cat"], ["a cat"]], seeds=[5, 6], size=64)
    assert not any(grad)  # sampling builds no autograd graph
    assert len(pics) == 2 and all(p.size == (64, 64) for p in pics) and pics[0].tobytes() != pics[1].tobytes()
    assert len(seen) == 2 * (1 + 4)  # the start, then one estimate per step
    for start, seed in ((seen[0], 5), (seen[5], 6)):
        draw = torch.randn((1, 32), generator=torch.Generator().manual_seed(seed))
        assert torch.allclose(start, draw / draw.norm(), atol=1e-6, rtol=0) and abs(float(start.norm()) - 1) < 1e-6
    assert all(x.shape == (1, 32) for x in seen) and not torch.equal(seen[1], seen[0])


def test_mtdiffusion_constrained_restoration_keeps_every_unmasked_pixel(tiny_cache):
    """Section 4.1's constrained restoration: masked pixels are restored (the decoder's),
    every other pixel is returned exactly as given; x is the picture with its masked pixels
    zero; after each step the latent cells touching no masked pixel are on the given
    picture's forward marginal at t - 1 (RePaint), the others on the sampler's own step; a
    --mask picture chooses the pixels instead."""
    from PIL import Image

    from mmloom.errors import UserError

    fam, model, _ = _mt("masked_image", schedule={"num_train_timesteps": 4})
    model.eval()
    rng = np.random.default_rng(0)
    arr = rng.integers(1, 255, (64, 64, 3), dtype=np.uint8)
    arr[16:40, 20:44] = 0  # the masked patch: black in every channel
    masked = Image.fromarray(arr)
    decoded = []
    decode = model.ae.decode
    model.ae.decode = lambda z: decoded.append(z) or decode(z)
    encode = model.ae.encode
    given, pictures = [], []
    model.ae.encode = lambda px, *g: pictures.append(px) or given.append(encode(px, *g)) or given[-1]
    marginal, step = model.agg.marginal, model.agg.posterior_mean_eps
    chain = []  # ("marginal", t, z_t) and ("step", z_t in, z_{t-1} out) in the order the sampler calls them
    model.agg.marginal = lambda z0, e, t, eps: chain.append(("marginal", int(t), marginal(z0, e, t, eps))) or chain[-1][2]
    model.agg.posterior_mean_eps = lambda z, eps, e, t: chain.append(("step", z, step(z, eps, e, t))) or chain[-1][2]
    out = np.asarray(fam.generate(model, [[masked]], seeds=[3], size=64, restore=True)[0])
    model.agg.marginal, model.agg.posterior_mean_eps = marginal, step
    hole = np.zeros((64, 64), bool)
    hole[16:40, 20:44] = True
    assert np.array_equal(out[~hole], arr[~hole])
    assert out[hole].any()  # the patch was filled in, not left black
    # the restored pixels are the decoder's, and x (section 4.1) has its masked pixels zero
    from mmloom.train.diffusion import to_pil

    assert np.array_equal(out[hole], np.asarray(to_pil(decode(decoded[-1]))[0])[hole])
    x = pictures[0][0].permute(1, 2, 0)
    assert torch.equal(x[torch.from_numpy(hole)], torch.zeros(int(hole.sum()), 3)) and x[torch.from_numpy(~hole)].abs().min() > 0
    # RePaint's replacement: latent cells touching no masked pixel end on the given picture's latent
    z, z_given = decoded[-1], given[0]  # encoded first: the picture whose unmasked cells are kept
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[2:5, 2:6] = False  # pixels 16-39 x 20-43 touch latent rows 2-4, columns 2-5
    assert torch.equal(z[0][:, keep], z_given[0][:, keep]) and not torch.equal(z[0][:, ~keep], z_given[0][:, ~keep])
    # ... and on the way there, after step t the kept cells sit on the given picture's forward
    # marginal at t - 1, while the masked cells carry on from the sampler's own step
    assert [c[1] for c in chain if c[0] == "marginal"] == [3, 2, 1, 0]  # the start at T - 1, then t - 1 for t = 3, 2, 1
    steps = [c for c in chain if c[0] == "step"]
    assert len(steps) == 4  # one per t, T = 4
    on_chain = [c[2] for c in chain if c[0] == "marginal"][1:] + [z_given]
    for (_, _, stepped), (_, z_next, _), kept in zip(steps, steps[1:] + [(None, z, None)], on_chain):
        assert torch.equal(z_next[0][:, keep], kept[0][:, keep])
        noise = z_next[0][:, ~keep] - stepped[0][:, ~keep]  # the step's own noise, none after the last step
        assert (noise.abs().max() > 0) if z_next is not z else torch.equal(noise, torch.zeros_like(noise))
    model.ae.decode, model.ae.encode = decode, encode
    # a mask picture: restore a different square, the zeros elsewhere are kept as given
    m = np.full((64, 64), 127, np.uint8)  # white = restore: above mid-grey (127 and darker keep)
    m[0:8, 0:8] = 128
    out2 = np.asarray(fam.generate(model, [[masked]], seeds=[3], size=64, restore=True, mask=Image.fromarray(m))[0])
    keep = np.ones((64, 64), bool)
    keep[0:8, 0:8] = False
    assert np.array_equal(out2[keep], arr[keep]) and not np.array_equal(out2[~keep], arr[~keep])
    with pytest.raises(UserError, match="no masked pixels"):
        fam.generate(model, [[Image.fromarray(np.full((64, 64, 3), 9, np.uint8))]], seeds=[0], size=64, restore=True)
    with pytest.raises(UserError, match="needs model.task masked_image"):
        fam8, m8, _ = _mt("image_translation", schedule={"num_train_timesteps": 4})
        fam8.generate(m8, [[masked]], seeds=[0], size=64, restore=True)
    with pytest.raises(UserError, match="restore: not a sampling option of mvader|not a sampling option"):
        get_family("mvader").generate(None, [["x"]], restore=True)


# -- Kandinsky -------------------------------------------------------------------------------
def test_linear_prior_recovers_a_linear_map():
    from mmloom.train.families.kandinsky import LinearPrior, Normalizer

    g = torch.Generator().manual_seed(0)
    D = 16
    A, b = torch.randn(D, D, generator=g) / 4, torch.randn(D, generator=g)
    text = torch.randn(512, D, generator=g)
    image = text @ A.T + b + 0.01 * torch.randn(512, D, generator=g)
    norm = Normalizer(D)
    norm.fit(image.mean(0), image.std(0), len(image))
    prior = LinearPrior(D)
    opt = torch.optim.Adam(prior.parameters(), lr=1e-2)
    for _ in range(1500):
        loss = torch.nn.functional.mse_loss(prior(None, None, text), norm(image))
        opt.zero_grad()
        loss.backward()
        opt.step()
    test = torch.randn(64, D, generator=g)
    pred = norm.inverse(prior(None, None, test))
    truth = test @ A.T + b
    assert (pred - truth).norm() / truth.norm() < 0.02


@pytest.mark.parametrize("with_norm", [True, False])
def test_normalization_round_trips_and_uses_the_selected_samples_statistics(tmp_path, with_norm):
    """Statistics over the whole dataset the prior trains on: every selected sample of
    every shard, and no reject (rejects here sit far off, so counting them would shift
    mean and std); at CLIP's own scale, the stored unit vector times its stored norm, where
    the score stage stored the norm (``with_norm``), else the vectors as stored."""
    from mmloom.manifests.store import ShardStore
    from mmloom.train.embed_stats import embedding_stats
    from mmloom.train.families.kandinsky import Normalizer

    rng = np.random.default_rng(0)
    store = ShardStore(str(tmp_path / "ds"))
    all_emb, kept = [], []
    for shard in range(3):
        emb = rng.normal(loc=np.arange(8), scale=np.arange(1, 9), size=(20, 8)).astype(np.float32)
        emb[15:] += 50.0  # the rejects: 5 per shard
        all_emb.append(emb)
        kept.append(emb[:15])
        staging = store.staging_dir("scores", shard)
        p = f"{staging}/s.parquet"
        cols = {"sample_key": [f"{shard}-{i}" for i in range(20)], "clip_image_embedding": [list(map(float, r)) for r in emb]}
        if with_norm:
            length = np.linalg.norm(emb, axis=1)
            cols.update(clip_image_embedding=[list(map(float, r)) for r in emb / length[:, None]],
                        clip_image_norm=pa.array(length, pa.float32()))
        pq.write_table(pa.table(cols), p)
        store.commit("score", shard, {f"scores/{shard:05d}.parquet": p}, {"rows": 20}, "h")
    staging = store.staging_dir("selection", 0)
    sel, rej = f"{staging}/selected.parquet", f"{staging}/rejects.parquet"
    pq.write_table(pa.table({"sample_key": [f"{s}-{i}" for s in range(3) for i in range(15)]}), sel)
    pq.write_table(pa.table({"sample_key": [f"{s}-{i}" for s in range(3) for i in range(15, 20)]}), rej)
    from mmloom.manifests.schemas import REJECTS_FILE, SELECTED_FILE

    store.commit("select", 0, {SELECTED_FILE: sel, REJECTS_FILE: rej}, {"selected": 45}, "h")
    mean, std, n = embedding_stats(str(tmp_path / "ds"))
    full, everything = np.concatenate(kept), np.concatenate(all_emb)
    assert n == 45 and np.allclose(mean, full.mean(0), atol=1e-5) and np.allclose(std, full.std(0), atol=1e-4)
    assert not np.allclose(mean, everything.mean(0), atol=1.0)  # the rejects would have moved it
    norm = Normalizer(8)
    norm.fit(mean, std, n)
    x = torch.from_numpy(full)
    assert torch.allclose(norm.inverse(norm(x)), x, atol=1e-5)
    z = norm(x)
    assert torch.allclose(z.mean(0), torch.zeros(8), atol=1e-5) and torch.allclose(z.std(0, unbiased=False), torch.ones(8), atol=1e-4)


def _kandinsky(stage, **over):
    mc = {"stage": stage, "encoder": {"path": "tiny:clip"}, "prior": "diffusion", "prior_layers": 2, "prior_heads": 2,
          "prior_width": 32, "backbone": {"path": "tiny:kandinsky-unet", "subfolder": None},
          "text_encoder": {"path": "tiny:mclip", "subfolder": None, "tokenizer_subfolder": None},
          "autoencoder": {"path": "tiny:vq", "subfolder": None}, **over}
    cfg = TrainConfig.model_validate({"family": "kandinsky", "model": mc, "data": {"resolution": 64}})
    fam = get_family("kandinsky")
    return fam, fam.build(cfg.model, cfg), cfg.model


def _fit(fam, model, mc, steps: int) -> list[float]:
    """``steps`` AdamW updates (lr 2e-3) of the family's first parameter group on fresh tiny
    batches; the losses."""
    opt = torch.optim.AdamW(fam.param_groups(model, mc)[0]["params"], lr=2e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(steps):
        loss = model(_batch())["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def test_kandinsky_defaults_are_section_4s_and_the_released_models(tiny_cache):
    """Section 4 and Table 3: the diffusion prior is a transformer encoder of 20 layers, 32
    heads, width 2048; the residual prior 18 residual MLP blocks; the linear prior one
    linear layer. The rest is the released Kandinsky 2.1's: ViT-L/14 CLIP, the prior's
    cosine schedule, the decoder's linear betas 0.00085 to 0.012 over 1000 steps, the
    released checkpoints' folders. Each size reaches the network built from it."""
    from mmloom.train.families.kandinsky import Config, DiffusionPrior, LinearPrior, ResidualPrior

    c = Config()
    assert (c.stage, c.prior, c.prior_layers, c.prior_heads, c.prior_width, c.residual_blocks) == ("prior", "diffusion", 20, 32, 2048, 18)
    assert (c.prior_schedule.beta_schedule, c.prior_schedule.num_train_timesteps) == ("squaredcos_cap_v2", 1000)
    s = c.schedule
    assert (s.beta_schedule, s.beta_start, s.beta_end, s.num_train_timesteps) == ("linear", 0.00085, 0.012, 1000)
    assert c.encoder.path == "ViT-L-14/openai" and (c.prior_model.path, c.prior_model.subfolder) == (
        "kandinsky-community/kandinsky-2-1-prior", "prior")
    assert (c.backbone.path, c.backbone.subfolder, c.autoencoder.subfolder, c.autoencoder.type) == (
        "kandinsky-community/kandinsky-2-1", "unet", "movq", "vq")
    assert (c.text_encoder.path, c.text_encoder.subfolder, c.text_encoder.tokenizer_subfolder) == (
        "kandinsky-community/kandinsky-2-1", "text_encoder", "tokenizer")
    assert (c.prior_stats, c.cond_dropout, c.text_weight, c.use_stored_embeddings, c.prior_checkpoint) == ("dataset", 0.1, 0.5, True, None)
    assert (c.lr.prior, c.lr.unet) == (1e-4, 1e-4)
    for field in ("prior_layers", "prior_heads", "prior_width", "residual_blocks"):  # any size from 1
        assert getattr(Config.model_validate({field: 1}), field) == 1
        with pytest.raises(ValidationError, match=field):
            Config.model_validate({field: 0})
    _fam, model, _ = _kandinsky("prior", prior_layers=3, prior_heads=4, prior_width=48)
    p = model.prior
    assert isinstance(p, DiffusionPrior) and len(p.blocks.layers) == 3 and p.width == 48
    assert p.blocks.layers[0].self_attn.num_heads == 4 and p.blocks.layers[0].linear1.out_features == 4 * 48
    assert model.prior_sched.config.beta_schedule == "squaredcos_cap_v2" and model.prior_sched.config.prediction_type == "sample"
    _fam, model, _ = _kandinsky("prior", prior="residual", residual_blocks=5, prior_width=48)
    assert isinstance(model.prior, ResidualPrior) and len(model.prior.blocks) == 5 and model.prior.inp.out_features == 48
    _fam, model, _ = _kandinsky("prior", prior="linear")
    assert isinstance(model.prior, LinearPrior) and [type(m) for m in model.prior.children()] == [torch.nn.Linear]


def test_kandinsky_released_prior_reads_the_scheduler_beside_its_folder(tiny_cache, tmp_path):
    """``model.prior_model.subfolder``: the scheduler is read from ``scheduler/`` beside the
    prior's folder (``prior/`` -> ``scheduler/``, as the released repository lays them out),
    also when both sit deeper in a repository (``k21/prior`` -> ``k21/scheduler``)."""
    import shutil

    from mmloom.testkit.tiny_train import resolve_tiny

    shutil.copytree(resolve_tiny("tiny:kandinsky-prior"), tmp_path / "repo" / "k21")
    _fam, model, _ = _kandinsky("prior", prior="released", encoder={"path": "tiny:clip-l"},
                                prior_model={"path": str(tmp_path / "repo"), "subfolder": "k21/prior"})
    assert type(model.prior_sched).__name__ == "UnCLIPScheduler" and model.prior.config.num_embeddings == 77


def test_kandinsky_demo_runs_use_the_datasets_clip_and_the_decoder_samples_through_the_prior_run():
    """The demo trains the prior, then the decoder: both on the CLIP whose embeddings the
    score stage stored; the decoder samples text through the prior run before it."""
    fam = get_family("kandinsky")
    runs = {"kandinsky-prior-tiny": "/runs/prior"}
    assert fam.demo_overrides("kandinsky-prior-tiny", {}, "ViT-B-32/openai") == {"model.encoder.path": "ViT-B-32/openai"}
    assert fam.demo_overrides("kandinsky-decoder-tiny", runs, "ViT-B-32/openai") == {
        "model.encoder.path": "ViT-B-32/openai", "model.prior_checkpoint": "/runs/prior"}
    assert fam.demo_prompt(["a.png", "b.png"]) == "a red circle <image:a.png>" and fam.demo_prompt([]) == "a red circle"


def test_kandinsky_released_prior_at_the_released_768_width_loads_and_embeds(tmp_path):
    """The released prior's widths, 768-d embeddings and 77 768-wide text tokens, beside a
    CLIP as wide (ViT-L/14's): the build accepts them and the prior embeds a prompt. The
    width check compares values, not objects (CPython keeps one object per int only up to
    256, so every narrower test passed an identity check too); towers tiny but for the
    text tower's width and the 49,408-token vocabulary (about 50 M parameters)."""
    from mmloom.testkit.tiny_train import make_tiny_clip_l, make_tiny_kandinsky_prior

    clip = make_tiny_clip_l(str(tmp_path / "clip-l"), embed_dim=768, text_width=768)
    prior = make_tiny_kandinsky_prior(str(tmp_path / "prior"), dim=768)
    _fam, model, _ = _kandinsky("prior", prior="released", prior_stats="checkpoint", encoder={"path": clip},
                                prior_model={"path": prior, "subfolder": "prior"})
    assert (model.dim, model.text_width, model.prior.config.embedding_dim) == (768, 768, 768)
    emb = model.prior_embed(["a red circle", "a blue square"], steps=2)
    assert emb.shape == (2, 768) and bool(torch.isfinite(emb).all())


def test_kandinsky_decoder_at_the_released_widths_builds_and_trains(tiny_cache, tmp_path):
    """The released decoder's widths: 768-d CLIP image embeddings (cross_attention_dim),
    the multilingual encoder's 1024-wide tokens (encoder_hid_dim) mapped to 768 (numDims).
    The build accepts them (compared by value: CPython keeps one object per int only up
    to 256) and a training step's loss is finite."""
    from mmloom.testkit.tiny_train import make_tiny_clip_l, make_tiny_mclip, make_tiny_unet_kandinsky

    _fam, model, _ = _kandinsky(
        "decoder", encoder={"path": make_tiny_clip_l(str(tmp_path / "clip"), embed_dim=768)},
        backbone={"path": make_tiny_unet_kandinsky(str(tmp_path / "unet"), clip_dim=768, text_width=1024), "subfolder": None},
        text_encoder={"path": make_tiny_mclip(str(tmp_path / "mclip"), hidden=1024, dim=768), "subfolder": None,
                      "tokenizer_subfolder": None})
    assert (model.unet.config.cross_attention_dim, model.unet.config.encoder_hid_dim, model.text_encoder.config.numDims) == (768, 1024, 768)
    assert not any(p.requires_grad for p in model.text_encoder.parameters())  # frozen, as CLIP
    batch = {**_batch(2), "clip_image": torch.randn(2, 768)}
    assert bool(torch.isfinite(model(batch)["loss"]))


def test_kandinsky_refuses_models_and_data_that_do_not_fit_naming_the_setting(tiny_cache, tmp_path, monkeypatch):
    """Released-layout parts that cannot work together stop the build with one UserError
    naming the setting and the widths, before anything trains: a decoder UNet that is not
    Kandinsky 2.1's (no text_image_proj), one expecting other image or text widths, a text
    encoder of another width, output channels that are neither epsilon nor epsilon and
    variance; a prior whose heads do not divide its width; a released prior of another
    width (embeddings or text tokens), or one whose statistics were never fitted kept with
    prior_stats: checkpoint.
    Data: no stored embeddings, or of another width, or no shards to fit statistics on."""
    import json

    from diffusers import PriorTransformer, UNet2DConditionModel

    from mmloom.errors import UserError
    from mmloom.testkit.tiny_train import (kandinsky_unet_config, make_tiny_clip_l, make_tiny_kandinsky_prior, make_tiny_mclip,
                                           make_tiny_unet_kandinsky, resolve_tiny)

    def refused(stage, match, **over):
        with pytest.raises(UserError, match=match) as e:
            _kandinsky(stage, **over)
        assert "\n" not in str(e.value)

    unet = lambda path: {"path": str(path), "subfolder": None}  # noqa: E731
    refused("decoder", "model.backbone.path tiny:unet: a Kandinsky decoder needs encoder_hid_dim_type 'text_image_proj'",
            backbone={"path": "tiny:unet", "subfolder": None})
    UNet2DConditionModel(**{**kandinsky_unet_config(), "addition_embed_type": None}).save_pretrained(tmp_path / "no-added")
    refused("decoder", "needs encoder_hid_dim_type 'text_image_proj' and addition_embed_type 'text_image'", backbone=unet(tmp_path / "no-added"))
    UNet2DConditionModel(**{**kandinsky_unet_config(), "encoder_hid_dim_type": "text_proj"}).save_pretrained(tmp_path / "text-proj")
    refused("decoder", "needs encoder_hid_dim_type 'text_image_proj' and addition_embed_type 'text_image'", backbone=unet(tmp_path / "text-proj"))
    refused("decoder", "expects 16-d image embeddings and 48-d text tokens; model.encoder.path tiny:clip gives 32-d",
            backbone=unet(make_tiny_unet_kandinsky(str(tmp_path / "u16"), clip_dim=16)))
    refused("decoder", "expects 32-d image embeddings and 40-d text tokens; .* gives 32-d and model.text_encoder.path .* 48-d tokens, 32-d pooled",
            backbone=unet(make_tiny_unet_kandinsky(str(tmp_path / "t40"), text_width=40)))
    refused("decoder", "expects 32-d image embeddings and 56-d text tokens; .* gives 32-d and model.text_encoder.path .* 48-d tokens",
            backbone=unet(make_tiny_unet_kandinsky(str(tmp_path / "t56"), text_width=56)))  # wider than the encoder's, too
    refused("decoder", "expects 48-d image embeddings and 48-d text tokens; model.encoder.path tiny:clip gives 32-d",
            backbone=unet(make_tiny_unet_kandinsky(str(tmp_path / "u48"), clip_dim=48)))  # wider image embeddings, too
    refused("decoder", "48-d tokens, 48-d pooled", text_encoder={"path": make_tiny_mclip(str(tmp_path / "m48"), dim=48),
                                                                 "subfolder": None, "tokenizer_subfolder": None})
    refused("decoder", "48-d tokens, 16-d pooled", text_encoder={"path": make_tiny_mclip(str(tmp_path / "m16"), dim=16),
                                                                 "subfolder": None, "tokenizer_subfolder": None})
    UNet2DConditionModel(**{**kandinsky_unet_config(), "out_channels": 6}).save_pretrained(tmp_path / "o6")
    refused("decoder", "out_channels 6 is neither in_channels \\(4, epsilon\\) nor twice that", backbone=unet(tmp_path / "o6"))
    UNet2DConditionModel(**{**kandinsky_unet_config(), "out_channels": 4}).save_pretrained(tmp_path / "o4")
    _fam, model, _ = _kandinsky("decoder", backbone=unet(tmp_path / "o4"))
    assert model.unet.config.out_channels == 4 and not hasattr(model, "prior")
    _fam, decoder, _ = _kandinsky("decoder", prior="released")  # the prior setting is the prior run's: a decoder ignores it
    assert hasattr(decoder, "unet") and not hasattr(decoder, "prior")
    out = torch.randn(2, 4, 8, 8)
    assert torch.equal(model._eps(out), out)  # epsilon alone: all of it
    refused("prior", "model.prior_heads \\(3\\) must divide model.prior_width \\(32\\)", prior_heads=3)
    released = {"prior": "released", "encoder": {"path": "tiny:clip-l"}}
    refused("prior", "model.prior_model .*: the prior takes 16-d embeddings and 77 16-wide text tokens; model.encoder.path tiny:clip-l gives "
            "32-d embeddings and 77 32-wide tokens", **released,
            prior_model={"path": make_tiny_kandinsky_prior(str(tmp_path / "p16"), dim=16), "subfolder": "prior"})
    # the embedding width alone differs, either way (the text tokens fit the prior)
    refused("prior", "the prior takes 64-d embeddings and 77 64-wide text tokens; model.encoder.path tiny:clip gives "
            "32-d embeddings and 77 64-wide tokens", prior="released", encoder={"path": "tiny:clip"},
            prior_model={"path": make_tiny_kandinsky_prior(str(tmp_path / "p64"), dim=64), "subfolder": "prior"})
    refused("prior", "the prior takes 32-d embeddings and 77 32-wide text tokens; model.encoder.path .*clip64 gives "
            "64-d embeddings and 77 32-wide tokens", prior="released", encoder={"path": make_tiny_clip_l(str(tmp_path / "clip64"), embed_dim=64)},
            prior_model={"path": "tiny:kandinsky-prior", "subfolder": "prior"})
    # embeddings of the prior's width, text tokens narrower or wider (tiny:clip's text tower is 64 wide)
    refused("prior", "the prior takes 64-d embeddings and 77 64-wide text tokens; model.encoder.path .*clip64 gives "
            "64-d embeddings and 77 32-wide tokens", prior="released", encoder={"path": str(tmp_path / "clip64")},
            prior_model={"path": str(tmp_path / "p64"), "subfolder": "prior"})
    refused("prior", "the prior takes 32-d embeddings and 77 32-wide text tokens; model.encoder.path tiny:clip gives "
            "32-d embeddings and 77 64-wide tokens", prior="released", encoder={"path": "tiny:clip"},
            prior_model={"path": "tiny:kandinsky-prior", "subfolder": "prior"})
    ref = resolve_tiny("tiny:kandinsky-prior")

    def saved_prior(name, clip_std=None, **config):
        """tiny:kandinsky-prior's prior saved with its scheduler under tmp_path/name: with
        ``config`` changed (fresh weights), or its clip_std all ``clip_std`` but one
        dimension's (one fitted dimension is not enough)."""
        prior = PriorTransformer.from_pretrained(ref, subfolder="prior")
        if config:
            prior = PriorTransformer(**{**{k: v for k, v in prior.config.items() if not k.startswith("_")}, **config})
        if clip_std is not None:
            with torch.no_grad():
                prior.clip_std.fill_(clip_std)
                prior.clip_std[0, 0] = 1.0
        prior.save_pretrained(tmp_path / name / "prior")
        (tmp_path / name / "scheduler").mkdir()
        (tmp_path / name / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(json.load(open(f"{ref}/scheduler/scheduler_config.json"))))
        return {"path": str(tmp_path / name), "subfolder": "prior"}

    for positions in (76, 78):  # fewer or more text positions than CLIP's 77
        refused("prior", f"the prior takes 32-d embeddings and {positions} 32-wide text tokens; model.encoder.path tiny:clip-l gives "
                "32-d embeddings and 77 32-wide tokens", **released, prior_model=saved_prior(f"p{positions}", num_embeddings=positions))
    for name, std in (("unfitted", 0.0), ("negative", -1.0)):
        refused("prior", "its clip_std is not all positive \\(an unfitted prior's is zeros\\): set model.prior_stats: dataset",
                **released, prior_stats="checkpoint", prior_model=saved_prior(name, clip_std=std))
    unfitted = tmp_path / "unfitted"
    _fam, model, _ = _kandinsky("prior", **released, prior_model={"path": str(unfitted), "subfolder": "prior"})  # dataset: fitted later
    assert int(model.norm.count) == 0

    # data: the batch's stored embeddings, and the shards the statistics come from
    _fam, prior_model, _ = _kandinsky("prior")
    _fam, decoder, _ = _kandinsky("decoder")
    for model, hint in ((prior_model, False), (decoder, True)):
        batch = _batch(2)
        batch["clip_image"] = None
        with pytest.raises(UserError, match="hold no stored CLIP image embeddings .*run the score stage with score.clip.store_embeddings") as e:
            model._image_embeddings(batch)
        assert ("model.use_stored_embeddings: false" in str(e.value)) == hint
        for wrong in (16, 48):  # narrower or wider
            batch["clip_image"] = torch.zeros(2, wrong)
            with pytest.raises(UserError, match=f"stored image embeddings are {wrong}-d, model.encoder.path tiny:clip gives 32-d"):
                model._image_embeddings(batch)
        assert model._image_embeddings(_batch(2)).shape == (2, 32)
    # the prior learns from stored embeddings whatever model.use_stored_embeddings says; the
    # decoder without them embeds the pictures itself, at CLIP's own scale (not unit length)
    _fam, unstored, _ = _kandinsky("prior", use_stored_embeddings=False)
    with pytest.raises(UserError, match="hold no stored CLIP image embeddings") as e:
        unstored._image_embeddings({**_batch(2), "clip_image": None})
    assert "model.use_stored_embeddings" not in str(e.value)
    _fam, own, _ = _kandinsky("decoder", use_stored_embeddings=False)
    from mmloom.train.diffusion import to_pil

    emb = own._image_embeddings({**_batch(2), "clip_image": None})
    torch.testing.assert_close(emb, own.clip.images(to_pil(_batch(2)["pixels"]), normalize=False))
    assert (emb.norm(dim=-1) - 1).abs().min() > 0.1
    # the released width, 768 (ints above 256 are distinct objects in CPython: compared by value)
    _fam, wide, _ = _kandinsky("prior", encoder={"path": make_tiny_clip_l(str(tmp_path / "clip768"), embed_dim=768)})
    assert wide._image_embeddings({**_batch(2), "clip_image": torch.zeros(2, 768)}).shape == (2, 768)
    import mmloom.train.embed_stats as embed_stats

    wide.data_spec = "shards"
    monkeypatch.setattr(embed_stats, "embedding_stats", lambda spec, allow_pipe: (np.zeros(768), np.ones(768), 5))
    wide.fit_normalizer()
    assert int(wide.norm.count) == 5
    with pytest.raises(UserError, match="data.shards is empty: the prior's normalization needs the dataset's stored embeddings"):
        prior_model.fit_normalizer()

    prior_model.data_spec = "shards"
    for wrong in (16, 48):  # narrower or wider
        monkeypatch.setattr(embed_stats, "embedding_stats", lambda spec, allow_pipe, d=wrong: (np.zeros(d), np.ones(d), 5))
        with pytest.raises(UserError, match=f"the stored embeddings are {wrong}-d but model.encoder.path tiny:clip gives 32-d"):
            prior_model.fit_normalizer()
    monkeypatch.setattr(embed_stats, "embedding_stats", lambda spec, allow_pipe: (np.full(32, 0.5), np.full(32, 2.0), 5))
    prior_model.fit_normalizer()
    assert int(prior_model.norm.count) == 5 and float(prior_model.norm.mean[0]) == 0.5 and float(prior_model.norm.std[0]) == 2.0


@pytest.mark.parametrize("prior", ["linear", "residual", "diffusion"])
def test_kandinsky_priors_train_with_falling_loss(tiny_cache, prior):
    fam, model, mc = _kandinsky("prior", prior=prior, residual_blocks=2, cond_dropout=0.0)
    model.norm.fit(torch.zeros(32), torch.full((32,), 0.2), 10)
    losses = _fit(fam, model, mc, 30)
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
    assert model.prior_embed(["a red cat"], steps=3).shape == (1, 32)


def test_kandinsky_decoder_unconditional_input_is_the_black_image(tiny_cache, monkeypatch):
    fam, model, mc = _kandinsky("decoder", cond_dropout=1.0)
    from PIL import Image

    black = model.clip.images([Image.new("RGB", (224, 224))], normalize=False)[0]  # CLIP's own scale, as the released decoder
    assert "black" not in model.state_dict()  # recomputed from the frozen CLIP at every build, never saved
    seen = {}
    real = model.unet.forward

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(model.unet, "forward", spy)
    texts = []
    real_text = model.decoder_text
    monkeypatch.setattr(model, "decoder_text", lambda t: texts.append(list(t)) or real_text(t))
    model(_batch())
    img = seen["added_cond_kwargs"]["image_embeds"]
    assert torch.allclose(img, black.expand_as(img))
    assert texts == [[""] * 4]  # a dropped sample loses its caption with its image
    model.cfg = model.cfg.model_copy(update={"cond_dropout": 0.0})  # ... and at 0 none does
    texts.clear()
    model(_batch())
    img = seen["added_cond_kwargs"]["image_embeds"]
    assert texts == [_batch()["captions"]]
    assert all(not torch.allclose(row, black) for row in img)
    # the text goes through the multilingual encoder (its 48-d tokens, 77 positions, its pooled
    # embedding), not CLIP's; no padding mask, as the released pipeline
    pooled, tokens = model.decoder_text(["a red circle"])
    assert seen["encoder_hidden_states"].shape[1:] == tokens.shape[1:] == (77, 48)
    assert model.decoder_text(["a red circle " * 100])[1].shape == (1, 77, 48)  # a long caption is truncated to 77, as released
    assert seen["added_cond_kwargs"]["text_embeds"].shape[-1] == pooled.shape[-1] == 32
    assert seen.get("encoder_attention_mask") is None


@pytest.mark.slow
def test_kandinsky_decoder_samplers_are_the_named_ones_on_its_schedule(tiny_cache):
    """``sampling.sampler``: ddim and pndm drop the learned variance (their schedulers have
    none), ddpm is diffusers' DDPMScheduler with ``learned_range``, as KandinskyPipeline
    samples the released UNet; every one on the decoder's training schedule, and each samples."""
    from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

    _fam, model, _ = _kandinsky("decoder")
    grad = []  # sampling builds no autograd graph (its memory at the released size)
    model.unet.register_forward_hook(lambda *_: grad.append(torch.is_grad_enabled()))
    for name, kind in (("ddim", DDIMScheduler), ("pndm", PNDMScheduler), ("ddpm", DDPMScheduler)):
        sched = model._sampler(name)
        assert type(sched) is kind and sched.config.beta_schedule == "linear" and sched.config.beta_end == 0.012
        assert (getattr(sched.config, "variance_type", None) == "learned_range") == (name == "ddpm")
        model.cfg.sampling.sampler = name
        [im] = model.generate([["a red circle"]], steps=3, guidance=4.0, seeds=[0], size=32)
        assert im.size == (32, 32)
    # no size asked for: the UNet's sample_size in pixels (8 latents x the autoencoder's factor)
    assert model.generate([["a red circle"]], steps=2, seeds=[0])[0].size == (8 * model.ae.downscale,) * 2
    assert model.unet.config.sample_size == 8 and model.ae.downscale > 1
    assert grad and not any(grad)


def test_kandinsky_decoder_trains_and_fuses_text_and_image(tiny_cache):
    from PIL import Image

    from mmloom.train.families.kandinsky import interpolate

    fam, model, mc = _kandinsky("decoder", cond_dropout=0.1)
    losses = _fit(fam, model, mc, 25)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    a, b = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    assert torch.allclose(interpolate([a, b], [1.0, 0.0]), a, atol=1e-6)
    mid = interpolate([a, b], [0.5, 0.5])
    assert torch.isclose(mid.norm(), torch.tensor(1.0)) and torch.allclose(mid, torch.nn.functional.normalize(a + b, dim=0), atol=1e-6)
    # text and image: no prior checkpoint, so the text embedding stands in (Table 3's "no prior")
    red = Image.new("RGB", (64, 64), "red")
    emb, text = model.embed_prompt(["a red circle", red])
    expect = interpolate([model.clip.texts(["a red circle"], normalize=False)[0],  # CLIP's own scale, as the released weights
                          model.clip.images([red], normalize=False)[0]], [0.5, 0.5])
    assert text == "a red circle" and torch.allclose(emb, expect, atol=1e-5)
    imgs = fam.generate(model.eval(), [["a red circle", red], [red]], steps=3, seeds=[0, 1], size=64)
    assert [im.size for im in imgs] == [(64, 64), (64, 64)]


def test_kandinsky_fusion_normalizes_the_weights_and_keeps_the_weighted_norm(tiny_cache, monkeypatch):
    """Fusion (mmloom's choice, module docstring): weights scaled to sum 1, the mix rescaled
    to the weighted mean of the norms; a prompt's text gets text_weight and its images share
    the rest equally, images alone share all of it."""
    from PIL import Image

    from mmloom.train.families import kandinsky
    from mmloom.train.families.kandinsky import interpolate

    a, b = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0])  # norms 2 and 4, orthogonal
    mix = interpolate([a, b], [3.0, 1.0])  # weights 0.75 / 0.25: direction (1.5, 1), norm 0.75 x 2 + 0.25 x 4
    assert torch.allclose(mix, torch.tensor([1.5, 1.0, 0.0]) / 13 ** 0.5 * 2 * 2.5, atol=1e-6)
    assert torch.allclose(interpolate([a], [0.2]), a) and torch.allclose(interpolate([a, b], [0.0, 5.0]), b)
    assert torch.equal(interpolate([a, -a], [1.0, 1.0]), torch.zeros(3))  # opposite embeddings cancel: zero, not 0 / 0

    _fam, model, _ = _kandinsky("decoder", text_weight=0.3)
    shares = []  # interpolate scales the weights itself: watch the shares embed_prompt hands it
    monkeypatch.setattr(kandinsky, "interpolate", lambda e, w: shares.append([round(x, 6) for x in w]) or interpolate(e, w))
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    t = model.clip.texts(["a red circle"], normalize=False)[0]
    r, bl = model.clip.images([red, blue], normalize=False)
    emb, text = model.embed_prompt(["a red circle", red, " ", blue])
    assert text == "a red circle" and torch.allclose(emb, interpolate([t, r, bl], [0.3, 0.35, 0.35]), atol=1e-5)
    emb, text = model.embed_prompt([red, blue])
    assert text == "" and torch.allclose(emb, interpolate([r, bl], [0.5, 0.5]), atol=1e-5)
    emb, text = model.embed_prompt(["  a red ", "circle"])  # text parts joined, stripped; alone it is all the weight
    assert text == "a red circle" and torch.allclose(emb, t, atol=1e-5)
    emb, text = model.embed_prompt([])
    assert text == "" and torch.equal(emb, model.black)
    assert shares == [[0.3, 0.35, 0.35], [0.5, 0.5], [1.0]]


def test_prior_run_cannot_make_pictures(tiny_cache):
    from mmloom.errors import UserError

    fam, model, _ = _kandinsky("prior", prior="linear")
    with pytest.raises(UserError, match="prior makes embeddings"):
        fam.generate(model, [["a cat"]])


# -- M-VADER ----------------------------------------------------------------------------------
def _attention(seed=0):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(seed)
    return Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)


def test_theta_zero_removes_a_segment_and_theta_one_changes_nothing():
    from diffusers.models.attention_processor import AttnProcessor2_0

    from mmloom.train.families.mvader import ThetaAttnProcessor, ThetaBias, log_theta

    attn = _attention()
    x, ctx = torch.randn(1, 5, 8), torch.randn(1, 7, 6)
    plain = AttnProcessor2_0()(attn, x, ctx)
    holder = ThetaBias()
    proc = ThetaAttnProcessor(holder)
    segments = torch.tensor([[0, 0, 1, 1, 1, 2, 2]])  # text, image, text
    holder.log_theta = log_theta(segments, [1.0, 1.0, 1.0])
    assert torch.equal(proc(attn, x, ctx), plain)
    holder.log_theta = log_theta(segments, [1.0, 0.0, 1.0])
    without = AttnProcessor2_0()(attn, x, ctx[:, [0, 1, 5, 6]])
    assert torch.allclose(proc(attn, x, ctx), without, atol=1e-6)
    # theta 0.5: exactly s_ij + log(0.5) on the image tokens
    holder.log_theta = log_theta(segments, [1.0, 0.5, 1.0])
    q = attn.to_q(x).view(1, 5, 2, 4).transpose(1, 2)
    k = attn.to_k(ctx).view(1, 7, 2, 4).transpose(1, 2)
    v = attn.to_v(ctx).view(1, 7, 2, 4).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / 2.0 + torch.log(torch.tensor([1, 1, .5, .5, .5, 1, 1.]))
    manual = attn.to_out[0]((s.softmax(-1) @ v).transpose(1, 2).reshape(1, 5, 8))
    assert torch.allclose(proc(attn, x, ctx), manual, atol=1e-6)


def _mvader(**over):
    mc = {"encoder": {"path": "tiny:vlm", "image_size": 64}, "backbone": {"path": "tiny:unet", "subfolder": None},
          "autoencoder": {"path": "tiny:vae", "subfolder": None}, **over}
    cfg = TrainConfig.model_validate({"family": "mvader", "model": mc, "data": {"resolution": 64}})
    fam = get_family("mvader")
    return fam, fam.build(cfg.model, cfg), cfg.model


def test_mvader_segments_draw_rates_and_learning_rates(tiny_cache):
    from PIL import Image

    fam, model, mc = _mvader(encoder_training="bias", lr={"cross_attn": 5e-4, "unet": 5e-5, "encoder": 1e-5},
                             image_prob=0.2, cond_dropout=0.0)
    red = Image.new("RGB", (64, 64), "red")
    prompts = [["a cat and ", red, " a dog"], [red, red]]
    model.encode(prompts)
    seg = model.segments(prompts, model.encoder.last_input_ids)
    ids = model.encoder.last_input_ids
    image_id = model.encoder.processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (seg[ids == image_id] >= 0).all()
    assert set(seg[0][ids[0] == image_id].tolist()) == {1} and set(seg[0].tolist()) - {-1} == {0, 1, 2}
    assert set(seg[1][ids[1] == image_id].tolist()) == {0, 1}  # two images, two segments

    torch.manual_seed(0)
    kinds = model.draw_conditions(20000)
    assert abs(kinds.count("image") / len(kinds) - 0.2) < 0.01 and "empty" not in kinds
    model.cfg = model.cfg.model_copy(update={"cond_dropout": 0.1})
    kinds = model.draw_conditions(20000)
    assert abs(kinds.count("empty") / len(kinds) - 0.1) < 0.01

    groups = {g["name"]: g for g in fam.param_groups(model, mc)}
    assert {n: g["lr"] for n, g in groups.items()} == {"cross_attn": 5e-4, "unet": 5e-5, "encoder": 1e-5}
    hidden = model.encoder.hidden_size
    assert all(p.shape[-1] == hidden for p in groups["cross_attn"]["params"])  # new projections from the LM's width
    assert len(groups["cross_attn"]["params"]) == len(model.cross_names)
    assert all(p.ndim == 1 for p in groups["encoder"]["params"])  # BitFit: biases only
    opt = torch.optim.AdamW(groups.values())
    assert sorted(g["lr"] for g in opt.param_groups) == [1e-5, 5e-5, 5e-4]


def test_mvader_samples_with_theta_and_refuses_a_mismatched_theta(tiny_cache):
    from PIL import Image

    from mmloom.errors import UserError

    fam, model, _ = _mvader()
    red = Image.new("RGB", (64, 64), "red")
    a = fam.generate(model.eval(), [["a cat ", red]], steps=3, seeds=[0], size=64)[0]
    b = fam.generate(model, [["a cat ", red]], steps=3, seeds=[0], size=64, theta=[[1.0, 1.0]])[0]
    c = fam.generate(model, [["a cat ", red]], steps=3, seeds=[0], size=64, theta=0.0)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b)) and a.size == (64, 64)
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    for wrong in ([[1.0]], [[1.0, 0.5, 1.0]]):  # one value per segment, no fewer, no more
        with pytest.raises(UserError, match="segment"):
            fam.generate(model, [["a cat ", red]], steps=3, seeds=[0], size=64, theta=wrong)



def test_mvader_segments_follow_each_part_exactly(tiny_cache):
    """Every LM token's segment is the prompt part that produced it: text tokens their
    text part (an unknown word too), an image's tokens and the tokens wrapped around them
    that image, padding none; a row longer than 256 tokens ending in an image, ids above
    the image token's, and an image run the prompt has no picture for (a caption that
    spells the image token) each keep to the rule."""
    from PIL import Image

    _fam, model, _ = _mvader()
    red = Image.new("RGB", (64, 64), "red")
    tok = model.encoder.processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    wrap = tok.convert_tokens_to_ids(model.encoder.processor.fake_image_token.content
                                     if hasattr(model.encoder.processor.fake_image_token, "content")
                                     else model.encoder.processor.fake_image_token)
    prompts = [["a cat and ", red, " a dog ", red, " zebrafish"], [red, "a"]]
    model.encode(prompts)
    ids = model.encoder.last_input_ids
    seg = model.segments(prompts, ids)
    k = int((ids[1] == image_id).sum())  # image tokens per picture
    n = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert tok.unk_token_id in ids[0].tolist()  # "zebrafish" is not in the tiny vocabulary
    want0 = [0] * n("a cat and ") + [1] * (k + 2) + [2] * n(" a dog ") + [3] * (k + 2) + [4] * n(" zebrafish")
    real = ids[0] != tok.pad_token_id
    assert seg[0][real].tolist() == want0 and (seg[0][~real] == -1).all()
    real = ids[1] != tok.pad_token_id
    assert seg[1][real].tolist() == [0] * (k + 2) + [1] * n("a") and (seg[1][~real] == -1).all()

    # by hand: 300 text tokens (one id above the image token's), then an image; then a
    # second image run with one picture only
    text_id = tok.convert_tokens_to_ids("a")
    above = len(tok) + 5  # a text token of a larger vocabulary, above every id the tiny one has
    row = [text_id] * 299 + [above] + [wrap] + [image_id] * 3 + [wrap]
    seg = model.segments([["x" * 10, red]], torch.tensor([row]))
    assert seg[0].tolist() == [0] * 300 + [1] * 5
    row = [wrap] + [image_id] * 3 + [wrap] + [image_id] * 3 + [wrap] + [text_id]
    seg = model.segments([[red, "a"]], torch.tensor([row]))
    assert seg[0].tolist() == [0] * 4 + [-1] * 5 + [1]  # a wrap between two images joins the next one
    # one image token per picture; a token of no text part; a wrap next to no image
    seg = model.segments([["a", red]], torch.tensor([[text_id, wrap, image_id, wrap]]))
    assert seg[0].tolist() == [0, 1, 1, 1]
    seg = model.segments([[red]], torch.tensor([[wrap, image_id, wrap, text_id]]))
    assert seg[0].tolist() == [0, 0, 0, -1]
    seg = model.segments([["a", red]], torch.tensor([[wrap, above, wrap, image_id]]))
    assert seg[0].tolist() == [-1, 0, 1, 1]
    # wraps beside text (ids below and above the image token's) join nothing; a wrap right
    # after a leading image joins it
    seg = model.segments([["a"]], torch.tensor([[text_id, wrap, above, wrap]]))
    assert seg[0].tolist() == [0, -1, 0, -1]
    seg = model.segments([[red]], torch.tensor([[image_id, wrap]]))
    assert seg[0].tolist() == [0, 0]
    # a layout without wrappers (LLaVA-like): the first token is already an image's
    seg = model.segments([[red, "a", red]], torch.tensor([[image_id, text_id, image_id]]))
    assert seg[0].tolist() == [0, 1, 2]
    # two image runs more than the prompt has pictures
    seg = model.segments([[red, "a"]], torch.tensor([[wrap, image_id, wrap, image_id, wrap, image_id, wrap, text_id]]))
    assert seg[0].tolist() == [0, 0, -1, -1, -1, -1, -1, 1]
    # ids above 256 (Idefics2's <image> is 32001): compared by value, not identity
    real_ids = tok.convert_tokens_to_ids
    big = {"<image>": 40001, model.encoder.processor.fake_image_token if isinstance(model.encoder.processor.fake_image_token, str)
           else model.encoder.processor.fake_image_token.content: 40000}
    try:
        tok.convert_tokens_to_ids = lambda t: big[t] if isinstance(t, str) and t in big else real_ids(t)
        seg = model.segments([[red, "a"]], torch.tensor([[40000, 40001, 40001, 40000, text_id]]))
    finally:
        del tok.convert_tokens_to_ids
    assert seg[0].tolist() == [0, 0, 0, 0, 1]


def test_mvader_theta_weighs_image_tokens_only_and_adds_to_the_unets_mask():
    """A float theta is every image segment's factor, text keeps 1 (log 0); the processor
    adds log(theta) to the attention mask the UNet passes (padding stays masked)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from mmloom.train.families.mvader import ThetaAttnProcessor, ThetaBias, log_theta

    attn = _attention()
    x, ctx = torch.randn(1, 5, 8), torch.randn(1, 7, 6)
    segments = torch.tensor([[0, 0, 1, 1, 1, 2, -1]])
    lt = log_theta(segments, [1.0, 0.5, 1.0])
    mask = torch.tensor([[[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -10000.0]]])  # the last token is padding
    holder = ThetaBias()
    holder.log_theta = lt
    got = ThetaAttnProcessor(holder)(attn, x, ctx, attention_mask=mask)
    want = AttnProcessor2_0()(attn, x, ctx, attention_mask=mask + lt[:, None, :])
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, AttnProcessor2_0()(attn, x, ctx, attention_mask=mask), atol=1e-4)
    # a token outside every segment keeps theta 1, whatever the first segment's factor
    assert torch.equal(log_theta(torch.tensor([[0, -1, 1]]), [0.5, 0.25]), torch.log(torch.tensor([[0.5, 1.0, 0.25]])))


def test_mvader_float_theta_applies_to_image_parts_and_the_defaults_are_table_2s(tiny_cache):
    from PIL import Image

    from mmloom.train.families.mvader import LR, Config

    fam, model, _ = _mvader(encoder={"path": "tiny:vlm", "image_size": 32})  # the LM's image size, not data.resolution
    assert model.encoder.processor.image_processor.size["longest_edge"] == 32
    red = Image.new("RGB", (64, 64), "red")
    prompts = [["a cat ", red]]
    model.encode(prompts)
    seg = model.segments(prompts, model.encoder.last_input_ids)
    lt = model.theta_for(prompts, 0.5)
    assert torch.equal(lt[0][seg[0] == 1], torch.full_like(lt[0][seg[0] == 1], float(np.log(0.5))))
    assert (lt[0][seg[0] != 1] == 0).all() and (seg[0] == 0).any()
    assert model.theta_for(prompts, 1.0) is None
    up = model.theta_for(prompts, 2.0)  # theta above 1 strengthens the images (section 3.4's factor either way)
    assert torch.allclose(up[0][seg[0] == 1], torch.tensor(float(np.log(2.0)))) and (up[0][seg[0] != 1] == 0).all()
    assert fam.demo.options == {"theta": [0.5]} and fam.demo.prompt_images == 2  # the demo's composition of two pictures
    side = model.unet.config.sample_size * model.ae.downscale  # no size: the UNet's own
    assert fam.generate(model.eval(), [["a cat"]], steps=1, seeds=[0])[0].size == (side, side)
    assert LR().model_dump() == {"cross_attn": 1e-4, "unet": 5e-5, "encoder": 1e-5}  # Table 2 (V2)
    assert Config().encoder.bypass_resampler is False  # the perceiver's tokens, as MAGMA's
    assert Config().encoder_training == "frozen" and not any(p.requires_grad for p in model.encoder.parameters())
    _f, bitfit, _ = _mvader(encoder_training="bias")
    trained = [n for n, p in bitfit.encoder.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith(".bias") for n in trained)
    for ok in (0.0, 0.5, 2.0):
        assert Config.model_validate({"image_theta": ok}).image_theta == ok
    with pytest.raises(ValueError, match="image_theta"):
        Config.model_validate({"image_theta": -0.5})
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match="cond_dropout"):
            Config.model_validate({"cond_dropout": bad})
    assert fam.demo_prompt(["p.jpg", "q.jpg"]) == "a photo of <image:p.jpg> in the style of <image:q.jpg>"
    assert fam.demo_prompt(["p.jpg"]) == fam.demo_prompt([]) == "a red circle"


# -- Versatile Diffusion ---------------------------------------------------------------------------
def _versatile(**over):
    mc = {"backbone": {"path": "tiny:unet", "subfolder": None}, "text_backbone": {"path": "tiny:text-unet", "subfolder": None},
          "autoencoder": {"path": "tiny:vae", "subfolder": None}, "text_vae": "tiny:text-vae", "encoder": {"path": "tiny:clip"},
          **over}
    cfg = TrainConfig.model_validate({"family": "versatile", "model": mc, "data": {"resolution": 64}})
    fam = get_family("versatile")
    return fam, fam.build(cfg.model, cfg), cfg.model


def _grads(model):
    u = model.unet
    parts = {"global": u.global_layers, "data_image": u.data["image"], "data_text": u.data["text"],
             "context_image": u.context["image"], "context_text": u.context["text"]}
    return {k: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()) for k, m in parts.items()}


@pytest.mark.parametrize("flow,expect", [
    ("text_to_image", {"global", "data_image", "context_text"}),
    ("image_variation", {"global", "data_image", "context_image"}),
    ("image_to_text", {"global", "data_text", "context_image"}),
    ("text_variation", {"global", "data_text", "context_text"}),
])
def test_a_flow_touches_only_its_layers(tiny_cache, flow, expect):
    """A flow trains its data, context and global layers only, and the step computes only
    the data and context its flows read (no autoencoder or CLIP pass for nothing)."""
    from mmloom.train.families.versatile import FLOWS

    _fam, model, _ = _versatile(flows=[flow], cond_dropout=0.0)
    computed = []
    for name in ("_text_latents", "text_context", "image_context"):
        real = getattr(model, name)
        setattr(model, name, (lambda n, f: lambda *a, **k: computed.append(n) or f(*a, **k))(name, real))
    real_encode = model.ae.encode
    model.ae.encode = lambda *a, **k: computed.append("image_latents") or real_encode(*a, **k)
    model.zero_grad()
    model(_batch(2))["loss"].backward()
    assert {k for k, v in _grads(model).items() if v} == expect
    # nothing outside the UNet learns: CLIP, the autoencoder and the text VAE are frozen
    assert [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("unet.")] == []
    output, context = FLOWS[flow]
    assert sorted(computed) == sorted(["image_latents" if output == "image" else "_text_latents", f"{context}_context"])


def test_versatile_sums_all_flows_and_multipliers_reach_the_optimizer(tiny_cache):
    # a base rate of 1e-3 times Table 1's four-flow scales
    rates = {"global_layers": 1e-4, "data_image": 2e-4, "data_text": 1e-3, "context_image": 1e-3, "context_text": 1e-3}
    fam, model, mc = _versatile(lr=rates, cond_dropout=0.0)
    torch.manual_seed(0)
    out = model(_batch(2))
    assert torch.isclose(out["loss"], sum(out[f"loss_{f}"] for f in model.cfg.flows))
    model.zero_grad()
    out["loss"].backward()
    assert all(_grads(model).values())  # four flows: every group receives gradient in one update
    opt = torch.optim.AdamW(fam.param_groups(model, mc))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == rates
    # no parameter sits in two groups, and none is left out
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len([p for p in model.unet.parameters() if p.requires_grad])


def test_principal_component_edits_keep_the_global_vector():
    from mmloom.train.families.versatile import disentangle

    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 17, 32, generator=g)
    style, semantic = disentangle(ctx, 2), disentangle(ctx, -2)
    assert torch.equal(style[:, 0], ctx[:, 0]) and torch.equal(semantic[:, 0], ctx[:, 0])
    mean = ctx[:, 1:].mean(1, keepdim=True)
    # keeping k components and removing them split the centred tokens in two
    assert torch.allclose((style[:, 1:] - mean) + (semantic[:, 1:] - mean), ctx[:, 1:] - mean, atol=1e-4)
    assert torch.linalg.matrix_rank(style[0, 1:] - mean[0]) == 2
    assert torch.equal(disentangle(ctx, 0), ctx)
    one, minus_one = disentangle(ctx, 1), disentangle(ctx, -1)  # the smallest edits either way
    assert torch.linalg.matrix_rank(one[0, 1:] - mean[0]) == 1
    assert torch.linalg.matrix_rank(minus_one[0, 1:] - mean[0]) == 14  # 16 centred tokens span 15 dimensions, one removed
    # more components than the tokens have: keeping all leaves the context, removing all its mean
    assert torch.allclose(disentangle(ctx, 40), ctx, atol=1e-5)
    assert torch.allclose(disentangle(ctx, -40)[:, 1:], mean.expand(-1, 16, -1), atol=1e-5)


def test_unconditional_image_context_choices_and_blending(tiny_cache):
    from PIL import Image

    _fam, model, _ = _versatile(image_uncond="zero_embedding")
    assert (model.uncond_context("image", 2) == 0).all()
    empty = model.text_context([""])  # the text's stays CLIP of the empty text
    assert torch.equal(model.uncond_context("text", 1), empty) and empty.abs().sum() > 0
    model.cfg = model.cfg.model_copy(update={"image_uncond": "zero_image"})
    zero_img = model.image_context([Image.new("RGB", (224, 224))])
    assert torch.allclose(model.uncond_context("image", 1), zero_img) and zero_img.abs().sum() > 0
    # attention-level mixing at rate 0 is the image flow, at rate 1 the text flow
    red = Image.new("RGB", (64, 64), "red")
    ictx, tctx = model.image_context([red]), model.text_context(["a red circle"])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        assert torch.allclose(model.unet.blend(x, t, "image", ictx, tctx, 0.0), model.unet(x, t, "image", "image", ictx), atol=1e-5)
        assert torch.allclose(model.unet.blend(x, t, "image", ictx, tctx, 1.0), model.unet(x, t, "image", "text", tctx), atol=1e-5)
        assert torch.allclose(model.unet.blend(x, t, "image", ictx, tctx, 0.0, "layer"), model.unet(x, t, "image", "image", ictx), atol=1e-5)
    two = model.multi_context([red, red], [1.0, 0.5])
    assert two.shape[1] == 2 * ictx.shape[1] and torch.allclose(two[:, ictx.shape[1]:], 0.5 * ictx, atol=1e-6)
    texts = model.generate_text([[red], ["a red circle"]], steps=2)
    assert len(texts) == 2 and all(isinstance(s, str) for s in texts)


def test_versatile_prompt_images_are_scaled_by_image_scales_and_pca(tiny_cache):
    """A.3: each prompt image's context scaled by its ``image_scales`` entry, concatenated in
    the prompt's order; the text parts joined into one text context; A.1's PCA edit applied
    to every image context."""
    from PIL import Image

    from mmloom.errors import UserError
    from mmloom.train.families.versatile import disentangle

    _fam, model, _ = _versatile(image_scales=[2.0, 0.5])
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    ictx, tctx = model.prompt_contexts([red, " a red ", blue, "circle"])
    a, b = model.image_context([red]), model.image_context([blue])
    assert torch.allclose(ictx, torch.cat([2.0 * a, 0.5 * b], dim=1), atol=1e-6)
    assert torch.allclose(tctx, model.text_context(["a red circle"]), atol=1e-6)
    with pytest.raises(UserError, match="2 image scale.* for 1 image"):
        model.prompt_contexts([red])
    with pytest.raises(UserError, match="2 image scale.* for 3 image"):
        model.prompt_contexts([red, blue, red])
    model.cfg = model.cfg.model_copy(update={"image_scales": [], "pca": 2})
    ictx, tctx = model.prompt_contexts([red, blue])
    assert tctx is None
    assert torch.allclose(ictx, torch.cat([disentangle(a, 2), disentangle(b, 2)], dim=1), atol=1e-6)


def _spy_unet(model):
    """Record (output type, context type, context) of every call of the multi-flow UNet."""
    calls, forward = [], model.unet.forward

    def spy(x, t, out, ck, ctx):
        calls.append((out, ck, ctx.detach().clone()))
        return forward(x, t, out, ck, ctx)

    model.unet.forward = spy
    return calls


def test_versatile_training_replaces_contexts_at_the_cond_dropout_rate(tiny_cache):
    """Classifier-free guidance's training: at cond_dropout 0 every sample keeps its caption's
    context, at 1 every one gets the unconditional context; a single flow needs only its own
    data and context."""
    from mmloom.train.diffusion import to_pil

    _fam, model, _ = _versatile(flows=["text_to_image"], cond_dropout=0.0, text_vae="")  # no text output: no text VAE needed
    calls = _spy_unet(model)
    batch = _batch(2)
    torch.manual_seed(0)
    model(batch)
    assert [(o, k) for o, k, _c in calls] == [("image", "text")]
    assert torch.allclose(calls[0][2], model.text_context(batch["captions"]), atol=1e-6)
    model.cfg = model.cfg.model_copy(update={"cond_dropout": 1.0})
    model(batch)
    assert torch.allclose(calls[1][2], model.uncond_context("text", 2), atol=1e-6)
    _fam, model, _ = _versatile(flows=["image_variation"], cond_dropout=0.0, text_vae="")
    calls = _spy_unet(model)
    model(batch)
    assert [(o, k) for o, k, _c in calls] == [("image", "image")]
    assert torch.allclose(calls[0][2], model.image_context(to_pil(batch["pixels"])), atol=1e-6)


def test_versatile_samples_from_the_prompts_own_text_context(tiny_cache):
    """A text prompt conditions both outputs on its own context (the empty text is the
    unconditional branch only); the demo prompt names its picture."""
    fam, model, _ = _versatile()
    calls = _spy_unet(model)
    text = model.text_context(["a red circle"])
    model.generate_text([["a red circle"]], steps=1)
    assert len(calls) == 2  # the steps asked for: one step, its conditional and unconditional passes
    grad = []  # sampling builds no autograd graph (at SDXL's size it would not fit)
    forward = model.unet.forward
    model.unet.forward = lambda *a: grad.append(torch.is_grad_enabled()) or forward(*a)
    model.generate([["a red circle"]], steps=1)
    model.generate_text([["a red circle"]], steps=1)
    assert grad and not any(grad)
    for out in ("text", "image"):
        ctxs = [c for o, k, c in calls if o == out and k == "text"]
        assert any(torch.allclose(c, text, atol=1e-6) for c in ctxs), out
        assert any(torch.allclose(c, model.uncond_context("text", 1), atol=1e-6) for c in ctxs), out
    assert fam.demo_prompt(["a.png", "b.png"]) == "a red circle <image:a.png>" and fam.demo_prompt([]) == "a red circle"
    assert model.cfg.text_max_length == 32
    lengths, decode = [], model.text_vae.decode  # the tiny random decoder stops at once: watch the limit it is given
    model.text_vae.decode = lambda z, max_length=32: lengths.append(max_length) or decode(z, max_length)
    model.cfg = model.cfg.model_copy(update={"text_max_length": 5})
    assert len(model.generate_text([["a red circle"], ["a dog"]], steps=1)) == 2 and lengths == [5, 5]


def test_versatile_refuses_no_flows_and_a_clip_or_text_vae_of_another_width(tiny_cache, tmp_path):
    """Widths are checked at the door, each error naming what to change: a CLIP or a text VAE
    of another width than the UNets', or no flow at all."""
    from mmloom.errors import UserError
    from mmloom.train.families.versatile import Config
    from mmloom.train.text_vae import make_tiny_text_vae
    from mmloom.testkit.tiny_train import make_tiny_text_unet, make_tiny_unet

    with pytest.raises(UserError, match="model.flows is empty: name at least one of text_to_image, image_variation"):
        _versatile(flows=[])
    assert Config.model_validate({"text_max_length": 1}).text_max_length == 1
    with pytest.raises(ValueError, match="text_max_length"):  # a sentence of no token decodes nothing
        Config.model_validate({"text_max_length": 0})
    for flow in ("image_to_text", "text_variation"):  # a text output needs the text VAE
        with pytest.raises(UserError, match="model.text_vae is empty: the image_to_text and text_variation flows need a text VAE"):
            _versatile(flows=[flow], text_vae="")
    for width in (16, 48):  # the text UNet's latents are 32-d (in_channels 8 x 4)
        vae = make_tiny_text_vae(str(tmp_path / f"tvae{width}"), ["a", "red", "cat"], latent_dim=width)
        with pytest.raises(UserError, match=rf"the text VAE's {width}-d latents do not fit the text UNet \(latents 8 x 4 x 1"):
            _versatile(text_vae=vae)

    for width in (16, 48):
        unet = make_tiny_unet(str(tmp_path / f"unet{width}"), width)
        text_unet = make_tiny_text_unet(str(tmp_path / f"text{width}"), 32, width)
        with pytest.raises(UserError, match=rf"cross_attention_dim \({width}\) must equal the CLIP embedding width \(32\)"):
            _versatile(backbone={"path": unet, "subfolder": None}, text_backbone={"path": text_unet, "subfolder": None})


def test_versatile_builds_and_trains_at_the_released_768_width(tiny_cache, tmp_path):
    """The released checkpoint's widths: CLIP ViT-L/14's 768-d embeddings as both UNets'
    cross_attention_dim, and Optimus's 768-d latents as the text UNet's data (the towers
    stay tiny). Comparing widths by identity instead of value passes at tiny widths
    (CPython shares the small ints) and refuses these."""
    from mmloom.train.text_vae import make_tiny_text_vae
    from mmloom.testkit.tiny_train import make_tiny_clip_l, make_tiny_text_unet, make_tiny_unet

    clip = make_tiny_clip_l(str(tmp_path / "clip"), embed_dim=768)
    unet = make_tiny_unet(str(tmp_path / "unet"), 768)
    text_unet = make_tiny_text_unet(str(tmp_path / "text"), 768, 768)
    vae = make_tiny_text_vae(str(tmp_path / "tvae"), "a red cat man ginger woman".split(), latent_dim=768)
    _fam, model, _ = _versatile(backbone={"path": unet, "subfolder": None}, text_backbone={"path": text_unet, "subfolder": None},
                                encoder={"path": clip}, text_vae=vae, cond_dropout=0.0)
    assert model.text_vae.latent_dim == 768
    assert model.clip.dim == 768
    loss = model(_batch(2))["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    for kind in ("text", "image"):  # both context types' keys read 768-d tokens, and learn from them
        keys = [p for n, p in model.unet.context[kind].named_parameters() if n.endswith("attn2.to_k.weight")]
        assert keys and all(p.shape[1] == 768 and p.grad is not None for p in keys), kind


def test_text_vae_saves_loads_and_names_a_missing_model(tmp_path):
    from mmloom.errors import UserError
    from mmloom.train.text_vae import TextVAE, make_tiny_text_vae

    path = make_tiny_text_vae(str(tmp_path / "tvae"), ["a", "red", "cat", "dog"])
    vae = TextVAE.load(path)
    z = vae.encode(["a red cat", "a dog"])
    assert z.shape == (2, 32) and not torch.allclose(z[0], z[1])
    again = TextVAE.load(path)
    assert torch.allclose(again.encode(["a red cat"]), z[:1])  # the latent heads travel with the directory
    assert len(vae.decode(z, max_length=4)) == 2
    with pytest.raises(UserError, match="text VAE"):
        TextVAE.load(str(tmp_path / "nowhere"))


# -- every family: checkpoint parts, validation grid, export -----------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("config", ["mvader-tiny", "versatile-tiny", "mtdiffusion-tiny", "kandinsky-prior-tiny",
                                    "kandinsky-decoder-tiny"])
def test_every_family_checkpoints_validates_and_exports(tiny_cache, tmp_path, config):
    """For each tiny config (MUMU: tests/test_train.py): a checkpoint's tensors plus the
    frozen parts it names rebuild the model exactly, a validation grid is drawn (a prior
    draws none), and the export's diffusers directories load with from_pretrained."""
    import json

    import diffusers
    from PIL import Image

    from mmloom.configbase import load_model
    from mmloom.train import parts
    from mmloom.train.export import export_parts
    from mmloom.train.validation import Validator

    Image.new("RGB", (40, 40), "red").save(tmp_path / "red.jpg")
    over = {"loop.validation.every": 1, "loop.validation.prompts": [f"a red <image:{tmp_path}/red.jpg> circle"],
            "loop.validation.seeds": [0, 1]}
    if config == "mtdiffusion-tiny":  # Algorithm 1 runs all T steps: a short schedule
        over["model.schedule.num_train_timesteps"] = 10
    else:
        over["loop.validation.steps"] = 2
    cfg = load_model(TrainConfig, ROOT / "configs" / "train" / f"{config}.yaml", over)
    if "kandinsky" in config:
        cfg.model.prior_checkpoint = None  # no prior run here: the CLIP text embedding stands in
    fam = get_family(cfg.family)
    model = fam.build(cfg.model, cfg)
    ck = tmp_path / "ck"
    parts.save_trained(model, str(ck))
    again = fam.build(cfg.model, cfg)
    with torch.no_grad():  # whatever the checkpoint leaves out must come back from the frozen parts' sources
        for n, p in again.named_parameters():
            if p.requires_grad:
                p.add_(1.0)
    parts.load_trained(again, str(ck))
    a, b = model.state_dict(), again.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    frozen = json.load(open(ck / "frozen.json"))["parts"]
    assert sum(f["tensors"] for f in frozen.values()) > 0 or config == "kandinsky-prior-tiny"
    path = Validator(cfg, fam).run(model, 1, str(tmp_path), [])
    if config == "kandinsky-prior-tiny":
        assert path is None
    else:
        assert Image.open(path).size == (2 * cfg.data.resolution, cfg.data.resolution)
    written = export_parts(model, str(tmp_path / "export"))
    assert written
    for w in written:
        conf = tmp_path / "export" / w / "config.json"
        if conf.exists() and "_class_name" in conf.read_text():
            getattr(diffusers, json.loads(conf.read_text())["_class_name"]).from_pretrained(str(conf.parent))


def test_statistics_need_stored_embeddings(tmp_path):
    """A dataset whose score stage stored no CLIP image embeddings is one clear error."""
    from mmloom.errors import UserError
    from mmloom.manifests.store import ShardStore
    from mmloom.train.embed_stats import embedding_stats

    store = ShardStore(str(tmp_path / "ds"))
    staging = store.staging_dir("scores", 0)
    pq.write_table(pa.table({"sample_key": ["a"], "clip_score": [0.3]}), f"{staging}/s.parquet")
    store.commit("score", 0, {"scores/00000.parquet": f"{staging}/s.parquet"}, {"rows": 1}, "h")
    with pytest.raises(UserError, match="no stored CLIP image embeddings"):
        embedding_stats(str(tmp_path / "ds"))
