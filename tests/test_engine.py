"""The memory-efficient dense-stage engine against torchvision's naive DenseNet
with the same weights, gradcheck on tiny stages, and the engine's contracts: no
concatenation, running statistics updated once per forward, a bounded scratch
arena, nothing stored without autograd, dropout, autocast and input memory
layouts, torch.compile on the backends whose primitives are torch ops."""

import contextlib
import copy
import time
import warnings
import weakref
from typing import Optional

import pytest
import torch
import torch.nn as nn

from densenet_fast import DenseNet, MemoryBudgetError, available_backends, densenet_bc, engine
from densenet_fast.backends import BACKEND_NAMES, BackendUnavailableError, get_backend, resolve_backend_name
from densenet_fast.engine import fastpath
from densenet_fast.engine import stage as stage_module
from helpers import (FLOAT64_RTOL, FP32_RTOL, OpRecorder, assert_all_close, assert_results_equal, buffers,
                     check_eval_float64, check_training_float64, check_training_fp32, forward_backward,
                     global_relative_error, make_pair, max_relative_error, random_batch, randomize_batchnorm)
from helpers import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

# A DenseNet-121-like network (ImageNet stem) and a DenseNet-BC-like one (CIFAR
# stem), each with the (N, H, W) of its awkward test batches.
CONFIGS = {
    "imagenet": (dict(growth_rate=8, block_config=(3, 2, 4), num_init_features=16, num_classes=7), (3, 37, 41)),
    "cifar": (dict(growth_rate=6, block_config=(3, 2, 3), num_init_features=12, num_classes=5, stem="cifar"),
              (3, 13, 11)),
}
BACKENDS = {"torch": "torch", "auto": None}  # auto: cpp on the CPU once the extension is built
EVERY_BACKEND = {**{name: name for name in BACKEND_NAMES}, "auto": None}


def backend_on(name: Optional[str], device: str) -> Optional[str]:
    """``name`` if it runs on ``device`` in this process, else skip the test."""
    try:
        if name is not None:
            resolve_backend_name(name)
            get_backend(name, torch.device(device))
    except BackendUnavailableError as error:
        pytest.skip(str(error))
    return name


def test_automatic_backend_on_cpu():
    expected = "cpp" if "cpp" in available_backends() else "torch"
    assert get_backend(None, torch.device("cpu")).name == expected


# -- equality with torchvision, once for every backend ---------------------------------------
@pytest.mark.parametrize("backend", EVERY_BACKEND)
@pytest.mark.parametrize("recompute", ["keep", "recompute"])
@pytest.mark.parametrize("config", CONFIGS)
def test_equals_torchvision_float64(config, recompute, backend, device):
    """Five SGD steps in training mode, then eval mode: every output, gradient,
    running statistic and updated parameter equal to 1e-8."""
    kwargs, shape = CONFIGS[config]
    ours, tv = make_pair(device=device, recompute=recompute, backend=backend_on(EVERY_BACKEND[backend], device),
                         **kwargs)
    check_training_float64(ours, tv, shape, steps=5)
    check_eval_float64(ours, tv, shape)


@pytest.mark.parametrize("backend", EVERY_BACKEND)
@pytest.mark.parametrize("config", CONFIGS)
def test_equals_torchvision_fp32(config, backend, device, no_tf32):
    """Outputs and running statistics to 1e-4 over five steps,
    gradients as close to float64 as torchvision fp32's own."""
    kwargs, shape = CONFIGS[config]
    ours, _ = make_pair(dtype=torch.float32, device=device, backend=backend_on(EVERY_BACKEND[backend], device),
                        **kwargs)
    check_training_fp32(ours, shape, steps=5)


# -- gradcheck on tiny stages --------------------------------------------------------------
def tail_of(kind: str, module) -> engine.Tail:
    return engine.NoTail() if kind == "none" else {"transition": engine.TransitionTail, "head": engine.HeadTail}[kind](module)


class TinyStage(nn.Module):
    """One dense block of 2 layers (5 input channels, k=3, bottleneck 6) and a
    tail: nothing, a transition, or the head BN (then ReLU and average pool)."""

    def __init__(self, tail_kind: str, drop_rate: float = 0.0, backend=None, recompute: str = "recompute") -> None:
        super().__init__()
        torch.manual_seed(0)
        net = DenseNet(growth_rate=3, block_config=(2, 1), num_init_features=5, bn_size=2, drop_rate=drop_rate)
        self.block = net.features.denseblock1
        self.tail = {"none": None, "transition": net.features.transition1, "head": nn.BatchNorm2d(11)}[tail_kind]
        self.tail_kind = tail_kind
        self.settings = engine.Settings(backend=backend)
        self.keep = recompute == "keep"
        randomize_batchnorm(self)
        self.double()

    def forward(self, x):
        tail = tail_of(self.tail_kind, self.tail)
        return engine.run_stage(list(self.block.values()), tail, x, self.settings, self.keep)[0]


def stage_gradcheck(stage: TinyStage, seed=None, fast_mode=True) -> bool:
    """gradcheck of ``stage`` w.r.t. its input and every parameter (the global
    RNG is reseeded before each evaluation when ``seed`` is given)."""
    names, params = zip(*stage.named_parameters())
    x = torch.randn(2, 5, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def function(x, *params):
        if seed is not None:
            torch.manual_seed(seed)
        return torch.func.functional_call(stage, dict(zip(names, params)), (x,))

    inputs = (x.requires_grad_(),) + tuple(p.detach().requires_grad_() for p in params)
    return torch.autograd.gradcheck(function, inputs, fast_mode=fast_mode)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", ["keep", "recompute"])
@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("tail_kind", ["none", "transition", "head"])
def test_stage_gradcheck(tail_kind, training, recompute, backend):
    stage = TinyStage(tail_kind, backend=BACKENDS[backend], recompute=recompute).train(training)
    assert stage_gradcheck(stage)


def test_stage_gradcheck_full_jacobian():
    """The slow, element-by-element gradcheck once, with batch statistics."""
    assert stage_gradcheck(TinyStage("transition"), fast_mode=False)


# -- structure of the computation ----------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS)
def test_no_concatenation_in_forward_or_backward(config):
    kwargs, shape = CONFIGS[config]
    ours, tv = make_pair(**kwargs)
    x, target = random_batch(ours, *shape, seed=0)
    recorded = {}
    for name, model in (("ours", ours), ("torchvision", tv)):
        with OpRecorder() as recorder:
            forward_backward(model, x, target)
        recorded[name] = recorder.ops
    assert any(op == "cat" for op, _ in recorded["torchvision"])  # the recorder sees torchvision's concatenation
    assert [op for op, _ in recorded["ours"] if op == "cat"] == []
    # stacking a few per-channel vectors is fine; stacking feature maps is not
    assert all(len(out_shape) <= 2 for op, out_shape in recorded["ours"] if op == "stack")


@pytest.mark.parametrize("recompute", ["keep", "recompute"])
def test_forward_saves_the_block_buffer_and_the_policy_bottlenecks(recompute):
    """Everything a stage keeps for backward goes through save_for_backward (so
    saved-tensor hooks see it): the input (a view of the buffer, no copy), the
    buffer, the parameters, and per layer its BN coefficients and, when kept, its
    bottleneck output.  The coefficients are consecutive blocks of one tensor, and
    so are the kept bottlenecks (one allocation per stage each, as the memory
    model counts them)."""
    stage = TinyStage("none", recompute=recompute)
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = stage(x)
    stage_input, buffer, *rest = out.grad_fn.saved_tensors
    assert buffer.shape == (2, 11, 6, 7) and buffer.movedim(1, -1).is_contiguous()  # channels-last
    assert buffer.data_ptr() != out.data_ptr() and torch.equal(buffer, out)  # no tail: a copy of the buffer
    assert out.stride() == buffer.stride()
    assert stage_input.data_ptr() == buffer.data_ptr() and stage_input.shape == (2, 5, 6, 7)
    params = list(stage.block.parameters())
    assert len(rest) == len(params) + (3 if recompute == "keep" else 2) * 2
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(rest, params))
    coefficients_and_bottlenecks = rest[len(params):]
    if recompute == "keep":
        assert [tuple(t.shape) for t in coefficients_and_bottlenecks] == [(4, 5), (4, 6), (2 * 6 * 7, 6),
                                                                          (4, 8), (4, 6), (2 * 6 * 7, 6)]
    else:
        assert [tuple(t.shape) for t in coefficients_and_bottlenecks] == [(4, 5), (4, 6), (4, 8), (4, 6)]
    kept = [t for t in coefficients_and_bottlenecks if t.shape[0] != 4]
    if kept:  # views of one (L, M, 4k) tensor, one after the other
        assert {t.untyped_storage().data_ptr() for t in kept} == {kept[0].untyped_storage().data_ptr()}
        assert [t.storage_offset() for t in kept] == [0, kept[0].numel()]
        assert kept[0].untyped_storage().nbytes() == 2 * kept[0].numel() * 8
    coefficients = [t for t in coefficients_and_bottlenecks if t.shape[0] == 4]
    store = coefficients[0].untyped_storage()
    assert all(t.untyped_storage().data_ptr() == store.data_ptr() for t in coefficients)
    offsets = [t.storage_offset() for t in coefficients]
    assert offsets == [sum(t.numel() for t in coefficients[:i]) for i in range(len(coefficients))]
    assert store.nbytes() == sum(t.numel() for t in coefficients) * 8
    saved = {(t.data_ptr(), t.shape) for t in out.grad_fn.saved_tensors}
    assert {(t.data_ptr(), t.shape) for t in packed} >= saved  # every one of them went through the hooks


@pytest.mark.parametrize("recompute", ["keep", "recompute"])
@pytest.mark.parametrize("tail_kind", ["none", "transition", "head"])
def test_backward_reads_only_what_the_saved_tensor_hooks_give_back(tail_kind, recompute):
    """A pack hook that saves copies, after which the originals (the buffer, the
    BN coefficients, the kept bottlenecks) are overwritten with NaN: the
    backward reads the copies alone, so its gradients are a plain step's."""
    stage = TinyStage(tail_kind, recompute=recompute)
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grad = torch.randn(stage(x).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def gradients(hooked: bool) -> list[torch.Tensor]:
        stage.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        originals = []

        def pack(t):
            originals.append(t)
            return t.clone()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if hooked else contextlib.nullcontext():
            out = stage(inputs)
        with torch.no_grad():
            for t in originals:
                if not t.requires_grad:  # (not the parameters, not the input)
                    t.fill_(float("nan"))
        out.backward(grad)
        return [inputs.grad] + [p.grad for p in stage.parameters()]

    expected = gradients(hooked=False)
    for got, want in zip(gradients(hooked=True), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_block_without_gradients_returns_its_buffer_uncopied():
    """Without backward nothing reads the buffer afterwards: no copy of it."""
    from torch.profiler import profile
    stage = TinyStage("none")
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    with torch.no_grad(), profile(record_shapes=True) as trace:
        out = stage(x)
    assert out.shape == (2, 11, 6, 7) and out.movedim(1, -1).is_contiguous()
    copies = [e for e in trace.events() if e.name in ("aten::clone", "aten::copy_", "aten::contiguous")
              and e.input_shapes and e.input_shapes[0] == [2, 11, 6, 7]]
    assert copies == []


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("recompute", ["keep", "recompute"])
def test_stage_gradients_are_views_of_one_tensor_kept_as_grad(recompute, layout):
    """A stage's backward copies its parameters' gradients into one tensor as
    they are made; autograd keeps the views, each in its parameter's layout (the
    3x3 weights contiguous as built, or channels-last as
    ``model.to(memory_format=torch.channels_last)`` leaves them), as ``.grad``
    without copying them."""
    stage = TinyStage("transition", recompute=recompute)
    if layout == "channels_last":
        stage.to(memory_format=torch.channels_last)
    stage(torch.randn(2, 5, 6, 7, dtype=torch.float64)).sum().backward()
    params = list(stage.parameters())
    store = params[0].grad.untyped_storage()
    assert all(p.grad.untyped_storage().data_ptr() == store.data_ptr() for p in params)
    assert store.nbytes() == sum(p.numel() for p in params) * 8
    assert all(p.grad.stride() == p.stride() for p in params)
    assert all(p.is_contiguous() for p in params) == (layout == "contiguous")


@pytest.mark.parametrize("recompute", ["keep", "recompute"])
def test_frozen_parameters_of_a_stage_get_no_gradient_and_no_room(recompute):
    """With the BatchNorms' affine parameters frozen (fine-tuning), the others'
    gradients equal torchvision's modules' and their store holds only them."""
    stage = TinyStage("transition", recompute=recompute)
    reference = copy.deepcopy(stage)
    for model in (stage, reference):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(False)
    x = torch.randn(3, 5, 6, 7, dtype=torch.float64)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    out = stage(xs[0])
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (reference.tail(reference.block(xs[1])) * weights).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=FLOAT64_RTOL, atol=1e-12)
    trainable = [p for p in stage.parameters() if p.requires_grad]
    assert len(trainable) == 5 and all(p.grad is None for p in stage.parameters() if not p.requires_grad)
    for p, q in zip(trainable, [q for q in reference.parameters() if q.requires_grad]):
        torch.testing.assert_close(p.grad, q.grad, rtol=FLOAT64_RTOL, atol=1e-12)
    assert trainable[0].grad.untyped_storage().nbytes() == sum(p.numel() for p in trainable) * 8


def test_stage_parameters_of_mixed_dtypes_get_gradients_of_their_own():
    """Parameters of different dtypes cannot share one tensor: each gets its own
    gradient in its dtype, equal to the float64 stage's."""
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    reference, mixed = TinyStage("transition"), TinyStage("transition")
    mixed.tail.float()
    for stage in (reference, mixed):
        stage(x).sum().backward()
    for p, q in zip(reference.parameters(), mixed.parameters()):
        assert q.grad.dtype == q.dtype
        torch.testing.assert_close(q.grad.double(), p.grad, rtol=1e-5, atol=1e-6)


def test_float64_parameters_after_float32_ones_keep_float64_gradients():
    """Float32 dense layers and a float64 transition, on float64 input: the
    transition's gradients are float64 ones (not rounded through a float32
    store), equal to a float64 stage's with the same (float32-representable)
    weights."""
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mixed, reference = TinyStage("transition"), TinyStage("transition")
    mixed.block.float()
    with torch.no_grad():
        for p, q in zip(mixed.block.parameters(), reference.block.parameters()):
            q.copy_(p)
    for stage in (reference, mixed):
        stage(x).sum().backward()
    for (name, p), q in zip(reference.named_parameters(), mixed.parameters()):
        assert q.grad.dtype == q.dtype, name
        if q.dtype == torch.float64:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-14, msg=name)


# -- running statistics --------------------------------------------------------------------
def batchnorms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_running_statistics_updated_once_per_forward():
    kwargs, shape = CONFIGS["imagenet"]
    ours, tv = make_pair(**kwargs)
    x, target = random_batch(ours, *shape, seed=0)
    ours(x), tv(x)  # forward with autograd
    with torch.no_grad():
        ours(x), tv(x)
    forward_backward(ours, x, target), forward_backward(tv, x, target)  # backward must not update them
    assert {int(bn.num_batches_tracked) for bn in batchnorms(ours)} == {3}
    assert_all_close(buffers(ours), buffers(tv), FLOAT64_RTOL, "running statistics")


@pytest.mark.parametrize("momentum", [None, 0.3], ids=["cumulative", "momentum0.3"])
def test_batchnorm_momentum_rules(momentum):
    """momentum=None (cumulative averaging over num_batches_tracked) and a
    non-default momentum behave as in nn.BatchNorm2d."""
    kwargs, shape = CONFIGS["cifar"]
    ours, tv = make_pair(**kwargs)
    for bn in batchnorms(ours) + batchnorms(tv):
        bn.momentum = momentum
    check_training_float64(ours, tv, shape, steps=3)


@pytest.mark.parametrize("recompute", ["keep", "recompute"])
def test_some_batchnorms_in_eval_mode_in_a_training_model_as_torchvision(recompute):
    """A norm1, a norm2 and a transition's norm frozen (eval mode) in a training
    model: each uses its running statistics while the others in its block use
    and update batch statistics, as in torchvision."""
    kwargs, shape = CONFIGS["imagenet"]
    ours, tv = make_pair(recompute=recompute, **kwargs)
    for model in (ours, tv):
        model.features.denseblock1.denselayer1.norm1.eval()  # block 1: every norm2 in training
        model.features.denseblock2.denselayer2.norm2.eval()  # block 2: every norm1 in training
        model.features.transition2.norm.eval()
    check_training_float64(ours, tv, shape, steps=2)
    assert_all_close(buffers(ours), buffers(tv), FLOAT64_RTOL, "running statistics")


@pytest.mark.parametrize("config", ["imagenet", "cifar"])
def test_batchnorm_tracking_turned_off_after_construction(config):
    """``track_running_stats`` set to False on BatchNorms that keep their running
    buffers: training uses batch statistics and leaves the buffers and the
    counter alone, eval uses the buffers, as nn.BatchNorm2d."""
    kwargs, shape = CONFIGS[config]
    ours, tv = make_pair(**kwargs)
    for bn in batchnorms(ours) + batchnorms(tv):
        bn.track_running_stats = False
    before = buffers(ours)
    check_training_float64(ours, tv, shape, steps=2)
    assert_all_close(buffers(ours), before, 0.0, "running statistics not tracked")
    check_eval_float64(ours, tv, shape)


@pytest.mark.parametrize("missing", ["running", "running+counter", "counter", "counter-cumulative"])
@pytest.mark.parametrize("config", ["imagenet", "cifar"])
def test_batchnorm_with_buffers_set_to_none(config, missing):
    """BatchNorms with running_mean and running_var, num_batches_tracked, or
    both set to None (track_running_stats still True) train as nn.BatchNorm2d:
    batch statistics and the batch counted without running statistics; with
    running statistics but no counter, the factor is momentum (0 where it is
    None: nothing moves).  The engine raised AttributeError."""
    kwargs, shape = CONFIGS[config]
    ours, tv = make_pair(**kwargs)
    for bn in batchnorms(ours) + batchnorms(tv):
        if missing.startswith("running"):
            bn.running_mean = bn.running_var = None
        if "counter" in missing:
            bn.num_batches_tracked = None
        if missing == "counter-cumulative":
            bn.momentum = None
    check_training_float64(ours, tv, shape, steps=2)
    assert_all_close(buffers(ours), buffers(tv), FLOAT64_RTOL, "running statistics")
    check_eval_float64(ours, tv, shape)  # (batch statistics where there are no running ones; nothing counted)
    assert_all_close(buffers(ours), buffers(tv), FLOAT64_RTOL, "running statistics after eval")
    if missing == "running":
        assert {int(bn.num_batches_tracked) for bn in batchnorms(ours)} == {2}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", ["imagenet", "cifar"])
def test_batchnorm_eps_as_torchvision(config, backend):
    """A BatchNorm eps other than torch's default (every test used 1e-5, so a
    fold that ignored ``bn.eps`` passed them all)."""
    kwargs, shape = CONFIGS[config]
    ours, tv = make_pair(backend=backend_on(BACKENDS[backend], "cpu"), **kwargs)
    for bn in batchnorms(ours) + batchnorms(tv):
        bn.eps = 0.25
    check_training_float64(ours, tv, shape, steps=2)
    check_eval_float64(ours, tv, shape)


def test_torch_compile_under_autocast_with_the_imagenet_stem():
    """torch.compile under bfloat16 autocast of a model with the ImageNet stem:
    one graph (from torch 2.14) with the fused stem traced (its compiled backward failed in the
    convolution before it, as the meta function of batch norm says bfloat16
    statistics where the kernel returns float32 ones); outputs and gradients
    as eager's to bfloat16 precision."""
    torch.manual_seed(0)
    model = DenseNet(4, (2, 2), 8, 4, 0.0, 3)
    twin = copy.deepcopy(model)
    x, target = random_batch(model, 2, 16, 16, seed=0)
    whole = stage_module.COMPILE_TRACES_STAGES  # before torch 2.14 the stages run eagerly between graphs
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # before 2.14, the stages' notice (tested above)
        explanation = torch._dynamo.explain(twin)(x.float())
        if whole:
            assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
        assert "functional.batch_norm" not in explanation.graphs[0].code  # norm0 is not run as a module
        torch._dynamo.reset()
        twin.load_state_dict(model.state_dict())  # explain ran a training forward
        eager = forward_backward(model, x.float(), target)
        compiled = forward_backward(torch.compile(twin, backend="aot_eager", fullgraph=whole), x.float(), target)
    assert max_relative_error(compiled.output, eager.output) <= 2e-2
    assert max_relative_error(compiled.input_grad, eager.input_grad) <= 2e-2
    for name in ("features.conv0.weight", "features.norm0.weight", "features.norm0.bias"):
        assert max_relative_error(compiled.grads[f"_orig_mod.{name}"], eager.grads[name]) <= 2e-2, name


# -- scratch arena and inference -----------------------------------------------------------
def test_scratch_is_one_tensor_per_role_per_pass(monkeypatch):
    """Inside a pass every layer's request under one name gets the same memory
    (one allocation per role, however many layers); nothing is held between
    passes; a pass inside a pass, and a request outside any, get their own."""
    torch.manual_seed(0)
    model = densenet_bc(depth=22, growth_rate=4, num_classes=3, recompute="recompute")
    assert all(block.engine.arena is model.arena for block in model.blocks())
    requests = []  # (the pass's set, kept so that its id stays its own, name, storage)
    get = engine.ScratchArena.get

    def recorded(self, name, shape, like):
        out = get(self, name, shape, like)
        requests.append((getattr(self._local, "slots", None), name, out.untyped_storage().data_ptr()))
        return out

    monkeypatch.setattr(engine.ScratchArena, "get", recorded)
    batch = random_batch(model, 2, 8, 8, seed=0)
    before = forward_backward(model, *batch)
    assert model.arena.nbytes() == 0
    assert all(pass_set is not None for pass_set, _, _ in requests)  # every request inside a pass
    assert len({id(pass_set) for pass_set, _, _ in requests}) == 2 * len(model.blocks())  # a set per stage pass
    by_role = {}
    for pass_set, name, storage in requests:
        by_role.setdefault((id(pass_set), name), set()).add(storage)
    assert len(requests) > len(by_role) and all(len(storages) == 1 for storages in by_role.values())
    assert_results_equal(forward_backward(model, *batch), before, 0.0, with_buffers=False)  # nothing carried over
    loose = model.arena.get("bn2_out", (4, 4), batch[0])
    with model.arena.scope():
        inner = model.arena.get("bn2_out", (4, 4), batch[0])
        with model.arena.scope():
            assert model.arena.get("bn2_out", (4, 4), batch[0]).data_ptr() not in (inner.data_ptr(), loose.data_ptr())
        assert model.arena.get("bn2_out", (4, 4), batch[0]).data_ptr() == inner.data_ptr()


@pytest.fixture
def stage_function_calls(monkeypatch) -> list:
    """Counts calls of the autograd Function that stores tensors for backward."""
    calls = []
    apply = engine.StageFunction.apply

    def spy(*args):
        calls.append(1)
        return apply(*args)

    monkeypatch.setattr(engine.StageFunction, "apply", spy)
    return calls


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_grad_stores_nothing_for_backward(stage_function_calls, training):
    kwargs, shape = CONFIGS["imagenet"]
    ours, tv = make_pair(**kwargs)
    ours.train(training), tv.train(training)
    x, _ = random_batch(ours, *shape, seed=0)
    expected = ours(x)
    assert len(stage_function_calls) == 3 and expected.grad_fn is not None  # one Function per stage
    stage_function_calls.clear()
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            out = ours(x)
        assert out.grad_fn is None and not stage_function_calls
        assert_all_close({"out": out}, {"out": expected.detach()}, FLOAT64_RTOL, context.__name__)
    ours.requires_grad_(False)
    assert ours(x).grad_fn is None and not stage_function_calls  # a frozen model with grad mode on
    if not training:
        assert_all_close({"out": ours(x)}, {"out": tv(x).detach()}, FLOAT64_RTOL, "eval output")


@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
def test_no_grad_keeps_no_bottlenecks_under_the_keep_policy(training):
    """Without autograd nothing is kept for backward: a stage with the ``keep``
    policy runs the operations (allocations included) of one with
    ``recompute``, to the same output."""
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ops, outs = [], []
    for recompute in ("keep", "recompute"):
        stage = TinyStage("transition", recompute=recompute).train(training)
        with torch.no_grad(), OpRecorder() as recorder:
            outs.append(stage(x))
        ops.append(recorder.ops)
    assert ops[0] == ops[1]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_frozen_model_gives_the_inputs_gradient_as_torchvision(training):
    """Every parameter frozen and the input requiring grad (saliency maps,
    adversarial examples): the stages record a graph, and the input's gradient
    is torchvision's."""
    kwargs, shape = CONFIGS["imagenet"]
    ours, tv = make_pair(**kwargs)
    x, _ = random_batch(ours, *shape, seed=0)
    grads = []
    for model in (ours, tv):
        model.train(training).requires_grad_(False)
        inputs = x.clone().requires_grad_()
        model(inputs).square().sum().backward()
        grads.append({"input": inputs.grad})
    assert grads[0]["input"] is not None
    assert_all_close(grads[0], grads[1], FLOAT64_RTOL, "the input's gradient")


# -- dropout -------------------------------------------------------------------------------
def test_dropout_zeroes_and_scales_the_new_channels():
    """With p=0.2 each layer's new channels are 0 or the p=0 value / 0.8; the
    block input channels pass untouched (one-layer block, training mode)."""
    torch.manual_seed(0)
    block = DenseNet(growth_rate=8, block_config=(1, 1), num_init_features=6, drop_rate=0.2).features.denseblock1
    x = torch.randn(4, 6, 16, 16)
    dropped = block(x)
    block.denselayer1.drop_rate = 0.0
    plain = block(x)
    assert torch.equal(dropped[:, :6], plain[:, :6])
    new, expected = dropped[:, 6:], plain[:, 6:] / 0.8
    zero = new == 0
    assert 0.17 < zero.float().mean().item() < 0.23
    torch.testing.assert_close(new[~zero], expected[~zero])


def test_dropout_is_reproducible_under_a_seed_and_off_in_eval():
    kwargs, shape = CONFIGS["cifar"]
    ours, tv = make_pair(drop_rate=0.2, **kwargs)
    check_eval_float64(ours, tv, shape)
    x, target = random_batch(ours, *shape, seed=0)
    eval_output = ours(x)
    ours.train()
    results = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        results.append(forward_backward(ours, x, target))
    assert_results_equal(results[1], results[0], 0.0, with_buffers=False)
    assert max_relative_error(results[2].output, results[0].output) > 1e-3
    assert max_relative_error(results[0].output, eval_output) > 1e-3


def test_dropout_gradcheck_under_a_fixed_seed():
    assert stage_gradcheck(TinyStage("transition", drop_rate=0.2), seed=3)


# -- precision and layouts -----------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS)
def test_autocast_bfloat16_training_step(config):
    """Under CPU autocast (bf16) a training step gives a finite loss close to
    fp32's and gradients no further from fp32 than torchvision's bf16 ones."""
    kwargs, shape = CONFIGS[config]
    ours, tv = make_pair(dtype=torch.float32, **kwargs)
    x, target = random_batch(ours, *shape, seed=0)
    reference = forward_backward(tv, x, target)
    results = {}
    for name, model in (("ours", ours), ("torchvision", tv)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[name] = forward_backward(model, x, target)
    ours_bf16 = results["ours"]
    assert all(g.dtype == torch.float32 and g.isfinite().all() for g in ours_bf16.grads.values())
    loss = nn.functional.cross_entropy(ours_bf16.output.float(), target)
    assert loss.isfinite()
    torch.testing.assert_close(loss, nn.functional.cross_entropy(reference.output, target), rtol=5e-2, atol=1e-2)
    ours_error = global_relative_error(ours_bf16.grads, reference.grads)
    tv_error = global_relative_error(results["torchvision"].grads, reference.grads)
    assert ours_error <= 2 * tv_error + 0.05, (ours_error, tv_error)


@pytest.mark.parametrize("config", CONFIGS)
def test_autocast_leaves_a_float64_model_alone(config):
    """Autocast casts float32 (and 16-bit) tensors, not float64 ones: a float64
    model under it computes in float64, as torchvision's does."""
    kwargs, shape = CONFIGS[config]
    ours, tv = make_pair(**kwargs)
    x, target = random_batch(ours, *shape, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results = [forward_backward(model, x, target) for model in (ours, tv)]
    assert results[0].output.dtype == torch.float64
    assert_results_equal(results[0], results[1], FLOAT64_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_lone_block_under_autocast_has_torchvisions_dtype(backend):
    """A dense block called on its own, on a float32 input under bfloat16
    autocast, returns float32 as torchvision's (its ``torch.cat`` promotes the
    bfloat16 features to the input's dtype), the input's channels exactly; the
    rest and all gradients as close to float32's as torchvision's."""
    ours, tv = make_pair(dtype=torch.float32, growth_rate=6, block_config=(3, 2), num_init_features=10,
                         backend=BACKENDS[backend])
    x = torch.randn(3, 10, 7, 9, generator=torch.Generator().manual_seed(2))
    weights = torch.randn(3, 28, 7, 9, generator=torch.Generator().manual_seed(3))
    results = {}
    for name, block, autocast in (("ours", ours.features.denseblock1, True), ("tv", tv.features.denseblock1, True),
                                  ("fp32", tv.features.denseblock1, False)):
        block.zero_grad(set_to_none=True)
        x_leaf = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = block(x_leaf)
        (out * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in block.named_parameters()}
        results[name] = (out.detach(), x_leaf.grad, grads)
    out, _, grads = results["ours"]
    assert out.dtype == results["tv"][0].dtype == torch.float32
    assert torch.equal(out[:, :10], x)
    for what, index in (("output", 0), ("input gradient", 1)):
        error, tv_error = (max_relative_error(results[n][index], results["fp32"][index]) for n in ("ours", "tv"))
        assert error <= 2 * tv_error + 1e-3, (what, error, tv_error)
    assert global_relative_error(grads, results["fp32"][2]) <= 2 * global_relative_error(results["tv"][2],
                                                                                         results["fp32"][2]) + 1e-3


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("config", CONFIGS)
def test_input_memory_layout_does_not_matter(config, layout):
    kwargs, shape = CONFIGS[config]
    ours, _ = make_pair(**kwargs)
    x, target = random_batch(ours, *shape, seed=0)
    expected = forward_backward(ours, x, target)
    if layout == "channels_last":
        x_other = x.contiguous(memory_format=torch.channels_last)
    else:
        x_other = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype)[..., ::2]
        x_other.copy_(x)
    assert_results_equal(forward_backward(ours, x_other, target), expected, 1e-10, with_buffers=False)


def test_volume_weights_are_channels_last_and_not_copied_in_forward():
    """The 3x3x3 convolutions see channels-last buffers, so their weights are
    stored channels-last: ATen uses them as they are instead of copying each
    one into that layout on every call."""
    from torch.profiler import profile

    from densenet_fast import monai
    torch.manual_seed(0)
    model = monai.DenseNet(spatial_dims=3, in_channels=1, out_channels=2, init_features=8, growth_rate=4,
                           block_config=(2, 2), backend="torch")
    weights = dense_layer_weights(model)
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last_3d) and not w.is_contiguous()
                           for w in weights)
    shapes = {tuple(w.shape) for w in weights}
    model.train()
    with profile(record_shapes=True) as trace:
        model(torch.randn(2, 1, 16, 12, 16))
    copies = [e for e in trace.events() if e.name in ("aten::copy_", "aten::contiguous", "aten::clone")
              and e.input_shapes and tuple(e.input_shapes[0]) in shapes]
    assert copies == []


def test_image_weights_and_gradients_are_contiguous_as_torchvisions():
    """2-D models keep every parameter and gradient contiguous, as torchvision's,
    so code that flattens them with ``view`` works."""
    torch.manual_seed(0)
    model = densenet_bc(10, 4, backend="torch")
    assert all(p.is_contiguous() for p in model.parameters()) and dense_layer_weights(model)
    nn.functional.cross_entropy(model(torch.randn(2, 3, 8, 8)), torch.tensor([0, 1])).backward()
    flat = torch.nn.utils.parameters_to_vector(model.parameters())
    grads = torch.cat([p.grad.view(-1) for p in model.parameters()])
    assert flat.shape == grads.shape == (sum(p.numel() for p in model.parameters()),)


def dense_layer_weights(model: nn.Module) -> list[torch.Tensor]:
    return [fastpath.dense_layer_parts(layer).conv2.weight for block in model.blocks() for layer in block.children()]


# -- torch.compile -------------------------------------------------------------------------
@pytest.mark.parametrize("backend, case", [("cpp", "plain"), ("triton", "plain"), ("cpp", "dropout"),
                                           ("cpp", "momentum_none"), ("cpp", "autocast")])
def test_torch_compile_matches_eager(backend, case, monkeypatch):
    """torch.compile(fullgraph=True) of a tiny DenseNet-BC (depth 10: a layer per
    block and two transitions) on a backend whose primitives are torch ops with
    fake implementations (``torch.ops.densenet_fast``, or
    ``torch.ops.densenet_fast_triton`` under the Triton interpreter): training
    mode, one graph and no break, under bfloat16 autocast too (dynamo's
    "Global autocast state changed" while the stages' backward switched
    autocast off); outputs, input and parameter gradients and running
    statistics equal to eager.  With dropout or a BatchNorm of momentum=None
    (a Python number read from a tensor: dynamo failed with an IndexError),
    and before torch 2.14, the stages run eagerly between graphs, said once;
    the dropout masks are eager's."""
    backend_on(backend, "cpu")
    monkeypatch.setattr(stage_module, "_said_eager", set())
    torch.manual_seed(0)
    drop_rate = 0.2 if case == "dropout" else 0.0
    model, twin = (densenet_bc(depth=10, growth_rate=4, num_classes=3, backend=backend, drop_rate=drop_rate)
                   for _ in range(2))
    for bn in batchnorms(model) + batchnorms(twin) if case == "momentum_none" else []:
        bn.momentum = None
    x, target = random_batch(model, 2, 9, 8, seed=0)
    fullgraph = stage_module.COMPILE_TRACES_STAGES and case in ("plain", "autocast")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast")
    if fullgraph:
        with autocast:
            explanation = torch._dynamo.explain(twin)(x)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
        torch._dynamo.reset()
    twin.load_state_dict(model.state_dict())  # model's weights (and explain ran a training forward)
    torch.manual_seed(1)
    with autocast:
        eager = forward_backward(model, x, target)
    start = time.perf_counter()
    torch.manual_seed(1)
    with warnings.catch_warnings(record=True) as caught, autocast:
        warnings.simplefilter("always")
        compiled = forward_backward(torch.compile(twin, fullgraph=fullgraph), x, target)
    print(f"torch.compile forward+backward: {time.perf_counter() - start:.1f} s")
    said = [str(w.message) for w in caught if "run eagerly between graphs" in str(w.message)]
    assert len(said) == (0 if fullgraph else 1), said
    compiled.grads = {name.removeprefix("_orig_mod."): grad for name, grad in compiled.grads.items()}
    compiled.buffers = {name.removeprefix("_orig_mod."): b for name, b in compiled.buffers.items()}
    rtol = 2e-2 if case == "autocast" else FP32_RTOL  # bfloat16: inductor may fuse the head's ops differently
    for what in ("output", "input_grad"):
        assert max_relative_error(getattr(compiled, what), getattr(eager, what)) <= rtol, what
    for name in eager.grads:
        assert max_relative_error(compiled.grads[name], eager.grads[name]) <= max(rtol, 1e-4), name
    for name in eager.buffers:
        assert max_relative_error(compiled.buffers[name], eager.buffers[name]) <= rtol, name


@pytest.mark.skipif(not stage_module.COMPILE_TRACES_STAGES, reason="stages run eagerly between graphs before 2.14")
def test_torch_compile_fullgraph_with_a_plain_path_block(monkeypatch):
    """A hook on a dense layer (its block runs torchvision's per-layer code)
    compiles into one graph with ``fullgraph=True``, as torchvision's model
    does: the plain-path warning is said once, at trace time (dynamo cannot
    trace ``warnings.warn``), and torch.compile itself warns of nothing; the
    step equals eager's."""
    torch.manual_seed(0)
    model = densenet_bc(depth=10, growth_rate=4, num_classes=3)
    calls = []
    model.features.denseblock1.denselayer1.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    x, target = random_batch(model, 2, 9, 8, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager = forward_backward(model, x, target)
        monkeypatch.setattr(fastpath, "_warned", weakref.WeakKeyDictionary())  # to be said again, compiled
        monkeypatch.setattr(fastpath, "_said_while_tracing", set())
        compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")
        results = [forward_backward(compiled_model, x, target) for _ in range(2)]
    said = [str(w.message) for w in caught]
    assert len(said) == 2 and all("plain per-layer path because of a hook" in m for m in said), said
    assert len(calls) == 3  # the hook fires in every call, compiled or not
    for result in results:
        assert max_relative_error(result.output, eager.output) <= FP32_RTOL
        assert max_relative_error(result.input_grad, eager.input_grad) <= FP32_RTOL


@pytest.mark.skipif(not stage_module.COMPILE_TRACES_STAGES, reason="stages run eagerly between graphs before 2.14")
def test_torch_compile_with_a_memory_budget():
    """Under a memory budget a compiled training step plans outside its graph,
    once per input shape and never traced (dynamo failed in the planner, and
    warned of the memory model's caches): ``fullgraph=True`` holds for an
    input planned for (``plan_for``) and says what to do for one that is not;
    a fixed policy that does not fit raises the budget's own error; each step
    equals eager's."""
    torch.manual_seed(0)
    model = densenet_bc(depth=10, growth_rate=4, num_classes=3, recompute="auto", memory_budget="1GiB")
    twin = copy.deepcopy(model)
    x, target = random_batch(model, 2, 9, 8, seed=0)
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"call plan_for\(batch, image_size\) before"):
        forward_backward(torch.compile(twin, fullgraph=True, backend="aot_eager"), x, target)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager = forward_backward(model, x, target)
        twin.plan_for(2, (9, 8))
        caught.clear()
        fullgraph = [forward_backward(torch.compile(twin, fullgraph=True, backend="aot_eager"), x, target)
                     for _ in range(2)]
        assert [str(w.message) for w in caught] == []  # planned before: nothing said, nothing traced
        x_new, target_new = random_batch(model, 3, 10, 9, seed=1)
        eager_new = forward_backward(model, x_new, target_new)
        caught.clear()
        compiled_new = forward_backward(torch.compile(twin, backend="aot_eager"), x_new, target_new)
    said = [str(w.message) for w in caught if "mmap threshold" not in str(w.message)]  # not the CPU heap's note
    assert len(said) == 1 and "for batch 3 of 10x9 float32 on cpu" in said[0], said  # the plan, said once
    for compiled, reference in [*((result, eager) for result in fullgraph), (compiled_new, eager_new)]:
        assert max_relative_error(compiled.output, reference.output) <= FP32_RTOL
        assert max_relative_error(compiled.input_grad, reference.input_grad) <= FP32_RTOL
    twin.set_recompute("keep")
    twin.set_memory_budget("200KiB")
    with pytest.raises(MemoryBudgetError, match="more than the memory budget of 200 KiB"):
        forward_backward(torch.compile(twin, backend="aot_eager"), x, target)
