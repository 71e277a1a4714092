"""A golden-file runner in plain PyTorch: it shows that the golden files are all a non-NumPy
implementation needs.

It reads manifest.json and the case files with safetensors' torch API, computes each case's outputs
with torch ops only (autograd for the real-valued ops and the model, closed-form pseudo-gradients for
the quantizers), and writes them under the same names into RESULTS. It imports neither minibvit nor
the tests; everything it knows about a case comes from the manifest (op, attrs) and docs/conformance.md.

    python scripts/conformance_torch_runner.py GOLDEN_DIR RESULTS [--cases PATTERN ...]
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

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

FLOOR = 1e-5  # the minibvit profile's scale floor


def leaf(t):
    return t.clone().requires_grad_(True)


def with_grads(t, forward, grad_names, dout="dout", out_name="out"):
    """forward(leaves) -> tensor; returns its value and the gradients d<name> of sum(out * dout)
    (or of out itself, a scalar loss, when dout is None)."""
    leaves = {k: leaf(v) if k in grad_names else v for k, v in t.items()}
    out = forward(leaves)
    out.backward(None if dout is None else leaves[dout])
    return {out_name: out.detach(), **{f"d{k}": leaves[k].grad for k in grad_names}}


# ----------------------------------------------------------------------------------------------
# ops


def run_op(case, t):
    op, a = case["op"], case["attrs"]
    if op == "linear":
        names = [k for k in ("x", "w", "b") if k in t]
        return with_grads(t, lambda l: F.linear(l["x"], l["w"], l.get("b")), names)
    if op == "layernorm":
        d = t["x"].shape[-1]
        return with_grads(t, lambda l: F.layer_norm(l["x"], (d,), l["gamma"], l["beta"], eps=a["eps"]), ["x", "gamma", "beta"])
    if op == "gelu":
        return with_grads(t, lambda l: F.gelu(l["x"], approximate=a["approximate"]), ["x"])
    if op == "softmax":
        return with_grads(t, lambda l: torch.softmax(l["x"], dim=a["axis"]), ["x"])
    if op == "attention":
        d = t["q"].shape[-1]
        return with_grads(t, lambda l: torch.softmax(l["q"] @ l["k"].transpose(-1, -2) / math.sqrt(d), -1) @ l["v"],
                          ["q", "k", "v"])
    if op == "patch_embed":
        p = a["patch_size"]
        return with_grads(t, lambda l: F.conv2d(l["x"], l["w"], l["b"], stride=p).flatten(2).transpose(1, 2), ["x", "w", "b"])
    if op == "tokens":
        prefix = ["cls_token"] + (["dist_token"] if "dist_token" in t else [])
        B = t["x"].shape[0]
        return with_grads(t, lambda l: torch.cat([l[k].expand(B, -1, -1) for k in prefix] + [l["x"]], 1) + l["pos_embed"],
                          ["x", "pos_embed"] + prefix)
    if op == "pool":
        n = a["num_prefix"]
        return with_grads(t, lambda l: l["x"][:, 0] if a["mode"] == "token" else l["x"][:, n:].mean(1), ["x"])
    if op == "residual":
        return with_grads(t, lambda l: l["x"] + l["y"], ["x", "y"])
    if op == "dropout":
        return with_grads(t, lambda l: l["x"] * l["keep"] / (1 - a["p"]), ["x"])
    if op == "drop_path":
        return with_grads(t, lambda l: l["x"] * l["keep"].reshape(-1, *[1] * (l["x"].ndim - 1)) / (1 - a["p"]), ["x"])
    if op == "cross_entropy":
        return with_grads(t, lambda l: F.cross_entropy(l["logits"], l["labels"], label_smoothing=a["label_smoothing"]),
                          ["logits"], dout=None, out_name="loss")
    if op == "kd_soft":
        tau = a["temperature"]
        return with_grads(t, lambda l: F.kl_div(F.log_softmax(l["student"] / tau, -1), F.log_softmax(l["teacher"] / tau, -1),
                                                reduction="batchmean", log_target=True) * tau * tau,
                          ["student"], dout=None, out_name="loss")
    raise NotImplementedError(f"op {op!r}")


# ----------------------------------------------------------------------------------------------
# quantizers: forward and the closed-form pseudo-gradients (docs/quantizers.md)


def pm_sign(x):
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)  # sign(0) = +1


def rows_mean(w):
    return w.mean(dim=tuple(range(1, w.ndim)), keepdim=True)


def run_quantizer(case, t):
    spec, x, g = case["op"], t["x"], t["dout"]
    if spec == "sign":
        return {"out": pm_sign(x), "dx": g * (x.abs() <= 1)}
    if spec in ("w_binary", "w_xnor"):
        wc = x - rows_mean(x) if spec == "w_binary" else x
        dwc = g * (wc.abs() <= 1)
        return {"out": rows_mean(wc.abs()) * pm_sign(wc), "dx": dwc - rows_mean(dwc) if spec == "w_binary" else dwc}
    if spec.startswith("a_elastic"):
        signed, refined = "unsigned" not in spec, spec.endswith("_gsb")
        alpha = t["alpha"]
        a = alpha.clamp(min=FLOOR)
        q = x / a
        s = 1 / math.sqrt(x.numel())
        if signed:
            inside = q.abs() <= 1
            out, dx = a * pm_sign(x), g * inside
            dalpha = ((pm_sign(x) - inside * q) if refined else pm_sign(x)) * g
        else:
            inside = (q >= 0) & (q <= 1)
            out, dx = a * torch.round(q).clamp(0, 1), g * inside
            dalpha = ((q > 1).to(x.dtype) + inside * (torch.round(q) - q)) * g
        init = (2 if signed else 4) * x.abs().mean()
        return {"out": out, "dx": dx, "dalpha": (dalpha.sum() * s).reshape(1), "alpha_init": init.reshape(1)}
    if spec.startswith("w_ternary"):
        axes = tuple(range(1, x.ndim)) if spec.endswith("channel") else tuple(range(x.ndim))
        above = x.abs() > 0.7 * x.abs().mean(dim=axes, keepdim=True)
        count = above.sum(dim=axes, keepdim=True)
        alpha = torch.where(count > 0, (x.abs() * above).sum(dim=axes, keepdim=True) / count.clamp(min=1), 0.0)
        return {"out": alpha * pm_sign(x) * above, "dx": g.clone()}
    if spec in ("a_lsq8", "w_lsq8"):
        qn, qp = -128, 127
        step = t["step"].clamp(min=FLOOR)
        q = x / step
        inside = (q >= qn) & (q <= qp)
        v = torch.where(q < qn, float(qn), torch.where(q > qp, float(qp), torch.round(q) - q))
        dstep = (v * g).sum() / math.sqrt(x.numel() * qp)
        init = 2 * x.abs().mean() / math.sqrt(qp)
        return {"out": torch.round(q).clamp(qn, qp) * step, "dx": g * inside, "dstep": dstep.reshape(1),
                "step_init": init.reshape(1)}
    if spec.startswith(("w_minmax8", "a_minmax8")):
        dims = tuple(range(1, x.ndim)) if spec.startswith("w_") else tuple(range(x.ndim))
        if spec.endswith("unsigned"):
            lo, hi = x.amin(dim=dims, keepdim=True).clamp(max=0), x.amax(dim=dims, keepdim=True).clamp(min=0)
            scale = (hi - lo) / 255
            scale = torch.where(scale > 0, scale, 1.0)
            zp = torch.round(-lo / scale)
            out = ((torch.round(x / scale) + zp).clamp(0, 255) - zp) * scale
        else:
            scale = x.abs().amax(dim=dims, keepdim=True) / 127
            scale = torch.where(scale > 0, scale, 1.0)
            out = torch.round(x / scale).clamp(-127, 127) * scale
        return {"out": out, "dx": g.clone()}
    raise NotImplementedError(f"quantizer {spec!r}")


# ----------------------------------------------------------------------------------------------
# the full-precision ViT (timm layout and names), written from the manifest's config


def vit_forward(p, x, c):
    D, H = c["embed_dim"], c["num_heads"]
    t = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=c["patch_size"]).flatten(2).transpose(1, 2)
    B = t.shape[0]
    prefix = [p["cls_token"].expand(B, -1, -1)] + ([p["dist_token"].expand(B, -1, -1)] if c["distilled"] else [])
    t = torch.cat(prefix + [t], 1) + p["pos_embed"]
    N = t.shape[1]
    for i in range(c["depth"]):
        b = f"blocks.{i}"
        h = F.layer_norm(t, (D,), p[f"{b}.norm1.weight"], p[f"{b}.norm1.bias"], eps=c["layernorm_eps"])
        qkv = F.linear(h, p[f"{b}.attn.qkv.weight"], p.get(f"{b}.attn.qkv.bias")).reshape(B, N, 3, H, D // H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), -1) @ v).transpose(1, 2).reshape(B, N, D)
        t = t + F.linear(o, p[f"{b}.attn.proj.weight"], p[f"{b}.attn.proj.bias"])
        h = F.layer_norm(t, (D,), p[f"{b}.norm2.weight"], p[f"{b}.norm2.bias"], eps=c["layernorm_eps"])
        h = F.gelu(F.linear(h, p[f"{b}.mlp.fc1.weight"], p[f"{b}.mlp.fc1.bias"]), approximate=c["gelu_approximate"])
        t = t + F.linear(h, p[f"{b}.mlp.fc2.weight"], p[f"{b}.mlp.fc2.bias"])
    t = F.layer_norm(t, (D,), p["norm.weight"], p["norm.bias"], eps=c["layernorm_eps"])
    if c["distilled"]:
        return F.linear(t[:, 0], p["head.weight"], p["head.bias"]), F.linear(t[:, 1], p["head_dist.weight"], p["head_dist.bias"])
    pooled = t[:, 0] if c["global_pool"] == "token" else t[:, len(prefix):].mean(1)
    return F.linear(pooled, p["head.weight"], p["head.bias"])


def run_model(case, t):
    a = case["attrs"]
    if a["roles"]:
        raise NotImplementedError(f"quantized model (method {a['method']!r})")
    c, o, eps = a["config"], a["optimizer"], a["loss"]["label_smoothing"]
    p = {k[len("state."):]: leaf(v) for k, v in t.items() if k.startswith("state.")}
    decay = [p[k] for k in o["decay"]]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o["weight_decay"]},
                             {"params": [v for k, v in p.items() if k not in o["decay"]], "weight_decay": 0.0}],
                            lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"])
    result = {}
    for step in range(o["steps"]):
        opt.zero_grad()
        out = vit_forward(p, t["x"], c)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum(F.cross_entropy(z, t["labels"], label_smoothing=eps) for z in outs) / len(outs)
        loss.backward()
        if step == 0:
            result["logits"] = outs[0].detach()
            if len(outs) == 2:
                result["logits_dist"] = outs[1].detach()
            result["loss"] = loss.detach()
            result.update({f"grad.{k}": v.grad.clone() for k, v in p.items()})
        opt.step()
    result.update({f"after.{k}": v.detach() for k, v in p.items()})
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
        inputs = {k: tensors[k] for k in case["inputs"]}
        try:
            outputs = RUNNERS[case["kind"]](case, inputs)
        except NotImplementedError as exc:
            sys.exit(f"{case['name']}: not covered by this runner ({exc}); select other cases with --cases")
        save_file({k: v.detach().contiguous() for k, v in outputs.items()}, os.path.join(args.results, case["file"]))
    print(f"torch runner: wrote {len(cases)} cases to {args.results}")


if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    main()
