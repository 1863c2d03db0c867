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


def make_tiny_mumu(root: str, words: list[str], sdxl: bool = False) -> dict:
    """Every tiny part under ``root``; returns the ``model:`` section of a mumu config."""
    vlm = make_tiny_vlm(os.path.join(root, "vlm"), words)
    unet = make_tiny_unet(os.path.join(root, "unet"), 32, sdxl)
    vae = make_tiny_vae(os.path.join(root, "vae"))
    return {"vlm": vlm, "unet": unet, "unet_subfolder": None, "vae": vae, "vae_subfolder": None,
            "adapter_layers": 2, "adapter_heads": 2, "vlm_image_size": 64}
