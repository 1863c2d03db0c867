"""Tiny random-weight models in the real on-disk formats.

Tests and the demo build these and load them through the same code as real weights
(`mmloom/models.py`): an open_clip local directory (config + state dict), LAION-layout
MLP heads (torch state dicts), a timm checkpoint, a Hugging Face ``save_pretrained``
image classifier. Random weights exercise the plumbing, not judgement: their scores
mean nothing.
"""

from __future__ import annotations

import os

import torch

from mmloom.clip import TINY_CLIP_CFG, make_open_clip


def make_hf_classifier(path: str, labels: list[str], seed: int = 0) -> str:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, num_labels=len(labels),
                    id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    ViTForImageClassification(cfg).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def make_score_models(root: str) -> dict:
    """Build every tiny scoring model under ``root``; return a `score:` config section
    that uses them (NSFW through nudenet's real shipped detector)."""
    from ..filters.aesthetic import save_aesthetic_head
    from ..filters.heads import save_head
    from ..filters.watermark import save_timm_checkpoint

    os.makedirs(root, exist_ok=True)
    clip = make_open_clip(os.path.join(root, "tiny-clip"))
    dim = TINY_CLIP_CFG["embed_dim"]
    save_aesthetic_head(os.path.join(root, "aesthetic-head.pth"), in_dim=dim)
    save_head(os.path.join(root, "nsfw-head.pt"), [dim, 16, 1])
    save_timm_checkpoint(os.path.join(root, "watermark-tiny.pt"), "test_efficientnet", "linear")
    make_hf_classifier(os.path.join(root, "tiny-hf-nsfw"), ["normal", "nsfw"])
    return {
        "batch_size": 8,
        "clip": {"model": clip, "store_embeddings": True},
        "nsfw": {"backend": "nudenet"},
        "watermark": {"backend": "timm", "model": os.path.join(root, "watermark-tiny.pt"),
                      "arch": "test_efficientnet", "head": "linear", "image_size": 64},
        "aesthetic": {"enabled": True, "clip_model": clip, "head": os.path.join(root, "aesthetic-head.pth")},
        "faces": {"backend": "opencv"},
    }


def make_grounding_dino(path: str, words: list[str], seed: int = 0, full_size: bool = False) -> str:
    """A tiny random Grounding DINO (Swin + BERT, transformers format) with a BERT
    tokenizer whose vocabulary holds ``words``, loadable by AutoProcessor/AutoModel.
    ``full_size``: grounding-dino-tiny's real architecture (Swin-T + BERT-base, 800 px),
    still random, for throughput measurements."""
    from transformers import (BertConfig, BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "'", "-"] + sorted({w.lower() for w in words} - {"."})
    if full_size:
        vocab += [f"[unused{i}]" for i in range(30522 - len(vocab))]
    vocab_file = os.path.join(path, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=vocab_file, do_lower_case=True)
    backbone = SwinConfig(image_size=224, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=7, out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=256)
    cfg = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1, decoder_layers=2,
                              encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2,
                              num_queries=30, num_feature_levels=4, encoder_n_points=2, decoder_n_points=2, max_text_len=256)
    size = {"shortest_edge": 256, "longest_edge": 384}
    if full_size:
        cfg, size = GroundingDinoConfig(), {"shortest_edge": 800, "longest_edge": 1333}
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(cfg).save_pretrained(path)
    proc = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size=size), tokenizer=tok)
    proc.save_pretrained(path)
    return path


def make_original_grounding_dino(path: str, words: list[str], seed: int = 0) -> dict:
    """A random Grounding DINO in IDEA-Research's released format: the package's SwinT_OGC
    settings (Swin-T backbone, the same module names) with the transformer shrunk (1+1
    layers, feed-forward 128, 30 queries; its width stays 256, which the package fixes in places) written as a ``NAME = literal`` settings file, the
    weights as ``{"model": state_dict}`` in a .pth like groundingdino_swint_ogc.pth, and a
    tiny BERT with a vocabulary holding ``words``. Returns the ``ground.groundingdino``
    section that loads it."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from ..filters.grounding import read_literal_settings

    os.makedirs(path, exist_ok=True)
    text = os.path.join(path, "bert")
    os.makedirs(text, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", ",", "'", "-"] + sorted({w.lower() for w in words} - {".", "?"})
    with open(os.path.join(text, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=os.path.join(text, "vocab.txt"), do_lower_case=True).save_pretrained(text)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=256)).save_pretrained(text)
    settings = read_literal_settings("SwinT_OGC")
    settings.update(enc_layers=1, dec_layers=1, dim_feedforward=128, num_queries=30,  # width 256: the package fixes it in places
                    text_encoder_type="bert-base-uncased")
    config = os.path.join(path, "GroundingDINO_SwinT_tiny.py")
    with open(config, "w") as f:
        f.write("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    section = {"weights": os.path.join(path, "groundingdino_swint_tiny.pth"), "config": config, "text_encoder": text,
               "image_size": 128, "max_size": 192}
    from ..filters.grounding import OriginalGroundingDino  # builds the model through the package
    from ..curate.config import OriginalDinoConfig

    model, _tok = OriginalGroundingDino.build(OriginalDinoConfig.model_validate(section))
    torch.save({"model": model.state_dict()}, section["weights"])
    return section


def make_random_inception(path: str, seed: int = 0) -> str:
    """torch-fidelity's InceptionV3 (FID's network, its real architecture and key names:
    it has no smaller variant) with random weights, saved as the released state dict is,
    for FID / KID plumbing tests. Building it would download the real weights, so the
    constructor's loading is stubbed out while it is made."""
    from unittest import mock

    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
                mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None):
            net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        for m in net.modules():  # He init: with torch's default the 2048-d features of 94 random layers vanish (~1e-8)
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path
