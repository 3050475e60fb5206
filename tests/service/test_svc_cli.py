"""The service's CLI as a user meets it (issue 15): a folder of images uploaded as is, the
same calibration flags as `clcalib calibrate`, a short status, `jobs --state`, and one-line
errors for a server that is down or a request it refuses."""

from __future__ import annotations

import json
import subprocess
import sys

from svc_fmnist import REFERENCE, png, read_idx
from svc_helpers import ROOT, free_port

from clcalib.testing import FMNIST

FLAGS = ["--method", "brecq", "--iters", "2", "--calib-size", "64", "--resize", "none", "--crop", "none",
         "--mean", "0.286", "--std", "0.353"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "clcalib.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_folder_upload_flags_status_and_state_filter(api_only, tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    images = read_idx(FMNIST / "train-images-idx3-ubyte.gz")
    for i in range(64):
        (folder / f"{i:03d}.png").write_bytes(png(images[i]))
    common = ["--url", api_only.url, "--api-key", "key-a"]
    r = cli("submit", *common, "--model", REFERENCE, "--arch", "resnet18", "--num-classes", "10",
            "--calibration", folder, *FLAGS)
    assert r.returncode == 0, r.stderr
    jid = r.stdout.strip()
    try:
        s = cli("status", *common, jid)
        lines = s.stdout.strip().splitlines()
        assert s.returncode == 0 and lines[0] == f"job {jid}: queued", s.stdout
        assert lines[1].startswith("estimated time: about ") and "once running" in lines[1], s.stdout  # issue 30
        full = cli("status", *common, jid, "--json")
        job = json.loads(full.stdout)
        assert job["config"]["iters"] == 2 and job["config"]["preprocess"]["resize"] is None  # the flags arrived
        assert jid in cli("jobs", *common, "--state", "queued").stdout
        assert jid not in cli("jobs", *common, "--state", "succeeded").stdout
    finally:
        cli("cancel", *common, jid)
        cli("delete", *common, jid)


def test_client_errors_are_one_line(api_only, tmp_path):
    down = f"http://127.0.0.1:{free_port()}"
    r = cli("status", "--url", down, "0123")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and f"cannot reach the clcalib server at {down}" in r.stderr
    common = ["--url", api_only.url, "--api-key", "key-a"]
    r = cli("submit", *common, "--model", REFERENCE, "--arch", "resnet1000", "--num-classes", "10",
            "--calibration", tmp_path, *FLAGS)  # an empty folder: the server refuses the arch first
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "HTTP 422" in r.stderr and "unknown arch 'resnet1000'" in r.stderr
    r = cli("submit", *common, "--model", REFERENCE, "--arch", "resnet18", "--num-classes", "10",
            "--calibration", tmp_path, "--w-bits", "9")  # refused before any upload
    assert r.returncode == 2 and "w_bits: Input should be less than or equal to 8" in r.stderr, r.stderr
    r = cli("status", *common, "nosuchjob")
    assert r.returncode == 2 and "HTTP 404" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
