"""The tab in Chromium: preset load, a tiny training run with live progress, queue, stop, plot, modes.

Runs against the standalone app (``conftest.app``); ``scripts/run_browser_tests.sh`` repeats it on
gradio 3.41.2 and 4.40.0. Screenshots land in ``tests/artifacts/<tag>/``.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from trainer.settings import OPTIONAL_GROUPS

pytestmark = pytest.mark.browser
VIEWPORT_H = 1000
# The live loss line is really drawn: an SVG line path with a stroke and a length (gradio 5+), or a canvas
# with a line's worth of coloured pixels (gradio 3.41/4.40 draw on a canvas; the legend alone is < 100 px).
LINE_VISIBLE_JS = """() => { const root = document.querySelector('#tt_live_plot'); if (!root) return false;
  for (const p of root.querySelectorAll('.mark-line path, path.mark-line')) {
    const cs = getComputedStyle(p);
    if (cs.stroke && cs.stroke !== 'none' && parseFloat(cs.strokeWidth) > 0 && p.getTotalLength() > 50) return true; }
  for (const c of root.querySelectorAll('canvas')) {
    try { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
      for (let i = 0; i < d.length; i += 4) { if (d[i + 3] > 0 && Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 80) n++; }
      if (n > 400) return true; } catch (e) { } }
  return false; }"""
TIMEOUT_MS = 300_000
STEPS = 120  # long enough that a 1 s poll sees the run mid-way even on a fast machine
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / os.environ.get("TT_ARTIFACT_TAG", "current")


def _box(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input[type=text], #{elem_id} input:not([type])").first


def reveal(page, elem_id: str) -> None:
    """Open the closed settings group that holds ``elem_id`` (groups start closed)."""
    from trainer.settings import FIELD_BY_ATTR

    f = FIELD_BY_ATTR.get(elem_id.removeprefix("tt_"))
    if f is None or f.group not in OPTIONAL_GROUPS or page.locator(f"#{elem_id}").first.is_visible():
        return
    page.locator(f"#tt_group_{f.group}").locator(".label-wrap, button").first.click()
    page.locator(f"#{elem_id}").first.wait_for(state="visible", timeout=10_000)


def fill(page, elem_id: str, value: str) -> None:
    reveal(page, elem_id)
    box = _box(page, elem_id)
    box.fill(value)
    box.press("Tab")


def choose(page, elem_id: str, value: str) -> None:
    """Pick a dropdown value (typed; every dropdown of the tab accepts custom values)."""
    reveal(page, elem_id)
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(value)
    box.press("Enter")
    page.keyboard.press("Escape")
    page.wait_for_timeout(300)


def message(page) -> str:
    return page.locator("#tt_message textarea").input_value()


def wait_message(page, pattern: str, timeout: int = TIMEOUT_MS) -> str:
    page.wait_for_function(
        "([p]) => { const t = document.querySelector('#tt_message textarea'); return t && new RegExp(p).test(t.value); }",
        arg=[pattern], timeout=timeout)
    return message(page)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_tab(page, name: str) -> None:
    """Click an inner tab's button (``role=tab`` on gradio 4+, ``.tab-nav button`` on 3.41)."""
    tabs = page.locator("button[role=tab], .tab-nav button")
    tabs.filter(has_text=re.compile(f"^\\s*{name}\\s*$")).first.click()


def load_preset(page, name: str) -> None:
    choose(page, "tt_preset", name)
    page.click("#tt_preset_load")
    wait_message(page, f"Loaded preset '{re.escape(name)}'", 30_000)


def tiny_lora(page, app, name: str, iterations: int = 6) -> None:
    """The LoRA preset with a tiny model, a tiny dataset and a few steps."""
    load_preset(page, "LoRA")
    choose(page, "tt_model", "tiny-sd1")
    fill(page, "tt_lora_data_directory", str(app["data"]))
    fill(page, "tt_image_size", "64")
    fill(page, "tt_train_iterations", str(iterations))
    fill(page, "tt_train_batch_size", "1")
    choose(page, "tt_image_buckets_step", "64")
    fill(page, "tt_image_min_length", "64")
    fill(page, "tt_save_lora_name", name)
    reveal(page, "tt_save_overwrite")
    page.locator("#tt_save_overwrite input").check()


def test_start_training_shows_progress_and_result(page, app):
    tiny_lora(page, app, "ui_lora", iterations=STEPS)
    assert _box(page, "tt_train_iterations").input_value() == str(STEPS)
    page.click("#tt_start")
    wait_message(page, "Started 'ui_lora'", 30_000)
    page.wait_for_function(  # a mid-run reading of the live panel...
        "() => { const s = document.querySelector('.tt-progress:not(.tt-finished) #tt_step_text');"
        " return s && /step \\d+ \\//.test(s.textContent); }", timeout=TIMEOUT_MS)
    first = page.locator("#tt_step_text").text_content().strip()
    page.wait_for_function(LINE_VISIBLE_JS, timeout=30_000)  # the loss line is drawn during the run...
    assert "/ " in page.locator("#tt_step_text").text_content() and page.locator(".tt-finished").count() == 0
    shot(page, "train-progress")
    text = wait_message(page, r"ui_lora: Done\. LoRA saved to \S+ui_lora\.safetensors")
    assert "ui_lora.safetensors" in text
    page.wait_for_function("([t]) => document.querySelector('#tt_step_text')?.textContent.trim() === t",
                           arg=[f"step {STEPS} / {STEPS}"], timeout=30_000)
    assert first != f"step {STEPS} / {STEPS}"  # ...that moved on to the end
    assert page.locator("#tt_live_plot canvas, #tt_live_plot svg").count() > 0
    shot(page, "train-done")


def test_preview_images_show_in_the_gallery_during_the_run(page, app):
    assert app["worker"].wait_idle(120)
    tiny_lora(page, app, "ui_preview", iterations=6)
    fill(page, "tt_sample_every_n_steps", "3")
    fill(page, "tt_sample_prompts", "a sample --s 2")
    page.click("#tt_start")
    wait_message(page, "Started 'ui_preview'", 30_000)
    page.wait_for_function("() => document.querySelectorAll('#tt_previews img').length > 0", timeout=TIMEOUT_MS)
    wait_message(page, "ui_preview: Done")
    if app["real"]:  # steps 3 and 6, newest first
        page.wait_for_function("() => document.querySelector('#tt_previews').innerText.includes('step 6')", timeout=30_000)
        record = next(r for r in app["worker"].records() if r.name == "ui_preview")
        assert record.status == "done"
        samples = sorted(app["paths"].logs_root.rglob("ui_preview_*.png"))
        assert [p.name for p in samples] == ["ui_preview_000003_0.png", "ui_preview_000006_0.png"]
    shot(page, "previews")


def test_queue_runs_two_jobs_in_order(page, app):
    worker = app["worker"]
    assert worker.wait_idle(120)
    tiny_lora(page, app, "ui_q1", iterations=4)
    page.click("#tt_queue_add")
    wait_message(page, "Added 'ui_q1' to the queue", 30_000)
    fill(page, "tt_save_lora_name", "ui_q2")
    page.click("#tt_queue_add")
    wait_message(page, "Added 'ui_q2' to the queue", 30_000)
    open_tab(page, "Queue")
    page.wait_for_function("() => document.querySelector('#tt_queue_table') && "
                           "document.querySelector('#tt_queue_table').innerText.includes('ui_q2')", timeout=30_000)
    shot(page, "queue-two-waiting")
    page.click("#tt_queue_run")
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while time.monotonic() < deadline and not all(_status(worker, n) == "done" for n in ("ui_q1", "ui_q2")):
        time.sleep(0.5)
    done_before = sum(1 for r in worker.records() if r.status == "done")
    page.wait_for_function(  # the table shows them done too (polled every second)
        "([n]) => { const t = document.querySelector('#tt_queue_table');"
        " return t && (t.innerText.match(/\\bdone\\b/g) || []).length >= n; }", arg=[done_before], timeout=30_000)
    shot(page, "queue-done")
    done = {r.name: r for r in worker.records() if r.name in ("ui_q1", "ui_q2")}
    assert done["ui_q1"].status == done["ui_q2"].status == "done"
    assert done["ui_q1"].finished <= done["ui_q2"].started


def _status(worker, name: str) -> str | None:
    return next((r.status for r in worker.records() if r.name == name), None)


def test_stop_ends_the_running_job(page, app):
    assert app["worker"].wait_idle(120)
    tiny_lora(page, app, "ui_stop", iterations=400)
    page.click("#tt_start")
    page.wait_for_function(
        "() => { const s = document.querySelector('#tt_step_text'); return s && /step [1-9]/.test(s.textContent); }",
        timeout=TIMEOUT_MS)
    page.click("#tt_stop")  # confirm() is accepted by the page fixture
    text = wait_message(page, "ui_stop: Stopped")
    assert "saved" not in text
    record = next(r for r in app["worker"].records() if r.name == "ui_stop")
    assert record.status == "stopped"
    assert (record.result or {}).get("steps", 400) < 400


def test_plot_tab_draws_a_log(page, app):
    assert app["worker"].wait_idle(120)
    if not list(app["paths"].logs_root.rglob("*.csv")):
        tiny_lora(page, app, "ui_plot", iterations=4)
        page.click("#tt_start")
        wait_message(page, "ui_plot: Done")
    open_tab(page, "Plot")
    page.click("#tt_plot_refresh")
    page.wait_for_timeout(500)
    from trainer.ui.plotdata import log_choices

    newest = log_choices(app["paths"].logs_root)[0]
    choose(page, "tt_plot_log", newest)
    page.wait_for_function(
        "() => document.querySelectorAll('#tt_plot_loss canvas, #tt_plot_loss svg').length > 0 &&"
        " document.querySelector('#tt_plot_info') && document.querySelector('#tt_plot_info').innerText.includes('save_lora_name')",
        timeout=60_000)
    assert page.locator("#tt_plot_lr canvas, #tt_plot_lr svg").count() > 0
    shot(page, "plot-tab")


def _visible(page, elem_id: str) -> bool:
    return page.locator(f"#{elem_id}").first.is_visible()


def _box_of(page, elem_id: str) -> dict:
    return page.locator(f"#{elem_id}").first.bounding_box()


FIRST_SCREEN = {  # per mode: what must be in the first 1400x1000 screen, what must be hidden
    "LoRA": (["tt_lora_data_directory", "tt_save_lora_name", "tt_train_iterations"],
             ["tt_pass2", "tt_prompts", "tt_images", "tt_diff_target_name"]),
    "iLECO": (["tt_prompts", "tt_original_prompt", "tt_negative_prompt"],
              ["tt_pass2", "tt_images", "tt_lora_data_directory", "tt_group_dataset"]),
    "Difference": (["tt_images", "tt_prompts"], ["tt_diff_target_name", "tt_negative_prompt", "tt_lora_data_directory"]),
    "ADDifT": (["tt_images", "tt_prompts"], ["tt_pass2", "tt_lora_data_directory"]),
    "Multi-ADDifT": (["tt_diff_target_name", "tt_lora_data_directory", "tt_prompts"], ["tt_pass2", "tt_images"]),
}


def test_first_screen_at_load(page):
    """Title, Mode, Model, the inputs and Start in the first screen; groups closed; under two screens tall."""
    for elem_id in ("tt_intro", "tt_mode", "tt_model", "tt_lora_data_directory", "tt_start"):
        box = _box_of(page, elem_id)
        assert box and box["y"] >= 0 and box["y"] + box["height"] <= VIEWPORT_H, (elem_id, box)
    for group in OPTIONAL_GROUPS:  # every group is there (LoRA uses them all), and closed:
        assert _visible(page, f"tt_group_{group}"), group
    assert not page.locator("#tt_group_network #tt_network_type").first.is_visible()
    assert not page.locator("#tt_group_optimizer #tt_train_optimizer").first.is_visible()
    height = page.evaluate("() => document.documentElement.scrollHeight")
    assert height < 2 * VIEWPORT_H, height
    assert page.locator("#tt_preset input").first.input_value() == ""  # no preset claimed at load
    shot_viewport(page, "first-screen")


def shot_viewport(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


@pytest.mark.parametrize("mode", list(FIRST_SCREEN))
def test_mode_switch_shows_the_right_groups(page, mode):
    shown, hidden = FIRST_SCREEN[mode]
    page.locator("#tt_mode label", has_text=re.compile(f"^\\s*{re.escape(mode)}\\s*$")).click()
    page.wait_for_function(
        "([ids]) => ids.every(id => { const e = document.getElementById(id); return e && e.offsetParent !== null; })",
        arg=[shown], timeout=30_000)
    for elem_id in hidden:
        assert not _visible(page, elem_id), f"{elem_id} should be hidden in {mode}"
    start = _box_of(page, "tt_start")
    assert start["y"] + start["height"] <= VIEWPORT_H, (mode, start)  # Start stays in the first screen
    if mode == "iLECO":  # the mode's defaults replace values nobody typed (reference README: rank 4, ~500 steps)
        page.wait_for_function("() => document.querySelector('#tt_train_iterations input').value === '500'",
                               timeout=10_000)
        assert page.locator("#tt_network_rank input").first.input_value() == "4"
    shot_viewport(page, f"mode-{mode}")
