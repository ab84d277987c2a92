"""Single-frame fast path for Qwen-Image's causal 3D VAE.

The VAE is a video model: every convolution is a causal Conv3d that pads two zero frames in front. On one image
(one frame) only the last time slice of each kernel ever meets real data, so the Conv3d equals a Conv2d with
weight[:, :, -1] - the same arithmetic minus the multiplications by zero padding, and on CPUs the much faster
2D kernels. The weights are shared (a view), so gradients and saved files are unchanged.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _forward_single_frame(self, x, cache_x=None):
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    if x.shape[2] != 1 or (cache_x is not None and self._padding[4] > 0):
        return QwenImageCausalConv3d.forward(self, x, cache_x)
    pad_w, _, pad_h = self._padding[:3]
    y = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, self.stride[1:], (pad_h, pad_w), self.dilation[1:],
                 self.groups)
    return y[:, :, None]


def single_frame_convs(vae) -> None:
    """Switch every causal Conv3d of `vae` to the exact single-frame 2D path (idempotent)."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    for m in vae.modules():
        if isinstance(m, QwenImageCausalConv3d) and not getattr(m, "_single_frame", False):
            m.forward = types.MethodType(_forward_single_frame, m)
            m._single_frame = True


def _rms_norm_sum_of_squares(self, x):
    """QwenImageRMS_norm.forward (F.normalize, in float32 for narrower dtypes) with the norm as sqrt(sum x^2)."""
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    length = xf.square().sum(1 if self.channel_first else -1, keepdim=True).sqrt().clamp_min(1e-12)
    return (xf / length).to(x.dtype) * self.scale * self.gamma + self.bias


def fast_rms_norms(vae) -> None:
    """Switch the VAE's RMS norms to a sum-of-squares channel norm (idempotent); same value up to rounding.

    torch's vector_norm (inside F.normalize) over the channel dim of a 5-D tensor is 5-15x slower on CPU than
    square().sum(1): it cost as much as all the (2D-path) convolutions of a small decode.
    """
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageRMS_norm

    for m in vae.modules():
        if isinstance(m, QwenImageRMS_norm) and not getattr(m, "_sum_of_squares", False):
            m.forward = types.MethodType(_rms_norm_sum_of_squares, m)
            m._sum_of_squares = True
