"""The Lightning side of base training: two thin modules (VAE, flow matching) and the stage runner."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import sys
from pathlib import Path

import lightning as L
import torch

from ..atomic import open_up
from ..errors import LightboothError
from ..families.qwen_image import prompt_embeds, template_prefix_length
from ..families.qwen_vae import fast_rms_norms, single_frame_convs
from ..safeload import load_safetensors, save_safetensors_atomic
from . import base as B
from .checkpoints import PeriodicCheckpoint, PlainProgress, checkpoint_steps, newest_valid_checkpoint, run_fit
from .common import lr_lambda
from .losses import flow_matching_loss, flow_noisy, mixed_sigmas, vae_loss


def ema_with_warmup(decay: float):
    """EMA whose decay ramps up as (1 + n) / (10 + n): early averages forget the random init quickly."""
    def avg(averaged, current, n):
        d = min(decay, (1 + float(n)) / (10 + float(n)))
        return d * averaged + (1 - d) * current
    return avg


class VAEModule(L.LightningModule):
    def __init__(self, cfg: B.BaseTrainConfig):
        super().__init__()
        self.cfg, self.vae = cfg, B.build_vae(cfg)
        single_frame_convs(self.vae)  # images are one frame: exact 2D path, several times faster on CPU
        fast_rms_norms(self.vae)

    def training_step(self, x, _):
        post = self.vae.encode(x[:, :, None]).latent_dist  # (B, 3, 1, H, W): one-frame video
        recon = self.vae.decode(post.sample()).sample[:, :, 0]
        loss = vae_loss(recon, x, post.kl(), self.cfg.vae_kl_weight)
        self.log("vae_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.vae.parameters(), lr=self.cfg.vae_lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(100, self.cfg.vae_steps))
        return [opt], [{"scheduler": sched, "interval": "step"}]


class DecoderModule(L.LightningModule):
    """Fine-tunes a trained VAE's decoder on latents with noise added, the encoder frozen (so cached latents stay
    valid). A decoder trained only on exact posterior means turns small latent errors into mottled blobs (at a
    noise std of 0.1 in normalized units, 39 of 48 single scenes still pass the detector, against 47 clean;
    bench/vae_recon.py --noise); a flow model's samples always carry such errors, so the decoder learns to map
    near-misses to clean shapes."""

    def __init__(self, cfg: B.BaseTrainConfig, vae):
        super().__init__()
        self.cfg, self.vae = cfg, vae
        self.vae.requires_grad_(False)
        for part in (self.vae.decoder, self.vae.post_quant_conv):
            part.requires_grad_(True)
        z = cfg.vae_z_dim
        self.register_buffer("std", torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1))

    def training_step(self, x, _):
        with torch.no_grad():
            z = self.vae.encode(x[:, :, None]).latent_dist.mean
            level = torch.rand(z.shape[0], 1, 1, 1, 1, device=z.device) * self.cfg.decoder_noise
            z = z + level * self.std * torch.randn_like(z)
        recon = self.vae.decode(z).sample[:, :, 0]
        loss = vae_loss(recon, x, torch.zeros(1, device=x.device), 0.0)
        self.log("decoder_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.vae.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.cfg.vae_lr / 2, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(100, self.cfg.decoder_steps))
        return [opt], [{"scheduler": sched, "interval": "step"}]


class FlowModule(L.LightningModule):
    """Flow matching on cached latents; the text encoder learns jointly with the transformer."""

    def __init__(self, cfg: B.BaseTrainConfig, tokenizer, img_hw: tuple[int, int]):
        super().__init__()
        self.cfg, self.tokenizer, self.img_hw = cfg, tokenizer, img_hw
        self.prefix = template_prefix_length(tokenizer)
        self.net = torch.nn.ModuleDict({"text_encoder": B.build_text_encoder(cfg, tokenizer),
                                        "transformer": B.build_transformer(cfg)})
        self.ema = torch.optim.swa_utils.AveragedModel(self.net, avg_fn=ema_with_warmup(cfg.ema_decay))
        self.ema.requires_grad_(False)
        self.captions: B.LatentCaptions | None = None  # the training captions, told the step (anchor phase)

    def training_step(self, batch, _):
        x0, texts = batch  # (B, N, 4z) packed latents, list of captions
        noise = torch.randn_like(x0)
        sigma = self.sigmas(x0.shape[0]).to(x0)
        cond = prompt_embeds(self.tokenizer, self.net["text_encoder"], texts, self.prefix, x0.device)
        v = self.net["transformer"](hidden_states=flow_noisy(x0, noise, sigma), timestep=sigma,
                                    encoder_hidden_states=cond.embeds, encoder_hidden_states_mask=cond.mask,
                                    img_shapes=[[(1, *self.img_hw)]] * x0.shape[0], return_dict=False)[0]
        loss = flow_matching_loss(v, x0, noise)
        self.log("loss", loss, prog_bar=True)
        return loss

    def sigmas(self, n: int) -> torch.Tensor:
        """The batch's training noise levels (the recipe's; bench/flow_finetune.py draws others)."""
        return mixed_sigmas(n, self.cfg.train_shift, self.cfg.train_uniform)

    def on_train_start(self):
        if self.captions is not None:  # after a resume, before the first batch is fetched
            self.captions.step = self.global_step

    def on_train_batch_start(self, *args):
        if self.captions is not None:  # the loader fetches ahead, so the next caption is for about step + 1
            self.captions.step = self.global_step + 1

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # here, not in on_train_batch_end: Lightning runs callbacks' hooks (the periodic checkpoint) before the
        # module's, so a checkpoint would miss the step's EMA update and a resumed run would differ from one that
        # never stopped
        self.ema.update_parameters(self.net)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg.warmup, self.cfg.steps))
        return [opt], [{"scheduler": sched, "interval": "step"}]


class ExtendModule(L.LightningModule):
    """Fine-tunes both halves of a trained VAE on crops of which a share are novel images, so a subject the world
    never shows (WORLD.md's checker star) can be encoded for DreamBooth and drawn back by the decoder. A flow model
    already learnt this VAE's latents, and generation decodes them: on world crops the decoder learns from the
    frozen original encoder's latents (what the flow model draws), and the new encoder is held near them (MSE in
    the pipeline's normalized units, so DreamBooth's class images encode where the flow model put them); on novel
    crops the decoder learns from the new encoder's. Latents are decoded with noise, as in the decoder stage."""

    def __init__(self, cfg: B.BaseTrainConfig, vae):
        super().__init__()
        self.cfg, self.vae = cfg, vae.requires_grad_(True)
        self.frozen = copy.deepcopy(vae).requires_grad_(False).eval()
        z = cfg.vae_z_dim
        self.register_buffer("std", torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1))

    def training_step(self, batch, _):
        x, is_novel = batch
        z = self.vae.encode(x[:, :, None]).latent_dist.mean
        with torch.no_grad():
            z0 = self.frozen.encode(x[:, :, None]).latent_dist.mean
        world = (~is_novel).view(-1, 1, 1, 1, 1)
        drift = ((z - z0) / self.std).pow(2).mean(dim=(1, 2, 3, 4))[~is_novel]
        level = torch.rand(z.shape[0], 1, 1, 1, 1, device=z.device) * self.cfg.decoder_noise
        decoded = torch.where(world, z0, z) + level * self.std * torch.randn_like(z)
        recon = self.vae.decode(decoded).sample[:, :, 0]
        loss = vae_loss(recon, x, torch.zeros(1, device=x.device), 0.0)
        if len(drift):
            loss = loss + self.cfg.vae_extend_anchor * drift.mean()
            self.log("latent_drift", drift.mean(), prog_bar=True)
        self.log("extend_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.vae.parameters(), lr=self.cfg.vae_lr / 2, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(100, self.cfg.vae_extend_steps))
        return [opt], [{"scheduler": sched, "interval": "step"}]


def fit(module: L.LightningModule, loader, steps: int, folder: Path, cfg: B.BaseTrainConfig, logger_name: str):
    """Run (or continue) one stage; Ctrl-C / SIGTERM save a checkpoint and stop with exit code 130."""
    from lightning.pytorch.loggers import TensorBoardLogger

    ckpt = PeriodicCheckpoint(folder, cfg.checkpoint_every, cfg.keep_checkpoints)
    trainer = L.Trainer(max_steps=steps, accelerator="auto", devices=1, precision="32-true", logger=TensorBoardLogger(
        str(folder.parent / "logs"), name=logger_name), callbacks=[ckpt, PlainProgress()], enable_checkpointing=False,
        enable_model_summary=False, log_every_n_steps=50, enable_progress_bar=sys.stderr.isatty(), num_sanity_val_steps=0, gradient_clip_val=1.0)
    run_fit(trainer, module, ckpt, newest_valid_checkpoint(folder), train_dataloaders=loader)


def stage_done(run: Path, stage: str) -> bool:
    return (run / stage / "DONE").exists()


def mark_done(run: Path, stage: str) -> None:
    (run / stage / "DONE").write_text("ok\n")


def train_base(cfg: B.BaseTrainConfig, run: Path, resume: bool = False, overwrite: bool = False) -> Path:
    """All stages of the built-in model; returns the exported diffusers folder."""
    from transformers import Qwen2Tokenizer

    B.prepare_run(run, cfg, resume, overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tok_dir = run / "tokenizer"
    tokenizer = Qwen2Tokenizer.from_pretrained(str(tok_dir)) if (tok_dir / "tokenizer.json").exists() \
        else B.train_tokenizer(cfg, tok_dir)
    vae = _decoder_stage(cfg, run, _vae_stage(cfg, run))
    latents = _latent_stage(cfg, run, vae)
    module = FlowModule(cfg, tokenizer, (latents.shape[2] // 2, latents.shape[3] // 2))
    if not _finished(run, "flow", cfg.steps):
        shutil.rmtree(run / "polish", ignore_errors=True)  # polished from weights this stage is about to change
        module.captions = B.LatentCaptions(latents, cfg.seed, cfg.caption_dropout, cfg.anchor_steps)
        loader = torch.utils.data.DataLoader(module.captions,
                                             batch_size=cfg.batch, shuffle=True, collate_fn=B.collate,
                                             drop_last=True)
        fit(module, loader, cfg.steps, run / "flow", cfg, "flow")
        mark_done(run, "flow")
    else:
        module = _load_module(module, run / "flow")
    ema = polish_stage(cfg, run, tokenizer, latents, module.ema.module)
    vae = extend_stage(cfg, run, vae)
    return B.export_pipeline(cfg, run, tokenizer, vae, ema["text_encoder"].eval(), ema["transformer"].eval())


def _finished(run: Path, stage: str, steps: int) -> bool:
    """Done, and not asked for more: `--resume --steps N` past a finished run's last step trains on to N."""
    if not stage_done(run, stage):
        return False
    newest = checkpoint_steps(run / stage)
    return not newest or newest[0][0] >= steps


def polish_cfg(cfg: B.BaseTrainConfig) -> B.BaseTrainConfig:
    """The flow recipe as the polish stage runs it: its own steps, learning rate and EMA, no anchor phase."""
    return dataclasses.replace(cfg, steps=cfg.polish_steps, lr=cfg.polish_lr, warmup=min(100, cfg.polish_steps),
                               ema_decay=cfg.polish_ema_decay, anchor_steps=0)


def polish_stage(cfg: B.BaseTrainConfig, run: Path, tokenizer, latents: torch.Tensor, flow_ema):
    """The flow model trained on from its EMA weights (BaseTrainConfig.polish_*); returns the weights to export."""
    if not cfg.polish_steps:
        return flow_ema
    pcfg = polish_cfg(cfg)
    L.seed_everything(cfg.seed + 1, workers=True, verbose=False)  # other noise draws than the flow stage's
    module = FlowModule(pcfg, tokenizer, (latents.shape[2] // 2, latents.shape[3] // 2))
    if _finished(run, "polish", pcfg.steps):
        return _load_module(module, run / "polish").ema.module
    module.net.load_state_dict(flow_ema.state_dict())  # a resumed stage then loads its checkpoint over this
    module.ema.module.load_state_dict(flow_ema.state_dict())
    module.captions = B.LatentCaptions(latents, cfg.seed, cfg.caption_dropout, 0, cfg.polish_full_captions)
    loader = torch.utils.data.DataLoader(module.captions, batch_size=cfg.batch, shuffle=True, collate_fn=B.collate,
                                         drop_last=True)
    fit(module, loader, pcfg.steps, run / "polish", pcfg, "polish")
    mark_done(run, "polish")
    return module.ema.module


def _load_module(module, folder: Path):
    path = newest_valid_checkpoint(folder)
    if path is None:
        raise LightboothError(f"{folder} is marked done but has no readable checkpoint; rerun with --overwrite")
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    return module


def load_vae(folder: Path):
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage.from_pretrained(str(folder), use_safetensors=True).eval()
    single_frame_convs(vae)
    fast_rms_norms(vae)
    return vae


def _vae_stage(cfg: B.BaseTrainConfig, run: Path):
    final = run / "vae" / "final"
    if stage_done(run, "vae"):
        return load_vae(final)
    module = VAEModule(cfg)
    crops = B.CropStream(cfg.seed, cfg.vae_crop, 2 ** cfg.vae_downsamples, cfg.vae_novel)
    loader = torch.utils.data.DataLoader(crops, batch_size=cfg.vae_batch)
    fit(module, loader, cfg.vae_steps, run / "vae", cfg, "vae")
    vae = module.vae.eval()
    mean, std = B.latent_stats(vae, cfg.seed)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.save_pretrained(str(final), safe_serialization=True)
    open_up(final)
    mark_done(run, "vae")
    return vae


def _decoder_stage(cfg: B.BaseTrainConfig, run: Path, vae):
    """The noise-robust decoder (DecoderModule); the encoder, and so the latent cache, is unchanged."""
    if not cfg.decoder_steps:
        return vae
    final = run / "decoder" / "final"
    if stage_done(run, "decoder"):
        return load_vae(final)
    module = DecoderModule(cfg, vae.train())
    crops = B.CropStream(cfg.seed + 1, cfg.vae_crop, 2 ** cfg.vae_downsamples, cfg.vae_novel)
    loader = torch.utils.data.DataLoader(crops, batch_size=cfg.vae_batch)
    fit(module, loader, cfg.decoder_steps, run / "decoder", cfg, "decoder")
    return _finish_vae_stage(module.vae, run, "decoder")


def _finish_vae_stage(vae, run: Path, stage: str):
    """A fine-tuned VAE stage's result, frozen, saved to RUN/stage/final and marked done."""
    vae = vae.eval().requires_grad_(False)
    vae.save_pretrained(str(run / stage / "final"), safe_serialization=True)
    open_up(run / stage / "final")
    mark_done(run, stage)
    return vae


def extend_stage(cfg: B.BaseTrainConfig, run: Path, vae):
    """The VAE extended to novel images (ExtendModule), after the flow stage: its latents cache stays the old one.
    Also run on its own on a finished model's VAE (tools/extend_vae.py)."""
    if not cfg.vae_extend_steps:
        return vae
    final = run / "extend" / "final"
    if stage_done(run, "extend"):
        return load_vae(final)
    module = ExtendModule(cfg, vae.train())
    crops = B.CropStream(cfg.seed + 2, cfg.vae_crop, 2 ** cfg.vae_downsamples, cfg.vae_extend_novel, flagged=True)
    fit(module, torch.utils.data.DataLoader(crops, batch_size=cfg.vae_batch), cfg.vae_extend_steps,
        run / "extend", cfg, "extend")
    return _finish_vae_stage(module.vae, run, "extend")


def _latent_stage(cfg: B.BaseTrainConfig, run: Path, vae) -> torch.Tensor:
    path = run / "latents.safetensors"
    if path.exists():
        return load_safetensors(path)[0]["latents"]
    z = B.encode_scenes(vae, cfg.seed, 0, cfg.latent_cache)
    save_safetensors_atomic({"latents": z.contiguous()}, path)
    return z
