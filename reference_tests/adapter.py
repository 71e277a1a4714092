"""The single door through which the reference tests reach the implementation under test.

The tests never import an implementation. They write ``from adapter import ops, quant`` (or
``import adapter``) and this module hands them the names of the *selected* implementation:

    pytest reference_tests --impl package.module      # or a path: --impl path/to/my_adapter.py
    MINIBVIT_IMPL=package.module pytest reference_tests

The default is minibvit's own adapter, ``reference_tests/impls/minibvit_impl.py``. The selected
module provides the contract names documented in docs/conformance.md ("The adapter contract"):
namespaces (``ops``, ``quant``, ``methods``, ``schemes``, ``kernels``, ``engine``, ...) and top-level
names (``ViTConfig``, ``build_vit``, ``AdamW``, ...), plus an optional ``PARAM_NAMES`` map.

What this door adds on top of a plain re-export:
- A name the implementation lacks is handed out as a placeholder; the first test that uses it is
  *skipped* with a reason naming the missing name (no collection error for the whole file).
- A function that raises ``NotImplementedError`` (an option the implementation does not offer, e.g.
  GSB ``mode="principled"``) skips the test and names the function and the message.
- Every use of an implementation name during a test is recorded (``used_names()``), so conftest can
  refuse to report a test green that never reached the implementation.
- ``PARAM_NAMES`` ({contract name: implementation name}, or a function of the built model returning
  it) lets a model keep its own parameter names; ``build_vit`` then hands the tests a model that
  speaks the contract names (state_dict, load_state_dict, grads).
"""
import functools
import importlib
import importlib.util
import os
import sys
import types

MINIBVIT_IMPL = "impls.minibvit_impl"
ALIASES = {"minibvit": MINIBVIT_IMPL}

_state = {"name": None, "module": None, "used": set(), "profile": None}


def _skip(reason):
    import pytest

    pytest.skip(reason)


def _load(name):
    if name.endswith(".py") or os.sep in name:
        path = os.path.abspath(name)
        if not os.path.isfile(path):
            raise ImportError(f"--impl {name}: no such file")
        modname = "impl_" + os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(modname, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(name)


def select(name=None):
    """Import the implementation ``name`` (default: $MINIBVIT_IMPL, else minibvit's adapter)."""
    name = name or os.environ.get("MINIBVIT_IMPL") or MINIBVIT_IMPL
    name = ALIASES.get(name, name)
    if _state["name"] == name:
        return _state["module"]
    _state["module"] = _load(name)
    _state["name"] = name
    return _state["module"]


def impl_name():
    select()
    return _state["name"]


def is_minibvit():
    return impl_name() == MINIBVIT_IMPL


def set_profile(profile):
    """conftest sets the convention profile in force (--profile), a profiles.Profile."""
    _state["profile"] = profile


def profile():
    """The convention profile the references follow (see minibvit/conformance/profiles.py)."""
    if _state["profile"] is None:
        raise RuntimeError("no convention profile selected: run the tests through pytest (conftest sets it)")
    return _state["profile"]


def used_names():
    """The contract names used since the last ``reset_used()``."""
    return set(_state["used"])


def reset_used():
    _state["used"].clear()


def _lacks(path):
    return (f"implementation {impl_name()} does not provide {path!r} "
            f"(adapter contract: docs/conformance.md)")


class Missing:
    """Stands for a contract name the implementation lacks: using it skips the test, naming it."""

    def __init__(self, path):
        object.__setattr__(self, "_path", path)

    def __getattr__(self, attr):
        if attr.startswith("_"):
            raise AttributeError(attr)
        return Missing(f"{self._path}.{attr}")

    def __call__(self, *args, **kwargs):
        _skip(_lacks(self._path))

    def __iter__(self):
        _skip(_lacks(self._path))

    def __getitem__(self, key):
        _skip(_lacks(self._path))

    def __bool__(self):
        _skip(_lacks(self._path))

    def __repr__(self):
        return f"<missing {self._path}>"


def _recorded(fn, path):
    """fn, recording each call and turning NotImplementedError into a skip that names fn."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        _state["used"].add(path)
        try:
            return fn(*args, **kwargs)
        except NotImplementedError as e:
            _skip(f"implementation {impl_name()} does not implement {path} for these arguments: {e}")

    call._adapter_recorded = fn
    return call


class ClassProxy:
    """A class of the implementation: constructing it is recorded, NotImplementedError skips (an
    option it does not offer); every other attribute is the class's own."""

    def __init__(self, cls, path):
        object.__setattr__(self, "_cls", cls)
        object.__setattr__(self, "_path", path)

    def __call__(self, *args, **kwargs):
        return _recorded(self._cls, self._path)(*args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self._cls, attr)

    def __repr__(self):
        return repr(self._cls)


def _hand_out(obj, path):
    if isinstance(obj, (types.ModuleType, types.SimpleNamespace, Namespace)):
        return Namespace(path, obj)
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, functools.partial)):
        return _recorded(obj, path)
    if isinstance(obj, type) and not issubclass(obj, BaseException):  # exception classes go to pytest.raises
        return ClassProxy(obj, path)
    return obj


class Namespace:
    """A namespace of the implementation (module or SimpleNamespace): attribute access is recorded,
    missing attributes become ``Missing`` placeholders."""

    __slots__ = ("_path", "_obj")

    def __init__(self, path, obj):
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_obj", obj)

    @property
    def __dict__(self):  # what monkeypatch saves and restores: the implementation's own attributes
        return vars(self._obj)

    def __getattr__(self, attr):
        path = f"{self._path}.{attr}"
        try:
            obj = getattr(self._obj, attr)
        except AttributeError:
            if attr.startswith("_"):
                raise
            return Missing(path)
        _state["used"].add(path)
        return _hand_out(obj, path)

    def __setattr__(self, attr, value):  # monkeypatch.setattr(ops, ...) patches the implementation
        setattr(self._obj, attr, getattr(value, "_adapter_recorded", value))

    def __delattr__(self, attr):
        delattr(self._obj, attr)

    def __repr__(self):
        return f"<{impl_name()}: {self._path}>"


class RenamedModel:
    """A model whose parameters carry the implementation's names, seen through the contract names."""

    def __init__(self, model, names):
        self._model, self._to_impl = model, dict(names)
        self._to_contract = {v: k for k, v in names.items()}

    def _contract(self, d):
        return {self._to_contract.get(k, k): v for k, v in d.items()}

    def load_state_dict(self, state, *args, **kwargs):
        return self._model.load_state_dict({self._to_impl.get(k, k): v for k, v in state.items()}, *args, **kwargs)

    def state_dict(self):
        return self._contract(self._model.state_dict())

    @property
    def grads(self):
        return self._contract(self._model.grads)

    def parameters(self):
        params = self._model.parameters()
        return self._contract(params) if isinstance(params, dict) else params

    def __getattr__(self, attr):
        return getattr(self._model, attr)


def build_vit(*args, **kwargs):
    impl = select()
    if not hasattr(impl, "build_vit"):
        _skip(_lacks("build_vit"))
    _state["used"].add("build_vit")
    model = _recorded(impl.build_vit, "build_vit")(*args, **kwargs)
    names = getattr(impl, "PARAM_NAMES", None)
    if callable(names):
        names = names(model)
    return RenamedModel(model, names) if names else model


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    impl = select()
    if not hasattr(impl, name):
        return Missing(name)
    return _hand_out(getattr(impl, name), name)
