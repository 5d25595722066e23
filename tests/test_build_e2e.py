"""End to end on the session's local Ray, with the shared real SFT data."""

import json
import math

import numpy as np
import pytest
from helpers import build, expected_samples, file_bytes, reader, written_samples

from raysft.engine.driver import BuildError
from raysft.layouts import IGNORE
from raysft.tokenize import SampleBuilder, load_tokenizer_info

STATS_KEYS = {
    "rows_read", "samples_written", "rejected", "dropped", "tokens", "loss_tokens", "packs", "seq_length",
    "packing_efficiency", "lower_bound_packs", "length", "layout", "tokenizer", "template",
}


@pytest.fixture(scope="module")
def native_out(tmp_path_factory, ray_session, shared_data, llama3_dir):
    out = tmp_path_factory.mktemp("native")
    inputs = [shared_data / "alpaca_en_demo.json", shared_data / "glaive_toolcall_en_demo.json"]
    stats = build(out, inputs, llama3_dir, template="llama3", seq_length=2048)
    return out, inputs, stats


def test_every_written_sample_is_the_rendered_conversation(native_out, llama3_info):
    out, inputs, stats = native_out
    expected = expected_samples(llama3_info, inputs, seq_length=2048)
    assert written_samples(out) == expected
    assert stats["samples_written"] == sum(expected.values())


def test_stats_contract_and_invariant(native_out):
    out, _, stats = native_out
    on_disk = json.loads((out / "stats.json").read_text())
    assert STATS_KEYS <= set(on_disk)
    assert set(on_disk["length"]) == {"count", "mean", "std", "min", "p25", "p50", "p75", "p99", "max"}
    assert on_disk["rows_read"] == 999 + 300
    assert on_disk["rows_read"] == on_disk["samples_written"] + sum(on_disk["rejected"].values()) + sum(
        on_disk["dropped"].values()
    )
    assert on_disk["packs"] >= on_disk["lower_bound_packs"] == math.ceil(on_disk["tokens"] / 2048)
    assert (out / "_SUCCESS").exists()
    order = (out / "data_order.txt").read_text().split()
    assert order and all((out / p).exists() for p in order)


def test_documents_are_packs_within_seq_length(native_out):
    out, _, stats = native_out
    r = reader(out)
    docs = r.index.document_indices
    assert len(docs) - 1 == stats["packs"]
    per_doc = np.add.reduceat(r.index.sequence_lengths.astype(np.int64), docs[:-1])
    assert per_doc.max() <= 2048 and per_doc.sum() == stats["tokens"]


def test_megatron_core_reads_native(native_out):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out, _, stats = native_out
    ds = IndexedDataset(str(out / "data"), mmap=True)
    ours = reader(out)
    assert len(ds) == len(ours) == stats["samples_written"]
    assert np.array_equal(ds.document_indices, ours.index.document_indices)
    for i in (0, len(ds) // 2, len(ds) - 1):
        assert np.array_equal(ds[i], ours[i])
    # the README's decode: negative = no loss
    tokens = ds[0]
    ids, loss = np.where(tokens < 0, ~tokens, tokens), tokens >= 0
    assert ids.min() >= 0 and loss.any()


def test_pai_layout_read_by_megatron_and_consistent(tmp_path, ray_session, shared_data, llama3_dir, llama3_info):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    S = 2048
    inputs = [shared_data / "glaive_toolcall_en_demo.json"]
    stats = build(tmp_path, inputs, llama3_dir, template="llama3", seq_length=S, layout="pai")
    ds = IndexedDataset(str(tmp_path / "data"), mmap=True)
    assert len(ds) == stats["packs"] and all(int(n) == 2 * S for n in ds.sequence_lengths)
    pad = stats["pad_id"]
    got = []
    for p in range(len(ds)):
        seq = ds[p]
        inp, lab = seq[:S], seq[S:]
        ends = np.nonzero(inp < 0)[0]
        start = 0
        for e in ends:
            ids = inp[start : e + 1].copy()
            ids[-1] = -1 - ids[-1]
            labels = lab[start : e + 1]
            # labels[i] targets token i+1 of the same sample
            for i in range(len(ids) - 1):
                assert labels[i] in (IGNORE, ids[i + 1])
            assert labels[-1] == IGNORE
            got.append((ids.tobytes(), (labels[:-1] != IGNORE).tobytes()))
            start = e + 1
        assert np.all(inp[start:] == pad) and np.all(lab[start:] == IGNORE)
    want = []
    for raw in expected_samples(llama3_info, inputs, seq_length=S).elements():
        signed = np.frombuffer(raw, np.int32)
        ids, loss = np.where(signed < 0, ~signed, signed), signed >= 0
        want.append((ids.astype(np.int32).tobytes(), loss[1:].tobytes()))
    assert sorted(got) == sorted(want)


def test_shared_alpaca_packs_near_lower_bound(tmp_path, ray_session, shared_data, llama3_dir):
    stats = build(tmp_path, [shared_data / "alpaca_en_demo.json", shared_data / "alpaca_zh_demo.json"], llama3_dir,
                  template="llama3", seq_length=2048)
    assert stats["packs"] <= math.ceil(1.001 * stats["lower_bound_packs"])


def test_byte_identical_whatever_workers_shards_and_input_order(tmp_path, ray_session, shared_data, llama3_dir, native_out):
    out_a, inputs, _ = native_out
    out_b = tmp_path / "b"
    build(out_b, list(reversed(inputs)), llama3_dir, template="llama3", seq_length=2048, tokenize_workers=1,
          num_shards=3, batch_size=77, chunk_bytes=200_000)
    assert file_bytes(out_a)["data.bin"] == file_bytes(out_b)["data.bin"]
    assert file_bytes(out_a)["data.idx"] == file_bytes(out_b)["data.idx"]
    assert len((out_b / "data_order.txt").read_text().split()) == 3


def test_no_pack_and_seed(tmp_path, ray_session, shared_data, llama3_dir):
    inputs = [shared_data / "glaive_toolcall_en_demo.json"]
    a = build(tmp_path / "a", inputs, llama3_dir, template="llama3", seq_length=4096, pack=False)
    assert a["packs"] == a["samples_written"]
    r = reader(tmp_path / "a")
    assert len(r.index.document_indices) - 1 == len(r)
    # without packing, samples keep input order (as preprocess_data.py writes them; the trainer's
    # sampler shuffles): the seed changes nothing
    build(tmp_path / "b", inputs, llama3_dir, template="llama3", seq_length=4096, pack=False, seed=5)
    assert (tmp_path / "a" / "data.bin").read_bytes() == (tmp_path / "b" / "data.bin").read_bytes()
    b = SampleBuilder(load_tokenizer_info(llama3_dir), "llama3")
    records = json.loads(inputs[0].read_text())
    ids, reasons, _ = b([json.dumps(x).encode() for x in records])
    assert [r[i].tolist() for i in range(len(r))] == [x.tolist() for x in ids if x is not None]


def test_bad_record_names_file_and_line(tmp_path, ray_session, llama3_dir):
    src = tmp_path / "in" / "bad.jsonl"
    src.parent.mkdir()
    good = json.dumps({"instruction": "hi", "output": "hello"})
    src.write_text("\n".join([good, good, '{"instruction": "x", "output": ', good]) + "\n")
    with pytest.raises(BuildError, match=r"bad\.jsonl line 3: invalid_json"):
        build(tmp_path / "out", [src], llama3_dir, template="llama3", seq_length=512)
    stats = build(tmp_path / "out2", [src], llama3_dir, template="llama3", seq_length=512, on_bad_record="skip")
    assert stats["rows_read"] == 4 and stats["samples_written"] == 3 and stats["rejected"] == {"invalid_json": 1}
    rejects = [json.loads(x) for x in (tmp_path / "out2" / "rejects.jsonl").read_text().splitlines()]
    assert rejects[0]["position"].endswith("bad.jsonl line 3") and rejects[0]["reason"] == "invalid_json"


def test_existing_output_needs_overwrite(native_out, llama3_dir):
    from raysft.output import OutputError

    out, inputs, _ = native_out
    with pytest.raises(OutputError, match="--overwrite"):
        build(out, inputs, llama3_dir, template="llama3", seq_length=2048)


def test_mindspeed_layout_read_by_megatron_and_consistent(tmp_path, ray_session, shared_data, llama3_dir,
                                                        llama3_info):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    S = 2048
    inputs = [shared_data / "glaive_toolcall_en_demo.json"]
    stats = build(tmp_path, inputs, llama3_dir, template="llama3", seq_length=S, layout="mindspeed")
    sets = [IndexedDataset(str(tmp_path / f"data_packed_{p}_document"), mmap=True)
            for p in ("input_ids", "labels", "attention_mask")]
    assert all(len(d) == stats["packs"] for d in sets)
    assert all(int(n) == S for d in sets for n in d.sequence_lengths)
    got = []
    for p in range(stats["packs"]):
        ids, labels, seg = (d[p] for d in sets)
        assert np.all(ids[seg == 0] == stats["pad_id"]) and np.all(labels[seg == 0] == IGNORE)
        assert np.all(np.diff(seg[seg > 0]) >= 0)  # samples are contiguous, numbered 1, 2, 3...
        for k in range(1, int(seg.max()) + 1):
            s_ids, s_lab = ids[seg == k], labels[seg == k]
            assert np.all((s_lab == IGNORE) | (s_lab == s_ids))
            got.append(np.where(s_lab != IGNORE, s_ids, ~s_ids).astype(np.int32).tobytes())
    assert sorted(got) == sorted(expected_samples(llama3_info, inputs, seq_length=S).elements())
    order = (tmp_path / "data_order.txt").read_text().split()
    assert len(order) == 3 and all((tmp_path / o).exists() for o in order)


def test_add_special_tokens_extends_and_saves_the_tokenizer(tmp_path, ray_session, shared_data, llama3_dir):
    from raysft.tokenize import load_tokenizer_info

    inputs = [shared_data / "glaive_toolcall_en_demo.json"]
    stats = build(tmp_path, inputs, llama3_dir, template="chatml", seq_length=4096, add_special_tokens=True)
    assert stats["added_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert stats["vocab_size"] == 128256 + 2
    info = load_tokenizer_info(str(tmp_path / "tokenizer"))
    tok = info.load()
    assert tok.token_to_id("<|im_start|>") == 128256 and tok.token_to_id("<|im_end|>") == 128257
    assert written_samples(tmp_path) == expected_samples(info, inputs, template="chatml", seq_length=4096)
    r = reader(tmp_path)
    for i in (0, len(r) - 1):
        signed = r[i]
        assert ~signed[0] == 128256 and (signed >= 0).any()  # prompt tokens are stored complemented
        assert signed[signed >= 0][-1] == 128257  # the answer ends with the new <|im_end|>
