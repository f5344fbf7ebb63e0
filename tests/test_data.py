"""The trainer's datasets (densenet_fast/data.py): digits, CIFAR, ImageFolder
trees, volume folders, MedMNIST-3D and synthetic volumes; their splits,
normalisation, refusals and fingerprints; augmentation and the sharded
sampler.  Training on them: tests/test_trainer.py."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import struct
import zipfile

import numpy as np
import pytest
import torch

from densenet_fast.data import (SPLIT_SEED, Augmentation, DatasetError, ShardedBatchSampler, augment, load_dataset,
                                 stratified_subset)
from dataset_files import (VOLUME, assert_dataset_error, save, write_cifar, write_images, write_labels,
                           write_volume_folder)

try:
    import nibabel
except ImportError:
    nibabel = None


def test_digits_has_a_fixed_stratified_held_out_split():
    data = load_dataset("digits")
    train_x, train_y = data.train.tensors
    test_x, test_y = data.test.tensors
    assert train_x.shape == (1437, 1, 8, 8) and test_x.shape == (360, 1, 8, 8)
    assert data.num_classes == 10 and data.in_channels == 1
    assert data.augmentation == Augmentation(crop_padding=1, flip=False)  # a mirrored digit is another symbol
    counts = torch.bincount(test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 36 per class, give or take one
    assert abs(train_x.mean()) < 1e-5 and abs(train_x.std() - 1) < 1e-3
    again = load_dataset("digits")
    assert torch.equal(again.test.tensors[0], test_x)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    raw = load_digits()
    assert sorted(torch.cat([train_y, test_y]).tolist()) == sorted(raw.target.tolist())
    # the test split is normalised by the training split's mean and deviation, not its own
    raw_train, raw_test = (torch.from_numpy(x[:, None] / 16.0).float() for x in train_test_split(
        raw.images, test_size=0.2, stratify=raw.target, random_state=SPLIT_SEED)[:2])
    torch.testing.assert_close(test_x, (raw_test - raw_train.mean()) / raw_train.std())


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_pickle_directory_loads_in_order(tmp_path, num_classes):
    folder = tmp_path / ("cifar-100-python" if num_classes == 100 else "cifar-10-batches-py")  # standard names
    written = write_cifar(folder, num_classes=num_classes)
    data = load_dataset(str(folder))
    assert data.name == f"cifar{num_classes}" and data.num_classes == num_classes and data.in_channels == 3
    assert data.augmentation == Augmentation(crop_padding=4, flip=True)
    train_files = ["train"] if num_classes == 100 else [f"data_batch_{i}" for i in range(1, 6)]
    raw = np.concatenate([written[f][0] for f in train_files]).reshape(-1, 3, 32, 32).astype(np.float64) / 255
    mean, std = raw.mean(axis=(0, 2, 3), keepdims=True), raw.std(axis=(0, 2, 3), ddof=1, keepdims=True)
    images, labels = data.train.tensors
    np.testing.assert_allclose(images.numpy(), (raw - mean) / std, rtol=1e-4, atol=1e-4)
    assert labels.tolist() == sum((written[f][1] for f in train_files), [])
    test_file = "test" if num_classes == 100 else "test_batch"
    assert data.test.tensors[1].tolist() == written[test_file][1]
    # the standard parent folder is recognised too
    assert load_dataset(str(tmp_path)).name == data.name


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "found 0 class folder(s)"),
    (lambda root: (root / "data_batch_1").write_bytes(b"garbage"), "not a readable python pickle"),
    (lambda root: write_cifar(root) and os.remove(root / "test_batch"), "test_batch is missing"),
    (lambda root: (root / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 5), np.uint8),
                                                                     b"labels": [0, 1]})), "(N, 3072)"),
    (lambda root: (root / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                                                     b"labels": [0, 10]})), "labels must lie in"),
    (lambda root: (root / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                                                     b"labels": [0.9, 1.5]})),
     "labels must be class indices 0, 1, ... (got float64)"),  # (they were truncated)
    (lambda root: write_cifar(root) and (root / "test_batch").write_bytes(pickle.dumps(
        {b"data": np.zeros((0, 3072), np.uint8), b"labels": []})), "test_batch holds no images"),  # (after an epoch:
    # ZeroDivisionError)
    # ImageFolder trees
    (lambda root: write_images(root, {"cat": 5, "dog": 5, "emu": 0}), "no image (.png"),  # a class never trained
    (lambda root: write_images(root, {"train/cat": 5, "train/dog": 5, "train/emu": 0, "val/cat": 1, "val/dog": 1,
                                      "val/emu": 1}), "train: no image (.png"),  # tested, never trained
    (lambda root: write_images(root, {"validate/cat": 5, "validate/dog": 5, "val/cat": 1, "val/dog": 1}),
     "has the folder(s) val, which would be classes"),
    (lambda root: write_images(root, {"Train/cat": 5, "Train/dog": 5}), "has the folder(s) Train, which would be"),
    (lambda root: write_cifar(root, per_batch=4, labels=[0, 1, 0, 1], test_labels=[0, 9]),
     "the test split has the class(es) 9, which no training sample has"),
    (lambda root: (root / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                                                     b"labels": [0, -1]})), "labels must lie in"),
    # a test split without one of training's classes: its emu folder would be index 1, training's dog
    (lambda root: write_images(root, {"train/cat": 5, "train/dog": 5, "train/emu": 5, "val/cat": 1, "val/emu": 1}),
     "val has classes ['cat', 'emu'], but"),
])
def test_malformed_dataset_directories_are_named(tmp_path, make, message):
    assert_dataset_error(tmp_path, make, message)


def test_image_folder_trees_are_found_as_torchvision_finds_them(tmp_path):
    """Folders linked into a class count (torchvision's ImageFolder follows
    them; a link to a folder above ends), hidden files do not (macOS's
    ``._0.png``), extensions in capitals do, ``validation/`` is a test split, a class named ``train``
    (of images) is a class, and a limit draws from every class."""
    write_images(tmp_path / "more", {"cat": 3})
    write_images(tmp_path / "tree", {"train/cat": 5, "train/dog/zz": 5, "Validation/cat": 2, "Validation/dog": 2})
    os.symlink(tmp_path / "more" / "cat", tmp_path / "tree" / "train" / "cat" / "linked")
    os.symlink(tmp_path / "tree" / "train" / "dog" / "zz", tmp_path / "tree" / "train" / "dog" / "aa")
    os.symlink(tmp_path / "tree" / "train" / "dog", tmp_path / "tree" / "train" / "dog" / "loop")
    (tmp_path / "tree" / "train" / "dog" / "._0.png").write_bytes(b"AppleDouble")
    shutil.copy(tmp_path / "more" / "cat" / "0.png", tmp_path / "tree" / "Validation" / "cat" / "CAMERA.PNG")
    data = load_dataset(str(tmp_path / "tree"), image_size=8)
    assert (len(data.train), len(data.test), data.num_classes) == (13, 5, 2)
    assert {os.path.basename(os.path.dirname(path)) for path, label in data.train.samples if label == 1} == {"aa"}
    assert sorted(label for _, label in data.limit(4, 2).train) == [0, 0, 1, 1]  # (the first four: cats only)
    write_images(tmp_path / "vehicles", {"bus": 5, "train": 5})
    assert load_dataset(str(tmp_path / "vehicles"), image_size=8).num_classes == 2


def test_images_of_16_bit_and_float_values_keep_their_values(tmp_path):
    """PIL's conversion to RGB clips 16-bit integers to 255 (two classes of 16-bit
    PNGs, dark and bright, became the same white image) and floats to 0: they
    are scaled by 1/65535 and taken as they are, in every channel, as an 8-bit
    grey image's value v is v/255."""
    from PIL import Image

    values = {"dark.png": (np.uint16, 1000, 1000 / 65535), "bright.png": (np.uint16, 60000, 60000 / 65535),
              "float.tiff": (np.float32, 0.3, 0.3), "grey.png": (np.uint8, 200, 200 / 255)}
    write_images(tmp_path / "tree", {"a": 4, "b": 4})
    for name, (dtype, value, _) in values.items():
        Image.fromarray(np.full((10, 12), value, dtype)).save(tmp_path / "tree" / "a" / name)
    data = load_dataset(str(tmp_path / "tree"), image_size=8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    checked = []
    for split in (data.train, data.test):
        for index, (path, _) in enumerate(split.samples):
            name = os.path.basename(path)
            if name in values:
                expected = ((values[name][2] - mean) / std).view(3, 1, 1).expand(3, 8, 8)
                torch.testing.assert_close(split[index][0], expected, rtol=1e-6, atol=1e-6, msg=name)
                checked.append(name)
    assert sorted(checked) == sorted(values)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("augmentation", [Augmentation(4, True), Augmentation(1, False), Augmentation(0, True)])
def test_augment_crops_and_flips_each_image_independently(augmentation, channels):
    images = torch.randn(40, channels, 7, 9)
    out = augment(images, augmentation, torch.Generator().manual_seed(1))
    assert out.shape == images.shape
    # NCHW strides, also for one channel (it kept channels-last ones, and conv0's weight gradient followed)
    assert out.stride() == torch.empty(out.shape).stride()
    p = augmentation.crop_padding
    padded = torch.nn.functional.pad(images, (p, p, p, p))
    seen = set()
    for i in range(len(images)):
        matches = [(dy, dx, flip) for dy in range(2 * p + 1) for dx in range(2 * p + 1) for flip in (False, True)
                   if torch.equal(out[i], (lambda c: c.flip(2) if flip else c)(padded[i, :, dy:dy + 7, dx:dx + 9]))]
        assert matches, f"image {i} is no crop/flip of its input"
        seen.update(matches)
    assert any(flip for _, _, flip in seen) == augmentation.flip
    # every shift from 0 to 2p along each axis, drawn independently (not only diagonal ones)
    assert {dy for dy, _, _ in seen} == {dx for _, dx, _ in seen} == set(range(2 * p + 1))
    assert any(dy != dx for dy, dx, _ in seen) == (p > 0)


def test_a_stratified_subset_gives_each_class_its_nearest_share():
    """``--train-limit``/``--test-limit``: each class's count is its share of
    ``n`` rounded to the nearest (a class of 1 in 100 gets none of 10; with
    the first sample of each class taken first it got one), the same every
    call, in the samples' order."""
    labels = [0] * 99 + [1]
    assert [labels[i] for i in stratified_subset(labels, 10)] == [0] * 10
    labels = [i % 3 for i in range(30)]
    chosen = stratified_subset(labels, 9)
    assert chosen == sorted(chosen) == stratified_subset(labels, 9)
    assert sorted(labels[i] for i in chosen) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_sharded_sampler_splits_each_epoch_and_resumes():
    full = ShardedBatchSampler(50, 8, shuffle=True, drop_last=True, seed=3)
    full.set_epoch(2)
    batches = list(full)
    assert len(batches) == len(full) == 6 and len({i for b in batches for i in b}) == 48
    full.set_epoch(2, skip=4)
    assert list(full) == batches[4:]
    full.set_epoch(3)
    assert list(full) != batches
    other_seed = ShardedBatchSampler(50, 8, shuffle=True, drop_last=True, seed=4)
    other_seed.set_epoch(1)  # (seed + epoch alone would be 3 + 2 again)
    assert list(other_seed) != batches
    shards = [ShardedBatchSampler(50, 4, shuffle=True, drop_last=True, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for s in shards:
        s.set_epoch(2)
    per_rank = [list(s) for s in shards]
    assert len(per_rank[0]) == len(per_rank[1]) == 6
    # the first step of the two processes together sees the first global batch
    assert sorted(per_rank[0][0] + per_rank[1][0]) == sorted(batches[0])
    evaluation = [ShardedBatchSampler(51, 4, shuffle=False, drop_last=False, rank=r, world_size=2) for r in (0, 1)]
    assert sorted(i for s in evaluation for b in s for i in b) == list(range(51))
    # training: every process the same number of steps where the shards differ in size (else DDP hangs)
    uneven = [ShardedBatchSampler(11, 2, shuffle=True, drop_last=True, rank=r, world_size=2) for r in (0, 1)]
    assert [len(s) for s in uneven] == [len(list(s)) for s in uneven] == [2, 2]


def test_synthetic3d_is_fixed_balanced_and_normalised():
    data = load_dataset("synthetic3d")
    train_x, train_y = data.train.tensors
    test_x, test_y = data.test.tensors
    assert train_x.shape == (240, 1, 16, 16, 16) and test_x.shape == (60, 1, 16, 16, 16)
    assert (data.spatial_dims, data.size, data.num_classes, data.in_channels) == (3, (16, 16, 16), 3, 1)
    assert sorted(set(train_y.tolist())) == [0, 1, 2] and torch.bincount(train_y).min() >= 60
    assert abs(train_x.mean()) < 1e-5 and abs(train_x.std() - 1) < 1e-3
    assert torch.equal(load_dataset("synthetic3d").test.tensors[0], test_x)
    assert load_dataset("synthetic3d", volume_size=[12, 16, 20]).train.tensors[0].shape[2:] == (12, 16, 20)


@pytest.mark.parametrize("augmentation", [Augmentation(2, True), Augmentation(1, False)])
def test_augment_shifts_and_flips_each_volume_independently(augmentation):
    volumes = torch.randn(24, 2, 5, 6, 7)
    out = augment(volumes, augmentation, torch.Generator().manual_seed(1))
    assert out.shape == volumes.shape
    p = augmentation.crop_padding
    padded = torch.nn.functional.pad(volumes, (p,) * 6)
    seen = set()
    for i in range(len(volumes)):
        matches = [(dz, dy, dx, flip) for dz in range(2 * p + 1) for dy in range(2 * p + 1)
                   for dx in range(2 * p + 1) for flip in (False, True)
                   if torch.equal(out[i], (lambda c: c.flip(-1) if flip else c)(
                       padded[i, :, dz:dz + 5, dy:dy + 6, dx:dx + 7]))]
        assert matches, f"volume {i} is no crop/flip of its input"
        seen.update(matches)
    assert any(m[3] for m in seen) == augmentation.flip
    assert len({m[:3] for m in seen}) > 1


def test_volume_folder_with_labels_csv(tmp_path):
    rows = write_volume_folder(tmp_path / "vols")
    data = load_dataset(str(tmp_path / "vols"))
    assert (data.name, data.spatial_dims, data.size, data.num_classes, data.in_channels) == \
        ("volumefolder", 3, (6, 7, 8), 2, 1)
    assert (len(data.train), len(data.test)) == (8, 2)
    volume, label = data.test[0]
    assert volume.shape == (1, 6, 7, 8) and volume.dtype == torch.float32
    assert label == ["liver", "lung"].index(rows[4][1])  # class names sorted to indices
    assert abs(volume.mean()) < 1e-5 and abs(volume.std() - 1) < 1e-4  # each volume normalised on its own
    raw = torch.from_numpy(np.load(tmp_path / "vols" / rows[4][0]))
    torch.testing.assert_close(volume[0], (raw - raw.mean()) / raw.std())
    # without a split column a stratified 20% is held out; --volume-size resizes
    write_volume_folder(tmp_path / "nosplit", labels=("0", "1"), split=False, channels=2)
    data = load_dataset(str(tmp_path / "nosplit"), volume_size=[16])
    assert (len(data.train), len(data.test), data.in_channels, data.size) == (8, 2, 2, (16, 16, 16))
    assert data.train[0][0].shape == (2, 16, 16, 16)
    assert sorted(label for _, label in data.test) == [0, 1]
    write_volume_folder(tmp_path / "many", split=False, count=40)
    assert load_dataset(str(tmp_path / "many")).test.samples == load_dataset(str(tmp_path / "many")).test.samples


def test_labels_csv_with_a_byte_order_mark(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a byte-order mark."""
    write_volume_folder(tmp_path / "vols")
    labels = tmp_path / "vols" / "labels.csv"
    labels.write_text("\ufeff" + labels.read_text(), encoding="utf-8")
    assert load_dataset(str(tmp_path / "vols")).num_classes == 2


@pytest.mark.parametrize("make, message", [
    (lambda r: save(r, "a.npy", VOLUME), "holds 1 volume file(s) (a.npy, ...) but no labels.csv"),
    (lambda r: (save(r, "a.npy", VOLUME), write_labels(r, "name,class\na.npy,0\n")),
     "the first line must name the columns file,label"),
    (lambda r: (save(r, "a.npy", VOLUME), write_labels(r, "file,label\na.npy,\n")), "line 2: a.npy has no label"),
    (lambda r: (save(r, "a.npy", VOLUME), write_labels(r, "file,label\na.npy,0\nb.npy,1\n")),
     "lists 1 file(s) that do not exist: b.npy"),
    (lambda r: (save(r, "a.npy", VOLUME), save(r, "sub/b.npy", VOLUME), write_labels(r, "file,label\na.npy,0\n")),
     "1 volume file(s) under"),
    (lambda r: (save(r, "a.npy", VOLUME), save(r, "b.npy", VOLUME[:3]), write_labels(r, "file,label\na.npy,0\nb.npy,1\n")),
     "volumes differ in size: a.npy is 4x5x6, b.npy is 3x5x6; pass --volume-size"),
    (lambda r: (save(r, "a.npy", VOLUME[0]), write_labels(r, "file,label\na.npy,0\n")),
     "has shape (5, 6); expected (D, H, W) or (C, D, H, W)"),
    (lambda r: (save(r, "a.npy", VOLUME), save(r, "b.npy", np.stack([VOLUME] * 2)),
                write_labels(r, "file,label\na.npy,0\nb.npy,1\n")), "volumes differ in channels: a.npy has 1, b.npy has 2"),
    (lambda r: (save(r, "a.npy", VOLUME), save(r, "b.npy", VOLUME), write_labels(r, "file,label\na.npy,0\nb.npy,0\n")),
     "every volume has the same label"),
    (lambda r: (save(r, "a.npy", VOLUME), save(r, "b.npy", VOLUME), write_labels(r, "file,label\na.npy,1\nb.npy,1\n")),
     "every volume has the same label"),  # (class 0 absent: two class indices, one class)
    (lambda r: (save(r, "a.npy", VOLUME), save(r, "b.npy", VOLUME),
                write_labels(r, "file,label,split\na.npy,0,train\nb.npy,1,holdout\n")), "split must be train, test or val"),
    (lambda r: (save(r, "a.npy", VOLUME), save(r, "b.npy", VOLUME),
                write_labels(r, "file,label,split\na.npy,0,train\nb.npy,1,train\n")), "0 test volumes"),
    (lambda r: ((r / "a.npy").write_bytes(b"not numpy"), write_labels(r, "file,label\na.npy,0\n")),
     "cannot read volume"),
    (lambda r: (save(r, "a.npy", VOLUME), write_labels(r, "file,label\na.npy,0\na.npy,1\n")), "is listed again"),
    (lambda r: ([save(r, f"{n}.npy", VOLUME) for n in "abc"],
                write_labels(r, "file,label,split\na.npy,x,train\nb.npy,y,train\nc.npy,z,test\n")),
     "the test split has the class(es) z, which no training sample has"),  # (tested, never trained)
    (lambda r: (save(r, "a.npy", VOLUME.astype(np.complex64)), write_labels(r, "file,label\na.npy,0\n")),
     "holds complex64, not real numbers"),  # (the imaginary part was dropped)
])
def test_malformed_volume_folders_are_named(tmp_path, make, message):
    assert_dataset_error(tmp_path, make, message)


def test_volume_folder_details(tmp_path, monkeypatch):
    """Class names that are numbers are sorted by value (as text, 10.0 came
    before 2.0), and 10 and 10.0 are one class; rows with absolute paths under
    a relative --data work (the fingerprint mixed both)."""
    root = tmp_path / "data"
    root.mkdir()
    for name in "abcd":
        save(root, f"{name}.npy", VOLUME)
    write_labels(root, f"file,label,split\na.npy,2.0,train\nb.npy,10,train\nc.npy,2.0,test\n"
                       f"{root / 'd.npy'},10.0,test\n")
    monkeypatch.chdir(tmp_path)
    data = load_dataset("data")
    assert sorted((os.path.basename(path), label) for path, label in data.train.samples + data.test.samples) == \
        [("a.npy", 0), ("b.npy", 1), ("c.npy", 0), ("d.npy", 1)]
    assert data.fingerprint() == load_dataset(str(root)).fingerprint()


def test_volume_folder_rows_are_read_as_written(tmp_path):
    """Class names are sorted to indices whatever the rows' order, ``val`` rows
    are the test split, the header may be capitalised, integer volumes (CT's
    int16) come as float32, macOS's ``._`` files are no volumes, and integer
    labels are the class indices."""
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in "abcd":
        save(root, f"{name}.npy", rng.integers(-1000, 1000, (4, 5, 6)).astype(np.int16))
    (root / "._a.npy").write_bytes(b"AppleDouble")
    write_labels(root, "File,Label,Split\na.npy,lung,train\nb.npy,liver,train\nc.npy,lung,val\nd.npy,liver,val\n")
    data = load_dataset(str(root))
    named = lambda split: sorted((os.path.basename(path), label) for path, label in split.samples)  # noqa: E731
    assert named(data.train) == [("a.npy", 1), ("b.npy", 0)] and named(data.test) == [("c.npy", 1), ("d.npy", 0)]
    assert data.train[0][0].dtype == torch.float32
    # labels that are integers are class indices as they are: 1 and 2 make 3 outputs (2 would be out of range)
    write_labels(root, "file,label,split\na.npy,1,train\nb.npy,2,train\nc.npy,1,test\nd.npy,2,test\n")
    assert load_dataset(str(root)).num_classes == 3


def test_volume_with_nan_is_named_when_read(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    save(root, "a.npy", VOLUME)
    save(root, "b.npy", np.full_like(VOLUME, np.nan))
    save(root, "c.npy", VOLUME)
    write_labels(root, "file,label,split\na.npy,0,train\nc.npy,1,train\nb.npy,1,test\n")
    data = load_dataset(str(root))
    with pytest.raises(DatasetError, match="b.npy holds NaN or infinite values"):
        data.test[0]


@pytest.mark.parametrize("array, message", [
    (np.zeros((5, 5, 6), np.float32), "a.npy now holds 1 channel\\(s\\) of 5x5x6, not 1 of 4x5x6 as when the dataset"),
    (np.zeros((2, 4, 5, 6), np.float32), "a.npy now holds 2 channel\\(s\\) of 4x5x6, not 1 of 4x5x6"),
    (np.zeros((4, 5), np.float32), "a.npy has shape \\(4, 5\\); expected"),
    (np.array(["a", "b"]), "a.npy holds <U1, not real numbers"),
    (np.zeros((4, 5, 6), np.complex64), "a.npy holds complex64, not real numbers"),
])
def test_a_volume_changed_since_loading_is_named_when_read(tmp_path, array, message):
    """Read by a training step, a file replaced since the dataset was loaded
    is checked as at loading (a stack of other shapes raised a traceback, text
    ended the run as bad input, complex values trained); resized volumes may
    change their size, not their channels."""
    root = tmp_path / "data"
    for name in ("a.npy", "b.npy", "c.npy"):
        save(root, name, VOLUME)
    write_labels(root, "file,label,split\na.npy,0,train\nc.npy,1,train\nb.npy,1,test\n")
    data, resized = load_dataset(str(root)), load_dataset(str(root), volume_size=(4, 4, 4))
    save(root, "a.npy", array)
    with pytest.raises(DatasetError, match=message):
        data.train[0]
    if array.shape == (5, 5, 6):
        assert resized.train[0][0].shape == (1, 4, 4, 4)
    elif array.ndim == 4:
        with pytest.raises(DatasetError, match="a.npy now holds 2 channel\\(s\\), not 1 as when the dataset"):
            resized.train[0]  # (of no shape: resized volumes may have had any)


@pytest.mark.parametrize("arrays, message", [
    ({"train_images": np.zeros((4, 8, 8), np.uint8)}, "lacks train_labels, test_images, test_labels"),
    ({f"{s}_{k}": np.zeros((4, 8, 8) if k == "images" else (4, 1), np.uint8) for s in ("train", "test")
      for k in ("images", "labels")}, "2-D images: a 2-D MedMNIST file"),
    ({f"{s}_{k}": np.zeros((4, 28, 28, 3) if k == "images" else (4, 1), np.uint8) for s in ("train", "test")
      for k in ("images", "labels")}, "(4, 28, 28, 3) (2-D images: a 2-D MedMNIST file)"),  # colour, not D=28
    ({f"{s}_{k}": np.zeros((4, 8, 8, 8) if k == "images" else (4, 14), np.uint8) for s in ("train", "test")
      for k in ("images", "labels")}, "multi-label data is not supported"),
])
def test_malformed_medmnist_files_are_named(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=re.escape(message)) as error:
        load_dataset(str(tmp_path / "bad.npz"))
    assert "not a readable .npz file" not in str(error.value)  # said once, not wrapped
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="not a readable .npz file"):
        load_dataset(str(tmp_path / "junk.npz"))
    np.save(tmp_path / "array.npy", np.zeros(3))  # a .npy named .npz (np.load returned an array: TypeError)
    (tmp_path / "array.npy").rename(tmp_path / "array.npz")
    with pytest.raises(DatasetError, match="not a readable .npz file"):
        load_dataset(str(tmp_path / "array.npz"))


def test_medmnist_files_whose_data_is_unusable_are_named(tmp_path):
    """A test class that no training volume has (it was a class never trained),
    and a compressed file with a damaged stream (zlib.error)."""
    arrays = {"train_images": np.zeros((4, 8, 8, 8), np.uint8), "train_labels": np.array([[0], [1], [0], [1]]),
              "test_images": np.zeros((2, 8, 8, 8), np.uint8), "test_labels": np.array([[1], [5]])}
    np.savez(tmp_path / "classes.npz", **arrays)
    with pytest.raises(DatasetError, match="the test split has the class\\(es\\) 5, which no training sample has"):
        load_dataset(str(tmp_path / "classes.npz"))
    arrays["test_labels"] = np.array([[1], [0]])
    np.savez_compressed(tmp_path / "damaged.npz", **arrays)
    with zipfile.ZipFile(tmp_path / "damaged.npz") as archive:
        info = archive.getinfo("train_images.npy")
    content = bytearray((tmp_path / "damaged.npz").read_bytes())
    name_length, extra_length = struct.unpack_from("<HH", content, info.header_offset + 26)  # (its local header)
    start = info.header_offset + 30 + name_length + extra_length  # the deflate stream
    content[start] = 0xFF  # (an invalid block type)
    (tmp_path / "damaged.npz").write_bytes(bytes(content))
    with pytest.raises(DatasetError, match="not a readable .npz file \\(error: .*invalid block type"):
        load_dataset(str(tmp_path / "damaged.npz"))


@pytest.mark.skipif(nibabel is not None, reason="nibabel is installed")
def test_nifti_without_nibabel_is_named(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.nii.gz").write_bytes(b"")
    write_labels(root, "file,label\na.nii.gz,0\n")
    with pytest.raises(DatasetError, match="needs nibabel: pip install nibabel"):
        load_dataset(str(root))


@pytest.mark.skipif(nibabel is None, reason="reading NIfTI needs nibabel")
def test_nifti_volumes_through_nibabel(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(6, 7, 8, 2)).astype(np.float32) for _ in range(4)]  # NIfTI: channels last
    for i, array in enumerate(arrays):
        nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), root / f"case{i}.nii.gz")
    write_labels(root, "file,label,split\n" + "".join(f"case{i}.nii.gz,{i % 2},{'test' if i == 3 else 'train'}\n"
                                                      for i in range(4)))
    data = load_dataset(str(root))
    assert (data.in_channels, data.size, len(data.train), len(data.test)) == (2, (6, 7, 8), 3, 1)
    volume, label = data.test[0]
    expected = torch.from_numpy(np.moveaxis(arrays[3], 3, 0))
    dims = (1, 2, 3)
    expected = (expected - expected.mean(dims, keepdim=True)) / expected.std(dims, keepdim=True)
    torch.testing.assert_close(volume, expected)
    assert label == 1


def test_the_data_fingerprint_follows_the_samples_not_their_place(tmp_path):
    write_volume_folder(tmp_path / "a", count=10)
    write_volume_folder(tmp_path / "b", count=10)
    write_volume_folder(tmp_path / "c", count=11)
    a, b, c = (load_dataset(str(tmp_path / name)) for name in "abc")
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    (tmp_path / "b" / "scans" / "case3.npy").rename(tmp_path / "b" / "scans" / "case3b.npy")
    labels = tmp_path / "b" / "labels.csv"
    labels.write_text(labels.read_text().replace("case3.npy", "case3b.npy"))
    assert load_dataset(str(tmp_path / "b")).fingerprint() != a.fingerprint()  # a renamed sample
    assert load_dataset("digits").fingerprint() == load_dataset("digits").fingerprint() != \
        load_dataset("synthetic3d").fingerprint()
    assert a.limit(3, 1).fingerprints() == a.fingerprints()  # of the data as loaded
    # a training sample's size left out (one that could not be read, since repaired): any size, not its name
    name = a.train_sample_names([0])[0]
    assert a.limit(3, None).train_sample_names([0]) == [name] and a.train_sample_names(range(len(a.train)))[0] == name
    before, unsized = a.fingerprints(), a.fingerprints([name])
    assert unsized != before and load_dataset("digits").train_sample_names([0]) == []
    with open(a.train.samples[0][0], "ab") as f:  # (fingerprints read the sizes when called)
        f.write(b"\0")
    assert a.fingerprints() != before and a.fingerprints([name]) == unsized
    (tmp_path / "a" / "scans" / "case3.npy").unlink()
    with pytest.raises(DatasetError, match="cannot read .*case3.npy \\(No such file or directory\\)"):
        a.fingerprint()
