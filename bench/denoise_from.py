"""Which noise levels a flow model has learnt: noise real scenes to level s, denoise them back, check what survives.

    python bench/denoise_from.py --model src/lightbooth/builtin/model --n 24 [--kinds single,pair,count,subject]
        [--lora RUN/lora.safetensors] [--token qzx]

Scenes of each kind are rendered, encoded by the model's VAE, noised to flow level s (x_s = (1-s) x0 + s eps),
denoised with the model from s to 0 (flow Euler, 20 evenly spaced steps, CFG at the model's default scale, the
scene's own English caption) and checked with the `lightbooth eval` detector. s = 0 is the VAE round trip alone;
s = 1 is ordinary generation. `--mse` adds, per kind, the model's one-step velocity error at each level (mean
squared error per latent value, the prompt without CFG: the training loss at that level, on unseen scenes). A
model that fails already at small s has not learnt the low-noise end, where edges and small shapes are refined.
The kind `subject` is Subject A (the checker star) prompted as "a TOKEN star" in its cell and background, as
`bench/dreambooth_subject.py` asks for it: with a DreamBooth `--lora`, which levels the personalized model keeps it at.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dreambooth_subject import context_prompt  # noqa: E402
from lightbooth.data import shapes  # noqa: E402
from lightbooth.eval import detector  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a qwen-image model folder (default: the built-in model)")
    ap.add_argument("--n", type=int, default=24, help="scenes per kind")
    ap.add_argument("--levels", default="0,0.3,0.5,0.7,0.9,1", help="comma-separated flow noise levels")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--mse", action="store_true", help="also print the velocity error per level")
    ap.add_argument("--kinds", default=",".join(shapes.KINDS), help="scene kinds, and/or subject (Subject A)")
    ap.add_argument("--lora", action="append", default=[], help="LoRA file to apply (repeat for several)")
    ap.add_argument("--token", default="qzx", help="the subject's token, for the kind subject")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lightbooth.families.qwen_image import pack
    from lightbooth.generate import Generator
    from lightbooth.images import to_pil
    from lightbooth.sampling import samplers

    gen = Generator.load(args.model, loras=args.lora, device="cpu", dtype=torch.float32, preset="base")
    fam, guidance = gen.family, gen.settings().preset.guidance
    levels = [float(v) for v in args.levels.split(",")]
    rng = np.random.default_rng(args.seed)
    print(f"model {args.model or 'built-in'} {' '.join(args.lora)}; {args.n} scenes per kind; {args.steps} Euler "
          f"steps from s; CFG {guidance}")
    print("kind   " + " ".join(f"s={s:<5}" for s in levels))
    for kind in args.kinds.split(","):
        if kind == "subject":
            scenes = [shapes.subject_scene(rng) for _ in range(args.n)]
            captions = [context_prompt(args.token, s.objects[0].cell, s.background) for s in scenes]
        else:
            scenes = [shapes.sample_scene(rng, kind) for _ in range(args.n)]
            captions = [shapes.caption(s, "en", rng) for s in scenes]
        pixels = torch.from_numpy(np.stack([np.asarray(shapes.render(s), dtype=np.float32) for s in scenes]))
        with torch.inference_mode():
            x0 = pack(fam.encode_images(pixels.permute(0, 3, 1, 2) / 127.5 - 1))
            cond, uncond = fam.encode(captions), fam.encode([""] * len(scenes))
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed))
            row, err = [], []
            for s in levels:
                x = (1 - s) * x0 + s * noise
                if args.mse and s == 0:
                    err.append(f"{'-':>6} ")  # the noise is unknowable at s = 0
                elif args.mse:
                    v = fam.velocity(x, cond, torch.tensor(s), 64, 64)
                    err.append(f"{float((v - (noise - x0)).pow(2).mean()):6.3f} ")
                if s > 0:
                    sigmas = torch.linspace(s, 0, args.steps + 1)
                    x = samplers.flow_euler(lambda xt, i: fam.velocity(xt, cond, sigmas[i], 64, 64, uncond, guidance),
                                            x, sigmas, None)
                images = to_pil(fam.decode(x, 64, 64))
                ok = sum(detector.is_checker_star(im, sc.objects[0].cell, sc.background) if kind == "subject" else
                         not detector.mismatches(sc, detector.detect(im)) for sc, im in zip(scenes, images))
                row.append(f"{100 * ok / len(scenes):4.0f}% ")
        print(f"{kind:6} " + " ".join(row), flush=True)
        if err:
            print(f"{'  mse':6} " + " ".join(err), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
