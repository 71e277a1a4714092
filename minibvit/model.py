"""The Vision Transformer: a composition of the ops in minibvit.ops, forward and backward by hand.

Parameters carry timm's VisionTransformer names and PyTorch shapes (``patch_embed.proj.weight``
(D, C, p, p), ``blocks.0.attn.qkv.weight`` (3D, D), ...), so a ``state_dict()`` moves between
minibvit and PyTorch unchanged. A low-bit method is a choice of quantizer per tensor (see
``minibvit.methods``); the model code is the same for every method. The ops never see a quantizer:
the model composes them around the ops (_linear_forward, _attention_forward), and a product of two
quantized operands is computed exactly on their integer levels (_quantized_product, the one
quantized matmul, whose bits the packed engine reproduces).
"""
from dataclasses import dataclass, asdict, fields

import numpy as np

from . import ops


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    qkv_bias: bool = True
    distilled: bool = False  # DeiT's distillation token and second head
    global_pool: str = "token"  # "token" (class token) or "mean" (mean of patch tokens)
    drop_rate: float = 0.0  # dropout after the position embedding, attention proj and MLP
    attn_drop_rate: float = 0.0  # dropout on the attention probabilities
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over blocks
    gelu_approximate: str = "none"  # "none" (exact erf) or "tanh"
    layernorm_eps: float = 1e-6

    def __post_init__(self):
        self.validate()

    def validate(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"ViTConfig: {msg}")

        for name in ("image_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "num_classes"):
            value = getattr(self, name)
            need(isinstance(value, (int, np.integer)) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(self.image_size % self.patch_size == 0,
             f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        need(self.embed_dim % self.num_heads == 0,
             f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        need(self.mlp_ratio > 0 and int(self.embed_dim * self.mlp_ratio) > 0, f"mlp_ratio must be positive, got {self.mlp_ratio}")
        need(self.global_pool in ("token", "mean"), f"global_pool must be 'token' or 'mean', got {self.global_pool!r}")
        need(not (self.distilled and self.global_pool != "token"), "a distilled model pools with global_pool='token'")
        need(self.gelu_approximate in ("none", "tanh"), f"gelu_approximate must be 'none' or 'tanh', got {self.gelu_approximate!r}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            need(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self):
        return 2 if self.distilled else 1

    @property
    def num_tokens(self):
        return self.num_patches + self.num_prefix_tokens

    @property
    def mlp_hidden(self):
        return int(self.embed_dim * self.mlp_ratio)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"ViTConfig: unknown fields {sorted(unknown)}; known fields are {sorted(known)}")
        return cls(**d)


PRESETS = {
    "deit-tiny": dict(image_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "deit-small": dict(image_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "deit-base": dict(image_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    # Small shapes for 2-core CPUs: 32x32 RGB (CIFAR-10, synthetic) and 28x28 grayscale.
    "cifar": dict(image_size=32, patch_size=4, in_chans=3, embed_dim=192, depth=6, num_heads=3, num_classes=10),
    "fashion-mnist": dict(image_size=28, patch_size=7, in_chans=1, embed_dim=96, depth=4, num_heads=4, num_classes=10),
}


def preset(name, **overrides):
    """A ViTConfig from a named preset with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ViTConfig(**{**PRESETS[name], **overrides})


def _trunc_normal(rng, shape, std, dtype):
    """timm's trunc_normal_(std) with bounds +-2 (absolute, so effectively +-2 for std=.02: no
    truncation in practice); we truncate at 2 std, the usual intent."""
    x = rng.standard_normal(shape)
    bad = np.abs(x) > 2.0
    while bad.any():
        x[bad] = rng.standard_normal(bad.sum())
        bad = np.abs(x) > 2.0
    return (x * std).astype(dtype)


def _quantize(quantizer, x, training):
    """quantizer.forward(x, training), or (x, None) for a tensor without a quantizer."""
    return (x, None) if quantizer is None else quantizer.forward(x, training)


def _quantize_backward(quantizer, dout, cache, out=None):
    """quantizer.backward(dout, cache): (d input, parameter gradients); (dout, {}) without one.
    out: where the caller wants d input (a view of a larger gradient): a quantizer whose backward
    takes it (``backward_takes_out``) writes d input there; others return a new array."""
    if quantizer is None:
        return dout, {}
    if out is not None and out is not dout and getattr(quantizer, "backward_takes_out", False):
        return quantizer.backward(dout, cache, out=out)
    return quantizer.backward(dout, cache)


def _gradient_passes(quantizer):
    """True when the quantizer's backward hands dout on unchanged (or there is none): the product before
    it may then write dout straight into the gradient's final place."""
    return quantizer is None or getattr(quantizer, "backward_returns_dout", False)


def _recompute(quantizer, cache):
    """The quantizer's forward output again from its cache (its ``recompute``): the same bits as
    the forward's output."""
    return quantizer.recompute(cache)


def _recomputable(quantizer, cache):
    """Whether _recompute can give the output from this cache (the quantizer's ``can_recompute``)."""
    return getattr(quantizer, "can_recompute", lambda cache: False)(cache)


def _exact_form(quantizer, cache, kind):
    """The quantizer output's ``integer_form`` (levels, scale), its ``level_bound`` (max |levels|) or
    ``basis_form`` (bases, scales) (see minibvit.quant and the GSB quantizers), or None."""
    form = getattr(quantizer, kind, None)
    return None if form is None else form(cache)


def _quantized_product(qa, ca, qb, cb, a_shape=None, transpose_b=False):
    """The one quantized matmul: a @ b (b transposed with transpose_b, a's levels reshaped to
    a_shape) of two quantizer outputs, computed exactly from their integer forms, or None when they
    have none in common (the caller then multiplies the float values).

    Both sums of scaled integer bases (GSB): ops.basis_matmul. Both packed bits (binary):
    ops.packed_matmul. 8-bit activation bytes and a weight's byte quads (TerViT): ops.byte_matmul.
    Both integer levels times one scale,
    a's a scalar (per tensor) and b's a scalar or one per output column (a weight's per channel):
    ops.levels_matmul, (levels_a @ levels_b) * (scale_a * scale_b). The packed engine computes the
    same integers with popcounts and applies the same scales, so both get the same bits."""
    def shaped_a(t):
        return t if a_shape is None else t.reshape(a_shape)

    def shaped_b(t):
        return t.swapaxes(-1, -2) if transpose_b else t

    pa, pb = _exact_form(qa, ca, "packed_basis_form"), _exact_form(qb, cb, "packed_basis_form")
    if pa is not None and pb is not None and a_shape is None and not transpose_b:
        return ops.packed_basis_matmul(pa[0], pa[1], pb[0], pb[1], pb[2], pa[2], pa[3])
    ba, bb = _exact_form(qa, ca, "basis_form"), _exact_form(qb, cb, "basis_form")
    if ba is not None and bb is not None:
        return ops.basis_matmul([shaped_a(p) for p in ba[0]], ba[1], [shaped_b(u) for u in bb[0]], bb[1],
                                ba[0][0].dtype)
    if transpose_b and a_shape is not None:  # a linear layer: 8-bit activations x small integer weights
        fa = _exact_form(qa, ca, "byte_form")
        fb = None if fa is None else _exact_form(qb, cb, "weight_quad_form")
        if fb is not None:
            w_bound = _exact_form(qb, cb, "level_bound")
            product = ops.byte_matmul(fa[0].reshape(a_shape), fa[1], fa[2], fb[0], fb[1], fb[2], fb[1].shape[0],
                                      127 if w_bound is None else w_bound)
            if product is not None:
                return product
    pa = None if getattr(qa, "packed_form", None) is None else qa.packed_form(ca, -1)
    pb = None if pa is None or getattr(qb, "packed_form", None) is None else qb.packed_form(cb, -1 if transpose_b else -2)
    if pb is not None:
        product = ops.packed_matmul(pa[0], pa[1], pa[2], pb[0], pb[1], pb[2], pa[3])
        if product is not None:
            return product if a_shape is None else product.reshape(-1, product.shape[-1])
    ia, ib = _exact_form(qa, ca, "integer_form"), _exact_form(qb, cb, "integer_form")
    if ia is None or ib is None or np.ndim(ia[1]) != 0:
        return None
    return ops.levels_matmul(shaped_a(ia[0]), ia[1], shaped_b(ib[0]), ib[1],
                             _exact_form(qa, ca, "level_bound"), _exact_form(qb, cb, "level_bound"))


def _written_to(x, out):
    """x, stored in out (no copy when x already is out)."""
    if x is out:
        return x
    out[...] = x
    return out


class ViT:
    """A ViT with hand-written backward and a quantizer on any tensor.

    model = ViT(cfg, quantizers=None, dtype=np.float32, seed=0)
    logits, cache = model.forward(x, training=True, rng=rng)   # x: (B, C, H, W)
    model.backward(dlogits, cache)                              # fills model.grads

    ``logits`` is (B, classes), or for a distilled model a pair (cls_logits, dist_logits) in
    training and their mean in evaluation (DeiT). ``quantizers`` maps tensor roles to quantizer
    objects (see minibvit.methods.build_quantizers); roles absent from it stay full precision.
    """

    def __init__(self, cfg, quantizers=None, dtype=np.float32, seed=0):
        self.cfg = cfg
        self.dtype = np.dtype(dtype)
        self.quantizers = dict(quantizers or {})
        self.params = self._init_params(np.random.default_rng(seed))
        self.grads = {}

    # ------------------------------------------------------------------------------------------
    # parameters and state

    def _init_params(self, rng):
        c, dt = self.cfg, self.dtype
        D, Hd = c.embed_dim, c.mlp_hidden
        p = {
            "cls_token": _trunc_normal(rng, (1, 1, D), 0.02, dt),
            "pos_embed": _trunc_normal(rng, (1, c.num_tokens, D), 0.02, dt),
            "patch_embed.proj.weight": _trunc_normal(rng, (D, c.in_chans, c.patch_size, c.patch_size), 0.02, dt),
            "patch_embed.proj.bias": np.zeros(D, dt),
        }
        if c.distilled:
            p["dist_token"] = _trunc_normal(rng, (1, 1, D), 0.02, dt)
        for i in range(c.depth):
            b = f"blocks.{i}"
            p[f"{b}.norm1.weight"] = np.ones(D, dt)
            p[f"{b}.norm1.bias"] = np.zeros(D, dt)
            p[f"{b}.attn.qkv.weight"] = _trunc_normal(rng, (3 * D, D), 0.02, dt)
            if c.qkv_bias:
                p[f"{b}.attn.qkv.bias"] = np.zeros(3 * D, dt)
            p[f"{b}.attn.proj.weight"] = _trunc_normal(rng, (D, D), 0.02, dt)
            p[f"{b}.attn.proj.bias"] = np.zeros(D, dt)
            p[f"{b}.norm2.weight"] = np.ones(D, dt)
            p[f"{b}.norm2.bias"] = np.zeros(D, dt)
            p[f"{b}.mlp.fc1.weight"] = _trunc_normal(rng, (Hd, D), 0.02, dt)
            p[f"{b}.mlp.fc1.bias"] = np.zeros(Hd, dt)
            p[f"{b}.mlp.fc2.weight"] = _trunc_normal(rng, (D, Hd), 0.02, dt)
            p[f"{b}.mlp.fc2.bias"] = np.zeros(D, dt)
        p["norm.weight"] = np.ones(D, dt)
        p["norm.bias"] = np.zeros(D, dt)
        p["head.weight"] = _trunc_normal(rng, (c.num_classes, D), 0.02, dt)
        p["head.bias"] = np.zeros(c.num_classes, dt)
        if c.distilled:
            p["head_dist.weight"] = _trunc_normal(rng, (c.num_classes, D), 0.02, dt)
            p["head_dist.bias"] = np.zeros(c.num_classes, dt)
        return p

    def parameters(self):
        """All learnable arrays by name: the ViT's own and every quantizer's
        (``<role>_quant.<param>``, e.g. ``blocks.0.attn.qkv.input_quant.alpha``)."""
        out = dict(self.params)
        for role, q in self.quantizers.items():
            for name, arr in q.params.items():
                out[f"{role}_quant.{name}"] = arr
        return out

    def buffers(self):
        """Non-learnable state (e.g. running activation centres), ``<role>_quant.<buffer>``."""
        return {f"{role}_quant.{name}": arr for role, q in self.quantizers.items() for name, arr in q.buffers.items()}

    def state_dict(self):
        """Every parameter and buffer by name (NumPy arrays, PyTorch shapes; not copies)."""
        return {**self.parameters(), **self.buffers()}

    def load_state_dict(self, state, strict=True):
        """Copy arrays into the model in place. With strict, missing or unexpected names and any
        shape mismatch raise a ValueError that lists them."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        bad_shapes = [f"{k}: checkpoint {tuple(np.shape(state[k]))} vs model {own[k].shape}"
                      for k in own if k in state and tuple(np.shape(state[k])) != own[k].shape]
        if bad_shapes or (strict and (missing or unexpected)):
            raise ValueError("state_dict does not match the model:"
                             + (f"\n  missing: {missing}" if missing else "")
                             + (f"\n  unexpected: {unexpected}" if unexpected else "")
                             + (f"\n  shape mismatch: {bad_shapes}" if bad_shapes else ""))
        for k, arr in own.items():
            if k in state:
                arr[...] = np.asarray(state[k], dtype=arr.dtype)

    # ------------------------------------------------------------------------------------------
    # building blocks: the quantizers composed around minibvit.ops (here and nowhere else)

    def _linear_forward(self, name, x, training, bias=True):
        """Linear layer ``name`` with its weight and input quantizers (roles ``name.weight`` and
        ``name.input``): y = x_q @ w_q.T + b, the product exact on the integer levels when both
        operands have them (_quantized_product)."""
        wz, xz = self.quantizers.get(f"{name}.weight"), self.quantizers.get(f"{name}.input")
        w_q, cw = _quantize(wz, self.params[f"{name}.weight"], training)
        x_q, cx = _quantize(xz, x, training)
        product = _quantized_product(xz, cx, wz, cw, a_shape=(-1, x.shape[-1]), transpose_b=True)
        y, cl = ops.linear_forward(x_q, w_q, self.params.get(f"{name}.bias") if bias else None, product=product)
        if product is not None and _recomputable(xz, cx):
            cl = (None,) + cl[1:]  # backward recomputes x_q from the quantizer's cache: one float copy fewer held
        return y, (name, wz, xz, cw, cx, cl)

    def _linear_backward(self, dy, cache):
        name, wz, xz, cw, cx, cl = cache
        if cl[0] is None:  # the quantized input, recomputed for dW (the forward's bits, _linear_forward)
            x_q = _recompute(xz, cx)
            cl = (x_q.reshape(-1, x_q.shape[-1]),) + cl[1:]
        dx_q, dw_q, db = ops.linear_backward(dy, cl)
        dx, gx = _quantize_backward(xz, dx_q, cx)
        dw, gw = _quantize_backward(wz, dw_q, cw)
        self._accumulate(f"{name}.weight", dw)
        if db is not None:
            self._accumulate(f"{name}.bias", db)
        self._accumulate_quant(f"{name}.input", gx)
        self._accumulate_quant(f"{name}.weight", gw)
        return dx

    def _attention_forward(self, b, q, k, v, training, rng):
        """ops.attention_forward's steps with block b's quantizers between them (roles
        ``blocks.<i>.attn.{q,k,attn,v}``; identity where absent):

            S = (Q_q K_q^T) / sqrt(d),  A = softmax(S),  A_q = quant_attn(A),  O = dropout(A_q) V_q

        with Q_q = quant_q(Q), K_q = quant_k(K), V_q = quant_v(V). The scale is applied after the
        product, as in BiT, so that binary Q K^T stays an integer product; both products are
        computed on the integer levels when the operands have them (_quantized_product)."""
        qz, kz, az, vz = (self.quantizers.get(f"{b}.attn.{t}") for t in ("q", "k", "attn", "v"))
        q_q, cq = _quantize(qz, q, training)
        k_q, ck = _quantize(kz, k, training)
        exact = _quantized_product(qz, cq, kz, ck, transpose_b=True)
        scores, c_scores = ops.attention_scores_forward(q_q, k_q, product=exact)
        if exact is not None and _recomputable(qz, cq) and _recomputable(kz, ck):
            c_scores = (None, None) + c_scores[2:]  # recomputed in backward (_linear_forward's reason)
        attn, c_soft = ops.softmax_forward(scores)
        a_q, ca = _quantize(az, attn, training)
        a_d, c_drop = ops.dropout_forward(a_q, self.cfg.attn_drop_rate, rng, training)
        v_q, cv = _quantize(vz, v, training)
        exact = _quantized_product(az, ca, vz, cv) if c_drop is None else None  # dropout breaks the levels
        o, c_values = ops.attention_values_forward(a_d, v_q, product=exact)
        if exact is not None and _recomputable(az, ca) and _recomputable(vz, cv):
            c_values = (None, None)
        return o, (qz, kz, az, vz, cq, ck, ca, cv, c_scores, c_soft, c_drop, c_values)

    def _attention_backward(self, b, dout, cache, out):
        """_attention_forward reversed; out: the (dq, dk, dv) views of split_heads_grad_views
        (written straight into where no quantizer comes after them). Accumulates the quantizers'
        parameter gradients."""
        qz, kz, az, vz, cq, ck, ca, cv, c_scores, c_soft, c_drop, c_values = cache
        if c_values[0] is None:
            c_values = (_recompute(az, ca), _recompute(vz, cv))
        if c_scores[0] is None:
            c_scores = (_recompute(qz, cq), _recompute(kz, ck)) + c_scores[2:]
        dq_out, dk_out, dv_out = out
        da_d, dv_q = ops.attention_values_backward(dout, c_values, out=dv_out if _gradient_passes(vz) else None)
        dv, gv = _quantize_backward(vz, dv_q, cv, out=dv_out)
        da_q = ops.dropout_backward(da_d, c_drop)
        dattn, ga = _quantize_backward(az, da_q, ca)
        dscores = ops.softmax_backward(dattn, c_soft)
        dq_q, dk_q = ops.attention_scores_backward(dscores, c_scores, out=(dq_out if _gradient_passes(qz) else None,
                                                                         dk_out if _gradient_passes(kz) else None))
        dq, gq = _quantize_backward(qz, dq_q, cq, out=dq_out)
        dk, gk = _quantize_backward(kz, dk_q, ck, out=dk_out)
        for t, grads in (("v", gv), ("attn", ga), ("q", gq), ("k", gk)):
            self._accumulate_quant(f"{b}.attn.{t}", grads)
        return _written_to(dq, dq_out), _written_to(dk, dk_out), _written_to(dv, dv_out)

    def _accumulate(self, name, g):
        self.grads[name] = self.grads[name] + g if name in self.grads else g

    def _accumulate_quant(self, role, grads):
        for pname, g in grads.items():
            self._accumulate(f"{role}_quant.{pname}", g)

    # ------------------------------------------------------------------------------------------
    # forward

    def _block_forward(self, i, x, training, rng):
        c, P, b = self.cfg, self.params, f"blocks.{i}"
        dpr = c.drop_path_rate * i / max(c.depth - 1, 1)
        h, c_ln1 = ops.layernorm_forward(x, P[f"{b}.norm1.weight"], P[f"{b}.norm1.bias"], c.layernorm_eps)
        qkv, c_qkv = self._linear_forward(f"{b}.attn.qkv", h, training, bias=c.qkv_bias)
        (q, k, v), c_split = ops.split_heads_forward(qkv, c.num_heads)
        o, c_attn = self._attention_forward(b, q, k, v, training, rng)
        o, c_merge = ops.merge_heads_forward(o)
        a, c_proj = self._linear_forward(f"{b}.attn.proj", o, training)
        a, c_drop1 = ops.dropout_forward(a, c.drop_rate, rng, training)
        a, c_dp1 = ops.drop_path_forward(a, dpr, rng, training)
        x, _ = ops.residual_forward(x, a, out=a)  # a: the branch's fresh output, reused for the sum
        h, c_ln2 = ops.layernorm_forward(x, P[f"{b}.norm2.weight"], P[f"{b}.norm2.bias"], c.layernorm_eps)
        h, c_fc1 = self._linear_forward(f"{b}.mlp.fc1", h, training, bias=False)  # its bias: in the GELU pass
        h, c_gelu = ops.gelu_forward(h, c.gelu_approximate, bias=P[f"{b}.mlp.fc1.bias"])
        h, c_drop2 = ops.dropout_forward(h, c.drop_rate, rng, training)
        h, c_fc2 = self._linear_forward(f"{b}.mlp.fc2", h, training)
        h, c_drop3 = ops.dropout_forward(h, c.drop_rate, rng, training)
        h, c_dp2 = ops.drop_path_forward(h, dpr, rng, training)
        x, _ = ops.residual_forward(x, h, out=h)
        return x, (c_ln1, c_qkv, c_split, c_attn, c_merge, c_proj, c_drop1, c_dp1,
                   c_ln2, c_fc1, c_gelu, c_drop2, c_fc2, c_drop3, c_dp2)

    def forward(self, x, training=False, rng=None):
        """x: (B, C, H, W) normalised images in the model dtype.

        Returns (logits, cache): logits (B, classes), or for a distilled model the pair
        (cls_logits, dist_logits) when training and their mean when not.
        rng: numpy Generator for dropout and drop-path (needed only when those rates are > 0).
        """
        c, P = self.cfg, self.params
        expected = (c.in_chans, c.image_size, c.image_size)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(f"expected images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got {x.shape}; resize the data or change the model config")
        uses_rng = c.drop_rate > 0 or c.attn_drop_rate > 0 or c.drop_path_rate > 0
        if training and uses_rng and rng is None:
            raise ValueError("training with dropout or drop-path needs a numpy Generator: forward(..., rng=...)")
        x = x.astype(self.dtype, copy=False)
        pz, pxz = self.quantizers.get("patch_embed.proj.weight"), self.quantizers.get("patch_embed.proj.input")
        w_q, c_pw = _quantize(pz, P["patch_embed.proj.weight"], training)
        x_q, c_px = _quantize(pxz, x, training)
        t, c_pe = ops.patch_embed_forward(x_q, w_q, P["patch_embed.proj.bias"], c.patch_size)
        t, c_tok = ops.tokens_forward(t, P["pos_embed"], P["cls_token"], P.get("dist_token"))
        t, c_pos_drop = ops.dropout_forward(t, c.drop_rate, rng, training)
        c_blocks = []
        for i in range(c.depth):
            t, cb = self._block_forward(i, t, training, rng)
            c_blocks.append(cb)
        t, c_norm = ops.layernorm_forward(t, P["norm.weight"], P["norm.bias"], c.layernorm_eps)
        if c.distilled:
            logits, c_head = self._linear_forward("head", t[:, 0], training)
            logits_dist, c_head_dist = self._linear_forward("head_dist", t[:, 1], training)
            c_pool = t.shape
            out = (logits, logits_dist) if training else (logits + logits_dist) / 2
        else:
            pooled, c_pool = ops.pool_forward(t, c.global_pool, c.num_prefix_tokens)
            out, c_head = self._linear_forward("head", pooled, training)
            c_head_dist = None
        cache = (pz, pxz, c_pw, c_px, c_pe, c_tok, c_pos_drop, c_blocks, c_norm, c_pool, c_head, c_head_dist, training)
        return out, cache

    # ------------------------------------------------------------------------------------------
    # backward: the forward, reversed

    def _block_backward(self, i, dx, cache):
        (c_ln1, c_qkv, c_split, c_attn, c_merge, c_proj, c_drop1, c_dp1,
         c_ln2, c_fc1, c_gelu, c_drop2, c_fc2, c_drop3, c_dp2) = cache
        b = f"blocks.{i}"
        dx, dh = ops.residual_backward(dx, None)
        dh = ops.drop_path_backward(dh, c_dp2)
        dh = ops.dropout_backward(dh, c_drop3)
        dh = self._linear_backward(dh, c_fc2)
        dh = ops.dropout_backward(dh, c_drop2)
        dh, db = ops.gelu_backward(dh, c_gelu)
        self._accumulate(f"{b}.mlp.fc1.bias", db)
        dh = self._linear_backward(dh, c_fc1)
        dh, dg, db = ops.layernorm_backward(dh, c_ln2)
        self._accumulate(f"{b}.norm2.weight", dg)
        self._accumulate(f"{b}.norm2.bias", db)
        dx = ops.add(dx, dh, out=dh)  # the skip and branch gradients meet (dh: fresh from the LayerNorm)
        dx, da = ops.residual_backward(dx, None)
        da = ops.drop_path_backward(da, c_dp1)
        da = ops.dropout_backward(da, c_drop1)
        do = self._linear_backward(da, c_proj)
        do = ops.merge_heads_backward(do, c_merge)
        dq, dk, dv = self._attention_backward(b, do, c_attn, ops.split_heads_grad_views(c_split, do.dtype))
        dqkv = ops.split_heads_backward(dq, dk, dv, c_split)
        dh = self._linear_backward(dqkv, c_qkv)
        dh, dg, db = ops.layernorm_backward(dh, c_ln1)
        self._accumulate(f"{b}.norm1.weight", dg)
        self._accumulate(f"{b}.norm1.bias", db)
        return ops.add(dx, dh, out=dh)

    def backward(self, dlogits, cache, on_grads_ready=None):
        """Backpropagate d loss / d logits (same structure as forward's logits) through the model.
        Fills ``self.grads`` (a fresh dict, names as in ``parameters()``) and returns d images.
        on_grads_ready(names), if given, is called with the names whose gradients are complete: after
        the head and final norm, after each block (last block first) and after the stem."""
        (pz, pxz, c_pw, c_px, c_pe, c_tok, c_pos_drop, c_blocks, c_norm, c_pool, c_head, c_head_dist,
         training) = cache
        c = self.cfg
        self.grads = {}
        reported = 0

        def grads_ready():  # self.grads only gains names, so the new ones are its tail
            nonlocal reported
            if on_grads_ready is not None:
                on_grads_ready(list(self.grads)[reported:])
                reported = len(self.grads)

        if c.distilled:
            if training:
                dlogits, dlogits_dist = dlogits
            else:
                dlogits = dlogits_dist = dlogits / 2
            dt = np.zeros(c_pool, dtype=self.dtype)
            dt[:, 1] = self._linear_backward(dlogits_dist, c_head_dist)
            dt[:, 0] = self._linear_backward(dlogits, c_head)
        else:
            dpooled = self._linear_backward(dlogits, c_head)
            dt = ops.pool_backward(dpooled, c_pool)
        dt, dg, db = ops.layernorm_backward(dt, c_norm)
        self._accumulate("norm.weight", dg)
        self._accumulate("norm.bias", db)
        grads_ready()
        for i in reversed(range(c.depth)):
            dt = self._block_backward(i, dt, c_blocks[i])
            grads_ready()
        dt = ops.dropout_backward(dt, c_pos_drop)
        dt, dpos, dcls, ddist = ops.tokens_backward(dt, c_tok)
        self._accumulate("pos_embed", dpos)
        self._accumulate("cls_token", dcls)
        if ddist is not None:
            self._accumulate("dist_token", ddist)
        dx_q, dw_q, db = ops.patch_embed_backward(dt, c_pe)
        self._accumulate("patch_embed.proj.bias", db)
        dw, gw = _quantize_backward(pz, dw_q, c_pw)
        self._accumulate("patch_embed.proj.weight", dw)
        self._accumulate_quant("patch_embed.proj.weight", gw)
        dx, gx = _quantize_backward(pxz, dx_q, c_px)
        self._accumulate_quant("patch_embed.proj.input", gx)
        grads_ready()
        return dx
