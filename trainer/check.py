"""``python -m trainer check LORA.safetensors --model NAME|PATH [--json OUT]``.

Reports what a LoRA file is (family, type, rank, metadata), how its keys map onto the model's modules
(matched / unmatched), and its report card (trainer/report.py): efficacy, specificity and health,
measured exactly as training measured them (the probe is stored in the file's metadata). A file from
elsewhere gets the health and the neighbour drift around ``--prompt`` on a ``--size`` probe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any


def file_probe(metadata: dict[str, str], *, size_px: int, prompt: str, neighbours: str = "",
               images_dir: str | Path | None = None):
    """The file's stored probe, or a generic one (own prompt, built-in neighbours) for foreign files."""
    from trainer.report import Probe, neighbour_prompts, probe_timesteps

    if metadata.get("traintrain_report_probe"):
        return Probe.from_json(metadata["traintrain_report_probe"], roots=(images_dir,) if images_dir else ())
    own = prompt or metadata.get("traintrain_original_prompt", "")
    return Probe("prompt", metadata.get("traintrain_mode", "unknown"), (size_px, size_px), probe_timesteps(0, 1000),
                 prompt=own, neighbours=neighbour_prompts(neighbours, exclude=(own,)))


def check_lora(path: str | Path, bundle, *, size_px: int = 512, prompt: str = "",
               images_dir: str | Path | None = None) -> dict[str, Any]:
    """Inspect a LoRA file against a loaded model and measure its report card.

    Args:
        images_dir: where the training images are (the file stores only their folder and file names);
            also looked up in the working folder.

    Returns:
        A JSON-ready report; ``report`` is the card, ``warnings`` holds anything the user must not miss.
    """
    from trainer.errors import InputError
    from trainer.network import load_lora, network_from_file
    from trainer.report import card_precision, measure

    state_dict, metadata = load_lora(path)
    network = network_from_file(bundle, path, device=bundle.device)
    report = network.load_report if getattr(network, "load_report", None) is not None else None
    file_modules = {key.partition(".")[0] for key in state_dict}
    matched = set(network.adapters) if hasattr(network, "adapters") else set()
    aliases = {a for t in getattr(network, "targets", ()) for a in (t.kohya_name, *getattr(t, "aliases", ()))}
    unmatched = sorted(m for m in file_modules if m not in matched and m not in aliases)
    algos = Counter(type(a).__name__ for a in getattr(network, "adapters", {}).values())
    probe = file_probe(metadata, size_px=size_px, prompt=prompt, images_dir=images_dir)
    warnings = []
    stored = metadata.get("traintrain_report_dtype")
    if stored and stored != card_precision(bundle)[0]:
        warnings.append(f"the card in the file was measured with the model in {stored}, this check in "
                        f"{card_precision(bundle)[0]}: the numbers differ slightly (python -m trainer check loads "
                        "the model in the file's precision)")
    network.attach()
    try:
        try:
            card = measure(bundle, network, probe, state_dict)
        except InputError as err:  # the training images moved: health and drift still tell a lot
            warnings.append(f"{err}; measured without the images (efficacy unknown); "
                            "pass --images DIR (the folder that holds the training images' folder)")
            own = (probe.captions or [probe.prompt])[0]
            card = measure(bundle, network, file_probe({}, size_px=size_px, prompt=prompt or own), state_dict)
    finally:
        network.detach()
    if unmatched:
        warnings.append(f"{len(unmatched)} module(s) in the file match nothing in this model: {', '.join(unmatched[:5])}")
    if not card.learned:
        warnings.append(card.verdict)
    warnings.extend(h for h in card.health if h not in card.verdict)
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
        "report": card.to_dict(),
        "report_lines": card.lines(),
        "metadata": {k: v for k, v in metadata.items() if not k.startswith("ss_tag_frequency")},
        "warnings": warnings,
    }


def summary_line(result: dict[str, Any]) -> str:
    """One line a user reads first: OK/PROBLEM, what the file is, how it matched, and the card's verdict.

    ``OK my.safetensors: sd1 lierla rank 16 · 264/264 modules matched · learned; neighbours moved 4% …``
    """
    verdict = "PROBLEM" if result["warnings"] else "OK"
    card = result.get("report") or {}
    return (f"{verdict} {Path(result['file']).name}: {result['family']} {result['network_type']} rank "
            f"{result['rank']} · {result['matched']}/{result['modules_in_file']} modules matched · "
            f"{card.get('verdict', 'no report card')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer check", description=__doc__.splitlines()[0])
    parser.add_argument("lora")
    parser.add_argument("--model", required=True)
    parser.add_argument("--vae")
    parser.add_argument("--text-encoder", "--te", dest="te", help="a Z-Image transformer file's Qwen3 file")
    parser.add_argument("--size", type=int, default=512, help="probe size in pixels (files without a stored probe)")
    parser.add_argument("--prompt", default="", help="own prompt (files without a stored probe)")
    parser.add_argument("--images", help="folder holding the training images (or their folder); default: here")
    parser.add_argument("--device")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    from trainer.hosts.standalone import StandaloneHost
    from trainer.network import load_lora

    host = StandaloneHost(device=args.device)
    # the precision the card was measured in (half-precision runs): the same numbers as the run printed
    precision = load_lora(args.lora)[1].get("traintrain_report_dtype", "fp32")
    with host.acquire(args.model, args.vae or "", precision=precision, v_pred=None,
                      text_encoder=args.te or "") as bundle:
        result = check_lora(args.lora, bundle, size_px=args.size, prompt=args.prompt, images_dir=args.images)
    text = json.dumps(result, indent=2, default=str)
    print(summary_line(result))  # the answer first; the full report follows
    print(text)
    for line in result["report_lines"]:
        print(line)
    for warning in result["warnings"]:
        print(f"WARNING: {warning}")
    if args.json:
        from trainer.paths import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    return 1 if result["warnings"] else 0
