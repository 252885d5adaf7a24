"""What a dataset's size costs: image folders of generated shapes (10k, 100k and 1M images at 32 px,
10k at 256 px), each measured as a new user meets them.

1. first run: decoding the folder into the image cache, images/s with 0 and 2 worker processes,
   after `datasets` has indexed the folder once (its own Arrow cache; timed separately);
2. second run: opening the cache (the folder's file list is checked, then the cache is mapped);
3. training: train.py's steady images/s and peak memory reading batches from the cache, against the
   same step fed from memory (--image_cache_dir none: the whole dataset decoded into RAM).

Every number comes from a fresh subprocess, whose own peak resident memory (VmHWM) is reported.

    python benchmarks/data_scale.py                        # all cases; ~1 hour on 2 CPU cores
    python benchmarks/data_scale.py --cases 10k_32 --train_steps 100

Results: benchmarks/results/data_scale.json and a markdown table on stdout (for docs/data.md).
The generated folders go to --work_dir (1M images at 32 px take ~4 GB with filesystem overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "data_scale.json"
CASES = ("10k_32", "100k_32", "1M_32", "10k_256")  # <count>_<pixels>; any such name works
PER_FOLDER = 1000  # images per sub-folder, as big datasets are usually laid out


def _draw_range(folder: str, size: int, start: int, stop: int) -> None:
    import numpy as np

    from flaxdiff.data import SHAPE_KINDS, draw_shape

    rng = np.random.default_rng(start)
    for i in range(start, stop):
        sub = Path(folder) / f"{i // PER_FOLDER:04d}"
        sub.mkdir(exist_ok=True)
        draw_shape(SHAPE_KINDS[i % len(SHAPE_KINDS)], rng, size).save(sub / f"{i:07d}.png")


def make_folder(folder: Path, count: int, size: int, workers: int) -> None:
    """An image folder of `count` PNG shapes (made once; a marker file says it is complete)."""
    done = folder / ".complete"
    if done.exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    ranges = [(a, min(a + PER_FOLDER, count)) for a in range(0, count, PER_FOLDER)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_draw_range, *zip(*[(str(folder), size, a, b) for a, b in ranges])))
    done.write_text("")
    print(f"made {count} images of {size} px in {time.perf_counter() - start:.0f}s -> {folder}", flush=True)


PROBE = """
import json, sys, time
start = time.perf_counter()
from flaxdiff.data import DataSpec, ImageSource
from flaxdiff.host import peak_rss_bytes
from flaxdiff.image_cache import load_cached_image_data
imported = time.perf_counter()
what, folder, size, root, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
spec = DataSpec(dataset=folder, resolution=size)
if what == "index":
    count = len(ImageSource.open(spec))
else:
    count = len(load_cached_image_data(spec, root, workers=workers, progress=False))
print(json.dumps(dict(seconds=time.perf_counter() - imported, images=count, peak_rss_mb=peak_rss_bytes() / 2**20)))
"""


def probe(what: str, folder: Path, size: int, root: Path, workers: int, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, what, str(folder), str(size), str(root), str(workers)],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        sys.exit(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def train(folder: Path, size: int, cache: str, out: Path, args, env: dict) -> dict:
    flags = ["--dataset", str(folder), "--resolution", str(size), "--image_cache_dir", cache,
             "--model_preset", "tiny", "--train_batch_size", str(args.train_batch_size),
             "--max_train_steps", str(args.train_steps), "--logging_steps", str(args.logging_steps),
             "--checkpointing_steps", str(10**9), "--save_images_epochs", str(10**6),
             "--save_model_epochs", str(10**6), "--output_dir", str(out), "--overwrite_output_dir"]
    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    if run.returncode:
        sys.exit(f"train.py failed:\n{run.stdout[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [row["images_per_sec"] for row in rows[1:] if row.get("images_per_sec")]  # the first window compiles
    done = next(line for line in run.stdout.splitlines() if line.startswith("done:"))
    return {"steps": args.train_steps, "batch": args.train_batch_size,
            "images_per_sec_median": statistics.median(rates), "images_per_sec_windows": rates,
            "wall_seconds": time.perf_counter() - start,
            "peak_rss_mb": float(done.split("peak memory ")[1].split(" MB")[0])}


def parse_case(name: str) -> tuple[int, int]:
    """'100k_32' -> (100000, 32)."""
    count, size = name.split("_")
    scale = {"k": 1_000, "M": 1_000_000}.get(count[-1], 1)
    return int(count.rstrip("kM")) * scale, int(size)


def measure(name: str, args, env: dict) -> dict:
    count, size = parse_case(name)
    work = Path(args.work_dir)
    folder = work / name
    make_folder(folder, count, size, args.make_workers)
    result = {"images": count, "resolution": size, "pixels_mb": count * size * size * 3 / 2**20}
    case_env = dict(env, HF_DATASETS_CACHE=str(work / f"hf-{name}"))
    shutil.rmtree(case_env["HF_DATASETS_CACHE"], ignore_errors=True)
    result["index"] = probe("index", folder, size, work, 0, case_env)  # datasets' own first pass
    print(f"{name}: datasets indexed the folder in {result['index']['seconds']:.1f}s", flush=True)
    for workers in args.workers:
        root = work / f"cache-{name}-w{workers}"
        shutil.rmtree(root, ignore_errors=True)
        first = probe("decode", folder, size, root, workers, case_env)
        first["images_per_sec"] = count / first["seconds"]
        again = probe("open", folder, size, root, workers, case_env)
        result[f"workers_{workers}"] = {"first_run": first, "second_run": again}
        print(f"{name}, {workers} workers: decoded {first['images_per_sec']:.0f} images/s "
              f"(peak {first['peak_rss_mb']:.0f} MB); second run opened it in {again['seconds']:.2f}s "
              f"(peak {again['peak_rss_mb']:.0f} MB)", flush=True)
    if args.train_steps:
        root = work / f"cache-{name}-w{args.workers[-1]}"
        result["train_from_cache"] = train(folder, size, str(root), work / "run", args, case_env)
        if count <= args.in_memory_up_to:
            result["train_from_memory"] = train(folder, size, "none", work / "run", args, case_env)
        print(f"{name}: training " + ", ".join(f"{k}: {v['images_per_sec_median']:.0f} images/s, peak "
                                             f"{v['peak_rss_mb']:.0f} MB" for k, v in result.items()
                                             if k.startswith("train_")), flush=True)
    for root in (work / f"cache-{name}-w{w}" for w in args.workers):
        shutil.rmtree(root, ignore_errors=True)
    return result


def table(results: dict) -> str:
    lines = ["| images | px | pixels | datasets' indexing | first run: decode, 0 workers | 2 workers | "
             "second run: open | train from cache | train from memory |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results["cases"].items():
        def decode(w):
            run = r.get(f"workers_{w}", {}).get("first_run")
            return f"{run['images_per_sec']:,.0f}/s, {run['peak_rss_mb']:.0f} MB" if run else "–"

        def trained(key):
            run = r.get(key)
            if not run:
                return "–"
            memory = f", {run['peak_rss_mb']:.0f} MB" if run.get("peak_rss_mb") else ""
            return f"{run['images_per_sec_median']:.3g} img/s{memory}"
        opened = r.get("workers_2", r.get("workers_0", {})).get("second_run")
        lines.append(f"| {r['images']:,} | {r['resolution']} | {r['pixels_mb']:,.0f} MB | {r['index']['seconds']:.1f}s "
                     f"| {decode(0)} | {decode(2)} | {opened['seconds']:.2f}s, {opened['peak_rss_mb']:.0f} MB | "
                     f"{trained('train_from_cache')} | {trained('train_from_memory')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated <count>_<pixels> "
                        f"cases, like 2k_32 or 1M_32 (default: {','.join(CASES)})")
    parser.add_argument("--work_dir", default="/tmp/flaxdiff-data-scale", help="where the generated folders and "
                        "caches go (default: /tmp/flaxdiff-data-scale)")
    parser.add_argument("--workers", default="0,2", help="decoding worker counts to measure (default: 0,2)")
    parser.add_argument("--make_workers", type=int, default=2, help="processes drawing the images (default: 2)")
    parser.add_argument("--train_steps", type=int, default=300, help="train.py steps per training measurement "
                        "(default: 300; 0 skips training)")
    parser.add_argument("--logging_steps", type=int, default=50, help="images/s window (default: 50 steps)")
    parser.add_argument("--train_batch_size", type=int, default=64, help="global batch (default: 64)")
    parser.add_argument("--in_memory_up_to", type=int, default=100_000, help="train from memory too for datasets "
                        "up to this many images (default: 100,000)")
    args = parser.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.setdefault("cases", {})
    results["machine"] = f"{os.cpu_count()} CPU cores"
    for name in args.cases.split(","):
        results["cases"][name] = measure(name, args, env)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
