"""Batched, on-device image augmentation for uint8 image tensors (N x C x H x W).

:class:`BatchAugment` reproduces the distribution of torchvision's
``RandomCrop(size=(H, W), padding=p)`` (zero padding) followed by
``RandomHorizontalFlip(0.5)`` and ``Normalize(mean, std)``, for a whole batch at once
on the images' device: every image gets an independent crop offset ``(dy, dx)``, each
uniform on ``{0, ..., 2p}`` (position of the crop window inside the padded image), and
an independent Bernoulli(1/2) flip.  Padded pixels are 0 in uint8 space, i.e. they are
normalised like a black pixel, exactly as torchvision pads the PIL image before
``ToTensor``/``Normalize``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["normalize", "BatchAugment", "params_to"]


def _stats(x: torch.Tensor | Sequence[float], device: torch.device | str | None) -> torch.Tensor:
    """Per-channel statistics as a float32 (1, C, 1, 1) tensor."""
    return torch.as_tensor(x, dtype=torch.float32, device=device).reshape(1, -1, 1, 1)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected a uint8 N x C x H x W tensor, got {got}")


def normalize(images_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """float32 ``(x / 255 - mean) / std``; ``mean``/``std`` shaped (1, C, 1, 1) on the images' device.

    Sequences of floats are also accepted for ``mean``/``std``.
    """
    _check_images(images_uint8)
    if not isinstance(mean, torch.Tensor) or mean.dim() != 4:
        mean = _stats(mean, images_uint8.device)
    if not isinstance(std, torch.Tensor) or std.dim() != 4:
        std = _stats(std, images_uint8.device)
    return images_uint8.to(torch.float32).div_(255.0).sub_(mean).div_(std)


def params_to(packed: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dx, flip) on ``device`` from the (3, n) tensor of :meth:`BatchAugment.draw_params`.

    One non-blocking copy: from pageable memory the CUDA driver stages the bytes before the
    call returns (so the source may be freed at once) without waiting for the kernels
    already queued, and torch adds no stream synchronisation when ``non_blocking`` is set;
    a blocking copy would make every training step wait for the previous one."""
    packed = packed.to(device, non_blocking=True)
    return packed[0], packed[1], packed[2].bool()


class BatchAugment:
    """Random zero-pad crop + horizontal flip + normalisation for a whole batch.

    Parameters
    ----------
    mean, std : per-channel normalisation (sequence of floats or tensor), [0,1] units.
    crop_padding : p; 0 disables cropping (the offsets are then always 0).
    hflip : whether to flip horizontally with probability 1/2.
    device : device on which mean/std live (normally the images' device).
    """

    def __init__(
        self,
        mean: torch.Tensor | Sequence[float],
        std: torch.Tensor | Sequence[float],
        crop_padding: int,
        hflip: bool,
        device: torch.device | str = "cpu",
    ) -> None:
        if int(crop_padding) < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.device = torch.device(device)
        self.mean = _stats(mean, self.device)
        self.std = _stats(std, self.device)
        self.crop_padding = int(crop_padding)
        self.hflip = bool(hflip)

    def _stats_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean.device != device:
            return self.mean.to(device), self.std.to(device)
        return self.mean, self.std

    def draw_params(self, n: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
        """The parameters of ``n`` images as one (3, n) int64 tensor: rows dy, dx, flip (0/1).

        Drawn on the generator's device (else on ``device``, default ``self.device``, with the
        global RNG) in the order dy, dx, flip.  The training loop draws on a CPU generator, so
        a CPU and a CUDA run of one seed augment identically and a checkpoint holds only CPU
        generator states; the packed tensor then reaches the device in one copy
        (:func:`params_to`).
        """
        draw = generator.device if generator is not None else torch.device(device if device is not None else self.device)
        p = self.crop_padding
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=draw)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=draw)
        if self.hflip:
            flip = torch.rand(n, generator=generator, device=draw) < 0.5
        else:
            flip = torch.zeros(n, dtype=torch.bool, device=draw)
        return torch.stack([dy, dx, flip.long()])

    def sample_params(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ``(dy, dx, flip)`` for ``n`` images: int64 offsets uniform on {0..2p}, bool flips.

        Random numbers are drawn as :meth:`draw_params` does and the results are moved to
        ``device`` (default: the generator's device / ``self.device``) in one copy.
        """
        target = torch.device(device) if device is not None else (generator.device if generator is not None else self.device)
        return params_to(self.draw_params(n, generator, device), target)

    def apply(
        self,
        images_uint8: torch.Tensor,
        dy: torch.Tensor,
        dx: torch.Tensor,
        flip: torch.Tensor,
        validate: bool = True,
    ) -> torch.Tensor:
        """Deterministic augmentation: crop window at (dy, dx) of the zero-padded image, optional flip, normalise.

        ``out[i, :, r, c] = padded[i, :, dy[i] + r, dx[i] + c']`` with
        ``c' = W - 1 - c`` if ``flip[i]`` else ``c``; done with a single ``torch.gather``.
        ``validate=False`` skips the offset range check (which synchronises with the device).
        """
        _check_images(images_uint8)
        x = images_uint8
        dev = x.device
        n, ch, h, w = x.shape
        p = self.crop_padding
        dy = dy.to(device=dev, dtype=torch.long).reshape(n)
        dx = dx.to(device=dev, dtype=torch.long).reshape(n)
        flip = flip.to(device=dev, dtype=torch.bool).reshape(n)
        if validate and n > 0 and (int(dy.min()) < 0 or int(dy.max()) > 2 * p or int(dx.min()) < 0 or int(dx.max()) > 2 * p):
            raise ValueError(f"crop offsets must lie in 0..{2 * p}")
        hp, wp = h + 2 * p, w + 2 * p
        padded = F.pad(x, (p, p, p, p), mode="constant", value=0) if p > 0 else x
        rows = dy[:, None] + torch.arange(h, device=dev)[None, :]  # (N, H)
        cols_fwd = torch.arange(w, device=dev)
        cols = dx[:, None] + torch.where(flip[:, None], cols_fwd.flip(0)[None, :], cols_fwd[None, :])  # (N, W)
        index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w).expand(n, ch, h * w)
        out = torch.gather(padded.reshape(n, ch, hp * wp), 2, index).reshape(n, ch, h, w)
        mean, std = self._stats_on(dev)
        return normalize(out, mean, std)

    def __call__(self, images_uint8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random training augmentation of a whole batch on the images' device."""
        _check_images(images_uint8)
        dy, dx, flip = self.sample_params(images_uint8.shape[0], generator, device=images_uint8.device)
        return self.apply(images_uint8, dy, dx, flip, validate=False)

    def eval(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Normalisation only (evaluation)."""
        mean, std = self._stats_on(images_uint8.device)
        return normalize(images_uint8, mean, std)
