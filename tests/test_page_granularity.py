"""The page logic of scripts/page_granularity.py on hand-made masks and scores whose answers are known by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "page_granularity.py"
_spec = importlib.util.spec_from_file_location("page_granularity", _PATH)
pg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pg)

NAN = float("nan")


def _mask(*rows: str) -> torch.Tensor:
    """``[L=len(rows), B=1, H=1, C]`` bool from strings of 0/1, one per layer."""
    return torch.tensor([[[[c == "1" for c in row]]] for row in rows])


def test_round_up_keeps_every_page_that_holds_a_kept_pair():
    keep = _mask("1000" "0000" "0010" "00",   # C = 14, P = 4: pages 0 and 2 of 4 (the last page has 2 positions)
                 "0000" "0000" "0000" "01")   # the partial last page only
    selectable = torch.ones_like(keep)
    pairs, pages = pg.round_up(keep, selectable, 4)
    assert pages.squeeze(1).squeeze(1).tolist() == [[True, False, True, False], [False, False, False, True]]
    assert pairs.sum().item() == 4 + 4 + 2  # the last page stores its 2 real positions, not 4
    assert pairs[0, 0, 0].tolist() == [True] * 4 + [False] * 4 + [True] * 4 + [False] * 2
    assert pg.round_up(keep, selectable, 1)[0].equal(keep)  # P = 1 is pair granularity
    assert pg.round_up(keep, selectable, 14)[1].sum().item() == 2  # one page per layer: everything
    # padding / prefix / sliding positions are never stored, even in a kept page
    selectable[0, 0, 0, 1] = False
    assert pg.round_up(keep, selectable, 4)[0].sum().item() == 9


def test_page_scores_sum_and_max_ignore_unselectable_pairs():
    scores = torch.tensor([0.1, 0.2, NAN, 0.4, NAN, NAN]).view(1, 1, 1, 6)
    assert torch.allclose(pg.page_scores(scores, 2, "sum").flatten()[:2], torch.tensor([0.3, 0.4]))
    assert torch.isnan(pg.page_scores(scores, 2, "sum").flatten()[2])  # a page with no selectable pair
    assert torch.allclose(pg.page_scores(scores, 4, "max").flatten(), torch.tensor([0.4, NAN]), equal_nan=True)
    with pytest.raises(ValueError):
        pg.page_scores(scores, 2, "mean")


def test_select_pages_ranks_all_layers_and_heads_together_under_the_pair_budget():
    # 2 layers x 2 heads x 8 positions = 32 pairs; ratio 0.25 -> a budget of 8 positions = 2 pages of 4.
    scores = torch.zeros(2, 1, 2, 8)
    scores[1, 0, 0, 4:] = torch.tensor([0.9, 0.0, 0.0, 0.0])   # page sum 0.9, max 0.9
    scores[0, 0, 1, :4] = torch.tensor([0.3, 0.3, 0.3, 0.3])   # page sum 1.2, max 0.3
    scores[1, 0, 1, :4] = torch.tensor([0.5, 0.1, 0.0, 0.0])   # page sum 0.6, max 0.5
    pairs, pages = pg.select_pages(scores, 0.25, 4, "sum")
    assert pages.sum().item() == 2 and pairs.sum().item() == 8
    assert pages[0, 0, 1, 0] and pages[1, 0, 0, 1]  # sums 1.2 and 0.9
    pairs, pages = pg.select_pages(scores, 0.25, 4, "max")
    assert pages[1, 0, 0, 1] and pages[1, 0, 1, 0]  # maxima 0.9 and 0.5
    # a budget that is not a whole number of pages: round(0.3 * 32) = 10 positions -> still 2 pages (never over)
    assert pg.select_pages(scores, 0.3, 4, "sum")[0].sum().item() == 8
    # ties go to the earlier (layer, head, page), as in kvzip_cache.selection
    flat = torch.ones(2, 1, 2, 8)
    assert pg.select_pages(flat, 0.25, 4)[1].flatten().tolist() == [True, True] + [False] * 6


def test_select_pages_counts_partial_pages_by_their_positions_and_skips_what_cannot_be_kept():
    # C = 6, P = 4: pages of 4 and 2 positions; layer 1 is not selectable (a sliding layer): 6 pairs in all.
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 1.0], [NAN] * 6]).view(2, 1, 1, 6)
    pairs, pages = pg.select_pages(scores, 0.5, 4, "sum")  # budget 3: the 2-position page fits, the 4-position does not
    assert pages.flatten().tolist() == [False, True, False, False]
    assert pairs.flatten().tolist() == [False] * 4 + [True, True] + [False] * 6
    pairs, _ = pg.select_pages(scores, 1.0, 4, "sum")  # ratio 1 keeps every selectable pair, nothing else
    assert pairs.equal(~torch.isnan(scores))


def test_select_pages_gives_each_row_its_own_budget():
    scores = torch.rand(3, 2, 2, 16, generator=torch.Generator().manual_seed(0))
    scores[:, 1, :, :8] = NAN  # row 1 has half the selectable pairs (left padding)
    pairs, _ = pg.select_pages(scores, 0.5, 4)
    assert pairs[:, 0].sum().item() == 48 and pairs[:, 1].sum().item() == 24
    assert not (pairs & torch.isnan(scores)).any()


def test_overlap_and_page_one_equal_pair_level():
    from kvzip_cache.selection import select

    scores = torch.rand(3, 1, 2, 20, generator=torch.Generator().manual_seed(1))
    pair = select(scores, 0.3, "pair")
    pairs, _ = pg.select_pages(scores, 0.3, 1, "sum")  # pages of one position: KVzip's own selection
    assert pairs.equal(pair)
    assert pg.overlap(pairs, pair, scores) == {"recall": 1.0, "precision": 1.0, "kept": 1.0, "score_mass": 1.0}
    half = pair.clone()
    half.view(-1)[half.view(-1).nonzero()[::2]] = False
    stats = pg.overlap(half, pair, scores)
    assert stats["precision"] == 1.0 and stats["recall"] == half.sum().item() / pair.sum().item()


def test_bytes_of_the_layouts():
    # ragged: 10 pairs x (2 x 64 x 2 + 4) + 3 layers x (2 heads + 1) x 4
    assert pg.ragged_bytes(10, 3, 2, 64) == 10 * 260 + 36
    # paged: 5 pages x (16 x 2 x 64 x 2 + 4) + 6 tables x 4
    assert pg.paged_bytes(5, 16, 64, 6) == 5 * (4096 + 4) + 24
    # dense paged: 100 positions -> 7 pages of 16 per layer, holding both heads; one shared table of 7 entries
    assert pg.dense_paged_bytes(100, 16, 3, 2, 64) == 3 * 7 * 2 * 16 * 256 + 7 * 4


def test_compact_packs_each_heads_kept_pairs_into_whole_pages():
    keep = _mask("1000" "0000" "0010" "00",   # layer 0 keeps 2 pairs: 1 page of 4
                 "1111" "1000" "0000" "01")   # layer 1 keeps 6: 2 pages
    assert pg.compact_pages(keep, 4) == 3
    assert pg.compact_pages(keep, 1) == int(keep.sum())  # P = 1: one slot per kept pair
    assert pg.compact_pages(torch.zeros_like(keep), 4) == 0  # a head that keeps nothing holds no page
    # compact pages hold pairs of any positions: an int32 position per slot on top of the key and value
    assert pg.paged_bytes(3, 4, 64, 2, slot_positions=True) == 3 * (4 * 260 + 4) + 8


def test_pages_shared_by_heads_or_layers_are_kept_when_any_of_them_keeps_a_pair():
    # 2 layers x 2 heads x 8 positions, P = 4; one kept pair in (layer 0, head 0, position 1), one in (1, 1, 6).
    keep = torch.zeros(2, 1, 2, 8, dtype=torch.bool)
    keep[0, 0, 0, 1] = keep[1, 0, 1, 6] = True
    selectable = torch.ones_like(keep)
    assert pg.round_up(keep, selectable, 4)[0].sum().item() == 8  # its own page in each of 2 (layer, head)s
    assert pg.shared_round_up(keep, selectable, 4, (2,)).sum().item() == 16  # both heads of each layer
    assert pg.shared_round_up(keep, selectable, 4, (0, 2)).sum().item() == 32  # both pages, everywhere
    assert pg.shared_round_up(keep, selectable, 1, (0, 2)).sum().item() == 8  # token slots: 2 positions x 4
