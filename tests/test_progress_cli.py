"""The CLI progress bar: once a pass is finished, later lines print plainly instead of redrawing the bar."""

from __future__ import annotations

import io

from trainer.progress import Message, ProgressEvent, RunSummary, TqdmSink


def test_lines_after_the_last_step_do_not_redraw_the_finished_bar():
    buf = io.StringIO()
    sink = TqdmSink(file=buf)
    sink.on_event(RunSummary(mode="LoRA", pass_index=1, total_steps=3, batch_size=1))
    for step in (1, 2, 3):
        sink.on_event(ProgressEvent(step, 3, 0.5, 0.5, {"unet": 1e-4}, 1, 0.1 * step, 0.1))
    sink.on_event(Message("info", "saved x"))
    sink.on_event(Message("info", "effect y"))
    sink.close()
    text = buf.getvalue()
    # the bar is closed at step 3/3, so the two lines follow it once, in the same stream
    assert text.endswith("saved x\neffect y\n")
    assert text.rfind("3/3") < text.index("saved x")
