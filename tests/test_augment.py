"""Tests for utils/data/augment.py: batched zero-pad random crop + horizontal flip + normalisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from utils.data.augment import BatchAugment, normalize

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _stats():
    return torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)


def _images(n, c=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def _reference(aug: BatchAugment, x, dy, dx, flip):
    """Straightforward per-image loop: pad with zeros, slice, flip, normalise."""
    p = aug.crop_padding
    _, _, h, w = x.shape
    outs = []
    for i in range(len(x)):
        img = F.pad(x[i], (p, p, p, p), value=0)
        img = img[:, int(dy[i]) : int(dy[i]) + h, int(dx[i]) : int(dx[i]) + w]
        if bool(flip[i]):
            img = img.flip(-1)
        outs.append(img)
    return normalize(torch.stack(outs), aug.mean, aug.std)


def _within(count, n, prob, k=5.0):
    se = math.sqrt(prob * (1 - prob) / n)
    return abs(count / n - prob) <= k * se


def test_normalize_values():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    mean, std = _stats()
    out = normalize(x, mean, std)
    assert out.dtype == torch.float32 and out.shape == (1, 3, 1, 1)
    expect = torch.tensor([(0 - MEAN[0]) / STD[0], (1 - MEAN[1]) / STD[1], (0.2 - MEAN[2]) / STD[2]])
    assert torch.allclose(out.view(3), expect, atol=1e-6)
    # tuples accepted too
    assert torch.equal(normalize(x, MEAN, STD), out)


def test_sample_params_distribution():
    aug = BatchAugment(MEAN, STD, crop_padding=4, hflip=True, device="cpu")
    n = 20000
    dy, dx, flip = aug.sample_params(n, torch.Generator().manual_seed(123))
    assert dy.shape == dx.shape == flip.shape == (n,)
    assert flip.dtype == torch.bool
    for off in (dy, dx):
        assert int(off.min()) == 0 and int(off.max()) == 8
        counts = torch.bincount(off, minlength=9)
        assert len(counts) == 9
        for cnt in counts.tolist():
            assert _within(cnt, n, 1 / 9), counts
    assert _within(int(flip.sum()), n, 0.5)
    # independence of dy and dx: joint cells uniform on 81 values (chi-square, df = 80)
    joint = torch.bincount(dy * 9 + dx, minlength=81).double()
    chi2 = ((joint - n / 81) ** 2 / (n / 81)).sum().item()
    assert chi2 < 80 + 5 * math.sqrt(2 * 80)
    # dy and dx are not the same draw
    assert not torch.equal(dy, dx)


def test_sample_params_no_flip_no_pad():
    aug = BatchAugment(MEAN, STD, crop_padding=0, hflip=False, device="cpu")
    dy, dx, flip = aug.sample_params(1000, torch.Generator().manual_seed(0))
    assert not dy.any() and not dx.any() and not flip.any()
    aug = BatchAugment(MEAN, STD, crop_padding=1, hflip=False, device="cpu")
    dy, dx, flip = aug.sample_params(1000, torch.Generator().manual_seed(0))
    assert not flip.any() and set(dy.tolist()) == {0, 1, 2} and set(dx.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("c, h, w, p", [(3, 32, 32, 4), (1, 8, 8, 1), (2, 6, 9, 2)])
def test_apply_matches_reference_loop(c, h, w, p):
    aug = BatchAugment(MEAN[:c], STD[:c], crop_padding=p, hflip=True, device="cpu")
    x = _images(64, c, h, w, seed=1)
    dy, dx, flip = aug.sample_params(64, torch.Generator().manual_seed(7))
    assert flip.any() and not flip.all()
    out = aug.apply(x, dy, dx, flip)
    assert out.dtype == torch.float32 and out.shape == (64, c, h, w)
    assert torch.equal(out, _reference(aug, x, dy, dx, flip))


def test_call_uses_sample_params_then_apply():
    aug = BatchAugment(MEAN, STD, crop_padding=4, hflip=True, device="cpu")
    x = _images(32)
    out = aug(x, torch.Generator().manual_seed(5))
    dy, dx, flip = aug.sample_params(32, torch.Generator().manual_seed(5))
    assert torch.equal(out, _reference(aug, x, dy, dx, flip))
    assert torch.equal(out, aug(x, torch.Generator().manual_seed(5)))  # reproducible
    assert not torch.equal(out, aug(x, torch.Generator().manual_seed(6)))
    # global RNG path
    torch.manual_seed(11)
    a = aug(x)
    torch.manual_seed(11)
    assert torch.equal(a, aug(x))


def test_no_pad_no_flip_is_normalize():
    mean, std = _stats()
    aug = BatchAugment(MEAN, STD, crop_padding=0, hflip=False, device="cpu")
    x = _images(16)
    assert torch.equal(aug(x, torch.Generator().manual_seed(0)), normalize(x, mean, std))
    assert torch.equal(aug.eval(x), normalize(x, mean, std))


def test_zero_padded_border():
    mean, std = _stats()
    aug = BatchAugment(MEAN, STD, crop_padding=4, hflip=True, device="cpu")
    x = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    zero = torch.zeros(2, dtype=torch.long)
    out = aug.apply(x, zero, zero, torch.zeros(2, dtype=torch.bool))
    pad_value = ((0 - mean) / std).view(3)
    for i in range(2):
        assert torch.equal(out[i, :, 0, 0], pad_value)
        assert torch.equal(out[i, :, :4, :].amax(dim=(1, 2)), pad_value)  # top 4 rows padded
        assert torch.equal(out[i, :, :, :4].amax(dim=(1, 2)), pad_value)  # left 4 columns padded
    assert torch.equal(out[:, :, 4:, 4:], normalize(x[:, :, :28, :28], mean, std))
    # dy = dx = 8: padding on the bottom/right; with a flip it moves to the left
    eight = torch.full((2,), 8, dtype=torch.long)
    out = aug.apply(x, eight, eight, torch.tensor([False, True]))
    assert torch.equal(out[0, :, 31, 31], pad_value) and torch.equal(out[0, :, 0, 0], out[0, :, 27, 27])
    assert torch.equal(out[1, :, 31, 0], pad_value) and not torch.equal(out[1, :, 0, 31], pad_value)


def test_apply_rejects_bad_offsets_and_dtype():
    aug = BatchAugment(MEAN, STD, crop_padding=2, hflip=True, device="cpu")
    x = _images(2)
    with pytest.raises(ValueError):
        aug.apply(x, torch.tensor([0, 5]), torch.tensor([0, 0]), torch.tensor([False, False]))
    with pytest.raises(ValueError):
        aug(x.float())


def test_packed_params_are_the_same_draws_in_the_same_order():
    """The training loop draws (dy, dx, flip) on a CPU generator as one (3, n) tensor and copies
    it to the device once: the same numbers as three separate draws, in that order."""
    from utils.data.augment import params_to
    aug = BatchAugment(MEAN, STD, crop_padding=4, hflip=True, device="cpu")
    packed = aug.draw_params(50, torch.Generator().manual_seed(9))
    assert packed.shape == (3, 50) and packed.dtype == torch.int64
    g = torch.Generator().manual_seed(9)
    dy, dx = torch.randint(0, 9, (50,), generator=g), torch.randint(0, 9, (50,), generator=g)
    flip = torch.rand(50, generator=g) < 0.5
    got = params_to(packed, torch.device("cpu"))
    assert torch.equal(got[0], dy) and torch.equal(got[1], dx) and torch.equal(got[2], flip)
    assert got[2].dtype == torch.bool


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_images_with_a_cpu_generator_augment_like_the_cpu():
    """One seed, CPU or CUDA: the same crops and flips (the generator is a CPU one)."""
    aug = BatchAugment(MEAN, STD, crop_padding=4, hflip=True, device="cuda")
    x = _images(128)
    out = aug(x.cuda(), torch.Generator().manual_seed(3))
    assert out.device.type == "cuda"
    ref = BatchAugment(MEAN, STD, 4, True, "cpu")(x, torch.Generator().manual_seed(3))
    assert torch.allclose(out.cpu(), ref, atol=1e-6)


def test_training_call_distribution_recovered_from_images():
    """The images __call__ produces (the training path) are crops at offsets uniform on
    0..8 and flips Bernoulli(1/2), independent: read the offset and flip back from each
    output image, whose channels encode the source row and column (1..32, 0 = padding)."""
    n, h, w, p = 9000, 32, 32, 4
    aug = BatchAugment((0.0, 0.0), (1.0, 1.0), crop_padding=p, hflip=True, device="cpu")
    rows = torch.arange(1, h + 1, dtype=torch.uint8).view(h, 1).expand(h, w)
    cols = torch.arange(1, w + 1, dtype=torch.uint8).view(1, w).expand(h, w)
    x = torch.stack([rows, cols]).unsqueeze(0).expand(n, 2, h, w).contiguous()
    out = (aug(x, torch.Generator().manual_seed(21)) * 255).round().long()
    # output row/col 16 always lies inside the image: padded index = offset + 16 (or 15 when flipped)
    dy = out[:, 0, 16, 16] - 1 + p - 16
    flip = out[:, 1, 16, 17] < out[:, 1, 16, 16]
    dx = out[:, 1, 16, 16] - 1 + p - torch.where(flip, 15, 16)
    assert int(dy.min()) == 0 and int(dy.max()) == 2 * p and int(dx.min()) == 0 and int(dx.max()) == 2 * p
    # the recovered parameters reproduce every output image exactly
    assert torch.equal(aug.apply(x, dy, dx, flip), out.float() / 255)
    crit = 80 + 5 * math.sqrt(2 * 80)  # chi-square df = 80, mean + 5 sd
    joint = torch.bincount(dy * 9 + dx, minlength=81).double()
    assert ((joint - n / 81) ** 2 / (n / 81)).sum().item() < crit
    for off in (dy, dx):
        for cnt in torch.bincount(off, minlength=9).tolist():
            assert _within(cnt, n, 1 / 9)
    assert _within(int(flip.sum()), n, 0.5)
    # flips independent of the offsets: flip rate within each dy value stays 1/2
    for v in range(9):
        sel = dy == v
        assert _within(int(flip[sel].sum()), int(sel.sum()), 0.5)


def test_same_images_as_torchvision_randomcrop_flip():
    """torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize on PIL
    images (what the published code runs) gives, image for image, BatchAugment.apply at the offsets
    and flips read back from torchvision's output; and torchvision's offsets cover the same 0..8."""
    from PIL import Image
    from torchvision import transforms

    n, h, w, p = 600, 32, 32, 4
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    rows = torch.arange(1, h + 1, dtype=torch.uint8).view(h, 1).expand(h, w)
    cols = torch.arange(1, w + 1, dtype=torch.uint8).view(1, w).expand(h, w)
    img = torch.stack([rows, cols, (rows * 3 + cols) % 251]).contiguous()  # C x H x W
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    tv = transforms.Compose([transforms.RandomCrop(32, padding=p), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(mean, std)])
    torch.manual_seed(0)
    out = torch.stack([tv(pil) for _ in range(n)])
    raw = (out * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)) * 255
    raw = raw.round().long()
    dy = raw[:, 0, 16, 16] - 1 + p - 16
    flip = raw[:, 1, 16, 17] < raw[:, 1, 16, 16]
    dx = raw[:, 1, 16, 16] - 1 + p - torch.where(flip, 15, 16)
    aug = BatchAugment(mean, std, crop_padding=p, hflip=True, device="cpu")
    ours = aug.apply(img.unsqueeze(0).expand(n, 3, h, w).contiguous(), dy, dx, flip)
    assert torch.allclose(ours, out, atol=1e-5)
    assert set(dy.tolist()) == set(dx.tolist()) == set(range(2 * p + 1)) and 0 < int(flip.sum()) < n
