"""Hand-written mutants of the mechanisms issue 15 names, each run against its targeted
tests: prints KILLED or SURVIVED per mutant (the file is restored after each).

    ./dev python bench/mutants.py [NAME-SUBSTRING...]

Each mutant replaces one exact snippet (which must occur once) with a wrong one, the way a
slip in an edit would; bench/mutation.sh runs cosmic-ray's exhaustive operators instead."""

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
M = "tests/test_mechanisms.py"
# name, file, snippet, replacement, tests (pytest args)[, why a survivor is harmless]
MUTANTS = [
    ("MT training: no aggregation in z_t", "train/families/mtdiffusion.py", "zt = self.agg.marginal(z0, e, t, eps)",
     "zt = self.agg.marginal(z0, 0 * e, t, eps)", [M, "-k", "training_aggregates"]),
    ("MT training: plain DDPM noising", "train/families/mtdiffusion.py", "zt = self.agg.marginal(z0, e, t, eps)",
     "zt = self.agg.marginal(z0, e, t, eps) - self.agg._c(self.agg.alpha_tilde, t, z0) * e", [M, "-k", "training_aggregates"]),
    ("MT lambda: head weighed 1", "train/families/mtdiffusion.py", "mse + self.cfg.loss_weight * head_loss",
     "mse + head_loss", [M, "-k", "training_aggregates"]),
    ("MT lambda default 0.1 -> 1", "train/families/mtdiffusion.py", 'loss_weight: float = Field(0.1,',
     'loss_weight: float = Field(1.0,', [M, "-k", "training_aggregates"]),
    ("MT training: head regresses x, not E(x)", "train/families/mtdiffusion.py",
     "(e if self.cfg.task in IMAGE_TASKS else x).float()", "(z0 if self.cfg.task in IMAGE_TASKS else x).float()",
     [M, "-k", "training_aggregates"]),
    ("Alg. 1: no re-estimation", "train/families/mtdiffusion.py", "if known is None:  # Algorithm 1",
     "if False:  # Algorithm 1", [M, "-k", "algorithm1"]),
    ("Alg. 1: w_t e added, not subtracted", "train/families/mtdiffusion.py", "/ a.sqrt() - w * e", "/ a.sqrt() + w * e",
     [M, "-k", "algorithm1"]),
    ("Alg. 1: beta_t noise, not beta~_t", "train/families/mtdiffusion.py", "np.sqrt(self.agg.beta_tilde[t])",
     "np.sqrt(self.agg.betas[t])", [M, "-k", "algorithm1"]),
    ("Alg. 1: noise at t = 0 too", "train/families/mtdiffusion.py", "                if t > 0:\n                    z = z + float",
     "                if t >= 0:\n                    z = z + float", [M, "-k", "algorithm1"],
     "equivalent: beta~_0 = beta_0 (1 - abar_{-1}) / (1 - abar_0) = 0, so the added noise is zero"),
    ("Alg. 1: z_T from N(0, I)", "train/families/mtdiffusion.py",
     "z = self.agg.marginal(torch.zeros_like(like), e,", "z = self.agg.marginal(torch.zeros_like(like), 0 * e,",
     [M, "-k", "algorithm1"]),
    ("M-VADER: roles swapped", "train/families/mvader.py", 'prompts = [[pictures[i]] if k == "image" else [batch["captions"][i]] if k == "caption"',
     'prompts = [[pictures[i]] if k == "caption" else [batch["captions"][i]] if k == "image"', [M, "-k", "mvader_conditions"]),
    ("M-VADER: image p 0.2 -> 0.5", "train/families/mvader.py", "image_prob: float = Field(0.2,", "image_prob: float = Field(0.5,",
     [M, "-k", "mvader_conditions"]),
    ("M-VADER: DDIM, not PNDM", "train/families/mvader.py", 'sampler: Sampler = Field("pndm"', 'sampler: Sampler = Field("ddim"',
     [M, "-k", "mvader_samples"]),
    ("M-VADER: guidance 6, not 8", "train/families/mvader.py", "guidance: float = Field(8.0,", "guidance: float = Field(6.0,",
     [M, "-k", "mvader_samples"]),
    ("M-VADER: generate ignores the default guidance", "train/families/mvader.py",
     "guidance = sampling.guidance if guidance is None else guidance", "guidance = 6.0 if guidance is None else guidance",
     [M, "-k", "mvader_samples"]),
    ("MUMU: perceiver kept by default", "train/families/mumu.py", 'path="HuggingFaceM4/idefics2-8b", bypass_resampler=True)',
     'path="HuggingFaceM4/idefics2-8b", bypass_resampler=False)', [M, "-k", "mumu"]),
    ("MUMU: perceiver not replaced", "train/encoders.py", "inner.connector = ProjectionOnly(conn)", "pass",
     [M, "-k", "mumu"]),
    ("MUMU: tokens per image = side, not side^2", "train/encoders.py", "self.processor.image_seq_len = side * side",
     "self.processor.image_seq_len = side", [M, "-k", "mumu"]),
    ("MUMU: LoRA rank 4", "train/families/mumu.py", "lora = dict(r=cfg.lora_rank,", "lora = dict(r=4,", [M, "-k", "mumu"]),
    ("MUMU: LoRA rank default 16", "train/families/mumu.py", "lora_rank: int = Field(8,", "lora_rank: int = Field(16,",
     [M, "-k", "mumu"]),
    ("VD: linear betas", "train/families/versatile.py", 'beta_schedule: str = Field("scaled_linear"',
     'beta_schedule: str = Field("linear"', [M, "-k", "versatile_schedule"]),
    ("VD: text context not normalized", "train/families/versatile.py",
     "return (tokens / pooled.norm(dim=-1, keepdim=True)[:, None].clamp(min=1e-6))", "return (tokens",
     [M, "-k", "divided_by_the_pooled_norm"]),
    ("VD: text pooled from the first token", "train/families/versatile.py",
     "pooled = tokens[torch.arange(len(texts)), t.argmax(dim=-1)]", "pooled = tokens[:, 0]",
     [M, "-k", "divided_by_the_pooled_norm"]),
    ("VD: image context per-token normalized", "train/families/versatile.py",
     "return (ctx / pooled.float().cpu().norm(dim=-1, keepdim=True)[:, None]", "return (ctx / ctx.norm(dim=-1, keepdim=True)",
     [M, "-k", "divided_by_the_pooled_norm"]),
    ("VD: layer mixing at 1 - rate", "train/families/versatile.py", "text_at = text_layers(n, rate)",
     "text_at = text_layers(n, 1 - rate)", [M, "-k", "layer_mixing"]),
    ("VD: layer mixing bunched at the start", "train/families/versatile.py", "return {round(i * n / k) for i in range(k)}",
     "return {i for i in range(k)}", [M, "-k", "layer_mixing"]),
    ("VD: text contexts through the image UNet's blocks", "train/families/versatile.py",
     '"text": nn.ModuleList(text_unet.get_submodule(p) for p in self.paths),',
     '"text": nn.ModuleList(image_unet.get_submodule(p) for p in self.paths),',
     ["tests/test_reference_equivalence.py", "-k", "versatile_matches"]),
    ("MoVQ: decode without quantizing", "train/diffusion.py", "force_not_quantize=False", "force_not_quantize=True",
     [M, "-k", "movq"]),
    ("Kandinsky: prior target not normalized", "train/families/kandinsky.py", "x0 = self.norm(self._image_embeddings(batch))",
     "x0 = self._image_embeddings(batch)", [M, "-k", "kandinsky"]),
    ("Kandinsky: linear prior output not denormalized", "train/families/kandinsky.py",
     "return self.norm.inverse(self.prior(tokens, mask, pooled))", "return self.prior(tokens, mask, pooled)", [M, "-k", "kandinsky"]),
    ("Kandinsky: diffusion prior output not denormalized", "train/families/kandinsky.py", "        return self.norm.inverse(x)\n",
     "        return x\n", [M, "-k", "kandinsky"]),
    ("Kandinsky: inverse subtracts the mean", "train/families/kandinsky.py", "return x * self.std + self.mean",
     "return x * self.std - self.mean", [M, "-k", "kandinsky"]),
    ("Kandinsky: zero std not floored", "train/families/kandinsky.py", "torch.as_tensor(std).clamp(min=1e-6)",
     "torch.as_tensor(std).clamp(min=-0.999999)", [M, "-k", "kandinsky"]),
    ("aspect: 0.6 dropped (>)", "curate/rules.py", 'MIN_ASPECT = Rule(ASPECT, ">=")', 'MIN_ASPECT = Rule(ASPECT, ">")',
     [M, "-k", "aspect"]),
    ("aspect: prefilter bound 0.5", "curate/config.py", 'min_aspect: Optional[float] = Field(0.6, gt=0, description="minimum width/height")',
     'min_aspect: Optional[float] = Field(0.5, gt=0, description="minimum width/height")', [M, "-k", "aspect"]),
    ("aspect: select bound 0.5", "curate/config.py", 'min_aspect: Optional[float] = Field(0.6, gt=0, description="minimum original',
     'min_aspect: Optional[float] = Field(0.5, gt=0, description="minimum original', [M, "-k", "aspect"]),
]


def main(selected: list[str]) -> int:
    survived = 0
    for name, rel, old, new, tests, *equivalent in MUTANTS:
        if selected and not any(s.lower() in name.lower() for s in selected):
            continue
        path = ROOT / rel
        text = path.read_text()
        if text.count(old) != 1:
            print(f"STALE     {name}: the snippet occurs {text.count(old)} times in {rel}")
            survived += 1
            continue
        path.write_text(text.replace(old, new))
        start = time.time()
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
        finally:
            path.write_text(text)
        verdict = "KILLED" if r.returncode == 1 else "SURVIVED" if r.returncode == 0 else f"ERROR {r.returncode}"
        note = f" [{equivalent[0]}]" if equivalent else ""
        survived += verdict != "KILLED" and not (verdict == "SURVIVED" and equivalent)
        print(f"{verdict:9} {name} ({time.time() - start:.0f} s){note}", flush=True)
        if verdict.startswith("ERROR"):
            print(r.stdout[-2000:], r.stderr[-2000:])
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
