"""Text conditioning, guidance settings, the next-scale sampler and decoding."""
from __future__ import annotations

import dataclasses

import torch

from . import comfy_bridge as bridge
from .comfy_bridge import log
from . import handles as H
from ._core import InputError, core_module, sampler, schedules

MAX_BATCH = 16
MIN_SIDE, MAX_SIDE = 64, 4096
# Released defaults: EchoGen's inference script, Infinity's README.
ECHOGEN_DEFAULTS = dict(cfg=2.5, subject_cfg=2.5, tau=2.0, top_k=0, top_p=0.97)
INFINITY_DEFAULTS = dict(cfg=3.0, subject_cfg=1.0, tau=0.5, top_k=0, top_p=0.97)


class EchoGenTextEncode:
    DESCRIPTION = "Encodes the prompt (and an optional negative prompt) with Flan-T5 for Infinity / EchoGen."
    CATEGORY = "EchoGen/conditioning"
    RETURN_TYPES = (H.TEXT,)
    RETURN_NAMES = ("text",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": (H.TEXT_ENCODER, {"tooltip": "Flan-T5 from the EchoGen text encoder loader."}),
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                      "tooltip": "What to generate. For EchoGen, name the subject as in your subject "
                                                 "words, e.g. 'a dog wearing a santa hat, in the snow'. One prompt "
                                                 "per line gives a batch of different prompts."}),
            },
            "optional": {
                "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "Replaces the model's learned empty prompt in guidance. "
                                                          "Leave empty for the released behaviour."}),
                "one_prompt_per_line": ("BOOLEAN", {"default": False,
                                                    "tooltip": "Treat each non-empty line as its own prompt."}),
            },
        }

    def encode(self, text_encoder, prompt, negative_prompt="", one_prompt_per_line=False):
        prompts = [p.strip() for p in prompt.splitlines()] if one_prompt_per_line else [prompt.strip()]
        prompts = [p for p in prompts if p]
        if not prompts:
            raise InputError("The prompt is empty; describe the image to generate.")
        encoder = text_encoder.get()
        positive = encoder.encode(prompts).to("cpu")
        negative = encoder.encode([negative_prompt.strip()]).to("cpu") if negative_prompt.strip() else None
        text_encoder.offload()
        return (H.TextHandle(positive=positive, negative=negative, prompts=tuple(prompts), channels=encoder.channels),)


def _per_scale(text: str, name: str):
    """'' -> None; '3' -> 3.0; '3, 3, 2.5' -> [3.0, 3.0, 2.5] (the last value repeats for later scales)."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{name}: write numbers separated by commas, one per scale (got {text!r}).") from None
    return values[0] if len(values) == 1 else values


class EchoGenGuidance:
    DESCRIPTION = ("Guidance and sampling settings. EchoGen uses three rows: logits = l_uu + gamma_t (l_t - l_uu) + "
                   "gamma_I (l_ti - l_t); plain Infinity uses gamma_t only. Per-scale lists override the single values.")
    CATEGORY = "EchoGen/sampling"
    RETURN_TYPES = (H.GUIDANCE,)
    RETURN_NAMES = ("guidance",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        d = ECHOGEN_DEFAULTS
        return {
            "required": {
                "text_cfg": ("FLOAT", {"default": d["cfg"], "min": 0.0, "max": 30.0, "step": 0.1,
                                       "tooltip": "gamma_t: how strongly the prompt is followed (EchoGen 2.5, "
                                                  "Infinity 3)."}),
                "subject_cfg": ("FLOAT", {"default": d["subject_cfg"], "min": 0.0, "max": 30.0, "step": 0.1,
                                          "tooltip": "gamma_I: how strongly the subject's identity is kept (EchoGen "
                                                     "2.5). Ignored without a subject."}),
                "temperature": ("FLOAT", {"default": d["tau"], "min": 0.01, "max": 10.0, "step": 0.05,
                                          "tooltip": "tau: logits are divided by it (EchoGen 2.0, Infinity 0.5)."}),
                "top_k": ("INT", {"default": d["top_k"], "min": 0, "max": 1000,
                                  "tooltip": "Keep the k most likely values per bit (0 = off; with 2 values per bit "
                                             "only k=1, greedy, changes anything)."}),
                "top_p": ("FLOAT", {"default": d["top_p"], "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "Nucleus sampling per bit (0.97 drops a bit value under 3%)."}),
            },
            "optional": {
                "text_cfg_per_scale": ("STRING", {"default": "", "tooltip": "Optional gamma_t per scale, e.g. "
                                                                            "'3,3,3,2.5,2.5'; the last value repeats."}),
                "subject_cfg_per_scale": ("STRING", {"default": "", "tooltip": "Optional gamma_I per scale."}),
                "temperature_per_scale": ("STRING", {"default": "", "tooltip": "Optional tau per scale."}),
            },
        }

    def build(self, text_cfg, subject_cfg, temperature, top_k, top_p, text_cfg_per_scale="",
              subject_cfg_per_scale="", temperature_per_scale=""):
        cfg = _per_scale(text_cfg_per_scale, "text_cfg_per_scale")
        scfg = _per_scale(subject_cfg_per_scale, "subject_cfg_per_scale")
        tau = _per_scale(temperature_per_scale, "temperature_per_scale")
        taus = tau if isinstance(tau, list) else [tau if tau is not None else temperature]
        if any(t <= 0 for t in taus):
            raise InputError(f"Temperatures must be positive, got {taus}.")
        return (sampler.SamplerSettings(cfg=text_cfg if cfg is None else cfg,
                                        subject_cfg=subject_cfg if scfg is None else scfg,
                                        tau=temperature if tau is None else tau, top_k=top_k, top_p=top_p),)


class EchoGenSampler:
    DESCRIPTION = ("Generates images scale by scale (next-scale prediction). With a subject it runs EchoGen's "
                   "subject-driven generation; without one, plain Infinity text-to-image. The size snaps to the "
                   "nearest of Infinity's aspect templates; the real size is returned and shown.")
    CATEGORY = "EchoGen/sampling"
    RETURN_TYPES = (H.LATENT, "INT", "INT")
    RETURN_NAMES = ("latent", "width", "height")
    OUTPUT_TOOLTIPS = ("Summed bit codes; decode with EchoGen Decode.", "Real output width.", "Real output height.")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (H.MODEL, {"tooltip": "Infinity or EchoGen transformer."}),
                "vae": (H.VAE, {"tooltip": "The BSQ VAE that belongs to the model."}),
                "text": (H.TEXT, {"tooltip": "From EchoGen Text Encode."}),
                "width": ("INT", {"default": 1024, "min": MIN_SIDE, "max": MAX_SIDE, "step": 16,
                                  "tooltip": "Requested width; snapped with height to the nearest aspect template "
                                             "and size (up to 1024x1024 area)."}),
                "height": ("INT", {"default": 1024, "min": MIN_SIDE, "max": MAX_SIDE, "step": 16,
                                   "tooltip": "Requested height; see width."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Image i of the batch uses seed + i, so an image never depends on the "
                                            "batch size; batch of one = the official sampler's seed."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": MAX_BATCH,
                                       "tooltip": "Images per prompt."}),
            },
            "optional": {
                "subject": (H.SUBJECT, {"tooltip": "Encoded subject (semantic + content). Leave empty for plain "
                                                   "text-to-image."}),
                "guidance": (H.GUIDANCE, {"tooltip": "Guidance settings; released defaults when empty (EchoGen "
                                                     "2.5/2.5/tau 2, Infinity 3/tau 0.5)."}),
                "sequential_rows": ("BOOLEAN", {"default": False,
                                                "tooltip": "Low memory: run the guidance rows (EchoGen: text+subject, "
                                                           "text, empty; Infinity: text, empty) through the model one "
                                                           "after the other instead of in one batch. Same image; the "
                                                           "activations of one row at a time, a little slower."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def sample(self, model, vae, text, width, height, seed, batch_size, subject=None, guidance=None,
               sequential_rows=False, unique_id=None):
        for name, v in (("width", width), ("height", height)):
            if not MIN_SIDE <= int(v) <= MAX_SIDE:
                raise InputError(f"{name} {v} is out of range: use {MIN_SIDE} to {MAX_SIDE} pixels.")
        if not 1 <= int(batch_size) <= MAX_BATCH:
            raise InputError(f"batch_size {batch_size} is out of range: use 1 to {MAX_BATCH}.")
        cfg = model.cfg
        if text.channels != cfg.text_channels:
            raise InputError(f"The prompt was encoded with {text.channels}-wide T5 features but {model.name} expects "
                             f"{cfg.text_channels} (flan-t5-xl gives 2048): load the matching text encoder.")
        features = _subject_features(model, subject)
        settings = guidance or sampler.SamplerSettings(**(ECHOGEN_DEFAULTS if features is not None else INFINITY_DEFAULTS))
        settings = dataclasses.replace(settings, sequential_rows=bool(sequential_rows))
        positive = _batch_prompts(text, int(batch_size))
        if features is not None:
            features = _match_subjects(features, text.positive.batch_size, int(batch_size))
        schedule = model.fixed_schedule or schedules.nearest_schedule(int(width), int(height))
        if model.fixed_schedule is not None and (int(width), int(height)) != (schedule.width, schedule.height):
            log.info(f"EchoGen: {model.name} was trained at {schedule.width}x{schedule.height} only; "
                     f"generating that instead of {width}x{height}")
        if schedule.num_scales > cfg.num_levels:
            raise InputError(f"{schedule.describe()} needs {schedule.num_scales} scales; {model.name} knows "
                             f"{cfg.num_levels}. Ask for a smaller size.")

        m, v = model.managed.get(), vae.get()
        progress = bridge.Progress(schedule.num_scales, unique_id)
        show = bridge.previews_enabled()

        def on_scale(index, total, summed):
            bridge.check_interrupt()  # cancel is honoured between scales
            preview = None
            if show:
                from PIL import Image

                preview = Image.fromarray(sampler.preview(v, summed).cpu().numpy())
            progress.update(index + 1, preview)

        result = sampler.generate(m, v, positive, schedule, settings, seed=int(seed), negative=text.negative,
                                  on_scale=on_scale, decode=False, subject=features)
        info = {"schedule": schedule.describe(), "requested": f"{width}x{height}", "seed": int(seed),
                "images": positive.batch_size}
        log.info(f"EchoGen: generated {positive.batch_size} x {schedule.describe()}"
              + (" with a subject" if features is not None else ""))
        latent = H.LatentHandle(codes=result.summed_codes.float().cpu(), width=schedule.width, height=schedule.height,
                                vae_bits=v.bits, info=info)
        return {"ui": {"echogen_size": [f"{schedule.width}x{schedule.height}", schedule.total_tokens]},
                "result": (latent, schedule.width, schedule.height)}


def _batch_prompts(text: H.TextHandle, batch_size: int):
    """Each prompt repeated batch_size times (prompt-major)."""
    idx = [i for i in range(text.positive.batch_size) for _ in range(batch_size)]
    return text.positive.select(idx)


def _subject_features(model: H.ModelHandle, subject):
    if subject is None:
        return None
    if not model.is_echogen:
        raise InputError(f"A subject is connected but {model.name} is a plain Infinity model; load an EchoGen "
                         "checkpoint (echogen_2b.pth) or disconnect the subject for text-to-image.")
    if subject.semantic is None or subject.content is None:
        missing = "content (EchoGen Content Encode)" if subject.content is None else "semantic (EchoGen Semantic Encode)"
        raise InputError(f"The subject lacks its {missing} features; run both encoders on the reference.")
    cfg = model.cfg
    want = (cfg.semantic_len, cfg.semantic_dim, cfg.content_len, cfg.content_dim)
    if tuple(subject.expects) != want:
        raise InputError(f"The subject was encoded for a model with features {subject.expects} (semantic len, dim, "
                         f"content len, dim) but {model.name} expects {want}: re-encode it with this model "
                         "connected to EchoGen Semantic Encode.")
    return core_module("echogen").SubjectFeatures(subject.semantic, subject.content)


def _match_subjects(features, prompts: int, batch_size: int):
    """One subject for everything, or one per prompt (repeated for that prompt's images)."""
    n = features.semantic.shape[0]
    if n == 1:
        return features
    if n == prompts:
        return features.select([i for i in range(n) for _ in range(batch_size)])
    raise InputError(f"Got {n} subject references for {prompts} prompt(s); give one reference, or one per prompt.")


class EchoGenDecode:
    DESCRIPTION = "Decodes the sampler's bit codes to an IMAGE with the BSQ VAE (one image at a time)."
    CATEGORY = "EchoGen/sampling"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (H.VAE, {"tooltip": "The BSQ VAE used by the sampler."}),
            "latent": (H.LATENT, {"tooltip": "From EchoGen Sampler."}),
        }}

    def decode(self, vae, latent):
        v = vae.get()
        if latent.vae_bits != v.bits:
            raise InputError(f"These codes have {latent.vae_bits} bits per token but the VAE has {v.bits}; decode with "
                             "the VAE the sampler used.")
        images = []
        for i in range(latent.codes.shape[0]):
            bridge.check_interrupt()
            images.append(sampler.decode_codes(v, latent.codes[i:i + 1]))
        image = torch.cat(images).float().add(1).mul(0.5).clamp(0, 1).permute(0, 2, 3, 1)
        return (image.to(bridge.intermediate_device()),)
