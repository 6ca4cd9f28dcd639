"""T5 text encoder (flan-t5 encoder, official Infinity behaviour) and TextConditioning."""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from echogen_core.errors import CheckpointError, InputError
from echogen_core.text_encoder import T5TextEncoder, TextConditioning, build_tiny_t5

SHORT = "a cat"
LONG = "An astronaut riding a horse on the moon, highly detailed digital art, trending on artstation."


@pytest.fixture(scope="module")
def encoder(tiny_t5_dir):
    return T5TextEncoder.from_folder(tiny_t5_dir)


@pytest.fixture(scope="module")
def reference_model(tiny_t5_dir):
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(str(tiny_t5_dir), local_files_only=True, dtype=torch.float32).eval()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------
# tokenizer / tiny model folder
# ---------------------------------------------------------------------------------------------------


def test_tiny_folder_has_real_t5_tokenizer(tiny_t5_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_t5_dir), local_files_only=True, legacy=True)
    assert (tok.pad_token, tok.pad_token_id) == ("<pad>", 0)
    assert (tok.eos_token, tok.eos_token_id) == ("</s>", 1)
    assert (tok.unk_token, tok.unk_token_id) == ("<unk>", 2)
    assert tok.model_max_length == 512
    ids = tok(LONG).input_ids
    assert ids[-1] == 1 and 1 not in ids[:-1]
    assert 2 not in ids  # corpus text is covered by the vocabulary
    assert tok("").input_ids == [1]  # empty prompt -> just </s>
    assert 300 <= len(tok) <= 1100
    cfg = json.loads((tiny_t5_dir / "config.json").read_text())
    assert cfg["model_type"] == "t5" and cfg["feed_forward_proj"] == "gated-gelu"
    assert (cfg["d_model"], cfg["d_kv"], cfg["num_heads"], cfg["num_layers"], cfg["d_ff"]) == (64, 16, 2, 2, 128)
    assert cfg["vocab_size"] >= len(tok)


def test_build_is_deterministic(tmp_path, tiny_t5_dir):
    from safetensors.torch import load_file

    a = build_tiny_t5(tmp_path / "a", seed=0)
    b = build_tiny_t5(tmp_path / "b", seed=1)
    wa, w0 = load_file(str(a / "model.safetensors")), load_file(str(tiny_t5_dir / "model.safetensors"))
    assert wa.keys() == w0.keys() and len(wa) > 10
    for k in wa:
        assert torch.equal(wa[k], w0[k]), k
    wb = load_file(str(b / "model.safetensors"))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").read_bytes() == (tiny_t5_dir / "tokenizer.json").read_bytes()
    # building does not disturb the caller's global RNG
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_t5(tmp_path / "c", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_extra_corpus_enters_vocab(tmp_path):
    word = "Zyxquorblent"
    plain = build_tiny_t5(tmp_path / "plain")
    extra = build_tiny_t5(tmp_path / "extra", vocab_corpus=[f"{word} {word} zyxquorblent"] * 50)
    n_plain = len(T5TextEncoder.from_folder(plain).tokenize([word]).input_ids[0])
    n_extra = len(T5TextEncoder.from_folder(extra).tokenize([word]).input_ids[0])
    assert n_extra < n_plain


def test_build_without_sentencepiece(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails -> tokenizers' trainer
    folder = build_tiny_t5(tmp_path / "nosp")
    enc = T5TextEncoder.from_folder(folder)
    ids = enc.tokenize([SHORT]).input_ids[0].tolist()
    assert ids[-1] == 1 and enc.tokenizer.pad_token_id == 0 and enc.tokenizer.unk_token_id == 2
    assert enc.encode([SHORT]).features.shape[-1] == 64


# ---------------------------------------------------------------------------------------------------
# encode
# ---------------------------------------------------------------------------------------------------


def test_encode_shapes_lengths_and_zero_padding(encoder):
    assert encoder.channels == 64
    assert encoder.dtype == torch.float32 and encoder.device.type == "cpu"
    text = encoder.encode([SHORT, LONG])
    tok = encoder.tokenizer
    lens = [len(tok(p).input_ids) for p in (SHORT, LONG)]
    assert lens[0] < lens[1]
    assert text.features.shape == (2, max(lens), 64)
    assert text.features.dtype == torch.float32
    assert text.lengths.dtype == torch.int64 and text.lengths.tolist() == lens
    assert torch.all(text.features[0, lens[0]:] == 0)
    assert torch.all(text.features[0, : lens[0]].abs().sum(-1) > 0)
    assert torch.all(text.features[1].abs().sum(-1) > 0)
    assert text.mask.tolist() == [[i < n for i in range(max(lens))] for n in lens]
    assert not text.features.requires_grad


def test_encode_matches_reference_model(encoder, reference_model):
    ids = encoder.tokenizer([LONG], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = reference_model(input_ids=ids).last_hidden_state.float()
    text = encoder.encode([LONG])
    assert text.lengths.tolist() == [ids.shape[1]]
    torch.testing.assert_close(text.features, ref, atol=1e-6, rtol=0)


def test_padding_does_not_leak(encoder):
    alone = encoder.encode([SHORT])
    batch = encoder.encode([LONG, SHORT, "a dog"])
    n = int(alone.lengths[0])
    assert int(batch.lengths[1]) == n and batch.max_len > n
    torch.testing.assert_close(batch.features[1, :n], alone.features[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.select([1]).features, alone.features, atol=1e-5, rtol=0)


def test_empty_prompt_is_eos_only(encoder):
    text = encoder.encode(["", SHORT])
    assert int(text.lengths[0]) == 1
    assert torch.all(text.features[0, 1:] == 0) and text.features[0, 0].abs().sum() > 0


def test_truncation_at_512_keeps_eos(encoder):
    text = encoder.encode([" ".join(["cat"] * 700), SHORT])
    assert text.lengths.tolist()[0] == 512 and text.max_len == 512
    ids = encoder.tokenize([" ".join(["cat"] * 700)]).input_ids[0]
    assert ids.shape[0] == 512 and int(ids[-1]) == encoder.tokenizer.eos_token_id


def test_encode_rejects_bad_prompts(encoder):
    with pytest.raises(InputError, match="at least one prompt"):
        encoder.encode([])
    with pytest.raises(InputError, match="index \\[1\\]"):
        encoder.encode(["ok", 3])
    with pytest.raises(InputError, match="list of strings"):
        encoder.encode(None)
    assert encoder.encode(SHORT).batch_size == 1  # a bare string is one prompt


def test_half_precision_load_gives_fp32_features(tiny_t5_dir, encoder):
    enc16 = T5TextEncoder.from_folder(tiny_t5_dir, dtype="bf16")
    assert enc16.dtype == torch.bfloat16
    text = enc16.encode([SHORT, LONG])
    assert text.features.dtype == torch.float32
    ref = encoder.encode([SHORT, LONG])
    torch.testing.assert_close(text.features, ref.features, atol=0.15, rtol=0.05)
    with pytest.raises(InputError, match="Unknown T5 dtype"):
        T5TextEncoder.from_folder(tiny_t5_dir, dtype="int8")


def test_seq2seq_checkpoint_loads_encoder_only(tmp_path):
    from transformers import T5ForConditionalGeneration

    folder = build_tiny_t5(tmp_path / "full", seed=3, seq2seq=True)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["T5ForConditionalGeneration"]
    enc = T5TextEncoder.from_folder(folder)
    full = T5ForConditionalGeneration.from_pretrained(str(folder), local_files_only=True).eval()
    batch = enc.tokenize([LONG])
    with torch.no_grad():
        ref = full.encoder(input_ids=batch.input_ids).last_hidden_state.float()
    torch.testing.assert_close(enc.encode([LONG]).features, ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------
# folder errors
# ---------------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError) as e:
        T5TextEncoder.from_folder(missing)
    assert str(missing) in str(e.value) and "not found" in str(e.value) and "google/flan-t5-xl" in str(e.value)


def test_path_is_a_file(tiny_t5_dir):
    f = tiny_t5_dir / "model.safetensors"
    with pytest.raises(CheckpointError, match="is a file") as e:
        T5TextEncoder.from_folder(f)
    assert str(f) in str(e.value)


def test_no_config(tmp_path, tiny_t5_dir):
    d = _copy(tiny_t5_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError) as e:
        T5TextEncoder.from_folder(d)
    msg = str(e.value)
    assert str(d) in msg and "config.json" in msg and "google/flan-t5-xl" in msg


def test_no_weights(tmp_path, tiny_t5_dir):
    d = _copy(tiny_t5_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        T5TextEncoder.from_folder(d)
    msg = str(e.value)
    assert str(d) in msg and "no weights" in msg and "model.safetensors" in msg and "google/flan-t5-xl" in msg


def test_no_tokenizer(tmp_path, tiny_t5_dir):
    d = _copy(tiny_t5_dir, tmp_path / "m")
    (d / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError) as e:
        T5TextEncoder.from_folder(d)
    msg = str(e.value)
    assert str(d) in msg and "tokenizer.json" in msg and "google/flan-t5-xl" in msg


def test_not_a_t5_config(tmp_path, tiny_t5_dir):
    d = _copy(tiny_t5_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    cfg["architectures"] = ["BertModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        T5TextEncoder.from_folder(d)
    msg = str(e.value)
    assert str(d / "config.json") in msg and "not a T5 config" in msg and "'bert'" in msg


def test_broken_config_json(tmp_path, tiny_t5_dir):
    d = _copy(tiny_t5_dir, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON") as e:
        T5TextEncoder.from_folder(d)
    assert str(d) in str(e.value)


def test_incomplete_weights(tmp_path, tiny_t5_dir):
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_t5_dir, tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if "block.1." not in k}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks") as e:
        T5TextEncoder.from_folder(d)
    assert str(d) in str(e.value) and "block.1" in str(e.value)


def test_weights_do_not_match_config(tmp_path, tiny_t5_dir):
    d = _copy(tiny_t5_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["d_ff"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="Cannot load T5 encoder weights") as e:
        T5TextEncoder.from_folder(d)
    assert str(d) in str(e.value)


def test_corrupt_weights(tmp_path, tiny_t5_dir):
    d = _copy(tiny_t5_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="Cannot load T5 encoder weights") as e:
        T5TextEncoder.from_folder(d)
    assert str(d) in str(e.value)


# ---------------------------------------------------------------------------------------------------
# TextConditioning
# ---------------------------------------------------------------------------------------------------


def _cond(lengths, channels=8, seed=0, l_max=None):
    g = torch.Generator().manual_seed(seed)
    l_max = l_max or max(lengths)
    f = torch.zeros(len(lengths), l_max, channels)
    for i, n in enumerate(lengths):
        f[i, :n] = torch.randn(n, channels, generator=g)
    return TextConditioning(f, torch.tensor(lengths, dtype=torch.int64))


def test_compact_round_trip():
    t = _cond([3, 5, 1], l_max=7)
    kv, cu, max_len = t.compact()
    assert kv.shape == (9, 8) and kv.dtype == torch.float32
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 8, 9]
    assert max_len == 5 and isinstance(max_len, int)
    torch.testing.assert_close(kv, torch.cat([t.features[0, :3], t.features[1, :5], t.features[2, :1]]))
    back = TextConditioning.from_compact(kv, cu)
    assert back.max_len == 5 and back.lengths.tolist() == [3, 5, 1]
    assert torch.equal(back.features, t.features[:, :5])
    padded = TextConditioning.from_compact(kv, cu, max_len=7)
    assert torch.equal(padded.features, t.features)
    assert torch.equal(TextConditioning.from_compact(kv, [0, 3, 8, 9]).features, back.features)


def test_encoded_compact_round_trip(encoder):
    t = encoder.encode([SHORT, LONG, ""])
    kv, cu, max_len = t.compact()
    assert kv.shape[0] == int(t.lengths.sum()) and max_len == int(t.lengths.max())
    back = TextConditioning.from_compact(kv, cu)
    assert torch.equal(back.features, t.features) and torch.equal(back.lengths, t.lengths)


def test_select_and_concat():
    a = _cond([2, 6, 3], seed=1)
    s = a.select([2, 0])
    assert s.lengths.tolist() == [3, 2] and s.max_len == 3
    assert torch.equal(s.features[0], a.features[2, :3]) and torch.equal(s.features[1, :2], a.features[0, :2])
    assert a.select(1).max_len == 6 and a.select(torch.tensor([True, False, True])).lengths.tolist() == [2, 3]
    assert a.select(slice(0, 1)).lengths.tolist() == [2] and a.select([0, 0]).batch_size == 2
    b = _cond([9], seed=2)
    c = a.concat(b)
    assert c.features.shape == (4, 9, 8) and c.lengths.tolist() == [2, 6, 3, 9]
    assert torch.equal(c.features[:3, :6], a.features) and torch.all(c.features[:3, 6:] == 0)
    assert torch.equal(c.features[3], b.features[0])
    d = b.concat(a)
    assert d.lengths.tolist() == [9, 2, 6, 3] and torch.equal(d.features[1:, :6], a.features)
    assert a.to("cpu").features.device.type == "cpu"
    with pytest.raises(InputError, match="channels"):
        a.concat(_cond([2], channels=4))
    with pytest.raises(InputError, match="out of range"):
        a.select([3])
    with pytest.raises(InputError, match="no prompt"):
        a.select([])


def test_text_conditioning_validation():
    f = torch.zeros(2, 4, 8)
    ok = torch.tensor([4, 1])
    with pytest.raises(InputError, match="shape \\(batch, tokens, channels\\)"):
        TextConditioning(torch.zeros(4, 8), ok)
    with pytest.raises(InputError, match="float32"):
        TextConditioning(f.half(), ok)
    with pytest.raises(InputError, match="int64"):
        TextConditioning(f, ok.int())
    with pytest.raises(InputError, match="shape \\(batch,\\)"):
        TextConditioning(f, ok[None])
    with pytest.raises(InputError, match=">= 1"):
        TextConditioning(f, torch.tensor([4, 0]))
    with pytest.raises(InputError, match="larger than"):
        TextConditioning(f, torch.tensor([5, 1]))
    with pytest.raises(InputError, match="3 entries"):
        TextConditioning(f, torch.tensor([1, 1, 1]))
    with pytest.raises(InputError, match="at least one prompt"):
        TextConditioning(torch.zeros(0, 4, 8), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(InputError, match="torch.Tensor"):
        TextConditioning([[0.0]], ok)


def test_from_compact_validation():
    kv = torch.zeros(5, 8)
    with pytest.raises(InputError, match="start at 0"):
        TextConditioning.from_compact(kv, torch.tensor([1, 5], dtype=torch.int32))
    with pytest.raises(InputError, match="ends at 4"):
        TextConditioning.from_compact(kv, torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(InputError, match="at least one token"):
        TextConditioning.from_compact(kv, torch.tensor([0, 0, 5], dtype=torch.int32))
    with pytest.raises(InputError, match="\\(total_tokens, channels\\)"):
        TextConditioning.from_compact(kv[None], torch.tensor([0, 5]))
    with pytest.raises(InputError, match="integer"):
        TextConditioning.from_compact(kv, torch.tensor([0.0, 5.0]))
    with pytest.raises(InputError, match="smaller than the longest"):
        TextConditioning.from_compact(kv, torch.tensor([0, 5]), max_len=3)


def test_sharded_checkpoint_loads(tmp_path, tiny_t5_dir, encoder):
    from transformers import T5EncoderModel

    d = _copy(tiny_t5_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    model = T5EncoderModel.from_pretrained(str(tiny_t5_dir), local_files_only=True)
    model.save_pretrained(str(d), max_shard_size="100KB")
    assert (d / "model.safetensors.index.json").is_file()
    assert len(list(d.glob("model-*-of-*.safetensors"))) > 1
    enc = T5TextEncoder.from_folder(d)
    torch.testing.assert_close(enc.encode([SHORT, LONG]).features, encoder.encode([SHORT, LONG]).features,
                               atol=0, rtol=0)
