"""BinaryViT ablation: the binary baseline against GRS / ASM variants, several seeds, one shared teacher.

    PYTHONPATH=. nice -n 10 python scripts/ablate_binaryvit.py --teacher runs/ablate/teacher/fp/best.safetensors \
        --out runs/ablate --seeds 0 1 2 --variants binary binaryvit asm_only

Every student is the final stage of its method (3 epochs by default), distilled from --teacher, on
Fashion-MNIST with --limit-per-class images per class; test accuracy on the full test split. Each run
goes to <out>/lpc<N>/<variant>/seed<k>/; a finished run is reused and an unfinished one resumed, so an
interrupted ablation continues.
Prints and writes <out>/ablation.json: per variant the accuracies per seed, mean, std and the
difference to the `binary` baseline.
"""
import argparse
import json
import os
import statistics
import sys
import time

import reproduce  # scripts/reproduce.py: the paired t-interval and the verdict
from minibvit import process, train

VARIANTS = {
    "binary": ["--method", "binary"],
    "binaryvit": ["--method", "binaryvit"],
    "asm_only": ["--method", "binaryvit", "--grs-lambda", "0"],
    "grs_only": ["--method", "binary", "--grs-lambda", "0.01"],
    "asm_linear": ["--method", "binaryvit", "--grs-lambda", "0", "--asm-where", "linear"],
    "asm_attention": ["--method", "binaryvit", "--grs-lambda", "0", "--asm-where", "attention"],
    "asm_signed": ["--method", "binaryvit", "--grs-lambda", "0", "--asm-where", "signed"],
    "asm_median": ["--method", "binaryvit", "--grs-lambda", "0", "--asm-center", "median"],
    "asm_token": ["--method", "binaryvit", "--grs-lambda", "0", "--asm-center", "token"],
    "asm_shift": ["--method", "binaryvit", "--grs-lambda", "0", "--asm-center", "shift"],
    "asm_scale": ["--method", "binaryvit", "--grs-lambda", "0", "--asm-scale", "on"],
    "grs_late": ["--method", "binary", "--grs-lambda", "0.01", "--grs-start-epoch", "2", "--grs-warmup-epochs", "0"],
    "grs_decay": ["--method", "binary", "--grs-lambda", "0.01", "--grs-schedule", "cosine_decay",
                  "--grs-warmup-epochs", "0"],
    "grs_increase": ["--method", "binary", "--grs-lambda", "0.01", "--grs-schedule", "cosine_increase",
                     "--grs-warmup-epochs", "0"],
    "grs_l1": ["--method", "binary", "--grs-lambda", "1e-4", "--grs-variant", "l1"],
    "grs_flip": ["--method", "binary", "--grs-lambda", "0.01", "--grs-flip-window", "0.1", "--grs-warmup-epochs", "0"],
    "grs_scale": ["--method", "binary", "--grs-lambda", "0.01", "--grs-layer-norm", "scale"],
    "grs_weak": ["--method", "binary", "--grs-lambda", "0.001"],
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="the shared FP teacher checkpoint (needed to train)")
    ap.add_argument("--out", default="runs/ablate")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["binary", "binaryvit", "asm_only"], choices=sorted(VARIANTS))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit-per-class", type=int, default=1000)
    ap.add_argument("--summary", action="store_true", help="only summarise the finished runs under --out")
    args = ap.parse_args(argv)
    if not args.summary:
        if not args.teacher:
            ap.error("--teacher is required to train")
        process.configure_process()
        for variant in args.variants:
            for seed in args.seeds:
                out = os.path.join(args.out, f"lpc{args.limit_per_class}", variant, f"seed{seed}")
                flags = VARIANTS[variant] + ["--dataset", "fashion-mnist", "--limit-per-class",
                                             str(args.limit_per_class), "--epochs", str(args.epochs), "--seed",
                                             str(seed), "--teacher", args.teacher, "--out", out, "--resume",
                                             "--eval-every", str(args.epochs)]  # the test split once, at the end
                t0 = time.time()
                res = train.run(train.TrainConfig(**vars(train._parser().parse_args(flags))))
                (stage,) = [s for s in res if s != "teacher"]
                print(f"{variant} seed {seed}: {res[stage][1]:.4f} ({time.time() - t0:.0f}s)", flush=True)
    results = collect(args.out)
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump(results, f, indent=1)
    summarise(results)


def collect(out):
    """{"lpc<N>/<variant>": {"flags", "acc": {seed: final test acc}, "best": {seed: best}, "seconds": {seed}}}
    from the finished runs' log.jsonl (the last epoch's test accuracy, and the best one)."""
    results = {}
    for lpc in sorted(d for d in os.listdir(out) if d.startswith("lpc")):
        for variant in sorted(os.listdir(os.path.join(out, lpc))):
            for seed_dir in sorted(os.listdir(os.path.join(out, lpc, variant))):
                root = os.path.join(out, lpc, variant, seed_dir)
                stages = [d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "log.jsonl"))]
                if len(stages) != 1:
                    continue
                stage_dir = os.path.join(root, stages[0])
                last = json.load(open(os.path.join(stage_dir, "config.json")))["train_config"]["epochs"]
                with open(os.path.join(stage_dir, "log.jsonl")) as f:
                    ends = [json.loads(line) for line in f if '"epoch_time_s"' in line]  # one per finished epoch
                epochs = [e for e in ends if "test_acc" in e]
                if len(ends) < last or ends[-1].get("test_acc") is None:
                    continue  # unfinished
                entry = results.setdefault(f"{lpc}/{variant}", {"flags": " ".join(VARIANTS.get(variant, ["?"])),
                                                                 "acc": {}, "best": {}, "seconds": {}})
                seed = seed_dir[4:]
                entry["acc"][seed] = epochs[-1]["test_acc"]
                entry["best"][seed] = max(e["test_acc"] for e in epochs)
                entry["seconds"][seed] = round(sum(e["epoch_time_s"] for e in ends))
    return results


def summarise(results):
    """One line per variant: final test accuracy mean +- std over seeds, and the paired difference to
    `binary` over the seeds both have, in points, with reproduce.py's 95% Student-t interval and verdict."""
    for key, entry in sorted(results.items()):
        accs = list(entry["acc"].values())
        base = results.get(key.split("/")[0] + "/binary")
        line = f"{key:26s} n={len(accs)} acc {statistics.mean(accs):.4f}"
        line += f" +- {statistics.stdev(accs):.4f}" if len(accs) > 1 else "         "
        line += "  seeds " + " ".join(f"{s}:{a:.4f}" for s, a in sorted(entry["acc"].items()))
        if base and not key.endswith("/binary"):
            diff = reproduce.paired_difference(entry["acc"], base["acc"])
            if diff:
                m, lo, hi, n = diff
                common = ",".join(sorted(set(base["acc"]) & set(entry["acc"])))
                line += f" | vs binary (seeds {common}): {100 * m:+.2f} pt"
                line += "" if n < 2 else f", 95% [{100 * lo:+.2f}, {100 * hi:+.2f}]: {reproduce.verdict(diff)}"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
