"""normops.convert(model): swap the torch.nn norms of an existing model in place.

The contract: every module whose type is exactly one of the nine torch.nn norms becomes its
normops twin, sharing the very Parameter and buffer objects (so an optimizer built earlier keeps
working), the hooks, the training flag and the state_dict keys; subclasses are left alone (they
may override forward); a module used at several places becomes one twin used at all of them.
The converted model computes what it computed before: float64, so the tolerance (1e-10) only
has to absorb summation order.
"""
import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import normops
from normops import nn as nnn

TOL = dict(rtol=1e-10, atol=1e-10)
TWINS = {
    nn.BatchNorm1d: nnn.BatchNorm1d, nn.BatchNorm2d: nnn.BatchNorm2d, nn.BatchNorm3d: nnn.BatchNorm3d,
    nn.LayerNorm: nnn.LayerNorm, nn.RMSNorm: nnn.RMSNorm, nn.GroupNorm: nnn.GroupNorm,
    nn.InstanceNorm1d: nnn.InstanceNorm1d, nn.InstanceNorm2d: nnn.InstanceNorm2d,
    nn.InstanceNorm3d: nnn.InstanceNorm3d,
}


class MyLayerNorm(nn.LayerNorm):
    """A user subclass with its own forward: convert must leave it alone."""

    def forward(self, x):
        return super().forward(x) * 2.0


class Model(nn.Module):
    """All nine norm types, nested in Sequential / ModuleList / ModuleDict, one LayerNorm shared
    by two places, and a LayerNorm subclass."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.block2d = nn.Sequential(
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Sequential(nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, affine=True, track_running_stats=True)),
        )
        self.block3d = nn.ModuleList([nn.BatchNorm3d(3, momentum=None), nn.InstanceNorm3d(3, affine=True)])
        self.seq1d = nn.ModuleDict({"bn": nn.BatchNorm1d(6), "inorm": nn.InstanceNorm1d(6)})
        self.proj = nn.Linear(8, 8)
        shared = nn.LayerNorm(8)
        self.shared_a = shared  # used at two places: here ...
        self.tokens = nn.ModuleDict({"ln": shared, "rms": nn.RMSNorm(8, eps=1e-6)})  # ... and here
        self.custom = MyLayerNorm(8)

    def forward(self, img, vol, seq, tok):
        a = self.block2d(self.conv(img))
        b = vol
        for m in self.block3d:
            b = m(b)
        c = self.seq1d["inorm"](self.seq1d["bn"](seq))
        t = self.shared_a(tok)
        t = self.tokens["rms"](self.proj(t))
        t = self.tokens["ln"](t)  # the shared instance, second use
        t = self.custom(t)
        return a, b, c, t


def inputs(gen, dtype=torch.float64):
    def r(*shape):
        return (-2.3 + 0.5 * torch.randn(shape, generator=gen, dtype=dtype)).requires_grad_()
    return r(2, 3, 5, 6), r(2, 3, 4, 3, 5), r(3, 6, 7), r(2, 5, 8)


def make_model(seed=0):
    torch.manual_seed(seed)
    model = Model().double()
    with torch.no_grad():  # non-trivial affine parameters
        for name, p in model.named_parameters():
            if "conv" not in name and "proj" not in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model.train()
    model(*inputs(torch.Generator().manual_seed(99)))  # non-trivial running statistics
    return model


def weighted_sum(outs, gen):
    return sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)


def norm_modules(model):
    return [m for m in model.modules() if isinstance(m, tuple(TWINS))]


# --- structure -------------------------------------------------------------------------------

def test_every_exact_norm_becomes_its_twin():
    model = make_model()
    before = {name: type(m) for name, m in model.named_modules(remove_duplicate=False)}
    custom = model.custom
    assert normops.convert(model) is model
    after = dict(model.named_modules(remove_duplicate=False))
    assert after.keys() == before.keys()
    seen = set()
    for name, m in after.items():
        if before[name] in TWINS:
            assert type(m) is TWINS[before[name]], name
            seen.add(before[name])
        else:
            assert type(m) is before[name], name
    assert seen == set(TWINS), "the model should hold all nine norm types"
    assert model.custom is custom and type(model.custom) is MyLayerNorm
    # No exact torch.nn norm is left anywhere.
    assert not [n for n, m in model.named_modules() if type(m) in TWINS]
    # The converted modules behave like torch's (activation off, repr unchanged).
    for m in norm_modules(model):
        if type(m) in TWINS.values():
            assert m.activation is None and "activation" not in repr(m)


def test_shared_instance_becomes_one_twin():
    model = make_model()
    assert model.shared_a is model.tokens["ln"]
    normops.convert(model)
    assert type(model.shared_a) is nnn.LayerNorm
    assert model.shared_a is model.tokens["ln"]
    assert [type(m) for m in model.modules() if isinstance(m, nn.LayerNorm)] == [nnn.LayerNorm, MyLayerNorm]
    named = dict(model.named_modules(remove_duplicate=False))
    assert named["shared_a"] is named["tokens.ln"]


def test_parameters_and_buffers_are_the_same_objects():
    model = make_model()
    params = list(model.named_parameters(remove_duplicate=False))
    buffers = list(model.named_buffers(remove_duplicate=False))
    normops.convert(model)
    params_after = list(model.named_parameters(remove_duplicate=False))
    buffers_after = list(model.named_buffers(remove_duplicate=False))
    assert [n for n, _ in params_after] == [n for n, _ in params]
    assert [n for n, _ in buffers_after] == [n for n, _ in buffers]
    for (n, p), (_, q) in zip(params, params_after):
        assert p is q, n
    for (n, b), (_, c) in zip(buffers, buffers_after):
        assert b is c, n


def test_state_dict_keys_and_values_kept():
    model = make_model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    normops.convert(model)
    sd_after = model.state_dict()
    assert list(sd_after) == list(sd)
    for k, v in sd.items():
        assert torch.equal(sd_after[k], v), k
    # ... and the checkpoint loads (strict) into a fresh unconverted model and a converted one.
    fresh = Model().double()
    fresh.load_state_dict(sd_after, strict=True)
    normops.convert(fresh).load_state_dict(sd, strict=True)


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_training_flag_kept(mode):
    model = make_model()
    if mode == "eval":
        model.eval()
    elif mode == "mixed":
        model.block2d[2].eval()
        model.seq1d["bn"].eval()
    flags = {name: m.training for name, m in model.named_modules()}
    normops.convert(model)
    assert {name: m.training for name, m in model.named_modules()} == flags
    model.eval()  # and train()/eval() reach the twins afterwards
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


def test_optimizer_built_before_convert_still_trains():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    normops.convert(model)
    gen = torch.Generator().manual_seed(3)
    x = inputs(gen)
    model.eval()
    with torch.no_grad():
        out_before = [o.clone() for o in model(*x)]
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt.zero_grad()
    weighted_sum(model(*x), gen).backward()
    opt.step()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert not torch.equal(p.detach(), params_before[n]), f"{n} not updated by the optimizer"
    for norm_name in ("block2d.0.weight", "block3d.1.bias", "shared_a.weight", "tokens.rms.weight"):
        assert not torch.equal(model.get_parameter(norm_name).detach(), params_before[norm_name])
    model.eval()
    with torch.no_grad():
        out_after = model(*x)
    for a, b in zip(out_before, out_after):
        assert not torch.equal(a, b)


def test_hooks_registered_before_convert_still_fire_and_remove():
    model = make_model()
    calls = []
    target = model.tokens["rms"]
    h_fwd = target.register_forward_hook(lambda m, i, o: calls.append(("fwd", type(m))))
    h_pre = target.register_forward_pre_hook(lambda m, i: calls.append(("pre", type(m))))
    h_shared = model.shared_a.register_forward_hook(lambda m, i, o: calls.append(("shared", type(m))))
    h_kw = model.block2d[0].register_forward_hook(lambda m, args, kwargs, o: calls.append(("kw", type(m))),
                                                  with_kwargs=True)
    normops.convert(model)
    x = inputs(torch.Generator().manual_seed(4))
    model(*x)
    assert calls == [("kw", nnn.BatchNorm2d), ("shared", nnn.LayerNorm), ("pre", nnn.RMSNorm),
                     ("fwd", nnn.RMSNorm), ("shared", nnn.LayerNorm)]
    for h in (h_fwd, h_pre, h_shared, h_kw):
        h.remove()
    calls.clear()
    model(*x)
    assert calls == []
    # A hook registered after convert works too.
    h = model.tokens["rms"].register_forward_hook(lambda m, i, o: calls.append("late"))
    model(*x)
    assert calls == ["late"]
    h.remove()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_outputs_and_gradients_match_unconverted_copy(mode):
    model = make_model()
    ref = copy.deepcopy(model)
    normops.convert(model)
    model.train(mode == "train"), ref.train(mode == "train")
    for seed in range(2):  # two steps, so the running statistics of step one feed step two
        x = inputs(torch.Generator().manual_seed(10 + seed))
        xr = [t.detach().clone().requires_grad_() for t in x]
        outs, outs_ref = model(*x), ref(*xr)
        for o, r in zip(outs, outs_ref):
            assert_close(o, r, **TOL)
        weighted_sum(outs, torch.Generator().manual_seed(20 + seed)).backward()
        weighted_sum(outs_ref, torch.Generator().manual_seed(20 + seed)).backward()
        for t, tr in zip(x, xr):
            assert_close(t.grad, tr.grad, **TOL)
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert_close(p.grad, q.grad, **TOL, msg=lambda m, n=n: f"{n}.grad: {m}")
        for (n, b), (_, c) in zip(model.named_buffers(), ref.named_buffers()):
            assert_close(b, c, **TOL, msg=lambda m, n=n: f"buffer {n}: {m}")


def test_convert_is_idempotent():
    model = make_model()
    normops.convert(model)
    modules = dict(model.named_modules())
    normops.convert(model)
    assert all(m is modules[n] for n, m in model.named_modules())


# --- a bare norm -------------------------------------------------------------------------------

BARE = [nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.BatchNorm3d(4), nn.LayerNorm((3, 4)), nn.RMSNorm(4),
        nn.GroupNorm(2, 4), nn.InstanceNorm1d(4, affine=True), nn.InstanceNorm2d(4, track_running_stats=True),
        nn.InstanceNorm3d(4)]
SHAPES = {nn.BatchNorm1d: (3, 4, 5), nn.BatchNorm2d: (3, 4, 5, 2), nn.BatchNorm3d: (2, 4, 3, 2, 2),
          nn.LayerNorm: (2, 3, 4), nn.RMSNorm: (2, 3, 4), nn.GroupNorm: (2, 4, 5), nn.InstanceNorm1d: (2, 4, 5),
          nn.InstanceNorm2d: (2, 4, 5, 3), nn.InstanceNorm3d: (2, 4, 3, 2, 3)}


@pytest.mark.parametrize("module", BARE, ids=lambda m: type(m).__name__)
def test_convert_bare_norm_returns_twin(module):
    module = copy.deepcopy(module).double()
    module.eval()
    ref = copy.deepcopy(module)
    params = list(module.parameters())
    buffers = list(module.buffers())
    twin = normops.convert(module)
    assert type(twin) is TWINS[type(ref)]
    assert isinstance(twin, type(ref))
    assert all(p is q for p, q in zip(twin.parameters(), params)) and len(list(twin.parameters())) == len(params)
    assert all(b is c for b, c in zip(twin.buffers(), buffers)) and len(list(twin.buffers())) == len(buffers)
    assert not twin.training
    assert repr(twin) == repr(ref)
    assert list(twin.state_dict()) == list(ref.state_dict())
    x = -2.3 + 0.5 * torch.randn(SHAPES[type(ref)], dtype=torch.float64)
    for training in (True, False):
        twin.train(training), ref.train(training)
        assert_close(twin(x), ref(x), **TOL)


def test_convert_leaves_subclass_and_other_modules_alone():
    ln = MyLayerNorm(8)
    assert normops.convert(ln) is ln and type(ln) is MyLayerNorm
    lin = nn.Linear(3, 3)
    assert normops.convert(lin) is lin


# --- a third-party model: a tiny BERT from a config, nothing downloaded -------------------------

@pytest.fixture(scope="module")
def bert_pair():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    return model, config


def bert_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 99, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # one padded sequence
    return ids, mask


def test_bert_converted_matches_unconverted(bert_pair):
    base, _ = bert_pair
    ref = copy.deepcopy(base).eval()
    model = copy.deepcopy(base).eval()
    n_ln = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert n_ln >= 5  # embeddings + 2 per layer
    normops.convert(model)
    lns = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(lns) == n_ln and all(type(m) is nnn.LayerNorm for m in lns)
    ids, mask = bert_inputs()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.shape == (2, 7, 32)
    assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_bert_training_step(bert_pair):
    base, _ = bert_pair
    ref = copy.deepcopy(base).train()
    model = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    normops.convert(model)  # after the optimizer: it must keep working
    ids, mask = bert_inputs(1)
    losses = []
    for m in (model, ref):
        torch.manual_seed(123)  # the same dropout masks in both
        out = m(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = out.square().mean()
        loss.backward()
        losses.append(loss)
    assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    ln_params = {n: p for n, p in model.named_parameters() if "LayerNorm" in n}
    assert ln_params
    ref_params = dict(ref.named_parameters())
    for n, p in ln_params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert_close(p.grad, ref_params[n].grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}.grad: {m}")
    before = {n: p.detach().clone() for n, p in ln_params.items()}
    opt.step()
    for n, p in ln_params.items():
        assert not torch.equal(p.detach(), before[n]), f"{n} not updated"


def test_buffer_registered_on_discarded_original_stays_out_of_twin_state_dict():
    """The twin shares the Parameter and buffer objects, not the containers: state registered on
    the replaced torch module afterwards is not the twin's."""
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    original = model[0]
    normops.convert(model)
    keys = list(model.state_dict())
    original.register_buffer("extra", torch.zeros(1))
    original.register_parameter("extra_p", torch.nn.Parameter(torch.zeros(1)))
    assert list(model.state_dict()) == keys
    assert model[0].weight is original.weight and model[0].running_mean is original.running_mean
