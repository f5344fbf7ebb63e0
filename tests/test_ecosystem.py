"""A drop-in for the tools built on torchvision's DenseNet: module hooks,
parametrizations and pruning, torch.fx and feature extraction, TorchScript,
torch.func, double backward, torchvision's weights API, error types and
saved-tensor hooks.  Everything is compared with torchvision's DenseNet holding
the same weights, in float64."""

import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune
import torch.utils.flop_counter
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import densenet_fast
from densenet_fast import engine
from helpers import (FLOAT64_RTOL, assert_all_close, buffers, forward_backward, make_model, make_pair, random_batch,
                     randomize_batchnorm)

CONFIG = dict(growth_rate=4, block_config=(2, 3), num_init_features=6, num_classes=5, stem="cifar")
HOOKED = ["features", "features.denseblock1", "features.transition1", "features.denseblock2", "features.norm5",
          "classifier"]


def detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return [detached(v) for v in value]
    return value


def record_hooks(model: nn.Module, names: list[str], backward: bool) -> list:
    """Registers forward pre-hooks, forward hooks and (``backward``) full backward
    hooks on the named modules; returns the list they append ``(name, kind, args)`` to."""
    calls = []
    for name in names:
        module = model.get_submodule(name)
        module.register_forward_pre_hook(lambda m, args, name=name: calls.append((name, "pre", detached(args))))
        module.register_forward_hook(lambda m, args, out, name=name: calls.append((name, "forward",
                                                                                    detached([args, out]))))
        if backward:
            module.register_full_backward_hook(
                lambda m, grad_in, grad_out, name=name: calls.append((name, "backward", detached([grad_in, grad_out]))))
    return calls


def assert_same_calls(ours: list, theirs: list) -> None:
    assert [c[:2] for c in ours] == [c[:2] for c in theirs]

    def flat(value):
        return [t for v in value for t in flat(v)] if isinstance(value, list) else [value]

    for (name, kind, a), (_, _, b) in zip(ours, theirs):
        for x, y in zip(flat(a), flat(b)):
            if x is None or y is None:
                assert x is None and y is None, (name, kind)
            else:
                torch.testing.assert_close(x, y, rtol=FLOAT64_RTOL, atol=1e-12, msg=f"{name} {kind}")


# -- module hooks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_hooks_fire_with_torchvisions_arguments(training):
    """Forward pre-hooks, forward hooks and full backward hooks on features, every
    block and transition, norm5 and the classifier, on the fast path."""
    ours, tv = make_pair(**CONFIG)
    ours.train(training), tv.train(training)
    backward_hooked = [n for n in HOOKED if n not in ("features", "features.norm5")]
    calls = []
    for model in (ours, tv):
        calls.append(record_hooks(model, HOOKED, backward=False) + record_hooks(model, backward_hooked, True))
    x, target = random_batch(ours, 3, 9, 7, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # hooks on these modules cost the fast path nothing
        results = [forward_backward(model, x, target) for model in (ours, tv)]
    assert_same_calls(calls[0], calls[1])
    assert_all_close(results[0].grads, results[1].grads, FLOAT64_RTOL, "gradients with hooks")


@pytest.mark.parametrize("name", ["features", "features.norm5"])
def test_full_backward_hook_on_the_features_output_fails_as_in_torchvision(name):
    """torchvision applies ReLU in place to features' output, which autograd
    refuses under a full backward hook; so do we (the same error)."""
    for model in make_pair(**CONFIG):
        model.get_submodule(name).register_full_backward_hook(lambda *args: None)
        with pytest.raises(RuntimeError, match="modified inplace"):
            forward_backward(model, *random_batch(model, 2, 8, 8, seed=0))


def test_hook_inside_a_dense_layer_gives_the_plain_path_with_one_warning():
    ours, tv = make_pair(**CONFIG)
    conv, norm = "features.denseblock2.denselayer2.conv1", "features.transition1.norm"  # norm: ReLU in place after it
    calls = [record_hooks(model, [conv], backward=True) + record_hooks(model, [norm], backward=False)
             for model in (ours, tv)]
    x, target = random_batch(ours, 3, 9, 7, seed=0)
    with pytest.warns(RuntimeWarning, match="plain per-layer path") as caught:
        result = forward_backward(ours, x, target)
    assert {str(w.message).split(" runs")[0] for w in caught} == {"densenet_fast: _DenseBlock",
                                                                  "densenet_fast: _Transition"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        forward_backward(ours, x, target)
    expected = forward_backward(tv, x, target)
    forward_backward(tv, x, target)
    assert_same_calls(calls[0], calls[1])
    assert_all_close(result.grads, expected.grads, FLOAT64_RTOL, "plain path")


@pytest.mark.parametrize("kind", ["forward", "pre"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_hooks_for_every_module_fire_inside_the_blocks_as_in_torchvision(training, kind):
    """A global forward hook (``register_module_forward_hook``) that scales every
    convolution's output, or a global forward pre-hook alone
    (``register_module_forward_pre_hook``) that scales its input, sees each
    module torchvision's model runs and changes the output as it does there:
    every block runs its per-layer code."""
    ours, tv = make_pair(**CONFIG)
    x, target = random_batch(ours, 3, 9, 7, seed=0)
    results, seen = [], []
    for model in (ours, tv):
        model.train(training)
        called = []
        if kind == "forward":
            handles = [nn.modules.module.register_module_forward_hook(lambda m, args, out: called.append(m)),
                       nn.modules.module.register_module_forward_hook(
                           lambda m, args, out: 0.5 * out if isinstance(m, nn.Conv2d) else None)]
        else:
            handles = [nn.modules.module.register_module_forward_pre_hook(
                lambda m, args: (called.append(m), (0.5 * args[0],) if isinstance(m, nn.Conv2d) else None)[1])]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the plain path, said once per block
                results.append(forward_backward(model, x, target))
        finally:
            for handle in handles:
                handle.remove()
        seen.append([name for m in called for name, module in model.named_modules() if module is m])
    assert seen[0] == seen[1]
    assert_all_close({"out": results[0].output, **results[0].grads}, {"out": results[1].output, **results[1].grads},
                     FLOAT64_RTOL, "global hooks")


def test_flop_counter_counts_torchvisions_flops():
    """FlopCounterMode's module tracker hooks every module, so the blocks run
    their per-layer code and every convolution and GEMM is counted, on the
    default backend too (its fused kernels have no FLOP formula)."""
    ours, tv = make_pair(**CONFIG)
    x, target = random_batch(ours, 3, 9, 7, seed=0)
    counts = []
    for model in (ours, tv):
        with torch.utils.flop_counter.FlopCounterMode(display=False) as counter, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            forward_backward(model, x, target)
        counts.append(counter.get_flop_counts()["Global"])
    assert counts[0] == counts[1] and counts[0][torch.ops.aten.convolution] > 0


@pytest.mark.parametrize("name", ["features", "features.denseblock1", "features.transition1",
                                  "features.denseblock2.denselayer1"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_replaced_forward_runs(name, training):
    """A ``forward`` replaced on an instance (as accelerate's hooks do) runs
    wherever the module is, as in torchvision."""
    ours, tv = make_pair(**CONFIG)
    x, target = random_batch(ours, 3, 9, 7, seed=0)
    results = []
    for model in (ours, tv):
        module = model.get_submodule(name)
        module.forward = lambda input, forward=module.forward: forward(input) * 0.5 + 0.25
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            results.append(forward_backward(model.train(training), x, target))
    assert_all_close({"out": results[0].output, **results[0].grads}, {"out": results[1].output, **results[1].grads},
                     FLOAT64_RTOL, f"forward replaced on {name}")


@pytest.mark.parametrize("layout, weights", [(torch.contiguous_format, torch.contiguous_format),
                                             (torch.channels_last, torch.contiguous_format),
                                             (torch.contiguous_format, torch.channels_last)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_features_come_back_in_torchvisions_layout(layout, weights, training):
    """``model.features(x)``, and each slice ``model.features[:end]``, has the
    strides torchvision's gives (so ``.view(N, -1)`` works on it where it does
    there), with the same values (a slice ending in a transition came back
    channels-last)."""
    ours, tv = make_pair(**CONFIG)
    ours.to(memory_format=weights), tv.to(memory_format=weights)
    x, _ = random_batch(ours, 3, 9, 7, seed=0)
    x = x.contiguous(memory_format=layout)
    for end in range(2, len(ours.features) + 1):
        features = [model.train(training).features[:end](x) for model in (ours, tv)]
        assert features[0].stride() == features[1].stride(), f"features[:{end}]"
        assert_all_close({"features": features[0]}, {"features": features[1]}, FLOAT64_RTOL, f"features[:{end}]")


def prune_and_parametrize(model: nn.Module) -> None:
    """Pruning (a forward pre-hook) and weight and spectral norm (parametrizations)
    on modules inside dense layers and a transition."""
    torch.nn.utils.prune.l1_unstructured(model.features.denseblock1.denselayer1.conv1, "weight", amount=0.4)
    torch.nn.utils.parametrizations.weight_norm(model.features.denseblock2.denselayer3.conv2)
    torch.manual_seed(5)
    torch.nn.utils.parametrizations.spectral_norm(model.features.transition1.conv)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_pruning_and_parametrizations_are_honoured(training):
    ours, tv = make_pair(**CONFIG)
    for model in (ours, tv):
        prune_and_parametrize(model)
        model.train(training)
    x, target = random_batch(ours, 3, 9, 7, seed=0)
    with pytest.warns(RuntimeWarning, match="plain per-layer path"):
        torch.manual_seed(0)
        result = forward_backward(ours, x, target)
    torch.manual_seed(0)
    expected = forward_backward(tv, x, target)
    assert_all_close({"out": result.output, **result.grads}, {"out": expected.output, **expected.grads},
                     FLOAT64_RTOL, "pruned and parametrized")


# -- torch.fx ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fx_traces_with_torchvisions_node_names_and_features(training):
    ours, tv = make_pair(**CONFIG)
    ours.train(training), tv.train(training)
    assert get_graph_node_names(ours) == get_graph_node_names(tv)
    nodes = {"features.denseblock1": "block1", "features.transition1.pool": "transition1",
             "features.denseblock2.denselayer2.conv1": "bottleneck", "features.norm5": "norm5", "classifier": "logits"}
    x, _ = random_batch(ours, 3, 9, 7, seed=0)
    extracted = [create_feature_extractor(model, nodes)(x) for model in (ours, tv)]
    assert_all_close(extracted[0], extracted[1], FLOAT64_RTOL, "extracted features")
    traced = torch.fx.symbolic_trace(ours)
    assert_all_close({"out": traced(x)}, {"out": tv(x)}, FLOAT64_RTOL, "symbolic_trace")


# -- TorchScript -------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torchscript_gives_torchvisions_model(training):
    ours, tv = make_pair(**CONFIG)
    scripted = torch.jit.script(ours.train(training))
    tv.train(training)
    x, target = random_batch(ours, 3, 9, 7, seed=0)
    results = [forward_backward(model, x, target) for model in (scripted, tv)]
    assert_all_close({"out": results[0].output, **results[0].grads},
                     {"out": results[1].output, **results[1].grads}, FLOAT64_RTOL, "scripted")
    assert_all_close(buffers(scripted), buffers(tv), FLOAT64_RTOL, "scripted running statistics")


def test_torch_jit_trace_gives_torchvisions_model_without_warnings():
    ours, tv = make_pair(**CONFIG)
    ours.eval(), tv.eval()
    x, _ = random_batch(ours, 3, 9, 7, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # (the input checks made 14)
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.trace is deprecated
        traced = torch.jit.trace(ours, x)
    other, _ = random_batch(ours, 5, 12, 10, seed=1)  # the trace holds no shapes
    assert_all_close({"out": traced(other)}, {"out": tv(other)}, FLOAT64_RTOL, "jit.trace")


# -- torch.func ----------------------------------------------------------------------------------------
def test_torch_func_grad_vjp_and_vmap():
    ours, tv = make_pair(**CONFIG)
    ours.eval(), tv.eval()
    x, target = random_batch(ours, 3, 9, 7, seed=0)
    results = []
    for model in (ours, tv):
        params = {name: p.detach() for name, p in model.named_parameters()}

        def loss(p):
            return F.cross_entropy(torch.func.functional_call(model, p, (x,)), target)

        grads = torch.func.grad(loss)(params)
        out, vjp = torch.func.vjp(lambda inp: model(inp), x)
        (input_grad,) = vjp(torch.ones_like(out))
        per_sample = torch.func.vmap(lambda image: model(image.unsqueeze(0)).squeeze(0))(x)
        results.append({**grads, "input_grad": input_grad, "vmap": per_sample})
    assert_all_close(results[0], results[1], FLOAT64_RTOL, "torch.func")


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_batched_backward_and_vectorized_jacobian(stem, layout, monkeypatch):
    """A vmap around backward alone (``is_grads_batched=True``, a vectorized
    ``jacobian``) differentiates a plain recomputation, as torchvision's, and
    says so once (the fused kernels' in-place writes raised under it, and so did
    the copy of a channels-last input's gradient into its layout)."""
    monkeypatch.setattr(engine.fastpath, "_warned_backward", set())
    ours, tv = make_pair(**dict(CONFIG, stem=stem))
    x = random_batch(ours, 3, 20, 18, seed=0)[0].contiguous(memory_format=layout)
    results = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for model in (ours, tv):
            inputs = [x.requires_grad_(), *model.parameters()]
            cotangents = torch.randn(4, 3, CONFIG["num_classes"], generator=torch.Generator().manual_seed(1),
                                     dtype=x.dtype)
            batched = torch.autograd.grad(model(x), inputs, cotangents, is_grads_batched=True)
            jacobian = torch.autograd.functional.jacobian(model, x, vectorize=True)
            results.append({"jacobian": jacobian, **{f"grad_{i}": g for i, g in enumerate(batched)}})
    assert_all_close(results[0], results[1], FLOAT64_RTOL, "batched backward")
    said = [str(w.message) for w in caught if "differentiates a plain recomputation" in str(w.message)]
    assert len(said) == 1, said


def test_transforms_and_forward_ad_say_once_that_the_plain_path_runs(monkeypatch):
    """Where a transform or forward-mode AD makes the model run its per-layer code,
    one warning per process says so (under a memory budget: that its plan does
    not hold); tracing, which computes nothing, says nothing."""
    monkeypatch.setattr(engine.fastpath, "_warned_inputs", set())
    ours, _ = make_pair(**CONFIG)
    x, _ = random_batch(ours, 3, 9, 7, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.fx.symbolic_trace(ours)
        ours(x)
        ours.eval()  # vmap over BatchNorm in training mode fails, as torchvision's
        for _ in range(2):
            torch.func.vmap(lambda image: ours(image.unsqueeze(0)))(x)
        with torch.autograd.forward_ad.dual_level():
            ours(torch.autograd.forward_ad.make_dual(x, torch.randn_like(x)))
        ours.train().set_memory_budget("1GiB")
        with torch.autograd.forward_ad.dual_level():
            ours(torch.autograd.forward_ad.make_dual(x, torch.randn_like(x)))
    said = [str(w.message) for w in caught if "plain per-layer path" in str(w.message)]
    assert said == [f"densenet_fast: DenseNet runs its plain per-layer path under {reason}; its memory savings are "
                    f"lost{budget}" for reason, budget in (
                        (engine.fastpath.TRANSFORM, ""), (engine.fastpath.FORWARD_AD, ""),
                        (engine.fastpath.FORWARD_AD, "; the memory budget's plan does not hold"))], said


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_mode_ad_gives_torchvisions_tangent(training, frozen):
    """``torch.autograd.forward_ad``: the engine's Functions have no jvp, so the
    model runs its per-layer code while a dual level is open (a frozen model's
    tangent was dropped: None, read as zero)."""
    ours, tv = make_pair(**CONFIG)
    x, _ = random_batch(ours, 3, 9, 7, seed=0)
    direction = torch.randn_like(x)
    tangents = []
    for model in (ours, tv):
        model.train(training).requires_grad_(not frozen)
        with torch.autograd.forward_ad.dual_level():
            out = model(torch.autograd.forward_ad.make_dual(x, direction))
            tangents.append(torch.autograd.forward_ad.unpack_dual(out).tangent)
    assert tangents[0] is not None
    assert_all_close({"tangent": tangents[0]}, {"tangent": tangents[1]}, FLOAT64_RTOL, "forward-mode AD")


# -- double backward -----------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
@pytest.mark.parametrize("tail_kind", ["none", "transition", "head"])
def test_stage_gradgradcheck(tail_kind, training):
    torch.manual_seed(0)
    net = densenet_fast.DenseNet(growth_rate=3, block_config=(2, 1), num_init_features=5, bn_size=2)
    randomize_batchnorm(net)
    net.double().train(training)
    block = net.features.denseblock1
    tail = {"none": engine.NoTail(), "transition": engine.TransitionTail(net.features.transition1),
            "head": engine.HeadTail(nn.BatchNorm2d(11).double().train(training))}[tail_kind]
    params = list(block.parameters()) + [p for m in (getattr(tail, "bn", None), getattr(tail, "conv", None))
                                         if m is not None for p in m.parameters()]
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64, requires_grad=True)

    def function(x, *_):
        return engine.run_stage(list(block.values()), tail, x, engine.Settings(), keep=False)[0]

    assert torch.autograd.gradgradcheck(function, (x, *params), fast_mode=True)


def test_input_hessian_vector_product_equals_torchvisions():
    """A gradient penalty: the gradient of ||dL/dx||^2 w.r.t. every parameter."""
    ours, tv = make_pair(**CONFIG)
    x, target = random_batch(ours, 3, 9, 7, seed=0)
    results = []
    for model in (ours, tv):
        inputs = x.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(F.cross_entropy(model(inputs), target), inputs, create_graph=True)
        penalty = grad_x.square().sum()
        penalty.backward()
        results.append({name: p.grad for name, p in model.named_parameters()})
    assert_all_close(results[0], results[1], 1e-7, "gradient-penalty gradients")


# -- torchvision's weights API -------------------------------------------------------------------------
@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """A TORCH_HOME whose hub cache holds a DenseNet-121 checkpoint under
    torchvision's file name, with the old ``norm.1``-style keys of the published file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    reference = torchvision.models.densenet121()
    randomize_batchnorm(reference)
    url = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.url
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    old_style = re.compile(r"(denselayer\d+\.(?:norm|conv))([12])\.(weight|bias|running_mean|running_var)$")
    state = {old_style.sub(r"\1.\2.\3", k): v for k, v in reference.state_dict().items()}
    torch.save(state, folder / url.rsplit("/", 1)[1])
    return reference.eval()


@pytest.mark.parametrize("how", ["enum", "name", "qualified_name", "pretrained", "weights_true"])
def test_torchvision_weights_load_from_the_hub_cache(torch_home, how):
    weights = torchvision.models.DenseNet121_Weights
    kwargs = {"enum": dict(weights=weights.DEFAULT), "name": dict(weights="DEFAULT", progress=False),
              "qualified_name": dict(weights="DenseNet121_Weights.IMAGENET1K_V1"),
              "pretrained": dict(pretrained=True), "weights_true": dict(weights=True)}[how]  # torchvision's legacy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = densenet_fast.densenet121(**kwargs).eval()
    assert any("pretrained" in str(w.message) for w in caught) == (how in ("pretrained", "weights_true"))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), torch_home(x), rtol=1e-4, atol=1e-5)
    assert torchvision.models.get_model_weights(densenet_fast.densenet121) is weights


def test_weights_api_errors(torch_home):
    with pytest.raises(ValueError, match="num_classes"):
        densenet_fast.densenet121(weights="DEFAULT", num_classes=10)
    with pytest.raises(ValueError, match="No weights available"):
        densenet_fast.densenet264(pretrained=True)
    with pytest.raises(TypeError, match="Invalid Weight class"):  # as torchvision
        densenet_fast.densenet121(weights=torchvision.models.DenseNet161_Weights.DEFAULT)
    with pytest.raises(FileNotFoundError, match="'IMAGENET1K_V2' is neither a file nor one of DenseNet121_Weights's "
                                                "names \\(IMAGENET1K_V1, DEFAULT\\)"):
        densenet_fast.densenet121(weights="IMAGENET1K_V2")
    with pytest.raises(FileNotFoundError, match="'DEFAULT' is neither a file nor the name of torchvision weights "
                                                "\\(densenet264 has none: torchvision publishes none\\)"):
        densenet_fast.densenet264(weights="DEFAULT")
    with pytest.raises(TypeError, match="weights are a torchvision weights enum or its name, a local file or a "
                                        "state_dict, got 123"):
        densenet_fast.densenet121(weights=123)
    with pytest.warns(UserWarning, match="'pretrained' is deprecated"):  # torchvision's legacy weights=False
        assert densenet_fast.densenet121(weights=False, num_classes=10).classifier.out_features == 10


# -- error types -----------------------------------------------------------------------------------------
def test_errors_have_torchvisions_types(tmp_path):
    model = densenet_fast.densenet_bc(10, 4)
    with pytest.raises(RuntimeError, match="input channels"):  # torchvision's convolution raises RuntimeError
        model(torch.randn(2, 5, 8, 8))
    for x, message in ((torch.randn(2, 3, 8, 8, dtype=torch.float64), "differs from the model's"),
                       (torch.zeros(2, 3, 8, 8, dtype=torch.int64), "floating-point input")):
        for error in (RuntimeError, TypeError):  # torchvision's and Python's
            with pytest.raises(error, match=message):
                model(x)
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(TypeError, match="holds a list, not a state_dict"):
        densenet_fast.densenet121(weights=str(path))


def drop_last_layer(block: nn.Module) -> None:
    del block[list(block.keys())[-1]]


def resize_transition(model: nn.Module, more: int) -> None:
    conv = model.features.transition1.conv
    model.features.transition1.conv = nn.Conv2d(conv.in_channels, conv.out_channels + more, 1, bias=False,
                                                dtype=conv.weight.dtype)


@pytest.mark.parametrize("edit, call", [
    (lambda m: drop_last_layer(m.features.denseblock1), None),  # the transition after it takes more channels
    (lambda m: drop_last_layer(m.features.denseblock2), None),  # so does norm5
    (lambda m: resize_transition(m, -1), None),  # the block after it takes more
    (lambda m: resize_transition(m, 50), None),  # or fewer (more than the block's buffer holds)
    (None, lambda m, x: m.features.denseblock2(x[:, :5])),
    (None, lambda m, x: m.features.transition1(x[:, :5])),
], ids=["block-transition", "block-norm5", "transition-block", "wide-transition-block", "block-alone",
        "transition-alone"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channel_mismatches_raise_torchvisions_errors(edit, call, training):
    """Modules edited or called with other channel counts than they take run
    their own code, whose BatchNorm names both counts, as torchvision's."""
    errors = []
    for model in make_pair(**CONFIG):
        model.train(training)
        if edit is not None:
            edit(model)
        x = random_batch(model, 2, 8, 8, seed=1)[0]
        with pytest.raises(RuntimeError) as error:
            (call or (lambda m, x: m(x)))(model, x)
        errors.append(str(error.value))
    assert errors[0] == errors[1] and "running_mean should contain" in errors[0]


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_a_graph_that_saved_running_statistics_raises_or_is_exact_after_a_training_forward(stem):
    """An eval forward's graph, then a training forward, then that graph's
    backward: where a BatchNorm of the graph saved the running statistics (the
    ImageNet stem's norm0 runs as torch's BatchNorm in eval) torch's in-place
    error (the fused stem updated them unseen: a wrong gradient), else the eval
    forward's exact gradient (the fused stages keep what they read)."""
    config = dict(CONFIG, stem=stem)
    model, reference = make_model(**config), make_model(**config)
    x = random_batch(model, 2, 16, 16, seed=1)[0]
    model.eval()
    out = model(x.clone().requires_grad_())
    model.train()
    model(random_batch(model, 2, 16, 16, seed=2)[0])
    if stem == "imagenet":
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
        return
    out.sum().backward()
    reference.eval()
    reference(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=FLOAT64_RTOL, atol=1e-12, msg=name)


# -- saved-tensor hooks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("contiguous", [False, True], ids=["same-layout", "contiguous"])
@pytest.mark.parametrize("recompute", ["keep", "recompute"])
def test_saved_tensor_hooks_see_every_large_tensor(recompute, contiguous):
    """A pack hook sees the block buffers and (keep) the bottleneck outputs, so
    ``save_on_cpu`` can offload them; gradients are unchanged, also where the
    hook gives back contiguous copies (``save_on_cpu(pin_memory=True)``; the
    channels-last buffers failed backward)."""
    ours, _ = make_pair(recompute=recompute, **CONFIG)
    x, target = random_batch(ours, 3, 9, 7, seed=0)
    expected = forward_backward(ours, x, target)
    packed = {}

    def pack(t):
        packed[(t.data_ptr(), t.shape)] = t.numel() * t.element_size()
        if contiguous:  # what save_on_cpu(pin_memory=True) does
            return torch.empty(t.size(), dtype=t.dtype).copy_(t)
        return t.to("cpu", copy=True)  # what save_on_cpu does

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward_backward(ours, x, target)
    # (contiguous copies change the summation order of torch's own convolutions: equal to rounding)
    assert_all_close(result.grads, expected.grads, FLOAT64_RTOL if contiguous else 0.0,
                     "gradients through saved-tensor hooks")
    n, h, w = 3, 9, 7
    element = torch.tensor([], dtype=torch.float64).element_size()
    buffer_bytes = n * h * w * (6 + 2 * 4) * element + n * (h // 2) * (w // 2) * (7 + 3 * 4) * element
    bottleneck_bytes = (2 * n * h * w + 3 * n * (h // 2) * (w // 2)) * 16 * element
    large = sum(b for b in packed.values() if b >= n * (h // 2) * (w // 2) * 4 * element)
    assert large >= buffer_bytes + (bottleneck_bytes if recompute == "keep" else 0)
