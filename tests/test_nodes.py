"""The node classes called directly (no ComfyUI): real loaders on tiny official-layout files, and the errors
a user meets at node level."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from echogen_core.errors import CheckpointError, InputError
from helpers import micro_vae, randomize_, stand_in_bundle, tiny_infinity

T5 = 64  # tiny_t5_dir width


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_t5_dir):
    from echogen_core.dinov2 import Dinov2, Dinov2Config
    from echogen_core.echogen import EchoGen, EchoGenConfig
    from echogen_core.flux_vae import FluxVAEConfig, FluxVAEEncoder

    root = tmp_path_factory.mktemp("models")
    (root / "echogen").mkdir()
    (root / "vae").mkdir()
    (root / "text_encoders").mkdir()
    (root / "text_encoders" / "flan-t5-tiny").symlink_to(tiny_t5_dir)
    torch.save(tiny_infinity(seed=4, text_channels=T5).state_dict(), root / "echogen" / "infinity_tiny.pth")
    cfg = EchoGenConfig.tiny(text_channels=T5, semantic_dim=128, semantic_len=17, content_dim=16, content_len=16)
    torch.save({"trainer": {"gpt_fsdp": randomize_(EchoGen(cfg), seed=3).state_dict()}},
               root / "echogen" / "echogen_tiny.pth")
    other = EchoGenConfig.tiny(text_channels=T5, semantic_dim=128, semantic_len=5, content_dim=16, content_len=4)
    torch.save(randomize_(EchoGen(other), seed=5).state_dict(), root / "echogen" / "echogen_other_size.pth")
    torch.save({"vae": micro_vae().state_dict()}, root / "echogen" / "vae_tiny.pth")
    torch.save({"vae": micro_vae(codebook_dim=6).state_dict()}, root / "echogen" / "vae_6bit.pth")
    torch.save(randomize_(Dinov2(Dinov2Config.tiny()), seed=1).state_dict(), root / "echogen" / "dinov2_tiny.pth")
    flux = randomize_(FluxVAEEncoder(FluxVAEConfig.tiny()), seed=2)
    save_file({k: v.contiguous() for k, v in flux.state_dict().items()}, root / "vae" / "ae_tiny.safetensors")
    return root


@pytest.fixture
def nodes(models_dir, monkeypatch):
    monkeypatch.setenv("ECHOGEN_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("ECHOGEN_DEVICE", "cpu")
    import nodes as pack

    return pack.NODE_CLASS_MAPPINGS


def build(nodes, name, **kwargs):
    cls = nodes[name]
    out = getattr(cls(), cls.FUNCTION)(**kwargs)
    return out["result"] if isinstance(out, dict) else out


def reference(size=(40, 52), seed=0):
    return torch.from_numpy(np.random.default_rng(seed).random((1, size[0], size[1], 3), dtype=np.float32))


def test_dropdowns_list_the_model_folders(nodes):
    names = nodes["EchoGenModelLoader"].INPUT_TYPES()["required"]["model_name"][0]
    assert {"infinity_tiny.pth", "echogen_tiny.pth", "vae_tiny.pth"} <= set(names)
    from nodes.loaders import BUNDLED

    assert nodes["EchoGenTextEncoderLoader"].INPUT_TYPES()["required"]["folder"][0] == ["flan-t5-tiny", BUNDLED]
    assert nodes["EchoGenContentEncoderLoader"].INPUT_TYPES()["required"]["vae_name"][0] == ["ae_tiny.safetensors",
                                                                                            BUNDLED]


def test_text_to_image_chain_is_deterministic_and_batch_independent(nodes):
    (model,) = build(nodes, "EchoGenModelLoader", model_name="infinity_tiny.pth", precision="fp32")
    (vae,) = build(nodes, "EchoGenVAELoader", vae_name="vae_tiny.pth")
    (enc,) = build(nodes, "EchoGenTextEncoderLoader", folder="flan-t5-tiny")
    (text,) = build(nodes, "EchoGenTextEncode", text_encoder=enc, prompt="a red cube")
    assert not model.is_echogen
    latent, w, h = build(nodes, "EchoGenSampler", model=model, vae=vae, text=text, width=330, height=250, seed=7,
                         batch_size=2)
    assert (w, h) == (320, 240)  # snapped to the 0.75 template at 0.06M
    (images,) = build(nodes, "EchoGenDecode", vae=vae, latent=latent)
    assert images.shape == (2, 240, 320, 3) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    single, _, _ = build(nodes, "EchoGenSampler", model=model, vae=vae, text=text, width=330, height=250, seed=7,
                         batch_size=1)
    torch.testing.assert_close(single.codes[0], latent.codes[0])
    other, _, _ = build(nodes, "EchoGenSampler", model=model, vae=vae, text=text, width=330, height=250, seed=8,
                        batch_size=1)
    assert not torch.equal(other.codes[0], latent.codes[0])


def load_subject_models(nodes, model_name="echogen_tiny.pth"):
    (model,) = build(nodes, "EchoGenModelLoader", model_name=model_name)
    (dino,) = build(nodes, "EchoGenSemanticEncoderLoader", dinov2_name="dinov2_tiny.pth")
    (content,) = build(nodes, "EchoGenContentEncoderLoader", vae_name="ae_tiny.safetensors")
    return model, dino, content


def test_subject_chain_matches_the_core_pipeline(nodes):
    from echogen_core.sampler import SamplerSettings, generate
    from echogen_core.schedules import nearest_schedule

    model, dino, content = load_subject_models(nodes)
    ref = reference()
    (partial,) = build(nodes, "EchoGenSemanticEncode", model=model, semantic_encoder=dino, image=ref)
    (subject,) = build(nodes, "EchoGenContentEncode", subject=partial, image=ref, content_encoder=content)
    assert subject.semantic.shape == (1, 17, 128) and subject.content.shape == (1, 16, 16)
    (vae,) = build(nodes, "EchoGenVAELoader", vae_name="vae_tiny.pth")
    (enc,) = build(nodes, "EchoGenTextEncoderLoader", folder="flan-t5-tiny")
    (text,) = build(nodes, "EchoGenTextEncode", text_encoder=enc, prompt="a cube on the beach")
    (guidance,) = build(nodes, "EchoGenGuidance", text_cfg=2.0, subject_cfg=3.0, temperature=1.5, top_k=0, top_p=0.9,
                        subject_cfg_per_scale="1,2,3")
    latent, w, h = build(nodes, "EchoGenSampler", model=model, vae=vae, text=text, width=256, height=256, seed=3,
                         batch_size=1, subject=subject, guidance=guidance)
    settings = SamplerSettings(cfg=2.0, subject_cfg=[1.0, 2.0, 3.0], tau=1.5, top_k=0, top_p=0.9)
    from echogen_core.echogen import SubjectFeatures

    direct = generate(model.managed.obj, vae.obj, text.positive, nearest_schedule(256, 256), settings, seed=3,
                      subject=SubjectFeatures(subject.semantic, subject.content), decode=False)
    torch.testing.assert_close(latent.codes, direct.summed_codes)
    low_memory, _, _ = build(nodes, "EchoGenSampler", model=model, vae=vae, text=text, width=256, height=256, seed=3,
                             batch_size=1, subject=subject, guidance=guidance, sequential_rows=True)
    assert torch.equal(low_memory.codes, latent.codes)
    assert guidance.sequential_rows is False  # the guidance handle is not changed


def test_comfyui_vae_object_gives_the_same_content_tokens(nodes):
    """The content encode node takes ComfyUI's VAE (IMAGE in, raw latent mean out) as well as our loader."""
    model, dino, content = load_subject_models(nodes)
    ref = reference()
    (partial,) = build(nodes, "EchoGenSemanticEncode", model=model, semantic_encoder=dino, image=ref)

    class ComfyLikeVAE:  # comfy.sd.VAE.encode: (B, H, W, 3) in [0, 1] -> (B, 16, H/8, W/8) posterior mean
        def encode(self, pixels):
            return content.obj.encode(pixels.permute(0, 3, 1, 2))

    (ours,) = build(nodes, "EchoGenContentEncode", subject=partial, image=ref, content_encoder=content)
    (theirs,) = build(nodes, "EchoGenContentEncode", subject=partial, image=ref, vae=ComfyLikeVAE())
    torch.testing.assert_close(ours.content, theirs.content)
    with pytest.raises(InputError, match="exactly one"):
        build(nodes, "EchoGenContentEncode", subject=partial, image=ref)


def test_missing_model_file_names_the_folder(nodes, models_dir):
    with pytest.raises(InputError) as e:
        build(nodes, "EchoGenModelLoader", model_name="echogen_2b.pth")
    assert "echogen_2b.pth" in str(e.value) and str(models_dir / "echogen") in str(e.value)


def test_wrong_file_in_a_dropdown(nodes):
    with pytest.raises(CheckpointError, match="VAE"):
        build(nodes, "EchoGenModelLoader", model_name="vae_tiny.pth")
    with pytest.raises(CheckpointError, match="not a BSQ VAE"):
        build(nodes, "EchoGenVAELoader", vae_name="infinity_tiny.pth")


def test_mismatched_model_and_vae(nodes):
    (model,) = build(nodes, "EchoGenModelLoader", model_name="infinity_tiny.pth")
    (vae,) = build(nodes, "EchoGenVAELoader", vae_name="vae_6bit.pth")
    (enc,) = build(nodes, "EchoGenTextEncoderLoader", folder="flan-t5-tiny")
    (text,) = build(nodes, "EchoGenTextEncode", text_encoder=enc, prompt="x")
    with pytest.raises(CheckpointError, match="not a pair"):
        build(nodes, "EchoGenSampler", model=model, vae=vae, text=text, width=256, height=256, seed=0, batch_size=1)


def test_subject_encoded_for_another_model_size(nodes):
    model, dino, content = load_subject_models(nodes)
    ref = reference()
    (partial,) = build(nodes, "EchoGenSemanticEncode", model=model, semantic_encoder=dino, image=ref)
    (subject,) = build(nodes, "EchoGenContentEncode", subject=partial, image=ref, content_encoder=content)
    (other,) = build(nodes, "EchoGenModelLoader", model_name="echogen_other_size.pth")
    (vae,) = build(nodes, "EchoGenVAELoader", vae_name="vae_tiny.pth")
    (enc,) = build(nodes, "EchoGenTextEncoderLoader", folder="flan-t5-tiny")
    (text,) = build(nodes, "EchoGenTextEncode", text_encoder=enc, prompt="x")
    with pytest.raises(InputError, match="re-encode"):
        build(nodes, "EchoGenSampler", model=other, vae=vae, text=text, width=256, height=256, seed=0, batch_size=1,
              subject=subject)
    (plain,) = build(nodes, "EchoGenModelLoader", model_name="infinity_tiny.pth")
    with pytest.raises(InputError, match="plain Infinity"):
        build(nodes, "EchoGenSampler", model=plain, vae=vae, text=text, width=256, height=256, seed=0, batch_size=1,
              subject=subject)
    with pytest.raises(InputError, match="content"):
        build(nodes, "EchoGenSampler", model=model, vae=vae, text=text, width=256, height=256, seed=0, batch_size=1,
              subject=partial)


@pytest.mark.parametrize("width,height", [(10, 256), (256, 100000)])
def test_size_out_of_range(nodes, width, height):
    (model,) = build(nodes, "EchoGenModelLoader", model_name="infinity_tiny.pth")
    (vae,) = build(nodes, "EchoGenVAELoader", vae_name="vae_tiny.pth")
    (enc,) = build(nodes, "EchoGenTextEncoderLoader", folder="flan-t5-tiny")
    (text,) = build(nodes, "EchoGenTextEncode", text_encoder=enc, prompt="x")
    with pytest.raises(InputError, match="out of range"):
        build(nodes, "EchoGenSampler", model=model, vae=vae, text=text, width=width, height=height, seed=0,
              batch_size=1)


def test_empty_prompt_and_bad_schedules(nodes):
    (enc,) = build(nodes, "EchoGenTextEncoderLoader", folder="flan-t5-tiny")
    with pytest.raises(InputError, match="prompt is empty"):
        build(nodes, "EchoGenTextEncode", text_encoder=enc, prompt="  \n ")
    with pytest.raises(InputError, match="numbers separated by commas"):
        build(nodes, "EchoGenGuidance", text_cfg=3, subject_cfg=2, temperature=1, top_k=0, top_p=0.9,
              text_cfg_per_scale="3, high")
    with pytest.raises(InputError, match="positive"):
        build(nodes, "EchoGenGuidance", text_cfg=3, subject_cfg=2, temperature=1, top_k=0, top_p=0.9,
              temperature_per_scale="1,0")


def test_text_encoder_width_must_match_the_model(nodes, tmp_path):
    (model,) = build(nodes, "EchoGenModelLoader", model_name="echogen_tiny.pth")
    (vae,) = build(nodes, "EchoGenVAELoader", vae_name="vae_tiny.pth")
    from echogen_core.text_encoder import TextConditioning

    from nodes.handles import TextHandle

    wide = TextHandle(positive=TextConditioning(torch.zeros(1, 3, 32), torch.tensor([3])), negative=None,
                      prompts=("x",), channels=32)
    with pytest.raises(InputError, match="text encoder"):
        build(nodes, "EchoGenSampler", model=model, vae=vae, text=wide, width=256, height=256, seed=0, batch_size=1)


def test_subject_segmenter_node_with_a_user_mask(nodes):
    """IMAGE + MASK in; the subject on white, its mask and the label out (the user mask wins over 'auto')."""
    image = torch.full((1, 120, 160, 3), 0.2)
    image[:, 30:90, 50:110] = torch.tensor([0.9, 0.1, 0.1])
    mask = torch.zeros(1, 120, 160)
    mask[:, 30:90, 50:110] = 1
    prepared, out_mask, label = build(nodes, "EchoGenSubjectSegmenter", image=image, method="auto",
                                      subject_words="red block", crop="subject", size=64, mask=mask)
    assert prepared.shape == (1, 64, 64, 3) and out_mask.shape == (1, 64, 64)
    assert "red block" in label and "mask" in label
    far = torch.nn.functional.max_pool2d(out_mask[None], 5, stride=1, padding=2)[0] == 0  # away from the edge
    assert far.sum() > 500 and prepared[far].min() == 1.0  # the background is painted pure white
    inside = -torch.nn.functional.max_pool2d(-out_mask[None], 5, stride=1, padding=2)[0] > 0.99  # eroded subject
    assert inside.sum() > 100 and (prepared[inside] - torch.tensor([0.9, 0.1, 0.1])).abs().max() < 0.02
    with pytest.raises(InputError, match="masks"):
        build(nodes, "EchoGenSubjectSegmenter", image=image.expand(3, -1, -1, -1), method="mask",
              subject_words="", crop="official", size=64, mask=mask.expand(2, -1, -1))


def test_preview_shrinks_large_code_maps():
    from echogen_core.sampler import preview

    vae = micro_vae()
    codes = torch.randn(2, 8, 64, 48)  # 1024x768: shrunk to 16x12 tokens before decoding
    img = preview(vae, codes)
    assert img.dtype == torch.uint8 and img.shape == (256, 192, 3)


def test_sampler_progress_previews_and_cancel(nodes, monkeypatch):
    """One progress step per scale with a decoded preview; a cancel between scales stops the run."""
    import nodes.comfy_bridge as bridge

    (model,) = build(nodes, "EchoGenModelLoader", model_name="infinity_tiny.pth")
    (vae,) = build(nodes, "EchoGenVAELoader", vae_name="vae_tiny.pth")
    (enc,) = build(nodes, "EchoGenTextEncoderLoader", folder="flan-t5-tiny")
    (text,) = build(nodes, "EchoGenTextEncode", text_encoder=enc, prompt="a red cube")
    updates = []
    monkeypatch.setattr(bridge, "previews_enabled", lambda: True)
    monkeypatch.setattr(bridge.Progress, "update", lambda self, value, preview=None: updates.append((value, preview)))
    build(nodes, "EchoGenSampler", model=model, vae=vae, text=text, width=256, height=256, seed=1, batch_size=1)
    assert [v for v, _ in updates] == list(range(1, 8))  # 7 scales at 256 px
    assert all(p.size == (256, 256) for _, p in updates)  # codes live on the final 16x16 grid at every scale
    assert len({p.tobytes() for _, p in updates}) > 1  # previews follow the image as it forms

    class Interrupted(Exception):
        pass

    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted()

    monkeypatch.setattr(bridge, "check_interrupt", interrupt)
    with pytest.raises(Interrupted):
        build(nodes, "EchoGenSampler", model=model, vae=vae, text=text, width=256, height=256, seed=1, batch_size=1)
    assert len(calls) == 3  # stopped right after the third scale


def test_bundled_model_through_the_node_loaders(nodes, monkeypatch, tmp_path, tiny_t5_dir):
    """Every loader offers the pack's own small model; it runs at the one size it was trained at; without its
    files the error says how to get them."""
    from echogen_core import bundled

    from nodes.loaders import BUNDLED

    loaders = {"EchoGenModelLoader": "model_name", "EchoGenVAELoader": "vae_name",
               "EchoGenTextEncoderLoader": "folder", "EchoGenSemanticEncoderLoader": "dinov2_name",
               "EchoGenContentEncoderLoader": "vae_name"}
    for node, field in loaders.items():
        assert BUNDLED in nodes[node].INPUT_TYPES()["required"][field][0], node
    real = bundled.bundled_available()
    monkeypatch.setattr(bundled, "BUNDLE_DIR", tmp_path / "empty")
    with pytest.raises(InputError, match="bundled"):
        build(nodes, "EchoGenVAELoader", vae_name=BUNDLED)
    if not real:
        stand_in_bundle(tmp_path / "bundle", tiny_t5_dir)
        monkeypatch.setattr(bundled, "BUNDLE_DIR", tmp_path / "bundle")
    else:
        monkeypatch.undo()
    (model,) = build(nodes, "EchoGenModelLoader", model_name=BUNDLED)
    (vae,) = build(nodes, "EchoGenVAELoader", vae_name=BUNDLED)
    (enc,) = build(nodes, "EchoGenTextEncoderLoader", folder=BUNDLED)
    (dino,) = build(nodes, "EchoGenSemanticEncoderLoader", dinov2_name=BUNDLED)
    (content,) = build(nodes, "EchoGenContentEncoderLoader", vae_name=BUNDLED)
    assert model.is_echogen and model.fixed_schedule is not None
    crop = int(model.cfg.content_len ** 0.5 * 8)
    ref = reference(size=(crop, crop))
    (partial,) = build(nodes, "EchoGenSemanticEncode", model=model, semantic_encoder=dino, image=ref)
    (subject,) = build(nodes, "EchoGenContentEncode", subject=partial, image=ref, content_encoder=content)
    (text,) = build(nodes, "EchoGenTextEncode", text_encoder=enc, prompt="a star on grass")
    latent, w, h = build(nodes, "EchoGenSampler", model=model, vae=vae, text=text, width=1024, height=1024, seed=0,
                         batch_size=1, subject=subject)
    assert (w, h) == (64, 64)  # trained at 64 px only: the request is not snapped to an untrained size
    (image,) = build(nodes, "EchoGenDecode", vae=vae, latent=latent)
    assert image.shape == (1, 64, 64, 3)
