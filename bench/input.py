"""Input pipeline throughput: the ImageNet-style training path (JPEG decode, random-resized crop to 224, flip,
batch) through `gconv.data.train_batches`, on JPEGs generated here (no dataset needed), with the pixels
standardised to float32 on the host (as before) and sent as uint8 (standardised on the device), side by side.

    python bench/input.py [--images 256] [--batch 64] [--batches 20] [--workers 1 2]

Prints images/s and images/s per worker thread for each worker count.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gconv import data  # noqa: E402


class JpegSource:
    """Random-access JPEG records, decoded on read as a TFDS image feature is: `{"image": uint8 HxWx3, "label"}`."""

    def __init__(self, num_images: int, seed: int = 0):
        from PIL import Image

        rng = np.random.default_rng(seed)
        self.records = []
        for i in range(num_images):
            h, w = rng.integers(300, 501), rng.integers(300, 501)  # ImageNet-like sizes
            smooth = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            pixels = np.kron(smooth, np.ones((16, 16, 1), np.uint8))[:h, :w]
            pixels = np.clip(pixels + rng.integers(-20, 21, pixels.shape), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            self.records.append((buffer.getvalue(), i % 1000))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        jpeg, label = self.records[i]
        return {"image": np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")), "label": label}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, data.num_threads(-1)])
    args = parser.parse_args()
    source = JpegSource(args.images)
    print(f"{len(os.sched_getaffinity(0))} cores; {args.images} generated JPEGs of 300-500 px; batch {args.batch}")
    print("| pixels to the device | worker threads | images/s | images/s per thread | bytes per image |\n"
          "|---|---:|---:|---:|---:|")
    for workers in args.workers:
        for pixels in ("float32", "uint8"):  # standardised on the host (before), on the device (after), in turn
            info = data.DatasetInfo("imagenet2012", (224, 224, 3), 1000, len(source), 0, (0.485, 0.456, 0.406),
                                    (0.229, 0.224, 0.225), crop="random_resized", pixels=pixels)
            batches = data.train_batches(source, info, args.batch, seed=0, num_workers=workers)
            next(batches)  # start the threads
            start = time.perf_counter()
            for _ in range(args.batches):
                batch = next(batches)
            rate = args.batches * args.batch / (time.perf_counter() - start)
            assert batch["image"].shape == (args.batch, 224, 224, 3)
            print(f"| {pixels} | {workers} | {rate:,.0f} | {rate / workers:,.0f} | "
                  f"{batch['image'][0].nbytes:,} |")


if __name__ == "__main__":
    main()
