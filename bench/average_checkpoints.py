"""Average a distillation run's student over several checkpoints into one LoRA file (a weight-averaging probe).

    python bench/average_checkpoints.py RUN/lora.safetensors OUT.safetensors RUN/checkpoints/step-*.ckpt ...

TEMPLATE is a LoRA file the same run exported (its keys, alphas and metadata are kept); each checkpoint's student
factors (`<module>.lora_A.student.weight`, `lora_B`) are averaged factor by factor, the way checkpoint averaging
of a network averages its weights (so the product of the averages, not the average of the products). Given one
checkpoint it reproduces the run's own export bit for bit (checked below with `--check`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lightbooth.training.distill.module import STUDENT  # noqa: E402

FACTORS = {"lora_down": "lora_A", "lora_up": "lora_B"}


def checkpoint_name(key: str, prefix: str) -> str | None:
    """`diffusion_model.X.lora_down.weight` -> `<prefix>X.lora_A.<student>.weight`; None for alphas."""
    _, _, rest = key.partition(".")  # drops the kohya/ComfyUI `diffusion_model` prefix
    for kohya, peft in FACTORS.items():
        if rest.endswith(f".{kohya}.weight"):
            return f"{prefix}{rest[: -len(f'.{kohya}.weight')]}.{peft}.{STUDENT}.weight"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("template")
    ap.add_argument("out")
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--prefix", default="denoiser.", help="the trainer module's attribute holding the denoiser")
    ap.add_argument("--check", action="store_true", help="compare the average with TEMPLATE (for one checkpoint)")
    args = ap.parse_args(argv)
    with safe_open(args.template, "pt") as f:
        meta, template = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    states = [torch.load(p, map_location="cpu", weights_only=True)["state_dict"] for p in args.checkpoints]
    out = {}
    for key, value in template.items():
        name = checkpoint_name(key, args.prefix)
        if name is None:
            out[key] = value
            continue
        stack = torch.stack([s[name].float() for s in states])
        out[key] = stack.mean(0).to(value.dtype).contiguous()
    if args.check:
        same = all(torch.equal(out[k], template[k]) for k in template)
        print(f"same as {args.template}: {same}")
        return 0 if same else 1
    save_file(out, args.out, metadata=meta)
    print(f"{args.out}: {len(args.checkpoints)} checkpoints averaged over {len(template)} tensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
