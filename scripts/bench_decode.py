"""Decode throughput of the ImageNet pipeline: images/s per worker, 1 and 2 workers.

Generates a JPEG tree (default 500 images of 500x375, ImageNet's typical size, quality 90) and runs
minibvit.loader.BatchLoader over it with DeiT's per-image training transform (random-resized-crop,
flip, RandAugment) and with the evaluation transform (resize + center crop), each with and without
JPEG draft mode, at the output sizes given. The first batch (worker start-up) is not timed; each
figure is the best of --repeats epochs (the machine is shared). Also reports on how many images
draft mode reduced the decode, and the trainer-side cost of BatchAugment (normalise, random erasing,
mixup/cutmix) per batch of 64.

    flock /tmp/minibvit_cpu.lock python scripts/bench_decode.py [--images 500] [--sizes 224,112]
"""
import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reference_tests"))

from jpeg_tree import write_jpeg  # noqa: E402
from minibvit import augment, imagenet  # noqa: E402
from minibvit.loader import BatchLoader  # noqa: E402


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_tree(root, images, height, width, classes=10):
    for k in range(images):
        wnid = f"n{k % classes:08d}"
        write_jpeg(os.path.join(root, "train", wnid, f"{wnid}_{k}.JPEG"), height, width, seed=k)


def measure(source, transform, size, workers, batch_size, repeats):
    """Best images/s over `repeats` epochs, excluding each epoch's first batch."""
    order = np.arange(len(source))
    rates = []
    with BatchLoader(source, transform, batch_size, size, num_workers=workers) as loader:
        for epoch in range(repeats):
            batches = loader.batches(order, seed=0, epoch=epoch)
            next(batches)  # worker start-up / refill, not timed
            start, count = time.perf_counter(), 0
            for _, images, _ in batches:
                count += len(images)
            rates.append(count / (time.perf_counter() - start))
    return max(rates)


def draft_share(source, transform, batch_size):
    """Fraction of images draft mode decodes reduced (the crop box is the transform's first draw)."""
    reduced = 0
    for i in range(len(source)):
        with Image.open(source.open(i)) as img:
            width, height = img.size
        if isinstance(transform, augment.TrainTransform):
            step, position = divmod(i, batch_size)
            rng = np.random.default_rng([0, augment.CROP_STREAM, 0, step, position])
            box = augment.random_resized_crop_box(height, width, rng)
            out = transform.size
        else:
            box = (0, 0, height, width)
            out = augment.eval_resize_size(height, width, transform.size)
        reduced += augment.draft_factor((width, height), box, out) > 1
    return reduced / len(source)


def batch_augment_ms(size, batch=64, repeats=5):
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    labels = np.arange(batch) % 1000
    aug = augment.BatchAugment(num_classes=1000)
    times = []
    for step in range(repeats):
        start = time.perf_counter()
        aug(images, labels, 0, 0, step)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--sizes", default="224,112", help="output sizes, comma-separated")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical cores; load average before: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as root:
        make_tree(root, args.images, args.height, args.width)
        source = imagenet.folder_source(root, "train")
        print(f"{len(source)} JPEGs of {args.width}x{args.height}, batch {args.batch_size}; "
              f"images/s per worker (total = per worker x workers)")
        print(f"{'transform':<34} {'size':>4} {'draft':>5} " + " ".join(f"{w + ' worker(s)':>12}"
                                                                        for w in args.workers.split(","))
              + "  reduced decodes")
        for size in (int(s) for s in args.sizes.split(",")):
            for name, make in (("train (RRC + flip + RandAugment)", lambda d: augment.TrainTransform(size, draft=d)),
                               ("eval (resize + center crop)", lambda d: augment.EvalTransform(size, draft=d))):
                for draft in (False, True):
                    rates = [measure(source, make(draft), size, int(w), args.batch_size, args.repeats) / int(w)
                             for w in args.workers.split(",")]
                    share = draft_share(source, make(draft), args.batch_size) if draft else 0.0
                    print(f"{name:<34} {size:>4} {str(draft):>5} " + " ".join(f"{r:>12.0f}" for r in rates)
                          + f"  {100 * share:>14.0f} %", flush=True)
            print(f"trainer side: BatchAugment (normalise + erasing + mixup/cutmix), batch 64 at {size}: "
                  f"{batch_augment_ms(size):.1f} ms", flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
