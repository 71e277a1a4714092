"""Accuracy of a trained checkpoint on a test split:
``python -m minibvit.evaluate --checkpoint runs/fashion-mnist-binaryvit/binaryvit/best.safetensors``.

The dataset, its location and the image size default to those the checkpoint was trained with.
"""
if __name__ == "__main__":  # before NumPy loads its thread pools (minibvit.process)
    from minibvit.process import configure_process

    configure_process()

import argparse  # noqa: E402
import sys  # noqa: E402

from . import checkpoint, data  # noqa: E402
from .train import evaluate, load_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minibvit.evaluate", description=__doc__)
    ap.add_argument("--checkpoint", required=True, help="a minibvit training checkpoint (.safetensors)")
    ap.add_argument("--dataset", default=None, help="default: the dataset the checkpoint was trained on")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--split", default="test", choices=("train", "test"))
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args(argv)
    try:
        model, meta = load_model(args.checkpoint)
        train_cfg = meta.get("train_config", {})
        name = args.dataset or meta.get("dataset", {}).get("name") or train_cfg.get("dataset")
        if name is None:
            raise ValueError("the checkpoint does not name its dataset: pass --dataset")
        kw = {"data_dir": args.data_dir or train_cfg.get("data_dir"), "image_size": train_cfg.get("image_size")}
        dataset = data.load_dataset(name, args.split, **kw)
        data.check_images(dataset, model.cfg.image_size, model.cfg.in_chans)
        acc, loss = evaluate(model, dataset, args.batch_size)
    except (ValueError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.checkpoint}: {name} {args.split} accuracy {acc:.4f} (loss {loss:.4f}, {len(dataset)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
