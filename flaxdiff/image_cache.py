"""Decode once, read from disk after: the training images as a uint8 file.

The first run decodes, converts, resizes and crops every image with several worker processes
straight into `images.npy` (written row by row with `os.pwrite`; the labels beside it) under a folder
named by a key of everything the pixels depend on: the source's fingerprint and the preprocessing
options. Later runs and resumes open that file in constant time (`DiskArray`): no decoding, and a
batch reads its rows with `os.pread`, so the process maps nothing and its memory does not grow
with the dataset (the OS page cache keeps the rows it reads often). Another
resolution, crop, channel count, subset or source is another key, so a cache built with other
options is never used. A cache is written under a temporary name and renamed into place when
complete: an interrupted decode or a full disk leaves nothing a later run would read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from .data import (BUILTIN, DataError, DataSpec, ImageSource, LabeledImages, _load_npz, open_dataset,
                   resolve_dataset_name, walk_files)

VERSION = 1  # of the cache's layout and of the preprocessing code; a change makes new keys
DONE = "meta.json"  # written last: a folder without it is not a cache


def default_root() -> Path:
    return Path(os.environ.get("FLAXDIFF_IMAGE_CACHE") or Path.home() / ".cache" / "flaxdiff" / "images")


def source_fingerprint(spec: DataSpec) -> str:
    """What identifies the source data, without decoding it: the built-in shapes' parameters, an
    .npz's path, size and time, an image folder's file list (paths, sizes, times), a Hub dataset's
    fingerprint (from its local Arrow cache)."""
    kind, name = resolve_dataset_name(spec.dataset)
    if kind == "builtin":
        return f"{BUILTIN}:{spec.num_shapes}:{spec.seed}:{spec.split}"
    if kind == "npz":
        stat = Path(name).stat()
        return f"npz:{Path(name).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if kind == "folder":
        digest = hashlib.sha256()
        for path, stat in walk_files(name):
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        return f"folder:{Path(name).resolve()}:{digest.hexdigest()}"
    return f"hub:{name}:{open_dataset(spec)._fingerprint}"


def cache_key(spec: DataSpec) -> str:
    options = dataclasses.asdict(spec)
    options.pop("dataset")
    options.pop("num_shapes")  # the built-in shapes' fingerprint holds it; other sources have no use for it
    blob = json.dumps({"version": VERSION, "source": source_fingerprint(spec), "options": options}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def npy_layout(path: Path) -> tuple[int, tuple[int, ...]]:
    """(offset of the data, shape) of a C-ordered uint8 .npy file."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran or dtype != np.uint8:
        raise DataError(f"{path} is not a C-ordered uint8 array: remove it to decode again")
    return offset, tuple(shape)


class DiskArray:
    """A uint8 .npy file read row by row: `array[indices]` reads just those rows (os.pread)."""

    def __init__(self, path: Path):
        self.offset, self.shape = npy_layout(path)
        self.path, self.dtype = path, np.dtype(np.uint8)
        self.row_bytes = int(np.prod(self.shape[1:]))
        self.fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def __getitem__(self, index) -> np.ndarray:
        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        flat = rows.reshape(-1)
        out = np.empty((len(flat), self.row_bytes), np.uint8)
        for j, row in enumerate(flat):
            out[j] = np.frombuffer(os.pread(self.fd, self.row_bytes, self.offset + int(row) * self.row_bytes), np.uint8)
        return out.reshape(rows.shape + self.shape[1:])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = np.fromfile(self.path, np.uint8, offset=self.offset).reshape(self.shape)
        return array if dtype is None else array.astype(dtype)

    def __del__(self):
        try:
            os.close(self.fd)
        except (OSError, AttributeError):
            pass


def create_npy(path: Path, shape: tuple[int, ...]) -> None:
    """A uint8 .npy file of `shape`, its rows not written yet (a sparse file: no disk used so far)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_2_0(f, header)
        f.truncate(f.tell() + int(np.prod(shape)))


class RowWriter:
    """Writes rows of a uint8 .npy file in place: `writer[i] = image` is one os.pwrite. Unlike a
    memory map, the written pages stay out of the process's resident memory (they are the page
    cache's), so decoding a dataset larger than RAM does not grow the decoding process."""

    def __init__(self, path: Path):
        self.offset, shape = npy_layout(path)
        self.row_shape, self.row_bytes = shape[1:], int(np.prod(shape[1:]))
        self.fd = os.open(path, os.O_WRONLY)

    def __setitem__(self, index: int, row: np.ndarray) -> None:
        data = np.ascontiguousarray(row, np.uint8).reshape(self.row_shape)
        os.pwrite(self.fd, data.tobytes(), self.offset + int(index) * self.row_bytes)

    def close(self) -> None:
        os.fsync(self.fd)  # a full disk shows here, before the cache is renamed into place
        os.close(self.fd)


def open_cached(folder: Path):
    """A complete cache: its images as a DiskArray (and its labels)."""
    meta = json.loads((folder / DONE).read_text())
    images = DiskArray(folder / "images.npy")
    if meta.get("names") is None:
        return images
    return LabeledImages(images, np.load(folder / "labels.npy"), tuple(meta["names"]))


def load_cached_image_data(spec: DataSpec, root: Path | None = None, workers: int = 0, progress: bool = True,
                           log=print):
    """The images (or LabeledImages) of `spec`, from the cache when it holds them, else decoded into it."""
    root = Path(root or default_root())
    folder = root / cache_key(spec)
    if (folder / DONE).is_file():
        return open_cached(folder)
    if resolve_dataset_name(spec.dataset)[0] == "npz":
        data = _load_npz(spec, progress)  # already decoded: write it as it is
        return write_cache(folder, spec, data, None, 0.0)
    start = time.perf_counter()
    source = ImageSource.open(spec)
    tmp = root / f".tmp-{folder.name}-{os.getpid()}"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        shape = (len(source), spec.resolution, spec.resolution, spec.channels)
        create_npy(tmp / "images.npy", shape)
        bad = decode_all(source, tmp / "images.npy", workers, progress)
        images = np.load(tmp / "images.npy", mmap_mode="r")
        seconds = time.perf_counter() - start
        if bad and spec.on_bad_image == "skip":
            log(f"left out {len(bad)} unreadable image(s) (--on_bad_image skip): "
                + "; ".join(problem for _, problem in bad[:5]) + (" ..." if len(bad) > 5 else ""))
        labels = source.labels
        keep = np.setdiff1d(np.arange(len(source)), [i for i, _ in bad])
        data = images if labels is None else LabeledImages(images, labels[0], labels[1])
        return write_cache(folder, spec, data, keep if bad else None, seconds, tmp=tmp)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"cannot write the decoded images to {root} ({error.strerror or error}): free some space "
                        "there, or point --image_cache_dir at another disk") from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted decode leaves nothing behind
        raise


def decode_all(source: ImageSource, path: Path, workers: int, progress: bool) -> list:
    """Decode every image into the .npy file at `path`: in this process, or in `workers` worker
    processes each decoding its own ranges into the same file."""
    count = len(source)
    if workers <= 1 or count < 2 * CHUNK:
        writer = RowWriter(path)
        try:
            return source.decode_into(writer, 0, count, progress)
        finally:
            writer.close()
    from tqdm.auto import tqdm

    ranges = [(start, min(start + CHUNK, count)) for start in range(0, count, CHUNK)]
    bad = []
    # spawn, not fork: the parent may have started JAX's threads already. Each worker receives the
    # opened source once (a dataset pickles as references to its Arrow files), not per range.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_open_in_worker,
                             initargs=(source, str(path))) as pool:
        jobs = [pool.submit(_decode_range, start, stop) for start, stop in ranges]
        with tqdm(total=count, desc=f"decoding images ({workers} workers)", disable=not progress, leave=False) as bar:
            for job, (start, stop) in zip(jobs, ranges):
                bad += job.result()
                bar.update(stop - start)
    return sorted(bad)


CHUNK = 1024  # images per worker task


_worker: dict = {}


def _open_in_worker(source: ImageSource, path: str) -> None:
    _worker.update(source=source, path=path)


def _decode_range(start: int, stop: int) -> list:
    writer = RowWriter(_worker["path"])
    try:
        return _worker["source"].decode_into(writer, start, stop)
    finally:
        writer.close()


def write_cache(folder: Path, spec: DataSpec, data, keep, seconds: float, tmp: Path | None = None):
    """Finish a cache in `tmp` (or write `data` there) and rename it into place; returns it opened."""
    root = folder.parent
    tmp = tmp or root / f".tmp-{folder.name}-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    images, labels, names = (data.images, data.labels, data.names) if isinstance(data, LabeledImages) else \
        (data, None, None)
    if keep is not None or not isinstance(images, np.memmap):  # compact away skipped images, or write the array
        final = np.lib.format.open_memmap(tmp / "images.part.npy", mode="w+", dtype=np.uint8,
                                          shape=(len(keep) if keep is not None else len(images),) + images.shape[1:])
        rows = keep if keep is not None else np.arange(len(images))
        for start in range(0, len(rows), CHUNK):
            final[start:start + CHUNK] = images[rows[start:start + CHUNK]]
        final.flush()
        del final
        os.replace(tmp / "images.part.npy", tmp / "images.npy")
        if labels is not None and keep is not None:
            labels = labels[keep]
    if labels is not None:
        np.save(tmp / "labels.npy", labels)
    meta = {"version": VERSION, "dataset": spec.dataset, "options": dataclasses.asdict(spec),
            "names": None if names is None else list(names), "decode_seconds": seconds,
            "skipped": 0 if keep is None else int(len(images) - len(keep))}
    (tmp / DONE).write_text(json.dumps(meta, indent=2))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished the same cache first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return open_cached(folder)
