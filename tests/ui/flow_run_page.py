"""Open a flow run's page in the Prefect UI with headless Chromium and take a screenshot.

Used by tests/test_server_ui.py; also runnable by hand against any server:

    python tests/ui/flow_run_page.py http://127.0.0.1:4200 FLOW_RUN_ID batch-batch np2torch-batch-summary shot.png [ROW_TEXT]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "chromium_path", "capture_flow_run_page"]

CHROMIUM = "/usr/bin/chromium"  # Debian's `chromium` package; Playwright drives it, it downloads no browser
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    """The Chromium binary to drive, or None when it is not installed."""
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    return shutil.which("chromium") or shutil.which("chromium-browser")


def capture_flow_run_page(ui_url: str, flow_run_id: str, run_name: str, artifact_key: str, screenshot: Path, *,
                          row_text: str | None = None, timeout_ms: int = 60_000) -> dict[str, Any]:
    """Load /runs/flow-run/<id>, wait for the run's name, open its Artifacts tab and wait for the
    artifact's key; save a full-page screenshot. With ``row_text``, open the artifact too, wait
    for that text in its table and save ``<screenshot stem>-artifact.png``. Returns what was
    seen and the screenshot paths; Playwright's TimeoutError names any text that never showed."""
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError(f"no Chromium at {CHROMIUM}; install it with `apt-get install -y chromium`")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    seen: dict[str, Any] = {"run_name": False, "artifact": False, "row": None, "screenshots": []}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(timeout_ms)
        try:
            page.goto(f"{ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}", wait_until="domcontentloaded")
            page.get_by_text(run_name, exact=True).first.wait_for(state="visible")
            seen["run_name"] = True
            page.locator("li.p-tab", has_text="Artifacts").first.click()  # the UI's tabs are <li class="p-tab">
            card = page.get_by_text(artifact_key, exact=True).first
            card.wait_for(state="visible")
            seen["artifact"] = True
            page.screenshot(path=str(screenshot), full_page=True)
            seen["screenshots"].append(str(screenshot))
            if row_text is not None:
                card.click()
                page.get_by_text(row_text, exact=True).first.wait_for(state="visible")
                seen["row"] = row_text
                shot = screenshot.with_name(f"{screenshot.stem}-artifact.png")
                page.screenshot(path=str(shot), full_page=True)
                seen["screenshots"].append(str(shot))
        except Exception:
            failed = screenshot.with_name(f"{screenshot.stem}-failed.png")  # what the page showed instead
            page.screenshot(path=str(failed), full_page=True)
            seen["screenshots"].append(str(failed))
            raise
        finally:
            browser.close()
    return seen


if __name__ == "__main__":
    url, run_id, name, key, out, *row = sys.argv[1:]
    print(capture_flow_run_page(url, run_id, name, key, Path(out), row_text=row[0] if row else None))
