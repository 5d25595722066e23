"""Preference pairs: the forms users have, each side's tokens and mask against the chat
template, pairs as units through packing, and the layouts that hold them, read back as the
trainers read them (raysft.reader for native; MindSpeed-LLM's pairwise loading, step for step)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import build

from raysft.normalize import Pair, RecordError, normalize
from raysft.pack import lower_bound, plan_bfd
from raysft.tokenize import fit_pair

SHARED = Path(__file__).resolve().parents[2] / "shared"
QWEN3 = SHARED / "tokenizers" / "qwen3"
DEMO = SHARED / "data" / "dpo_zh_demo.json"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def sides(p: Pair):
    return [[(m.role, m.text, m.loss) for m in c.messages] for c in (p.chosen, p.rejected)]


# --------------------------------------------------------------------------- the forms


FORMS = {
    "llamafactory alpaca": {"instruction": "Sum", "input": "1 2", "system": "S", "chosen": "3", "rejected": "4"},
    "llamafactory sharegpt": {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Sum\n1 2"}],
                              "chosen": {"from": "gpt", "value": "3"}, "rejected": {"from": "gpt", "value": "4"}},
    "openai messages": {"messages": [{"role": "system", "content": "S"}, user("Sum\n1 2")],
                        "chosen": assistant("3"), "rejected": "4"},
    "trl conversational": {"prompt": [{"role": "system", "content": "S"}, user("Sum\n1 2")],
                           "chosen": [assistant("3")], "rejected": [assistant("4")]},
    "trl implicit prompt": {"chosen": [{"role": "system", "content": "S"}, user("Sum\n1 2"), assistant("3")],
                            "rejected": [{"role": "system", "content": "S"}, user("Sum\n1 2"), assistant("4")]},
}


@pytest.mark.parametrize("form", FORMS)
def test_every_form_is_the_same_pair(form):
    p = normalize(FORMS[form])
    assert isinstance(p, Pair) and p.prompt == 2
    prompt = [("system", "S", False), ("user", "Sum\n1 2", False)]
    assert sides(p) == [prompt + [("assistant", "3", None)], prompt + [("assistant", "4", None)]]


def test_trl_standard_strings_and_column_mapping():
    p = normalize({"prompt": "Sum 1 2", "chosen": "3", "rejected": "4"})
    assert sides(p) == [[("user", "Sum 1 2", False), ("assistant", "3", None)],
                        [("user", "Sum 1 2", False), ("assistant", "4", None)]]
    keys = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    p = normalize({"q": "Sum 1 2", "good": "3", "bad": "4"}, keys=keys)
    assert sides(p)[1][-1] == ("assistant", "4", None)


def test_a_multi_turn_prompt_is_never_trained():
    rec = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                             {"from": "human", "value": "c"}],
           "chosen": {"from": "gpt", "value": "d"}, "rejected": {"from": "gpt", "value": "e"}}
    p = normalize(rec)
    assert p.prompt == 3 and [m.loss for m in p.chosen.messages] == [False, False, False, None]


@pytest.mark.parametrize("rec, reason", [
    ({"instruction": "x", "chosen": "a"}, "missing_field"),
    ({"instruction": "x", "chosen": "a", "rejected": "a"}, "same_response"),
    ({"chosen": "a", "rejected": "b"}, "missing_field"),
    ({"chosen": [assistant("a")], "rejected": [user("b"), assistant("c")]}, "role_order"),
    ({"messages": [user("x")], "chosen": 5, "rejected": "b"}, "bad_type"),
])
def test_bad_pairs_are_one_reason(rec, reason):
    with pytest.raises(RecordError) as e:
        normalize(rec)
    assert e.value.reason == reason


# --------------------------------------------------------------------------- tokens and masks


def _reference(tok, conv):
    """A side's ids by apply_chat_template, and where its response starts (the prompt with the
    generation prompt)."""
    msgs = [{"role": m.role, "content": m.content} for m in conv.messages]
    full = tok.apply_chat_template(msgs, tokenize=True)
    prompt = tok.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True)
    full, prompt = (x["input_ids"] if hasattr(x, "keys") else x for x in (full, prompt))
    return list(full), len(prompt)


def test_each_side_is_apply_chat_template_with_loss_on_the_response_only():
    from transformers import AutoTokenizer

    from raysft.tokenize import SampleBuilder, load_tokenizer_info

    tok = AutoTokenizer.from_pretrained(str(QWEN3))
    b = SampleBuilder(load_tokenizer_info(str(QWEN3)), "auto")
    recs = json.loads(DEMO.read_text())[::5] + [FORMS[f] for f in FORMS]
    e = b.encode([json.dumps(r, ensure_ascii=False).encode() for r in recs])
    assert e.ok.all() and (e.first > 0).all()
    ends = np.cumsum(e.lengths)
    for i, r in enumerate(recs):
        tokens = e.values[ends[i] - e.lengths[i] : ends[i]]
        p = normalize(r)
        for conv, signed in ((p.chosen, tokens[: e.first[i]]), (p.rejected, tokens[e.first[i] :])):
            ids, start = _reference(tok, conv)
            assert np.where(signed >= 0, signed, ~signed).tolist() == ids
            trained = np.flatnonzero(signed >= 0)
            assert trained[0] == start  # nothing of the prompt trains; the response does from its first token


def test_a_pair_with_an_empty_side_is_rejected_naming_the_side():
    from raysft.tokenize import SampleBuilder, load_tokenizer_info

    b = SampleBuilder(load_tokenizer_info(str(QWEN3)), "chatml")
    rec = {"prompt": [user("x")], "chosen": [{"role": "assistant", "content": "y", "loss": False}],
           "rejected": "z"}
    e = b.encode([json.dumps(rec).encode()])
    assert not e.ok[0] and e.reasons[0] == "all_masked" and "chosen" in e.messages[0]


# --------------------------------------------------------------------------- overlong and packing


def _pair(c_prompt, c_resp, r_resp):
    prompt = ~np.arange(1, c_prompt + 1, dtype=np.int32)
    return (np.concatenate([prompt, np.arange(100, 100 + c_resp, dtype=np.int32), prompt,
                            np.arange(200, 200 + r_resp, dtype=np.int32)]), c_prompt + c_resp)


def test_an_overlong_pair_is_dropped_or_both_sides_cut_never_split():
    signed, chosen = _pair(10, 30, 80)
    assert fit_pair(signed, chosen, 200, 200, "truncate")[1] == chosen  # fits: as it is
    assert fit_pair(signed, chosen, 100, 100, "drop")[2] == "overlong"
    assert fit_pair(signed, chosen, 100, 100, "split")[2] == "overlong"  # a pair is never split
    out, c, why = fit_pair(signed, chosen, 100, 100, "truncate")  # chosen (40) fits half: rejected takes the rest
    assert why == "" and c == 40 and len(out) == 100 and np.array_equal(out[:40], signed[:40])
    assert np.array_equal(out[40:], signed[40:100])
    out, c, _ = fit_pair(*_pair(10, 90, 90), 100, 100, "truncate")  # both long: half each
    assert c == 50 and len(out) == 100
    assert fit_pair(*_pair(60, 5, 5), 100, 100, "truncate")[2] == "overlong_prompt"  # a side keeps no response
    out, c, _ = fit_pair(*_pair(10, 90, 150), 200, 100, "truncate")  # unpacked: each side up to its own limit
    assert c == 100 and len(out) == 200


def test_best_fit_decreasing_on_pair_lengths_at_100k_pairs():
    """100k pairs drawn from the DPO demo's pair lengths (Qwen3, both sides together)."""
    from raysft.tokenize import SampleBuilder, load_tokenizer_info

    e = SampleBuilder(load_tokenizer_info(str(QWEN3)), "auto").encode(
        [json.dumps(r, ensure_ascii=False).encode() for r in json.loads(DEMO.read_text())])
    x = np.random.default_rng(0).choice(e.lengths[e.ok], 100_000)
    for S in (4096, 8192):
        hist = np.bincount(x[x <= S], minlength=S + 1)
        plan = plan_bfd(hist, S)
        assert plan.num_tokens / (plan.num_packs * S) >= 0.99
        assert plan.num_packs - lower_bound(hist, S) <= 0.005 * plan.num_packs


# --------------------------------------------------------------------------- builds


@pytest.fixture(scope="module")
def demo_pairs(tmp_path_factory) -> Path:
    """60 pairs of LLaMA-Factory's DPO demo (LLaMA-Factory ShareGPT form) and the same pairs in
    TRL's conversational form."""
    d = tmp_path_factory.mktemp("pairs")
    recs = json.loads(DEMO.read_text())[:60]
    (d / "lf.json").write_text(json.dumps(recs, ensure_ascii=False))
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    trl = [{"prompt": [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]],
            "chosen": [assistant(r["chosen"]["value"])], "rejected": [assistant(r["rejected"]["value"])]}
           for r in recs]
    (d / "trl.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in trl))
    return d


def _expected(recs) -> dict:
    """chosen ids -> (rejected ids, response start of each side), by apply_chat_template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(QWEN3))
    out = {}
    for r in recs:
        p = normalize(r)
        (c, cs), (rj, rs) = _reference(tok, p.chosen), _reference(tok, p.rejected)
        out[tuple(c)] = (tuple(rj), cs, rs)
    return out


def test_native_packs_pairs_side_by_side_and_the_reader_gives_a_dpo_batch(demo_pairs, tmp_path):
    from raysft.reader import PackedReader

    st = build(tmp_path / "lf", [demo_pairs / "lf.json"], str(QWEN3), seq_length=2048, engine="local",
               overlong="drop")
    assert st["pairs"]["written"] + sum(st["dropped"].values()) == 60 and st["samples_written"] == 2 * st["pairs"]["written"]
    assert st["pairs"]["chosen_tokens"] + st["pairs"]["rejected_tokens"] == st["tokens"]
    assert st["parity"]["checked"] and st["parity"]["matched"] == st["parity"]["checked"]
    report = (tmp_path / "lf" / "report.html").read_text()
    assert f"preference pairs written (two samples each)</td><td>{st['pairs']['written']:,}: chosen side" in report
    want = _expected(json.loads((demo_pairs / "lf.json").read_text()))
    r = PackedReader(str(tmp_path / "lf"))
    seen = 0
    for i in range(len(r)):
        samples, pack, batch = r.samples(i), r[i], r.pair_batch(i)
        assert len(samples) % 2 == 0 and pack["pair_index"].tolist() == [k // 2 for k in range(len(samples))]
        assert pack["side"].tolist() == [k % 2 for k in range(len(samples))] and len(pack["tokens"]) <= 2048
        for k in range(0, len(samples), 2):
            c, rj = (np.where(s >= 0, s, ~s) for s in samples[k : k + 2])
            rej, cs, rs = want[tuple(c.tolist())]
            assert tuple(rj.tolist()) == rej
            assert np.flatnonzero(samples[k] >= 0)[0] == cs and np.flatnonzero(samples[k + 1] >= 0)[0] == rs
            seen += 1
        for side, at in (("chosen", 0), ("rejected", 1)):
            assert np.array_equal(batch[side]["tokens"], np.concatenate([np.where(s >= 0, s, ~s)
                                                                          for s in samples[at::2]]))
            assert len(batch[side]["cu_seqlens"]) == len(samples) // 2 + 1
    assert seen == st["pairs"]["written"]
    # the same pairs in TRL's form: the same dataset, byte for byte
    build(tmp_path / "trl", [demo_pairs / "trl.jsonl"], str(QWEN3), seq_length=2048, engine="local")
    for name in ("data.bin", "data.idx"):
        assert (tmp_path / "trl" / name).read_bytes() == (tmp_path / "lf" / name).read_bytes()


def mindspeed_pairwise_item(item: dict, seq_length: int) -> dict:
    """MindSpeed-LLM c77308a ``DecoderPackedMTFDataset._cut_pairwise_token`` with
    ``_infer_seqlen`` (``--is-pairwise-dataset``), step for step."""
    def infer_seqlen(source_len, target_len, cutoff_len):
        if target_len * 2 < cutoff_len:
            max_target_len = cutoff_len
        elif source_len * 2 < cutoff_len:
            max_target_len = cutoff_len - source_len
        else:
            max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
        new_target_len = min(max_target_len, target_len)
        return min(max(cutoff_len - new_target_len, 0), source_len), new_target_len

    prompt_length = (item["chosen_labels"] != -100).nonzero()[0][0]
    prompt_ids = item["chosen_input_ids"][:prompt_length]
    chosen_ids = item["chosen_input_ids"][prompt_length:]
    rejected_ids = item["rejected_input_ids"][prompt_length:]
    source_len, target_len = infer_seqlen(len(prompt_ids), max(len(chosen_ids), len(rejected_ids)), seq_length)
    prompt_ids, chosen_ids, rejected_ids = prompt_ids[:source_len], chosen_ids[:target_len], rejected_ids[:target_len]
    return {"chosen_input_ids": np.append(prompt_ids, chosen_ids),
            "chosen_labels": np.append(-100 * np.ones(source_len), chosen_ids).astype(np.int64),
            "rejected_input_ids": np.append(prompt_ids, rejected_ids),
            "rejected_labels": np.append(-100 * np.ones(source_len), rejected_ids).astype(np.int64)}


def test_mindspeed_pairwise_reads_exact_under_its_own_loading(demo_pairs, tmp_path):
    """MindSpeed's MTFDataset finds ``{prefix}_packed_{field}_document`` datasets by glob and reads
    item ``i`` of each (megatron-core's IndexedDataset); ``_cut_pairwise_token`` then makes the
    pair it trains on."""
    import glob
    import re

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    S = 2048
    out = tmp_path / "ms"
    st = build(out, [demo_pairs / "lf.json"], str(QWEN3), seq_length=S, layout="mindspeed", engine="local")
    prefix = str(out / "data")
    fields = {re.match(f"{prefix}_packed_(.*)_document(.*)", n).group(1) for n in glob.glob(f"{prefix}_packed_*_document*")}
    assert fields == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    sets = {f: IndexedDataset(f"{prefix}_packed_{f}_document") for f in fields}
    n = len(sets["chosen_input_ids"])
    assert all(len(d) == n for d in sets.values()) and n == st["pairs"]["written"] == st["packs"]
    want = _expected(json.loads((demo_pairs / "lf.json").read_text()))
    for i in range(n):
        item = {f: d.get(i) for f, d in sets.items()}
        got = mindspeed_pairwise_item(item, S)
        for f in fields:  # MindSpeed cuts nothing: each side fits seq_length, the labels are what it trains
            assert np.array_equal(got[f], item[f].astype(got[f].dtype)), f
        c, r = item["chosen_input_ids"], item["rejected_input_ids"]
        rej, cs, rs = want[tuple(c.tolist())]
        assert tuple(r.tolist()) == rej and len(c) <= S and len(r) <= S
        assert cs == rs == np.flatnonzero(item["chosen_labels"] != -100)[0]
        assert np.array_equal(item["rejected_labels"][rs:], r[rs:]) and (item["rejected_labels"][:rs] == -100).all()
    assert sum(st["unrepresentable"].values()) == 2 * n  # each side's newline after <|im_end|>: MindSpeed trains it


def test_a_pair_build_says_what_it_cannot_do_in_one_line(tmp_path):
    from raysft.engine.driver import BuildError

    few = tmp_path / "few.json"
    few.write_text(json.dumps([FORMS["trl conversational"], FORMS["llamafactory alpaca"]]))
    with pytest.raises(BuildError, match="--layout pai has no form for preference pairs; use one of native, mindspeed"):
        build(tmp_path / "pai", [few], str(QWEN3), seq_length=4096, layout="pai", engine="local")
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    with pytest.raises(BuildError, match="2 preference pairs and 1 SFT samples: build them as two datasets"):
        build(tmp_path / "mixed", [few, sft], str(QWEN3), seq_length=4096, engine="local")


def test_pairs_are_units_through_validation_epochs_and_the_cache(demo_pairs, tmp_path):
    from raysft.reader import PackedReader

    kw = dict(seq_length=4096, engine="local", validation="10", epochs=2, cache=str(tmp_path / "cache"))
    st = build(tmp_path / "a", [demo_pairs / "trl.jsonl"], str(QWEN3), **kw)
    assert st["validation"]["rows"] == 10 and st["pairs"]["written"] == 2 * 50
    for root in (tmp_path / "a", tmp_path / "a" / "valid"):
        r = PackedReader(str(root))
        chosen = [tuple(np.where(s >= 0, s, ~s).tolist()) for i in range(len(r)) for s in r.samples(i)[0::2]]
        want = _expected([json.loads(x) for x in (demo_pairs / "trl.jsonl").read_text().splitlines()])
        for i in range(len(r)):
            s = r.samples(i)
            for k in range(0, len(s), 2):
                assert tuple(np.where(s[k + 1] >= 0, s[k + 1], ~s[k + 1]).tolist()) == \
                    want[tuple(np.where(s[k] >= 0, s[k], ~s[k]).tolist())][0]
        assert len(chosen) == (100 if root.name == "a" else 10)
    again = build(tmp_path / "b", [demo_pairs / "trl.jsonl"], str(QWEN3), **kw)
    assert again["cache"]["rows_from_cache"] == 60
    for name in ("data.bin", "data.idx", "valid/data.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.slow  # the whole demo (300 pairs): CI's slow run
def test_a_ranking_entry_of_a_llamafactory_folder_builds_as_pairs(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "dpo_zh_demo.json").symlink_to(DEMO)
    (folder / "dataset_info.json").write_bytes((SHARED / "data" / "lf_dataset_info.json").read_bytes())
    st = build(tmp_path / "o", [folder], str(QWEN3), seq_length=8192, engine="local", dataset=["dpo_zh_demo"])
    assert st["pairs"]["written"] == 300 and st["rows_read"] == 300 and st["parity"]["mismatched"] == 0


def test_inspect_shows_a_pair_with_its_prompt_once(demo_pairs, tmp_path, capsys):
    from raysft import inspect

    build(tmp_path / "o", [demo_pairs / "lf.json"], str(QWEN3), seq_length=4096, engine="local")
    assert inspect.main([str(tmp_path / "o"), "--sample", f"{demo_pairs / 'lf.json'}:3", "--color", "never"]) == 0
    text = capsys.readouterr().out
    block = text[text.index("<== requested") :]
    assert "── prompt (" in block and "── chosen (after the prompt)" in block and "── rejected (after the prompt)" in block
    rec = json.loads((demo_pairs / "lf.json").read_text())[3]
    assert rec["chosen"]["value"][:30] in block and rec["rejected"]["value"][:30] in block


@pytest.mark.slow
def test_the_ray_engine_writes_the_same_pair_dataset(demo_pairs, tmp_path, ray_session):
    kw = dict(seq_length=4096, validation="5")
    build(tmp_path / "local", [demo_pairs / "lf.json"], str(QWEN3), engine="local", **kw)
    build(tmp_path / "ray", [demo_pairs / "lf.json"], str(QWEN3), engine="ray", **kw)
    for name in ("data.bin", "data.idx", "valid/data.bin", "provenance.bin"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
