"""Estimated time per epoch and node-hours of a recipe, from one timed training step on this machine.

    python scripts/imagenet/estimate.py --method binaryvit --stage-epochs teacher=300,binaryvit=300 [--nodes 8]

For every stage of the method (minibvit.methods) it builds the stage's actual model (DeiT-S by
default, at --image-size, with the stage's quantizer table and distillation token), runs one
warm-up step (Numba compiles) and then --steps timed steps of --batch images: training forward,
cross-entropy, backward, AdamW; for a distillation stage also the full-precision teacher's forward.
The per-image cost t of a stage is the median step time / batch; then

    node-seconds per epoch = images * t        (one node = this machine, all its cores, one process)
    time per epoch on N nodes = images * t / N (compute only: docs/scaling.md shows that the gradient
                                                allreduce hides behind the backward on such nodes)
    node-hours of the stage = epochs * images * t / 3600

Assumptions (printed with the figures): linear scaling over nodes, and a node as fast as this machine.
The per-image cost at a small --batch is a slight over-estimate (fixed per-step costs are shared by
fewer images). --node-speedup K divides t by K for nodes K times faster than this one.
"""
if __name__ == "__main__":  # thread-pool settings before NumPy loads (as python -m minibvit.train)
    import os as _os
    import sys as _sys

    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))))
    from minibvit.process import configure_process

    configure_process()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from minibvit import methods, ops  # noqa: E402
from minibvit.model import PRESETS, ViT, ViTConfig  # noqa: E402
from minibvit.optim import AdamW  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167


def parse_stage_epochs(text, method):
    """'teacher=300,binaryvit=300' -> {stage: epochs}; every stage of the method must be named."""
    stages = [s.name for s in methods.get_method(method).stages]
    epochs = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in stages:
            raise ValueError(f"--stage-epochs names {name!r}, which is not a stage of {method} ({', '.join(stages)})")
        if not value.isdigit():
            raise ValueError(f"--stage-epochs {item!r}: the epochs must be a non-negative integer")
        epochs[name] = int(value)
    if missing := [s for s in stages if s not in epochs]:
        raise ValueError(f"--stage-epochs gives no epochs for stage(s) {', '.join(missing)} of {method} "
                         f"(0 for a stage you do not train, e.g. a teacher you already have)")
    return epochs


def _model(model_cfg, table):
    return ViT(model_cfg, quantizers=methods.build_quantizers(model_cfg, table), seed=0)


def time_stage(stage, model_cfg, batch, steps):
    """Median seconds of one training step of `stage` on `batch` images (after one warm-up step)."""
    model_cfg = ViTConfig(**{**model_cfg.to_dict(), "distilled": stage.distilled})
    model = _model(model_cfg, stage.table)
    teacher = _model(ViTConfig(**{**model_cfg.to_dict(), "distilled": False}), "fp") if stage.kd != "none" else None
    opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, model_cfg.image_size, model_cfg.image_size)).astype(np.float32)
    y = rng.integers(0, model_cfg.num_classes, batch)
    times = []
    for step in range(1 + steps):
        t0 = time.perf_counter()
        logits, cache = model.forward(x, training=True, rng=np.random.default_rng(step))
        if teacher is not None:
            teacher.forward(x, training=False)
        heads = logits if isinstance(logits, tuple) else (logits,)
        dlogits = []
        for head in heads:
            _, c = ops.cross_entropy_forward(head, y)
            dlogits.append(ops.cross_entropy_backward(1.0 / len(heads), c))
        model.backward(tuple(dlogits) if isinstance(logits, tuple) else dlogits[0], cache)
        opt.step(model.grads, lr=1e-4)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def estimate(method, stage_epochs, model="deit-small", image_size=224, num_classes=1000, batch=2, steps=1,
             nodes=1, images=IMAGENET_TRAIN_IMAGES, node_speedup=1.0, **model_overrides):
    """{stage: {...figures...}} and the totals; stages with 0 epochs are not timed."""
    fields = {**PRESETS[model], **{k: v for k, v in model_overrides.items() if v is not None}}
    fields.update(image_size=image_size, in_chans=3, num_classes=num_classes)
    model_cfg = ViTConfig(**fields)
    stages, total = {}, 0.0
    for stage in methods.get_method(method).stages:
        epochs = stage_epochs[stage.name]
        if epochs == 0:
            stages[stage.name] = {"epochs": 0}
            continue
        step_s = time_stage(stage, model_cfg, batch, steps)
        per_image = step_s / batch / node_speedup
        epoch_node_h = images * per_image / 3600
        stages[stage.name] = {"epochs": epochs, "table": stage.table, "kd": stage.kd, "step_s": step_s,
                              "per_image_s": per_image, "epoch_h": epoch_node_h / nodes,
                              "node_hours": epochs * epoch_node_h}
        total += epochs * epoch_node_h
    return {"method": method, "model": model, "image_size": image_size, "batch": batch, "nodes": nodes,
            "images": images, "node_speedup": node_speedup, "stages": stages, "node_hours": total,
            "wall_hours": total / nodes,
            "machine": _machine()}


def _hours(h):
    return f"{h:,.0f}" if h >= 100 else f"{h:.3g}"


def _machine():
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} logical CPUs"


def report(result):
    lines = [f"estimate for {result['method']} ({result['model']} at {result['image_size']}, "
             f"{result['images']:,} training images, {result['nodes']} node(s)), from one timed step of "
             f"{result['batch']} images on this machine ({result['machine']})"
             + (f", nodes assumed {result['node_speedup']:g}x faster" if result["node_speedup"] != 1 else "")]
    for name, s in result["stages"].items():
        if not s["epochs"]:
            lines.append(f"  {name:<12} skipped (0 epochs: given)")
            continue
        teacher = " + teacher forward" if s["kd"] != "none" else ""
        lines.append(f"  {name:<12} {s['per_image_s']:.3g} s/image{teacher}: {s['epoch_h']:.3g} h per epoch on "
                     f"{result['nodes']} node(s), {s['epochs']} epochs = {_hours(s['node_hours'])} node-hours")
    lines.append(f"  total        {_hours(result['node_hours'])} node-hours, {_hours(result['wall_hours'])} h wall time on "
                 f"{result['nodes']} node(s) (linear scaling assumed; docs/scaling.md: where it stops)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True, choices=list(methods.METHODS), help="the recipe's method")
    ap.add_argument("--stage-epochs", required=True, help="epochs per stage, e.g. teacher=300,binaryvit=300")
    ap.add_argument("--model", default="deit-small", choices=sorted(PRESETS), help="model preset (default: deit-small)")
    ap.add_argument("--image-size", type=int, default=224, help="training resolution (default: 224)")
    ap.add_argument("--patch-size", type=int, help="override the preset's patch size (tiny test runs)")
    ap.add_argument("--embed-dim", type=int, help="override the preset's width (tiny test runs)")
    ap.add_argument("--depth", type=int, help="override the preset's depth (tiny test runs)")
    ap.add_argument("--num-heads", type=int, help="override the preset's heads (tiny test runs)")
    ap.add_argument("--num-classes", type=int, default=1000, help="classes (default: 1000)")
    ap.add_argument("--batch", type=int, default=2, help="images in the timed step (default: 2)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps after the warm-up step (default: 1)")
    ap.add_argument("--nodes", type=int, default=1, help="nodes for the wall time per epoch (default: 1)")
    ap.add_argument("--images", type=int, default=IMAGENET_TRAIN_IMAGES, help="training images per epoch (default: ImageNet-1k)")
    ap.add_argument("--node-speedup", type=float, default=1.0, help="nodes this many times faster than this machine")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line as well")
    args = ap.parse_args(argv)
    for name in ("batch", "steps", "nodes", "images", "image_size", "num_classes"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.node_speedup <= 0:
        ap.error("--node-speedup must be positive")
    try:
        stage_epochs = parse_stage_epochs(args.stage_epochs, args.method)
    except ValueError as e:
        ap.error(str(e))
    result = estimate(args.method, stage_epochs, args.model, args.image_size, args.num_classes, args.batch,
                      args.steps, args.nodes, args.images, args.node_speedup, patch_size=args.patch_size,
                      embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads)
    print(report(result), flush=True)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
