"""GroundingDINO / SAM / Qwen2.5-VL wrappers, against tiny random-weight models built offline from transformers'
own config and model classes and saved in Hugging Face folder layout (the loaders read them like a download)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from echogen_core import detectors
from echogen_core.detectors import (NAMER_PROMPT, Detection, GroundingDetector, SamRefiner, SubjectNamer,
                                    box_pixel_mask, clean_subject_name, downscale_to_max_side, format_caption)
from echogen_core.errors import CheckpointError, InputError, MissingDependencyError

transformers = pytest.importorskip("transformers")


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random colour blobs: a coarse random grid upsampled, so resizing changes pixels non-trivially; cheap
    even at 3000x2000."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BILINEAR)


def _pil_class(name: str):
    """The PIL-backend image processor in transformers 5.x, the classic class in 4.x (no torchvision here)."""
    return getattr(transformers, name + "Pil", None) or getattr(transformers, name)


def _dump(path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------
# Tiny folders


GD_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "a", "the", "dog", "cat", "red", "backpack",
            "photo", "of", "teddy", "bear"]


def _bert_tokenizer_files(folder) -> None:
    """A WordPiece (BERT-uncased style) tokenizer.json + tokenizer_config.json, as in the GroundingDINO repos."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(GD_WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "vocab.txt").write_text("\n".join(GD_WORDS) + "\n", encoding="utf-8")
    _dump(folder / "tokenizer_config.json", {
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 256, "unk_token": "[UNK]",
        "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"})


@pytest.fixture(scope="session")
def gd_dir(tmp_path_factory):
    """GroundingDINO: 4-stage Swin (8 wide), 1-layer BERT, d_model 32, 1 encoder / 2 decoder layers, 12 queries."""
    from transformers import (AutoTokenizer, BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoProcessor, SwinConfig)

    folder = tmp_path_factory.mktemp("grounding_dino")
    _bert_tokenizer_files(folder)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=2, out_indices=[2, 3, 4])
    text = BertConfig(vocab_size=len(GD_WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)
    # GroupNorm(32, d_model) needs d_model % 32 == 0; two decoder layers because the box heads are tied
    # across layers (one layer leaves nothing to tie in transformers 5.x).
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, num_queries=12,
                                 encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                 encoder_attention_heads=2, decoder_attention_heads=2, num_feature_levels=4,
                                 encoder_n_points=2, decoder_n_points=2)
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).eval().save_pretrained(folder)
    # The real processor resizes to shorter side 800 / longer side 1333; the tiny one to 64 / 96.
    image_processor = _pil_class("GroundingDinoImageProcessor")(size={"shortest_edge": 64, "longest_edge": 96})
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sam_dir(tmp_path_factory):
    """SAM: 64-px input, patch 16 (4x4 image embedding), 1 ViT block, 16 wide."""
    from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamProcessor, SamPromptEncoderConfig, \
        SamVisionConfig

    folder = tmp_path_factory.mktemp("sam")
    vision = SamVisionConfig(hidden_size=16, output_channels=16, num_hidden_layers=1, num_attention_heads=2,
                             image_size=64, patch_size=16, window_size=2, global_attn_indexes=[0],
                             num_pos_feats=8, mlp_dim=32)
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                   iou_head_hidden_dim=16)
    torch.manual_seed(0)
    SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
             ).eval().save_pretrained(folder)
    image_processor = _pil_class("SamImageProcessor")(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    SamProcessor(image_processor=image_processor).save_pretrained(folder)
    return folder


QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
# Qwen2's pre-tokenizer split (the same regex the released tokenizer.json holds).
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# The released Qwen2.5-VL template, trimmed to what one user turn with an image and a text needs.
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    """Qwen2.5-VL: byte-level BPE trained here on a few sentences (the released special tokens), 1 text layer
    (64 wide), 1 vision block (32 wide), the released file set (preprocessor_config.json, chat_template.json)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    folder = tmp_path_factory.mktemp("qwen2_5_vl")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = ["system", "You are a helpful assistant.", "user", "assistant", NAMER_PROMPT,
              "The subject is a red backpack.", "A dog.", "cat teddy bear backpack"] * 4
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=420, special_tokens=QWEN_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(folder / "tokenizer.json"))
    ids = {s: tok.token_to_id(s) for s in QWEN_SPECIAL}
    added = {str(i): {"content": s, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
                      "special": True} for s, i in ids.items()}
    _dump(folder / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "bos_token": None, "model_max_length": 32768,
        "errors": "replace", "clean_up_tokenization_spaces": False, "chat_template": QWEN_TEMPLATE})
    _dump(folder / "chat_template.json", {"chat_template": QWEN_TEMPLATE})
    _dump(folder / "preprocessor_config.json", {
        "min_pixels": 56 * 56, "max_pixels": 200 * 200, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"})
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}, rope_theta=10000.0,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[0], window_size=56),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    # The released generation config samples; the namer must override it with greedy decoding.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"], do_sample=True, temperature=0.1,
        top_p=0.001, top_k=1, eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]])
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def detector(gd_dir):
    return GroundingDetector.from_folder(gd_dir)


@pytest.fixture(scope="session")
def namer(qwen_dir):
    return SubjectNamer.from_folder(qwen_dir)


class _Spy:
    """Wraps a processor: records what __call__ got, delegates everything."""

    def __init__(self, inner):
        self._inner, self.calls = inner, []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self._inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


# --------------------------------------------------------------------------------------------------------------
# GroundingDINO


def _reference_detections(detector, image, caption, box_threshold, text_threshold=0.25):
    """Boxes/scores computed here from the raw outputs (sigmoid, max over tokens, cxcywh -> xyxy times the
    image size), plus transformers' post-processing on the same outputs, both in the model's query order."""
    proc, model = detector.processor, detector.model
    batch = proc(images=image, text=caption, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    w, h = image.size
    scores = torch.sigmoid(out.logits[0]).max(-1).values
    cx, cy, bw, bh = out.pred_boxes[0].unbind(-1)
    boxes = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
    keep = scores > box_threshold
    post = detectors._post_process_detection(proc, out, batch["input_ids"], box_threshold, text_threshold, (h, w))
    return boxes[keep], scores[keep], post, batch


def test_detect_equals_transformers_postprocessing_sorted(detector):
    image = _image(200, 120, seed=1)
    found = detector.detect(image, "Red Backpack", box_threshold=0.3)
    boxes, scores, post, _ = _reference_detections(detector, image, "red backpack.", 0.3)
    # Our own decoding and transformers' agree, in the model's (unsorted) order.
    assert torch.allclose(post["boxes"], boxes, atol=1e-4) and torch.allclose(post["scores"], scores)
    assert len(found) == len(scores) >= 3
    raw = scores.tolist()
    assert raw != sorted(raw, reverse=True), "the tiny model should give unsorted scores, or sorting is untested"
    order = sorted(range(len(raw)), key=lambda i: -raw[i])
    want = boxes[order].clamp(min=0)
    want[:, 0::2] = want[:, 0::2].clamp(max=200)
    want[:, 1::2] = want[:, 1::2].clamp(max=120)
    assert [d.score for d in found] == pytest.approx([raw[i] for i in order], abs=1e-6)
    assert np.allclose([d.box for d in found], want.numpy(), atol=1e-3)
    assert all(isinstance(d, Detection) and isinstance(d.label, str) for d in found)
    # Labels are the caption words the box matched, without [SEP] or the caption's '.'.
    assert all(set(d.label.split()) <= {"red", "backpack"} for d in found) and any(d.label for d in found)
    with pytest.raises(Exception):
        found[0].score = 1.0                                    # frozen
    assert all(0 <= d.box[0] < d.box[2] <= 200 and 0 <= d.box[1] < d.box[3] <= 120 for d in found)


def test_detect_threshold_above_best_score_returns_nothing(detector):
    image = _image(200, 120, seed=1)
    _, scores, _, _ = _reference_detections(detector, image, "dog.", 0.0)
    best = float(scores.max())
    assert best < 1.0
    assert detector.detect(image, "dog", box_threshold=(best + 1.0) / 2) == []


def test_detect_passes_the_formatted_caption(detector, monkeypatch):
    spy = _Spy(detector.processor)
    monkeypatch.setattr(detector, "processor", spy)
    detector.detect(_image(90, 60), "  Red   Backpack ")
    assert spy.calls[-1]["text"] == "red backpack."
    detector.detect(_image(90, 60), "Dog.")
    assert spy.calls[-1]["text"] == "dog."


def test_detect_works_with_the_4x_post_processing_signature(detector, monkeypatch):
    """transformers <= 4.50 names the box threshold `box_threshold` and returns string labels under 'labels'."""
    real = detector.processor
    image = _image(200, 120, seed=1)
    want = detector.detect(image, "red backpack", box_threshold=0.3)
    seen = {}

    class Old:
        tokenizer = real.tokenizer

        def __call__(self, *args, **kwargs):
            return real(*args, **kwargs)

        def post_process_grounded_object_detection(self, outputs, input_ids, box_threshold=0.25, text_threshold=0.25,
                                                   target_sizes=None):
            seen["box_threshold"] = box_threshold
            r = detectors._post_process_detection(real, outputs, input_ids, box_threshold, text_threshold,
                                                  tuple(target_sizes[0]))
            return [{"scores": r["scores"], "boxes": r["boxes"], "labels": list(r["text_labels"])}]

    monkeypatch.setattr(detector, "processor", Old())
    assert detector.detect(image, "red backpack", box_threshold=0.3) == want
    assert seen["box_threshold"] == 0.3


def test_format_caption():
    assert format_caption("Dog") == "dog."
    assert format_caption("dog.") == "dog."
    assert format_caption(" Red  Backpack\n") == "red backpack."
    for bad in ("", "   ", " . "):
        with pytest.raises(InputError):
            format_caption(bad)
    with pytest.raises(InputError):
        format_caption(None)


def test_large_image_is_downscaled_but_boxes_are_in_original_pixels(detector, monkeypatch):
    big = _image(3000, 2000, seed=2)
    small = downscale_to_max_side(big, 1333)
    assert small.size == (1333, 889)
    spy = _Spy(detector.processor)
    monkeypatch.setattr(detector, "processor", spy)
    on_big = detector.detect(big, "dog", box_threshold=0.0)
    assert spy.calls[-1]["images"].size == (1333, 889)      # the model saw the downscaled image
    on_small = detector.detect(small, "dog", box_threshold=0.0)
    assert spy.calls[-1]["images"].size == (1333, 889)      # already small enough: passed as is
    assert len(on_big) == len(on_small) > 0
    sx, sy = 3000 / 1333, 2000 / 889
    for a, b in zip(on_big, on_small):
        assert a.score == pytest.approx(b.score, abs=1e-6)
        want = (min(b.box[0] * sx, 3000), min(b.box[1] * sy, 2000), min(b.box[2] * sx, 3000), min(b.box[3] * sy, 2000))
        assert a.box == pytest.approx(want, rel=1e-4, abs=1e-2)
    assert max(d.box[2] for d in on_big) > 1333                  # original coordinates, not the detector's
    # max_side at least the longer side: nothing is resized.
    detector.detect(_image(300, 200), "dog", max_side=300)
    assert spy.calls[-1]["images"].size == (300, 200)


def test_boxes_are_clipped_to_the_image(detector, monkeypatch):
    real = detector.model

    class Shifted:
        """The real model, with query 0's box moved so that it sticks out right and bottom."""

        dtype = real.dtype

        def parameters(self):
            return real.parameters()

        def __call__(self, **kw):
            out = real(**kw)
            out.pred_boxes[0, 0] = torch.tensor([0.95, 0.9, 0.3, 0.4])
            out.logits[0, 0, 1] = 20.0                            # and make it the best box
            return out

    monkeypatch.setattr(detector, "model", Shifted())
    found = detector.detect(_image(200, 100), "dog", box_threshold=0.0)
    assert found[0].box == pytest.approx((0.8 * 200, 0.7 * 100, 200.0, 100.0), abs=1e-3)
    assert found[0].score == pytest.approx(float(torch.sigmoid(torch.tensor(20.0))))


def test_detect_rejects_bad_inputs(detector):
    with pytest.raises(InputError):
        detector.detect(np.zeros((8, 8, 3), np.uint8), "dog")
    with pytest.raises(InputError):
        detector.detect(_image(40, 40), "  ")


def test_detect_accepts_grey_images(detector):
    found = detector.detect(_image(80, 60).convert("L"), "dog", box_threshold=0.0)
    assert found and all(d.box[2] <= 80 and d.box[3] <= 60 for d in found)


# --------------------------------------------------------------------------------------------------------------
# SAM


def test_box_pixel_mask():
    m = box_pixel_mask((2.5, 1, 5, 3.2), 8, 6)
    assert m.shape == (6, 8) and m.dtype == bool
    assert np.argwhere(m).min(0).tolist() == [1, 2] and np.argwhere(m).max(0).tolist() == [3, 4]
    assert m.sum() == 3 * 3
    assert box_pixel_mask((-5, -5, 100, 100), 8, 6).all()
    for bad in ((5, 1, 2, 3), (0, 0, 0, 3), (9, 0, 12, 3), (0, 0, float("nan"), 3), (1, 2, 3)):
        with pytest.raises(InputError):
            box_pixel_mask(bad, 8, 6)


@pytest.mark.parametrize("best", [0, 2])
def test_sam_mask_is_the_best_iou_output_inside_the_box(sam_dir, best):
    refiner = SamRefiner.from_folder(sam_dir)
    head = refiner.model.mask_decoder.iou_prediction_head.proj_out
    with torch.no_grad():                 # the IoU head now prefers multimask output `best` (token 1 + best)
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.1, 0.2, 0.3]))
        head.bias[1 + best] = 5.0
    image = _image(200, 120, seed=3)
    box = (30.4, 20.0, 150.0, 100.6)
    mask = refiner.refine(image, box)
    assert mask.shape == (120, 200) and mask.dtype == bool

    # All three outputs, computed here with transformers' processor and post-processing.
    proc = refiner.processor
    batch = proc(images=image, input_boxes=[[list(box)]], return_tensors="pt")
    with torch.no_grad():
        out = refiner.model(pixel_values=batch["pixel_values"], input_boxes=batch["input_boxes"].float(),
                            multimask_output=True)
    assert int(out.iou_scores[0, 0].argmax()) == best
    full = proc.image_processor.post_process_masks(out.pred_masks, batch["original_sizes"],
                                                   batch["reshaped_input_sizes"])[0][0].numpy()
    inside = box_pixel_mask(box, 200, 120)
    candidates = [full[i] & inside for i in range(3)]
    assert not np.array_equal(candidates[0], candidates[2]), "outputs must differ for the choice to be tested"
    assert np.array_equal(mask, candidates[best])
    assert not mask[~inside].any()
    assert mask.any() and (full[best] & ~inside).any(), "SAM's own mask should spill outside the box here"


def test_sam_takes_rgba_and_rejects_boxes_outside_the_image(sam_dir):
    refiner = SamRefiner.from_folder(sam_dir)
    assert refiner.refine(_image(64, 48).convert("RGBA"), (0, 0, 30, 30)).shape == (48, 64)
    with pytest.raises(InputError):
        refiner.refine(_image(64, 64), (70, 0, 90, 10))


# --------------------------------------------------------------------------------------------------------------
# Qwen2.5-VL


@pytest.mark.parametrize("raw, want", [
    ("A red backpack.", "red backpack"),
    ("The subject is a dog", "dog"),
    ("", ""),
    ("  \n ", ""),
    ("...", ""),
    ("The", ""),
    ("Dog", "dog"),
    ("It's a cat.", "cat"),
    ("The main subject of this image is a golden retriever.", "golden retriever"),
    ("The image shows a brown dog sitting on the grass.", "brown dog"),
    ("Answer: **Red backpack**", "red backpack"),
    ("Subject: teddy bear\nIt is brown.", "teddy bear"),
    ("A photo of a cat", "cat"),
    ('"Teddy bear"', "teddy bear"),
    ("a cup of coffee", "cup of coffee"),
    ("This is a t-shirt.", "t-shirt"),
    ("dog, cat", "dog"),
    ("A vase with flowers", "vase"),
    ("very small brown fluffy puppy", "small brown fluffy puppy"),
])
def test_clean_subject_name(raw, want):
    assert clean_subject_name(raw) == want


def test_chat_text_is_the_qwen_conversation(namer):
    want = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|><|image_pad|><|vision_end|>{NAMER_PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    assert namer.chat_text() == want
    # A folder without any chat template gets the built-in Qwen2.5-VL format: the same text.
    assert detectors._chat_template_of(namer.folder, namer.tokenizer)[1].endswith("chat_template.json")
    fallback = SubjectNamer(namer.model, namer.tokenizer, namer.image_processor,
                            detectors._QWEN_FALLBACK_TEMPLATE, namer.folder)
    assert fallback.chat_text() == want


def test_namer_inputs_expand_the_image_placeholder(namer):
    inputs = namer.build_inputs(_image(200, 120))
    cfg = namer.model.config
    ids = inputs["input_ids"][0]
    grid = inputs["image_grid_thw"][0]
    n = int(grid.prod()) // 4
    assert n > 1 and int((ids == cfg.image_token_id).sum()) == n
    assert inputs["pixel_values"].shape[0] == int(grid.prod())
    start = int((ids == cfg.vision_start_token_id).nonzero()[0])
    end = int((ids == cfg.vision_end_token_id).nonzero()[0])
    assert end - start - 1 == n and bool((ids[start + 1:end] == cfg.image_token_id).all())
    if "mm_token_type_ids" in inputs:    # transformers 5.x: marks the image tokens for the 3-D rotary positions
        assert torch.equal(inputs["mm_token_type_ids"][0].bool(), ids == cfg.image_token_id)
    # The model accepts them (the vision tower's output count must match the placeholder count).
    with torch.no_grad():
        out = namer.model(**inputs)
    assert tuple(out.logits.shape[:2]) == (1, ids.shape[0])
    deltas = getattr(getattr(namer.model, "model", None), "rope_deltas", None)
    if "mm_token_type_ids" in inputs and deltas is not None:
        # 3-D positions were used: n image tokens on a (h/2) x (w/2) grid advance the position by max(h, w)/2,
        # so the text after them is shifted back by n - max(h, w)/2.
        assert int(deltas.flatten()[0]) == int(max(grid[1:]) // 2) - n


def test_namer_caps_the_image_size(namer, monkeypatch):
    monkeypatch.setattr(namer, "max_pixels", 56 * 56)
    inputs = namer.build_inputs(_image(600, 400))
    assert int(inputs["image_grid_thw"][0].prod()) * 14 * 14 <= 2 * 56 * 56   # temporal patch 2: frame doubled


def _force_answer(model, tokenizer, text_ids: list, answer: str) -> None:
    """Turn the tiny model into a bigram machine that answers `answer` then <|im_end|>: attention and MLP
    outputs zeroed (the residual stream is the token embedding), embeddings one-hot, lm_head rows pointing
    from each token to the next."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    chain = [text_ids[-1]] + tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]
    assert len(set(chain)) == len(chain), chain
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        assert emb.shape[1] >= len(chain)
        head.zero_()
        for k, (tok, nxt) in enumerate(zip(chain, chain[1:])):
            emb[tok].zero_()
            emb[tok, k] = 1.0
            head[nxt, k] = 10.0


@pytest.fixture
def fresh_namer(qwen_dir):
    return SubjectNamer.from_folder(qwen_dir)


def test_name_generates_and_cleans(fresh_namer):
    image = _image(200, 120)
    ids = fresh_namer.build_inputs(image)["input_ids"][0].tolist()
    _force_answer(fresh_namer.model, fresh_namer.tokenizer, ids, "The subject is a red backpack.")
    assert fresh_namer.answer(image) == "The subject is a red backpack."
    assert fresh_namer.name(image) == "red backpack"
    assert fresh_namer.last_answer == "The subject is a red backpack."


def test_name_raises_when_the_answer_is_empty(fresh_namer):
    image = _image(200, 120)
    ids = fresh_namer.build_inputs(image)["input_ids"][0].tolist()
    _force_answer(fresh_namer.model, fresh_namer.tokenizer, ids, ".")
    with pytest.raises(InputError, match="no usable subject name"):
        fresh_namer.name(image)


def test_generation_is_greedy_whatever_the_folder_says(namer, monkeypatch):
    monkeypatch.setattr(namer, "max_new_tokens", 5)
    gc = namer._generation_config()
    assert gc.do_sample is False and gc.max_new_tokens == namer.max_new_tokens
    end = namer.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in (gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id])
    image = _image(120, 90)
    assert namer.answer(image) == namer.answer(image)


def test_half_precision_models_take_fp32_inputs(gd_dir, sam_dir, qwen_dir):
    """dtype=bfloat16: pixel inputs are cast to the model's dtype, results come back in fp32 / bool."""
    image = _image(200, 120, seed=4)
    detector = GroundingDetector.from_folder(gd_dir, dtype=torch.bfloat16)
    assert detector.model.dtype == torch.bfloat16
    found = detector.detect(image, "dog", box_threshold=0.0)
    assert found and all(isinstance(v, float) for d in found for v in d.box)
    refiner = SamRefiner.from_folder(sam_dir, dtype=torch.bfloat16)
    assert refiner.refine(image, (10, 10, 90, 80)).shape == (120, 200)
    namer = SubjectNamer.from_folder(qwen_dir, dtype=torch.bfloat16)
    namer.max_new_tokens = 2
    assert isinstance(namer.answer(image), str)


# --------------------------------------------------------------------------------------------------------------
# Loader errors


LOADERS = [(GroundingDetector, "gd_dir", "GroundingDINO"), (SamRefiner, "sam_dir", "SAM"),
           (SubjectNamer, "qwen_dir", "Qwen2.5-VL")]


@pytest.mark.parametrize("loader, _, what", LOADERS)
def test_loader_missing_folder(loader, _, what, tmp_path):
    with pytest.raises(CheckpointError, match=f"{what} folder not found.*Download"):
        loader.from_folder(tmp_path / "nope")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        loader.from_folder(tmp_path / "file.bin")
    with pytest.raises(CheckpointError, match="no config.json"):
        loader.from_folder(tmp_path)


@pytest.mark.parametrize("loader, wrong, found", [
    (GroundingDetector, "sam_dir", "'sam'"), (SamRefiner, "qwen_dir", "'qwen2_5_vl'"),
    (SubjectNamer, "gd_dir", "'grounding-dino'"), (GroundingDetector, "qwen_dir", "'qwen2_5_vl'")])
def test_loader_wrong_model_type(loader, wrong, found, request):
    folder = request.getfixturevalue(wrong)
    with pytest.raises(CheckpointError, match=f"model_type={found}") as e:
        loader.from_folder(folder)
    assert "Download" in str(e.value)


def test_loader_names_qwen2_vl_and_mm_grounding_dino(tmp_path):
    _dump(tmp_path / "config.json", {"model_type": "qwen2_vl"})
    with pytest.raises(CheckpointError, match="Qwen2-VL"):
        SubjectNamer.from_folder(tmp_path)
    _dump(tmp_path / "config.json", {"model_type": "mm-grounding-dino"})
    with pytest.raises(CheckpointError, match="MM-GroundingDINO"):
        GroundingDetector.from_folder(tmp_path)


def _copy_without(src, dst, *names):
    shutil.copytree(src, dst)
    for n in names:
        (dst / n).unlink()
    return dst


def test_loader_missing_files(gd_dir, sam_dir, qwen_dir, tmp_path):
    folder = _copy_without(gd_dir, tmp_path / "gd", "tokenizer.json", "vocab.txt")
    with pytest.raises(CheckpointError, match="no tokenizer"):
        GroundingDetector.from_folder(folder)
    folder = _copy_without(sam_dir, tmp_path / "sam", "model.safetensors")
    with pytest.raises(CheckpointError, match="no weights"):
        SamRefiner.from_folder(folder)
    folder = _copy_without(qwen_dir, tmp_path / "qw", "preprocessor_config.json")
    with pytest.raises(CheckpointError, match="no image processor settings"):
        SubjectNamer.from_folder(folder)


def test_loader_refuses_incomplete_weights(sam_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy_without(sam_dir, tmp_path / "sam", "model.safetensors")
    sd = load_file(str(sam_dir / "model.safetensors"))
    dropped = sorted(k for k in sd if "iou_prediction_head" in k)
    save_file({k: v for k, v in sd.items() if k not in dropped}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lack .*iou_prediction_head"):
        SamRefiner.from_folder(folder)


def test_loader_refuses_a_foreign_tokenizer(qwen_dir, tmp_path):
    """Qwen weights with a tokenizer whose <|image_pad|> id is not the model's image token."""
    folder = _copy_without(qwen_dir, tmp_path / "qw", "tokenizer.json", "tokenizer_config.json")
    data = json.loads((qwen_dir / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = json.loads((qwen_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    old_id, new_id = vocab["<|image_pad|>"], len(vocab)
    vocab["<|image_pad_old|>"] = vocab.pop("<|image_pad|>")
    entry = next(e for e in data["added_tokens"] if e["content"] == "<|image_pad|>")
    entry["content"] = "<|image_pad_old|>"
    data["added_tokens"].append({**entry, "id": new_id, "content": "<|image_pad|>"})
    cfg["added_tokens_decoder"][str(old_id)]["content"] = "<|image_pad_old|>"
    cfg["added_tokens_decoder"][str(new_id)] = {**cfg["added_tokens_decoder"][str(old_id)], "content": "<|image_pad|>"}
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    _dump(folder / "tokenizer_config.json", cfg)
    with pytest.raises(CheckpointError, match=f"maps <\\|image_pad\\|> to {new_id} but the model expects {old_id}"):
        SubjectNamer.from_folder(folder)


def test_loader_bad_dtype(gd_dir):
    with pytest.raises(InputError, match="dtype"):
        GroundingDetector.from_folder(gd_dir, dtype=torch.int8)


def test_missing_transformers_says_how_to_install(gd_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)     # `import transformers` now raises ImportError
    with pytest.raises(MissingDependencyError, match="pip install"):
        GroundingDetector.from_folder(gd_dir)


def test_core_does_not_import_comfy():
    # in a fresh interpreter: this process's modules depend on what other tests imported
    import subprocess

    code = ("import sys, echogen_core.detectors, echogen_core.segmentation, echogen_core.cli; "
            "print([n for n in sys.modules if n == 'comfy' or n.startswith('comfy.') or n == 'folder_paths'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(detectors.__file__).resolve().parents[1]))
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    src = detectors.__file__
    text = open(src, encoding="utf-8").read()
    assert "import comfy" not in text and "from comfy" not in text
