"""A golden-file runner in JAX: a check from outside both NumPy and PyTorch.

It reads manifest.json and the case files with safetensors' flax (JAX) API, computes each case with
jax.numpy (jax.vjp for the gradients of the real-valued ops and of the model, closed-form
pseudo-gradients for the quantizers, AdamW written out), and writes the outputs under the same names
into RESULTS. It imports neither minibvit, nor torch, nor the tests.

    pip install jax safetensors        # JAX is not a dependency of minibvit
    python scripts/conformance_jax_runner.py GOLDEN_DIR RESULTS [--cases PATTERN ...]
    python -m minibvit.conformance check GOLDEN_DIR RESULTS --cases PATTERN ...

Covered: every op case, the sign / weight / elastic / ternary / LSQ / min-max quantizer cases, and
the full-precision model (model.fp). A selected case it does not cover is an error.
"""
import argparse
import json
import math
import os
import sys
from fnmatch import fnmatchcase

import jax

jax.config.update("jax_enable_x64", True)  # the golden values are float64

import jax.numpy as jnp  # noqa: E402
from safetensors.flax import load_file, save_file  # noqa: E402

FLOOR = 1e-5  # the minibvit profile's scale floor


def with_grads(t, forward, grad_names, out_name="out", scalar=False):
    """forward(values) -> array; its value and d<name> of sum(out * dout) (of out itself when scalar)."""
    def f(*args):
        return forward({**t, **dict(zip(grad_names, args))})

    out, vjp = jax.vjp(f, *[t[k] for k in grad_names])
    grads = vjp(jnp.ones_like(out) if scalar else t["dout"])
    return {out_name: out, **{f"d{k}": g for k, g in zip(grad_names, grads)}}


def layer_norm(x, gamma, beta, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * gamma + beta


def softmax(x):
    e = jnp.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - jnp.log(jnp.exp(z).sum(-1, keepdims=True))


def gelu(x, approximate):
    if approximate == "tanh":
        return 0.5 * x * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + jax.scipy.special.erf(x / math.sqrt(2)))


def cross_entropy(logits, labels, eps):
    C = logits.shape[-1]
    target = (1 - eps) * jax.nn.one_hot(labels, C, dtype=logits.dtype) + eps / C
    return -(target * log_softmax(logits)).sum() / logits.shape[0]


def patch_embed(x, w, b, p):
    B, C, H, W = x.shape
    patches = x.reshape(B, C, H // p, p, W // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)
    return patches @ w.reshape(w.shape[0], -1).T + b


def attention(q, k, v):
    return softmax(q @ jnp.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])) @ v


def run_op(case, t):
    op, a = case["op"], case["attrs"]
    if op == "linear":
        names = [k for k in ("x", "w", "b") if k in t]
        return with_grads(t, lambda v: v["x"] @ v["w"].T + (v["b"] if "b" in v else 0), names)
    if op == "layernorm":
        return with_grads(t, lambda v: layer_norm(v["x"], v["gamma"], v["beta"], a["eps"]), ["x", "gamma", "beta"])
    if op == "gelu":
        return with_grads(t, lambda v: gelu(v["x"], a["approximate"]), ["x"])
    if op == "softmax":
        return with_grads(t, lambda v: softmax(v["x"]), ["x"])
    if op == "attention":
        return with_grads(t, lambda v: attention(v["q"], v["k"], v["v"]), ["q", "k", "v"])
    if op == "patch_embed":
        return with_grads(t, lambda v: patch_embed(v["x"], v["w"], v["b"], a["patch_size"]), ["x", "w", "b"])
    if op == "tokens":
        prefix = ["cls_token"] + (["dist_token"] if "dist_token" in t else [])
        B, _, D = t["x"].shape
        return with_grads(t, lambda v: jnp.concatenate([jnp.broadcast_to(v[k], (B, 1, D)) for k in prefix] + [v["x"]], 1)
                          + v["pos_embed"], ["x", "pos_embed"] + prefix)
    if op == "pool":
        n = a["num_prefix"]
        return with_grads(t, lambda v: v["x"][:, 0] if a["mode"] == "token" else v["x"][:, n:].mean(1), ["x"])
    if op == "residual":
        return with_grads(t, lambda v: v["x"] + v["y"], ["x", "y"])
    if op == "dropout":
        return with_grads(t, lambda v: v["x"] * v["keep"] / (1 - a["p"]), ["x"])
    if op == "drop_path":
        return with_grads(t, lambda v: v["x"] * v["keep"].reshape((-1,) + (1,) * (v["x"].ndim - 1)) / (1 - a["p"]), ["x"])
    if op == "cross_entropy":
        return with_grads(t, lambda v: cross_entropy(v["logits"], v["labels"], a["label_smoothing"]), ["logits"],
                          out_name="loss", scalar=True)
    if op == "kd_soft":
        tau = a["temperature"]

        def kd(v):
            logp_t = log_softmax(v["teacher"] / tau)
            return tau * tau * (jnp.exp(logp_t) * (logp_t - log_softmax(v["student"] / tau))).sum() / v["student"].shape[0]

        return with_grads(t, kd, ["student"], out_name="loss", scalar=True)
    raise NotImplementedError(f"op {op!r}")


def pm_sign(x):
    return jnp.where(x >= 0, 1.0, -1.0)  # sign(0) = +1


def rows_mean(w):
    return w.mean(axis=tuple(range(1, w.ndim)), keepdims=True)


def run_quantizer(case, t):
    spec, x, g = case["op"], t["x"], t["dout"]
    if spec == "sign":
        return {"out": pm_sign(x), "dx": g * (jnp.abs(x) <= 1)}
    if spec in ("w_binary", "w_xnor"):
        wc = x - rows_mean(x) if spec == "w_binary" else x
        dwc = g * (jnp.abs(wc) <= 1)
        return {"out": rows_mean(jnp.abs(wc)) * pm_sign(wc), "dx": dwc - rows_mean(dwc) if spec == "w_binary" else dwc}
    if spec.startswith("a_elastic"):
        signed, refined = "unsigned" not in spec, spec.endswith("_gsb")
        a = jnp.maximum(t["alpha"], FLOOR)
        q = x / a
        if signed:
            inside = jnp.abs(q) <= 1
            out, dalpha = a * pm_sign(x), ((pm_sign(x) - inside * q) if refined else pm_sign(x)) * g
        else:
            inside = (q >= 0) & (q <= 1)
            out, dalpha = a * jnp.clip(jnp.round(q), 0, 1), ((q > 1) + inside * (jnp.round(q) - q)) * g
        return {"out": out, "dx": g * inside, "dalpha": (dalpha.sum() / math.sqrt(x.size)).reshape(1),
                "alpha_init": ((2 if signed else 4) * jnp.abs(x).mean()).reshape(1)}
    if spec.startswith("w_ternary"):
        axes = tuple(range(1, x.ndim)) if spec.endswith("channel") else tuple(range(x.ndim))
        above = jnp.abs(x) > 0.7 * jnp.abs(x).mean(axis=axes, keepdims=True)
        count = above.sum(axis=axes, keepdims=True)
        alpha = jnp.where(count > 0, (jnp.abs(x) * above).sum(axis=axes, keepdims=True) / jnp.maximum(count, 1), 0.0)
        return {"out": alpha * pm_sign(x) * above, "dx": g}
    if spec in ("a_lsq8", "w_lsq8"):
        qn, qp = -128, 127
        s = jnp.maximum(t["step"], FLOOR)
        q = x / s
        v = jnp.where(q < qn, qn, jnp.where(q > qp, qp, jnp.round(q) - q))
        return {"out": jnp.clip(jnp.round(q), qn, qp) * s, "dx": g * ((q >= qn) & (q <= qp)),
                "dstep": ((v * g).sum() / math.sqrt(x.size * qp)).reshape(1),
                "step_init": (2 * jnp.abs(x).mean() / math.sqrt(qp)).reshape(1)}
    if spec.startswith(("w_minmax8", "a_minmax8")):
        axes = tuple(range(1, x.ndim)) if spec.startswith("w_") else tuple(range(x.ndim))
        if spec.endswith("unsigned"):
            lo, hi = jnp.minimum(x.min(axis=axes, keepdims=True), 0), jnp.maximum(x.max(axis=axes, keepdims=True), 0)
            scale = jnp.where(hi - lo > 0, (hi - lo) / 255, 1.0)
            zp = jnp.round(-lo / scale)
            out = (jnp.clip(jnp.round(x / scale) + zp, 0, 255) - zp) * scale
        else:
            scale = jnp.abs(x).max(axis=axes, keepdims=True) / 127
            scale = jnp.where(scale > 0, scale, 1.0)
            out = jnp.clip(jnp.round(x / scale), -127, 127) * scale
        return {"out": out, "dx": g}
    raise NotImplementedError(f"quantizer {spec!r}")


def vit_forward(p, x, c):
    D, H, eps = c["embed_dim"], c["num_heads"], c["layernorm_eps"]
    t = patch_embed(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], c["patch_size"])
    B = t.shape[0]
    prefix = ["cls_token"] + (["dist_token"] if c["distilled"] else [])
    t = jnp.concatenate([jnp.broadcast_to(p[k], (B, 1, D)) for k in prefix] + [t], 1) + p["pos_embed"]
    N = t.shape[1]
    for i in range(c["depth"]):
        b = f"blocks.{i}"
        h = layer_norm(t, p[f"{b}.norm1.weight"], p[f"{b}.norm1.bias"], eps)
        qkv = h @ p[f"{b}.attn.qkv.weight"].T + p.get(f"{b}.attn.qkv.bias", 0)
        q, k, v = qkv.reshape(B, N, 3, H, D // H).transpose(2, 0, 3, 1, 4)
        o = attention(q, k, v).transpose(0, 2, 1, 3).reshape(B, N, D)
        t = t + o @ p[f"{b}.attn.proj.weight"].T + p[f"{b}.attn.proj.bias"]
        h = layer_norm(t, p[f"{b}.norm2.weight"], p[f"{b}.norm2.bias"], eps)
        h = gelu(h @ p[f"{b}.mlp.fc1.weight"].T + p[f"{b}.mlp.fc1.bias"], c["gelu_approximate"])
        t = t + h @ p[f"{b}.mlp.fc2.weight"].T + p[f"{b}.mlp.fc2.bias"]
    t = layer_norm(t, p["norm.weight"], p["norm.bias"], eps)
    if c["distilled"]:
        return (t[:, 0] @ p["head.weight"].T + p["head.bias"], t[:, 1] @ p["head_dist.weight"].T + p["head_dist.bias"])
    pooled = t[:, 0] if c["global_pool"] == "token" else t[:, len(prefix):].mean(1)
    return (pooled @ p["head.weight"].T + p["head.bias"],)


def run_model(case, t):
    a = case["attrs"]
    if a["roles"]:
        raise NotImplementedError(f"quantized model (method {a['method']!r})")
    c, o, eps = a["config"], a["optimizer"], a["loss"]["label_smoothing"]

    def loss_fn(p):
        outs = vit_forward(p, t["x"], c)
        return sum(cross_entropy(z, t["labels"], eps) for z in outs) / len(outs), outs

    p = {k[len("state."):]: v for k, v in t.items() if k.startswith("state.")}
    m = {k: jnp.zeros_like(v) for k, v in p.items()}
    v2 = {k: jnp.zeros_like(v) for k, v in p.items()}
    (b1, b2), lr = o["betas"], o["lr"]
    result = {}
    for step in range(1, o["steps"] + 1):  # AdamW as torch.optim.AdamW (decoupled decay, bias correction)
        (loss, outs), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        if step == 1:
            result.update({"logits": outs[0], "loss": loss, **({"logits_dist": outs[1]} if len(outs) == 2 else {})})
            result.update({f"grad.{k}": g for k, g in grads.items()})
        for k in p:
            wd = o["weight_decay"] if k in o["decay"] else 0.0
            m[k] = b1 * m[k] + (1 - b1) * grads[k]
            v2[k] = b2 * v2[k] + (1 - b2) * grads[k] ** 2
            denom = jnp.sqrt(v2[k]) / math.sqrt(1 - b2 ** step) + o["eps"]
            p[k] = p[k] * (1 - lr * wd) - lr / (1 - b1 ** step) * m[k] / denom
    result.update({f"after.{k}": v for k, v in p.items()})
    return result


RUNNERS = {"op": run_op, "quantizer": run_quantizer, "model": run_model}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("golden_dir")
    ap.add_argument("results")
    ap.add_argument("--cases", nargs="+", default=["*"], metavar="PATTERN")
    args = ap.parse_args(argv)
    with open(os.path.join(args.golden_dir, "manifest.json")) as f:
        manifest = json.load(f)
    if manifest.get("format") != "minibvit-golden" or manifest.get("version") != 1:
        sys.exit(f"{args.golden_dir}: not a version-1 minibvit golden directory")
    cases = [c for c in manifest["cases"] if any(fnmatchcase(c["name"], p) for p in args.cases)]
    if not cases:
        sys.exit(f"no case matches {args.cases}")
    os.makedirs(args.results, exist_ok=True)
    for case in cases:
        if case["profile"] != "minibvit":
            sys.exit(f"{case['name']}: this runner follows the minibvit profile, the case follows {case['profile']!r}")
        tensors = load_file(os.path.join(args.golden_dir, case["file"]))
        try:
            outputs = RUNNERS[case["kind"]](case, {k: tensors[k] for k in case["inputs"]})
        except NotImplementedError as exc:
            sys.exit(f"{case['name']}: not covered by this runner ({exc}); select other cases with --cases")
        save_file({k: jnp.asarray(v, jnp.float64) for k, v in outputs.items()}, os.path.join(args.results, case["file"]))
    print(f"jax runner: wrote {len(cases)} cases to {args.results}")


if __name__ == "__main__":
    main()
