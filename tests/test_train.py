"""Trainer and MUMU family: prompt rules, frozen and LoRA parts, group learning rates,
an overfit check, exact kill-and-resume, sampling, and the reference configs' loading
code with tiny stand-ins of the same architecture classes."""

import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
import yaml
from PIL import Image

from mmloom.configbase import load_model
from mmloom.errors import UserError
from mmloom.train.config import PromptConfig, TrainConfig
from mmloom.train.prompts import PromptBuilder, pad_to_square

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_sample(n_crops=2, person=True, head=True, size=(80, 48)):
    segs, sample = [], {"jpg": Image.new("RGB", size, "white")}
    for i in range(n_crops):
        segs.append({"type": "text", "text": f"w{i} "})
        seg = {"type": "image", "member": f"crop{i}.jpg", "phrase": f"thing{i}", "span": [0, 1], "box": [0, 0, 1, 1],
               "score": 0.5, "label": "person" if (person and i == 0) else f"thing{i}"}
        sample[f"crop{i}.jpg"] = Image.new("RGB", (30 + i, 20), (200, 10 * i, 0))
        if person and head and i == 0:
            seg["head_member"] = "crop0_head.jpg"
            sample["crop0_head.jpg"] = Image.new("RGB", (12, 12), "blue")
        segs.append(seg)
        segs.append({"type": "text", "text": f"thing{i} "})
    sample["prompt.json"] = {"segments": segs}
    return sample


def test_prompt_counts_padding_and_sizes():
    b = PromptBuilder(PromptConfig(crop_size=40, augment_prob=0.0))
    p = b(fake_sample(5), random.Random(0))
    assert len(p.images) == 3 and all(im.size == (40, 40) for im in p.images)
    assert p.text == "".join(f"w{i} thing{i} " for i in range(5))  # the words always stay
    sq = pad_to_square(Image.new("RGB", (100, 50), "white"))
    assert sq.size == (100, 100) and sq.getpixel((0, 0)) == (0, 0, 0) and sq.getpixel((50, 50)) == (255, 255, 255)


def test_head_swap_and_augmentation_rates():
    b = PromptBuilder(PromptConfig())
    rng = random.Random(1)
    draws = [b(fake_sample(1), rng) for _ in range(1500)]
    head_rate = sum(p.head_swaps for p in draws) / sum(p.person_crops for p in draws)
    aug_rate = sum(p.augmented for p in draws) / sum(len(p.images) for p in draws)
    assert abs(head_rate - 0.7) < 0.04 and abs(aug_rate - 0.2) < 0.04
    no_head = [b(fake_sample(1, head=False), rng) for _ in range(50)]
    assert sum(p.head_swaps for p in no_head) == 0


def test_structure_image_and_stage_two():
    b = PromptBuilder(PromptConfig(structure=True, augment_prob=0))
    rng = random.Random(2)
    draws = [b(fake_sample(1), rng) for _ in range(800)]
    assert abs(sum(p.structure for p in draws) / 800 - 0.3) < 0.05
    with_structure = next(p for p in draws if p.structure)
    assert len(with_structure.images) == 2
    b2 = PromptBuilder(PromptConfig(stage=2, stage2_crop_size=56, augment_prob=0, head_prob=0))
    p = b2(fake_sample(3), random.Random(3))
    assert len(p.images) == 1 and p.images[0].size == (56, 56)
    assert p.person_crops == 1  # stage 2 prefers the person crop


# ---------------------------------------------------------------- model and loop
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mmloom.testkit.tiny_train import make_tiny_mumu

    root = tmp_path_factory.mktemp("tinymumu")
    return make_tiny_mumu(str(root), "a red blue green circle square on grey background man dog thing".split())


def tcfg(tiny, **loop):
    return TrainConfig.model_validate({
        "model": {**tiny, "cond_dropout": 0.0}, "prompt": {"crop_size": 64},
        "data": {"resolution": 64}, "loop": loop,
    })


def batch_of(n=2):
    from mmloom.train.prompts import Prompt

    gen = torch.Generator().manual_seed(0)
    return {"pixels": torch.rand((n, 3, 64, 64), generator=gen) * 2 - 1,
            "prompts": [Prompt(parts=["a red ", Image.new("RGB", (64, 64), "red"), " circle"]) for _ in range(n)]}


def test_frozen_lora_and_group_learning_rates(tiny):
    from mmloom.train.families import get_family

    fam = get_family("mumu")
    cfg = tcfg(tiny)
    model = fam.build(cfg.model, cfg)
    named = dict(model.named_parameters())
    assert any(n.startswith("ae.") for n in named) and not any(p.requires_grad for n, p in named.items() if n.startswith("ae."))
    assert not any(p.requires_grad for p in model.encoder.vision_parameters())
    assert all(p.requires_grad for n, p in named.items() if n.startswith("adapter."))
    assert not any(p.requires_grad for n, p in named.items() if n.startswith("unet.") and "lora_" not in n)
    assert any("lora_" in n and p.requires_grad for n, p in named.items() if n.startswith("unet."))
    assert any("lora_" in n for n in named if "text_model" in n) and any("lora_" in n for n in named if ".connector." in n)
    groups = fam.param_groups(model, cfg.model)
    assert {g["name"]: g["lr"] for g in groups} == {"connector": 3e-6, "lm": 3e-6, "adapter": 1e-5, "unet": 5e-6}  # Table 1
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups])
    assert [g["lr"] for g in opt.param_groups] == [3e-6, 3e-6, 1e-5, 5e-6]
    before = {n: p.detach().clone() for n, p in named.items()}
    for g in opt.param_groups:
        g["lr"] = 1e-2
    model(batch_of())["loss"].backward()
    opt.step()
    changed = {n for n, p in named.items() if not torch.equal(p, before[n])}
    assert changed and all(("lora_" in n) or n.startswith("adapter.") for n in changed)
    assert any(n.startswith("adapter.") for n in changed) and any("lora_" in n and n.startswith("unet.") for n in changed)


@pytest.mark.slow
def test_overfit_a_fixed_batch(tiny):
    from mmloom.train.families import get_family

    fam = get_family("mumu")
    cfg = tcfg(tiny)
    torch.manual_seed(0)
    model = fam.build(cfg.model, cfg)
    groups = fam.param_groups(model, cfg.model)
    opt = torch.optim.Adam([p for g in groups for p in g["params"]], lr=3e-3)
    batch = batch_of(2)
    losses = []
    for _ in range(150):
        torch.manual_seed(123)  # the same noise and timesteps every step: a fixed problem to memorize
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::25]


def test_sample_image_size(tiny):
    from mmloom.train.families import get_family

    fam = get_family("mumu")
    cfg = tcfg(tiny)
    model = fam.build(cfg.model, cfg).eval()
    ims = fam.generate(model, [["a ", Image.new("RGB", (64, 64), "red"), " circle"]] * 2, steps=4, guidance=6.0, seeds=[0, 1], size=64)
    assert [im.size for im in ims] == [(64, 64), (64, 64)]
    assert list(ims[0].getdata()) != list(ims[1].getdata())  # different seeds, different images


@pytest.mark.parametrize("name, unet", [("mumu-idefics2-sdxl.yaml", "tiny:unet-sdxl"), ("mumu-sd15.yaml", "tiny:unet")])
def test_reference_configs_load_with_tiny_stand_ins(name, unet, tiny, tmp_path, monkeypatch):
    from mmloom.train.families import get_family

    monkeypatch.setenv("MMLOOM_TINY_CACHE", str(tmp_path))
    ref = yaml.safe_load(open(os.path.join(ROOT, "configs", "train", name)))
    cfg = TrainConfig.model_validate(ref)
    assert cfg.model.lora_rank == 8 and cfg.model.encoder.bypass_resampler is True
    # same classes (Idefics2, UNet2DConditionModel with or without SDXL text_time, AutoencoderKL), tiny sizes
    ref["model"]["encoder"].update(path=tiny["encoder"]["path"], image_size=64)
    ref["model"].update(backbone={"path": unet, "subfolder": None}, autoencoder=tiny["autoencoder"], adapter_heads=2, adapter_layers=2)
    ref["prompt"]["crop_size"] = 64
    cfg = TrainConfig.model_validate(ref)
    model = get_family("mumu").build(cfg.model, cfg)
    assert model.sdxl == ("sdxl" in name) and len(model.adapter.blocks.layers) == 2
    loss = model(batch_of(1))["loss"]
    assert torch.isfinite(loss)


def test_sampling_uses_the_run_config_defaults_unless_told(tiny, monkeypatch):
    """`mmloom sample` without --steps/--guidance samples with the run's model.sampling (the
    family's paper defaults); given, they win; the sampler named there is the one used."""
    from diffusers import DDIMScheduler, PNDMScheduler

    import mmloom.train.diffusion as diffusion
    from mmloom.cli import build_parser
    from mmloom.train.families import get_family

    a = build_parser().parse_args(["sample", "run", "--prompt", "x"])
    assert a.steps is None and a.guidance is None
    seen = []

    def spy(sched, steps, shape, seeds, device, guidance, cond, uncond):
        seen.append((type(sched), steps, guidance))
        return torch.zeros((len(seeds), *shape))

    monkeypatch.setattr(diffusion, "guided_sample", spy)
    fam = get_family("mumu")
    cfg = TrainConfig.model_validate({"model": {**tiny, "sampling": {"steps": 7, "guidance": 2.5}}, "prompt": {"crop_size": 64},
                                      "data": {"resolution": 64}})
    model = fam.build(cfg.model, cfg).eval()
    prompt = [["a red circle"]]
    fam.generate(model, prompt, seeds=[0], size=64)
    fam.generate(model, prompt, steps=3, guidance=1.0, seeds=[0], size=64)
    model.cfg = model.cfg.model_copy(update={"sampling": model.cfg.sampling.model_copy(update={"sampler": "pndm"})})
    fam.generate(model, prompt, seeds=[0], size=64)
    assert seen == [(DDIMScheduler, 7, 2.5), (DDIMScheduler, 3, 1.0), (PNDMScheduler, 7, 2.5)]
    with pytest.raises(UserError, match="theta: not a sampling option of mumu"):
        fam.generate(model, prompt, seeds=[0], size=64, theta=0.5)


def test_a_misspelt_family_key_stops_train_before_anything_is_made(tmp_path, capsys):
    """model.lr.unett fails when the config loads, naming the key, before the output
    directory or the accelerator exists (it used to be accepted silently)."""
    from mmloom.cli import main

    with tarfile.open(tmp_path / "00000.tar", "w"):
        pass  # a shard the loop would accept, so only the misspelt key can stop it
    cfg = tmp_path / "t.yaml"
    cfg.write_text(yaml.safe_dump({"family": "mumu", "model": {"lr": {"unett": 1e-4}},
                                   "data": {"shards": str(tmp_path / "*.tar")}}))
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"invalid config in {cfg}" in err and "model.lr.unett: unknown key" in err and "Traceback" not in err
    assert not out.exists()


def test_missing_model_is_a_clear_error(tiny):
    from mmloom.errors import UserError
    from mmloom.train.families import get_family

    bad = {**tiny, "backbone": {"path": "stabilityai/stable-diffusion-xl-base-1.0", "subfolder": "unet"}}
    cfg = tcfg(bad)
    with pytest.raises(UserError, match="stable-diffusion-xl-base-1.0.*not available"):
        get_family("mumu").build(cfg.model, cfg)


# ---------------------------------------------------------------- loop: resume, logs, CLI
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two final/ shards written by hand in the build format."""
    d = tmp_path_factory.mktemp("final")
    rng = random.Random(0)
    for s in range(2):
        with tarfile.open(d / f"{s:05d}.tar", "w") as t:
            for i in range(8):
                key = f"{s}{i:05d}"
                color = tuple(rng.randrange(256) for _ in range(3))
                members = {"jpg": Image.new("RGB", (64, 48), color), "crop0.jpg": Image.new("RGB", (20, 30), color)}
                files = {}
                for ext, im in members.items():
                    buf = io.BytesIO()
                    im.save(buf, "JPEG")
                    files[ext] = buf.getvalue()
                segs = [{"type": "text", "text": "a "}, {"type": "image", "member": "crop0.jpg", "phrase": "red circle",
                         "span": [2, 12], "box": [0, 0, 20, 30], "score": 0.5, "label": "red circle"},
                        {"type": "text", "text": "red circle"}]
                files["prompt.json"] = json.dumps({"segments": segs}).encode()
                files["txt"] = b"a red circle"
                files["json"] = json.dumps({"weight": 2.0 if i % 2 else 1.0}).encode()
                if s == 1 and i == 3:
                    files["jpg"] = b"this is not a jpeg"  # a corrupt sample: logged, counted, skipped
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
    return str(d)


def run_cfg(tiny, shards, out, steps, every):
    return {"family": "mumu", "model": {**tiny, "lr": {"adapter": 1e-3, "unet": 1e-3}},
            "prompt": {"crop_size": 64}, "data": {"shards": shards, "resolution": 64, "shuffle_buffer": 8},
            "loop": {"out": out, "steps": steps, "batch_size": 2, "checkpoint_every": every, "tensorboard": True}}


@pytest.mark.slow
def test_killed_run_resumes_on_the_same_loss_curve(tiny, shards, tmp_path):
    from mmloom.train.loop import latest_checkpoint, read_metrics, train

    full = run_cfg(tiny, shards, str(tmp_path / "full"), 30, 10)
    r = train(load_model(TrainConfig, data=full), echo=lambda *a: None)
    assert r["steps"] == 30 and r["flops_per_sample"] > 0
    # the same run, killed (SIGKILL) after its first checkpoint, then resumed
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(run_cfg(tiny, shards, str(tmp_path / "killed"), 30, 4)))
    proc = subprocess.Popen([sys.executable, "-m", "mmloom", "train", str(cfg_path)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and latest_checkpoint(str(tmp_path / "killed")) is None and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ck = latest_checkpoint(str(tmp_path / "killed"))
    assert ck is not None and not ck.endswith("00000030"), "the kill should land mid-run"
    r2 = train(load_model(TrainConfig, data=run_cfg(tiny, shards, str(tmp_path / "killed"), 30, 4)), echo=lambda *a: None)
    assert r2["steps"] == 30
    a = [x["loss"] for x in read_metrics(str(tmp_path / "full"))]
    b = [x["loss"] for x in read_metrics(str(tmp_path / "killed"))]
    assert len(a) == len(b) == 30 and a == pytest.approx(b, rel=1e-5, abs=1e-6)
    last = read_metrics(str(tmp_path / "full"))[-1]
    assert set(last) >= {"loss", "images_per_s", "lr/adapter", "lr/unet", "data/corrupt_samples"}
    assert last["data/corrupt_samples"] >= 1
    assert os.listdir(tmp_path / "full" / "tensorboard")


@pytest.mark.slow
def test_sample_cli_writes_a_grid(tiny, shards, tmp_path):
    from mmloom.train.loop import train

    out = str(tmp_path / "run")
    train(load_model(TrainConfig, data=run_cfg(tiny, shards, out, 2, 2)), echo=lambda *a: None)
    Image.new("RGB", (40, 40), "red").save(tmp_path / "red.jpg")
    r = subprocess.run([sys.executable, "-m", "mmloom", "sample", out, "--prompt", f"a <image:{tmp_path}/red.jpg> red circle",
                        "--seeds", "0", "1", "2", "--steps", "5", "--out", str(tmp_path / "grid.png")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(tmp_path / "grid.png").size == (3 * 64, 64)
    r = subprocess.run([sys.executable, "-m", "mmloom", "sample", out, "--prompt", "a <image:/no/such.jpg> x"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "cannot be read" in r.stderr and "Traceback" not in r.stderr


def test_trainer_imports_neither_ray_nor_duckdb():
    code = ("import sys, mmloom.train.loop, mmloom.train.sample, mmloom.train.data, mmloom.train.families.mumu; "
            "print(sorted(m for m in ('ray', 'duckdb', 'img2dataset') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.slow
def test_accumulation_ema_and_checkpointing_options(tiny, shards, tmp_path):
    from mmloom.train.loop import latest_checkpoint, read_metrics, train

    cfg = run_cfg(tiny, shards, str(tmp_path / "opts"), 3, 3)
    cfg["loop"].update(grad_accum=2, ema_decay=0.9, gradient_checkpointing=True, tensorboard=False)
    r = train(load_model(TrainConfig, data=cfg), echo=lambda *a: None)
    assert r["steps"] == 3 and len(read_metrics(str(tmp_path / "opts"))) == 3
    ck = latest_checkpoint(str(tmp_path / "opts"))
    # the EMA and the data position are checkpointed beside the weights, optimizer and RNG,
    # as safetensors and JSON (no pickles), all sealed by the manifest
    names = set(os.listdir(ck))
    assert {"ema.safetensors", "ema.json", "data_state_0.json", "optimizer.bin", "random_states_0.pkl"} <= names
    assert not any(n.startswith("custom_checkpoint") for n in names)
    assert set(json.load(open(os.path.join(ck, "mmloom_checkpoint.json")))["files"]) == names - {"DONE", "mmloom_checkpoint.json"}
    with open(os.path.join(tmp_path / "opts", "train_config.yaml")) as f:
        assert yaml.safe_load(f)["loop"]["grad_accum"] == 2


@pytest.fixture(scope="module")
def validated_run(tiny, shards, tmp_path_factory):
    """2 steps with a validation grid at each (one prompt of the user's, 2 seeds, 2
    sampling steps); the full model state as it was when the last checkpoint was saved."""
    from mmloom.train import parts
    from mmloom.train.loop import train

    d = tmp_path_factory.mktemp("validated")
    Image.new("RGB", (40, 40), "red").save(d / "red.jpg")
    cfg = run_cfg(tiny, shards, str(d / "run"), 2, 2)
    cfg["loop"]["validation"] = {"every": 1, "prompts": [f"a <image:{d}/red.jpg> red circle"], "seeds": [0, 1], "steps": 2}
    saved = {}
    split = parts.split_state

    def spy(model):
        saved.clear()
        saved.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return split(model)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parts, "split_state", spy)
        r = train(load_model(TrainConfig, data=cfg), echo=lambda *a: None)
    return {"out": str(d / "run"), "result": r, "saved": saved, "dir": d}


def test_checkpoints_hold_what_training_changes_and_sample_rebuilds_the_trained_model(validated_run):
    """A checkpoint stores the trainable tensors (adapter, LoRA) and names the frozen
    pretrained parts (VLM, UNet base weights, autoencoder) in frozen.json instead of storing
    them; `sample` rebuilds exactly the trained model from it (resuming from such checkpoints:
    test_killed_run_resumes_on_the_same_loss_curve)."""
    from safetensors import safe_open

    from mmloom.train import parts
    from mmloom.train.loop import latest_checkpoint
    from mmloom.train.sample import load_for_sampling

    saved = validated_run["saved"]
    ck = latest_checkpoint(validated_run["out"])
    with safe_open(os.path.join(ck, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys and not any(k.startswith("ae.") for k in keys), "no frozen autoencoder tensor in a checkpoint"
    assert any(k.startswith("adapter.") for k in keys) and any("lora_" in k for k in keys)
    assert not any(k.startswith("unet.") and "lora_" not in k for k in keys), "UNet base weights stay out"
    frozen = json.load(open(os.path.join(ck, "frozen.json")))["parts"]
    assert {"ae.model.", "unet."} <= set(frozen) and frozen["ae.model."]["source"].endswith("vae")
    assert len(keys) < len(saved) / 2
    # sampling rebuilds the very model that was trained
    _family, model, _cfg = load_for_sampling(validated_run["out"])
    state = model.state_dict()
    assert set(state) == set(saved)
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    # a frozen part that is not what the run trained against stops the load, naming it
    with torch.no_grad():
        next(model.ae.parameters()).add_(1.0)
    with pytest.raises(UserError, match="frozen part ae.model"):
        parts.load_trained(model, ck)


def test_train_writes_its_report_and_validation_grids(validated_run):
    """loss.png, metrics.csv and summary.json (mean throughput over the run) come from
    `mmloom train` itself; a validation grid (a row per prompt, a column per seed) per
    validation step, in the run and in TensorBoard."""
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mmloom.cli import train_summary

    out, r = validated_run["out"], validated_run["result"]
    assert Image.open(os.path.join(out, "loss.png")).size[0] > 100
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    assert [int(x["step"]) for x in rows] == [1, 2] and {"loss", "images_per_s", "step_time_s"} <= set(rows[0])
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["steps"] == 2 and summary["images_per_s_mean"] > 0 and summary["step_time_s_mean"] > 0
    assert r["images_per_s_mean"] == summary["images_per_s_mean"]
    line = train_summary(r)
    assert line.startswith("train: 2 steps") and f"mean {r['images_per_s_mean']:.2f} images/s" in line
    for step in (1, 2):
        assert Image.open(os.path.join(out, "validation", f"step_{step:08d}.png")).size == (2 * 64, 64)
    ev = EventAccumulator(os.path.join(out, "tensorboard", "mmloom"), size_guidance={"images": 0})
    ev.Reload()
    assert "validation" in ev.Tags()["images"] and [e.step for e in ev.Images("validation")] == [1, 2]


def test_export_writes_library_formats_and_the_unet_matches_the_checkpoint(validated_run, tmp_path):
    """`mmloom export`: the UNet (LoRA merged) loads with diffusers' from_pretrained and
    predicts what the run's model predicts; the LoRA adapters in peft's layout; the
    adapter transformer as safetensors; a model card with the validation grid."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from mmloom.cli import main
    from mmloom.train.sample import load_for_sampling

    out = tmp_path / "export"
    assert main(["export", validated_run["out"], "--out", str(out)]) == 0
    names = set(os.listdir(out))
    assert {"unet", "unet_lora", "encoder_model_lora", "conditioning.safetensors", "conditioning.json",
            "README.md", "validation.png"} <= names
    assert "ae_model" not in names, "frozen parts are named, not copied"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out / "unet_lora"))
    with safe_open(str(out / "conditioning.safetensors"), "pt") as f:
        assert any(k.startswith("adapter.") for k in f.keys())
    card = (out / "README.md").read_text()
    assert "validation.png" in card and "mmloom-mumu" in card and "adapter_layers" in card
    unet = UNet2DConditionModel.from_pretrained(str(out / "unet")).eval()
    _family, model, _cfg = load_for_sampling(validated_run["out"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        want = model.unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample
        got = unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample
    assert torch.allclose(got, want, atol=1e-5)
    assert main(["export", validated_run["out"], "--out", str(out)]) == 2  # an export is never overwritten


def test_push_to_hub_says_it_needs_the_network(validated_run, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "mmloom", "export", validated_run["out"], "--out", str(tmp_path / "e"),
                        "--push-to-hub", "someone/tiny"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "needs the network" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "e").exists()
