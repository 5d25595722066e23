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


def test_cuts_never_fall_inside_a_marker():
    sample = s(range(12), [0, 0] + [1] * 10)  # one answer turn, ending at 12
    unsafe = np.zeros(13, dtype=bool)
    unsafe[[5, 6]] = True  # tokens 4..6 spell one marker the tokenizer splits into three tokens
    pieces, _ = fit_overlong(sample, 6, "truncate", unsafe)
    assert [len(p) for p in pieces] == [4]  # moved back from 6 to the marker's start
    pieces, _ = fit_overlong(sample, 5, "split", unsafe)
    assert [len(p) for p in pieces] == [4, 5, 3]
    cuts = np.cumsum([len(p) for p in pieces])[:-1]
    assert not unsafe[cuts].any()
    assert [len(p) for p in fit_overlong(sample, 5, "split")[0]] == [5, 5, 2]  # without markers


def test_marker_cuts_on_a_real_tokenizer(llama3_info):
    from raysft.normalize import normalize
    from raysft.templates import Template
    from raysft.tokenize import SampleBuilder, marker_cuts

    tok = llama3_info.load()  # no <|im_start|>/<|im_end|> tokens: ChatML markers are split
    r = Template("chatml").render(normalize({"instruction": "hi", "output": "hello"}))
    enc = tok.encode(r.text, add_special_tokens=False)
    unsafe = marker_cuts(enc, r.text, ("<|im_start|>", "<|im_end|>"))
    starts = [o[0] for o in enc.offsets]
    for b in np.nonzero(unsafe)[0]:
        k = starts[b]
        assert any(r.text.find(m, max(0, k - len(m) + 1)) in range(k - len(m) + 1, k)
                   for m in ("<|im_start|>", "<|im_end|>"))
    assert unsafe.sum() > 0 and not unsafe[0] and not unsafe[len(enc.ids)]
    b = SampleBuilder(llama3_info, "chatml")
    assert set(b.markers) == {"<|im_start|>", "<|im_end|>"}


def test_pad_to_multiple_aligns_every_kept_sample_with_untrained_eos():
    """``--pad-to-multiple``'s rule on a block: each kept row padded at its end with ``~eos``
    (no loss) to the multiple (Bridge: the length less its last token, with at least one EOS);
    rejected rows untouched; records fitted so the padded length fits the pack."""
    import pyarrow as pa

    from raysft.samples import Align

    eos = 7
    rows = [np.arange(1, 6, dtype=np.int32), np.zeros(0, np.int32), np.arange(10, 18, dtype=np.int32)]
    ids = pa.array([r.tolist() for r in rows], pa.list_(pa.int32()))
    lengths = np.array([5, -1, 8], np.int32)
    kept = np.array([True, False, True])
    for shift, want in ((0, [8, 8]), (1, [9, 9])):
        a = Align(4, shift, eos)
        got_ids, got_len = a.apply(ids, lengths, kept)
        assert got_len.tolist() == [want[0], -1, want[1]]
        out = got_ids.to_pylist()
        assert out[1] == []
        for r, o in zip((rows[0], rows[2]), (out[0], out[2])):
            assert o[:len(r)] == r.tolist() and set(o[len(r):]) <= {~eos}
            assert (len(o) - shift) % 4 == 0 and (shift == 0 or len(o) > len(r))
    assert Align(4, 1, eos).fit(512) == 508 and Align(8, 0, eos).fit(512) == 512
    assert int(Align(4, 1, eos).aligned(np.int64(508))) == 509  # the longest fitted sample fits 512
