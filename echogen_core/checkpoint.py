"""Reading weight files as released, strictly and safely.

Formats: torch `.pth` (zip or legacy pickle; always `weights_only=True`, memory-mapped when possible),
single-file safetensors, and Hugging Face sharded safetensors (a folder or its `*.index.json`). Training
checkpoints nested under `trainer/gpt_fsdp` (or `gpt_wo_ddp`, `state_dict`, `model`) and VAE files holding
their weights under `"vae"` are unwrapped. Every load is strict: a file that does not fill every parameter,
or brings keys the model does not have, is refused with the names of what is wrong.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .errors import CheckpointError
from .infinity import Infinity, InfinityConfig

# Buffers that older official checkpoints may carry; the official loader drops them too.
LEGACY_KEYS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")
# Nesting used by the official training code and common tools, outermost first.
WRAPPER_KEYS = ("trainer", "gpt_fsdp", "gpt_wo_ddp", "state_dict", "model", "module", "gpt", "vae")
MAX_LISTED = 20


@dataclass
class LoadedFile:
    path: str
    tensors: dict
    format: str                       # "torch-zip" | "torch-pickle" | "safetensors" | "safetensors-sharded"
    notes: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Raw reading


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 8:
        raise CheckpointError(f"{path} is {path.stat().st_size} bytes long: too short to be a weights file. "
                              "The download is probably incomplete; fetch it again.")
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-pickle"
    (header_len,) = struct.unpack("<Q", head[:8])
    if head[8:9] == b"{" and 0 < header_len < 100_000_000:
        return "safetensors"
    raise CheckpointError(
        f"{path} is neither a torch checkpoint (.pth/.pt) nor a safetensors file (first bytes {head[:8]!r}). "
        "Check that you picked the weights file itself, not an HTML page or an archive.")


def _load_torch(path: Path, fmt: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=(fmt == "torch-zip"))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"Refused to load {path}: it contains Python objects other than tensors and plain containers, "
            f"which could run code when unpickled ({str(e).splitlines()[0][:200]}). Only weights files are "
            "accepted; convert a trusted file to safetensors first.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"Could not read {path} ({path.stat().st_size} bytes): {str(e).splitlines()[0][:200]}. "
            "The file is probably truncated or corrupted; download it again.") from None


def _load_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        out = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            for key in f.keys():
                out[key] = f.get_tensor(key)
        return out, meta
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"Could not read the safetensors file {path}: {e}. The file is probably truncated "
                              "or corrupted; download it again.") from None


def _find_index(path: Path) -> Optional[Path]:
    if path.is_file() and path.name.endswith(".index.json"):
        return path
    if path.is_dir():
        found = sorted(path.glob("*.safetensors.index.json"))
        if found:
            return found[0]
    return None


def read_file(path) -> LoadedFile:
    """Read every tensor of a weights file or sharded folder into a flat dict (no model involved)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"Weights file not found: {path}")
    index = _find_index(path)
    if index is not None:
        return _read_sharded(index)
    if path.is_dir():
        singles = sorted(path.glob("*.safetensors"))
        if len(singles) == 1:
            return read_file(singles[0])
        raise CheckpointError(f"{path} is a folder without a `*.safetensors.index.json` and with "
                              f"{len(singles)} safetensors files; point to the weights file itself.")
    fmt = _sniff(path)
    if fmt == "safetensors":
        tensors, meta = _load_safetensors(path)
        return LoadedFile(str(path), tensors, fmt, metadata=meta)
    obj = _load_torch(path, fmt)
    return LoadedFile(str(path), obj, fmt)


def _read_sharded(index: Path) -> LoadedFile:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from None
    tensors = {}
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        shard_path = index.parent / shard
        if not shard_path.exists():
            raise CheckpointError(f"Shard {shard} listed in {index.name} is missing from {index.parent}.")
        part, _ = _load_safetensors(shard_path)
        tensors.update(part)
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"{index.name} lists {len(missing)} tensors that no shard holds, e.g. {missing[:5]}.")
    return LoadedFile(str(index.parent), tensors, "safetensors-sharded", notes=[f"{len(shards)} shards"])


# --------------------------------------------------------------------------------------------------------------
# Unwrapping and naming


def unwrap_state_dict(obj, path: str, notes: list, inner_key: Optional[str] = None) -> dict:
    """Find the flat {name: tensor} dict inside a checkpoint object."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors.")
    if inner_key is not None and isinstance(obj.get(inner_key), dict):
        others = [k for k in obj if k != inner_key]
        if others:
            notes.append(f"used the '{inner_key}' entry; ignored top-level entries {others[:8]}")
        obj = obj[inner_key]
    while not _is_flat(obj):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                notes.append(f"unwrapped '{key}'")
                obj = obj[key]
                break
        else:
            nested = [k for k, v in obj.items() if isinstance(v, dict)]
            raise CheckpointError(f"{path}: could not find the weights inside the file; it has nested entries "
                                  f"{nested[:8]} but none of {list(WRAPPER_KEYS)}.")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in ("_orig_mod.", "module."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
            notes.append(f"stripped the '{prefix}' prefix")
    return sd


def _is_flat(obj: dict) -> bool:
    return any(isinstance(v, torch.Tensor) for v in obj.values())


_BLOCK_RE = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.")
_FLAT_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def classify(sd: dict) -> str:
    if sd and all("control" in k for k in sd):
        return "echogen_adapter"
    if "word_embed.weight" in sd and any(_BLOCK_RE.match(k) or _FLAT_BLOCK_RE.match(k) for k in sd):
        return "echogen" if any("control" in k for k in sd) else "infinity"
    if any(".attn_1." in k or "mid_block.attentions" in k for k in sd):
        return "flux_vae"  # the FLUX.1 VAE has mid-block attention; the BSQ VAE has none
    if any(k.startswith("encoder.conv_in.") for k in sd) and any(k.startswith("decoder.") for k in sd):
        return "bsq_vae"
    return "unknown"


def canonical_block_names(sd: dict, notes: list) -> dict:
    """Files saved with one chunk name blocks `blocks.{i}`; rename them to the chunked layout."""
    if not any(_FLAT_BLOCK_RE.match(k) for k in sd):
        return sd
    notes.append("renamed blocks.{i} to block_chunks.0.module.{i}")
    return {_FLAT_BLOCK_RE.sub(lambda m: f"block_chunks.0.module.{m.group(1)}.", k): v for k, v in sd.items()}


# --------------------------------------------------------------------------------------------------------------
# Infinity transformer


def infer_infinity_config(sd: dict) -> InfinityConfig:
    """Read depth, width, heads, bits, text width and chunking off the tensors themselves."""
    need = ["word_embed.weight", "text_proj_for_ca.0.weight", "cfg_uncond", "text_proj_for_sos.ca.mat_q",
            "lvl_embed.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"Not an Infinity transformer state dict: missing {missing}.")
    chunks: dict[int, set] = {}
    for k in sd:
        m = _BLOCK_RE.match(k)
        if m:
            chunks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not chunks:
        raise CheckpointError("Not an Infinity transformer state dict: no `block_chunks.*` keys.")
    per_chunk = {len(v) for v in chunks.values()}
    if len(per_chunk) != 1 or sorted(chunks) != list(range(len(chunks))):
        raise CheckpointError(f"Inconsistent block layout: chunks {sorted(chunks)} with {sorted(per_chunk)} blocks each.")
    width, bits = sd["word_embed.weight"].shape
    first = "block_chunks.0.module.0."
    try:
        heads = int(max(sd[first + "sa.scale_mul_1H11"].shape))
        mlp_hidden = sd[first + "ffn.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"Not an Infinity transformer state dict: missing {e.args[0]}.") from None
    return InfinityConfig(
        depth=len(chunks) * per_chunk.pop(), width=int(width), num_heads=heads, mlp_hidden=int(mlp_hidden),
        bits=int(bits), text_channels=int(sd["text_proj_for_ca.0.weight"].shape[1]),
        text_maxlen=int(sd["cfg_uncond"].shape[0]), pool_heads=int(sd["text_proj_for_sos.ca.mat_q"].shape[1]),
        block_chunks=len(chunks), num_levels=int(sd["lvl_embed.weight"].shape[0]))


def check_coverage(expected: dict, sd: dict, what: str, path: str, optional=()) -> list[str]:
    """Compare {name: shape} with a state dict; raise with the names of missing, extra and mis-shaped keys."""
    missing = [k for k in expected if k not in sd and not any(k.endswith(o) for o in optional)]
    extra = [k for k in sd if k not in expected]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k])}"
             for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    if missing or extra or wrong:
        parts = []
        for title, names in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
            if names:
                shown = ", ".join(names[:MAX_LISTED]) + (f", ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")
                parts.append(f"{len(names)} {title}: {shown}")
        raise CheckpointError(f"{path} does not match the {what} it describes. " + "; ".join(parts) +
                              ". Run `python -m echogen_core inspect FILE` to see what the file is.")
    return [k for k in expected if k not in sd]


def expected_shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_from_state_dict(model_cls, cfg, sd: dict, path: str, what: str, notes: list):
    """Build on the meta device, check strict coverage, then take the tensors as they are (no copy)."""
    with torch.device("meta"):
        model = model_cls(cfg)
    expected = expected_shapes(model)
    # zero_k_bias buffers are constant zeros; older exports omit them.
    absent = check_coverage(expected, sd, what, path, optional=("zero_k_bias",))
    sd = dict(sd)
    for k in absent:
        sd[k] = torch.zeros(expected[k])
    if absent:
        notes.append(f"filled {len(absent)} zero_k_bias buffers with zeros")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def infinity_state_dict(path) -> tuple[dict, LoadedFile]:
    loaded = read_file(path)
    sd = unwrap_state_dict(loaded.tensors, loaded.path, loaded.notes)
    family = classify(sd)
    if family not in ("infinity", "echogen"):
        raise CheckpointError(f"{loaded.path} is not an Infinity transformer (it looks like: {family}). "
                              + ("Pass it as the VAE instead." if family == "bsq_vae" else ""))
    sd = canonical_block_names(sd, loaded.notes)
    for k in LEGACY_KEYS:
        if sd.pop(k, None) is not None:
            loaded.notes.append(f"dropped legacy buffer {k}")
    return sd, loaded


def load_infinity(path, device="cpu", dtype: Optional[torch.dtype] = None) -> Infinity:
    """Load a plain Infinity checkpoint (2B, 8B shards, 125M, a fine-tune, a tiny one) strictly.

    dtype is the blocks' compute dtype (default bf16 on CUDA, fp32 on CPU); the rest stays fp32."""
    sd, loaded = infinity_state_dict(path)
    if classify(sd) == "echogen":
        raise CheckpointError(f"{loaded.path} is an EchoGen checkpoint (it has 'control' weights); "
                              "load it with the EchoGen loader.")
    cfg = infer_infinity_config(sd)
    model = build_from_state_dict(Infinity, cfg, sd, loaded.path, "Infinity transformer", loaded.notes)
    model.load_notes = loaded.notes
    return finalize(model, device, dtype)


def default_dtype(device) -> torch.dtype:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def finalize(model: Infinity, device, dtype: Optional[torch.dtype]) -> Infinity:
    dtype = dtype or default_dtype(device)
    model.to(device)
    model.set_precision(dtype)
    return model


# --------------------------------------------------------------------------------------------------------------
# BSQ VAE


def atomic_write(path, write) -> Path:
    """Call write(tmp) on a temporary file beside `path`, then rename it over `path`: an interrupted run never
    leaves a half-written file under the real name (and a failed write leaves no temporary file behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


VAE_NORM_GROUPS_KEY = "echogen.vae_norm_groups"


def vae_metadata(config) -> dict:
    """Safetensors metadata a BSQ VAE file needs beyond its tensors: the GroupNorm group count when it differs
    from what infer_vae_config reads off the shapes (the released VAEs never need it)."""
    from .bsq_vae import _largest_group_count

    if config.norm_groups == _largest_group_count(config.channels):
        return {}
    return {VAE_NORM_GROUPS_KEY: str(config.norm_groups)}


def vae_state_dict(path) -> tuple[dict, LoadedFile]:
    from .bsq_vae import normalize_vae_state_dict

    loaded = read_file(path)
    obj = loaded.tensors
    inner = "vae" if isinstance(obj, dict) and isinstance(obj.get("vae"), dict) else None
    sd = unwrap_state_dict(obj, loaded.path, loaded.notes, inner_key=inner)
    family = classify(sd)
    if family != "bsq_vae" and not any(k.startswith("encoder.conv_in") for k in sd):
        raise CheckpointError(f"{loaded.path} is not a BSQ VAE (it looks like: {family}). "
                              + ("Pass it as the model instead." if family in ("infinity", "echogen") else ""))
    return normalize_vae_state_dict(sd), loaded


def load_vae(path, device="cpu", dtype: torch.dtype = torch.float32):
    """Load `infinity_vae_d32reg.pth`, `infinity_vae_d56_f8_14_patchify.pth`, or a converted file."""
    from .bsq_vae import BSQVAE

    from dataclasses import replace

    from .bsq_vae import infer_vae_config

    sd, loaded = vae_state_dict(path)
    try:
        config = infer_vae_config(sd)
        # GroupNorm's group count leaves no trace in the tensor shapes: a VAE trained with another count than
        # the inferred one carries it in the file's metadata (train.py writes it), else it would decode garbage.
        groups = loaded.metadata.get(VAE_NORM_GROUPS_KEY)
        if groups is not None:
            try:
                config = replace(config, norm_groups=int(groups))
            except ValueError as e:
                raise CheckpointError(f"metadata {VAE_NORM_GROUPS_KEY}={groups!r} does not fit this VAE: {e}") from None
        vae = BSQVAE.from_state_dict(sd, config=config)
    except CheckpointError as e:
        raise CheckpointError(f"{loaded.path}: {e}") from None
    vae.load_notes = loaded.notes
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------
# Conversion and inspection


def _block_param(name: str) -> bool:
    return bool(_BLOCK_RE.match(name))


def convert(src, dst, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Write a checkpoint as one safetensors file, same names. Transformer blocks (the bulk of the weights)
    go to `dtype`; the small fp32-at-inference parts (embeddings, text projections, AdaLN, head, empty
    prompt) stay fp32, as the official inference keeps them. VAE weights go to `dtype` entirely."""
    from safetensors.torch import save_file

    loaded = read_file(src)
    probe = unwrap_state_dict(loaded.tensors, loaded.path, [], inner_key="vae" if isinstance(loaded.tensors.get("vae"), dict) else None)
    family = classify(probe)
    if family in ("infinity", "echogen"):
        sd, loaded = infinity_state_dict(src)
        infer_infinity_config(sd)  # refuse to write something we could not load back
        keep_fp32 = lambda k: not _block_param(k)  # noqa: E731
    elif family == "echogen_adapter":
        sd, loaded = probe, loaded
        keep_fp32 = lambda k: not _block_param(k)  # noqa: E731
    elif family == "bsq_vae":
        sd, loaded = vae_state_dict(src)
        keep_fp32 = lambda k: False  # noqa: E731
    else:
        raise CheckpointError(f"{src}: not an Infinity, EchoGen or BSQ VAE checkpoint; nothing converted.")
    out, seen = {}, set()
    for k, v in sd.items():
        if v.is_floating_point():
            v = v.to(torch.float32 if keep_fp32(k) else dtype)
        v = v.contiguous()
        if v.data_ptr() in seen:  # aliases (the VAE's quantizer/quantize mask) must be stored separately
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v
    meta = {"format": "pt", "echogen.family": family, "echogen.source": Path(loaded.path).name}
    if family == "bsq_vae" and VAE_NORM_GROUPS_KEY in loaded.metadata:
        meta[VAE_NORM_GROUPS_KEY] = loaded.metadata[VAE_NORM_GROUPS_KEY]
    dst = atomic_write(dst, lambda tmp: save_file(out, tmp, metadata=meta))
    return {"family": family, "tensors": len(out), "bytes": dst.stat().st_size}


def describe(path) -> str:
    """A human report of what a file is: the first thing to run when a loader complains."""
    loaded = read_file(path)
    obj = loaded.tensors
    lines = [f"file: {loaded.path}", f"format: {loaded.format}"]
    if isinstance(obj, dict) and not _is_flat(obj):
        lines.append(f"top-level entries: {list(obj)[:12]}")
    inner = "vae" if isinstance(obj, dict) and isinstance(obj.get("vae"), dict) else None
    notes: list = []
    try:
        sd = unwrap_state_dict(obj, loaded.path, notes, inner_key=inner)
    except CheckpointError as e:
        return "\n".join(lines + [f"error: {e}"])
    sd = canonical_block_names(sd, notes)
    family = classify(sd)
    n_params = sum(v.numel() for v in sd.values() if v.is_floating_point())
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})
    lines += [f"family: {family}", f"tensors: {len(sd)}  parameters: {n_params:,}  dtypes: {', '.join(dtypes)}"]
    lines += [f"note: {n}" for n in notes]
    try:
        if family in ("infinity", "echogen"):
            for k in LEGACY_KEYS:
                sd.pop(k, None)
            cfg = infer_infinity_config(sd)
            lines.append(f"config: {cfg}")
            lines.append(f"matches: {cfg.preset_name() or 'no released preset (custom / fine-tuned size)'}")
            if family == "echogen":
                lines.append("EchoGen adapter weights present ('control' keys); coverage is checked by the EchoGen loader.")
            else:
                with torch.device("meta"):
                    expected = expected_shapes(Infinity(cfg))
                lines.append(_coverage_line(expected, sd))
        elif family == "bsq_vae":
            from .bsq_vae import BSQVAE, infer_vae_config, normalize_vae_state_dict

            sd = normalize_vae_state_dict(sd)
            vcfg = infer_vae_config(sd)
            lines.append(f"config: {vcfg}")
            with torch.device("meta"):
                expected = expected_shapes(BSQVAE(vcfg))
            lines.append(_coverage_line(expected, sd))
        else:
            lines.append("first keys: " + ", ".join(list(sd)[:10]))
    except CheckpointError as e:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def _coverage_line(expected: dict, sd: dict) -> str:
    missing = [k for k in expected if k not in sd and not k.endswith("zero_k_bias")]
    extra = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if not (missing or extra or wrong):
        return f"coverage: complete ({len(expected)} expected keys, all present with the right shapes)"
    return (f"coverage: {len(missing)} missing {missing[:5]}, {len(extra)} unexpected {extra[:5]}, "
            f"{len(wrong)} wrong shape {wrong[:5]}")


# --------------------------------------------------------------------------------------------------------------
# EchoGen


def infer_echogen_config(sd: dict):
    from .echogen import EchoGenConfig

    for key in ("control_features_uncond", "control_features_refer_uncond"):
        if key not in sd:
            raise CheckpointError(f"Not an EchoGen state dict: missing {key}.")
    sem_len, sem_dim = sd["control_features_uncond"].shape
    con_len, con_dim = sd["control_features_refer_uncond"].shape
    return EchoGenConfig.from_backbone(infer_infinity_config(sd), semantic_dim=int(sem_dim), semantic_len=int(sem_len),
                                       content_dim=int(con_dim), content_len=int(con_len))


def _raw_state_dict(path) -> tuple[dict, LoadedFile]:
    loaded = read_file(path)
    sd = unwrap_state_dict(loaded.tensors, loaded.path, loaded.notes)
    sd = canonical_block_names(sd, loaded.notes)
    for k in LEGACY_KEYS:
        if sd.pop(k, None) is not None:
            loaded.notes.append(f"dropped legacy buffer {k}")
    return sd, loaded


def echogen_state_dict(path, backbone=None, adapter=None) -> tuple[dict, list, str]:
    """Merge the files that together make an EchoGen model: a full `echogen_2b.pth`; or an EchoGen file
    without the frozen part plus `infinity_2b_reg.pth` (`backbone`); or any Infinity file plus an adapter
    file holding only the trained 'control' weights (`adapter`)."""
    sources = [p for p in (path, backbone, adapter) if p is not None]
    merged: dict = {}
    notes: list = []
    for src in sources:
        sd, loaded = _raw_state_dict(src)
        family = classify(sd)
        if family in ("bsq_vae", "unknown"):
            raise CheckpointError(f"{loaded.path} is not an Infinity/EchoGen transformer or adapter (it looks like: {family}).")
        notes += [f"{Path(loaded.path).name}: {n}" for n in loaded.notes]
        for k, v in sd.items():
            if k in merged and "control" not in k:
                continue  # the first file that has a backbone weight provides it
            merged[k] = v
    if not any("control" in k for k in merged):
        raise CheckpointError(f"No EchoGen ('control') weights in {', '.join(map(str, sources))}: give echogen_2b.pth "
                              "or an adapter file.")
    if "word_embed.weight" not in merged:
        raise CheckpointError(f"{', '.join(map(str, sources))} hold only the EchoGen adapter; also give the Infinity "
                              "backbone it was trained on (infinity_2b_reg.pth for echogen_2b).")
    return merged, notes, " + ".join(str(s) for s in sources)


def load_echogen(path, backbone=None, adapter=None, device="cpu", dtype: Optional[torch.dtype] = None):
    """Load EchoGen strictly from `echogen_2b.pth` (optionally nested under trainer/gpt_fsdp), with or
    without a separate Infinity backbone file, or an Infinity file plus an adapter file."""
    from .echogen import EchoGen

    sd, notes, what = echogen_state_dict(path, backbone, adapter)
    cfg = infer_echogen_config(sd)
    model = build_from_state_dict(EchoGen, cfg, sd, what, "EchoGen model", notes)
    model.load_notes = notes
    return finalize(model, device, dtype)


def load_transformer(path, backbone=None, adapter=None, device="cpu", dtype: Optional[torch.dtype] = None):
    """Infinity or EchoGen, whichever the files hold: one entry point for loaders that take any of them."""
    if backbone is not None or adapter is not None:
        return load_echogen(path, backbone=backbone, adapter=adapter, device=device, dtype=dtype)
    sd, notes, what = echogen_state_dict(path) if _is_echogen_file(path) else (None, None, None)
    if sd is None:
        return load_infinity(path, device=device, dtype=dtype)
    from .echogen import EchoGen

    model = build_from_state_dict(EchoGen, infer_echogen_config(sd), sd, what, "EchoGen model", notes)
    model.load_notes = notes
    return finalize(model, device, dtype)


def _is_echogen_file(path) -> bool:
    sd, _ = _raw_state_dict(path)  # memory-mapped: reading names twice costs no tensor data
    family = classify(sd)
    if family == "echogen_adapter":
        raise CheckpointError(f"{path} holds only an EchoGen adapter; choose the Infinity checkpoint as the model "
                              "and this file as the adapter.")
    return family == "echogen"


def save_adapter(model, path) -> dict:
    """Write only the trained injection weights (a few percent of a full checkpoint per block type,
    loadable over any Infinity checkpoint of the same size)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().clone() for k, v in model.adapter_state_dict().items()}
    meta = {"format": "pt", "echogen.family": "echogen_adapter", "echogen.config": json.dumps(model.cfg.to_dict())}
    dst = atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    return {"tensors": len(sd), "bytes": dst.stat().st_size}
