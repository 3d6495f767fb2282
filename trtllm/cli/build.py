"""`trtllm-build`: quantize an HF checkpoint to FP8 and save it, for `LLM(model=OUTPUT_DIR)`.

With calibrated KV-cache scales, and the engine limits `LLM(model=OUT)` then defaults to:

    trtllm-build --model_dir ./Llama-3.1-8B --output_dir ./Llama-3.1-8B-FP8 --quant_algo FP8_PER_CHANNEL_PER_TOKEN \\
        --kv_cache_quant_algo FP8 --calib_dataset calib.jsonl --calib_size 256 --calib_max_seq_length 512 \\
        --max_batch_size 64 --max_seq_len 4096

Steps (a progress bar each): the weights are streamed in and quantized one linear at a time
(models/loader.py with quant_algo: the bf16 model is never resident twice); with
--kv_cache_quant_algo the quantized model runs over the calibration text (--calib_dataset:
one text a line, or JSONL with a "text" field; else the built-in paragraphs of
runtime/kv_cache_quant.py) and each layer's K and V amax / 448 (FP8) or / 127 (INT8) become
its k_scale / v_scale; then the checkpoint is written (quantization/export.py: the layout per
algorithm), the tokenizer files copied, and --max_batch_size / --max_input_len /
--max_seq_len / --max_beam_width written to trtllm_build.json (runtime/build_defaults.py).

Activations are dynamic by default (per token; per 1x128 group with block scales). With
--activation_scheme static (FP8 and FP8_PER_CHANNEL_PER_TOKEN) the unquantized model is loaded
once, run eagerly over the calibration text with a hook on each linear's input, and each
linear's input_scale = its largest |input| / 448 (quantization/calibrate.py); then it is
quantized one linear at a time. --calib_dataset, --calib_size or --calib_max_seq_length with
neither static activations nor a KV format is refused by name (it would be unused).
Bad input (a missing or non-checkpoint directory, an algorithm not built, a non-empty
output directory, bad limits) exits 2 with one line naming it; nothing is written then.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

QUANT_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES")
KV_CACHE_QUANT_ALGOS = ("FP8", "INT8")
_LIMITS = ("max_batch_size", "max_input_len", "max_seq_len", "max_beam_width")
CALIB_DEFAULTS = {"calib_size": 512, "calib_max_seq_length": 512}


class BuildError(ValueError):
    """Bad input to trtllm-build: the message names it; the command exits 2."""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="trtllm-build", description=__doc__.splitlines()[0])
    ap.add_argument("--model_dir", required=True, help="unquantized HF checkpoint directory (safetensors)")
    ap.add_argument("--output_dir", required=True, help="where the FP8 checkpoint is written (absent or empty)")
    ap.add_argument("--quant_algo", required=True, help=f"weights: {', '.join(QUANT_ALGOS)}")
    ap.add_argument("--kv_cache_quant_algo", default=None, help=f"KV cache: {', '.join(KV_CACHE_QUANT_ALGOS)} "
                                                               "(k/v scales calibrated and saved)")
    ap.add_argument("--calib_dataset", default=None, help="calibration text: one a line, or JSONL with 'text' "
                                                          "(default: built-in paragraphs)")
    # None when not given (CALIB_DEFAULTS then): one given without calibration is refused, not unused
    ap.add_argument("--calib_size", type=int, default=None, help="calibration samples at most (default 512)")
    ap.add_argument("--calib_max_seq_length", type=int, default=None, help="tokens a sample at most (default 512)")
    ap.add_argument("--activation_scheme", default="dynamic", choices=["dynamic", "static"],
                    help="dynamic: activations quantized per token at run time (default); static: one scale per "
                         "linear calibrated on the calibration text (FP8, FP8_PER_CHANNEL_PER_TOKEN)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                    help="the unquantized tensors' dtype (default: the checkpoint's)")
    ap.add_argument("--device", default=None, help="where to quantize and calibrate (default: cuda if present)")
    for limit in _LIMITS:
        ap.add_argument(f"--{limit}", type=int, default=None, help="written as LLM's BuildConfig default")
    ap.add_argument("--no_progress", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = build(args)
    except BuildError as e:
        print(f"trtllm-build: {e}", file=sys.stderr)
        return 2
    print(f"trtllm-build: wrote {out}")
    return 0


def _check_input(args: argparse.Namespace):
    """Everything checkable before loading: (QuantAlgo, kv format or None, limits dict)."""
    from trtllm.config import BuildConfig, QuantAlgo
    from trtllm.models.checkpoint_config import read_config
    from trtllm.models.loader import ARCHITECTURES
    from trtllm.quantization.checkpoint import checkpoint_layout

    if args.quant_algo not in QUANT_ALGOS:
        raise BuildError(f"--quant_algo {args.quant_algo}: not supported; trtllm-build quantizes to "
                         f"{', '.join(QUANT_ALGOS)}")
    if args.kv_cache_quant_algo not in (None, *KV_CACHE_QUANT_ALGOS):
        raise BuildError(f"--kv_cache_quant_algo {args.kv_cache_quant_algo}: not supported; "
                         f"{', '.join(KV_CACHE_QUANT_ALGOS)}")
    static = args.activation_scheme == "static"
    calib = [f"--{n}" for n in ("calib_dataset", *CALIB_DEFAULTS) if getattr(args, n) is not None]
    if calib and args.kv_cache_quant_algo is None and not static:
        raise BuildError(f"{', '.join(calib)}: calibration option{'s' if len(calib) > 1 else ''}; calibration "
                         "runs for KV-cache scales (--kv_cache_quant_algo FP8|INT8) or static activation scales "
                         f"(--activation_scheme static), and with neither {'they' if len(calib) > 1 else 'it'} "
                         "would be unused (the activations are quantized dynamically, per token)")
    for name, default in CALIB_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if static and args.quant_algo == "FP8_BLOCK_SCALES":
        raise BuildError("--activation_scheme static with FP8_BLOCK_SCALES: block weights take per-token-group "
                         "activations; static scales are supported with FP8 and FP8_PER_CHANNEL_PER_TOKEN")
    for name in ("calib_size", "calib_max_seq_length"):
        if getattr(args, name) < 1:
            raise BuildError(f"--{name} {getattr(args, name)}: must be at least 1")
    _check_device(args.device)
    src, out = Path(args.model_dir), Path(args.output_dir)
    if not src.is_dir():
        raise BuildError(f"--model_dir {src}: no such directory")
    config_file = src / "config.json"
    if not config_file.is_file():
        raise BuildError(f"--model_dir {src}: no config.json, not a HF checkpoint directory")
    try:  # read_config: a JSON object with sane sizes (a list was an AttributeError traceback)
        hf_config = read_config(src)
        layout = checkpoint_layout(src, hf_config)
    except ValueError as e:
        raise BuildError(f"--model_dir {src}: {e}") from None
    if layout is not None:
        raise BuildError(f"--model_dir {src} is already quantized ({layout.describe()}); trtllm-build quantizes "
                         "an unquantized (bf16/fp16/fp32) checkpoint")
    arch = (hf_config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise BuildError(f"--model_dir {src}: {arch} has no trtllm model file, and FP8 checkpoints load into "
                         f"trtllm's own model files only ({', '.join(sorted(ARCHITECTURES))})")
    _check_expert_blocks(args.quant_algo, ARCHITECTURES[arch], hf_config, src)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BuildError(f"--output_dir {out}: exists and is not an empty directory (refusing to overwrite)")
    _check_writable(out)
    if args.calib_dataset is not None and not Path(args.calib_dataset).is_file():
        raise BuildError(f"--calib_dataset {args.calib_dataset}: no such file")
    limits = {k: getattr(args, k) for k in _LIMITS if getattr(args, k) is not None}
    try:
        BuildConfig(**limits).max_seq_len_for(hf_config.get("max_position_embeddings"))
    except ValueError as e:
        raise BuildError(str(e)) from None
    kv_fmt = args.kv_cache_quant_algo.lower() if args.kv_cache_quant_algo else None
    return QuantAlgo(args.quant_algo), kv_fmt, limits


def _check_device(name: str | None) -> None:
    """--device names a device this machine has (a bad name was torch's RuntimeError traceback)."""
    if name is None:
        return
    import torch
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BuildError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise BuildError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _check_expert_blocks(algo: str, model_cls, hf_config: dict, src: Path) -> None:
    """FP8_BLOCK_SCALES experts are written per expert, gate and up apart: each needs a whole number
    of 128-row blocks (quantization/export.py). Refused before minutes of loading and quantizing."""
    from trtllm.kernels.fp8_gemm import SCALE_BLOCK

    if algo != "FP8_BLOCK_SCALES" or not getattr(model_cls, "expert_tensors", None):
        return
    try:
        width = model_cls.config_class.from_hf(hf_config).moe_intermediate_size
    except (KeyError, ValueError) as e:
        raise BuildError(f"--model_dir {src}: {e}") from None
    if width % SCALE_BLOCK:
        raise BuildError(f"--model_dir {src}: FP8_BLOCK_SCALES experts {width} rows wide (not a multiple of "
                         f"{SCALE_BLOCK}) cannot be written with 128x128 block scales; FP8 or "
                         "FP8_PER_CHANNEL_PER_TOKEN can")


def calibration_texts(file: str | None, size: int) -> list[str]:
    """Up to `size` texts: one a non-empty line of `file` (a JSONL line: its "text"), or the
    built-in CALIBRATION_TEXTS when `file` is None."""
    from trtllm.runtime.kv_cache_quant import CALIBRATION_TEXTS

    if file is None:
        return list(CALIBRATION_TEXTS[:size])
    texts = []
    with open(file, encoding="utf-8") as f:
        for number, line in _lines(f, file):
            if len(texts) == size:
                break
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BuildError(f"--calib_dataset {file}, line {number}: not valid JSON ({e.msg})") from None
                if not isinstance(record.get("text"), str) or not record["text"].strip():
                    raise BuildError(f"--calib_dataset {file}, line {number}: a JSON line needs a non-empty "
                                     "string 'text'")
                texts.append(record["text"])
            else:
                texts.append(line.rstrip("\n"))
    if not texts:
        raise BuildError(f"--calib_dataset {file}: no text in it")
    return texts


def _lines(f, file: str):
    """(number, line) of a text file; BuildError if it is not UTF-8 (was a UnicodeDecodeError traceback)."""
    try:
        yield from enumerate(f, 1)
    except UnicodeDecodeError as e:
        raise BuildError(f"--calib_dataset {file}: not UTF-8 text ({e.reason})") from None


def build(args: argparse.Namespace) -> Path:
    """Quantize, calibrate, write (module docstring); returns the output directory."""
    algo, kv_fmt, limits = _check_input(args)
    import torch
    from tqdm.auto import tqdm

    from trtllm.compile import compile as trtllm_compile
    from trtllm.models.loader import load_model
    from trtllm.quantization.calibrate import input_amax, set_input_scales
    from trtllm.quantization.export import export_fp8_checkpoint
    from trtllm.quantization.fp8_linears import quantize_model
    from trtllm.runtime.build_defaults import write_build_defaults
    from trtllm.runtime.kv_cache_quant import calibrate_kv_scales
    from trtllm.runtime.tokenizer import load_tokenizer

    src, out = Path(args.model_dir), Path(args.output_dir)
    progress = not args.no_progress
    static = args.activation_scheme == "static"
    calibrating = kv_fmt is not None or static
    texts = calibration_texts(args.calib_dataset, args.calib_size) if calibrating else None  # before loading
    try:
        tokenizer = load_tokenizer(src) if calibrating else None
    except (OSError, ValueError) as e:
        raise BuildError(f"calibration needs the checkpoint's tokenizer: {e}") from None
    prompts = [ids[: args.calib_max_seq_length] for ids in (tokenizer.encode(t) for t in texts)] if texts else None
    dtype = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    try:  # static: loaded unquantized (once), calibrated eagerly, then quantized one linear at a time
        model = load_model(src, dtype=dtype, device=args.device, progress=progress, quant_algo=None if static else algo)
    except (OSError, ValueError) as e:
        raise BuildError(f"--model_dir {src}: {e}") from None
    if static:
        amax = input_amax(model, prompts, progress)
        set_input_scales(quantize_model(model, algo), amax)
    kv = None
    if kv_fmt:
        compiled = trtllm_compile(model)
        for ids in tqdm(prompts, desc=f"calibrating {kv_fmt} KV scales", unit="sample", disable=not progress):
            if ids:  # per sample, so the bar moves; the scale of the largest amax is the max of the scales
                scales = calibrate_kv_scales(compiled, [ids], kv_fmt)
                kv = scales if kv is None else torch.maximum(kv, scales)
        if kv is None:
            raise BuildError("KV calibration: every calibration text tokenized to nothing")
    try:
        export_fp8_checkpoint(model, src, out, algo, kv, kv_fmt, progress=progress)
        write_build_defaults(out, limits, algo_of_kv(kv_fmt))
    except OSError as e:  # e.g. the disk filled up
        raise BuildError(f"--output_dir {out}: writing the checkpoint failed ({e})") from None
    except ValueError as e:  # what the layouts cannot hold, found before any file is written
        raise BuildError(f"--model_dir {src}: {e}") from None
    return out


def _check_writable(out: Path) -> None:
    """BuildError unless `out` can be made: now, not after minutes of loading and quantizing
    (tried in its nearest existing folder, which is left as it was)."""
    parent = next(p for p in out.absolute().parents if p.exists()) if not out.exists() else out
    if not parent.is_dir():
        raise BuildError(f"--output_dir {out}: {parent} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".trtllm-build-"))
    except OSError as e:
        raise BuildError(f"--output_dir {out}: cannot write in {parent} ({e.strerror})") from None


def algo_of_kv(kv_fmt: str | None):
    from trtllm.config import QuantAlgo
    return None if kv_fmt is None else QuantAlgo(kv_fmt.upper())


if __name__ == "__main__":
    sys.exit(main())
