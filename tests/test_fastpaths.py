"""The speed-ups lightbooth applies to stock modules compute the same thing as the modules themselves."""

import copy
import inspect

import torch

from lightbooth.families.base import presign_attention
from lightbooth.families.qwen_vae import fast_rms_norms, single_frame_convs
from lightbooth.tiny import tiny_qwen_components, tiny_sd_components


def test_qwen_vae_fast_paths_equal_the_stock_vae_for_images_and_videos():
    vae = tiny_qwen_components()["vae"]
    fast = copy.deepcopy(vae)
    single_frame_convs(fast)
    fast_rms_norms(fast)
    fast_rms_norms(fast)  # idempotent
    torch.manual_seed(0)
    with torch.inference_mode():
        for frames in (1, 3):  # later frames of a video take the 3-D path with their cached past
            z = torch.randn(2, 4, frames, 8, 8)
            ref, out = vae.decode(z, return_dict=False)[0], fast.decode(z, return_dict=False)[0]
            assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)
        img = torch.rand(2, 3, 1, 32, 32) * 2 - 1
        assert torch.allclose(fast.encode(img).latent_dist.mean, vae.encode(img).latent_dist.mean, atol=1e-5)


def test_presigned_attention_gives_the_same_outputs_and_signature():
    unet = tiny_sd_components()["unet"]
    fast = copy.deepcopy(unet)
    presign_attention(fast)
    presign_attention(fast)  # a second call changes nothing
    proc = next(m.processor for m in fast.modules() if hasattr(m, "processor"))
    assert inspect.signature(proc.__call__) == inspect.signature(type(proc)().__call__)
    x, e = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.inference_mode():
        assert torch.equal(fast(x, 10, encoder_hidden_states=e).sample, unet(x, 10, encoder_hidden_states=e).sample)
