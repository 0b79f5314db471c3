"""Turning the model's estimate of the clean latents into a small moving picture, without the VAE.

Wan 2.1's latents have 16 channels per 8x8 pixels and 4 frames. A fixed linear map from those 16
channels to RGB (plus a bias) gives a recognisable, low-resolution picture of the composition: the
factors below are the published ones for the Wan 2.1 VAE, as ComfyUI ships them for its latent
previews. They act on the latents in the model's own (normalised) space, which is what the
scheduler holds. One small matrix product per step: milliseconds, and no weights to load.

Works on numpy arrays (the fake backend, tests) and on torch tensors (the real backend, on the GPU:
only the small uint8 result is copied to the host). Torch is never imported here.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

LATENT_CHANNELS = 16

# Rows: latent channels 0..15; columns: R, G, B.
WAN21_LATENT_RGB_FACTORS = (
    (-0.1299, -0.1692, 0.2932),
    (0.0671, 0.0406, 0.0442),
    (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328),
    (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925),
    (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636),
    (0.0680, 0.3019, 0.1128),
    (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699),
    (0.0060, -0.0633, 0.0005),
    (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)
WAN21_LATENT_RGB_BIAS = (-0.1835, -0.0868, -0.3360)

# Longest side of a preview frame, in latent pixels (one latent pixel = 8x8 pixels): 720p's
# latents (90 x 160) are shown at 45 x 80 (every second pixel), 480p's (60 x 104) as they are.
MAX_PREVIEW_SIDE = 128


def stride_for(height: int, width: int, max_side: int = MAX_PREVIEW_SIDE) -> int:
    """Take every n-th latent pixel so that the longest side is at most `max_side`."""
    return max(1, -(-max(height, width) // max_side))


def latents_to_rgb(x0: Any, max_side: int = MAX_PREVIEW_SIDE) -> np.ndarray:
    """[16, T, H, W] latents (numpy or torch, any float dtype, any device) -> uint8 [T, h, w, 3].

    Frames are taken every `stride` latent pixels so the longest side is at most `max_side`."""
    if x0.ndim != 4 or x0.shape[0] != LATENT_CHANNELS:
        raise ValueError(f"expected latents [16, T, H, W], got shape {tuple(x0.shape)}")
    s = stride_for(int(x0.shape[2]), int(x0.shape[3]), max_side)
    if isinstance(x0, np.ndarray):
        small = x0[:, :, ::s, ::s].astype(np.float32)
        factors = np.asarray(WAN21_LATENT_RGB_FACTORS, dtype=np.float32)
        rgb = np.einsum("cthw,ck->thwk", small, factors) + np.asarray(WAN21_LATENT_RGB_BIAS, np.float32)
        return np.clip((rgb + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    # torch: the same arithmetic where the latents are (the GPU), then one small copy.
    small = x0[:, :, ::s, ::s].float()
    factors = small.new_tensor(WAN21_LATENT_RGB_FACTORS)
    bias = small.new_tensor(WAN21_LATENT_RGB_BIAS)
    rgb = small.permute(1, 2, 3, 0).matmul(factors).add_(bias)
    # uint8 as the tensor's own library spells it (torch is never imported by this module).
    uint8 = getattr(sys.modules[type(x0).__module__.split(".")[0]], "uint8")
    out = rgb.add_(1.0).mul_(127.5).clamp_(0, 255).round_().to(dtype=uint8)
    return out.cpu().numpy()


def preview_fps(clip_fps: float, frames: int, preview_frames: int) -> float:
    """Play the preview in the clip's own duration: 21 latent frames stand for 81 clip frames."""
    if preview_frames <= 1 or frames <= 1:
        return float(clip_fps)
    return round(clip_fps * preview_frames / frames, 3)
