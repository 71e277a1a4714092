"""End-to-end inference: the packed engine (minibvit.engine.PackedViT) against the NumPy float model
(method fp, float32) and PyTorch CPU float32 (reference_tests/torch_reference.TorchViT), all at the
same thread count and measured in one run. Prints images/s and the ratios; asserts nothing.

    python scripts/bench_inference.py [--models deit-tiny deit-small] [--methods binary binaryvit]
                                      [--batches 8 64] [--threads 2] [--repeats 3] [--no-numpy]
    python scripts/bench_inference.py --sizes-only --methods binary binaryvit gsb tervit

Models are built at random (224x224, patch 16), one training forward initialises the activation
scales and ASM centres, then the model is saved as a training checkpoint and exported (the packed
file size and its ratio to the FP32 parameter bytes are printed too). The engine's logits are checked
against the simulated forward of the same model (bit for bit) on the first batch. Each time is the
minimum over --repeats runs, the runs of the compared implementations interleaved (the machine may be
shared: the minimum is the least disturbed run; re-run when numbers look noisy), each run after a
pause of PAUSE seconds so that the threads one runtime leaves spinning (OpenBLAS, PyTorch's OpenMP)
do not slow down the next one.

Each runtime gets its usual environment. minibvit is imported before NumPy, as `python -m
minibvit...` does, so that its defaults for Numba's OpenMP (OMP_WAIT_POLICY=PASSIVE) and OpenBLAS
(OPENBLAS_THREAD_TIMEOUT=4) take effect; imported after NumPy, OpenBLAS's worker spun for ~0.1 s
after the patch embedding on the core the engine's second thread needs. PyTorch loads its own
OpenMP runtime, which reads OMP_WAIT_POLICY when it loads: it is imported with the variable as the
user set it (or unset), since minibvit's PASSIVE default made PyTorch ~1.5x slower at batch 8. A
GOMP_SPINCOUNT exported by the user applies to both OpenMP runtimes.
"""
import os
import sys

_USER_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference_tests"))
import minibvit  # noqa: E402,F401  (before NumPy, see above)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from minibvit import checkpoint, engine, schemes  # noqa: E402
from minibvit.model import ViT, preset  # noqa: E402

PAUSE = 0.5  # seconds before each timed run: lets the previous runtime's spinning threads go to sleep


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["deit-tiny", "deit-small"])
    ap.add_argument("--methods", nargs="+", default=["binary", "binaryvit"])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-numpy", action="store_true", help="skip the (slow) NumPy float model")
    ap.add_argument("--sizes-only", action="store_true",
                    help="only export and print the packed file sizes (any of binary, binaryvit, gsb, tervit)")
    return ap.parse_args()


def import_torch():
    """torch, imported with OMP_WAIT_POLICY as the user set it (see the module docstring), or None.
    Before Numba's thread pool starts: once Numba has loaded the system's libgomp, PyTorch's
    libraries bind to that one (same soname) instead of PyTorch's own copy, with minibvit's policy."""
    minibvit_policy = os.environ.get("OMP_WAIT_POLICY")
    if _USER_WAIT_POLICY is None:
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = _USER_WAIT_POLICY
    try:
        import torch
    except ImportError:
        return None
    finally:
        if minibvit_policy is not None:
            os.environ["OMP_WAIT_POLICY"] = minibvit_policy
    return torch


def packed_model(cfg, method, workdir, rng):
    """Random model of `method`, one training forward, saved and exported: (engine, simulated model,
    export report). GSB models have the distillation token, as in its recipe."""
    if method == "gsb":
        cfg = dataclasses.replace(cfg, distilled=True)
    options = schemes.SchemeOptions()
    model = ViT(cfg, schemes.build_quantizers(cfg, method, options=options), seed=0)
    model.forward(rng.standard_normal((2, cfg.in_chans, cfg.image_size, cfg.image_size)).astype(np.float32),
                  training=True, rng=rng)
    path = os.path.join(workdir, f"{method}.safetensors")
    meta = {"kind": "minibvit-train", "model_config": cfg.to_dict(), "scheme": method,
            "scheme_options": dataclasses.asdict(options)}
    checkpoint.save_checkpoint(path, {f"model.{k}": v for k, v in model.state_dict().items()}, meta)
    report = engine.export(path, os.path.join(workdir, f"{method}.packed.safetensors"))
    return engine.PackedViT.load(report.path), model, report


def main():
    args = parse()
    import numba
    from threadpoolctl import threadpool_info, threadpool_limits

    torch = import_torch()  # before Numba starts its threads, see import_torch
    numba.set_num_threads(args.threads)
    threadpool_limits(args.threads, user_api="blas")
    if torch is None:
        print("torch is not installed: no PyTorch column")
    else:
        from torch_reference import TorchViT
        torch.set_num_threads(args.threads)
    blas = ", ".join(f"{i['internal_api']} {i.get('version')} ({i.get('architecture')})" for i in threadpool_info()
                     if i["user_api"] == "blas")
    print(f"threads {args.threads}; numpy BLAS: {blas}; numba threading layer {numba.config.THREADING_LAYER}"
          + (f"; torch {torch.__version__}" if torch else ""))
    print(f"numba: OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; torch: OMP_WAIT_POLICY={_USER_WAIT_POLICY}; "
          f"both: GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}; "
          f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT')}")
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
                runners[f"packed {method}"] = eng.forward
            if args.sizes_only:
                continue
            if not args.no_numpy:
                runners["numpy fp32"] = lambda x, m=ViT(cfg, seed=0): m.forward(x, training=False)[0]
            if torch is not None:
                tm = TorchViT(cfg, dtype=torch.float32)
                with torch.no_grad():
                    for t in tm.p.values():
                        t.normal_(0, 0.02)

                def torch_forward(x, tm=tm):
                    with torch.inference_mode():
                        return tm.forward(torch.from_numpy(x), training=False)
                runners["torch fp32"] = torch_forward
            for batch in args.batches:
                x = rng.standard_normal((batch, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
                best = {}
                for label, run in runners.items():
                    run(x)  # warm-up (compilation, allocation)
                for _ in range(args.repeats):
                    for label, run in runners.items():
                        time.sleep(PAUSE)
                        t0 = time.perf_counter()
                        run(x)
                        elapsed = time.perf_counter() - t0
                        best[label] = min(best.get(label, elapsed), elapsed)
                rows.append((name, batch, {label: batch / t for label, t in best.items()}))
                print(f"{name} batch {batch}: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in rows[-1][2].items()),
                      flush=True)
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
