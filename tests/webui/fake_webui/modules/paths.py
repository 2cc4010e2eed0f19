"""Fake ``modules.paths`` (tests point these at tmp folders)."""

script_path = "."
data_path = "."
models_path = "models"
extensions_dir = "extensions"
