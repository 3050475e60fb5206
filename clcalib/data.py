"""Calibration and evaluation data: images from a folder, zip or tar, or a tensor file.

Archives are read in place, never extracted, and are checked first: no absolute or ``..``
member names, no links or devices, a cap on entries and on total decompressed size, and a
pixel cap on every decoded image. Untrusted uploads pass through the same checks.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from clcalib.config import Preprocess
from clcalib.errors import DataError

# what a damaged or hostile archive raises from the standard library while being read
BROKEN_ARCHIVE = (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError, RuntimeError,
                  NotImplementedError, KeyError, ValueError)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
TENSOR_SUFFIXES = {".npy", ".safetensors"}


@dataclass(frozen=True)
class Limits:
    max_entries: int = 200_000
    max_total_bytes: int = 8 << 30  # decompressed
    max_member_bytes: int = 64 << 20
    max_image_pixels: int = 40_000_000  # one image as stored (checked from its header, before decoding)
    # one image after preprocessing (the resized image, and the crop): what resize/crop can blow up
    max_sample_pixels: int = 2048 * 2048
    max_tensor_bytes: int = 16 << 30  # all decoded images of one set, as float32


DEFAULT_LIMITS = Limits()


MAX_NAME_CHARS = 1024  # an archive member's path
MAX_TAR_HEADER_BYTES = 64 << 10  # a tar's long-name or pax extended header, read before any other cap


def shown(name: str, n: int = 80) -> str:
    """A member name for a message: quoted, at most ``n`` characters of it."""
    return repr(name[:n] + "...") if len(name) > n else repr(name)


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a GNU long name or a pax header whole, whatever size it declares (a few
    hundred KiB of .tar.gz can declare hundreds of MiB): refuse large ones before reading."""

    def _proc_member(self, tarfile_):
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE) and self.size > MAX_TAR_HEADER_BYTES:
            raise DataError(f"a tar header of {self.size} bytes (names and pax headers are capped at "
                            f"{MAX_TAR_HEADER_BYTES}); repack the archive with ordinary file names")
        return super()._proc_member(tarfile_)


def _safe_name(name: str) -> PurePosixPath:
    if len(name) > MAX_NAME_CHARS:
        raise DataError(f"archive member {shown(name)} has a name of {len(name)} characters, more than {MAX_NAME_CHARS}")
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and p.parts[0].endswith(":")):
        raise DataError(f"archive member {shown(name)} points outside the archive (absolute path or '..'); repack it with relative paths")
    return p


def _wanted(p: PurePosixPath) -> bool:
    return (
        p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") or part == "__MACOSX" for part in p.parts)
    )


def to_rgb(im: Image.Image, name: str) -> Image.Image:
    """8-bit RGB, converting 16-bit and float images by value (PIL's own ``convert("RGB")``
    clips them: a 16-bit image comes out saturated, a float one black)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DataError(f"{name}: 32-bit integer pixels outside 0..65535; save it as an 8- or 16-bit image")
        im = Image.fromarray(np.round(a / 257.0).astype(np.uint8))  # 65535 -> 255
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if a.size and not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
            raise DataError(f"{name}: a float image with values outside [0, 1] (or NaN); its brightness scale is "
                            "unknown: save it as an 8- or 16-bit image")
        im = Image.fromarray(np.round(a * 255.0).astype(np.uint8))
    return im.convert("RGB")


class ImageSource:
    """The image files of a folder, zip or tar, by relative path; bytes are read on demand."""

    def __init__(self, path: str | Path, limits: Limits = DEFAULT_LIMITS):
        self.path = Path(path)
        self.limits = limits
        self.smallest_side = 1 << 30  # of the images decoded so far (for the upscaling warning)
        if not self.path.exists():
            raise DataError(f"{self.path}: no such file or directory")
        self._zip = self._tar = None
        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            if self.path.is_dir():
                self.names = self._scan_dir()
            elif zipfile.is_zipfile(self.path):
                self._zip = zipfile.ZipFile(self.path)
                self.names = self._scan_zip()
            else:
                # not tarfile.is_tarfile: it reads the first header with no bound
                try:
                    self._tar = tarfile.open(self.path, tarinfo=_BoundedTarInfo)
                except tarfile.ReadError:
                    raise DataError(f"{self.path}: not a folder, zip or tar of images (nor .npy/.safetensors)") from None
                self.names = self._scan_tar()
        except DataError:
            self.close()
            raise
        except BROKEN_ARCHIVE as e:
            self.close()
            raise DataError(f"{self.path.name}: damaged or unsupported archive ({type(e).__name__}: {e})") from None
        if not self.names:
            raise DataError(f"{self.path}: contains no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")

    def _check_totals(self, count: int, total: int) -> None:
        if count > self.limits.max_entries:
            raise DataError(f"{self.path}: {count} entries, more than the limit of {self.limits.max_entries}")
        if total > self.limits.max_total_bytes:
            raise DataError(f"{self.path}: {total} bytes decompressed, more than the limit of {self.limits.max_total_bytes}")

    def _scan_dir(self) -> list[str]:
        names, total = [], 0
        for f in sorted(self.path.rglob("*")):
            if f.is_symlink():
                raise DataError(f"{f}: symbolic links are not accepted in image folders")
            rel = PurePosixPath(f.relative_to(self.path).as_posix())
            if f.is_file() and _wanted(rel):
                names.append(str(rel))
                total += f.stat().st_size
        self._check_totals(len(names), total)
        return names

    def _scan_zip(self) -> list[str]:
        infos = self._zip.infolist()
        self._check_totals(len(infos), sum(i.file_size for i in infos))
        names = []
        for i in infos:
            p = _safe_name(i.filename)
            mode = i.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise DataError(f"archive member {shown(i.filename)} is a symbolic link; links are not accepted")
            if not i.is_dir() and _wanted(p):
                if i.file_size > self.limits.max_member_bytes:
                    raise DataError(f"archive member {shown(i.filename)} is {i.file_size} bytes, more than {self.limits.max_member_bytes}")
                names.append(i.filename)
        return sorted(names)

    def _scan_tar(self) -> list[str]:
        # streamed, with the caps checked as we go: getmembers() would first read (and for
        # .tar.gz decompress) the whole archive, however many entries it holds
        names, count, total = [], 0, 0
        for m in self._tar:
            count += 1
            total += m.size
            self._check_totals(count, total)
            p = _safe_name(m.name)
            if m.issym() or m.islnk():
                raise DataError(f"archive member {shown(m.name)} is a link; links are not accepted")
            if not (m.isfile() or m.isdir()):
                raise DataError(f"archive member {shown(m.name)} is a device or special file; not accepted")
            if m.isfile() and _wanted(p):
                if m.size > self.limits.max_member_bytes:
                    raise DataError(f"archive member {shown(m.name)} is {m.size} bytes, more than {self.limits.max_member_bytes}")
                names.append(m.name)
                self._members[m.name] = m
        # archive order, not sorted: seeking backwards in a compressed tar re-reads it from the start
        return names

    def read(self, name: str) -> bytes:
        cap = self.limits.max_member_bytes
        try:
            if self._zip is not None:
                with self._zip.open(name) as f:
                    data = f.read(cap + 1)
            elif self._tar is not None:
                data = self._tar.extractfile(self._members[name]).read(cap + 1)
            else:
                data = (self.path / name).read_bytes()
        except BROKEN_ARCHIVE as e:
            raise DataError(f"{name}: cannot be read from the archive ({type(e).__name__}: {e})") from None
        if len(data) > cap:
            raise DataError(f"{name}: larger than {cap} bytes once decompressed")
        return data

    def decode(self, name: str, pre: Preprocess | None = None) -> Image.Image:
        """The image as 8-bit RGB. With ``pre``, an image that preprocessing would make larger
        than ``max_sample_pixels`` is refused from its header, before it is decoded or resized."""
        data = self.read(name)
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > self.limits.max_image_pixels:
                    raise DataError(f"{name}: {w}x{h} pixels, more than the cap of {self.limits.max_image_pixels}")
                self.smallest_side = min(self.smallest_side, w, h)
                if pre is not None:
                    rw, rh = resized_size(w, h, pre)
                    cap = self.limits.max_sample_pixels
                    if max(rw * rh, (pre.crop or 0) ** 2) > cap:
                        raise DataError(f"{name}: preprocessing (resize={pre.resize}, crop={pre.crop}) makes this "
                                        f"{w}x{h} image {rw}x{rh} pixels, more than the {cap} allowed per image; "
                                        "lower preprocess.resize / preprocess.crop")
                return to_rgb(im, name)
        except DataError:
            raise
        except Exception as e:  # PIL raises many types for broken files
            why = re.sub(r" <[^>]* at 0x[0-9a-f]+>", "", str(e))  # PIL names the BytesIO object
            raise DataError(f"{name}: not a readable image ({type(e).__name__}: {why})") from None

    def close(self) -> None:
        for h in (self._zip, self._tar):
            if h is not None:
                h.close()


def resized_size(w: int, h: int, pre: Preprocess) -> tuple[int, int]:
    """(width, height) after ``pre.resize`` (the shorter side to that size, as torchvision's
    Resize computes it), before the crop."""
    if not pre.resize:
        return w, h
    short, long = (w, h) if w <= h else (h, w)
    scaled = (pre.resize, int(pre.resize * long / short))
    return scaled if w <= h else scaled[::-1]


def output_size(w: int, h: int, pre: Preprocess) -> tuple[int, int]:
    """(height, width) of an image of ``w`` x ``h`` pixels after ``pre``'s resize and crop, as
    ``make_transform`` gives it (a center crop pads an image smaller than itself)."""
    if pre.crop:
        return pre.crop, pre.crop
    rw, rh = resized_size(w, h, pre)
    return rh, rw


def check_set_bytes(what: str, count: int, shape: tuple[int, ...], limits: Limits) -> None:
    """Refuse a set of ``count`` images of ``shape`` whose float32 tensor passes ``max_tensor_bytes``."""
    need = count * 4 * math.prod(shape)
    if need > limits.max_tensor_bytes:
        raise DataError(f"{what}: {count} images of {tuple(shape)} need {need >> 20} MiB, more than "
                        f"the {limits.max_tensor_bytes >> 20} MiB allowed; send fewer or smaller images "
                        "(preprocess.resize/crop)")


def make_transform(pre: Preprocess):
    from torchvision import transforms as T

    steps = []
    if pre.resize:
        steps.append(T.Resize(pre.resize))
    if pre.crop:
        steps.append(T.CenterCrop(pre.crop))
    steps += [T.ToTensor(), T.Normalize(list(pre.mean), list(pre.std))]
    return T.Compose(steps)


def decoded(src: ImageSource, names: list[str], pre: Preprocess) -> Iterator[torch.Tensor]:
    """Each named image preprocessed, in order, one at a time; all must come out the same size."""
    tf = make_transform(pre)
    first = None
    for n in names:
        t = tf(src.decode(n, pre))
        if first is None:
            first = t.shape
        elif t.shape != first:
            raise DataError(f"{src.path}: images come out in different sizes {tuple(first)} and "
                            f"{tuple(t.shape)} ({n}); set preprocess.resize and preprocess.crop")
        yield t


def _stack(src: ImageSource, names: list[str], pre: Preprocess) -> torch.Tensor:
    images = decoded(src, names, pre)
    first = next(images)
    check_set_bytes(src.path.name, len(names), tuple(first.shape), src.limits)
    out = torch.empty((len(names), *first.shape))  # filled in place: no second copy of the set
    out[0] = first
    for i, t in enumerate(images, 1):
        out[i] = t
    return out


TENSOR_DTYPES = "float16, bfloat16, float32 or float64 (already preprocessed), or uint8 (pixels 0-255)"


def load_tensor_file(path: Path, pre: Preprocess | None = None) -> torch.Tensor:
    """An N x C x H x W calibration tensor as float32. A float tensor (float16, bfloat16, float32,
    float64) is taken as already preprocessed; a uint8 tensor as pixels 0-255, scaled to [0, 1]
    and normalised with ``pre``'s mean and std (when given), as images are. Any other dtype
    (float8, integers, bool, complex, long double, structured) is refused by name."""
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise DataError(f"{path}: not a readable .npy array ({e})") from None
        ok = isinstance(arr, np.ndarray) and ((arr.dtype.kind == "f" and arr.dtype.itemsize <= 8)
                                              or (arr.dtype.kind == "u" and arr.dtype.itemsize == 1))
        if not ok:
            what = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
            raise DataError(f"{path.name}: expected a float16/32/64 array N x C x H x W (or uint8 pixels), "
                            f"got dtype {what}")
        # big-endian or other byte orders: to native order (torch reads native order only)
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.uint8 if arr.dtype.kind == "u" else np.float32))
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise DataError(f"{path}: not a readable safetensors file ({e})") from None
        if len(tensors) != 1:
            raise DataError(f"{path}: expected exactly one tensor, found {len(tensors)}: {sorted(tensors)[:5]}")
        t = next(iter(tensors.values()))
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8):
            raise DataError(f"{path.name}: expected a tensor of {TENSOR_DTYPES}, got dtype "
                            f"{str(t.dtype).removeprefix('torch.')}")
    if t.ndim != 4 or t.shape[0] == 0:
        raise DataError(f"{path}: expected a float tensor N x C x H x W with N >= 1, got {t.dtype} {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return _normalized_pixels(path, t, pre)
    if not torch.isfinite(t).all():
        raise DataError(f"{path}: the tensor holds NaN or infinite values")
    return t.float()


def _normalized_pixels(path: Path, t: torch.Tensor, pre: Preprocess | None) -> torch.Tensor:
    x = t.float().div_(255.0)
    if pre is None:
        return x
    channels = x.shape[1]
    mean, std = torch.tensor(pre.mean), torch.tensor(pre.std)
    if channels != len(mean):
        if len(set(pre.mean)) > 1 or len(set(pre.std)) > 1:
            raise DataError(f"{path.name}: a uint8 tensor of {channels} channels, but preprocess.mean/std "
                            f"have a value per RGB channel; give one mean and one std, or a float tensor")
        mean, std = mean[:1], std[:1]
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def load_calibration(path: str | Path, pre: Preprocess, size: int, seed: int = 0,
                     limits: Limits = DEFAULT_LIMITS, stats: dict | None = None) -> torch.Tensor:
    """Up to ``size`` preprocessed images (the draw ``seed`` picks them when more are given).
    ``stats``, if given, receives ``supplied``: how many images the set holds, and
    ``smallest_side``: the shortest image side read (images only)."""
    path = Path(path)
    stats = {} if stats is None else stats
    if path.suffix.lower() in TENSOR_SUFFIXES and path.is_file():
        t = load_tensor_file(path, pre)
        stats["supplied"] = len(t)
        return t[draw(len(t), size, seed)] if len(t) > size else t
    src = ImageSource(path, limits)
    try:
        names = src.names
        stats["supplied"] = len(names)
        if len(names) > size:
            names = [names[i] for i in draw(len(names), size, seed).tolist()]
        out = _stack(src, names, pre)
        stats["smallest_side"] = src.smallest_side
        return out
    finally:
        src.close()


def draw(n: int, size: int, seed: int) -> torch.Tensor:
    """The calibration draw: ``size`` of ``n`` indices, chosen by ``seed``, in ascending order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:size].sort().values


@dataclass
class LabeledImages:
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]  # folder name of each class index
    mapping: dict[str, int]  # folder name -> class index, as used
    by_name: bool = False  # folders named by class name and mapped in sorted order (no labels file)


def class_names_to_indices(names: list[str], labels: list[str] | None = None) -> dict[str, int]:
    """Folder name -> class index. With ``labels`` (the class names in the model's index order)
    each folder maps to its name's position there; otherwise folders named 0..C-1 map to that
    index, and other names map in sorted order (ImageFolder's rule, rarely the model's order)."""
    uniq = sorted(set(names))
    if labels is not None:
        index = {n: i for i, n in enumerate(labels)}
        unknown = [n for n in uniq if n not in index]
        if unknown:
            raise DataError(f"class folders {unknown[:5]} are not in the labels file ({len(labels)} names, e.g. "
                            f"{labels[:3]}); the file must list the model's class names, one per line, in index order")
        return {n: index[n] for n in uniq}
    if all(n.isdigit() for n in uniq):
        return {n: int(n) for n in uniq}
    return {n: i for i, n in enumerate(uniq)}


MAX_LABELS_BYTES = 4 << 20  # 100000 class names of ~40 characters; a larger "labels file" is something else


def read_labels(path: str | Path) -> list[str]:
    """A labels file: one class name per line, in the model's index order (blank lines ignored)."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_LABELS_BYTES:
            raise DataError(f"labels file {path}: {size} bytes, larger than {MAX_LABELS_BYTES} bytes; it should hold "
                            "the model's class names, one per line")
        names = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"labels file {path}: cannot be read ({e})") from None
    if not names or len(set(names)) != len(names):
        raise DataError(f"labels file {path}: expected distinct class names, one per line; got {len(names)} lines "
                        f"with {len(set(names))} distinct")
    return names


def class_of(names: list[str]) -> list[str]:
    parts = [PurePosixPath(n).parts for n in names]
    # a single wrapping folder (zip of "test/0/x.png") is not a class level
    while parts and all(len(p) > 2 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]
    if any(len(p) < 2 for p in parts):
        raise DataError("evaluation images must sit in one folder per class (e.g. 0/img.png, 1/img.png)")
    return [p[0] for p in parts]


class LabeledSet:
    """A labeled image set read in batches: names, labels and the class mapping are held, each
    batch of images is decoded when it is asked for. Memory is one batch, whatever the set's
    size (an ImageNet validation set at 224 px would be ~30 GB stacked)."""

    def __init__(self, path: str | Path, pre: Preprocess, limits: Limits = DEFAULT_LIMITS,
                 labels: list[str] | None = None):
        self.path, self.pre, self.limits = Path(path), pre, limits
        src = ImageSource(path, limits)
        try:
            self.names = src.names
        finally:
            src.close()
        classes = class_of(self.names)
        self.mapping = class_names_to_indices(classes, labels)
        self.by_name = labels is None and not all(c.isdigit() for c in self.mapping)
        self.classes = sorted(self.mapping, key=self.mapping.get)
        self.labels = torch.tensor([self.mapping[c] for c in classes])
        self._shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def batches(self, size: int = 256, limit: int | None = None):
        """(images, labels) batches in a fixed order; ``limit``: only the first that many images."""
        names = self.names[:limit] if limit is not None else self.names
        src = ImageSource(self.path, self.limits)
        try:
            images = decoded(src, names, self.pre)  # one size across batches too
            for i in range(0, len(names), size):
                out = torch.stack([next(images) for _ in names[i:i + size]])
                self._shape = tuple(out.shape[1:])
                yield out, self.labels[i:i + len(out)]
        finally:
            src.close()

    def images(self, size: int = 256, limit: int | None = None):
        """The image batches alone."""
        return (x for x, _ in self.batches(size, limit))

    @property
    def shape(self) -> tuple[int, ...]:
        """C x H x W of one preprocessed image."""
        if self._shape is None:
            next(self.batches(1, limit=1))
        return self._shape


def load_labeled(path: str | Path, pre: Preprocess, limits: Limits = DEFAULT_LIMITS,
                 labels: list[str] | None = None) -> LabeledImages:
    """A whole labeled set in memory (held to ``limits.max_tensor_bytes``); for a large set use
    ``LabeledSet``, which streams it."""
    ds = LabeledSet(path, pre, limits, labels)
    check_set_bytes(ds.path.name, len(ds), ds.shape, limits)
    images = torch.empty((len(ds), *ds.shape))
    for i, (x, _) in enumerate(ds.batches(256)):
        images[i * 256:i * 256 + len(x)] = x
    return LabeledImages(images, ds.labels, ds.classes, ds.mapping, ds.by_name)


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().float().numpy().tobytes()).hexdigest()
