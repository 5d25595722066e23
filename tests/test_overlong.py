import numpy as np
import pytest

from raysft.tokenize import fit_overlong, turn_ends


def s(ids, loss):
    ids = np.asarray(ids, np.int32)
    return np.where(np.asarray(loss, bool), ids, ~ids).astype(np.int32)


# prompt(3) answer(3) prompt(2) answer(4)  -> 12 tokens, answer turns end at 6 and 12
SAMPLE = s(range(12), [0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1])


def test_turn_ends():
    assert turn_ends(SAMPLE).tolist() == [6, 12]


def test_fits_untouched():
    assert [p.tolist() for p in fit_overlong(SAMPLE, 12, "drop")[0]] == [SAMPLE.tolist()]


def test_drop():
    assert fit_overlong(SAMPLE, 11, "drop") == ([], "overlong")


def test_truncate_keeps_prompt_cuts_answer():
    pieces, why = fit_overlong(SAMPLE, 5, "truncate")
    assert why == "" and [p.tolist() for p in pieces] == [SAMPLE[:5].tolist()]
    assert fit_overlong(SAMPLE, 3, "truncate") == ([], "overlong_prompt")


def test_split_at_turn_ends():
    pieces, why = fit_overlong(SAMPLE, 8, "split")
    assert why == "" and [len(p) for p in pieces] == [6, 6]
    assert np.array_equal(np.concatenate(pieces), SAMPLE)


def test_split_hard_cut_when_no_turn_end_fits():
    pieces, _ = fit_overlong(SAMPLE, 4, "split")
    assert all(len(p) <= 4 for p in pieces)
    assert all((p >= 0).any() for p in pieces)  # pieces with no loss are left out


def test_unknown_policy():
    with pytest.raises(ValueError):
        fit_overlong(SAMPLE, 4, "nope")
