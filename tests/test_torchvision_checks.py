"""torchvision's own model checks run on densenet_fast's builders.

Each test names the torchvision test it mirrors (torchvision's test/test_models.py,
test/test_extended_models.py, test/test_backbone_utils.py).  Checks already made in
tests/test_ecosystem.py (fx node names and feature extraction against torchvision,
TorchScript on a small config, the weights enum of densenet121) are not repeated.

Expected outputs: torchvision compares each classification model against a pickled
output (test/expect/ModelTester.test_densenet121_expect.pkl, ...).  Those files are
binary and could not be read from here, so they are not vendored.  Instead
densenet_fast's random initialisation is shown to reproduce torchvision's use of
the RNG bit for bit (the same state_dict after the same seed), and densenet_fast's
output under torchvision's exact procedure (seed 0, num_classes=50, eval mode,
``torch.rand(1, 3, 224, 224)``, prec 1e-3) is compared with the output of
torchvision's own builder under the same procedure: the value the .pkl records.

Run time (2 CPU cores): the expected-output check runs on all four published
builders at torchvision's 224x224; the TorchScript / torch.fx / input-backprop,
memory_efficient and feature-extraction checks, which torchvision runs on every
builder, run here on densenet121 only (all builders share DenseNet's code; the
others' module trees are checked in tests/test_models.py), and the memory_efficient
and feature-extraction ones at 64x64 instead of 300x300 / 224x224.
"""

import copy
import inspect
import os
import pickle
import random
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from tempfile import TemporaryDirectory

import numpy as np
import pytest
import torch
import torch.fx
import torchvision
from torchvision.models import get_model_weights
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import densenet_fast

PUBLISHED = ["densenet121", "densenet161", "densenet169", "densenet201"]  # the ones torchvision has
BUILDERS = PUBLISHED + ["densenet264"]


def set_rng_seed(seed: int) -> None:
    """torchvision's test/common_utils.py set_rng_seed (torch and random; numpy too, harmless)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@contextmanager
def freeze_rng_state():
    """torchvision's test/common_utils.py freeze_rng_state (CPU only here)."""
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


def check_jit_scriptable(nn_module, args, eager_out=None):
    """test_models.py::_check_jit_scriptable: scripted output equals eager, and a
    saved and reloaded scripted model equals the scripted one."""
    scripted = torch.jit.script(nn_module)
    if eager_out is None:
        with torch.no_grad(), freeze_rng_state():
            eager_out = nn_module(*args)
    with torch.no_grad(), freeze_rng_state():
        script_out = scripted(*args)
    torch.testing.assert_close(eager_out, script_out, atol=1e-4, rtol=1e-4)
    with TemporaryDirectory() as folder:
        path = os.path.join(folder, "script.pt")
        scripted.save(path)
        imported = torch.jit.load(path)
    with torch.no_grad(), freeze_rng_state():
        imported_out = imported(*args)
    torch.testing.assert_close(script_out, imported_out, atol=3e-4, rtol=3e-4)


def check_fx_compatible(model, inputs, eager_out=None):
    """test_models.py::_check_fx_compatible."""
    model_fx = torch.fx.symbolic_trace(model)
    if eager_out is None:
        eager_out = model(inputs)
    torch.testing.assert_close(eager_out, model_fx(inputs))


def check_input_backprop(model, inputs):
    """test_models.py::_check_input_backprop, plus: the gradient is finite and not all zero."""
    requires_grad = inputs.requires_grad
    inputs.requires_grad_(True)
    inputs.grad = None
    out = model(inputs)
    out[0].sum().backward()
    assert inputs.grad is not None
    assert torch.isfinite(inputs.grad).all() and inputs.grad.abs().sum() > 0
    inputs.requires_grad_(requires_grad)


# -- test_models.py::test_classification_model -------------------------------------------------------
@pytest.mark.parametrize("name", PUBLISHED)
def test_classification_model_expected_output(name):
    """test_models.py::test_classification_model (dev=cpu), the _assert_expected part:
    seed 0, ``num_classes=50``, eval mode, ``torch.rand(1, 3, 224, 224)``, prec 1e-3,
    against torchvision's builder under the same procedure (see the module docstring)."""
    outputs, states = [], []
    for module in (torchvision.models, densenet_fast):
        set_rng_seed(0)
        model = getattr(module, name)(num_classes=50)
        model.eval()
        x = torch.rand(1, 3, 224, 224)
        outputs.append(model(x))
        states.append(model.state_dict())
    expected, out = outputs
    assert list(states[0]) == list(states[1])
    for key in states[0]:  # the same RNG use: bit-identical initial weights
        assert torch.equal(states[0][key], states[1][key]), key
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3, check_dtype=False, check_device=False)
    assert out.shape[-1] == 50


def test_classification_model_script_fx_backprop():
    """test_models.py::test_classification_model (dev=cpu), the rest of it, on
    densenet121 at torchvision's 224x224: _check_jit_scriptable (with save and
    load), _check_fx_compatible and _check_input_backprop."""
    set_rng_seed(0)
    model = densenet_fast.densenet121(num_classes=50)
    model.eval()
    x = torch.rand(1, 3, 224, 224)
    out = model(x)
    assert out.shape[-1] == 50
    check_jit_scriptable(model, (x,), eager_out=out)
    check_fx_compatible(model, x, eager_out=out)
    check_input_backprop(model, x)


# -- test_models.py::test_memory_efficient_densenet ----------------------------------------------------
@pytest.mark.parametrize("name", ["densenet121"])
def test_memory_efficient_densenet(name):
    """test_models.py::test_memory_efficient_densenet, at 1x3x64x64 instead of
    300x300: memory_efficient=True gives a gradient to every parameter and the
    output of memory_efficient=False with the same state_dict (atol 1e-5)."""
    model_fn = getattr(densenet_fast, name)
    x = torch.rand(1, 3, 64, 64)
    model1 = model_fn(num_classes=50, memory_efficient=True)
    params = model1.state_dict()
    num_params = sum(p.numel() for p in model1.parameters())
    model1.eval()
    out1 = model1(x)
    out1.sum().backward()
    num_grad = sum(p.grad.numel() for p in model1.parameters() if p.grad is not None)

    model2 = model_fn(num_classes=50, memory_efficient=False)
    model2.load_state_dict(params)
    model2.eval()
    out2 = model2(x)

    assert num_params == num_grad
    torch.testing.assert_close(out1, out2, rtol=0.0, atol=1e-5)
    check_input_backprop(model1, x)
    check_input_backprop(model2, x)


# -- test_extended_models.py ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILDERS)
def test_builder_signature(name):
    """torchvision's builder conventions (the signature test_extended_models.py's
    get_model_weights relies on): ``weights`` and ``progress`` keyword-only with
    defaults None and True, then ``**kwargs``; no positional parameters."""
    parameters = inspect.signature(getattr(densenet_fast, name)).parameters
    assert parameters["weights"].kind is inspect.Parameter.KEYWORD_ONLY and parameters["weights"].default is None
    assert parameters["progress"].kind is inspect.Parameter.KEYWORD_ONLY and parameters["progress"].default is True
    assert list(parameters.values())[-1].kind is inspect.Parameter.VAR_KEYWORD
    assert not [p for p in parameters.values()
                if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              inspect.Parameter.VAR_POSITIONAL)]


@pytest.mark.parametrize("name", PUBLISHED)
def test_naming_conventions(name):
    """test_extended_models.py::test_naming_conventions, and test_get_model_weights:
    get_model_weights on our builder (outside torchvision's registry) is
    torchvision's enum, non-empty with a DEFAULT."""
    weights_enum = get_model_weights(getattr(densenet_fast, name))
    assert weights_enum is not None
    assert weights_enum is get_model_weights(name)  # the registry's, by name
    assert len(weights_enum) == 0 or hasattr(weights_enum, "DEFAULT")
    assert len(weights_enum) > 0


def test_naming_conventions_densenet264():
    """densenet264 has no torchvision weights, so no enum in its annotation:
    torchvision's get_model_weights raises its usual ValueError (torchvision's
    test_naming_conventions covers registry builders only, which all have one)."""
    with pytest.raises(ValueError, match="WeightsEnum class for the specific method couldn't be retrieved"):
        get_model_weights(densenet_fast.densenet264)


@pytest.mark.parametrize("copy_fn", [copy.copy, copy.deepcopy])
@pytest.mark.parametrize("name", PUBLISHED)
def test_weights_copyable(copy_fn, name):
    """test_extended_models.py::test_weights_copyable."""
    for weights in list(get_model_weights(getattr(densenet_fast, name))):
        assert copy_fn(weights) is weights


@pytest.mark.parametrize("name", PUBLISHED)
def test_weights_deserializable(name):
    """test_extended_models.py::test_weights_deserializable."""
    for weights in list(get_model_weights(getattr(densenet_fast, name))):
        assert pickle.loads(pickle.dumps(weights)) is weights


PERMITTED_FIELDS = {"backend", "categories", "keypoint_names", "license", "_metrics", "min_size", "min_temporal_size",
                    "num_params", "recipe", "unquantized", "_docs", "_ops", "_file_size"}
CLASSIFICATION_FIELDS = {"_metrics", "min_size", "num_params", "recipe", "_docs", "_file_size", "_ops", "categories",
                         ("_metrics", "ImageNet-1K", "acc@1"), ("_metrics", "ImageNet-1K", "acc@5")}


@pytest.mark.parametrize("name", PUBLISHED)
def test_schema_meta_validation(name):
    """test_extended_models.py::test_schema_meta_validation, the parts that need
    neither the weights file nor torchvision's FLOP counter: the permitted and
    mandatory meta fields, upper-case names, and ``num_params`` equal to the
    parameter count of our builder (built without weights, with the enum's
    number of categories)."""
    model_fn = getattr(densenet_fast, name)
    weights_enum = get_model_weights(model_fn)
    problematic_weights, incorrect_meta, bad_names = {}, [], []
    for w in weights_enum:
        actual_fields = set(w.meta.keys())
        actual_fields |= {("_metrics", dataset, key) for dataset in w.meta.get("_metrics", {})
                          for key in w.meta["_metrics"][dataset]}
        missing, unsupported = CLASSIFICATION_FIELDS - actual_fields, set(w.meta.keys()) - PERMITTED_FIELDS
        if missing or unsupported:
            problematic_weights[w] = {"missing": missing, "unsupported": unsupported}
        if w == weights_enum.DEFAULT or any(w.meta[k] != weights_enum.DEFAULT.meta[k] for k in ["num_params", "_ops"]):
            model = model_fn(num_classes=len(w.meta["categories"]))
            if w.meta.get("num_params") != sum(p.numel() for p in model.parameters()):
                incorrect_meta.append((w, "num_params"))
        if not w.name.isupper():
            bad_names.append(w)
    assert not problematic_weights
    assert not incorrect_meta
    assert not bad_names


# -- test_backbone_utils.py::TestFxFeatureExtraction ------------------------------------------------------
EXCLUDE_NODES_FILTER = ["getitem", "floordiv", "size", "chunk", "_assert", "eq", "dim", "getattr"]
MODEL_DEFAULTS = {"num_classes": 1, "pretrained": False}
FEATURE_INPUT = (1, 3, 64, 64)  # torchvision: 1x3x224x224; nothing depends on the size
# torchvision's test expects AssertionError for bad return-node arguments; the
# installed create_feature_extractor (0.29) raises ValueError for them instead.
ARGUMENT_ERRORS = (AssertionError, ValueError)


def get_return_nodes(model):
    """TestFxFeatureExtraction._get_return_nodes: 10 random train and eval nodes."""
    set_rng_seed(0)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs={"leaf_modules": []},
                                                   suppress_diff_warning=True)
    train_nodes = [n for n in train_nodes if not any(x in n for x in EXCLUDE_NODES_FILTER)]
    eval_nodes = [n for n in eval_nodes if not any(x in n for x in EXCLUDE_NODES_FILTER)]
    return random.sample(train_nodes, 10), random.sample(eval_nodes, 10)


def feature_extractor(*args, **kwargs):
    """TestFxFeatureExtraction._create_feature_extractor."""
    tracer_kwargs = kwargs.pop("tracer_kwargs", {"leaf_modules": []})
    return create_feature_extractor(*args, **kwargs, tracer_kwargs=tracer_kwargs, suppress_diff_warning=True)


def aggregate(out: dict) -> torch.Tensor:
    total = 0
    for node_out in out.values():
        if isinstance(node_out, Sequence):
            total += sum(o.mean() for o in node_out if o is not None)
        elif isinstance(node_out, Mapping):
            total += sum(o.mean() for o in node_out.values() if o is not None)
        else:
            total += node_out.mean()
    return total


@pytest.fixture
def no_pretrained_warning():
    """MODEL_DEFAULTS passes torchvision's deprecated ``pretrained=False``; the
    builders warn about it as torchvision's do."""
    with pytest.warns(UserWarning, match="'pretrained' is deprecated"):
        yield


@pytest.mark.parametrize("name", ["densenet121"])
def test_build_fx_feature_extractor(name, no_pretrained_warning):
    """test_backbone_utils.py::TestFxFeatureExtraction::test_build_fx_feature_extractor."""
    set_rng_seed(0)
    model = getattr(densenet_fast, name)(**MODEL_DEFAULTS).eval()
    train_return_nodes, eval_return_nodes = get_return_nodes(model)
    feature_extractor(model, train_return_nodes={v: v for v in train_return_nodes},
                      eval_return_nodes=eval_return_nodes)
    feature_extractor(model, train_return_nodes=train_return_nodes, eval_return_nodes=eval_return_nodes)
    with pytest.raises(ARGUMENT_ERRORS):  # must specify return nodes
        feature_extractor(model)
    with pytest.raises(ARGUMENT_ERRORS):  # return_nodes excludes train_return_nodes / eval_return_nodes
        feature_extractor(model, return_nodes=train_return_nodes, train_return_nodes=train_return_nodes)
    with pytest.raises(ARGUMENT_ERRORS):  # train_return_nodes and eval_return_nodes both
        feature_extractor(model, train_return_nodes=train_return_nodes)
    assert not any(n == "l" or n.startswith("l.") for n in train_return_nodes + eval_return_nodes)
    with pytest.raises(ValueError):  # an invalid node name
        feature_extractor(model, train_return_nodes=["l"], eval_return_nodes=["l"])


@pytest.mark.parametrize("name", ["densenet121"])
def test_feature_extractor_forward_backward(name, no_pretrained_warning):
    """test_backbone_utils.py::TestFxFeatureExtraction::test_forward_backward
    (train mode), at 64x64; plus: every parameter upstream of a returned node
    gets a finite gradient."""
    model = getattr(densenet_fast, name)(**MODEL_DEFAULTS).train()
    train_return_nodes, eval_return_nodes = get_return_nodes(model)
    model = feature_extractor(model, train_return_nodes=train_return_nodes, eval_return_nodes=eval_return_nodes)
    out = model(torch.rand(FEATURE_INPUT))
    assert set(out) == set(train_return_nodes)
    aggregate(out).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["densenet121"])
def test_feature_extractor_jit_forward_backward(name, no_pretrained_warning):
    """test_backbone_utils.py::TestFxFeatureExtraction::test_jit_forward_backward,
    at 64x64; plus: the scripted extractor's features equal the eager extractor's
    and its parameters get finite gradients."""
    set_rng_seed(0)
    model = getattr(densenet_fast, name)(**MODEL_DEFAULTS).train()
    train_return_nodes, eval_return_nodes = get_return_nodes(model)
    model = feature_extractor(model, train_return_nodes=train_return_nodes, eval_return_nodes=eval_return_nodes)
    scripted = torch.jit.script(model)
    x = torch.rand(FEATURE_INPUT)
    fgn_out = scripted(x)
    eager = model(x)  # train mode: batch statistics, so both see the same numbers
    assert set(fgn_out) == set(eager) == set(train_return_nodes)
    torch.testing.assert_close({k: v.detach() for k, v in fgn_out.items()},
                               {k: v.detach() for k, v in eager.items()}, rtol=1e-4, atol=1e-4)
    aggregate(fgn_out).backward()
    grads = [p.grad for p in scripted.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
