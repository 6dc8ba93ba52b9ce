"""The web page in headless Chromium (Playwright driving the system's Chromium): enter the key, upload
a MedPhantom radiograph, see its preview, ask, read the streamed answer (equal to the engine's), then
a NIfTI volume shows the slice slider, a ZIP is taken as a volume (DICOM slices) or a signal (a WFDB
header) from the names inside it. A screenshot goes to docs/web_page.png (or
$MEDMLLM_WEB_SCREENSHOT).

Needs ``pip install playwright`` and a Chromium: the Debian package (``apt-get install chromium``,
found on PATH) or ``playwright install chromium``. Skipped with the reason when either is missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

API_KEY = "sk-test"
QUESTION = "Is there a pleural effusion?"
SCREENSHOT = Path(os.environ.get("MEDMLLM_WEB_SCREENSHOT", Path(__file__).resolve().parents[2] / "docs" / "web_page.png"))


def _chromium() -> str | None:
    """A Chromium executable: the system's, else Playwright's own download (None when neither)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    try:
        with sync_api.sync_playwright() as p:
            path = p.chromium.executable_path
        return path if path and Path(path).exists() else None
    except Exception:  # noqa: BLE001 - no driver / no browser
        return None


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium found: apt-get install chromium (Debian) or playwright install chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def test_upload_ask_and_read_the_streamed_answer(browser, server, engine, xray_png, tmp_path):
    from medmllm.data.phantoms.writers import write_nifti
    from medmllm.serve.engine import SamplingParams

    png = tmp_path / "chest_xray.png"
    png.write_bytes(xray_png)
    expected = engine.complete([{"role": "user", "content": [{"type": "image", "path": str(png)},
                                                             {"type": "text", "text": QUESTION}]}],
                               SamplingParams(max_tokens=64)).text

    page = browser.new_page(viewport={"width": 1280, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server}/")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("() => document.getElementById('model').textContent.includes('tiny-test')",
                           timeout=15000)

    page.set_input_files("#file", str(png))
    page.wait_for_function("() => { const img = document.getElementById('preview'); "
                           "return img.complete && img.naturalWidth > 0 && !img.hidden; }", timeout=15000)
    assert page.eval_on_selector("#preview", "img => img.naturalWidth") == 64
    assert page.input_value("#kind") == "image"

    page.fill("#question", QUESTION)
    page.click("#ask")
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('done')",
                           timeout=30000)
    answer = page.eval_on_selector(".msg.assistant .body", "el => el.textContent")
    assert answer == expected
    assert "chest_xray.png" in page.inner_text(".msg.user")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))

    # a volume: the preview gets a slice slider over its D slices
    vol = tmp_path / "ct.nii.gz"
    write_nifti(vol, np.random.default_rng(0).normal(40, 60, (7, 24, 24)).astype(np.int16), (2.0, 1.0, 1.0))
    page.set_input_files("#file", str(vol))
    page.wait_for_function("() => !document.getElementById('slice-row').hidden", timeout=15000)
    assert page.input_value("#kind") == "volume"
    assert page.get_attribute("#slice", "max") == "6"

    # a ZIP of DICOM slices is taken as a volume, a ZIP with a WFDB header as a signal
    import zipfile

    from medmllm.data.phantoms.writers import write_dicom_series

    slices = write_dicom_series(tmp_path / "series", np.random.default_rng(1).normal(40, 60, (5, 24, 24))
                                .astype(np.int16), (2.0, 1.0, 1.0), patient_id="WEB-1", uid_seed="web-page")
    zipped = tmp_path / "series.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for f in slices:
            zf.write(f, Path(f).name)
    page.set_input_files("#file", str(zipped))
    page.wait_for_function("() => !document.getElementById('slice-row').hidden && "
                           "document.getElementById('slice').max === '4'", timeout=15000)
    assert page.input_value("#kind") == "volume"
    wfdb_zip = tmp_path / "ecg.zip"
    with zipfile.ZipFile(wfdb_zip, "w") as zf:
        zf.writestr("rec.hea", "rec 1 250 10\nrec.dat 16 200 16 0 0 0 0 I\n")
        zf.writestr("rec.dat", bytes(20))
    page.set_input_files("#file", str(wfdb_zip))
    page.wait_for_function("() => document.getElementById('kind').value === 'signal'", timeout=15000)
    assert errors == []
    page.close()
