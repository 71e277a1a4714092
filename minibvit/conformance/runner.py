"""The golden runner of the adapter contract: compute an implementation's outputs for every case.

``run_case(case, inputs, ns=None) -> {output name: array}`` for one manifest entry and its input
tensors, calling the implementation through the names of the pytest adapter contract
(docs/conformance.md): ``ops`` (op pairs), ``quant`` (quantizer functions and wrappers,
``make_quantizer``), ``methods`` (GSB quantizers), ``schemes`` (``resolve``, ``build_quantizers``,
``SchemeOptions``), ``ViTConfig``, ``build_vit`` and ``AdamW``. ``ns`` is a module or namespace with
those names; the default is minibvit, reached only through ``minibvit.conformance.impl``.

So any adapter written for ``pytest reference_tests --impl ...`` also runs the golden cases
(``python -m minibvit.conformance run DIR RESULTS --impl package.module``); a name it lacks makes the
cases that need it raise, and `check` fails their outputs as missing. An implementation outside
Python writes the results files itself (scripts/conformance_torch_runner.py does that in plain torch).
"""
import numpy as np

F64 = np.float64


def _minibvit():
    from . import impl

    return impl


class _MaskRng:
    """Stands in for the numpy Generator of minibvit's dropout so that it draws a given mask:
    ``random()`` returns 1 where the mask keeps and 0 where it drops (dropout keeps u >= p)."""

    def __init__(self, keep):
        self.keep = keep

    def random(self, shape, dtype=F64):
        if tuple(np.shape(shape)) == () and np.ndim(self.keep) == 1:
            shape = (shape,)
        if tuple(shape) != self.keep.shape:
            raise ValueError(f"mask of shape {self.keep.shape} given, dropout drew {tuple(shape)}")
        return np.where(self.keep != 0, 1.0, 0.0).astype(dtype)


def _op(ns, case, t):
    ops, op, attrs = ns.ops, case["op"], case["attrs"]
    dout = t.get("dout")
    if op == "linear":
        y, c = ops.linear_forward(t["x"], t["w"], t.get("b"))
        dx, dw, db = ops.linear_backward(dout, c)
        return {"out": y, "dx": dx, "dw": dw, **({"db": db} if "b" in t else {})}
    if op == "layernorm":
        y, c = ops.layernorm_forward(t["x"], t["gamma"], t["beta"], attrs["eps"])
        dx, dg, db = ops.layernorm_backward(dout, c)
        return {"out": y, "dx": dx, "dgamma": dg, "dbeta": db}
    if op == "gelu":
        y, c = ops.gelu_forward(t["x"], attrs["approximate"])
        return {"out": y, "dx": ops.gelu_backward(dout, c)[0]}
    if op == "softmax":
        y, c = ops.softmax_forward(t["x"])
        return {"out": y, "dx": ops.softmax_backward(dout, c)}
    if op == "attention":
        o, c = ops.attention_forward(t["q"], t["k"], t["v"])
        dq, dk, dv, _ = ops.attention_backward(dout, c)
        return {"out": np.ascontiguousarray(o), "dq": dq, "dk": dk, "dv": dv}
    if op == "patch_embed":
        y, c = ops.patch_embed_forward(t["x"], t["w"], t["b"], attrs["patch_size"])
        dx, dw, db = ops.patch_embed_backward(dout, c)
        return {"out": y, "dx": dx, "dw": dw, "db": db}
    if op == "tokens":
        y, c = ops.tokens_forward(t["x"], t["pos_embed"], t["cls_token"], t.get("dist_token"))
        dx, dpos, dcls, ddist = ops.tokens_backward(dout, c)
        return {"out": y, "dx": dx, "dpos_embed": dpos, "dcls_token": dcls,
                **({"ddist_token": ddist} if "dist_token" in t else {})}
    if op == "pool":
        y, c = ops.pool_forward(t["x"], attrs["mode"], attrs["num_prefix"])
        return {"out": y, "dx": ops.pool_backward(dout, c)}
    if op == "residual":
        y, c = ops.residual_forward(t["x"], t["y"])
        dx, dy = ops.residual_backward(dout, c)
        return {"out": y, "dx": dx, "dy": dy}
    if op in ("dropout", "drop_path"):
        forward = ops.dropout_forward if op == "dropout" else ops.drop_path_forward
        backward = ops.dropout_backward if op == "dropout" else ops.drop_path_backward
        y, c = forward(t["x"], attrs["p"], _MaskRng(t["keep"]), True)
        return {"out": y, "dx": backward(dout, c)}
    if op == "cross_entropy":
        loss, c = ops.cross_entropy_forward(t["logits"], t["labels"], attrs["label_smoothing"])
        return {"loss": np.asarray(loss), "dlogits": ops.cross_entropy_backward(1.0, c)}
    if op == "kd_soft":
        loss, c = ops.kd_soft_forward(t["student"], t["teacher"], attrs["temperature"])
        return {"loss": np.asarray(loss), "dstudent": ops.kd_soft_backward(1.0, c)}
    raise ValueError(f"case {case['name']}: the minibvit runner has no op {op!r}")


def _make_quantizer(ns, case, t):
    spec, attrs, x = case["op"], case["attrs"], t["x"]
    if spec == "gsb_value":
        return ns.methods.GSBValueQuantizer(x.shape[1], x.shape[3], mode=attrs["mode"], dtype=F64)
    if spec == "gsb_attn":
        return ns.methods.GSBAttnQuantizer(x.shape[1], x.shape[2], mode=attrs["mode"], max_over=attrs["max_over"],
                                           dtype=F64)
    if spec.startswith("asm:"):
        return ns.methods.ASM(ns.quant.make_quantizer(spec[4:], dtype=F64), x.shape[-1], center=attrs["center"],
                              momentum=attrs["momentum"], dtype=F64)
    return ns.quant.make_quantizer(spec, dtype=F64)


def _quantizer(ns, case, t):
    if case["op"] == "sign":  # the pure pair (the wrapper adds nothing)
        out, cache = ns.quant.binarize_forward(t["x"], "clipped")
        return {"out": out, "dx": ns.quant.binarize_backward(t["dout"], cache)}
    q = _make_quantizer(ns, case, t)
    for name, arr in {**q.params, **q.buffers}.items():
        arr[...] = t[name]
    out, cache = q.forward(t["x"], True)
    dx, grads = q.backward(t["dout"], cache)
    result = {"out": out, "dx": dx, **{f"d{k}": g for k, g in grads.items()},
              **{f"{k}_after": b.copy() for k, b in q.buffers.items()}}
    fresh = _make_quantizer(ns, case, t)
    state = {**fresh.params, **fresh.buffers}
    uninitialised = [k for k, v in state.items() if np.isnan(v).any()]
    if uninitialised:
        fresh.forward(t["x"], True)  # the first training batch initialises the NaN scales and buffers
        result.update({f"{k}_init": state[k] for k in uninitialised})
    return result


def _loss_and_dlogits(ops, logits, labels, smoothing):
    if isinstance(logits, tuple):
        l1, c1 = ops.cross_entropy_forward(logits[0], labels, smoothing)
        l2, c2 = ops.cross_entropy_forward(logits[1], labels, smoothing)
        return 0.5 * (l1 + l2), (ops.cross_entropy_backward(0.5, c1), ops.cross_entropy_backward(0.5, c2))
    loss, c = ops.cross_entropy_forward(logits, labels, smoothing)
    return loss, ops.cross_entropy_backward(1.0, c)


def _model(ns, case, t):
    attrs = case["attrs"]
    cfg = ns.ViTConfig(**attrs["config"])
    quantizers = None
    if attrs["roles"]:
        roles = ns.schemes.resolve(cfg, attrs["method"])
        if roles != attrs["roles"]:
            raise ValueError(f"case {case['name']}: the implementation's table for method {attrs['method']!r} differs "
                             f"from the manifest's roles: {sorted(set(roles.items()) ^ set(attrs['roles'].items()))}")
        quantizers = ns.schemes.build_quantizers(cfg, attrs["method"], options=ns.schemes.SchemeOptions(**attrs["options"]),
                                                 dtype="float64")
    state = {k[len("state."):]: v.copy() for k, v in t.items() if k.startswith("state.")}
    model = ns.build_vit(cfg, state=state, dtype=F64, quantizers=quantizers)
    o = attrs["optimizer"]
    adamw = getattr(ns, "AdamW", None)  # without one, the after.* outputs are missing (check fails them)
    opt = adamw and adamw(model.parameters(), lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                          weight_decay=o["weight_decay"])
    smoothing = attrs["loss"]["label_smoothing"]
    result = {}
    for step in range(o["steps"] if opt else 1):
        logits, cache = model.forward(t["x"], training=True)
        loss, dlogits = _loss_and_dlogits(ns.ops, logits, t["labels"], smoothing)
        model.backward(dlogits, cache)
        if step == 0:
            if isinstance(logits, tuple):
                result["logits"], result["logits_dist"] = logits
            else:
                result["logits"] = logits
            result["loss"] = np.asarray(loss)
            result.update({f"grad.{k}": np.array(g) for k, g in model.grads.items()})
            result.update({f"buffer.{k}": np.array(b) for k, b in model.state_dict().items() if f"state.{k}" in t
                           and f"buffer.{k}" in case["outputs"]})
        if opt:
            opt.step(model.grads)
    if opt:
        result.update({f"after.{k}": np.array(v) for k, v in model.state_dict().items()})
    return result


def run_case(case, inputs, ns=None):
    """The implementation's outputs {name: array} for one manifest entry and its inputs; ns: the
    contract names (default minibvit)."""
    ns = ns or _minibvit()
    kind = case["kind"]
    if kind == "op":
        return _op(ns, case, inputs)
    if kind == "quantizer":
        return _quantizer(ns, case, inputs)
    if kind == "model":
        return _model(ns, case, inputs)
    raise ValueError(f"case {case['name']}: unknown kind {kind!r}")
