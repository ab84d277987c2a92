"""GPU benchmark: lightbooth against stock diffusers, side by side in one process, same inputs, same card.

    python bench/gpu.py --out results/            # full-size architectures, random weights, on the GPU
    python bench/gpu.py --tiny --out results/     # tiny configs on the CPU (the test suite runs this)

Components are built with random weights directly on the device (speed and memory do not depend on weight values).
Every lightbooth number comes with the relative error of its output against the stock result, so a fast path
that computes something else cannot pass; FLOPs are counted with torch's FlopCounterMode on the real modules and
turned into the fraction of the matrix-product ceiling measured on the same card at the start of the run.

Sections (in this order, each guarded so a failure or the time budget skips it and the run goes on):
  ceilings      bf16 and fp8 8192^3 matrix products, device copy bandwidth
  sd            SD 1.5 512x512, 50 DDIM steps, CFG 7.5, batch 1 and 8: stock pipeline vs lightbooth Generator
                (fp16, channels-last, fused QKV, CUDA graph per step), per step and end to end
  sd-train      SD 1.5 DreamBooth LoRA r4 step, batch 2 (instance + class), as diffusers' example does it
                (fp16 autocast + GradScaler, VAE and text encoder every step) vs lightbooth (cached latents and
                embeddings, bf16, fused AdamW, the whole step replayed as one CUDA graph): time and peak memory;
                then `lightbooth dreambooth`'s own step (bench/gpu_trainer.py): eager, with
                --cuda-graphs and compiled
  qwen          Qwen-Image 1024x1024, Lightning 8 steps and 50 steps CFG 4: stock pipeline vs lightbooth in bf16
                and with fp8 transformer weights, each eager and with its blocks compiled (prompt embeddings given
                to both: text encoding is the same transformers module in both and lightbooth caches it); one
                forward of each variant timed against the stock forward; and the LoRA r16 step at 1024x1024,
                batch 1, gradient checkpointing: bf16 (stock) vs lightbooth with fp8-stored frozen weights, eager
                and compiled, then `lightbooth dreambooth`'s own step with fp8 and compiling; time and peak memory
  sd-compile    optional, last: the SD UNet through torch.compile under the same CUDA graph (compile takes ~1 min)
Results: OUT/gpu.json (everything) and OUT/gpu.md (the tables), written after every section.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_measure import free, timed  # noqa: E402
from gpu_qwen import qwen  # noqa: E402
from gpu_sd import sd, sd_compile, sd_train  # noqa: E402

T0 = time.time()


def ceilings(ctx) -> dict:
    dev, n = ctx.dev, (8192 if not ctx.tiny else 256)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = timed(lambda: a @ b, dev, repeats=10, warmup=3)
    res = {"bf16_matmul_tflops": 2 * n**3 / t / 1e12, "n": n}
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev)
    t8 = timed(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), dev,
               repeats=10, warmup=3)
    res["fp8_matmul_tflops"] = 2 * n**3 / t8 / 1e12
    big = torch.empty(2 * n * n, device=dev, dtype=torch.float32)
    dst = torch.empty_like(big)
    tc = timed(lambda: dst.copy_(big), dev, repeats=10, warmup=2)
    res["copy_tb_s"] = 2 * big.numel() * 4 / tc / 1e12
    ctx.ceiling = res["bf16_matmul_tflops"] * 1e12
    return res


SECTIONS = {"ceilings": ceilings, "sd": sd, "sd-train": sd_train, "qwen": qwen, "sd-compile": sd_compile}


class Ctx:
    def __init__(self, args):
        self.tiny, self.out, self.budget = args.tiny, Path(args.out), args.budget
        self.dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
        self.half = torch.float16 if self.dev.type == "cuda" else torch.float32
        self.repeats = args.repeats
        self.qwen_cases = args.qwen_cases.split(",")
        self.profile = args.profile
        self.qwen_trainer_only = args.qwen_trainer_only
        self.memory_trace = args.memory_trace
        self.compile = args.compile == "yes" or (args.compile == "auto" and self.dev.type == "cuda")
        self.ceiling = None
        self.sd_comps = self.sd_pipe = self.sd_ours = self.qwen = self.qwen_train_ref = self.qwen_side = None
        self.results: dict = {"meta": meta(self)}

    def fraction(self, flop: float, seconds: float) -> float | None:
        """Achieved rate over the measured bf16 matrix ceiling (None when the ceilings section did not run)."""
        return flop / seconds / self.ceiling if self.ceiling else None

    def over_budget(self, need_s: float) -> bool:
        return time.time() - T0 + need_s > self.budget

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "gpu.md").write_text(markdown(self.results))


def meta(ctx) -> dict:
    import diffusers
    import transformers

    m = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
         "diffusers": diffusers.__version__, "transformers": transformers.__version__, "device": str(ctx.dev),
         "python": platform.python_version(), "command": " ".join(sys.argv)}
    if ctx.dev.type == "cuda":
        m["card"] = torch.cuda.get_device_name()
    return m


def fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def markdown(r: dict) -> str:
    lines = [f"card: {r['meta'].get('card', r['meta']['device'])}, {r['meta']['date']}, torch {r['meta']['torch']}, "
             f"diffusers {r['meta']['diffusers']}", ""]
    if "ceilings" in r and "error" not in r["ceilings"]:
        c = r["ceilings"]
        lines += [f"ceilings: bf16 {fmt(c['bf16_matmul_tflops'])} TFLOP/s, fp8 {fmt(c['fp8_matmul_tflops'])} TFLOP/s, "
                  f"copy {fmt(c['copy_tb_s'])} TB/s", ""]
    if "sd" in r and "rows" in r["sd"]:
        lines += ["| SD batch | stock s | eager s (x) | graphs s (x) | step stock / graphs ms | rel err | UNet step "
                  "GFLOP | % ceiling |", "|---|---|---|---|---|---|---|---|"]
        for w in r["sd"]["rows"]:
            lines.append(f"| {w['batch']} | {fmt(w['stock_s'])} | {fmt(w['eager_s'])} ({fmt(w['eager_vs_stock'])}) | "
                         f"{fmt(w['graphs_s'])} ({fmt(w['graphs_vs_stock'])}) | {fmt(w['stock_step_s'] * 1e3)} / "
                         f"{fmt(w['graphs_step_s'] * 1e3)} | {fmt(w['graphs_rel_err'])} | "
                         f"{fmt(w['unet_step_flops'] / 1e9)} | {fmt(100 * (w['step_fraction_of_ceiling'] or 0))} |")
        lines.append("")
    for key in ("sd-train", "sd-compile"):
        if key in r:
            lines += [f"{key}: " + ", ".join(f"{k} {fmt(v)}" for k, v in r[key].items() if not isinstance(v, dict)),
                      ""]
            for k, v in r[key].items():
                if isinstance(v, dict):
                    lines += [f"{key} {k}: " + ", ".join(f"{a} {fmt(b)}" for a, b in v.items()), ""]
    if "qwen" in r and "rows" in r["qwen"]:
        q = r["qwen"]
        kinds = ("bf16", "bf16_compiled", "fp8", "fp8_compiled")
        lines += ["| Qwen case | stock s | " + " | ".join(f"{k} s (x, rel err)" for k in kinds) + " |",
                  "|---" * (2 + len(kinds)) + "|"]
        for name, w in q["rows"].items():
            cells = [f"{fmt(w.get(f'{k}_s'))} ({fmt(w.get(f'{k}_vs_stock'))}, {fmt(w.get(f'{k}_rel_err'))})"
                     for k in kinds]
            lines.append(f"| {name} | {fmt(w['stock_s'])} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += ["| Qwen forward | s | x stock | % of bf16 ceiling | rel err | first call s |", "|---|---|---|---|---|---|"]
        for k in ("stock", "bf16", "bf16_cudnn", "bf16_compiled_stock_rope", "bf16_compiled", "fp8", "fp8_compiled"):
            if f"{k}_forward_s" in q:
                lines.append(f"| {k} | {fmt(q[f'{k}_forward_s'])} | {fmt(q[f'{k}_forward_s'] / q['stock_forward_s'])} "
                             f"| {fmt(100 * (q.get(f'{k}_forward_fraction_of_ceiling') or 0))} | "
                             f"{fmt(q.get(f'{k}_forward_rel_err'))} | {fmt(q.get(f'{k}_first_call_s'))} |")
        lines.append("")
        lines += ["qwen: " + ", ".join(f"{k} {fmt(v)}" for k, v in q.items() if k != "rows" and
                                       not k.startswith("train") and "_forward_" not in k), ""]
        for k in ("train_stock", "train_bf16", "train_fp8", "train_fp8_compiled", "trainer_fp8"):
            if k in q:
                lines += [f"{k}: " + ", ".join(f"{a} {fmt(b)}" for a, b in q[k].items() if a != "memory_trace"), ""]
            trace = q.get(k, {}).get("memory_trace")
            if trace:
                lines += [f"{k} live at the peak ({fmt(trace['peak_above_start_gib'])} GiB above the step's start):"]
                lines += [f"  {row['gib']:8.3f} GiB {row['count']:5d}x {row['where']}" for row in trace["live_at_peak"]]
                lines.append("")
    for k, v in r.items():
        if isinstance(v, dict) and "error" in v:
            lines += [f"{k}: FAILED {v['error']}", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (for tests)")
    ap.add_argument("--out", default="gpu-results")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="write kernel tables of one Qwen forward per variant")
    ap.add_argument("--compile", choices=("auto", "yes", "no"), default="auto",
                    help="the torch.compile variants (auto: on CUDA only; compiling takes about a minute each)")
    ap.add_argument("--qwen-cases", default="lightning,base", help="lightning (8 steps) and/or base (50, CFG 4)")
    ap.add_argument("--qwen-trainer-only", action="store_true",
                    help="qwen: only the stock LoRA step and `lightbooth dreambooth`'s own (skips generation)")
    ap.add_argument("--memory-trace", action="store_true",
                    help="qwen training rows: what is live at one step's peak memory, by the code that made it")
    ap.add_argument("--budget", type=float, default=480, help="seconds; later sections are skipped past it")
    args = ap.parse_args(argv)
    ctx = Ctx(args)
    if ctx.dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ok = True
    for name in args.sections.split(","):
        if ctx.over_budget(30):
            ctx.results[name] = {"skipped": "time budget"}
            continue
        t = time.time()
        print(f"[{time.time() - T0:6.1f}s] {name} ...", flush=True)
        try:
            ctx.results[name] = SECTIONS[name](ctx)
        except Exception as e:  # keep going: one failure must not cost the rest of a GPU lease
            ok = False
            ctx.results.setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()
        ctx.results[name]["section_s"] = time.time() - t
        ctx.save()
        free(ctx.dev)
    print(markdown(ctx.results))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
