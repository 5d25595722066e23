"""The fast encoder against the reference: ``fastokens`` (loss flags from token byte lengths)
gives the ids, loss flags and reject reasons of Hugging Face ``tokenizers`` (loss flags from
character offsets) on every row of ../shared/data, with every built-in template and ``auto``,
on each shared tokenizer it accepts; where it is refused, ``auto`` says why and uses ``hf``.
A build with ``--encoder auto`` writes the bytes of ``--encoder hf``."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import build, file_bytes

from raysft import encode as enc_mod
from raysft.templates import BUILTINS
from raysft.tokenize import SampleBuilder, load_tokenizer_info

TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
# every shared file, with the keys its columns need (the demos need none)
FILES = {
    "alpaca_en_demo.json": {}, "alpaca_zh_demo.json": {}, "glaive_toolcall_en_demo.json": {},
    "gsm8k_train.jsonl": {"prompt": "question", "response": "answer"},
    "gpteacher_codegen.json": {"response": "response"}, "gpteacher_toolformer.json": {"response": "response"},
    "gpteacher_roleplay.json": {"response": "response"},
}


@pytest.fixture(scope="module")
def groups(shared_data):
    """(map_keys, raw records) per shared file: ~24k rows."""
    out = []
    for name, keys in FILES.items():
        text = (shared_data / name).read_text(encoding="utf-8")
        recs = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]
        out.append((keys, [json.dumps(r, ensure_ascii=False).encode() for r in recs]))
    return out


def _info(name, llama3_dir):
    return load_tokenizer_info(llama3_dir if name == "llama3" else str(TOKENIZERS / name))


def _compare(info, template, groups, stride=1):
    """Encode every group with both encoders; return (rows compared, rows kept, the fast encoder)."""
    fast, why = enc_mod.choose("fastokens", info)
    assert fast.name == "fastokens" and not why
    hf = enc_mod.HFEncoder(info.shared())
    rows = kept = 0
    for keys, raws in groups:
        raws = raws[::stride]
        a = SampleBuilder(info, template, "auto", keys, encoder=fast).encode(raws)
        b = SampleBuilder(info, template, "auto", keys, encoder=hf).encode(raws)
        assert a.reasons == b.reasons
        assert np.array_equal(a.lengths, b.lengths) and np.array_equal(a.loss, b.loss)
        if not np.array_equal(a.values, b.values):
            ends = np.cumsum(a.lengths[a.ok])
            k = int(np.flatnonzero(a.values != b.values)[0])
            row = int(np.flatnonzero(a.ok)[np.searchsorted(ends, k, side="right")])
            pytest.fail(f"{template}: row {row} differs (keys {keys})")
        assert a.batch.parity_mismatches == 0
        rows += len(raws)
        kept += int(a.ok.sum())
    return rows, kept


@pytest.mark.parametrize("template", [t if t == "llama3" else pytest.param(t, marks=pytest.mark.slow)
                                      for t in sorted(BUILTINS)])  # the others in CI's slow run
def test_builtins_on_llama3_every_shared_row(template, groups, llama3_dir):
    rows, kept = _compare(_info("llama3", llama3_dir), template, groups)
    assert rows > 23_800 and kept > 0.9 * rows or template == "llama2"  # llama2 rejects tool rows


def test_auto_on_qwen3_every_shared_row(groups):
    """Qwen3's own template (reasoning, tools) and its NFC normalizer: rows that are not NFC
    are re-encoded with hf by the per-row guard, the rest come from fastokens."""
    rows, kept = _compare(_info("qwen3", None), "auto", groups)
    assert rows > 23_800 and kept > 0.9 * rows


def test_tekken_with_the_mistral_builtin(groups):
    rows, kept = _compare(_info("mistral-tekken", None), "mistral", groups, stride=3)
    assert kept > 0.9 * rows


def test_sentencepiece_v3_is_exact_or_refused_with_its_reason(groups):
    """SentencePiece v3 (Metaspace): either fastokens is taken and exact on the shared rows, or
    auto keeps hf and says why in one line, and --encoder fastokens is refused in one line."""
    info = load_tokenizer_info(str(TOKENIZERS / "mistral-v3"))
    encoder, why = enc_mod.choose("auto", info)
    if encoder.name == "fastokens":
        rows, kept = _compare(info, "mistral", groups, stride=3)
        assert kept > 0.9 * rows
        return
    assert why and "\n" not in why
    with pytest.raises(enc_mod.EncoderError, match="--encoder fastokens: ") as e:
        enc_mod.choose("fastokens", info)
    assert "\n" not in str(e.value)


def test_a_canary_mismatch_falls_back_to_hf(llama3_dir, monkeypatch):
    info = _info("llama3", llama3_dir)
    real = enc_mod.FastEncoder.ids
    monkeypatch.setattr(enc_mod.FastEncoder, "ids", lambda self, texts: [ids[:-1] or [0] for ids in real(self, texts)])
    encoder, why = enc_mod.choose("auto", info, ["a real row"])
    assert encoder.name == "hf" and "canary" in why


def test_a_mismatch_during_the_build_re_encodes_the_batch_with_hf_and_is_counted(llama3_dir, monkeypatch):
    info = _info("llama3", llama3_dir)
    fast, _ = enc_mod.choose("fastokens", info)
    texts = [f"row {i} with some words" for i in range(4000)]
    spans = [[(0, 3)] for _ in texts]
    want = enc_mod.HFEncoder(info.shared()).encode(texts, spans)
    flat = fast._flat

    # another id of the same byte length: the per-row length guard cannot see it, parity must
    order = np.argsort(fast.lengths, kind="stable")
    partner = np.empty_like(order)
    partner[order] = np.roll(order, 1)

    def wrong_first_id(texts):
        ids, offs = flat(texts)
        ids = ids.copy()
        ids[offs[:-1]] = partner[ids[offs[:-1]]]
        assert np.array_equal(fast.lengths[ids], fast.lengths[flat(texts)[0]])
        return ids, offs

    monkeypatch.setattr(fast, "_flat", wrong_first_id)
    got = fast.encode(texts, spans)
    assert got.parity_rows > 0 and got.parity_mismatches == 1 and got.fallback_rows == len(texts)
    assert np.array_equal(got.values, want.values) and np.array_equal(got.loss, want.loss)


def test_build_with_auto_writes_the_bytes_of_hf(tmp_path, ray_session, shared_data, llama3_dir):
    inputs = [shared_data / n for n in ("alpaca_zh_demo.json", "glaive_toolcall_en_demo.json", "alpaca_en_demo.json")]
    a = build(tmp_path / "auto", inputs, llama3_dir, template="llama3", seq_length=2048, encoder="auto")
    b = build(tmp_path / "hf", inputs, llama3_dir, template="llama3", seq_length=2048, encoder="hf")
    assert a["encoder"]["name"] == "fastokens" and a["encoder"]["rows_checked"] > 0
    assert a["encoder"]["mismatches"] == 0 and b["encoder"]["name"] == "hf"
    assert file_bytes(tmp_path / "auto") == file_bytes(tmp_path / "hf")
