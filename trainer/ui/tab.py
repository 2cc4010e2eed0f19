"""The TrainTrain tab: Train / Queue / Plot, one source for the Web-UI and the standalone app.

Widgets are generated from ``FIELDS`` and kept in dicts keyed by field key; handlers receive the values
in the same order and zip them back by key (R22), so adding a setting touches ``settings.py`` only.
The tab talks to the core through the ``Worker`` (submit / stop / queue) and never trains itself.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import gradio as gr

from trainer.errors import TrainTrainError, ValidationError
from trainer.settings import MODES, OPTIONAL_GROUPS, Settings, mode_default
from trainer.ui import compat, form, panels, plotdata
from trainer.ui.form import BLOCKS_KEY, NO_VAE, USE_PASS2_KEY
from trainer.ui.widgets import field_widget

ROOT_ID = "traintrain_tab"
INTRO = ("## TrainTrain — train a LoRA\n"
         "Pick a **Mode** and a **Model**, give the mode its images or prompts, name the LoRA, press "
         "**Start Training**; the run shows below Start. Everything further down is optional.")
MODE_HELP = ("LoRA: a folder of images · iLECO: two prompts, no images · Difference, ADDifT: an image pair "
             "· Multi-ADDifT: a folder of pairs")
MAX_PREVIEWS = 24  # newest previews in the gallery
# traintrain.js defines traintrainConfirm; without it (gradio 3.41 standalone) the browser's confirm is used.
_CONFIRM_JS = "(x) => [window.traintrainConfirm ? window.traintrainConfirm({msg}) : window.confirm({msg})]"


def _confirm_js(message: str) -> str:
    return _CONFIRM_JS.format(msg=json.dumps(message))


def _error_text(err: Exception) -> str:
    """All problems, one line each (R3)."""
    if isinstance(err, ValidationError):
        return "\n".join(str(p) for p in err.problems)
    return str(err)


class TrainTab:
    """Builds the tab and owns its handlers; the worker holds all training state (R21)."""

    def __init__(self, worker: Any, host: Any, *, presets_dir: Path, json_root: Path, logs_root: Path) -> None:
        self.worker, self.host = worker, host
        self.presets_dir, self.json_root, self.logs_root = Path(presets_dir), Path(json_root), Path(logs_root)
        self.first: dict[str, Any] = {}   # pass-1 widgets by field key
        self.second: dict[str, Any] = {}  # pass-2 widgets by field key (incl. use_2nd_pass_settings)
        self.job: dict[str, Any] = {}     # mode, model, vae, prompts, images by field key
        self.ui: dict[str, Any] = {}      # every other component by role

    # ------------------------------------------------------------------ building

    def build(self, css: str | None = None) -> gr.Blocks:
        """Create the Blocks; ``css`` only for the standalone app on gradio < 6."""
        with compat.blocks(css=css) as demo:
            with gr.Column(elem_id=ROOT_ID):
                with gr.Tabs(elem_id="tt_tabs"):
                    with gr.Tab("Train", elem_id="tt_tab_train"):
                        self._build_train()
                    with gr.Tab("Queue", elem_id="tt_tab_queue"):
                        self._build_queue()
                    with gr.Tab("Plot", elem_id="tt_tab_plot"):
                        self._build_plot()
                self.ui["seen"] = gr.State({})
            self._wire(demo)
        return demo

    def _build_train(self) -> None:
        """Top to bottom in the order a user works: what to train on, Start, the run, then the options."""
        ui = self.ui
        gr.Markdown(INTRO, elem_id="tt_intro", elem_classes=["tt-intro"])
        self._build_job_widgets()
        with gr.Row(elem_classes=["tt-columns", "tt-basics"], elem_id="tt_basics"):
            for f in form.group_fields(form.pass1_fields(), "basics"):
                self.first[f.key] = field_widget(f, visible=form.is_visible(f, self.job["mode"].value))
        with gr.Row(elem_classes=["tt-actions"]):
            ui["start"] = gr.Button("Start Training", variant="primary", elem_id="tt_start", scale=3)
            ui["queue_add"] = gr.Button("Add to Queue", elem_id="tt_queue_add", scale=2)
            # train_iterations vs train_epochs × images × repeats, counted from the folder before a run
            ui["steps_count"] = gr.Button("🔢 Count steps", elem_id="tt_steps_count", scale=1)
            ui["stop"] = gr.Button("Stop", variant="stop", elem_id="tt_stop", scale=1)
            ui["stop_save"] = gr.Button("Stop and Save", variant="stop", elem_id="tt_stop_save", scale=1)
            ui["confirm"] = gr.Checkbox(value=False, visible=False, elem_id="tt_confirm")
        ui["steps_info"] = gr.Markdown("", elem_id="tt_steps_info")
        ui["message"] = gr.Textbox(label="Message", lines=1, max_lines=12, interactive=False, elem_id="tt_message")
        with gr.Row(elem_classes=["tt-live"]):
            with gr.Column(scale=2, min_width=320):
                ui["progress"] = gr.HTML(panels.progress_html(None, False, 0), elem_id="tt_progress")
            with gr.Column(scale=3, min_width=320):
                ui["live_plot"] = self._line_plot("Loss", "loss", "tt_live_plot")
        ui["previews"] = compat.gallery("Previews (newest first)", "tt_previews", height=220, visible=False)
        with gr.Row(elem_classes=["tt-presets"]):
            # Empty on load: the form holds the defaults, not any preset (a shown name would claim otherwise).
            ui["preset"] = gr.Dropdown(choices=self._presets(), value=None, label="Preset",
                                       allow_custom_value=True, elem_id="tt_preset", scale=3)
            ui["preset_load"] = compat.tool_button("↙️", "tt_preset_load")
            ui["preset_save"] = compat.tool_button("💾", "tt_preset_save")
            ui["preset_refresh"] = compat.tool_button("🔄", "tt_preset_refresh")
            ui["snapshot"] = gr.Dropdown(choices=self._snapshots(), value=None, label="Settings history (json/)",
                                         allow_custom_value=True, elem_id="tt_snapshot", scale=3)
            ui["snapshot_load"] = compat.tool_button("↙️", "tt_snapshot_load")
            ui["snapshot_refresh"] = compat.tool_button("🔄", "tt_snapshot_refresh")
        self._build_params()

    def _build_job_widgets(self) -> None:
        by_key = {f.key: f for f in form.job_fields()}
        mode = by_key["mode"]
        start_mode = mode.default
        with gr.Row(elem_classes=["tt-models"]):
            self.job["mode"] = gr.Radio(choices=form.mode_choices(), value=mode.default, label=mode.label,
                                        info=MODE_HELP, elem_id="tt_mode", scale=3)
            models = self.host.list_models()
            self.job["model"] = gr.Dropdown(choices=models, value=self.host.default_model() or None,
                                            label=by_key["model"].label, info=by_key["model"].help,
                                            allow_custom_value=True, elem_id="tt_model", scale=2, min_width=200)
            self.ui["model_refresh"] = compat.tool_button("🔄", "tt_model_refresh")
        self.ui["mode_now"] = gr.State(start_mode)  # the mode the form's defaults belong to
        inputs = form.group_fields(form.pass1_fields(), "inputs")
        self.ui["inputs_modes"] = frozenset().union(*(f.modes for f in inputs))
        with gr.Row(visible=start_mode in self.ui["inputs_modes"], elem_id="tt_inputs",
                    elem_classes=["tt-columns"]) as row:
            for f in inputs:
                self.first[f.key] = field_widget(f, visible=form.is_visible(f, start_mode))
        self.ui["inputs"] = row
        for group, widget in (("prompts", "textarea"), ("images", "image")):
            fields = [f for f in form.job_fields() if f.widget == widget]
            modes = frozenset().union(*(f.modes for f in fields)) if fields else frozenset()
            with gr.Group(visible=start_mode in modes, elem_id=f"tt_{group}") as box, gr.Row():
                for f in fields:
                    self.job[f.key] = field_widget(f, visible=form.is_visible(f, start_mode))
            self.ui[group] = box
            self.ui[f"{group}_modes"] = modes

    def _build_params(self) -> None:
        mode = self.job["mode"].value
        family = form.family_of(self.job["model"].value or "", self.host)
        blocks = self._blocks_field()
        choices = form.blocks_for(family, form.widget_value(self._field("network_type"), self._field("network_type").default))
        self.ui["blocks1"] = gr.State(choices)
        gr.Markdown("### Optional settings — every group starts at sensible defaults; its title says what "
                    "you changed", elem_classes=["tt-caption"], elem_id="tt_optional")
        fields = form.pass1_fields()
        for group in OPTIONAL_GROUPS:
            members = form.group_fields(fields, group)
            values = {f.key: form.widget_value(f, mode_default(f.key, mode)) for f in members}
            with gr.Accordion(form.changed_in_group(group, mode, values), open=False,
                              visible=form.group_visible(group, mode), elem_id=f"tt_group_{group}",
                              elem_classes=["tt-group"]) as acc:
                if group == "advanced":  # the checkpoint's own VAE is right for almost everyone
                    self._build_vae()
                self._field_columns(self.first, [f for f in members if f.widget != "checkboxgroup"], 1, mode)
                if any(f.key == BLOCKS_KEY for f in members):
                    self.first[BLOCKS_KEY] = field_widget(blocks, value=list(choices), choices=choices)
            self.ui[f"group_{group}"] = acc
        with gr.Accordion("2nd pass (Difference)", open=False, visible=mode == "Difference",
                          elem_id="tt_pass2") as acc:
            use2 = self._field(USE_PASS2_KEY)
            with gr.Row():
                self.second[USE_PASS2_KEY] = field_widget(use2, pass_index=2)
                self.ui["copy1"] = gr.Button("Copy settings from 1st pass", elem_id="tt2_copy", scale=0,
                                             min_width=220)
            second = [f for f in form.pass2_fields() if f.key != USE_PASS2_KEY and f.widget != "checkboxgroup"]
            self._field_columns(self.second, second, 2, None)
            self.second[BLOCKS_KEY] = field_widget(blocks, pass_index=2, value=list(choices), choices=choices)
            self.ui["blocks2"] = gr.State(choices)
        self.ui["pass2"] = acc

    def _build_vae(self) -> None:
        vae = next(f for f in form.job_fields() if f.key == "vae")
        with gr.Row(elem_classes=["tt-models"]):
            self.job["vae"] = gr.Dropdown(choices=self._vaes(), value=NO_VAE, label=vae.label, info=vae.help,
                                          allow_custom_value=True, elem_id="tt_vae", scale=4)
            self.ui["vae_refresh"] = compat.tool_button("🔄", "tt_vae_refresh")
        te = next(f for f in form.job_fields() if f.key == "te")
        # separate text-encoder files are a standalone matter: a Web-UI trains the model it has loaded
        with gr.Row(elem_classes=["tt-models"], visible=getattr(self.host, "name", "") == "standalone"):
            self.job["te"] = gr.Dropdown(choices=self._text_encoders(), value=NO_VAE, label=te.label, info=te.help,
                                         allow_custom_value=True, elem_id="tt_te", scale=4)
            self.ui["te_refresh"] = compat.tool_button("🔄", "tt_te_refresh")

    def _field_columns(self, target: dict[str, Any], fields: list[Any], pass_index: int, mode: str | None) -> None:
        """``fields`` in three columns of about equal height."""
        with gr.Row(elem_classes=["tt-columns"]):
            for column in form.balanced_columns(fields):
                with gr.Column(min_width=240):
                    for f in column:
                        visible = True if mode is None else form.is_visible(f, mode)
                        value = None if mode is None else form.widget_value(f, mode_default(f.key, mode))
                        target[f.key] = field_widget(f, pass_index=pass_index, visible=visible, value=value)

    def _build_queue(self) -> None:
        ui = self.ui
        ui["queue_table"] = compat.dataframe(panels.QUEUE_HEADERS, "tt_queue_table", label="Jobs")
        with gr.Row(elem_classes=["tt-queue-actions"]):
            ui["queue_job"] = gr.Dropdown(choices=[], label="Job (click a row or pick)", allow_custom_value=True,
                                          elem_id="tt_queue_job", scale=3)
            ui["queue_up"] = gr.Button("⬆ Up", elem_id="tt_queue_up", scale=0, min_width=120)
            ui["queue_down"] = gr.Button("⬇ Down", elem_id="tt_queue_down", scale=0, min_width=120)
            ui["queue_delete"] = gr.Button("🗑 Delete", elem_id="tt_queue_delete", scale=0, min_width=120)
        with gr.Row(elem_classes=["tt-queue-actions"]):
            ui["queue_run"] = gr.Button("▶ Run queue", variant="primary", elem_id="tt_queue_run")
            ui["queue_stop"] = gr.Button("Stop current", variant="stop", elem_id="tt_queue_stop")
            ui["queue_stop_all"] = gr.Button("Stop all", variant="stop", elem_id="tt_queue_stop_all")
        ui["queue_message"] = gr.Textbox(label="Queue message", interactive=False, elem_id="tt_queue_message")

    def _build_plot(self) -> None:
        ui = self.ui
        with gr.Row(elem_classes=["tt-plot-controls"]):
            logs = plotdata.log_choices(self.logs_root)
            ui["plot_log"] = gr.Dropdown(choices=logs, value=None, label="CSV log (logs/, newest first)",
                                         allow_custom_value=True, elem_id="tt_plot_log", scale=4)
            ui["plot_refresh"] = compat.tool_button("🔄", "tt_plot_refresh")
            ui["plot_follow"] = gr.Checkbox(value=True, label="Follow the running job", elem_id="tt_plot_follow")
        ui["plot_info"] = gr.Markdown("", elem_id="tt_plot_info")
        ui["plot_loss"] = self._line_plot("Loss (raw and EMA)", "loss", "tt_plot_loss")
        ui["plot_lr"] = self._line_plot("Learning rate", "learning rate", "tt_plot_lr")

    @staticmethod
    def _line_plot(title: str, y_title: str, elem_id: str) -> gr.LinePlot:
        # No data at first, never an empty frame: gradio 5+ builds the colour scale when a plot first gets
        # data and then only swaps the data in, so a plot born empty drew its lines with no stroke.
        return gr.LinePlot(value=None, x="step", y="value", color="series",
                           title=title, x_title="step", y_title=y_title, elem_id=elem_id,
                           show_label=False)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _field(key: str):
        return next(f for f in form.pass2_fields() + form.pass1_fields() if f.key == key)

    def _blocks_field(self):
        return self._field(BLOCKS_KEY)

    def _presets(self) -> list[str]:
        from trainer.presets import list_presets

        return list_presets(self.presets_dir)

    def _snapshots(self) -> list[str]:
        from trainer.presets import list_snapshots

        return [p.stem for p in list_snapshots(self.json_root)]

    def _vaes(self) -> list[str]:
        return [NO_VAE] + [v for v in self.host.list_vaes() if v not in ("", NO_VAE)]

    def _text_encoders(self) -> list[str]:
        listed = getattr(self.host, "list_text_encoders", lambda: [])()
        return [NO_VAE] + [v for v in listed if v not in ("", NO_VAE)]

    # ------------------------------------------------------------------ value plumbing

    def _inputs(self) -> list[Any]:
        """Every setting widget, in a fixed order: pass 1, pass 2, job."""
        return [*self.first.values(), *self.second.values(), *self.job.values()]

    def _split(self, values: tuple[Any, ...]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Zip handler values back to three dicts by field key."""
        n1, n2 = len(self.first), len(self.second)
        first = dict(zip(self.first, values[:n1], strict=True))
        second = dict(zip(self.second, values[n1:n1 + n2], strict=True))
        job = dict(zip(self.job, values[n1 + n2:], strict=True))
        return first, second, job

    def _settings(self, values: tuple[Any, ...], *, with_images: bool = True) -> Settings:
        first, second, job = self._split(values)
        for key in [k for k, v in job.items() if k in self._image_keys()]:
            job[key] = _save_image(job[key]) if with_images else ""
        return form.settings_from_ui(first, second, job)

    def _image_keys(self) -> list[str]:
        return [f.key for f in form.job_fields() if f.widget == "image"]

    def _load_outputs(self) -> list[Any]:
        keys = [k for k in self.job if k not in self._image_keys()]
        return [*self.first.values(), *self.second.values(), *(self.job[k] for k in keys),
                self.ui["blocks1"], self.ui["blocks2"], self.ui["mode_now"], self.ui["message"]]

    def _apply(self, settings: Settings, note: str, model_now: str | None) -> list[Any]:
        """Updates that show ``settings`` in every widget (preset / snapshot load)."""
        first, second, job = form.widget_values(settings)
        if not settings.model:
            job["model"] = compat.update()  # an empty preset model keeps the current choice (§17 #38)
        family = form.family_of(settings.model or model_now or "", self.host)
        out: list[Any] = []
        chosen = {}
        for values, pass_index in ((first, 1), (second, 2)):
            choices = form.blocks_for(family, values["network_type"])
            blocks = form.narrow_blocks(values[BLOCKS_KEY], self._blocks_field().choices, choices)
            values[BLOCKS_KEY] = compat.update(choices=choices, value=blocks)
            chosen[pass_index] = choices
        out += [first[k] if k == BLOCKS_KEY else compat.update(value=first[k]) for k in self.first]
        out += [second[k] if k == BLOCKS_KEY else compat.update(value=second[k]) for k in self.second]
        for k in self.job:
            if k in self._image_keys():
                continue
            out.append(job[k] if isinstance(job[k], dict) else compat.update(value=job[k]))
        # the loaded mode is the one its values belong to: switching to it must not apply mode defaults
        return [*out, chosen[1], chosen[2], settings.mode, note]

    def _no_change(self, message: str) -> list[Any]:
        return [compat.update() for _ in self._load_outputs()[:-1]] + [message]

    # ------------------------------------------------------------------ handlers

    def on_submit(self, start: bool, *values: Any) -> str:
        was_busy = self.worker.is_busy()
        try:
            settings = self._settings(values)
            record = self.worker.submit(settings, start=start)
        except TrainTrainError as err:
            return _error_text(err)
        queued = sum(1 for r in self.worker.records() if r.status == "queued")
        if start and not was_busy:
            return f"Started '{record.name}' ({record.mode}). Progress below; the result appears here."
        if was_busy:
            return f"Added '{record.name}' to the queue ({queued} waiting); it starts when the running job ends."
        return (f"Added '{record.name}' to the queue ({queued} waiting). Press ▶ Run queue on the Queue tab "
                "to start it.")

    def on_count_steps(self, *values: Any) -> str:
        """The run's length before it starts: ``1200 steps = 10 epochs × 120 batches (…)``."""
        from trainer.modes.dataset import describe_steps

        try:
            return describe_steps(self._settings(values, with_images=False))
        except TrainTrainError as err:
            return _error_text(err)

    def on_save_preset(self, *values: Any) -> tuple[Any, str]:
        from trainer.presets import save_preset

        try:
            settings = self._settings(values, with_images=False)
            path = save_preset(settings, None, self.presets_dir)
        except TrainTrainError as err:
            return compat.update(), _error_text(err)
        return compat.update(choices=self._presets(), value=path.stem), f"Preset saved: {path}"

    def on_load_preset(self, name: str | None, model_now: str | None) -> list[Any]:
        from trainer.presets import load_preset

        if not name:
            return self._no_change("Pick a preset first.")
        try:
            settings, warnings = load_preset(name, self.presets_dir)
        except TrainTrainError as err:
            return self._no_change(_error_text(err))
        return self._apply(settings, "\n".join([f"Loaded preset '{name}'.", *warnings]), model_now)

    def on_load_snapshot(self, name: str | None, model_now: str | None) -> list[Any]:
        from trainer.presets import find_snapshot

        if not name:
            return self._no_change("Pick a settings file first.")
        try:
            path = find_snapshot(name, self.json_root)
            settings, warnings = Settings.from_json_dict(json.loads(path.read_text(encoding="utf-8")))
        except TrainTrainError as err:
            return self._no_change(_error_text(err))
        except (OSError, ValueError) as err:
            return self._no_change(f"{name}: cannot read ({err})")
        return self._apply(settings, "\n".join([f"Loaded settings '{name}'.", *warnings]), model_now)

    def on_mode(self, mode: str, old: str | None, *values: Any) -> list[Any]:
        """Show what ``mode`` uses; move untouched values to its defaults (``form.mode_switch``)."""
        current = dict(zip(self.first, values, strict=True))
        switched = form.mode_switch(old or mode, mode, current) if old and old != mode else {}
        fields = {f.key: f for f in form.pass1_fields()}
        out = []
        for key in self.first:
            change: dict[str, Any] = {"visible": form.is_visible(fields[key], mode)}
            if key in switched:
                change["value"] = switched[key]
            out.append(compat.update(**change))
        out += [compat.update(visible=form.is_visible(f, mode)) for f in form.job_fields()
                if f.key in self.job and f.key not in form.JOB_SPECIAL]
        out += [compat.update(visible=mode in self.ui["inputs_modes"]),
                compat.update(visible=mode in self.ui["prompts_modes"]),
                compat.update(visible=mode in self.ui["images_modes"]),
                compat.update(visible=mode == "Difference")]
        current.update(switched)
        for group in OPTIONAL_GROUPS:
            values_now = {k: current[k] for k in self._group_keys(group)}
            out.append(compat.update(visible=form.group_visible(group, mode),
                                     label=form.changed_in_group(group, mode, values_now)))
        return [*out, mode]

    def _mode_outputs(self) -> list[Any]:
        jobs = [f.key for f in form.job_fields() if f.key in self.job and f.key not in form.JOB_SPECIAL]
        return [*self.first.values(), *(self.job[k] for k in jobs),
                self.ui["inputs"], self.ui["prompts"], self.ui["images"], self.ui["pass2"],
                *(self.ui[f"group_{g}"] for g in OPTIONAL_GROUPS), self.ui["mode_now"]]

    def _group_keys(self, group: str) -> list[str]:
        return [f.key for f in form.group_fields(form.pass1_fields(), group) if f.key in self.first]

    def on_group_values(self, group: str, mode: str, *values: Any) -> Any:
        """The group's accordion title after one of its values changed."""
        values_now = dict(zip(self._group_keys(group), values, strict=True))
        return compat.update(label=form.changed_in_group(group, mode, values_now))

    def on_narrow(self, model: str | None, network_type: str, selected: list[str], old: list[str]):
        choices = form.blocks_for(form.family_of(model or "", self.host), network_type or "lierla")
        if list(old or []) == choices:
            return compat.update(), old
        return compat.update(choices=choices, value=form.narrow_blocks(selected or [], old or [], choices)), choices

    def on_copy(self, old2: list[str], *values: Any) -> list[Any]:
        first = dict(zip(self.first, values[:-1], strict=True))
        copied = form.copy_pass1(first)
        out = []
        for key in self.second:
            if key == BLOCKS_KEY:
                out.append(compat.update(choices=values[-1], value=copied[key]))
            elif key in copied:
                out.append(compat.update(value=copied[key]))
            else:
                out.append(compat.update())  # use_2nd_pass_settings stays as it is
        return [*out, values[-1]]

    def on_stop(self, confirmed: bool, save: bool) -> str:
        if confirmed is False:
            return "Stop cancelled."
        return self.worker.stop(save=save)

    def on_queue_action(self, action: str, choice: str | None, confirmed: bool = True) -> tuple[str, Any]:
        job_id = panels.job_id_of(choice)
        try:
            if action == "run":
                message = self.worker.run_queue()
            elif action == "stop_all":
                message = self.worker.stop_all() if confirmed is not False else "Stop all cancelled."
            elif not job_id:
                message = "Pick a job first (click its row)."
            elif action == "delete":
                self.worker.delete(job_id)
                message, choice = f"Deleted {job_id}.", None
            else:
                self.worker.move(job_id, -1 if action == "up" else 1)
                message = f"Moved {job_id} {action}."
        except (TrainTrainError, KeyError) as err:
            message = f"{job_id}: {err}" if isinstance(err, KeyError) else _error_text(err)
        records = self.worker.records()
        return message, compat.update(value=panels.queue_rows(records)), self._job_dropdown(records, choice)

    @staticmethod
    def _job_dropdown(records, choice):
        choices = [panels.job_choice(r) for r in records]
        job_id = panels.job_id_of(choice)
        value = next((c for c in choices if job_id and c.startswith(job_id + " ")), None)
        return compat.update(choices=choices, value=value)

    def on_row_select(self, evt: gr.SelectData):
        records = self.worker.records()
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if not isinstance(row, int) or not 0 <= row < len(records):
            return compat.update()
        return self._job_dropdown(records, records[row].job_id)

    def on_plot_log(self, name: str | None):
        if not name:
            return compat.update(), compat.update(), ""
        try:
            path = plotdata.resolve_log(self.logs_root, name)
            header, loss, lr = plotdata.frames_from_log(path)
        except TrainTrainError as err:
            return compat.update(), compat.update(), _error_text(err)
        info = " · ".join(f"{k}: {v}" for k, v in header.items() if v)
        return compat.update(value=plot_value(loss)), compat.update(value=plot_value(lr)), info

    def poll(self, seen: dict[str, Any] | None, follow: bool):
        """Every second: progress panel, live curve, result message, queue table, followed plot, previews."""
        # gradio 3.x re-runs an ``every=`` poll with its first inputs, so there the same dict object is
        # mutated to remember what this page was shown; gradio 5+ needs a new object to store the State.
        seen = seen if isinstance(seen, dict) else {}
        if compat.GR_MAJOR >= 5:
            seen = dict(seen)
        records = self.worker.records()
        busy = self.worker.is_busy()
        queued = sum(1 for r in records if r.status == "queued")
        notes = self.worker.messages() if hasattr(self.worker, "messages") else []
        progress = self.worker.progress()
        last = panels.latest_finished(records)
        if not busy and last is not None:
            panel = panels.finished_html(last, history_last(self.worker.history()), queued)
        else:
            panel = panels.progress_html(progress, busy, queued, notes[-1] if notes else "")
        history = self.worker.history()
        key = (progress.job_id if progress else seen.get("job"), len(history))
        curve = curve_loss = curve_lr = compat.update()
        if list(key) != seen.get("curve"):
            loss, lr = plotdata.frames_from_history(history)
            curve = compat.update(value=plot_value(loss))
            if follow and history:
                curve_loss, curve_lr = compat.update(value=plot_value(loss)), compat.update(value=plot_value(lr))
            seen["curve"], seen["job"] = list(key), key[0]
        message = compat.update()
        shown = [last.job_id, last.status] if last is not None else None
        if "reported" not in seen:
            seen["reported"] = shown  # a freshly opened page: the panel shows the old result, the box stays free
        elif last is not None and seen["reported"] != shown:
            message, seen["reported"] = panels.result_line(last), shown
        gallery = compat.update()
        previews = self.worker.previews()[:MAX_PREVIEWS]
        shown_previews = [e.path for e in previews]
        if shown_previews != seen.get("previews", []):
            # the gallery takes room only once there is something to show
            items = gallery_items(previews)
            gallery, seen["previews"] = compat.update(value=items, visible=bool(items)), shown_previews
        table, jobs, logs = compat.update(), compat.update(), compat.update()
        rows = panels.queue_rows(records)
        if rows != seen.get("rows"):
            table, seen["rows"] = compat.update(value=rows), rows
            jobs = compat.update(choices=[panels.job_choice(r) for r in records])
            logs = compat.update(choices=plotdata.log_choices(self.logs_root))  # a new run, a new log
        status, queue_text = panels.queue_status(records), compat.update()
        if status != seen.get("queue_status"):
            queue_text, seen["queue_status"] = status, status
        return panel, curve, message, table, jobs, curve_loss, curve_lr, gallery, queue_text, logs, seen

    # ------------------------------------------------------------------ wiring

    def _wire(self, demo: gr.Blocks) -> None:
        ui, inputs = self.ui, self._inputs()
        ui["start"].click(lambda *v: self.on_submit(True, *v), inputs=inputs, outputs=[ui["message"]])
        ui["queue_add"].click(lambda *v: self.on_submit(False, *v), inputs=inputs, outputs=[ui["message"]])
        ui["stop"].click(lambda c: self.on_stop(c, False), inputs=[ui["confirm"]], outputs=[ui["message"]],
                         **compat.js_kwargs(_confirm_js("Stop the running job?")))
        ui["stop_save"].click(lambda c: self.on_stop(c, True), inputs=[ui["confirm"]], outputs=[ui["message"]],
                              **compat.js_kwargs(_confirm_js("Stop the running job and save what it learned?")))
        ui["preset_save"].click(self.on_save_preset, inputs=inputs, outputs=[ui["preset"], ui["message"]])
        ui["steps_count"].click(self.on_count_steps, inputs=inputs, outputs=[ui["steps_info"]])
        ui["preset_refresh"].click(lambda: compat.update(choices=self._presets()), outputs=[ui["preset"]])
        ui["preset_load"].click(self.on_load_preset, inputs=[ui["preset"], self.job["model"]],
                                outputs=self._load_outputs())
        ui["snapshot_refresh"].click(lambda: compat.update(choices=self._snapshots()), outputs=[ui["snapshot"]])
        ui["snapshot_load"].click(self.on_load_snapshot, inputs=[ui["snapshot"], self.job["model"]],
                                  outputs=self._load_outputs())
        ui["model_refresh"].click(lambda: compat.update(choices=self.host.list_models()), outputs=[self.job["model"]])
        ui["vae_refresh"].click(lambda: compat.update(choices=self._vaes()), outputs=[self.job["vae"]])
        ui["te_refresh"].click(lambda: compat.update(choices=self._text_encoders()), outputs=[self.job["te"]])
        self.job["mode"].change(self.on_mode, inputs=[self.job["mode"], ui["mode_now"], *self.first.values()],
                                outputs=self._mode_outputs())
        for group in OPTIONAL_GROUPS:
            members = [self.first[k] for k in self._group_keys(group)]
            for widget in members:
                widget.change(lambda m, *v, g=group: self.on_group_values(g, m, *v),
                              inputs=[self.job["mode"], *members], outputs=[ui[f"group_{group}"]], **compat.QUIET)
        for target, state in ((self.first, ui["blocks1"]), (self.second, ui["blocks2"])):
            narrow_in = [self.job["model"], target["network_type"], target[BLOCKS_KEY], state]
            narrow_out = [target[BLOCKS_KEY], state]
            target["network_type"].change(self.on_narrow, inputs=narrow_in, outputs=narrow_out)
            self.job["model"].change(self.on_narrow, inputs=narrow_in, outputs=narrow_out)
        ui["copy1"].click(self.on_copy, inputs=[ui["blocks2"], *self.first.values(), ui["blocks1"]],
                          outputs=[*self.second.values(), ui["blocks2"]])
        self._wire_queue()
        ui["plot_refresh"].click(lambda: compat.update(choices=plotdata.log_choices(self.logs_root)),
                                 outputs=[ui["plot_log"]])
        ui["plot_log"].change(self.on_plot_log, inputs=[ui["plot_log"]],
                              outputs=[ui["plot_loss"], ui["plot_lr"], ui["plot_info"]])
        compat.poll(1.0, self.poll, inputs=[ui["seen"], ui["plot_follow"]],
                    outputs=[ui["progress"], ui["live_plot"], ui["message"], ui["queue_table"], ui["queue_job"],
                             ui["plot_loss"], ui["plot_lr"], ui["previews"], ui["queue_message"], ui["plot_log"],
                             ui["seen"]], demo=demo)

    def _wire_queue(self) -> None:
        ui = self.ui
        outs = [ui["queue_message"], ui["queue_table"], ui["queue_job"]]
        for action in ("up", "down", "delete", "run"):
            ui[f"queue_{action}"].click(lambda c, a=action: self.on_queue_action(a, c), inputs=[ui["queue_job"]],
                                        outputs=outs)
        ui["queue_stop"].click(lambda c: (self.on_stop(c, False), compat.update(), compat.update()),
                               inputs=[ui["confirm"]], outputs=outs,
                               **compat.js_kwargs(_confirm_js("Stop the running job?")))
        ui["queue_stop_all"].click(lambda c: self.on_queue_action("stop_all", None, c), inputs=[ui["confirm"]],
                                   outputs=outs,
                                   **compat.js_kwargs(_confirm_js("Stop the running job and cancel every queued job?")))
        ui["queue_table"].select(self.on_row_select, outputs=[ui["queue_job"]])


def gallery_items(previews: list[Any]) -> list[tuple[Any, str]]:
    """(image, caption) pairs for the gallery. Images are handed over loaded, not as paths: gradio 4+
    serves only files under its allowed folders, and the logs folder need not be one."""
    from PIL import Image

    items = []
    for event in previews:
        try:
            with Image.open(event.path) as image:
                items.append((image.convert("RGB"), panels.preview_caption(event)))
        except OSError:  # deleted meanwhile: leave it out
            continue
    return items


def plot_value(frame: Any) -> Any:
    """A curve for a LinePlot: None while it has no points (see ``_line_plot``)."""
    return None if frame is None or len(frame) == 0 else frame


def history_last(history: list[dict[str, float]]) -> dict[str, float]:
    """The last logged row of the live history ({} when none)."""
    return history[-1] if history else {}


def _save_image(image: Any) -> str:
    """A UI image (PIL, numpy or a path) as a temp PNG path; the worker copies it into the job folder."""
    if image is None or image == "":
        return ""
    path = compat.file_path(image) if isinstance(image, (str, os.PathLike, dict)) else None
    if path:
        return path
    from PIL import Image

    if not isinstance(image, Image.Image):
        import numpy as np

        image = Image.fromarray(np.asarray(image))
    folder = Path(tempfile.gettempdir()) / "traintrain_ui"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{uuid.uuid4().hex}.png"
    image.save(target, format="PNG")
    return str(target)


def build_tab(worker: Any, host: Any, *, presets_dir: Path, json_root: Path, logs_root: Path,
              css: str | None = None) -> gr.Blocks:
    """Build the TrainTrain tab.

    Args:
        worker: the ``trainer.jobs.Worker`` that runs jobs.
        host: the ``Host`` (model/VAE lists, default model).
        presets_dir: ``presets/`` folder.
        json_root: settings snapshot root (``json/``).
        logs_root: CSV log root (``logs/``); the Plot tab opens nothing outside it.
        css: style sheet text, standalone app on gradio < 6 only (the Web-UI loads ``style.css`` itself).

    Returns:
        The Blocks; the Web-UI registers it as a tab, the standalone app launches it.
    """
    return TrainTab(worker, host, presets_dir=presets_dir, json_root=json_root, logs_root=logs_root).build(css)


__all__ = ["MODES", "ROOT_ID", "TrainTab", "build_tab"]
