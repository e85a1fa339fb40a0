"""masks.py: big_vision's make_attn_mask cases (from its docstring), padding, the sliding window with the
prefix overriding it, positions, and the decode masks."""

import torch

from paligemma.masks import decode_masks, default_position_ids, make_attn_mask, prefill_masks, sliding_window_mask


def _mask(ar):
    ar = torch.tensor([ar])
    return make_attn_mask(torch.ones_like(ar, dtype=torch.bool), ar)[0].int().tolist()


def test_mask_pure_causal():
    assert _mask([1, 1, 1, 1]) == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_mask_prefix_lm():
    # the first 3 tokens attend among themselves, the last 3 causally; a leading 1 changes nothing
    expected = [[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert _mask([0, 0, 0, 1, 1, 1]) == expected
    assert _mask([1, 0, 0, 1, 1, 1]) == expected


def test_mask_causal_blocks():
    m = _mask([1, 0, 1, 0, 1, 0, 0, 1, 0, 0])
    blocks = [0, 0, 1, 1, 2, 2, 2, 3, 3, 3]  # a token sees its own block and all earlier blocks
    assert m == [[int(bj <= bi) for bj in blocks] for bi in blocks]


def test_mask_padding_is_never_attended():
    ar = torch.tensor([[0, 0, 0, 0, 1, 1]])
    valid = torch.tensor([[False, True, True, True, True, True]])
    m = make_attn_mask(valid, ar)[0]
    assert not m[:, 0].any() and not m[0].any()
    assert m[1:4, 1:4].all() and m[4, :5].sum() == 4 and not m[4, 5]


def test_sliding_window_keeps_the_prefix_whole():
    ar = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    full = make_attn_mask(torch.ones_like(ar, dtype=torch.bool), ar)
    m = sliding_window_mask(full, ar, window=2)[0].int()
    assert m[:4, :4].all()  # prefix: bidirectional despite the window
    assert m[4].tolist() == [0, 0, 0, 1, 1, 0, 0]  # suffix: itself and one back
    assert m[6].tolist() == [0, 0, 0, 0, 0, 1, 1]


def test_positions_are_one_based_and_skip_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert default_position_ids(mask).tolist() == [[1, 1, 1, 2, 3], [1, 2, 3, 4, 5]]


def test_decode_masks_equal_the_last_row_of_the_prefill_masks():
    """A generated token (type 1) at slot s sees what the full mask over s + 1 tokens gives its row."""
    ar = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    valid = torch.tensor([[False, True, True, True, True, True, True, True]])
    for window in (None, 2, 3):
        full = prefill_masks(valid.long(), ar, window)
        for slot in range(5, 8):
            step = decode_masks(valid, slot, window)
            for sliding in (False, True):
                assert step[sliding][0, 0].tolist() == full[sliding][0, slot, : slot + 1].tolist(), (window, slot)
