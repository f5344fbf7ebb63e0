"""The DenseNet family against real torchvision: module trees,
state_dicts and parameter counts, loading torchvision weights, the same
outputs, gradients and running statistics as torchvision for the same weights,
and a clear error for every bad input or argument."""

import copy
import pickle
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torchvision

import densenet_fast
from densenet_fast import (BackendUnavailableError, DenseNet, densenet121, densenet161, densenet169, densenet201,
                           densenet264, densenet_bc, from_torchvision)
from helpers import (assert_all_close, check_eval_float64, check_training_float64,
                     check_training_fp32, make_model, make_pair, randomize_batchnorm, torchvision_twin)
from helpers import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

# (our constructor, torchvision's, published parameter count or None)
FAMILY = {
    "densenet121": (densenet121, torchvision.models.densenet121, 7_978_856),
    "densenet169": (densenet169, torchvision.models.densenet169, 14_149_480),
    "densenet201": (densenet201, torchvision.models.densenet201, 20_013_928),
    "densenet161": (densenet161, torchvision.models.densenet161, 28_681_000),
    "densenet264": (densenet264, lambda: torchvision.models.DenseNet(32, (6, 12, 64, 48), 64), None),
}


def shapes(state_dict: dict) -> dict:
    return {name: tuple(t.shape) for name, t in state_dict.items()}


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- module tree, state_dict, parameter counts ---------------------------------------------
@pytest.mark.parametrize("name", FAMILY)
def test_state_dict_and_parameter_count_equal_torchvision(name):
    ours_fn, tv_fn, published = FAMILY[name]
    torch.manual_seed(0)
    ours, tv = ours_fn(), tv_fn()
    assert list(ours.state_dict()) == list(tv.state_dict())
    assert shapes(ours.state_dict()) == shapes(tv.state_dict())
    assert num_parameters(ours) == num_parameters(tv)
    if published is not None:
        assert num_parameters(ours) == published


@pytest.mark.parametrize("depth, growth_rate, published_millions", [(100, 12, 0.8), (250, 24, 15.3), (190, 40, 25.6)])
def test_densenet_bc_matches_the_paper_and_torchvision_tree(depth, growth_rate, published_millions):
    """Huang et al. 2017, Table 2 (CIFAR-10): DenseNet-BC parameter counts."""
    model = densenet_bc(depth, growth_rate, num_classes=10)
    assert num_parameters(model) / 1e6 == pytest.approx(published_millions, abs=0.05)
    if (depth, growth_rate) == (100, 12):
        assert num_parameters(model) == 769_162
        assert 750_000 < num_parameters(model) < 850_000
    n = (depth - 4) // 6
    assert [len(block) for block in model.blocks()] == [n, n, n]
    assert model.features.conv0.kernel_size == (3, 3) and model.features.conv0.out_channels == 2 * growth_rate
    twin = torchvision_twin(model)  # torchvision's tree with the 3x3 stem
    assert shapes(model.state_dict()) == shapes(twin.state_dict())


def test_constructor_options_match_torchvision():
    options = dict(growth_rate=12, block_config=(2, 3), num_init_features=20, bn_size=2, drop_rate=0.1,
                   num_classes=17)
    ours, tv = DenseNet(**options, memory_efficient=True), torchvision.models.DenseNet(**options)
    assert shapes(ours.state_dict()) == shapes(tv.state_dict())
    assert ours.recompute == "recompute"  # memory_efficient=True selects the leanest policy
    assert DenseNet(in_channels=1).features.conv0.weight.shape == (64, 1, 7, 7)
    layer = ours.features.denseblock1.denselayer1
    assert layer.memory_efficient is False  # torchvision's attribute, read by code written for it
    with pytest.raises(AttributeError, match="set_recompute"):  # not ignored: the policy is the model's
        layer.memory_efficient = True


# -- loading torchvision weights -----------------------------------------------------------
def test_load_state_dict_strict_both_ways():
    tv = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 3, 2), num_init_features=16, num_classes=5)
    randomize_batchnorm(tv, seed=1)
    ours = DenseNet(growth_rate=8, block_config=(2, 3, 2), num_init_features=16, num_classes=5)
    ours.load_state_dict(tv.state_dict(), strict=True)
    assert_all_close(ours.state_dict(), tv.state_dict(), 0.0, "torchvision -> ours")
    back = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 3, 2), num_init_features=16, num_classes=5)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert_all_close(back.state_dict(), tv.state_dict(), 0.0, "ours -> torchvision")


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_from_torchvision(stem):
    _, tv = make_pair(growth_rate=6, block_config=(2, 2), num_init_features=10, num_classes=4, in_channels=2,
                      drop_rate=0.1, stem=stem)
    tv.eval()
    ours = from_torchvision(tv, recompute="recompute", backend="torch")
    assert isinstance(ours, DenseNet) and not ours.training and ours.features.conv0.weight.dtype == torch.float64
    assert (ours.stem, ours.recompute, ours.backend) == (stem, "recompute", "torch")
    assert ours.blocks()[0].denselayer1.drop_rate == 0.1
    assert_all_close(ours.state_dict(), tv.state_dict(), 0.0, "state_dict")
    check_eval_float64(ours, tv, (3, 37, 35))
    assert from_torchvision(tv).recompute == "keep"
    efficient = copy.deepcopy(tv)  # torchvision's checkpointed layers: the leanest policy by default
    for layer in efficient.features.modules():
        if hasattr(layer, "memory_efficient"):
            layer.memory_efficient = True
    assert [from_torchvision(efficient, **kw).recompute for kw in ({}, {"recompute": "keep"})] == ["recompute", "keep"]
    for layer in [m for m in [*ours.modules(), *tv.modules()] if hasattr(m, "drop_rate")]:
        layer.drop_rate = 0.0  # dropout masks differ; training without it must match
    ours.train(), tv.train()
    check_training_float64(ours, tv, (3, 37, 35), steps=2)
    with pytest.raises(TypeError, match="no dense blocks"):
        from_torchvision(torchvision.models.resnet18())


class Doubled(torchvision.models.densenet._DenseLayer):
    """A user's dense layer: torchvision's modules, a forward of its own."""

    def forward(self, input):
        return 2 * super().forward(input)


class DoubledOurs(densenet_fast.models._DenseLayer):
    def forward(self, input):
        return 2 * super().forward(input)


class HalvedBottleneck(torchvision.models.densenet._DenseLayer):
    """Only a helper that torchvision's forward calls is overridden."""

    def bn_function(self, inputs):
        return 0.5 * super().bn_function(inputs)


class HalvedBottleneckOurs(densenet_fast.models._DenseLayer):
    def bn_function(self, inputs):
        return 0.5 * super().bn_function(inputs)


class Tagged(densenet_fast.models._DenseLayer):
    """A subclass with nothing but its constructor: the engine still runs it."""

    def __init__(self, *args):
        super().__init__(*args)
        self.tag = "mine"


def with_layer(model: nn.Module, layer_class: type) -> nn.Module:
    """``model`` with features.denseblock1.denselayer1 replaced by a ``layer_class`` of the same weights."""
    old = model.features.denseblock1.denselayer1
    new = layer_class(old.conv1.in_channels, old.conv2.out_channels, old.conv1.out_channels // old.conv2.out_channels,
                      old.drop_rate).double()
    new.load_state_dict(old.state_dict())
    model.features.denseblock1.denselayer1 = new.train(old.training)
    return model


@pytest.mark.parametrize("layer_class, ours_class", [(Doubled, DoubledOurs), (HalvedBottleneck, HalvedBottleneckOurs)])
def test_a_layer_class_with_code_of_its_own_runs_as_written(layer_class, ours_class):
    """A dense layer whose class has methods of its own (a forward, or a helper
    torchvision's forward calls) makes its block run the plain path, which
    calls it (the engine computed torchvision's layer in its place, silently),
    said once; from_torchvision copies such a layer as it is, as does putting
    one into our model.  A subclass with only a constructor of its own is still
    run by the engine."""
    config = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5)
    for convert in (from_torchvision, lambda tv: with_layer(make_model(**config), ours_class)):
        tv = with_layer(make_pair(**config)[1], layer_class)
        with pytest.warns(RuntimeWarning, match=rf"(a forward|methods) of its own \(.*{layer_class.__name__}"):
            check_training_float64(convert(tv), tv, (3, 17, 15), steps=2)
    ours, tv = make_pair(**config)
    ours = with_layer(ours, lambda *args: Tagged(*args))
    assert ours.features.denseblock1.engine_blocker() is None
    check_training_float64(ours, tv, (3, 17, 15), steps=1)


def test_blocks_and_models_with_code_of_their_own():
    """A block class with a forward of its own runs as its own module call, as
    written; from_torchvision refuses a source whose model, features, block or
    transition has code of its own (the converted model runs its own classes
    there), and names a TorchScript module as a replaced forward."""
    config = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5)

    class DoubledBlock(torchvision.models.densenet._DenseBlock):
        def forward(self, init_features):
            return 2 * super().forward(init_features)

    class DoubledBlockOurs(densenet_fast.models._DenseBlock):
        def forward(self, init_features):
            return 2 * super().forward(init_features)

    ours, tv = make_pair(**config)
    for model, block_class in ((ours, DoubledBlockOurs), (tv, DoubledBlock)):
        old = model.features.denseblock2
        model.features.denseblock2 = block_class(2, old.denselayer1.conv1.in_channels, 4, 4, 0.0).double()
        model.features.denseblock2.load_state_dict(old.state_dict())
    check_training_float64(ours, tv, (3, 17, 15), steps=2)
    with pytest.raises(TypeError, match=r"features.denseblock2 of the DenseNet to convert has a forward of its own "
                                        r"\(.*DoubledBlock\), which the converted model would not run"):
        from_torchvision(tv)

    class OwnNet(torchvision.models.DenseNet):
        def forward(self, x):
            return super().forward(x).flip(1)

    with pytest.raises(TypeError, match=r"OwnNet of the OwnNet to convert has a forward of its own"):
        from_torchvision(OwnNet(**config).double())
    _, tv = make_pair(**config)
    tv.classifier = torch.jit.script(tv.classifier)
    with pytest.raises(TypeError, match="a replaced forward on classifier"):
        from_torchvision(tv)


def dense_layer_conv_change(name: str):
    """A change of ``denselayer2``'s convolutions that the engine does not compute."""
    def reflect(layer): layer.conv2.padding_mode = "reflect"
    def dilate(layer): layer.conv2.dilation, layer.conv2.padding = (2, 2), (2, 2)
    def group(layer):
        layer.conv1.groups = 2
        layer.conv1.weight = nn.Parameter(layer.conv1.weight[:, :layer.conv1.in_channels // 2].clone())
    return dict(reflect=reflect, dilate=dilate, group=group)[name]


@pytest.mark.parametrize("change", ["reflect", "dilate", "group"])
def test_a_dense_layer_convolution_of_other_settings_runs_its_modules(change):
    """A dense layer's convolution whose settings the engine does not compute
    (another padding mode, dilation, grouping) runs as torchvision's,
    said once (a check that ignored padding_mode zero-padded, wrong by 2e-2)."""
    ours, tv = make_pair(growth_rate=6, block_config=(3, 2, 3), num_init_features=12, num_classes=5, stem="cifar")
    for model in (ours, tv):
        dense_layer_conv_change(change)(model.features.denseblock1.denselayer2)
    with pytest.warns(RuntimeWarning, match="_DenseBlock runs the plain per-layer path"):
        check_training_float64(ours, tv, (3, 13, 11), steps=1)


def test_features_rebuilt_as_a_sequential_run_its_modules():
    """``features`` replaced by a plain ``nn.Sequential`` of the same modules (to
    edit the stem, say): the model runs them one by one, each block and
    transition still fused, as torchvision's does (it raised AttributeError);
    a memory budget refuses the model, whose steps its model no longer describes."""
    ours, tv = make_pair(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5, stem="cifar")
    for model in (ours, tv):
        model.features = nn.Sequential(OrderedDict(model.features.named_children()))
    check_training_float64(ours, tv, (3, 17, 15), steps=2)
    with pytest.raises(ValueError, match="features replaced by a Sequential"):
        ours.set_memory_budget("1GiB")
    ours.set_sync_group(object())  # refused before any collective: norm5 would not synchronise
    with pytest.raises(NotImplementedError, match="synchronised batch statistics .* features replaced"):
        ours(torch.randn(2, 3, 16, 16, dtype=torch.float64))


def test_from_torchvision_copies_replaced_modules():
    """A stem without max-pooling, another activation and a classifier with
    dropout are copied, not rebuilt as torchvision's defaults."""
    _, tv = make_pair(growth_rate=6, block_config=(2, 2), num_init_features=10, num_classes=4)
    tv.features.pool0, tv.features.relu0 = nn.Identity(), nn.LeakyReLU(0.2)
    tv.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(tv.classifier.in_features, 7)).double()
    ours = from_torchvision(tv.train())
    assert type(ours.features.pool0) is nn.Identity and type(ours.features.relu0) is nn.LeakyReLU
    assert_all_close(ours.state_dict(), tv.state_dict(), 0.0, "state_dict")
    check_training_float64(ours, tv, (3, 17, 15), steps=2)
    hook = tv.features.denseblock1.register_forward_hook(lambda *args: None)
    with pytest.raises(TypeError, match="a hook on features.denseblock1 of the DenseNet to convert"):
        from_torchvision(tv)
    hook.remove()
    conv = tv.features.denseblock1.denselayer1.conv1
    conv.forward = lambda input, forward=conv.forward: forward(input)  # would call back into tv's conv
    with pytest.raises(TypeError, match="a replaced forward on features.denseblock1.denselayer1.conv1"):
        from_torchvision(tv)
    del conv.forward
    _, plain = make_pair(growth_rate=6, block_config=(2, 2), num_init_features=10, num_classes=4)
    plain.classifier = nn.Sequential(nn.Dropout(0.0), plain.classifier)
    with pytest.raises(ValueError, match="a classifier other than one nn.Linear"):
        from_torchvision(plain, memory_budget="1GiB")
    assert from_torchvision(plain, recompute="recompute").recompute == "recompute"
    shared = nn.ReLU(inplace=True)  # one module under several names: one copy, shared as in tv
    for layer in (tv.features.denseblock1.denselayer1, tv.features.denseblock1.denselayer2):
        layer.relu1 = shared
    ours = from_torchvision(tv)
    assert ours.features.denseblock1.denselayer1.relu1 is ours.features.denseblock1.denselayer2.relu1
    del tv.features.norm5
    with pytest.raises(TypeError, match="module tree differs"):
        from_torchvision(tv)
    with pytest.raises(TypeError, match="from_torchvision takes backend, recompute and memory_budget, got recompte"):
        from_torchvision(plain, recompte="recompute")
    # a one-channel stem: the copy takes one channel, and its budget plans it (a stem unlike the constructor's
    # was refused by the planner)
    _, grey = make_pair(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3)
    grey.features.conv0 = nn.Conv2d(1, 8, 7, 2, 3, bias=False)
    ours = from_torchvision(grey, memory_budget="1GiB")
    assert ours.in_channels == 1 and ours.memory_budget == 2**30 and ours.memory_model_blocker() is None
    ours.plan_for(2, 32)


def old_style_keys(state_dict: dict) -> dict:
    """torchvision's published files: ``...denselayer1.norm.1.weight`` for
    ``...denselayer1.norm1.weight``, and no ``num_batches_tracked``."""
    renamed = {}
    for name, tensor in state_dict.items():
        if name.endswith("num_batches_tracked"):
            continue
        for part in ("norm", "relu", "conv"):
            for index in ("1", "2"):
                name = name.replace(f".{part}{index}.", f".{part}.{index}.")
        renamed[name] = tensor
    return renamed


@pytest.mark.parametrize("style", ["current", "old"])
def test_weights_file_loads(tmp_path, style):
    torch.manual_seed(0)
    tv = torchvision.models.densenet121()
    randomize_batchnorm(tv, seed=2)
    state_dict = tv.state_dict() if style == "current" else old_style_keys(tv.state_dict())
    if style == "old":
        assert "features.denseblock1.denselayer1.norm.1.weight" in state_dict
    path = tmp_path / "densenet121.pth"
    torch.save(state_dict, path)
    expected = {k: v for k, v in tv.state_dict().items() if style == "current" or "num_batches" not in k}
    for weights in (path, str(path), torch.load(path)):
        loaded = densenet121(weights=weights).state_dict()
        assert_all_close({k: loaded[k] for k in expected}, expected, 0.0, "loaded weights")
    # strict: a file of another network, or missing a tensor, is refused, not loaded in part
    partial = {k: v for k, v in state_dict.items() if k != "classifier.weight"}
    with pytest.raises(RuntimeError, match="Missing key.*classifier.weight"):
        densenet121(weights=partial)
    with pytest.raises(RuntimeError, match="Unexpected key.*extra"):
        densenet121(weights={**state_dict, "extra": torch.zeros(1)})


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return print, ("unpickling ran code",)


def test_a_weights_file_that_would_run_code_is_refused(tmp_path, capsys):
    """Weights files are read with ``weights_only=True``: a pickle that calls a
    function when loaded is refused without calling it."""
    torch.save({"features.conv0.weight": RunsCodeWhenUnpickled()}, tmp_path / "bad.pth")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        densenet121(weights=tmp_path / "bad.pth")
    assert "unpickling ran code" not in capsys.readouterr().out


# -- same weights, same numbers ------------------------------------------------------------
def test_densenet121_equals_torchvision_float64():
    """DenseNet-121 itself, batch 2 at 97x131: three SGD steps in training mode,
    then eval mode; every output, gradient and running statistic to 1e-8."""
    torch.manual_seed(0)
    ours = densenet121(num_classes=10)
    randomize_batchnorm(ours)
    ours.double()
    check_training_float64(ours, torchvision_twin(ours), (2, 97, 131), steps=3)
    check_eval_float64(ours, torchvision_twin(ours), (2, 97, 131))


def test_densenet121_fp32_as_good_as_torchvision():
    """On DenseNet-121 (batch 3, 67x45), three steps."""
    torch.manual_seed(0)
    ours = densenet121(num_classes=10)
    randomize_batchnorm(ours)
    check_training_fp32(ours, (3, 67, 45), steps=3)


SMALL_CONFIGS = {
    "in_channels1": dict(growth_rate=8, block_config=(2, 3, 2), num_init_features=16, bn_size=2, num_classes=3,
                         in_channels=1),
    "memory_efficient": dict(growth_rate=6, block_config=(3, 2), num_init_features=12, num_classes=10,
                             memory_efficient=True),
    "cifar_stem": dict(growth_rate=4, block_config=(2, 2, 2), num_init_features=8, num_classes=10, stem="cifar"),
}


@pytest.mark.parametrize("config", SMALL_CONFIGS)
def test_small_configs_equal_torchvision(config):
    """Batch 3 at 45x51 in float64 (train steps and eval) and in fp32 (§5)."""
    ours, tv = make_pair(**SMALL_CONFIGS[config])
    check_training_float64(ours, tv, (3, 45, 51), steps=3)
    check_eval_float64(ours, tv, (3, 45, 51))
    ours, _ = make_pair(dtype=torch.float32, **SMALL_CONFIGS[config])
    check_training_fp32(ours, (3, 45, 51), steps=3)


# -- modules changed after construction, as users of torchvision's do --------------------------
def test_a_replaced_norm5_leaves_the_features_to_change_in_place():
    """With ``norm5`` replaced, the last block's output meets the head's in-place
    ReLU: a copy, so backward is intact (the block's buffer is saved for it)."""
    ours, tv = make_pair(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3, stem="cifar")
    for model in (ours, tv):
        model.features.norm5 = nn.Identity()
    check_training_float64(ours, tv, (2, 19, 17), steps=2)
    block = ours.blocks()[0]
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64, requires_grad=True)
    out = block(x)
    out.relu_()
    grad_ours, = torch.autograd.grad(out.sum(), x)
    grad_tv, = torch.autograd.grad(tv.features.denseblock1(x).relu().sum(), x)
    assert_all_close({"grad_x": grad_ours}, {"grad_x": grad_tv}, 1e-12, "a block's output changed in place")


@pytest.mark.filterwarnings("ignore:densenet_fast.*in the stem:RuntimeWarning")  # the stem runs as modules
@pytest.mark.parametrize("change", ["one_channel_conv0", "cifar_conv0_no_pool0"])
def test_a_replaced_stem_takes_what_its_modules_take(change):
    """Inputs are checked against the stem as it is now: a one-channel ``conv0``
    (grayscale), or a 3x3 ``conv0`` without ``pool0`` (small images)."""
    ours, tv = make_pair(growth_rate=4, block_config=(2, 2, 2), num_init_features=8, num_classes=3)
    for model in (ours, tv):
        torch.manual_seed(1)
        if change == "one_channel_conv0":
            model.features.conv0 = nn.Conv2d(1, 8, 7, 2, 3, bias=False).double()
        else:
            model.features.conv0 = nn.Conv2d(3, 8, 3, 1, 1, bias=False).double()
            model.features.pool0 = nn.Identity()
    channels, side = (1, 32) if change == "one_channel_conv0" else (3, 8)
    x = torch.randn(2, channels, side, side, dtype=torch.float64)
    assert_all_close({"out": ours(x)}, {"out": tv(x)}, 1e-10, "output")
    with pytest.raises(ValueError, match=f"conv0 takes {channels} input channels, got 2"):
        ours(torch.randn(2, 2, side, side, dtype=torch.float64))
    least = 13 if change == "one_channel_conv0" else 4  # stride 4 in the stem, two transitions
    assert ours.min_input_size() == (least, least)
    with pytest.raises(ValueError, match=f"too small .* at least {least}x{least}"):
        ours(torch.randn(2, channels, least - 1, least, dtype=torch.float64))
    ours.features.pool0 = nn.AdaptiveAvgPool2d(4)  # a module whose output size the check does not know
    assert ours.min_input_size() is None and ours(torch.randn(2, channels, 5, 5, dtype=torch.float64)).shape == (2, 3)


@pytest.mark.filterwarnings("ignore:densenet_fast.*in the stem:RuntimeWarning")
def test_smallest_input_follows_pytorchs_output_sizes_per_dimension():
    """A stem with a different kernel, stride, padding and dilation along each
    dimension: every input from 1x1 to 14x14 is refused exactly when the modules
    would leave the last block empty, and otherwise gives the size predicted."""
    model = DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3).eval()
    model.features.conv0 = nn.Conv2d(3, 8, (3, 5), stride=(1, 2), padding=(0, 2), dilation=(2, 1), bias=False)
    model.features.pool0 = nn.MaxPool2d((2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    stem = nn.Sequential(*model.stem_modules())
    least = model.min_input_size()
    for h in range(1, 15):
        for w in range(1, 15):
            try:
                side = stem(torch.randn(1, 3, h, w)).shape[2:]
                expected = tuple(n // 2 for n in side)  # one transition
            except RuntimeError:  # a stem module refuses it
                expected = (0, 0)
            assert (min(expected) < 1) == (h < least[0] or w < least[1])
            if min(expected) >= 1:
                assert model.feature_size(h, w) == expected
                assert model.features(torch.randn(2, 3, h, w)).shape[2:] == expected
            else:
                with pytest.raises(ValueError, match=f"{h}x{w} are too small .* at least {least[0]}x{least[1]}"):
                    model(torch.randn(2, 3, h, w))
    assert least[0] != least[1]


@pytest.mark.filterwarnings("ignore:densenet_fast.*in the stem:RuntimeWarning")
def test_a_stem_of_unknown_output_size_is_left_to_its_modules():
    """An unknown module after a shrinking convolution, and a lazy ``conv0``:
    no check of size or channels, the modules raise their own errors."""
    model = DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3).eval()
    model.features.conv0 = nn.Conv2d(3, 8, 3, padding=0, bias=False)
    model.features.pool0 = nn.AdaptiveAvgPool2d(4)
    assert model.min_input_size() is None and model.feature_size(2, 2) is None
    with pytest.raises(RuntimeError, match="(?i)kernel size"):  # conv0's own error
        model(torch.randn(2, 3, 2, 2))
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, 3)
    model.features.conv0 = nn.LazyConv2d(8, 3, padding=1, bias=False)
    assert model(torch.randn(2, 5, 6, 6)).shape == (2, 3)  # five channels: the lazy conv takes them


@pytest.mark.filterwarnings("ignore:densenet_fast.*:RuntimeWarning")  # the replaced transition runs as modules
@pytest.mark.parametrize("pool", ["ceil_mode", "identity", "max_pool_3"])
def test_inputs_are_checked_against_the_transitions_as_they_are_now(pool):
    """A transition's pool replaced: no pooling keeps the size and another pool
    is sized by PyTorch's rule (an input too small for it is refused in one
    line), a ceil-mode pool is not sized here (its modules raise their own
    errors); every input torchvision takes this model takes, with the same output."""
    ours, tv = make_pair(growth_rate=4, block_config=(2, 2, 2), num_init_features=8, num_classes=3)
    for model in (ours, tv):
        model.features.transition2.pool = {"ceil_mode": lambda: nn.AvgPool2d(2, 2, ceil_mode=True),
                                           "identity": nn.Identity, "max_pool_3": lambda: nn.MaxPool2d(3, 2)}[pool]()
    least = ours.min_input_size()
    assert least == {"ceil_mode": None, "identity": (5, 5), "max_pool_3": (21, 21)}[pool]
    transition1 = ours.features.transition1
    ours.features.transition1 = nn.Identity()  # (a replaced transition is no longer one)
    assert ours.num_transitions == 1
    ours.features.transition1 = transition1
    assert ours.num_transitions == 2
    for side in range(1, 30):
        x = torch.randn(2, 3, side, side, dtype=torch.float64)
        try:
            expected = tv(x)
        except RuntimeError:  # too small for one of its modules
            refusal = {"ceil_mode": "(?i)kernel size|output size", "identity": "too small .* at least 5x5",
                       "max_pool_3": f"{side}x{side} are too small for this DenseNet \\(its stem and 2 transitions\\): "
                                     f"it needs at least 21x21"}[pool]
            with pytest.raises((RuntimeError, ValueError), match=refusal):
                ours(x)
            continue
        assert least is None or side >= least[0]
        assert_all_close({"out": ours(x)}, {"out": expected}, 1e-10, f"output at {side}x{side}")


def test_replaced_modules_are_named_in_errors_and_refused_by_the_planner():
    model = DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3, stem="cifar")
    assert model.memory_model_blocker() is None
    model.features.conv0 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
    with pytest.raises(ValueError, match="conv0 takes 1 input channels, got 3 .*conv0 was replaced after construction"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="plan: .*a stem changed since construction"):
        densenet_fast.plan(model, batch=2, image_size=8)
    model.features.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # as built again
    model.features.norm5 = nn.Identity()
    with pytest.raises(ValueError, match="memory_budget: .*a norm5 \\(Identity\\)"):
        model.set_memory_budget("1GiB")


def test_from_torchvision_keeps_float64_weights_exactly():
    """A float64 model's weights and buffers copied to the last digit (not
    through a float32 model)."""
    tv = torchvision.models.DenseNet(4, (2, 2), 8, num_classes=3).double()
    randomize_batchnorm(tv, seed=3)
    with torch.no_grad():
        for tensor in tv.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) * 1e-12)  # digits float32 cannot hold
    ours = from_torchvision(tv)
    assert_all_close(ours.state_dict(), tv.state_dict(), 0.0, "state_dict")


# -- bad input -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model121():
    torch.manual_seed(0)
    return densenet121(num_classes=4)


@pytest.mark.parametrize("x, error, message", [
    (torch.randn(2, 1, 64, 64), ValueError, "conv0 takes 3 input channels, got 1"),
    (torch.randn(3, 64, 64), ValueError, "4-D input"),
    (torch.randn(1, 2, 3, 64, 64), ValueError, "4-D input"),
    (torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8), TypeError, "floating-point"),
    (torch.randn(2, 3, 64, 64, dtype=torch.float64), TypeError, "differs from the model's"),
    (torch.randn(2, 3, 28, 64), ValueError, "28x64 are too small .* at least 29x29"),
], ids=["channels", "3d", "5d", "uint8", "dtype", "too_small"])
def test_bad_input_is_named(model121, x, error, message):
    with pytest.raises(error, match=message):
        model121(x)


def test_smallest_input_size_agrees_with_torchvision(model121):
    size, width = model121.min_input_size()
    assert size == width
    tv = torchvision_twin(model121).eval()
    model121.eval()
    x = torch.randn(2, 3, size, size)
    assert_all_close({"out": model121(x)}, {"out": tv(x)}, 1e-4, "smallest input")
    with pytest.raises(Exception):  # torchvision fails one pixel below
        tv(torch.randn(2, 3, size - 1, size))
    with pytest.raises(ValueError, match="too small"):
        model121(torch.randn(2, 3, size - 1, size))
    model121.train()


def test_batch_of_one_in_training(model121):
    """As nn.BatchNorm2d: one value per channel in training is an error; eval works."""
    x = torch.randn(1, 3, 32, 32)
    tv = torchvision_twin(model121).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        tv(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        model121.train()(x)
    try:
        assert model121.eval()(x).shape == (1, 4)
    finally:
        model121.train()
    assert model121(torch.randn(2, 3, 32, 32)).shape == (2, 4)  # two images are enough in training


@pytest.mark.parametrize("build, message", [
    (lambda: densenet121(weigths=None), "weigths"),  # a misspelt keyword is not swallowed
    (lambda: densenet_bc(100, 12, 10, colour=True), "colour"),
    (lambda: DenseNet(grow_rate=12), "grow_rate"),
], ids=["densenet121", "densenet_bc", "DenseNet"])
def test_unknown_constructor_argument(build, message):
    with pytest.raises(TypeError, match=message):
        build()


@pytest.mark.parametrize("build, message", [
    (lambda: DenseNet(growth_rate=-4), "growth_rate must be a positive integer"),
    (lambda: DenseNet(growth_rate=2.5), "growth_rate must be a positive integer"),
    (lambda: DenseNet(block_config=()), "block_config"),
    (lambda: DenseNet(block_config=(2, 0)), "block_config"),
    (lambda: DenseNet(num_classes=0), "num_classes"),
    (lambda: DenseNet(in_channels=0), "in_channels"),
    (lambda: DenseNet(drop_rate=1.0), "drop_rate"),
    (lambda: DenseNet(stem="mnist"), "stem"),
    (lambda: densenet_bc(depth=99), "depth must be 6n \\+ 4"),
    (lambda: densenet_bc(depth=4), "depth must be 6n \\+ 4"),
    (lambda: densenet121(recompute="sometimes"), "recompute must be one of"),
    (lambda: densenet121(recompute=True), "recompute must be one of"),  # not a bool: which policy would it be?
], ids=["negative_growth", "float_growth", "no_blocks", "empty_block", "classes", "in_channels", "drop_rate",
        "stem", "bc_depth", "bc_depth_small", "recompute", "recompute_bool"])
def test_bad_constructor_value(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_recompute_takes_any_sequence_of_policies():
    from collections import UserList  # as OmegaConf's ListConfig: a Sequence, not a list
    import numpy as np
    policies = UserList(["keep", "recompute", "keep"])
    assert densenet_bc(10, 4, recompute=policies).recompute == ("keep", "recompute", "keep")
    model = densenet_bc(16, 4, recompute=("keep", "keep", "recompute"))  # each block its own, in order
    assert [block.recompute for block in model.blocks()] == ["keep", "keep", "recompute"]
    for bad in (np.array(["keep"] * 3), {"keep"}, None, False):  # no order, or which policy would it be?
        with pytest.raises(ValueError, match="recompute must be one of"):
            densenet_bc(10, 4).set_recompute(bad)


def test_sizes_are_python_ints_numpy_integers_taken_bools_refused():
    """One check for every size, in the models and the memory model alike."""
    import numpy as np
    from densenet_fast import memory, monai
    model = DenseNet(np.int64(6), (np.int32(2), 1), np.int16(8), num_classes=np.uint8(3), in_channels=np.int64(1))
    layer = model.features.denseblock1.denselayer2
    assert type(layer.conv2.out_channels) is int and layer.conv1.in_channels == 8 + 6
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    volume = monai.DenseNet(2, np.int64(1), np.int64(2), growth_rate=np.int64(4), block_config=(1, 1), init_features=8)
    assert type(volume.features.denseblock1.denselayer1.layers.conv2.out_channels) is int
    assert densenet_bc(np.int64(16), 4).features.denseblock3.denselayer2.conv2.out_channels == 4
    assert memory.Architecture.named("densenet_bc", np.int32(22)).depth == 22
    arch = memory.Architecture(np.int64(12), (np.int64(2),), 24)
    assert type(arch.growth_rate) is type(arch.block_config[0]) is type(memory.Setup(np.int64(2), 32).batch) is int
    for build in (lambda: DenseNet(growth_rate=True), lambda: monai.DenseNet(2, 1, 2, bn_size=False),
                  lambda: memory.Architecture(12, (True,), 24), lambda: memory.Setup(True, 32),
                  lambda: memory.Setup(2, 32, threads=0), lambda: memory.Setup(2, 32, threads=2.5)):
        with pytest.raises(ValueError, match="must be a positive integer, got (True|False|0|2.5)"):
            build()
    for depth in (True, 16.0, 17, 4, np.int64(15)):
        with pytest.raises(ValueError, match="depth must be 6n \\+ 4"):
            densenet_bc(depth)


def unavailable_backend() -> str:
    missing = [name for name in densenet_fast.BACKEND_NAMES if name not in densenet_fast.available_backends()]
    if not missing:
        pytest.skip("every backend is available here")
    return missing[0]


def test_backend_argument():
    assert densenet_bc(10, 4, backend="torch").backend == "torch"
    assert densenet_bc(10, 4, backend="TORCH").backend == "torch"
    with pytest.raises(ValueError, match="unknown backend 'tensorflow'"):
        densenet_bc(10, 4, backend="tensorflow")
    with pytest.raises(BackendUnavailableError, match="not available"):
        densenet_bc(10, 4, backend=unavailable_backend())


def test_a_block_put_in_later_shares_the_models_engine_settings():
    """A block copied in (or taken from another model) gets the model's backend,
    arena and sync group: from set_backend, set_sync_group and every forward
    (a block left with its own settings would not synchronise its statistics)."""
    model, other = densenet_bc(16, 4, backend="torch"), densenet_bc(16, 4)
    model.features.denseblock2 = copy.deepcopy(model.features.denseblock2)
    group = object()  # stored only: no forward runs under it
    model.set_sync_group(group)
    assert model.features.denseblock2.engine is model.engine and model.engine.sync_group is group
    model.set_sync_group(None)
    with pytest.raises(NotImplementedError, match="only stem='cifar' supports it"):  # norm0 would not synchronise
        DenseNet(4, (2, 2), 8, num_classes=3).set_sync_group(group)
    model.features.denseblock1 = other.features.denseblock1
    model(torch.randn(2, 3, 8, 8))
    assert all(m.engine is model.engine for m in model.features.modules() if hasattr(m, "engine"))
    assert model.features.denseblock1.engine.backend == "torch"


def test_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("DENSENET_FAST_BACKEND", "torch")
    assert densenet_bc(10, 4).backend == "torch"
    monkeypatch.setenv("DENSENET_FAST_BACKEND", "")
    assert densenet_bc(10, 4).backend is None  # automatic
    monkeypatch.setenv("DENSENET_FAST_BACKEND", "fortran")
    with pytest.raises(ValueError, match="unknown backend 'fortran' \\(from the environment variable "
                                         "DENSENET_FAST_BACKEND\\)"):
        densenet_bc(10, 4)
    assert densenet_bc(10, 4, backend="torch").backend == "torch"  # the argument wins
    monkeypatch.setenv("DENSENET_FAST_BACKEND", unavailable_backend())
    with pytest.raises(BackendUnavailableError, match="\\(from the environment variable DENSENET_FAST_BACKEND\\) "
                                                      "is not available"):
        densenet_bc(10, 4)
