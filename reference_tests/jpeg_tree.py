"""Tiny generated JPEG trees and picklable test transforms for the ImageNet tests (no network)."""
import os
import time

import numpy as np
from PIL import Image, ImageFilter

WNIDS = ("n01440764", "n01443537", "n01484850")


def textured_image(height, width, seed):
    """A natural-looking test picture: smooth colour gradients, blobs and fine blurred noise (uint8)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    channels = []
    for c in range(3):
        f = rng.uniform(2, 9, size=2)
        base = 0.5 + 0.25 * np.sin(2 * np.pi * (f[0] * xx + rng.uniform())) * np.cos(2 * np.pi * f[1] * yy)
        channels.append(base)
    picture = np.stack(channels, axis=-1)
    noise = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).filter(
        ImageFilter.GaussianBlur(1.0))
    picture = 0.8 * picture + 0.2 * np.asarray(noise) / 255.0
    return np.clip(picture * 255.0, 0, 255).astype(np.uint8)


def write_jpeg(path, height, width, seed, quality=90):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(textured_image(height, width, seed)).save(path, quality=quality)
    return path


def make_tree(root, per_class=4, wnids=WNIDS, val="folders", sizes=((60, 80), (75, 50), (64, 64), (90, 70))):
    """root/train/<wnid>/<wnid>_<k>.JPEG; val as class folders, flat (+ LOC_val_solution.csv) or absent.
    Returns {val image id: wnid} for the flat layout."""
    seed = 0
    for wnid in wnids:
        for k in range(per_class):
            h, w = sizes[k % len(sizes)]
            write_jpeg(os.path.join(root, "train", wnid, f"{wnid}_{k}.JPEG"), h, w, seed)
            seed += 1
    truth = {}
    number = 1
    for wnid in wnids:
        for k in range(2):
            h, w = sizes[(k + 1) % len(sizes)]
            image_id = f"ILSVRC2012_val_{number:08d}"
            if val == "folders":
                write_jpeg(os.path.join(root, "val", wnid, image_id + ".JPEG"), h, w, seed)
            elif val == "flat":
                write_jpeg(os.path.join(root, "val", image_id + ".JPEG"), h, w, seed)
            truth[image_id] = wnid
            seed += 1
            number += 1
    return truth


def write_loc_csv(path, truth, order=None):
    with open(path, "w") as f:
        f.write("ImageId,PredictionString\n")
        for image_id in order or sorted(truth, reverse=True):
            wnid = truth[image_id]
            f.write(f"{image_id},{wnid} 1 2 30 40 {wnid} 5 6 20 30 \n")


class SlowTransform:
    """Wraps a transform and sleeps per image, so a test can act while workers are busy."""

    def __init__(self, transform, seconds):
        self.transform, self.seconds = transform, seconds

    def __call__(self, file, rng):
        time.sleep(self.seconds)
        return self.transform(file, rng)
