"""The model guard sees what a replay baked in beyond the module's own ``__dict__``: settings read from the class (or a
base class, or later hidden by the instance), and the modules and values a model given as a plain function, a
``functools.partial`` or a bound method reaches. CPU only: ``FakeGraphs`` stands in for CUDA graphs, so a re-plan
notice (which only the slow path gives, after the hot path's check refused the call) is what these assert on."""
from __future__ import annotations

import enum
import functools
import sys
import warnings

import pytest
import torch
from torch import nn

from opara_nb.runtime import OparaNotice, optimize
from opara_nb.runtime.guards import CallState, ModelGuard, hot_guard
from opara_nb.testing import FakeGraphs
from _helpers import Encoder, ReadsContainers

SCALE = 2.0


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _notices(om, *args):
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        out = om(*args)
    return out, [str(w.message) for w in told if issubclass(w.category, OparaNotice)]


def _replans(model, x, edit, said, expect):
    """Optimize ``model``, call it, ``edit()``: the next call re-plans saying ``said`` and returns ``expect()`` (the
    graphs replay their recorded operations only, as on a GPU: a missed change would return the stale result)."""
    om = _quiet(optimize, model, x, strategy="opara", graphs=FakeGraphs(kernels=True))
    _quiet(om, x)
    _quiet(om, x)
    edit()
    out, told = _notices(om, x)
    assert any("model changed" in t and said in t for t in told), told
    torch.testing.assert_close(out, expect())


# ---------------------------------------------------------------------------------------------- class-level settings

class Base(nn.Module):
    alpha = 2.0

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) * self.alpha


class Sub(Base):
    pass


@pytest.mark.parametrize("cls, edit, said", [
    (Base, lambda mp, m: mp.setattr(Base, "alpha", 3.0), "'alpha' changed (2.0 -> 3.0)"),
    (Sub, lambda mp, m: mp.setattr(Sub, "alpha", 4.0, raising=False), "'alpha' was set on Sub"),
    (Sub, lambda mp, m: mp.setattr(Base, "alpha", 4.0), "'alpha' changed (2.0 -> 4.0)"),
    (Base, lambda mp, m: setattr(m, "alpha", 5.0), "'alpha' was set on the instance"),
], ids=["on-its-class", "on-a-subclass", "on-a-base-class", "hidden-by-the-instance"])
def test_a_setting_read_from_the_class_is_replanned(monkeypatch, cls, edit, said):
    monkeypatch.setattr(Base, "alpha", 2.0)
    torch.manual_seed(0)
    m, x = cls().eval(), torch.randn(3, 4)
    _replans(m, x, lambda: edit(monkeypatch, m), said, lambda: m(x).detach())


def test_the_hot_check_refuses_a_class_setting_changed_or_hidden(monkeypatch):
    monkeypatch.setattr(Base, "alpha", 2.0)
    m, x = Sub().eval(), torch.randn(3, 4)
    check = hot_guard((x,), {}, CallState(), ModelGuard(m))
    assert check((x,), {}) is not None
    monkeypatch.setattr(Sub, "alpha", 2.5, raising=False)
    assert check((x,), {}) is None
    monkeypatch.delattr(Sub, "alpha")
    assert check((x,), {}) is not None
    m.alpha = 7.0
    assert check((x,), {}) is None


def test_a_value_written_into_the_instance_dict_directly_is_seen_by_a_full_check(monkeypatch):
    monkeypatch.setattr(Base, "alpha", 2.0)
    m = Base().eval()
    guard = ModelGuard(m)
    m.__dict__["alpha"] = 9.0  # no __setattr__: not counted, but changes() (om.refresh()) sees it
    assert any("alpha" in line for line in guard.changes())


# ---------------------------------------------------------------------------------------------- callables as models

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x, scale=1.0):
        return self.bn(self.lin(x)) * scale


def _net():
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.fill_(3.0)
    return net


NET_EDITS = [
    (lambda n: setattr(n.lin, "weight", nn.Parameter(torch.randn(4, 4))), "'net.lin.weight' was replaced"),
    (lambda n: n.register_forward_hook(lambda m, i, o: o * 0), "hooks added"),
    (lambda n: n.bn.train(), "switched to train"),
]


@pytest.mark.parametrize("edit, said", NET_EDITS, ids=["param-replaced", "hook-added", "bn-train"])
def test_a_partial_of_a_module_is_guarded_like_the_module(edit, said):
    net, x = _net(), torch.randn(8, 4)
    _replans(functools.partial(net, scale=2.0), x, lambda: edit(net), said.replace("'net.", "'model."),
             lambda: torch.no_grad()(net)(x, 2.0))


def fn_model(x):
    return GLOBAL_NET(x, SCALE)


GLOBAL_NET = None


@pytest.mark.parametrize("edit, said", [
    (lambda mod: setattr(mod, "SCALE", 3.0), "global 'SCALE' changed (2.0 -> 3.0)"),
    (lambda mod: setattr(mod, "GLOBAL_NET", _net()), "GLOBAL_NET"),
    (lambda mod: mod.GLOBAL_NET.bn.train(), "switched to train"),
    (lambda mod: setattr(mod.GLOBAL_NET.lin, "weight", nn.Parameter(torch.randn(4, 4))), "was replaced"),
], ids=["global-setting", "global-module-rebound", "bn-train", "param-replaced"])
def test_a_function_is_guarded_through_the_globals_it_reads(monkeypatch, edit, said):
    mod = sys.modules[__name__]
    monkeypatch.setattr(mod, "GLOBAL_NET", _net())
    monkeypatch.setattr(mod, "SCALE", 2.0)
    x = torch.randn(8, 4)
    _replans(fn_model, x, lambda: edit(mod), said, lambda: _quiet(torch.no_grad()(fn_model), x))


def test_a_closure_and_a_bound_method_are_guarded():
    net = _net()

    def closure(x):
        return net(x) + 1

    x = torch.randn(8, 4)
    _replans(closure, x, lambda: net.bn.train(), "switched to train", lambda: torch.no_grad()(closure)(x))
    net = _net()
    _replans(net.forward, x, lambda: net.lin.register_forward_hook(lambda m, i, o: o * 0), "hooks added",
             lambda: torch.no_grad()(net.forward)(x))


def test_a_partial_in_training_mode_runs_the_original():
    net = _net()
    om = _quiet(optimize, functools.partial(net, scale=2.0), torch.randn(8, 4), graphs=FakeGraphs())
    net.train()
    _, told = _notices(om, torch.randn(8, 4))
    assert any("training mode" in t for t in told), told


class _Holder:
    def __init__(self, net):
        self.net = net

    def __call__(self, x):
        return self.net(x)


def test_a_callable_that_cannot_be_inspected_runs_the_original_with_a_notice():
    net, x = _net(), torch.randn(8, 4)
    om, told = _notices(lambda: optimize(_Holder(net), x, graphs=FakeGraphs()))
    assert any("cannot be guarded" in t for t in told), told
    out = _quiet(om, x)
    with torch.no_grad():
        torch.testing.assert_close(out, net(x))


# ------------------------------------------------------------------------ seventh sweep: what a callable holds
def _scaled_by(x, lin, scale=1.0, *, shift=0.0):
    return lin(x) * scale + shift


def _with_closure():
    lin, weights = nn.Linear(4, 4).eval(), [1.0, 2.0]

    def f(x):
        return lin(x) * weights[1]

    return f, weights


def test_in_place_and_keyword_default_edits_of_a_function_model_are_replanned():
    x = torch.randn(2, 4)
    f, weights = _with_closure()
    _replans(f, x, lambda: weights.__setitem__(1, 3.0), "'weights' was changed in place", lambda: f(x))
    lin, factors = nn.Linear(4, 4).eval(), [2.0]

    def g(x, factors):
        return lin(x) * factors[0]

    p = functools.partial(g, factors=factors)
    _replans(p, x, lambda: factors.__setitem__(0, 5.0), "'factors' was changed in place", lambda: p(x))
    q = functools.partial(_scaled_by, lin=lin)
    kw = dict(_scaled_by.__kwdefaults__)
    try:
        _replans(q, x, lambda: setattr(_scaled_by, "__kwdefaults__", {"shift": 1.0}), "keyword defaults",
                 lambda: q(x))
    finally:
        _scaled_by.__kwdefaults__ = kw


def test_a_bound_method_model_sees_its_helpers_replaced_and_its_class_settings_hidden(monkeypatch):
    x = torch.randn(2, 4)
    enc = Encoder().eval()
    monkeypatch.setattr(Encoder, "helper", Encoder.helper)  # restored after the test
    _replans(enc.encode, x, lambda: setattr(Encoder, "helper", lambda self, y: y - 1), "was replaced on its class",
             lambda: enc.encode(x))
    enc2 = Encoder().eval()
    _replans(enc2.encode, x, lambda: setattr(enc2, "alpha", 5.0), "hiding its class's value", lambda: enc2.encode(x))


def test_a_deleted_closure_variable_gives_the_models_own_error():
    lin, s = nn.Linear(4, 4).eval(), 2.0

    def f(x):
        return lin(x) * s  # noqa: F821 - deleted below, on purpose

    x = torch.randn(2, 4)
    om = _quiet(optimize, f, x, graphs=FakeGraphs())
    _quiet(om, x)
    _quiet(om, x)
    del s
    with pytest.raises(NameError):
        _quiet(om, x)


class ReadsThroughItsClass(nn.Module):
    alpha, beta = 2.0, 3.0

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) * type(self).alpha + self.__class__.beta


@pytest.mark.parametrize("name", ["alpha", "beta"], ids=["type(self).alpha", "self.__class__.beta"])
def test_a_class_setting_read_through_the_class_is_replanned(monkeypatch, name):
    m, x = ReadsThroughItsClass().eval(), torch.randn(3, 4)
    monkeypatch.setattr(ReadsThroughItsClass, name, getattr(ReadsThroughItsClass, name))
    _replans(m, x, lambda: monkeypatch.setattr(ReadsThroughItsClass, name, 7.0), f"'{name}' changed",
             lambda: m(x).detach())


# ---------------------------------------------------------------------------------------------- containers read

def _expect_containers(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("edit, said", [
    (lambda m: m.cfg["act"].__setitem__("slope", 0.5), "'cfg' changed ({'act': {'slope': 0.1}} -> "),
    (lambda m: setattr(m, "cfg", {"act": {"slope": 0.7}}), "'cfg' changed"),
    (lambda m: m.pair[0].__setitem__(1, 5.0), "'pair' changed"),
    (lambda m: m.rows[1].__setitem__(0, 9.0), "'rows' changed"),
    (lambda m: m.scales.__setitem__(1, torch.tensor(5.0)), "'scales' changed"),
    (lambda m: setattr(m, "table", list(range(1, 101))), "'table' changed ([1, 2, 3, 4, 5, 6, 7, 8, ...] now)"),
], ids=["nested-dict-in-place", "nested-dict-replaced", "tuple-holding-a-list", "list-of-lists",
        "list-of-tensors-item", "large-list-replaced"])
def test_containers_a_forward_reads_are_watched_at_every_depth(edit, said):
    """A graph bakes in what the forward read of them: a change at any depth, or a tensor swapped in a list,
    re-plans (before, none of these was seen)."""
    model, x = ReadsContainers().eval(), torch.randn(2, 4)
    _replans(model, x, lambda: edit(model), said, lambda: _expect_containers(model, x))


CFG = {"a": {"k": 2.0}}
OFFSETS = [torch.tensor(1.0)]


def _reads_globals(x, lin):
    return lin(x) * CFG["a"]["k"] + OFFSETS[0]


@pytest.mark.parametrize("edit, said", [
    (lambda: CFG["a"].__setitem__("k", 3.0), "global 'CFG' changed"),
    (lambda: OFFSETS.__setitem__(0, torch.tensor(7.0)), "global 'OFFSETS' changed"),
])
def test_global_containers_a_function_model_reads_are_watched_at_every_depth(edit, said):
    lin = nn.Linear(4, 4).eval()
    model, x = functools.partial(_reads_globals, lin=lin), torch.randn(2, 4)
    try:
        _replans(model, x, edit, said, lambda: _expect_containers(model, x))
    finally:
        CFG["a"], OFFSETS[0] = {"k": 2.0}, torch.tensor(1.0)


# ---------------------------------------------------------------------------------------------- reads beyond self.name

class ScaledBase(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.alpha, self._scale = 1.0, 1.0

    def forward(self, x):
        return self.lin(x) * self.alpha


class ViaSuper(ScaledBase):
    def forward(self, x):
        return super().forward(x) + 1


class ViaBaseCall(ScaledBase):
    def forward(self, x):
        return ScaledBase.forward(self, x) + 1


def scaled_by_helper(mod, x):
    return mod.lin(x) * mod.alpha


class ViaHelper(ScaledBase):
    def forward(self, x):
        return scaled_by_helper(self, x)


class ViaProperty(ScaledBase):
    @property
    def scale(self):
        return self._scale * 2

    def forward(self, x):
        return self.lin(x) * self.scale


GAIN = 1.0


class ViaHook(ScaledBase):
    def __init__(self):
        super().__init__()
        self.register_forward_hook(lambda mod, args, out: out * GAIN)

    def forward(self, x):
        return self.lin(x)


class Steer:
    def __init__(self):
        self.scale = 1.0

    def __call__(self, mod, args, out):
        return out * self.scale


class ViaHookObject(ScaledBase):
    def __init__(self):
        super().__init__()
        self.steer = Steer()
        self.register_forward_hook(self.steer)

    def forward(self, x):
        return self.lin(x)


class Options:
    def __init__(self):
        self.use_bias, self.use_gate = True, False


class ReadsOptionsByName(ScaledBase):
    def __init__(self):
        super().__init__()
        self.opts = Options()

    def forward(self, x):
        y = self.lin(x) if self.opts.use_bias else x
        return y * 2 if getattr(self.opts, "use_" + "gate") else y


def _set_gain():
    global GAIN
    GAIN = 5.0


@pytest.mark.parametrize("cls, edit, said", [
    (ViaSuper, lambda m: setattr(m, "alpha", 5.0), "'alpha' changed"),
    (ViaBaseCall, lambda m: setattr(m, "alpha", 5.0), "'alpha' changed"),
    (ViaHelper, lambda m: setattr(m, "alpha", 5.0), "'alpha' changed"),
    (ViaProperty, lambda m: setattr(m, "_scale", 5.0), "'_scale' changed"),
    (ViaHook, lambda m: _set_gain(), "global 'GAIN' changed"),
    (ViaHookObject, lambda m: setattr(m.steer, "scale", 5.0), "hook Steer.scale' changed"),
    (ReadsOptionsByName, lambda m: setattr(m.opts, "use_gate", True), "'opts.use_gate' changed"),
], ids=["super-forward", "base-forward-called", "helper-given-self", "property", "hook-reads-a-global",
        "hook-object-setting", "field-read-by-name"])
def test_settings_reached_other_than_as_self_name_in_forward_are_watched(monkeypatch, cls, edit, said):
    """A graph bakes in what the base class's forward, a helper given the module, a property, a forward hook or a
    getattr by name read: changing it re-plans (before, none of these was seen, even by refresh())."""
    monkeypatch.setitem(globals(), "GAIN", 1.0)
    model, x = cls().eval(), torch.randn(2, 4)
    _replans(model, x, lambda: edit(model), said, lambda: _expect_containers(model, x))


def test_functional_call_through_the_optimized_module_uses_the_parameters_given():
    """functional_call swaps parameters by writing ``_parameters`` directly (no registration hook): the swap is
    counted, so the call re-plans, and the next plain call goes back to the model's own parameters."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).eval(), torch.randn(2, 4)
    om = _quiet(optimize, model, x, strategy="opara", graphs=FakeGraphs(kernels=True))
    _quiet(om, x)
    _quiet(om, x)
    new = {k: torch.randn_like(v) for k, v in model.named_parameters()}
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        got = torch.func.functional_call(om, {"original." + k: v for k, v in new.items()}, (x,))
    assert any("model changed" in str(w.message) for w in told), [str(w.message) for w in told]
    with torch.no_grad():
        torch.testing.assert_close(got, torch.func.functional_call(model, new, (x,)))
        torch.testing.assert_close(_quiet(om, x), model(x))


def test_kernel_replays_return_what_a_gpu_would_for_a_change_no_guard_sees(monkeypatch):
    """The test double these tests replay with (``FakeGraphs(kernels=True)``) is faithful: a change only
    ``om.refresh()`` sees (a value written into the instance ``__dict__`` directly, as documented) gives the stale
    result a CUDA graph would, and the refresh gives the right one. (The plain ``FakeGraphs`` reruns the model's
    Python under dynamo's guards, so it would return the right result here and prove nothing.)"""
    monkeypatch.setattr(Base, "alpha", 2.0)
    model, x = Base().eval(), torch.randn(2, 4)
    om = _quiet(optimize, model, x, strategy="opara", graphs=FakeGraphs(kernels=True))
    stale = _quiet(om, x)
    model.__dict__["alpha"] = 9.0
    with torch.no_grad():
        now = model(x)
    torch.testing.assert_close(_quiet(om, x), stale)
    assert not torch.allclose(stale, now)
    _quiet(om.refresh)
    torch.testing.assert_close(_quiet(om, x), now)


# ---------------------------------------------------------------------------------------------- the ninth sweep

class Act(enum.Enum):
    RELU = 1
    TANH = 2


MODE = Act.RELU
ACTIVATION = functools.partial(nn.functional.leaky_relu, negative_slope=0.1)
NORM = nn.Tanh


class ReadsGlobalsOfEveryKind(nn.Module):
    """Globals that are neither plain values nor plain functions: an enum member, a partial, a class."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = ACTIVATION(self.fc(x))
        return NORM()(y) if MODE is Act.RELU else y * 3


@pytest.mark.parametrize("name, value", [("MODE", Act.TANH),
                                         ("ACTIVATION", functools.partial(nn.functional.leaky_relu,
                                                                          negative_slope=0.5)),
                                         ("NORM", nn.ReLU)], ids=["enum", "partial", "class"])
def test_a_global_of_any_kind_rebound_is_replanned(monkeypatch, name, value):
    """Re-running the cell that defines it rebinds the name: watched by identity (only Python modules are not)."""
    model, x = ReadsGlobalsOfEveryKind().eval(), torch.randn(2, 4)
    _replans(model, x, lambda: monkeypatch.setitem(globals(), name, value), f"global '{name}'",
             lambda: _expect_containers(model, x))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = 2


class ReadsChildSettings(nn.Module):
    """A parent reading its children's settings: a head count, a dropout's p, a class-level enum."""

    act = Act.RELU

    def __init__(self):
        super().__init__()
        self.fc, self.attn, self.drop = nn.Linear(4, 4), Attention(), nn.Dropout(0.0)

    def forward(self, x):
        y = self.fc(x).reshape(x.shape[0], self.attn.heads, -1).flatten(1) * (1 - self.drop.p)
        return y.relu() if self.act is Act.RELU else y.tanh()


@torch.no_grad()
def _helper_scaled(x):
    return x * SCALE


class CallsADecoratedHelper(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = _helper_scaled(self.fc(x))
        return y + (1.0 if getattr(self, "use_offset", False) else 0.0)


@pytest.mark.parametrize("edit, said", [
    (lambda m: setattr(m.attn, "heads", 4), "'attn.heads' changed"),
    (lambda m: setattr(m.drop, "p", 0.5), "'drop.p' changed"),
], ids=["child-setting", "torch-child-setting"])
def test_a_childs_setting_the_parent_reads_is_watched(edit, said):
    model, x = ReadsChildSettings().eval(), torch.randn(2, 4)
    _replans(model, x, lambda: edit(model), said, lambda: _expect_containers(model, x))


def test_a_class_level_enum_is_watched(monkeypatch):
    model, x = ReadsChildSettings().eval(), torch.randn(2, 4)
    _replans(model, x, lambda: monkeypatch.setattr(ReadsChildSettings, "act", Act.TANH), "'act' changed",
             lambda: _expect_containers(model, x))


def test_getattr_with_a_literal_name_reads_the_attribute_even_while_absent():
    model, x = CallsADecoratedHelper().eval(), torch.randn(2, 4)
    _replans(model, x, lambda: setattr(model, "use_offset", True), "'use_offset' changed",
             lambda: _expect_containers(model, x))


def test_globals_of_a_helper_called_through_a_decorator_are_watched(monkeypatch):
    model, x = CallsADecoratedHelper().eval(), torch.randn(2, 4)
    _replans(model, x, lambda: monkeypatch.setitem(globals(), "SCALE", 7.0), "global 'SCALE' changed",
             lambda: _expect_containers(model, x))


@pytest.mark.parametrize("edit", [
    lambda m: setattr(m[0], "bias", None),
    lambda m: (delattr(m[0], "weight"), setattr(m[0], "weight", torch.randn(4, 4))),
    lambda m: m.insert(1, nn.Tanh()),
    lambda m: m.__delitem__(1),
], ids=["parameter-set-to-none", "parameter-deleted-and-rebound", "sequential-insert", "sequential-delete"])
def test_module_edits_no_registration_hook_sees_are_counted(edit):
    """Setting a parameter to None, deleting one, and a container's insert or delete write the module's dicts
    without a registration hook: counted, so the next call re-plans."""
    model, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).eval(), torch.randn(2, 4)
    _replans(model, x, lambda: edit(model), "model changed", lambda: _expect_containers(model, x))


class ScaledByDefault(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, scale=2.0):
        return self.lin(x) * scale


def test_defaults_of_a_forward_replaced_in_place_are_replanned(monkeypatch):
    """``Block.forward.__defaults__ = (5.0,)``: the graph baked in the old default."""
    model, x = ScaledByDefault().eval(), torch.randn(2, 4)
    _replans(model, x, lambda: monkeypatch.setattr(ScaledByDefault.forward, "__defaults__", (5.0,)),
             "the defaults of 'ScaledByDefault.forward' were replaced", lambda: _expect_containers(model, x))


class OverridesWithoutSuper(ViaSuper):
    """Overrides ``forward`` and never runs its bases': what they read is no reason to re-plan."""

    def forward(self, x):
        return self.lin(x) * 3


def test_a_base_classs_reads_are_not_watched_for_an_override_that_never_runs_it():
    model, x = OverridesWithoutSuper().eval(), torch.randn(2, 4)
    om = _quiet(optimize, model, x, strategy="opara", graphs=FakeGraphs(kernels=True))
    _quiet(om, x)
    model.alpha = 7.0  # read by ScaledBase.forward only
    with warnings.catch_warnings():
        warnings.simplefilter("error", OparaNotice)
        torch.testing.assert_close(om(x), _expect_containers(model, x))


def test_a_snapshot_of_a_flat_container_compares_members_by_identity_and_plain_values_by_value():
    from opara_nb.capture.values import Snapshot

    registry = {"relu": torch.relu, "scale": 2.0, "tanh": torch.tanh}
    kept = Snapshot(registry)
    assert kept == dict(registry)  # the same members
    assert kept == {**registry, "scale": float("2.0")}  # an equal plain value, another object
    assert not kept == {**registry, "relu": torch.sigmoid}  # a member replaced
    assert not kept == {"tanh": torch.tanh, "relu": torch.relu, "scale": 2.0}  # the same items in another order
    assert not kept == [*registry.values()]


def test_a_package_installed_outside_site_packages_is_library_code(tmp_path, monkeypatch):
    """``pip install --target DIR`` (or a wheel unpacked on PYTHONPATH): its classes are a library's, whose settings
    are fixed at construction (watched on refresh), not the user's (watched per call, at a cost per call)."""
    from opara_nb.capture import reads

    (tmp_path / "fakelib_opara").mkdir()
    (tmp_path / "fakelib_opara" / "__init__.py").write_text("import torch\nclass Net(torch.nn.Module):\n    pass\n")
    info = tmp_path / "fakelib_opara-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakelib-opara\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("fakelib_opara\n")
    (info / "RECORD").write_text("fakelib_opara/__init__.py,,\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reads._distribution_roots.cache_clear()
    reads._library_module.cache_clear()
    try:
        import fakelib_opara

        assert reads.from_a_library(fakelib_opara.Net)
        assert not reads.from_a_library(ScaledBase)  # this file: the user's own code
    finally:
        sys.modules.pop("fakelib_opara", None)
        reads._distribution_roots.cache_clear()
        reads._library_module.cache_clear()


# ---------------------------------------------------------------------------------------------- closures and partials

def _factory_model():
    cfg = {"s": 2.0}

    class Built(nn.Module):  # a class made in a factory: its forward closes over cfg
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) * cfg["s"]

    return Built().eval(), lambda: cfg.__setitem__("s", 5.0)


def _make_act(slope):
    box = [slope]

    def act(t):
        return torch.nn.functional.leaky_relu(t, box[0])

    act.box = box
    return act


ACT = _make_act(0.1)


class UsesAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return ACT(self.a(x) - 0.5)


def _helper_closure_model():
    return UsesAct().eval(), lambda: ACT.box.__setitem__(0, 0.9)


def _hook_closure_model():
    model, gain = UsesAct().eval(), [2.0]
    model.a.register_forward_hook(lambda m, i, o: o * gain[0])
    return model, lambda: gain.__setitem__(0, 5.0)


def _scaled(gains, module, inputs, output):
    return output * gains[0]


def _partial_hook_model():
    model, gains = UsesAct().eval(), [2.0]
    model.a.register_forward_hook(functools.partial(_scaled, gains))
    return model, lambda: gains.__setitem__(0, 3.0)


def _times(t, cfg):
    return t * cfg["s"]


class HoldsAPartial(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.act = functools.partial(_times, cfg={"s": 2.0})

    def forward(self, x):
        return self.act(self.a(x))


def _partial_attribute_model():
    model = HoldsAPartial().eval()
    return model, lambda: model.act.keywords["cfg"].__setitem__("s", 5.0)


def _nonlocal_hook_model():
    model, k = UsesAct().eval(), 2.0

    def hook(m, i, o):
        return o * k

    def set_k():
        nonlocal k
        k = 7.0

    model.a.register_forward_hook(hook)
    return model, set_k


@pytest.mark.parametrize("make", [_factory_model, _helper_closure_model, _hook_closure_model, _partial_hook_model,
                                  _partial_attribute_model, _nonlocal_hook_model],
                         ids=["factory class", "helper closure", "hook closure", "partial hook", "partial attribute",
                              "nonlocal"])
def test_values_reached_through_closures_and_partials_are_watched_for_module_models(make):
    """A callable model's closures were watched; a module model's hooks, methods and helpers were not."""
    model, edit = make()
    x = torch.randn(2, 4)
    _replans(model, x, edit, "", lambda: model(x))


class Tables:
    def __init__(self):
        self.scale, self.pos = 2.0, torch.ones(4)


class ReadsTables(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.tables = nn.Linear(4, 4), Tables()

    def forward(self, x):
        return self.fc(x) * self.tables.scale + self.tables.pos


def test_a_tensor_field_of_a_settings_object_is_watched_by_identity():
    model, x = ReadsTables().eval(), torch.randn(2, 4)
    _replans(model, x, lambda: setattr(model.tables, "pos", torch.full((4,), 10.0)), "pos", lambda: model(x))


class ScalesInCall(nn.Module):
    """Overrides ``__call__`` (around nn.Module's) and reads a setting there."""

    def __init__(self):
        super().__init__()
        self.lin, self.k = nn.Linear(4, 4), 2.0

    def __call__(self, x):
        return super().__call__(x) * self.k

    def forward(self, x):
        return self.lin(x)


def test_a_setting_read_in_an_overridden_call_is_watched():
    model, x = nn.Sequential(ScalesInCall(), nn.ReLU()).eval(), torch.randn(2, 4)
    _replans(model, x, lambda: setattr(model[0], "k", 5.0), "k", lambda: model(x))
