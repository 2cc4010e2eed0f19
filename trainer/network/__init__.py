"""Adapter networks (LoRA, LoCon, LoHa, LoKr, DoRA) over a ModelBundle, and their kohya file format."""

from trainer.network.adapter import Adapter
from trainer.network.dora import DoRAModule
from trainer.network.kohya_io import load_lora, precalculate_hashes, read_metadata, save_lora, tensor_data_sha256
from trainer.network.loha import LoHaModule
from trainer.network.lokr import LoKrModule
from trainer.network.lora import LoRAModule
from trainer.network.metadata import (
    base_model_version,
    build_metadata,
    build_metadata_fields,
    metadata_from_run,
    write_sidecar,
)
from trainer.network.network import ALGORITHMS, LoadReport, Network, build_network
from trainer.network.patching import remove_all as detach_all
from trainer.network.resume import file_family, load_network_weights, network_from_file
from trainer.network.select import SelectionReport, Target, candidate_targets, select_targets
from trainer.network.spec import ALL, BLOCK_IDS, ELEMENTS, NETWORK_TYPES, NetworkSpec

__all__ = [
    "ALGORITHMS",
    "ALL",
    "BLOCK_IDS",
    "ELEMENTS",
    "NETWORK_TYPES",
    "Adapter",
    "DoRAModule",
    "LoHaModule",
    "LoKrModule",
    "LoRAModule",
    "LoadReport",
    "Network",
    "NetworkSpec",
    "SelectionReport",
    "Target",
    "base_model_version",
    "build_metadata",
    "build_metadata_fields",
    "metadata_from_run",
    "build_network",
    "candidate_targets",
    "detach_all",
    "file_family",
    "load_lora",
    "load_network_weights",
    "network_from_file",
    "precalculate_hashes",
    "read_metadata",
    "save_lora",
    "select_targets",
    "tensor_data_sha256",
    "write_sidecar",
]
