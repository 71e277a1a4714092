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

The stages, their quantizer tables and which options apply to which method are data: minibvit.methods.

Every stage writes ``last.safetensors`` (also every ``--save-every`` steps), ``best.safetensors``
(best test accuracy), ``log.jsonl`` (every metric and diagnostic), ``config.json`` (the resolved
configuration) and, with matplotlib installed, ``curves.png`` and ``weights.png``. ``--resume``
continues a stopped run exactly: the batches, augmentation and dropout of step t depend only on
(seed, epoch, step), so a resumed run ends with bit-identical weights.

log.jsonl is as durable as the checkpoint: it is flushed before every save, the checkpoint carries
the epoch's running sums (so a resumed epoch's train loss and accuracy cover the whole epoch), and a
resumed (or fresh) stage first drops the records written after the checkpoint's position, which it
then writes again: every step appears once. Each stage first runs one throwaway step on a copy of
the model to compile Numba's kernels; its time is the first epoch record's ``warmup_s``, not part of
``epoch_time_s`` / ``images_per_s``. Warnings (stderr and ``{"stage", "epoch", "step", "warning"}``
records): an activation quantizer that passes nothing on after the first step (BiT's unsigned
attention binarizer outputs all zeros on the near-uniform attention of a weak teacher), and a model
that predicts one class for every test image.
"""
if __name__ == "__main__":  # before NumPy loads its thread pools (minibvit.process)
    from minibvit.process import configure_process

    configure_process()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import numpy as np  # noqa: E402

from . import checkpoint, data, diagnostics, methods, ops  # noqa: E402
from .model import PRESETS, ViT, ViTConfig  # noqa: E402
from .optim import AdamW, clip_grad_norm, cosine_lr  # noqa: E402


# ---------------------------------------------------------------------------------------------
# configuration

GROUPS = ("data", "model", "optimisation", "method options", "run")


def _f(group, help, default=None, shown=None):
    """A TrainConfig field: its argparse group, help text and the default as --help shows it."""
    return field(default=default, metadata={"group": group, "help": help,
                                            "shown": shown if shown is not None else default})


def _m(name):
    """A method-option field: default None (= not given), help and shown default from the registry."""
    o = methods.OPTION_BY_NAME[name]
    takes = ", ".join(m.name for m in methods.METHODS.values() if name in m.options)
    return field(default=None, metadata={"group": "method options", "help": f"[{takes}] {o.help}",
                                         "shown": o.shown_default})


@dataclass
class TrainConfig:
    """Every option of a training run, grouped (the argparse groups of --help). None means "not
    given": resolve_config fills it from the dataset's defaults or the method option's default, and
    refuses method options that do not apply to the method (methods.check_options)."""

    # data
    dataset: str = _f("data", f"one of {', '.join(data.DATASET_NAMES)}", "fashion-mnist")
    data_dir: str = _f("data", "local dataset files (cifar-10-batches-py/bin, Fashion-MNIST IDX files, an image folder)",
                       shown="the dataset's standard location")
    image_size: int = _f("data", "resize images to this size", shown="the dataset's")
    limit_per_class: int = _f("data", "train on N images per class (GSB's small-data setting)", shown="all")
    fraction: float = _f("data", "or train on this fraction of every class, in (0, 1]", shown="all")
    # model
    model: str = _f("model", f"model preset, one of {', '.join(PRESETS)}", shown="by dataset")
    patch_size: int = _f("model", "patch size", shown="the preset's")
    embed_dim: int = _f("model", "embedding width (divisible by --num-heads)", shown="the preset's")
    depth: int = _f("model", "number of transformer blocks", shown="the preset's")
    num_heads: int = _f("model", "attention heads", shown="the preset's")
    mlp_ratio: float = _f("model", "MLP hidden width / embedding width", shown="the preset's")
    drop_path: float = _f("model", "stochastic-depth rate, in [0, 1)", shown=0.0)
    # optimisation
    epochs: int = _f("optimisation", "epochs of every stage", shown="by dataset")
    teacher_epochs: int = _f("optimisation", "epochs of the first, full-precision stage", shown="--epochs")
    batch_size: int = _f("optimisation", "training batch size", shown="by dataset")
    lr: float = _f("optimisation", "peak AdamW learning rate (cosine schedule)", shown="by dataset")
    min_lr: float = _f("optimisation", "final learning rate of the cosine schedule", 1e-5)
    warmup_epochs: float = _f("optimisation", "epochs of linear learning-rate warm-up", 0.5)
    weight_decay: float = _f("optimisation", "AdamW decoupled weight decay", 0.05)
    label_smoothing: float = _f("optimisation", "label smoothing of the cross-entropy, in [0, 1)", 0.1)
    clip_grad: float = _f("optimisation", "clip the global gradient norm to this (0: no clipping)", 5.0)
    # method and its options
    method: str = _f("method options", f"one of {', '.join(methods.METHODS)}: runs the method's whole recipe", "fp")
    teacher: str = _f("method options", "a full-precision minibvit checkpoint to distil from (skips training a teacher)",
                      shown="trained first")
    init_from: str = _f("method options", "a minibvit checkpoint to start the final stage from (skips the earlier stages)",
                        shown="the previous stage")
    kd_temperature: float = _m("kd_temperature")
    kd_alpha: float = _m("kd_alpha")
    grs_lambda: float = _m("grs_lambda")
    grs_variant: str = _m("grs_variant")
    grs_warmup_epochs: float = _m("grs_warmup_epochs")
    asm_center: str = _m("asm_center")
    asm_momentum: float = _m("asm_momentum")
    gsb_mode: str = _m("gsb_mode")
    gsb_max_over: str = _m("gsb_max_over")
    # run
    out: str = _f("run", "run directory; each stage writes <out>/<stage>/", shown="runs/<dataset>-<method>")
    seed: int = _f("run", "seed of the weights, batches, augmentation and dropout", 0)
    save_every: int = _f("run", "steps between mid-epoch checkpoints", 200)
    log_every: int = _f("run", "steps between diagnostic records", 10)
    eval_batch_size: int = _f("run", "evaluation batch size", 256)
    resume: bool = _f("run", "continue every stage from its last.safetensors", False)
    max_steps: int = _f("run", "stop each stage after this many steps (smoke tests)", shown="no limit")

    def method_options(self):
        """{option: value} of every method option (None = not given)."""
        return {o.name: getattr(self, o.name) for o in methods.OPTIONS}

    def validate(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"invalid option: {msg}")

        need(self.dataset in data.DATASET_NAMES, f"--dataset must be one of {data.DATASET_NAMES}, got {self.dataset!r}")
        need(self.method in methods.METHODS, f"--method must be one of {list(methods.METHODS)}, got {self.method!r}")
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
            need(v is None or (math.isfinite(v) and v >= 0), f"--{name.replace('_', '-')} must be >= 0, got {v!r}")
        need(0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        need(self.kd_alpha is None or 0 <= self.kd_alpha <= 1, f"--kd-alpha must be in [0, 1], got {self.kd_alpha}")
        need(self.asm_momentum is None or 0 < self.asm_momentum <= 1,
             f"--asm-momentum must be in (0, 1], got {self.asm_momentum}")
        need(self.fraction is None or 0 < self.fraction <= 1, f"--fraction must be in (0, 1], got {self.fraction}")
        need(not (self.fraction and self.limit_per_class), "give --fraction or --limit-per-class, not both")
        for o in (o for o in methods.OPTIONS if o.choices is not None):
            v = getattr(self, o.name)
            need(v is None or v in o.choices, f"--{o.name.replace('_', '-')} must be one of {list(o.choices)}, got {v!r}")
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
    """Validate, refuse method options that do not apply to cfg.method, and fill unset fields from the
    dataset defaults and the method options' defaults (grs_lambda stays None: its default is per stage,
    methods.grs_strength)."""
    cfg = dataclasses.replace(cfg)
    cfg.validate()
    methods.check_options(cfg.method, cfg.method_options())
    for k, v in DATASET_DEFAULTS.get(cfg.dataset, {}).items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    for o in methods.OPTIONS:
        if getattr(cfg, o.name) is None:
            setattr(cfg, o.name, o.default)
    if cfg.out is None:
        cfg.out = os.path.join("runs", f"{cfg.dataset}-{cfg.method}")
    return cfg


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


def quantizer_options(cfg):
    """The quantizer switches of a resolved config (stored in checkpoints as "scheme_options")."""
    return methods.QuantizerOptions(asm_center=cfg.asm_center, asm_momentum=cfg.asm_momentum,
                                    gsb_mode=cfg.gsb_mode, gsb_max_over=cfg.gsb_max_over)


def build_model(model_cfg, table, options, seed=0):
    """A ViT with fresh quantizers of quantizer table `table` (methods.TABLES)."""
    return ViT(model_cfg, quantizers=methods.build_quantizers(model_cfg, table, options=options), seed=seed)


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
    model = build_model(model_cfg, meta["scheme"], methods.QuantizerOptions(**meta.get("scheme_options", {})))
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


def evaluate(model, dataset, batch_size, predicted_classes=None):
    """Top-1 accuracy (and mean loss) of a model on a dataset split, in evaluation mode.

    predicted_classes: an optional set that receives every class the model predicted (one class
    for every image is the sign of a dead model, warned about by train_stage)."""
    correct, total, loss_sum = 0, 0, 0.0
    for x, y in data.iterate_batches(dataset, batch_size, seed=0, epoch=0, train=False, augment=False):
        logits, _ = model.forward(x, training=False)
        loss, _ = ops.cross_entropy_forward(logits, y)
        loss_sum += float(loss) * len(y)
        pred = logits.argmax(axis=1)
        correct += int((pred == y).sum())
        total += len(y)
        if predicted_classes is not None:
            predicted_classes.update(np.unique(pred).tolist())
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


@contextlib.contextmanager
def quiet_floating_point():
    """Silence NumPy's floating-point RuntimeWarnings (overflow, invalid value, divide by zero), also
    those of the kernels' worker threads: a diverging run is reported once, by the loss check of the
    next step, not by a screen of warnings before it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"(overflow|invalid value|divide by zero) encountered", RuntimeWarning)
        yield


def train_step(model, opt, x, y, *, lr, rng, loss_fn, teacher=None, hooks=(), step=0, clip_grad=None):
    """One optimizer step: forward, teacher, loss, backward, gradient hooks (GRS), clip, AdamW.

    loss_fn(logits, y, teacher_logits) -> (loss, dlogits); hooks: callables hook(model, step) that
    edit model.grads after backward (methods.gradient_hooks). Raises TrainingDiverged on a non-finite
    loss before touching the weights (NumPy's floating-point warnings are silenced: quiet_floating_point).
    Returns (loss, logits, gradient norm before clipping).
    """
    with quiet_floating_point():
        logits, cache = model.forward(x, training=True, rng=rng)
        teacher_logits = teacher.forward(x, training=False)[0] if teacher is not None else None
        loss, dlogits = loss_fn(logits, y, teacher_logits)
        if not np.isfinite(loss):
            raise TrainingDiverged(f"the loss became {loss}")
        model.backward(dlogits, cache)
        for hook in hooks:
            hook(model, step)
        gnorm = clip_grad_norm(model.grads, clip_grad or None)
        opt.step(model.grads, lr=lr)
    return loss, logits, gnorm


def make_run_dir(path):
    """Create the run directory `path` (and its parents), or refuse clearly (an existing file there)."""
    for at in (path, os.path.dirname(path)):
        if at and os.path.exists(at) and not os.path.isdir(at):
            raise ValueError(f"--out: {at} is an existing file, not a directory; choose a directory path "
                             f"(nothing was written)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out: cannot create the run directory {path}: {e.strerror}") from None


def _steps_done(record, steps):
    """How many steps of the stage had run when a log.jsonl record was written (epoch records after
    the epoch's last step, step and warning records after their step)."""
    if "train_loss" in record:
        return (record["epoch"] + 1) * steps
    return record["epoch"] * steps + record["step"] + 1


def truncate_log(path, steps, position):
    """Keep the records of log.jsonl written at or before `position` (steps done, as in the checkpoint
    the run resumes from; 0 for a fresh start), drop the rest and any line a kill cut short. The
    resumed run writes the dropped records again, so every record appears once."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                keep = line.endswith("\n") and _steps_done(json.loads(line), steps) <= position
            except (ValueError, TypeError, KeyError):  # a line cut short by a kill, or not a record
                continue
            if keep:
                kept.append(line)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _warn(log, stage, epoch, step, text):
    """A warning on stderr and as a {"stage", "epoch", "step", "warning"} record of log.jsonl."""
    print(f"[{stage.name}] warning: {text}", file=sys.stderr)
    log.write(json.dumps({"stage": stage.name, "epoch": epoch, "step": step, "warning": text}) + "\n")


def _warm_up_loss(logits, y, teacher_logits):
    """The warm-up step's loss: the cross-entropy of every head (it runs the kernels the stage loss
    runs, without calling the stage loss itself)."""
    heads = logits if isinstance(logits, tuple) else (logits,)
    caches = [ops.cross_entropy_forward(h, y)[1] for h in heads]
    grads = tuple(ops.cross_entropy_backward(1.0, c) for c in caches)
    return 0.0, grads if isinstance(logits, tuple) else grads[0]


def _warm_up(model, cfg, stage, x, y, teacher, steps):
    """Compile (Numba) everything a training step and an evaluation forward run, on a throwaway copy
    of the model with its own optimizer and hooks, so the compile time stays out of the epoch's time
    and images/s. The model, its optimizer and every RNG stream are untouched. Returns seconds."""
    t0 = time.perf_counter()
    scratch = copy.deepcopy(model)
    opt = AdamW(scratch.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    hooks = methods.gradient_hooks(stage, scratch.quantizers, cfg.grs_lambda, cfg.grs_variant,
                                   int(cfg.grs_warmup_epochs * steps))
    try:
        train_step(scratch, opt, x, y, lr=cfg.lr, rng=np.random.default_rng(0), loss_fn=_warm_up_loss, teacher=teacher,
                   hooks=hooks, step=0, clip_grad=cfg.clip_grad)
    except TrainingDiverged:
        pass  # the real step reports it
    with quiet_floating_point():
        scratch.forward(x, training=False)
    return time.perf_counter() - t0


def train_stage(cfg, stage, out_dir, train_set, test_set, init_state=None, teacher=None):
    """Train one stage into out_dir; returns (best checkpoint path, best accuracy)."""
    make_run_dir(out_dir)
    last_path, best_path = os.path.join(out_dir, "last.safetensors"), os.path.join(out_dir, "best.safetensors")
    epochs = cfg.teacher_epochs if (stage.first and cfg.teacher_epochs) else cfg.epochs
    img = train_set.images
    model_cfg = model_config(cfg, stage.distilled, train_set.num_classes, img.shape[3], img.shape[1])
    options = quantizer_options(cfg)
    model = build_model(model_cfg, stage.table, options, seed=cfg.seed)
    opt = AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = data.steps_per_epoch(len(train_set), cfg.batch_size, drop_last=len(train_set) >= cfg.batch_size)
    total_steps = epochs * steps
    warmup = int(round(cfg.warmup_epochs * steps))
    binarized = methods.binarized_weight_roles(model.quantizers)
    hooks = methods.gradient_hooks(stage, model.quantizers, cfg.grs_lambda, cfg.grs_variant,
                                   int(cfg.grs_warmup_epochs * steps))
    meta = {"kind": "minibvit-train", "model_config": model_cfg.to_dict(), "scheme": stage.table,
            "scheme_options": dataclasses.asdict(options), "stage": stage.name, "method": cfg.method,
            "gradient_hooks": [repr(h) for h in hooks], "train_config": dataclasses.asdict(cfg),
            "dataset": {"name": train_set.name, "mean": train_set.mean.tolist(), "std": train_set.std.tolist(),
                        "class_names": list(train_set.class_names)},
            "rng": "dropout/drop-path of global step t use numpy default_rng([seed, 7, t]); batches use (seed, epoch, step)"}
    epoch, start_step, best_acc = 0, 0, -1.0
    sums = {"seen": 0, "correct": 0, "loss_sum": 0.0}  # the current epoch's running sums
    if os.path.exists(last_path):
        tensors, saved = checkpoint.load_checkpoint(last_path)
        if saved.get("model_config") != meta["model_config"] or saved.get("scheme") != stage.table:
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
        sums = saved.get("epoch_sums", sums)
        print(f"[{stage.name}] resuming at epoch {epoch} step {start_step}", file=sys.stderr)
    elif init_state is not None:
        transfer_state(init_state, model)

    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({k: v for k, v in meta.items() if k != "rng"}, f, indent=2)

    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        interrupted["flag"] = True

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    log_path = os.path.join(out_dir, "log.jsonl")
    truncate_log(log_path, steps, epoch * steps + start_step)
    log = open(log_path, "a")
    flip_counter = diagnostics.FlipCounter()
    done_steps = 0

    def loss_fn(logits, y, teacher_logits):
        return _loss(stage, cfg, logits, y, teacher_logits)

    def save_last(next_epoch, next_step, **extra):
        log.flush()  # the log holds every step the checkpoint holds
        save_training_state(last_path, model, opt, {**meta, "epoch": next_epoch, "step": next_step,
                                                    "best_acc": best_acc, **extra})

    drop_last = len(train_set) >= cfg.batch_size
    try:
        from tqdm import tqdm

        warmup_s = None
        if epoch < epochs:
            x, y = next(iter(data.iterate_batches(train_set, cfg.batch_size, cfg.seed, epoch, start_step=start_step,
                                                  drop_last=drop_last)))
            warmup_s = _warm_up(model, cfg, stage, x, y, teacher, steps)
        while epoch < epochs:
            bar = tqdm(total=steps, initial=start_step, desc=f"{stage.name} {epoch + 1}/{epochs}", file=sys.stderr,
                       disable=None, leave=False)
            t0, timed = time.perf_counter(), 0
            seen, correct, loss_sum = sums["seen"], sums["correct"], sums["loss_sum"]
            last_step = start_step - 1
            batches = data.iterate_batches(train_set, cfg.batch_size, cfg.seed, epoch, start_step=start_step,
                                           drop_last=drop_last)
            for step, (x, y) in enumerate(batches, start=start_step):
                gstep, last_step = epoch * steps + step, step
                lr = cosine_lr(gstep, total_steps, cfg.lr, warmup, cfg.min_lr)
                rng = np.random.default_rng([cfg.seed, 7, gstep])
                try:
                    loss, logits, gnorm = train_step(model, opt, x, y, lr=lr, rng=rng, loss_fn=loss_fn, teacher=teacher,
                                                     hooks=hooks, step=gstep, clip_grad=cfg.clip_grad)
                except TrainingDiverged as e:
                    kept = (f"The last good checkpoint is kept: {last_path}" if os.path.exists(last_path)
                            else "No checkpoint had been saved yet.")
                    raise TrainingDiverged(f"[{stage.name}] {e} at epoch {epoch} step {step}; lower --lr or raise "
                                           f"--clip-grad. {kept}") from None
                pred = (logits[0] + logits[1]) / 2 if isinstance(logits, tuple) else logits
                correct += int((pred.argmax(1) == y).sum())
                seen += len(y)
                timed += len(y)
                loss_sum += float(loss) * len(y)
                record = {"stage": stage.name, "epoch": epoch, "step": step, "global_step": gstep, "lr": lr,
                          "loss": float(loss), "grad_norm": gnorm}
                flip_counter.update(model, binarized)
                with quiet_floating_point():  # diverged weights: the next step's loss check reports it
                    if gstep % cfg.log_every == 0:
                        record.update(diagnostics.weight_diagnostics(model, binarized, flip_counter))
                        record.update(diagnostics.activation_diagnostics(model, x[: min(len(x), 32)]))
                    # the scales are set now: a quantizer that passes nothing on kills the model
                    dead = diagnostics.dead_activation_quantizers(model, x[: min(len(x), 32)]) if gstep == 0 else []
                log.write(json.dumps(record) + "\n")
                if dead:
                    _warn(log, stage, epoch, step, "after the first step, " + "; ".join(
                        f"{role}: {what}" for role, what in dead) + ". The layers after them see no image "
                        "(a near-uniform attention binarizes to all zeros, e.g. from a weak teacher)")
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{timed / elapsed:.0f}")
                bar.update(1)
                done_steps += 1
                epoch_sums = {"seen": seen, "correct": correct, "loss_sum": loss_sum}
                if (step + 1) % cfg.save_every == 0 and step + 1 < steps:
                    save_last(epoch, step + 1, epoch_sums=epoch_sums)
                if interrupted["flag"]:
                    save_last(epoch, step + 1, epoch_sums=epoch_sums)
                    raise Stopped(f"[{stage.name}] interrupted: saved {last_path}; continue with --resume")
                if cfg.max_steps and done_steps >= cfg.max_steps:
                    break
            bar.close()
            train_time = time.perf_counter() - t0
            predicted = set()
            acc, test_loss = evaluate(model, test_set, cfg.eval_batch_size, predicted)
            record = {"stage": stage.name, "epoch": epoch, "train_loss": loss_sum / max(seen, 1),
                      "train_acc": correct / max(seen, 1), "test_loss": test_loss, "test_acc": acc,
                      "epoch_time_s": train_time, "images_per_s": timed / max(train_time, 1e-9)}
            compiled = ""
            if warmup_s is not None:  # the first epoch of this process: compile time kept apart
                record["warmup_s"] = warmup_s
                compiled = f" (+{warmup_s:.1f}s compile/warm-up, not counted)"
                warmup_s = None
            log.write(json.dumps(record) + "\n")
            print(f"[{stage.name}] epoch {epoch + 1}/{epochs}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f}"
                  f" | test acc {acc:.4f} | {train_time:.0f}s, {record['images_per_s']:.0f} img/s{compiled}", file=sys.stderr)
            if len(predicted) == 1 and test_set.num_classes > 1:
                (only,) = predicted
                _warn(log, stage, epoch, last_step, f"every test image was predicted as class {only} "
                      f"({test_set.class_names[only]}): the output does not depend on the image")
            log.flush()
            epoch, start_step = epoch + 1, 0
            sums = {"seen": 0, "correct": 0, "loss_sum": 0.0}
            stop_now = bool(cfg.max_steps and done_steps >= cfg.max_steps)
            if acc > best_acc:
                best_acc = acc
                save_training_state(best_path, model, opt, {**meta, "epoch": epoch, "step": 0, "best_acc": best_acc,
                                                            "complete": True})
            save_last(epoch, 0, complete=epoch >= epochs or stop_now)
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
    make_run_dir(cfg.out)
    train_set, test_set = load_data(cfg)
    recipe = methods.get_method(cfg.method).stages
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
    for stage in recipe:
        if stage.first and not stage.quantizer_table.patterns and len(recipe) > 1 and cfg.teacher:
            continue  # the user's teacher replaces the full-precision stage
        if stage.init and stage.init in results:
            prev, _ = load_model(results[stage.init][0])
            init_state = prev.state_dict()
        elif stage.init and cfg.teacher and stage.init == methods.TEACHER_STAGE:
            init_state = teacher.state_dict()
        stage_teacher = teacher if stage.kd != "none" else None
        if stage.kd != "none" and stage_teacher is None:
            raise RuntimeError(f"stage {stage.name} needs a teacher")
        out_dir = os.path.join(cfg.out, stage.name)
        results[stage.name] = train_stage(cfg, stage, out_dir, train_set, test_set, init_state, stage_teacher)
        if stage.name == methods.TEACHER_STAGE:
            teacher, _ = load_model(results[stage.name][0])
        init_state = None
    return results


def _parser():
    ap = argparse.ArgumentParser(prog="python -m minibvit.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {name: ap.add_argument_group(name) for name in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        name, meta = "--" + f.name.replace("_", "-"), f.metadata
        group = groups[meta["group"]]
        if f.type is bool:
            group.add_argument(name, action="store_true", help=meta["help"])
            continue
        option = methods.OPTION_BY_NAME.get(f.name)
        choices = option.choices if option is not None else None
        metavar = "{" + ",".join(choices) + "}" if choices else f.type.__name__.upper()
        group.add_argument(name, type=f.type, default=f.default, metavar=metavar,
                           help=f"{meta['help']} (default: {meta['shown']})")
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
