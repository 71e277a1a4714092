"""Build the golden cases: inputs from fixed seeds, expected outputs from the PyTorch references.

The expected values are computed in float64 by the tests' independent PyTorch code
(``reference_tests/torch_reference.py``, ``reference_tests/torch_quant.py``, torch.nn.functional),
never by minibvit. minibvit supplies only the method tables (which quantizer sits on which tensor,
written into each model case's attributes), through ``minibvit.conformance.impl``.

This is a developer tool: it needs PyTorch and a repository checkout (for reference_tests/). To make
the files bit-reproducible, the export runs PyTorch single-threaded with its scalar CPU kernels and
MKL's reproducible mode (ATEN_CPU_CAPABILITY=default, MKL_CBWR=COMPATIBLE, set before torch is
imported), so summation orders do not depend on the machine's vector width or thread count.
"""
import importlib.util
import math
import os
import sys
import zlib
from types import SimpleNamespace

import numpy as np

from minibvit.conformance import golden, profiles

REPRODUCIBLE_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1",
                    "MKL_NUM_THREADS": "1"}
REFERENCE_DIR = os.path.dirname(os.path.abspath(__file__))

# tolerances (rtol, atol), float64 references
OP_TOL = (1e-10, 1e-12)
QUANT_TOL = (1e-12, 1e-12)  # quantizer outputs are exact levels, gradients short sums
MODEL_TOL = {"logits": (1e-9, 1e-10), "loss": (1e-10, 0.0), "grad": (1e-7, 1e-10), "buffer": (1e-9, 1e-12),
             "after": (1e-7, 1e-9)}

TINY_VIT = dict(image_size=12, patch_size=4, in_chans=3, embed_dim=12, depth=2, num_heads=3, mlp_ratio=2.0,
                num_classes=5, qkv_bias=True, distilled=False, global_pool="token", drop_rate=0.0,
                attn_drop_rate=0.0, drop_path_rate=0.0, gelu_approximate="none", layernorm_eps=1e-6)
MODEL_METHODS = {"fp": {}, "binary": {}, "binaryvit": {}, "tervit": {}, "gsb": {"distilled": True}}
SCHEME_OPTIONS = dict(asm_center="mean", asm_momentum=0.1, gsb_mode="official", gsb_max_over="tensor")
ADAMW = dict(lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.05, steps=10)
LABEL_SMOOTHING = 0.1


# ----------------------------------------------------------------------------------------------
# torch and the references, imported on demand


def _torch():
    """Import torch with the reproducible settings; a clear error if it is missing or was already
    imported without them (the settings must be in place before torch loads)."""
    if "torch" not in sys.modules:
        os.environ.update(REPRODUCIBLE_ENV)
    elif any(os.environ.get(k) != v for k, v in REPRODUCIBLE_ENV.items()):
        raise RuntimeError("export must run in a fresh process (torch is already imported without "
                           f"{REPRODUCIBLE_ENV}); run `python -m minibvit.conformance export DIR`")
    try:
        import torch
    except ImportError:
        raise ImportError("exporting golden files needs PyTorch (a developer dependency, not a runtime one): "
                          "pip install torch==2.13.0") from None
    torch.set_num_threads(1)
    return torch


def _reference(name):
    """reference_tests/<name>.py, loaded by path (the references import nothing from minibvit)."""
    path = os.path.join(REFERENCE_DIR, f"{name}.py")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: export needs a minibvit repository checkout with reference_tests/")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# ----------------------------------------------------------------------------------------------
# a case


def _rng(name):
    return np.random.default_rng(zlib.crc32(name.encode()))


def _np(t):
    return t.detach().cpu().numpy().copy()


def _leaf(torch, a):
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64, requires_grad=True)


def make_case(name, kind, op, attrs, inputs, outputs, tol, description, profile=profiles.DEFAULT_PROFILE):
    """A case: manifest entry and its tensors. tol: (rtol, atol) for every output, or a callable
    output name -> (rtol, atol)."""
    tol_of = tol if callable(tol) else (lambda _: tol)
    clash = set(inputs) & set(outputs)
    if clash:
        raise ValueError(f"case {name}: names used as both input and output: {sorted(clash)}")
    entry = {
        "name": name, "file": f"{name}.safetensors", "kind": kind, "op": op, "attrs": attrs,
        "profile": profile, "description": description,
        "inputs": {k: _spec(v) for k, v in sorted(inputs.items())},
        "outputs": {k: {**_spec(v), "rtol": tol_of(k)[0], "atol": tol_of(k)[1]} for k, v in sorted(outputs.items())},
    }
    return entry, {**inputs, **outputs}


def _spec(a):
    a = np.asarray(a)
    return {"dtype": str(a.dtype), "shape": list(a.shape)}


# ----------------------------------------------------------------------------------------------
# ops


def op_cases(torch):
    F = torch.nn.functional
    cases = []

    def add(name, op, attrs, inputs, fn, description, tol=OP_TOL):
        """A case whose expected outputs are fn(inputs) -> {output: array}."""
        cases.append(make_case(name, "op", op, attrs, inputs, fn(inputs), tol, description))

    def autograd(inputs, forward, grad_inputs, dout_name="dout", out_name="out"):
        """{out_name: forward(tensors), d<name>: gradient of sum(out * dout) for each name of grad_inputs}
        (of out itself, a scalar loss, when dout_name is None)."""
        leaves = {k: _leaf(torch, v) if k in grad_inputs else torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
        out = forward(leaves)
        if dout_name is None:
            out.backward()
        else:
            out.backward(leaves[dout_name])
        return {out_name: _np(out), **{f"d{k}": _np(leaves[k].grad) for k in grad_inputs}}

    r = _rng("op.linear")
    ins = dict(x=r.standard_normal((2, 3, 4)), w=r.standard_normal((5, 4)), b=r.standard_normal(5),
               dout=r.standard_normal((2, 3, 5)))
    add("op.linear", "linear", {}, ins, lambda i: autograd(i, lambda t: F.linear(t["x"], t["w"], t["b"]), ["x", "w", "b"]),
        "y = x @ w.T + b; x (2, 3, 4), w (5, 4) PyTorch layout; gradients of sum(y * dout)")
    r = _rng("op.linear_nobias")
    ins = dict(x=r.standard_normal((3, 4)), w=r.standard_normal((2, 4)), dout=r.standard_normal((3, 2)))
    add("op.linear_nobias", "linear", {}, ins, lambda i: autograd(i, lambda t: F.linear(t["x"], t["w"]), ["x", "w"]),
        "y = x @ w.T without bias")

    r = _rng("op.layernorm")
    x = r.standard_normal((4, 7))
    x[0, 0] = 0.0
    x[3] = 0.375  # a constant row: variance 0, only eps keeps it finite
    ins = dict(x=x, gamma=r.standard_normal(7), beta=r.standard_normal(7), dout=r.standard_normal((4, 7)))
    add("op.layernorm", "layernorm", {"eps": 1e-6}, ins,
        lambda i: autograd(i, lambda t: F.layer_norm(t["x"], (7,), t["gamma"], t["beta"], eps=1e-6), ["x", "gamma", "beta"]),
        "LayerNorm over the last axis (biased variance, eps inside the square root); row 3 is constant",
        tol=(1e-9, 1e-9))

    for approximate, op in (("none", "gelu_erf"), ("tanh", "gelu_tanh")):
        r = _rng(f"op.{op}")
        x = np.concatenate([r.standard_normal(12) * 2, [0.0, -0.0, 1e-8, -1e-8, 7.5, -7.5, 30.0, -30.0]])
        ins = dict(x=x.reshape(4, 5), dout=r.standard_normal((4, 5)))
        add(f"op.{op}", "gelu", {"approximate": approximate}, ins,
            lambda i, a=approximate: autograd(i, lambda t: F.gelu(t["x"], approximate=a), ["x"]),
            f"GELU ({'exact erf' if approximate == 'none' else 'tanh approximation'}): x Phi(x)")

    r = _rng("op.softmax")
    x = r.standard_normal((4, 5))
    x[1] = 2.5  # equal entries
    x[2] += 800.0  # large offset: needs the max subtraction
    ins = dict(x=x, dout=r.standard_normal((4, 5)))
    add("op.softmax", "softmax", {"axis": -1}, ins, lambda i: autograd(i, lambda t: torch.softmax(t["x"], -1), ["x"]),
        "softmax over the last axis; row 1 constant, row 2 offset by 800")

    r = _rng("op.attention")
    ins = {k: r.standard_normal((2, 2, 4, 3)) for k in ("q", "k", "v", "dout")}
    add("op.attention", "attention", {}, ins,
        lambda i: autograd(i, lambda t: torch.softmax(t["q"] @ t["k"].transpose(-1, -2) / math.sqrt(3), -1) @ t["v"],
                           ["q", "k", "v"]),
        "O = softmax(Q K^T / sqrt(d)) V, q, k, v (B, H, N, d) = (2, 2, 4, 3)")

    r = _rng("op.patch_embed")
    ins = dict(x=r.standard_normal((2, 3, 8, 8)), w=r.standard_normal((5, 3, 4, 4)), b=r.standard_normal(5),
               dout=r.standard_normal((2, 4, 5)))
    add("op.patch_embed", "patch_embed", {"patch_size": 4}, ins,
        lambda i: autograd(i, lambda t: F.conv2d(t["x"], t["w"], t["b"], stride=4).flatten(2).transpose(1, 2),
                           ["x", "w", "b"]),
        "non-overlapping patch convolution (kernel = stride = 4), tokens (B, N, D) in row-major patch order")

    for distilled in (False, True):
        name = "op.tokens_dist" if distilled else "op.tokens"
        r = _rng(name)
        prefix = 2 if distilled else 1
        ins = dict(x=r.standard_normal((2, 4, 3)), pos_embed=r.standard_normal((1, 4 + prefix, 3)),
                   cls_token=r.standard_normal((1, 1, 3)), dout=r.standard_normal((2, 4 + prefix, 3)))
        if distilled:
            ins["dist_token"] = r.standard_normal((1, 1, 3))

        def tokens(t, distilled=distilled):
            parts = [t["cls_token"].expand(2, -1, -1)] + ([t["dist_token"].expand(2, -1, -1)] if distilled else [])
            return torch.cat(parts + [t["x"]], dim=1) + t["pos_embed"]

        add(name, "tokens", {}, ins,
            lambda i, f=tokens, d=distilled: autograd(i, f, ["x", "pos_embed", "cls_token"] + (["dist_token"] if d else [])),
            "concat(cls_token" + (", dist_token" if distilled else "") + ", x) along tokens, plus pos_embed")

    for mode in ("token", "mean"):
        r = _rng(f"op.pool_{mode}")
        ins = dict(x=r.standard_normal((2, 6, 3)), dout=r.standard_normal((2, 3)))
        add(f"op.pool_{mode}", "pool", {"mode": mode, "num_prefix": 2}, ins,
            lambda i, m=mode: autograd(i, lambda t: t["x"][:, 0] if m == "token" else t["x"][:, 2:].mean(dim=1), ["x"]),
            "class-token pooling x[:, 0]" if mode == "token" else "mean of the patch tokens x[:, num_prefix:]")

    r = _rng("op.residual")
    ins = dict(x=r.standard_normal((2, 3, 4)), y=r.standard_normal((2, 3, 4)), dout=r.standard_normal((2, 3, 4)))
    add("op.residual", "residual", {}, ins, lambda i: autograd(i, lambda t: t["x"] + t["y"], ["x", "y"]), "x + y")

    r = _rng("op.dropout")
    x = r.standard_normal((3, 4, 5))
    keep = (r.random((3, 4, 5)) >= 0.25).astype(np.float64)
    ins = dict(x=x, keep=keep, dout=r.standard_normal((3, 4, 5)))
    add("op.dropout", "dropout", {"p": 0.25}, ins,
        lambda i: autograd(i, lambda t: t["x"] * t["keep"] / (1 - 0.25), ["x"]),
        "inverted dropout with the given mask: out = x * keep / (1 - p), keep in {0, 1}")
    r = _rng("op.drop_path")
    ins = dict(x=r.standard_normal((4, 3, 2)), keep=np.array([1.0, 0.0, 1.0, 1.0]), dout=r.standard_normal((4, 3, 2)))
    add("op.drop_path", "drop_path", {"p": 0.5}, ins,
        lambda i: autograd(i, lambda t: t["x"] * t["keep"][:, None, None] / (1 - 0.5), ["x"]),
        "stochastic depth with the given per-sample mask: out = x * keep[b] / (1 - p)")

    r = _rng("op.cross_entropy")
    ins = dict(logits=r.standard_normal((4, 5)) * 3, labels=np.array([0, 4, 2, 2], dtype=np.int64))
    add("op.cross_entropy", "cross_entropy", {"label_smoothing": 0.1}, ins,
        lambda i: autograd(i, lambda t: F.cross_entropy(t["logits"], t["labels"], label_smoothing=0.1), ["logits"],
                           dout_name=None, out_name="loss"),
        "mean cross-entropy with label smoothing eps: target (1 - eps) onehot + eps / C; dlogits for dloss = 1")
    r = _rng("op.kd_soft")
    ins = dict(student=r.standard_normal((3, 5)) * 2, teacher=r.standard_normal((3, 5)) * 2)
    add("op.kd_soft", "kd_soft", {"temperature": 2.0}, ins,
        lambda i: autograd(i, lambda t: F.kl_div(F.log_softmax(t["student"] / 2.0, -1), F.log_softmax(t["teacher"] / 2.0, -1),
                                                 reduction="batchmean", log_target=True) * 4.0,
                           ["student"], dout_name=None, out_name="loss"),
        "soft distillation tau^2 mean_b KL(softmax(t/tau) || softmax(s/tau)); teacher constant; dstudent for dloss = 1")
    return cases


# ----------------------------------------------------------------------------------------------
# quantizers


def _quant_case(torch, name, spec, make_module, x, params, description, attrs=None, edges=None):
    """Run a torch_quant module: forward on x with the given learnable params and buffers (``params``
    holds both), backward of sum(out * dout). Outputs out, dx, d<param>, <buffer>_after (a running
    buffer after the training forward), and <name>_init: what the first training batch x sets a fresh
    (NaN) scale or buffer to."""
    r = _rng(name)
    dout = r.standard_normal(np.shape(x))
    module = make_module()
    buffers = dict(module.named_buffers())
    with torch.no_grad():
        for k, v in params.items():
            (buffers[k] if k in buffers else getattr(module, k)).copy_(torch.from_numpy(np.asarray(v, dtype=np.float64)))
    xt = _leaf(torch, x)
    out = module(xt)
    out.backward(torch.from_numpy(dout))
    outputs = {"out": _np(out), "dx": _np(xt.grad)}
    for k in params:
        outputs[f"{k}_after" if k in buffers else f"d{k}"] = _np(buffers[k] if k in buffers else getattr(module, k).grad)
    fresh = make_module()
    uninitialised = [k for k, t in [*fresh.named_parameters(), *fresh.named_buffers()] if torch.isnan(t).any()]
    if uninitialised:
        fresh(torch.from_numpy(np.asarray(x, dtype=np.float64)))
        state = {**dict(fresh.named_parameters()), **dict(fresh.named_buffers())}
        outputs.update({f"{k}_init": _np(state[k]) for k in uninitialised if k in params})
    inputs = {"x": np.asarray(x, dtype=np.float64), "dout": dout,
              **{k: np.asarray(v, dtype=np.float64) for k, v in params.items()}}
    full_attrs = {"spec": spec, **(attrs or {})}
    if edges:
        full_attrs["edge_cases"] = edges
    return make_case(name, "quantizer", spec, full_attrs, inputs, outputs, QUANT_TOL, description)


def _assert_edge(cond, what):
    if not cond:
        raise AssertionError(f"golden edge case not realised: {what}")


def quant_cases(torch):
    tq = _reference("torch_quant")
    cases = []
    # sign with the clipped STE: exact zeros, |x| exactly 1 (inside), just outside
    x = np.array([[0.0, -0.0, 1.0, -1.0, 1.0 + 2**-52, -1.0 - 2**-52], [0.5, -0.5, 3.0, -3.0, 1e-300, -1e-300]])
    cases.append(_quant_case(torch, "quant.sign", "sign", tq.SignBinarizer, x, {},
                             "sign(x) with sign(0) = +1; clipped STE dx = dout 1[|x| <= 1]",
                             edges="x = +-0 (sign +1), |x| = 1 exactly (gradient passes), 1 + ulp (blocked)"))
    # weight binarizers: centred rows with an exact zero and exact +-1 after centring
    w = np.array([[0.0, 1.0, 2.0, 5.0, -8.0], [1.0, 2.0, 3.0, 2.0, 2.0], [0.3, -0.2, 0.0, 0.9, -1.4],
                  [0.0, 0.0, 0.0, 0.0, 0.0]])
    cases.append(_quant_case(torch, "quant.w_binary", "w_binary", lambda: tq.WeightBinarizer(center=True), w, {},
                             "alpha sign(W - mean_row W), alpha = mean|W_c| per output channel (constant); clipped STE "
                             "on W_c and the centring's gradient dW = dW_c - mean_row dW_c",
                             edges="row 1 centres to [-1, 0, 1, 0, 0] exactly (sign(0) = +1, |W_c| = 1 passes); "
                                   "row 3 all zero (alpha 0)"))
    cases.append(_quant_case(torch, "quant.w_xnor", "w_xnor", lambda: tq.WeightBinarizer(center=False), w, {},
                             "alpha sign(W), alpha = mean|W| per output channel; clipped STE",
                             edges="exact zeros, |W| = 1 exactly, an all-zero row"))
    # elastic binarizers, alpha = 0.5 (dyadic): q = x / alpha on +-1 and on rounding ties
    x = np.array([[0.0, -0.0, 0.5, -0.5, 0.25, 0.75], [0.125, -0.3, 1.5, -2.0, 0.2500000001, 0.5000000001]])
    for spec, signed, grad in (("a_elastic_signed", True, "lsq"), ("a_elastic_signed_gsb", True, "gsb"),
                               ("a_elastic_unsigned", False, "lsq")):
        make = (lambda s=signed, g=grad: tq.ElasticBinarizer(s, g, torch.float64))
        what = ("alpha sign(x)" if signed else "alpha clamp(round(x/alpha), 0, 1), round half to even")
        cases.append(_quant_case(torch, f"quant.{spec}", spec, make, x, {"alpha": [0.5]},
                                 f"BiT elastic binarizer {what}, alpha_grad {grad!r}; alpha_init = "
                                 f"{2 if signed else 4} mean|x| (first batch)",
                                 edges="x = 0, q = +-1 exactly (inside), q = 0.5 and 1.5 (ties: round half to even)"))
        cases.append(_quant_case(torch, f"quant.{spec}.floor", spec, make, x, {"alpha": [-0.25]},
                                 f"as quant.{spec} with alpha = -0.25 below the scale floor: forward uses 1e-5, "
                                 f"the gradient reaches the raw alpha unchanged",
                                 edges="alpha below the floor"))
    # ternary: an element exactly on the threshold Delta = 0.7 mean|W| (not above: zero), an all-zero row
    w = np.array([[0.7, -1.3, 1.0, 1.0], [0.2, -0.1, 0.0, 0.4], [0.0, 0.0, 0.0, 0.0], [-2.0, 0.5, 0.5, 1.0]])
    _assert_edge(np.float64(0.7) * np.abs(w[0]).mean() == 0.7, "row 0 of the ternary weight has |w| == Delta")
    for spec, per_channel in (("w_ternary_channel", True), ("w_ternary_tensor", False)):
        cases.append(_quant_case(torch, f"quant.{spec}", spec, lambda p=per_channel: tq.Ternarizer(p), w, {},
                                 f"TWN ternary {'per output channel' if per_channel else 'per tensor'}: Delta = 0.7 "
                                 f"mean|W|, T = sign(W) 1[|W| > Delta], alpha = mean |W| over T != 0 (0 if none); "
                                 f"identity STE",
                                 edges="|W| == Delta exactly (row 0, per channel: not above, code 0), an all-zero row"))
    # LSQ 8-bit, step 0.25: ties (k + 1/2), the clamp bounds Qn = -128, Qp = 127 exactly, beyond
    x = np.array([[0.0, 0.125, -0.125, 0.375, -0.375, 31.75], [-32.0, 32.0, -40.0, 31.875, 0.1, -7.3]])
    for spec in ("a_lsq8", "w_lsq8"):
        make = (lambda: tq.LSQQuantizer(8, True, torch.float64))
        cases.append(_quant_case(torch, f"quant.{spec}", spec, make, x, {"step": [0.25]},
                                 "LSQ 8-bit signed, one step per tensor: clamp(round(x/s), -128, 127) s; "
                                 "step_init = 2 mean|x| / sqrt(127)",
                                 edges="q = +-0.5, +-1.5 (ties), q = -128 and 127 exactly, beyond the bounds"))
    cases.append(_quant_case(torch, "quant.a_lsq8.floor", "a_lsq8", lambda: tq.LSQQuantizer(8, True, torch.float64), x,
                             {"step": [0.0]}, "LSQ with step = 0: forward uses the floor 1e-5", edges="step at 0"))
    # min-max 8-bit: max|x| = 127 * 0.125, so x/scale has exact ties; an all-zero channel
    w = np.array([[15.875, 0.0625, -0.1875, 1.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 0.3, 0.7, 1.1]])
    cases.append(_quant_case(torch, "quant.w_minmax8", "w_minmax8", lambda: tq.MinMaxQuantizer(8, True, True), w, {},
                             "min-max 8-bit symmetric per output channel: scale = max|w| / 127, clamp(round(w/scale), "
                             "-127, 127) scale; identity STE",
                             edges="row 0: w/scale = 0.5 and -1.5 exactly (ties); row 1 all zero (scale 1)"))
    x = np.array([[15.875, 0.0625, -0.1875, 1.0, 0.0, -3.3]])
    cases.append(_quant_case(torch, "quant.a_minmax8_signed", "a_minmax8_signed", lambda: tq.MinMaxQuantizer(8, True, False),
                             x, {}, "min-max 8-bit symmetric per tensor", edges="ties at +0.5 and -1.5 steps"))
    x = np.array([[0.0, 2.55, 1.275, 0.1, 0.005, 2.0]])
    cases.append(_quant_case(torch, "quant.a_minmax8_unsigned", "a_minmax8_unsigned",
                             lambda: tq.MinMaxQuantizer(8, False, False), x, {},
                             "min-max 8-bit asymmetric per tensor: lo = min(min x, 0), hi = max(max x, 0), scale = "
                             "(hi - lo)/255, zero point round(-lo/scale)", edges="lo = 0 (non-negative input)"))
    x = np.array([[-0.17, -0.05, 0.0, 0.4, 1.3, 2.2]])
    cases.append(_quant_case(torch, "quant.a_minmax8_unsigned.negative", "a_minmax8_unsigned",
                             lambda: tq.MinMaxQuantizer(8, False, False), x, {},
                             "min-max 8-bit asymmetric per tensor on a post-GELU-like range", edges="non-zero zero point"))
    cases.append(_quant_case(torch, "quant.a_minmax8_signed.zero", "a_minmax8_signed",
                             lambda: tq.MinMaxQuantizer(8, True, False), np.zeros((2, 3)), {},
                             "min-max on an all-zero tensor: scale 1, codes 0", edges="all zero"))
    cases += _asm_cases(torch, tq)
    cases += _gsb_cases(torch, tq)
    return cases


def _asm_cases(torch, tq):
    """BinaryViT's activation shift module (our reconstruction) around the signed elastic binarizer."""
    cases = []
    for center in ("mean", "median", "token"):
        name = f"quant.asm.{center}"
        r = _rng(name)
        x = r.standard_normal((2, 4, 3))  # (B, N, C): 8 rows per channel, so the median averages two values
        params = {"shift": r.standard_normal(3) * 0.1, "alpha": [0.75]}
        if center != "token":
            params["running_center"] = r.standard_normal(3) * 0.1
        make = (lambda c=center: tq.ActivationShift(tq.ElasticBinarizer(True, "lsq", torch.float64), 3, c, 0.1,
                                                    torch.float64))
        what = {"mean": "the running per-channel mean", "median": "the running per-channel median",
                "token": "each token's own mean over its channels (differentiated through)"}[center]
        cases.append(_quant_case(
            torch, name, "asm:a_elastic_signed", make, x, params,
            f"activation shift module: inner(x - (c + shift)), inner the signed elastic binarizer, c {what}"
            + ("; training updates running_center <- (1 - m) running_center + m batch statistic before "
               "quantizing (m = momentum); running_center_init: a fresh module's first batch sets it to the "
               "statistic" if center != "token" else ""),
            attrs={"inner": "a_elastic_signed", "center": center, "momentum": 0.1},
            edges="8 rows per channel: the median is the mean of the two middle values" if center == "median" else None))
    return cases


def _gsb_cases(torch, tq):
    cases = []
    # values (B, H, N, d) = (2, 2, 3, 2), max = 1, min = -2: elements exactly on 0.7 max, 0.9 max, 0.7 min
    v = np.array([0.7, 0.9, 1.0, -1.4, -1.8, -2.0, 0.0, -0.0, 0.3, 0.71, -1.39, 0.5,
                  0.2, 0.95, -0.6, 0.0, 0.1, -1.0, 0.8, -1.5, 0.35, 0.65, -0.05, 0.25]).reshape(2, 2, 3, 2)
    _assert_edge(np.float64(0.7) * 1.0 == 0.7 and np.float64(0.7) * -2.0 == -1.4, "GSB value thresholds representable")
    for mode in ("official", "principled"):
        make = (lambda m=mode: tq.GSBValue(2, 2, m, torch.float64))
        cases.append(_quant_case(
            torch, f"quant.gsb_value.{mode}", "gsb_value", make, v,
            {"shift": np.zeros((2, 2)), "alpha": [0.5, 0.25, 0.125]},
            "GSB value quantizer: y = v - shift[h, :]; T1 = 1[y > 0.7 max y] + 1[y < 0.7 min y], T2 with 0.9; "
            "out = a1 sign(y) + a2 T1 sign(y) + a3 T2 sign(y); alpha_init from the first batch",
            attrs={"mode": mode}, edges="y = 0.7 max, 0.9 max, 0.7 min exactly (not in the group: strict "
                                        "inequalities), exact zeros (sign +1)"))
        r = _rng(f"quant.gsb_value.{mode}.shifted")
        cases.append(_quant_case(
            torch, f"quant.gsb_value.{mode}.shifted", "gsb_value", make, r.standard_normal((2, 2, 3, 2)),
            {"shift": r.standard_normal((2, 2)) * 0.1, "alpha": [0.75, 0.5, 0.25]},
            "GSB value quantizer with a non-zero learnable shift", attrs={"mode": mode}))
    cases.append(_quant_case(
        torch, "quant.gsb_value.official.empty_groups", "gsb_value", lambda: tq.GSBValue(2, 2, "official", torch.float64),
        np.zeros((1, 2, 2, 2)), {"shift": np.zeros((2, 2)), "alpha": [0.5, 0.25, 0.125]},
        "GSB value quantizer on all-zero values: T1 and T2 empty, their scale gradients 0 (profile minibvit; the "
        "official code raises ZeroDivisionError)", attrs={"mode": "official"}, edges="empty groups, all-zero init"))
    # attention probabilities (B, H, N, N) = (2, 2, 3, 3); alpha1 = 0.5 so a/alpha1 = 0.5 at a = 0.25 (tie)
    r = _rng("quant.gsb_attn")
    # rows of positive weights over their sums, not a softmax: NumPy's exp has other last bits on other
    # CPUs (its AVX-512 and AVX2 loops), and an input must regenerate bit for bit everywhere
    weights = r.uniform(0.05, 1.0, (2, 2, 3, 3))
    a = np.minimum(weights / weights.sum(-1, keepdims=True), 0.49)
    a[0, 0, 0] = [0.25, 0.35, 0.5]  # max 0.5 (of the tensor and of this row): 0.35 == 0.7 M
    a[0, 1, 1] = [0.5, 0.45, 0.05]  # 0.45 == 0.9 M
    _assert_edge(a.max() == 0.5 and np.float64(0.7) * 0.5 == 0.35 and np.float64(0.9) * 0.5 == 0.45,
                 "GSB attention thresholds on elements")
    for mode in ("official", "principled"):
        for over in ("tensor", "row"):
            make = (lambda m=mode, o=over: tq.GSBAttn(2, 3, m, o, torch.float64))
            cases.append(_quant_case(
                torch, f"quant.gsb_attn.{mode}.{over}", "gsb_attn", make, a,
                {"bias": np.zeros((2, 3, 3)), "alpha": [0.5, 0.25, 0.125]},
                "GSB attention quantizer: y = A + bias; T1 = 1[y > 0.7 M], T2 = 1[y > 0.9 M], M = max over the "
                f"{'whole tensor' if over == 'tensor' else 'last axis'}; out = a1 clamp(round(y/a1), 0, 1) + a2 T1 + a3 T2",
                attrs={"mode": mode, "max_over": over},
                edges="y/a1 = 0.5 (tie, rounds to 0), y = 0.7 M and 0.9 M exactly (not in the group)"))
    r = _rng("quant.gsb_attn.official.shifted")
    cases.append(_quant_case(
        torch, "quant.gsb_attn.official.shifted", "gsb_attn", lambda: tq.GSBAttn(2, 3, "official", "tensor", torch.float64),
        a, {"bias": r.standard_normal((2, 3, 3)) * 0.02, "alpha": [0.3, 0.2, 0.1]},
        "GSB attention quantizer with a non-zero learnable bias", attrs={"mode": "official", "max_over": "tensor"}))
    cases.append(_quant_case(
        torch, "quant.gsb_attn.official.empty_groups", "gsb_attn", lambda: tq.GSBAttn(2, 3, "official", "tensor", torch.float64),
        -np.ones((1, 2, 3, 3)), {"bias": np.zeros((2, 3, 3)), "alpha": [0.5, 0.25, 0.125]},
        "GSB attention quantizer with max y = -1 < 0: T1 and T2 empty, their scale gradients 0 (profile minibvit)",
        attrs={"mode": "official", "max_over": "tensor"}, edges="empty groups"))
    return cases


# ----------------------------------------------------------------------------------------------
# whole models


def _dyadic(t, bits=8):
    """Round to `bits` significant bits (so products of quantized tensors are exact in any order)."""
    m, e = np.frexp(t)
    return np.ldexp(np.round(np.ldexp(m, bits)), e - bits)


def model_case(torch, method, roles):
    """One small ViT of a method: weights (with initialised quantizer scales and buffers), a batch,
    logits, loss, every gradient, the buffers after the step, and every parameter after 10 AdamW steps."""
    tr, tq = _reference("torch_reference"), _reference("torch_quant")
    F = torch.nn.functional
    name = f"model.{method}"
    r = _rng(name)
    config = {**TINY_VIT, **MODEL_METHODS[method]}
    cfg = SimpleNamespace(**config)
    options = SimpleNamespace(**SCHEME_OPTIONS)
    quant = tq.torch_quantizers(roles, cfg, options)
    tm = tr.TorchViT(cfg, quant=quant)
    params = tm.named_params()
    with torch.no_grad():
        for k, t in params.items():
            if "_quant." in k:
                leaf = k.rsplit(".", 1)[1]
                if leaf in ("shift", "bias"):  # GSB's attention bias adds to probabilities ~1/N: keep it small
                    t.copy_(torch.from_numpy(r.standard_normal(t.shape) * (0.02 if leaf == "bias" else 0.1)))
            else:
                t.copy_(torch.from_numpy(r.standard_normal(t.shape) * (0.5 if t.ndim > 1 else 0.2)
                                         + (1.0 if k.endswith("norm1.weight") else 0.0)))

    def batch():
        return (torch.from_numpy(r.standard_normal((3, cfg.in_chans, cfg.image_size, cfg.image_size))),
                torch.from_numpy(r.integers(0, cfg.num_classes, 3)))

    def loss_of(out, y):
        if isinstance(out, tuple):
            return 0.5 * sum(F.cross_entropy(o, y, label_smoothing=LABEL_SMOOTHING) for o in out)
        return F.cross_entropy(out, y, label_smoothing=LABEL_SMOOTHING)

    with torch.no_grad():  # first batch: initialises the learnable scales and running buffers
        tm(batch()[0])
        for k, t in params.items():
            if k.endswith(("_quant.alpha", "_quant.step")):
                t.copy_(torch.from_numpy(_dyadic(_np(t))))
    buffer_items = [(f"{role}_quant.{b}", buf) for role, m in quant.items() for b, buf in m.named_buffers()]
    inputs = {f"state.{k}": _np(t) for k, t in params.items()}
    inputs.update({f"state.{k}": _np(b) for k, b in buffer_items})
    x, y = batch()
    inputs["x"], inputs["labels"] = _np(x), _np(y)

    decay_names = sorted(k for k, t in params.items()
                         if t.ndim >= 2 and k not in ("cls_token", "dist_token", "pos_embed") and "_quant." not in k)
    opt = torch.optim.AdamW([{"params": [params[k] for k in decay_names], "weight_decay": ADAMW["weight_decay"]},
                             {"params": [t for k, t in params.items() if k not in decay_names], "weight_decay": 0.0}],
                            lr=ADAMW["lr"], betas=tuple(ADAMW["betas"]), eps=ADAMW["eps"], foreach=False)
    zeros = {}  # exact zeros reaching a plain sign binarizer in the recorded forward (sign(0) decisions)
    hooks = [quant[role].register_forward_pre_hook(lambda m, args, role=role: zeros.__setitem__(
                 role, zeros.get(role, 0) + int((args[0] == 0).sum())))
             for role, spec in roles.items() if spec.startswith("a_elastic_signed")]
    outputs = {}
    for step in range(ADAMW["steps"]):
        opt.zero_grad()
        out = tm(x, training=True)
        if step == 0:
            for h in hooks:
                h.remove()
        loss = loss_of(out, y)
        loss.backward()
        if step == 0:
            if isinstance(out, tuple):
                outputs["logits"], outputs["logits_dist"] = _np(out[0]), _np(out[1])
            else:
                outputs["logits"] = _np(out)
            outputs["loss"] = _np(loss)
            outputs.update({f"grad.{k}": _np(t.grad) if t.grad is not None else np.zeros(t.shape) for k, t in params.items()})
            outputs.update({f"buffer.{k}": _np(b) for k, b in buffer_items})
        opt.step()
    outputs.update({f"after.{k}": _np(t) for k, t in params.items()})
    outputs.update({f"after.{k}": _np(b) for k, b in buffer_items})

    def tol(output):
        return MODEL_TOL["logits" if output.startswith("logits") else output.split(".", 1)[0]]

    attrs = {
        "method": method, "config": config, "roles": dict(sorted(roles.items())), "options": SCHEME_OPTIONS,
        "loss": {"kind": "cross_entropy", "label_smoothing": LABEL_SMOOTHING,
                 "distilled": "0.5 * (CE(logits) + CE(logits_dist))"},
        "optimizer": {"kind": "adamw", **ADAMW, "decay": decay_names},
    }
    if any(zeros.values()):
        attrs["edge_cases"] = ("exact zeros at the input of a signed binarizer in the recorded forward (sign(0) = +1): "
                               + ", ".join(f"{role} {n}" for role, n in sorted(zeros.items()) if n))
    _assert_edge(method not in ("binary", "gsb") or any(zeros.values()),
                 f"{name}: an exact zero reaches a signed binarizer (the binary attention output)")
    description = (f"tiny ViT, method {method!r}: state.* (every parameter and buffer, scales already initialised "
                   f"from a first batch and rounded to 8 significant bits), a training batch x, labels; logits, loss, "
                   f"grad.* of every parameter, buffer.* after that forward, after.* after {ADAMW['steps']} AdamW steps "
                   f"on the same batch (the first one being the recorded step)")
    return make_case(name, "model", "vit", attrs, inputs, outputs, tol, description)


# ----------------------------------------------------------------------------------------------
# everything


def build_cases(patterns=()):
    """[(manifest entry, tensors)] for every case (or those matching the patterns)."""
    from fnmatch import fnmatchcase

    from minibvit.conformance import impl

    torch = _torch()
    torch.manual_seed(0)
    wanted = (lambda n: not patterns or any(fnmatchcase(n, p) for p in patterns))
    cases = []
    cases += [c for c in op_cases(torch) if wanted(c[0]["name"])]
    cases += [c for c in quant_cases(torch) if wanted(c[0]["name"])]
    for method in MODEL_METHODS:
        if wanted(f"model.{method}"):
            cfg = SimpleNamespace(**{**TINY_VIT, **MODEL_METHODS[method]})
            cases.append(model_case(torch, method, impl.schemes.resolve(cfg, method)))
    return cases


def _previous_files(directory):
    """Case files listed by a golden manifest already in directory (none if there is none)."""
    try:
        return {case["file"] for case in golden.read_manifest(directory)["cases"]
                if os.path.exists(os.path.join(directory, case["file"]))}
    except (FileNotFoundError, ValueError, KeyError):
        return set()


def export(directory, patterns=(), out=print):
    """Write every case and the manifest into directory (created if needed). Returns the manifest."""
    cases = build_cases(patterns)
    if not cases:
        raise ValueError(f"no case matches {list(patterns)}")
    os.makedirs(directory, exist_ok=True)
    stale = _previous_files(directory) - {entry["file"] for entry, _ in cases}
    used = sorted({entry["profile"] for entry, _ in cases})
    manifest = {
        "format": golden.FORMAT_NAME, "version": golden.FORMAT_VERSION, "dtype": "float64",
        "profiles": {p: profiles.get_profile(p).as_dict() for p in used},
        "results": "an implementation writes <file> with every name of `outputs` into its results directory",
        "cases": [entry for entry, _ in cases],
    }
    for entry, tensors in cases:
        golden.save_tensors(os.path.join(directory, entry["file"]), tensors,
                            metadata={"case": entry["name"]})
    golden.write_manifest(directory, manifest)
    for name in sorted(stale):  # cases of an earlier export that no longer exist
        os.unlink(os.path.join(directory, name))
    total = sum(os.path.getsize(os.path.join(directory, e["file"])) for e, _ in cases)
    out(f"wrote {len(cases)} cases ({total / 1e6:.2f} MB) and {golden.MANIFEST} to {directory}")
    return manifest
