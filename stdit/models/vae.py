"""Spacetime video autoencoder (stage 1): causal 3D convolutions, 4x temporal and 8x8 spatial compression by
default, continuous latents from a diagonal Gaussian posterior.

The first frame is encoded on its own (time is padded on the left with copies of it, and every temporal stride
keeps frame 0 alone), so an image and a video share one latent space: T = 1 + 4k frames -> 1 + k latent frames.
Normalisation is per frame, so nothing flows from later frames to earlier ones: latent frame j depends only on
input frames <= 4j. Long or large videos are encoded and decoded in overlapping tiles (`tiled_encode`,
`tiled_decode`).

Besides the residual blocks, a parameter-free path runs from the pixels to the latent mean and back: the input
tiled over conv_in's channels, the mean of the inputs each output covers added to every downsampling, the
channels folded onto the latent mean (and the latent tiled over the decoder's channels), the nearest-upsampled
input added to every upsampling, the last features folded onto the 3 output channels. The per-frame GroupNorms
(and the plain strided / upsampling convolutions) are not on it. Without it, absolute colour has to cross the
mean-subtracting per-frame norms before conv_out on both sides, and the joint encoder-decoder learns it one
direction at a time with long plateaus (measured on the flat-colour synthetic clips: the tiny preset stayed at
~8 dB PSNR for 600 steps; after 100 steps only one colour channel of the background was linearly decodable from
its latents). With it the same recipe reaches ~14 dB (README, "Stage 1").
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from stdit import grid
from stdit.config import compression_factors

# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------


class CausalConv3d(nn.Module):
    """3D convolution over [B, C, T, H, W] that sees only the current and earlier frames.

    Time is padded on the left with copies of the first frame. In streaming mode (`stream=True`, see
    `VideoVAE.streaming`) a chunk is padded instead with the last frames of the previous chunk, so a video
    processed chunk by chunk gives exactly what it gives whole."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        self.time_pad = kernel - 1
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=(0, kernel // 2, kernel // 2))
        self.stream, self.cache = False, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_pad:  # repeat the first frame: frame 0 is then encoded from itself alone
            head = self.cache if self.cache is not None else x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
            x = torch.cat([head, x], dim=2)
        if self.stream:  # the frames the next chunk's first outputs still need (kernel - stride of them)
            keep = self.time_pad + 1 - self.conv.stride[0]
            self.cache = x[:, :, x.shape[2] - keep:] if keep > 0 else None
        return self.conv(x)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame (over channels-in-group x H x W), never across time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


class ResBlock(nn.Module):
    """norm -> SiLU -> conv, twice, plus a (1x1x1-projected) skip."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = FrameGroupNorm(groups, cin), CausalConv3d(cin, cout)
        self.norm2, self.conv2 = FrameGroupNorm(groups, cout), CausalConv3d(cout, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class FrameAttention(nn.Module):
    """Self-attention among the positions of each frame (the mid block, at the lowest resolution)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = FrameGroupNorm(groups, channels)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.proj = nn.Conv3d(channels, channels, 1)

    def forward(self, x):
        b, c, t, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).permute(0, 2, 3, 4, 1).reshape(b * t, h * w, 3, c).unbind(2)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # one head
        return x + self.proj(out.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3))


def tile_channels(x: torch.Tensor, c: int) -> torch.Tensor:
    """[B, k, ...] -> [B, c, ...], channel i a copy of channel i % k (c >= k)."""
    k = x.shape[1]
    return x.repeat(1, -(-c // k), *([1] * (x.dim() - 2)))[:, :c]


def fold_channels(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, c, ...] -> [B, k, ...], channel j the mean of channels j, j + k, j + 2k, ... (inverts tile_channels)."""
    c = x.shape[1] // k * k
    return x[:, :c].unflatten(1, (c // k, k)).mean(dim=1)


class Downsample(nn.Module):
    """Stride 2 in space (and in time when `temporal`; frame 0 stays alone: 1 + 2m -> 1 + m frames), plus a
    parameter-free shortcut: the mean of the inputs each output covers (2x2 pixels, and the 2 newest frames)."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(channels, channels, stride=(2 if temporal else 1, 2, 2))
        self.stream, self.started = False, False  # streaming: only the first chunk holds frame 0

    def forward(self, x):
        s = x
        if self.temporal:
            head = x[:, :, :0] if self.stream and self.started else x[:, :, :1]
            rest = x[:, :, head.shape[2]:]
            s = torch.cat([head, 0.5 * (rest[:, :, 0::2] + rest[:, :, 1::2])], dim=2)
        self.started = self.stream
        b, c, t, h, w = s.shape
        s = F.avg_pool2d(s.transpose(1, 2).reshape(b * t, c, h, w), 2).reshape(b, t, c, h // 2, w // 2)
        return self.conv(x) + s.transpose(1, 2)


class Upsample(nn.Module):
    """Nearest x2 in space (and in time: frame 0 stays one frame, each later one becomes two), then a conv, plus
    the upsampled input itself (a parameter-free shortcut)."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(channels, channels)
        self.stream, self.started = False, False  # streaming: only the first chunk holds frame 0

    def forward(self, x):
        if self.temporal and self.stream and self.started:
            x = x.repeat_interleave(2, dim=2)
        elif self.temporal:
            x = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(2, dim=2)], dim=2)
        self.started = self.stream
        x = x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
        return x + self.conv(x)


# ----------------------------------------------------------------------------------------------------------
# Encoder / decoder
# ----------------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        g = cfg.norm_groups
        self.conv_in = CausalConv3d(cfg.in_channels, chans[0])
        self.down = nn.ModuleList()
        prev = chans[0]
        for i, ch in enumerate(chans):
            stage = nn.Module()
            stage.blocks = nn.ModuleList([ResBlock(prev if j == 0 else ch, ch, g) for j in range(cfg.num_res_blocks)])
            prev = ch
            if i < len(chans) - 1:
                stage.downsample = Downsample(ch, temporal=cfg.temporal_down[i])
            self.down.append(stage)
        self.mid = nn.Sequential(ResBlock(prev, prev, g), *([FrameAttention(prev, g)] if cfg.mid_attention else []),
                                 ResBlock(prev, prev, g))
        self.norm_out = FrameGroupNorm(g, prev)
        self.conv_out = CausalConv3d(prev, 2 * cfg.latent_channels)
        # the posterior starts narrow (std ~0.05): the decoder learns from the latents from the first step
        # instead of from noise; the KL term widens it where the reconstruction allows
        nn.init.constant_(self.conv_out.conv.bias[cfg.latent_channels:], -6.0)

    def forward(self, x):
        h = self.conv_in(x) + tile_channels(x, self.conv_in.conv.out_channels)
        for stage in self.down:
            for block in stage.blocks:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        mean, logvar = self.conv_out(F.silu(self.norm_out(h))).chunk(2, dim=1)
        return torch.cat([mean + fold_channels(h, mean.shape[1]), logvar], dim=1)


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        g = cfg.norm_groups
        top = chans[-1]
        self.conv_in = CausalConv3d(cfg.latent_channels, top)
        self.mid = nn.Sequential(ResBlock(top, top, g), *([FrameAttention(top, g)] if cfg.mid_attention else []),
                                 ResBlock(top, top, g))
        self.up = nn.ModuleList()
        prev = top
        for i in reversed(range(len(chans))):
            stage = nn.Module()
            ch = chans[i]
            stage.blocks = nn.ModuleList([ResBlock(prev if j == 0 else ch, ch, g)
                                          for j in range(cfg.num_res_blocks + 1)])
            prev = ch
            if i > 0:
                stage.upsample = Upsample(ch, temporal=cfg.temporal_down[i - 1])
            self.up.append(stage)
        self.norm_out = FrameGroupNorm(g, prev)
        self.conv_out = CausalConv3d(prev, cfg.in_channels)

    def forward(self, z):
        h = self.mid(self.conv_in(z) + tile_channels(z, self.conv_in.conv.out_channels))
        for stage in self.up:
            for block in stage.blocks:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h))) + fold_channels(h, self.conv_out.conv.out_channels)


# ----------------------------------------------------------------------------------------------------------
# The autoencoder
# ----------------------------------------------------------------------------------------------------------


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per latent element."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


class VideoVAE(nn.Module):
    """Encoder + diagonal Gaussian posterior + decoder. Videos are [B, C, T, H, W] in [-1, 1].

    `latent_mean` / `latent_std` (per channel, computed from data after training and stored beside the weights)
    make `encode` return unit-variance latents for the DiT and `decode` undo it.
    """

    def __init__(self, cfg):
        super().__init__()
        if len(cfg.temporal_down) != len(cfg.channel_mult) - 1:
            raise ValueError(f"vae.temporal_down needs one entry per downsampling (len(vae.channel_mult) - 1 = "
                             f"{len(cfg.channel_mult) - 1}), got {cfg.temporal_down}")
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.time_factor, self.space_factor = compression_factors(cfg)
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels), persistent=False)
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels), persistent=False)

    # shapes ------------------------------------------------------------------------------------------------

    def check_shape(self, t: int, h: int, w: int) -> None:
        """ValueError unless a video of (t, h, w) pixels compresses to whole latent frames and pixels."""
        self.latent_shape(t, h, w)

    def latent_shape(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """(T', H', W') of the latents of a (t, h, w) video: stdit.grid's rule under this autoencoder's factors."""
        return grid.latent_shape((t, h, w), (self.time_factor, self.space_factor))

    def video_shape(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        return 1 + (t - 1) * self.time_factor, h * self.space_factor, w * self.space_factor

    # training ------------------------------------------------------------------------------------------------

    def posterior(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of the latent posterior, unscaled."""
        self.check_shape(*video.shape[2:])
        mean, logvar = self.encoder(video).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(self, video: torch.Tensor, noise: torch.Tensor | None = None):
        """(reconstruction, mean, logvar); `noise` (shaped like mean) samples the posterior, None takes the mean."""
        mean, logvar = self.posterior(video)
        z = mean if noise is None else mean + (0.5 * logvar).exp() * noise
        return self.decoder(z), mean, logvar

    # use ---------------------------------------------------------------------------------------------------

    def _scale(self, z):
        return (z - self.latent_mean.view(1, -1, 1, 1, 1)) / self.latent_std.view(1, -1, 1, 1, 1)

    def _unscale(self, z):
        return z * self.latent_std.view(1, -1, 1, 1, 1) + self.latent_mean.view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """[B, C, T, H, W] video -> scaled latents (posterior means) [B, z, 1 + (T-1)/4, H/8, W/8]."""
        mean = self.tiled_encode(video) if tiled else self.posterior(video)[0]
        return self._scale(mean)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Scaled latents -> video in [-1, 1]-ish."""
        z = self._unscale(latents)
        return self.tiled_decode(z) if tiled else self.decoder(z)

    # tiling --------------------------------------------------------------------------------------------------

    @staticmethod
    def _spatial_tiles(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
        """(start, stop) windows covering `size`, each `tile` long, neighbours sharing `overlap`."""
        if tile <= 0 or size <= tile:
            return [(0, size)]
        step = tile - overlap
        starts = list(range(0, size - tile, step)) + [size - tile]
        return [(s, s + tile) for s in starts]

    def tiled_encode(self, video: torch.Tensor) -> torch.Tensor:
        """Posterior means in tiles: in time, chunks of `vae.tile_frames` latent frames streamed through the
        causal caches (exact); in space, `vae.tile_size` pixel tiles overlapping by `vae.tile_overlap`, blended
        linearly (approximate: per-frame norms and the mid attention see one tile, not the whole frame)."""
        self.check_shape(*video.shape[2:])
        return self._tiled(video, self._encode_time_tiled, self.space_factor, down=True)

    def tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._tiled(z, self._decode_time_tiled, self.space_factor, down=False)

    @contextlib.contextmanager
    def streaming(self):
        """Within it, consecutive calls of the encoder or decoder continue one video (causal caches)."""
        layers = [m for m in self.modules() if isinstance(m, (CausalConv3d, Downsample, Upsample))]
        for m in layers:
            m.stream = True
        try:
            yield
        finally:
            for m in layers:
                m.stream, m.cache, m.started = False, None, False

    def _encode_time_tiled(self, video):
        """Chunks of `vae.tile_frames` latent frames (4 input frames each, plus frame 0 in the first), streamed
        through the causal caches: exact, with memory bounded by the chunk."""
        ft, chunk = self.time_factor, self.cfg.tile_frames
        n_lat = 1 + (video.shape[2] - 1) // ft
        if chunk <= 0 or n_lat <= chunk:
            return self.posterior(video)[0]
        bounds = [0] + [1 + ft * (j - 1) for j in range(chunk, n_lat, chunk)] + [video.shape[2]]
        with self.streaming():
            return torch.cat([self.encoder(video[:, :, a:b]).chunk(2, dim=1)[0]
                              for a, b in zip(bounds[:-1], bounds[1:])], dim=2)

    def _decode_time_tiled(self, z):
        chunk = self.cfg.tile_frames
        if chunk <= 0 or z.shape[2] <= chunk:
            return self.decoder(z)
        with self.streaming():
            return torch.cat([self.decoder(z[:, :, a:a + chunk]) for a in range(0, z.shape[2], chunk)], dim=2)

    def _tiled(self, x, time_fn, factor: int, down: bool):
        """Apply `time_fn` over overlapping spatial tiles of x and blend the results linearly in the overlaps."""
        cfg = self.cfg
        tile_in = cfg.tile_size if down else cfg.tile_size // factor
        over_in = cfg.tile_overlap if down else cfg.tile_overlap // factor
        h, w = x.shape[3], x.shape[4]
        rows, cols = self._spatial_tiles(h, tile_in, over_in), self._spatial_tiles(w, tile_in, over_in)
        if len(rows) == 1 and len(cols) == 1:
            return time_fn(x)
        scale = (1 / factor) if down else factor
        out, weight = None, None
        for r0, r1 in rows:
            for c0, c1 in cols:
                y = time_fn(x[:, :, :, r0:r1, c0:c1])
                if out is None:
                    out = y.new_zeros(*y.shape[:3], int(h * scale), int(w * scale))
                    weight = y.new_zeros(1, 1, 1, int(h * scale), int(w * scale))
                blend = int(over_in * scale)
                wr = _ramp(y.shape[3], blend, r0 > 0, r1 < h, y)
                wc = _ramp(y.shape[4], blend, c0 > 0, c1 < w, y)
                m = wr[:, None] * wc[None, :]
                R0, C0 = int(r0 * scale), int(c0 * scale)
                out[:, :, :, R0:R0 + y.shape[3], C0:C0 + y.shape[4]] += y * m
                weight[:, :, :, R0:R0 + y.shape[3], C0:C0 + y.shape[4]] += m
        return out / weight


def _ramp(n: int, blend: int, rise: bool, fall: bool, like: torch.Tensor) -> torch.Tensor:
    """Blending weights along one axis of a tile: linear ramps over `blend` at the edges shared with a neighbour."""
    w = torch.ones(n, dtype=like.dtype, device=like.device)
    if blend > 0:
        ramp = (torch.arange(blend, dtype=like.dtype, device=like.device) + 0.5) / blend
        if rise:
            w[:blend] = ramp
        if fall:
            w[n - blend:] = ramp.flip(0)
    return w
