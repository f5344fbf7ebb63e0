"""Datasets for the trainer: scikit-learn's digits (the embedded default),
CIFAR-10/100 in their python-pickle format, and ImageFolder trees.

Every dataset yields ``(image, label)`` with ``image`` a normalised float32
``(C, H, W)`` tensor.  Augmentation is applied to whole batches by
:func:`augment` (in the training loop), so its randomness comes from one
generator the loop seeds per step and a resumed run draws the same crops.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HELD_OUT_FRACTION = 0.2  # test split of datasets that come without one (digits, single ImageFolder trees)
SPLIT_SEED = 0


class DatasetError(ValueError):
    """A dataset directory is missing, of an unknown layout, or malformed."""


@dataclass(frozen=True)
class Augmentation:
    """Random crop after zero-padding by ``crop_padding`` pixels (0: none) and
    random horizontal flip."""

    crop_padding: int = 0
    flip: bool = False

    def describe(self) -> str:
        parts = [f"random crop (padding {self.crop_padding})"] if self.crop_padding else []
        parts += ["horizontal flip"] if self.flip else []
        return ", ".join(parts) or "none"


@dataclass
class ImageData:
    """A train and a held-out test split of one classification dataset."""

    name: str  # "digits", "cifar10", "cifar100" or "imagefolder"
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    augmentation: Augmentation

    def limit(self, train_images: Optional[int], test_images: Optional[int]) -> "ImageData":
        """The same data restricted to the first ``train_images`` / ``test_images`` images."""
        def head(dataset: Dataset, n: Optional[int]) -> Dataset:
            if n is None or n >= len(dataset):
                return dataset
            return torch.utils.data.Subset(dataset, range(n))

        return ImageData(self.name, head(self.train, train_images), head(self.test, test_images), self.num_classes,
                         self.in_channels, self.augmentation)


def load_dataset(spec: str, image_size: Optional[int] = None) -> ImageData:
    """``spec``: ``"digits"`` or a directory holding CIFAR-10 (``data_batch_1..5``,
    ``test_batch``), CIFAR-100 (``train``, ``test``, ``meta``), or an ImageFolder
    tree.  ``image_size``: side in pixels that ImageFolder images are resized to."""
    if spec == "digits":
        return load_digits()
    if not os.path.exists(spec):
        raise DatasetError(f"dataset {spec!r} not found: give 'digits' or an existing directory")
    if not os.path.isdir(spec):
        raise DatasetError(f"dataset {spec!r} is a file; give a directory (CIFAR-10/100 python-pickle or ImageFolder)")
    for root in (spec, os.path.join(spec, "cifar-10-batches-py"), os.path.join(spec, "cifar-100-python")):
        if os.path.exists(os.path.join(root, "data_batch_1")) or os.path.exists(os.path.join(root, "test_batch")):
            return load_cifar10(root)
        if os.path.exists(os.path.join(root, "meta")) and os.path.exists(os.path.join(root, "train")) \
                and os.path.isfile(os.path.join(root, "train")):
            return load_cifar100(root)
    return load_image_folder(spec, image_size or 32)


# -- in-memory datasets --------------------------------------------------------------------
def _normalised_splits(train_x: np.ndarray, train_y, test_x: np.ndarray, test_y) -> tuple[TensorDataset, TensorDataset]:
    """TensorDatasets of ``(N, C, H, W)`` images normalised per channel by the
    training split's mean and standard deviation."""
    train = torch.as_tensor(train_x, dtype=torch.float32)
    test = torch.as_tensor(test_x, dtype=torch.float32)
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (TensorDataset((train - mean) / std, torch.as_tensor(np.asarray(train_y), dtype=torch.long)),
            TensorDataset((test - mean) / std, torch.as_tensor(np.asarray(test_y), dtype=torch.long)))


def load_digits() -> ImageData:
    """scikit-learn's handwritten digits: 1797 8x8 grey images, 10 classes, with a
    fixed stratified 20% test split (1437 train, 360 test).  Augmentation: a
    1-pixel random shift (no flips: a mirrored digit is another symbol)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = digits.images[:, None].astype(np.float32) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target, test_size=HELD_OUT_FRACTION, stratify=digits.target, random_state=SPLIT_SEED)
    train, test = _normalised_splits(train_x, train_y, test_x, test_y)
    return ImageData("digits", train, test, 10, 1, Augmentation(crop_padding=1, flip=False))


def _read_pickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise DatasetError(f"{path} is missing")
    try:
        with open(path, "rb") as f:
            content = pickle.load(f, encoding="bytes")
    except Exception as exc:
        raise DatasetError(f"{path} is not a readable python pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(content, dict):
        raise DatasetError(f"{path} holds a {type(content).__name__}, expected a dict with b'data' and labels")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in content.items()}


def _cifar_batch(path: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` of one CIFAR pickle file."""
    batch = _read_pickle(path)
    if "data" not in batch or label_key not in batch:
        raise DatasetError(f"{path} lacks b'data' or b'{label_key}' (keys: {sorted(batch)})")
    data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise DatasetError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DatasetError(f"{path}: {data.shape[0]} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{path}: labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar(name: str, root: str, train_files: Sequence[str], label_key: str, num_classes: int) -> ImageData:
    """CIFAR augmentation: random crop with 4-pixel padding and horizontal flip."""
    parts = [_cifar_batch(os.path.join(root, f), label_key, num_classes) for f in train_files]
    test_x, test_y = _cifar_batch(os.path.join(root, "test_batch" if name == "cifar10" else "test"), label_key,
                                  num_classes)
    train_x, train_y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    train, test = _normalised_splits(train_x / np.float32(255), train_y, test_x / np.float32(255), test_y)
    return ImageData(name, train, test, num_classes, 3, Augmentation(crop_padding=4, flip=True))


def load_cifar10(root: str) -> ImageData:
    """CIFAR-10 python version: ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``."""
    return _cifar("cifar10", root, [f"data_batch_{i}" for i in range(1, 6)], "labels", 10)


def load_cifar100(root: str) -> ImageData:
    """CIFAR-100 python version: ``train``, ``test`` and ``meta``; the 100 fine labels."""
    return _cifar("cifar100", root, ["train"], "fine_labels", 100)


# -- ImageFolder ---------------------------------------------------------------------------
class ImageFolder(Dataset):
    """Images of ``samples`` (path, label) decoded with PIL, converted to RGB,
    resized (shorter side to ``size``, then centre-cropped to ``size x size``)
    and normalised with the ImageNet mean and standard deviation."""

    def __init__(self, samples: list[tuple[str, int]], size: int) -> None:
        self.samples, self.size = samples, size
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except Exception as exc:
            raise DatasetError(f"cannot read image {path} ({type(exc).__name__}: {exc})") from exc
        scale = self.size / min(image.size)
        w, h = max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))
        image = image.resize((w, h), Image.BILINEAR)
        left, top = (w - self.size) // 2, (h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
        return (pixels - self.mean) / self.std, label


def _class_tree(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted subdirectory names) and (path, label) of every image under them."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    samples = []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
            samples += [(os.path.join(dirpath, f), label) for f in sorted(files)
                        if f.lower().endswith(IMAGE_EXTENSIONS)]
    return classes, samples


def load_image_folder(root: str, size: int) -> ImageData:
    """An ImageFolder tree: ``root/train/<class>/*`` with ``root/val/<class>/*``
    (or ``test``), or ``root/<class>/*`` alone, of which a fixed stratified 20%
    is held out.  Augmentation: random crop with ``size/8`` padding and flip."""
    test_dir = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
    expected = ("expected CIFAR-10 (data_batch_1..5, test_batch), CIFAR-100 (train, test, meta) or an ImageFolder "
                "tree (one subdirectory of images per class, optionally under train/ and val/)")
    if os.path.isdir(os.path.join(root, "train")) and test_dir is not None:
        classes, train = _class_tree(os.path.join(root, "train"))
        test_classes, test = _class_tree(test_dir)
        if test_classes != classes:
            raise DatasetError(f"{test_dir} has classes {test_classes}, but {root}/train has {classes}")
    else:
        classes, samples = _class_tree(root)
        if len(classes) < 2 or not samples:
            raise DatasetError(f"{root} is not a dataset directory: {expected}; found {len(classes)} class "
                               f"folder(s) with {len(samples)} image(s)")
        from sklearn.model_selection import train_test_split

        labels = [label for _, label in samples]
        try:
            train, test = train_test_split(samples, test_size=HELD_OUT_FRACTION, stratify=labels,
                                           random_state=SPLIT_SEED)
        except ValueError as exc:
            raise DatasetError(f"{root}: too few images per class to hold out a stratified test split ({exc})") \
                from exc
    if len(classes) < 2 or not train or not test:
        raise DatasetError(f"{root} is not a dataset directory: {expected}; found {len(classes)} class folder(s), "
                           f"{len(train)} training and {len(test)} test image(s)")
    padding = max(1, size // 8)
    return ImageData("imagefolder", ImageFolder(train, size), ImageFolder(test, size), len(classes), 3,
                     Augmentation(crop_padding=padding, flip=True))


# -- sampling and augmentation -------------------------------------------------------------
class ShardedBatchSampler:
    """Batches of indices for one process: each epoch a fresh permutation drawn
    from ``(seed, epoch)`` alone (so a resumed run draws the same order), split
    round-robin over ``world_size`` processes.

    ``batch_size`` is per process.  In training (``drop_last``) every process
    gets the same number of full batches; in evaluation every image is visited
    exactly once overall.  ``set_epoch(epoch, skip)`` skips the first ``skip``
    batches (to resume in the middle of an epoch).
    """

    def __init__(self, size: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.size, self.batch_size, self.shuffle, self.drop_last = size, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _shard(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        return order[self.rank::self.world_size]

    def __len__(self) -> int:
        per_rank = self.size // self.world_size if self.drop_last else len(range(self.rank, self.size, self.world_size))
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self):
        shard = self._shard()
        for b in range(self.skip, len(self)):
            yield shard[b * self.batch_size:(b + 1) * self.batch_size]


def augment(images: Tensor, augmentation: Augmentation, generator: torch.Generator) -> Tensor:
    """Random crops (zero padding) and flips of a ``(N, C, H, W)`` batch, one draw per image."""
    n, _, h, w = images.shape
    p = augmentation.crop_padding
    if p:
        padded = F.pad(images, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=generator)
        rows = dy + torch.arange(h).view(1, h, 1)
        cols = dx + torch.arange(w).view(1, 1, w)
        images = padded[torch.arange(n).view(n, 1, 1), :, rows, cols].permute(0, 3, 1, 2)  # (N,H,W,C) -> NCHW
    if augmentation.flip:
        flip = torch.rand(n, generator=generator) < 0.5
        images = torch.where(flip.view(n, 1, 1, 1), images.flip(3), images)
    return images.contiguous()
