"""Train a low-bit ViT: ``python -m minibvit.train --dataset fashion-mnist --method binaryvit``.

One command runs a method's whole recipe. Earlier stages (a full-precision teacher, TerViT's 8-bit
stage, GSB's stage 1) are trained into ``<out>/<stage>/`` or reused when that directory already holds
a finished stage; ``--teacher`` / ``--init-from`` replace them with your own checkpoints.

    method     stages (each initialised from the one before)          distillation
    fp         fp                                                     -
    binary     teacher (fp) -> binary                                 soft KD from the teacher
    binaryvit  teacher (fp) -> binaryvit (binary + GRS + ASM)          soft KD from the teacher
    tervit     fp -> tervit_w8a8 -> tervit (ternary weights, A8)      -
    gsb        teacher (fp) -> gsb_stage1 (binary MLP weights) -> gsb DeiT hard distillation (dist token)

Every stage writes ``last.safetensors`` (also every ``--save-every`` steps), ``best.safetensors``
(best test accuracy), ``log.jsonl`` (every metric and diagnostic), ``config.json`` (the resolved
configuration) and, with matplotlib installed, ``curves.png`` and ``weights.png``. ``--resume``
continues a stopped run exactly: the batches, augmentation and dropout of step t depend only on
(seed, epoch, step), so a resumed run ends with bit-identical weights.
"""
import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import checkpoint, data, methods, ops, schemes
from .model import PRESETS, ViT, ViTConfig
from .optim import AdamW, clip_grad_norm, cosine_lr


# ---------------------------------------------------------------------------------------------
# configuration

@dataclass
class TrainConfig:
    dataset: str = "fashion-mnist"
    method: str = "fp"
    data_dir: str = None
    out: str = None  # default runs/<dataset>-<method>
    model: str = None  # a minibvit.model preset; default by dataset
    image_size: int = None
    patch_size: int = None
    embed_dim: int = None
    depth: int = None
    num_heads: int = None
    mlp_ratio: float = None
    drop_path: float = None
    epochs: int = None  # per stage; default by dataset
    teacher_epochs: int = None  # epochs of a full-precision teacher / first stage (default: epochs)
    batch_size: int = None
    lr: float = None
    min_lr: float = 1e-5
    warmup_epochs: float = 0.5
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    clip_grad: float = 5.0
    seed: int = 0
    limit_per_class: int = None  # N training images per class (GSB's small-data setting)
    fraction: float = None  # or this fraction of every class
    teacher: str = None  # checkpoint of a full-precision teacher (skips training one)
    init_from: str = None  # checkpoint to initialise the final stage from (skips earlier stages)
    kd_temperature: float = 1.0
    kd_alpha: float = 0.5  # soft KD: loss = (1 - a) CE + a KD
    grs_lambda: float = 1e-2  # BinaryViT GRS strength (0 = off)
    grs_variant: str = "l2"
    grs_warmup_epochs: float = 1.0
    asm_center: str = "mean"
    gsb_mode: str = "official"
    gsb_max_over: str = "tensor"
    save_every: int = 200  # steps between mid-epoch checkpoints
    log_every: int = 10  # steps between diagnostic records
    eval_batch_size: int = 256
    resume: bool = False
    max_steps: int = None  # stop a stage after this many steps (smoke tests)

    def validate(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"invalid option: {msg}")

        need(self.dataset in data.DATASET_NAMES, f"--dataset must be one of {data.DATASET_NAMES}, got {self.dataset!r}")
        need(self.method in RECIPES, f"--method must be one of {sorted(RECIPES)}, got {self.method!r}")
        need(self.model is None or self.model in PRESETS, f"--model must be one of {sorted(PRESETS)}, got {self.model!r}")
        for name in ("epochs", "teacher_epochs", "batch_size", "image_size", "patch_size", "embed_dim", "depth",
                     "num_heads", "limit_per_class", "save_every", "log_every",
                     "eval_batch_size", "max_steps"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, int) and v >= 1), f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("lr", "kd_temperature"):
            v = getattr(self, name)
            need(v is None or (math.isfinite(v) and v > 0), f"--{name.replace('_', '-')} must be positive, got {v!r}")
        for name in ("min_lr", "warmup_epochs", "weight_decay", "clip_grad", "grs_lambda", "grs_warmup_epochs"):
            v = getattr(self, name)
            need(math.isfinite(v) and v >= 0, f"--{name.replace('_', '-')} must be >= 0, got {v!r}")
        need(0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        need(0 <= self.kd_alpha <= 1, f"--kd-alpha must be in [0, 1], got {self.kd_alpha}")
        need(self.fraction is None or 0 < self.fraction <= 1, f"--fraction must be in (0, 1], got {self.fraction}")
        need(not (self.fraction and self.limit_per_class), "give --fraction or --limit-per-class, not both")
        need(self.grs_variant in ("l1", "l2"), f"--grs-variant must be l1 or l2, got {self.grs_variant!r}")
        need(self.asm_center in ("mean", "median", "token", "none"), f"--asm-center must be mean, median, token or none")
        need(self.gsb_mode in ("official", "principled"), "--gsb-mode must be official or principled")
        need(self.gsb_max_over in ("tensor", "row"), "--gsb-max-over must be tensor or row")
        need(self.drop_path is None or 0 <= self.drop_path < 1, f"--drop-path must be in [0, 1), got {self.drop_path}")
        for name in ("teacher", "init_from"):
            path = getattr(self, name)
            need(path is None or os.path.isfile(path), f"--{name.replace('_', '-')} {path!r} is not a file")


# Per-dataset defaults sized for a 2-core CPU.
DATASET_DEFAULTS = {
    "fashion-mnist": dict(model="fashion-mnist", epochs=5, batch_size=64, lr=2e-3),
    "cifar10": dict(model="cifar", epochs=30, batch_size=128, lr=1e-3),
    "synthetic": dict(model="cifar", embed_dim=64, depth=2, num_heads=2, patch_size=8, epochs=8, batch_size=64, lr=2e-3),
    "imagefolder": dict(model="cifar", epochs=30, batch_size=64, lr=1e-3),
}


def resolve_config(cfg):
    """Fill unset fields from the dataset defaults and validate."""
    cfg = dataclasses.replace(cfg)
    for k, v in DATASET_DEFAULTS.get(cfg.dataset, {}).items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if cfg.out is None:
        cfg.out = os.path.join("runs", f"{cfg.dataset}-{cfg.method}")
    cfg.validate()
    return cfg


@dataclass
class Stage:
    name: str
    scheme: str
    init: str = None  # name of the stage whose best checkpoint initialises this one
    kd: str = "none"  # "none", "soft" (teacher logits) or "hard" (DeiT distillation token)
    distilled: bool = False
    first: bool = False  # trained for teacher_epochs


RECIPES = {
    "fp": [Stage("fp", "fp", first=True)],
    "binary": [Stage("teacher", "fp", first=True), Stage("binary", "binary", init="teacher", kd="soft")],
    "binaryvit": [Stage("teacher", "fp", first=True), Stage("binaryvit", "binaryvit", init="teacher", kd="soft")],
    "tervit": [Stage("fp", "fp", first=True), Stage("tervit_w8a8", "tervit_w8a8", init="fp"),
               Stage("tervit", "tervit", init="tervit_w8a8")],
    "gsb": [Stage("teacher", "fp", first=True),
            Stage("gsb_stage1", "gsb_stage1", init="teacher", kd="hard", distilled=True),
            Stage("gsb", "gsb", init="gsb_stage1", kd="hard", distilled=True)],
}


def model_config(cfg, distilled, num_classes, in_chans, image_size):
    fields = dict(PRESETS[cfg.model])
    for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
        if getattr(cfg, k) is not None:
            fields[k] = getattr(cfg, k)
    fields.update(image_size=image_size, in_chans=in_chans, num_classes=num_classes, distilled=distilled,
                  drop_path_rate=cfg.drop_path or 0.0)
    if "embed_dim" in fields and fields["embed_dim"] % fields["num_heads"]:
        raise ValueError(f"invalid option: --embed-dim {fields['embed_dim']} is not divisible by --num-heads {fields['num_heads']}")
    return ViTConfig(**fields)


def scheme_options(cfg):
    return schemes.SchemeOptions(asm_center=cfg.asm_center, gsb_mode=cfg.gsb_mode, gsb_max_over=cfg.gsb_max_over)


def build_model(model_cfg, scheme, options, seed=0):
    return ViT(model_cfg, quantizers=schemes.build_quantizers(model_cfg, scheme, options=options), seed=seed)


# ---------------------------------------------------------------------------------------------
# checkpoints

def _state_tensors(model, opt):
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_arrays, opt_meta = opt.state_dict()
    tensors.update({f"optim.{k}": v for k, v in opt_arrays.items()})
    return tensors, opt_meta


def save_training_state(path, model, opt, meta):
    tensors, opt_meta = _state_tensors(model, opt)
    checkpoint.save_checkpoint(path, tensors, {**meta, "optimizer": opt_meta})


def load_model(path, expect_config=None):
    """A ViT rebuilt from a minibvit training checkpoint (its config, method and weights)."""
    tensors, meta = checkpoint.load_checkpoint(path)
    if "model_config" not in meta or "scheme" not in meta:
        raise checkpoint.CheckpointError(f"{path} is a minibvit file but not a training checkpoint (no model_config)")
    model_cfg = ViTConfig.from_dict(meta["model_config"])
    if expect_config is not None and model_cfg != expect_config:
        raise ValueError(f"checkpoint {path} holds a model {model_cfg} but {expect_config} was requested")
    model = build_model(model_cfg, meta["scheme"], schemes.SchemeOptions(**meta.get("scheme_options", {})))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    return model, meta


def transfer_state(src, model):
    """Initialise ``model`` from another stage's state dict by name: shared names are copied (they
    must have equal shapes); quantizer parameters the source lacks stay uninitialised (NaN) and are
    set from the first batch; a distillation token and head the source lacks start as copies of the
    class token and head, and the position embedding gains the class token's row for the new token."""
    own = model.state_dict()
    src = dict(src)
    if "dist_token" in own and "dist_token" not in src:
        src["dist_token"] = src["cls_token"]
        src["head_dist.weight"], src["head_dist.bias"] = src["head.weight"], src["head.bias"]
        pos = src["pos_embed"]
        src["pos_embed"] = np.concatenate([pos[:, :1], pos[:, :1], pos[:, 1:]], axis=1)
    bad = [f"{k}: {np.shape(src[k])} vs {v.shape}" for k, v in own.items() if k in src and np.shape(src[k]) != v.shape]
    if bad:
        raise ValueError("the initial checkpoint does not fit the model (different model size?):\n  " + "\n  ".join(bad))
    for k, v in own.items():
        if k in src:
            v[...] = src[k]


# ---------------------------------------------------------------------------------------------
# one stage

class TrainingDiverged(RuntimeError):
    pass


class Stopped(Exception):
    pass


def evaluate(model, dataset, batch_size):
    """Top-1 accuracy (and mean loss) of a model on a dataset split, in evaluation mode."""
    correct, total, loss_sum = 0, 0, 0.0
    for x, y in data.iterate_batches(dataset, batch_size, seed=0, epoch=0, train=False, augment=False):
        logits, _ = model.forward(x, training=False)
        loss, _ = ops.cross_entropy_forward(logits, y)
        loss_sum += float(loss) * len(y)
        correct += int((logits.argmax(axis=1) == y).sum())
        total += len(y)
    return correct / total, loss_sum / total


def _loss(stage, cfg, logits, y, teacher_logits):
    """Stage loss and d loss / d logits (same structure as logits)."""
    if stage.kd == "hard":  # DeiT: 0.5 CE(cls head, y) + 0.5 CE(dist head, argmax teacher)
        l1, c1 = ops.cross_entropy_forward(logits[0], y, cfg.label_smoothing)
        l2, c2 = ops.cross_entropy_forward(logits[1], teacher_logits.argmax(axis=1), 0.0)
        return 0.5 * (l1 + l2), (ops.cross_entropy_backward(0.5, c1), ops.cross_entropy_backward(0.5, c2))
    if stage.distilled:  # no teacher: both heads learn the labels
        l1, c1 = ops.cross_entropy_forward(logits[0], y, cfg.label_smoothing)
        l2, c2 = ops.cross_entropy_forward(logits[1], y, cfg.label_smoothing)
        return 0.5 * (l1 + l2), (ops.cross_entropy_backward(0.5, c1), ops.cross_entropy_backward(0.5, c2))
    ce, c = ops.cross_entropy_forward(logits, y, cfg.label_smoothing)
    if stage.kd == "soft":
        kd, ck = ops.kd_soft_forward(logits, teacher_logits, cfg.kd_temperature)
        a = cfg.kd_alpha
        return (1 - a) * ce + a * kd, ops.cross_entropy_backward(1 - a, c) + ops.kd_soft_backward(a, ck)
    return ce, ops.cross_entropy_backward(1.0, c)


def binarized_latent(model, role):
    """The tensor whose sign a weight binarizer takes: the latent weight, centred per output channel
    when the binarizer centres it (BiT's w_binary), so that GRS and the diagnostics act on the real
    decision boundary. A role without a centring binarizer (e.g. a full-precision model) gives W."""
    w = model.params[role]
    centred = getattr(model.quantizers.get(role), "center", False)
    return w - w.mean(axis=tuple(range(1, w.ndim)), keepdims=True) if centred else w


def _grs_step(model, binarized, lam, variant):
    """Add BinaryViT's GRS gradient to every binarized weight's gradient. For a centred binarizer
    the regularizer acts on W_c = W - mean(W) and its gradient is pulled back through the centring."""
    for role in binarized:
        g = methods.grs_gradient(binarized_latent(model, role), lam, variant)
        if getattr(model.quantizers[role], "center", False):
            g -= g.mean(axis=tuple(range(1, g.ndim)), keepdims=True)
        model.grads[role] = model.grads[role] + g


class _FlipCounter:
    """Sign flips of the binarized latent weights, counted at EVERY step and averaged per step over
    the logging interval (so the rate does not depend on --log-every)."""

    def __init__(self):
        self.prev, self.flips, self.steps = {}, 0.0, 0

    def update(self, model, binarized):
        rates = []
        for role in binarized:
            latent = binarized_latent(model, role)
            if role in self.prev:
                rates.append(methods.sign_flip_rate(self.prev[role], latent))
            self.prev[role] = latent.copy()
        if rates:
            self.flips += float(np.mean(rates))
            self.steps += 1

    def take(self):
        rate = self.flips / self.steps if self.steps else None
        self.flips, self.steps = 0.0, 0
        return rate


def _diagnostics(model, binarized, flip_counter):
    """Binarization diagnostics averaged over the binarized layers."""
    if not binarized:
        return {}
    latents = [binarized_latent(model, role) for role in binarized]
    out = {"near_zero_mass": float(np.mean([methods.near_zero_mass(w) for w in latents])),
           "bimodality": float(np.mean([methods.bimodality(w) for w in latents]))}
    rate = flip_counter.take()
    if rate is not None:
        out["flip_rate"] = rate
    return out


def _activation_diagnostics(model, x):
    """Mean sign entropy and relative binarization error of the signed activation binarizers, on one
    batch, in evaluation mode (captured through the quantizers' inputs)."""
    captured = []
    for role, q in model.quantizers.items():
        inner = getattr(q, "inner", q)
        if getattr(inner, "signed", False) and "alpha" in inner.params and not role.startswith(("head", "patch")):
            captured.append((role, q))
    if not captured:
        return {}
    seen = {}
    originals = {}
    for role, q in captured:
        originals[role] = q.forward

        def spy(t, training, _q=q, _role=role, _fwd=q.forward):
            seen[_role] = t
            return _fwd(t, training)

        q.forward = spy
    try:
        model.forward(x, training=False)
    finally:
        for role, q in captured:
            q.forward = originals[role]
    entropies, errors = [], []
    for role, q in captured:
        t = seen[role]
        shift = 0.0
        if isinstance(q, methods.ASM):  # the threshold the sign bit is taken against
            shift = (t.mean(axis=-1, keepdims=True) + q.params["shift"] if q.center == "token"
                     else methods.asm_fold_threshold(q))
        alpha = (q.inner if isinstance(q, methods.ASM) else q).params["alpha"]
        entropies.append(methods.sign_entropy(t - shift))
        if np.any(t):  # an all-zero input (e.g. after a collapsed attention) has no relative error
            errors.append(methods.binarization_error(t, alpha, shift))
    out = {"sign_entropy": float(np.mean(entropies))}
    if errors:
        out["binarization_error"] = float(np.mean(errors))
    return out


def train_stage(cfg, stage, out_dir, train_set, test_set, init_state=None, teacher=None):
    """Train one stage into out_dir; returns (best checkpoint path, best accuracy)."""
    os.makedirs(out_dir, exist_ok=True)
    last_path, best_path = os.path.join(out_dir, "last.safetensors"), os.path.join(out_dir, "best.safetensors")
    epochs = cfg.teacher_epochs if (stage.first and cfg.teacher_epochs) else cfg.epochs
    img = train_set.images
    model_cfg = model_config(cfg, stage.distilled, train_set.num_classes, img.shape[3], img.shape[1])
    options = scheme_options(cfg)
    model = build_model(model_cfg, stage.scheme, options, seed=cfg.seed)
    opt = AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = data.steps_per_epoch(len(train_set), cfg.batch_size, drop_last=len(train_set) >= cfg.batch_size)
    total_steps = epochs * steps
    warmup = int(round(cfg.warmup_epochs * steps))
    binarized = schemes.binarized_weight_roles(model.quantizers)
    use_grs = stage.scheme == "binaryvit" and cfg.grs_lambda > 0
    meta = {"kind": "minibvit-train", "model_config": model_cfg.to_dict(), "scheme": stage.scheme,
            "scheme_options": dataclasses.asdict(options), "stage": stage.name, "train_config": dataclasses.asdict(cfg),
            "dataset": {"name": train_set.name, "mean": train_set.mean.tolist(), "std": train_set.std.tolist(),
                        "class_names": list(train_set.class_names)},
            "rng": "dropout/drop-path of global step t use numpy default_rng([seed, 7, t]); batches use (seed, epoch, step)"}
    epoch, start_step, best_acc = 0, 0, -1.0
    if os.path.exists(last_path):
        tensors, saved = checkpoint.load_checkpoint(last_path)
        if saved.get("model_config") != meta["model_config"] or saved.get("scheme") != stage.scheme:
            raise ValueError(f"{out_dir} holds a run of a different model or method than requested; "
                             f"choose another --out (nothing was overwritten)")
        if saved.get("complete"):
            print(f"[{stage.name}] reusing the finished stage in {out_dir} (test acc {saved['best_acc']:.4f})",
                  file=sys.stderr)
            return best_path, saved["best_acc"]
        if not cfg.resume:
            raise ValueError(f"{out_dir} holds an unfinished run; pass --resume to continue it or choose another "
                             f"--out (nothing was overwritten)")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        opt.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}, saved["optimizer"])
        epoch, start_step, best_acc = saved["epoch"], saved["step"], saved["best_acc"]
        print(f"[{stage.name}] resuming at epoch {epoch} step {start_step}", file=sys.stderr)
    elif init_state is not None:
        transfer_state(init_state, model)

    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({k: v for k, v in meta.items() if k != "rng"}, f, indent=2)

    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        interrupted["flag"] = True

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    log = open(os.path.join(out_dir, "log.jsonl"), "a")
    flip_counter = _FlipCounter()
    done_steps = 0
    try:
        from tqdm import tqdm

        while epoch < epochs:
            bar = tqdm(total=steps, initial=start_step, desc=f"{stage.name} {epoch + 1}/{epochs}", file=sys.stderr,
                       disable=None, leave=False)
            t0, seen, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
            batches = data.iterate_batches(train_set, cfg.batch_size, cfg.seed, epoch, start_step=start_step,
                                           drop_last=len(train_set) >= cfg.batch_size)
            for step, (x, y) in enumerate(batches, start=start_step):
                gstep = epoch * steps + step
                lr = cosine_lr(gstep, total_steps, cfg.lr, warmup, cfg.min_lr)
                rng = np.random.default_rng([cfg.seed, 7, gstep])
                logits, cache = model.forward(x, training=True, rng=rng)
                teacher_logits = teacher.forward(x, training=False)[0] if teacher is not None else None
                loss, dlogits = _loss(stage, cfg, logits, y, teacher_logits)
                if not np.isfinite(loss):
                    raise TrainingDiverged(f"[{stage.name}] the loss became {loss} at epoch {epoch} step {step}; "
                                           f"lower --lr or raise --clip-grad. The last good checkpoint is kept: {last_path}")
                model.backward(dlogits, cache)
                if use_grs:
                    lam = methods.grs_lambda(gstep, cfg.grs_lambda, int(cfg.grs_warmup_epochs * steps))
                    _grs_step(model, binarized, lam, cfg.grs_variant)
                gnorm = clip_grad_norm(model.grads, cfg.clip_grad or None)
                opt.step(model.grads, lr=lr)
                pred = (logits[0] + logits[1]) / 2 if isinstance(logits, tuple) else logits
                correct += int((pred.argmax(1) == y).sum())
                seen += len(y)
                loss_sum += float(loss) * len(y)
                record = {"stage": stage.name, "epoch": epoch, "step": step, "global_step": gstep, "lr": lr,
                          "loss": float(loss), "grad_norm": gnorm}
                flip_counter.update(model, binarized)
                if gstep % cfg.log_every == 0:
                    record.update(_diagnostics(model, binarized, flip_counter))
                    record.update(_activation_diagnostics(model, x[: min(len(x), 32)]))
                log.write(json.dumps(record) + "\n")
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{seen / elapsed:.0f}")
                bar.update(1)
                done_steps += 1
                next_state = (epoch, step + 1)
                if (step + 1) % cfg.save_every == 0 and step + 1 < steps:
                    save_training_state(last_path, model, opt, {**meta, "epoch": epoch, "step": step + 1, "best_acc": best_acc})
                if interrupted["flag"]:
                    save_training_state(last_path, model, opt, {**meta, "epoch": next_state[0], "step": next_state[1],
                                                                "best_acc": best_acc})
                    raise Stopped(f"[{stage.name}] interrupted: saved {last_path}; continue with --resume")
                if cfg.max_steps and done_steps >= cfg.max_steps:
                    break
            bar.close()
            train_time = time.perf_counter() - t0
            acc, test_loss = evaluate(model, test_set, cfg.eval_batch_size)
            epoch, start_step = epoch + 1, 0
            record = {"stage": stage.name, "epoch": epoch - 1, "train_loss": loss_sum / max(seen, 1),
                      "train_acc": correct / max(seen, 1), "test_loss": test_loss, "test_acc": acc,
                      "epoch_time_s": train_time, "images_per_s": seen / max(train_time, 1e-9)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(f"[{stage.name}] epoch {epoch}/{epochs}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f}"
                  f" | test acc {acc:.4f} | {train_time:.0f}s, {record['images_per_s']:.0f} img/s", file=sys.stderr)
            stop_now = bool(cfg.max_steps and done_steps >= cfg.max_steps)
            if acc > best_acc:
                best_acc = acc
                save_training_state(best_path, model, opt, {**meta, "epoch": epoch, "step": 0, "best_acc": best_acc,
                                                            "complete": True})
            save_training_state(last_path, model, opt, {**meta, "epoch": epoch, "step": 0, "best_acc": best_acc,
                                                        "complete": epoch >= epochs or stop_now})
            if stop_now:
                break
    finally:
        log.close()
        signal.signal(signal.SIGINT, old_handler)
    _plot(out_dir, model, binarized)
    return best_path, best_acc


def _plot(out_dir, model, binarized):
    """curves.png (loss and accuracy) and weights.png (latent-weight histograms); needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'minibvit[plot]')", file=sys.stderr)
        return
    records = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    steps = [r for r in records if "loss" in r]
    epochs = [r for r in records if "test_acc" in r]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot([r["global_step"] for r in steps], [r["loss"] for r in steps], lw=0.7)
    ax[0].set(xlabel="step", ylabel="training loss")
    ax[1].plot([r["epoch"] + 1 for r in epochs], [r["test_acc"] for r in epochs], "o-", label="test")
    ax[1].plot([r["epoch"] + 1 for r in epochs], [r["train_acc"] for r in epochs], "s--", label="train")
    ax[1].set(xlabel="epoch", ylabel="accuracy")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=100)
    plt.close(fig)
    if binarized:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        w = np.concatenate([(model.params[r] / np.abs(model.params[r]).mean(axis=1, keepdims=True)).ravel() for r in binarized])
        ax.hist(w, bins=121, range=(-4, 4))
        ax.set(xlabel="latent weight / per-channel mean|W|", ylabel="count", title="binarized latent weights")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "weights.png"), dpi=100)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the whole recipe

def load_data(cfg):
    kw = dict(data_dir=cfg.data_dir, image_size=cfg.image_size)
    train_set = data.load_dataset(cfg.dataset, "train", limit_per_class=cfg.limit_per_class, fraction=cfg.fraction,
                                  seed=cfg.seed, **kw)
    test_set = data.load_dataset(cfg.dataset, "test", **kw)
    return train_set, test_set


def run(cfg):
    """Run the whole recipe of cfg.method; returns {stage: (best checkpoint, best accuracy)}."""
    cfg = resolve_config(cfg)
    train_set, test_set = load_data(cfg)
    recipe = RECIPES[cfg.method]
    results = {}
    teacher = None
    init_state = None
    if cfg.teacher:
        teacher, _ = load_model(cfg.teacher)
        if teacher.cfg.num_classes != train_set.num_classes:
            raise ValueError(f"--teacher has {teacher.cfg.num_classes} classes, the dataset {train_set.num_classes}")
    if cfg.init_from:
        init_model, _ = load_model(cfg.init_from)
        init_state = init_model.state_dict()
        recipe = recipe[-1:]
    for i, stage in enumerate(recipe):
        if stage.first and stage.scheme == "fp" and len(recipe) > 1 and cfg.teacher:
            continue  # the user's teacher replaces the full-precision stage
        if stage.init and stage.init in results:
            prev, _ = load_model(results[stage.init][0])
            init_state = prev.state_dict()
        elif stage.init and cfg.teacher and stage.init == "teacher":
            init_state = teacher.state_dict()
        stage_teacher = teacher if stage.kd != "none" else None
        if stage.kd != "none" and stage_teacher is None:
            raise RuntimeError(f"stage {stage.name} needs a teacher")
        out_dir = os.path.join(cfg.out, stage.name)
        results[stage.name] = train_stage(cfg, stage, out_dir, train_set, test_set, init_state, stage_teacher)
        if stage.name == "teacher":
            teacher, _ = load_model(results["teacher"][0])
        init_state = None
    return results


FIELD_HELP = {
    "dataset": f"one of {', '.join(data.DATASET_NAMES)}",
    "method": f"one of {', '.join(RECIPES)}: runs the method's whole recipe",
    "data_dir": "local dataset files (cifar-10-batches-py/bin, Fashion-MNIST IDX files, an image folder)",
    "out": "run directory; each stage writes <out>/<stage>/ (default runs/<dataset>-<method>)",
    "model": f"model preset, one of {', '.join(PRESETS)} (default: by dataset)",
    "image_size": "resize images to this size (default: the dataset's)",
    "epochs": "epochs of every stage (default: by dataset)",
    "teacher_epochs": "epochs of the first, full-precision stage (default: --epochs)",
    "limit_per_class": "train on N images per class (small-data setting)",
    "fraction": "train on this fraction of every class",
    "teacher": "a full-precision minibvit checkpoint to distil from (skips training a teacher)",
    "init_from": "a minibvit checkpoint to start the final stage from (skips the earlier stages)",
    "resume": "continue every stage from its last.safetensors",
    "grs_lambda": "BinaryViT GRS strength (0 turns GRS off)",
    "asm_center": "BinaryViT ASM centre: mean, median, token or none",
    "gsb_mode": "GSB gradients: official or principled",
    "max_steps": "stop each stage after this many steps (smoke tests)",
}


def _parser():
    ap = argparse.ArgumentParser(prog="python -m minibvit.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        name = "--" + f.name.replace("_", "-")
        if f.type is bool:
            ap.add_argument(name, action="store_true", help=FIELD_HELP.get(f.name))
        else:
            ap.add_argument(name, type=f.type, default=f.default, metavar=f.type.__name__.upper(),
                            help=f"{FIELD_HELP.get(f.name, '')} (default: {f.default})".strip())
    return ap


def main(argv=None):
    args = _parser().parse_args(argv)
    cfg = TrainConfig(**vars(args))
    try:
        results = run(cfg)
    except (ValueError, checkpoint.CheckpointError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(str(e), file=sys.stderr)
        return 130
    for stage, (path, acc) in results.items():
        print(f"{stage}: best test accuracy {acc:.4f}  ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
