"""Worked example 3: the official GSB code (github.com/IMRL/GSB-Vision-Transformer, MIT) under test,
imported from the user's own checkout. Nothing of it is copied here.

    GSB_OFFICIAL_DIR=/path/to/GSB-Vision-Transformer \\
        python -m pytest reference_tests --impl impls.gsb_official -m gsb --profile gsb-official

It adapts the official quantizers of ``quant_new_new.py`` to the contract (NumPy in, NumPy out):
``ElasticQuantQKV`` (GSB value quantizer), ``ElasticQuantAttention`` (GSB attention quantizer), their
``AlphaInit`` initialisation, and the 1-bit elastic binarizers. The official code offers only GSB's
``mode="official"`` and the per-tensor maximum, so other options raise NotImplementedError (the tests
are then skipped, naming them). Each official call gets fresh ``AlphaInit`` parameters, marked
initialised when the test gives the scales, uninitialised (value 1.0) when the test asks for the
initialisation, exactly as the official model starts.
"""
import importlib
import os
import sys
import types

import numpy as np
import torch

_DIR = os.environ.get("GSB_OFFICIAL_DIR")
if not _DIR or not os.path.isfile(os.path.join(_DIR, "quant_new_new.py")):
    raise ImportError("impls.gsb_official: set GSB_OFFICIAL_DIR to your checkout of "
                      "github.com/IMRL/GSB-Vision-Transformer (the directory holding quant_new_new.py); "
                      f"got {_DIR!r}")
sys.path.insert(0, os.path.abspath(_DIR))
_official = importlib.import_module("quant_new_new")


def _need(condition, what):
    if not condition:
        raise NotImplementedError(f"the official GSB code has no {what}")


def _alphas(values, dtype, initialized=True):
    """Three official AlphaInit scales: given values (initialised) or 1.0 awaiting their init."""
    out = []
    for v in (values if values is not None else (1.0, 1.0, 1.0)):
        p = _official.AlphaInit(torch.tensor(float(v), dtype=dtype))
        p.initialized = initialized
        out.append(p)
    return out


def _torch_dtype(x):
    return torch.float64 if x.dtype == np.float64 else torch.float32


def _grads(out, inputs, dout):
    grads = torch.autograd.grad(out, inputs, torch.from_numpy(np.ascontiguousarray(dout, dtype=out.detach().numpy().dtype)),
                                allow_unused=True)
    return [np.zeros(t.shape, dtype=out.detach().numpy().dtype) if g is None else g.detach().numpy() for g, t in zip(grads, inputs)]



# --------------------------------------------------------------------------------------------
# GSB value quantizer: ElasticQuantQKV, num_bits = 1

def gsb_value_forward(v, alphas, mode="official"):
    _need(mode == "official", f"GSB mode {mode!r} (only 'official')")
    vt = torch.tensor(v, requires_grad=True)
    a = _alphas(alphas, _torch_dtype(v))
    out = _official.ElasticQuantQKV.apply(vt, *a, 1, True)
    return out.detach().numpy(), (vt, a, out)


def gsb_value_backward(dout, cache):
    vt, a, out = cache
    dv, *da = _grads(out, [vt, *a], dout)
    return dv, np.array([float(d) for d in da], dtype=dv.dtype)


def gsb_value_masks(v):
    """(T1, T2) as booleans. The official code builds them inline in ElasticQuantQKV.forward; this is
    that expression, evaluated with torch on the same input."""
    vt = torch.tensor(v)
    t1 = (vt > 0.7 * vt.max()).float() + (vt < 0.7 * vt.min()).float()
    t2 = (vt > 0.9 * vt.max()).float() + (vt < 0.9 * vt.min()).float()
    return t1.numpy() > 0, t2.numpy() > 0


def _init(function, x):
    a = _alphas(None, _torch_dtype(x), initialized=False)
    try:
        function.apply(torch.tensor(x), *a, 1, True)
    except ZeroDivisionError:  # raised after the init stored its values (empty group)
        pass
    return np.array([float(p.detach()) for p in a], dtype=x.dtype)


def gsb_value_init(v):
    return _init(_official.ElasticQuantQKV, v)


# --------------------------------------------------------------------------------------------
# GSB attention quantizer: ElasticQuantAttention, num_bits = 1

def gsb_attn_forward(a, alphas, mode="official", max_over="tensor"):
    _need(mode == "official", f"GSB mode {mode!r} (only 'official')")
    _need(max_over == "tensor", f"max_over={max_over!r} (only the per-tensor maximum)")
    at = torch.tensor(a, requires_grad=True)
    al = _alphas(alphas, _torch_dtype(a))
    out = _official.ElasticQuantAttention.apply(at, *al, 1, True)
    return out.detach().numpy(), (at, al, out)


gsb_attn_backward = gsb_value_backward


def gsb_attn_init(a, max_over="tensor"):
    _need(max_over == "tensor", f"max_over={max_over!r} (only the per-tensor maximum)")
    return _init(_official.ElasticQuantAttention, a)


# --------------------------------------------------------------------------------------------
# wrappers with learnable shift / bias (the official model's move_v / move_att add a bias; the
# contract's shift is subtracted, so shift = -bias)

class _Wrapper:
    function = None
    shift_sign = 1.0

    def __init__(self, shape, dtype):
        self.dtype = np.dtype(dtype)
        self.params = {self.shift_name: np.zeros(shape, self.dtype), "alpha": np.full(3, np.nan, self.dtype)}
        self.buffers = {}
        self._alphas = _alphas(None, torch.float64 if self.dtype == np.float64 else torch.float32, initialized=False)

    def _shifted(self, xt, shift_t):
        raise NotImplementedError

    def forward(self, x, training):
        if not self._alphas[0].initialized and not training:
            raise ValueError("not initialised: run a training forward first")
        if self._alphas[0].initialized:
            with torch.no_grad():
                for p, v in zip(self._alphas, self.params["alpha"]):
                    p.copy_(torch.tensor(float(v)))
        xt = torch.tensor(x, requires_grad=True)
        shift_t = torch.tensor(self.params[self.shift_name], requires_grad=True)
        out = self.function.apply(self._shifted(xt, shift_t), *self._alphas, 1, True)
        self.params["alpha"][...] = [float(p.detach()) for p in self._alphas]  # the stored (initial) values
        return out.detach().numpy(), (xt, shift_t, out)

    def backward(self, dout, cache):
        xt, shift_t, out = cache
        dx, dshift, *da = _grads(out, [xt, shift_t, *self._alphas], dout)
        return dx, {self.shift_name: dshift, "alpha": np.array([float(d) for d in da], dtype=dx.dtype)}


class GSBValueQuantizer(_Wrapper):
    function = _official.ElasticQuantQKV
    shift_name = "shift"

    def __init__(self, heads, head_dim, mode="official", dtype=np.float32):
        _need(mode == "official", f"GSB mode {mode!r} (only 'official')")
        super().__init__((heads, head_dim), dtype)

    def _shifted(self, vt, shift_t):
        bias = -shift_t[:, None, :]  # move_v: bias of shape (heads, 1, head_dim), added
        return vt + bias.expand_as(vt)


class GSBAttnQuantizer(_Wrapper):
    function = _official.ElasticQuantAttention
    shift_name = "bias"

    def __init__(self, heads, tokens, mode="official", max_over="tensor", dtype=np.float32):
        _need(mode == "official", f"GSB mode {mode!r} (only 'official')")
        _need(max_over == "tensor", f"max_over={max_over!r} (only the per-tensor maximum)")
        super().__init__((heads, tokens, tokens), dtype)

    def _shifted(self, at, bias_t):
        return at + bias_t.expand_as(at)  # move_att


methods = types.SimpleNamespace(
    gsb_value_forward=gsb_value_forward, gsb_value_backward=gsb_value_backward, gsb_value_masks=gsb_value_masks,
    gsb_value_init=gsb_value_init, gsb_attn_forward=gsb_attn_forward, gsb_attn_backward=gsb_attn_backward,
    gsb_attn_init=gsb_attn_init, GSBValueQuantizer=GSBValueQuantizer, GSBAttnQuantizer=GSBAttnQuantizer,
)


# --------------------------------------------------------------------------------------------
# the 1-bit elastic binarizers (ElasticQuantBinarizerSigned / Unsigned) and torch.sign

def elastic_binarize_forward(x, alpha, signed, alpha_grad="lsq"):
    _need(not signed or alpha_grad == "gsb", "signed elastic binarizer with BiT's 'lsq' scale gradient "
          "(its signed binarizer has GSB's)")
    xt = torch.tensor(x, requires_grad=True)
    (a,) = _alphas(np.asarray(alpha).reshape(-1)[:1], _torch_dtype(x))
    fn = _official.ElasticQuantBinarizerSigned if signed else _official.ElasticQuantBinarizerUnsigned
    out = fn.apply(xt, a, 1, True)
    return out.detach().numpy(), (xt, a, out)


def elastic_binarize_backward(dout, cache):
    xt, a, out = cache
    dx, da = _grads(out, [xt, a], dout)
    return dx, np.array([float(da)], dtype=dx.dtype)


def elastic_alpha_init(x, signed):
    (a,) = _alphas(None, _torch_dtype(x), initialized=False)[:1]
    a.initialize_wrapper(torch.tensor(x), 1, symmetric=signed, init_method="default")
    return np.array([float(a.detach())], dtype=x.dtype)


def sign(x):
    return torch.sign(torch.tensor(x)).numpy()


quant = types.SimpleNamespace(elastic_binarize_forward=elastic_binarize_forward,
                              elastic_binarize_backward=elastic_binarize_backward,
                              elastic_alpha_init=elastic_alpha_init, sign=sign)


# --------------------------------------------------------------------------------------------
# the official model's parameter names (docs/conformance.md, "GSB: minibvit's variant")

def official_deit_parameter_names(embed_dim=12, depth=2, heads=3, image_size=12, patch_size=4, num_classes=5):
    """Names of the parameters of the official lowbit_VisionTransformer (One_bit_vit_new.py, distilled,
    1-bit) for a small configuration. timm, which that file imports for helpers only, is replaced by
    minimal stand-ins when it is not installed."""
    try:
        import timm  # noqa: F401
    except ImportError:
        def stub(name, **attrs):
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules.setdefault(name, module)

        class DropPath(torch.nn.Module):
            def __init__(self, p=0.0):
                super().__init__()

            def forward(self, x):
                return x

        stub("timm")
        stub("timm.data", IMAGENET_DEFAULT_MEAN=(0.485, 0.456, 0.406), IMAGENET_DEFAULT_STD=(0.229, 0.224, 0.225))
        stub("timm.models")
        stub("timm.models.helpers", load_pretrained=None)
        stub("timm.models.layers")
        stub("timm.models.layers.drop", DropPath=DropPath)
        stub("timm.models.layers.helpers", to_2tuple=lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x))
        stub("timm.models.layers.weight_init", trunc_normal_=torch.nn.init.trunc_normal_)
        stub("timm.models.registry", register_model=lambda f: f)
    model_module = importlib.import_module("One_bit_vit_new")
    config = types.SimpleNamespace(hidden_size=embed_dim, num_attention_heads=heads, input_size=image_size,
                                   clip_init_val=2.5, weight_bits=1, input_bits=1, weight_layerwise=True,
                                   input_layerwise=True, weight_quant_method="bwn", input_quant_method="elastic",
                                   learnable_scaling=True, sym_quant_qkvo=True)
    model = model_module.lowbit_VisionTransformer(config, patch_size=patch_size, in_chans=3, num_classes=num_classes,
                                                  depth=depth, mlp_ratio=2, qkv_bias=True, distilled=True)
    return [name for name, _ in model.named_parameters()]
