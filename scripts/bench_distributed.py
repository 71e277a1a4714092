"""Data-parallel training step on this machine: 1 rank x 2 threads against 2 ranks x 1 thread.

    flock /tmp/minibvit_cpu.lock python scripts/bench_distributed.py [--quick]

For the benchmark ViT (32x32, patch 4, dim 192, depth 6, 3 heads, global batch 128) and DeiT-S 224
(global batch 8), full precision, float32: the time per step (forward, backward, gradient allreduce,
AdamW; the median over the timed steps, ranks started together by a barrier), the exposed allreduce
time (what finish() waits for after the backward) with the buckets started during the backward
(overlap) and after it (no overlap: the whole allreduce time), bytes per allreduce and per step, and the
peak RSS of each rank. A last run gives the peak RSS per rank of DeiT-S at global batch 64 (one step).
Runs each layout as `mpiexec -n R python scripts/bench_distributed.py --worker ...` (the venv's mpiexec).

At the end it prints the epoch-time model of docs/scaling.md for ImageNet-1k (1,281,167 images) on N
nodes at 10/25/100 Gb/s from the measured DeiT-S figures; `--epoch-model-from results.json` reprints it
from a saved run (the last line of the output), `--node-speedup K` for nodes K times faster than this one.
"""
import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = {
    "bench-vit": dict(cfg=dict(image_size=32, patch_size=4, in_chans=3, embed_dim=192, depth=6, num_heads=3,
                               num_classes=10), batch=128, warmup=2, steps=5),
    "deit-s": dict(cfg=dict(image_size=224, patch_size=16, in_chans=3, embed_dim=384, depth=12, num_heads=6,
                            num_classes=1000), batch=8, warmup=1, steps=3),
    "deit-s-b64-memory": dict(cfg=dict(image_size=224, patch_size=16, in_chans=3, embed_dim=384, depth=12, num_heads=6,
                                       num_classes=1000), batch=64, warmup=0, steps=1),
}
LAYOUTS = [(1, 2, True), (2, 1, True), (2, 1, False)]  # (ranks, threads per rank, overlap)


def worker(args):
    from minibvit.process import configure_process

    configure_process()  # first, as the trainer's main does: thread-pool waits and malloc settings
    import numpy as np

    from minibvit import distributed, ops
    from minibvit.model import ViT, ViTConfig
    from minibvit.optim import AdamW

    comm = distributed.init()
    spec = MODELS[args.model]
    cfg = ViTConfig(**spec["cfg"])
    model = ViT(cfg, dtype=np.float32, seed=0)
    opt = AdamW(model.parameters(), lr=1e-4)
    reducer = distributed.GradientReducer(model.parameters(), comm, bucket_bytes=args.bucket_bytes, overlap=args.overlap)
    rng = np.random.default_rng(0)
    batch = spec["batch"]
    x = rng.standard_normal((batch, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    y = rng.integers(0, cfg.num_classes, batch)
    times, waits, overlaps = [], [], []
    for step in range(spec["warmup"] + spec["steps"]):
        comm.barrier()
        t0 = time.perf_counter()
        for part in distributed.batch_slices(batch, comm.rank, comm.world):
            logits, cache = model.forward(x[part.slice], training=True)
            loss, c = ops.cross_entropy_forward(logits, y[part.slice])
            reducer.begin(part)
            model.backward(ops.cross_entropy_backward(1.0, c), cache, on_grads_ready=reducer.hook(model))
            grads = reducer.finish()
        opt.step(grads)
        if step >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
            waits.append(reducer.wait_s)
            overlaps.append(reducer.overlap_s)
    rss_mb = comm.gather(np.array([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))
    step_s = comm.max(np.array([np.median(times)]))[0]  # the slowest rank sets the pace
    wait_s = comm.max(np.array([np.median(waits)]))[0]
    overlap_s = comm.min(np.array([np.median(overlaps)]))[0]
    if comm.is_main:
        print("RESULT " + json.dumps({
            "model": args.model, "ranks": comm.world, "threads": int(os.environ.get("NUMBA_NUM_THREADS", 0)),
            "overlap": args.overlap, "global_batch": batch, "step_s": step_s, "allreduce_wait_s": wait_s,
            "allreduce_share": wait_s / step_s,
            "overlap_window_s": overlap_s, "bytes_per_step": reducer.bytes_per_step,
            "buckets": len(reducer.buckets), "bytes_per_bucket": reducer.flat.nbytes // len(reducer.buckets),
            "peak_rss_mb_per_rank": [round(float(r), 1) for r in rss_mb]}), flush=True)


def run_layout(model, ranks, threads, overlap, bucket_bytes):
    env = {k: v for k, v in os.environ.items()}
    env.update(PYTHONPATH=ROOT, NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", model, "--bucket-bytes", str(bucket_bytes)]
    if not overlap:
        cmd.append("--no-overlap")
    if ranks > 1:
        cmd = [os.path.join(os.path.dirname(sys.executable), "mpiexec"), "-n", str(ranks), *cmd]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


IMAGENET_TRAIN = 1281167


def ring_allreduce_s(nodes, nbytes, gbit_s, buckets, latency_s):
    """Ring allreduce: each node sends and receives 2 (N - 1) / N of the buffer, in 2 (N - 1) rounds
    per bucket, each round paying the network latency."""
    if nodes == 1:
        return 0.0
    return 2 * (nodes - 1) / nodes * nbytes / (gbit_s * 1e9 / 8) + 2 * (nodes - 1) * buckets * latency_s


def epoch_model(result, global_batch=1024, node_speedup=1.0, latency_s=10e-6, nodes=(1, 2, 4, 8, 16, 32, 64, 128)):
    """Rows (nodes, Gb/s, per-node batch, compute s/step, allreduce s, exposed s, epoch h, node-hours/epoch)
    from one measured result: compute per image per node = (step_s - allreduce_wait_s) / global batch /
    node_speedup; the allreduce is hidden behind the share of the step that follows the start of the
    first bucket (overlap_window_s / step_s)."""
    per_image = (result["step_s"] - result["allreduce_wait_s"]) / result["global_batch"] / node_speedup
    window_share = result["overlap_window_s"] / result["step_s"]
    nbytes = result["bytes_per_bucket"] * result["buckets"]
    steps = math.ceil(IMAGENET_TRAIN / global_batch)
    rows = []
    for gbit in (10, 25, 100):
        for n in nodes:
            compute = global_batch / n * per_image
            comm = ring_allreduce_s(n, nbytes, gbit, result["buckets"], latency_s)
            exposed = max(0.0, comm - window_share * compute)
            epoch_h = steps * (compute + exposed) / 3600
            rows.append((n, gbit, global_batch / n, compute, comm, exposed, epoch_h, n * epoch_h))
    return rows


def print_epoch_model(results, node_speedup):
    """The model from the DeiT-S run with the least compute per image (this node's best layout)."""
    runs = [r for r in results if r["model"].startswith("deit-s") and r["overlap"]]
    base = min(runs, key=lambda r: (r["step_s"] - r["allreduce_wait_s"]) / r["global_batch"])
    per_image = (base["step_s"] - base["allreduce_wait_s"]) / base["global_batch"]
    print(f"# epoch model: DeiT-S fp, ImageNet-1k, global batch 1024; compute {per_image:.3f} s per image on this node "
          f"({base['ranks']} rank x {base['threads']} thread, batch {base['global_batch']}) / {node_speedup:g}; "
          f"{base['bytes_per_bucket'] * base['buckets'] / 1e6:.1f} MB per allreduce in {base['buckets']} buckets; "
          f"overlap window {100 * base['overlap_window_s'] / base['step_s']:.0f}% of the step; 10 us per ring round")
    print("nodes  Gb/s  batch/node  compute s  allreduce s  exposed s  epoch h  node-h/epoch")
    for n, gbit, b, compute, comm, exposed, epoch_h, node_h in epoch_model(base, node_speedup=node_speedup):
        print(f"{n:5d} {gbit:5d} {b:11.0f} {compute:10.3f} {comm:12.3f} {exposed:10.3f} {epoch_h:8.2f} {node_h:13.1f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--model", default="bench-vit", choices=sorted(MODELS))
    ap.add_argument("--no-overlap", dest="overlap", action="store_false")
    ap.add_argument("--bucket-bytes", type=int, default=4 << 20)
    ap.add_argument("--quick", action="store_true", help="only the benchmark ViT")
    ap.add_argument("--epoch-model-from", help="reprint the epoch model from the JSON line of an earlier run")
    ap.add_argument("--node-speedup", type=float, default=1.0, help="nodes this many times faster than this one")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.epoch_model_from:
        return print_epoch_model(json.loads(open(args.epoch_model_from).read().strip().splitlines()[-1]), args.node_speedup)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"# {cpu}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()} at start")
    models = ["bench-vit"] if args.quick else list(MODELS)
    results = []
    for model in models:
        layouts = LAYOUTS if not model.endswith("memory") else [(1, 2, True), (2, 1, True)]
        for ranks, threads, overlap in layouts:
            r = run_layout(model, ranks, threads, overlap, args.bucket_bytes)
            results.append(r)
            print(f"{model:18s} {ranks} rank x {threads} thr overlap={str(overlap):5s} batch {r['global_batch']:3d}: "
                  f"step {r['step_s'] * 1e3:8.1f} ms, allreduce wait {r['allreduce_wait_s'] * 1e3:7.1f} ms "
                  f"({100 * r['allreduce_share']:4.1f}%), {r['bytes_per_step'] / 1e6:6.1f} MB/step in {r['buckets']} "
                  f"buckets, peak RSS/rank {r['peak_rss_mb_per_rank']} MB", flush=True)
    print(f"# load average {os.getloadavg()} at end")
    if any(r["model"] == "deit-s" for r in results):
        print_epoch_model(results, args.node_speedup)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
