"""Nothing silently wrong: concurrent threads, substituted parameters, NaN and
Inf, inference mode, empty batches, what backward uses, frozen BatchNorm, the
meta device.  Each case is compared with torchvision's DenseNet holding the
same weights (float64 where numbers are compared)."""

import copy
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from densenet_fast import DenseNet, available_backends
from helpers import FLOAT64_RTOL, assert_all_close, buffers, forward_backward, make_pair, random_batch

CONFIG = dict(growth_rate=4, block_config=(2, 3), num_init_features=6, num_classes=5, stem="cifar")
BACKENDS = [b for b in ("torch", "cpp", "triton") if b in available_backends()]


def grads_of(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    return dict(zip(names, torch.autograd.grad(loss, params)))


# -- threads ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["inference", "forward_backward"])
def test_concurrent_threads_get_single_threaded_results(backend, training):
    """4 threads x 20 calls of one model, mixed batch and image sizes: every
    output (and, training, every gradient) equals the single-threaded one."""
    if backend == "triton":
        pytest.skip("the Triton interpreter is not thread-safe")
    ours, _ = make_pair(backend=backend, **CONFIG)
    ours.train(training)
    shapes = [(2 + i % 3, 5 + i % 4, 6 + (i * 7) % 5) for i in range(80)]
    batches = [random_batch(ours, *shape, seed=i) for i, shape in enumerate(shapes)]

    def call(batch):
        x, target = batch
        if not training:
            with torch.no_grad():
                return {"out": ours(x)}
        out = ours(x)
        return {"out": out.detach(), **grads_of(ours, F.cross_entropy(out, target))}

    expected = [call(b) for b in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(call, batches))
    for got, want in zip(results, expected):
        assert_all_close(got, want, 1e-12, "concurrent call")


# -- parameters substituted by torch.func.functional_call -------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_call_gradients_use_the_substituted_weights(backend):
    """Substituted weights of any strides (here the convolutions' with their
    input channels not unit-stride: the cpp kernels' weight layout is made)."""
    dtype = torch.float64 if backend != "triton" else torch.float32
    ours, tv = make_pair(dtype=dtype, backend=backend, **CONFIG)
    x, target = random_batch(ours, 3, 9, 7, seed=0)
    generator = torch.Generator().manual_seed(1)
    substitutes = {name: p.detach() + 0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype)
                   for name, p in ours.named_parameters()}
    substitutes = {name: p.transpose(0, 1).contiguous().transpose(0, 1) if p.dim() == 4 else p
                   for name, p in substitutes.items()}
    results = {}
    for name, model in (("ours", ours), ("torchvision", tv)):
        params = {k: v.clone(memory_format=torch.preserve_format).requires_grad_() for k, v in substitutes.items()}
        out = torch.func.functional_call(model, params, (x,))
        grads = torch.autograd.grad(F.cross_entropy(out, target), list(params.values()))
        results[name] = {"out": out.detach(), **dict(zip(params, grads))}
    assert_all_close(results["ours"], results["torchvision"], FLOAT64_RTOL if dtype == torch.float64 else 1e-4,
                     "functional_call")


# -- NaN and Inf -----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_and_inf_propagate_as_in_torchvision(backend, bad, training):
    dtype = torch.float64 if backend != "triton" else torch.float32
    ours, tv = make_pair(dtype=dtype, backend=backend, **CONFIG)
    ours.train(training), tv.train(training)
    x, target = random_batch(ours, 3, 8, 8, seed=0)
    x[1, 0, 2, 3] = bad
    results = [forward_backward(model, x, target) for model in (ours, tv)]
    for what in ("output", "input_grad"):
        torch.testing.assert_close(getattr(results[0], what), getattr(results[1], what), equal_nan=True,
                                   rtol=1e-5, atol=1e-6, msg=what)
    for name, grad in results[1].grads.items():
        torch.testing.assert_close(results[0].grads[name], grad, equal_nan=True, rtol=1e-5, atol=1e-6, msg=name)
    ours_buffers, tv_buffers = buffers(ours), buffers(tv)
    for name, value in tv_buffers.items():
        torch.testing.assert_close(ours_buffers[name], value, equal_nan=True, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_non_finite_pixel_that_pooling_drops_reaches_the_weight_gradient(backend, bad, training):
    """A transition on 7x7 maps whose last pixel, which its pooling drops, is
    non-finite in one channel: the transition pools before its convolution, so
    that pixel never reached the weight gradient, where torch's convolution
    takes it (its zero gradient times Inf is NaN).  Every gradient matches
    torchvision's transition's, NaN for NaN."""
    dtype = torch.float64 if backend != "triton" else torch.float32
    ours, tv = make_pair(dtype=dtype, backend=backend, **CONFIG)
    x = torch.randn(2, ours.features.transition1.norm.num_features, 7, 7, dtype=dtype,
                    generator=torch.Generator().manual_seed(0))
    x[0, 1, 6, 6] = bad * ours.features.transition1.norm.weight[1].sign().item()  # kept by its ReLU in eval
    grads = []
    for model in (ours, tv):
        transition = model.features.transition1.train(training)
        x_leaf = x.clone().requires_grad_()
        out = transition(x_leaf)
        out.backward(torch.ones_like(out))
        grads.append({"x": x_leaf.grad, **{name: p.grad for name, p in transition.named_parameters()}})
    assert grads[1]["conv.weight"][:, 1].isnan().all()
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, equal_nan=True, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("autocast", [False, True], ids=["model_dtype", "autocast"])
def test_a_nan_image_leaves_its_batch_mates_finite(backend, dtype, autocast):
    """Evaluation in float16/bfloat16 on the CPU (the model in that dtype, or
    float32 under autocast), odd channel counts: a NaN pixel makes its own
    image's output NaN and no other's, as in torchvision (oneDNN's gemm in these
    dtypes leaks a NaN row into the row before it, here the previous image's
    last pixel: docs/cpp.md, "A NaN one row early")."""
    config = {**CONFIG, "growth_rate": 5, "num_init_features": 7}
    ours, tv = make_pair(dtype=torch.float32 if autocast else dtype, backend=backend, **config)
    ours.eval(), tv.eval()
    x, _ = random_batch(ours, 3, 8, 8, seed=0)
    x[1, :, 0, 0] = float("nan")
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=autocast):
        outputs = [model(x) for model in (ours, tv)]
    assert outputs[1].isnan().any(1).tolist() == [False, True, False]
    assert outputs[0].isnan().any(1).tolist() == [False, True, False]
    torch.testing.assert_close(outputs[0][[0, 2]], outputs[1][[0, 2]], rtol=0.05, atol=0.05)


def test_stages_run_with_autocast_off(monkeypatch):
    """Under autocast a stage casts its input itself and runs its primitives with
    autocast off, forward and backward (else CPU autocast would make the float32
    products of the NaN redo 16-bit again)."""
    from densenet_fast.backends.torch_backend import TorchBackend
    seen = []
    for name in ("bn_relu_conv1x1", "bn_relu_conv1x1_backward", "transition", "transition_backward"):
        primitive = getattr(TorchBackend, name)

        def spy(self, *args, _primitive=primitive, _name=name, **kwargs):
            seen.append((_name, torch.is_autocast_enabled("cpu")))
            return _primitive(self, *args, **kwargs)
        monkeypatch.setattr(TorchBackend, name, spy)
    ours, _ = make_pair(dtype=torch.float32, backend="torch", **CONFIG)
    x, target = random_batch(ours, 3, 8, 8, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(ours(x), target)
        loss.backward()  # inside autocast too
    assert {name for name, _ in seen} == {"bn_relu_conv1x1", "bn_relu_conv1x1_backward", "transition",
                                          "transition_backward"}
    assert not any(enabled for _, enabled in seen), seen


# -- inference mode ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_model_trains_after_inference_mode(backend):
    """A validation pass under torch.inference_mode (as Lightning runs one
    before training) leaves the model able to train and to run no_grad."""
    ours, tv = make_pair(backend=backend, **CONFIG)
    x, target = random_batch(ours, 3, 9, 7, seed=0)
    for model in (ours, tv):
        model.eval()
        with torch.inference_mode():
            model(x)
        model.train()
    results = [forward_backward(model, x, target) for model in (ours, tv)]
    assert_all_close(results[0].grads, results[1].grads, FLOAT64_RTOL, "gradients after inference mode")
    ours.eval(), tv.eval()
    with torch.no_grad():
        assert_all_close({"out": ours(x)}, {"out": tv(x)}, FLOAT64_RTOL, "no_grad after inference mode")


# -- empty batch -------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_in_training_behaves_as_torchvision(backend):
    ours, tv = make_pair(backend=backend, **CONFIG)
    x = torch.randn(0, 3, 9, 7, dtype=torch.float64)
    outputs = [model(x) for model in (ours, tv)]
    assert outputs[0].shape == outputs[1].shape == (0, 5)
    assert_all_close(buffers(ours), buffers(tv), 0.0, "buffers after an empty batch")
    grads = [grads_of(model, out.sum()) for model, out in zip((ours, tv), outputs)]
    assert_all_close(grads[0], grads[1], 0.0, "gradients of an empty batch")


# -- backward uses what forward used ------------------------------------------------------------------
def test_backward_uses_the_statistics_its_forward_used():
    """An eval forward, then a training forward (which updates the running
    statistics), then the eval loss's backward: the gradients of a clean eval step."""
    ours, _ = make_pair(**CONFIG)
    clean = copy.deepcopy(ours).eval()
    x, target = random_batch(ours, 3, 9, 7, seed=0)
    expected = grads_of(clean, F.cross_entropy(clean(x), target))
    ours.eval()
    eval_loss = F.cross_entropy(ours(x), target)
    ours.train()
    ours(random_batch(ours, 3, 9, 7, seed=1)[0] * 3 + 1)  # moves every running statistic
    assert_all_close(grads_of(ours, eval_loss), expected, FLOAT64_RTOL, "eval gradients after a training forward")


# -- frozen BatchNorm, meta tensors -------------------------------------------------------------------
def test_frozen_batchnorm_in_a_training_model_takes_a_batch_of_one():
    """BatchNorm layers in eval mode inside a model in training mode use running
    statistics, so one 1x1 pixel per channel is fine, as in torchvision."""
    ours, tv = make_pair(**CONFIG)
    for model in (ours, tv):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    x, target = random_batch(ours, 1, 2, 2, seed=0)  # the last block sees 1x1
    results = [forward_backward(model, x, target) for model in (ours, tv)]
    assert_all_close({"out": results[0].output, **results[0].grads}, {"out": results[1].output, **results[1].grads},
                     FLOAT64_RTOL, "frozen BN, batch of one")
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        DenseNet(**CONFIG).train()(torch.randn(1, 3, 2, 2))  # and with batch statistics it is refused as there


def test_meta_tensors_give_shapes_like_torchvision():
    ours, tv = make_pair(dtype=torch.float32, **CONFIG)
    ours, tv = ours.to("meta"), tv.to("meta")
    x = torch.empty(4, 3, 10, 12, device="meta")
    assert ours(x).shape == tv(x).shape == (4, 5)
    ours.eval()
    assert ours(x).shape == (4, 5)


# -- copies --------------------------------------------------------------------------------------------
def test_deepcopy_and_pickle_give_working_models():
    ours, tv = make_pair(**CONFIG)
    x, target = random_batch(ours, 2, 8, 8, seed=0)
    ours(x)
    for twin in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert_all_close(forward_backward(twin, x, target).grads, forward_backward(ours, x, target).grads,
                         FLOAT64_RTOL, "copy")


def test_a_model_that_synchronises_batch_statistics_is_copied_with_its_group():
    """A deep copy (a moving average of the weights, say) shares the process
    group, which cannot be copied; pickling is refused, saying what to do."""
    model = DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3, stem="cifar")
    group = threading.Lock()  # a stand-in for a process group: neither copied nor pickled
    model.set_sync_group(group)
    twin = copy.deepcopy(model)
    assert {id(block.engine.sync_group) for block in twin.blocks()} == {id(group)}
    assert twin.features.denseblock1.denselayer1.conv1.weight is not model.features.denseblock1.denselayer1.conv1.weight
    assert twin.arena is not model.arena and {id(block.engine) for block in twin.blocks()} == {id(twin.engine)}
    with pytest.raises(TypeError, match=r"call set_sync_group\(None\) first"):
        pickle.dumps(model)
    model.set_sync_group(None)
    assert pickle.loads(pickle.dumps(model)).engine.sync_group is None
