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
