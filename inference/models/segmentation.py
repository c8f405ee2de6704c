"""Stage 1: lung segmentation networks.

Two architectures, both fully convolutional, taking a normalised grey image of shape
(N, 1, S, S) with S a multiple of 16 and returning lung logits of shape (N, 1, S, S):

``unet``
    A small 4-level U-Net (16-32-64-128 channels), about 0.5 M parameters, fast on a CPU.
``lungvae``
    A U-Net with a variational latent branch, after Selvan et al. 2020, "Lung segmentation from
    chest X-rays using variational data imputation". The encoder is shared; a VAE bottleneck
    (mu, logvar, reparameterisation) feeds a decoder that reconstructs the *uncorrupted* image,
    and its full-resolution features are joined to the segmentation decoder's, so the mask can
    rely on an imputed image where opacities hide the lung. Training corrupts the input
    (:func:`corrupt_for_imputation`) and optimises :func:`lungvae_loss`.

Both return only the logits from ``forward``; ``LungVAE.forward_train`` returns everything the
loss needs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

SEGMENTERS = ("unet", "lungvae")
SIZE_MULTIPLE = 16  # input side must be a multiple of this (4 poolings in lungvae, 3 in unet)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class _Encoder(nn.Module):
    """Four levels of double convolutions with max-pooling between them; returns every level."""

    def __init__(self, in_channels: int, widths: tuple[int, ...]) -> None:
        super().__init__()
        chans = (in_channels, *widths)
        self.levels = nn.ModuleList(_block(chans[i], chans[i + 1]) for i in range(len(widths)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, level in enumerate(self.levels):
            if i:
                x = F.max_pool2d(x, 2)
            x = level(x)
            feats.append(x)
        return feats


class _Decoder(nn.Module):
    """U-Net decoder: upsample, concatenate the skip connection, double convolution."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        rev = widths[::-1]
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(rev[i], rev[i + 1], 2, stride=2) for i in range(len(rev) - 1)
        )
        self.blocks = nn.ModuleList(_block(2 * rev[i + 1], rev[i + 1]) for i in range(len(rev) - 1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for up, block, skip in zip(self.ups, self.blocks, reversed(feats[:-1]), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return x


class UNet(nn.Module):
    """Four-level U-Net returning lung logits at the input resolution."""

    def __init__(self, in_channels: int = 1, base: int = 16) -> None:
        super().__init__()
        if base < 4:
            raise ValueError('Argument "base" must be at least 4.')
        widths = tuple(base * 2**i for i in range(4))
        self.encoder = _Encoder(in_channels, widths)
        self.decoder = _Decoder(widths)
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)))


class LungVAEOutput(NamedTuple):
    """Everything :func:`lungvae_loss` needs from one training forward pass."""

    logits: torch.Tensor  # (N, 1, S, S) lung logits
    reconstruction: torch.Tensor  # (N, 1, S, S) imputed image, in the normalised input space
    mu: torch.Tensor  # (N, Z, S/16, S/16)
    logvar: torch.Tensor  # (N, Z, S/16, S/16)


class LungVAE(nn.Module):
    """U-Net with a variational latent branch (spatial latent at 1/16 of the input side).

    In eval mode the latent is its mean, so inference is deterministic.
    """

    def __init__(self, in_channels: int = 1, base: int = 16, latent_channels: int = 16) -> None:
        super().__init__()
        if base < 4:
            raise ValueError('Argument "base" must be at least 4.')
        if latent_channels < 1:
            raise ValueError('Argument "latent_channels" must be at least 1.')
        widths = tuple(base * 2**i for i in range(4))
        self.encoder = _Encoder(in_channels, widths)
        self.decoder = _Decoder(widths)
        top = widths[-1]
        self.to_latent = nn.Sequential(
            nn.Conv2d(top, top, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(top),
            nn.ReLU(inplace=True),
        )
        self.mu = nn.Conv2d(top, latent_channels, 1)
        self.logvar = nn.Conv2d(top, latent_channels, 1)
        vae_widths = (top, *widths[::-1])  # 1/16 -> 1/8 -> 1/4 -> 1/2 -> 1
        self.from_latent = nn.Sequential(
            nn.Conv2d(latent_channels, top, 3, padding=1, bias=False),
            nn.BatchNorm2d(top),
            nn.ReLU(inplace=True),
        )
        self.vae_up = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(vae_widths[i], vae_widths[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(vae_widths[i + 1]),
                nn.ReLU(inplace=True),
            )
            for i in range(4)
        )
        self.recon_head = nn.Conv2d(widths[0], in_channels, 1)
        self.head = nn.Sequential(
            nn.Conv2d(2 * widths[0], widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.Conv2d(widths[0], 1, 1),
        )

    def _run(self, x: torch.Tensor, sample: bool) -> LungVAEOutput:
        feats = self.encoder(x)
        h = self.to_latent(feats[-1])
        mu, logvar = self.mu(h), self.logvar(h).clamp(-10.0, 10.0)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        v = self.from_latent(z)
        for up in self.vae_up:
            v = up(v)
        seg = self.decoder(feats)
        logits = self.head(torch.cat([seg, v], dim=1))
        return LungVAEOutput(logits, self.recon_head(v), mu, logvar)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, sample=self.training).logits

    def forward_train(self, x: torch.Tensor) -> LungVAEOutput:
        """Training pass: sampled latent (reparameterisation), reconstruction and latent statistics."""
        return self._run(x, sample=True)


def build_segmenter(name: str) -> nn.Module:
    """A fresh, randomly initialised stage 1 network by architecture name (see ``SEGMENTERS``)."""
    if name == "unet":
        return UNet()
    if name == "lungvae":
        return LungVAE()
    raise ValueError(f'Argument "name" must be one of {", ".join(SEGMENTERS)}; got {name!r}.')


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss averaged over the batch; ``target`` is a {0, 1} float tensor like ``logits``."""
    prob = torch.sigmoid(logits).flatten(1)
    tgt = target.flatten(1)
    inter = (prob * tgt).sum(1)
    return (1 - (2 * inter + eps) / (prob.sum(1) + tgt.sum(1) + eps)).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice, the stage 1 loss for both architectures."""
    return F.binary_cross_entropy_with_logits(logits, target) + dice_loss(logits, target)


def lungvae_loss(
    out: LungVAEOutput,
    target_mask: torch.Tensor,
    clean_image: torch.Tensor,
    *,
    recon_weight: float = 1.0,
    kl_weight: float = 1e-3,
) -> dict[str, torch.Tensor]:
    """Loss terms of the lungvae model.

    ``clean_image`` is the normalised input *before* :func:`corrupt_for_imputation`, so the
    reconstruction term teaches the VAE branch to impute what the corruption hid. Returns a dict
    with ``seg`` (BCE + Dice), ``recon`` (mean squared error), ``kl`` (mean over latent elements)
    and ``total`` (the weighted sum to back-propagate).
    """
    seg = segmentation_loss(out.logits, target_mask)
    recon = F.mse_loss(out.reconstruction, clean_image)
    kl = -0.5 * torch.mean(1 + out.logvar - out.mu.pow(2) - out.logvar.exp())
    return {"seg": seg, "recon": recon, "kl": kl, "total": seg + recon_weight * recon + kl_weight * kl}


def corrupt_for_imputation(
    x: torch.Tensor,
    *,
    p_block: float = 0.5,
    max_blocks: int = 4,
    max_block_frac: float = 0.25,
    noise_std: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training-time corruption for data imputation: random blocks blanked or filled with noise.

    Each image gets, with probability ``p_block``, up to ``max_blocks`` rectangles (side up to
    ``max_block_frac`` of the image) that are set to the image mean or to Gaussian noise around it;
    every image also gets mild Gaussian noise of ``noise_std``. ``x`` is not modified.
    """
    if x.ndim != 4:
        raise ValueError('Argument "x" must have shape (N, C, H, W).')
    if not 0.0 <= p_block <= 1.0:
        raise ValueError('Argument "p_block" must be between 0 and 1.')
    out = x.clone()
    n, _, h, w = x.shape
    dev = x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device="cpu").to(dev)

    for i in range(n):
        if float(rand(1)) >= p_block:
            continue
        fill = out[i].mean()
        for _ in range(1 + int(float(rand(1)) * max_blocks) % max_blocks):
            bh = max(1, int(h * max_block_frac * float(rand(1))))
            bw = max(1, int(w * max_block_frac * float(rand(1))))
            y0, x0 = int((h - bh) * float(rand(1))), int((w - bw) * float(rand(1)))
            region = out[i, :, y0 : y0 + bh, x0 : x0 + bw]
            if float(rand(1)) < 0.5:
                region.fill_(fill)
            else:
                noise = torch.randn(region.shape, generator=generator, device="cpu").to(dev)
                region.copy_(fill + noise * x[i].std())
    if noise_std > 0:
        out = out + torch.randn(out.shape, generator=generator, device="cpu").to(dev) * noise_std
    return out
