"""/docs and /redoc work offline: every script and stylesheet comes from the service itself,
and a real browser that can reach nothing but 127.0.0.1 renders the API reference."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from urllib.parse import urljoin, urlparse

import httpx
import pytest


class _Assets(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script" and a.get("src"):
            self.urls.append(a["src"])
        if tag == "link" and a.get("href"):
            self.urls.append(a["href"])


def _asset_urls(page_url: str) -> list[str]:
    r = httpx.get(page_url, timeout=30)
    assert r.status_code == 200, r.text[:300]
    p = _Assets()
    p.feed(r.text)
    return [urljoin(page_url, u) for u in p.urls]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_assets_are_served_by_the_service(api_only, page):
    urls = _asset_urls(api_only.url + page)
    assert urls, f"{page} references no scripts or stylesheets at all"
    here = urlparse(api_only.url).netloc
    outside = [u for u in urls if urlparse(u).netloc != here]
    assert not outside, f"{page} loads assets from outside the service: {outside}"
    for u in urls:
        r = httpx.get(u, timeout=30)
        assert r.status_code == 200 and len(r.content) > 1000, f"{u}: {r.status_code}, {len(r.content)} bytes"


def _render(url: str, tmp_path) -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not on PATH (apt-get install -y chromium)")
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            # every host but the service's is unreachable, as on a machine without internet
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=15000", "--dump-dom", url]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_swagger_ui_renders_offline_in_a_browser(api_only, tmp_path):
    dom = _render(api_only.url + "/docs", tmp_path)
    # Swagger UI builds these from /openapi.json; a page whose JS did not load has neither
    assert 'class="swagger-ui"' in dom, dom[:2000]
    assert "/v1/jobs" in dom and "Post-training quantization calibration jobs" in dom, dom[:2000]
