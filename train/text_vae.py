"""A text VAE in Optimus's design (Versatile Diffusion section 3.3): a BERT-style encoder
maps a sentence to a Gaussian latent, a GPT-2-style decoder writes a sentence from it
(the latent enters the decoder as a prefix embedding).

On disk (a local directory or a hub repo of the same layout, loaded by ``TextVAE.load``):
``encoder/`` (transformers BertModel + tokenizer), ``decoder/`` (GPT2LMHeadModel +
tokenizer), ``heads.safetensors`` (latent projections) and ``text_vae.json``.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from mmloom.errors import UserError


class TextVAE(nn.Module):
    def __init__(self, encoder, enc_tok, decoder, dec_tok, latent_dim: int):
        super().__init__()
        self.encoder, self.enc_tok, self.decoder, self.dec_tok = encoder, enc_tok, decoder, dec_tok
        self.latent_dim = latent_dim
        self.to_latent = nn.Linear(encoder.config.hidden_size, 2 * latent_dim)  # mean, log-variance
        self.to_prefix = nn.Linear(latent_dim, decoder.config.n_embd)

    @classmethod
    def load(cls, ref: str) -> "TextVAE":
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, BertModel, GPT2LMHeadModel

        path = ref
        if not os.path.isdir(ref):
            try:
                from huggingface_hub import snapshot_download

                path = snapshot_download(ref)
            except Exception as e:  # offline, unknown repo, no access
                raise UserError(f"text VAE {ref!r} is neither a local directory nor a reachable hub repo ({type(e).__name__}); "
                                f"give a directory in the text_vae layout (encoder/, decoder/, heads.safetensors, text_vae.json)") from None
        meta_path = os.path.join(path, "text_vae.json")
        if not os.path.exists(meta_path):
            raise UserError(f"text VAE {ref}: no text_vae.json (expected encoder/, decoder/, heads.safetensors, text_vae.json)")
        meta = json.load(open(meta_path))
        vae = cls(BertModel.from_pretrained(os.path.join(path, "encoder")), AutoTokenizer.from_pretrained(os.path.join(path, "encoder")),
                  GPT2LMHeadModel.from_pretrained(os.path.join(path, "decoder")), AutoTokenizer.from_pretrained(os.path.join(path, "decoder")),
                  meta["latent_dim"])
        vae.load_state_dict(load_file(os.path.join(path, "heads.safetensors")), strict=False)
        return vae

    def save(self, path: str) -> str:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        for sub, model, tok in (("encoder", self.encoder, self.enc_tok), ("decoder", self.decoder, self.dec_tok)):
            model.save_pretrained(os.path.join(path, sub))
            tok.save_pretrained(os.path.join(path, sub))
        save_file({k: v.contiguous() for k, v in self.state_dict().items() if k.startswith(("to_latent", "to_prefix"))},
                  os.path.join(path, "heads.safetensors"))
        with open(os.path.join(path, "text_vae.json"), "w") as f:
            json.dump({"latent_dim": self.latent_dim, "design": "optimus: bert encoder, gpt2 decoder, prefix latent"}, f)
        return path

    @torch.no_grad()
    def encode(self, texts: list[str], sample: bool = False) -> torch.Tensor:
        dev = self.to_latent.weight.device
        t = self.enc_tok([s or "" for s in texts], return_tensors="pt", padding=True, truncation=True, max_length=64).to(dev)
        pooled = self.encoder(**t).last_hidden_state[:, 0]
        mean, logvar = self.to_latent(pooled).chunk(2, dim=-1)
        return mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, max_length: int = 32) -> list[str]:
        """Greedy decoding from the latent prefix."""
        prefix = self.to_prefix(latents.to(self.to_prefix.weight.dtype))[:, None]
        bos = self.dec_tok.bos_token_id if self.dec_tok.bos_token_id is not None else 0
        ids = torch.full((latents.shape[0], 1), bos, dtype=torch.long, device=latents.device)
        emb = self.decoder.get_input_embeddings()
        done = torch.zeros(latents.shape[0], dtype=torch.bool, device=latents.device)
        for _ in range(max_length):
            logits = self.decoder(inputs_embeds=torch.cat([prefix, emb(ids)], dim=1)).logits[:, -1]
            nxt = logits.argmax(-1)
            if self.dec_tok.eos_token_id is not None:
                done |= nxt == self.dec_tok.eos_token_id
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if done.all():
                break
        return [self.dec_tok.decode(row[1:], skip_special_tokens=True).strip() for row in ids]


def make_tiny_text_vae(path: str, words: list[str], latent_dim: int = 32, seed: int = 0) -> str:
    """A tiny random text VAE in the on-disk layout above (BERT and GPT-2, word-level vocabularies)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import BertConfig, BertModel, BertTokenizerFast, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({w.lower() for w in words})]
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab))
    enc_tok = BertTokenizerFast(os.path.join(path, "vocab.txt"))
    os.remove(os.path.join(path, "vocab.txt"))
    dvocab = {t: i for i, t in enumerate(["<|endoftext|>", "<unk>", *sorted({w.lower() for w in words})])}
    tk = Tokenizer(models.WordLevel(dvocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    dec_tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                      unk_token="<unk>", pad_token="<|endoftext|>")
    torch.manual_seed(seed)
    enc = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    dec = GPT2LMHeadModel(GPT2Config(vocab_size=len(dvocab), n_embd=32, n_layer=1, n_head=2, n_positions=128,
                                     bos_token_id=0, eos_token_id=0))
    return TextVAE(enc, enc_tok, dec, dec_tok, latent_dim).save(path)
