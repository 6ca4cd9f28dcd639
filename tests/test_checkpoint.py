import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from echogen_core import checkpoint as ck
from echogen_core.bsq_vae import BSQVAE, BSQVAEConfig
from echogen_core.errors import CheckpointError
from echogen_core.infinity import InfinityConfig
from echogen_core.schedules import get_schedule
from helpers import random_text, tiny_infinity

SCHEDULE = get_schedule(1.0, "0.06M")


@pytest.fixture(scope="module")
def model():
    return tiny_infinity(seed=11)


@pytest.fixture(scope="module")
def probe():
    text = random_text([4, 7], channels=128, seed=2)
    inputs = torch.randn(2, SCHEDULE.total_tokens - 1, 8, generator=torch.Generator().manual_seed(0))
    return text, inputs


def logits(m, probe):
    with torch.no_grad():
        return m(probe[0], probe[1], SCHEDULE)


def save_pth(obj, path):
    torch.save(obj, path)
    return path


def test_official_pth_round_trip(tmp_path, model, probe):
    path = save_pth(model.state_dict(), tmp_path / "infinity_tiny.pth")
    loaded = ck.load_infinity(path)
    assert loaded.cfg == model.cfg
    torch.testing.assert_close(logits(loaded, probe), logits(model, probe), rtol=0, atol=0)


def test_config_inferred_from_tensors_not_names(tmp_path):
    m = tiny_infinity(seed=3, depth=4, width=64, num_heads=4, mlp_hidden=256, bits=16, text_channels=96,
                      text_maxlen=12, pool_heads=2, block_chunks=2)
    cfg = ck.infer_infinity_config(m.state_dict())
    assert cfg == m.cfg


def test_training_checkpoint_nesting_and_legacy_keys(tmp_path, model, probe):
    sd = dict(model.state_dict())
    sd["attn_bias_for_masking"] = torch.zeros(1, 1, 4, 4)
    nested = {"args": {"lr": 1.0}, "epoch": 3, "trainer": {"gpt_fsdp": sd, "config": {"x": 1}}}
    loaded = ck.load_infinity(save_pth(nested, tmp_path / "ar-ckpt.pth"))
    torch.testing.assert_close(logits(loaded, probe), logits(model, probe), rtol=0, atol=0)
    assert any("gpt_fsdp" in n for n in loaded.load_notes)
    assert any("attn_bias_for_masking" in n for n in loaded.load_notes)


def test_zero_k_bias_may_be_absent(tmp_path, model, probe):
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("zero_k_bias")}
    loaded = ck.load_infinity(save_pth(sd, tmp_path / "nobuf.pth"))
    torch.testing.assert_close(logits(loaded, probe), logits(model, probe), rtol=0, atol=0)


def test_flat_blocks_naming_is_accepted(tmp_path, model, probe):
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("block_chunks."):
            _, c, _, j, rest = k.split(".", 4)
            k = f"blocks.{int(c) * model.cfg.blocks_per_chunk + int(j)}.{rest}"
        sd[k] = v
    loaded = ck.load_infinity(save_pth(sd, tmp_path / "flat.pth"))
    assert loaded.cfg.block_chunks == 1
    torch.testing.assert_close(logits(loaded, probe), logits(model, probe), rtol=0, atol=0)


def test_missing_key_is_named(tmp_path, model):
    sd = dict(model.state_dict())
    del sd["block_chunks.1.module.0.ffn.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"missing: block_chunks\.1\.module\.0\.ffn\.fc2\.bias"):
        ck.load_infinity(save_pth(sd, tmp_path / "m.pth"))


def test_unexpected_key_is_named(tmp_path, model):
    sd = dict(model.state_dict())
    sd["block_chunks.0.module.0.sa.extra_gate"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected: block_chunks\.0\.module\.0\.sa\.extra_gate"):
        ck.load_infinity(save_pth(sd, tmp_path / "u.pth"))


def test_wrong_shape_is_named(tmp_path, model):
    sd = dict(model.state_dict())
    sd["block_chunks.1.module.0.ca.mat_q.weight"] = torch.zeros(128, 64)
    with pytest.raises(CheckpointError, match=r"ca\.mat_q\.weight: file \(128, 64\) vs model \(128, 128\)"):
        ck.load_infinity(save_pth(sd, tmp_path / "s.pth"))


def test_wrong_file_types(tmp_path, model):
    text = tmp_path / "page.pth"
    text.write_text("<html>404 not found</html>")
    with pytest.raises(CheckpointError, match="neither a torch checkpoint"):
        ck.load_infinity(text)
    vae_file = save_pth({"vae": BSQVAE(BSQVAEConfig.tiny()).state_dict()}, tmp_path / "vae.pth")
    with pytest.raises(CheckpointError, match="not an Infinity transformer.*VAE"):
        ck.load_infinity(vae_file)
    model_file = save_pth(model.state_dict(), tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="not a BSQ VAE.*model instead"):
        ck.load_vae(model_file)
    with pytest.raises(CheckpointError, match="not found"):
        ck.load_infinity(tmp_path / "nope.pth")


def test_truncated_files(tmp_path, model):
    full = save_pth(model.state_dict(), tmp_path / "full.pth").read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        ck.load_infinity(cut)
    st = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, st)
    cut_st = tmp_path / "cut.safetensors"
    cut_st.write_bytes(st.read_bytes()[: st.stat().st_size - 1000])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        ck.load_infinity(cut_st)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > " + os.environ.get("ECHOGEN_PWN_MARK", "/tmp/echogen_pwned"),))


def test_pickle_with_code_is_refused_not_run(tmp_path, model, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("ECHOGEN_PWN_MARK", str(mark))
    sd = dict(model.state_dict())
    sd["evil"] = _Payload()
    path = tmp_path / "evil.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="Refused to load"):
        ck.load_infinity(path)
    assert not mark.exists()
    legacy = tmp_path / "evil_legacy.pth"
    with open(legacy, "wb") as f:
        pickle.dump({"x": _Payload()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="Refused to load"):
        ck.load_infinity(legacy)
    assert not mark.exists()


def test_sharded_safetensors_like_8b(tmp_path, model, probe):
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(sd)
    folder = tmp_path / "infinity_8b_weights"
    folder.mkdir()
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for path in (folder, folder / "model.safetensors.index.json"):
        loaded = ck.load_infinity(path)
        torch.testing.assert_close(logits(loaded, probe), logits(model, probe), rtol=0, atol=0)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        ck.load_infinity(folder)


def test_bf16_conversion_round_trip(tmp_path, model, probe):
    src = save_pth(model.state_dict(), tmp_path / "src.pth")
    dst = tmp_path / "out" / "tiny_bf16.safetensors"
    info = ck.convert(src, dst)
    assert info["family"] == "infinity"
    raw = load_file(dst)
    assert raw["block_chunks.0.module.0.sa.mat_qkv.weight"].dtype == torch.bfloat16
    assert raw["head.weight"].dtype == torch.float32 and raw["cfg_uncond"].dtype == torch.float32
    assert dst.stat().st_size < 0.75 * src.stat().st_size
    assert not list(dst.parent.glob("*.partial"))
    loaded = ck.load_infinity(dst)
    for k, v in loaded.state_dict().items():  # exactly the bf16-rounded weights
        expected = raw[k].to(v.dtype)
        assert torch.equal(v, expected), k
    ref = tiny_infinity(seed=11)
    with torch.no_grad():
        for b in ref.blocks:
            for p in b.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    torch.testing.assert_close(logits(loaded, probe), logits(ref, probe), rtol=0, atol=1e-6)
    # converting the converted file again changes nothing
    again = tmp_path / "again.safetensors"
    ck.convert(dst, again)
    assert all(torch.equal(a, b) for a, b in zip(load_file(again).values(), load_file(dst).values()))


def test_vae_file_layouts(tmp_path):
    vae = BSQVAE(BSQVAEConfig.tiny())
    torch.nn.init.normal_(vae.decoder.conv_out.conv.weight)
    sd = vae.state_dict()
    official = save_pth({"vae": sd, "optimizer": {"step": torch.tensor(3)}, "epoch": 5}, tmp_path / "vae.pth")
    plain = {re.sub(r"\.(conv|norm)\.(weight|bias)$", r".\2", k): v for k, v in sd.items()}
    assert "encoder.conv_in.weight" in plain and "encoder.down.0.downsample.conv.weight" in plain
    unwrapped = save_pth({"vae": plain}, tmp_path / "vae_plain.pth")
    codes = torch.randn(1, vae.bits, 4, 4)
    with torch.no_grad():
        ref = vae.decode(codes)
        for path in (official, unwrapped):
            loaded = ck.load_vae(path)
            torch.testing.assert_close(loaded.decode(codes), ref, rtol=0, atol=0)
    conv = tmp_path / "vae_bf16.safetensors"
    assert ck.convert(official, conv)["family"] == "bsq_vae"
    assert ck.load_vae(conv).bits == vae.bits


def test_inspect_reports_family_config_and_coverage(tmp_path, model):
    path = save_pth(model.state_dict(), tmp_path / "m.pth")
    report = ck.describe(path)
    assert "family: infinity" in report and "coverage: complete" in report and "depth=2" in report
    sd = dict(model.state_dict())
    del sd["head.bias"]
    report = ck.describe(save_pth(sd, tmp_path / "broken.pth"))
    assert "1 missing ['head.bias']" in report
    vae_path = save_pth({"vae": BSQVAE(BSQVAEConfig.tiny()).state_dict()}, tmp_path / "v.pth")
    assert "family: bsq_vae" in ck.describe(vae_path) and "coverage: complete" in ck.describe(vae_path)


def test_released_presets_are_recognised():
    assert InfinityConfig.infinity_2b().preset_name() == "Infinity-2B"
    assert InfinityConfig.infinity_125m().preset_name() == "Infinity-125M"
    assert InfinityConfig.tiny().preset_name() is None


def test_cli_inspect_and_convert(tmp_path, model):
    src = save_pth(model.state_dict(), tmp_path / "m.pth")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-m", "echogen_core", "inspect", str(src)], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "coverage: complete" in out.stdout
    dst = tmp_path / "m.safetensors"
    out = subprocess.run([sys.executable, "-m", "echogen_core", "convert", str(src), str(dst)], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and dst.exists(), out.stderr
    bad = subprocess.run([sys.executable, "-m", "echogen_core", "convert", str(tmp_path / "none.pth"), str(dst)],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "not found" in bad.stderr and "Traceback" not in bad.stderr


def test_flux_vae_file_is_not_taken_for_a_bsq_vae():
    sd = {"encoder.conv_in.weight": torch.zeros(1), "encoder.mid.attn_1.q.weight": torch.zeros(1),
          "decoder.conv_in.weight": torch.zeros(1)}
    assert ck.classify(sd) == "flux_vae"


def test_atomic_write_leaves_the_old_file_or_nothing_when_interrupted(tmp_path):
    """Every file the pack writes (conversions, exports, checkpoints, datasets, evaluations) goes through it."""
    target = tmp_path / "sub" / "weights.safetensors"

    def interrupted(tmp):
        Path(tmp).write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ck.atomic_write(target, interrupted)
    assert not target.exists() and list(target.parent.iterdir()) == []
    ck.atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"old"))
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_write(target, interrupted)
    assert target.read_bytes() == b"old" and [p.name for p in target.parent.iterdir()] == ["weights.safetensors"]
