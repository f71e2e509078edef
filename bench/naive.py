"""Pipeline B: a reference that trains the way the published implementations do.

Every image goes uint8 -> PIL -> torchvision RandomCrop(32, padding=4) ->
RandomHorizontalFlip -> ToTensor -> Normalize inside DataLoader worker
processes (4 by default, new ones every epoch, as a non-persistent DataLoader
does); the model runs in fp32 eager mode; every step reads the loss back with
``.item()`` and copies predictions and penultimate features to the host
(the published loop collects both on every step for its per-epoch FDR and
confusion matrix).  Evaluation runs at the training batch size under
``torch.no_grad``, with the same per-batch host copies.

The network, the objective and the SGD update are the project's own, so
the difference A/B measures is the pipeline around them, not the model.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


class PILImages(Dataset):
    """uint8 N x H x W x C images served one at a time as PIL images through ``transform``."""

    def __init__(self, images_nhwc: np.ndarray, labels: np.ndarray, transform):
        self.images = images_nhwc
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def train_transform(mean, std, size: int = 32, padding: int = 4):
    return transforms.Compose([transforms.RandomCrop(size, padding=padding), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(mean, std)])


def eval_transform(mean, std):
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


def make_loader(images_nchw: torch.Tensor, labels: torch.Tensor, transform, batch_size: int, workers: int,
                shuffle: bool) -> DataLoader:
    nhwc = images_nchw.permute(0, 2, 3, 1).contiguous().numpy()
    return DataLoader(PILImages(nhwc, labels.numpy(), transform), batch_size=batch_size, shuffle=shuffle,
                      num_workers=workers)


class NaiveTrainer:
    """Training and evaluation passes of pipeline B, with the published loop's host syncs."""

    def __init__(self, model, objective, optimizer, device: torch.device, n_classes: int):
        self.model, self.objective, self.optimizer = model, objective, optimizer
        self.device, self.n_classes = device, n_classes

    def train_steps(self, batches, steps: int | None) -> tuple[int, float]:
        """Run ``steps`` steps (None = until the iterator ends); returns (images, first-batch wait s)."""
        self.model.train()
        confusion = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)
        loss_sum, seen, feats, first_wait = 0.0, 0, [], 0.0
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(batches):
            if step == 0:
                first_wait = time.perf_counter() - t0
            x, y = x.to(self.device), y.to(self.device)
            h = self.model.features(x)
            logits = self.model.classify(h)
            loss = sum(self.objective(logits, y, h).values())
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.item() * len(y)                       # host sync every step
            pred = logits.argmax(dim=1).cpu().numpy()               # and copies to the host
            np.add.at(confusion, (y.cpu().numpy(), pred), 1)
            feats.append(h.detach().cpu())
            seen += len(y)
            if steps is not None and step + 1 >= steps:
                break
        return seen, first_wait

    def evaluate(self, loader) -> int:
        self.model.eval()
        confusion = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)
        seen, feats = 0, []
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(self.device), y.to(self.device)
                h = self.model.features(x)
                logits = self.model.classify(h)
                _ = torch.nn.functional.cross_entropy(logits, y).item()
                np.add.at(confusion, (y.cpu().numpy(), logits.argmax(dim=1).cpu().numpy()), 1)
                feats.append(h.cpu())
                seen += len(y)
        self.model.train()
        return seen
