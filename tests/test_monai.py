"""densenet_fast.monai against MONAI's own DenseNet (monai.networks.nets) with
the same weights: float64 outputs, input and parameter gradients, running
statistics and SGD updates at odd 1-D, 2-D and 3-D shapes, in training and
eval; the engine really runs (no concatenation); MONAI's channel dropout;
other act/norm choices on MONAI's plain path with one warning; MONAI
checkpoints, ``pretrained`` and :func:`from_monai`."""

import copy
import re
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torchvision

monai_nets = pytest.importorskip("monai.networks.nets")

import densenet_fast  # noqa: E402
from densenet_fast import monai as fast_monai  # noqa: E402
from densenet_fast import plan  # noqa: E402
from densenet_fast.engine.stage import conv3x3_backward  # noqa: E402
from densenet_fast.memory import Architecture, Setup, predict  # noqa: E402
from densenet_fast.models import InputError, MemoryPlanNotice  # noqa: E402
from helpers import (FLOAT64_RTOL, FP32_RTOL, OpRecorder, assert_all_close, assert_results_equal,  # noqa: E402
                     forward_backward, global_relative_error, randomize_batchnorm, sgd)
from helpers import one_thread  # noqa: E402, F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

# (N, C, *spatial): odd sizes, so every transition's pooling drops pixels
SHAPES = {1: (3, 2, 29), 2: (3, 2, 13, 11), 3: (2, 1, 9, 11, 10)}
# Parameter gradients that are zero in exact arithmetic show rounding noise only: in 3-D
# every 3x3x3 window of the stem's max-pool holds an active ReLU, so norm0's bias moves
# every pooled value alike and the BatchNorms after it cancel it (a gradient of 1e-19).
ZERO_NOISE = 1e-16
TINY = dict(out_channels=3, init_features=6, growth_rate=4, block_config=(2, 3), bn_size=2)


def make_pair(spatial_dims: int, dtype=torch.float64, **config) -> tuple[nn.Module, nn.Module]:
    """``(ours, MONAI's)``: MONAI's model with randomised BatchNorm parameters
    and statistics, and ours built with the same arguments and its ``state_dict``
    (``strict=True``), in training mode."""
    config = {**TINY, **config}
    options = {key: config.pop(key) for key in ("backend", "recompute") if key in config}
    in_channels = SHAPES[spatial_dims][1]
    torch.manual_seed(0)
    theirs = monai_nets.DenseNet(spatial_dims, in_channels, **config)
    randomize_batchnorm(theirs)
    ours = fast_monai.DenseNet(spatial_dims, in_channels, **config, **options)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.to(dtype), theirs.to(dtype)


def random_batch(spatial_dims: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPES[spatial_dims], generator=generator, dtype=torch.float64)
    return x.to(dtype), torch.randint(TINY["out_channels"], (x.shape[0],), generator=generator)


def concatenations(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> int:
    """How many ``torch.cat`` one training step runs (MONAI's dense layers each run one)."""
    with OpRecorder() as recorder:
        forward_backward(model, x, target)
    return sum(name == "cat" for name, _ in recorder.ops)


# -- equality with MONAI --------------------------------------------------------------------------
@pytest.mark.parametrize("backend, recompute", [("torch", "keep"), (None, "recompute")], ids=["torch", "auto"])
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_equals_monai_float64(spatial_dims, backend, recompute):
    """Three SGD steps in training mode, then eval mode: every output, input and
    parameter gradient, running statistic and updated parameter equal to 1e-8;
    the fused path ran (no concatenation)."""
    ours, theirs = make_pair(spatial_dims, backend=backend, recompute=recompute)
    optimizers = sgd(ours), sgd(theirs)
    for step in range(3):
        x, target = random_batch(spatial_dims, seed=step)
        assert_results_equal(forward_backward(ours, x, target), forward_backward(theirs, x, target), FLOAT64_RTOL,
                             atol=ZERO_NOISE)
        for optimizer in optimizers:
            optimizer.step()
    assert_all_close(dict(ours.named_parameters()), dict(theirs.named_parameters()), FLOAT64_RTOL, "parameters")
    ours.eval(), theirs.eval()
    x, target = random_batch(spatial_dims, seed=50)
    assert_results_equal(forward_backward(ours, x, target), forward_backward(theirs, x, target), FLOAT64_RTOL,
                             atol=ZERO_NOISE)
    assert concatenations(ours, x, target) == 0 and concatenations(theirs, x, target) == 5


@pytest.mark.parametrize("recompute", ["keep", "recompute"])
@pytest.mark.parametrize("spatial_dims, size", [(1, (57,)), (2, (21, 19)), (3, (17, 19, 18))])
def test_a_batch_of_one_equals_monai_float64(spatial_dims, size, recompute):
    """One input, the automatic backend: in 1-D and 3-D ATen's im2col convolution
    (its path for one small input) gives the 3x3 convolution's input gradient
    channels-first, which the engine must turn into channel-contiguous rows."""
    ours, theirs = make_pair(spatial_dims, recompute=recompute)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, SHAPES[spatial_dims][1], *size, generator=generator, dtype=torch.float64)
    target = torch.randint(TINY["out_channels"], (1,), generator=generator)
    assert_results_equal(forward_backward(ours, x, target), forward_backward(theirs, x, target), FLOAT64_RTOL,
                         atol=ZERO_NOISE)


def test_auto_recompute_plans_a_volume_and_equals_monai_float64():
    """``recompute="auto"`` under a budget between keep's and recompute's predicted
    peaks: the 3-D step is planned per block (a mixed assignment, said once per
    input shape) and trains as MONAI's model does."""
    ours, theirs = make_pair(3, **{**TINY, "block_config": (6, 3)})
    size = (16, 17, 15)
    arch, setup = Architecture.of(ours), Setup(2, size, torch.float64)
    low, high = (predict(arch, setup, policy).total_bytes for policy in ("recompute", "keep"))
    ours.set_memory_budget((low + high) // 2)
    ours.set_recompute("auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(2):
            generator = torch.Generator().manual_seed(seed)
            x = torch.randn(2, 1, *size, generator=generator, dtype=torch.float64)
            target = torch.randint(TINY["out_channels"], (2,), generator=generator)
            # norm0's bias gradient, zero in exact arithmetic (see ZERO_NOISE), sums more rounding here
            assert_results_equal(forward_backward(ours, x, target), forward_backward(theirs, x, target),
                                 FLOAT64_RTOL, atol=10 * ZERO_NOISE)
    notices = [w for w in caught if issubclass(w.category, MemoryPlanNotice)]
    chosen = tuple(block.recompute for block in ours.blocks())
    assert len(notices) == 1 and len(set(chosen)) == 2 and ours.recompute == "auto", (notices, chosen)
    assert f"recompute={chosen}" in str(notices[0].message) and "16x17x15" in str(notices[0].message)


def test_fp32_close_to_monai():
    """fp32, 3-D: outputs and running statistics to 1e-4 after two steps (the
    gradients' fp32 error is judged against float64 in the torchvision tests,
    on the same engine)."""
    ours, theirs = make_pair(3, dtype=torch.float32)
    for step in range(2):
        x, target = random_batch(3, seed=step, dtype=torch.float32)
        result, expected = forward_backward(ours, x, target), forward_backward(theirs, x, target)
        assert_all_close({"output": result.output}, {"output": expected.output}, FP32_RTOL, "fp32 output")
        assert_all_close(result.buffers, expected.buffers, FP32_RTOL, "fp32 running statistics")


def test_a_lone_block_under_autocast_has_monais_dtype():
    """A 3-D dense block called on its own, float32 input, bfloat16 autocast:
    float32 out as MONAI's (its layers' ``torch.cat`` promote), the input's
    channels exactly, the new ones as close as bfloat16 allows."""
    ours, theirs = make_pair(3, dtype=torch.float32)
    x = torch.randn(2, 6, 5, 7, 6, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = ours.features.denseblock1(x), theirs.features.denseblock1(x)
    assert out.dtype == expected.dtype == torch.float32 and out.shape == expected.shape
    assert torch.equal(out[:, :6], x)
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05)


def test_triton_backend_runs_3d_transitions_on_the_torch_primitive():
    """The Triton backend (interpreter on the CPU) in 3-D: its row kernels and
    the torch backend's transition give the torch backend's results."""
    pytest.importorskip("triton")
    ours, _ = make_pair(3, dtype=torch.float32, backend="triton")
    reference, _ = make_pair(3, dtype=torch.float32, backend="torch")
    x, target = random_batch(3, seed=0, dtype=torch.float32)
    result, expected = forward_backward(ours, x, target), forward_backward(reference, x, target)
    assert_all_close({"output": result.output}, {"output": expected.output}, FP32_RTOL, "triton output")
    assert global_relative_error(result.grads, expected.grads) < 1e-4


@pytest.mark.parametrize("edit", ["drop-last-layer", "widen-transition"])
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_channel_mismatches_raise_monais_errors(spatial_dims, edit):
    """A block's last layer deleted, or a transition widened past what the next
    block takes: the modules run, and their BatchNorm raises MONAI's error (the
    engine raised its own shape errors)."""
    errors = []
    for model in make_pair(spatial_dims):
        if edit == "drop-last-layer":
            block = model.features.denseblock1
            delattr(block, list(block._modules)[-1])
        else:
            conv = model.features.transition1.conv
            model.features.transition1.conv = type(conv)(conv.in_channels, conv.out_channels + 50, 1, bias=False,
                                                         dtype=conv.weight.dtype)
        with pytest.raises(RuntimeError) as error:
            model(random_batch(spatial_dims, seed=0)[0])
        errors.append(str(error.value))
    assert errors[0] == errors[1] and "running_mean should contain" in errors[0]


# -- dropout ----------------------------------------------------------------------------------------
def test_dropout_drops_whole_channels_as_monai():
    """MONAI's Dropout3d after each dense layer: each new channel of each sample
    is all zero or the value without dropout over 0.8; the input passes."""
    torch.manual_seed(0)
    config = {**TINY, "growth_rate": 16, "block_config": (1, 1)}
    block = fast_monai.DenseNet(3, 1, dropout_prob=0.2, **config).features.denseblock1
    x = torch.randn(6, 6, 4, 5, 3)
    dropped = block(x)
    block.denselayer1.layers.dropout.eval()  # dropout off, in MONAI's way for one module
    plain = block(x)
    assert torch.equal(dropped[:, :6], plain[:, :6])
    new, expected = dropped[:, 6:], plain[:, 6:] / 0.8
    zero = (new == 0).flatten(2)
    assert (zero.all(2) | ~zero.any(2)).all(), "dropout must zero whole channels"
    assert 0.1 < zero.all(2).float().mean().item() < 0.3
    torch.testing.assert_close(new[new != 0], expected[new != 0])


def test_dropout_gradcheck_under_a_fixed_seed():
    """Fused backward with channel dropout (3-D) against finite differences."""
    torch.manual_seed(0)
    model = fast_monai.DenseNet(3, 1, dropout_prob=0.3, **{**TINY, "init_features": 3, "growth_rate": 2})
    stage = nn.Sequential(model.features.denseblock1, model.features.transition1).double()
    names, params = zip(*stage.named_parameters())
    x = torch.randn(2, 3, 3, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def function(x, *params):
        torch.manual_seed(3)
        return torch.func.functional_call(stage, dict(zip(names, params)), (x,))

    inputs = (x.requires_grad_(),) + tuple(p.detach().requires_grad_() for p in params)
    assert torch.autograd.gradcheck(function, inputs, fast_mode=True)


# -- other act and norm: MONAI's plain path ---------------------------------------------------------
@pytest.mark.parametrize("spatial_dims, act, norm", [
    (3, "prelu", ("group", {"num_groups": 1})),
    (2, ("leakyrelu", {"negative_slope": 0.1}), "instance"),
    (1, "elu", "batch"),
], ids=["prelu_group_3d", "leakyrelu_instance_2d", "elu_batch_1d"])
def test_other_act_and_norm_equal_monai_with_one_warning(spatial_dims, act, norm):
    torch.manual_seed(0)
    theirs = monai_nets.DenseNet(spatial_dims, SHAPES[spatial_dims][1], act=act, norm=norm, **TINY).double()
    with pytest.warns(RuntimeWarning, match="plain per-layer path") as caught:
        ours = fast_monai.DenseNet(spatial_dims, SHAPES[spatial_dims][1], act=act, norm=norm, **TINY).double()
    assert len(caught) == 1
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for training in (True, False):
        ours.train(training), theirs.train(training)
        x, target = random_batch(spatial_dims, seed=int(training))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once, when built
            result = forward_backward(ours, x, target)
        assert_results_equal(result, forward_backward(theirs, x, target), FLOAT64_RTOL, atol=ZERO_NOISE)
    with pytest.raises(ValueError, match="memory_budget: .*plain per-layer path"):  # the model describes the engine
        ours.set_memory_budget("1GiB")
    with pytest.raises(ValueError, match="plan: .*plain per-layer path"):
        plan(ours, batch=2, image_size=8)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="plain per-layer path"):
        warnings.simplefilter("ignore", RuntimeWarning)
        fast_monai.DenseNet(spatial_dims, SHAPES[spatial_dims][1], act=act, norm=norm, **TINY, memory_budget="1GiB")


# -- module tree, checkpoints, conversion ---------------------------------------------------------
@pytest.mark.parametrize("name", ["DenseNet121", "densenet169", "Densenet201", "DenseNet264"])
def test_named_networks_have_monais_tree_and_initial_weights(name):
    """Same arguments and seed: the same state_dict keys, shapes and values as MONAI's."""
    torch.manual_seed(7)
    theirs = getattr(monai_nets, name)(spatial_dims=3, in_channels=1, out_channels=2).state_dict()
    torch.manual_seed(7)
    ours = getattr(fast_monai, name)(spatial_dims=3, in_channels=1, out_channels=2).state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_pretrained_loads_torchvisions_weights_as_monai(tmp_path, monkeypatch):
    """pretrained=True reads the hub cache (here a file of torchvision's layout with
    the old ``norm.1`` keys) and keeps what MONAI keeps."""
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    state = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key): value
             for key, value in torchvision.models.densenet121(num_classes=5).state_dict().items()}
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / "densenet121-a639ec97.pth")
    torch.manual_seed(2)
    theirs = monai_nets.DenseNet121(spatial_dims=2, in_channels=3, out_channels=5, pretrained=True).state_dict()
    torch.manual_seed(2)
    ours = fast_monai.DenseNet121(spatial_dims=2, in_channels=3, out_channels=5, pretrained=True).state_dict()
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)
    loaded = "features.denseblock2.denselayer3.layers.norm1.weight"
    assert torch.equal(ours[loaded], state["features.denseblock2.denselayer3.norm.1.weight"])
    # one input channel: MONAI leaves conv0 (of another shape) as initialised, and loads the rest
    torch.manual_seed(2)
    theirs = monai_nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=5, pretrained=True).state_dict()
    torch.manual_seed(2)
    ours = fast_monai.DenseNet121(spatial_dims=2, in_channels=1, out_channels=5, pretrained=True).state_dict()
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)
    with pytest.raises(NotImplementedError, match="spatial_dims"):
        fast_monai.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, pretrained=True)


def test_converters_and_plan_name_what_to_pass():
    """Each converter refuses the other library's DenseNet and a wrapper, and
    plan() a model of another library, saying what to pass instead (they
    failed with AttributeErrors, or a replaced forward on OptimizedModule)."""
    monai_model = monai_nets.DenseNet(2, 3, 2, init_features=8, growth_rate=4, block_config=(1, 1))
    tv = torchvision.models.DenseNet(4, (1, 1), 8, num_classes=3)
    with pytest.raises(TypeError, match="has MONAI's tree \\(class_layers\\): convert it with "
                                        "densenet_fast.monai.from_monai"):
        densenet_fast.from_torchvision(monai_model)
    with pytest.raises(TypeError, match="it has torchvision's: convert it with densenet_fast.from_torchvision"):
        fast_monai.from_monai(tv)
    for model in (tv, monai_model, nn.Linear(2, 2)):
        with pytest.raises(TypeError, match="plan: .* is not a densenet_fast DenseNet; convert torchvision's"):
            plan(model, batch=2, image_size=32)
    with pytest.raises(TypeError, match="DataParallel is not a densenet_fast DenseNet \\(a wrapper: pass the model "
                                        "it wraps, .module\\)"):
        plan(nn.DataParallel(densenet_fast.densenet_bc(10, 4)), batch=2, image_size=32)
    for convert, model in ((densenet_fast.from_torchvision, tv), (fast_monai.from_monai, monai_model)):
        with pytest.raises(TypeError, match="torch.compile's wrapper; convert the model it compiles "
                                            "\\(._orig_mod\\), then compile the copy"):
            convert(torch.compile(model))
        with pytest.raises(TypeError, match="a DataParallel wrapper; convert the model it wraps \\(.module\\)"):
            convert(nn.DataParallel(model))


def test_from_monai_copies_modules_weights_and_mode():
    """One call: MONAI's own act/norm modules (here PReLU and group norm, said once)
    and weights, eval mode of one BatchNorm kept; equal results."""
    torch.manual_seed(0)
    theirs = monai_nets.DenseNet(3, 1, act="prelu", norm=("group", {"num_groups": 1}), **TINY).double()
    theirs.features.denseblock1.denselayer2.layers.norm1.eval()
    with pytest.warns(RuntimeWarning, match="PReLU") as caught:
        ours = fast_monai.from_monai(theirs, backend="torch")
    assert len(caught) == 1 and ours.backend == "torch"
    assert not ours.features.denseblock1.denselayer2.layers.norm1.training and ours.training
    x, target = random_batch(3, seed=0)
    assert_results_equal(forward_backward(ours, x, target), forward_backward(theirs, x, target), FLOAT64_RTOL,
                             atol=ZERO_NOISE)

    standard = monai_nets.DenseNet(3, 1, **TINY).double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = fast_monai.from_monai(standard)
    assert not converted.training
    weights = [m.weight for name, m in converted.named_modules() if name.endswith("layers.conv2")]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in weights)
    assert_results_equal(forward_backward(converted, x, target), forward_backward(standard, x, target),
                         FLOAT64_RTOL, atol=ZERO_NOISE)
    assert concatenations(converted, x, target) == 0


@pytest.mark.filterwarnings("ignore:densenet_fast.*stem:RuntimeWarning")  # the stem's modules run as modules
@pytest.mark.parametrize("replace", ["features.norm5", "features.relu0", "class_layers.relu"])
def test_from_monai_keeps_the_blocks_fused_beside_a_replaced_stem_or_head_module(replace):
    """One module replaced outside the dense layers and transitions is no act/norm
    choice of the model's: it runs as a module, the blocks stay fused (every
    block ran MONAI's plain path), and results equal MONAI's."""
    torch.manual_seed(0)
    theirs = monai_nets.DenseNet(3, 1, **TINY).double()
    parent, name = replace.rsplit(".", 1)
    setattr(theirs.get_submodule(parent), name, {"norm5": nn.Identity, "relu0": nn.LeakyReLU, "relu": nn.ReLU6}[name]())
    ours = fast_monai.from_monai(theirs)
    assert ours.engine.plain_reason is None
    x, target = random_batch(3, seed=0)
    assert_results_equal(forward_backward(ours, x, target), forward_backward(theirs, x, target), FLOAT64_RTOL,
                         atol=ZERO_NOISE)
    assert concatenations(ours, x, target) == 0


def test_from_monai_takes_the_options_of_the_constructors():
    monai_model = monai_nets.DenseNet(2, 3, 2, init_features=8, growth_rate=4, block_config=(1, 1))
    assert fast_monai.from_monai(monai_model, recompute="recompute").recompute == "recompute"
    assert fast_monai.from_monai(monai_model, memory_budget="1GiB").memory_budget == 2**30
    with pytest.raises(TypeError, match="from_monai takes backend, recompute and memory_budget, got recompte"):
        fast_monai.from_monai(monai_model, recompte="recompute")


def test_batchnorm_arguments_and_block_config_are_monais():
    """``norm=("batch", {...})`` gives every BatchNorm MONAI's eps and momentum
    (the fused stages read them: the same results and running statistics as
    MONAI's), and a named network takes another ``block_config`` as MONAI's does."""
    ours, theirs = make_pair(2, norm=("batch", {"eps": 1e-3, "momentum": 0.3}))
    norms = [m for m in ours.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all((m.eps, m.momentum) == (1e-3, 0.3) for m in norms)
    x, target = random_batch(2, seed=1)
    assert_results_equal(forward_backward(ours, x, target), forward_backward(theirs, x, target), FLOAT64_RTOL,
                         atol=ZERO_NOISE)
    assert concatenations(ours, x, target) == 0
    config = dict(spatial_dims=2, in_channels=1, out_channels=2, block_config=(2, 2))
    ours, theirs = fast_monai.DenseNet121(**config), monai_nets.DenseNet121(**config)
    assert len(ours.blocks()) == 2 and list(ours.state_dict()) == list(theirs.state_dict())


def test_a_head_rebuilt_with_another_module_runs_it():
    """class_layers rebuilt with a Tanh before ``out``: the head runs MONAI's
    modules (fused, the Tanh was skipped)."""
    ours, theirs = make_pair(2)
    for model in (ours, theirs):
        head = model.class_layers
        model.class_layers = nn.Sequential(OrderedDict([("relu", head.relu), ("pool", head.pool),
                                                        ("flatten", head.flatten), ("tanh", nn.Tanh()),
                                                        ("out", head.out)]))
    x, target = random_batch(2, seed=2)
    assert_results_equal(forward_backward(ours, x, target), forward_backward(theirs, x, target), FLOAT64_RTOL,
                         atol=ZERO_NOISE)


def test_from_monai_copies_a_dense_layer_with_code_of_its_own():
    """A MONAI dense layer whose class has a forward of its own is copied as it
    is and run as written (its block takes the plain path, said once); the
    engine computed MONAI's layer in its place."""
    class Halved(monai_nets.densenet._DenseLayer):
        def forward(self, x):
            return torch.cat([x, 0.5 * self.layers(x)], 1)

    torch.manual_seed(0)
    theirs = monai_nets.DenseNet(3, 1, **TINY).double()
    old = theirs.features.denseblock1.denselayer1
    new = Halved(3, old.layers.conv1.in_channels, TINY["growth_rate"], TINY["bn_size"], 0.0).double()
    new.load_state_dict(old.state_dict())
    theirs.features.denseblock1.denselayer1 = new
    with pytest.warns(RuntimeWarning, match=r"a forward of its own \(.*Halved\)"):
        ours = fast_monai.from_monai(theirs)
        x, target = random_batch(3, seed=0)
        assert_results_equal(forward_backward(ours, x, target), forward_backward(theirs, x, target), FLOAT64_RTOL,
                             atol=ZERO_NOISE)


def test_hook_on_a_dense_layer_gives_monais_plain_path_for_that_block():
    ours, theirs = make_pair(3)
    calls = {id(model): [] for model in (ours, theirs)}
    for model in (ours, theirs):
        model.features.denseblock2.denselayer1.register_forward_hook(
            lambda module, args, out, model=model: calls[id(model)].append(out.shape))
    x, target = random_batch(3, seed=0)
    with pytest.warns(RuntimeWarning, match="plain per-layer path"):
        result = forward_backward(ours, x, target)
    assert_results_equal(result, forward_backward(theirs, x, target), FLOAT64_RTOL, atol=ZERO_NOISE)
    assert calls[id(ours)] == calls[id(theirs)] == [torch.Size([2, 11, 1, 1, 1])]


@pytest.mark.parametrize("name", ["class_layers", "features", "features.transition1"])
def test_a_replaced_forward_runs_as_in_monai(name):
    """A ``forward`` replaced on an instance (as accelerate's hooks do) runs."""
    ours, theirs = make_pair(2)
    for model in (ours, theirs):
        module = model.get_submodule(name)
        module.forward = lambda input, forward=module.forward: forward(input) * 0.5 + 0.25
    x, target = random_batch(2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = forward_backward(ours, x, target)
    assert_results_equal(result, forward_backward(theirs, x, target), FLOAT64_RTOL, atol=ZERO_NOISE)


@pytest.mark.parametrize("x, error, message", [
    (torch.randn(2, 1, 40, 40), ValueError, r"5-D input \(N, C, D, H, W\)"),
    (torch.randn(2, 2, 40, 40, 40), InputError, "conv0 takes 1 input channels"),
    (torch.randn(2, 1, 40, 4, 40), InputError, "40x4x40 are too small .* at least 5x5x5"),
])
def test_bad_input_is_refused_clearly(x, error, message):
    model = fast_monai.DenseNet(3, 1, **TINY)
    with pytest.raises(error, match=message):
        model(x)


@pytest.mark.filterwarnings("ignore:densenet_fast.*:RuntimeWarning")  # PReLU and instance norm run as modules
def test_too_small_input_is_refused_with_other_norms_and_activations():
    """The size check knows MONAI's other stems' norms and activations keep the size."""
    model = fast_monai.DenseNet(3, 1, norm="instance", act="prelu", **TINY)
    assert model.min_input_size() == (5, 5, 5)
    with pytest.raises(InputError, match="4x5x5 are too small .* at least 5x5x5"):
        model(torch.randn(2, 1, 4, 5, 5))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="spatial_dims"):
        fast_monai.DenseNet(4, 1, 2)
    with pytest.raises(ValueError, match="dropout_prob"):
        fast_monai.DenseNet(3, 1, 2, dropout_prob=1.0)
    with pytest.raises(TypeError, match="not a MONAI DenseNet"):
        fast_monai.from_monai(nn.Linear(2, 2))


def test_global_pool_of_the_plain_head_is_monais():
    """A hook on class_layers.pool: the fused blocks run, the head is MONAI's modules."""
    ours, theirs = make_pair(2)
    seen = []
    ours.class_layers.pool.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x, target = random_batch(2, seed=0)
    assert_results_equal(forward_backward(ours, x, target), forward_backward(theirs, x, target), FLOAT64_RTOL,
                             atol=ZERO_NOISE)
    assert seen == [torch.Size([3, 19, 1, 1])]


# -- torch's bfloat16 3-D weight gradient on the CPU -----------------------------------------------
def leave_nan_on_the_heap() -> None:
    """Free tensors full of NaN, so that memory read before it is written shows."""
    junk = [torch.full((size,), float("nan")) for size in (4096, 4096, 65536)]
    del junk


def test_bfloat16_3d_conv_weight_gradients_are_made_where_torch_reads_unwritten_memory():
    """A block at 2x2x3 pixels (17x19x23 volumes): torch 2.14.1's bfloat16 3x3x3
    weight gradient there reads memory it did not write (NaN here, any value
    elsewhere); the engine's conv2 gradients stay within bfloat16's rounding of
    float64's, step after step, under autocast and in pure bfloat16."""
    torch.manual_seed(0)
    model = fast_monai.DenseNet(3, 2, **TINY)
    x = torch.randn(2, 2, 17, 19, 23)

    def conv2_grads(dtype: torch.dtype, autocast: bool) -> dict[str, torch.Tensor]:
        copied = copy.deepcopy(model).to(torch.float32 if autocast else dtype)
        leave_nan_on_the_heap()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = copied(x.to(next(copied.parameters()).dtype))
        out.double().sum().backward()
        return {name: p.grad.double() for name, p in copied.named_parameters() if "conv2" in name}

    weight = torch.randn(4, 8, 3, 3, 3, dtype=torch.bfloat16)
    for side, dtype in ((2, torch.float32), (3, torch.bfloat16)):  # float32 at a side of 2, on any CPU
        volumes = torch.randn(2, 8, side, 3, 3, dtype=torch.bfloat16)
        assert conv3x3_backward(torch.randn(2, 4, side, 3, 3, dtype=torch.bfloat16), volumes, weight)[1].dtype == dtype
    exact = conv2_grads(torch.float64, False)
    for _ in range(5):
        for dtype, autocast in ((torch.float32, True), (torch.bfloat16, False)):
            for name, grad in conv2_grads(dtype, autocast).items():
                error = ((grad - exact[name]).norm() / exact[name].norm()).item()
                assert error < 0.5, (name, autocast, error)  # bfloat16 rounding: up to 0.31 here; NaN fails
