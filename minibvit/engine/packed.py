"""PackedViT: a packed low-bit ViT (from engine.export) run end to end on the bit-packed kernels.

The blocks run by packed kind (engine.format.packed_kind): "binary" blocks image by image, in one
parallel region when every decision is tabulated (engine.binary_net) or one call per operation on
chunks of images; "gsb" the same operations with GSB's attention product; "ternary" (TerViT) block by
block with the ternary kernels and ops for everything else.
"""
import math
from dataclasses import dataclass

import numba
import numpy as np

from .. import kernels, ops, quant
from . import binary_net, fused, gsb_net, ternary_net
from .format import check_tensors, packed_kind, read_packed

CHUNK_BYTES = 16 << 20  # fc1 output bytes per chunk of images (binary / binaryvit; best measured, 2 cores)
_F32 = np.float32


@dataclass
class _Binarizer:
    """Run-time form of an activation binarizer: scale (float32 scalar), per-channel threshold
    (folded ASM centre + shift, zeros without ASM) or, with token=True, the shift added to each
    token's own mean."""

    scale: np.float32
    shift: np.ndarray
    token: bool


class PackedViT:
    """A packed low-bit ViT (from ``export``) run with the bit-packed kernels.

    engine = PackedViT.load(path)
    logits = engine.forward(x)     # x (B, C, H, W) float32 -> (B, classes) float32
    engine.predict(x)              # argmax class per image

    Attributes: cfg (ViTConfig), scheme (str), options (methods.QuantizerOptions), tensors (dict).
    """

    def __init__(self, cfg, scheme, options, tensors):
        self.kind = packed_kind(scheme)  # "binary" | "ternary" | "gsb"; ValueError for other methods
        self.cfg, self.scheme, self.options, self.tensors = cfg, scheme, options, tensors
        check_tensors(cfg, scheme, options, tensors)  # every tensor's dtype, shape and zero tail (format)
        self.patch_weight = self._dequantized("patch_embed.proj")  # float32 8-bit values, as the model
        self.heads = [self._head(name) for name in (("head", "head_dist") if cfg.distilled else ("head",))]
        self.inv_sqrt_d = _F32(1.0 / math.sqrt(cfg.embed_dim // cfg.num_heads))   # ops.attention_forward's
        self.blocks = [self._block(f"blocks.{i}") for i in range(cfg.depth)]
        self.net = self._stacked_binary_net()
        # images per chunk of the binary / binaryvit blocks: one at a time per thread in _binary_net
        # (best measured, with 2), else fc1's int32 output within CHUNK_BYTES
        self.chunk_images = 1 if self.net is not None else max(1, CHUNK_BYTES // (4 * cfg.num_tokens * cfg.mlp_hidden))
        self._dummy_f = np.zeros((1, 1), _F32)
        self._dummy_i = np.zeros((1, 1), np.int32)
        self._dummy_v = np.zeros(1, _F32)

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def load(cls, path):
        """Read a packed model file written by ``export`` (engine.format.read_packed: a
        CheckpointError naming the file for a missing, corrupt or foreign file, bad metadata or a
        tensor that does not match the format; a ValueError for another version)."""
        cfg, scheme, options, tensors, meta = read_packed(path)
        engine = cls(cfg, scheme, options, tensors)
        engine.metadata = meta
        return engine

    def _dequantized(self, name):
        """8-bit weight values (codes - 0) * scale, the float32 operations of minmax_quant_forward."""
        codes, scale = self.tensors[f"{name}.weight_codes"], self.tensors[f"{name}.weight_scale"]
        levels = codes.astype(_F32) - _F32(0)
        return levels * scale.reshape((-1,) + (1,) * (codes.ndim - 1))

    def _head(self, name):
        t = self.tensors
        return {"codes": t[f"{name}.weight_codes"], "scale": t[f"{name}.weight_scale"], "bias": t[f"{name}.bias"]}

    def _binarizer(self, name, channels):
        """The binarizer of role ``name`` from its tensors (present with their shapes: check_tensors)."""
        t = self.tensors
        token = f"{name}_shift" in t
        shift = t.get(f"{name}_shift" if token else f"{name}_threshold", np.zeros(channels, _F32))
        return _Binarizer(t[f"{name}_scale"].reshape(()), np.ascontiguousarray(shift, _F32), token)

    def _block(self, b):
        c, t = self.cfg, self.tensors
        D, Hd = c.embed_dim, c.mlp_hidden
        d = D // c.num_heads
        blk = {"norm1": (t[f"{b}.norm1.weight"], t[f"{b}.norm1.bias"]),
               "norm2": (t[f"{b}.norm2.weight"], t[f"{b}.norm2.bias"])}
        for name, k, n in (("attn.qkv", D, 3 * D), ("attn.proj", D, D), ("mlp.fc1", D, Hd), ("mlp.fc2", Hd, D)):
            lin = {"k": k, "bias": t.get(f"{b}.{name}.bias", np.zeros(n, _F32)),
                   "w_scale": t[f"{b}.{name}.weight_scale"]}
            if self.kind == "ternary":  # weight quads and offsets laid out once (engine.ternary_net)
                blk[name] = ternary_net.TernaryLinear(t[f"{b}.{name}.weight_nonzero"], t[f"{b}.{name}.weight_sign"],
                                                      k, lin["w_scale"], lin["bias"])
                continue
            lin["bits"] = t[f"{b}.{name}.weight_bits"]
            x = self._binarizer(f"{b}.{name}.input", k)
            lin["input"] = x
            lin["scale"] = x.scale * lin["w_scale"]          # = ix[1] * iw[1] of the simulated forward
            lin["colsum"] = (k - 2 * np.bitwise_count(lin["bits"]).sum(axis=0, dtype=np.int64)).astype(np.int32)
            blk[name] = lin
        if self.kind == "ternary":
            return blk
        gsb = self.kind == "gsb"
        for name in ("q", "k") + (() if gsb else ("attn", "v")):
            blk[name] = self._binarizer(f"{b}.attn.{name}", c.num_tokens if name == "attn" else d)
        if gsb:
            blk["gsb"] = {key: t[f"{b}.attn.{key}"] for key in ("attn_alphas", "attn_bias", "v_alphas", "v_shift")}
        else:
            blk["s_av"] = blk["attn"].scale * blk["v"].scale
        blk["s_qk"] = blk["q"].scale * blk["k"].scale
        blk["exp_table"] = fused.exp_table(d, blk["s_qk"], self.inv_sqrt_d)
        blk["exp_monotone"] = fused.table_is_monotone(blk["exp_table"])
        # Decision intervals: the bits of a binarizer on a binary linear's output, taken straight
        # from the integer accumulator (exact: tabulated with the same float operations). Not for
        # input-adaptive ASM 'token' thresholds, nor for GSB's values (their float values are needed).
        qkv, fc1 = blk["attn.qkv"], blk["mlp.fc1"]
        fc2_input, proj_input = blk["mlp.fc2"]["input"], blk["attn.proj"]["input"]
        if not gsb and not any(blk[name].token for name in ("q", "k", "v")):
            threshold = np.concatenate([np.tile(blk[name].shift, c.num_heads) for name in ("q", "k", "v")])
            blk["qkv_intervals"] = fused.decision_intervals(fused.decision_table(
                fused.linear_values(D, qkv["scale"], qkv["bias"]), threshold))
        if not fc2_input.token:
            blk["fc1_intervals"] = fused.decision_intervals(fused.decision_table(
                fused.linear_values(D, fc1["scale"], fc1["bias"]), fc2_input.shift, fc2_input.scale,
                c.gelu_approximate))
            if blk["fc1_intervals"] is not None:
                blk["fc1_operands"] = fused.interval_operands(blk["fc1_intervals"])
        if not gsb and not proj_input.token:
            values = fused.linear_values(c.num_tokens, np.full(D, blk["s_av"], _F32), np.zeros(D, _F32))
            blk["heads_intervals"] = fused.decision_intervals(fused.decision_table(values, proj_input.shift))
        return blk

    def _stacked_binary_net(self):
        """The stacked per-block arrays of _binary_net when every decision of every block is
        tabulated (binary, binaryvit without the 'token' centre), else None."""
        names = ("qkv_intervals", "heads_intervals", "fc1_intervals")
        if self.kind != "binary" or any(blk.get(n) is None for blk in self.blocks for n in names):
            return None

        def stack(get, dtype=None):
            return np.ascontiguousarray(np.stack([get(blk) for blk in self.blocks]), dtype)

        def intervals(name):
            operands = [fused.interval_operands(blk[name]) for blk in self.blocks]
            return tuple(np.stack([o[i] for o in operands]) for i in range(3))

        def panels(name):
            return stack(lambda blk: binary_net.weight_panels(blk[name]["bits"]))

        return binary_net.BinaryNet(
            stack(lambda blk: blk["norm1"][0], _F32), stack(lambda blk: blk["norm1"][1], _F32),
            stack(lambda blk: blk["attn.qkv"]["input"].shift, _F32),
            panels("attn.qkv"), *intervals("qkv_intervals"),
            stack(lambda blk: blk["exp_table"]), stack(lambda blk: blk["exp_table"], np.float64),
            stack(lambda blk: blk["exp_monotone"]), stack(lambda blk: blk["attn"].scale, _F32),
            stack(lambda blk: fused.level_threshold(_F32(blk["attn"].scale)), _F32),
            *intervals("heads_intervals"),
            panels("attn.proj"), stack(lambda blk: blk["attn.proj"]["scale"], _F32),
            stack(lambda blk: blk["attn.proj"]["bias"], _F32),
            stack(lambda blk: blk["norm2"][0], _F32), stack(lambda blk: blk["norm2"][1], _F32),
            stack(lambda blk: blk["mlp.fc1"]["input"].shift, _F32),
            panels("mlp.fc1"), *intervals("fc1_intervals"),
            panels("mlp.fc2"), stack(lambda blk: blk["mlp.fc2"]["colsum"]),
            stack(lambda blk: blk["mlp.fc2"]["scale"], _F32), stack(lambda blk: blk["mlp.fc2"]["bias"], _F32),
            _F32(self.cfg.layernorm_eps))

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x):
        """Logits (B, classes) float32 of images x (B, C, H, W) (cast to float32). A distilled
        model returns the mean of its two heads, as ViT.forward in evaluation."""
        c = self.cfg
        x = np.asarray(x)
        expected = (c.in_chans, c.image_size, c.image_size)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(f"expected images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got {x.shape}; resize the data or use a model built for it")
        x = x.astype(_F32, copy=False)
        B, N, D = x.shape[0], c.num_tokens, c.embed_dim
        stream = np.ascontiguousarray(self._embed(x).reshape(B * N, D))
        if self.kind == "ternary":
            ternary_net.tervit_blocks(stream, self.blocks, c, B, self.inv_sqrt_d)
        elif self.net is not None:
            groups = min(B, numba.get_num_threads())
            binary_net.run_binary_net(stream, B, N, c.num_heads, self.net, groups, self.chunk_images)
        elif self.kind == "gsb":
            self._binary_blocks(stream, B)
        else:
            # binary / binaryvit blocks treat every image on its own: run them on chunks of images
            # (the same bits, less memory traffic between the kernels)
            chunks = -(-B // self.chunk_images)
            bounds = [B * i // chunks for i in range(chunks + 1)]
            for start, stop in zip(bounds[:-1], bounds[1:]):
                self._binary_blocks(stream[start * N:stop * N], stop - start)
        return self._head_forward(stream.reshape(B, N, D))

    def predict(self, x):
        """Predicted class per image: argmax of forward(x)."""
        return self.forward(x).argmax(axis=1)

    def _embed(self, x):
        """8-bit patch embedding as ViT.forward computes it (float matmul of the 8-bit values) and
        the class / distillation tokens plus position embedding: (B, N, D)."""
        t, c = self.tensors, self.cfg
        B, p, D = x.shape[0], c.patch_size, c.embed_dim
        scale = _F32(fused.max_abs(x.reshape(-1))) / _F32(127)             # quant.minmax_codes, signed 8-bit
        scale = scale if scale > 0 else _F32(1)
        patches = np.empty((B * c.num_patches, c.in_chans * p * p), _F32)
        fused.quantized_patches(np.ascontiguousarray(x), scale, p, patches)
        tokens = patches @ self.patch_weight.reshape(D, -1).T         # ops.patch_embed_forward
        tokens += t["patch_embed.proj.bias"]
        tokens, _ = ops.tokens_forward(tokens.reshape(B, c.num_patches, D), t["pos_embed"], t["cls_token"],
                                       t.get("dist_token"))
        return tokens

    def _head_forward(self, x):
        """Final LayerNorm (only on the rows the pooling reads), pooling and the 8-bit head(s)."""
        c, t = self.cfg, self.tensors
        rows = x[:, :c.num_prefix_tokens] if c.global_pool == "token" else x
        h, _ = ops.layernorm_forward(np.ascontiguousarray(rows), t["norm.weight"], t["norm.bias"], c.layernorm_eps)
        pooled = [h[:, 0], h[:, 1]] if c.distilled else [ops.pool_forward(h, c.global_pool, c.num_prefix_tokens)[0]]
        logits = []
        for head, inp in zip(self.heads, pooled):
            codes, x_scale, _ = quant.minmax_codes(inp, 8, True, None)     # the head's input quantizer
            y = fused.int8_matmul(codes, head["codes"]).astype(_F32)           # exact, as ops.integer_matmul
            y *= x_scale.reshape(()) * head["scale"]                         # ops.linear_forward's epilogue
            y += head["bias"]
            logits.append(y)
        return (logits[0] + logits[1]) / 2 if c.distilled else logits[0]

    # -- binary, binaryvit, gsb ---------------------------------------------------------------

    def _norm_pack(self, stream, B, norm, binarizer, add_mode=0, add=None, acc=None, lin=None):
        """Residual add into the stream [B*N, D] in place (add_mode 1: add = proj output; 2: acc =
        fc2's integer accumulator with lin = fc2), then LayerNorm `norm` and the packed bits of the
        next linear's input `binarizer` [B*N, ceil(D / 64)]; binarizer None: the residual add only."""
        c = self.cfg
        gamma, beta = norm if norm is not None else (self._dummy_v, self._dummy_v)
        eps = _F32(c.layernorm_eps)
        add = self._dummy_f if add is None else add
        acc, colsum, scale, bias = ((self._dummy_i, self._dummy_i[0], self._dummy_v, self._dummy_v) if lin is None
                                    else (acc, lin["colsum"], lin["scale"], lin["bias"]))
        if binarizer is None:
            fused.residual_norm_pack(stream, add, acc, colsum, scale, bias, add_mode, gamma, beta, eps,
                                self._dummy_v, np.zeros((1, 1), np.uint64), self._dummy_f, 0)
            return None
        bits = np.empty((stream.shape[0], (stream.shape[1] + 63) // 64), np.uint64)
        if not binarizer.token:
            fused.residual_norm_pack(stream, add, acc, colsum, scale, bias, add_mode, gamma, beta, eps,
                                binarizer.shift, bits, self._dummy_f, 1)
            return bits
        h = np.empty_like(stream)
        fused.residual_norm_pack(stream, add, acc, colsum, scale, bias, add_mode, gamma, beta, eps,
                            binarizer.shift, bits, h, 2)
        centres = h.reshape(B, c.num_tokens, c.embed_dim).mean(axis=-1, keepdims=True)  # as binaryvit.ASM
        fused.pack_signed_rows(h, np.ascontiguousarray(centres.reshape(-1)), binarizer.shift, bits)
        return bits

    def _binary_blocks(self, stream, B):
        c = self.cfg
        D, Hd = c.embed_dim, c.mlp_hidden
        blocks = self.blocks
        bits = self._norm_pack(stream, B, blocks[0]["norm1"], blocks[0]["attn.qkv"]["input"])
        for i, blk in enumerate(blocks):
            proj, fc2 = blk["attn.proj"], blk["mlp.fc2"]
            bits = self._attention_bits(blk, self._qkv_bits(blk, bits, B), B)
            a = kernels.binary_gemm(bits, proj["bits"], D, col_scale=proj["scale"], bias=proj["bias"])
            bits = self._norm_pack(stream, B, blk["norm2"], blk["mlp.fc1"]["input"], add_mode=1, add=a)
            bits = self._fc1_bits(blk, bits, B)
            acc = kernels.binary_gemm(bits, fc2["bits"], Hd)
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            bits = self._norm_pack(stream, B, nxt and nxt["norm1"], nxt and nxt["attn.qkv"]["input"],
                                   add_mode=2, acc=acc, lin=fc2)

    def _fc1_bits(self, blk, bits, B):
        """fc1 then GELU then the fc2 input binarizer: packed bits [M, ceil(Hd / 64)] (+-1 recoding); from
        the decision intervals on fc1's integer accumulator where they exist (binary_net's way)."""
        c, fc1, binarizer = self.cfg, blk["mlp.fc1"], blk["mlp.fc2"]["input"]
        out = np.empty((bits.shape[0], (c.mlp_hidden + 63) // 64), np.uint64)
        if "fc1_operands" in blk:  # every decision tabulated on the integer accumulator: no float GELU
            fused.pack_interval_tasks(kernels.binary_gemm(bits, fc1["bits"], c.embed_dim), *blk["fc1_operands"], out)
            return out
        f = kernels.binary_gemm(bits, fc1["bits"], c.embed_dim, col_scale=fc1["scale"], bias=fc1["bias"])
        g, _ = ops.gelu_forward(f, c.gelu_approximate)
        centres = np.zeros(g.shape[0], _F32)
        if binarizer.token:
            centres = np.ascontiguousarray(g.reshape(B, c.num_tokens, -1).mean(axis=-1).reshape(-1))  # binaryvit.ASM
        fused.pack_unsigned_rows(g, centres, binarizer.shift, binarizer.scale, out)
        return out

    def _qkv_bits(self, blk, bits, B):
        """qkv linear and the q, k, v binarizers: (qk_bits [2, B*H, N, Wd], vt_bits [B*H, d, Wn] or, for
        GSB, the (min, max) of its values yv (gsb_net.pack_qk_value_range), the qkv values [B*N, 3D]
        float32)."""
        c, qkv = self.cfg, blk["attn.qkv"]
        N, H, D = c.num_tokens, c.num_heads, c.embed_dim
        d = D // H
        qk_bits = np.empty((2, B * H, N, (d + 63) // 64), np.uint64)
        values = kernels.binary_gemm(bits, qkv["bits"], D, col_scale=qkv["scale"], bias=qkv["bias"])
        views = values.reshape(B, N, 3, H, d).transpose(2, 0, 3, 1, 4)   # q, k, v (B, H, N, d), as the model
        centres = np.zeros((3, B * H * N), _F32)
        shifts = np.zeros((3, d), _F32)
        for t, name in enumerate(("q", "k", "v")):
            if name in blk:  # GSB's v has its own quantizer (_gsb_product)
                shifts[t] = blk[name].shift
                if blk[name].token:
                    centres[t] = views[t].mean(axis=-1).reshape(-1)                   # as binaryvit.ASM
        if self.kind == "gsb":
            v_shift = np.ascontiguousarray(blk["gsb"]["v_shift"], _F32)
            return qk_bits, gsb_net.pack_qk_value_range(values, B, N, H, centres, shifts, qk_bits, v_shift), values
        vt_bits = np.zeros((B * H, d, (N + 63) // 64), np.uint64)
        fused.pack_qkv(values, B, N, H, centres, shifts, qk_bits, vt_bits)
        return qk_bits, vt_bits, values

    def _attention_bits(self, blk, qkv_bits, B):
        """Attention from the packed q, k, v to the proj input's packed bits [B*N, Wd]."""
        c = self.cfg
        N, H, D = c.num_tokens, c.num_heads, c.embed_dim
        d = D // H
        qk_bits, vt_bits, qkv_values = qkv_bits
        scores = kernels.binary_bmm(qk_bits[0], qk_bits[1], d)
        if self.kind == "gsb":
            o, o_scale = self._gsb_product(blk, scores, qkv_values, vt_bits, B), _F32(1.0)
        else:
            p_bits = np.empty((B * H * N, (N + 63) // 64), np.uint64)
            fused.score_softmax(scores.reshape(-1, N), blk["exp_table"], blk["exp_monotone"],
                                np.empty((0, N), _F32), _F32(blk["attn"].scale), p_bits)
            o, o_scale = kernels.and_bmm(p_bits.reshape(B * H, N, -1), vt_bits, N), blk["s_av"]
        bits = np.zeros((B * N, (D + 63) // 64), np.uint64)
        binarizer = blk["attn.proj"]["input"]
        centres = np.zeros(B * N, _F32)
        if binarizer.token:
            values = o.astype(_F32)
            values *= o_scale
            merged, _ = ops.merge_heads_forward(values.reshape(B, H, N, d))
            centres = np.ascontiguousarray(merged.mean(axis=-1).reshape(-1))             # as binaryvit.ASM
        fused.pack_heads(o, o_scale, N, H, centres, binarizer.shift, bits)
        return bits

    def _gsb_product(self, blk, scores, values, value_range, B):
        """GSB attention output A_q V_q [B*H, N, d] (float32) from the nine exact integer products
        of the binary bases, combined as kernels.gsb_combine does (engine.gsb_net)."""
        c = self.cfg
        N, H = c.num_tokens, c.num_heads
        probs, row_max = np.empty((scores.size // N, N), _F32), np.empty(scores.size // N, _F32)
        gsb_net.softmax_biased_max(scores.reshape(-1, N), blk["exp_table"], blk["gsb"]["attn_bias"], H, probs, row_max)
        return gsb_net.gsb_attention(probs, values, blk["gsb"], B, N, H, self.options.gsb_max_over, row_max,
                                     value_range)
