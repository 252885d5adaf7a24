"""The decoded-image cache: decoded once (by worker processes too), reused when nothing changed, never
when something did, nothing half-written after an interrupted decode, unreadable images named or
skipped, and a process memory that does not grow with the dataset."""

import os
import re

import numpy as np
import pytest
from PIL import Image

from cli_runs import run_cli
from flaxdiff import image_cache
from flaxdiff.data import DataError, DataSpec, load_image_data
from flaxdiff.image_cache import DiskArray, load_cached_image_data


@pytest.fixture()
def folder(tmp_path):
    path = tmp_path / "images"
    (path / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path / "a" / f"{i:03d}.png")
    return path


def test_decoded_once_then_read_from_disk_and_keyed_by_everything(folder, tmp_path):
    root = tmp_path / "cache"
    spec = DataSpec(dataset=str(folder), resolution=16)
    first = load_cached_image_data(spec, root, progress=False, log=lambda *a: None)
    assert isinstance(first, DiskArray) and len(list(root.iterdir())) == 1
    np.testing.assert_array_equal(np.asarray(first), load_image_data(spec, progress=False))  # the same pixels
    again = load_cached_image_data(spec, root, progress=False)
    assert again.path == first.path  # reused
    load_cached_image_data(DataSpec(dataset=str(folder), resolution=8), root, progress=False)
    load_cached_image_data(DataSpec(dataset=str(folder), resolution=16, center_crop=True), root, progress=False)
    assert len(list(root.iterdir())) == 3  # other options, other caches
    changed = folder / "a" / "007.png"
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))
    after = load_cached_image_data(spec, root, progress=False)
    assert after.path != first.path and not np.array_equal(np.asarray(after), np.asarray(first))


def test_workers_decode_the_pixels_this_process_does(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(image_cache, "CHUNK", 8)  # 40 images: 5 tasks for 2 spawned workers
    spec = DataSpec(dataset=str(folder), resolution=16)
    by_workers = load_cached_image_data(spec, tmp_path / "w", workers=2, progress=False)
    np.testing.assert_array_equal(np.asarray(by_workers), load_image_data(spec, progress=False))


def test_an_interrupted_decode_leaves_nothing(folder, tmp_path, monkeypatch):
    def interrupted(self, out, start, stop, progress=False):
        raise KeyboardInterrupt
    monkeypatch.setattr(image_cache.ImageSource, "decode_into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_cached_image_data(DataSpec(dataset=str(folder), resolution=16), tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_an_unreadable_image_is_named_or_skipped_and_counted(folder, tmp_path):
    (folder / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*bad\.png"):
        load_cached_image_data(DataSpec(dataset=str(folder), resolution=16), tmp_path / "c1", progress=False)
    messages = []
    skipped = load_cached_image_data(DataSpec(dataset=str(folder), resolution=16, on_bad_image="skip"),
                                     tmp_path / "c2", progress=False, log=messages.append)
    assert len(skipped) == 40 and "left out 1 unreadable image(s)" in messages[0] and "bad.png" in messages[0]


def peak_memory_mb(log: str) -> float:
    return float(re.search(r"peak memory (\d+) MB", log).group(1))


def test_memory_does_not_grow_with_the_dataset(micro_config, tmp_path):
    """Training from the cache of 8,000 and of 160,000 images (6 MB and 123 MB of pixels): runs that
    open the cache peak at the same memory, within 30 MB (measured: 664 and 671 MB; other
    tests running beside it move a peak by some MB). The first run is a warm-up: it fills the
    persistent compilation cache, so that both measured runs load the step instead of compiling it."""
    from flaxdiff.training import TrainOptions
    from flaxdiff.training.options import resolve_options
    from flaxdiff.training.setup import data_spec
    def train_from_cache(count, output):
        data = tmp_path / f"{count}.npz"
        if not data.exists():
            np.savez(data, images=np.random.default_rng(count).integers(0, 256, (count, 16, 16, 3), dtype=np.uint8))
            opts = resolve_options(TrainOptions(dataset=str(data), resolution=16, output_dir=str(tmp_path / "x")))
            load_cached_image_data(data_spec(opts), progress=False)  # built here: the run only opens it
        process = run_cli(["--dataset", str(data), "--model_config_name_or_path", str(micro_config),
                           "--resolution", "16", "--train_batch_size", "8", "--max_train_steps", "2",
                           "--num_inference_steps", "2", "--eval_batch_size", "4",
                           "--output_dir", str(tmp_path / output)])
        log, _ = process.communicate(timeout=600)
        assert process.returncode == 0 and "decoding" not in log and "converting" not in log, log
        return peak_memory_mb(log)

    train_from_cache(8000, "warm-up")
    peaks = {count: train_from_cache(count, f"run-{count}") for count in (8000, 160000)}
    print(f"\npeak memory training from the cache: {peaks}")
    assert abs(peaks[160000] - peaks[8000]) < 30


def test_options_that_do_not_change_the_pixels_do_not_change_the_key(tmp_path):
    """train.py's spec and a spec made elsewhere (DataSpec's own defaults) name the same cache of an
    .npz: the built-in dataset's image count is no option of other sources."""
    data = tmp_path / "d.npz"
    np.savez(data, images=np.zeros((4, 8, 8, 3), np.uint8))
    assert image_cache.cache_key(DataSpec(dataset=str(data), resolution=8, num_shapes=2048)) == \
        image_cache.cache_key(DataSpec(dataset=str(data), resolution=8, num_shapes=4096))
    assert image_cache.cache_key(DataSpec(num_shapes=2048, resolution=8)) != \
        image_cache.cache_key(DataSpec(num_shapes=4096, resolution=8))
