"""Accuracy of a trained checkpoint on a test split:
``python -m minibvit.evaluate --checkpoint runs/fashion-mnist-binaryvit/binaryvit/best.safetensors``.

The dataset and its location default to those the checkpoint was trained with. The images are loaded
at the model's image size: as stored when that is their size or the size training resized them to,
else resized to it (bilinear, as training's --image-size does); there is no --image-size option, since
a model takes images of one size only.
"""
if __name__ == "__main__":  # before NumPy loads its thread pools (minibvit.process)
    from minibvit.process import configure_process

    configure_process()

import argparse  # noqa: E402
import sys  # noqa: E402

from . import checkpoint, data  # noqa: E402
from .train import evaluate, load_model  # noqa: E402


def load_split(name, split, data_dir, trained_size, model_cfg):
    """A dataset split at the model's image size: loaded as training loaded it (resized to
    trained_size, or as stored when None) and, if its images are of another size, resized to
    model_cfg.image_size. Raises ValueError when the channel counts differ (they are not converted)."""
    dataset = data.load_dataset(name, split, data_dir=data_dir, image_size=trained_size)
    _, height, width, channels = dataset.images.shape
    if (height, width) != (model_cfg.image_size,) * 2 and channels == model_cfg.in_chans:
        dataset = data.load_dataset(name, split, data_dir=data_dir, image_size=model_cfg.image_size)
    data.check_images(dataset, model_cfg.image_size, model_cfg.in_chans)
    return dataset


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
        dataset = load_split(name, args.split, args.data_dir or train_cfg.get("data_dir"),
                             train_cfg.get("image_size"), model.cfg)
        acc, loss = evaluate(model, dataset, args.batch_size)
    except (ValueError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.checkpoint}: {name} {args.split} accuracy {acc:.4f} (loss {loss:.4f}, {len(dataset)} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
