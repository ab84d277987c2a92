"""Continue a finished `train-base` run's flow stage with other training noise levels: does a model that draws convex
blobs learn concave shapes when its further training is spent on the low-noise end, where shapes are refined?

    python bench/flow_finetune.py --run RUN --out OUT --max-sigma 0.4 --steps 2500 --lr 1e-4 --threads 1
    python bench/flow_finetune.py --run RUN --out OUT --max-sigma 1 ...     # the control: the recipe's levels
    python bench/loose_adherence.py --model OUT/model --preset base --n 128 --template 0 --confusion
    python bench/flow_finetune.py --model MODEL --out OUT --max-sigma 1 --emphasize star,cross --weight 4 ...

RUN is the run folder (its tokenizer, VAE, decoder, latent cache and newest flow checkpoint are read, nothing is
written there). Both the weights and their EMA start from the run's EMA; the captions are the recipe's (every
template and language, no anchor phase), the learning rate warms up over 100 steps and decays to 10% by the cosine
of the recipe. `--model MODEL` starts instead from a finished model folder (the shipped one: `--model builtin`):
its tokenizer, VAE, text encoder and transformer, the recipe it records in lightbooth.json, and a latent cache
encoded afresh with its VAE (about a minute). `--emphasize SHAPES --weight W` draws scenes holding any of those
shapes W times as often as the others (sampling with replacement); an item `SHAPE:SIZE:KIND` (`star:large:single`)
narrows it to objects of that size in scenes of that kind, and `ITEM=W` gives that item its own weight.
`--per-kind` then rescales the weights so that each scene kind keeps its share of the draws (emphasis moves draws
between the scenes of one kind only). `--kinds`, `--shapes` and `--sizes` keep only the scenes
of those kinds whose every object has one of those shapes and sizes (the others are never drawn). `--layers N`
grows the transformer to N blocks: the new ones are appended with their modulation layers zeroed (adaLN-zero: each
starts as the identity, so the grown model starts as the given one). `--ema-decay` sets the exported EMA's decay
(the recipe's 0.999 keeps a fifth of the starting weights after 1,500 steps). `--train text_encoder` (or
`transformer`) freezes the other part: the flow loss then only moves what the captions become.
With `--max-sigma` below 1 the noise levels are `max_sigma` times a logit-normal draw (shift 1), so
every step trains on noise levels below it; 1 keeps the recipe's shifted draw. OUT/model is a model folder like
the shipped one.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main(argv=None) -> int:
    import lightning as L
    from transformers import Qwen2Tokenizer

    from lightbooth.config import load_config
    from lightbooth.training import base as B
    from lightbooth.training import base_run as R
    from lightbooth.training.checkpoints import newest_valid_checkpoint
    from lightbooth.training.losses import logit_normal_sigmas

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a finished `lightbooth train-base` run folder")
    src.add_argument("--model", help="a finished built-in-style model folder, or `builtin` for the shipped one")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-sigma", type=float, default=0.4)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--emphasize", default="",
                    help="comma-separated SHAPE[:SIZE[:KIND]][=W] drawn W (or --weight) times as often")
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--per-kind", action="store_true", help="keep each scene kind's share of the draws")
    ap.add_argument("--kinds", default="", help="comma-separated scene kinds kept (default: all)")
    ap.add_argument("--shapes", default="", help="comma-separated shapes kept (every object one of them)")
    ap.add_argument("--sizes", default="", help="comma-separated sizes kept (every object one of them)")
    ap.add_argument("--layers", type=int, default=0, help="grow the transformer to this many blocks (--model only)")
    ap.add_argument("--ema-decay", type=float, default=0.0, help="the EMA's decay (default: the recipe's)")
    ap.add_argument("--train", choices=("all", "text_encoder", "transformer"), default="all",
                    help="which part learns (default: both, as the recipe); the other stays frozen")
    ap.add_argument("--full-captions", type=float, default=0.0,
                    help="share of captions stating every attribute, as eval's prompts do (default 0: the recipe's)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model:
        cfg, tokenizer, vae, weights, latents = from_model(args.model)
    else:
        cfg = load_config(B.BaseTrainConfig, args.run / "config.yaml")
    grow = dict(layers=args.layers) if args.layers else {}  # and the EMA's decay, when given
    if args.layers and (not args.model or args.layers < cfg.layers):
        print(f"error: --layers needs --model and at least the model's {cfg.layers} blocks", file=sys.stderr)
        return 2
    if args.ema_decay:
        grow["ema_decay"] = args.ema_decay
    cfg = dataclasses.replace(cfg, **grow, lr=args.lr, warmup=100, steps=args.steps, anchor_steps=0,
                              checkpoint_every=500, threads=args.threads)
    L.seed_everything(cfg.seed + 1, workers=True, verbose=False)  # other noise draws than the run's own
    if not args.model:
        tokenizer = Qwen2Tokenizer.from_pretrained(str(args.run / "tokenizer"))
        vae = R._decoder_stage(cfg, args.run, R._vae_stage(cfg, args.run))
        latents = R._latent_stage(cfg, args.run, vae)

    class Finetune(R.FlowModule):
        def sigmas(self, n):
            if args.max_sigma >= 1:
                return super().sigmas(n)
            return args.max_sigma * logit_normal_sigmas(n, shift=1.0).clamp(1e-3, 1 - 1e-3)

    module = Finetune(cfg, tokenizer, (latents.shape[2] // 2, latents.shape[3] // 2))
    if args.model:
        module.net.load_state_dict(weights, strict=not args.layers)
        with torch.no_grad():
            for block in module.net["transformer"].transformer_blocks[len(_blocks(weights)):]:
                for mod in (block.img_mod[1], block.txt_mod[1]):
                    mod.weight.zero_()
                    mod.bias.zero_()
        module.ema.module.load_state_dict(module.net.state_dict())
    else:
        ckpt = newest_valid_checkpoint(args.run / "flow")
        module.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
        module.net.load_state_dict(module.ema.module.state_dict())
    if args.train != "all":
        module.net["transformer" if args.train == "text_encoder" else "text_encoder"].requires_grad_(False)
    # the seed the latents were drawn with
    module.captions = B.LatentCaptions(latents, cfg.seed, cfg.caption_dropout, 0, args.full_captions)
    try:
        emphasized = parse_emphasis(args.emphasize, args.weight)
    except ValueError as err:
        print(f"error: --emphasize: {err} (write SHAPE[:SIZE[:KIND]][=W], e.g. star:large:single=30)", file=sys.stderr)
        return 2
    keep = [set(x for x in a.split(",") if x) for a in (args.kinds, args.shapes, args.sizes)]
    if any(x != 1 for x in emphasized.values()) or any(keep):
        scenes = [module.captions.scene(i) for i in range(len(latents))]
        w = [scene_weight(scene, emphasized, *keep) for scene in scenes]
        if not any(w):
            print("error: no cached scene passes --kinds / --shapes / --sizes", file=sys.stderr)
            return 2
        if args.per_kind:
            w = per_kind(w, [scene.kind for scene in scenes])
        share = {k: sum(x for x, s in zip(w, scenes) if s.kind == k) / sum(w) for k in {s.kind for s in scenes}}
        print("share of draws per kind: " + ", ".join(f"{k} {v:.1%}" for k, v in sorted(share.items())))
        for item, weight in emphasized.items():
            held = sum(x for x, s in zip(w, scenes) if _holds(s, *item))
            print(f"{':'.join(item)} (weight {weight:g}): {held / sum(w):.1%} of draws")
        order = dict(sampler=torch.utils.data.WeightedRandomSampler(w, cfg.steps * cfg.batch, replacement=True))
        print(f"{sum(x > 0 for x in w)} of {len(w)} scenes kept")
    else:
        order = dict(shuffle=True)
    loader = torch.utils.data.DataLoader(module.captions, batch_size=cfg.batch, collate_fn=B.collate, drop_last=True,
                                         **order)
    args.out.mkdir(parents=True, exist_ok=True)
    R.fit(module, loader, cfg.steps, args.out / "flow", cfg, "flow")
    ema = module.ema.module
    print(B.export_pipeline(cfg, args.out, tokenizer, vae, ema["text_encoder"].eval(), ema["transformer"].eval()))
    return 0


def parse_emphasis(text: str, weight: float) -> dict:
    """`star:large:single=30,cross` -> {("star", "large", "single"): 30.0, ("cross",): weight}."""
    items = {}
    for part in filter(None, text.split(",")):
        item, _, w = part.partition("=")
        key, value = tuple(item.split(":")), float(w) if w else weight
        if not 0 < value < float("inf") or len(key) > 3:
            raise ValueError(f"bad item {part!r}")
        items[key] = value
    return items


def scene_weight(scene, emphasized: dict, kinds: set, shapes: set, sizes: set) -> float:
    """How often a cached scene is drawn: 0 when a filter drops it, else the largest weight of an emphasized item
    it holds (1 when it holds none)."""
    if (kinds and scene.kind not in kinds) or (shapes and any(o.shape not in shapes for o in scene.objects)) \
            or (sizes and any(o.size not in sizes for o in scene.objects)):
        return 0.0
    return max([w for item, w in emphasized.items() if _holds(scene, *item)], default=1.0)


def per_kind(weights: list, kinds: list) -> list:
    """Rescale the weights so that each kind's draws are its share of the kept scenes, as without emphasis."""
    kept, total = {}, {}
    for w, k in zip(weights, kinds):
        kept[k] = kept.get(k, 0) + (w > 0)
        total[k] = total.get(k, 0.0) + w
    return [w * kept[k] / total[k] if w else 0.0 for w, k in zip(weights, kinds)]


def _holds(scene, shape: str, size: str = "", kind: str = "") -> bool:
    """Is there an object of that shape (and size) in the scene (of that kind)?"""
    return (not kind or scene.kind == kind) and any(o.shape == shape and (not size or o.size == size)
                                                    for o in scene.objects)


def _blocks(weights: dict) -> set:
    return {k.split(".")[2] for k in weights if k.startswith("transformer.transformer_blocks.")}


def from_model(name: str):
    """(recipe, tokenizer, VAE, net state dict, latent cache) of a finished model folder, fp32."""
    import json

    from diffusers import QwenImagePipeline

    from lightbooth import builtin_model_path
    from lightbooth.training import base as B

    folder = builtin_model_path() if name == "builtin" else Path(name)
    recipe = json.loads((folder / "lightbooth.json").read_text())["trained_with"]
    cfg = B.BaseTrainConfig(**recipe)
    pipe = QwenImagePipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    weights = {f"text_encoder.{k}": v for k, v in pipe.text_encoder.float().state_dict().items()}
    weights |= {f"transformer.{k}": v for k, v in pipe.transformer.float().state_dict().items()}
    vae = pipe.vae.float().eval()
    return cfg, pipe.tokenizer, vae, weights, B.encode_scenes(vae, cfg.seed, 0, cfg.latent_cache)


if __name__ == "__main__":
    sys.exit(main())
