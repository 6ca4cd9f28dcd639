"""T5 text encoder for the Infinity models (flan-t5-xl encoder only) and the text-conditioning container.

Official behaviour (spec section 9): ``AutoTokenizer`` (T5 tokenizer, ``legacy=True``,
``model_max_length=512``), truncation at 512 tokens with the EOS ``</s>`` counted in the length,
``T5EncoderModel`` run without gradients, ``last_hidden_state`` cast to fp32, only the unpadded tokens
are used.  The official code pads every prompt to 512 tokens; here prompts are padded only to the
longest prompt of the batch, which gives the same valid-token features (T5 masks padded keys) without
the wasted compute.

``transformers`` is imported lazily, only inside the functions that need it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .errors import CheckpointError, InputError, MissingDependencyError

__all__ = [
    "T5_MAX_LENGTH",
    "T5_SOURCE_HINT",
    "TextConditioning",
    "T5TextEncoder",
    "build_tiny_t5",
]

T5_MAX_LENGTH = 512
T5_SOURCE_HINT = (
    "Download the Hugging Face repository google/flan-t5-xl "
    "(https://huggingface.co/google/flan-t5-xl: config.json, the model weights "
    "(model*.safetensors or pytorch_model*.bin, with their index .json when sharded), "
    "tokenizer.json / spiece.model and tokenizer_config.json) into one folder and point the loader at that folder"
)

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


# --------------------------------------------------------------------------------------------------
# TextConditioning
# --------------------------------------------------------------------------------------------------


@dataclass
class TextConditioning:
    """Per-token text features of a batch of prompts.

    ``features``: (B, L_max, C) float32; row ``i`` holds prompt ``i``'s ``lengths[i]`` valid token
    features followed by zeros.  ``lengths``: (B,) int64, each in ``[1, L_max]``, on the same device.
    """

    features: torch.Tensor
    lengths: torch.Tensor

    def __post_init__(self) -> None:
        f, n = self.features, self.lengths
        if not isinstance(f, torch.Tensor):
            raise InputError(f"TextConditioning.features must be a torch.Tensor, got {type(f).__name__}.")
        if not isinstance(n, torch.Tensor):
            raise InputError(f"TextConditioning.lengths must be a torch.Tensor, got {type(n).__name__}.")
        if f.dim() != 3:
            raise InputError(
                f"TextConditioning.features must have shape (batch, tokens, channels), got shape {tuple(f.shape)}."
            )
        if f.dtype != torch.float32:
            raise InputError(f"TextConditioning.features must be float32, got {f.dtype}; cast it with .float().")
        if n.dim() != 1:
            raise InputError(f"TextConditioning.lengths must have shape (batch,), got shape {tuple(n.shape)}.")
        if n.dtype != torch.int64:
            raise InputError(f"TextConditioning.lengths must be int64, got {n.dtype}; cast it with .long().")
        if n.device != f.device:
            raise InputError(
                f"TextConditioning.lengths is on {n.device} but features are on {f.device}; use .to(device)."
            )
        b, l_max, c = f.shape
        if b == 0:
            raise InputError("TextConditioning needs at least one prompt (batch size is 0).")
        if n.shape[0] != b:
            raise InputError(
                f"TextConditioning.lengths has {n.shape[0]} entries but features hold {b} prompts."
            )
        if c == 0 or l_max == 0:
            raise InputError(f"TextConditioning.features has an empty dimension: shape {tuple(f.shape)}.")
        lo, hi = int(n.min()), int(n.max())
        if lo < 1:
            bad = [i for i, v in enumerate(n.tolist()) if v < 1]
            raise InputError(
                f"TextConditioning.lengths must be >= 1 (every prompt has at least the EOS token); "
                f"prompt(s) {bad} have length {[n.tolist()[i] for i in bad]}."
            )
        if hi > l_max:
            raise InputError(
                f"TextConditioning.lengths has a length {hi} larger than the padded token dimension {l_max}."
            )

    # ---- basic properties -------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def max_len(self) -> int:
        """Padded token dimension L_max (>= max(lengths))."""
        return self.features.shape[1]

    @property
    def channels(self) -> int:
        return self.features.shape[2]

    @property
    def device(self) -> torch.device:
        return self.features.device

    def __len__(self) -> int:
        return self.batch_size

    @property
    def mask(self) -> torch.Tensor:
        """(B, L_max) bool, True on valid tokens."""
        pos = torch.arange(self.max_len, device=self.features.device)
        return pos.unsqueeze(0) < self.lengths.unsqueeze(1)

    # ---- transforms ---------------------------------------------------------------------------

    def to(self, device: torch.device | str) -> "TextConditioning":
        return TextConditioning(self.features.to(device), self.lengths.to(device))

    def pad_to(self, length: int) -> "TextConditioning":
        """Zero-pad (never truncate) the token dimension to ``length``."""
        length = int(length)
        if length < self.max_len:
            raise InputError(f"Cannot pad text features of {self.max_len} tokens down to {length} tokens.")
        if length == self.max_len:
            return self
        f = torch.nn.functional.pad(self.features, (0, 0, 0, length - self.max_len))
        return TextConditioning(f, self.lengths)

    def clipped(self, max_len: int) -> "TextConditioning":
        """At most `max_len` tokens per prompt (a model's learned empty prompt has that many rows; only small
        custom models have fewer than T5's 512). Returns self when nothing is cut."""
        if int(self.lengths.max()) <= max_len:
            return self.trimmed()
        return TextConditioning(self.features[:, :max_len].contiguous(), self.lengths.clamp(max=max_len))

    def trimmed(self) -> "TextConditioning":
        """Drop padding columns beyond max(lengths)."""
        m = int(self.lengths.max())
        if m == self.max_len:
            return self
        return TextConditioning(self.features[:, :m].contiguous(), self.lengths)

    def select(self, indices: int | Sequence[int] | torch.Tensor | slice) -> "TextConditioning":
        """Prompts at ``indices`` (int, sequence of ints, int/bool tensor or slice), trimmed to their longest."""
        b = self.batch_size
        if isinstance(indices, slice):
            idx = torch.arange(b)[indices]
        elif isinstance(indices, bool):
            raise InputError("TextConditioning.select: a bool is not a prompt index.")
        elif isinstance(indices, int):
            idx = torch.tensor([indices])
        else:
            idx = torch.as_tensor(indices)
            if idx.dim() == 0:
                idx = idx.reshape(1)
            if idx.dim() != 1:
                raise InputError(f"TextConditioning.select: indices must be 1-D, got shape {tuple(idx.shape)}.")
            if idx.numel() == 0:
                raise InputError("TextConditioning.select: no prompt selected.")
            if idx.dtype == torch.bool:
                if idx.shape[0] != b:
                    raise InputError(
                        f"TextConditioning.select: bool mask has {idx.shape[0]} entries, batch has {b} prompts."
                    )
                idx = idx.nonzero().flatten()
            elif idx.dtype.is_floating_point or idx.dtype.is_complex:
                raise InputError(f"TextConditioning.select: indices must be integers, got {idx.dtype}.")
        idx = idx.to(torch.int64)
        if idx.numel() == 0:
            raise InputError("TextConditioning.select: no prompt selected.")
        if int(idx.max()) >= b or int(idx.min()) < -b:
            raise InputError(f"TextConditioning.select: index out of range for a batch of {b} prompts: {idx.tolist()}.")
        idx = idx.to(self.features.device)
        return TextConditioning(self.features[idx], self.lengths[idx]).trimmed()

    def concat(self, other: "TextConditioning") -> "TextConditioning":
        """Batch concatenation ``[self, other]``; the shorter one is zero-padded to the longer L_max."""
        if not isinstance(other, TextConditioning):
            raise InputError(f"TextConditioning.concat expects a TextConditioning, got {type(other).__name__}.")
        if other.channels != self.channels:
            raise InputError(
                f"Cannot concatenate text features with {self.channels} and {other.channels} channels "
                f"(were they made by different text encoders?)."
            )
        if other.device != self.device:
            raise InputError(
                f"Cannot concatenate text features on {self.device} and {other.device}; move them with .to(device)."
            )
        length = max(self.max_len, other.max_len)
        a, b = self.pad_to(length), other.pad_to(length)
        return TextConditioning(torch.cat([a.features, b.features], 0), torch.cat([a.lengths, b.lengths], 0))

    # ---- varlen (official) layout ------------------------------------------------------------

    def cu_seqlens(self) -> torch.Tensor:
        """(B+1,) int32: [0, cumsum(lengths)]."""
        cu = torch.zeros(self.batch_size + 1, dtype=torch.int32, device=self.lengths.device)
        cu[1:] = torch.cumsum(self.lengths, 0).to(torch.int32)
        return cu

    def compact(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(kv_compact (sum L_i, C) float32, cu_seqlens (B+1,) int32, max_len = max(L_i)).

        Same layout as the official code: ``kv_compact`` is the concatenation of ``feat_i[:len_i]``.
        The official model input is ``(kv_compact, lengths, cu_seqlens, max_len)``.
        """
        kv = self.features[self.mask]
        return kv, self.cu_seqlens(), int(self.lengths.max())

    @classmethod
    def from_compact(
        cls,
        kv_compact: torch.Tensor,
        cu_seqlens: torch.Tensor | Sequence[int],
        max_len: int | None = None,
    ) -> "TextConditioning":
        """Inverse of :meth:`compact`. ``max_len`` (default max length) sets the padded token dimension."""
        if not isinstance(kv_compact, torch.Tensor):
            raise InputError(f"from_compact: kv_compact must be a torch.Tensor, got {type(kv_compact).__name__}.")
        if kv_compact.dim() != 2:
            raise InputError(
                f"from_compact: kv_compact must have shape (total_tokens, channels), got {tuple(kv_compact.shape)}."
            )
        if not kv_compact.dtype.is_floating_point:
            raise InputError(f"from_compact: kv_compact must be floating point, got {kv_compact.dtype}.")
        cu = torch.as_tensor(cu_seqlens)
        if cu.dim() != 1 or cu.shape[0] < 2:
            raise InputError(
                f"from_compact: cu_seqlens must have shape (batch+1,) with batch >= 1, got {tuple(cu.shape)}."
            )
        if cu.dtype.is_floating_point or cu.dtype == torch.bool or cu.dtype.is_complex:
            raise InputError(f"from_compact: cu_seqlens must be an integer tensor, got {cu.dtype}.")
        cu = cu.to(device=kv_compact.device, dtype=torch.int64)
        if int(cu[0]) != 0:
            raise InputError(f"from_compact: cu_seqlens must start at 0, got {int(cu[0])}.")
        if int(cu[-1]) != kv_compact.shape[0]:
            raise InputError(
                f"from_compact: cu_seqlens ends at {int(cu[-1])} but kv_compact has {kv_compact.shape[0]} tokens."
            )
        lengths = cu[1:] - cu[:-1]
        if int(lengths.min()) < 1:
            raise InputError(
                f"from_compact: every prompt needs at least one token; lengths are {lengths.tolist()}."
            )
        longest = int(lengths.max())
        l_max = longest if max_len is None else int(max_len)
        if l_max < longest:
            raise InputError(f"from_compact: max_len={l_max} is smaller than the longest prompt ({longest} tokens).")
        b, c = lengths.shape[0], kv_compact.shape[1]
        features = torch.zeros(b, l_max, c, dtype=torch.float32, device=kv_compact.device)
        mask = torch.arange(l_max, device=kv_compact.device).unsqueeze(0) < lengths.unsqueeze(1)
        features[mask] = kv_compact.to(torch.float32)
        return cls(features, lengths)


# --------------------------------------------------------------------------------------------------
# T5 encoder
# --------------------------------------------------------------------------------------------------


def _import_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            "The T5 text encoder needs the 'transformers' package (>= 4.40); install it with "
            "`pip install transformers sentencepiece safetensors`."
        ) from e
    return transformers


_DTYPE_NAMES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        key = dtype.lower().replace("torch.", "")
        if key not in _DTYPE_NAMES:
            raise InputError(f"Unknown T5 dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)}.")
        return _DTYPE_NAMES[key]
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise InputError(f"T5 dtype must be float16, bfloat16 or float32, got {dtype}.")
    return dtype


def _has_weights(folder: Path) -> bool:
    if any((folder / name).is_file() for name in _WEIGHT_FILES):
        return True
    return False


def read_hf_folder_config(path, what: str, hint: str) -> tuple[Path, dict]:
    """A local Hugging Face model folder and its parsed config.json, or an error saying what is wrong."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CheckpointError(f"{what} folder not found: {folder}. {hint}")
    if not folder.is_dir():
        raise CheckpointError(f"{what} path {folder} is a file; point at the Hugging Face folder that holds "
                              f"config.json, the weights and the processor/tokenizer files. {hint}")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{what} folder {folder} has no config.json. {hint}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot read {cfg_path} as JSON ({e}). {hint}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path} does not hold a JSON object. {hint}")
    return folder, config


def _check_t5_folder(folder: Path) -> dict:
    """Validate the folder layout; returns the parsed config.json."""
    folder, config = read_hf_folder_config(folder, "T5 text encoder", T5_SOURCE_HINT + ".")
    cfg_path = folder / "config.json"
    model_type = config.get("model_type")
    if model_type != "t5":
        archs = config.get("architectures")
        raise CheckpointError(
            f"{cfg_path} is not a T5 config (model_type={model_type!r}, architectures={archs!r}); the Infinity "
            f"text encoder is the encoder of google/flan-t5-xl (model_type 't5'). {T5_SOURCE_HINT}."
        )
    if config.get("is_decoder", False):
        raise CheckpointError(
            f"{cfg_path} describes a T5 decoder (is_decoder=true), not an encoder. {T5_SOURCE_HINT}."
        )
    if not _has_weights(folder):
        present = sorted(p.name for p in folder.iterdir())[:20]
        raise CheckpointError(
            f"T5 text encoder folder {folder} has no weights: expected one of {', '.join(_WEIGHT_FILES)} "
            f"(sharded checkpoints need their index .json); found {present}. {T5_SOURCE_HINT}."
        )
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise CheckpointError(
            f"T5 text encoder folder {folder} has no tokenizer: expected tokenizer.json (or spiece.model) "
            f"next to tokenizer_config.json. {T5_SOURCE_HINT}."
        )
    return config


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise InputError(f"T5TextEncoder.encode expects a list of strings, got {type(prompts).__name__}.")
    if len(prompts) == 0:
        raise InputError("T5TextEncoder.encode needs at least one prompt (got an empty list).")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise InputError(
            f"T5TextEncoder.encode expects strings; prompt(s) at index {bad} are "
            f"{[type(prompts[i]).__name__ for i in bad]}."
        )
    return list(prompts)


class T5TextEncoder:
    """flan-t5 encoder + tokenizer producing :class:`TextConditioning` (official Infinity behaviour)."""

    max_length: int = T5_MAX_LENGTH

    def __init__(self, tokenizer, model, folder: Path | None = None) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.folder = folder
        # Valid tokens first, padding after: TextConditioning relies on right padding.
        self.tokenizer.padding_side = "right"

    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
    ) -> "T5TextEncoder":
        """Load tokenizer + ``T5EncoderModel`` from a local Hugging Face folder (no network).

        ``dtype`` defaults to float16 on CUDA (as the official code) and float32 on CPU.
        A full ``T5ForConditionalGeneration`` checkpoint (how flan-t5-xl is published) works too: only the
        encoder weights are read.
        """
        folder = Path(path).expanduser()
        _check_t5_folder(folder)
        device = torch.device(device)
        torch_dtype = _resolve_dtype(dtype, device)
        _import_transformers()
        from transformers import AutoTokenizer, T5EncoderModel

        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(folder), local_files_only=True, legacy=True, model_max_length=T5_MAX_LENGTH
            )
        except Exception as e:  # noqa: BLE001 - re-raised with the folder named
            hint = ""
            if not (folder / "tokenizer.json").is_file():
                hint = (
                    " The folder has spiece.model but no tokenizer.json: converting spiece.model needs the "
                    "'sentencepiece' and 'protobuf' packages (pip install sentencepiece protobuf), or copy "
                    "tokenizer.json from google/flan-t5-xl into the folder."
                )
            raise CheckpointError(
                f"Cannot load the T5 tokenizer from {folder} ({type(e).__name__}: {e}).{hint} Expected tokenizer.json "
                f"(or spiece.model) and tokenizer_config.json. {T5_SOURCE_HINT}."
            ) from e
        try:
            model, info = T5EncoderModel.from_pretrained(
                str(folder), local_files_only=True, dtype=torch_dtype, output_loading_info=True
            )
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"Cannot load T5 encoder weights from {folder} ({type(e).__name__}: {e}). {T5_SOURCE_HINT}."
            ) from e
        missing = sorted(info.get("missing_keys", ()))
        if missing:
            raise CheckpointError(
                f"The T5 checkpoint in {folder} lacks {len(missing)} encoder weight(s), e.g. {missing[:5]}; "
                f"the file is incomplete or not a T5 encoder. {T5_SOURCE_HINT}."
            )
        model.eval().requires_grad_(False)
        model.to(device)
        vocab = model.config.vocab_size
        if len(tokenizer) > vocab:
            raise CheckpointError(
                f"The tokenizer in {folder} has {len(tokenizer)} tokens but the model's embedding has only {vocab}; "
                f"the tokenizer files and the weights do not belong together. {T5_SOURCE_HINT}."
            )
        probe = tokenizer("a").input_ids
        if tokenizer.eos_token_id is None or not probe or probe[-1] != tokenizer.eos_token_id:
            raise CheckpointError(
                f"The tokenizer in {folder} does not append the EOS token </s> (got ids {probe}); it is not the T5 "
                f"tokenizer. {T5_SOURCE_HINT}."
            )
        return cls(tokenizer, model, folder)

    # ---- properties -------------------------------------------------------------------------

    @property
    def channels(self) -> int:
        """Feature width (d_model): 2048 for flan-t5-xl."""
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def to(self, device: torch.device | str) -> "T5TextEncoder":
        self.model.to(device)
        return self

    # ---- encoding -----------------------------------------------------------------------------

    def tokenize(self, prompts: list[str]):
        """Tokenizer output (``input_ids``, ``attention_mask`` as CPU tensors), padded to the longest prompt."""
        prompts = _check_prompts(prompts)
        return self.tokenizer(
            prompts,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )

    def encode(self, prompts: list[str]) -> TextConditioning:
        """Encode prompts to fp32 per-token features (padded positions zero) on the model's device.

        Runs under ``torch.no_grad`` (not ``inference_mode``, so the result can feed a training graph).
        """
        batch = self.tokenize(prompts)
        device = self.device
        ids = batch["input_ids"].to(device)
        attn = batch["attention_mask"].to(device)
        with torch.no_grad():
            hidden = self.model(input_ids=ids, attention_mask=attn).last_hidden_state
        mask = attn.bool()
        features = hidden.float().masked_fill(~mask.unsqueeze(-1), 0.0)
        if not bool(torch.isfinite(features).all()):
            raise CheckpointError(
                f"The T5 encoder ({self.folder}) produced non-finite features in {self.dtype}; reload it with "
                f"dtype=torch.float32 or torch.bfloat16."
            )
        lengths = attn.sum(dim=1).to(torch.int64)
        return TextConditioning(features.contiguous(), lengths)

    __call__ = encode


# --------------------------------------------------------------------------------------------------
# Tiny random T5 for tests and bundling scripts
# --------------------------------------------------------------------------------------------------

_SUBJECTS = [
    "a cat", "a dog", "an old man", "a young woman", "a little girl", "a boy", "two horses", "a red fox",
    "an astronaut", "a robot", "a wizard", "a knight", "a dragon", "a small bird", "three ducks",
    "a fisherman", "a chef", "a teddy bear", "a giraffe", "an elephant", "a butterfly", "a lighthouse",
    "a castle", "a sports car", "a bicycle", "a sailing ship", "a cup of coffee", "a bowl of fruit",
    "a vase of flowers", "a wooden cabin", "a tiger", "a panda", "an owl", "a penguin", "a jellyfish",
]
_ADJECTIVES = [
    "beautiful", "tiny", "huge", "happy", "sleepy", "ancient", "futuristic", "colorful", "golden",
    "silver", "dark", "bright", "misty", "snowy", "rainy", "sunny", "quiet", "busy", "fluffy", "shiny",
    "rusty", "elegant", "cute", "mysterious", "glowing", "frozen", "wild", "peaceful",
]
_ACTIONS = [
    "sitting on", "running through", "flying over", "standing next to", "sleeping under", "walking along",
    "jumping over", "looking at", "playing with", "swimming in", "reading a book in", "dancing in",
    "painting a picture of", "eating breakfast in", "waiting near", "hiding behind", "climbing",
]
_PLACES = [
    "a red chair", "the kitchen table", "a green meadow", "the city streets", "a sandy beach",
    "a dense forest", "the snowy mountains", "a quiet library", "the night sky", "a busy market",
    "an old bridge", "a calm lake", "the desert dunes", "a flower garden", "the ocean waves",
    "a neon alley", "a wheat field", "the moon", "a cozy living room", "a train station",
]
_STYLES = [
    "oil painting", "watercolor", "digital art", "photograph", "pencil sketch", "3d render",
    "anime style", "pixel art", "studio lighting", "cinematic", "high resolution", "4k", "8k",
    "detailed", "minimalist", "impressionist", "vintage film", "macro shot", "wide angle lens",
]
_EXTRA_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "A photo of a cat sitting on a red chair in the afternoon sun.",
    "Translate English to German: How old are you?",
    "Summarize the following text in one sentence.",
    "What is the capital of France? The answer is Paris.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 24 100 256 512 1024 2048.",
    "Punctuation, quotes \"like this\", (brackets), [lists]; colons: and dashes - all work!",
    "A beautiful landscape with mountains, rivers and a blue sky at sunset, trending on artstation.",
    "An astronaut riding a horse on the moon, highly detailed digital art.",
    "Close-up portrait of an old woman with wrinkles, soft light, 85mm lens.",
    "Text that says \"hello world\" written on a blackboard with white chalk.",
    "Yellow, orange, purple, pink, brown, black, white, gray, blue, green and red.",
    "Spring, summer, autumn and winter; morning, noon, evening and midnight.",
    "Once upon a time there was a small village between the hills and the sea.",
    "Every morning the baker opened his shop and the smell of fresh bread filled the street.",
    "Children played in the park while their parents talked about the weather.",
    "She opened the window, looked outside and smiled at the bright blue sky.",
    "The museum displays sculptures, paintings and photographs from many countries.",
    "Scientists measure the temperature of the water every hour during the experiment.",
    "He wrote a long letter to his brother who lived far away in another country.",
    "The train arrived late because of heavy snow on the northern railway line.",
    "Our teacher explained how plants use sunlight, water and air to grow.",
    "Please remember to turn off the lights and lock the door when you leave.",
    "The concert started at eight o'clock and the orchestra played beautiful music.",
    "Large clouds gathered over the harbor and the fishermen returned early.",
    "A comfortable armchair stands beside the fireplace in the corner of the room.",
    "They built a wooden boat, painted it white and named it after their grandmother.",
    "Modern architecture combines glass, steel and concrete in surprising shapes.",
    "The market sells vegetables, cheese, honey, spices and handmade jewelry.",
    "After dinner we walked along the river and watched the stars appear.",
    "The computer program reads the image, finds the faces and draws a box around each one.",
    "Mountains covered with pine trees reflect in the still water of the lake.",
    "Her favourite hobbies are gardening, cooking, swimming and playing the piano.",
    "Ideas become clearer when you write them down and discuss them with friends.",
    "The storm knocked down several trees, but nobody was hurt.",
    "Ancient temples, narrow streets and lively squares attract many travelers.",
    "A gentle breeze moved the curtains and the candles flickered softly.",
    "Thousands of people gathered to celebrate the new year with fireworks.",
    "Knowledge, patience and curiosity help students solve difficult problems.",
    "Illustration of a whale jumping out of the water surrounded by seagulls.",
    "Poster design with bold typography, geometric shapes and vivid gradients.",
    "Interior of a spaceship with glowing panels, metal floors and round windows.",
    "Black and white photograph of a jazz musician playing the saxophone.",
]


def _builtin_corpus() -> list[str]:
    """Deterministic English caption-like corpus (~600 lines) for the tiny tokenizer."""
    lines = list(_EXTRA_LINES)
    n = 600
    for i in range(n):
        s = _SUBJECTS[i % len(_SUBJECTS)]
        a = _ADJECTIVES[(i * 7 + 3) % len(_ADJECTIVES)]
        v = _ACTIONS[(i * 5 + 1) % len(_ACTIONS)]
        p = _PLACES[(i * 3 + 2) % len(_PLACES)]
        st = _STYLES[(i * 11 + 4) % len(_STYLES)]
        sentence = f"{s} {v} {p}, {a}, {st}"
        if i % 3 == 0:
            sentence = sentence[0].upper() + sentence[1:] + "."
        lines.append(sentence)
    return lines


def _train_unigram_vocab(lines: list[str], vocab_size: int) -> list[tuple[str, float]]:
    """Train a unigram vocabulary; ids 0/1/2 are <pad>, </s>, <unk> as in T5. Returns [(piece, score)]."""
    try:
        import sentencepiece as spm
    except ImportError:
        spm = None
    if spm is not None:
        import io

        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type="unigram",
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            pad_piece="<pad>",
            eos_piece="</s>",
            unk_piece="<unk>",
            normalization_rule_name="identity",
            character_coverage=1.0,
            hard_vocab_limit=False,
            num_threads=1,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
        sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
        return [(sp.id_to_piece(i), float(sp.get_score(i))) for i in range(sp.get_piece_size())]
    # Fallback: the `tokenizers` library (always present with transformers).
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.Unigram())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tk.train_from_iterator(lines, trainer)
    vocab = json.loads(tk.to_str())["model"]["vocab"]
    return [(str(p), float(s)) for p, s in vocab]


def build_tiny_t5(
    folder: str | os.PathLike,
    d_model: int = 64,
    vocab_corpus: Iterable[str] | None = None,
    seed: int = 0,
    *,
    seq2seq: bool = False,
    vocab_size: int = 512,
) -> Path:
    """Write a tiny random-weight flan-t5-like model + real T5 tokenizer into ``folder`` (HF layout).

    Offline and deterministic given ``seed``. The tokenizer is a unigram model trained on a small built-in
    English corpus plus ``vocab_corpus`` lines (``vocab_size`` pieces, <pad>=0, </s>=1, <unk>=2, plus the
    100 ``<extra_id_*>`` sentinels as in T5). The model mirrors flan-t5's structure (gated-GELU FFN,
    relative position buckets) at d_model=``d_model``, 2 heads of 16, 2 layers, d_ff=2*d_model.
    ``seq2seq=True`` saves a full ``T5ForConditionalGeneration`` (like the published flan-t5-xl) instead of
    a ``T5EncoderModel``. Returns the folder path.
    """
    _import_transformers()
    from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration, T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    lines = _builtin_corpus()
    if vocab_corpus is not None:
        if isinstance(vocab_corpus, str):
            vocab_corpus = [vocab_corpus]
        lines.extend(str(x) for x in vocab_corpus if str(x).strip())
    vocab = _train_unigram_vocab(lines, int(vocab_size))

    tokenizer = T5Tokenizer(vocab=vocab, legacy=True, model_max_length=T5_MAX_LENGTH)
    tokenizer.save_pretrained(str(folder))

    vocab_rounded = (len(tokenizer) + 63) // 64 * 64  # flan-t5: 32100 tokens, 32128 embeddings
    config = T5Config(
        vocab_size=vocab_rounded,
        d_model=int(d_model),
        d_kv=16,
        num_heads=2,
        num_layers=2,
        num_decoder_layers=2,
        d_ff=2 * int(d_model),
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    cls = T5ForConditionalGeneration if seq2seq else T5EncoderModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = cls(config)
    model.eval()
    model.save_pretrained(str(folder))
    return folder
