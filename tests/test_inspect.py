"""``normops.inspect``: the layer table (types, shapes, backends, triton fallbacks), each static and
dynamic finding on a small hand-built model next to the model that does it right, a model left as
it was (buffers, training flags, hooks), and ``normops inspect`` through a fake ``normops.models``.

Models are a few channels at 8x8 so the whole file runs in seconds on two CPU cores.
"""
import sys
import types

import pytest
import torch
from torch import nn

import normops
from normops import cli
from normops import nn as nnn
from normops.inspect import MODEL, NOT_NORMOPS, Finding, Report, inspect


def checks(report):
    """{(check, layer)} of the report's findings."""
    return {(f.check, f.layer) for f in report.findings}


def layer(report, name):
    return next(item for item in report.layers if item.name == name)


def classifier(norm, c=8):
    """Conv -> Norm -> ReLU, twice, then a pooled linear head: the order the seed recommends."""
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), norm(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), norm(c),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


# --- the layer table -----------------------------------------------------------------------------

def test_clean_model_has_no_findings():
    model = classifier(nn.BatchNorm2d)
    report = inspect(model)
    assert report.findings == []
    assert [(item.name, item.type, item.shape, item.activation, item.training) for item in report.layers] == [
        ("1", "torch.nn.BatchNorm2d", "C=8", None, True), ("4", "torch.nn.BatchNorm2d", "C=8", None, True)]
    assert str(report).splitlines()[-1] == "no findings"
    report = inspect(model, torch.randn(4, 3, 8, 8))
    assert report.findings == [] and [item.input for item in report.layers] == ["4x8x8x8", "4x8x8x8"]


def test_every_norm_type_and_its_backend(monkeypatch):
    class MyLayerNorm(nn.LayerNorm):
        pass

    model = nn.ModuleDict({
        "bn": nn.BatchNorm2d(4), "bn_nops": nnn.BatchNorm3d(4, track_running_stats=False, activation="silu"),
        "gn": nnn.GroupNorm(2, 8, activation="relu"), "gn_torch": nn.GroupNorm(2, 8),
        "inorm": nnn.InstanceNorm2d(4, track_running_stats=True), "ln": nnn.LayerNorm([4, 5]),
        "rms": nn.RMSNorm(16), "rms_nops": nnn.RMSNorm(16, activation="gelu"), "mine": MyLayerNorm(3),
        "sync": nn.SyncBatchNorm(4), "sync_nops": nnn.SyncBatchNorm(4), "linear": nn.Linear(2, 2)})
    model["gn"].eval()
    report = inspect(model)
    rows = {item.name: (item.type, item.shape, item.activation, item.training, item.backend)
            for item in report.layers}
    assert rows == {
        "bn": ("torch.nn.BatchNorm2d", "C=4", None, True, NOT_NORMOPS),
        "bn_nops": ("normops.nn.BatchNorm3d", "C=4, no running stats", "silu", True, "torch"),
        "gn": ("normops.nn.GroupNorm", "G=2, C=8 (4 per group)", "relu", False, "torch"),
        "gn_torch": ("torch.nn.GroupNorm", "G=2, C=8 (4 per group)", None, True, NOT_NORMOPS),
        "inorm": ("normops.nn.InstanceNorm2d", "C=4, running stats", None, True, "torch"),
        "ln": ("normops.nn.LayerNorm", "shape=(4, 5)", None, True, "torch"),
        "rms": ("torch.nn.RMSNorm", "shape=(16,)", None, True, NOT_NORMOPS),
        "rms_nops": ("normops.nn.RMSNorm", "shape=(16,)", "gelu", True, "torch"),
        "mine": (f"{__name__}.test_every_norm_type_and_its_backend.<locals>.MyLayerNorm", "shape=(3,)", None, True,
                 "torch.nn subclass (not normops; normops.convert leaves subclasses alone)"),
        "sync": ("torch.nn.SyncBatchNorm", "C=4", None, True,
                 "torch.nn (not normops; normops.nn.SyncBatchNorm.convert_sync_batchnorm(model) would swap it)"),
        "sync_nops": ("normops.nn.SyncBatchNorm", "C=4", None, True, "torch"),
    }
    # The backend column is normops.current_backend of the layer's device, for normops layers only.
    with normops.backend("numpy"):
        assert {item.name: item.backend for item in inspect(model).layers if item.backend != NOT_NORMOPS} == {
            "bn_nops": "numpy", "gn": "numpy", "inorm": "numpy", "ln": "numpy", "rms_nops": "numpy",
            "sync_nops": "numpy", "mine": rows["mine"][-1], "sync": rows["sync"][-1]}
    monkeypatch.setenv("NORMOPS_BACKEND", "triton")
    assert layer(inspect(model), "gn").backend == "triton" and layer(inspect(model), "bn").backend == NOT_NORMOPS
    # After normops.convert every twin is a normops layer.
    normops.convert(model)
    assert layer(inspect(model), "bn").type == "normops.nn.BatchNorm2d"
    assert layer(inspect(model), "rms").backend == "triton"


def test_triton_column():
    model = nn.ModuleDict({"wide": nnn.GroupNorm(1, 2048), "edge": nnn.GroupNorm(2, 2048),
                           "torch": nn.GroupNorm(1, 2048), "bn": nnn.BatchNorm2d(4), "ln": nnn.LayerNorm(8),
                           "inorm": nnn.InstanceNorm2d(4)})
    triton = {item.name: item.triton for item in inspect(model).layers}
    assert triton == {"wide": "falls back to torch (2048 channels a group > 1024)", "edge": "kernel", "torch": "-",
                      "bn": "kernel", "ln": "kernel", "inorm": "kernel"}


def test_triton_column_sees_an_empty_batch():
    model = nn.Sequential(nnn.BatchNorm2d(4), nnn.GroupNorm(2, 4))
    assert [item.triton for item in inspect(model).layers] == ["kernel", "kernel"]
    report = inspect(model, torch.randn(0, 4, 3, 3))
    assert [item.triton for item in report.layers] == ["falls back to torch (empty input)", "kernel"]
    assert report.findings == []


def test_model_that_is_a_norm():
    report = inspect(nnn.LayerNorm(8), torch.randn(2, 8))
    assert [(item.name, item.input) for item in report.layers] == [(MODEL, "2x8")] and report.findings == []


def test_rejects_a_non_module():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        inspect(torch.randn(3))


# --- static checks -------------------------------------------------------------------------------

def test_activation_before_norm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.GELU(),
                          nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 1), nn.Tanh(), nn.InstanceNorm2d(8))
    report = inspect(model)
    assert checks(report) == {("activation-before-norm", "2"), ("activation-before-norm", "5"),
                              ("activation-before-norm", "8")}
    first = report.findings[0]
    assert isinstance(first, Finding) and first.severity == "warning" and first.layer == "2"
    assert "BatchNorm2d directly after the activation ReLU (1)" in first.message
    assert 'normops.nn.BatchNorm2d(8, activation="relu")' in first.advice
    assert 'normops.nn.GroupNorm(2, 8, activation="gelu")' in report.findings[1].advice
    assert "activation=" not in report.findings[2].advice  # Tanh: no fused form to offer


def test_activation_before_norm_through_nesting_and_fused_activations():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU()),
                          nn.Sequential(nn.Sequential(nnn.GroupNorm(2, 8, activation="silu")), nn.LayerNorm([8, 6, 6])))
    assert checks(inspect(model)) == {("activation-before-norm", "1.0.0"), ("activation-before-norm", "1.1")}


def test_activation_before_norm_only_where_the_order_is_known():
    class Block(nn.Module):  # its own forward: registration order says nothing
        def __init__(self):
            super().__init__()
            self.act, self.norm = nn.ReLU(), nn.BatchNorm2d(8)

        def forward(self, x):
            return self.act(self.norm(x))

    class Reversed(nn.Sequential):
        def forward(self, x):
            for m in reversed(self):
                x = m(x)
            return x

    model = nn.Sequential(nn.Conv2d(3, 8, 3), Block(), Reversed(nn.ReLU(), nn.BatchNorm2d(8)),
                          nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    assert inspect(model, torch.randn(2, 3, 8, 8)).findings == []


def test_instance_norm_in_a_classifier_head():
    report = inspect(classifier(nn.InstanceNorm2d))
    assert checks(report) == {("instance-norm-head", "4")}
    assert "ReLU -> AdaptiveAvgPool2d -> Flatten -> Linear" in report.findings[0].message
    # with a custom forward: the head is found in registration order
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nnn.InstanceNorm2d(8, activation="relu"))
            self.pool, self.fc = nn.AdaptiveMaxPool2d((1, 1)), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.pool(self.features(x)).flatten(1))

    assert checks(inspect(Net())) == {("instance-norm-head", "features.1")}


def test_instance_norm_where_it_belongs_is_not_flagged():
    generator = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.ReLU(),
                              nn.ConvTranspose2d(8, 8, 2, stride=2), nn.InstanceNorm2d(8), nn.ReLU(),
                              nn.Conv2d(8, 3, 3, padding=1), nn.Tanh())
    patch_critic = nn.Sequential(nn.Conv2d(3, 8, 4, 2), nn.InstanceNorm2d(8), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 4))
    assert inspect(generator).findings == [] and inspect(patch_critic).findings == []


@pytest.mark.parametrize("head, flagged", [
    ([nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(8)], "8"),
    ([nn.AdaptiveAvgPool2d((1, 1)), nn.BatchNorm2d(8)], "7"),
    ([nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(0.1), nnn.BatchNorm1d(8)], "9"),
    ([nn.AdaptiveAvgPool2d(2), nn.BatchNorm2d(8)], None),       # 2x2: statistics over N * 4 values
    ([nn.AdaptiveAvgPool2d((1, None)), nn.BatchNorm2d(8)], None),  # None keeps the width
    ([nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1)], None),  # the norm sees the full map
    ([nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8)], None),
])
def test_batch_norm_after_global_pool(head, flagged):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                          nn.ReLU(), *head, nn.Flatten(), nn.Linear(8, 10))  # static checks only: no forward
    report = inspect(model)
    assert checks(report) == ({("batch-norm-after-pool", flagged)} if flagged else set())
    if flagged:
        finding = report.findings[0]
        assert finding.severity == "warning" and "1x1 (6)" in finding.message
        assert "needs large batches (>= 16" in finding.advice


# --- dynamic checks ------------------------------------------------------------------------------

def pooled_bn():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nnn.BatchNorm1d(8), nn.Linear(8, 10), nn.BatchNorm1d(10))


def test_one_value_per_channel_is_reported_not_raised():
    model = pooled_bn()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model(x)  # what inspect turns into a finding
    report = inspect(model, x)
    assert checks(report) == {("batch-norm-after-pool", "5"), ("one-value-per-channel", "5"),
                              ("tiny-batch-statistics", "1")}  # batch 1: layer 1 trains as an InstanceNorm
    finding = next(f for f in report.findings if f.check == "one-value-per-channel")
    assert finding.severity == "error"
    assert "1 value per channel (input 1x8, N * spatial == 1)" in finding.message
    assert "the forward stopped here: ShapeError: Expected more than 1 value per channel" in finding.message
    assert [item.input for item in report.layers] == ["1x8x6x6", "1x8", "not reached"]
    assert "example forward: input 1x3x8x8, grad enabled" in str(report)


def test_one_value_per_channel_needs_training_and_batch_statistics():
    model = pooled_bn()
    assert checks(inspect(model, torch.randn(2, 3, 8, 8))) == {  # 2 values a channel after the pooling
        ("batch-norm-after-pool", "5"), ("tiny-batch-statistics", "5"), ("tiny-batch-statistics", "7")}
    model.eval()
    report = inspect(model, torch.randn(1, 3, 8, 8))
    assert checks(report) == {("batch-norm-after-pool", "5")}
    assert [item.input for item in report.layers] == ["1x8x6x6", "1x8", "1x10"]


@pytest.mark.parametrize("shape,tiny", [((1, 3, 8, 8), True), ((4, 3, 1, 1), True), ((4, 3, 2, 2), False),
                                         ((32, 3, 1, 1), False)])
def test_tiny_batch_statistics(shape, tiny):
    """A training BatchNorm over fewer than 16 values a channel (N * spatial), or at batch size 1,
    is flagged once its forward has run; in eval it is not; the caller's RNG is not advanced
    (dropout in the example forward)."""
    model = nn.Sequential(nn.Dropout(0.5), nnn.BatchNorm2d(3))
    x = torch.randn(shape)
    state = torch.get_rng_state()
    report = inspect(model, x)
    assert torch.equal(state, torch.get_rng_state())
    assert checks(report) == ({("tiny-batch-statistics", "1")} if tiny else set())
    assert not inspect(model.eval(), x).findings


def test_one_value_per_instance():
    model = nn.Sequential(nn.Conv2d(3, 4, 8), nnn.InstanceNorm2d(4))  # 8x8 -> 1x1
    report = inspect(model, torch.randn(3, 3, 8, 8))
    assert checks(report) == {("one-value-per-channel", "1")}
    assert "spatial size == 1" in report.findings[0].message
    assert "Expected more than 1 spatial element when training" in report.findings[0].message


def test_training_mode_under_no_grad():
    model = classifier(nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        report = inspect(model, x)
    assert checks(report) == {("train-under-no-grad", MODEL)}
    finding = report.findings[0]
    assert finding.severity == "warning" and "2 norm layers ran in training mode under torch.no_grad() (1, 4)" \
        in finding.message and "model.eval()" in finding.advice
    assert "under torch.no_grad()" in str(report)
    assert inspect(model, x).findings == []  # training with gradients: fine
    with torch.inference_mode():
        assert checks(inspect(model, x)) == {("train-under-no-grad", MODEL)}
    model.eval()
    with torch.no_grad():
        assert inspect(model, x).findings == []  # evaluation done right
    # norms that compute the same in train and eval: nothing to warn about
    for same in (classifier(lambda c: nnn.GroupNorm(2, c)),
                 classifier(lambda c: nn.BatchNorm2d(c, track_running_stats=False))):
        with torch.no_grad():
            assert inspect(same, x).findings == []


def test_forward_error_is_a_finding():
    model = classifier(nnn.BatchNorm2d)
    report = inspect(model, torch.randn(2, 4, 8, 8))  # 4 channels into a 3-channel conv
    assert checks(report) == {("forward-error", MODEL)}
    assert report.findings[0].severity == "error" and "RuntimeError" in report.findings[0].message
    assert [item.input for item in report.layers] == ["not reached", "not reached"]
    report = inspect(nn.Sequential(nn.Flatten(), nnn.BatchNorm2d(4)), torch.randn(2, 4, 3, 3))
    assert checks(report) == {("forward-error", "1")}
    assert "expected 4D input (got 2D input)" in report.findings[0].message


def test_example_input_forms():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nnn.LayerNorm(4)

        def forward(self, x, scale=1.0):
            return self.norm(x) * scale

    model = TwoInputs()
    assert layer(inspect(model, (torch.randn(2, 4), 2.0)), "norm").input == "2x4"
    report = inspect(model, {"x": torch.randn(3, 4), "scale": 2.0})
    assert layer(report, "norm").input == "3x4" and "input x=3x4, scale=float" in str(report)
    skipped = inspect(nn.Sequential(nn.LazyLinear(4), nnn.LayerNorm(4)), torch.randn(2, 3))
    assert checks(skipped) == {("example-not-run", "0")} and layer(skipped, "1").input is None


# --- the model is left as it was -----------------------------------------------------------------

def stateful_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=None), nnn.BatchNorm2d(8, activation="relu"),
                          nnn.InstanceNorm2d(8, track_running_stats=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.BatchNorm1d(8))
    model[3].eval()  # a mix of modes, to be kept as they are
    return model


@pytest.mark.parametrize("batch, no_grad", [(4, False), (4, True), (1, False)])
def test_inspect_changes_nothing(batch, no_grad):
    model = stateful_model()
    model(torch.randn(4, 3, 8, 8))  # running statistics away from their initial values
    before = {k: v.clone() for k, v in model.state_dict().items()}
    objects = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    modes = [m.training for m in model.modules()]
    x = torch.randn(batch, 3, 8, 8)
    with torch.no_grad() if no_grad else torch.enable_grad():
        report = inspect(model, x)
    assert isinstance(report, Report) and any(item.input == f"{batch}x8x6x6" for item in report.layers)
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for k, v in after.items():
        assert v is objects[k], k                      # the same tensors...
        assert torch.equal(v.detach(), before[k]), k   # ... with the same values
    assert [m.training for m in model.modules()] == modes
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    if batch > 1:  # the forward inspect ran does change them, so the comparison above means something
        model(x)
        assert not torch.equal(model[1].running_mean, before["1.running_mean"])
        assert int(model[1].num_batches_tracked) == int(before["1.num_batches_tracked"]) + 1


# --- the command ---------------------------------------------------------------------------------

def fake_models(monkeypatch, example=True, build=True):
    """A stand-in for normops.models: one name, "tiny", a classifier with BatchNorm after the pool."""
    calls = []
    models = types.ModuleType("normops.models")
    models.NAMES = ("tiny",)
    if build:
        def build_model(name):
            if name != "tiny":
                raise KeyError(f"no model {name!r}")
            return pooled_bn()
        models.build = build_model
    if example:
        def example_input(name, batch_size):
            calls.append((name, batch_size))
            return torch.randn(batch_size, 3, 8, 8)
        models.example_input = example_input
    monkeypatch.setitem(sys.modules, "normops.models", models)
    return calls


def main(argv):
    return cli.main(argv)


def run(capsys, *argv):
    code = main(["inspect", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_static_and_dynamic(capsys, monkeypatch):
    calls = fake_models(monkeypatch)
    code, out, err = run(capsys, "tiny", "--static")
    assert code == 1 and calls == [] and not err
    assert "no example input (static checks only)" in out and "[batch-norm-after-pool] 5" in out
    code, out, _ = run(capsys, "tiny")
    assert code == 1 and calls == [("tiny", 2)]
    assert "example forward: input 2x3x8x8, grad enabled" in out and "one-value-per-channel" not in out
    code, out, _ = run(capsys, "tiny", "--batch-size", "1")
    assert code == 1 and "error [one-value-per-channel] 5:" in out
    code, out, _ = run(capsys, "tiny", "--batch-size", "1", "--eval")
    assert "one-value-per-channel" not in out and "  eval  " in out
    code, out, _ = run(capsys, "tiny", "--no-grad")
    assert "warning [train-under-no-grad] (model):" in out
    code, out, _ = run(capsys, "tiny", "--no-grad", "--eval")
    assert "train-under-no-grad" not in out


def test_cli_clean_model_exits_0(capsys, monkeypatch):
    fake_models(monkeypatch)
    monkeypatch.setattr(sys.modules["normops.models"], "build", lambda name: classifier(nn.BatchNorm2d))
    code, out, _ = run(capsys, "tiny", "--eval", "--no-grad")
    assert code == 0 and out.rstrip().endswith("no findings")


def test_cli_unknown_model_exits_2(capsys, monkeypatch):
    fake_models(monkeypatch)
    code, out, err = run(capsys, "huge")
    assert code == 2 and not out
    assert "normops inspect: error: unknown model 'huge'" in err and "choose from tiny" in err


def test_cli_without_the_hook_exits_2(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "normops.models", None)  # as if the package did not exist
    code, _, err = run(capsys, "tiny")
    assert code == 2 and "normops.models is not available" in err
    fake_models(monkeypatch, build=False)
    code, _, err = run(capsys, "tiny")
    assert code == 2 and "normops.models has no build(name)" in err
    fake_models(monkeypatch, example=False)
    code, out, err = run(capsys, "tiny")
    assert code == 1 and "example_input(name, batch_size) is missing): static checks only" in err
    assert "no example input" in out
