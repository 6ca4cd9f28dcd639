"""Smoke test of benchmarks/run.py: the measurement runs and its JSON is well formed. No timing thresholds."""
import json
from dataclasses import replace

from benchmarks.run import CONFIGS, format_config, format_summary, measure_config
from echogen_core.echogen import EchoGenConfig


def test_measure_tiny_structure(tiny_t5_dir):
    # The tiny config with the session's 64-wide tiny T5 and a 3-scale schedule (64 px): a few seconds.
    spec = replace(CONFIGS["tiny"], model=lambda: EchoGenConfig.tiny(
        semantic_dim=128, content_dim=16, text_maxlen=512, text_channels=64))
    full = spec.schedule()
    schedule = replace(full, grids=full.grids[:3])
    r = measure_config(spec, "cpu", schedule=schedule, batch=2, warmup="none", t5_folder=tiny_t5_dir,
                      log=lambda _: None)
    r = json.loads(json.dumps(r))  # JSON-ready as it is

    assert r["status"] == "ok"
    assert r["schedule"]["scales"] == 3 and r["schedule"]["tokens_per_image"] == 1 + 4 + 16
    e2e = r["e2e"]
    stages = e2e["stages_s"]
    assert len(stages["scales"]) == 3 and all(t >= 0 for t in stages["scales"])
    assert sum(stages["scales"]) <= e2e["total_s"]
    assert sum(stages["scales"]) + stages["conditions"] + stages["decode"] <= e2e["generate"]["total_s"] <= e2e["total_s"]
    for key in ("text_encode", "subject_encode", "conditions", "decode"):
        assert 0 <= stages[key] <= e2e["total_s"], key
    assert set(e2e["subject_parts_s"]) == {"dinov2", "content_vae"}
    assert e2e["tokens_per_s"]["end_to_end"] > 0
    assert {"text_encode", "subject_encode", "conditions_and_scales", "decode"} <= set(e2e["peak_memory"])
    assert all(v["growth_bytes"] >= 0 for v in e2e["peak_memory"].values())

    ratios = r["ratios"]
    assert ratios["echogen_vs_infinity"]["ratio_3row"] > 0 and ratios["echogen_vs_infinity"]["ratio_2row"] > 0
    assert ratios["content_stream"]["same_bits"] is True  # recomputing changes the time, never the image
    assert ratios["batch"]["batch"] == 2 and ratios["batch"]["per_image_s"] > 0
    reseed = ratios["reseed"]  # same subject and prompt, new seed: the content streams are kept
    assert reseed["content_stream_rows_run"] == 0 and reseed["reseed_s"] > 0 and reseed["ratio_reseed_vs_infinity"] > 0
    low = ratios["sequential_rows"]
    assert low["same_bits"] is True and low["sequential_s"] > 0 and low["stacked_peak_growth_bytes"] >= 0
    assert "GPU" in low["device_note"]
    runs = r["cold_start"]["runs"]
    assert [x["run"] for x in runs] == [1, 2] and all(x["to_first_token_s"] >= x["load_s"] > 0 for x in runs)
    assert r["cold_start"]["file_bytes"] > 0

    text = format_config("tiny", r)
    assert "end to end" in text and "re-seed" in text and "in sequence" in text and "tiny" in format_summary({"tiny": r})


def test_2b_is_skipped_on_cpu():
    r = measure_config(CONFIGS["2b"], "cpu", log=lambda _: None)
    assert r["status"] == "skipped" and "cuda" in r["reason"]


def test_semantic_probe_reads_linearly_encoded_attributes():
    """The probe of benchmarks/semantic_probe.py: features that spell the labels out are read perfectly on new
    combinations; features that carry nothing are read at about chance."""
    import torch

    from benchmarks.semantic_probe import probe
    from echogen_core.encoder_pretraining import ATTRIBUTES

    rng = torch.Generator().manual_seed(0)
    values = {"shape": ["star", "ring"], "primary": ["red", "blue", "green"], "secondary": ["red", "blue", "green"],
              "pattern": ["dots", "checks"]}
    combos = [dict(zip(ATTRIBUTES, (s, p, q, t))) for s in values["shape"] for p in values["primary"]
              for q in values["secondary"] for t in values["pattern"] if p != q]
    train = [c for i, c in enumerate(combos) if i % 3] * 4      # held-out: new combinations of seen values
    held = combos[::3]

    def spell(labels):   # one-hot of every attribute + noise
        rows = [torch.cat([torch.nn.functional.one_hot(torch.tensor(values[a].index(l[a])), len(values[a])).float()
                           for a in ATTRIBUTES]) for l in labels]
        return torch.stack(rows) + 0.05 * torch.randn(len(rows), 10, generator=rng)

    assert probe(spell(train), train, spell(held), held) == {a: 1.0 for a in ATTRIBUTES}
    noise = probe(torch.randn(len(train), 10, generator=rng), train, torch.randn(len(held), 10, generator=rng), held)
    assert noise["primary"] < 0.8
