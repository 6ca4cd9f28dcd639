"""Pretraining the three frozen encoders of a small EchoGen from scratch, on a triplet folder's own data.

The released EchoGen builds on encoders that others pretrained: Flan-T5 (span corruption, then instruction
tuning), DINOv2 (self-distillation) and the FLUX.1 VAE (a reconstruction autoencoder). The bundled model
has no such models to borrow, so this stage trains a tiny one of each, in the official layouts, on the
folder that the later stages train on (``NAME.txt`` prompts, ``NAME.ref.png`` prepared references and the
``NAME.json`` subject descriptions of the synthetic world):

* **text encoder** - T5 span corruption, T5's own objective: 15 % of each prompt's tokens, in spans of mean
  length 3, are replaced by sentinels and a small decoder writes them back. Only the encoder is kept (the
  tokenizer is the one the folder already has).
* **content encoder** (FLUX.1-VAE layout) - a variational autoencoder on the reference crops: L1 + MSE
  reconstruction through a small decoder, a light KL term that keeps the posterior mean (what EchoGen
  reads) well scaled. Only the encoder is kept, as the FLUX VAE's encoder is all EchoGen uses.
* **semantic encoder** (DINOv2 layout) - taught to *name* the subject in its reference crop: linear heads
  on the CLS token and on the mean patch token predict shape, primary colour, secondary colour and
  pattern, and every patch token predicts the mean colour under it. This is supervised, unlike DINOv2:
  self-distillation does not converge in the minutes a CPU gives it, and the world's labels are exact.
  The heads are dropped. Held-out subjects are new combinations of attributes it has seen.

Each function writes its encoder atomically in the layout the normal loaders read; heads and decoders are
thrown away. ``python -m echogen_core pretrain-encoders --data DIR --text-encoder T5DIR --dinov2 FILE
--content-vae FILE`` trains all three.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError

# Attribute vocabularies of the semantic encoder's heads (the synthetic world's, see world.py).
ATTRIBUTES = ("shape", "primary", "secondary", "pattern")

# Defaults of each objective (the bundled recipe passes its own).
TEXT_DEFAULTS = {"steps": 1500, "batch_size": 64, "lr": 3e-3, "noise_density": 0.15, "mean_span": 3.0}
CONTENT_DEFAULTS = {"steps": 800, "batch_size": 32, "lr": 2e-3, "kl_weight": 1e-4}
SEMANTIC_DEFAULTS = {"steps": 800, "batch_size": 64, "lr": 1e-3, "colour_weight": 1.0}


def _log(name: str, step: int, steps: int, t0: float, **values):
    vals = " ".join(f"{k} {v:.4f}" for k, v in values.items())
    print(f"[{name}] step {step}/{steps} {vals} ({time.time() - t0:.0f} s)", flush=True)


def _warmup_cosine(step: int, steps: int) -> float:
    warmup = max(1, min(50, steps // 10))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


class _LossLog:
    """Losses of a run: an EMA for the log lines, first and last 10 % means for the report."""

    def __init__(self):
        self.values: list = []
        self.ema = None

    def add(self, value: float) -> float:
        self.values.append(value)
        self.ema = value if self.ema is None else 0.98 * self.ema + 0.02 * value
        return self.ema

    def summary(self, name: str = "loss") -> dict:
        k = max(1, len(self.values) // 10)
        return {f"{name}_first": round(float(np.mean(self.values[:k])), 4),
                f"{name}_last": round(float(np.mean(self.values[-k:])), 4)}


def _optimizer(params, lr: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def _step(opt, loss: torch.Tensor, params, lr: float, scale: float):
    for group in opt.param_groups:
        group["lr"] = lr * scale
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


# --------------------------------------------------------------------------------------------------------------
# The folder's data


def read_prompts(folder) -> list:
    """Every distinct NAME.txt prompt of a triplet folder, sorted."""
    folder = Path(folder)
    prompts = sorted({p.read_text(encoding="utf-8").strip() for p in folder.glob("*.txt")} - {""})
    if not prompts:
        raise InputError(f"{folder} has no NAME.txt prompts to pretrain the text encoder on.")
    return prompts


def read_references(folder) -> tuple:
    """(references uint8 (N, S, S, 3), [subject dict or None per reference]) of a triplet folder's
    NAME.ref.png files (with NAME.json's 'subject', which the world writes)."""
    from PIL import Image

    folder = Path(folder)
    files = sorted(folder.glob("*.ref.png"))
    if not files:
        raise InputError(f"{folder} has no NAME.ref.png references to pretrain the image encoders on.")
    images, subjects = [], []
    size = None
    for f in files:
        a = np.asarray(Image.open(f).convert("RGB"))
        if size is None:
            size = a.shape[:2]
        if a.shape[:2] != size:
            raise InputError(f"{f} is {a.shape[1]}x{a.shape[0]}, the other references are {size[1]}x{size[0]}.")
        images.append(a)
        meta = f.with_name(f.name[: -len(".ref.png")] + ".json")
        subjects.append(json.loads(meta.read_text(encoding="utf-8")).get("subject") if meta.is_file() else None)
    return np.stack(images), subjects


def _batch01(images: np.ndarray, idx, flip: bool, rng: np.random.Generator) -> torch.Tensor:
    x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 255.0     # (B, 3, S, S) in [0, 1]
    if flip:
        mirror = torch.from_numpy(rng.random(len(idx)) < 0.5)
        x = torch.where(mirror.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


# --------------------------------------------------------------------------------------------------------------
# Text encoder: T5 span corruption


def span_corruption(ids: list, rng: random.Random, sentinels: list, eos: int, noise_density: float = 0.15,
                    mean_span: float = 3.0) -> tuple:
    """One T5 span-corruption example: (encoder input ids, decoder target ids), both ending in eos.
    `ids` is the prompt's tokens without eos; noise spans alternate with kept spans, as in T5."""
    n = len(ids)
    if n < 2:
        return list(ids) + [eos], [sentinels[0], eos]
    num_noise = min(max(1, round(n * noise_density)), n - 1)
    num_spans = max(1, min(round(num_noise / mean_span), num_noise, n - num_noise, len(sentinels) - 1))

    def split(total: int, parts: int) -> list:          # `parts` positive lengths summing to `total`
        cuts = sorted(rng.sample(range(1, total), parts - 1)) if parts > 1 else []
        edges = [0] + cuts + [total]
        return [edges[i + 1] - edges[i] for i in range(parts)]

    noise, keep = split(num_noise, num_spans), split(n - num_noise, num_spans)
    if rng.random() < 0.5:      # let a noise span open the prompt as often as close it
        noise, keep = noise[::-1], keep[::-1]
        order = [(True, noise[i]) if j == 0 else (False, keep[i]) for i in range(num_spans) for j in (0, 1)]
    else:
        order = [(False, keep[i]) if j == 0 else (True, noise[i]) for i in range(num_spans) for j in (0, 1)]
    inputs, targets, pos, k = [], [], 0, 0
    for is_noise, length in order:
        span = ids[pos:pos + length]
        pos += length
        if is_noise:
            inputs.append(sentinels[k])
            targets += [sentinels[k]] + span
            k += 1
        else:
            inputs += span
    return inputs + [eos], targets + [sentinels[k], eos]


def _pad(rows: list, value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def pretrain_text_encoder(folder, prompts: list, steps: int = TEXT_DEFAULTS["steps"],
                          batch_size: int = TEXT_DEFAULTS["batch_size"], lr: float = TEXT_DEFAULTS["lr"],
                          noise_density: float = TEXT_DEFAULTS["noise_density"],
                          mean_span: float = TEXT_DEFAULTS["mean_span"], seed: int = 0, log_every: int = 100) -> dict:
    """Train the T5 encoder in `folder` (a Hugging Face folder with its tokenizer, e.g. from
    text_encoder.build_tiny_t5) by span corruption on `prompts`; write the trained encoder back in place.
    Returns {'loss_first', 'loss_last', 'steps'}."""
    from .text_encoder import T5TextEncoder, _import_transformers

    _import_transformers()        # a clear message when transformers is missing
    from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

    folder = Path(folder)
    tokenizer = T5TextEncoder.from_folder(folder).tokenizer
    config = T5Config.from_pretrained(str(folder), local_files_only=True)
    sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    if any(s is None or s == tokenizer.unk_token_id for s in sentinels):
        raise InputError(f"The tokenizer in {folder} has no <extra_id_*> sentinels; span corruption needs them.")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    tokens = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]

    torch.manual_seed(seed)
    rng = random.Random(f"span-corruption/{seed}")
    model = T5ForConditionalGeneration(config)           # a fresh encoder-decoder; the decoder is discarded
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(params, lr)
    t0, losses = time.time(), _LossLog()
    for step in range(steps):
        rows = [span_corruption(tokens[rng.randrange(len(tokens))], rng, sentinels, eos, noise_density, mean_span)
                for _ in range(batch_size)]
        inputs = _pad([r[0] for r in rows], pad)
        labels = _pad([r[1] for r in rows], -100)
        loss = model(input_ids=inputs, attention_mask=(inputs != pad).long(), labels=labels).loss
        _step(opt, loss, params, lr, _warmup_cosine(step, steps))
        ema = losses.add(loss.item())
        if log_every and (step + 1) % log_every == 0:
            _log("text", step + 1, steps, t0, loss=ema)
    encoder = T5EncoderModel(config)
    missing, _unexpected = encoder.load_state_dict(model.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"the trained T5 lacks encoder weights {missing[:5]}")
    encoder.eval()
    # written beside the folder, then each file renamed into it: an interrupted run leaves the old weights whole
    import shutil
    import tempfile

    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".", suffix=".partial"))
    try:
        encoder.save_pretrained(str(staging))
        for f in sorted(staging.iterdir()):
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {**losses.summary(), "steps": steps}


# --------------------------------------------------------------------------------------------------------------
# Content encoder: a variational autoencoder in the FLUX.1 VAE layout


class ContentDecoder(nn.Module):
    """A small convolutional decoder, (B, z, h, w) -> (B, 3, 8h, 8w) in [-1, 1]; used only while training."""

    def __init__(self, z_channels: int = 16, width: int = 64):
        super().__init__()
        layers = [nn.Conv2d(z_channels, width, 3, padding=1), nn.SiLU()]
        c = width
        for _ in range(3):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, max(32, c // 2), 3, padding=1),
                       nn.SiLU()]
            c = max(32, c // 2)
        layers += [nn.Conv2d(c, 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def pretrain_content_encoder(path, references: np.ndarray, config=None, steps: int = CONTENT_DEFAULTS["steps"],
                             batch_size: int = CONTENT_DEFAULTS["batch_size"], lr: float = CONTENT_DEFAULTS["lr"],
                             kl_weight: float = CONTENT_DEFAULTS["kl_weight"], seed: int = 0,
                             log_every: int = 100) -> dict:
    """Train a FLUX.1-layout VAE encoder (``FluxVAEConfig``, default tiny) as a VAE on `references`
    (uint8 (N, S, S, 3)); save the encoder to `path` (BFL key names, safetensors). Returns losses and the
    posterior mean's standard deviation on the data."""
    from safetensors.torch import save_file

    from .checkpoint import atomic_write
    from .flux_vae import FluxVAEConfig, FluxVAEEncoder

    cfg = config or FluxVAEConfig.tiny()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    encoder = FluxVAEEncoder(cfg)
    decoder = ContentDecoder(cfg.z_channels)
    encoder.train(), decoder.train()
    params = [p for m in (encoder, decoder) for p in m.parameters()]
    opt = _optimizer(params, lr)
    t0, losses = time.time(), _LossLog()
    for step in range(steps):
        x = _batch01(references, rng.integers(0, len(references), batch_size), True, rng) * 2 - 1
        moments = encoder.encoder(x)                                  # (B, 2z, h, w)
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        recon = decoder(z)
        rec = (recon - x).abs().mean() + F.mse_loss(recon, x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = rec + kl_weight * kl
        _step(opt, loss, params, lr, _warmup_cosine(step, steps))
        ema = losses.add(rec.item())
        if log_every and (step + 1) % log_every == 0:
            _log("content", step + 1, steps, t0, reconstruction=ema, kl=kl.item())
    encoder.eval()
    with torch.no_grad():
        sample = _batch01(references, np.arange(min(256, len(references))), False, rng)
        latent_std = encoder.encode(sample).std().item()
    sd = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    meta = {"format": "pt", "echogen.family": "flux_vae_encoder",
            "echogen.note": f"pretrained as a VAE for {steps} steps (encoder_pretraining)"}
    atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata=meta))
    return {**losses.summary("reconstruction"), "latent_std": round(latent_std, 3), "steps": steps}


# --------------------------------------------------------------------------------------------------------------
# Semantic encoder: a DINOv2-layout ViT that names the subject


def attribute_labels(subjects: list) -> tuple:
    """({attribute: sorted values}, LongTensor (N, 4) of label indices) from the world's subject dicts."""
    if any(s is None for s in subjects):
        raise InputError("Pretraining the semantic encoder needs each reference's NAME.json 'subject' "
                         "(shape, primary, secondary, pattern), as the synthetic world writes them.")
    vocab = {a: sorted({s[a] for s in subjects}) for a in ATTRIBUTES}
    index = {a: {v: i for i, v in enumerate(vocab[a])} for a in ATTRIBUTES}
    labels = torch.tensor([[index[a][s[a]] for a in ATTRIBUTES] for s in subjects], dtype=torch.long)
    return vocab, labels


def pretrain_semantic_encoder(path, references: np.ndarray, subjects: list, config=None, input_size=None,
                              steps: int = SEMANTIC_DEFAULTS["steps"],
                              batch_size: int = SEMANTIC_DEFAULTS["batch_size"], lr: float = SEMANTIC_DEFAULTS["lr"],
                              colour_weight: float = SEMANTIC_DEFAULTS["colour_weight"], seed: int = 0,
                              log_every: int = 100) -> dict:
    """Train a DINOv2-layout ViT (``Dinov2Config``, default tiny) on `references` (uint8 (N, S, S, 3)) seen at
    `input_size` px (default: the config's img_size) through Dinov2.preprocess, as encode() sees them; save it to `path` (torch-hub names).
    Returns the losses and the training accuracy of each attribute from the CLS token."""
    from safetensors.torch import save_file

    from .checkpoint import atomic_write
    from .dinov2 import Dinov2, Dinov2Config

    cfg = config or Dinov2Config.tiny()
    input_size = input_size or cfg.img_size      # the side the model's position table was made for
    vocab, labels = attribute_labels(subjects)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Dinov2(cfg)
    with torch.no_grad():    # the hub models' init of the learned tokens (zeros would start every image alike)
        nn.init.trunc_normal_(model.pos_embed, std=0.02)
        nn.init.normal_(model.cls_token, std=1e-6)
    sizes = [len(vocab[a]) for a in ATTRIBUTES]
    cls_head, patch_head = nn.Linear(cfg.embed_dim, sum(sizes)), nn.Linear(cfg.embed_dim, sum(sizes))
    colour_head = nn.Linear(cfg.embed_dim, 3)
    modules = (model, cls_head, patch_head, colour_head)
    for m in modules:
        m.train()
    params = [p for m in modules for p in m.parameters()]
    opt = _optimizer(params, lr)
    p = cfg.patch_size

    def attribute_loss(logits, y):
        return sum(F.cross_entropy(part, y[:, i]) for i, part in enumerate(logits.split(sizes, dim=-1)))

    t0, losses = time.time(), _LossLog()
    for step in range(steps):
        idx = rng.integers(0, len(references), batch_size)
        x01 = _batch01(references, idx, True, rng)
        pixels = model.preprocess(x01, input_size)
        tokens = model(pixels)                                            # (B, 1 + N, D)
        y = labels[idx]
        # each patch's mean colour, in [0, 1], on the grid DINOv2 sees
        colour = F.avg_pool2d(F.interpolate(x01, size=(input_size, input_size), mode="bilinear",
                                            align_corners=False, antialias=True), p)
        colour = colour.flatten(2).transpose(1, 2)                        # (B, N, 3)
        loss_cls = attribute_loss(cls_head(tokens[:, 0]), y)
        loss_patch = attribute_loss(patch_head(tokens[:, 1:].mean(1)), y)
        loss_colour = F.mse_loss(colour_head(tokens[:, 1:]), colour)
        loss = loss_cls + loss_patch + colour_weight * 10 * loss_colour
        _step(opt, loss, params, lr, _warmup_cosine(step, steps))
        ema = losses.add(loss.item())
        if log_every and (step + 1) % log_every == 0:
            _log("semantic", step + 1, steps, t0, loss=ema, cls=loss_cls.item(), colour=loss_colour.item())
    model.eval(), cls_head.eval()
    correct = torch.zeros(len(ATTRIBUTES))
    with torch.no_grad():
        for start in range(0, len(references), 256):
            idx = np.arange(start, min(start + 256, len(references)))
            logits = cls_head(model.encode(_batch01(references, idx, False, rng), size=input_size)[:, 0])
            for i, part in enumerate(logits.split(sizes, dim=-1)):
                correct[i] += (part.argmax(-1) == labels[idx, i]).sum()
    accuracy = {a: round(float(c) / len(references), 3) for a, c in zip(ATTRIBUTES, correct)}
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "echogen.family": "dinov2",
            "echogen.note": f"pretrained to name the world's subjects for {steps} steps (encoder_pretraining)"}
    atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata=meta))
    return {**losses.summary(), "train_accuracy": accuracy, "steps": steps}


# --------------------------------------------------------------------------------------------------------------
# Command line


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="triplet folder (NAME.txt, NAME.ref.png, NAME.json)")
    p.add_argument("--text-encoder", help="T5 folder (with its tokenizer) whose weights are trained in place")
    p.add_argument("--dinov2", help="where to write the semantic encoder (.safetensors)")
    p.add_argument("--content-vae", help="where to write the content encoder (.safetensors)")
    p.add_argument("--config", default="{}", help="JSON {text: {...}, semantic: {...}, content: {...}} of "
                   "keyword arguments (steps, batch_size, lr, ...); semantic and content may hold a 'model' "
                   "config (Dinov2Config.tiny / FluxVAEConfig.tiny overrides)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--report", help="write the losses and accuracies here as JSON")


_OBJECTIVES = {"text": TEXT_DEFAULTS, "semantic": {**SEMANTIC_DEFAULTS, "model": None},
               "content": {**CONTENT_DEFAULTS, "model": None}}


def _pretrain_config(text: str) -> dict:
    """--config JSON, checked: known objectives and keys only (a typo would otherwise train with defaults)."""
    try:
        conf = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"--config is not valid JSON ({e}): {text!r}") from None
    if not isinstance(conf, dict):
        raise InputError(f"--config must be a JSON object such as {{\"text\": {{\"steps\": 100}}}}, got {text!r}")
    for name, values in conf.items():
        if name not in _OBJECTIVES:
            raise InputError(f"--config names an unknown objective {name!r}; known: {sorted(_OBJECTIVES)}")
        unknown = sorted(set(values) - set(_OBJECTIVES[name]))
        if unknown:
            raise InputError(f"--config {name!r} has unknown keys {unknown}; known: {sorted(_OBJECTIVES[name])}")
    return conf


def _model_config(cls, model: dict):
    if not model:
        return None
    try:
        return cls.tiny(**model)
    except (TypeError, ValueError) as e:
        raise InputError(f"--config 'model' {model} is not a valid {cls.__name__}: {e}") from None


def run_pretrain(args) -> int:
    if not (args.text_encoder or args.dinov2 or args.content_vae):
        raise InputError("Nothing to pretrain: pass --text-encoder, --dinov2 and/or --content-vae.")
    if args.threads:
        torch.set_num_threads(args.threads)
    conf = _pretrain_config(args.config)
    report = {}
    if args.text_encoder:
        report["text_encoder"] = pretrain_text_encoder(args.text_encoder, read_prompts(args.data), seed=args.seed,
                                                       **conf.get("text", {}))
        print(json.dumps({"text_encoder": report["text_encoder"]}), flush=True)
    if args.dinov2 or args.content_vae:
        references, subjects = read_references(args.data)
        if args.content_vae:
            from .flux_vae import FluxVAEConfig

            c = dict(conf.get("content", {}))
            model = c.pop("model", None)
            cfg = _model_config(FluxVAEConfig, model)
            report["content_vae"] = pretrain_content_encoder(args.content_vae, references, cfg, seed=args.seed, **c)
            print(json.dumps({"content_vae": report["content_vae"]}), flush=True)
        if args.dinov2:
            from .dinov2 import Dinov2Config

            c = dict(conf.get("semantic", {}))
            model = c.pop("model", None)
            cfg = _model_config(Dinov2Config, model)
            report["dinov2"] = pretrain_semantic_encoder(args.dinov2, references, subjects, cfg, seed=args.seed, **c)
            print(json.dumps({"dinov2": report["dinov2"]}), flush=True)
    if args.report:
        from .checkpoint import atomic_write

        text = json.dumps(report, indent=1)
        atomic_write(args.report, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return 0
