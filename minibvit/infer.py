"""Packed low-bit inference from the command line.

Export a trained checkpoint to a packed model (bit-packed weights, see minibvit.engine.export):

    python -m minibvit.infer export --checkpoint runs/cifar10-binaryvit/binaryvit/best.safetensors \\
        --out binaryvit.packed.safetensors

Evaluate a packed model on a dataset split with the bit-packed engine (minibvit.engine.PackedViT):

    python -m minibvit.infer --packed binaryvit.packed.safetensors [--dataset cifar10] [--data-dir DIR]
        [--split test] [--batch-size 256] [--limit N] [--compare CHECKPOINT]

The dataset and its location default to those the model was trained with; the images are loaded at
the model's image size (minibvit.evaluate.load_split). --compare also runs the training-time
(simulated) forward of a checkpoint on the same batches and reports whether the logits are
bit-identical and the predictions agree; a checkpoint of another quantizer table or other quantizer
options than the packed model's is refused. Exit status 2 on bad input.
"""
if __name__ == "__main__":  # before NumPy loads its thread pools (minibvit.process)
    from minibvit.process import configure_process

    configure_process(workload="inference")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from . import checkpoint, data, methods  # noqa: E402
from .engine import PackedViT, export  # noqa: E402
from .evaluate import load_split  # noqa: E402


def export_main(argv):
    ap = argparse.ArgumentParser(prog="python -m minibvit.infer export",
                                 description="Export a trained binary / binaryvit / gsb / tervit checkpoint "
                                             "to a packed model file.")
    ap.add_argument("--checkpoint", required=True, help="a minibvit training checkpoint (.safetensors)")
    ap.add_argument("--out", required=True, help="the packed model file to write (.safetensors)")
    args = ap.parse_args(argv)
    try:
        report = export(args.checkpoint, args.out)
    except (ValueError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def _dataset(engine, args):
    meta = engine.metadata
    options = meta.get("data_options") or {}
    name = args.dataset or (meta.get("dataset") or {}).get("name")
    if name is None:
        raise ValueError("the packed model does not name its dataset: pass --dataset")
    dataset = load_split(name, args.split, args.data_dir or options.get("data_dir"), options.get("image_size"),
                         engine.cfg)
    if args.limit is not None:
        dataset = data.Dataset(dataset.images[:args.limit], dataset.labels[:args.limit], dataset.num_classes,
                               dataset.class_names, dataset.mean, dataset.std, dataset.name)
    return name, dataset


def check_same_method(engine, meta, packed_path, checkpoint_path):
    """Refuse --compare against a checkpoint of another quantizer table or quantizer options than the
    packed model's (its logits could not match)."""
    theirs = (meta["scheme"], methods.QuantizerOptions(**meta.get("scheme_options", {})))
    if theirs != (engine.scheme, engine.options):
        raise ValueError(f"--compare {checkpoint_path} is a checkpoint of {theirs[0]} ({theirs[1]}), but "
                         f"{packed_path} was exported from {engine.scheme} ({engine.options}): compare a packed "
                         f"model with the checkpoint it was exported from")


def evaluate_main(argv):
    ap = argparse.ArgumentParser(prog="python -m minibvit.infer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packed", required=True, help="a packed model written by `python -m minibvit.infer export`")
    ap.add_argument("--dataset", default=None, help="default: the dataset the model was trained on")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--split", default="test", choices=("train", "test"))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    ap.add_argument("--compare", default=None, metavar="CHECKPOINT",
                    help="also run this training checkpoint's simulated forward and compare")
    args = ap.parse_args(argv)
    try:
        if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
            raise ValueError("--batch-size and --limit must be positive")
        engine = PackedViT.load(args.packed)
        name, dataset = _dataset(engine, args)
        simulated = None
        if args.compare:
            from .train import load_model
            simulated, meta = load_model(args.compare, expect_config=engine.cfg)
            check_same_method(engine, meta, args.packed, args.compare)
    except (ValueError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine.forward(np.zeros((1, engine.cfg.in_chans, engine.cfg.image_size, engine.cfg.image_size), np.float32))
    correct, total, seconds = 0, 0, 0.0  # (the call above compiles the kernels outside the timing)
    agree, identical, max_diff = 0, 0, 0.0
    for x, y in data.iterate_batches(dataset, args.batch_size, seed=0, epoch=0, train=False, augment=False):
        start = time.perf_counter()
        logits = engine.forward(x)
        seconds += time.perf_counter() - start
        pred = logits.argmax(axis=1)
        correct += int((pred == y).sum())
        total += len(y)
        if simulated is not None:
            reference, _ = simulated.forward(x, training=False)
            agree += int((reference.argmax(axis=1) == pred).sum())
            identical += int((reference == logits).all(axis=1).sum())
            max_diff = max(max_diff, float(np.abs(reference - logits).max()))
    print(f"{args.packed}: {name} {args.split} accuracy {correct / total:.4f} ({total} images, "
          f"{engine.scheme}, packed engine {total / seconds:.1f} images/s)")
    if simulated is not None:
        print(f"vs simulated forward of {args.compare}: predictions agree on {agree}/{total}, logits bit-identical "
              f"on {identical}/{total} images, max |logit difference| {max_diff:.3g}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    return evaluate_main(argv)


if __name__ == "__main__":
    sys.exit(main())
