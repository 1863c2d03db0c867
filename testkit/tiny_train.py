"""Tiny random-weight models in the real formats for the trainer's tests, demo and tiny
configs: an Idefics2 VLM with its processor (transformers ``save_pretrained``), a diffusers
UNet2DConditionModel (SD1.5-style or SDXL-style with text_time conditioning) and an
AutoencoderKL. They load through the same ``from_pretrained`` code as the real ones."""

from __future__ import annotations

import os

import torch

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]


def make_tiny_vlm(path: str, words: list[str], seed: int = 0, image_size: int = 64, patch_size: int = 16) -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2ImageProcessor, Idefics2Processor, PreTrainedTokenizerFast

    os.makedirs(path, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,'-!?:;")
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted({w.lower() for w in words} - set(chars)) + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    ip = Idefics2ImageProcessor(do_image_splitting=False, size={"longest_edge": image_size, "shortest_edge": image_size})
    proc = Idefics2Processor(image_processor=ip, tokenizer=tok, image_seq_len=4)
    cfg = Idefics2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size),
        perceiver_config=dict(hidden_act="silu", hidden_size=32, rms_norm_eps=1e-6, resampler_n_latents=4, resampler_depth=1,
                              resampler_n_heads=2, resampler_head_dim=8, num_key_value_heads=1),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=tok.pad_token_id, max_position_embeddings=1024),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    Idefics2ForConditionalGeneration(cfg).save_pretrained(path)
    proc.save_pretrained(path)
    return path


def unet_config(cross_attention_dim: int = 32, sdxl: bool = False, sample_size: int = 8) -> dict:
    cfg = dict(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8)
    if sdxl:  # SDXL's pooled text embedding and size conditioning (text_time)
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=cross_attention_dim + 6 * 8)
    return cfg


def make_tiny_unet(path: str, cross_attention_dim: int = 32, sdxl: bool = False, sample_size: int = 8, seed: int = 0) -> str:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    UNet2DConditionModel(**unet_config(cross_attention_dim, sdxl, sample_size)).save_pretrained(path)
    return path


def make_tiny_vae(path: str, sample_size: int = 64, seed: int = 0) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), latent_channels=4,
                  norm_num_groups=8, sample_size=sample_size).save_pretrained(path)
    return path


def make_tiny_vq(path: str, seed: int = 0) -> str:
    """A tiny diffusers VQModel in MoVQ's layout (spatial norm in the decoder), factor 8."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 32, 32, 32), latent_channels=4, num_vq_embeddings=64, vq_embed_dim=4,
            norm_num_groups=8, norm_type="spatial", sample_size=64).save_pretrained(path)
    return path


def kandinsky_unet_config(clip_dim: int = 32, text_width: int = 48, levels: int = 2, width: int = 32, sample_size: int = 8) -> dict:
    """The released Kandinsky 2.1 decoder UNet's config (kandinsky-community/kandinsky-2-1
    unet/config.json) with widths shrunk: the CLIP image embedding projected into 10 context
    tokens next to the multilingual text encoder's tokens (text_image_proj,
    ``encoder_hid_dim`` its hidden size, 1024 released) and added to the time embedding with
    the pooled text embedding (text_image); 8 output channels, epsilon and the learned
    variance. ``levels`` 4 is the released block structure, 2 a smaller one for demos."""
    down = ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * (levels - 1)
    up = ["SimpleCrossAttnUpBlock2D"] * (levels - 1) + ["ResnetUpsampleBlock2D"]
    return dict(sample_size=sample_size, in_channels=4, out_channels=8, layers_per_block=1,
                block_out_channels=tuple(width * (1 + i // 2) for i in range(levels)), down_block_types=tuple(down),
                up_block_types=tuple(up), mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=clip_dim,
                encoder_hid_dim=text_width, encoder_hid_dim_type="text_image_proj", addition_embed_type="text_image",
                attention_head_dim=8, resnet_time_scale_shift="scale_shift", norm_num_groups=8, class_embed_type=None)


def make_tiny_unet_kandinsky(path: str, clip_dim: int = 32, text_width: int = 48, seed: int = 0, levels: int = 2) -> str:
    """A tiny Kandinsky 2.1 decoder UNet (see :func:`kandinsky_unet_config`)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    UNet2DConditionModel(**kandinsky_unet_config(clip_dim, text_width, levels)).save_pretrained(path)
    return path


def make_tiny_mclip(path: str, words: list[str] | None = None, hidden: int = 48, dim: int = 32, seed: int = 0) -> str:
    """A tiny Kandinsky 2.1 decoder text encoder: diffusers' MultilingualCLIP (XLM-RoBERTa
    and a linear map of its mean token to the CLIP width ``dim``) with an XLM-R tokenizer
    (Unigram over ``words`` and single characters) built here, saved side by side."""
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP
    from transformers import XLMRobertaTokenizer

    os.makedirs(path, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,'-!?:;")
    pieces = sorted({w.lower() for w in (words or TINY_WORDS)})
    vocab = ([(t, 0.0) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] + [("\u2581" + w, -1.0) for w in pieces]
             + [("\u2581" + c, -4.0) for c in chars] + [(c, -5.0) for c in chars])
    tok = XLMRobertaTokenizer(vocab=vocab, model_max_length=77)
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = MCLIPConfig(transformerDimSize=hidden, imageDimSize=dim, hidden_size=hidden, intermediate_size=64, num_attention_heads=2,
                      num_hidden_layers=2, vocab_size=len(tok), max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    MultilingualCLIP(cfg).save_pretrained(path)
    return path


# the released kandinsky-community/kandinsky-2-1-prior scheduler/scheduler_config.json
KANDINSKY_PRIOR_SCHEDULER = dict(num_train_timesteps=1000, variance_type="fixed_small_log", clip_sample=True, clip_sample_range=10.0,
                                 prediction_type="sample")


def make_tiny_kandinsky_prior(path: str, dim: int = 32, seed: int = 0) -> str:
    """A tiny Kandinsky 2.1 prior in the released layout (kandinsky-community/kandinsky-2-1-prior):
    ``prior/`` a diffusers PriorTransformer with its config.json's structure (77 text tokens,
    4 additional embeddings, linear encoder projection, prd embedding) and widths shrunk
    (embedding_dim 768 -> ``dim``, 32 heads of 64 -> 2 of 16, 20 layers -> 2), its
    clip_mean/clip_std filled as fitted statistics (the released ones are); ``scheduler/``
    its UnCLIPScheduler; ``model_index.json`` as the released pipeline's."""
    import json

    from diffusers import PriorTransformer, UnCLIPScheduler

    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=dim, num_embeddings=77,
                             additional_embeddings=4, dropout=0.0)
    with torch.no_grad():  # zeros at init; trained (and non-zero) in the released weights
        prior.positional_embedding.normal_(0, 0.02)
        prior.prd_embedding.normal_(0, 0.02)
        prior.clip_mean.normal_(0, 0.5)
        prior.clip_std.uniform_(0.2, 2.0)
    prior.save_pretrained(os.path.join(path, "prior"))
    UnCLIPScheduler(**KANDINSKY_PRIOR_SCHEDULER).save_pretrained(os.path.join(path, "scheduler"))
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({"_class_name": "KandinskyPriorPipeline", "prior": ["diffusers", "PriorTransformer"],
                   "scheduler": ["diffusers", "UnCLIPScheduler"]}, f)
    return path


def make_tiny_clip_l(path: str, seed: int = 0, embed_dim: int = 32, text_width: int = 32) -> str:
    """A tiny open_clip model shaped as CLIP ViT-L/14 is for the released Kandinsky prior:
    its text tokens as wide as its embedding (768 and 768 released; 32 here), 77 positions.
    ``embed_dim`` other than 32 gives that embedding width with the towers still tiny (the
    text tokens stay ``text_width`` wide, so such a CLIP fits the released prior's layout
    only with ``text_width`` equal to it: 768 and 768 is the released width, about 50 M
    parameters, most of them the 49,408-token embedding; 768 alone serves the families
    that read only the embedding width, e.g. VD at 768)."""
    import json

    import open_clip

    cfg = {"embed_dim": embed_dim, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width, "heads": 2, "layers": 2}}
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(open_clip.CLIP(**cfg).state_dict(), os.path.join(path, "open_clip_pytorch_model.bin"))
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                        "std": [0.26862954, 0.26130258, 0.27577711]}}, f)
    return path


def make_tiny_text_unet(path: str, latent_dim: int = 32, cross_attention_dim: int = 32, seed: int = 0) -> str:
    """A tiny diffusers UNetFlatConditionModel (Versatile Diffusion's text data layers:
    FCResBlocks) with tiny:unet's block layout, so the two share context and global layers."""
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel

    torch.manual_seed(seed)
    UNetFlatConditionModel(sample_size=4, in_channels=latent_dim // 4, out_channels=latent_dim // 4, layers_per_block=1,
                           block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlockFlat", "DownBlockFlat"),
                           up_block_types=("UpBlockFlat", "CrossAttnUpBlockFlat"), cross_attention_dim=cross_attention_dim,
                           attention_head_dim=8, norm_num_groups=8).save_pretrained(path)
    return path


def make_tiny_mumu(root: str, words: list[str], sdxl: bool = False) -> dict:
    """Every tiny part under ``root``; returns the ``model:`` section of a mumu config."""
    vlm = make_tiny_vlm(os.path.join(root, "vlm"), words)
    unet = make_tiny_unet(os.path.join(root, "unet"), 32, sdxl)
    vae = make_tiny_vae(os.path.join(root, "vae"))
    return {"encoder": {"path": vlm, "image_size": 64}, "backbone": {"path": unet, "subfolder": None},
            "autoencoder": {"path": vae, "subfolder": None}, "adapter_layers": 2, "adapter_heads": 2}


TINY_WORDS = """a an the and his her their with in on of to at by for from under over behind near side looking
man woman boy girl person people child dog cat horse bird car bicycle motorcycle rocket astronaut flag
cup coffee saucer spoon table chair tree grass field sky sea beach mountain house street city wall brick
red green blue yellow white black grey gray orange purple pink brown circle square triangle background
photo picture painting portrait style cartoon animated realistic sitting standing running riding holding""".split()


def _tiny_clip(path: str) -> str:
    """The score stage's tiny open_clip model (same seed, so the same weights as the
    demo's: its stored embeddings and this model's agree)."""
    from mmloom.clip import make_open_clip

    return make_open_clip(path)


def resolve_tiny(ref: str, cache: str | None = None) -> str:
    """``tiny:vlm`` / ``tiny:unet`` / ``tiny:unet-sdxl`` / ``tiny:kandinsky-unet`` / ``tiny:mclip`` / ``tiny:vae`` / ``tiny:vq`` / ``tiny:clip`` / ``tiny:clip-l`` / ``tiny:kandinsky-prior`` / ``tiny:text-unet`` / ``tiny:text-vae`` -> a directory holding
    that tiny random-weight model in its real format (made once, then reused)."""
    if not ref.startswith("tiny:"):
        return ref
    name = ref.split(":", 1)[1]
    root = cache or os.environ.get("MMLOOM_TINY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mmloom", "tiny"))
    path = os.path.join(root, name)
    if any(os.path.exists(os.path.join(path, f)) for f in ("config.json", "open_clip_config.json", "text_vae.json", "model_index.json")):
        return path
    makers = {
        "vlm": lambda p: make_tiny_vlm(p, TINY_WORDS),
        "unet": lambda p: make_tiny_unet(p, 32, False),
        "unet-sdxl": lambda p: make_tiny_unet(p, 32, True),
        "vae": make_tiny_vae,
        "vq": make_tiny_vq,
        "kandinsky-unet": make_tiny_unet_kandinsky,
        "mclip": make_tiny_mclip,
        "clip": _tiny_clip,
        "clip-l": make_tiny_clip_l,
        "kandinsky-prior": make_tiny_kandinsky_prior,
        "text-unet": make_tiny_text_unet,
        "text-vae": lambda p: __import__("mmloom.train.text_vae", fromlist=["x"]).make_tiny_text_vae(p, TINY_WORDS),
    }
    if name not in makers:
        from mmloom.errors import UserError

        raise UserError(f"unknown tiny model {ref!r}; known: {', '.join('tiny:' + k for k in makers)}")
    tmp = path + ".tmp"
    with torch.random.fork_rng(devices=[]):  # making it must not disturb the caller's seeded RNG
        makers[name](tmp)
    os.replace(tmp, path) if not os.path.exists(path) else None
    return path
