"""The API process never imports torch (STYLE: light imports)."""

import subprocess
import sys

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
