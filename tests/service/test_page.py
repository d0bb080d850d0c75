"""The web page at / and the offline /docs.

Fast tier (in process): the page and its files are served from the package with no external
URL in them, need no API key while what they fetch does, and the OpenAPI fields carry
descriptions. Integration tier: Debian's ``chromium`` driven headless by Selenium through
``chromium-driver`` (scripts/setup installs both) against a real server on loopback, with every
host but 127.0.0.1 unresolvable: type the API key, upload an ID and an OOD image, check what
the page shows, and that /docs renders Swagger UI from local files only. Screenshots go to
``$HOPGATE_SCREENSHOTS`` when set (``docs/screenshots`` holds the committed ones), else to the
test's tmp dir.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import in_process, serve
from inputs import encode

from hopgate.service.routes.page import STATIC

KEY = "s3cret"
EXTERNAL = re.compile(r"\b(?:https?|wss?|ftp):|(?:src|href|url)\s*[=(]\s*[\"']?//", re.I)


# --- fast tier -----------------------------------------------------------------------------

def test_the_page_has_no_external_url():
    files = sorted(STATIC.glob("*"))
    assert {f.name for f in files} >= {"index.html", "page.js", "page.css"}
    for f in files:
        assert not EXTERNAL.search(f.read_text()), f.name


@pytest.mark.anyio
async def test_the_page_is_open_and_what_it_fetches_needs_the_key(anyio_backend):
    async with in_process(api_key=KEY) as c:
        page = await c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for src in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
            assert (await c.get(src)).status_code == 200, src  # its own files, no key
        for path in ("/static/swagger/swagger-ui-bundle.js", "/static/swagger/swagger-ui.css"):
            assert (await c.get(path)).status_code == 200, path
        for path in ("/page/model", "/memories/0", "/docs", "/openapi.json"):
            assert (await c.get(path)).status_code == 401, path
        r = await c.get("/page/model", headers={"x-api-key": KEY})
        doc = r.json()
        assert r.status_code == 200 and doc["memories"] == 100 and doc["exemplars"]
        assert doc["score_quantiles"] == sorted(doc["score_quantiles"])
        assert doc["score_quantiles"][0] < doc["threshold"] < doc["score_quantiles"][-1]
        docs = await c.get("/docs", headers={"x-api-key": KEY})
        assert "/static/swagger/swagger-ui-bundle.js" in docs.text
        assert not EXTERNAL.search(docs.text)


@pytest.mark.anyio
async def test_the_openapi_fields_have_descriptions(anyio_backend):
    async with in_process() as c:
        schemas = (await c.get("/openapi.json")).json()["components"]["schemas"]
    for name in ("ImageResult", "Memory", "ModelInfo", "ErrorInfo", "MemoryInfo", "PageModel"):
        bare = [k for k, v in schemas[name]["properties"].items() if not v.get("description")]
        assert not bare, (name, bare)


# --- integration tier: a real Chromium -------------------------------------------------------

def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/setup)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,1500", "--host-resolver-rules=MAP * ~NOTFOUND, "
                "EXCLUDE 127.0.0.1", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(driver))


@pytest.fixture
def browser(monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager never downloads anything
    b = _browser()
    try:
        yield b
    finally:
        b.quit()


def _wait(browser, script: str, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(
        lambda b: b.execute_script(script))


def _external_requests(browser, origin: str) -> list[str]:
    names = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
        ".concat([location.href])")
    return [n for n in names if not n.startswith((origin, "blob:", "data:"))]


@pytest.mark.integration
def test_the_page_in_chromium(tmp_path, browser, fashion, direct):
    shots = Path(os.environ.get("HOPGATE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    flags = direct(fashion.images[:20])["is_ood"]
    id_image = fashion.images[int(np.flatnonzero(~flags)[0])]
    noise = np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    id_png, ood_png = tmp_path / "shirt-or-shoe.png", tmp_path / "noise.png"
    id_png.write_bytes(encode(id_image, size=112))
    ood_png.write_bytes(encode(noise))
    from selenium.webdriver.common.by import By

    with serve(tmp_path, api_key=KEY) as server:
        with server.client(headers={"x-api-key": KEY}) as c:  # what the page must show
            want = [c.post("/score", content=p.read_bytes(),
                           headers={"content-type": "image/png"}).json()["results"][0]
                    for p in (id_png, ood_png)]
        assert [w["ood"] for w in want] == [False, True]
        browser.get(server.url + "/")
        _wait(browser, "return !document.getElementById('key-form').hidden")  # asks for it
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        _wait(browser, "return document.getElementById('key-form').hidden")
        _wait(browser, "return document.getElementById('model').textContent.includes('100 "
                       "memories')")
        browser.find_element(By.ID, "files").send_keys(f"{ood_png}\n{id_png}")
        _wait(browser, "return document.querySelectorAll('.result.id, .result.ood').length == 2")
        _wait(browser, "const imgs = [...document.querySelectorAll('.result.id .memory img')];"
                       "return imgs.length > 0 && imgs.every(i => i.complete && "
                       "i.naturalWidth > 0)")
        _wait(browser, "return document.getElementById('live-ood').textContent.includes('%')"
                       " && /[0-9]/.test(document.getElementById('live-rate').textContent)")
        cards = browser.execute_script("""
            return [...document.querySelectorAll('.result')].map(c => ({
              cls: c.className, verdict: c.querySelector('.verdict').textContent,
              score: c.querySelector('.score').textContent,
              p: c.querySelector('.p-value').textContent, text: c.textContent,
              threshold_x: +c.querySelector('svg line.threshold').getAttribute('x1'),
              score_x: +c.querySelector('svg line.marker').getAttribute('x1'),
              thumbs: [...c.querySelectorAll('.memory img')].map(i => i.naturalWidth),
              memories: c.querySelectorAll('.memory').length}))""")
        by_kind = {("ood" if "ood" in c["cls"] else "id"): c for c in cards}
        for kind, w in zip(("id", "ood"), want):
            card = by_kind[kind]
            assert card["score"] == f"{w['score']:.2f}" and card["p"] == f"{w['p_value']:.3f}"
            assert w["label"] in card["text"]
        shown_id, shown_ood = by_kind["id"], by_kind["ood"]
        assert shown_id["verdict"].startswith("ID") and shown_ood["verdict"].startswith("OOD")
        assert shown_id["score_x"] > shown_id["threshold_x"] > shown_ood["score_x"]
        assert shown_id["memories"] == len(want[0]["memories"]) >= 1
        assert shown_id["thumbs"] and all(w == 28 for w in shown_id["thumbs"])
        assert "guess" in shown_ood["text"] and shown_ood["memories"] == 0
        assert browser.find_element(By.ID, "live-ood").text == "50.0 %"
        psi = browser.find_element(By.ID, "live-psi").text
        assert psi == "\u2013" or float(psi) >= 0  # shown when the server exports drift
        assert _external_requests(browser, server.url) == []
        browser.execute_script(  # a dropped file (an exemplar of memory 3) goes the same way
            "fetch('/memories/3/exemplars/0.png', {headers: {'X-API-Key': arguments[0]}})"
            ".then(r => r.blob()).then(b => { const t = new DataTransfer();"
            "t.items.add(new File([b], 'dropped.png', {type: 'image/png'}));"
            "document.getElementById('drop').dispatchEvent("
            "new DragEvent('drop', {dataTransfer: t, bubbles: true, cancelable: true})); })",
            KEY)
        _wait(browser, "const c = document.querySelector('.result');"
                       "return c.textContent.includes('dropped.png') && c.matches('.id') &&"
                       "[...c.querySelectorAll('.memory img')].some(i => i.naturalWidth > 0)")
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(shots / "page.png"))

        # /docs: Swagger UI from local files (the key goes in a header, as a proxy would add)
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"X-API-Key": KEY}})
        browser.get(server.url + "/docs")
        _wait(browser, "return [...document.querySelectorAll('.opblock-summary-path')]"
                       ".some(e => e.textContent.includes('/memories/{index}'))")
        title = browser.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text
        assert title.startswith("hopgate")
        assert _external_requests(browser, server.url) == []
        browser.execute_script(  # the picture: a memory route opened, its fields described
            "const op = [...document.querySelectorAll('.opblock-summary-path')].find(e => "
            "e.textContent.trim() == '/memories/{index}'); op.click(); "
            "op.scrollIntoView();")
        _wait(browser, "return document.querySelector('.opblock.is-open .responses-table')")
        browser.save_screenshot(str(shots / "docs.png"))
