#!/usr/bin/env python
"""Latency, throughput and memory of EchoGen / Infinity, measured with random weights.

    python benchmarks/run.py --quick                    # CPU set, a few minutes, writes benchmarks/results/latest.json
    python benchmarks/run.py --device cuda              # tiny, 125m and 2b (1024 px, three-row guidance, bf16)
    python benchmarks/run.py --configs 125m --out /tmp/x.json

Random weights give true latency: every matmul, attention and convolution has the shape of the real model
(nothing is skipped for zeros). The parameters are randomised so that no attention is degenerate.

What is timed (see benchmarks/README.md): text encode, subject encode (reference crop, DINOv2, FLUX.1 VAE
encoder), the condition encode inside the sampler (prompt context, subject tokens and the content stream),
every scale (from the sampler's on_scale callback), the BSQ VAE decode; then side-by-side ratios (EchoGen vs
plain Infinity on the same weights, a re-seed with the content-stream K/V kept from the first generation,
cached vs recomputed content stream, batch 1 vs 4, guidance rows stacked vs in sequence) and the cold start
from a converted bf16 safetensors file to the first token. Nothing in echogen_core is changed: stages are
timed by wrapping the models' own methods on the instance for the duration of one call.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

try:
    import resource  # POSIX only
except ImportError:  # pragma: no cover - Windows
    resource = None

from echogen_core.bsq_vae import BSQVAE, BSQVAEConfig  # noqa: E402
from echogen_core.dinov2 import Dinov2, Dinov2Config  # noqa: E402
from echogen_core.echogen import EchoGen, EchoGenConfig  # noqa: E402
from echogen_core.flux_vae import FluxVAEConfig, FluxVAEEncoder  # noqa: E402
from echogen_core.infinity import Infinity  # noqa: E402
from echogen_core.sampler import SamplerSettings, generate  # noqa: E402
from echogen_core.schedules import ScaleSchedule, get_schedule  # noqa: E402
from echogen_core.subject import center_crop_reference, encode_subject, reference_geometry  # noqa: E402

SCHEMA = "echogen-benchmark/1"
PROMPT = "a photo of a corgi sitting on a red bench in a sunny park, shallow depth of field, golden hour light"
# The released EchoGen defaults (used for plain Infinity too, so both sample the same way).
SETTINGS = SamplerSettings(cfg=2.5, subject_cfg=2.5, tau=2.0, top_k=0, top_p=0.97)
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "latest.json"


# --------------------------------------------------------------------------------------------------------------
# Benchmark configurations


@dataclass(frozen=True)
class BenchConfig:
    name: str
    label: str
    model: Callable[[], EchoGenConfig]
    vae: Callable[[], BSQVAEConfig]
    vae_label: str
    size: str                                  # schedule size name: "0.06M" = 256 px ... "1M" = 1024 px
    dinov2: Callable[[], Dinov2Config]
    flux: Callable[[], FluxVAEConfig]
    cuda_only: bool = False
    ratio: float = 1.0                         # aspect template (h/w)

    def schedule(self) -> ScaleSchedule:
        return get_schedule(self.ratio, self.size)


CONFIGS: dict[str, BenchConfig] = {
    # The test-size models at the full 13-scale 1024x1024 schedule (the tiny model has 15 levels).
    "tiny": BenchConfig(
        name="tiny", label="EchoGen-tiny (depth 2, width 128, 8 bits)",
        model=lambda: EchoGenConfig.tiny(semantic_dim=128, content_dim=16, text_maxlen=512),  # tiny encoders' widths
        vae=lambda: BSQVAEConfig.tiny(codebook_dim=8), vae_label="tiny BSQ VAE (8 bits, stride 16, base 16 ch)",
        size="1M", dinov2=Dinov2Config.tiny, flux=FluxVAEConfig.tiny),
    # EchoGen-0.1B: the released 125M (layer12) backbone at 256x256, the real d32 BSQ VAE, the real encoders.
    "125m": BenchConfig(
        name="125m", label="EchoGen-small on Infinity-125M (depth 12, width 768)",
        model=EchoGenConfig.echogen_small, vae=BSQVAEConfig.d32, vae_label="BSQ VAE d32 (infinity_vae_d32reg)",
        size="0.06M", dinov2=Dinov2Config.vit_b14, flux=FluxVAEConfig.flux),
    # EchoGen-2B at 1024x1024 with three-row guidance: GPU only.
    "2b": BenchConfig(
        name="2b", label="EchoGen-2B on Infinity-2B (depth 32, width 2048)",
        model=EchoGenConfig.echogen_2b, vae=BSQVAEConfig.d32, vae_label="BSQ VAE d32 (infinity_vae_d32reg)",
        size="1M", dinov2=Dinov2Config.vit_b14, flux=FluxVAEConfig.flux, cuda_only=True),
}

# flan-t5-xl's encoder (what the released models read): 24 layers, d_model 2048, 32 heads of 64, d_ff 5120.
T5_XL = dict(d_model=2048, d_kv=64, num_heads=32, num_layers=24, d_ff=5120, vocab_size=32128)


# --------------------------------------------------------------------------------------------------------------
# Clock and memory


class Clock:
    """perf_counter that first waits for the GPU, so a timestamp marks finished work."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def stamp(self) -> tuple[float, float]:
        """(wall time, this process's CPU time over all its threads). The CPU time barely moves when other
        processes take the cores from us, so it is the steadier figure on a shared machine."""
        wall = self.now()
        return wall, time.process_time()


def _proc_status_kb(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Memory:
    """Peak memory of a stretch of work.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (tensors only, not the allocator cache).
    CPU: peak resident set size (VmHWM) after resetting it through /proc/self/clear_refs, minus the RSS at the
    reset: the RSS growth. Where the reset is not allowed, the growth of the process's ru_maxrss (a lower
    bound: only growth beyond every earlier peak shows)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.base = 0
        self.can_reset_hwm = False
        if not self.cuda:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.can_reset_hwm = _proc_status_kb("VmHWM") is not None
            except OSError:
                self.can_reset_hwm = False

    @property
    def method(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated - memory_allocated at start"
        if self.can_reset_hwm:
            return "peak RSS growth (VmHWM reset via /proc/self/clear_refs, minus VmRSS at start)"
        return "growth of ru_maxrss (lower bound)"

    def _current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        if self.can_reset_hwm:
            return (_proc_status_kb("VmRSS") or 0) * 1024
        return _ru_maxrss()

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.can_reset_hwm:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        self.base = self._current()

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.can_reset_hwm:
            return (_proc_status_kb("VmHWM") or 0) * 1024
        return _ru_maxrss()

    def report(self) -> dict:
        peak = self.peak()
        return {"peak_bytes": int(peak), "start_bytes": int(self.base), "growth_bytes": int(max(0, peak - self.base))}


def _ru_maxrss() -> int:
    return 0 if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class OtherLoad:
    """Share of the machine's CPU time that *other* processes used between start() and share()
    (from /proc/stat minus our own CPU time): how contended a measurement was."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.busy0 = _cpu_busy_s()
        self.self0 = sum(os.times()[:2])

    def share(self) -> Optional[float]:
        busy1 = _cpu_busy_s()
        wall = time.perf_counter() - self.t0
        if self.busy0 is None or busy1 is None or wall <= 0:
            return None
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        ours = sum(os.times()[:2]) - self.self0
        return round(max(0.0, (busy1 - self.busy0 - ours) / (wall * cores)), 3)


def _free(device: torch.device) -> None:
    """Between measurements on CUDA: collect and give cached blocks back, so each run starts alike. (On the CPU
    freed tensors go back at once; a full gc.collect there costs more than it frees.)"""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------
# Models with random weights


@torch.no_grad()
def randomize_transformer_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter on its own device: linears N(0, 1/fan_in) (activations keep their scale), norm
    weights 1, cosine-attention temperatures log 4 with noise, AdaLN offsets and biases small, the learned
    null features O(1). Gates (content read, AdaLN gammas) are non-zero, so every path carries signal."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "scale_mul" in name:
            p.normal_(math.log(4.0), 0.1, generator=g)
        elif name.endswith("norm.weight"):
            p.fill_(1.0)
        elif "ada_gss" in name:
            p.normal_(0.0, 0.02, generator=g)
        elif name in ("cfg_uncond", "control_features_uncond", "control_features_refer_uncond"):
            p.normal_(0.0, 1.0, generator=g)
        elif p.ndim >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
        else:
            p.normal_(0.0, 0.02, generator=g)
    for name, b in model.named_buffers():
        if "zero" not in name:
            raise RuntimeError(f"benchmark does not know how to initialise buffer {name}")
        b.zero_()
    return model


def build_transformer(cfg: EchoGenConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> EchoGen:
    """EchoGen built on the meta device, materialised on `device`, randomised there (fast even at 2B), then
    split into the official precisions (blocks in `dtype`, the rest fp32)."""
    with torch.device("meta"):
        model = EchoGen(cfg)
    model = model.to_empty(device=device)
    randomize_transformer_(model, seed)
    return model.set_precision(dtype).eval().requires_grad_(False)


def infinity_sharing_weights(echogen: EchoGen) -> Infinity:
    """Plain Infinity on the same backbone: its tensors *are* EchoGen's (no copy, no extra memory)."""
    with torch.device("meta"):
        plain = Infinity(echogen.cfg.backbone)
    sd = echogen.state_dict()
    plain.load_state_dict({k: sd[k] for k in plain.state_dict()}, strict=True, assign=True)
    return plain.eval().requires_grad_(False)


def build_text_encoder(width: int, device: torch.device, mode: str, workdir: Path, t5_folder=None):
    """A T5TextEncoder with a real T5 tokenizer. mode "xl": flan-t5-xl-sized encoder (random weights, fp16 on
    CUDA like the official code); "stand-in": build_tiny_t5's 2-layer encoder at the model's text width."""
    from echogen_core.text_encoder import T5TextEncoder, build_tiny_t5

    if mode == "xl":
        if width != T5_XL["d_model"]:
            raise ValueError(f"flan-t5-xl gives {T5_XL['d_model']}-wide features but the model reads {width}")
        folder = t5_folder or build_tiny_t5(workdir / "t5_tokenizer", d_model=64)
        encoder = T5TextEncoder.from_folder(folder, device="cpu")  # tokenizer (+ a small model we replace)
        from transformers import T5Config, T5EncoderModel

        config = T5Config(**T5_XL, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                          relative_attention_max_distance=128, dropout_rate=0.0, layer_norm_epsilon=1e-6,
                          tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        with torch.device("meta"):
            model = T5EncoderModel(config)
        model = model.to_empty(device=device)
        with torch.no_grad():
            g = torch.Generator(device=device).manual_seed(1)
            for name, p in model.named_parameters():
                if "layer_norm" in name:
                    p.fill_(1.0)
                elif "relative_attention_bias" in name:
                    p.normal_(0.0, 0.1, generator=g)
                elif "shared" in name or "embed_tokens" in name:
                    p.normal_(0.0, 1.0, generator=g)
                else:
                    p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        encoder.model = model.to(dtype).eval().requires_grad_(False)
        label = f"flan-t5-xl-sized encoder ({T5_XL['num_layers']} layers, d{T5_XL['d_model']}, random, {str(dtype)[6:]})"
        return encoder, label
    folder = t5_folder or build_tiny_t5(workdir / f"t5_d{width}", d_model=width)
    encoder = T5TextEncoder.from_folder(folder, device=device)
    if encoder.channels != width:
        raise ValueError(f"the T5 in {folder} gives {encoder.channels}-wide features, the model reads {width}")
    label = (f"T5 stand-in: build_tiny_t5 (2 layers, d{width}, random{', fp16' if device.type == 'cuda' else ''}); "
             "flan-t5-xl has 24 layers")
    return encoder, label


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def weight_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


def reference_image(seed: int = 0):
    """A synthetic 640x480 photo (random, smooth-ish): the reference goes through the real crop and encoders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((640, 480), Image.BILINEAR)


# --------------------------------------------------------------------------------------------------------------
# One instrumented generation


class _StopAfterFirstScale(Exception):
    pass


def timed_generate(model, vae, text, schedule, *, subject=None, clock: Clock, memory: Memory, decode: bool,
                   recompute_conditions: bool = False, stop_after_first_scale: bool = False, seed: int = 0,
                   settings: SamplerSettings = SETTINGS, warm_cache: bool = False) -> dict:
    """Run the real sampler once; return its stage times.

    The condition encode (EchoGen.encode_conditions, or Infinity.encode_text) and VAE.decode are wrapped on the
    instance for this call; each scale ends at its on_scale callback. With `recompute_conditions`, the callback
    calls encode_conditions again before every following scale and swaps the new context into the one the
    sampler holds: what an implementation without the cache would do (text K/V included, as the official
    sampler recomputes them per scale too; EchoGen's cross-generation content cache is off for that run).

    EchoGen's content cache (content-stream K/V kept across generations) is emptied first, so every figure is
    that of a first generation, unless `warm_cache` (the re-seed figure)."""
    cache = getattr(model, "content_cache", None)
    capacity = None if cache is None else cache.capacity
    if cache is not None and not warm_cache:
        cache.clear()
    if cache is not None and recompute_conditions:
        cache.capacity = 0  # every recompute runs the content stream again
    is_echogen = hasattr(model, "encode_conditions")
    attr = "encode_conditions" if is_echogen else "encode_text"
    original = getattr(model, attr)
    original_decode = vae.decode
    marks: dict = {"cond": None, "scale_end": [], "decode": [], "recompute": [], "loop_peak": None, "decode_peaks": []}
    held: dict = {}

    def conditions(*args, **kwargs):
        t0 = clock.stamp()
        ctx = original(*args, **kwargs)
        t1 = clock.stamp()
        if marks["cond"] is None:
            marks["cond"] = (t0, t1)
            held.update(args=args, kwargs=kwargs, ctx=ctx)
        return ctx

    def on_scale(s, n, _summed):
        marks["scale_end"].append(clock.stamp())
        if stop_after_first_scale:
            raise _StopAfterFirstScale
        if recompute_conditions and s + 1 < n:
            t0 = clock.now()
            fresh = original(*held["args"], **held["kwargs"])
            held["ctx"].__dict__.update(fresh.__dict__)  # the sampler keeps using the same context object
            marks["recompute"].append(clock.now() - t0)

    def decode_fn(codes):
        if marks["loop_peak"] is None:
            marks["loop_peak"] = memory.report()
            memory.reset()
        t0 = clock.stamp()
        out = original_decode(codes)
        t1 = clock.stamp()
        marks["decode"].append((t1[0] - t0[0], t1[1] - t0[1]))
        marks["decode_peaks"].append(memory.report())
        return out

    setattr(model, attr, conditions)
    vae.decode = decode_fn
    memory.reset()
    result = None
    load = OtherLoad()
    start = clock.stamp()
    try:
        result = generate(model, vae, text, schedule, settings, seed=seed, on_scale=on_scale, decode=decode,
                          subject=subject)
    except _StopAfterFirstScale:
        pass
    finally:
        end = clock.stamp()
        delattr(model, attr)
        del vae.decode
        if cache is not None:
            cache.capacity = capacity
    loop_peak = marks["loop_peak"] or memory.report()
    out = {"other_processes_cpu_share": load.share()}
    # index 0: wall clock ("..._s"), index 1: process CPU time (under "cpu_s")
    for i, key in enumerate((None, "cpu_s")):
        cond0, cond1 = (m[i] for m in marks["cond"])
        ends = [m[i] for m in marks["scale_end"]]
        scales = [ends[0] - cond1] + [b - a for a, b in zip(ends, ends[1:])]
        part = {"total_s": end[i] - start[i], "setup_s": cond0 - start[i], "conditions_s": cond1 - cond0,
                "scales_s": scales, "scale_loop_s": sum(scales), "decode_s": sum(d[i] for d in marks["decode"])}
        part["other_s"] = part["total_s"] - part["setup_s"] - part["conditions_s"] - part["scale_loop_s"] - part["decode_s"]
        if key is None:
            out.update(part)
        else:
            out[key] = part
    out["peak_memory"] = {"conditions_and_scales": loop_peak}
    if marks["decode_peaks"]:
        out["peak_memory"]["decode"] = max(marks["decode_peaks"], key=lambda r: r["growth_bytes"])
    if recompute_conditions:
        out["recompute_s"] = sum(marks["recompute"])
    out["_bits"] = None if result is None else result.bits
    return out


def _trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc malloc_trim), so that a peak RSS growth measured next
    starts from what is really in use. No-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _median_run(runs: list[dict]) -> dict:
    """The run with the median total (its stage times are consistent with each other), plus all totals."""
    ordered = sorted(runs, key=lambda r: r["total_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["repeats_total_s"] = [r["total_s"] for r in runs]
    return chosen


def _public(run: dict) -> dict:
    return {k: v for k, v in run.items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------------------------
# Page cache helpers for the cold start


def evict_from_page_cache(path: Path) -> bool:
    """Write back and drop the file's pages (posix_fadvise DONTNEED): the next read comes from the disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def resident_fraction(path: Path) -> Optional[float]:
    """Fraction of the file's pages in the page cache (mincore), or None where it cannot be asked."""
    try:
        import ctypes
        import mmap

        import numpy as np

        size = os.path.getsize(path)
        if size == 0:
            return None
        libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        n = (size + page - 1) // page
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
            try:
                buf = (ctypes.c_char * size).from_buffer(mm)
                vec = (ctypes.c_ubyte * n)()
                rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec)
                del buf
            finally:
                mm.close()
        if rc != 0:
            return None
        return float((np.frombuffer(vec, dtype=np.uint8) & 1).mean())
    except Exception:  # noqa: BLE001 - best effort, reported as unknown
        return None


# --------------------------------------------------------------------------------------------------------------
# The measurement of one configuration


RATIOS = ("echogen_vs_infinity", "reseed", "content_stream", "batch", "sequential_rows")


def measure_config(spec: BenchConfig, device="cpu", *, schedule: Optional[ScaleSchedule] = None,
                   sections=("e2e", "ratios", "cold_start"), ratios=RATIOS,
                   batch: int = 4, repeats: int = 1, warmup: str = "auto", t5: str = "auto", t5_folder=None,
                   precision: str = "auto", log: Callable[[str], None] = print) -> dict:
    """Build the models of `spec` with random weights on `device` and measure them. Returns a JSON-ready dict.

    sections: "e2e" (always run: the other sections reuse its features), "ratios", "cold_start".
    ratios: which side-by-side comparisons to run. warmup: "auto" (full on CUDA, light on CPU), "full", "light",
    "none". t5: "auto" (flan-t5-xl-sized on CUDA when the model reads 2048-wide features, else the stand-in),
    "xl", "stand-in". precision: "auto" (bf16 on CUDA, fp32 on CPU, as the command line), "bf16", "fp32"."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    if spec.cuda_only and not cuda:
        return {"status": "skipped", "reason": f"{spec.name} runs only with --device cuda (1024 px, 2B weights)"}
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32,
             "fp16": torch.float16}[precision]
    schedule = schedule or spec.schedule()
    warmup = ("full" if cuda else "light") if warmup == "auto" else warmup
    cfg = spec.model()
    t5_mode = ("xl" if cuda and cfg.text_channels == T5_XL["d_model"] else "stand-in") if t5 == "auto" else t5
    clock, memory = Clock(device), Memory(device)
    workdir = Path(tempfile.mkdtemp(prefix=f"echogen-bench-{spec.name}-"))
    out: dict = {"status": "ok", "label": spec.label, "device": str(device)}
    try:
        with torch.no_grad():
            out.update(_measure(spec, cfg, device, dtype, schedule, sections, ratios, batch, repeats, warmup,
                                t5_mode, t5_folder, workdir, clock, memory, log))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        _free(device)
    return out


def _measure(spec, cfg, device, dtype, schedule, sections, ratios, batch, repeats, warmup, t5_mode, t5_folder,
             workdir, clock, memory, log) -> dict:
    cuda = device.type == "cuda"
    t_build = time.perf_counter()
    log(f"[{spec.name}] building models with random weights on {device} ...")
    echogen = build_transformer(cfg, device, dtype)
    with torch.device(device):
        vae = BSQVAE(spec.vae()).eval().requires_grad_(False)
        dinov2 = Dinov2(spec.dinov2()).eval().requires_grad_(False)
        flux = FluxVAEEncoder(spec.flux()).eval().requires_grad_(False)
    t5, t5_label = build_text_encoder(cfg.text_channels, device, t5_mode, workdir, t5_folder)
    build_s = time.perf_counter() - t_build
    crop, dino_size = reference_geometry(cfg)
    n_control = sum(p.numel() for k, p in echogen.named_parameters() if "control" in k)
    info = {
        "config": {"name": spec.name, "echogen": cfg.to_dict(), "preset": cfg.preset_name()},
        "precision": {"transformer_blocks": str(dtype)[6:], "rest_of_transformer": "float32",
                      "text_encoder": str(t5.dtype)[6:], "dinov2": "float32", "content_vae": "float32",
                      "bsq_vae": "float32"},
        "schedule": {"resolution": f"{schedule.width}x{schedule.height}", "size": schedule.size,
                     "scales": schedule.num_scales, "grids": [list(g) for g in schedule.grids],
                     "tokens_per_image": schedule.total_tokens},
        "models": {
            "transformer": {"params": count_params(echogen), "control_params": n_control,
                            "backbone_params": count_params(echogen) - n_control, "bytes": weight_bytes(echogen)},
            "bsq_vae": {"label": spec.vae_label, "params": count_params(vae), "bytes": weight_bytes(vae)},
            "text_encoder": {"label": t5_label, "params": count_params(t5.model), "bytes": weight_bytes(t5.model)},
            "dinov2": {"label": f"DINOv2 ViT (width {dinov2.cfg.embed_dim}, depth {dinov2.cfg.depth}) at "
                                f"{dino_size} px", "params": count_params(dinov2), "bytes": weight_bytes(dinov2)},
            "content_vae": {"label": f"FLUX.1 VAE encoder (ch {flux.cfg.ch}) at {crop} px",
                            "params": count_params(flux), "bytes": weight_bytes(flux)},
        },
        "reference": {"crop_px": crop, "dinov2_px": dino_size, "semantic_tokens": cfg.semantic_len,
                      "content_tokens": cfg.content_len},
        "build_s": build_s, "warmup": warmup, "memory_method": memory.method,
    }
    log(f"[{spec.name}] built in {build_s:.1f} s: transformer {info['models']['transformer']['params'] / 1e6:.1f} M "
        f"params ({n_control / 1e6:.1f} M control), {schedule.describe()}")
    plain = infinity_sharing_weights(echogen)
    pil = reference_image()

    def encode_text_timed(prompts):
        memory.reset()
        t0 = clock.stamp()
        text = t5.encode(prompts)
        t1 = clock.stamp()
        return text, (t1[0] - t0[0], t1[1] - t0[1]), memory.report()

    def encode_subject_timed():
        times = {}
        originals = {"dinov2": dinov2.encode, "content_vae": flux.content_tokens}

        def wrap(key, fn):
            def inner(*a, **k):
                t0 = clock.now()
                r = fn(*a, **k)
                times[key] = clock.now() - t0
                return r
            return inner

        dinov2.encode = wrap("dinov2", originals["dinov2"])
        flux.content_tokens = wrap("content_vae", originals["content_vae"])
        memory.reset()
        t0 = clock.stamp()
        try:
            ref = center_crop_reference(pil, crop)
            subject = encode_subject(ref, cfg, dinov2, flux)
        finally:
            del dinov2.encode, flux.content_tokens
        t1 = clock.stamp()
        return subject, (t1[0] - t0[0], t1[1] - t0[1]), times, memory.report()

    # -- warm-up --------------------------------------------------------------------------------------------
    if warmup != "none":
        t0 = time.perf_counter()
        text1, _, _ = encode_text_timed([PROMPT])
        short = replace(schedule, grids=schedule.grids[:2])
        timed_generate(plain, vae, text1, short, clock=clock, memory=memory, decode=False)
        if warmup == "full":
            subject, *_ = encode_subject_timed()
            timed_generate(echogen, vae, text1, schedule, subject=subject, clock=clock, memory=memory, decode=True)
            timed_generate(plain, vae, text1, schedule, clock=clock, memory=memory, decode=False)
        info["warmup_s"] = time.perf_counter() - t0
        log(f"[{spec.name}] warm-up ({warmup}) {info['warmup_s']:.1f} s")

    # -- end to end -----------------------------------------------------------------------------------------
    runs = []
    for _ in range(max(1, repeats)):
        _free(device)
        load = OtherLoad()
        t0 = clock.stamp()
        text, text_t, text_mem = encode_text_timed([PROMPT])
        subject, subject_t, subject_parts, subject_mem = encode_subject_timed()
        gen = timed_generate(echogen, vae, text, schedule, subject=subject, clock=clock, memory=memory, decode=True)
        t1 = clock.stamp()
        runs.append({"total_s": t1[0] - t0[0], "text_encode_s": text_t[0], "subject_encode_s": subject_t[0],
                     "cpu_s": {"total_s": t1[1] - t0[1], "text_encode_s": text_t[1], "subject_encode_s": subject_t[1]},
                     "subject_parts_s": subject_parts, "generate": gen, "other_processes_cpu_share": load.share(),
                     "peak_memory": {"text_encode": text_mem, "subject_encode": subject_mem, **gen["peak_memory"]}})
    e2e = _median_run(runs)
    gen = e2e["generate"]
    tokens = schedule.total_tokens
    e2e.update({
        "batch": 1, "guidance_rows": 3, "prompt_tokens": int(text.lengths.max()),
        "stages_s": {
            "text_encode": e2e["text_encode_s"], "subject_encode": e2e["subject_encode_s"],
            "conditions": gen["conditions_s"], "scales": gen["scales_s"], "scale_loop": gen["scale_loop_s"],
            "decode": gen["decode_s"],
            "other": e2e["total_s"] - e2e["text_encode_s"] - e2e["subject_encode_s"] - gen["conditions_s"]
            - gen["scale_loop_s"] - gen["decode_s"],
        },
        "tokens_per_s": {"end_to_end": tokens / e2e["total_s"], "scale_loop": tokens / gen["scale_loop_s"]},
    })
    gc_ = gen["cpu_s"]
    e2e["stages_cpu_s"] = {
        "text_encode": e2e["cpu_s"]["text_encode_s"], "subject_encode": e2e["cpu_s"]["subject_encode_s"],
        "conditions": gc_["conditions_s"], "scales": gc_["scales_s"], "scale_loop": gc_["scale_loop_s"],
        "decode": gc_["decode_s"], "total": e2e["cpu_s"]["total_s"]}
    if cuda:
        enc_bytes = weight_bytes(t5.model) + weight_bytes(dinov2) + weight_bytes(flux)
        peaks = gen["peak_memory"]
        peak = max(peaks["conditions_and_scales"]["peak_bytes"], peaks.get("decode", {}).get("peak_bytes", 0))
        e2e["peak_memory"]["generate_with_encoders_offloaded_bytes (derived)"] = peak - enc_bytes
    e2e["generate"] = _public(gen)
    info["e2e"] = e2e
    log(f"[{spec.name}] end to end {e2e['total_s']:.2f} s")
    bits_cached = gen["_bits"]
    result = info

    # -- side by side -----------------------------------------------------------------------------------------
    if "ratios" in sections:
        result["ratios"] = {}
        sampler_3row = gen["total_s"] - gen["decode_s"]  # this very run, the sampler without the decode
        sampler_3row_cpu = gen["cpu_s"]["total_s"] - gen["cpu_s"]["decode_s"]

        def cpu(run_):
            return run_["cpu_s"]["total_s"]

        def run(model, text_rows, **kw):
            rs = []
            for _ in range(max(1, repeats)):
                _free(device)
                rs.append(timed_generate(model, vae, text_rows, schedule, clock=clock, memory=memory, decode=False, **kw))
            return _median_run(rs)

        if "reseed" in ratios:
            # First of the side-by-side runs: the content cache still holds the end-to-end generation's streams.
            before = echogen.content_cache.misses
            reseed = run(echogen, text, subject=subject, seed=1, warm_cache=True)
            reseed_streams = echogen.content_cache.misses - before
        if {"echogen_vs_infinity", "reseed"} & set(ratios):
            inf = run(plain, text)
        if "reseed" in ratios:
            result["ratios"]["reseed"] = {
                "note": "sampler only, three-row guidance, decode excluded. first: the end-to-end run's generation, "
                        "content cache cold (the three content streams run). reseed: the same subject and prompt "
                        "again with a new seed (1); the content-stream K/V kept from the first generation are "
                        "reused, no stream runs. Infinity 2-row: plain text-to-image with guidance, same weights.",
                "first_s": sampler_3row, "reseed_s": reseed["total_s"], "infinity_2row_s": inf["total_s"],
                "ratio_reseed_vs_first": reseed["total_s"] / sampler_3row,
                "ratio_reseed_vs_infinity": reseed["total_s"] / inf["total_s"],
                "ratio_first_vs_infinity": sampler_3row / inf["total_s"],
                "content_stream_rows_run": reseed_streams,
                "conditions_s": {"first": gen["conditions_s"], "reseed": reseed["conditions_s"],
                                 "infinity_2row": inf["conditions_s"]},
                "cpu_time": {"first_s": sampler_3row_cpu, "reseed_s": cpu(reseed), "infinity_2row_s": cpu(inf),
                             "ratio_reseed_vs_first": cpu(reseed) / sampler_3row_cpu,
                             "ratio_reseed_vs_infinity": cpu(reseed) / cpu(inf),
                             "ratio_first_vs_infinity": sampler_3row_cpu / cpu(inf)},
                "reseed": _public(reseed),
            }
            log(f"[{spec.name}] re-seed: {reseed['total_s'] / sampler_3row:.2f}x the first generation, "
                f"{reseed['total_s'] / inf['total_s']:.2f}x Infinity 2-row ({reseed_streams} content streams run)")
        if "echogen_vs_infinity" in ratios:
            two = run(echogen, text)  # subject=None: 2 rows (text, empty) with the learned null subject
            result["ratios"]["echogen_vs_infinity"] = {
                "note": "sampler only (conditions + scales; decode excluded, it is the same VAE); same weights, "
                        "same resolution, same settings. Infinity: 2 guidance rows (text, empty). EchoGen 3-row: "
                        "(text+subject, text, empty), what subject-driven generation runs. EchoGen 2-row: EchoGen "
                        "with the learned null subject in both rows: the injection cost alone.",
                "infinity_2row_s": inf["total_s"], "echogen_3row_s": sampler_3row, "echogen_2row_s": two["total_s"],
                "ratio_3row": sampler_3row / inf["total_s"], "ratio_2row": two["total_s"] / inf["total_s"],
                "target": 1.3,
                "cpu_time": {"infinity_2row_s": cpu(inf), "echogen_3row_s": sampler_3row_cpu, "echogen_2row_s": cpu(two),
                             "ratio_3row": sampler_3row_cpu / cpu(inf), "ratio_2row": cpu(two) / cpu(inf)},
                "infinity_2row": _public(inf), "echogen_2row": _public(two),
            }
            log(f"[{spec.name}] EchoGen/Infinity: 3-row {sampler_3row / inf['total_s']:.2f}x, 2-row "
                f"{two['total_s'] / inf['total_s']:.2f}x")
        if "content_stream" in ratios:
            rec = run(echogen, text, subject=subject, recompute_conditions=True)
            same = rec["_bits"] is not None and all(torch.equal(a, b) for a, b in zip(rec["_bits"], bits_cached))
            result["ratios"]["content_stream"] = {
                "note": "sampler only. cached: conditions (prompt context, semantic tokens, content stream) computed "
                        "once, as our sampler does. recomputed: encode_conditions called again before every scale.",
                "cached_s": sampler_3row, "recomputed_s": rec["total_s"], "ratio": rec["total_s"] / sampler_3row,
                "saved_s": rec["total_s"] - sampler_3row, "same_bits": bool(same),
                "cpu_time": {"cached_s": sampler_3row_cpu, "recomputed_s": cpu(rec), "ratio": cpu(rec) / sampler_3row_cpu},
                "recomputed": _public(rec),
            }
            log(f"[{spec.name}] content stream recomputed/cached {rec['total_s'] / sampler_3row:.2f}x")
        if "batch" in ratios and batch > 1:
            text_b, _, _ = encode_text_timed([PROMPT] * batch)
            try:
                rb = run(echogen, text_b, subject=subject)
                result["ratios"]["batch"] = {
                    "note": f"sampler only, three-row guidance; batch {batch} = {batch} images of one subject and "
                            f"prompt (seeds 0..{batch - 1}); per image = total / {batch}.",
                    "batch": batch, "batch1_s": sampler_3row, f"batch{batch}_s": rb["total_s"],
                    "per_image_s": rb["total_s"] / batch, "ratio_per_image": rb["total_s"] / batch / sampler_3row,
                    "tokens_per_s": batch * tokens / rb["scale_loop_s"],
                    "cpu_time": {"batch1_s": sampler_3row_cpu, f"batch{batch}_s": cpu(rb),
                                 "ratio_per_image": cpu(rb) / batch / sampler_3row_cpu},
                    "run": _public(rb),
                }
                log(f"[{spec.name}] batch {batch}: {rb['total_s'] / batch:.2f} s per image "
                    f"({rb['total_s'] / batch / sampler_3row:.2f}x batch 1)")
            except torch.cuda.OutOfMemoryError as e:  # type: ignore[attr-defined]
                result["ratios"]["batch"] = {"batch": batch, "error": f"out of memory: {str(e)[:200]}"}
        if "sequential_rows" in ratios:
            runs = {}
            for mode, settings in (("stacked", SETTINGS), ("sequential", replace(SETTINGS, sequential_rows=True))):
                _trim_heap()  # CPU: free heap pages back to the OS, so that each RSS growth starts alike
                runs[mode] = run(echogen, text, subject=subject, settings=settings)
            st, sq = runs["stacked"], runs["sequential"]

            def grown(r):
                return r["peak_memory"]["conditions_and_scales"]["growth_bytes"]

            same = sq["_bits"] is not None and all(torch.equal(a, b) for a, b in zip(sq["_bits"], st["_bits"]))
            result["ratios"]["sequential_rows"] = {
                "note": "sampler only, three-row guidance, decode excluded, content cache cold in both. stacked: the "
                        "three guidance rows in one batch per forward (the default). sequential: "
                        "SamplerSettings(sequential_rows=True), one row group per forward, each with its own KV "
                        "cache (low-memory mode). Peak memory: growth during conditions + scales.",
                "stacked_s": st["total_s"], "sequential_s": sq["total_s"], "ratio_time": sq["total_s"] / st["total_s"],
                "stacked_peak_growth_bytes": grown(st), "sequential_peak_growth_bytes": grown(sq),
                "ratio_memory": grown(sq) / grown(st) if grown(st) else None,
                "memory_method": memory.method, "same_bits": bool(same),
                "cpu_time": {"stacked_s": cpu(st), "sequential_s": cpu(sq), "ratio_time": cpu(sq) / cpu(st)},
                "device_note": None if cuda else (
                    "CPU figures: time, and the process's peak RSS growth (what the allocator took from the OS, "
                    "weights excluded). The GPU activation memory that low-memory mode is for needs a GPU: "
                    "python benchmarks/run.py --device cuda (torch.cuda.max_memory_allocated)."),
                "stacked": _public(st), "sequential": _public(sq),
            }
            log(f"[{spec.name}] guidance rows in sequence/stacked: time {sq['total_s'] / st['total_s']:.2f}x, "
                f"peak memory growth {_fmt_bytes(grown(sq))} vs {_fmt_bytes(grown(st))} (same bits: {same})")
        skipped = [r for r in RATIOS if r not in ratios]
        if skipped:
            result["ratios"]["skipped"] = skipped
        if "content_stream" not in ratios:
            estimate = sampler_3row + (schedule.num_scales - 1) * gen["conditions_s"]
            estimate_cpu = sampler_3row_cpu + (schedule.num_scales - 1) * gen["cpu_s"]["conditions_s"]
            result["ratios"]["content_stream_estimate"] = {
                "cpu_time": {"cached_s": sampler_3row_cpu, "recomputed_estimate_s": estimate_cpu,
                             "ratio_estimate": estimate_cpu / sampler_3row_cpu},
                "note": "NOT measured (skipped to save time): cached sampler time of this run plus (scales - 1) x "
                        "its measured conditions time, i.e. what recomputing before every scale would add.",
                "cached_s": sampler_3row, "recomputed_estimate_s": estimate, "ratio_estimate": estimate / sampler_3row,
            }

    # -- cold start ---------------------------------------------------------------------------------------------
    if "cold_start" in sections:
        result["cold_start"] = cold_start(echogen, vae, text, subject, schedule, device, dtype, workdir, clock, log,
                                          spec.name)
    return result


def cold_start(echogen, vae, text, subject, schedule, device, dtype, workdir, clock, log, name) -> dict:
    """Write the model as a converted bf16 safetensors file (checkpoint.convert), then twice: load it onto the
    device and sample up to the first scale's tokens. Run 1 starts with the file's pages dropped from the page
    cache; run 2 finds them cached. Text and subject features are precomputed (their encoders have their own
    files); process start, imports and CUDA context creation are not included."""
    from safetensors.torch import save_file

    from echogen_core.checkpoint import convert, load_echogen

    src, dst = workdir / "source.safetensors", workdir / "model_bf16.safetensors"
    t0 = time.perf_counter()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in echogen.state_dict().items()}, str(src))
    info = convert(src, dst, dtype=torch.bfloat16)
    src.unlink()
    prep_s = time.perf_counter() - t0
    runs = []
    for i in (1, 2):
        _free(device)
        evicted = evict_from_page_cache(dst) if i == 1 else False
        cached = resident_fraction(dst)
        t0 = clock.now()
        model = load_echogen(dst, device=device, dtype=dtype)
        t_load = clock.now()
        memory = Memory(device)
        first = timed_generate(model, vae, text, schedule, subject=subject, clock=clock, memory=memory,
                               decode=False, stop_after_first_scale=True)
        t_first = clock.now()
        runs.append({"run": i, "page_cache_dropped": evicted, "resident_fraction_before": cached,
                     "load_s": t_load - t0, "to_first_token_s": t_first - t0,
                     "conditions_s": first["conditions_s"], "first_scale_s": first["scales_s"][0],
                     "read_mb_per_s": info["bytes"] / 1e6 / (t_load - t0)})
        del model
        log(f"[{name}] cold start run {i}: load {t_load - t0:.2f} s, first token {t_first - t0:.2f} s "
            f"(file {'dropped from' if evicted else 'in'} page cache, resident {cached})")
    dst.unlink()
    return {"file_bytes": info["bytes"], "file_tensors": info["tensors"], "write_and_convert_s": prep_s,
            "note": "converted bf16 safetensors (checkpoint.convert) -> load_echogen -> sampler up to the first "
                    "scale's sampled tokens. Run 1: page cache dropped (posix_fadvise DONTNEED); run 2: cached.",
            "runs": runs}


# --------------------------------------------------------------------------------------------------------------
# Machine information


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_busy_s() -> Optional[float]:
    """Seconds of CPU time all processes have used since boot (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()[1:]
        values = [int(v) for v in parts]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _git(*args) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


class MachineMonitor:
    """Machine description, and how busy the machine was with other work while we ran."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t0 = time.perf_counter()
        self.busy0 = _cpu_busy_s()
        self.self0 = sum(os.times()[:2])
        self.load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    def describe(self) -> dict:
        cores = os.cpu_count()
        try:
            usable = len(os.sched_getaffinity(0))
        except AttributeError:
            usable = cores
        wall = time.perf_counter() - self.t0
        busy1 = _cpu_busy_s()
        ours = sum(os.times()[:2]) - self.self0
        other = None
        if self.busy0 is not None and busy1 is not None and wall > 0 and usable:
            other = max(0.0, (busy1 - self.busy0 - ours) / (wall * usable))
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        mem_total = None
        try:
            with open("/proc/meminfo") as f:
                mem_total = int(f.readline().split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        info = {
            "cpu_model": _cpu_model(), "cpu_cores": cores, "cpu_cores_usable": usable,
            "torch_threads": torch.get_num_threads(), "ram_bytes": mem_total,
            "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else _cpu_model(),
            "cuda": torch.version.cuda if self.device.type == "cuda" else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": _git("rev-parse", "HEAD"),
            "git_uncommitted_tracked_changes": [ln[3:] for ln in dirty.splitlines()] if dirty else [],
            "load_average_before": self.load_before,
            "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "wall_s": wall, "cpu_time_ours_s": ours,
            "other_processes_cpu_share": other,
        }
        if self.device.type == "cuda":
            info["gpu_memory_bytes"] = torch.cuda.get_device_properties(self.device).total_memory
        return info


def contention_note(machine: dict) -> Optional[str]:
    other = machine.get("other_processes_cpu_share")
    loads = [x for x in (machine.get("load_average_before") or []) + (machine.get("load_average_after") or [])]
    cores = machine.get("cpu_cores_usable") or 1
    if (other is not None and other > 0.05) or (loads and max(loads) > 0.5 * cores):
        share = "unknown" if other is None else f"{100 * other:.0f}%"
        return (f"Other processes competed for the {cores} cores during this run: they used {share} of the machine's "
                f"CPU time while it ran (load average before {machine.get('load_average_before')}, after "
                f"{machine.get('load_average_after')}). CPU figures are slower and noisier than on an idle machine.")
    return None


# --------------------------------------------------------------------------------------------------------------
# Printing


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_config(name: str, r: dict) -> str:
    if r.get("status") != "ok":
        return f"== {name}: {r.get('status')} -- {r.get('reason', '')}"
    lines = []
    s, e2e = r["schedule"], r["e2e"]
    st, sc, gen, pm = e2e["stages_s"], e2e["stages_cpu_s"], e2e["generate"], e2e["peak_memory"]
    on_cpu = r.get("device", "cpu").startswith("cpu")
    m = r["models"]
    lines.append(f"== {name}: {r['label']}, {s['resolution']}, {s['scales']} scales, {s['tokens_per_image']} tokens, "
                 f"batch 1, 3 guidance rows, blocks {r['precision']['transformer_blocks']}, {r.get('device', '')}")
    lines.append(f"   text: {m['text_encoder']['label']}")
    lines.append(f"   subject: {m['dinov2']['label']} + {m['content_vae']['label']}; decode: {m['bsq_vae']['label']}")
    total = e2e["total_s"]
    rows = [("text encode", st["text_encode"], sc["text_encode"], pm["text_encode"]),
            ("subject encode", st["subject_encode"], sc["subject_encode"], pm["subject_encode"])]
    for k, v in e2e["subject_parts_s"].items():
        rows.append((f"  {'DINOv2' if k == 'dinov2' else 'FLUX VAE encoder'}", v, None, None))
    rows.append(("conditions + content stream", st["conditions"], sc["conditions"], None))
    for i, (t, c, g) in enumerate(zip(st["scales"], sc["scales"], s["grids"])):
        label = f"scale {i + 1:>2} ({g[0]}x{g[1]})" + (" + cross K/V" if i == 0 else "")
        rows.append((label, t, c, pm["conditions_and_scales"] if i == len(st["scales"]) - 1 else None))
    rows.append(("  all scales", st["scale_loop"], sc["scale_loop"], None))
    rows.append(("decode (BSQ VAE)", st["decode"], sc["decode"], pm.get("decode")))
    rows.append(("other", st["other"], None, None))
    cpu_head = f"{'cpu s':>9}" if on_cpu else ""
    lines.append(f"   {'stage':<30}{'time s':>9}{'share':>8}{cpu_head}{'peak mem +':>24}")
    for label, t, c, mem in rows:
        mem_s = "" if mem is None else _fmt_bytes(mem["growth_bytes"])
        if label.startswith("scale ") and mem is not None:
            mem_s = "(conditions+scales) " + mem_s
        cpu_s = (f"{c:>9.3f}" if c is not None else " " * 9) if on_cpu else ""
        lines.append(f"   {label:<30}{t:>9.3f}{100 * t / total:>7.1f}%{cpu_s}{mem_s:>24}")
    cpu_s = f"{sc['total']:>9.3f}" if on_cpu else ""
    lines.append(f"   {'end to end':<30}{total:>9.3f}{100.0:>7.1f}%{cpu_s}")
    tps = e2e["tokens_per_s"]
    lines.append(f"   tokens/s: {tps['end_to_end']:.1f} end to end, {tps['scale_loop']:.1f} in the scale loop. "
                 f"Memory: {r['memory_method']}")
    if on_cpu:
        lines.append("   cpu s = this process's CPU time over all its threads (steadier than wall time on a shared machine)")
    if e2e.get("other_processes_cpu_share") is not None:
        lines.append(f"   other processes used {100 * e2e['other_processes_cpu_share']:.0f}% of the machine's CPU time "
                     "during the end-to-end run")
    if "generate_with_encoders_offloaded_bytes (derived)" in pm:
        lines.append(f"   generate peak with the encoders offloaded (derived): "
                     f"{_fmt_bytes(pm['generate_with_encoders_offloaded_bytes (derived)'])}")

    def cpu_ratio(x, key):
        return f", cpu time {x['cpu_time'][key]:.2f}x" if on_cpu and "cpu_time" in x else ""

    ratios = r.get("ratios", {})
    if ratios:
        lines.append("   side by side (sampler only, no decode; wall time, and CPU time on the CPU):")
    if "echogen_vs_infinity" in ratios:
        x = ratios["echogen_vs_infinity"]
        inf, two = x["infinity_2row"], x["echogen_2row"]
        lines.append(f"     EchoGen 3-row / Infinity 2-row   {x['echogen_3row_s']:.3f} / {x['infinity_2row_s']:.3f} s = "
                     f"{x['ratio_3row']:.2f}x{cpu_ratio(x, 'ratio_3row')}   (target <= {x['target']}x)")
        lines.append(f"         conditions {gen['conditions_s']:.3f} vs {inf['conditions_s']:.3f} s, scales "
                     f"{gen['scale_loop_s']:.3f} vs {inf['scale_loop_s']:.3f} s")
        lines.append(f"     EchoGen 2-row / Infinity 2-row   {x['echogen_2row_s']:.3f} / {x['infinity_2row_s']:.3f} s = "
                     f"{x['ratio_2row']:.2f}x{cpu_ratio(x, 'ratio_2row')}   (injection alone, same rows)")
        lines.append(f"         conditions {two['conditions_s']:.3f} s, scales {two['scale_loop_s']:.3f} s")
    if "reseed" in ratios:
        x = ratios["reseed"]
        lines.append(f"     EchoGen 3-row re-seed / first     {x['reseed_s']:.3f} / {x['first_s']:.3f} s = "
                     f"{x['ratio_reseed_vs_first']:.2f}x{cpu_ratio(x, 'ratio_reseed_vs_first')}   (same subject and "
                     f"prompt, new seed: content streams kept, {x['content_stream_rows_run']} run)")
        lines.append(f"     EchoGen 3-row re-seed / Infinity 2-row {x['reseed_s']:.3f} / {x['infinity_2row_s']:.3f} s = "
                     f"{x['ratio_reseed_vs_infinity']:.2f}x{cpu_ratio(x, 'ratio_reseed_vs_infinity')}   (first "
                     f"generation: {x['ratio_first_vs_infinity']:.2f}x)")
    if "sequential_rows" in ratios:
        x = ratios["sequential_rows"]
        lines.append(f"     guidance rows in sequence / stacked {x['sequential_s']:.3f} / {x['stacked_s']:.3f} s = "
                     f"{x['ratio_time']:.2f}x{cpu_ratio(x, 'ratio_time')}; peak memory + "
                     f"{_fmt_bytes(x['sequential_peak_growth_bytes'])} / {_fmt_bytes(x['stacked_peak_growth_bytes'])}"
                     f"   (low-memory mode; same bits: {x['same_bits']})")
        if x.get("device_note"):
            lines.append(f"         {x['device_note']}")
    if "content_stream" in ratios:
        x = ratios["content_stream"]
        lines.append(f"     content stream recomputed/cached {x['recomputed_s']:.3f} / {x['cached_s']:.3f} s = "
                     f"{x['ratio']:.2f}x{cpu_ratio(x, 'ratio')}   (same bits: {x['same_bits']})")
    if "content_stream_estimate" in ratios:
        x = ratios["content_stream_estimate"]
        lines.append(f"     content stream recomputed/cached ~{x['ratio_estimate']:.2f}x{cpu_ratio(x, 'ratio_estimate')}"
                     f"   (ESTIMATE, not run: cached + (scales - 1) x conditions)")
    if "batch" in ratios:
        x = ratios["batch"]
        if "error" in x:
            lines.append(f"     batch {x['batch']}: {x['error']}")
        else:
            lines.append(f"     batch {x['batch']} per image / batch 1    {x['per_image_s']:.3f} / {x['batch1_s']:.3f} s = "
                         f"{x['ratio_per_image']:.2f}x{cpu_ratio(x, 'ratio_per_image')}")
    if ratios.get("skipped"):
        lines.append(f"     not run here: {', '.join(ratios['skipped'])}")
    if "cold_start" in r:
        c = r["cold_start"]
        lines.append(f"   cold start ({_fmt_bytes(c['file_bytes'])} bf16 safetensors -> first token):")
        for run in c["runs"]:
            where = "page cache dropped" if run["page_cache_dropped"] else "page cache warm"
            res = run["resident_fraction_before"]
            res_s = "" if res is None else f", {100 * res:.0f}% resident"
            lines.append(f"     run {run['run']} ({where}{res_s}): load {run['load_s']:.3f} s "
                         f"({run['read_mb_per_s']:.0f} MB/s), first token {run['to_first_token_s']:.3f} s "
                         f"(conditions {run['conditions_s']:.3f} s + scale 1 {run['first_scale_s']:.3f} s)")
    return "\n".join(lines)


def format_summary(results: dict) -> str:
    """One line per configuration. Ratios are wall time; on the CPU the CPU-time ratio follows in brackets."""
    lines = [f"{'config':<7}{'e2e s':>9}{'scales s':>9}{'tok/s':>8}{'Echo/Inf':>15}{'reseed/Inf':>15}{'recompute':>15}"
             f"{'b4/b1':>14}{'cold 1st tok':>14}{'warm 1st tok':>14}"]
    for name, r in results.items():
        if r.get("status") != "ok":
            lines.append(f"{name:<7}  skipped: {r.get('reason', '')}")
            continue
        ratios = r.get("ratios", {})
        on_cpu = r.get("device", "cpu").startswith("cpu")

        def get(section, key, prefix=""):
            x = ratios.get(section, {})
            if key not in x:
                return "-"
            out = f"{prefix}{x[key]:.2f}x"
            if on_cpu and key in x.get("cpu_time", {}):
                out += f" ({x['cpu_time'][key]:.2f})"
            return out

        recomp = get("content_stream", "ratio")
        if recomp == "-":
            recomp = get("content_stream_estimate", "ratio_estimate", "~")
        runs = r.get("cold_start", {}).get("runs", [])
        cold = f"{runs[0]['to_first_token_s']:.2f} s" if runs else "-"
        warm = f"{runs[1]['to_first_token_s']:.2f} s" if len(runs) > 1 else "-"
        e2e = r["e2e"]
        lines.append(f"{name:<7}{e2e['total_s']:>9.2f}{e2e['stages_s']['scale_loop']:>9.2f}"
                     f"{e2e['tokens_per_s']['end_to_end']:>8.1f}{get('echogen_vs_infinity', 'ratio_3row'):>15}"
                     f"{get('reseed', 'ratio_reseed_vs_infinity'):>15}{recomp:>15}{get('batch', 'ratio_per_image'):>14}{cold:>14}{warm:>14}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Command line


def plan(names: list[str], quick: bool, device: torch.device) -> list[tuple[BenchConfig, dict]]:
    """Which measurements each configuration gets. --quick keeps the CPU set within a few minutes on two cores:
    the 125M config skips the runs that cost several generations each on a CPU (content stream recomputed
    at every scale: 7 extra content-stream passes; batch 4: 4 generations; guidance rows stacked vs in sequence:
    2 generations); the tiny config runs everything."""
    out = []
    for name in names:
        spec = CONFIGS[name]
        kw: dict = {}
        if quick and device.type == "cpu" and name == "125m":
            kw["ratios"] = ("echogen_vs_infinity", "reseed")
        out.append((spec, kw))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the CPU set: tiny (1024 px schedule) and 125m (256 px)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cpu with --quick, else cuda if present")
    p.add_argument("--configs", default=None, help=f"comma list of {', '.join(CONFIGS)} (default: tiny,125m with "
                                                  "--quick or on CPU, tiny,125m,2b on CUDA)")
    p.add_argument("--out", default=None, help=f"JSON file (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement, median kept (default 1 on "
                                                              "CPU, 3 on CUDA)")
    p.add_argument("--batch", type=int, default=4, help="batch size compared with batch 1")
    p.add_argument("--warmup", default="auto", choices=["auto", "full", "light", "none"])
    p.add_argument("--t5", default="auto", choices=["auto", "xl", "stand-in"])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, one per "
                                                              "core); 1 is steadier on a machine shared with other work")
    p.add_argument("--note", default=None, help="free text stored in the JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.device is None:
        args.device = "cuda" if (not args.quick and torch.cuda.is_available()) else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    names = (args.configs.split(",") if args.configs else
             (["tiny", "125m"] if args.quick or device.type == "cpu" else ["tiny", "125m", "2b"]))
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"error: unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    repeats = args.repeats or (3 if device.type == "cuda" else 1)
    out_path = Path(args.out) if args.out else DEFAULT_OUT

    monitor = MachineMonitor(device)
    load = monitor.load_before
    cores = os.cpu_count() or 1
    if device.type == "cpu" and load and load[0] > 0.5 * cores and torch.get_num_threads() > 1:
        print(f"warning: load average {load[0]:.1f} on {cores} cores: other processes are busy. With "
              f"{torch.get_num_threads()} threads, small CPU ops stall at thread barriers whenever a peer thread is "
              "descheduled (10x on the tiny config); --threads 1 gives steadier figures.", file=sys.stderr)
    results: dict = {}
    for spec, kw in plan(names, args.quick, device):
        if spec.cuda_only and device.type != "cuda":
            print(f"[{spec.name}] skipped: runs only with --device cuda (EchoGen-2B at 1024x1024, bf16)")
        t0 = time.perf_counter()
        results[spec.name] = measure_config(spec, device, repeats=repeats, batch=args.batch, warmup=args.warmup,
                                            t5=args.t5, precision=args.precision, **kw)
        results[spec.name]["wall_s"] = time.perf_counter() - t0
        if results[spec.name].get("status") == "ok":
            print(format_config(spec.name, results[spec.name]), flush=True)
    machine = monitor.describe()
    notes = [n for n in (contention_note(machine), args.note) if n]
    report = {
        "schema": SCHEMA, "command": " ".join([Path(sys.argv[0]).name] + list(argv if argv is not None else sys.argv[1:])),
        "quick": args.quick, "machine": machine, "notes": notes,
        "settings": {"prompt": PROMPT, "sampler": vars(SETTINGS) if hasattr(SETTINGS, "__dict__") else str(SETTINGS),
                     "repeats": repeats, "batch": args.batch, "warmup": args.warmup, "t5": args.t5,
                     "precision": args.precision},
        "results": results,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    tmp.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    tmp.replace(out_path)
    print()
    print(format_summary(results))
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {out_path}")
    return 0


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


if __name__ == "__main__":
    sys.exit(main())
