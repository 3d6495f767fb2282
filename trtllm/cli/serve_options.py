"""`trtllm-serve`'s options checked before the model loads (one ValueError naming the option):

    check_server_options(args)   before the port is bound: ranges (the image caps' too), --pp_partition
                                 with one stage, LoRA options with no adapters
    media_policy(args)           the image caps (serve/media.py MediaPolicy); refused for a
                                 text-only model, which takes no images to cap
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

_MEDIA_OPTIONS = ("allowed_local_media_path", "max_images_per_request", "max_image_pixels")


def check_server_options(args: argparse.Namespace) -> None:
    """ValueError naming a server option out of range (an image cap too, whatever the model),
    --pp_partition without --pp_size > 1, or a LoRA option with no --lora_modules (it was silently
    unused): before the port is bound and the model loads."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: must be in [0, 65535]")
    if args.max_concurrent_requests is not None and args.max_concurrent_requests < 1:
        raise ValueError(f"--max-concurrent-requests {args.max_concurrent_requests}: must be at least 1")
    if not (math.isfinite(args.shutdown_timeout) and args.shutdown_timeout >= 0):
        raise ValueError(f"--shutdown-timeout {args.shutdown_timeout}: must be a finite number of seconds >= 0")
    # the image caps here, by their flags (MediaPolicy's own check names its fields, max_images / max_pixels)
    for option, least in (("max_images_per_request", 0), ("max_image_pixels", 1)):
        value = getattr(args, option)
        if value is not None and value < least:
            raise ValueError(f"--{option} {value}: must be at least {least}")
    check_parallel_options(args)
    unused = [f"--{k}" for k in ("max_lora_rank", "max_loras", "max_cpu_loras") if getattr(args, k) is not None]
    if unused and not args.lora_modules:
        raise ValueError(f"{', '.join(unused)}: LoRA options, and no --lora_modules to serve")


def check_parallel_options(args: argparse.Namespace) -> None:
    """The parallel flags by their names (the engine's own checks name LLM's arguments, after the
    port is bound): sizes >= 1, --ep_size dividing --tp_size, --pp_partition one count a stage."""
    for option in ("tp_size", "pp_size", "ep_size"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise ValueError(f"--{option} {value}: must be at least 1")
    if args.ep_size is not None and args.tp_size % args.ep_size:
        raise ValueError(f"--ep_size {args.ep_size}: must divide --tp_size {args.tp_size} (the experts split over "
                         "the tensor-parallel ranks, each expert's width over tp_size / ep_size)")
    if args.pp_partition is None:
        return
    if args.pp_size == 1:  # (the engine's own check names pp_partition=)
        raise ValueError("--pp_partition: is for --pp_size > 1 (layers per pipeline stage); --pp_size is 1")
    if len(args.pp_partition) != args.pp_size or min(args.pp_partition) < 1:
        raise ValueError(f"--pp_partition {' '.join(map(str, args.pp_partition))}: must be {args.pp_size} layer "
                         f"counts (one a stage of --pp_size {args.pp_size}), each at least 1")


def media_policy(args: argparse.Namespace):
    """The MediaPolicy of --allowed_local_media_path, --max_images_per_request and
    --max_image_pixels (those not given: MediaPolicy's defaults). ValueError if one is given
    and the model takes no images (config.json's architecture is not a multimodal one; the demo
    model is text-only): it would be silently unused, every image part refused anyway."""
    from trtllm.serve.media import MediaPolicy

    given = {k: getattr(args, k) for k in _MEDIA_OPTIONS if getattr(args, k) is not None}
    arch = _architecture(args.model) if given else None
    if given and arch is not None and not _takes_images(arch):
        model = args.model if args.model is not None else "the demo model"
        what = "image options" if len(given) > 1 else "an image option"
        raise ValueError(f"{', '.join('--' + k for k in given)}: {what}, and {model} takes no images "
                         f"({arch}: a text-only model)")
    return MediaPolicy(**{{"max_images_per_request": "max_images", "max_image_pixels": "max_pixels"}.get(k, k): v
                          for k, v in given.items()})


def _architecture(model: str | None) -> str | None:
    """config.json's first architecture; None where it cannot be read (loading names why)."""
    if model is None:
        from trtllm.demo import DEMO_MODEL_DIR
        model = DEMO_MODEL_DIR
    try:
        config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
        return (config.get("architectures") or [None])[0]
    except (OSError, ValueError, AttributeError, TypeError, IndexError):
        return None


def _takes_images(arch: str) -> bool:
    from trtllm.parallel.checks import MULTIMODAL_ARCHITECTURES
    return arch in MULTIMODAL_ARCHITECTURES
