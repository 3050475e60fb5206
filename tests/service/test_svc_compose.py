"""docker-compose.yml validates (Debian's docker-compose checks it without an engine)."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_is_valid_and_complete():
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not on PATH (apt-get install -y docker-compose)")
    r = subprocess.run(["docker-compose", "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = spec["services"]
    assert {"api", "worker-gpu0", "redis", "postgres", "flower"} <= set(svc)
    assert all("healthcheck" in s for s in svc.values())
    gpu = svc["worker-gpu0"]
    assert gpu["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "--appendonly" in svc["redis"]["command"] and "yes" in svc["redis"]["command"]
    assert "clcalib-data:/data" in svc["api"]["volumes"] and "clcalib-data:/data" in gpu["volumes"]
