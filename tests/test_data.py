"""Calibration/evaluation data: archive safety and damaged inputs are DataErrors with a message."""

import io
import tarfile
import zipfile

import numpy as np
import pytest
import torch

from clcalib import ConfigError, DataError, calibrate
from clcalib.config import Preprocess
from clcalib.data import (
    ImageSource,
    Limits,
    class_names_to_indices,
    load_calibration,
    load_labeled,
    load_tensor_file,
)
from clcalib.testing import png, split

PRE = Preprocess(resize=None, crop=None, mean=(0.286,) * 3, std=(0.353,) * 3)


@pytest.fixture(scope="module")
def images():
    x, y = split("t10k")
    return [png(x[i]) for i in range(12)], y[:12]


def _zip(path, entries, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in entries:
            z.writestr(name, data)
    return path


def test_labeled_zip_maps_class_folders(images, tmp_path):
    pngs, labels = images
    names = [f"test/{labels[i]}/{i}.png" for i in range(12)]
    p = _zip(tmp_path / "e.zip", list(zip(names, pngs, strict=True)))
    data = load_labeled(p, PRE)
    expected = [int(n.split("/")[1]) for n in sorted(names)]  # images come in sorted name order
    assert data.images.shape == (12, 3, 28, 28) and data.labels.tolist() == expected
    assert class_names_to_indices(["cat", "ant", "dog"]) == {"ant": 0, "cat": 1, "dog": 2}


def test_calibration_subset_is_seeded(images, tmp_path):
    pngs, _ = images
    p = _zip(tmp_path / "c.zip", [(f"{i}.png", pngs[i]) for i in range(12)])
    a, b = load_calibration(p, PRE, 5, seed=1), load_calibration(p, PRE, 5, seed=1)
    assert a.shape == (5, 3, 28, 28) and torch.equal(a, b)
    assert not torch.equal(a, load_calibration(p, PRE, 5, seed=2))


@pytest.mark.parametrize("entries, message", [
    ([("../evil.png", b"x")], "points outside the archive"),
    ([("/abs.png", b"x")], "points outside the archive"),
    ([("notes.txt", b"x")], "contains no images"),
    ([("a.png", b"not a png")], "not a readable image"),
])
def test_bad_zip_entries(entries, message, tmp_path):
    with pytest.raises(DataError, match=message):
        src = ImageSource(_zip(tmp_path / "x.zip", entries))
        [src.decode(n) for n in src.names]


def test_damaged_archives_are_data_errors(images, tmp_path):
    pngs, _ = images
    z = _zip(tmp_path / "d.zip", [(f"{i}.png", pngs[i] * 20) for i in range(3)], zipfile.ZIP_DEFLATED)
    raw = bytearray(z.read_bytes())
    raw[60:90] = bytes(30)
    z.write_bytes(bytes(raw))
    with pytest.raises(DataError):
        src = ImageSource(z)
        [src.decode(n) for n in src.names]
    t = tmp_path / "t.tar.gz"
    with tarfile.open(t, "w:gz") as tf:
        for i in range(5):
            info = tarfile.TarInfo(f"{i}.png")
            info.size = len(pngs[i])
            tf.addfile(info, io.BytesIO(pngs[i]))
    t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    with pytest.raises(DataError, match="damaged"):
        src = ImageSource(t)
        [src.decode(n) for n in src.names]


def test_tar_links_and_caps(images, tmp_path):
    pngs, _ = images
    t = tmp_path / "l.tar"
    with tarfile.open(t, "w") as tf:
        info = tarfile.TarInfo("a.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(DataError, match="is a link"):
        ImageSource(t)
    with pytest.raises(DataError, match="more than the limit of 3"):
        ImageSource(_zip(tmp_path / "m.zip", [(f"{i}.png", pngs[i]) for i in range(5)]), Limits(max_entries=3))
    with pytest.raises(DataError, match="MiB allowed"):
        load_calibration(_zip(tmp_path / "n.zip", [(f"{i}.png", pngs[i]) for i in range(5)]), PRE, 5,
                         limits=Limits(max_tensor_bytes=10_000))


def test_tensor_files_are_checked(tmp_path):
    p = tmp_path / "c.npy"
    np.save(p, np.full((2, 3, 4, 4), np.nan, np.float32))
    with pytest.raises(DataError, match="NaN"):
        load_calibration(p, PRE, 2)
    np.save(p, np.zeros((3, 4, 4), np.float32))
    with pytest.raises(DataError, match="N x C x H x W"):
        load_calibration(p, PRE, 2)


def test_big_endian_npy_reads_the_same_values(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "be.npy", x.astype(">f4"))
    assert torch.equal(load_tensor_file(tmp_path / "be.npy"), torch.from_numpy(x))


def test_tensor_dtypes_are_an_allowlist(tmp_path):
    """Float types are taken as preprocessed; uint8 as pixels (scaled and normalised like images);
    float8, integers, bool and complex are refused by name, never a NotImplementedError later."""
    from safetensors.torch import save_file

    x = torch.rand(2, 3, 4, 4)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        save_file({"x": x.to(dtype)}, tmp_path / "f.safetensors")
        assert torch.allclose(load_tensor_file(tmp_path / "f.safetensors"), x.to(dtype).float())
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int32, torch.int8, torch.bool, torch.complex64):
        save_file({"x": torch.zeros(2, 3, 4, 4).to(dtype)}, tmp_path / "bad.safetensors")
        with pytest.raises(DataError, match=f"got dtype {str(dtype).removeprefix('torch.')}"):
            load_calibration(tmp_path / "bad.safetensors", PRE, 2)
    np.save(tmp_path / "i.npy", np.zeros((2, 3, 4, 4), np.int64))
    with pytest.raises(DataError, match="got dtype int64"):
        load_tensor_file(tmp_path / "i.npy")
    # uint8 pixels: the same values as the images path gives (ToTensor + Normalize)
    pix = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    want = (pix.float() / 255 - 0.286) / 0.353
    save_file({"x": pix}, tmp_path / "u.safetensors")
    np.save(tmp_path / "u.npy", pix.numpy())
    for name in ("u.safetensors", "u.npy"):
        assert torch.allclose(load_calibration(tmp_path / name, PRE, 2), want, atol=1e-6)
    rgb = Preprocess(resize=None, crop=None)  # per-channel mean/std do not fit a 1-channel tensor
    save_file({"x": pix[:, :1].contiguous()}, tmp_path / "g.safetensors")
    with pytest.raises(DataError, match="a uint8 tensor of 1 channels"):
        load_calibration(tmp_path / "g.safetensors", rgb, 2)


def test_weights_dtypes_are_an_allowlist(tmp_path):
    """State dicts: float32/16, bfloat16 and float64 weights; integers only for BatchNorm's
    num_batches_tracked; float8, integer or complex weights and nested tensors refused by key."""
    from safetensors.torch import save_file

    from clcalib.errors import ModelMismatchError
    from clcalib.graph.registry import read_state_dict

    ok = {"bn.weight": torch.ones(3), "bn.num_batches_tracked": torch.tensor(5), "fc.weight": torch.ones(2, 2)}
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        save_file({**ok, "fc.weight": torch.ones(2, 2, dtype=dtype)}, tmp_path / "ok.safetensors")
        assert read_state_dict(tmp_path / "ok.safetensors")["fc.weight"].dtype == dtype
    bad = {"float8_e4m3fn": torch.ones(2, 2).to(torch.float8_e4m3fn), "int64": torch.ones(2, 2, dtype=torch.int64),
           "complex64": torch.ones(2, 2, dtype=torch.complex64), "bool": torch.ones(2, 2, dtype=torch.bool)}
    for name, t in bad.items():
        for fmt in ("safetensors", "pt"):
            p = tmp_path / f"w.{fmt}"
            (save_file if fmt == "safetensors" else lambda d, f: torch.save(d, f))({**ok, "fc.weight": t}, p)
            with pytest.raises(ModelMismatchError, match=rf"not fc\.weight \({name}\)"):
                read_state_dict(p)
    torch.save({**ok, "bn.weight": torch.ones(3, dtype=torch.int32)}, tmp_path / "i.pt")  # not an integer buffer
    with pytest.raises(ModelMismatchError, match=r"bn\.weight \(int32\)"):
        read_state_dict(tmp_path / "i.pt")
    torch.save({**ok, "fc.weight": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])}, tmp_path / "n.pt")
    with pytest.raises(ModelMismatchError, match=r"fc\.weight \(nested"):
        read_state_dict(tmp_path / "n.pt")


def test_calibrate_rejects_bad_config_as_config_error():
    with pytest.raises(ConfigError, match="w_bits"):
        calibrate(torch.nn.Linear(2, 2), torch.zeros(1, 3, 4, 4), {"w_bits": 1})


def test_a_forward_that_does_not_follow_module_order_is_refused_by_modules_and_taken_by_the_graph():
    from torch import nn

    from clcalib.errors import UnsupportedModel

    class Odd(nn.Module):  # ReLU registered after the conv but applied after an add
        def __init__(self):
            super().__init__()
            self.conv, self.relu = nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()
            self.c2, self.fc = nn.Conv2d(3, 3, 1), nn.Linear(3, 2)

        def forward(self, x):
            y = self.relu(self.conv(x) - 0.5 + x)
            return self.fc(self.c2(y).mean((2, 3)))

    torch.manual_seed(0)
    model, x = Odd().eval(), torch.randn(8, 3, 8, 8)
    with pytest.raises(UnsupportedModel, match="does not follow its module order"):
        calibrate(model, x, {"method": "mse", "iters": 0, "device": "cpu", "partition": "modules"})
    q = calibrate(model, x, {"method": "mse", "iters": 0, "device": "cpu", "w_bits": 8, "a_bits": 8}).model  # graph
    with torch.no_grad():
        assert torch.allclose(q(x), model(x), atol=0.05)


def test_16_bit_and_float_images_decode_to_the_same_pixels_as_8_bit(tmp_path):
    """Real Fashion-MNIST images stored as 16-bit PNG and as float TIFF in [0, 1] give the 8-bit
    pixels (PIL's convert('RGB') alone saturates the first and blackens the second); a float
    image on an unknown scale is refused by name."""
    from PIL import Image

    x, _ = split("t10k")
    eight, sixteen, floats = tmp_path / "8", tmp_path / "16", tmp_path / "f"
    for d in (eight, sixteen, floats):
        d.mkdir()
    for i in range(8):
        img = x[i]
        (eight / f"{i}.png").write_bytes(png(img))
        Image.fromarray(img.astype(np.uint16) * 257).save(sixteen / f"{i}.png")  # 16-bit PNG
        Image.fromarray(img.astype(np.float32) / 255.0).save(floats / f"{i}.tif")  # mode F TIFF
    assert Image.open(sixteen / "0.png").mode.startswith("I") and Image.open(floats / "0.tif").mode == "F"
    pre = Preprocess(resize=None, crop=None, mean=0.0, std=1.0)
    ref = load_calibration(eight, pre, 8, seed=0)
    assert ref.abs().max() > 0.5
    assert torch.equal(load_calibration(sixteen, pre, 8, seed=0), ref)
    assert torch.equal(load_calibration(floats, pre, 8, seed=0), ref)
    Image.fromarray(np.full((28, 28), 3.5, np.float32)).save(floats / "bright.tif")
    with pytest.raises(DataError, match="bright.tif: a float image with values outside"):
        load_calibration(floats, pre, 9, seed=0)


@pytest.mark.parametrize("fmt", ["pax", "gnu"])
def test_a_huge_tar_header_is_refused_before_it_is_read(images, tmp_path, fmt):
    """A .tar.gz of ~100 KiB declaring a 64 MiB member name: refused with a short message and
    without reading the name into memory (tarfile alone allocates all of it)."""
    import tracemalloc

    pngs, _ = images
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT if fmt == "pax" else tarfile.GNU_FORMAT) as t:
        info = tarfile.TarInfo("x/" + "a" * (64 << 20) + ".png")
        info.size = len(pngs[0])
        t.addfile(info, io.BytesIO(pngs[0]))
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="a tar header of .* bytes") as e:
            ImageSource(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    assert len(str(e.value)) < 300


def test_long_member_names_are_refused_and_shortened_in_messages(images, tmp_path):
    pngs, _ = images
    name = "d/" + "b" * 5000 + ".png"
    with pytest.raises(DataError, match="5006 characters, more than 1024") as e:
        ImageSource(_zip(tmp_path / "long.zip", [(name, pngs[0])]))
    assert len(str(e.value)) < 300
