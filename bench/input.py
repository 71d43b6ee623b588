"""Input pipeline throughput, before and after, side by side in one run: the ImageNet-style training path (JPEG
decode, random-resized crop to 224, flip, batch) on JPEGs generated here (no dataset needed).

    python bench/input.py [--before REV] [--images 256] [--batch 64] [--batches 12] [--repeats 3] [--workers 1 2]
                          [--processes 0 2]

- before: `gconv/data.py` of `--before` (default: the last commit before the input path changed), loaded from git
  beside this tree's; records decoded when read (as TFDS's data sources decode them), float32 standardised on the
  host;
- uint8: this tree, records decoded when read, `uint8` pixels to the devices (standardised inside the step);
- after: this tree, records read encoded (as gconv reads TFDS images and folders) and decoded by the augmentation,
  which knows the crop (libjpeg-turbo down to the crop's bottom rows, at a reduced size where the crop allows it).

Each variant runs `--batches` batches after a warm-up batch, interleaved `--repeats` times (medians shown). Speed
per core is images per CPU second of this process (every thread's time: `time.process_time`), so it does not
depend on how many cores the machine has; with `--processes`, grain's worker processes do the work and the rows
give images/s only. Prints a markdown table and the ratios after / before.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gconv import data  # noqa: E402

BEFORE = "e0fa476"  # the last commit before uint8 pixels and decoding that knows the crop
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_TRAIN = 1_281_167


def make_jpegs(num_images: int, seed: int = 0) -> list[tuple[bytes, int]]:
    """`(JPEG bytes, label)` of ImageNet-like images: 300-500 px a side, smooth regions with noise, quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    records = []
    for i in range(num_images):
        h, w = rng.integers(300, 501), rng.integers(300, 501)
        smooth = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        pixels = np.kron(smooth, np.ones((16, 16, 1), np.uint8))[:h, :w]
        pixels = np.clip(pixels + rng.integers(-20, 21, pixels.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        records.append((buffer.getvalue(), i % 1000))
    return records


class DecodedJpegs:
    """Records decoded when read, as a TFDS data source decodes them: `{"image": uint8 HxWx3, "label"}`. Row `i` is
    record `i mod len(records)` of a source of ImageNet's length (`length`), so that shuffling costs what it costs on
    ImageNet: grain's index shuffle takes ~75 us an index over 256 rows, ~4 us over 1,281,167."""

    def __init__(self, records: list[tuple[bytes, int]], length: int = IMAGENET_TRAIN):
        self.records, self.length = records, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        jpeg, label = self.records[i % len(self.records)]
        return {"image": np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")), "label": label}


class EncodedJpegs(DecodedJpegs):
    """Records read encoded (gconv's TFDS sources and folders): `{"image": JPEG bytes, "label"}`."""

    def __getitem__(self, i: int) -> dict:
        jpeg, label = self.records[i % len(self.records)]
        return {"image": jpeg, "label": label}


def _load_before(rev: str):
    """`gconv/data.py` as it was at `rev`, as a module of its own."""
    text = subprocess.run(["git", "show", f"{rev}:gconv/data.py"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout
    with tempfile.TemporaryDirectory(prefix="gconv-bench-input-") as tmp:
        path = os.path.join(tmp, "data_before.py")
        with open(path, "w") as f:
            f.write(text)
        spec = importlib.util.spec_from_file_location("data_before", path)
        module = sys.modules["data_before"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def _variants(before, records):
    """name -> `(make_batches(workers, processes), source)`."""
    old = before.DatasetInfo("imagenet2012", (224, 224, 3), 1000, len(records), 0, MEAN, STD)
    new = data.DatasetInfo("imagenet2012", (224, 224, 3), 1000, len(records), 0, MEAN, STD, crop="random_resized",
                           pixels="uint8")

    def old_batches(source, batch, workers, processes):
        assert not processes, "the before path has no worker processes"
        return before.train_batches(source, old, batch, seed=0, num_workers=workers)

    def new_batches(source, batch, workers, processes):
        return data.train_batches(source, new, batch, seed=0, num_workers=workers, worker_processes=processes)

    return {"before: decoded when read, float32 from the host": (old_batches, DecodedJpegs(records)),
            "uint8 to the devices, decoded when read": (new_batches, DecodedJpegs(records)),
            "after: uint8, decoded knowing the crop": (new_batches, EncodedJpegs(records))}


def _measure(batches, count: int) -> tuple[float, float, int]:
    """`(images/s, images per CPU second of this process, bytes per image)` over `count` batches after one."""
    first = next(batches)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        batch = next(batches)
    wall, used = time.perf_counter() - start, time.process_time() - cpu
    getattr(batches, "close", lambda: None)()
    images = count * len(batch["image"])
    assert batch["image"].shape[1:] == (224, 224, 3) and first["image"].shape == batch["image"].shape
    return images / wall, images / used, batch["image"][0].nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, data.num_threads(-1)])
    parser.add_argument("--processes", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    records = make_jpegs(args.images)
    variants = _variants(_load_before(args.before), records)
    print(f"{len(os.sched_getaffinity(0))} cores; {args.images} generated JPEGs of 300-500 px; batch {args.batch}; "
          f"before = {args.before}; medians of {args.repeats} interleaved repeats\n")
    print("| path | threads | worker processes | images/s | images per CPU second | bytes per image |\n"
          "|---|---:|---:|---:|---:|---:|")
    per_cpu = {}
    for processes in args.processes:
        for workers in args.workers:
            runs = {name: [] for name in variants}
            for _ in range(args.repeats):
                for name, (make, source) in variants.items():
                    if processes and name.startswith("before"):
                        continue
                    runs[name].append(_measure(make(source, args.batch, workers, processes), args.batches))
            for name, measured in runs.items():
                if not measured:
                    continue
                rate, cpu_rate = (statistics.median(m[i] for m in measured) for i in (0, 1))
                per_cpu[(name, workers, processes)] = cpu_rate
                cpu = f"{cpu_rate:,.0f}" if not processes else "(in the workers)"
                print(f"| {name} | {workers} | {processes} | {rate:,.0f} | {cpu} | {measured[0][2]:,} |", flush=True)
    names = list(variants)
    for workers in args.workers:
        if (names[0], workers, 0) in per_cpu:
            base = per_cpu[(names[0], workers, 0)]
            ratios = ", ".join(f"{name.split(':')[0]} {per_cpu[(name, workers, 0)] / base:.2f}x" for name in names[1:])
            print(f"\nimages per CPU second, {workers} thread(s), against before: {ratios}")


if __name__ == "__main__":
    main()
