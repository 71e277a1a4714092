"""Size and OPs accounting (minibvit.cost): parameter counts against the published numbers and against
the same modules built in PyTorch, hand-counted MACs/FLOPs of a tiny ViT, the bytes of packed layers,
and the internal consistency of totals and ratios."""
import json
import math

import pytest
from hypothesis import assume, given, settings, strategies as st

import adapter

pytestmark = pytest.mark.impl_specific  # tests minibvit itself (conftest.py: MINIBVIT_ONLY_MODULES)

cost = getattr(adapter, "cost", None)
if cost is None:  # until reference_tests/adapter.py re-exports the accounting module
    from minibvit import cost

torch = pytest.importorskip("torch", reason="the parameter-count references build the models in PyTorch")
nn = torch.nn

# timm / torchvision parameter counts and the papers' rounded numbers (DeiT Table 1, Swin Table 1):
# params (exact), params in M (1 decimal), FLOPs in G (= MACs; 1 decimal).
PUBLISHED = {
    "deit-tiny": (5_717_416, 5.7, 1.3),
    "deit-small": (22_050_664, 22.1, 4.6),
    "deit-base": (86_567_656, 86.6, 17.6),
    "swin-tiny": (28_288_354, 28.3, 4.5),
    "swin-small": (49_606_258, 49.6, 8.7),
}
LOW_BIT = ("binary", "binaryvit", "gsb", "tervit")


# ------------------------------------------------------------------------------------------------
# PyTorch references (timm module names, built on the meta device: shapes only, no memory)


def _torch_vit(s):
    D, hidden = s.embed_dim, int(s.embed_dim * s.mlp_ratio)
    n_tokens = (s.image_size // s.patch_size) ** 2 + 1
    m = nn.Module()
    m.patch_embed = nn.Module()
    m.patch_embed.proj = nn.Conv2d(s.in_chans, D, s.patch_size, s.patch_size)
    m.cls_token = nn.Parameter(torch.empty(1, 1, D))
    m.pos_embed = nn.Parameter(torch.empty(1, n_tokens, D))
    m.blocks = nn.ModuleList([_torch_block(D, hidden, s.qkv_bias) for _ in range(s.depth)])
    m.norm = nn.LayerNorm(D)
    m.head = nn.Linear(D, s.num_classes)
    return m


def _torch_block(dim, hidden, qkv_bias, rel_pos_table=None):
    b = nn.Module()
    b.norm1, b.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
    b.attn = nn.Module()
    b.attn.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
    b.attn.proj = nn.Linear(dim, dim)
    if rel_pos_table is not None:
        b.attn.relative_position_bias_table = nn.Parameter(torch.empty(*rel_pos_table))
    b.mlp = nn.Module()
    b.mlp.fc1, b.mlp.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
    return b


def _torch_swin(s):
    """Swin as in the official repository: PatchEmbed(conv + LayerNorm), BasicLayer(blocks,
    downsample=PatchMerging(LayerNorm(4C), Linear(4C, 2C, bias=False))) per stage, norm, head."""
    C, w = s.embed_dim, s.window_size
    m = nn.Module()
    m.patch_embed = nn.Module()
    m.patch_embed.proj = nn.Conv2d(s.in_chans, C, s.patch_size, s.patch_size)
    m.patch_embed.norm = nn.LayerNorm(C)
    m.layers = nn.ModuleList()
    for i, (depth, heads) in enumerate(zip(s.depths, s.num_heads)):
        stage = nn.Module()
        stage.blocks = nn.ModuleList([_torch_block(C, int(C * s.mlp_ratio), s.qkv_bias, ((2 * w - 1) ** 2, heads))
                                      for _ in range(depth)])
        if i < len(s.depths) - 1:
            stage.downsample = nn.Module()
            stage.downsample.norm = nn.LayerNorm(4 * C)
            stage.downsample.reduction = nn.Linear(4 * C, 2 * C, bias=False)
            C *= 2
        m.layers.append(stage)
    m.norm = nn.LayerNorm(C)
    m.head = nn.Linear(C, s.num_classes)
    return m


def _torch_params_by_module(model):
    """{module path (or parameter name for bare parameters): parameter count}."""
    out = {}
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        key = owner if leaf in ("weight", "bias") else name
        out[key] = out.get(key, 0) + p.numel()
    return out


def _torch_model(preset):
    s = cost.PRESETS[preset]
    with torch.device("meta"):
        return _torch_swin(s) if preset.startswith("swin") else _torch_vit(s)


# ------------------------------------------------------------------------------------------------
# parameter counts and published numbers


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_fp_parameters_equal_published_and_torch_built_counts(preset):
    exact, rounded_m, gflops = PUBLISHED[preset]
    report = cost.model_cost(preset, "fp")
    torch_counts = _torch_params_by_module(_torch_model(preset))
    assert report.totals.params == exact == sum(torch_counts.values()), (
        f"{preset}: cost {report.totals.params:,}, published {exact:,}, torch {sum(torch_counts.values()):,}")
    assert round(exact / 1e6, 1) == rounded_m
    ours = {r.name: r.params for r in report.rows if r.params}
    assert ours == torch_counts, (f"{preset}: per-layer counts differ: only ours "
                                  f"{sorted(set(ours.items()) - set(torch_counts.items()))[:5]}, only torch "
                                  f"{sorted(set(torch_counts.items()) - set(ours.items()))[:5]}")
    assert round(report.totals.macs / 1e9, 1) == gflops, f"{preset}: {report.totals.macs / 1e9:.3f} GMACs"
    assert report.totals.packed_bytes == report.totals.fp32_bytes == 4 * exact


@pytest.mark.parametrize("preset", ["deit-tiny", "deit-small"])
def test_adapter_vit_config_is_accepted_like_the_preset(preset):
    widths = {"deit-tiny": dict(embed_dim=192, num_heads=3), "deit-small": dict(embed_dim=384, num_heads=6)}[preset]
    cfg = adapter.ViTConfig(**widths)
    for method in ("fp", "binaryvit"):
        a, b = cost.model_cost(cfg, method), cost.model_cost(preset, method)
        assert a.totals == b.totals and a.reference == b.reference


# ------------------------------------------------------------------------------------------------
# hand-counted tiny ViT: 8x8 RGB, patch 4 (4 patches, 5 tokens), D = 8, 2 heads of 4, MLP 16, 3 classes

TINY = cost.ViTShape(image_size=8, patch_size=4, in_chans=3, embed_dim=8, depth=1, num_heads=2, mlp_ratio=2.0,
                     num_classes=3)
TINY_MACS = {
    "patch_embed.proj": 4 * 48 * 8,  # 4 patches x (3*4*4) x 8 = 1536
    "blocks.0.attn.qkv": 5 * 8 * 24,  # 960
    "blocks.0.attn.q@k": 2 * 5 * 5 * 4,  # heads x N x N x head_dim = 200
    "blocks.0.attn.a@v": 2 * 5 * 5 * 4,  # 200
    "blocks.0.attn.proj": 5 * 8 * 8,  # 320
    "blocks.0.mlp.fc1": 5 * 8 * 16,  # 640
    "blocks.0.mlp.fc2": 5 * 16 * 8,  # 640
    "head": 8 * 3,  # class token only: 24
}
# FP32 element-wise FLOPs (elementwise=True): per-element costs 7 LayerNorm, 5 softmax, 5 GELU, 1 add/scale.
TINY_ELEMENTWISE = {
    "patch_embed.proj": 4 * 8,  # bias
    "pos_embed": 5 * 8,
    "blocks.0.norm1": 7 * 5 * 8,
    "blocks.0.attn.qkv": 5 * 24,  # bias
    "blocks.0.attn.q@k": 2 * 5 * 5,  # 1/sqrt(d)
    "blocks.0.attn.softmax": 5 * 2 * 5 * 5,
    "blocks.0.attn.proj": 5 * 8,
    "blocks.0.add1": 5 * 8,
    "blocks.0.norm2": 7 * 5 * 8,
    "blocks.0.mlp.fc1": 5 * 16,
    "blocks.0.mlp.gelu": 5 * 5 * 16,
    "blocks.0.mlp.fc2": 5 * 8,
    "blocks.0.add2": 5 * 8,
    "norm": 7 * 5 * 8,
    "head": 3,
}


def test_tiny_vit_hand_counted_macs_and_fp_flops():
    report = cost.model_cost(TINY, "fp")
    assert {r.name: r.macs for r in report.rows if r.macs} == TINY_MACS
    assert report.totals.macs == report.totals.flops == 4520 and report.totals.bops == 0
    assert cost.model_cost(TINY, "fp", flops_per_mac=2).totals.flops == 9040
    ew = cost.model_cost(TINY, "fp", elementwise=True)
    assert {r.name: r.flops - r.macs for r in ew.rows if r.flops - r.macs} == TINY_ELEMENTWISE
    assert ew.totals.flops == 4520 + 1975
    assert cost.model_cost(TINY, "fp", batch=3, elementwise=True).totals.flops == 3 * (4520 + 1975)


def test_tiny_vit_hand_counted_binary_and_ternary_ops():
    binary_macs = 960 + 200 + 200 + 320 + 640 + 640  # block linears and both attention matmuls: 2960
    int8_macs = 1536 + 24  # patch embedding and head
    r = cost.model_cost(TINY, "binary")
    assert (r.totals.flops, r.totals.bops) == (0, binary_macs + 64 * int8_macs)
    assert r.totals.ops == int8_macs + binary_macs / 64 == 1606.25
    r = cost.model_cost(TINY, "binary", multibit_macs="flops")
    assert (r.totals.flops, r.totals.bops, r.totals.ops) == (int8_macs, binary_macs, 1606.25)
    r = cost.model_cost(TINY, "binary", patch_embed="fp32", head="block")
    assert (r.totals.flops, r.totals.bops) == (1536, binary_macs + 24)
    # TerViT: ternary x int8 block linears (16 BOPs per MAC), int8 x int8 attention and edges (64)
    linear_macs, attn_macs = 960 + 320 + 640 + 640, 400
    r = cost.model_cost(TINY, "tervit")
    assert r.totals.bops == 16 * linear_macs + 64 * (attn_macs + int8_macs)
    assert r.totals.ops == linear_macs / 4 + attn_macs + int8_macs
    r = cost.model_cost(TINY, "tervit", multibit_macs="flops")
    assert (r.totals.flops, r.totals.bops) == (4520, 0)
    # GSB: 3 x 3 binary products in A.V; a distillation token makes N = 6
    r = cost.model_cost(TINY, "gsb")
    av = {x.name: x for x in r.rows}["blocks.0.attn.a@v"]
    assert av.macs == 2 * 6 * 6 * 4 and av.bops == 9 * av.macs and av.flops == 0
    assert cost.model_cost(TINY, "gsb", gsb_bases=2).totals.bops - r.totals.bops == (4 - 9) * av.macs


# ------------------------------------------------------------------------------------------------
# packed storage of a quantized linear


@settings(max_examples=40, deadline=None)
@given(dim=st.integers(1, 200), hidden=st.integers(1, 300))
def test_binary_and_ternary_linear_packed_bytes(dim, hidden):
    # fc2 maps K = hidden -> N = dim (K as the model rounds dim * mlp_ratio; odd sizes, K < 64, K = 64 k)
    K, N = int(dim * (hidden / dim)), dim
    assume(K >= 1)
    shape = cost.ViTShape(image_size=4, patch_size=2, embed_dim=dim, depth=1, num_heads=1, mlp_ratio=hidden / dim,
                          num_classes=2)
    words = math.ceil(K / 64) * 8 * N

    def fc2(method, **kw):
        return {r.name: r for r in cost.model_cost(shape, method, **kw).rows}["blocks.0.mlp.fc2"]

    row = fc2("binary")
    assert row.macs == 5 * K * N  # 2 x 2 patches + class token = 5 token rows
    assert row.storage["weight"] == cost.Part(K * N, words)
    assert row.packed_bytes == words + 4 * N + 4 * N + 4  # + weight scales + bias + activation alpha
    assert row.params == K * N + N + N + 1 and row.fp32_bytes == 4 * row.params
    assert fc2("binaryvit").packed_bytes == row.packed_bytes + 4 * K  # + ASM thresholds on the input
    assert fc2("binaryvit", count_scales=False).packed_bytes == words + 4 * N
    assert fc2("binary", count_scales=False).packed_bytes == words + 4 * N  # weight + bias
    assert fc2("tervit").packed_bytes == 2 * words + 4 * N + 4 * N  # two bit-planes (8-bit input: min-max, not stored)
    entropy = fc2("tervit", ternary_bits="log2(3)")
    assert entropy.storage["weight"].nbytes == pytest.approx(K * N * math.log2(3) / 8, rel=1e-12)
    assert fc2("fp").packed_bytes == 4 * (K * N + N)


def test_int8_edges_and_block_precision_storage():
    rows = {r.name: r for r in cost.model_cost("deit-small", "binary").rows}
    pe, head = rows["patch_embed.proj"], rows["head"]
    assert pe.precision == head.precision == "W8A8"
    assert pe.packed_bytes == 768 * 384 + 4 * 384 + 4 * 384  # the 8-bit input's step is not stored (min-max)
    assert head.packed_bytes == 384 * 1000 + 4 * 1000 + 4 * 1000
    rows = {r.name: r for r in cost.model_cost("deit-small", "binary", head="block", patch_embed="fp32").rows}
    assert rows["head"].precision == "W1A1" and rows["head"].packed_bytes == 6 * 8 * 1000 + 8 * 1000 + 4
    assert rows["patch_embed.proj"].precision == "FP32"
    assert rows["patch_embed.proj"].packed_bytes == 4 * (768 * 384 + 384)


def test_method_extras_are_counted():
    D, H, N, depth = 384, 6, 197, 12
    binary = cost.model_cost("deit-small", "binary")
    binaryvit = cost.model_cost("deit-small", "binaryvit")
    gsb = cost.model_cost("deit-small", "gsb")
    # ASM: one threshold per channel of every binarizer but the attention probabilities: qkv, proj, fc1
    # inputs D, fc2 input 4D, Q, K, V head_dim (issue 14: as the model and the export)
    assert binaryvit.totals.params - binary.totals.params == depth * (3 * D + 4 * D + 3 * (D // H))
    # TerViT: its 8-bit activations are min-max quantized at run time (nothing stored), binary stores
    # eight FP32 alphas per block (qkv, q, k, attn, v, proj, fc1, fc2)
    tervit = cost.model_cost("deit-small", "tervit")
    assert tervit.totals.params - binary.totals.params == -depth * 8
    assert not {r.name: r for r in tervit.rows}["blocks.0.mlp.fc2"].storage.keys() & {"act_scale", "act_zero_point"}
    # GSB: distillation token, second head, one more token in pos_embed; per block heads x N' x N'
    # attention bias, heads x head_dim V shift, 3 + 3 basis scales in place of 2 alphas
    n = N + 1
    extra = D + D + (D * 1000 + 1000 + 1000) + depth * (H * n * n + D + 6 - 2)
    assert gsb.totals.params - binary.totals.params == extra
    # every low-bit model keeps the LayerNorms, biases and tokens in FP32
    ln = [r for r in binary.rows if r.group == "LayerNorm"]
    assert sum(r.packed_bytes for r in ln) == 4 * (25 * 2 * D)


# ------------------------------------------------------------------------------------------------
# consistency of totals and ratios


@pytest.mark.parametrize("preset", sorted(cost.PRESETS))
@pytest.mark.parametrize("method", cost.METHODS)
def test_totals_and_ratios_are_consistent(preset, method):
    if method == "gsb" and preset.startswith("swin"):
        with pytest.raises(ValueError, match="ViT/DeiT only"):
            cost.model_cost(preset, method)
        return
    for kw in ({}, {"elementwise": True, "flops_per_mac": 2}):
        r = cost.model_cost(preset, method, **kw)
        t = r.totals
        assert t.params == sum(x.params for x in r.rows) and t.bops == sum(x.bops for x in r.rows)
        assert t.ops == t.flops + t.bops / 64 == pytest.approx(sum(x.ops for x in r.rows), rel=1e-12)
        assert r.size_ratio == r.reference.packed_bytes / t.packed_bytes
        assert r.ops_ratio == r.reference.ops / t.ops
        assert sum(g.packed_bytes for g in r.groups().values()) == pytest.approx(t.packed_bytes, rel=1e-12)
        fp = cost.model_cost(preset, "fp", **kw)
        assert r.reference == fp.totals and fp.size_ratio == fp.ops_ratio == 1.0
        if method != "fp":
            assert r.size_ratio > 3 and r.ops_ratio > 2, (preset, method, r.size_ratio, r.ops_ratio)
        twice = cost.model_cost(preset, method, batch=2, **kw).totals
        assert (twice.macs, twice.flops, twice.bops) == (2 * t.macs, 2 * t.flops, 2 * t.bops)
        assert (twice.params, twice.packed_bytes) == (t.params, t.packed_bytes)
    one, two = cost.model_cost(preset, method), cost.model_cost(preset, method, flops_per_mac=2)
    assert two.totals.ops == 2 * one.totals.ops and two.ops_ratio == one.ops_ratio


def test_multibit_macs_convention_only_moves_8bit_work_between_columns():
    a, b = cost.model_cost("deit-small", "binaryvit"), cost.model_cost("deit-small", "binaryvit", multibit_macs="flops")
    assert a.totals.ops == b.totals.ops and a.totals.flops == 0 < b.totals.flops
    a, b = cost.model_cost("deit-small", "tervit"), cost.model_cost("deit-small", "tervit", multibit_macs="flops")
    assert b.totals.ops > a.totals.ops  # a ternary x 8-bit MAC is 1/4 OP as BOPs, 1 OP as a FLOP


# ------------------------------------------------------------------------------------------------
# errors and CLI


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown preset 'deit-huge'.*deit-small"):
        cost.model_cost("deit-huge", "fp")
    with pytest.raises(ValueError, match="unknown method 'xnor'.*binaryvit"):
        cost.model_cost("deit-small", "xnor")
    with pytest.raises(ValueError, match="head must be one of"):
        cost.model_cost("deit-small", "binary", head="int4")
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        cost.model_cost("deit-small", "binary", batch=0)
    with pytest.raises(TypeError, match="lacks"):
        cost.model_cost(object(), "fp")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        cost.model_cost(cost.ViTShape(embed_dim=10, num_heads=3), "fp")
    with pytest.raises(ValueError, match="window_size"):
        cost.model_cost(cost.SwinShape(image_size=192), "fp")  # 48 / 7


def test_cli_report_comparison_json_and_errors(capsys):
    assert cost.main(["--preset", "deit-small", "--method", "binaryvit"]) == 0
    out = capsys.readouterr().out
    assert "block linears" in out and "x smaller" in out and "x fewer" in out
    assert cost.main(["--preset", "deit-tiny", "--method", "tervit", "--per-layer", "--head", "fp32"]) == 0
    assert "blocks.11.mlp.fc2" in capsys.readouterr().out
    assert cost.main(["--preset", "deit-tiny", "swin-tiny", "--method", "fp", "binary"]) == 0
    assert capsys.readouterr().out.count("binary") >= 2
    assert cost.main(["--preset", "deit-small", "--method", "binary", "--json", "--no-scales"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = cost.model_cost("deit-small", "binary", count_scales=False)
    assert data["totals"]["packed_bytes"] == expected.totals.packed_bytes
    assert data["conventions"]["count_scales"] is False and len(data["rows"]) == len(expected.rows)
    for argv, message in ((["--preset", "deit-huge", "--method", "fp"], "unknown preset 'deit-huge'"),
                          (["--preset", "deit-small", "--method", "xnor"], "unknown method 'xnor'"),
                          (["--preset", "swin-small", "--method", "gsb"], "ViT/DeiT only")):
        with pytest.raises(SystemExit) as exit_info:
            cost.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
