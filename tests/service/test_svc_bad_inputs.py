"""Every bad input tried against a live API (uvicorn over HTTP, the real validator, no
worker): each gets a 4xx naming the problem, nothing is stored or queued, nothing executes;
meanwhile another tenant's valid submits are all accepted, and the API and the validator stay
under stated memory bounds (peak RSS, the kernel's VmHWM).

Set CLCALIB_BAD_INPUT_TABLE=path to write the table of answers (docs/service.md has it)."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from svc_fmnist import PREPROCESS, TINY, png
from svc_helpers import children, peak_rss

from clcalib.config import MAX_CONFIG_ITEMS

MOBILENET = Path("/work/shared/reference/fmnist_mobilenet_v2.safetensors")


class Evil:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def zip_of(entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", zipfile.ZIP_DEFLATED) as z:
        for n, data in entries.items():
            z.writestr(n, data)
        for n, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(n)
            info.external_attr = (0o120777 << 16)
            z.writestr(info, target)
    return b.getvalue()


def tar_with_symlink() -> bytes:
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w") as t:
        data = png(np.zeros((28, 28), np.uint8))
        info = tarfile.TarInfo("a.png")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        t.addfile(link)
    return b.getvalue()


def npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    b = io.BytesIO()
    np.save(b, arr, allow_pickle=allow_pickle)
    return b.getvalue()


def tar_with_huge_name() -> bytes:
    """~100 KiB of .tar.gz declaring a 64 MiB member name in a pax header (issue 14 class 1)."""
    b = io.BytesIO()
    data = png(np.zeros((28, 28), np.uint8))
    with tarfile.open(fileobj=b, mode="w:gz", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("x/" + "a" * (64 << 20) + ".png")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return b.getvalue()


def float_tiff(lo: float, hi: float) -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.linspace(lo, hi, 28 * 28, dtype=np.float32).reshape(28, 28), mode="F").save(b, format="TIFF")
    return b.getvalue()


def img_png(w: int, h: int) -> bytes:
    b = io.BytesIO()
    Image.new("L", (w, h)).save(b, format="PNG", optimize=False)
    return b.getvalue()


@pytest.fixture(scope="module")
def good(fmnist_zips, reference_model):
    calib = fmnist_zips["calib"].read_bytes()
    return {"model": reference_model.read_bytes(), "calibration": calib, "eval": fmnist_zips["eval"].read_bytes()}


def cases(good, tmp: Path) -> list[tuple[str, dict, int, str, str]]:
    """(what, request parts, expected status, expected code, a phrase the message must contain)"""
    import torch

    evil_raw = tmp / "evil_raw_ran"
    evil_zip = tmp / "evil_torchsave_ran"
    b = io.BytesIO()
    torch.save({"conv1.weight": Evil(evil_zip)}, b)
    fine_imgs = {f"{i}.png": png(np.full((28, 28), i, np.uint8)) for i in range(4)}
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("big.png", b"\0" * (80 << 20))
    safetensors_bad = struct.pack("<Q", 40) + b'{"a": {"dtype": "F32", "shape": [99999' + b"\0" * 8
    from safetensors.torch import load, save

    with_nan = load(good["model"])
    with_nan["layer2.0.conv1.weight"] = with_nan["layer2.0.conv1.weight"].clone()
    with_nan["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    with_nan = save(with_nan)

    def weights_with(key: str, value) -> bytes:
        sd = load(good["model"])
        sd[key] = value
        return save(sd)

    def saved_with(key: str, value) -> bytes:  # torch.save (nested tensors have no safetensors form)
        sd = load(good["model"])
        sd[key] = value
        return _saved(sd)

    conv1 = load(good["model"])["conv1.weight"]
    cfg = json.dumps(TINY)
    base = {"model": good["model"], "calibration": good["calibration"], "arch": "resnet18",
            "num_classes": "10", "config": cfg}

    def _saved(obj) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    def w(**kw):
        d = dict(base)
        for k, v in kw.items():
            if v is None:
                d.pop(k, None)
            else:
                d[k] = v
        return d

    return [
        ("model: pickle whose unpickling runs `touch` (raw pickle)",
         w(model=pickle.dumps({"conv1.weight": Evil(evil_raw)})), 422, "model_mismatch", "weights_only"),
        ("model: torch.save zip carrying a code-running object",
         w(model=b.getvalue()), 422, "model_mismatch", "weights_only"),
        ("model: not a weights file (random bytes)", w(model=os.urandom(4096)), 422, "model_mismatch",
         "not a safetensors file"),
        ("model: safetensors with a corrupt header", w(model=safetensors_bad), 422, "model_mismatch", "safetensors"),
        ("model: empty file", w(model=b""), 422, "empty_file", "empty"),
        ("model: a NaN in one weight", w(model=with_nan), 422, "model_mismatch",
         "NaN or infinite values in: layer2.0.conv1.weight"),
        ("model: MobileNetV2 weights uploaded as resnet18", w(model=MOBILENET.read_bytes()), 422,
         "model_mismatch", "missing keys"),
        ("model: resnet18 weights with num_classes=100", w(num_classes="100"), 422, "model_mismatch",
         "fc.weight (expected (100, 512), got (10, 512))"),
        ("arch: unknown name", w(arch="resnet1000"), 422, "unknown_arch", "supported: resnet18"),
        ("arch: missing", w(arch=None), 422, "missing_field", "'arch' is required"),
        ("num_classes: not an integer", w(num_classes="ten"), 422, "bad_num_classes", "integer"),
        ("num_classes: 0", w(num_classes="0"), 422, "bad_num_classes", "between 1 and 100000"),
        ("config: not JSON", w(config="{iters: 2"), 422, "bad_config_json", "not valid JSON"),
        ("config: a JSON list", w(config="[1, 2]"), 422, "bad_config", "JSON object"),
        ("config: nested 100000 deep", w(config="[" * 100000 + "]" * 100000), 422, "bad_config_json", "nested too deeply"),
        ("config: an integer of 5000 digits", w(config='{"iters": ' + "9" * 5000 + "}"), 422, "bad_config_json",
         "number that cannot be read"),
        ("config: std 0 in float32", w(config='{"preprocess": {"std": [1e-50]}}'), 422, "bad_config", "float32"),
        ("model: sparse tensors", w(model=_saved({"conv1.weight": torch.zeros(3, 3).to_sparse()})), 422,
         "model_mismatch", "only plain dense"),
        ("model: integer keys", w(model=_saved({1: torch.zeros(3)})), 422, "model_mismatch", "keys must be strings"),
        ("config: unknown key (typo `iter`)", w(config=json.dumps({"iter": 5})), 422, "bad_config",
         "config.iter: Extra inputs are not permitted"),
        ("config: w_bits=1 (out of range)", w(config=json.dumps({"w_bits": 1})), 422, "bad_config",
         "config.w_bits: Input should be greater than or equal to 2"),
        ("config: a_bits=16 (out of range)", w(config=json.dumps({"a_bits": 16})), 422, "bad_config",
         "config.a_bits: Input should be less than or equal to 8"),
        ("config: cl_calib on a method without reconstruction",
         w(config=json.dumps({"method": "minmax", "cl_calib": {"enabled": True}})), 422, "bad_config",
         "cl_calib needs a reconstruction method"),
        ("config: a shorter CL tail without the tail mapping",
         w(config=json.dumps({"cl_calib": {"enabled": True, "mapping": "pool", "tail_units": 2}})), 422, "bad_config",
         "tail_units shortens the fp_tail mapping"),
        ("config: a held CL gradient with the term on every iteration",
         w(config=json.dumps({"cl_calib": {"enabled": True, "every": 1, "hold": True}})), 422, "bad_config",
         "hold keeps the term's gradient between its turns"),
        ("config: CL tail of 0 units", w(config=json.dumps({"cl_calib": {"enabled": True, "tail_units": 0}})), 422,
         "bad_config", "config.cl_calib.tail_units: Input should be greater than or equal to 1"),
        ("config: NaN std (JSON parsers accept NaN)", w(config='{"preprocess": {"std": [NaN, 1, 1]}}'), 422,
         "bad_config", "config.preprocess.std.0: Input should be a finite number"),
        ("config: export to an unknown format", w(config=json.dumps({"export": ["tflite"]})), 422, "bad_config",
         "config.export.0: Input should be 'onnx'"),
        # the old target name is mapped before validation: anything else, of any type, is a 422 naming the choices
        ("config: an export target that never existed", w(config=json.dumps({"export_target": "onnxruntime-avx512"})),
         422, "bad_config", "config.export_target: Input should be 'onnxruntime', 'onnxruntime-vnni'"),
        ("config: an export target that is an object", w(config=json.dumps({"export_target": {"onnxruntime-avx2": 1}})),
         422, "bad_config", "config.export_target: Input should be 'onnxruntime'"),
        ("calibration: missing", w(calibration=None), 422, "missing_file", "'calibration' is required"),
        ("calibration: zip with no images (empty set)", w(calibration=zip_of({"readme.txt": b"hi"})), 422,
         "bad_data", "contains no images"),
        ("calibration: zip member `../../evil.png` (path traversal)",
         w(calibration=zip_of({**fine_imgs, "../../evil.png": fine_imgs["0.png"]})), 422, "bad_data",
         "points outside the archive"),
        ("calibration: zip member that is a symlink",
         w(calibration=zip_of(fine_imgs, symlinks={"link.png": "/etc/passwd"})), 422, "bad_data",
         "symbolic link"),
        ("calibration: tar member that is a symlink to /etc/passwd", w(calibration=tar_with_symlink()), 422,
         "bad_data", "is a link"),
        ("calibration: 2001 entries (limit 2000)",
         w(calibration=zip_of({f"{i}.png": fine_imgs["0.png"] for i in range(2001)})), 422, "bad_data",
         "more than the limit of 2000"),
        ("calibration: zip bomb (80 MiB of zeros in 80 KiB)", w(calibration=bomb.getvalue()), 422,
         "bad_data", "decompressed"),
        ("calibration: 3000x3000 image (pixel cap 4,000,000)",
         w(calibration=zip_of({**fine_imgs, "huge.png": img_png(3000, 3000)})), 422, "bad_data",
         "more than the cap of 4000000"),
        ("calibration: .tar.gz of 100 KiB declaring a 64 MiB member name", w(calibration=tar_with_huge_name()),
         422, "bad_data", "a tar header of"),
        ("calibration: 4 small PNGs with preprocess.resize 4096 (GBs once upscaled)",
         w(calibration=zip_of({f"{i}.png": fine_imgs["0.png"] for i in range(4)}),
           config=json.dumps({**TINY, "preprocess": {**PREPROCESS, "resize": 4096, "crop": None}})),
         422, "bad_data", "lower preprocess.resize"),
        ("calibration: float image with values outside [0, 1]",
         w(calibration=zip_of({**fine_imgs, "f.tif": float_tiff(-3.0, 40.0)})), 422, "bad_data",
         "values outside [0, 1]"),
        ("calibration: truncated PNG",
         w(calibration=zip_of({**fine_imgs, "bad.png": fine_imgs["0.png"][:40]})), 422, "bad_data",
         "not a readable image"),
        ("calibration: images of different sizes, no resize",
         w(calibration=zip_of({**fine_imgs, "big.png": png(np.zeros((56, 56), np.uint8))})), 422, "bad_data",
         "different sizes"),
        ("calibration: one image of another size outside the decoded sample (its header is read, not decoded)",
         w(calibration=zip_of({f"{i:03d}.png": png(np.zeros((29, 29), np.uint8)) if i == 1 else fine_imgs["0.png"]
                               for i in range(300)})), 422, "bad_data",  # 001.png: not in the seeded sample of 64
         "'001.png': comes out 29x29 after preprocess, the other images 28x28; set preprocess.resize"),
        ("calibration: a text file, not an archive", w(calibration=b"just text\n" * 10), 422, "bad_data",
         "not a folder, zip or tar"),
        ("calibration: .npy of shape (10, 784) (not N x C x H x W)",
         w(calibration=npy(np.zeros((10, 784), np.float32))), 422, "bad_data", "N x C x H x W"),
        ("calibration: .npy of long doubles", w(calibration=npy(np.zeros((2, 3, 28, 28), np.longdouble))), 422,
         "bad_data", "got dtype float128"),
        ("calibration: .npy of a structured dtype", w(calibration=npy(np.zeros((2, 3, 28, 28), [("a", "<f4")]))), 422,
         "bad_data", "got dtype"),
        ("calibration: .npy holding pickled objects", w(calibration=npy(np.array([{"a": 1}], dtype=object),
                                                                         allow_pickle=True)), 422, "bad_data",
         "not a readable .npy"),
        ("calibration: 1-channel tensor for a 3-channel model",
         w(calibration=npy(np.zeros((4, 1, 28, 28), np.float32))), 422, "model_cannot_run",
         "cannot run on the calibration data of shape (1, 28, 28)"),
        ("evaluation: images not in class folders", w(evaluation=zip_of(fine_imgs)), 422, "bad_data",
         "one folder per class"),
        ("evaluation: class folder `12` with num_classes=10",
         w(evaluation=zip_of({f"12/{n}": d for n, d in fine_imgs.items()})), 422, "bad_data",
         "num_classes=10"),
        ("labels: without an evaluation set", w(labels=b"coat\nbag\n"), 422, "bad_data", "needs an evaluation set"),
        ("labels: class folders that are not in it",
         w(evaluation=zip_of({f"coat/{n}": d for n, d in fine_imgs.items()}), labels=b"shirt\nbag\n"), 422,
         "bad_data", "class folders ['coat'] are not in the labels file"),
        ("labels: a 5 MiB file", w(evaluation=zip_of({f"coat/{n}": d for n, d in fine_imgs.items()}),
                                   labels=b"coat\n" * (5 << 18)), 422, "bad_data", "larger than 4194304 bytes"),
        ("form: unknown field `weights`", {**base, "weights": b"x"}, 422, "unknown_field", "unknown form field"),
        # issue 24 class 6: inputs that answered 500, and weights that were accepted silently
        ("model: float8 weights (safetensors)", w(model=weights_with("conv1.weight", conv1.to(torch.float8_e4m3fn))),
         422, "model_mismatch", "not conv1.weight (float8_e4m3fn)"),
        ("model: a nested tensor in a state_dict",
         w(model=saved_with("fc.bias", torch.nested.nested_tensor([torch.zeros(3), torch.zeros(7)]))), 422,
         "model_mismatch", "not fc.bias (nested, cpu, torch.float32)"),
        ("model: integer weights", w(model=weights_with("conv1.weight", conv1.to(torch.int32))), 422,
         "model_mismatch", "not conv1.weight (int32)"),
        ("model: complex weights", w(model=weights_with("conv1.weight", conv1.to(torch.complex64))), 422,
         "model_mismatch", "not conv1.weight (complex64)"),
        ("calibration: a float8 tensor (.safetensors)",
         w(calibration=save({"x": torch.zeros(4, 3, 28, 28).to(torch.float8_e4m3fn)})), 422, "bad_data",
         "got dtype float8_e4m3fn"),
        ("config: preprocess.mean [[0.1]]", w(config=json.dumps({"preprocess": {"mean": [[0.1]]}})), 422,
         "bad_config", "config.preprocess.mean.0: Input should be a valid number"),
        ('config: preprocess.mean [{"a": 1}]', w(config=json.dumps({"preprocess": {"mean": [{"a": 1}]}})), 422,
         "bad_config", "config.preprocess.mean.0: Input should be a valid number"),
        ("config: 60000 unknown keys (a 5.9 MB error body before)",
         w(config=json.dumps({f"k{i}": 1 for i in range(60000)})), 422, "bad_config",
         f"more than {MAX_CONFIG_ITEMS} keys and list values"),
        ("config: an accuracy target without an evaluation set",
         w(config=json.dumps({**TINY, "target": {"max_top1_drop": 1.0}})), 422, "bad_config",
         "config.target needs an evaluation set"),
        ("config: budget with both weight_mb and w_bits_avg",
         w(config=json.dumps({"budget": {"weight_mb": 3.0, "w_bits_avg": 3}})), 422, "bad_config",
         "give weight_mb or w_bits_avg, not both"),
        ("config: a weight budget below the smallest model (checked in the sandbox)",
         w(config=json.dumps({**TINY, "budget": {"weight_mb": 0.001}})), 422, "bad_config",
         "below the smallest model these choices allow"),
        ("config: an activation budget below the smallest model (checked in the sandbox, before the minutes of "
         "measuring a job spent first)",
         w(config=json.dumps({**TINY, "budget": {"a_bits_avg": 2.0}})), 422, "bad_config",
         "budget.a_bits_avg 2 is below the smallest average these choices allow"),
        ("config: layer_bits naming a layer the model does not have",
         w(config=json.dumps({**TINY, "layer_bits": {"layer9.conv1": 2}})), 422, "bad_config",
         "does not have, e.g. 'layer9.conv1'"),
        ("config: layer_bits of 1 bit", w(config=json.dumps({"layer_bits": {"conv1": 1}})), 422, "bad_config",
         "bits must be from 2 to 8"),
    ]


def post(stack, parts: dict, key: str | None = "key-a"):
    files = [(k, (k + ".bin", v)) for k, v in parts.items() if isinstance(v, bytes)]
    data = {k: v for k, v in parts.items() if isinstance(v, str)}
    with stack.client(key) as c:
        return c.post("/v1/jobs", files=files, data=data)


MiB = 1 << 20
API_PEAK_BOUND = 400 * MiB  # streams uploads to disk; ~100 MiB at rest
VALIDATOR_PEAK_BOUND = 1024 * MiB  # a child with torch imported sits at ~400 MiB


class Innocent:
    """Tenant b submits a valid job again and again (then cancels and deletes it) while tenant
    a sends the bad inputs; every status it gets is recorded."""

    def __init__(self, stack, good):
        self.stack, self.good, self.statuses = stack, good, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(300)

    def _run(self):
        parts = {"model": self.good["model"], "calibration": self.good["calibration"], "arch": "resnet18",
                 "num_classes": "10", "config": json.dumps(TINY)}
        while not self._stop.is_set():
            r = post(self.stack, parts, key="key-b")
            self.statuses.append(r.status_code)
            if r.status_code == 202:
                with self.stack.client("key-b") as c:
                    c.post(f"/v1/jobs/{r.json()['id']}/cancel")
                    c.delete(f"/v1/jobs/{r.json()['id']}")
            self._stop.wait(0.5)  # a steady trickle, not a flood: the test is about the bad uploads


def test_bad_inputs_get_4xx_and_nothing_runs(api_only, good, tmp_path):
    table, failures = [], []
    # the payload is live: unpickling it here creates its marker file
    control = tmp_path / "control_ran"
    pickle.loads(pickle.dumps(Evil(control)))
    assert control.exists()
    all_cases = cases(good, tmp_path)
    with Innocent(api_only, good) as innocent:
        for what, parts, status, code, phrase in all_cases:
            r = post(api_only, parts)
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {"detail": r.text}
            table.append((what, r.status_code, body.get("code", ""), body.get("detail", "")))
            if r.status_code != status or body.get("code") != code or phrase not in body.get("detail", ""):
                failures.append(f"{what}: got {r.status_code} {body}")
    # the other tenant was served throughout
    assert len(innocent.statuses) >= 5 and set(innocent.statuses) == {202}, innocent.statuses
    peaks = {"api": peak_rss(api_only.api.pid)}
    peaks.update({f"validator {p}": peak_rss(p) for p in children(api_only.api.pid)})
    print("\npeak RSS MiB:", {k: v // MiB for k, v in peaks.items()}, "innocent submits:", len(innocent.statuses))
    assert peaks["api"] < API_PEAK_BOUND, peaks
    assert len(peaks) > 1 and all(v < VALIDATOR_PEAK_BOUND for k, v in peaks.items() if k != "api"), peaks
    # transport-level cases
    with api_only.client() as c:
        r = c.post("/v1/jobs", json={"arch": "resnet18"})
        table.append(("body: JSON instead of multipart", r.status_code, r.json()["code"], r.json()["detail"]))
        if r.status_code != 415:
            failures.append(f"json body: {r.status_code}")
    for key, what in ((None, "auth: no API key"), ("nope", "auth: unknown API key")):
        r = post(api_only, {"arch": "resnet18"}, key=key)
        table.append((what, r.status_code, r.json()["code"], r.json()["detail"]))
        if r.status_code != 401:
            failures.append(f"{what}: {r.status_code}")
    with api_only.client(None) as c:  # the operator's counts of every tenant are not public
        r = c.get("/metrics")
        table.append(("metrics: GET /metrics without an API key (keys configured)", r.status_code,
                      r.json()["code"], r.json()["detail"]))
        if r.status_code != 401:
            failures.append(f"metrics without a key: {r.status_code}")
    r = _too_large(api_only, chunked=False)
    table.append(("upload: 80 MiB with Content-Length (cap 64 MiB)", r.status_code, r.json()["code"], r.json()["detail"]))
    if r.status_code != 413:
        failures.append(f"too large: {r.status_code} {r.text}")
    r = _too_large(api_only, chunked=True)
    table.append(("upload: 80 MiB chunked, no Content-Length (cap 64 MiB)", r.status_code, r.json()["code"],
                  r.json()["detail"]))
    if r.status_code != 413:
        failures.append(f"too large chunked: {r.status_code} {r.text}")

    if os.environ.get("CLCALIB_BAD_INPUT_TABLE"):
        with open(os.environ["CLCALIB_BAD_INPUT_TABLE"], "w") as f:
            f.write("| bad input | status | code | message |\n|---|---|---|---|\n")
            for what, st, code, detail in table:
                f.write(f"| {what} | {st} | `{code}` | {detail.replace('|', '/')} |\n")
    assert not failures, "\n".join(failures)

    # nothing executed, nothing stored, nothing queued, no upload left behind
    assert not (tmp_path / "evil_raw_ran").exists() and not (tmp_path / "evil_torchsave_ran").exists()
    with api_only.client() as c:
        assert c.get("/v1/jobs").json()["jobs"] == []
        # the only messages are the innocent tenant's (canceled: a worker would skip them)
        assert f"clcalib_queue_depth {float(len(innocent.statuses))}" in c.get("/metrics").text
    data = Path(api_only.env["CLCALIB_DATA_DIR"])
    assert list((data / "jobs").iterdir()) == []
    assert api_only.api.alive()


def _too_large(stack, chunked: bool):
    boundary = "xyzzy"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.pt\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    size = 80 << 20

    def body():
        yield head
        chunk = b"\0" * (1 << 20)
        for _ in range(size >> 20):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    with stack.client() as c:
        if chunked:
            return c.post("/v1/jobs", content=body(), headers=headers)
        return c.post("/v1/jobs", content=b"".join(body()), headers=headers)


def test_a_valid_upload_is_accepted_and_queued(api_only, good):
    """The control: the same API accepts the real model and images (no worker runs here)."""
    r = post(api_only, {"model": good["model"], "calibration": good["calibration"], "evaluation": good["eval"],
                        "arch": "resnet18", "num_classes": "10",
                        "config": json.dumps({**TINY, "preprocess": PREPROCESS})})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued" and r.headers["location"] == f"/v1/jobs/{job['id']}"
    with api_only.client() as c:
        assert c.post(f"/v1/jobs/{job['id']}/cancel").json()["state"] == "canceled"
        assert c.delete(f"/v1/jobs/{job['id']}").status_code == 204


def test_every_error_has_the_same_body_shape(api_only, tmp_path):
    """Routing's 404/405 and an unexpected exception (500) answer like every other error:
    {"detail", "code"}, never Starlette's {"detail": "Not Found"} or a text page."""
    with api_only.client("key-a") as c:
        r = c.get("/no/such/path")
        assert r.status_code == 404 and r.json()["code"] == "not_found" and "/docs" in r.json()["detail"], r.text
        r = c.delete("/healthz")
        assert r.status_code == 405 and r.json()["code"] == "method_not_allowed", r.text
        assert "GET" in r.headers.get("allow", ""), r.headers
    from fastapi.testclient import TestClient

    from jobs.settings import Settings
    from service.app import create_app

    app = create_app(Settings(data_dir=tmp_path / "data"))

    def boom():
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom")
    assert r.status_code == 500 and r.json()["code"] == "internal_error", r.text
    assert "reference" in r.json()["detail"] and "a bug" not in r.text  # no internals leak


def test_error_bodies_are_bounded_and_cheap(api_only):
    """Issue 24 class 6: a config with 60000 unknown keys was a 5.9 MB error body and stalled the
    event loop; every error body is now bounded in one place (ErrorBody): detail at most 2000
    characters, the first 20 errors with more_errors counting the rest, each string in them cut."""
    import time

    def config_error(config: str):
        t = time.monotonic()
        r = post(api_only, {"model": b"x", "calibration": b"x", "arch": "resnet18", "num_classes": "10",
                            "config": config})
        return r, time.monotonic() - t

    r, took = config_error(json.dumps({f"k{i}": 1 for i in range(60000)}))
    assert r.status_code == 422 and f"more than {MAX_CONFIG_ITEMS} keys" in r.json()["detail"], r.text
    assert len(r.content) < 1000 and took < 5, (len(r.content), took)
    r, _ = config_error(json.dumps({f"k{i}": 1 for i in range(40)}))  # under the key bound: 40 errors
    body = r.json()
    assert r.status_code == 422 and len(body["errors"]) == 20 and body["more_errors"] == 20, r.text
    assert body["detail"] == "config.k0: Extra inputs are not permitted (and 39 more)"
    r, _ = config_error(json.dumps({"k" * 200_000: 1}))  # one key of 200000 characters
    body = r.json()
    assert r.status_code == 422 and len(body["detail"]) <= 2000 and "characters in all" in body["detail"], r.text
    assert len(body["errors"][0]["loc"][1]) <= 200 and len(r.content) < 3000, len(r.content)
    with api_only.client() as c:  # FastAPI's own validation errors go through the same body
        r = c.get("/v1/jobs", params={"limit": "9" * 50_000})
    assert r.status_code == 422 and len(r.content) < 3000, (r.status_code, len(r.content))


def test_metrics_needs_a_key_when_keys_are_set(api_only, tmp_path):
    """Issue 24 class 6: /metrics answered without a key; with API keys configured it needs one
    (Bearer, like the API), and keyless (loopback-only) mode serves it as before."""
    import sys

    import httpx
    from svc_helpers import ROOT, Proc, free_port, wait_until

    with api_only.client(None) as c:
        r = c.get("/metrics")
        assert r.status_code == 401 and r.json()["code"] == "unauthorized", r.text
        assert "Bearer" in r.json()["detail"] and r.headers["WWW-Authenticate"] == "Bearer"
        assert c.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    with api_only.client("key-b") as c:
        r = c.get("/metrics")
        assert r.status_code == 200 and "clcalib_queue_depth" in r.text
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLCALIB_")}
    env.update(CLCALIB_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    p = Proc([sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--host", "127.0.0.1",
              "--port", str(port), "--log-level", "warning"], env, tmp_path / "keyless.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(url + "/healthz", timeout=2).status_code == 200, 60, f"the API\n{p.tail()}")
        r = httpx.get(url + "/metrics", timeout=30)
        assert r.status_code == 200 and "clcalib_queue_depth" in r.text, r.text
    finally:
        p.stop()
