"""A minimal data-parallel training loop for the distributed tests (test_distributed.py):

    python reference_tests/dp_loop.py --out DIR [--methods fp,binaryvit] [--accum 2] [--steps 3]
    mpiexec -n 2 python reference_tests/dp_loop.py --out DIR ...

A tiny float64 ViT on synthetic data (the global batch of step t comes from (seed, t) only, never
from the rank or the world size). Each rank computes its slices of the global batch
(distributed.batch_slices), the gradients go through distributed.GradientReducer during the backward,
every rank runs the same AdamW step, and rank 0 writes <out>/<method>/step<t>.safetensors after every
step and final.safetensors at the end. --resume-step T continues from step<T> (with any number of
ranks). --die-at T / --raise-at T / --hang-at T make the last rank SIGKILL itself / raise / sleep for
an hour in the backward of step T. --no-state-collectives runs the forwards without
distributed.global_quantizer_state (each rank's quantizers see only its slice), to show that it matters.
"""
import argparse
import contextlib
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from minibvit import checkpoint, distributed, methods, ops  # noqa: E402
from minibvit.model import ViT, ViTConfig  # noqa: E402
from minibvit.optim import AdamW, clip_grad_norm  # noqa: E402

# name -> (registry method, overrides of its final table, QuantizerOptions keywords, accumulation override,
# batch override). Each run trains the method's final stage as the registry configures it
# (methods.build_quantizers on the final table, the stage's distillation token and its gradient hooks:
# GRS for binaryvit), from scratch.
#
# The batch override (BALANCED_BATCH) is for the quantizers whose decisions sit on a data statistic
# (a median, GSB's group maxima): there an ulp moves a decision. A BLAS product's rows can depend on how
# many rows it has (OpenBLAS's Haswell kernel, OPENBLAS_CORETYPE=Haswell, rounds remainder rows
# differently), so those methods use a batch whose every product has a multiple of 8 rows in one process
# (2 micro-steps of 16 images) and on each of 2 ranks (8 images), and the two runs compute the same
# rows; the other methods keep the uneven batch of 11 (slices of 2-3 images).
BALANCED_BATCH = 32
RUNS = {
    "fp": ("fp", {}, {}, None, None),
    "fp_accum1": ("fp", {}, {}, 1, None),
    # elastic binarizers (first-batch alpha, size-normalised alpha gradient), 8-bit min-max patch/head
    "binary": ("binary", {}, {}, None, None),
    # + ASM with running mean / median centres and GRS
    "binaryvit": ("binaryvit", {}, {}, None, None),
    "binaryvit_median": ("binaryvit", {}, {"asm_center": "median"}, None, BALANCED_BATCH),
    # 8-bit min-max activations everywhere (signed and unsigned), ternary and 8-bit min-max weights
    "tervit": ("tervit", {}, {}, None, None),
    # GSB value / attention quantizers (masks, counts, first-batch alphas), distillation token
    "gsb": ("gsb", {}, {}, None, BALANCED_BATCH),
    "gsb_principled": ("gsb", {}, {"gsb_mode": "principled"}, None, BALANCED_BATCH),
    "gsb_row": ("gsb", {}, {"gsb_max_over": "row"}, None, BALANCED_BATCH),
    # LSQ 8-bit activations (first-batch step, size-normalised step gradients) and weights
    "lsq": ("fp", {"blocks.*.input": "a_lsq8", "blocks.*.weight": "w_lsq8"}, {}, None, None),
}


def config(distilled):
    return ViTConfig(image_size=8, patch_size=4, in_chans=3, embed_dim=16, depth=2, num_heads=2, num_classes=5,
                     distilled=distilled)


def global_batch(seed, step, size, cfg):
    rng = np.random.default_rng([seed, step])
    return rng.standard_normal((size, cfg.in_chans, cfg.image_size, cfg.image_size)), rng.integers(0, cfg.num_classes, size)


def loss_and_grad(logits, y):
    if isinstance(logits, tuple):  # a distilled model without a teacher: both heads learn the labels
        (l1, c1), (l2, c2) = ops.cross_entropy_forward(logits[0], y), ops.cross_entropy_forward(logits[1], y)
        return 0.5 * (l1 + l2), (ops.cross_entropy_backward(0.5, c1), ops.cross_entropy_backward(0.5, c2))
    loss, cache = ops.cross_entropy_forward(logits, y)
    return loss, ops.cross_entropy_backward(1.0, cache)


def train(name, args, comm):
    method, overrides, options, accum, batch = RUNS[name]
    accum = accum or args.accum
    batch = batch or args.batch
    stage = methods.get_method(method).final
    cfg = config(stage.distilled)
    quantizers = methods.build_quantizers(cfg, stage.table, overrides, methods.QuantizerOptions(**options),
                                          dtype="float64")
    model = ViT(cfg, quantizers, dtype=np.float64, seed=args.seed)
    hooks = methods.gradient_hooks(stage, model.quantizers)
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    out = os.path.join(args.out, name)
    start = 0
    if args.resume_step is not None:
        tensors, meta = checkpoint.load_checkpoint(os.path.join(out, f"step{args.resume_step}.safetensors"))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        opt.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}, meta["optimizer"])
        start = meta["step"]
    distributed.broadcast_state(model.state_dict(), comm)
    distributed.check_replicas(model.state_dict(), comm)
    reducer = distributed.GradientReducer(model.parameters(), comm, bucket_bytes=args.bucket_bytes)
    if comm.is_main:
        os.makedirs(out, exist_ok=True)
    for step in range(start, args.steps):
        x, y = global_batch(args.seed, step, batch, cfg)
        for part in distributed.batch_slices(batch, comm.rank, comm.world, accum):
            with contextlib.nullcontext() if args.no_state_collectives else distributed.global_quantizer_state(model, comm):
                logits, cache = model.forward(x[part.slice], training=True)
            loss, dlogits = loss_and_grad(logits, y[part.slice])
            reducer.begin(part)
            hook = reducer.hook(model)
            fault = {args.die_at: "kill", args.raise_at: "raise", args.hang_at: "hang"}.get(step)
            if fault:
                hook = fault_hook(hook, comm, fault)
            model.backward(dlogits, cache, on_grads_ready=hook)
            grads = reducer.finish()
        model.grads = grads
        for hook in hooks:  # GRS depends only on the replicated weights: after the allreduce
            hook(model, step)
        clip_grad_norm(model.grads, 1.0)
        opt.step(model.grads)
        distributed.check_replicas(model.state_dict(), comm)
        if comm.is_main:
            save(os.path.join(out, f"step{step + 1}.safetensors"), model, opt, step + 1)
        comm.barrier()
    if comm.is_main:
        save(os.path.join(out, "final.safetensors"), model, opt, args.steps)


def fault_hook(hook, comm, fault):
    """The reducer's hook, but the last rank dies (SIGKILL), raises or hangs after the first block."""
    def faulty(names):
        hook(names)
        if comm.rank == comm.world - 1 and any(n.startswith("blocks.") for n in names):
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "hang":
                time.sleep(3600)
            raise RuntimeError("injected failure in the backward")
    return faulty


def save(path, model, opt, step):
    arrays, opt_meta = opt.state_dict()
    tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()}, **{f"optim.{k}": v for k, v in arrays.items()}}
    checkpoint.save_checkpoint(path, tensors, {"step": step, "optimizer": opt_meta})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", default="fp")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=11, help="global batch of the runs without a batch override")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bucket-bytes", type=int, default=4096)  # several buckets even for the tiny model
    ap.add_argument("--resume-step", type=int)
    ap.add_argument("--die-at", type=int)
    ap.add_argument("--raise-at", type=int)
    ap.add_argument("--hang-at", type=int)
    ap.add_argument("--no-state-collectives", action="store_true")
    args = ap.parse_args()
    comm = distributed.init()
    for name in args.methods.split(","):
        train(name, args, comm)


if __name__ == "__main__":
    main()
