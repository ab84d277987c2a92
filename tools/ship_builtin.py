"""Install a trained model (and its distilled few-step LoRAs as presets) as the package's built-in model.

    python tools/ship_builtin.py --model RUN/model --lora 4step=D4/lora.safetensors --lora 8step=D8/lora.safetensors \
        --default 4step

The last step of the built-in model's recipe (`lightbooth train-base`, then `lightbooth distill` per step count).
Each LoRA is copied into the model folder under lightning/ and becomes a preset of lightbooth.json with the
schedule its metadata carries (steps, guidance, sampler, shift) plus `"lora"`, so `lightbooth generate` fuses it
when that preset is in use; `--sampler NAME=SAMPLER[:EULER_STEPS]` overrides a preset's sampler (and, for
flow_stochastic, how many first steps stay Euler steps), and the LoRA file's own schedule is rewritten to match, so
that `lightbooth generate --lora lightning/NAME.safetensors` (or on a copy of the model) samples as the preset does;
"base" stays the teacher. The
package folder is replaced only once the new one is complete, and the whole folder must stay within the issue's
25 MB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MB = 25.0


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from lightbooth.atomic import write_text_atomic
    from lightbooth.models import builtin_model_path
    from lightbooth.safeload import load_safetensors, save_safetensors_atomic, validate_safetensors
    from lightbooth.training.distill.run import SAMPLERS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="the exported model folder (RUN/model)")
    ap.add_argument("--lora", action="append", default=[], metavar="NAME=PATH", help="a distilled LoRA as preset NAME")
    ap.add_argument("--sampler", action="append", default=[], metavar="NAME=SAMPLER[:EULER_STEPS]",
                    help="run preset NAME with this sampler instead of its LoRA's own (e.g. 4step=flow_stochastic, "
                    "8step=flow_stochastic:4)")
    ap.add_argument("--default", default="base", help="the default preset")
    ap.add_argument("--dest", type=Path, default=None, help="where to install (default: the package's folder)")
    args = ap.parse_args(argv)
    dest = args.dest or builtin_model_path()
    tmp = dest.parent / (dest.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(args.model, tmp)
    settings = json.loads((tmp / "lightbooth.json").read_text())
    for spec in args.lora:
        name, _, path = spec.partition("=")
        meta = validate_safetensors(path)
        if "lightbooth_preset" not in meta:
            print(f"error: {path} carries no schedule (lightbooth_preset); pass a LoRA written by lightbooth distill",
                  file=sys.stderr)
            return 2
        (tmp / "lightning").mkdir(exist_ok=True)
        shutil.copyfile(path, tmp / "lightning" / f"{name}.safetensors")
        settings["presets"][name] = {**json.loads(meta["lightbooth_preset"]), "lora": f"lightning/{name}.safetensors"}
    for spec in args.sampler:
        name, _, sampler = spec.partition("=")
        sampler, _, k = sampler.partition(":")
        if name not in settings["presets"] or sampler not in SAMPLERS or (k and (not k.isdigit() or
                                                                                  sampler != "flow_stochastic")):
            print(f"error: --sampler {spec}: name one of the presets {', '.join(settings['presets'])} and one of "
                  f"{', '.join(SAMPLERS)} (flow_stochastic:K for K Euler steps first)", file=sys.stderr)
            return 2
        preset = settings["presets"][name]
        preset["sampler"] = sampler
        preset.pop("euler_steps", None)
        if k and int(k):
            preset["euler_steps"] = int(k)
    for preset in settings["presets"].values():  # each shipped LoRA carries its preset's schedule, nothing else
        if preset.get("lora"):
            file = tmp / preset["lora"]
            schedule = {k: v for k, v in preset.items() if k != "lora"}
            if json.loads(validate_safetensors(file).get("lightbooth_preset", "{}")) != schedule:
                tensors, meta = load_safetensors(file)
                save_safetensors_atomic(tensors, file, {**meta, "lightbooth_preset": json.dumps(schedule)})
    if args.default not in settings["presets"]:
        print(f"error: default preset {args.default!r} is not one of {', '.join(settings['presets'])}", file=sys.stderr)
        return 2
    settings["default_preset"] = args.default
    write_text_atomic(tmp / "lightbooth.json", json.dumps(settings, indent=1))
    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) / 1e6
    if size > LIMIT_MB:
        shutil.rmtree(tmp)
        print(f"error: the model folder would be {size:.1f} MB, over the {LIMIT_MB:g} MB limit", file=sys.stderr)
        return 2
    old = dest.parent / (dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    print(f"{dest}: {size:.1f} MB, presets {', '.join(settings['presets'])}, default {args.default}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
