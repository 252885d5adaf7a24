"""Datasets: the built-in shapes, image folders with awkward files, Hub errors, data order."""

import numpy as np
import pytest
from PIL import Image

from flaxdiff.data import DataError, DataSpec, load_images, make_shapes, resolve_dataset_name
from flaxdiff.training.feed import BatchOrder, epoch_permutation, process_slice


def test_shapes_are_deterministic_and_varied():
    a = load_images(DataSpec(num_shapes=48, resolution=32, seed=3), progress=False)
    b = load_images(DataSpec(num_shapes=48, resolution=32, seed=3), progress=False)
    c = load_images(DataSpec(num_shapes=48, resolution=32, seed=4), progress=False)
    assert a.shape == (48, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 20
    # varied backgrounds: the corner pixels of the images span the colour range
    corners = a[:, 0, 0].astype(int)
    assert corners.std(axis=0).min() > 40
    labels = make_shapes(48, 32, 3)["label"]
    assert len(set(labels)) == 4


def test_shapes_in_one_channel():
    gray = load_images(DataSpec(num_shapes=8, resolution=16, channels=1), progress=False)
    assert gray.shape == (8, 16, 16, 1)


def write_awkward_folder(folder):
    """Images of every mode people have in their folders, and sizes that need resizing."""
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(folder / "rgb.jpg")
    Image.fromarray(rng.integers(0, 256, (50, 30), dtype=np.uint8), "L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert("P").save(folder / "sub" / "palette.png")
    sixteen = np.full((32, 32), 65535, dtype=np.uint16)
    sixteen[:16] = 257 * 100
    Image.fromarray(sixteen).save(folder / "sixteen.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert("CMYK").save(folder / "cmyk.jpg")
    (folder / "notes.txt").write_text("not an image")


def test_image_folder_with_every_mode(tmp_path):
    write_awkward_folder(tmp_path)
    images = load_images(DataSpec(dataset=str(tmp_path), resolution=16, center_crop=True), progress=False)
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
    gray = load_images(DataSpec(dataset=str(tmp_path), resolution=16, channels=1), progress=False)
    assert gray.shape == (6, 16, 16, 1)
    # the 16-bit image keeps its contrast: 65535 -> 255 and 25700 -> 100 (not clipped to white)
    sixteen = Image.open(tmp_path / "sixteen.png")
    from flaxdiff.data import to_mode
    values = np.asarray(to_mode(sixteen, 1))
    assert values.max() == 255 and values.min() == 100


def test_random_crop_is_fixed_by_the_seed(tmp_path):
    Image.fromarray(np.arange(64 * 32 * 3, dtype=np.uint32).reshape(32, 64, 3).astype(np.uint8)).save(tmp_path / "wide.png")
    crops = [load_images(DataSpec(dataset=str(tmp_path), resolution=16, seed=s), progress=False) for s in (0, 0, 1, 2, 3)]
    np.testing.assert_array_equal(crops[0], crops[1])
    assert len({c.tobytes() for c in crops}) > 2


@pytest.mark.parametrize("corrupt", ["truncated", "garbage"])
def test_unreadable_image_is_named(tmp_path, corrupt):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "good.png")
    bad = tmp_path / "bad.png"
    if corrupt == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"cannot read image .*bad\.png.*Remove or replace this file"):
        load_images(DataSpec(dataset=str(tmp_path), resolution=8), progress=False)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="the image folder ./no/such/folder does not exist"):
        resolve_dataset_name("./no/such/folder")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"holds no images .*found: readme.txt"):
        load_images(DataSpec(dataset=str(tmp_path)), progress=False)
    (tmp_path / "file.png").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        resolve_dataset_name(str(tmp_path / "file.png"))


def test_hub_dataset_offline_is_one_clear_error(monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load the Hub dataset 'huggan/smithsonian_butterflies_subset'.*"
                                        "offline.*--dataset ./my_images"):
        load_images(DataSpec(dataset="smithsonian_butterflies"), progress=False)


def test_order_is_a_function_of_seed_and_epoch():
    np.testing.assert_array_equal(epoch_permutation(100, 1, 2), epoch_permutation(100, 1, 2))
    assert not np.array_equal(epoch_permutation(100, 1, 2), epoch_permutation(100, 1, 3))
    order = BatchOrder(num_images=100, micro_batch=8, accumulation=2, seed=1)
    assert order.steps_per_epoch == 6
    first = order.indices(0)
    assert first.shape == (2, 8)
    epoch = np.concatenate([order.indices(s).ravel() for s in range(6)])
    assert len(set(epoch.tolist())) == 96  # an epoch never repeats an image
    np.testing.assert_array_equal(order.indices(6).ravel(), epoch_permutation(100, 1, 1)[:16])
    parts = [process_slice(first, p, 2) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=-1), first)


def test_too_few_images_for_one_step():
    with pytest.raises(DataError, match="has 10 images, fewer than one optimizer step needs"):
        BatchOrder(num_images=10, micro_batch=8, accumulation=2, seed=0)


# --------------------------------------------------------------------------- .npz arrays
def test_npz_images_load_as_they_are_or_converted(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=rgb, labels=np.arange(5))
    # already at the resolution and channel count: the very array, first N with --max_train_samples
    np.testing.assert_array_equal(load_images(DataSpec(dataset=str(tmp_path / "rgb.npz"), resolution=16),
                                              progress=False), rgb)
    first = load_images(DataSpec(dataset=str(tmp_path / "rgb.npz"), resolution=16, max_train_samples=2),
                        progress=False)
    np.testing.assert_array_equal(first, rgb[:2])
    # NHW grayscale, resized and given 3 channels, each image converted like a file would be
    gray = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "gray.npz", images=gray)
    spec = DataSpec(dataset=str(tmp_path / "gray.npz"), resolution=16, center_crop=True)
    converted = load_images(spec, progress=False)
    assert converted.shape == (4, 16, 16, 3) and converted.dtype == np.uint8
    expected = np.asarray(Image.fromarray(gray[1]).convert("RGB").resize((16, 16), Image.BILINEAR))
    np.testing.assert_array_equal(converted[1], expected)
    one_channel = load_images(DataSpec(dataset=str(tmp_path / "gray.npz"), resolution=28, channels=1),
                              progress=False)
    np.testing.assert_array_equal(one_channel[..., 0], gray)


@pytest.mark.parametrize("arrays, match", [
    (dict(pixels=np.zeros((2, 8, 8, 3), np.uint8)), "has no 'images' array .*it has: pixels"),
    (dict(images=np.zeros((2, 8, 8, 3), np.float32)), "'images' must be uint8 .*float32"),
    (dict(images=np.zeros((8, 8), np.uint8)), r"'images' must be uint8 of shape \(N, H, W\[, C\]\)"),
])
def test_npz_problems_are_named(tmp_path, arrays, match):
    np.savez(tmp_path / "data.npz", **arrays)
    with pytest.raises(DataError, match=match):
        load_images(DataSpec(dataset=str(tmp_path / "data.npz"), resolution=8), progress=False)


def test_image_folder_splits_and_classes_as_datasets_reads_them(tmp_path):
    """flaxdiff lists an image folder once (data_files patterns) instead of datasets' data_dir
    inference, which walks the tree once per candidate split pattern; the splits, the images, their
    order and their class labels stay what data_dir gives."""
    import datasets

    from flaxdiff.data import open_dataset

    rng = np.random.default_rng(0)
    for split, count in (("train", 5), ("test", 3)):
        for kind in ("cats", "dogs"):
            (tmp_path / "pets" / split / kind).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(
                    tmp_path / "pets" / split / kind / f"{i}.png")
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "flat" / "one.png")
    for folder, split in (("pets", "train"), ("pets", "test"), ("flat", "train")):
        ours = open_dataset(DataSpec(dataset=str(tmp_path / folder), split=split, cache_dir=str(tmp_path / "c1")))
        theirs = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / folder), split=split,
                                       cache_dir=str(tmp_path / "c2"))
        assert ours.features == theirs.features and len(ours) == len(theirs)
        assert [np.asarray(image).tolist() for image in ours["image"]] == \
            [np.asarray(image).tolist() for image in theirs["image"]]
        if "label" in theirs.features:
            assert ours["label"] == theirs["label"]
    with pytest.raises(DataError, match="cannot load the image folder"):
        open_dataset(DataSpec(dataset=str(tmp_path / "pets"), split="validation", cache_dir=str(tmp_path / "c1")))
