"""Classifier-free guidance (Ho & Salimans 2022) and the norm rescale Qwen-Image applies after it."""

from __future__ import annotations

import torch


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def cfg_norm_rescale(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG, then rescale each token's vector to the conditional prediction's norm (Qwen-Image's true CFG)."""
    comb = cfg(cond, uncond, scale)
    return comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
