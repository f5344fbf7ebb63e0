"""The memory model's terms, one by one, against what the engine and torch
allocate for them: gradients, BatchNorm coefficient stores, dropout masks,
scratch slots, the optimizer's update, the torch backend's temporaries,
ImageNet's stem, the classifier and loss, the C++ weight gradient's copies,
and the sizes and convolution paths they follow. Each is tracked op by op
(``helpers.NewStorages``) or read from the tensors made, so each term is
checked on its own, where a measured peak (tests/test_memory.py) would hide a
small one."""

import contextlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from torch.multiprocessing.reductions import StorageWeakRef

from densenet_fast import DenseNet, available_backends, densenet121, densenet_bc, memory
from densenet_fast.backends.torch_backend import TorchBackend
from densenet_fast.engine import ScratchArena
from densenet_fast.engine import stage as stage_module
from densenet_fast.engine import stem as stem_module
from densenet_fast.memory import (OPTIMIZER_PRESETS, Architecture, OptimizerSpec, Setup, StepSimulation, Timeline,
                                  policies_of, predict)
from densenet_fast.monai import DenseNet as MonaiDenseNet
from helpers import NewStorages

BC40 = Architecture.named("densenet_bc", 40)


# -- what the engine makes: gradients, BatchNorm coefficients, dropout masks, scratch ---------

@pytest.mark.parametrize("dims", [1, 2, 3])
def test_gradients_are_the_tensors_the_model_counts(dims):
    """After backward each stage's gradients are one tensor of the bytes the
    model counts for its store; the stem's and the classifier's are their own
    (DenseNet-BC-40 on images; in 1-D and 3-D a small MONAI DenseNet, whose stem
    is ImageNet's)."""
    if dims == 2:
        model, arch, x = densenet_bc(40), BC40, torch.randn(2, 3, 32, 32)
    else:
        model = MonaiDenseNet(dims, 1, 10, init_features=8, growth_rate=4, block_config=(2, 3))
        arch = Architecture(4, (2, 3), 8, num_classes=10, in_channels=1, stem="imagenet", spatial_dims=dims,
                            tree="monai")
        x = torch.randn(2, 1, *(16,) * dims)
    F.cross_entropy(model(x), torch.randint(0, 10, (2,))).backward()
    storages = {p.grad.untyped_storage().data_ptr(): p.grad.untyped_storage().nbytes() for p in model.parameters()}
    simulation = StepSimulation(arch, Setup(2, (16,) * dims), ("keep",) * len(arch.block_config))
    counted = [simulation.stage_gradient_bytes(b) for b in range(len(arch.block_config))]
    counted += simulation.stem_gradients() + simulation.classifier_gradients()
    assert sorted(storages.values()) == sorted(counted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_coefficient_stores_are_the_bytes_the_model_counts(monkeypatch, dtype):
    """Each stage's store of folded BatchNorms is the model's count exactly (a
    count of half of it was within the tolerance of every measured peak)."""
    made = []
    init = stage_module.CoefficientStore.__init__
    monkeypatch.setattr(stage_module.CoefficientStore, "__init__",
                        lambda self, *args: (init(self, *args), made.append(self.values.nbytes))[0])
    model = densenet_bc(40).to(dtype)
    F.cross_entropy(model(torch.randn(2, 3, 32, 32, dtype=dtype)).float(),
                                      torch.randint(0, 10, (2,))).backward()
    simulation = StepSimulation(BC40, Setup(2, 32, dtype=dtype), ("keep",) * 3)
    assert made == [simulation.coefficient_bytes(b) for b in range(3)]


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_dropout_masks_are_the_bytes_the_model_counts(dims, monkeypatch):
    """Each dense layer's dropout mask, made in forward and again in backward, is
    the model's count: one value per output value (torchvision's ``drop_rate``;
    MONAI's ``nn.Dropout`` in 1-D), or per image and channel (MONAI's
    ``Dropout2d``/``Dropout3d``); the architecture read from the model is the
    one named with that dropout."""
    made = []
    make = stage_module.Stage.dropout_mask
    monkeypatch.setattr(stage_module.Stage, "dropout_mask",
                        lambda self, *args: (mask := make(self, *args), made.append(mask.nbytes))[0])
    if dims == 2:
        model, x = densenet_bc(40, drop_rate=0.3), torch.randn(3, 3, 32, 32)
        arch = Architecture.named("densenet_bc", 40, drop_rate=0.3)
    else:
        model = MonaiDenseNet(dims, 1, 10, init_features=8, growth_rate=4, block_config=(2, 3), dropout_prob=0.3)
        arch = Architecture(4, (2, 3), 8, num_classes=10, in_channels=1, stem="imagenet", drop_rate=0.3,
                            spatial_dims=dims, channel_dropout=dims > 1, tree="monai")
        x = torch.randn(3, 1, *(16,) * dims)
    assert Architecture.of(model) == arch
    F.cross_entropy(model(x), torch.randint(0, 10, (3,))).backward()
    simulation = StepSimulation(arch, Setup(3, x.shape[2:]), ("keep",) * len(arch.block_config))
    forward = [simulation.dropout(b)[0][0] for b, layers in enumerate(arch.block_config) for _ in range(layers)]
    assert made == forward + forward[::-1]


@pytest.mark.parametrize("dtype, autocast", [(torch.float32, None), (torch.bfloat16, None),
                                             (torch.float32, torch.bfloat16), (torch.float64, torch.bfloat16)],
                         ids=["float32", "bfloat16", "float32-autocast", "float64-autocast"])
@pytest.mark.parametrize("recompute", ["keep", "recompute", ("recompute", "keep", "recompute")])
def test_each_pass_holds_the_scratch_the_model_counts(recompute, dtype, autocast, device, monkeypatch):
    """Every stage's forward and backward makes the scratch slots the model
    counts for that pass, in the model's order (with autograd's CUDA device
    thread running the backward on a GPU), and frees them when it ends; the
    slots hold the block data's dtype (autocast's, which leaves float64 alone)."""
    passes, first_requests, slot_storages = [], [], []
    make_set, get = ScratchArena._pass, ScratchArena.get

    @contextlib.contextmanager
    def recorded_pass(self):
        with make_set(self):
            first_requests.append([])
            yield
            slots = self._local.slots
            passes.append({name: t.numel() * t.element_size() for name, t in slots.items()})
            slot_storages.extend(StorageWeakRef(t.untyped_storage()) for t in slots.values())

    def recorded_get(self, name, shape, like):
        assert getattr(self._local, "slots", None) is not None, f"{name} requested outside a pass"
        if name not in self._local.slots:
            first_requests[-1].append(name)
        return get(self, name, shape, like)

    monkeypatch.setattr(ScratchArena, "_pass", recorded_pass)
    monkeypatch.setattr(ScratchArena, "get", recorded_get)
    model = densenet_bc(40, recompute=recompute, backend="torch").to(device, dtype)  # no Triton compiling on a GPU
    x, target = torch.randn(3, 3, 32, 32, device=device, dtype=dtype), torch.randint(0, 10, (3,), device=device)
    with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss = F.cross_entropy(model(x).float(), target)
    assert len(passes) == 3 and all(ref.expired() for ref in slot_storages)  # freed with the graph alive
    loss.backward()
    assert len(passes) == 6 and all(ref.expired() for ref in slot_storages)

    simulation = StepSimulation(BC40, Setup(3, 32, dtype=dtype, autocast=autocast, device=device),
                                policies_of(recompute, 3))
    order = [(b, backward) for backward in (False, True) for b in (range(3) if not backward else reversed(range(3)))]
    assert passes == [simulation.scratch_slots(b, backward) for b, backward in order]
    taken = {key: [] for key in order}
    take = StepSimulation.take_scratch
    monkeypatch.setattr(StepSimulation, "take_scratch",
                        lambda self, b, backward, name: (taken[b, backward].append(name),
                                                         take(self, b, backward, name)))
    simulation.run()
    assert first_requests == [taken[key] for key in order]



# -- the optimizer's update -------------------------------------------------------------

def update_peak(spec: OptimizerSpec, sizes: list[int], foreach: bool) -> int:
    """The temporaries of ``spec``'s update of float32 parameters of ``sizes``
    elements at their highest, in a step after the first (which makes the state)."""
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = spec.build(params)
    for group in optimizer.param_groups:
        group["foreach"] = foreach
    optimizer.step()
    with torch.no_grad(), NewStorages() as made:
        optimizer.step()
    return made.peak


OPTIMIZERS = {**OPTIMIZER_PRESETS,
              "sgd-momentum": OptimizerSpec("sgd", momentum=0.9, weight_decay=0.0, nesterov=False),
              "adam-decay": OptimizerSpec("adam", momentum=0.0, weight_decay=1e-2, nesterov=False)}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_single_tensor_updates_temporaries_are_torchs(name):
    """One parameter at a time (torch's update on the CPU): the temporaries the
    model counts, in parameter sizes, are what the update allocates at once."""
    spec = OPTIMIZERS[name]
    assert update_peak(spec, [1 << 18], foreach=False) == spec.update_temporaries() * (1 << 18) * 4


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_foreach_updates_temporaries_are_torchs(name):
    """Every parameter at once (the foreach update, CUDA's; run here on the CPU)."""
    spec = OPTIMIZERS[name]
    sizes = [1 << 18, 1 << 12]
    assert update_peak(spec, sizes, foreach=True) == spec.foreach_temporaries() * sum(sizes) * 4


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_step_that_peaks_in_the_update_counts_the_update_torch_makes_there(device):
    """DenseNet-121 at batch 1 on 32x32 images under bfloat16 autocast peaks in
    the optimizer's update: on the CPU one parameter at a time (the largest's
    temporaries), on CUDA every parameter at once (the foreach update, run here
    on the CPU)."""
    sizes = [p.numel() for p in densenet121().parameters()]
    spec = OPTIMIZER_PRESETS["sgd"]
    prediction = predict(Architecture.named("densenet121"),
                         Setup(1, 32, autocast=torch.bfloat16, device=device, backend="torch", optimizer=spec),
                         "recompute")
    assert prediction.peak_at == "optimizer step"
    made = update_peak(spec, [max(sizes)], foreach=False) if device == "cpu" else update_peak(spec, sizes, True)
    assert prediction.step["optimizer_update"] == made


# -- the torch backend's temporaries ----------------------------------------------------

M, C, K, N, H, W = 4096, 64, 48, 4, 32, 32  # M = N * H * W rows
PRIMITIVES = {  # name: (the backend's call, the model's count)
    "channel_stats": (lambda b, t: b.channel_stats(t.x), lambda ws: ws.channel_stats(M, C)),
    "bn_relu_conv1x1": (lambda b, t: b.bn_relu_conv1x1(t.x, t.scale, t.shift, t.w, t.out, False),
                        lambda ws: ws.bn_relu_conv1x1(M, C, K, False)),
    "bn_relu_conv1x1-stats": (lambda b, t: b.bn_relu_conv1x1(t.x, t.scale, t.shift, t.w, t.out, True),
                              lambda ws: ws.bn_relu_conv1x1(M, C, K, True)),
    "bn_relu": (lambda b, t: b.bn_relu(t.x, t.scale, t.shift, t.grad_x), lambda ws: ws.bn_relu(M, C)),
    "bn_relu_backward": (
        lambda b, t: b.bn_relu_backward(t.x, t.scale, t.shift, t.mean, t.rstd, t.grad_z, t.grad_x, None),
        lambda ws: ws.bn_relu_backward(M, C)),
    "bn_relu_conv1x1_backward": (
        lambda b, t: b.bn_relu_conv1x1_backward(t.x, t.scale, t.shift, t.mean, t.rstd, t.w, t.grad_out, t.grad_x,
                                                None),
        lambda ws: ws.bn_relu_conv1x1_backward(M, C, K)),
    "transition": (lambda b, t: b.transition(t.images, t.scale, t.shift, t.w, t.pooled),
                   lambda ws: ws.transition(M, M // 4, C, K, (H, W))),
    "transition_backward": (
        lambda b, t: b.transition_backward(t.images, t.scale, t.shift, t.mean, t.rstd, t.w, t.grad_pooled,
                                           t.grad_images, None),
        lambda ws: ws.transition_backward(M, M // 4, C, K, (H, W))),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(PRIMITIVES))
def test_the_torch_backends_temporaries_are_what_its_primitives_allocate(name, dtype):
    """Each primitive of the torch backend (the one every backend falls back to)
    at its highest, tracked op by op: the model's count, up to a few
    per-channel vectors (for 16-bit data, x's float32 copy beside what is made
    from it)."""
    g = torch.Generator().manual_seed(0)
    data = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    t = SimpleNamespace(x=data(M, C), grad_z=data(M, C), grad_x=torch.zeros(M, C, dtype=dtype), w=data(K, C),
                        out=torch.empty(M, K, dtype=dtype), grad_out=data(M, K), images=data(N, H, W, C),
                        grad_images=torch.zeros(N, H, W, C, dtype=dtype),
                        pooled=torch.empty(N, H // 2, W // 2, K, dtype=dtype), grad_pooled=data(N, H // 2, W // 2, K))
    t.scale, t.shift, t.mean, t.rstd = (torch.rand(C, generator=g) + 0.5 for _ in range(4))
    call, counted = PRIMITIVES[name]
    with torch.no_grad(), NewStorages() as made:
        call(TorchBackend(), t)
    workspace = StepSimulation(BC40, Setup(4, 32, dtype=dtype, backend="torch"), ("keep",) * 3).workspace
    assert 0 <= made.peak - counted(workspace) <= 16 * C * 4, (made.peak, counted(workspace))


# -- ImageNet's stem, the classifier and the loss ---------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_stems_saved_tensors_are_the_bytes_the_model_counts(dtype, monkeypatch):
    """ImageNet's stem (norm0-relu0-pool0 as one Function) saves norm0's input,
    the max-pool's int64 indices and a bool per pooled value (where ReLU passed):
    the model's last three saved stem tensors, at odd sides."""
    saved = []
    apply = stem_module.NormReluMaxPool.apply

    def recorded(*args):
        def pack(t):
            if t.dim() > 1:  # (not the (C,) statistics and parameters)
                saved.append(t.untyped_storage().nbytes())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return apply(*args)

    monkeypatch.setattr(stem_module.NormReluMaxPool, "apply", recorded)
    model = DenseNet(4, (2, 2), 8, num_classes=10, backend="torch").to(dtype)
    model(torch.randn(2, 3, 30, 34, dtype=dtype)).float().sum().backward()
    simulation = StepSimulation(Architecture.of(model), Setup(2, (30, 34), dtype=dtype, backend="torch"),
                                ("keep", "keep"))
    stem_saved, _ = simulation.stem_forward()
    assert len(saved) == 3 and sorted(stem_saved[-3:]) == sorted(saved)


def tracked(function, record):
    """``function`` (a Function's forward or backward) run under ``NewStorages``,
    which ``record`` is given when it returns."""
    def run(ctx, *args):
        with NewStorages() as made:
            result = function(ctx, *args)
        record(made)
        return result
    return staticmethod(run)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_stems_forward_leaves_what_the_model_counts(dtype, monkeypatch):
    """When the stem's forward ends, conv0's output (norm0's input, saved) and
    what NormReluMaxPool's forward made and left alive (the pooled values, the
    indices, the ReLU mask) are the model's ``stem`` bytes, up to the (C,)
    statistics."""
    kept, conv_out = [], []
    monkeypatch.setattr(stem_module.NormReluMaxPool, "forward",
                        tracked(stem_module.NormReluMaxPool.forward, lambda made: kept.append(made.alive())))
    model = DenseNet(4, (2,), 8, num_classes=10, backend="torch").to(dtype)
    model.features.conv0.register_forward_hook(lambda module, inputs, out: conv_out.append(out.nbytes))
    model(torch.randn(16, 3, 32, 32, dtype=dtype))
    simulation = StepSimulation(Architecture.of(model), Setup(16, 32, dtype=dtype, backend="torch"), ("keep",))
    simulation.timeline = Timeline(None)  # every tensor as it lives (no C heap)
    simulation.stem_forward()
    assert len(kept) == 1 and 0 <= conv_out[0] + kept[0] - simulation.timeline.live["stem"] <= 256, \
        (simulation.timeline.live["stem"], conv_out, kept)


def test_the_stems_float32_backward_allocates_what_the_model_counts(monkeypatch):
    """In float32 the stem's backward allocates the pooled gradient where ReLU
    passed it and the max-pool's input gradient, no more (the float32 finish
    slice by slice is for 16-bit data): the model's peak over it, above the
    gradient it receives, is what the Function's backward made at its highest."""
    peaks = []
    monkeypatch.setattr(stem_module.NormReluMaxPool, "backward",
                        tracked(stem_module.NormReluMaxPool.backward, lambda made: peaks.append(made.peak)))
    model = DenseNet(4, (2,), 8, num_classes=10, backend="torch")
    model(torch.randn(64, 3, 8, 8)).sum().backward()  # (the stem's tensors well above conv0's weight)
    simulation = StepSimulation(Architecture.of(model), Setup(64, 8, backend="torch"), ("keep",))
    saved, _ = simulation.stem_forward()
    simulation.timeline = Timeline(None)
    received = simulation.pixels[0] * 8 * 4
    simulation.stem_backward(saved, received)
    assert simulation.timeline.peak == received + peaks[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_classifiers_and_the_losss_tensors_are_what_the_model_counts(dtype, monkeypatch):
    """The classifier's input (saved), its logits (kept by the training loop),
    their float32 copy (``cross_entropy(logits.float(), labels)``: none for
    float32 logits) and the log-softmax the loss saves, alive at once: the
    model's ``head_and_loss``."""
    n, c_last, classes = 32, 64, 1000
    features = torch.randn(n, c_last, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(c_last, classes).to(dtype)
    with NewStorages() as made:
        logits = head(features)
        loss = F.cross_entropy(logits.float(), torch.randint(0, classes, (n,)))
    counted = []
    alloc = Timeline.alloc
    monkeypatch.setattr(Timeline, "alloc", lambda self, part, *sizes: (
        counted.extend(sizes) if part == "head_and_loss" else None, alloc(self, part, *sizes))[1])
    arch = Architecture(4, ((c_last - 8) // 4,), 8, num_classes=classes)  # one block: 8 + 14 * 4 = 64 channels
    StepSimulation(arch, Setup(n, 8, dtype=dtype, backend="torch"), ("keep",)).run()
    assert counted[0] == features.nbytes
    assert 0 <= made.peak - sum(counted[1:]) <= 1024, (made.peak, counted)  # (the loss and other scalars)
    del logits, loss


# -- sizes and paths --------------------------------------------------------------------

def test_odd_channel_counts_are_the_models():
    """A transition halves odd channel counts rounding down: the architecture's
    channels and parameters are the model's (k=3, DenseNet-BC-10: 6 -> 9 -> 4
    -> 7 -> 3 -> 6 channels)."""
    model = densenet_bc(10, growth_rate=3)
    arch = Architecture.of(model)
    assert arch.parameter_count() == sum(p.numel() for p in model.parameters())
    built = [(block.denselayer1.norm1.num_features, block.denselayer1.norm1.num_features + len(block) * 3)
             for block in model.blocks()]
    assert arch.block_channels() == built == [(6, 9), (4, 7), (3, 6)]


@pytest.mark.parametrize("size", [(33, 31), (32, 35), (25, 19)])
def test_odd_sides_shrink_as_the_models_layers_shrink_them(size):
    """conv0 (7, stride 2, padding 3), the max-pool (3, stride 2, padding 1) and
    each transition's average pool by 2 on a meta tensor of odd sides: the
    sides the model predicts for."""
    arch = Architecture(4, (2, 2, 2), 8, num_classes=10)
    x = torch.empty(1, 3, *size, device="meta")
    conv = F.conv2d(x, torch.empty(8, 3, 7, 7, device="meta"), stride=2, padding=3)
    blocks = [F.max_pool2d(conv, 3, 2, 1)]
    for _ in range(2):
        blocks.append(F.avg_pool2d(blocks[-1], 2))
    assert arch.spatial_sizes(size) == (tuple(conv.shape[2:]), [tuple(b.shape[2:]) for b in blocks])


@pytest.mark.parametrize("dims, c, sides", [
    (2, 20, (32, 32)), (2, 20, (32, 33)), (2, 40, (16, 32)), (2, 41, (16, 32)), (2, 20, (1024, 1)),
    (3, 20, (32, 32, 9)), (3, 20, (32, 33, 2)), (1, 20480, (1,)), (1, 20, (1024,)), (1, 20, (1025,)),
])
def test_atens_im2col_is_predicted_where_torch_selects_it(dims, c, sides):
    """At batch 1 a 3x3 convolution runs ATen's im2col (with its columns buffer)
    or oneDNN, on either side of 20480 input values: the model's choice is the
    backend torch selects for that convolution."""
    if not memory.onednn_convolves(torch.float32):
        pytest.skip("oneDNN does not convolve float32 here")
    arch = Architecture(4, (2, 2), 8, num_classes=10, in_channels=1, spatial_dims=dims,
                        tree="monai" if dims != 2 else "torchvision")
    simulation = StepSimulation(arch, Setup(1, (64,) * dims), ("keep", "keep"))
    ones = [1] * dims
    selected = torch._C._select_conv_backend(torch.empty(1, c, *sides), torch.empty(4, c, *(3,) * dims), None,
                                             ones, ones, ones, False, [0] * dims, 1)
    assert simulation.aten_im2col(c, 3, sides) == selected.name.startswith("Slow"), selected


# -- the C++ weight gradient ------------------------------------------------------------

RESIDENT_PEAK = r'''
import gc, json, torch
from densenet_fast import memory
from densenet_fast.backends import get_backend
memory.set_mmap_threshold()  # as the model assumes: allocations of 64 KiB and more are mapped
torch.set_num_threads(1)
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
C, K, N, H, W = 1000, 500, 4, 32, 32
x, w = torch.randn(N, H, W, C), torch.randn(K, C)
scale, shift, mean, rstd = (torch.rand(C) + 0.5 for _ in range(4))
grad_out, grad_x = torch.randn(N, H // 2, W // 2, K), torch.zeros(N, H, W, C)
backend, peaks = get_backend("cpp", torch.device("cpu")), []
for _ in range(4):
    gc.collect()
    memory.trim_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM back to VmRSS
    base = status("VmRSS")
    result = backend.transition_backward(x, scale, shift, mean, rstd, w, grad_out, grad_x, None)
    peaks.append(status("VmHWM") - base)
    del result
print(json.dumps(peaks))
'''


@pytest.mark.skipif("cpp" not in available_backends() or memory.glibc_malloc() is None
                    or not os.access("/proc/self/clear_refs", os.W_OK), reason="needs the C++ kernels, glibc, Linux")
def test_the_cpp_weight_gradients_copies_per_row_group_are_resident():
    """The C++ transition backward from 1000 channels to 500 over 4 x 16 x 16
    pooled pixels, on one thread: two row groups' float32 copies of dW (2 MB
    each) and their sum (dW, returned) are resident at once. The process's
    resident peak over the call (VmHWM, past the first call) is the model's
    count, to 256 KiB."""
    out = subprocess.run([sys.executable, "-c", RESIDENT_PEAK], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    measured = min(json.loads(out.stdout.strip().splitlines()[-1])[1:])
    workspace = StepSimulation(BC40, Setup(4, 32, backend="cpp", threads=1), ("keep",) * 3).workspace
    rows = 4 * 32 * 32
    counted = workspace.transition_backward(rows, rows // 4, 1000, 500, (32, 32))
    assert abs(measured - counted) < 256 * 1024, (measured, counted)
