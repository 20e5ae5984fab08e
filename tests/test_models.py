"""The five practical models (normops.models): normops norms train like torch.nn's, the models run
forward and backward on the Triton kernels, the data is deterministic, and the runner and the
``models`` command produce their table and PNGs.

Everything here is small: a few training steps, tiny models for the Triton interpreter, the
runner and the command in quick mode or with 2 steps. Whether the full training runs meet their
targets is not tested here (minutes of CPU); ``normops models`` checks that.
"""
import contextlib
import importlib

import pytest
import torch
from torch import nn

import normops
from normops import cli, models
from normops.models import data

MODULES = {name: importlib.import_module(f"normops.models.{name}") for name in models.MODELS}
# The norm family each model's norms run through: what the Triton test expects to see launched.
FAMILIES = {"resnet": "batch_norm", "transformer": "row_norm", "unet": "group_norm", "cyclegan": "group_norm",
            "lstm": "row_norm"}
# On the torch backend, normops' fp32 norms are ATen's norm kernels, and a fused activation is
# torch's own activation applied to that output: the same operations in the same order as the
# torch.nn model, so the losses of a few steps agree to rounding. Measured: bit-identical;
# 1e-5 relative leaves room for a reassociation and is 100x below a wrong fused activation.
LOSS_RTOL = 1e-5
# Triton vs ATen in fp32: the kernels reduce in another order, ~1e-6 relative per norm; through a
# tiny model's forward and backward, measured <= 5e-6 of each parameter's largest gradient.
GRAD_RTOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: at these sizes, two threads on a busy 2-core machine wait on each other
    far longer than they compute (a ResNet step: 7 ms with one thread, 390 ms with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _norm_modules(model):
    return [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))]


@pytest.mark.parametrize("name", models.MODELS)
def test_normops_and_torch_norms_train_alike(name):
    m = MODULES[name]
    if name == "resnet":
        pytest.importorskip("sklearn")
    ours, ref = (m.train(norm, steps=3, seed=0) for norm in ("normops", "torch"))
    assert ours.norm == "normops" and ref.norm == "torch"
    # The models really differ in their norm modules, and in nothing else.
    assert _norm_modules(ours.model) and all(isinstance(n, normops.nn.FusedActivation) for n in _norm_modules(ours.model))
    assert all(type(n).__module__.startswith("torch.nn") for n in _norm_modules(ref.model))
    assert ours.model.state_dict().keys() == ref.model.state_dict().keys()
    assert set(ours.losses) == set(ref.losses)
    for key, series in ours.losses.items():
        assert len(series) == 3
        assert torch.allclose(torch.tensor(series), torch.tensor(ref.losses[key]), rtol=LOSS_RTOL, atol=0), key
    # And the weights after the steps (and BatchNorm's running statistics) agree.
    for (k, p), q in zip(ours.model.state_dict().items(), ref.model.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), rtol=1e-4, atol=1e-6), k


def test_fused_activations_are_in_the_normops_models():
    """The activation the torch model applies after each norm is fused into normops' norm."""
    resnet = MODULES["resnet"].ResNet("normops")
    assert resnet.stem.norm.activation == "relu" and isinstance(resnet.stem.act, nn.Identity)
    assert isinstance(MODULES["resnet"].ResNet("torch").stem.act, nn.ReLU)
    unet = MODULES["unet"].UNet("normops")
    assert {m.activation for m in unet.modules() if isinstance(m, normops.nn.GroupNorm)} == {"silu"}
    gen = MODULES["cyclegan"].Generator("normops")
    assert {m.activation for m in gen.modules() if isinstance(m, normops.nn.InstanceNorm2d)} == {"relu", None}


def test_transformer_uses_the_fused_residual_layer_norm(monkeypatch):
    calls = []
    real = normops.functional.add_layer_norm
    monkeypatch.setattr(normops.functional, "add_layer_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    t = MODULES["transformer"]
    torch.manual_seed(0)
    ours = t.Encoder("normops", layers=2)
    ref = t.Encoder("torch", layers=2)
    ref.load_state_dict(ours.state_dict())
    x, _ = data.sort_task(4, t.LENGTH, seed=0)
    y = ours(x)
    assert len(calls) == 4  # one per sublayer: attention, MLP, attention, MLP
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def _counting_triton_calls(monkeypatch):
    """{backend function name: calls} of the triton backend inside the block."""
    from normops.backends import triton_backend

    counts = {}
    for fam in ("row_norm", "group_norm", "batch_norm"):
        for d in ("fwd", "bwd"):
            fn_name = f"{fam}_{d}"
            real = getattr(triton_backend, fn_name)

            def counted(*args, _real=real, _name=fn_name, **kwargs):
                counts[_name] = counts.get(_name, 0) + 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(triton_backend, fn_name, counted)
    yield counts


@pytest.mark.parametrize("name", models.MODELS)
def test_forward_backward_on_triton_backend(name, monkeypatch):
    """A tiny model's loss and every gradient on the Triton kernels (the interpreter without a GPU)
    match the same model on the default torch backend."""
    pytest.importorskip("triton")
    if not normops.backends.triton_interpret():
        pytest.skip("the tiny models are CPU tensors: the triton backend takes them only under TRITON_INTERPRET=1")
    m = MODULES[name]
    ref_model, ref_loss = m.tiny_loss("normops", seed=0)
    ref_loss.backward()
    with _counting_triton_calls(monkeypatch) as counts, normops.backend("triton"):
        model, loss = m.tiny_loss("normops", seed=0)
        loss.backward()
    fam = FAMILIES[name]
    assert counts.get(f"{fam}_fwd", 0) > 0 and counts.get(f"{fam}_bwd", 0) > 0, counts
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for (k, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert p.grad is not None, k
        scale = q.grad.abs().max().item()
        assert (p.grad - q.grad).abs().max().item() <= GRAD_RTOL * scale + 1e-7, k


def test_data_is_deterministic():
    fns = [lambda s: data.sort_task(64, seed=s), lambda s: data.running_sum_task(64, seed=s),
           lambda s: data.shapes(8, 16, seed=s), lambda s: data.domains(8, 16, seed=s)]
    for fn in fns:
        a, b, c = fn(3), fn(3), fn(4)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert not all(torch.equal(x, y) for x, y in zip(a, c))
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    data.shapes(8, 16, seed=1)
    assert torch.equal(torch.rand(1), before)  # the global generator is not touched


def test_generated_targets_are_right():
    x, y = data.sort_task(32, seed=0)
    assert torch.equal(y, x.sort(1).values)
    x, y = data.running_sum_task(32, length=5, seed=0)
    assert torch.equal(y[:, -1], x.sum(1) % 10)
    images, masks = data.shapes(64, 32, seed=0)
    assert images.shape == (64, 1, 32, 32) and masks.shape == (64, 32, 32)
    assert set(masks.unique().tolist()) == {0, 1, 2}  # background, discs and squares all occur
    a, b = data.domains(16, 24, seed=0)
    # The same layout in both domains: A's shape pixels are B's fill and border pixels.
    fg_a = (a - torch.tensor(data.PALETTE_A[0]).view(1, 3, 1, 1) * 2 + 1).abs().sum(1) > 1e-6
    fg_b = (b - torch.tensor(data.PALETTE_B[0]).view(1, 3, 1, 1) * 2 + 1).abs().sum(1) > 1e-6
    assert fg_a.any() and torch.equal(fg_a, fg_b)


def test_digits_split_is_deterministic():
    pytest.importorskip("sklearn")
    a, b = data.digits(0), data.digits(0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    x, y, x_test, y_test = a
    assert x.shape[1:] == (1, 8, 8) and len(x) + len(x_test) == 1797 and len(x_test) == 359
    assert not torch.equal(data.digits(1)[3], y_test)


def _pngs_ok(path, names):
    for name in names:
        for kind in ("loss", "samples"):
            p = path / f"{name}_{kind}.png"
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p


def test_runner_quick(tmp_path):
    pytest.importorskip("matplotlib")
    rows = models.run(["transformer", "lstm"], out_dir=tmp_path, quick=True, progress=False)
    assert [r.model for r in rows] == ["transformer", "lstm"]
    for r in rows:
        assert r.met is None  # quick: no target checked
        assert set(r.values) == set(r.steps_per_s) == {"normops", "torch"}
        assert all(v > 0 for v in r.steps_per_s.values())
        assert r.metric == MODULES[r.model].METRIC and r.target == MODULES[r.model].TARGET
    _pngs_ok(tmp_path, ["transformer", "lstm"])
    table = models.format_rows(rows)
    assert table.splitlines()[0].split()[:3] == ["model", "task", "metric"]
    assert "transformer" in table and "lstm" in table
    with pytest.raises(ValueError, match="unknown model"):
        models.run(["vgg"], out_dir=None)


def _cli(argv):
    return cli.main(argv)


def test_cli_quick_prints_table_and_exits_0(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code = _cli(["models", "--quick", "--only", "lstm", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[header + 2].split()[0] == "lstm"
    _pngs_ok(tmp_path, ["lstm"])


def test_cli_exits_1_when_a_target_is_missed(tmp_path, capsys):
    """Two steps cannot teach the LSTM its task: the target is checked, missed, and said so."""
    pytest.importorskip("matplotlib")
    code = _cli(["models", "--only", "lstm", "--steps", "2", "--norm", "normops", "--out", str(tmp_path),
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    row = next(line for line in out.splitlines() if line.startswith("lstm "))
    assert " NO " in row


@pytest.mark.parametrize("argv", [["--only", "vgg"], ["--steps", "0"], ["--norm", "apex"]])
def test_cli_usage_errors(argv):
    from cases import argparse_rejects

    assert argparse_rejects(_cli, ["models", *argv])


@pytest.mark.parametrize("name", models.MODELS)
def test_inspect_resolves_each_model(name):
    """`normops inspect <model>` builds the model through normops.models.build and runs its example
    batch: every norm layer is a normops one, and the eval-mode model shows no mistake; in
    training mode under no_grad the forgotten model.eval() is found (models with running stats)."""
    from normops.inspect import resolve_model

    model, example = resolve_model(name, batch_size=2)
    report = normops.inspect(model.eval(), example)
    assert report.layers and all(layer.type.startswith("normops.") for layer in report.layers)
    seen = [layer.name for layer in report.layers if layer.input not in ("not called", "not reached")]
    # the hooks saw every norm of the forward (CycleGAN's forward is its A -> B generator)
    assert seen == [layer.name for layer in report.layers if name != "cyclegan" or layer.name.startswith("g_ab.")]
    assert not report.findings, report.findings
    with torch.no_grad():
        report = normops.inspect(model.train(), example)
    forgot_eval = any(f.check == "train-under-no-grad" for f in report.findings)
    assert forgot_eval == (name == "resnet")  # only ResNet's norms (BatchNorm) keep running statistics
