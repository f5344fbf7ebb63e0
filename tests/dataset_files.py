"""Datasets written to disk for the data and trainer tests: CIFAR's pickles,
ImageFolder trees of PNG images, volume folders with their labels.csv."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from densenet_fast.data import DatasetError, load_dataset


def write_cifar(root, *, num_classes=10, per_batch=8, seed=0, labels=None, test_labels=None):
    """A fake CIFAR directory in the exact python-pickle layout (random labels,
    the test split's among the training split's, unless ``labels``,
    ``test_labels`` are given); returns its images and labels by file."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    cifar100 = num_classes == 100
    files = ["train", "test"] if cifar100 else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written, trained = {}, []
    for name in files:
        given = test_labels if name.startswith("test") else labels
        if given is None and name.startswith("test"):
            given = rng.choice(trained, size=per_batch).tolist()
        batch_labels = rng.integers(0, num_classes, size=per_batch).tolist() if given is None else list(given)
        trained += batch_labels
        data = rng.integers(0, 256, size=(len(batch_labels), 3072), dtype=np.uint8)
        batch = {b"batch_label": name.encode(), b"data": data, b"filenames": [b"x.png"] * len(batch_labels)}
        if cifar100:
            batch.update({b"fine_labels": batch_labels, b"coarse_labels": [l // 5 for l in batch_labels]})
        else:
            batch[b"labels"] = batch_labels
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = (data, batch_labels)
    if cifar100:
        with open(os.path.join(root, "meta"), "wb") as f:
            pickle.dump({b"fine_label_names": [b"c%d" % i for i in range(100)]}, f)
    return written


def write_images(root, counts: dict) -> None:
    """``counts[folder]`` random 10x10 PNG images in each folder under ``root``."""
    from PIL import Image

    for folder, count in counts.items():
        os.makedirs(root / folder, exist_ok=True)
        for i in range(count):
            Image.fromarray(np.full((10, 10, 3), 40 * i % 256, np.uint8)).save(root / folder / f"{i}.png")


def assert_dataset_error(tmp_path, make, message: str) -> None:
    """``make(root)`` fills an empty dataset folder; loading it raises DatasetError with ``message``."""
    root = tmp_path / "data"
    root.mkdir()
    make(root)
    with pytest.raises(DatasetError) as error:
        load_dataset(str(root))
    assert message in str(error.value)


def write_volume_folder(root, sizes=None, *, labels=("liver", "lung"), count=10, split=True, channels=None):
    """``count`` .npy volumes (in a subfolder) and their labels.csv; returns the rows written."""
    rng = np.random.default_rng(0)
    (root / "scans").mkdir(parents=True)
    rows = []
    for i in range(count):
        size = (sizes or [(6, 7, 8)])[i % len(sizes or [1])]
        shape = size if channels is None else (channels, *size)
        np.save(root / "scans" / f"case{i}.npy", (rng.normal(100, 20, shape)).astype(np.float32))
        rows.append((f"scans/case{i}.npy", labels[i % len(labels)], "test" if split and i % 5 == 4 else "train"))
    header = "file,label,split\n" if split else "file,label\n"
    (root / "labels.csv").write_text(header + "".join(",".join(r if split else r[:2]) + "\n" for r in rows))
    return rows


def write_labels(root, text):
    (root / "labels.csv").write_text(text)


def save(root, name, array):
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    np.save(root / name, array)


VOLUME = np.zeros((4, 5, 6), np.float32)
