"""The API process never imports torch (STYLE: light imports)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CODE = """
import sys
import service.app, service.cli, service.client, service.serve, worker.celery_app
from service.app import create_app
app = create_app()
app.openapi()
heavy = sorted(m for m in ("torch", "torchvision", "numpy", "PIL") if m in sys.modules)
print(",".join(heavy))
"""


def test_importing_the_api_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    heavy = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert "torch" not in heavy.split(","), f"importing the API imported {heavy}"


def test_importing_the_api_and_worker_creates_no_files(tmp_path):
    """The embedded queue's folder is made when a process starts, not when a module is imported."""
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("CLCALIB_")}
    code = CODE + "\nimport worker.tasks, worker.main\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "importing created files in the current directory"
