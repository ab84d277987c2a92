"""Extend a finished qwen-image model's VAE to images the shapes world never shows (the recipe's extend stage).

    python tools/extend_vae.py --model src/lightbooth/builtin/model --run RUN [--steps 8000] [--novel 0.5]
        [--anchor 1] [--threads 2]

Runs `vae_extend_*` of the built-in recipe (training/base_run.py, ExtendModule) on the model's VAE alone: both
halves learn novel images while the encoder's latents of world scenes stay anchored where the model's flow stage
learnt them. Checkpoints go to RUN/extend (a rerun continues from them), and RUN/model is the model with the new
VAE, everything else copied unchanged. Measure it with bench/vae_recon.py --subject --reference MODEL/vae.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from lightbooth.training import base as B
    from lightbooth.training import base_run as R

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="a qwen-image model folder (diffusers format)")
    ap.add_argument("--run", required=True, type=Path, help="folder for checkpoints and the new model")
    ap.add_argument("--steps", type=int, default=8000, help="8,000: about 21 min on 2 CPU threads")
    ap.add_argument("--novel", type=float, default=B.BaseTrainConfig.vae_extend_novel)
    ap.add_argument("--anchor", type=float, default=B.BaseTrainConfig.vae_extend_anchor)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if not (args.model / "vae" / "config.json").exists():
        print(f"error: {args.model} has no vae/ folder; pass a diffusers qwen-image model folder", file=sys.stderr)
        return 2
    if (args.run / "model").exists():
        print(f"error: {args.run / 'model'} exists; pass another --run", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = dataclasses.replace(B.BaseTrainConfig(), vae_extend_steps=args.steps, vae_extend_novel=args.novel,
                              vae_extend_anchor=args.anchor)
    vae = R.extend_stage(cfg, args.run, R.load_vae(args.model / "vae"))
    tmp = args.run / "model.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(args.model, tmp, ignore=shutil.ignore_patterns("vae"))
    vae.save_pretrained(str(tmp / "vae"), safe_serialization=True)
    tmp.rename(args.run / "model")
    print(f"wrote {args.run / 'model'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
