"""The page in headless Chromium (the system package, never a downloaded browser): type a prompt,
click Generate, see the video and the VRAM panel; a closed tab does not lose its job; a tab opened
later shows it in the history. Screenshots go to test-artifacts/ for a person to look at."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.apphelpers import running_app, wait_for
from tests.conftest import CHROMIUM

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM or "/usr/bin/chromium",
                                      headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url, wait_until="domcontentloaded", timeout=30_000)
    page.locator("#prompt textarea").wait_for(state="visible", timeout=30_000)
    return page, errors


def test_type_generate_and_watch_the_video_arrive(browser, tmp_path, artifacts_dir: Path):
    with running_app(tmp_path, faults=True, WAN_STUDIO_FAKE_STEP_SECONDS="0.1") as app:
        page, errors = _open(browser, app.url)
        panel = page.locator("#vram-panel")
        # Empty states: the fake backend says what it is, the chart that there are no runs yet.
        assert "Fake backend" in panel.inner_text(timeout=10_000)
        assert "No NVIDIA GPU" not in panel.inner_text()
        assert "No runs yet" in page.locator("#vram-plot-note").inner_text()
        hint = page.locator("#prompt-hint")
        assert hint.inner_text() == "0 / 2,000 characters"

        page.locator("#prompt textarea").fill("A paper boat drifting down a rain gutter")
        wait_for(lambda: hint.inner_text() == "40 / 2,000 characters", 10, 0.1, "the live count")
        page.locator("#generate").click()
        video = page.locator("#video video")
        video.wait_for(state="attached", timeout=30_000)
        wait_for(lambda: video.get_attribute("src"), 30, 0.1, "the video to get a source")
        src = video.get_attribute("src")
        assert "/gradio_api/file=" in src and src.endswith(".mp4")
        status = page.locator("#status")
        wait_for(lambda: "Done:" in status.inner_text(), 15, 0.1, "the status line")
        assert "480x832x49" in status.inner_text()
        assert page.locator("#history img").count() == 1  # a still, not a second video player
        # The panel keeps refreshing (1 s timer) without breaking, and still names the fake backend
        # right after a clip was made; the time column fills in from that run.
        page.wait_for_timeout(1500)
        assert "Fake backend" in panel.inner_text() and "needs one" not in panel.inner_text()
        assert "No runs yet" not in page.locator("#vram-plot-note").inner_text()
        forecast_row = page.locator("#forecast tr", has_text="480×832 · 49 frames")
        wait_for(lambda: "~" in forecast_row.inner_text().split("\t")[-1], 10, 0.2, "the time column")
        page.screenshot(path=str(artifacts_dir / "browser-generate.png"), full_page=True)
        (row,) = app.history()
        assert row["status"] == "done" and row["prompt"] == "A paper boat drifting down a rain gutter"
        assert errors == [], errors

        # A refused Generate keeps the clip and its record; the toast says which kind of trouble.
        src_before = video.get_attribute("src")
        page.locator("#prompt textarea").fill("x" * 2001)
        wait_for(lambda: "refuses" in hint.inner_text(), 10, 0.1, "the over-the-limit hint")
        assert "2,001 / 2,000 characters" in hint.inner_text()
        page.locator("#generate").click()
        toast = page.locator('[data-testid="toast-body"]').last
        toast.wait_for(state="visible", timeout=10_000)
        assert toast.inner_text().split("\n")[-1].startswith("Check your input: The prompt is 2001")
        wait_for(lambda: "Check your input." in status.inner_text(), 10, 0.1, "the failure status")
        assert video.get_attribute("src") == src_before, "the previous video is gone"
        assert "paper boat" in page.locator("#record-view").inner_text()
        assert page.locator("#status .error").is_hidden(), "a bare 'Error' over the status line"
        page.screenshot(path=str(artifacts_dir / "browser-refused.png"), full_page=True)
        assert len(app.history()) == 1

        # Close the tab while a job runs: the job still finishes and is in history.
        app.fault("slow-steps", "0.5")
        page.locator("#prompt textarea").fill("A closed tab must not cancel this")
        page.locator("#generate").click()
        wait_for(lambda: len(app.history()) == 2, 20, 0.05, "the second job to start")
        assert app.history()[1]["status"] == "running"
        page.close()
        app.fault("slow-steps", None)
        wait_for(lambda: app.history()[1]["status"] != "running", 30, 0.1, "the job to finish")
        assert app.history()[1]["status"] == "done"

        # A tab opened afterwards lists both clips (the gallery is read on page load), and clicking
        # the older one plays it and selects it for a re-run.
        page, errors = _open(browser, app.url)
        thumbs = page.locator("#history img")
        wait_for(lambda: thumbs.count() == 2, 15, 0.1, "the history gallery to show both clips")
        first_id = app.history()[0]["id"]
        page.locator("#history button", has_text=f"#{first_id} ·").click()
        selected = page.locator("#selected")
        wait_for(lambda: f"#{first_id}:" in selected.inner_text(), 10, 0.1, "the selection text")
        assert "paper boat" in selected.inner_text()
        wait_for(lambda: (page.locator("#video video").get_attribute("src") or "").endswith(
            Path(app.history()[0]["video_path"]).name), 10, 0.1, "the selected clip in the player")
        page.locator("#restore").click()
        wait_for(lambda: "paper boat" in page.locator("#prompt textarea").input_value(), 10, 0.1,
                 "the prompt to be restored")
        status = page.locator("#status")
        wait_for(lambda: f"Settings of #{first_id} restored" in status.inner_text(), 10, 0.1,
                 "the status line to speak of the restored entry")
        assert "Done:" not in status.inner_text()
        # Run again: the selected entry is made again, with its own seed, as a new entry.
        page.locator("#run-again").click()
        wait_for(lambda: len(app.history()) == 3 and app.history()[2]["status"] == "done", 30, 0.1,
                 "the run again to finish")
        first, again = app.history()[0], app.history()[2]
        assert (again["prompt"], again["seed"], again["preset_requested"]) == (
            first["prompt"], first["seed"], first["preset_requested"])
        page.screenshot(path=str(artifacts_dir / "browser-reopened.png"), full_page=True)

        # Count: one click, two clips with consecutive seeds.
        page.locator("#count input").fill("2")
        page.locator("#seed input").fill("500")
        page.locator("#generate").click()
        wait_for(lambda: len(app.history()) == 5 and app.history()[4]["status"] == "done", 30, 0.1,
                 "the batch")
        assert [r["seed"] for r in app.history()[3:]] == [500, 501]
        wait_for(lambda: "Clip 2 of 2 (seed 501). Done:" in status.inner_text(), 10, 0.1, "the batch status")
        assert errors == [], errors
        page.close()


def test_cancel_withdraws_a_click_still_waiting_for_the_gpu(browser, tmp_path):
    with running_app(tmp_path, faults=True, WAN_STUDIO_FAKE_STEP_SECONDS="0.1") as app:
        app.fault("slow-steps", "2.5")  # the first job holds the GPU for ~10 s
        try:
            first, _ = _open(browser, app.url)
            first.locator("#prompt textarea").fill("The job that holds the GPU")
            first.locator("#generate").click()
            wait_for(lambda: len(app.history()) == 1, 20, 0.05, "the first job to start")

            second, errors = _open(browser, app.url)
            second.locator("#prompt textarea").fill("A click withdrawn while it waits")
            second.locator("#generate").click()
            second.wait_for_timeout(500)  # queued in Gradio behind the first job
            second.locator("#cancel").click()
            status = second.locator("#status")
            wait_for(lambda: "Withdrawn" in status.inner_text(), 10, 0.1, "the withdrawal")
        finally:
            app.fault("slow-steps", None)
        wait_for(lambda: app.history()[0]["status"] == "done", 40, 0.1, "the first job")
        second.wait_for_timeout(2000)  # the withdrawn click's turn comes and goes
        assert [r["prompt"] for r in app.history()] == ["The job that holds the GPU"]
        assert errors == [], errors


def test_a_preview_shows_after_each_step_before_the_clip(browser, tmp_path, artifacts_dir: Path):
    with running_app(tmp_path, faults=True, WAN_STUDIO_FAKE_STEP_SECONDS="0.1") as app:
        app.fault("slow-steps", "0.6")  # ~0.7 s per step: time to look between steps
        page, errors = _open(browser, app.url)
        page.locator("#prompt textarea").fill("A hot-air balloon over a valley at dawn")
        page.locator("#generate").click()
        preview = page.locator("#preview img")
        wait_for(lambda: preview.count() and (preview.first.get_attribute("src") or "").endswith(".gif"),
                 30, 0.05, "the first preview")
        status = page.locator("#status")
        assert "preview after step" in status.inner_text()
        # The preview came before the clip: no video yet.
        assert page.locator("#video video").count() == 0
        first_src = preview.first.get_attribute("src")
        wait_for(lambda: (preview.first.get_attribute("src") or "") != first_src, 15, 0.05,
                 "the preview to update after the next step")
        page.screenshot(path=str(artifacts_dir / "browser-preview.png"), full_page=True)
        app.fault("slow-steps", None)
        video = page.locator("#video video")
        wait_for(lambda: video.count() and video.get_attribute("src"), 30, 0.1, "the clip")
        wait_for(lambda: "Done:" in status.inner_text(), 15, 0.1, "the status line")
        assert errors == [], errors
        page.close()


def test_the_system_tab_shows_the_whole_doctor_table(browser, tmp_path, artifacts_dir: Path):
    with running_app(tmp_path) as app:
        page, errors = _open(browser, app.url)
        page.get_by_role("tab", name="System").click()
        rows = page.locator("#doctor-table table tbody tr")
        wait_for(lambda: rows.count() >= 10, 60, 0.2, "the doctor table")
        for i in range(rows.count()):  # every check is on the page, none hidden in an inner scroll box
            assert rows.nth(i).is_visible()
        table = page.locator("#doctor-table")
        assert table.evaluate("e => e.scrollHeight <= e.clientHeight + 1")
        text = table.inner_text()
        assert "`" not in text and "Weights" in text and "Tiny VAE" in text and "Allocator" in text
        assert "No attention kernel measured on this GPU yet" in page.locator("#kernel-table").inner_text()
        assert page.get_by_role("button", name="Download weights").is_visible()
        assert not page.get_by_role("button", name="Stop download").is_visible()
        page.screenshot(path=str(artifacts_dir / "browser-system-tab.png"), full_page=True)
        assert errors == [], errors


def test_a_preset_that_cannot_run_here_says_wont_fit_and_what_to_free(browser, tmp_path, artifacts_dir: Path):
    # 6 GiB of system RAM: too little even for the low-RAM settings of the smallest preset.
    with running_app(tmp_path, WAN_STUDIO_FAKE_RAM_GIB="6") as app:
        page, errors = _open(browser, app.url)
        panel = page.locator("#forecast")
        wait_for(lambda: "won't fit" in panel.inner_text(), 30, 0.2, "the forecast")
        text = panel.inner_text()
        assert "will step down" not in text and "more system RAM" in text
        assert "480x832x49/low-ram" in text  # the figure names the preset/rung it belongs to
        page.screenshot(path=str(artifacts_dir / "browser-wont-fit.png"), full_page=True)
        assert errors == [], errors
