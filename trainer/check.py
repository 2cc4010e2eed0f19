"""``python -m trainer check LORA.safetensors --model NAME|PATH [--json OUT]``.

Reports what a LoRA file is (family, type, rank, metadata), how its keys map onto the model's modules
(matched / unmatched), and its effect: the relative change of the U-Net output at multiplier 1 (and
−1) against 0 on fixed inputs. A near-zero or NaN effect is flagged: "this LoRA changes nothing".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

EFFECT_FLOOR = 1e-4


def check_lora(path: str | Path, bundle, *, size_px: int = 512, prompt: str = "") -> dict[str, Any]:
    """Inspect a LoRA file against a loaded model and measure its effect.

    Returns:
        A JSON-ready report; ``warnings`` holds anything the user must not miss.
    """
    import torch

    from trainer.effect import measure_effect
    from trainer.network import load_lora, network_from_file

    state_dict, metadata = load_lora(path)
    network = network_from_file(bundle, path, device=bundle.device)
    report = network.load_report if getattr(network, "load_report", None) is not None else None
    file_modules = {key.partition(".")[0] for key in state_dict}
    matched = set(network.adapters) if hasattr(network, "adapters") else set()
    aliases = {a for t in getattr(network, "targets", ()) for a in (t.kohya_name, *getattr(t, "aliases", ()))}
    unmatched = sorted(m for m in file_modules if m not in matched and m not in aliases)
    algos = Counter(type(a).__name__ for a in getattr(network, "adapters", {}).values())
    side = max(size_px // bundle.vae_scale_factor, 8)
    network.attach()
    try:
        with torch.no_grad():
            cond = bundle.encode_prompts([prompt or metadata.get("traintrain_original_prompt", "")])
        effects = {m: measure_effect(bundle, network, cond, latent_hw=(side, side), multiplier=m) for m in (1.0, -1.0)}
    finally:
        network.detach()
    warnings = []
    if unmatched:
        warnings.append(f"{len(unmatched)} module(s) in the file match nothing in this model: {', '.join(unmatched[:5])}")
    if not all(math.isfinite(e) for e in effects.values()):
        warnings.append("the effect is NaN: this LoRA is broken")
    elif max(effects.values()) < EFFECT_FLOOR:
        warnings.append(f"this LoRA changes nothing (effect {effects[1.0]:.2g})")
    spec = network.spec
    return {
        "file": str(path),
        "model": bundle.name,
        "family": bundle.family.value,
        "file_base_model": metadata.get("ss_base_model_version", "unknown"),
        "network_type": spec.network_type,
        "rank": spec.rank,
        "alpha": spec.alpha,
        "conv_rank": spec.conv_rank,
        "modules_in_file": len(file_modules),
        "matched": len(matched),
        "unmatched": unmatched,
        "algorithms": dict(algos),
        "load_report": None if report is None else {k: list(v) for k, v in dataclasses.asdict(report).items()},
        "effect": effects[1.0],
        "effect_negative": effects[-1.0],
        "metadata": {k: v for k, v in metadata.items() if not k.startswith("ss_tag_frequency")},
        "warnings": warnings,
    }


def summary_line(result: dict[str, Any]) -> str:
    """One line a user reads first: verdict, what the file is, how it matched, its effect and what that means.

    ``OK my.safetensors: sd1 lierla rank 16 · 264/264 modules matched · effect 0.35 (training: 0.41) — Effect = …``
    """
    from trainer.settings import EFFECT_MEANING

    verdict = "PROBLEM" if result["warnings"] else "OK"
    trained = result.get("metadata", {}).get("traintrain_effect")
    at_training = f" (training measured {trained} on its own probe)" if trained else ""
    return (f"{verdict} {Path(result['file']).name}: {result['family']} {result['network_type']} rank "
            f"{result['rank']} · {result['matched']}/{result['modules_in_file']} modules matched · effect "
            f"{result['effect']:.3g}{at_training}. {EFFECT_MEANING}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer check", description=__doc__.splitlines()[0])
    parser.add_argument("lora")
    parser.add_argument("--model", required=True)
    parser.add_argument("--vae")
    parser.add_argument("--size", type=int, default=512, help="probe size in pixels")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--device")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    from trainer.hosts.standalone import StandaloneHost

    host = StandaloneHost(device=args.device)
    with host.acquire(args.model, args.vae or "", precision="fp32", v_pred=None) as bundle:
        result = check_lora(args.lora, bundle, size_px=args.size, prompt=args.prompt)
    text = json.dumps(result, indent=2, default=str)
    print(summary_line(result))  # the answer first; the full report follows
    print(text)
    for warning in result["warnings"]:
        print(f"WARNING: {warning}")
    if args.json:
        from trainer.paths import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    return 1 if result["warnings"] else 0
