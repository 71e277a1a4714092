"""End-to-end inference: the packed engine (minibvit.engine.PackedViT) against the NumPy float model
(method fp, float32) and PyTorch CPU float32 (reference_tests/torch_reference.TorchViT), all at the
same thread count and measured in one run. Prints images/s and the ratios; asserts nothing.

    python scripts/bench_inference.py [--models deit-tiny deit-small] [--methods binary binaryvit]
                                      [--batches 8 64] [--threads 2] [--repeats 3] [--no-numpy]
    python scripts/bench_inference.py --sizes-only --methods binary binaryvit gsb tervit
    python scripts/bench_inference.py --workload train      # the training thread settings instead

Models are built at random (224x224, patch 16), one training forward initialises the activation
scales and ASM centres, then the model is saved as a training checkpoint and exported (the packed
file size and its ratio to the FP32 parameter bytes are printed too). The engine's logits are checked
against the simulated forward of the same model (bit for bit) on the first batch. Each time is the
minimum over --repeats runs, the runs of the compared implementations interleaved (the machine may be
shared: the minimum is the least disturbed run; re-run when numbers look noisy), each run after a
pause of PAUSE seconds so that the threads one runtime leaves spinning (OpenBLAS, PyTorch's OpenMP)
do not slow down the next one. PyTorch runs in a worker process of its own (scripts/torch_baseline.py),
with its own OpenMP settings rather than minibvit's process-wide defaults (measured: with minibvit's
passive OpenMP waiting, PyTorch's DeiT-Tiny batch-8 forward was ~20 % slower); it gets the same weights
as the NumPy float model.
"""
import argparse
import dataclasses
import importlib.util
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference_tests"))

from minibvit.process import configure_process  # noqa: E402

# --workload is read before NumPy loads (the thread settings must come first); parse() lists it too
WORKLOAD = argparse.ArgumentParser(add_help=False)
WORKLOAD.add_argument("--workload", choices=("inference", "train"), default="inference",
                      help="minibvit.process thread settings: inference (what python -m minibvit.infer uses: "
                           "OpenMP spins briefly) or train (OpenMP waits passively)")
PROCESS = configure_process(workload=WORKLOAD.parse_known_args()[0].workload)
import numpy as np  # noqa: E402
from minibvit import checkpoint, engine, methods  # noqa: E402
from torch_baseline import BaselineProcess  # noqa: E402
from minibvit.model import ViT, preset  # noqa: E402

PAUSE = 0.5  # seconds before each timed run: lets the previous runtime's spinning threads go to sleep


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 parents=[WORKLOAD])
    ap.add_argument("--models", nargs="+", default=["deit-tiny", "deit-small"])
    ap.add_argument("--methods", nargs="+", default=["binary", "binaryvit"])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-numpy", action="store_true", help="skip the (slow) NumPy float model")
    ap.add_argument("--sizes-only", action="store_true",
                    help="only export and print the packed file sizes (any of binary, binaryvit, gsb, tervit)")
    return ap.parse_args()


def packed_model(cfg, method, workdir, rng):
    """Random model of `method`, one training forward, saved and exported: (engine, simulated model,
    export report). GSB models have the distillation token, as in its recipe."""
    if methods.METHODS[method].final.distilled:
        cfg = dataclasses.replace(cfg, distilled=True)
    options = methods.QuantizerOptions()
    model = ViT(cfg, methods.build_quantizers(cfg, methods.METHODS[method].final.table, options=options), seed=0)
    model.forward(rng.standard_normal((2, cfg.in_chans, cfg.image_size, cfg.image_size)).astype(np.float32),
                  training=True, rng=rng)
    path = os.path.join(workdir, f"{method}.safetensors")
    meta = {"kind": "minibvit-train", "model_config": cfg.to_dict(), "scheme": method,
            "scheme_options": dataclasses.asdict(options)}
    checkpoint.save_checkpoint(path, {f"model.{k}": v for k, v in model.state_dict().items()}, meta)
    report = engine.export(path, os.path.join(workdir, f"{method}.packed.safetensors"))
    return engine.PackedViT.load(report.path), model, report


def timed(forward):
    """A runner: forward(x), returning its wall time in seconds."""
    def run(x):
        t0 = time.perf_counter()
        forward(x)
        return time.perf_counter() - t0
    return run


def main():
    args = parse()
    import numba
    from threadpoolctl import threadpool_info, threadpool_limits

    numba.set_num_threads(args.threads)
    threadpool_limits(args.threads, user_api="blas")  # a bare limit would also cap Numba's OpenMP pool
    have_torch = importlib.util.find_spec("torch") is not None
    if not have_torch:
        print("torch is not installed: no PyTorch column")
    blas = ", ".join(f"{i['internal_api']} {i.get('version')} ({i.get('architecture')})" for i in threadpool_info()
                     if i["user_api"] == "blas")
    print(f"threads {args.threads}; numpy BLAS: {blas}; numba threading layer {numba.config.THREADING_LAYER}"
          + ("; torch in a worker process (torch_baseline.py)" if have_torch else "")
          + f"; set by minibvit: {PROCESS.env or 'nothing'}")
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            cfg = preset(name)
            runners = {}
            for method in args.methods:
                eng, simulated, report = packed_model(cfg, method, workdir, rng)
                print(f"{name} {method}: packed file {report.file_bytes / 2 ** 20:.2f} MiB, "
                      f"FP32 parameters {report.fp32_bytes / 2 ** 20:.2f} MiB, ratio {report.ratio:.2f}x")
                if args.sizes_only:
                    continue
                x = rng.standard_normal((2, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
                if not np.array_equal(eng.forward(x), simulated.forward(x, training=False)[0]):
                    print(f"WARNING: {name} {method}: packed logits differ from the simulated forward")
                runners[f"packed {method}"] = timed(eng.forward)
            if args.sizes_only:
                continue
            fp_model = ViT(cfg, seed=0)
            if not args.no_numpy:
                runners["numpy fp32"] = timed(lambda x, m=fp_model: m.forward(x, training=False)[0])
            torch_side = None
            if have_torch:
                torch_side = BaselineProcess("inference", args.threads, config=dataclasses.asdict(cfg),
                                             arrays=fp_model.state_dict())
                runners["torch fp32"] = lambda x: torch_side.time(1, batch=len(x))[0]
            for batch in args.batches:
                x = rng.standard_normal((batch, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
                best = {}
                for label, run in runners.items():
                    run(x)  # warm-up (compilation, allocation)
                for _ in range(args.repeats):
                    for label, run in runners.items():
                        time.sleep(PAUSE)
                        elapsed = run(x)
                        best[label] = min(best.get(label, elapsed), elapsed)
                rows.append((name, batch, {label: batch / t for label, t in best.items()}))
                print(f"{name} batch {batch}: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in rows[-1][2].items()),
                      flush=True)
            if torch_side is not None:
                torch_side.close()
    if args.sizes_only:
        return
    labels = list(rows[0][2])
    packed = [k for k in labels if k.startswith("packed")] if "torch fp32" in labels else []
    print("\n| model | batch | " + " | ".join(labels + [f"{k} / torch" for k in packed]) + " |")
    print("|" + " --- |" * (2 + len(labels) + len(packed)))
    for name, batch, speeds in rows:
        cells = [f"{speeds[k]:.1f}" for k in labels] + [f"{speeds[k] / speeds['torch fp32']:.2f}x" for k in packed]
        print(f"| {name} | {batch} | " + " | ".join(cells) + " |")
    print("(images/s; minimum time over the repeats)")


if __name__ == "__main__":
    main()
