"""The fast training path (fused quantizers, popcount forward products) against the NumPy path it
replaces: bit for bit, per quantizer and on whole models of every method (two training steps)."""
import dataclasses

import numpy as np
import pytest

from minibvit import methods, quant, train
from minibvit.model import ViT, ViTConfig
from minibvit.optim import AdamW

pytestmark = pytest.mark.impl_specific

METHOD_TABLES = [(m.name, s) for m in methods.METHODS.values() for s in m.stages if s.table != "fp"]


@dataclasses.dataclass
class _Loss:
    label_smoothing: float = 0.1
    kd_temperature: float = 1.0
    kd_alpha: float = 0.5


def _run(stage, fused, steps=2, batch=6):
    """Logits, gradients and the whole state after `steps` training steps of `stage` on a tiny model,
    with the fused quantizers on or off."""
    cfg = ViTConfig(image_size=16, patch_size=4, in_chans=3, embed_dim=96, depth=2, num_heads=3,
                    num_classes=5, distilled=stage.distilled)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)
    y = rng.integers(0, 5, batch)
    teacher_logits = rng.standard_normal((batch, 5)).astype(np.float32)

    class Teacher:
        def forward(self, x, training=False):
            return teacher_logits, None

    saved = quant.USE_FUSED
    quant.USE_FUSED = fused
    try:
        model = ViT(cfg, quantizers=methods.build_quantizers(cfg, stage.table), seed=0)
        opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        hooks = methods.gradient_hooks(stage, model.quantizers)
        logits = []
        for step in range(steps):
            _, out, _ = train.train_step(model, opt, x, y, lr=1e-3, rng=np.random.default_rng(step),
                                         loss_fn=lambda lg, yy, t: train._loss(stage, _Loss(), lg, yy, t),
                                         teacher=Teacher() if stage.kd != "none" else None, hooks=hooks,
                                         step=step, clip_grad=5.0)
            logits.append(out)
        state = {k: v.copy() for k, v in model.state_dict().items()}
        grads = {k: v.copy() for k, v in model.grads.items()}
    finally:
        quant.USE_FUSED = saved
    return logits, grads, state


def _same_bits(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    assert a.tobytes() == b.tobytes(), f"{what}: {np.count_nonzero(a != b)} of {a.size} elements differ"


@pytest.mark.parametrize("method, stage", METHOD_TABLES, ids=[f"{m}-{s.name}" for m, s in METHOD_TABLES])
def test_training_steps_bit_identical(method, stage):
    fast, ref = _run(stage, True), _run(stage, False)
    for step, (a, b) in enumerate(zip(fast[0], ref[0])):
        for i, (la, lb) in enumerate(zip(np.atleast_1d(a) if not isinstance(a, tuple) else a,
                                         np.atleast_1d(b) if not isinstance(b, tuple) else b)):
            _same_bits(la, lb, f"{method}/{stage.name} logits of step {step} ({i})")
    assert fast[1].keys() == ref[1].keys() and fast[2].keys() == ref[2].keys()
    for name in ref[1]:
        _same_bits(fast[1][name], ref[1][name], f"{method}/{stage.name} grad {name}")
    for name in ref[2]:
        _same_bits(fast[2][name], ref[2][name], f"{method}/{stage.name} state {name}")
