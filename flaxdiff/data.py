"""Image datasets for training: Hugging Face `datasets` in, one uint8 array (N, R, R, C) out.

`--dataset` is one of: `shapes` (generated here, offline), `smithsonian_butterflies` (the course's
dataset, `huggan/smithsonian_butterflies_subset`), any Hub dataset id, or a local image folder
(`load_dataset("imagefolder")`). Every image is decoded once, converted to RGB (or L
for 1-channel models; palette, RGBA, CMYK and 16-bit images are converted, not refused), resized
so its shorter side is `resolution` (bilinear, as torchvision's Resize) and cropped to a square
(centre, or a random offset fixed per image by the seed). Random flips and batching happen later,
on the device, so they cost nothing here.

Which images form each step's batch, and which process and device they go to, is the training
feed's business (`flaxdiff.training.feed`).
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DATASET_ALIASES = {"smithsonian_butterflies": "huggan/smithsonian_butterflies_subset"}
BUILTIN = "shapes"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class DataError(ValueError):
    """A dataset problem the user can fix; the message says what and how."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
    dataset: str = BUILTIN
    resolution: int = 32
    channels: int = 3
    center_crop: bool = False
    dataset_config_name: str | None = None
    split: str = "train"
    image_column: str | None = None
    cache_dir: str | None = None
    max_train_samples: int | None = None
    num_shapes: int = 4096  # size of the built-in dataset
    seed: int = 0
    labels: bool = False  # also load class labels (LabeledImages.labels)
    class_column: str | None = None  # the label column (default: the first ClassLabel column)
    on_bad_image: str = "error"  # an unreadable image stops the loading ("error") or is left out ("skip")


@dataclasses.dataclass
class LabeledImages:
    """Decoded images, uint8 (N, R, R, C), and their class labels: int32 (N,) in 0..len(names)-1."""

    images: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.names)


# --------------------------------------------------------------------------- the built-in dataset
SHAPE_KINDS = ("circle", "square", "triangle", "cross")


def _contrasting_colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A background and a shape colour whose luminances differ clearly."""
    while True:
        background = rng.integers(0, 256, 3)
        shape = rng.integers(0, 256, 3)
        lum = lambda c: 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]  # noqa: E731
        if abs(lum(background) - lum(shape)) > 90:
            return tuple(int(v) for v in background), tuple(int(v) for v in shape)


def draw_shape(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One coloured shape on a plain background of another colour, drawn at 4x and downsampled."""
    big = size * 4
    background, colour = _contrasting_colours(rng)
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    radius = big * rng.uniform(0.25, 0.38)
    cx, cy = (big / 2 + rng.uniform(-1, 1) * (big / 2 - radius - 2) for _ in range(2))
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius * 0.8), (cx + radius, cy + radius * 0.8)],
                     fill=colour)
    else:  # cross
        arm = radius * 0.38
        draw.rectangle([cx - radius, cy - arm, cx + radius, cy + arm], fill=colour)
        draw.rectangle([cx - arm, cy - radius, cx + arm, cy + radius], fill=colour)
    return image.resize((size, size), Image.LANCZOS)


def make_shapes(num_images: int, size: int = 32, seed: int = 0, split: str = "train"):
    """The built-in dataset as a Hugging Face `datasets.Dataset` with `image` and `label` columns.

    Deterministic: the same (num_images, size, seed, split) gives the same pixels; the "test"
    split is drawn from another stream, so it is held out from "train" at every seed.
    """
    import datasets

    if split not in ("train", "test"):
        raise DataError(f"the built-in '{BUILTIN}' dataset has the splits 'train' and 'test', not {split!r}")
    rng = np.random.default_rng([seed, 20251125, 0 if split == "train" else 1])
    labels = rng.integers(0, len(SHAPE_KINDS), num_images)
    images = [draw_shape(SHAPE_KINDS[label], rng, size) for label in labels]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=list(SHAPE_KINDS))})
    return datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)


# --------------------------------------------------------------------------- decoding
def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """RGB (or L) from any PIL mode: 16-bit and float images are rescaled, palettes expanded."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if values.max(initial=0) > 255 else 1.0  # 16-bit range -> 8-bit
        image = Image.fromarray(np.clip(np.round(values / scale), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        values = values * 255 if values.max(initial=0) <= 1.0 else values
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    elif image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    # like diffusers' image.convert("RGB"): alpha is dropped
    return image.convert("L" if channels == 1 else "RGB")


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool,
                    rng: np.random.Generator) -> np.ndarray:
    """torchvision Resize(resolution, BILINEAR) then CenterCrop / RandomCrop(resolution)."""
    width, height = image.size
    if width <= height:
        new_w, new_h = resolution, int(resolution * height / width)
    else:
        new_w, new_h = int(resolution * width / height), resolution
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    if center_crop:
        top, left = int(round((new_h - resolution) / 2.0)), int(round((new_w - resolution) / 2.0))
    else:
        top, left = int(rng.integers(0, new_h - resolution + 1)), int(rng.integers(0, new_w - resolution + 1))
    array = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def decode(source, name: str) -> Image.Image:
    """A PIL image from a datasets Image cell (decoded, or {"path", "bytes"}); errors name the file."""
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, dict) and source.get("bytes") is not None:
            image = Image.open(io.BytesIO(source["bytes"]))
        elif isinstance(source, dict) and source.get("path"):
            image = Image.open(source["path"])
        else:
            raise OSError("no image data")
        image.load()
        return image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {name}: {error}. Remove or replace this file and run again.") from error


# --------------------------------------------------------------------------- datasets
def resolve_dataset_name(name: str | None) -> tuple[str, str]:
    """(kind, name) with kind 'builtin' | 'folder' | 'npz' | 'hub'; a missing local path is an error."""
    if name is None or name == BUILTIN:
        return "builtin", BUILTIN
    name = DATASET_ALIASES.get(name, name)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".npz":
            return "npz", str(path)
        if not path.is_dir():
            raise DataError(f"--dataset {name} is a file; give a folder of images, a .npz of images, a Hub "
                            f"dataset id, or '{BUILTIN}'")
        return "folder", str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise DataError(f"the image folder {name} does not exist")
    return "hub", name


def walk_files(folder: str):
    """(path relative to folder, os.stat_result) of every file under folder, in sorted order; by
    os.scandir, which is several times faster than Path.rglob on folders of a million files."""
    entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    for entry in entries:
        if entry.is_dir():
            yield from ((f"{entry.name}/{name}", stat) for name, stat in walk_files(entry.path))
        elif entry.is_file():
            yield entry.name, entry.stat()


# sub-folders that name a split, as datasets' imagefolder recognises them (datasets.data_files)
SPLIT_FOLDERS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                 "test": ("test", "testing", "eval", "evaluation")}


def folder_data_files(folder: str) -> dict[str, str]:
    """An image folder's splits as `data_files` glob patterns: a split per split-named sub-folder,
    else the whole folder as "train". Given to load_dataset("imagefolder") instead of data_dir, whose
    split inference walks the whole tree once per candidate pattern (66 walks, against one here)."""
    present = {entry.name for entry in os.scandir(folder) if entry.is_dir()}
    splits = {}
    for split, names in SPLIT_FOLDERS.items():
        found = next((name for name in names if name in present), None)
        if found:
            splits[split] = f"{Path(folder).resolve()}/{found}/**"
    return splits or {"train": f"{Path(folder).resolve()}/**"}


def check_folder(folder: str) -> None:
    """A folder with at least one image (the walk stops at the first)."""
    if not any(Path(name).suffix.lower() in IMAGE_EXTENSIONS for name, _ in walk_files(folder)):
        present = sorted(p.name for p in Path(folder).iterdir())[:10]
        raise DataError(f"the folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                        f"found: {', '.join(present) if present else 'nothing'}")


def _hub_error(name: str, error: Exception) -> DataError:
    import datasets

    if datasets.config.HF_HUB_OFFLINE:
        why = "the Hugging Face Hub cannot be reached (offline) and the dataset is not in the local cache"
    else:
        why = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    folder = f" There is no local folder named {name} either." if "/" in name else ""
    return DataError(f"cannot load the Hub dataset {name!r}: {why}.{folder} Check the id and your network, or "
                     f"train on a local folder (--dataset ./my_images) or the built-in dataset "
                     f"(--dataset {BUILTIN}).")


def _offline_if_unreachable() -> None:
    """Without a route to the Hub, switch datasets to offline mode: a cached copy still loads,
    anything else fails at once instead of after half a minute of retries."""
    import socket

    import datasets
    import huggingface_hub.constants

    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        datasets.config.HF_HUB_OFFLINE = True
        huggingface_hub.constants.HF_HUB_OFFLINE = True


def open_dataset(spec: DataSpec):
    """The Hugging Face dataset named by the spec, images not yet decoded."""
    import datasets

    kind, name = resolve_dataset_name(spec.dataset)
    if kind == "builtin":
        return make_shapes(spec.num_shapes, max(spec.resolution, 8), spec.seed, spec.split)
    if kind == "folder":
        check_folder(name)
        try:
            return datasets.load_dataset("imagefolder", data_files=folder_data_files(name), split=spec.split,
                                         cache_dir=spec.cache_dir)
        except (ValueError, FileNotFoundError) as error:
            raise DataError(f"cannot load the image folder {name}: {error}") from error
    _offline_if_unreachable()
    try:
        return datasets.load_dataset(name, spec.dataset_config_name, split=spec.split, cache_dir=spec.cache_dir)
    except Exception as error:  # connection, missing repo, gated, offline: one message
        raise _hub_error(name, error) from error


def image_column(dataset, requested: str | None) -> str:
    import datasets

    columns = list(dataset.features)
    if requested is not None:
        if requested not in columns:
            raise DataError(f"--image_column {requested!r} is not in the dataset; its columns: {', '.join(columns)}")
        return requested
    for column in columns:
        if isinstance(dataset.features[column], datasets.Image):
            return column
    raise DataError(f"the dataset has no image column (columns: {', '.join(columns)}); name it with --image_column")


def label_column(dataset, requested: str | None) -> tuple[str, tuple[str, ...] | None]:
    """The class-label column and its class names: --class_column, else the first ClassLabel column
    (an image folder with one sub-folder per class has one: `label`). Names are None for a plain
    integer column (then they are the labels' numbers)."""
    import datasets

    columns = list(dataset.features)
    if requested is not None:
        if requested not in columns:
            raise DataError(f"--class_column {requested!r} is not in the dataset; its columns: {', '.join(columns)}")
        feature = dataset.features[requested]
        if isinstance(feature, datasets.ClassLabel):
            return requested, tuple(feature.names)
        if getattr(feature, "dtype", "").startswith(("int", "uint")):
            return requested, None
        raise DataError(f"--class_column {requested!r} holds {feature}, not class labels (a ClassLabel or integers)")
    for column in columns:
        if isinstance(dataset.features[column], datasets.ClassLabel):
            return column, tuple(dataset.features[column].names)
    raise DataError(f"class-conditional training needs class labels, and the dataset has no ClassLabel column "
                    f"(columns: {', '.join(columns)}): name the label column with --class_column, use an image folder "
                    "with one sub-folder per class, or an .npz with a 'labels' array")


def checked_labels(labels, names: tuple[str, ...] | None, source: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels as int32 in 0..C-1 with C names (the numbers themselves when there are no names)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{source}: class labels must be one integer per image, got {labels.dtype} {labels.shape}")
    count = len(names) if names is not None else int(labels.max(initial=-1)) + 1
    bad = np.flatnonzero((labels < 0) | (labels >= count))
    if len(bad):
        raise DataError(f"{source}: label {labels[bad[0]]} of image #{bad[0]} is outside 0..{count - 1}"
                        f"{' (' + ', '.join(names) + ')' if names else ''}; {len(bad)} image(s) in all")
    return labels.astype(np.int32), names if names is not None else tuple(str(i) for i in range(count))


def class_names(spec: DataSpec) -> tuple[str, ...]:
    """The class names of a labelled dataset, read without decoding any image (so wrong labels or a
    model of another class count fail before the expensive work)."""
    kind, name = resolve_dataset_name(spec.dataset)
    if kind == "builtin":
        return SHAPE_KINDS
    if kind == "npz":
        with np.load(name) as archive:
            if "labels" not in archive:
                raise DataError(f"class-conditional training needs a 'labels' array in {name} (it has: "
                                f"{', '.join(archive.files)})")
            names = tuple(str(n) for n in archive["label_names"]) if "label_names" in archive else None
            return checked_labels(archive["labels"], names, name)[1]
    dataset = open_dataset(spec)
    column, names = label_column(dataset, spec.class_column)
    return names if names is not None else checked_labels(dataset[column], None, f"column {column!r}")[1]


def load_images(spec: DataSpec, progress: bool = True) -> np.ndarray:
    """Decode, convert, resize and crop every image once: uint8 (N, R, R, channels)."""
    return load_image_data(dataclasses.replace(spec, labels=False), progress)


def load_labeled_images(spec: DataSpec, progress: bool = True) -> LabeledImages:
    """load_images with the class labels (see label_column) and their names."""
    return load_image_data(dataclasses.replace(spec, labels=True), progress)


def load_image_data(spec: DataSpec, progress: bool = True):
    """The images, or with spec.labels a LabeledImages, decoded here, into memory (flaxdiff.image_cache
    decodes once into a memory-mapped file, with worker processes)."""
    if resolve_dataset_name(spec.dataset)[0] == "npz":
        return _load_npz(spec, progress)
    source = ImageSource.open(spec)
    out = np.empty((len(source), spec.resolution, spec.resolution, spec.channels), np.uint8)
    bad = source.decode_into(out, 0, len(source), progress)
    keep = np.setdiff1d(np.arange(len(source)), [index for index, _ in bad])
    images = out if not bad else out[keep]
    return images if source.labels is None else LabeledImages(images, source.labels[0][keep], source.labels[1])


@dataclasses.dataclass
class ImageSource:
    """A Hugging Face dataset's encoded images (not decoded yet) and its checked labels."""

    spec: DataSpec
    encoded: object  # the dataset with its image column cast to decode=False: {"bytes", "path"} cells
    column: str
    labels: tuple[np.ndarray, tuple[str, ...]] | None

    READ_ROWS = 256  # cells read from Arrow at a time: memory stays bounded on any dataset size

    @classmethod
    def open(cls, spec: DataSpec) -> "ImageSource":
        import datasets

        dataset = open_dataset(spec)
        column = image_column(dataset, spec.image_column)
        if spec.max_train_samples is not None:
            dataset = dataset.select(range(min(spec.max_train_samples, len(dataset))))
        if len(dataset) == 0:
            raise DataError(f"the dataset {spec.dataset!r} (split {spec.split!r}) is empty")
        labels = None
        if spec.labels:  # before decoding: a dataset without labels fails at once
            label_name, names = label_column(dataset, spec.class_column)
            labels = checked_labels(dataset[label_name], names, f"column {label_name!r} of {spec.dataset}")
        encoded = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        return cls(spec, encoded, column, labels)

    def __len__(self) -> int:
        return len(self.encoded)

    def cells(self, start: int, stop: int):
        """(index, encoded cell) for start..stop-1, read from Arrow a slice at a time."""
        for first in range(start, stop, self.READ_ROWS):
            chunk = self.encoded[first:min(first + self.READ_ROWS, stop)][self.column]
            yield from enumerate(chunk, first)

    def decode_into(self, out: np.ndarray, start: int, stop: int, progress: bool = False) -> list[tuple[int, str]]:
        """Decode images start..stop-1 into out[start:stop]; returns the unreadable ones as (index,
        problem) when spec.on_bad_image is "skip" (their rows stay zero), else raises at the first."""
        from tqdm.auto import tqdm

        spec, bad = self.spec, []
        for i, cell in tqdm(self.cells(start, stop), total=stop - start, desc="decoding images",
                            disable=not progress, leave=False):
            name = cell.get("path") or f"#{i} of {spec.dataset}" if isinstance(cell, dict) else f"#{i}"
            try:
                image = to_mode(decode(cell, name), spec.channels)
            except DataError as error:
                if spec.on_bad_image != "skip":
                    raise
                bad.append((i, str(error).split(". Remove")[0]))
                continue
            # the random crop offset of an image is a function of (seed, its index): any worker can decode it
            out[i] = resize_and_crop(image, spec.resolution, spec.center_crop, np.random.default_rng([spec.seed, 1, i]))
        return bad


def _load_npz(spec: DataSpec, progress: bool):
    """Images from a .npz: its 'images' array (uint8, NHWC or NHW), converted like any image; with
    spec.labels its 'labels' array too (class names from a 'label_names' array, if it has one)."""
    with np.load(spec.dataset) as archive:
        if "images" not in archive:
            raise DataError(f"{spec.dataset} has no 'images' array (it has: {', '.join(archive.files)})")
        images = archive["images"]
        if spec.labels and "labels" not in archive:
            raise DataError(f"class-conditional training needs a 'labels' array in {spec.dataset} (it has: "
                            f"{', '.join(archive.files)})")
        labels = archive["labels"] if spec.labels else None
        names = tuple(str(n) for n in archive["label_names"]) if spec.labels and "label_names" in archive else None
    if labels is not None:
        if len(labels) != len(images):
            raise DataError(f"{spec.dataset}: {len(labels)} labels for {len(images)} images")
        labels = checked_labels(labels, names, spec.dataset)
        labels = (labels[0][:spec.max_train_samples] if spec.max_train_samples else labels[0], labels[1])
    out = _convert_npz_images(spec, images, progress)
    return out if labels is None else LabeledImages(out, *labels)


def _convert_npz_images(spec: DataSpec, images: np.ndarray, progress: bool) -> np.ndarray:
    from tqdm.auto import tqdm

    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(f"{spec.dataset}: 'images' must be uint8 of shape (N, H, W[, C]), got {images.dtype} "
                        f"{images.shape}")
    images = images[:spec.max_train_samples] if spec.max_train_samples else images
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[1:] == (spec.resolution, spec.resolution, spec.channels):
        return np.ascontiguousarray(images)
    out = np.empty((len(images), spec.resolution, spec.resolution, spec.channels), np.uint8)
    for i, array in enumerate(tqdm(images, desc="converting images", disable=not progress, leave=False)):
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        out[i] = resize_and_crop(to_mode(image, spec.channels), spec.resolution, spec.center_crop,
                                 np.random.default_rng([spec.seed, 1, i]))
    return out
