"""How much of the shapes world survives a VAE round trip, read by the same detector `lightbooth eval` uses.

    python bench/vae_recon.py --vae src/lightbooth/builtin/model/vae --n 96 [--noise 0.1,0.2,0.3] [--subject]

A generated image can only pass the strict check if the VAE can draw it, so the share of reconstructions that
pass is a ceiling on the built-in model's prompt accuracy. Scenes are drawn from the world's own sampler (all
three kinds), each rendered, encoded (posterior mean), decoded, and checked against everything it contains.
The originals are checked too (they must all pass: a detector sanity line). `--subject` round-trips `--n`
instance images of WORLD.md's Subject A (the yellow/teal checker star, in random cells and backgrounds) too, at
every `--noise` level: the ceiling on DreamBooth's subject fidelity on a model with this VAE. `--reference VAE`
compares with the VAE a flow model was trained on: how far this encoder moved the world's latents (RMS in the
pipeline's normalized units) and how many scenes pass when the reference encoder's latents (what the flow model
draws) go through this decoder.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lightbooth.data import shapes  # noqa: E402
from lightbooth.eval import detector  # noqa: E402


def encode(vae, images) -> torch.Tensor:
    """Posterior means of PIL images, (B, z, 1, h, w)."""
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.inference_mode():
        return vae.encode(x[:, :, None]).latent_dist.mean


def round_trip(vae, images, noise: float = 0.0, seed: int = 0, encoder=None) -> list:
    """Encode (posterior mean; with `encoder`, another VAE's), add Gaussian noise of std `noise` in the pipeline's
    normalized latent units (what a flow model's small errors look like to the decoder), decode."""
    from PIL import Image

    z = encode(encoder or vae, images)
    with torch.inference_mode():
        if noise:
            std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
            z = z + noise * std * torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
        y = vae.decode(z, return_dict=False)[0][:, :, 0]
    arr = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", required=True, help="an AutoencoderKLQwenImage folder")
    ap.add_argument("--n", type=int, default=96, help="scenes per kind")
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--noise", default="", help="comma-separated latent noise levels: pass rates of the single "
                    "scenes decoded from noisy latents (how forgiving the decoder is)")
    ap.add_argument("--subject", action="store_true", help="round-trip Subject A's instance images too")
    ap.add_argument("--reference", default=None, help="the VAE a flow model was trained on: latent drift and "
                    "its latents through this decoder")
    args = ap.parse_args(argv)
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage.from_pretrained(args.vae, use_safetensors=True).eval()
    rng = np.random.default_rng(args.seed)
    passed, originals, why = Counter(), Counter(), Counter()
    for kind in shapes.KINDS:
        scenes = [shapes.sample_scene(rng, kind) for _ in range(args.n)]
        images = [shapes.render(s) for s in scenes]
        for scene, orig, rec in zip(scenes, images, round_trip(vae, images)):
            originals[kind] += detector.check(scene, detector.detect(orig))
            bad = detector.mismatches(scene, detector.detect(rec))
            passed[kind] += not bad
            why.update("blob of no clear shape" if "no clear shape" in b else b.split(":")[0][:40] for b in bad[:1])
    params = sum(p.numel() for p in vae.parameters())
    print(f"VAE {args.vae}: {params / 1e6:.2f}M parameters, z {vae.config.z_dim}, "
          f"{2 ** len(vae.config.temperal_downsample)}x down")
    for kind in shapes.KINDS:
        print(f"  {kind:6s}: reconstructions pass {passed[kind]}/{args.n} ({100 * passed[kind] / args.n:.0f}%), "
              f"originals {originals[kind]}/{args.n}")
    print("  first mismatch of failing reconstructions:", dict(why.most_common(6)))
    rng = np.random.default_rng(args.seed + 1)
    singles = [shapes.sample_scene(rng, "single") for _ in range(args.n)]
    for level in [float(x) for x in args.noise.split(",") if x]:
        recs = round_trip(vae, [shapes.render(s) for s in singles], level)
        ok = sum(detector.check(s, detector.detect(r)) for s, r in zip(singles, recs))
        print(f"  single scenes, latent noise std {level:g}: {ok}/{args.n} pass")
    if args.reference:
        ref = AutoencoderKLQwenImage.from_pretrained(args.reference, use_safetensors=True).eval()
        std = torch.tensor(ref.config.latents_std).view(1, -1, 1, 1, 1)
        rng = np.random.default_rng(args.seed + 3)
        for kind in shapes.KINDS:
            scenes = [shapes.sample_scene(rng, kind) for _ in range(args.n)]
            images = [shapes.render(s) for s in scenes]
            drift = ((encode(vae, images) - encode(ref, images)) / std).pow(2).mean().sqrt().item()
            ok = sum(detector.check(s, detector.detect(r))
                     for s, r in zip(scenes, round_trip(vae, images, encoder=ref)))
            print(f"  {kind:6s}: latent drift from {args.reference} RMS {drift:.3f}; its latents through this "
                  f"decoder pass {ok}/{args.n}")
    if args.subject:
        rng = np.random.default_rng(args.seed + 2)
        subjects = [shapes.subject_scene(rng) for _ in range(args.n)]
        images = [shapes.render(s) for s in subjects]
        for level in [0.0] + [float(x) for x in args.noise.split(",") if x]:
            recs = round_trip(vae, images, level)
            ok = [sum(detector.is_checker_star(im, s.objects[0].cell, s.background) for s, im in zip(subjects, ims))
                  for ims in (recs, images)]
            print(f"  Subject A, latent noise std {level:g}: {ok[0]}/{args.n} pass (originals {ok[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
