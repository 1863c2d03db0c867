"""The parts every family shares (train/families/base.py): learning-rate groups (a rate of
0 leaves a group out), sub-configs merged over the family's defaults, the bounds of the
sampling defaults and encoder sizes, and the config reference rows."""

import pytest
import torch
from pydantic import Field, ValidationError

from mmloom.configbase import Section
from mmloom.train.families.base import (Family, LearningRates, Pretrained, SamplingDefaults, VLMEncoderConfig,
                                        _merge, describe_config, lr_groups, part)


class Rates(LearningRates):
    unet: float = Field(1e-4, ge=0, description="the UNet")
    adapter: float = Field(0.0, ge=0, description="the adapter")
    encoder: float = Field(5e-5, ge=0, description="the encoder")


def test_lr_groups_leave_out_a_rate_of_zero_and_empty_groups():
    p = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    groups = lr_groups({"unet": [p[0]], "adapter": [p[1]], "encoder": []}, Rates())
    assert [(g["name"], g["lr"], g["params"]) for g in groups] == [("unet", 1e-4, [p[0]])]
    groups = lr_groups({"unet": [p[0]], "adapter": [p[1]], "encoder": [p[2]]}, Rates(adapter=1e-3))
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-4), ("adapter", 1e-3), ("encoder", 5e-5)]


def test_lr_groups_refuse_a_group_without_a_rate():
    with pytest.raises(ValueError, match=r"\['lora'\] have no learning rate in Rates"):
        lr_groups({"unet": [torch.nn.Parameter(torch.zeros(1))], "lora": []}, Rates())


def test_a_sub_config_merges_over_the_defaults_key_by_key():
    base = {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "b": 3}
    assert _merge(base, {"a": {"y": {"q": 5}}}) == {"a": {"x": 1, "y": {"p": 1, "q": 5}}, "b": 3}
    assert _merge(base, {"a": 7, "c": {"z": 1}}) == {"a": 7, "b": 3, "c": {"z": 1}}
    assert base == {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "b": 3}  # the defaults are not changed


@pytest.mark.parametrize("values,ok", [
    ({"steps": 1, "guidance": 0.0}, True), ({"steps": None, "guidance": None}, True),
    ({"steps": 0, "guidance": 1.0}, False), ({"steps": 10, "guidance": -0.5}, False),
])
def test_sampling_defaults_bounds(values, ok):
    if ok:
        SamplingDefaults(sampler="ddim", **values)
    else:
        with pytest.raises(ValidationError):
            SamplingDefaults(sampler="ddim", **values)


def test_encoder_image_size_is_positive():
    assert VLMEncoderConfig(path="x", bypass_resampler=True, image_size=1).image_size == 1
    with pytest.raises(ValidationError, match="image_size"):
        VLMEncoderConfig(path="x", bypass_resampler=True, image_size=0)


class Outer(Section):
    backbone: Pretrained = part(Pretrained, "the denoising network", path="tiny:unet")
    sampling: SamplingDefaults = part(SamplingDefaults, "sampling defaults", sampler="pndm", steps=50, guidance=8.0)
    lr: Rates = part(Rates, "learning rates")
    cond_dropout: float = Field(0.1, description="conditioning dropout")


def test_describe_config_rows_name_each_key_by_its_dotted_path():
    rows = {k: (d, desc) for k, d, desc in describe_config(Outer())}
    assert rows["cond_dropout"] == ("0.1", "conditioning dropout")
    assert rows["backbone.path"] == ("'tiny:unet'", "the denoising network: " + Pretrained.model_fields["path"].description)
    assert rows["sampling.steps"] == ("50", "denoising steps")  # sampling and lr describe themselves
    assert rows["lr.adapter"] == ("0.0", "the adapter")
    assert [k for k in rows if k.startswith("sampling.")] == ["sampling.sampler", "sampling.steps", "sampling.guidance"]


def test_demo_prompt_shows_the_first_crop():
    fam = Family.__new__(Family)
    assert fam.demo_prompt(["man.png", "dog.png"]) == "a photo of <image:man.png>"
    assert fam.demo_prompt([]) == "a red circle"
    from mmloom.train.families import get_family

    mt = get_family("mtdiffusion")  # its modality x alone: the first crop, or a caption without pictures
    assert mt.demo_prompt(["man.png", "dog.png"]) == "<image:man.png>" and mt.demo_prompt([]) == "a cat"


def test_make_sampler_by_name_on_the_training_schedule():
    from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

    from mmloom.errors import UserError
    from mmloom.train.families.base import make_sampler

    train = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    ddim, pndm = make_sampler("ddim", train), make_sampler("pndm", train)
    assert type(ddim) is DDIMScheduler and type(pndm) is PNDMScheduler
    assert pndm.config.skip_prk_steps  # PLMS steps only, as Stable Diffusion runs PNDM
    for s in (ddim, pndm):
        assert (s.config.beta_schedule, s.config.beta_start, s.config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    for name, cls in (("ddim", DDIMScheduler), ("pndm", PNDMScheduler)):
        from_yaml = "".join(list(name))  # a name read from a config is not the interned literal
        assert type(make_sampler(from_yaml, train)) is cls
    for bad in ("abc", "euler", "DDIM", "xyz"):
        with pytest.raises(UserError, match="unknown sampler"):
            make_sampler(bad, train)


def test_guided_families_accept_any_dropout_in_zero_to_one():
    from mmloom.train.families.base import GuidedConfig

    class G(Section):
        cond_dropout: float = GuidedConfig.model_fields["cond_dropout"]

    assert G().cond_dropout == 0.1
    for p in (0.0, 0.5, 1.0):
        assert G(cond_dropout=p).cond_dropout == p
    for p in (-0.1, 1.1):
        with pytest.raises(ValidationError, match="cond_dropout"):
            G(cond_dropout=p)


@pytest.mark.parametrize("values,text", [
    ({"sampler": "pndm", "steps": 50, "guidance": 8.0}, "PNDM 50 steps, guidance 8"),
    ({"sampler": "ddim", "steps": 25, "guidance": 7.5}, "DDIM 25 steps, guidance 7.5"),
    ({"sampler": "algorithm1", "steps": None, "guidance": None}, "Algorithm 1 over all T steps"),
])
def test_sampling_summary(values, text):
    assert SamplingDefaults(**values).summary() == text


def test_each_familys_defaults_come_from_its_config_and_only_versatile_writes_text():
    from mmloom.train.families import get_family

    mvader = get_family("mvader")
    assert (mvader.sampling.sampler, mvader.sampling.steps, mvader.sampling.guidance) == ("pndm", 50, 8.0)
    assert mvader.config(mvader.Config()) is not None
    assert get_family("mumu").makes_pictures(None) is True
    assert {n: get_family(n).text_outputs for n in ("mumu", "mvader", "versatile", "mtdiffusion", "kandinsky")} == {
        "mumu": False, "mvader": False, "versatile": True, "mtdiffusion": False, "kandinsky": False}


def test_a_familys_old_lr_keys_stop_the_load_naming_the_group():
    from mmloom.train.families import get_family

    fam = get_family("mumu")
    groups = list(type(fam.Config().lr).model_fields)
    assert groups and all(fam.Config.renamed_keys()[f"lr_{g}"] == f"lr.{g}" for g in groups)
    with pytest.raises(Exception, match=rf"model\.lr_{groups[0]} is now model\.lr\.{groups[0]}"):
        fam.config({f"lr_{groups[0]}": 1e-4})


def test_generate_refuses_an_option_the_family_does_not_have():
    from mmloom.errors import UserError
    from mmloom.train.families import get_family

    with pytest.raises(UserError, match=r"theta: not a sampling option of mumu$"):
        get_family("mumu").generate(None, ["a red circle"], theta=0.5)
    with pytest.raises(UserError, match=r"colour: not a sampling option of mvader \(it has theta\)"):
        get_family("mvader").generate(None, ["a red circle"], colour="red")


@pytest.mark.parametrize("name", ["mumu", "mvader", "versatile", "mtdiffusion", "kandinsky"])
def test_every_learning_rate_accepts_zero_and_refuses_a_negative(name):
    """A rate of 0 leaves its group out (`lr_groups`); a negative one would climb the
    loss: every group of every family refuses it, naming the group."""
    from mmloom.train.families import get_family

    fam = get_family(name)
    for group in type(fam.Config().lr).model_fields:
        assert getattr(fam.config({"lr": {group: 0.0}}).lr, group) == 0.0
        with pytest.raises(Exception, match=rf"lr\.{group}"):
            fam.config({"lr": {group: -1e-6}})


@pytest.mark.parametrize("name", ["mumu", "mvader", "versatile", "mtdiffusion", "kandinsky"])
def test_every_familys_sampling_needs_a_step_and_a_non_negative_guidance(name):
    """Each family restates its paper's sampling defaults with their bounds: one step and
    guidance 0 (no guidance) are allowed, zero steps and negative guidance are not (every
    step count and every guidance scale a family samples with)."""
    from mmloom.train.families import get_family

    fam = get_family(name)
    defaults = fam.Config().sampling
    # every step count (Kandinsky's prior_steps too)
    counts = [k for k in type(defaults).model_fields if k.endswith("steps")]
    assert ("prior_steps" in counts) == (name == "kandinsky") and "steps" in counts
    for k in counts:
        assert getattr(fam.config({"sampling": {k: 1}}).sampling, k) == 1
        with pytest.raises(Exception, match=rf"sampling\.{k}"):
            fam.config({"sampling": {k: 0}})
    # every guidance scale (VD's text_guidance, Kandinsky's prior_guidance too); MT-Diffusion's
    # Algorithm 1 has none
    scales = [k for k in type(defaults).model_fields if k.endswith("guidance") and getattr(defaults, k) is not None]
    assert ("guidance" in scales) == (name != "mtdiffusion")
    for k in scales:
        assert getattr(fam.config({"sampling": {k: 0.0}}).sampling, k) == 0.0
        with pytest.raises(Exception, match=rf"sampling\.{k}"):
            fam.config({"sampling": {k: -0.5}})


@pytest.mark.parametrize("name,field", [(f, "cond_dropout") for f in ("mumu", "mvader", "versatile", "kandinsky")]
                         + [("versatile", "mix_rate"), ("kandinsky", "text_weight"), ("mvader", "image_prob")])
def test_every_familys_shares_are_probabilities(name, field):
    """The share of prompts replaced by the empty one (classifier-free guidance's training)
    and each family's other shares (VD's dual-context mix, Kandinsky's text weight in a
    fusion, M-VADER's image pairs): 0 and 1 allowed, nothing outside."""
    from mmloom.train.families import get_family

    fam = get_family(name)
    for ok in (0.0, 1.0):
        assert getattr(fam.config({field: ok}), field) == ok
    for bad in (-0.1, 1.5):
        with pytest.raises(Exception, match=field):
            fam.config({field: bad})
