"""The trainer (``python -m densenet_fast train``): training on each kind of
dataset, resume, Ctrl-C, errors, memory budgets, mixed precision, volumes, and
DDP on 2 gloo processes (the datasets themselves: tests/test_data.py).

Runs are tiny (DenseNet-BC depth 10, growth rate 4, a few hundred digits) so
the file takes well under a minute or two on 2 CPU cores.
"""

from __future__ import annotations

import csv
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from densenet_fast import DenseNet, cli, densenet_bc, load_torchvision_weights, memory, plan
from densenet_fast import train as trainer
from densenet_fast.data import AS_FLOAT32, Augmentation, DatasetError, ShardedBatchSampler, load_dataset
from dataset_files import write_cifar, write_images, write_volume_folder

try:
    import nibabel
except ImportError:
    nibabel = None

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--no-progress", "--depth", "10", "--growth-rate", "4", "--train-limit", "128", "--test-limit", "64",
        "--batch-size", "32"]
SYNC_BN_MISSING = not hasattr(DenseNet, "set_sync_group")
LOSS_COLUMNS = ("epoch", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy")


def train(out, *options: str) -> int:
    return cli.main(["train", *TINY, "--out", str(out), *options])


def stopping_at_check(check: int):
    """A stand-in for the trainer's ``_check_step`` that asks it to stop at its
    check ``check``, counted from 0 over the run (an epoch of n steps has n + 1:
    one before each step and one after the last)."""
    checks = iter(range(10**6))
    return lambda stop, unreadable, procs: (next(checks) == check, unreadable)


@pytest.fixture(autouse=True)
def mmap_threshold_calls(monkeypatch) -> list[int]:
    """The in-process trainer's calls of set_mmap_threshold (under --memory-budget
    on the CPU), recorded and taken as made, instead of changing this test
    process's allocator for good (tests/test_memory.py checks the real one)."""
    calls, prepared = [], []

    def record(nbytes: int = memory.CPU_HEAP_BELOW) -> bool:
        assert not prepared, "set before the data and the model exist"
        calls.append(nbytes)
        monkeypatch.setattr(memory, "_mmap_threshold", nbytes)
        return True

    def prepare(*args, _prepare=trainer.prepare):
        prepared.append(True)
        return _prepare(*args)

    def run(*args, _train=trainer._train):  # a run starts with nothing prepared
        prepared.clear()
        return _train(*args)

    monkeypatch.setattr(trainer, "set_mmap_threshold", record)
    monkeypatch.setattr(trainer, "prepare", prepare)
    monkeypatch.setattr(trainer, "_train", run)
    monkeypatch.setattr(memory, "_mmap_threshold", None)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    return calls


def metrics(out) -> list[dict]:
    with open(os.path.join(out, trainer.METRICS)) as f:
        return [{k: row[k] for k in LOSS_COLUMNS} for row in csv.DictReader(f)]


def subprocess_env() -> dict:
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


# -- command line ------------------------------------------------------------------------------
def test_help_documents_every_option(capsys):
    parser = cli.build_parser("train")
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    undocumented = [a.option_strings for a in train_parser._actions if a.option_strings and not a.help]
    assert not undocumented
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in train_parser._actions:
        for option in action.option_strings:
            assert option in text


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "resnet50"], "invalid choice"),
    (["train", "--no-such-option"], "densenet_fast train: error: unrecognized arguments: --no-such-option"),
    (["plan", "extra"], "usage: python -m densenet_fast plan [-h]"),
    (["plan", "--backend", "None"], "argument --backend: invalid choice: 'None' (choose from"),  # (as train's)
    (["--bogus", "plan"], "usage: python -m densenet_fast [-h] command"),
    # a command's option before it: named alone, not with every option after it
    (["--no-progress", "train", "--epochs", "1"], "densenet_fast: error: unrecognized arguments: --no-progress\n"),
    (["bench", "models", "extra", "--x"], "densenet_fast bench models: error: unrecognized arguments: extra --x"),
    (["frobnicate"], "invalid choice"),
])
def test_unknown_model_option_or_command_is_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--model", "densenet121", "--depth", "40"], "--depth and --growth-rate apply to densenet_bc only"),
    (["--depth", "11"], "6n + 4"),
    (["--batch-size", "5000"], "lower --batch-size"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--test-limit", "0"], "--test-limit must be at least 1"),
    (["--train-limit", "-5"], "--train-limit must be at least 1"),
    (["--data", "/no/such/dataset"], "not found"),
    (["--lr", "nan"], "--lr must be a positive finite number"),
    (["--lr", "inf"], "--lr must be a positive finite number"),
    (["--lr", "-0.1"], "--lr must be a positive finite number"),
    (["--momentum", "nan"], "--momentum must be at least 0 and below 1"),
    (["--momentum", "1"], "--momentum must be at least 0 and below 1"),
    (["--momentum", "-0.9"], "--momentum must be at least 0 and below 1"),
    (["--momentum", "0"], "--momentum 0 needs --no-nesterov"),
    (["--drop-rate", "1"], "--drop-rate must be at least 0 and below 1"),
    (["--drop-rate=-0.1"], "--drop-rate must be at least 0 and below 1"),
    (["--drop-rate", "nan"], "--drop-rate must be at least 0 and below 1"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number, 0 or more"),
    (["--weight-decay=-1e-4"], "--weight-decay must be a finite number, 0 or more"),
    (["--seed", "-1"], "--seed must be from 0 to 2147483647"),
    (["--memory-budget", "lots"], "--memory-budget: cannot read 'lots' as a memory size"),
    (["--recompute", "auto"], "--recompute auto needs --memory-budget"),
    (["--image-size", "64"], "dataset 'digits' is not resized to --image-size"),  # it was ignored
    (["--volume-size", "16"], "dataset 'digits' is not resized to --volume-size"),
    (["--data", "synthetic3d", "--image-size", "16"], "dataset 'synthetic3d' is not resized to --image-size"),
])
def test_bad_options_give_one_line_errors_before_any_work(tmp_path, options, message, capsys):
    assert train(tmp_path / "run", *options) == 2
    captured = capsys.readouterr()
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1
    assert captured.out == ""  # nothing trained, not even the first log line


def test_largest_seed_trains(tmp_path):
    assert train(tmp_path / "run", "--epochs", "1", "--seed", str(2**31 - 1)) == 0  # within numpy's range


# -- datasets (loading them: tests/test_data.py) -------------------------------------------------
def test_trains_on_a_cifar10_directory(tmp_path):
    write_cifar(tmp_path / "cifar", per_batch=16)
    assert train(tmp_path / "run", "--data", str(tmp_path / "cifar"), "--epochs", "1") == 0
    assert len(metrics(tmp_path / "run")) == 1


def test_image_folder_tree(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 5), ("val", 2)):
        for name in ("cat", "dog", "emu"):
            os.makedirs(tmp_path / "tree" / split / name)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(int(rng.integers(12, 30)), int(rng.integers(12, 30)), 3))
                Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "tree" / split / name / f"{i}.png")
    (tmp_path / "tree" / "train" / "cat" / "notes.txt").write_text("not an image")
    data = load_dataset(str(tmp_path / "tree"), image_size=16)
    assert data.name == "imagefolder" and data.num_classes == 3
    assert (len(data.train), len(data.test)) == (15, 6)
    image, label = data.train[5]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 1 and data.size == (16, 16)
    assert train(tmp_path / "run", "--data", str(tmp_path / "tree"), "--image-size", "16", "--batch-size", "4",
                 "--epochs", "1") == 0
    assert train(tmp_path / "small", "--data", str(tmp_path / "tree"), "--image-size", "16", "--model",
                 "densenet121") == 2  # refused before any work (test_images_too_small_are_refused_before_any_work)
    assert not (tmp_path / "small").exists()
    capsys.readouterr()
    assert train(tmp_path / "huge", "--data", str(tmp_path / "tree"), "--image-size", "100000") == 2
    err = capsys.readouterr().err  # (it was killed for memory in the middle of the first batch)
    assert re.fullmatch(r"error: a batch of 32 images of 100000x100000 take 3\.58e\+03 GiB as float32, more than "
                        r"the [\d.]+ GiB of memory available; choose a smaller size\n", err), err
    assert not (tmp_path / "huge").exists()
    assert multiprocessing.active_children() == []  # the loaders' workers (two by default) ended with the run
    # a single class tree gets a stratified 20% held out
    single = load_dataset(str(tmp_path / "tree" / "train"), image_size=8)
    assert (len(single.train), len(single.test)) == (12, 3)
    assert sorted(label for _, label in single.test.samples) == [0, 1, 2]


def test_a_test_sample_that_cannot_be_read_keeps_the_epoch_trained(tmp_path, capsys):
    """The epoch's training is checkpointed before the error (it was lost);
    once the sample is gone, --resume evaluates that epoch and trains on (the
    test split changed, the training split did not)."""
    write_images(tmp_path / "tree", {"train/cat": 6, "train/dog": 6, "val/cat": 2, "val/dog": 2})
    bad = tmp_path / "tree" / "val" / "dog" / "bad.png"
    bad.write_bytes(b"not an image")
    options = ["--data", str(tmp_path / "tree"), "--image-size", "8", "--batch-size", "4", "--epochs", "2",
               "--workers", "1"]
    assert train(tmp_path / "run", *options) == 1
    assert multiprocessing.active_children() == []  # the test loader's worker ended with the run
    err = capsys.readouterr().err
    assert f"cannot read image {bad}" in err and "epoch 1's training is saved in" in err, err
    bad.unlink()
    assert train(tmp_path / "run", *options, "--resume") == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "at epoch 1, step 3" in out and "the test split differs" in out, out
    assert [row["epoch"] for row in metrics(tmp_path / "run")] == ["1", "2"]
    assert "(4 held-out images)" in out


def training_images_of_step(tree, step: int, batch_size: int, train_limit: int, rank: int = 0, world_size: int = 1):
    """The files of process ``rank``'s training images of ``step`` of epoch 1, in
    order (seed 0, ``batch_size`` per process, the tree's first ``train_limit``)."""
    data = load_dataset(str(tree), image_size=8).limit(train_limit, None)
    sampler = ShardedBatchSampler(len(data.train), batch_size, shuffle=True, drop_last=True, rank=rank,
                                  world_size=world_size)
    whole, indices = (data.train.dataset, data.train.indices) if isinstance(data.train, torch.utils.data.Subset) \
        else (data.train, range(len(data.train)))
    return [type(tree)(whole.samples[indices[index]][0]) for index in sampler.batch(step)]


def act_in_step(monkeypatch, step: int, action) -> None:
    """Run ``action()`` during the run's ``step``-th step (0 first, counted over
    epochs), after its batch was read (in its augmentation)."""
    steps, augment_batch = iter(range(10**6)), trainer.augment

    def augment(images, augmentation, generator):
        if next(steps) == step:
            action()
        return augment_batch(images, augmentation, generator)

    monkeypatch.setattr(trainer, "augment", augment)


def write_other_image(path) -> None:
    """A readable image at ``path`` of another size in bytes than the PNGs of write_images."""
    from PIL import Image

    Image.fromarray(np.arange(12 * 12 * 3, dtype=np.uint8).reshape(12, 12, 3)).save(path)


def test_a_training_sample_that_cannot_be_read_keeps_the_steps_before_it(tmp_path, capsys):
    """The steps of the epoch before the batch that holds them are checkpointed
    (they were lost), with the samples' names: once they are repaired, at
    another size in bytes, --resume trains on with the losses of a run that
    never met them; a resume where one is gone or another sample changed is
    refused, saying so."""
    write_images(tmp_path / "tree", {"train/cat": 8, "train/dog": 8, "val/cat": 2, "val/dog": 2})
    bad, second = training_images_of_step(tmp_path / "tree", 2, batch_size=4, train_limit=12)[:2]  # of a subset
    for path in (bad, second):
        write_other_image(path)
    shutil.copytree(tmp_path / "tree", tmp_path / "repaired")
    for path in (bad, second):
        path.write_bytes(b"not an image")
    names = [os.path.relpath(path, tmp_path / "tree" / "train") for path in (bad, second)]
    options = ["--data", str(tmp_path / "tree"), "--image-size", "8", "--batch-size", "4", "--epochs", "2",
               "--workers", "1", "--train-limit", "12"]
    assert train(tmp_path / "run", *options, "--overwrite") == 1
    assert multiprocessing.active_children() == []
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read image {bad}") and err.endswith(
        f" (this step's samples that cannot be read: {names[0]}, {names[1]}); the training before it is saved in "
        f"{tmp_path / 'run'} (epoch 1, step 2 of 3): once the sample is repaired, the same command without "
        f"--overwrite and --out {tmp_path / 'run'} --resume trains on from there\n"), err
    checkpoint = torch.load(tmp_path / "run" / trainer.CHECKPOINT, weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (0, 2)
    assert checkpoint["unreadable"]["samples"] == names
    assert train(tmp_path / "run", *options, "--resume") == 1  # not repaired yet: the same error, nothing lost
    assert "(epoch 1, step 2 of 3)" in capsys.readouterr().err
    shutil.copy(tmp_path / "repaired" / bad.relative_to(tmp_path / "tree"), bad)
    assert bad.stat().st_size != len(b"not an image")
    second.unlink()  # removed, not repaired: another training split
    assert train(tmp_path / "run", *options, "--resume") == 2
    assert f"written where {names[0]}, {names[1]} could not be read: repaired, at any size, it resumes, but not " \
           f"removed" in capsys.readouterr().err
    shutil.copy(tmp_path / "repaired" / second.relative_to(tmp_path / "tree"), second)
    assert train(tmp_path / "run", *options, "--resume", "--lr", "0.2") == 2  # a difference of another kind
    assert "could not be read" not in capsys.readouterr().err
    other = tmp_path / "tree" / "train" / "cat" / "7.png"
    with open(other, "ab") as f:  # another training sample resized as well: other data
        f.write(b"\0")
    assert train(tmp_path / "run", *options, "--resume") == 2
    assert "data_fingerprint is " in capsys.readouterr().err
    shutil.copy(tmp_path / "repaired" / "train" / "cat" / "7.png", other)
    assert train(tmp_path / "run", *options, "--resume") == 0
    out = capsys.readouterr().out
    assert "at epoch 1, step 2" in out and f"could not be read when the checkpoint was written: " \
        f"{names[0]}, {names[1]}" in out and "test split differs" not in out, out
    options[1] = str(tmp_path / "repaired")
    assert train(tmp_path / "whole", *options) == 0
    assert metrics(tmp_path / "run") == metrics(tmp_path / "whole")


def test_a_file_changed_before_an_unreadable_sample_is_refused_on_resume(tmp_path, monkeypatch, capsys):
    """A training file resized during the run, before a sample of step 2 is
    found unreadable: that checkpoint's fingerprints are of the data as loaded,
    so its resume is refused as a stop's would be (fingerprints made when the
    sample failed let the change through)."""
    write_images(tmp_path / "tree", {"train/cat": 8, "train/dog": 8, "val/cat": 2, "val/dog": 2})
    first, bad = (training_images_of_step(tmp_path / "tree", step, batch_size=4, train_limit=16)[0] for step in (0, 2))
    original = bad.read_bytes()
    bad.write_bytes(b"not an image")
    act_in_step(monkeypatch, 1, lambda: first.write_bytes(first.read_bytes() + b"\0"))  # trained on in step 0
    options = ["--data", str(tmp_path / "tree"), "--image-size", "8", "--batch-size", "4", "--workers", "0"]
    assert train(tmp_path / "run", *options) == 1
    assert "(epoch 1, step 2 of 4)" in capsys.readouterr().err
    monkeypatch.undo()
    bad.write_bytes(original)
    assert train(tmp_path / "run", *options, "--resume") == 2
    assert "data_fingerprint is " in capsys.readouterr().err


def test_a_stop_reads_no_further_batch(tmp_path, monkeypatch, capsys):
    """A Ctrl-C during step 2 stops after it without reading batch 3 (which
    cannot be read here: the stop would have become that error, and a slow
    read would have delayed it)."""
    write_images(tmp_path / "tree", {"train/cat": 8, "train/dog": 8, "val/cat": 2, "val/dog": 2})
    training_images_of_step(tmp_path / "tree", 2, batch_size=4, train_limit=16)[0].write_bytes(b"not an image")
    act_in_step(monkeypatch, 1, lambda: os.kill(os.getpid(), signal.SIGINT))  # (the trainer's handler stops)
    assert train(tmp_path / "run", "--data", str(tmp_path / "tree"), "--image-size", "8", "--batch-size", "4",
                 "--workers", "0") == 130
    assert "stopping after this step" in capsys.readouterr().err
    assert torch.load(tmp_path / "run" / trainer.CHECKPOINT, weights_only=True)["step"] == 2


def test_a_data_folder_gone_mid_epoch_keeps_the_steps_before_it(tmp_path, monkeypatch, capsys):
    """Every file gone (an unmounted disk) after step 2 of epoch 2: the steps
    before step 3 are checkpointed all the same (the data's fingerprints are
    made from the files' sizes as loaded), and once the folder is back,
    --resume ends with the losses of an uninterrupted run."""
    write_images(tmp_path / "tree", {"train/cat": 8, "train/dog": 8, "val/cat": 2, "val/dog": 2})
    options = ["--data", str(tmp_path / "tree"), "--image-size", "8", "--batch-size", "4", "--epochs", "2",
               "--workers", "0"]
    assert train(tmp_path / "whole", *options) == 0
    # step 2 of epoch 2 (of 4); the loader reads each batch when asked
    act_in_step(monkeypatch, 4 + 2, lambda: (tmp_path / "tree").rename(tmp_path / "away"))
    assert train(tmp_path / "run", *options) == 1
    err = capsys.readouterr().err
    assert f"error: cannot read image {tmp_path / 'tree'}" in err and "this step's samples that cannot be read" in err
    assert "(epoch 2, step 3 of 4)" in err, err
    checkpoint = torch.load(tmp_path / "run" / trainer.CHECKPOINT, weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 3) and len(checkpoint["unreadable"]["samples"]) == 4
    monkeypatch.undo()
    (tmp_path / "away").rename(tmp_path / "tree")
    assert train(tmp_path / "run", *options, "--resume") == 0
    assert metrics(tmp_path / "run") == metrics(tmp_path / "whole")


def test_an_output_directory_inside_the_data_is_refused(tmp_path, monkeypatch, capsys):
    """An image tree would read a run's curves.png as an image of a class named
    after its folder (with --data . the default runs/ became a class)."""
    write_images(tmp_path / "tree", {"cat": 10, "dog": 10})
    options = ["--image-size", "8", "--batch-size", "4", "--epochs", "1"]
    assert cli.main(["train", *TINY, "--data", str(tmp_path / "tree"), "--out", str(tmp_path / "tree" / "run"),
                     *options]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --out {tmp_path / 'tree' / 'run'} lies inside --data "
                                               f"{tmp_path / 'tree'}: the run's files would become part of the "
                                               f"dataset; choose an --out outside it")
    monkeypatch.chdir(tmp_path / "tree")
    assert cli.main(["train", *TINY, "--data", ".", *options]) == 2
    assert "error: the default --out (under runs/) lies inside --data ." in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "tree")) == ["cat", "dog"]
    assert cli.main(["train", *TINY, "--data", ".", "--out", str(tmp_path / "run"), *options]) == 0


def test_a_ctrl_c_outside_the_steps_is_one_line(tmp_path, monkeypatch, capsys):
    """While the data loads (the first Ctrl-C of a step stops after it): no
    traceback, exit status 130."""
    monkeypatch.setattr(trainer, "load_dataset", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    assert train(tmp_path / "run") == 130
    assert capsys.readouterr().err == "\ntrain: aborted (Ctrl-C)\n"


def test_a_resume_with_another_test_limit_says_so(tmp_path, capsys):
    """Where the samples differ: two limits beyond the test split's size are the same."""
    assert train(tmp_path / "run", "--epochs", "1") == 0
    assert train(tmp_path / "run", "--epochs", "2", "--resume", "--test-limit", "32") == 0
    assert "the test split differs from the checkpoint's (--test-limit 32 now, --test-limit 64 then): the 1 epoch " \
           "before were tested on other samples" in capsys.readouterr().out
    assert train(tmp_path / "run", "--epochs", "3", "--resume", "--test-limit", "100000") == 0
    assert "(--test-limit 100000 now, --test-limit 32 then)" in capsys.readouterr().out
    assert train(tmp_path / "run", "--epochs", "4", "--resume", "--test-limit", "360") == 0  # (digits holds 360)
    assert "test split differs" not in capsys.readouterr().out


def test_a_step_beyond_the_memory_available_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """On the CPU without --memory-budget (the kernel kills such a run without
    a word), by the memory model's prediction, saying the largest batches that
    fit; one of them trains."""
    monkeypatch.setattr(trainer, "available_memory_bytes", lambda: 12 * 2**20)
    recipe = ["--depth", "40", "--growth-rate", "12", "--epochs", "1"]
    assert train(tmp_path / "run", *recipe, "--batch-size", "128") == 2
    err = capsys.readouterr().err.strip()
    predicted = plan(densenet_bc(40, 12, num_classes=10, in_channels=1), batch=128, image_size=8)
    keep = memory.format_bytes(predicted["policies"]["keep"]["total_bytes"])
    assert err == (f"error: a training step of batch 128 with --recompute keep needs about {keep} (the memory "
                   f"model's prediction), "
                   f"more than the 12 MiB of memory available (--recompute keep: the largest batch that fits is 60; "
                   f"--recompute recompute: the largest batch that fits is 102; --memory-budget plans it)"), err
    assert not (tmp_path / "run").exists()
    assert train(tmp_path / "run", *recipe, "--batch-size", "128", "--recompute", "recompute") == 2
    assert train(tmp_path / "run", *recipe, "--batch-size", "102", "--recompute", "recompute") == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # this machine's processes of a torchrun launch share its memory
    assert train(tmp_path / "two", *recipe, "--batch-size", "102", "--recompute", "recompute") == 2
    assert " for each of 2 processes on this machine)" in capsys.readouterr().err


# -- learning rate ---------------------------------------------------------------------------------
def test_learning_rate_schedules():
    step = trainer.learning_rate_factor("step", 100, 10)
    assert [step(s) for s in (0, 499, 500, 749, 750, 999)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cosine = trainer.learning_rate_factor("cosine", 10, 7)
    assert [cosine(s) for s in (0, 35, 70)] == pytest.approx([1, 0.5, 0])


# -- resume and interruption ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Per-epoch metrics of an uninterrupted 3-epoch run."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert train(out, "--epochs", "3") == 0
    return metrics(out)


def test_resume_at_an_epoch_boundary_repeats_the_same_losses(tmp_path, uninterrupted, monkeypatch):
    """The same losses; the optimizer's last learning rate is the one metrics.csv
    gives for the last epoch (the schedule counts the steps of earlier epochs),
    and the resumed run's random generators are the checkpoint's."""
    out = tmp_path / "run"
    assert train(out, "--epochs", "1") == 0
    saved = torch.load(out / trainer.CHECKPOINT, weights_only=False)["rng"][0]
    resumed = []
    distribute = trainer.distribute
    monkeypatch.setattr(trainer, "distribute", lambda run: (resumed.append(trainer.rng_state()), distribute(run))[1])
    assert train(out, "--epochs", "3", "--resume") == 0
    assert metrics(out) == uninterrupted
    last_lr = torch.load(out / trainer.CHECKPOINT, weights_only=True)["optimizer"]["param_groups"][0]["lr"]
    assert last_lr == pytest.approx(float(uninterrupted[-1]["lr"]))
    assert torch.equal(resumed[0]["torch"], saved["torch"]) and resumed[0]["python"] == saved["python"]
    assert torch.equal(resumed[0]["numpy"][1], saved["numpy"][1])


def test_a_checkpoint_gives_its_model_as_weights(tmp_path):
    """``weights=`` / load_torchvision_weights take the trainer's checkpoint.pt:
    its model's state_dict, not the whole checkpoint (every key missing)."""
    out = tmp_path / "run"
    assert train(out, "--epochs", "1") == 0
    checkpoint = torch.load(out / trainer.CHECKPOINT, weights_only=True)
    model = load_torchvision_weights(trainer.build_model(checkpoint["options"]), out / trainer.CHECKPOINT)
    for name, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["model"][name]), name
    torch.save({**checkpoint, "format": "densenet_fast.train/0"}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="a densenet_fast training checkpoint of format 'densenet_fast.train/0'; "
                                         "this version reads 'densenet_fast.train/1'"):
        load_torchvision_weights(model, tmp_path / "old.pt")


def test_stop_mid_epoch_and_resume_repeats_the_same_losses(tmp_path, uninterrupted, monkeypatch, capsys):
    monkeypatch.setattr(trainer, "_check_step", stopping_at_check(7))  # before step 3 of epoch 2 (of 4)
    out = tmp_path / "run"
    assert train(out, "--epochs", "3", "--overwrite") == 130
    # (--overwrite and --resume exclude each other)
    assert f"continue with the same command without --overwrite and --out {out} --resume" in \
        capsys.readouterr().out
    checkpoint = torch.load(out / trainer.CHECKPOINT, weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 2) and checkpoint["partial_seconds"] > 0
    monkeypatch.undo()
    # without --epochs: the checkpoint's 3, not the dataset's default (whose schedule moved the learning rate)
    assert train(out, "--resume") == 0
    assert "training to the checkpoint's 3 epochs (--epochs to change)" in capsys.readouterr().out
    assert metrics(out) == uninterrupted
    with open(out / trainer.METRICS) as f:  # the epoch's time and speed count its steps before the stop too
        second = list(csv.DictReader(f))[1]
    assert float(second["seconds"]) > checkpoint["partial_seconds"]
    assert float(second["images_per_s"]) == pytest.approx(128 // 32 * 32 / float(second["seconds"]), rel=1e-3)


def test_two_stops_in_one_epoch_repeat_the_same_losses(tmp_path, uninterrupted, monkeypatch):
    """The second stop's checkpoint holds the sums of both parts of the epoch
    (a stop that kept only its own part changed the epoch's train loss)."""
    out = tmp_path / "run"
    for stop_at in (7, 1):  # before step 3 of epoch 2, then before the step after it
        monkeypatch.setattr(trainer, "_check_step", stopping_at_check(stop_at))
        assert train(out, "--epochs", "3", *(["--resume"] if stop_at == 1 else [])) == 130
    assert torch.load(out / trainer.CHECKPOINT, weights_only=True)["step"] == 3
    monkeypatch.undo()
    assert train(out, "--resume") == 0
    assert metrics(out) == uninterrupted


def test_dropout_trains_and_resumes_a_stop_with_the_same_losses(tmp_path, monkeypatch, capsys):
    """``--drop-rate``: every dense layer drops with it (the masks follow torch's
    generator, which a checkpoint restores, so a stop mid-epoch resumes with
    the same losses); a resume with another rate is refused, and a checkpoint
    from before the option resumes as the dropout-free run it was."""
    assert train(tmp_path / "whole", "--epochs", "2", "--drop-rate", "0.3") == 0
    assert ", dropout 0.3, " in capsys.readouterr().out
    monkeypatch.setattr(trainer, "_check_step", stopping_at_check(3))  # before step 4 of epoch 1
    out = tmp_path / "halves"
    assert train(out, "--epochs", "2", "--drop-rate", "0.3") == 130
    monkeypatch.undo()
    checkpoint = torch.load(out / trainer.CHECKPOINT, weights_only=True)
    model = trainer.build_model(checkpoint["options"])
    assert {layer.drop_rate for block in model.blocks() for layer in block.children()} == {0.3}
    volumes = trainer.build_volume_model({**checkpoint["options"], "in_channels": 1})  # MONAI's: whole channels
    assert {(type(m), m.p) for m in volumes.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)} == \
        {(torch.nn.Dropout3d, 0.3)}
    assert train(out, "--resume") == 2
    assert "drop_rate is 0.3 in the checkpoint but 0.0 now" in capsys.readouterr().err
    assert train(out, "--resume", "--drop-rate", "0.3") == 0
    assert metrics(out) == metrics(tmp_path / "whole")
    assert train(tmp_path / "plain", "--epochs", "2") == 0
    assert metrics(tmp_path / "plain") != metrics(out)  # (the masks changed the losses)
    old = tmp_path / "old"  # options without drop_rate: a run before the option, which had no dropout
    assert train(old, "--epochs", "1") == 0
    checkpoint = torch.load(old / trainer.CHECKPOINT, weights_only=True)
    del checkpoint["options"]["drop_rate"]
    torch.save(checkpoint, old / trainer.CHECKPOINT)
    assert train(old, "--epochs", "2", "--resume", "--drop-rate", "0.3") == 2
    assert "drop_rate is 0.0 in the checkpoint but 0.3 now" in capsys.readouterr().err
    assert train(old, "--epochs", "2", "--resume") == 0


def test_each_step_augments_with_a_generator_of_its_own(tmp_path, monkeypatch):
    """Every step of every epoch draws its crops from its own seed (one that
    ignored the epoch repeated epoch 1's crops in every epoch)."""
    seeds = []
    augment_batch = trainer.augment
    monkeypatch.setattr(trainer, "augment", lambda images, augmentation, generator: (
        seeds.append(generator.initial_seed()), augment_batch(images, augmentation, generator))[1])
    assert train(tmp_path / "run", "--epochs", "2") == 0
    assert len(seeds) == len(set(seeds)) == 2 * 128 // 32


def test_a_stop_saves_no_diverged_weights(tmp_path, monkeypatch, capsys):
    """A stop between the every-10-steps checks of the weights: the checkpoint
    it would save is refused, as any of diverged weights is."""
    monkeypatch.setattr(trainer, "_check_step", stopping_at_check(10))
    assert train(tmp_path / "run", "--epochs", "2", "--lr", "1e30", "--train-limit", "512") == 1
    assert "training diverged in epoch 1" in capsys.readouterr().err
    assert not (tmp_path / "run" / trainer.CHECKPOINT).exists()


def test_a_checkpoint_without_partial_seconds_resumes(tmp_path, uninterrupted, monkeypatch):
    """A checkpoint stopped mid-epoch by a version before partial_seconds: the
    same losses, and the epoch's speed from this run's steps alone."""
    monkeypatch.setattr(trainer, "_check_step", stopping_at_check(7))
    out = tmp_path / "run"
    assert train(out, "--epochs", "3") == 130
    monkeypatch.undo()
    checkpoint = torch.load(out / trainer.CHECKPOINT, weights_only=True)
    del checkpoint["partial_seconds"]
    torch.save(checkpoint, out / trainer.CHECKPOINT)
    assert train(out, "--resume") == 0
    assert metrics(out) == uninterrupted
    with open(out / trainer.METRICS) as f:
        second = list(csv.DictReader(f))[1]
    assert float(second["images_per_s"]) == pytest.approx(2 * 32 / float(second["seconds"]), rel=1e-3)


def test_ctrl_c_saves_and_exits_cleanly(tmp_path, uninterrupted):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "densenet_fast", "train", *TINY, "--out", str(out), "--epochs", "3"]
    process = subprocess.Popen(command, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # interrupt during the second epoch
        if line.startswith("epoch 1/3"):
            process.send_signal(signal.SIGINT)
            break
    stdout, stderr = process.communicate(timeout=120)
    assert "Traceback" not in stderr
    checkpoint = torch.load(out / trainer.CHECKPOINT, weights_only=True)
    if process.returncode == 130:
        assert "SIGINT: stopping after this step" in stderr and "--resume" in stdout
        assert checkpoint["epoch"] >= 1
    else:  # the run ended before the signal arrived
        assert process.returncode == 0 and checkpoint["epoch"] == 3
    assert train(out, "--epochs", "3", "--resume") == 0
    assert metrics(out) == uninterrupted
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_ctrl_c_while_plotting_is_handled(tmp_path, monkeypatch, capsys):
    from matplotlib.figure import Figure

    def interrupted_savefig(figure, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a png")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted_savefig)
    out = tmp_path / "run"
    try:
        status = train(out, "--epochs", "1")
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C while plotting escaped as a KeyboardInterrupt (a traceback)")
    captured = capsys.readouterr()
    assert status == 130 and "SIGINT: stopped plotting" in captured.err and "--resume" in captured.out
    assert sorted(os.listdir(out)) == [trainer.CHECKPOINT, trainer.METRICS]  # no partial curves.png
    monkeypatch.undo()
    assert train(out, "--epochs", "1", "--resume") == 0  # nothing left to train: plots
    assert (out / trainer.CURVES).stat().st_size > 0


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    trainer.save_atomically({"value": torch.arange(3)}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(trainer.OutputError, match="cannot write .*checkpoint.pt \\(disk full; .* free there\\); the "
                                                  "file there"):
        trainer.save_atomically({"value": torch.arange(5)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["value"], torch.arange(3))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_full_disk_mid_run_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train(out, "--epochs", "1") == 0
    before = (out / trainer.CHECKPOINT).read_bytes()

    def full(obj, f):  # what torch.save's zip writer raises when the disk fills
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 180160 vs 180048")

    monkeypatch.setattr(torch, "save", full)
    assert train(out, "--epochs", "2", "--resume") == 1  # a failure while it ran, not bad input
    err = capsys.readouterr().err
    assert re.search(r"cannot write .*checkpoint.pt \(torch.save: \[enforce fail at inline_container.cc:672\] "
                     r"\. unexpected pos 180160 vs 180048; [\d.]+ [KMGT]?i?B free there\); the file there before is "
                     r"intact$", err.strip()) and len(err.strip().splitlines()) == 1, err
    assert (out / trainer.CHECKPOINT).read_bytes() == before


def test_a_full_disk_writing_the_metrics_is_one_line(tmp_path, monkeypatch):
    """Saying that the file there before is intact only where there was one."""
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(trainer.OutputError, match="metrics.csv \\(No space left on device; .* free there\\)$"):
        trainer.write_metrics([], str(tmp_path))
    monkeypatch.undo()
    trainer.write_metrics([], str(tmp_path))
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(trainer.OutputError, match="metrics.csv \\(No space left on device; .* free there\\); the file "
                                                  "there before is intact$"):
        trainer.write_metrics([], str(tmp_path))


def test_a_diverged_run_stops_without_saving_its_weights(tmp_path, capsys):
    out = tmp_path / "new" / "folders" / "run"
    assert train(out, "--epochs", "2", "--lr", "1e30") == 1  # a failure while it ran, not bad input
    err = capsys.readouterr().err
    assert "training diverged in epoch 1: " in err and "nothing of it was saved" in err, err
    assert f"the files in {out}, if any, are from before" in err
    assert os.listdir(tmp_path) == []  # the folders it created, empty, are removed
    assert train(out, "--epochs", "1") == 0
    earlier = {name: (out / name).read_bytes() for name in os.listdir(out)}
    # 16 steps an epoch: found by the 11th (the weights are checked every 10 steps), not at the epoch's end
    assert train(out, "--epochs", "2", "--lr", "1e30", "--train-limit", "512", "--overwrite") == 1
    assert "training diverged in epoch 1, by step 11: " in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == earlier  # nothing replaced


def test_a_finite_step_check_costs_one_synchronisation_and_finds_any_non_finite_weight():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    assert trainer.weights_finite(model)
    for value in (math.nan, math.inf, -math.inf):
        with torch.no_grad():
            model[1].bias[1] = value
        assert not trainer.weights_finite(model)
    with torch.no_grad():
        model[1].bias[1] = 3e38  # finite, and its square overflows: a 2-norm would say infinite
    assert trainer.weights_finite(model)


def test_a_model_too_large_for_memory_is_one_line(tmp_path, monkeypatch, capsys):
    def too_large(options):  # what --growth-rate 100000 met on this machine (not allocated here: overcommit)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: not enough memory: you "
                           "tried to allocate 320000000000 bytes.")

    monkeypatch.setattr(trainer, "build_model", too_large)
    assert train(tmp_path / "run", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "the model does not fit in memory" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # a refused run leaves no directory behind


def test_a_stop_request_is_the_main_process_s_only():
    """A DataLoader worker forked from the trainer inherits its signal handler:
    there it does nothing (the main process stops the workers)."""
    with trainer.StopRequest() as stop:
        stop.pid = os.getpid() + 1  # as in a forked worker
        stop._handle(signal.SIGINT, None)
        assert not stop.requested
        stop.pid = os.getpid()
        stop._handle(signal.SIGINT, None)
        assert stop.requested


def test_outputs_are_never_overwritten_silently(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert train(out, "--epochs", "1") == 0
    assert (out / trainer.CURVES).stat().st_size > 0
    assert train(out, "--epochs", "1") == 2
    assert "pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert train(out, "--epochs", "1", "--overwrite", "--growth-rate", "0") == 2  # refused: nothing changes
    assert sorted(os.listdir(out)) == sorted([trainer.CHECKPOINT, trainer.METRICS, trainer.CURVES])
    earlier = {name: (out / name).read_bytes() for name in os.listdir(out)}
    with monkeypatch.context() as patch:  # a run that starts, then fails before it has anything to save
        patch.setattr(trainer, "train_epochs", lambda *args: (_ for _ in ()).throw(trainer.OutputError("full")))
        assert train(out, "--epochs", "1", "--overwrite") == 1
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == earlier  # the earlier run, intact
    with monkeypatch.context() as patch:  # stopped after its first checkpoint: the earlier metrics and curves go
        patch.setattr(trainer, "_check_step", lambda stop, unreadable, procs: (True, unreadable))
        assert train(out, "--epochs", "1", "--overwrite") == 130
    assert os.listdir(out) == [trainer.CHECKPOINT]  # none of the earlier run's files stays beside this one's
    # (a stop requested before the run's first step comes after it: a checkpoint of nothing trained would have
    # replaced the earlier run)
    assert torch.load(out / trainer.CHECKPOINT, weights_only=True)["step"] == 1
    assert train(out, "--epochs", "1", "--resume") == 0
    assert sorted(os.listdir(out)) == sorted([trainer.CHECKPOINT, trainer.METRICS, trainer.CURVES])
    (tmp_path / "odd" / trainer.CHECKPOINT).mkdir(parents=True)
    assert train(tmp_path / "odd", "--epochs", "1", "--overwrite") == 2
    assert f"{tmp_path / 'odd' / trainer.CHECKPOINT} is not a file" in capsys.readouterr().err
    assert train(tmp_path / "empty", "--resume") == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    assert train("", "--epochs", "1") == 2 and "--out is empty" in capsys.readouterr().err
    assert cli.main(["train", *TINY, "--resume"]) == 2  # not a new directory's name
    assert "--resume needs --out" in capsys.readouterr().err


def test_the_output_directory_is_judged_by_rank_0_for_every_process(tmp_path, monkeypatch):
    """Under torchrun rank 0 alone writes the outputs, and judges them for every
    process: one on another node that saw an earlier run's files refused alone,
    while rank 0 waited for it in the next collective."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / trainer.CHECKPOINT).write_bytes(b"an earlier run on this node only")
    options = dict(out=str(tmp_path / "run"), resume=False, overwrite=False)
    assert "already holds an earlier run" in trainer.output_problem(options)  # what this node would say
    gathered = []
    monkeypatch.setattr(trainer.Processes, "gather", lambda self, obj: gathered.append(obj) or [None, obj])
    trainer.check_output_directory(options, trainer.Processes(rank=1, world_size=2))  # rank 0 found no problem
    assert gathered == [None]
    monkeypatch.setattr(trainer.Processes, "gather", lambda self, obj: ["rank 0's verdict", obj])
    with pytest.raises(trainer.TrainingError, match="^rank 0's verdict$"):
        trainer.check_output_directory(options, trainer.Processes(rank=1, world_size=2))


def test_unwritable_output_directory_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("a regular file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out, problem in ((tmp_path / "file" / "run", f"{tmp_path / 'file'} is not a directory"),  # even for root
                         (tmp_path / "dangling" / "run", f"{tmp_path / 'dangling'} is a link to "
                                                         f"{tmp_path / 'nowhere'}, which does not exist"),
                         (tmp_path / "dangling", f"{tmp_path / 'dangling'} is a link to {tmp_path / 'nowhere'}, "
                                                 f"which does not exist"),
                         (tmp_path / "new" / ("x" * 300), "File name too long")):
        assert train(out, "--epochs", "1") == 2
        captured = capsys.readouterr()
        assert f"cannot write there ({problem})" in captured.err, captured.err
        assert len(captured.err.strip().splitlines()) == 1 and captured.out == ""
    assert sorted(os.listdir(tmp_path)) == ["dangling", "file"]  # the probe's folders are removed


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a directory without write permission")
def test_read_only_output_directory_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert train(out, "--epochs", "1") == 2
    finally:
        out.chmod(0o755)
    captured = capsys.readouterr()
    assert "cannot write there (Permission denied)" in captured.err and captured.out == ""


def test_incompatible_checkpoints_name_the_difference(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--epochs", "1") == 0
    capsys.readouterr()
    assert train(out, "--epochs", "2", "--resume", "--growth-rate", "6") == 2
    assert "growth_rate is 4 in the checkpoint but 6 now" in capsys.readouterr().err
    assert train(out, "--epochs", "2", "--resume", "--lr", "0.05") == 2
    assert "lr is 0.1 in the checkpoint but 0.05 now" in capsys.readouterr().err
    assert train(out, "--epochs", "2", "--resume", "--seed", "1") == 2  # (other data order and augmentation)
    assert "seed is 0 in the checkpoint but 1 now" in capsys.readouterr().err
    assert train(out, "--epochs", "1", "--resume", "--test-limit", "32") == 0  # nothing left to train
    assert "test accuracy" in (said := capsys.readouterr().out) and "(as the checkpoint recorded it)" in said
    assert train(out, "--epochs", "1", "--resume") == 0
    said = capsys.readouterr().out
    assert "the checkpoint has trained 1 epoch: nothing is left to train (a larger --epochs trains on)" in said
    assert "1 epoch of 4 steps" in said and "| 1 epoch, results in" in said  # (it said "1 epochs")
    assert said.index("1 epoch of 4 steps") < said.index("nothing is left")  # the header's schedule, overridden
    checkpoint = torch.load(out / trainer.CHECKPOINT, weights_only=True)
    del checkpoint["options"]["sample_size"]  # as written before the data path and size were compared
    checkpoint["options"]["data"] = "elsewhere"
    torch.save(checkpoint, out / trainer.CHECKPOINT)
    assert train(out, "--epochs", "1", "--resume") == 0
    path = out / trainer.CHECKPOINT
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model"]["classifier.weight"] = torch.zeros(3, 3)
    torch.save(checkpoint, path)
    assert train(out, "--epochs", "2", "--resume") == 2
    assert "classifier.weight has shape (3, 3) in the checkpoint but (10, 9) in the model" in capsys.readouterr().err


def test_damaged_checkpoints_give_one_line_errors(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--epochs", "1") == 0
    path = out / trainer.CHECKPOINT
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["optimizer"], checkpoint["rng"]
    torch.save(checkpoint, path)
    content = path.read_bytes()
    weight = checkpoint["model"]["features.conv0.weight"].numpy().tobytes()  # stored as is, after a zip header
    start = content.index(weight)
    flipped = content[:start] + bytes(b ^ 0xFF for b in weight[:16]) + content[start + 16:]
    damages = [("lacks rng, optimizer", None), ("cannot read checkpoint", b"not a checkpoint"),
               ("cannot read checkpoint", np.random.default_rng(0).bytes(4096)),
               ("does not match its checksum", flipped),  # torch.load reads it without a word
               ("damaged, or not a file torch.save wrote", content[:len(content) // 2])]  # cut short
    torch.utils.serialization.config.save.compute_crc32 = False  # no checksums to check: read as is
    try:
        torch.save({"value": torch.arange(3)}, tmp_path / "no_crc.pt")
    finally:
        torch.utils.serialization.config.save.compute_crc32 = True
    assert trainer.damaged_record(str(tmp_path / "no_crc.pt")) is None
    capsys.readouterr()
    for message, content in damages:
        if content is not None:
            path.write_bytes(content)
        assert train(out, "--epochs", "2", "--resume") == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


# -- memory budget ----------------------------------------------------------------------------------
def tiny_plan(budget=None, depth: int = 10) -> dict:
    """The planner on the TINY run's model and step (digits: 8x8, one channel, batch 32)."""
    from densenet_fast import plan
    from densenet_fast.memory import Architecture
    layers = (depth - 4) // 6
    arch = Architecture(4, (layers,) * 3, 8, num_classes=10, in_channels=1, stem="cifar")
    return plan(arch, batch=32, image_size=8, budget=budget)


def test_memory_budget_chooses_per_block_and_says_so(tmp_path, capsys, mmap_threshold_calls):
    """A budget between recompute's and keep's predicted peaks: the trainer plans
    before the first step, prints the planner's choice, and trains with it
    (depth 16: with one layer per block, recomputing saves nothing, as the
    layer's bottleneck needs a tensor of the same size in its backward).  On
    the CPU it first sets glibc's mmap threshold that the memory model assumes,
    and says so; without a budget it leaves the allocator alone."""
    assert train(tmp_path / "unplanned", "--epochs", "1") == 0
    assert mmap_threshold_calls == []
    keep, recompute = (tiny_plan(depth=16)["policies"][p]["total_bytes"] for p in ("keep", "recompute"))
    assert recompute < keep
    budget = (keep + recompute) // 2
    expected = tiny_plan(budget, depth=16)["policies"]["auto"]
    assert expected["fits"] and "recompute" in expected["policies"] and "keep" in expected["policies"]
    out = tmp_path / "run"
    assert train(out, "--depth", "16", "--epochs", "1", "--memory-budget", str(budget)) == 0
    log = capsys.readouterr().out
    line = next(line for line in log.splitlines() if line.startswith("memory plan"))
    assert f"recompute={tuple(expected['policies'])}" in line and "of the" in line and "step time" in line
    assert mmap_threshold_calls == [memory.CPU_HEAP_BELOW] and "glibc's mmap threshold is 64 KiB" in line
    assert torch.load(out / trainer.CHECKPOINT, weights_only=True)["options"]["memory_budget"] == str(budget)


def test_memory_budget_leaves_an_allocator_the_user_chose(tmp_path, capsys, monkeypatch, mmap_threshold_calls):
    """MALLOC_MMAP_THRESHOLD_ in the environment (glibc read it at start) is the
    user's choice: the trainer keeps it, and where it is not the threshold the
    memory model assumes, the model's warning says so."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(2 * memory.CPU_HEAP_BELOW))
    budget = tiny_plan(depth=16)["policies"]["keep"]["total_bytes"] * 2
    with pytest.warns(RuntimeWarning, match="assumes glibc's mmap threshold of 64 KiB.*started with "
                      "MALLOC_MMAP_THRESHOLD_='131072'"):
        assert train(tmp_path / "run", "--depth", "16", "--epochs", "1", "--memory-budget", str(budget)) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("memory plan"))
    assert mmap_threshold_calls == [] and "mmap threshold" not in line


def test_memory_budget_checks_a_fixed_policy_and_refuses_what_does_not_fit(tmp_path, capsys):
    keep = tiny_plan()["policies"]["keep"]["total_bytes"]
    assert train(tmp_path / "a", "--epochs", "1", "--memory-budget", str(keep), "--recompute", "keep") == 0
    assert "recompute=('keep', 'keep', 'keep')" in capsys.readouterr().out
    assert train(tmp_path / "b", "--epochs", "1", "--memory-budget", str(keep - 1), "--recompute", "keep") == 2
    err = capsys.readouterr().err
    assert "--memory-budget:" in err and "more than the memory budget" in err and "largest batch" in err
    assert len(err.strip().splitlines()) == 1
    assert train(tmp_path / "c", "--epochs", "1", "--memory-budget", "1KiB") == 2
    captured = capsys.readouterr()
    assert "not even a batch of 1 fits" in captured.err and "training " not in captured.out  # before the header


def test_each_run_gets_a_directory_of_its_own(tmp_path, monkeypatch, capsys):
    """Without --out every run has a new directory: two runs of one process in
    the same second get two (they shared one, the second's files replacing the
    first's), runs of two processes differ by process id, and a run whose name
    another run took meanwhile stops instead of writing into it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer.time, "strftime", lambda *args: "20261204-120000")
    run = ["train", *TINY, "--epochs", "1"]
    assert cli.main(run) == 0 and cli.main(run) == 0
    first = tmp_path / "runs" / f"digits-densenet_bc-10-4-20261204-120000-{os.getpid()}"
    second = first.with_name(first.name + "-2")
    assert sorted((tmp_path / "runs").iterdir()) == [first, second]
    assert all((d / "metrics.csv").exists() for d in (first, second))

    monkeypatch.setattr(trainer.os, "getpid", lambda: 4242)
    start_output = trainer.start_output

    def taken_meanwhile(options):
        os.mkdir(options["out"])  # by another process, between the name and the start
        start_output(options)

    monkeypatch.setattr(trainer, "start_output", taken_meanwhile)
    assert cli.main(run) == 1  # it failed as it started, not for its input
    assert re.search(r"error: cannot create runs/\S*-4242 \(File exists\)", capsys.readouterr().err)
    assert not any((tmp_path / "runs" / "digits-densenet_bc-10-4-20261204-120000-4242").iterdir())


def test_offload_needs_cuda(tmp_path, capsys):
    assert train(tmp_path / "run", "--epochs", "1", "--offload", "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert "--offload" in err and "needs CUDA" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model, image, lower", [("densenet121", 224, True), ("densenet_bc", 32, False)])
def test_the_offload_note_predicts_the_peak_with_and_without(model, image, lower):
    """The note gives the memory model's peak for the run's step offloaded and
    not: lower for DenseNet-121 on 224x224 (the stem's saved tensors, some 60
    MiB at batch 32, leave the GPU), about the same for DenseNet-BC-40 on 32x32
    (the first block's backward holds the peak either way)."""
    net = trainer.MODELS[model](num_classes=10, **({"depth": 40} if model == "densenet_bc" else {}))
    options = {"batch_size": 32, "amp": "bf16", "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True}
    run = SimpleNamespace(model=net, options=options, procs=SimpleNamespace(world_size=1),
                          data=SimpleNamespace(train=[(torch.empty(3, image, image), 0)]), device=torch.device("cuda"))
    note = trainer.offload_note(run)
    assert note.startswith(trainer.OFFLOAD_NOTE)
    offloaded, without = (memory.parse_bytes(text.replace(" ", "")) for text in
                          re.search(r": ([\d.]+ \w+) offloaded, ([\d.]+ \w+) without$", note).groups())
    assert (offloaded < 0.8 * without) if lower else (abs(offloaded / without - 1) < 0.05), note


@pytest.mark.gpu
def test_offload_trains_the_same_steps_on_cuda(tmp_path, capsys):
    """With --offload the saved tensors live in host memory between forward and
    backward; the run is the same one (losses equal up to kernel rounding)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    assert train(tmp_path / "plain", "--epochs", "1", "--device", "cuda") == 0
    assert train(tmp_path / "offload", "--epochs", "1", "--device", "cuda", "--offload") == 0
    assert trainer.OFFLOAD_NOTE in capsys.readouterr().out
    plain, offload = metrics(tmp_path / "plain"), metrics(tmp_path / "offload")
    assert float(offload[0]["train_loss"]) == pytest.approx(float(plain[0]["train_loss"]), rel=1e-3)


# -- precision and memory format -------------------------------------------------------------------
@pytest.mark.parametrize("options", [["--amp", "bf16", "--channels-last"], ["--amp", "fp16"],
                                     ["--schedule", "cosine", "--recompute", "recompute", "--backend", "torch"]])
def test_precision_format_and_recipe_options(tmp_path, options, capsys):
    out = tmp_path / "run"
    assert train(out, "--epochs", "2", *options) == 0
    rows = metrics(out)
    assert all(np.isfinite(float(r["train_loss"])) for r in rows)
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("done: test accuracy") and "images/s" in summary and "peak memory" in summary


# -- volumes (3-D) ---------------------------------------------------------------------------------
VOLUMES = ["--no-progress", "--depth", "10", "--growth-rate", "4", "--batch-size", "8", "--epochs", "1"]


def train_volumes(out, *options: str) -> int:
    return cli.main(["train", *VOLUMES, "--out", str(out), *options])


def test_volumes_beyond_the_memory_available_are_refused(tmp_path, capsys):
    assert train_volumes(tmp_path / "run", "--data", "synthetic3d", "--volume-size", "100000") == 2
    assert "300 volumes of 100000x100000x100000 (their copies and coordinate grid) take" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_batch_too_small_for_the_last_batchnorm_is_refused_before_any_work(tmp_path, capsys):
    """13^3 volumes leave one voxel per volume at DenseNet-BC's last BatchNorm:
    a training batch of one then gives it one value per channel (torch's error
    came mid-run, after the header); two volumes train."""
    assert train_volumes(tmp_path / "one", "--data", "synthetic3d", "--volume-size", "13", "--batch-size", "1") == 2
    captured = capsys.readouterr()
    assert "leaves one value per channel at DenseNet's last BatchNorm (1x1x1 per volume)" in captured.err, captured
    assert captured.out == "" and not (tmp_path / "one").exists()
    assert train_volumes(tmp_path / "two", "--data", "synthetic3d", "--volume-size", "13", "--batch-size", "2",
                         "--train-limit", "8", "--test-limit", "4") == 0


def test_trains_a_monai_densenet_on_synthetic3d(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_volumes(out, "--data", "synthetic3d", "--train-limit", "48", "--test-limit", "16",
                         "--epochs", "2") == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "training densenet_bc (3-D)" in first and "48 train / 16 test volumes of 16x16x16" in first
    rows = metrics(out)
    assert len(rows) == 2 and all(np.isfinite(float(r["train_loss"])) for r in rows)
    checkpoint = torch.load(out / trainer.CHECKPOINT, weights_only=True)
    assert checkpoint["options"]["spatial_dims"] == 3
    state = checkpoint["model"]
    assert "features.denseblock1.denselayer1.layers.conv2.weight" in state and "class_layers.out.weight" in state
    assert state["features.conv0.weight"].shape == (8, 1, 7, 7, 7)  # 2k stem channels, 7x7x7
    monai_nets = pytest.importorskip("monai.networks.nets")
    reference = monai_nets.DenseNet(spatial_dims=3, in_channels=1, out_channels=3, init_features=8, growth_rate=4,
                                    block_config=(1, 1, 1))
    reference.load_state_dict(state, strict=True)  # MONAI's own model takes the trained weights


def test_memory_budget_plans_volumes(tmp_path, capsys):
    """A budget between recompute's and keep's predicted peaks on synthetic3d (16^3
    volumes, one channel, batch 8, MONAI's DenseNet-BC-40 k=8): the trainer plans
    the 3-D step per block and trains; below recompute's peak it refuses in one line."""
    from densenet_fast import plan
    from densenet_fast.memory import Architecture
    arch = Architecture.named("densenet_bc", 40, 8, num_classes=3, in_channels=1, spatial_dims=3)
    keep, recompute = (plan(arch, batch=8, image_size=16)["policies"][p]["total_bytes"] for p in ("keep", "recompute"))
    assert recompute < keep
    expected = plan(arch, batch=8, image_size=16, budget=(keep + recompute) // 2)["policies"]["auto"]
    assert "recompute" in expected["policies"] and "keep" in expected["policies"]
    options = ["--data", "synthetic3d", "--train-limit", "16", "--test-limit", "8", "--depth", "40",
               "--growth-rate", "8"]
    assert train_volumes(tmp_path / "a", *options, "--memory-budget", str((keep + recompute) // 2)) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("memory plan"))
    assert f"recompute={tuple(expected['policies'])}" in line
    assert train_volumes(tmp_path / "b", *options, "--memory-budget", str(recompute - 1)) == 2
    err = capsys.readouterr().err
    assert "3-D DenseNet-BC-40 (k=8) at batch 8 of 16x16x16" in err and len(err.strip().splitlines()) == 1, err


def test_synthetic3d_resumes_exactly_with_channels_last(tmp_path, capsys):
    options = ["--data", "synthetic3d", "--train-limit", "24", "--test-limit", "8", "--channels-last"]
    assert train_volumes(tmp_path / "whole", *options, "--epochs", "2") == 0
    assert train_volumes(tmp_path / "halves", *options, "--epochs", "1") == 0
    assert train_volumes(tmp_path / "halves", *options, "--epochs", "2", "--resume") == 0
    assert metrics(tmp_path / "halves") == metrics(tmp_path / "whole")
    # other volumes are another dataset
    assert train_volumes(tmp_path / "halves", *options, "--epochs", "3", "--resume", "--volume-size", "20") == 2
    assert "sample_size is [16, 16, 16] in the checkpoint but [20, 20, 20] now" in capsys.readouterr().err


def test_trains_on_a_volume_folder_of_mixed_sizes_when_resized(tmp_path, capsys):
    write_volume_folder(tmp_path / "vols", sizes=[(14, 16, 18), (16, 16, 16)], count=10)
    assert train_volumes(tmp_path / "run", "--data", str(tmp_path / "vols")) == 2
    assert "volumes differ in size" in capsys.readouterr().err
    assert train_volumes(tmp_path / "run", "--data", str(tmp_path / "vols"), "--volume-size", "16", "16", "16",
                         "--workers", "0") == 0
    out = capsys.readouterr().out
    assert "8 train / 2 test volumes of 16x16x16" in out and " volumes/s " in out and "images/s" not in out
    write_volume_folder(tmp_path / "others", sizes=[(16, 16, 16)], count=10)  # the same shapes, other volumes
    assert train_volumes(tmp_path / "run", "--data", str(tmp_path / "others"), "--workers", "0", "--resume",
                         "--epochs", "2") == 2
    assert "data_fingerprint is " in capsys.readouterr().err  # volumes of other sizes in bytes


def test_medmnist3d_npz(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    arrays = {f"{split}_{kind}": (rng.integers(0, 256, (n, 16, 16, 16), dtype=np.uint8) if kind == "images"
                                  else rng.integers(0, 3, (n, 1)))
              for split, n in (("train", 16), ("val", 4), ("test", 8)) for kind in ("images", "labels")}
    np.savez(tmp_path / "organmnist3d.npz", **arrays)
    data = load_dataset(str(tmp_path / "organmnist3d.npz"))
    assert (data.name, data.size, data.spatial_dims, len(data.train), len(data.test)) == \
        ("organmnist3d", (16, 16, 16), 3, 16, 8)
    assert data.num_classes == int(max(arrays["train_labels"].max(), arrays["test_labels"].max())) + 1
    assert data.train.tensors[1].tolist() == arrays["train_labels"][:, 0].tolist()
    assert abs(data.train.tensors[0].mean()) < 1e-5
    assert data.augmentation == Augmentation(crop_padding=2, flip=False)  # no flips: left and right organs differ
    raw_train = torch.from_numpy(arrays["train_images"] / np.float32(255)).float()[:, None]
    torch.testing.assert_close(data.test.tensors[0], (torch.from_numpy(arrays["test_images"] / np.float32(255))
                                                      .float()[:, None] - raw_train.mean()) / raw_train.std())
    arrays["train_labels"][0] = (arrays["train_labels"][0] + 1) % 3  # relabelled, same shapes: another dataset
    np.savez(tmp_path / "relabelled.npz", **arrays)
    assert load_dataset(str(tmp_path / "relabelled.npz")).fingerprint() != data.fingerprint()
    # by name, in $MEDMNIST_ROOT (the medmnist package's file names); nothing downloaded
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path))
    assert load_dataset("organmnist3d").name == "organmnist3d"
    with pytest.raises(DatasetError, match="organmnist3d_64.npz not found, and the trainer downloads nothing"):
        load_dataset("organmnist3d_64")
    assert train_volumes(tmp_path / "run", "--data", "organmnist3d") == 0
    assert "on organmnist3d: 16 train / 8 test volumes of 16x16x16" in capsys.readouterr().out


def test_a_sample_a_loader_worker_cannot_read_is_named_in_one_line(tmp_path, capsys):
    """torch re-raises a worker's error with the worker's traceback in front of its message."""
    rows = write_volume_folder(tmp_path / "vols", sizes=[(16, 16, 16)], count=10)
    volume = tmp_path / "vols" / next(file for file, _, split in rows if split == "train")
    np.save(volume, np.full((16, 16, 16), np.nan, np.float32))
    assert train_volumes(tmp_path / "run", "--data", str(tmp_path / "vols"), "--workers", "1") == 1  # found in training
    err = capsys.readouterr().err
    assert err.strip() == f"error: volume {volume} holds NaN or infinite values {AS_FLOAT32}", err
    assert multiprocessing.active_children() == []  # the loaders' workers ended with the run, not at a later GC


def test_images_too_small_are_refused_before_any_work(tmp_path, capsys):
    """Digits (8x8) for DenseNet-121: one line before the run's header and its
    directory (the first forward raised, after both)."""
    assert cli.main(["train", "--no-progress", "--model", "densenet121", "--out", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == ("error: images of 8x8 are too small for DenseNet (it needs at least 29x29); "
                                    "choose a smaller model (densenet_bc)")
    assert captured.out == "" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("options, message", [
    (["--volume-size", "8"],  # densenet_bc already: no smaller model to suggest
     "volumes of 8x8x8 are too small for DenseNet (it needs at least 13x13x13); resize them with --volume-size"),
    (["--volume-size", "16", "16"], "--volume-size takes one side or three (D H W)"),
    (["--volume-size", "0"], "--volume-size takes one side or three (D H W), each at least 1"),
    (["--model", "densenet121"], "volumes of 16x16x16 are too small for DenseNet121"),
])
def test_bad_volume_options_give_one_line_errors_before_any_work(tmp_path, options, message, capsys):
    assert cli.main(["train", "--no-progress", "--data", "synthetic3d", "--out", str(tmp_path / "run"), *options]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1
    assert captured.out == "" and not (tmp_path / "run").exists()


# -- several processes ------------------------------------------------------------------------------
def torchrun(*args: str, cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


# A thread that has been joined can still be listed for a moment (see gloo_threads).
THREAD_EXIT_WAIT = 10.0  # seconds


def listed_gloo_threads() -> list[str]:
    """Names of the gloo threads listed in /proc/self/task now (Linux), exiting ones included."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except (FileNotFoundError, ProcessLookupError):  # the thread finished exiting meanwhile
            pass
    return sorted(name for name in names if "gloo" in name)


def gloo_threads() -> list[str]:
    """Names of this process's gloo threads: none once its process groups are destroyed.

    Destroying a group joins its threads, but ``pthread_join`` returns when the kernel
    wakes it from the exiting thread's ``exit_mm``, before ``release_task`` removes the
    thread from /proc (docs/training.md, "Clean shutdown under torchrun"). So a thread
    that has finished can still be listed; the list is read until it is empty or
    THREAD_EXIT_WAIT has passed, and a thread that is really left is still reported.
    """
    deadline = time.monotonic() + THREAD_EXIT_WAIT
    names = listed_gloo_threads()
    while names and time.monotonic() < deadline:
        time.sleep(0.01)
        names = listed_gloo_threads()
    return names


def gloo_threads_left(stdout: str) -> dict[str, str]:
    """Rank -> the gloo threads it had left at its end, as the workers print them."""
    return dict(re.findall(r"rank (\d+): (?:status \d+; )?gloo threads left: (\[.*?\])", stdout))


def test_the_header_gives_the_engine_settings(tmp_path, capsys):
    """Backend, recompute policy, mixed precision and memory format are in the log's first line."""
    assert train(tmp_path / "run", "--epochs", "1", "--amp", "bf16", "--channels-last", "--recompute",
                 "recompute") == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "; backend automatic, recompute recompute, amp bf16, channels-last; output " in header, header
    assert train(tmp_path / "g", "--epochs", "1", "--growth-rate", "0") == 2
    assert "--growth-rate must be at least 1, got 0" in capsys.readouterr().err


def test_sync_bn_in_one_process_says_there_is_nothing_to_synchronise(tmp_path, capsys):
    assert train(tmp_path / "run", "--epochs", "1", "--sync-bn") == 0
    assert "--sync-bn: one process, whose batch statistics are already the whole batch's" in capsys.readouterr().out


@pytest.mark.parametrize("sync_bn", [[], ["--sync-bn"]], ids=["", "sync-bn"])
def test_ddp_two_gloo_processes(tmp_path, sync_bn):
    if sync_bn and SYNC_BN_MISSING:
        pytest.skip("DenseNet.set_sync_group (synchronised batch statistics) does not exist yet")
    out = tmp_path / "run"
    result = torchrun(os.path.abspath(__file__), "train-worker", *TINY, "--epochs", "3", "--lr", "0.05", "--out",
                      str(out), *sync_bn, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Grad strides do not match bucket view strides" not in result.stderr  # (conv0 of one-channel digits)
    lines = result.stdout.splitlines()
    assert "2 process(es) on cpu" in lines[0]
    assert [l.split()[1] for l in lines if l.startswith("epoch ")] == ["1/3", "2/3", "3/3"]  # rank 0 logs alone
    assert gloo_threads_left(result.stdout) == {"0": "[]", "1": "[]"}
    rows = metrics(out)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert sorted(os.listdir(out)) == [trainer.CHECKPOINT, trainer.CURVES, trainer.METRICS]
    checkpoint = torch.load(out / trainer.CHECKPOINT, weights_only=True)
    assert checkpoint["options"]["world_size"] == 2 and len(checkpoint["rng"]) == 2


def test_ddp_resumes_a_stop_at_an_epochs_last_step(tmp_path):
    """A checkpoint of two processes stopped after the last step of an epoch
    (edited from one after the epoch): the resumed run trains no step of that
    epoch and every process ends it on the checkpoint's sums (the second
    process divided zero by zero: it held the sums on rank 0 alone)."""
    out = tmp_path / "run"
    common = [os.path.abspath(__file__), "train-worker", *TINY, "--out", str(out)]
    result = torchrun(*common, "--epochs", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(out / trainer.CHECKPOINT, weights_only=True)
    row = checkpoint["history"][0]
    images = 128  # every step of the epoch, both processes
    checkpoint.update(epoch=0, step=128 // 32, history=[], partial_seconds=1.0,
                      partial_sums=[row["train_loss"] * images, row["train_accuracy"] * images, images])
    torch.save(checkpoint, out / trainer.CHECKPOINT)
    result = torchrun(*common, "--epochs", "1", "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert gloo_threads_left(result.stdout) == {"0": "[]", "1": "[]"}
    (again,) = metrics(out)
    assert float(again["train_loss"]) == pytest.approx(row["train_loss"])
    assert float(again["train_accuracy"]) == pytest.approx(row["train_accuracy"])


def test_ddp_with_dropout_resumes_a_stop_mid_epoch_with_the_same_losses(tmp_path):
    """Two processes with dropout, stopped at step 2 of epoch 2 and resumed, end
    with the uninterrupted run's losses: each process resumes its own generators
    (its dropout masks draw from its global one, its loader from its own)."""
    common = [os.path.abspath(__file__), "train-worker"]
    recipe = [*TINY, "--epochs", "2", "--drop-rate", "0.3"]
    result = torchrun(*common, *recipe, "--out", str(tmp_path / "whole"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "halves"
    result = torchrun(*common, "--stop-at-check", "7", *recipe, "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(re.findall(r"rank \d+: status \d+", result.stdout)) == ["rank 0: status 130", "rank 1: status 130"]
    assert len(metrics(out)) == 1
    result = torchrun(*common, *recipe, "--out", str(out), "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert gloo_threads_left(result.stdout) == {"0": "[]", "1": "[]"}
    assert metrics(out) == metrics(tmp_path / "whole")


def test_ddp_bad_input_is_one_line_per_process_and_leaves_the_groups(tmp_path):
    # the error comes right after a collective (the output directory check): the pattern that aborted
    result = torchrun(os.path.abspath(__file__), "train-worker", *TINY, "--batch-size", "5000", "--sync-bn", "--out",
                      str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.count("error: 128 training images do not fill one batch of 5000") == 2
    assert "terminate called" not in result.stderr
    assert gloo_threads_left(result.stdout) == {"0": "[]", "1": "[]"}


def test_ddp_a_test_sample_that_cannot_be_read_keeps_the_epoch_trained(tmp_path):
    """Two processes: the one that cannot read a test sample and the other both
    checkpoint the epoch (evaluate agrees before raising; the other waited in
    its sum until torchrun ended it), and --resume evaluates it once the sample
    is gone."""
    write_images(tmp_path / "tree", {"train/cat": 8, "train/dog": 8, "val/cat": 2, "val/dog": 2})
    bad = tmp_path / "tree" / "val" / "dog" / "1.png"  # the fourth test image: the second process's
    bad.write_bytes(b"not an image")
    command = [os.path.abspath(__file__), "train-worker", "--no-progress", "--depth", "10", "--growth-rate", "4",
               "--data", str(tmp_path / "tree"), "--image-size", "8", "--batch-size", "4", "--epochs", "2",
               "--workers", "0", "--out", str(tmp_path / "run")]
    result = torchrun(*command, cwd=tmp_path)
    assert result.returncode != 0
    assert f"error: cannot read image {bad}" in result.stderr and "epoch 1's training is saved" in result.stderr
    assert "terminate called" not in result.stderr
    assert gloo_threads_left(result.stdout) == {"0": "[]", "1": "[]"}
    bad.unlink()
    result = torchrun(*command, "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at epoch 1, step 4" in result.stdout and "the test split differs" in result.stdout
    assert [row["epoch"] for row in metrics(tmp_path / "run")] == ["1", "2"]


def test_ddp_a_training_sample_that_cannot_be_read_keeps_the_steps_before_it(tmp_path):
    """Two processes: where the second cannot read a sample of its batch, both
    checkpoint the steps before it (they agree before every step), the second
    naming the sample; once it is repaired at another size, --resume trains on."""
    write_images(tmp_path / "tree", {"train/cat": 8, "train/dog": 8, "val/cat": 2, "val/dog": 2})
    bad = training_images_of_step(tmp_path / "tree", 1, batch_size=2, train_limit=14, rank=1, world_size=2)[0]
    bad.write_bytes(b"not an image")
    command = [os.path.abspath(__file__), "train-worker", "--no-progress", "--depth", "10", "--growth-rate", "4",
               "--data", str(tmp_path / "tree"), "--image-size", "8", "--batch-size", "4", "--epochs", "2",
               "--workers", "1", "--train-limit", "14", "--out", str(tmp_path / "run")]
    result = torchrun(*command, cwd=tmp_path)
    assert result.returncode != 0
    assert f"error: cannot read image {bad}" in result.stderr, result.stderr[-3000:]
    assert "error: another process could not read a training sample (its error names it); the training before it " \
           "is saved" in result.stderr and result.stderr.count("(epoch 1, step 1 of 3)") == 2
    assert "terminate called" not in result.stderr
    assert gloo_threads_left(result.stdout) == {"0": "[]", "1": "[]"}
    write_other_image(bad)
    result = torchrun(*command, "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at epoch 1, step 1" in result.stdout and os.path.relpath(bad, tmp_path / "tree" / "train") in result.stdout
    assert [row["epoch"] for row in metrics(tmp_path / "run")] == ["1", "2"]


def train_worker(argv: list[str]) -> int:
    """Under torchrun: ``python -m densenet_fast train`` in-process, then the gloo threads left.
    ``--stop-at-check N`` first: every process is asked to stop at its check N
    (:func:`stopping_at_check`), as one process's stop request stops all, and the
    stop (130) counts as success (torchrun would end the other process at a failure)."""
    stop_at = None
    if argv[:1] == ["--stop-at-check"]:
        stop_at, argv = int(argv[1]), argv[2:]
        trainer._check_step = stopping_at_check(stop_at)
    status = cli.main(["train", *argv])
    print(f"rank {os.environ['RANK']}: status {status}; gloo threads left: {gloo_threads()}", flush=True)
    return 0 if stop_at is not None and status == 130 else status


@pytest.mark.skipif(SYNC_BN_MISSING, reason="DenseNet.set_sync_group (synchronised batch statistics) does not exist yet")
def test_ddp_gradients_with_sync_bn_equal_single_process_gradients(tmp_path):
    result = torchrun(os.path.abspath(__file__), "sync-bn-worker", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sync BN gradients match" in result.stdout
    assert gloo_threads_left(result.stdout) == {"0": "[]", "1": "[]"}


def sync_bn_gradient_gaps(rank: int) -> dict[bool, float]:
    """Largest relative gap between the gradients of DDP on this process's half of a batch
    and the single-process gradients of the whole batch (float64), with and without
    synchronised BN."""
    import torch.distributed as dist

    torch.manual_seed(0)
    reference = densenet_bc(10, 4, num_classes=5, in_channels=2).double()
    images = torch.randn(6, 2, 9, 11, dtype=torch.float64)
    labels = torch.randint(0, 5, (6,))
    torch.nn.functional.cross_entropy(reference(images), labels).backward()
    gaps = {}
    for sync in (True, False):
        model = densenet_bc(10, 4, num_classes=5, in_channels=2).double()
        model.load_state_dict(reference.state_dict())
        if sync:
            model.set_sync_group(dist.group.WORLD)
        net = torch.nn.parallel.DistributedDataParallel(model)
        half = slice(3 * rank, 3 * rank + 3)
        torch.nn.functional.cross_entropy(net(images[half]), labels[half]).backward()
        gaps[sync] = max(((p.grad - r.grad).abs().max() / r.grad.abs().max().clamp_min(1e-30)).item()
                         for p, r in zip(model.parameters(), reference.parameters()))
    return gaps


def sync_bn_worker() -> None:
    """Under torchrun (2 gloo processes): synchronised BN gives the single-process gradients
    of the whole batch, and without synchronisation it does not (so the comparison can
    fail); then the processes leave their groups the way the trainer does."""
    procs, _ = trainer.start_processes("cpu")
    gaps = sync_bn_gradient_gaps(procs.rank)
    if procs.is_main:
        assert gaps[True] < 1e-9, gaps
        assert gaps[False] > 1e-4, gaps
        print(f"sync BN gradients match (relative gap {gaps[True]:.1e}; without sync {gaps[False]:.1e})")
    trainer.stop_processes(procs)
    print(f"rank {procs.rank}: gloo threads left: {gloo_threads()}", flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["sync-bn-worker"]:
    sync_bn_worker()
elif __name__ == "__main__" and sys.argv[1:2] == ["train-worker"]:
    sys.exit(train_worker(sys.argv[2:]))


def test_a_moved_dataset_resumes_and_a_changed_one_is_refused(tmp_path, capsys):
    """Resuming compares the data by what it holds (its fingerprint), not by its path."""
    write_volume_folder(tmp_path / "vols", sizes=[(16, 16, 16)], count=10)
    out = tmp_path / "run"
    assert train_volumes(out, "--data", str(tmp_path / "vols"), "--epochs", "1") == 0
    (tmp_path / "vols").rename(tmp_path / "moved")
    capsys.readouterr()
    assert train_volumes(out, "--data", str(tmp_path / "moved"), "--epochs", "2", "--resume", "--test-limit",
                         "1") == 0  # the test limit is not compared
    assert f"the data moved: {tmp_path / 'vols'} in the checkpoint, {tmp_path / 'moved'} now" in \
        capsys.readouterr().out
    checkpoint = torch.load(out / trainer.CHECKPOINT, weights_only=True)
    del checkpoint["options"]["data_fingerprint"]  # as written before fingerprints: the path is compared
    torch.save(checkpoint, out / trainer.CHECKPOINT)
    shutil.copytree(tmp_path / "moved", tmp_path / "vols")
    assert train_volumes(out, "--data", str(tmp_path / "vols"), "--epochs", "3", "--resume") == 2
    assert f"data is '{tmp_path / 'moved'}' in the checkpoint but '{tmp_path / 'vols'}' now" in \
        capsys.readouterr().err
    assert train_volumes(out, "--data", str(tmp_path / "moved"), "--epochs", "3", "--resume") == 0
    labels = tmp_path / "moved" / "labels.csv"
    labels.write_text(labels.read_text().replace("case0.npy,liver", "case0.npy,lung"))  # one sample relabelled
    assert train_volumes(out, "--data", str(tmp_path / "moved"), "--epochs", "4", "--resume") == 2
    assert "data_fingerprint is " in capsys.readouterr().err


def test_a_checkpoint_from_before_stratified_limits_is_refused_with_a_limit(tmp_path, capsys):
    """--train-limit took the first N samples before 2026-12-04 (the checkpoints
    of then lack train_fingerprint): with a limit, resuming one would train on
    other samples, so it is refused."""
    out = tmp_path / "run"
    assert train(out, "--epochs", "1") == 0
    checkpoint = torch.load(out / trainer.CHECKPOINT, weights_only=True)
    del checkpoint["options"]["train_fingerprint"]
    torch.save(checkpoint, out / trainer.CHECKPOINT)
    capsys.readouterr()
    assert train(out, "--epochs", "2", "--resume") == 2
    assert "--train-limit took the first 128 training samples when the checkpoint was written" in \
        capsys.readouterr().err


