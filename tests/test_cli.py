import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from helpers import micro_vae, tiny_infinity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "echogen_core", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_t2i_end_to_end_with_official_layout_files(tmp_path, tiny_t5_dir):
    model_path = tmp_path / "infinity_tiny.pth"
    torch.save(tiny_infinity(seed=4, text_channels=64).state_dict(), model_path)
    vae_path = tmp_path / "vae_tiny.pth"
    torch.save({"vae": micro_vae().state_dict()}, vae_path)
    out = tmp_path / "img.png"
    args = ["t2i", "--prompt", "a red cube on a table", "--model", model_path, "--vae", vae_path,
            "--text-encoder", tiny_t5_dir, "--width", 330, "--height", 250, "--size", "0.06M", "--seed", 5,
            "--batch", 2, "--out", out]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    assert "generating 2 x 320x240" in res.stderr  # 330x250 snaps to the 0.75 template at 0.06M
    first = np.asarray(Image.open(tmp_path / "img_0.png"))
    assert first.shape == (240, 320, 3)
    # alone, and with the guidance rows in sequence (low memory): the same image
    again = run_cli(*args[:-4], "--batch", 1, "--sequential-rows", "--out", tmp_path / "alone.png")
    assert again.returncode == 0, again.stderr
    assert "guidance rows in sequence" in again.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "alone.png")), first)
    assert not list(tmp_path.glob("*.partial"))


def test_t2i_clear_errors(tmp_path, tiny_t5_dir):
    model_path = tmp_path / "m.pth"
    torch.save(tiny_infinity(text_channels=64).state_dict(), model_path)
    vae_path = tmp_path / "v.pth"
    torch.save({"vae": micro_vae(codebook_dim=6).state_dict()}, vae_path)
    res = run_cli("t2i", "--prompt", "x", "--model", model_path, "--vae", vae_path, "--text-encoder", tiny_t5_dir,
                  "--out", tmp_path / "x.png")
    assert res.returncode == 2 and "not a pair" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("t2i", "--prompt", "x", "--model", tmp_path / "missing.pth", "--vae", vae_path,
                  "--text-encoder", tiny_t5_dir, "--out", tmp_path / "x.png")
    assert res.returncode == 2 and "missing.pth" in res.stderr


def test_generate_with_subject_end_to_end(tmp_path, tiny_t5_dir):
    from echogen_core.dinov2 import Dinov2, Dinov2Config
    from echogen_core.echogen import EchoGen, EchoGenConfig
    from echogen_core.flux_vae import FluxVAEConfig, FluxVAEEncoder
    from helpers import randomize_

    dino = randomize_(Dinov2(Dinov2Config.tiny()), seed=1)
    flux = randomize_(FluxVAEEncoder(FluxVAEConfig.tiny()), seed=2)
    cfg = EchoGenConfig.tiny(text_channels=64, semantic_dim=128, semantic_len=17, content_dim=16, content_len=16)
    model = randomize_(EchoGen(cfg), seed=3)
    torch.save({"trainer": {"gpt_fsdp": model.state_dict()}}, tmp_path / "echogen_tiny.pth")
    torch.save({"vae": micro_vae().state_dict()}, tmp_path / "vae.pth")
    torch.save(dino.state_dict(), tmp_path / "dinov2.pth")  # torch-hub layout
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in flux.state_dict().items()}, tmp_path / "ae.safetensors")
    Image.fromarray((np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)).save(tmp_path / "ref.png")
    mask = np.zeros((60, 80), np.uint8)
    mask[10:40, 30:70] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    res = run_cli("generate", "--subject-image", tmp_path / "ref.png", "--subject-words", "cube", "--prompt", "a cube",
                  "--model", tmp_path / "echogen_tiny.pth", "--vae", tmp_path / "vae.pth", "--text-encoder", tiny_t5_dir,
                  "--dinov2", tmp_path / "dinov2.pth", "--content-vae", tmp_path / "ae.safetensors",
                  "--mask", tmp_path / "mask.png", "--crop", "subject", "--reference-out", tmp_path / "reference.png",
                  "--size", "0.06M", "--out", tmp_path / "out.png")
    assert res.returncode == 0, res.stderr
    assert "gamma_t=2.5 gamma_I=2.5 tau=2.0" in res.stderr and "segmentation: mask: user mask" in res.stderr
    assert np.asarray(Image.open(tmp_path / "out.png")).shape == (256, 256, 3)
    # The tiny model's geometry (4x4 content tokens) asks for a 32 px reference; outside the mask it is white.
    reference = np.asarray(Image.open(tmp_path / "reference.png"))
    assert reference.shape == (32, 32, 3) and (reference[:2] == 255).all()


def test_sequential_rows_flag_for_both_sampling_commands():
    from echogen_core.cli import build_parser

    files = ["--model", "m", "--vae", "v", "--text-encoder", "t", "--out", "o.png", "--prompt", "p"]
    subject = ["--subject-image", "r.png", "--dinov2", "d", "--content-vae", "a"]
    for command, extra in (("t2i", []), ("generate", subject)):
        assert build_parser().parse_args([command, *files, *extra]).sequential_rows is False
        assert build_parser().parse_args([command, *files, *extra, "--sequential-rows"]).sequential_rows is True
