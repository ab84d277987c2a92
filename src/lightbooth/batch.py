"""Large generation jobs: stream prompts in batches to a folder, resume by skipping finished images, and spread
the work over several devices with Lightning Fabric (one process per device, each taking every n-th image)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import LightboothError
from .generate import Generator, Job, Settings, expand_jobs
from .images import read_params, save_png, slug


def prompt_lines(path: str | Path) -> Iterator[str]:
    """Prompts from a text file, one per non-blank line, read lazily."""
    p = Path(path)
    if not p.is_file():
        raise LightboothError(f"prompts file {p} not found; pass a text file with one prompt per line")
    try:
        with p.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield line.strip()
    except UnicodeDecodeError as e:
        raise LightboothError(f"prompts file {p} is not UTF-8 text (byte {e.start} of a read block: {e.reason}); "
                              "save it as UTF-8 with one prompt per line") from None
    except OSError as e:
        raise LightboothError(f"cannot read prompts file {p} ({e.strerror or type(e).__name__}); pass a readable "
                              "text file with one prompt per line") from None


def image_stem(job: Job) -> str:
    """File name (no suffix) of a job's image: stable, so a rerun finds what it already wrote."""
    return f"{job.prompt_index:04d}-{slug(job.prompt)}-{job.seed}"


def write_images(gen: Generator, jobs: Iterable[Job], s: Settings, out: Path, batch_size: int,
                 rank: int = 0, world: int = 1, report: Callable[[Path, bool], None] | None = None) -> list[Path]:
    """Generate `jobs` (this rank's share) into `out`; an image already there with the same parameters is kept."""
    written: list[Path] = []
    pending: list[Job] = []

    def flush():
        for job, image in zip(pending, gen.run(pending, s)):
            path = save_png(image, out, image_stem(job))
            written.append(path)
            if report:
                report(path, False)
        pending.clear()

    for k, job in enumerate(jobs):
        if k % world != rank:
            continue
        done = out / f"{image_stem(job)}.png"
        if done.exists() and read_params(done) == gen.params(job, s):
            written.append(done)
            if report:
                report(done, True)
            continue
        pending.append(job)
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    return written


def stream_jobs(prompts: Iterable[str], seed, num_images: int) -> Iterator[Job]:
    """Jobs for prompts read lazily; prompt indices count the prompts (not lines)."""
    for i, prompt in enumerate(prompts):
        for job in expand_jobs([prompt], seed, num_images):
            yield Job(job.prompt, job.seed, i)


def _worker(fabric, load_kwargs: dict, prompts, prompts_file, seed, num_images, settings_kwargs, out, batch_size):
    """What each process runs: load the model on its device, take every world_size-th image."""
    gen = Generator.load(device=fabric.device, **load_kwargs)
    s = gen.settings(**settings_kwargs)
    source = prompt_lines(prompts_file) if prompts_file else prompts
    jobs = stream_jobs(source, seed, num_images)
    write_images(gen, jobs, s, Path(out), batch_size, fabric.global_rank, fabric.world_size,
                 _print_line)


def report_line(path: Path, skipped: bool) -> str:
    """The stdout line for one image, the same from one process or several."""
    return f"{path}" + ("  (exists, skipped)" if skipped else "")


def _print_line(path: Path, skipped: bool) -> None:
    # one write() per line: processes share the stdout pipe, and a separate newline write can interleave with
    # another process's line (seen in CI under PYTHONUNBUFFERED)
    sys.stdout.write(report_line(path, skipped) + "\n")
    sys.stdout.flush()


def generate_distributed(devices: int, accelerator: str, **kwargs) -> None:
    """Run `_worker` on `devices` processes through Lightning Fabric's spawn launcher (gloo on CPU, NCCL on GPUs)."""
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=accelerator, devices=devices, strategy="ddp_spawn")
    fabric.launch(_worker, *(kwargs[k] for k in ("load_kwargs", "prompts", "prompts_file", "seed", "num_images",
                                                 "settings_kwargs", "out", "batch_size")))
