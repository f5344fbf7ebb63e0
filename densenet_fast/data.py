"""Datasets for the trainer: scikit-learn's digits (the embedded default),
CIFAR-10/100 in their python-pickle format, and ImageFolder trees; for 3-D
volumes a folder of ``.npy`` (and NIfTI, through nibabel) volumes listed in a
``labels.csv``, MedMNIST-3D ``.npz`` files, and ``synthetic3d`` (generated).

Every dataset yields ``(image, label)`` with ``image`` a normalised float32
``(C, H, W)`` tensor, or ``(C, D, H, W)`` for volumes.  Augmentation is applied to whole batches by
:func:`augment` (in the training loop), so its randomness comes from one
generator the loop seeds per step and a resumed run draws the same crops.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import pickle
import re
import zipfile
import zlib
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from .memory import available_memory_bytes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VOLUME_EXTENSIONS = (".npy", ".nii", ".nii.gz")
LABELS_FILE = "labels.csv"  # the label of each volume of a volume folder (file,label[,split])
SYNTHETIC_3D = "synthetic3d"
SYNTHETIC_3D_SIZE = (16, 16, 16)
SYNTHETIC_3D_CLASSES = ("ball", "cube", "shell")
# MedMNIST's 3-D datasets; found as <name>.npz or <name>_64.npz in $MEDMNIST_ROOT or ~/.medmnist (never downloaded)
MEDMNIST_3D = ("organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d", "vesselmnist3d",
               "synapsemnist3d")
HELD_OUT_FRACTION = 0.2  # test split of datasets that come without one (digits, single ImageFolder trees)
SPLIT_SEED = 0


class DatasetError(ValueError):
    """A dataset directory is missing, of an unknown layout, or malformed."""


AS_FLOAT32 = "as float32 (values beyond +-3.4e38 overflow to infinity)"  # where samples are checked after conversion


def refuse_untrained_classes(where: str, train_labels: Sequence, test_labels: Sequence) -> None:
    """Raise where a test label is none of the training labels: a class the
    model could never learn, held against its test accuracy."""
    untrained = sorted(set(test_labels) - set(train_labels))
    if untrained:
        raise DatasetError(f"{where}: the test split has the class(es) {', '.join(map(str, untrained))}, which no "
                           f"training sample has; move some of them into the training split")


@dataclass(frozen=True)
class Augmentation:
    """Random crop after zero-padding by ``crop_padding`` pixels (0: none) and
    random horizontal flip (along the last axis; volumes too)."""

    crop_padding: int = 0
    flip: bool = False

    def describe(self) -> str:
        parts = [f"random crop (padding {self.crop_padding})"] if self.crop_padding else []
        parts += ["horizontal flip"] if self.flip else []
        return ", ".join(parts) or "none"


@dataclass
class ImageData:
    """A train and a held-out test split of one classification dataset."""

    name: str  # "digits", "cifar10", "cifar100", "imagefolder", "synthetic3d", "volumefolder" or a MedMNIST name
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    augmentation: Augmentation
    spatial_dims: int = 2  # 3 for volumes
    size: Optional[tuple[int, ...]] = None  # spatial size of every sample, where all share one

    @property
    def unit(self) -> str:
        """What one sample is called in messages."""
        return "volumes" if self.spatial_dims == 3 else "images"

    def limit(self, train_images: Optional[int], test_images: Optional[int]) -> "ImageData":
        """The same data restricted to ``train_images`` / ``test_images`` samples of
        each split (:func:`stratified_subset`; the first ones of a folder sorted by
        class would be one class)."""
        def subset(dataset: Dataset, n: Optional[int]) -> Dataset:
            if n is None or n >= len(dataset):
                return dataset
            labels = dataset.tensors[1].tolist() if isinstance(dataset, TensorDataset) else \
                [label for _, label in dataset.samples]
            return torch.utils.data.Subset(dataset, stratified_subset(labels, n))

        return replace(self, train=subset(self.train, train_images), test=subset(self.test, test_images))

    def fingerprint(self) -> str:
        """A digest of which samples the data holds, not of where it lies: per
        split the labels, and the shape of the samples held in memory or the
        names (relative to the folder that holds them all) and sizes in bytes
        of the files samples are read from.  Contents are not read: a moved
        dataset keeps its fingerprint; added, removed, renamed, resized or
        relabelled samples change it, other contents of the same files do not.
        Of the data as loaded: the same after :meth:`limit`."""
        return self.fingerprints()[0]

    def fingerprints(self, unsized: Sequence[str] = (), sizes: Optional[tuple] = None) -> tuple[str, str]:
        """:meth:`fingerprint`, and the same of the training split alone; both
        without the sizes of the training samples named ``unsized`` (names as
        :meth:`train_sample_names` gives them: samples that could not be read,
        whose repair may change their size); of the files' ``sizes`` as
        :meth:`file_sizes` read them earlier, or as they are now."""
        sizes = self.file_sizes() if sizes is None else sizes
        train = self._split_record(self.train, set(unsized), sizes[0])
        test = self._split_record(self.test, set(), sizes[1])
        return hashlib.sha256(train + test).hexdigest()[:16], hashlib.sha256(train).hexdigest()[:16]

    def file_sizes(self) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """The sizes in bytes of the files of each split's samples, in their order
        (of the data as loaded; ``None`` for a split held in memory)."""
        return _file_sizes(self.train), _file_sizes(self.test)

    def train_sample_names(self, indices: Sequence[int]) -> list[str]:
        """The names the fingerprint gives the training samples at ``indices`` of
        :attr:`train` (paths relative to the folder that holds the split's
        files); none for samples held in memory."""
        split, indices = whole_split(self.train, indices)
        if isinstance(split, TensorDataset):
            return []
        return [_sample_names(split)[index] for index in indices]

    @staticmethod
    def _split_record(split: Dataset, unsized: set[str], sizes: Optional[np.ndarray]) -> bytes:
        """What :meth:`fingerprints` digests of one split, its files of ``sizes``."""
        split, _ = whole_split(split, [])
        if isinstance(split, TensorDataset):  # (samples, labels): their values after normalisation may differ
            samples, labels = split.tensors  # in the last bits from machine to machine, so not hashed
            return repr((tuple(samples.shape), labels.tolist())).encode()
        files = [(name, None if name in unsized else int(size), label)
                 for name, size, (_, label) in zip(_sample_names(split), sizes, split.samples)]
        return repr(files).encode()


def whole_split(split: Dataset, indices: Sequence[int]) -> tuple[Dataset, list[int]]:
    """The split that :meth:`ImageData.limit`'s subset ``split`` was drawn from
    (``split`` itself if it is none), and ``indices`` of ``split`` as indices of it."""
    indices = list(indices)
    while isinstance(split, torch.utils.data.Subset):
        indices = [split.indices[index] for index in indices]
        split = split.dataset
    return split, indices


def _file_sizes(split: Dataset) -> Optional[np.ndarray]:
    """:meth:`ImageData.file_sizes` of one split."""
    split, _ = whole_split(split, [])
    if isinstance(split, TensorDataset):
        return None
    try:
        return np.array([os.path.getsize(path) for path, _ in split.samples], dtype=np.int64)
    except OSError as exc:
        raise DatasetError(f"cannot read {exc.filename} ({exc.strerror})") from None


def _sample_names(split: Dataset) -> list[str]:
    """The paths of the files of ``split.samples`` relative to the folder that holds them all."""
    common = os.path.commonpath([os.path.dirname(path) for path, _ in split.samples]) if split.samples else ""
    return [os.path.relpath(path, common) for path, _ in split.samples]


def stratified_subset(labels: Sequence[int], n: int) -> list[int]:
    """Indices of ``n`` of the samples of ``labels``, each class's share of them
    as near its share of all as ``n`` allows, drawn at random with a fixed seed
    (the same every run), in their order."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    sizes, ranks = {}, {}
    for index in order:  # each sample's place among its class's, in the drawn order
        ranks[index] = sizes.get(labels[index], 0)
        sizes[labels[index]] = ranks[index] + 1
    spread = sorted(order, key=lambda index: (ranks[index] + 0.5) / sizes[labels[index]])
    return sorted(spread[:n])


def load_dataset(spec: str, image_size: Optional[int] = None,
                 volume_size: Optional[Sequence[int]] = None) -> ImageData:
    """``spec``: ``"digits"``, ``"synthetic3d"``, a MedMNIST-3D ``.npz`` file (or
    the name of one in ``$MEDMNIST_ROOT`` or ``~/.medmnist``), or a directory
    holding CIFAR-10 (``data_batch_1..5``, ``test_batch``), CIFAR-100 (``train``,
    ``test``, ``meta``), volumes listed in a ``labels.csv``, or an ImageFolder
    tree.  ``image_size``: side in pixels that ImageFolder images are resized to;
    ``volume_size``: ``(D, H, W)`` (or one side) that volumes are resized to
    (default: volumes must share one size).  A size for samples that are not
    resized (digits and CIFAR: both; volumes: an image size) is refused."""
    size = _volume_size(volume_size)
    if spec == "digits":
        _refuse_resizing(spec, image_size, size)
        return load_digits()
    if spec == SYNTHETIC_3D:
        _refuse_resizing(spec, image_size, None)
        return load_synthetic3d(size or SYNTHETIC_3D_SIZE)
    medmnist = _medmnist_file(spec)
    if medmnist is not None:
        _refuse_resizing(spec, image_size, None)
        return load_medmnist3d(medmnist, size)
    if not os.path.exists(spec):
        raise DatasetError(f"dataset {spec!r} not found: give 'digits', '{SYNTHETIC_3D}', a MedMNIST-3D .npz file or "
                           f"an existing directory")
    if not os.path.isdir(spec):
        raise DatasetError(f"dataset {spec!r} is a file; give a directory (CIFAR-10/100 python-pickle, ImageFolder, "
                           f"or volumes with a {LABELS_FILE}) or a MedMNIST-3D .npz file")
    if os.path.isfile(os.path.join(spec, LABELS_FILE)):
        _refuse_resizing(spec, image_size, None)
        return load_volume_folder(spec, size)
    for root in (spec, os.path.join(spec, "cifar-10-batches-py"), os.path.join(spec, "cifar-100-python")):
        if os.path.exists(os.path.join(root, "data_batch_1")) or os.path.exists(os.path.join(root, "test_batch")):
            _refuse_resizing(spec, image_size, size)
            return load_cifar10(root)
        if os.path.exists(os.path.join(root, "meta")) and os.path.exists(os.path.join(root, "train")) \
                and os.path.isfile(os.path.join(root, "train")):
            _refuse_resizing(spec, image_size, size)
            return load_cifar100(root)
    volumes = _volume_files(spec)
    if volumes:
        raise DatasetError(f"{spec} holds {len(volumes)} volume file(s) ({os.path.relpath(volumes[0], spec)}, ...) "
                           f"but no {LABELS_FILE}: add one with the columns file,label (and optionally split: "
                           f"train or test) naming every volume")
    _refuse_resizing(spec, None, size)
    return load_image_folder(spec, image_size or 32)


def _refuse_resizing(spec: str, image_size: Optional[int], volume_size: Optional[tuple[int, ...]]) -> None:
    """Raise where a size is given that ``spec``'s samples are not resized to
    (it was ignored)."""
    given = [option for option, value in (("--image-size", image_size), ("--volume-size", volume_size))
             if value is not None]
    if given:
        raise DatasetError(f"dataset {spec!r} is not resized to {' or '.join(given)}: --image-size resizes "
                           f"ImageFolder images, --volume-size volumes; leave it out")


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
    return ImageData("digits", train, test, 10, 1, Augmentation(crop_padding=1, flip=False), size=images.shape[2:])


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
    if not labels.size:
        raise DatasetError(f"{path} holds no images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: labels must be class indices 0, 1, ... (got {labels.dtype})")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DatasetError(f"{path}: labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar(name: str, root: str, train_files: Sequence[str], label_key: str, num_classes: int) -> ImageData:
    """CIFAR augmentation: random crop with 4-pixel padding and horizontal flip."""
    parts = [_cifar_batch(os.path.join(root, f), label_key, num_classes) for f in train_files]
    test_x, test_y = _cifar_batch(os.path.join(root, "test_batch" if name == "cifar10" else "test"), label_key,
                                  num_classes)
    train_x, train_y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    refuse_untrained_classes(root, train_y.tolist(), test_y.tolist())
    train, test = _normalised_splits(train_x / np.float32(255), train_y, test_x / np.float32(255), test_y)
    return ImageData(name, train, test, num_classes, 3, Augmentation(crop_padding=4, flip=True),
                     size=tuple(train_x.shape[2:]))


def load_cifar10(root: str) -> ImageData:
    """CIFAR-10 python version: ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``."""
    return _cifar("cifar10", root, [f"data_batch_{i}" for i in range(1, 6)], "labels", 10)


def load_cifar100(root: str) -> ImageData:
    """CIFAR-100 python version: ``train``, ``test`` and ``meta``; the 100 fine labels."""
    return _cifar("cifar100", root, ["train"], "fine_labels", 100)


# -- ImageFolder ---------------------------------------------------------------------------
WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I")  # PIL's modes of 16-bit (and 32-bit) integer images


class ImageFolder(Dataset):
    """Images of ``samples`` (path, label) decoded with PIL, converted to RGB,
    resized (shorter side to ``size``, then centre-cropped to ``size x size``)
    and normalised with the ImageNet mean and standard deviation.  Images of
    16-bit integers (microscopy, medical PNGs and TIFFs) are scaled by 1/65535
    and floating-point ones taken as they are, in every channel, where PIL's
    conversion to RGB would clip them to 255 (or 0)."""

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
                if image.mode in WIDE_INTEGER_MODES:
                    image = Image.fromarray(np.asarray(image, dtype=np.float32) / 65535)
                else:
                    image = image.convert("F" if image.mode == "F" else "RGB")
        except Exception as exc:
            raise DatasetError(f"cannot read image {path} ({type(exc).__name__}: {exc})") from exc
        scale = self.size / min(image.size)
        w, h = max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))
        image = image.resize((w, h), Image.BILINEAR)
        left, top = (w - self.size) // 2, (h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        values = np.asarray(image, dtype=np.float32)
        pixels = torch.from_numpy(values / 255).permute(2, 0, 1) if image.mode == "RGB" else \
            torch.from_numpy(values.copy()).expand(3, -1, -1)  # (one value per pixel, in [0, 1] for integers)
        return (pixels - self.mean) / self.std, label


def _image_files(folder: str) -> list[str]:
    """The image files under ``folder`` at any depth, sorted: as torchvision's
    ImageFolder finds them (following links to folders), but each folder once
    (by its first name in sorted order) and no hidden files or folders
    (macOS's ``._name.png``: not images)."""
    walked, seen = [], {os.path.realpath(folder)}
    for dirpath, dirs, files in os.walk(folder, followlinks=True):
        walked.append((dirpath, files))
        kept = []
        for name in sorted(dirs):  # (not the listing's order: which name a folder is seen under is the data's)
            real = os.path.realpath(os.path.join(dirpath, name))
            if not name.startswith(".") and real not in seen:  # (a link to a folder above would never end)
                seen.add(real)
                kept.append(name)
        dirs[:] = kept
    return [os.path.join(dirpath, f) for dirpath, files in sorted(walked) for f in sorted(files)
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]


def _class_tree(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted subdirectory names) and (path, label) of every image under them."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    samples = [(path, label) for label, name in enumerate(classes) for path in _image_files(os.path.join(root, name))]
    return classes, samples


def _refuse_empty_classes(folder: str, classes: list[str], samples: list[tuple[str, int]]) -> None:
    """Raise where a class folder of ``folder`` holds no image (as torchvision's
    ImageFolder does): a class that is never trained."""
    empty = sorted(set(classes) - {classes[label] for _, label in samples})
    if empty:
        raise DatasetError(f"{folder}: no image ({', '.join(IMAGE_EXTENSIONS)}) in the class folder(s) "
                           f"{', '.join(empty)}; remove them or add images")


SPLIT_FOLDERS = {"train": ("train",), "test": ("val", "validation", "valid", "test")}  # of ImageFolder trees


def _holds_class_folders(folder: str) -> bool:
    """Whether ``folder`` holds folders and no image: a split's folder, not a class's."""
    entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    return any(e.is_dir() for e in entries) and not any(e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries)


def load_image_folder(root: str, size: int) -> ImageData:
    """An ImageFolder tree: ``root/train/<class>/*`` with ``root/val/<class>/*``
    (or ``validation``, ``valid``, ``test``), or ``root/<class>/*`` alone, of
    which a fixed stratified 20% is held out.  Every class folder of the
    training images must hold an image.  Augmentation: random crop with
    ``size/8`` padding and flip."""
    folders = {e.name.lower(): e.name for e in sorted(os.scandir(root), key=lambda e: e.name) if e.is_dir()}
    train_dir = os.path.join(root, folders["train"]) if "train" in folders else None
    test_dir = next((os.path.join(root, folders[d]) for d in SPLIT_FOLDERS["test"] if d in folders), None)
    expected = ("expected CIFAR-10 (data_batch_1..5, test_batch), CIFAR-100 (train, test, meta) or an ImageFolder "
                f"tree (one subdirectory of images per class, optionally under train/ and one of "
                f"{', '.join(SPLIT_FOLDERS['test'])}/)")
    if train_dir is not None and test_dir is not None:
        classes, train = _class_tree(train_dir)
        _refuse_empty_classes(train_dir, classes, train)
        test_classes, test = _class_tree(test_dir)
        if test_classes != classes:
            raise DatasetError(f"{test_dir} has classes {test_classes}, but {train_dir} has {classes}")
    else:
        classes, samples = _class_tree(root)
        splits = [name for name in classes if name.lower() in SPLIT_FOLDERS["train"] + SPLIT_FOLDERS["test"]
                  and _holds_class_folders(os.path.join(root, name))]
        if splits:
            raise DatasetError(f"{root} has the folder(s) {', '.join(splits)}, which would be classes: {expected}")
        if len(classes) < 2 or not samples:
            raise DatasetError(f"{root} is not a dataset directory: {expected}; found {len(classes)} class "
                               f"folder(s) with {len(samples)} image(s)")
        _refuse_empty_classes(root, classes, samples)
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
                     Augmentation(crop_padding=padding, flip=True), size=(size, size))


# -- volumes (3-D) -------------------------------------------------------------------------
def _volume_size(size: Optional[Sequence[int]]) -> Optional[tuple[int, int, int]]:
    """``(D, H, W)`` of ``--volume-size`` (one side stands for all three), or ``None``."""
    if size is None:
        return None
    size = tuple(int(s) for s in size)
    if len(size) == 1:
        size = size * 3
    if len(size) != 3 or min(size) < 1:
        raise DatasetError(f"a volume size is one side or three (D H W), each at least 1; got {size}")
    return size


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _resize(volumes: Tensor, size: Optional[tuple[int, ...]]) -> Tensor:
    """``(N, C, D, H, W)`` volumes resized to ``size`` (trilinear), or as they are."""
    if size is None or tuple(volumes.shape[2:]) == tuple(size):
        return volumes
    return F.interpolate(volumes, size=size, mode="trilinear", align_corners=False)


def memory_shortfall(what: str, nbytes: int) -> Optional[str]:
    """Why ``what``, ``nbytes`` of float32, would not fit in the memory this machine
    has available (to say so instead of being killed), or ``None``."""
    available = available_memory_bytes()
    if available is None or nbytes <= available:
        return None
    return (f"{what} take {nbytes / 2**30:.3g} GiB as float32, more than the {available / 2**30:.3g} GiB of memory "
            f"available; choose a smaller size")


def refuse_beyond_memory(what: str, nbytes: int) -> None:
    """A :class:`DatasetError` with :func:`memory_shortfall`'s reason, if any."""
    why = memory_shortfall(what, nbytes)
    if why is not None:
        raise DatasetError(why)


def _standardise_splits(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Both splits normalised per channel by the training split's mean and standard deviation."""
    dims = [0] + list(range(2, train.dim()))
    mean = train.mean(dim=dims, keepdim=True)
    std = train.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def _volume_augmentation(size: Sequence[int]) -> Augmentation:
    """Random shift by up to 1/8 of the smallest side; no flips (left and right are
    different organs in medical volumes)."""
    return Augmentation(crop_padding=max(1, min(size) // 8), flip=False)


def load_synthetic3d(size: tuple[int, int, int] = SYNTHETIC_3D_SIZE, train: int = 240, test: int = 60) -> ImageData:
    """A small generated 3-D dataset for smoke tests: one-channel volumes of
    ``size`` holding a ball, a cube or a hollow shell (3 classes, in turn) of
    random centre and radius in Gaussian noise; fixed (the same every call).
    Augmentation: random shift by 1 voxel and flips along the last axis."""
    if min(size) < 4:
        raise DatasetError(f"{SYNTHETIC_3D} volumes need at least 4 voxels per side, got {_shape_text(size)}")
    refuse_beyond_memory(f"{train + test} volumes of {_shape_text(size)} (their copies and coordinate grid)",
                         (2 * (train + test) + 6) * math.prod(size) * 4)
    rng = np.random.default_rng(SPLIT_SEED)
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in size), indexing="ij"))  # (3, D, H, W)
    sides = np.asarray(size, dtype=np.float32).reshape(3, 1, 1, 1)
    count = train + test
    labels = np.arange(count) % len(SYNTHETIC_3D_CLASSES)
    volumes = np.empty((count, 1, *size), dtype=np.float32)
    for i, label in enumerate(labels):
        radius = rng.uniform(0.2, 0.35) * float(min(size))
        centre = rng.uniform(radius, sides.ravel() - radius).astype(np.float32).reshape(3, 1, 1, 1)
        offset = np.abs(grid - centre) / radius
        if label == 0:
            shape = np.sqrt((offset ** 2).sum(0)) <= 1  # ball
        elif label == 1:
            shape = offset.max(0) <= 0.8  # cube (of about the ball's volume)
        else:
            distance = np.sqrt((offset ** 2).sum(0))
            shape = (distance <= 1) & (distance >= 0.6)  # hollow shell
        volumes[i, 0] = shape + rng.normal(0, 0.3, size).astype(np.float32)
    order = rng.permutation(count)
    volumes, labels = torch.from_numpy(volumes[order]), torch.from_numpy(labels[order])
    train_x, test_x = _standardise_splits(volumes[:train], volumes[train:])
    return ImageData(SYNTHETIC_3D, TensorDataset(train_x, labels[:train]), TensorDataset(test_x, labels[train:]),
                     len(SYNTHETIC_3D_CLASSES), 1, Augmentation(crop_padding=1, flip=True), spatial_dims=3,
                     size=tuple(size))


def _medmnist_file(spec: str) -> Optional[str]:
    """The MedMNIST-3D file that ``spec`` names: a path ending in ``.npz``, or a
    name such as ``organmnist3d`` or ``organmnist3d_64`` looked up in
    ``$MEDMNIST_ROOT`` (default ``~/.medmnist``, where the medmnist package puts
    them); ``None`` for other datasets.  Nothing is downloaded."""
    if spec.lower().endswith(".npz"):
        if not os.path.isfile(spec):
            raise DatasetError(f"MedMNIST file {spec} not found")
        return spec
    match = re.fullmatch(r"([a-z]+mnist3d)(?:_(28|64))?", spec.lower())
    if match is None or match.group(1) not in MEDMNIST_3D:
        return None
    root = os.environ.get("MEDMNIST_ROOT") or os.path.join(os.path.expanduser("~"), ".medmnist")
    path = os.path.join(root, f"{match.group(1)}{'' if match.group(2) in (None, '28') else '_64'}.npz")
    if not os.path.isfile(path):
        raise DatasetError(f"{spec}: {path} not found, and the trainer downloads nothing: fetch it once with the "
                           f"medmnist package (e.g. medmnist.{match.group(1).replace('mnist3d', '').capitalize()}"
                           f"MNIST3D(split='train', download=True)) or from MedMNIST's Zenodo record, then pass "
                           f"its path or set MEDMNIST_ROOT")
    return path


def load_medmnist3d(path: str, size: Optional[tuple[int, int, int]] = None) -> ImageData:
    """A MedMNIST-3D ``.npz`` file (``train_images`` ``(N, D, H, W)`` uint8,
    ``train_labels`` ``(N, 1)``, likewise ``test_*``; ``val_*`` is not used):
    the official train and test splits, in memory, scaled to [0, 1] and
    normalised by the training split's mean and standard deviation, resized to
    ``size`` if given.  Augmentation: random shift by 1/8 of a side, no flips."""
    keys = ("train_images", "train_labels", "test_images", "test_labels")
    if not zipfile.is_zipfile(path):
        raise DatasetError(f"{path} is not a readable .npz file (not a zip archive of arrays); expected a MedMNIST-3D "
                           f"file")
    try:
        with np.load(path, allow_pickle=False) as content:
            missing = [k for k in keys if k not in content.files]
            if missing:
                raise DatasetError(f"{path} lacks {', '.join(missing)} (it holds {', '.join(content.files) or 'nothing'}"
                                   f"); expected a MedMNIST-3D file")
            arrays = {k: content[k] for k in keys}
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path} is not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    splits = {}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        colour = images.ndim == 4 and images.shape[3] in (1, 3) and images.shape[3] < min(images.shape[1:3])
        if images.ndim != 4 or colour:  # 2-D MedMNIST: (N, H, W), or (N, H, W, 3) in colour
            kind = " (2-D images: a 2-D MedMNIST file)" if images.ndim == 3 or colour else ""
            raise DatasetError(f"{path}: {split}_images has shape {images.shape}{kind}; expected MedMNIST-3D volumes "
                               f"(N, D, H, W)")
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.shape != (len(images),):
            raise DatasetError(f"{path}: {len(images)} {split} volumes but {split}_labels has shape {labels.shape} "
                               f"(one class per volume expected; multi-label data is not supported)")
        if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
            raise DatasetError(f"{path}: {split}_labels must be class indices 0, 1, ... (got {labels.dtype})")
        if not np.issubdtype(images.dtype, np.number):
            raise DatasetError(f"{path}: {split}_images must be numbers, got {images.dtype}")
        scale = np.float32(255) if images.dtype == np.uint8 else np.float32(1)
        volumes = torch.from_numpy(images.astype(np.float32) / scale)[:, None]
        if size is not None:  # (with its standardised copy)
            refuse_beyond_memory(f"{len(volumes)} {split} volumes of {_shape_text(size)}",
                                 2 * len(volumes) * volumes.shape[1] * math.prod(size) * 4)
        splits[split] = (_resize(volumes, size), torch.from_numpy(labels.astype(np.int64)))
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    if train_x.shape[2:] != test_x.shape[2:]:
        raise DatasetError(f"{path}: train volumes are {_shape_text(train_x.shape[2:])} but test volumes "
                           f"{_shape_text(test_x.shape[2:])}")
    if not len(train_x) or not len(test_x):
        raise DatasetError(f"{path}: {len(train_x)} train and {len(test_x)} test volumes; both splits must be non-empty")
    if not (torch.isfinite(train_x).all() and torch.isfinite(test_x).all()):
        raise DatasetError(f"{path}: the volumes hold NaN or infinite values {AS_FLOAT32}")
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    if num_classes < 2:
        raise DatasetError(f"{path}: every label is 0; a classifier needs at least 2 classes")
    refuse_untrained_classes(path, train_y.tolist(), test_y.tolist())
    train_x, test_x = _standardise_splits(train_x, test_x)
    name = os.path.splitext(os.path.basename(path))[0]
    return ImageData(name, TensorDataset(train_x, train_y), TensorDataset(test_x, test_y), num_classes, 1,
                     _volume_augmentation(train_x.shape[2:]), spatial_dims=3, size=tuple(train_x.shape[2:]))


def _is_volume_file(name: str) -> bool:
    return name.lower().endswith(VOLUME_EXTENSIONS)


def _volume_files(root: str) -> list[str]:
    """Every volume file under ``root`` (any depth), sorted."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(files) if _is_volume_file(f) and not f.startswith(".")]
    return found


def _nibabel():
    try:
        import nibabel
    except ImportError as exc:
        raise DatasetError("reading NIfTI volumes (.nii, .nii.gz) needs nibabel: pip install nibabel (or convert "
                           "them to .npy)") from exc
    return nibabel


def volume_header(path: str) -> tuple[int, tuple[int, ...]]:
    """``(channels, spatial shape)`` of a volume file, read from its header: a
    ``.npy`` array ``(D, H, W)`` (one channel) or ``(C, D, H, W)``; a NIfTI image
    ``(X, Y, Z)`` or ``(X, Y, Z, C)`` (channels last, as NIfTI stores them)."""
    if path.lower().endswith(".npy"):
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DatasetError(f"cannot read volume {path} as a .npy array ({type(exc).__name__}: {exc})") from exc
        shape, dtype = array.shape, array.dtype
        layout = "(D, H, W) or (C, D, H, W)"
        channels_first = True
    else:
        try:
            image = _nibabel().load(path)
            shape, dtype = image.shape, image.get_data_dtype()
        except DatasetError:
            raise
        except Exception as exc:
            raise DatasetError(f"cannot read volume {path} as NIfTI ({type(exc).__name__}: {exc})") from exc
        layout = "(X, Y, Z) or (X, Y, Z, C)"
        channels_first = False
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_) or np.issubdtype(dtype, np.complexfloating):
        raise DatasetError(f"volume {path} holds {dtype}, not real numbers")
    if len(shape) not in (3, 4) or 0 in shape:
        raise DatasetError(f"volume {path} has shape {tuple(shape)}; expected {layout}")
    if len(shape) == 3:
        return 1, tuple(shape)
    return (shape[0], tuple(shape[1:])) if channels_first else (shape[3], tuple(shape[:3]))


def read_volume(path: str) -> np.ndarray:
    """A volume file as a float32 ``(C, D, H, W)`` array (see :func:`volume_header`)."""
    if path.lower().endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DatasetError(f"cannot read volume {path} ({type(exc).__name__}: {exc})") from exc
        array = array.astype(np.float32)
        return array[None] if array.ndim == 3 else array
    try:
        array = np.asarray(_nibabel().load(path).get_fdata(dtype=np.float32))
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"cannot read volume {path} as NIfTI ({type(exc).__name__}: {exc})") from exc
    return array[None] if array.ndim == 3 else np.moveaxis(array, 3, 0)


class VolumeFolder(Dataset):
    """Volumes of ``samples`` (path, label) read from their files, resized to
    ``size`` (trilinear) if given, and normalised per volume and channel to mean
    0 and standard deviation 1 (the intensities of CT and MRI scans differ from
    scan to scan).  Each file is checked again when read (a file may have
    changed since the dataset was loaded): real numbers, ``channels`` channels
    and, unless resized, the spatial ``shape`` (D, H, W) all volumes had
    (resized: ``None``)."""

    def __init__(self, samples: list[tuple[str, int]], size: Optional[tuple[int, int, int]], channels: int,
                 shape: Optional[tuple[int, int, int]]) -> None:
        self.samples, self.size, self.channels, self.shape = samples, size, channels, shape

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        channels, shape = volume_header(path)
        if self.size is None and (channels, shape) != (self.channels, self.shape):
            raise DatasetError(f"volume {path} now holds {channels} channel(s) of {_shape_text(shape)}, not "
                               f"{self.channels} of {_shape_text(self.shape)} as when the dataset was loaded")
        if channels != self.channels:  # (resized: the sizes may differ)
            raise DatasetError(f"volume {path} now holds {channels} channel(s), not {self.channels} as when the "
                               f"dataset was loaded")
        array = read_volume(path)
        if not np.isfinite(array).all():
            raise DatasetError(f"volume {path} holds NaN or infinite values {AS_FLOAT32}")
        volume = _resize(torch.from_numpy(np.ascontiguousarray(array))[None], self.size)[0]
        dims = tuple(range(1, volume.dim()))
        mean, std = volume.mean(dim=dims, keepdim=True), volume.std(dim=dims, keepdim=True)
        return (volume - mean) / std.clamp_min(1e-6), label


def _read_labels(root: str) -> list[tuple[str, str, str]]:
    """``(path, label, split)`` of every row of ``root/labels.csv`` (split ``""``
    without a split column), after checking the file's columns and rows."""
    path = os.path.join(root, LABELS_FILE)
    layout = "columns file,label and optionally split (train or test)"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # a byte-order mark (Excel's CSV UTF-8) is not text
            reader = csv.reader(f)
            header = [h.strip().lower() for h in next(reader, [])]
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read {path} ({type(exc).__name__}: {exc})") from exc
    if "file" not in header or "label" not in header:
        raise DatasetError(f"{path}: the first line must name the {layout}; got {','.join(header) or 'nothing'} "
                           f"(a folder with a {LABELS_FILE} is read as a folder of volumes)")
    column = {name: header.index(name) for name in ("file", "label", "split") if name in header}
    entries, seen = [], {}
    for line, row in rows:
        cells = {name: (row[i].strip() if i < len(row) else "") for name, i in column.items()}
        if not cells["file"]:
            raise DatasetError(f"{path}, line {line}: no file name")
        if not cells["label"]:
            raise DatasetError(f"{path}, line {line}: {cells['file']} has no label")
        split = cells.get("split", "").lower()
        if "split" in column and split not in ("train", "test", "val"):
            raise DatasetError(f"{path}, line {line}: split must be train, test or val, got {cells.get('split')!r}")
        file = os.path.normpath(os.path.join(root, cells["file"]))
        if not _is_volume_file(file):
            raise DatasetError(f"{path}, line {line}: {cells['file']} is not a volume file "
                               f"({', '.join(VOLUME_EXTENSIONS)})")
        if file in seen:
            raise DatasetError(f"{path}, line {line}: {cells['file']} is listed again (first on line {seen[file]})")
        seen[file] = line
        entries.append((file, cells["label"], "test" if split == "val" else split))
    if not entries:
        raise DatasetError(f"{path} lists no volumes ({layout})")
    missing = [os.path.relpath(f, root) for f, _, _ in entries if not os.path.isfile(f)]
    if missing:
        raise DatasetError(f"{path} lists {len(missing)} file(s) that do not exist: {', '.join(missing[:5])}"
                           + (", ..." if len(missing) > 5 else ""))
    unlabelled = [os.path.relpath(f, root) for f in _volume_files(root) if os.path.normpath(f) not in seen]
    if unlabelled:
        raise DatasetError(f"{len(unlabelled)} volume file(s) under {root} have no label in {LABELS_FILE}: "
                           f"{', '.join(unlabelled[:5])}" + (", ..." if len(unlabelled) > 5 else "")
                           + "; add a row for each or move them out")
    return entries


def _class_indices(labels: list[str]) -> tuple[list[int], int]:
    """Labels as class indices: integers 0, 1, ... as they are; where every
    label is a number, the values sorted (2.0 before 10.0; 1 and 1.0 one class);
    else the names sorted."""
    if all(re.fullmatch(r"\d+", label) for label in labels):
        indices = [int(label) for label in labels]
        return indices, max(indices) + 1
    values = [_number(label) for label in labels]
    keys = values if None not in values else labels
    classes = sorted(set(keys))
    return [classes.index(key) for key in keys], len(classes)


def _number(text: str) -> Optional[float]:
    """``text`` as a finite number, or ``None``."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def load_volume_folder(root: str, size: Optional[tuple[int, int, int]] = None) -> ImageData:
    """A folder of volumes (``.npy``; ``.nii``/``.nii.gz`` through nibabel) with a
    ``labels.csv`` naming each (see :func:`volume_header` for the layouts):

        file,label,split
        scans/case001.npy,0,train
        scans/case002.nii.gz,1,test

    ``file`` is relative to the folder; ``label`` a class index (0, 1, ...) or a
    class name (names are sorted to indices); ``split`` (optional column) is
    ``train`` or ``test`` (or ``val``, used as test); without it a fixed
    stratified 20% is held out.  Every volume file under the folder must have a
    row.  All volumes must have the same number of channels, and the same size
    unless ``size`` resizes them.  Augmentation: random shift by 1/8 of the
    smallest side, no flips."""
    root = os.path.abspath(root)  # (rows may give absolute paths)
    entries = _read_labels(root)
    headers = {f: volume_header(f) for f, _, _ in entries}
    first = entries[0][0]
    channels, shape = headers[first]
    name = lambda f: os.path.relpath(f, root)  # noqa: E731
    other = [f for f, (c, _) in headers.items() if c != channels]
    if other:
        raise DatasetError(f"volumes differ in channels: {name(first)} has {channels}, {name(other[0])} has "
                           f"{headers[other[0]][0]}" + (f" (and {len(other) - 1} more)" if len(other) > 1 else ""))
    other = [f for f, (_, s) in headers.items() if s != shape]
    if other and size is None:
        raise DatasetError(f"volumes differ in size: {name(first)} is {_shape_text(shape)}, {name(other[0])} is "
                           f"{_shape_text(headers[other[0]][1])}"
                           + (f" (and {len(other) - 1} more)" if len(other) > 1 else "")
                           + "; pass --volume-size D H W (or one side) to resize every volume")
    labels, num_classes = _class_indices([label for _, label, _ in entries])
    if num_classes < 2 or len(set(labels)) < 2:
        raise DatasetError(f"{root}/{LABELS_FILE}: every volume has the same label; a classifier needs at least 2 "
                           f"classes")
    samples = [(f, label) for (f, _, _), label in zip(entries, labels)]
    splits = [split for _, _, split in entries]
    if any(splits):
        train = [s for s, split in zip(samples, splits) if split == "train"]
        test = [s for s, split in zip(samples, splits) if split == "test"]
        if not train or not test:
            raise DatasetError(f"{root}/{LABELS_FILE}: {len(train)} train and {len(test)} test volumes; both splits "
                               f"must be non-empty")
        names = {index: label for (_, label, _), index in zip(entries, labels)}
        refuse_untrained_classes(os.path.join(root, LABELS_FILE), [names[label] for _, label in train],
                                 [names[label] for _, label in test])
    else:
        from sklearn.model_selection import train_test_split

        try:
            train, test = train_test_split(samples, test_size=HELD_OUT_FRACTION, stratify=labels,
                                           random_state=SPLIT_SEED)
        except ValueError as exc:
            raise DatasetError(f"{root}: too few volumes per class to hold out a stratified test split ({exc}); "
                               f"add a split column to {LABELS_FILE}") from exc
    final = size or shape
    common = None if size else shape
    return ImageData("volumefolder", VolumeFolder(train, size, channels, common),
                     VolumeFolder(test, size, channels, common), num_classes, channels, _volume_augmentation(final),
                     spatial_dims=3, size=tuple(final))


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
            yield self._batch(shard, b)

    def batch(self, index: int) -> list[int]:
        """The indices of this epoch's batch ``index`` (``set_epoch``'s skip aside)."""
        return self._batch(self._shard(), index)

    def _batch(self, shard: list[int], index: int) -> list[int]:
        return shard[index * self.batch_size:(index + 1) * self.batch_size]


def augment(images: Tensor, augmentation: Augmentation, generator: torch.Generator) -> Tensor:
    """Random crops (zero padding) and flips of a ``(N, C, H, W)`` batch, one draw per image
    (or of ``(N, C, D, H, W)`` volumes: see :func:`augment_volumes`)."""
    if images.dim() != 4:
        return augment_volumes(images, augmentation, generator)
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
    # NCHW strides: contiguous() kept a one-channel batch in the gather's (N, H, W, C) strides (a size-1
    # dimension's stride does not count), which convolutions take for channels-last: conv0's weight gradient
    # came out channels-last, against DDP's buckets ("Grad strides do not match bucket view strides")
    return images.clone(memory_format=torch.contiguous_format)


def augment_volumes(volumes: Tensor, augmentation: Augmentation, generator: torch.Generator) -> Tensor:
    """Random crops (zero padding) and flips along the last axis of ``(N, C, *spatial)``
    volumes, one draw per volume: offsets along each axis, then the flips."""
    n, _, *sizes = volumes.shape
    p = augmentation.crop_padding
    if p:
        padded = F.pad(volumes, (p, p) * len(sizes))
        offsets = torch.randint(0, 2 * p + 1, (n, len(sizes)), generator=generator).tolist()
        volumes = torch.stack([padded[(i, slice(None)) + tuple(slice(o, o + s) for o, s in zip(offset, sizes))]
                               for i, offset in enumerate(offsets)])
    if augmentation.flip:
        flip = torch.rand(n, generator=generator) < 0.5
        volumes = torch.where(flip.view(n, *[1] * (volumes.dim() - 1)), volumes.flip(-1), volumes)
    return volumes.contiguous()
