"""The whole ViT against an independent PyTorch ViT: logits, loss, every activation that reaches
the output, every parameter gradient, and 10 optimizer steps."""
import numpy as np
import pytest

from adapter import AdamW, SGD, ViTConfig, build_vit, clip_grad_norm, cosine_lr, ops

torch = pytest.importorskip("torch", reason="PyTorch is the reference for these tests (pip install torch==2.13.0)")
from torch_reference import TorchViT  # noqa: E402

F = torch.nn.functional

TINY = dict(image_size=12, patch_size=4, in_chans=3, embed_dim=12, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=5)


def random_state(model, rng):
    """Random values for every parameter (not the zero/one init, so every path is exercised)."""
    return {k: rng.standard_normal(v.shape) * (0.5 if v.ndim > 1 else 0.2) + (1.0 if k.endswith("norm1.weight") else 0.0)
            for k, v in model.state_dict().items()}


def loss_and_grads_np(model, x, y, training=True):
    logits, cache = model.forward(x, training=training)
    if isinstance(logits, tuple):
        l1, c1 = ops.cross_entropy_forward(logits[0], y, 0.1)
        l2, c2 = ops.cross_entropy_forward(logits[1], y, 0.1)
        loss = 0.5 * (l1 + l2)
        dlogits = (ops.cross_entropy_backward(0.5, c1), ops.cross_entropy_backward(0.5, c2))
    else:
        loss, c = ops.cross_entropy_forward(logits, y, 0.1)
        dlogits = ops.cross_entropy_backward(1.0, c)
    model.backward(dlogits, cache)
    return logits, loss


def loss_torch(tm, x, y, training=True):
    out = tm(torch.from_numpy(x), training=training)
    if isinstance(out, tuple):
        return out, 0.5 * (F.cross_entropy(out[0], torch.from_numpy(y), label_smoothing=0.1)
                           + F.cross_entropy(out[1], torch.from_numpy(y), label_smoothing=0.1))
    return out, F.cross_entropy(out, torch.from_numpy(y), label_smoothing=0.1)


def compare_model(cfg, seed=0, batch=3, training=True):
    rng = np.random.default_rng(seed)
    model = build_vit(cfg, dtype=np.float64)
    state = random_state(model, rng)
    model.load_state_dict(state)
    tm = TorchViT(cfg)
    tm.load_numpy(state)
    x = rng.standard_normal((batch, cfg.in_chans, cfg.image_size, cfg.image_size))
    y = rng.integers(0, cfg.num_classes, batch)
    logits, loss = loss_and_grads_np(model, x, y, training)
    out_t, loss_t = loss_torch(tm, x, y, training)
    loss_t.backward()
    for a, b in zip(logits if isinstance(logits, tuple) else (logits,), out_t if isinstance(out_t, tuple) else (out_t,)):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-10, atol=1e-10, err_msg="logits differ")
    np.testing.assert_allclose(loss, loss_t.item(), rtol=1e-11, err_msg="loss differs")
    tparams = tm.named_params()
    assert set(model.grads) == set(tparams), f"gradient names differ: {set(model.grads) ^ set(tparams)}"
    for name, t in tparams.items():
        np.testing.assert_allclose(model.grads[name], t.grad.numpy(), rtol=1e-8, atol=1e-10,
                                   err_msg=f"gradient of {name} differs")


@pytest.mark.parametrize("overrides", [
    {},
    {"qkv_bias": False},
    {"global_pool": "mean"},
    {"distilled": True},
    {"gelu_approximate": "tanh", "depth": 1, "num_heads": 1},
    {"image_size": 8, "patch_size": 8, "embed_dim": 4, "num_heads": 2, "num_classes": 2},  # a single patch
])
def test_whole_model_matches_torch(overrides):
    compare_model(ViTConfig(**{**TINY, **overrides}))


def test_distilled_eval_averages_heads():
    compare_model(ViTConfig(**{**TINY, "distilled": True}), training=False)


def test_batch_of_one():
    compare_model(ViTConfig(**TINY), batch=1)


def test_ten_adamw_steps_match_torch():
    cfg = ViTConfig(**TINY)
    rng = np.random.default_rng(7)
    model = build_vit(cfg, dtype=np.float64)
    state = random_state(model, rng)
    model.load_state_dict(state)
    tm = TorchViT(cfg)
    tm.load_numpy(state)
    tparams = tm.named_params()
    decay = [t for k, t in tparams.items() if t.ndim >= 2 and k not in ("cls_token", "pos_embed")]
    no_decay = [t for k, t in tparams.items() if not (t.ndim >= 2 and k not in ("cls_token", "pos_embed"))]
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    x = rng.standard_normal((4, 3, 12, 12))
    y = rng.integers(0, 5, 4)
    for step in range(10):
        lr = cosine_lr(step, 10, 1e-2, warmup_steps=3)
        _, loss = loss_and_grads_np(model, x, y)
        norm = clip_grad_norm(model.grads, 1.0)
        opt.step(model.grads, lr=lr)
        topt.zero_grad()
        _, loss_t = loss_torch(tm, x, y)
        loss_t.backward()
        norm_t = torch.nn.utils.clip_grad_norm_(list(tparams.values()), 1.0)
        for group in topt.param_groups:
            group["lr"] = lr
        topt.step()
        np.testing.assert_allclose(loss, loss_t.item(), rtol=1e-9, err_msg=f"loss at step {step} differs")
        np.testing.assert_allclose(norm, norm_t.item(), rtol=1e-9, err_msg=f"grad norm at step {step} differs")
    for k, t in tparams.items():
        np.testing.assert_allclose(model.params[k], t.detach().numpy(), rtol=1e-7, atol=1e-9,
                                   err_msg=f"{k} after 10 AdamW steps differs")


def test_sgd_matches_torch(rng):
    params = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(3)}
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    opt = SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    topt = torch.optim.SGD([{"params": [tparams["w"]], "weight_decay": 0.01}, {"params": [tparams["b"]], "weight_decay": 0.0}],
                           lr=0.1, momentum=0.9, nesterov=True)
    for _ in range(5):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        opt.step(grads)
        for k, t in tparams.items():
            t.grad = torch.from_numpy(grads[k].copy())
        topt.step()
    for k in params:
        np.testing.assert_allclose(params[k], tparams[k].detach().numpy(), rtol=1e-12, err_msg=f"SGD {k}")


def test_cosine_schedule_matches_closed_form():
    lrs = [cosine_lr(s, 20, 1.0, warmup_steps=5, min_lr=0.1) for s in range(21)]
    np.testing.assert_allclose(lrs[:5], [0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[5] == pytest.approx(1.0) and lrs[20] == pytest.approx(0.1)
    assert lrs[12] == pytest.approx(0.1 + 0.45 * (1 + np.cos(np.pi * 7 / 15)))


def test_state_dict_roundtrip_and_errors():
    cfg = ViTConfig(**TINY)
    a, b = build_vit(cfg, seed=1), build_vit(cfg, seed=2)
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, b.state_dict()[k])
    bad = dict(a.state_dict())
    bad["head.weight"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match="shape mismatch"):
        b.load_state_dict(bad)
    del bad["head.weight"]
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict(bad)


def test_bad_config_and_input_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ViTConfig(**{**TINY, "num_heads": 5})
    with pytest.raises(ValueError, match="divisible by patch_size"):
        ViTConfig(**{**TINY, "patch_size": 5})
    model = build_vit(ViTConfig(**TINY))
    with pytest.raises(ValueError, match="expected images of shape"):
        model.forward(np.zeros((2, 1, 12, 12)))
    with pytest.raises(ValueError, match="Generator"):
        build_vit(ViTConfig(**{**TINY, "drop_rate": 0.1})).forward(np.zeros((2, 3, 12, 12)), training=True)


def test_no_python_loop_over_heads_tokens_or_samples():
    """Forward/backward cost must not grow with Python-level iteration over heads, tokens or samples:
    count the matmul calls made by the model for two batch/head/token sizes."""
    calls = {"n": 0}
    real = np.matmul

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    counts = []
    for cfg_over, batch in (({}, 2), ({"num_heads": 6, "image_size": 24}, 7)):
        cfg = ViTConfig(**{**TINY, **cfg_over})
        model = build_vit(cfg)
        calls["n"] = 0
        np.matmul = counting
        try:
            logits, cache = model.forward(np.zeros((batch, 3, cfg.image_size, cfg.image_size)), training=True)
            model.backward(np.ones_like(logits), cache)
        finally:
            np.matmul = real
        counts.append(calls["n"])
    assert counts[0] == counts[1], f"matmul calls depend on batch/heads/tokens: {counts}"
