// TrainTrain tab helpers. Loaded by the Web-UI on every page (and by the standalone app on gradio >= 4),
// so everything here is defensive: each function checks that its elements exist and does nothing if not.
(function () {
    "use strict";

    // Confirmation before Stop / Stop and Save / Stop all. The buttons' js hook calls this (falling back
    // to window.confirm when this file is not loaded) and passes the answer to Python.
    window.traintrainConfirm = function (message) {
        try {
            return window.confirm(message);
        } catch (e) {
            return true; // no dialog possible (embedded, headless): the Python side still acts on the click
        }
    };

    // Tooltips for the emoji tool buttons (gradio has no common tooltip argument across versions).
    var TIPS = {
        tt_preset_load: "Load the selected preset into the form",
        tt_preset_save: "Save the form as a preset named after save_lora_name (does not start training)",
        tt_preset_refresh: "Re-read the presets folder",
        tt_snapshot_load: "Load the selected settings snapshot from json/",
        tt_snapshot_refresh: "Re-read the json/ folder",
        tt_model_refresh: "Re-list the models",
        tt_vae_refresh: "Re-list the VAEs",
        tt_plot_refresh: "Re-list the CSV logs in logs/"
    };

    function root() {
        return document.getElementById("traintrain_tab") ||
            (window.gradioApp ? window.gradioApp().querySelector("#traintrain_tab") : null);
    }

    function applyTips(scope) {
        Object.keys(TIPS).forEach(function (id) {
            var el = scope.querySelector("#" + id);
            if (el && !el.title) {
                el.title = TIPS[id];
            }
        });
    }

    // After a LoRA is written, ask the Web-UI's Lora cards to refresh (the hidden internal buttons exist
    // only inside A1111/Forge; standalone nothing matches and nothing happens).
    var lastMessage = "";
    function refreshLoraCards(scope) {
        var box = scope.querySelector("#tt_message textarea");
        if (!box || box.value === lastMessage) {
            return;
        }
        lastMessage = box.value;
        if (!/LoRA saved to|saved the LoRA to/.test(lastMessage)) {
            return;
        }
        ["txt2img", "img2img"].forEach(function (tab) {
            var button = document.getElementById(tab + "_lora_extra_refresh_internal") ||
                (window.gradioApp ? window.gradioApp().querySelector("#" + tab + "_lora_extra_refresh_internal") : null);
            if (button) {
                button.click();
            }
        });
    }

    function tick() {
        var scope = root();
        if (!scope) {
            return;
        }
        applyTips(scope);
        refreshLoraCards(scope);
    }

    setInterval(tick, 1000);
})();
