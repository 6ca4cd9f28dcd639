import pytest

from echogen_core.errors import InputError
from echogen_core.schedules import SIZES, TEMPLATES, get_schedule, nearest_schedule, nearest_template, rope_positions

# (ratio, pixels H x W, tokens) at 1M, from the release's templates
TABLE_1M = [(1.0, 1024, 1024, 10521), (1.25, 1120, 896, 10774), (0.8, 896, 1120, 10774),
            (1.333, 1152, 864, 10973), (0.75, 864, 1152, 10973), (1.5, 1248, 832, 10997),
            (0.666, 832, 1248, 10997), (1.75, 1344, 768, 11252), (0.571, 768, 1344, 11252),
            (2.0, 1440, 720, 11269), (0.5, 720, 1440, 11269), (2.5, 1600, 640, 10805),
            (0.4, 640, 1600, 10805), (3.0, 1776, 592, 11123), (0.333, 592, 1776, 11123)]


def test_fifteen_templates_in_official_order():
    assert list(TEMPLATES) == [1.0, 1.25, 0.8, 1.333, 0.75, 1.5, 0.666, 1.75, 0.571, 2.0, 0.5, 2.5, 0.4, 3.0, 0.333]


@pytest.mark.parametrize("ratio,height,width,tokens", TABLE_1M)
def test_1m_sizes_and_token_counts(ratio, height, width, tokens):
    s = get_schedule(ratio, "1M")
    assert (s.height, s.width, s.total_tokens, s.num_scales) == (height, width, tokens, 13)


def test_square_totals_per_size():
    assert [get_schedule(1.0, size).total_tokens for size in SIZES] == [521, 2521, 6425, 10521]
    assert get_schedule(1.0, "0.06M").height == 256 and get_schedule(1.0, "0.25M").height == 512


def test_patchify_vae_grid_doubles():
    s = get_schedule(1.0, "1M")
    assert s.vae_grids(True)[-1] == (128, 128) and s.vae_grids(False)[-1] == (64, 64)


def test_rope_positions_normalised_to_1m_grid_with_half_to_even_rounding():
    square = get_schedule(1.0, "1M")
    pos = rope_positions(square)
    off, n = square.offsets, square.tokens_per_scale
    assert sorted(set(pos[off[1]:off[1] + n[1], 0].tolist())) == [0, 32]
    assert sorted(set(pos[off[3]:off[3] + n[3], 0].tolist())) == [0, 11, 21, 32, 43, 53]
    assert sorted(set(pos[off[9]:off[9] + n[9], 1].tolist())) == list(range(0, 64, 2))
    # 512 px reuses the 1M grid: its last 32x32 scale sits on even positions
    half = get_schedule(1.0, "0.25M")
    assert sorted(set(rope_positions(half)[-1024:, 0].tolist())) == list(range(0, 64, 2))
    # 1.25 template (70 x 56): 3.5 -> 4 and 10.5 -> 10
    tall = get_schedule(1.25, "1M")
    rows = {h: sorted(set(rope_positions(tall)[o:o + h * w, 0].tolist()))
            for (h, w), o in zip(tall.grids, tall.offsets)}
    assert rows[20] == [round(i * 3.5) for i in range(20)]
    assert 4 in rows[20] and rows[20][1] == 4 and rows[20][3] == 10
    assert rope_positions(tall).max() < 128


def test_nearest_schedule_snaps_and_reports():
    s = nearest_schedule(1000, 700)
    assert s.ratio == 0.666 and (s.width, s.height) == (1008, 672) and s.size == "0.60M"
    assert nearest_schedule(1024, 1024).describe().startswith("1024x1024")
    assert nearest_schedule(300, 250, sizes=("0.06M",)).size == "0.06M"
    assert nearest_template(1.3) == 1.333


def test_bad_requests_are_explained():
    with pytest.raises(InputError, match="positive"):
        nearest_schedule(0, 512)
    with pytest.raises(InputError, match="Unknown size"):
        get_schedule(1.0, "2M")
    with pytest.raises(InputError, match="No aspect template"):
        get_schedule(1.1, "1M")
