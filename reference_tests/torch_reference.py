"""An independent PyTorch Vision Transformer (timm's VisionTransformer layout and names), written
for the tests only. It shares no code with minibvit: weights go in as NumPy arrays by name.

Quantized variants plug a torch module per tensor role into ``quant`` (role -> nn.Module whose
forward maps a tensor to its quantized value, with autograd giving the pseudo-gradients); their
parameters are named ``<role>_quant.<param>`` like minibvit's.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F


class TorchViT(torch.nn.Module):
    def __init__(self, cfg, quant=None, dtype=torch.float64):
        super().__init__()
        self.cfg = cfg
        self.quant = dict(quant or {})
        D, Hd, c = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), cfg
        n_tok = (c.image_size // c.patch_size) ** 2 + (2 if c.distilled else 1)
        shapes = {
            "cls_token": (1, 1, D), "pos_embed": (1, n_tok, D),
            "patch_embed.proj.weight": (D, c.in_chans, c.patch_size, c.patch_size), "patch_embed.proj.bias": (D,),
            "norm.weight": (D,), "norm.bias": (D,), "head.weight": (c.num_classes, D), "head.bias": (c.num_classes,),
        }
        if c.distilled:
            shapes.update({"dist_token": (1, 1, D), "head_dist.weight": (c.num_classes, D), "head_dist.bias": (c.num_classes,)})
        for i in range(c.depth):
            b = f"blocks.{i}"
            shapes.update({
                f"{b}.norm1.weight": (D,), f"{b}.norm1.bias": (D,),
                f"{b}.attn.qkv.weight": (3 * D, D), f"{b}.attn.proj.weight": (D, D), f"{b}.attn.proj.bias": (D,),
                f"{b}.norm2.weight": (D,), f"{b}.norm2.bias": (D,),
                f"{b}.mlp.fc1.weight": (Hd, D), f"{b}.mlp.fc1.bias": (Hd,),
                f"{b}.mlp.fc2.weight": (D, Hd), f"{b}.mlp.fc2.bias": (D,),
            })
            if c.qkv_bias:
                shapes[f"{b}.attn.qkv.bias"] = (3 * D,)
        self.p = {k: torch.zeros(s, dtype=dtype, requires_grad=True) for k, s in shapes.items()}

    def named_params(self):
        out = dict(self.p)
        for role, module in self.quant.items():
            for name, t in module.named_parameters():
                out[f"{role}_quant.{name}"] = t
        return out

    def load_numpy(self, state):
        with torch.no_grad():
            for k, t in self.named_params().items():
                t.copy_(torch.from_numpy(np.asarray(state[k])).to(t.dtype))
            for role, module in self.quant.items():
                for name, buf in module.named_buffers():
                    buf.copy_(torch.from_numpy(np.asarray(state[f"{role}_quant.{name}"])).to(buf.dtype))

    def q(self, role, t):
        return self.quant[role](t) if role in self.quant else t

    def linear(self, name, x):
        w = self.q(f"{name}.weight", self.p[f"{name}.weight"])
        return F.linear(self.q(f"{name}.input", x), w, self.p.get(f"{name}.bias"))

    def block(self, i, x):
        c, P, b = self.cfg, self.p, f"blocks.{i}"
        B, N, D = x.shape
        H = c.num_heads
        h = F.layer_norm(x, (D,), P[f"{b}.norm1.weight"], P[f"{b}.norm1.bias"], eps=c.layernorm_eps)
        qkv = self.linear(f"{b}.attn.qkv", h).reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q(f"{b}.attn.q", q), self.q(f"{b}.attn.k", k)
        attn = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D // H))
        attn = self.q(f"{b}.attn.attn", attn.softmax(dim=-1))
        o = (attn @ self.q(f"{b}.attn.v", v)).transpose(1, 2).reshape(B, N, D)
        x = x + self.linear(f"{b}.attn.proj", o)
        h = F.layer_norm(x, (D,), P[f"{b}.norm2.weight"], P[f"{b}.norm2.bias"], eps=c.layernorm_eps)
        h = F.gelu(self.linear(f"{b}.mlp.fc1", h), approximate=c.gelu_approximate)
        return x + self.linear(f"{b}.mlp.fc2", h)

    def forward(self, x, training=True):
        c, P = self.cfg, self.p
        w = self.q("patch_embed.proj.weight", P["patch_embed.proj.weight"])
        x = F.conv2d(self.q("patch_embed.proj.input", x), w, P["patch_embed.proj.bias"], stride=c.patch_size)
        x = x.flatten(2).transpose(1, 2)
        B = x.shape[0]
        prefix = [P["cls_token"].expand(B, -1, -1)]
        if c.distilled:
            prefix.append(P["dist_token"].expand(B, -1, -1))
        x = torch.cat(prefix + [x], dim=1) + P["pos_embed"]
        for i in range(c.depth):
            x = self.block(i, x)
        x = F.layer_norm(x, (c.embed_dim,), P["norm.weight"], P["norm.bias"], eps=c.layernorm_eps)
        if c.distilled:
            a, b = self.linear("head", x[:, 0]), self.linear("head_dist", x[:, 1])
            return (a, b) if training else (a + b) / 2
        pooled = x[:, 0] if c.global_pool == "token" else x[:, len(prefix):].mean(dim=1)
        return self.linear("head", pooled)
