"""Every layout read by its trainer's own data-loading code (see trainers.py), on a build of
the shared data that holds full packs and truncated samples: tokens, labels, loss mask,
position ids and cu_seqlens checked on every pack, and the samples they carry equal to what
the input, template and tokenizer give."""

import json

import numpy as np
import pytest
import torch
import trainers
from helpers import as_pairs, build, expected_fitted

from raysft.layouts import get_layout

S = 512
INPUTS = ("glaive_toolcall_en_demo.json", "alpaca_en_demo.json")  # glaive: 184..4043 tokens


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_session, shared_data, llama3_dir, llama3_info):
    """One build per layout (truncate: many samples fill a whole pack) and the reference."""
    inputs = [shared_data / n for n in INPUTS]
    cache = {}

    def get(layout):
        if layout not in cache:
            out = tmp_path_factory.mktemp(layout)
            stats = build(out, inputs, llama3_dir, template="llama3", seq_length=S, layout=layout,
                          overlong="truncate", num_shards=2)
            lay = get_layout(layout)
            want = expected_fitted(llama3_info, inputs, capacity=lay.capacity(S), overlong="truncate",
                                   avoid_end=lay.avoid_end_ids)
            cache[layout] = (out, stats, want)
        return cache[layout]

    return get


def check_segment(tokens, labels, loss_mask, position_ids, a, b):
    """One sample [a, b) of a pack in shifted-label form: returns its (ids, loss)."""
    n = b - a
    assert np.array_equal(position_ids[a:b], np.arange(n)), "position ids restart at each sample"
    assert labels[b - 1] == -100, "no target crosses into the next sample"
    seg, lab = tokens[a:b], labels[a:b]
    ok = lab[:-1] != -100
    assert np.array_equal(lab[:-1][ok], seg[1:][ok]), "label t is token t + 1"
    assert np.array_equal(loss_mask[a:b] != 0, lab != -100)
    loss = np.concatenate([[False], ok])
    return np.where(loss, seg, ~seg)


def test_native_through_raysft_reader(built):
    from raysft.reader import PackedReader, torch_dataset

    out, stats, want = built("native")
    r = PackedReader(str(out), pad_to=S)
    assert len(r) == stats["packs"]
    got, full = [], 0
    for i, p in enumerate(r):
        t, lab, lm, pos, cu = (p[k] for k in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens"))
        assert len(t) == S and cu[0] == 0 and cu[-1] == S
        real = sum(len(x) for x in r.samples(i))
        assert len(cu) == len(r.samples(i)) + 1 + (real < S)  # one padding segment when not full
        full += int(real == S)
        for a, b in zip(cu[:-1], cu[1:]):
            if a >= real:
                assert np.all(lab[a:b] == -100) and np.all(t[a:b] == stats["pad_id"])
                continue
            got.append(check_segment(t, lab, lm, pos, int(a), int(b)))
        assert p["max_seqlen"] == max(np.diff(cu))  # the padding segment too: a varlen kernel is sized by it
    assert full > 0, "the data must hold full packs"
    assert as_pairs(got) == as_pairs(want)
    ds = torch_dataset(str(out))
    assert torch.equal(ds[0]["tokens"], torch.from_numpy(PackedReader(str(out))[0]["tokens"]))


@pytest.mark.parametrize("mbs", [2, 3])
def test_native_through_megatron_lm_sft_batch_at_micro_batch_above_1(built, mbs):
    """``torch_dataset(out, megatron_sft=True)`` under Megatron-LM's ``--sft`` batch path (its
    collate and micro-batch flattening, trainers.megatron_sft_batch) at micro-batch 2 and 3:
    every boundary survives the flattening, every sample's tokens, labels, loss and position ids
    are as the input gives, padding trains nothing, and max_seqlen covers every segment."""
    from raysft.reader import torch_dataset

    out, stats, want = built("native")
    ds = torch_dataset(str(out), megatron_sft=True)
    assert len(ds) == stats["packs"]
    got = []
    for first in range(0, len(ds), mbs):
        items = [ds[i] for i in range(first, min(first + mbs, len(ds)))]
        b = trainers.megatron_sft_batch(items)
        t, lab, lm, pos = (b[k][0].numpy() for k in ("tokens", "labels", "loss_mask", "position_ids"))
        cu = b["cu_seqlens"].numpy()
        assert len(t) == len(items) * S and cu[0] == 0 and cu[-1] == len(t)
        assert int(b["max_seqlen"]) >= max(np.diff(cu))
        for a, z in zip(cu[:-1], cu[1:]):
            if np.all(lab[a:z] == -100) and np.all(t[a:z] == stats["pad_id"]) and (z % S == 0):
                assert not lm[a:z].any()  # a row's padding segment
                continue
            got.append(check_segment(t, lab, lm, pos, int(a), int(z)))
    assert as_pairs(got) == as_pairs(want)


def test_pai_through_megatron_gpt_dataset_and_pai_batch(built, tmp_path):
    out, stats, want = built("pai")
    P = stats["packs"]
    assert stats["pack_capacity"] == S - 1 and max(int(k) for k in stats["pack_fill"]) == S - 1
    assert not stats["unrepresentable"]  # truncation never ends a sample in id 0 (which GPTDataset reads as pad)
    ds = trainers.megatron_gpt_dataset(str(out / "data"), 2 * S, 2 * P, eod=128009, vocab_size=stats["vocab_size"],
                                       cache=str(tmp_path / "cache"))
    seen = {}
    for i in range(len(ds)):
        tokens = ds[i]["tokens"]
        seen.setdefault(tokens.numpy().tobytes(), tokens)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    raw = IndexedDataset(str(out / "data"), mmap=True)
    assert len(raw) == P
    docs = [raw[i].astype(np.int64).tobytes() for i in range(P)]
    assert set(docs) == set(seen), "every GPTDataset sample is one pack, and every pack is one"
    got = []
    for key in docs:
        tokens = seen[key]
        batch = trainers.pai_batch(tokens[None], S)  # Pai raises here on a pack with no padding
        t, lab, lm, pos = (batch[k][0].numpy() for k in ("tokens", "labels", "loss_mask", "position_ids"))
        cu = batch["cu_seqlens"].numpy()
        assert cu[-1] == S and int(batch["num_seqs"][0]) == len(cu) - 2
        for a, b in zip(cu[:-2], cu[1:-1]):
            got.append(check_segment(t, lab, lm, pos, int(a), int(b)))
        a = int(cu[-2])  # the padding segment after the last sample
        assert np.all(lab[a:] == -100) and np.all(t[a:] == stats["pad_id"])
    assert as_pairs(got) == as_pairs(want)


def test_mindspeed_neat_pack(built):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out, stats, want = built("mindspeed")
    sets = [IndexedDataset(str(out / f"data_packed_{p}_document"), mmap=True)
            for p in ("input_ids", "labels", "attention_mask")]
    got, split_by_eos = [], 0
    for k in range(stats["packs"]):
        ids, labels, seg = (d[k] for d in sets)
        item = trainers.mindspeed_item(ids, labels, seg, S, eos=128009)
        bounds = [0, *item["actual_seq_len"]]
        pos, targets = item["position_ids"], item["targets"]
        for a, b in zip(bounds[:-1], bounds[1:]):
            if seg[a] == 0:  # padding: one token per segment, no target
                assert np.all(labels[a:b] == -100)
                continue
            assert np.all(seg[a:b] == seg[a]) and np.array_equal(pos[a:b], np.arange(b - a))
            assert targets[b - 1] == -100, "the last token of a sample is not trained to predict the next"
            s_ids, s_lab = ids[a:b], labels[a:b]
            assert np.all((s_lab == -100) | (s_lab == s_ids)) and s_lab[0] == -100
            got.append(np.where(s_lab != -100, s_ids, ~s_ids))
        split_by_eos += trainers.mindspeed_eos_segments(ids[seg > 0], 128009) > seg.max()
    assert as_pairs(got) == as_pairs(want)
    assert split_by_eos > 0  # without --neat-pack MindSpeed would cut multi-turn samples at each EOS


def test_xtuner_intern_repo_loader(built):
    ir = trainers.xtuner_intern_repo()
    out, stats, want = built("xtuner")
    datasets = ir.load_intern_repo_tokenized_dataset(str(out), data_order_path=str(out / "data_order.txt"))
    assert [d.path for d in datasets] == [str(out / "data.bin")]
    assert not (out / "shards").exists()  # XTuner would read them too without data_order_path
    ds = datasets[0]
    got = []
    for i in range(len(ds)):
        item = ds[i]
        ids, lab = np.asarray(item["input_ids"]), np.asarray(item["labels"])
        assert np.all((lab == -100) | (lab == ids)) and lab[0] == -100
        got.append(np.where(lab != -100, ids, ~ids))
    # what XTuner cannot read back: id 0 always reads as carrying no loss (counted, warned)
    lost = sum(int(((w >= 0) & (w == 0)).sum()) for w in want)
    assert sum(stats["unrepresentable"].values()) == lost
    want = [np.where(w == 0, ~w, w) for w in want]
    assert as_pairs(got) == as_pairs(want)
    packed = ir.PackedDataset(ds, packed_length=S)
    for k in range(len(packed)):
        p = packed[k]
        labels, cum, pos = np.asarray(p["labels"]), p["cumulative_len"], np.asarray(p["position_ids"])
        assert cum[-1] == len(labels) == S
        for c in cum[1:-1]:  # a sample XTuner starts inside a pack: no target reaches into it
            assert labels[c] == -100 and pos[c] == 0


def bridge_sample(tokens, labels, loss_mask, a: int, e: int):
    """A sample's tokens and loss from a segment of Bridge's batch: its inputs, then the last
    label (the sample's last token); loss on a token where the position before it has loss."""
    return (np.concatenate([tokens[a:e], [labels[e - 1]]]), np.concatenate([[False], loss_mask[a:e] != 0]))


def test_bridge_packed_dataset(built, tmp_path):
    out_npy, stats, want = built("bridge-npy")
    out_pq, stats_pq, _ = built("bridge")
    import pyarrow.parquet as pq

    rows = pq.read_table(out_pq / "data.idx.parquet").to_pylist()
    legacy = np.load(out_npy / "data.npy", allow_pickle=True)
    assert rows == list(legacy), "Parquet and .npy hold the same rows"
    meta = json.loads((out_pq / "data.metadata.json").read_text())
    assert meta == [stats_pq["bridge_metadata"]] and meta[0]["pack_size"] == S
    assert meta[0]["max_samples_per_bin"] == max(len(r["seq_start_id"]) for r in rows)
    # Bridge's own rule: a sample counts one token short (its last token is no input)
    assert meta[0]["min_packed_seqlen"] == min(len(r["input_ids"]) - len(r["seq_start_id"]) for r in rows)
    assert meta[0]["dataset_max_seqlen"] == max(
        b - a for r in rows for a, b in zip(r["seq_start_id"], [*r["seq_start_id"][1:], len(r["input_ids"])])) - 1

    cls = trainers.bridge_packed_dataset_class()

    class Tok:
        eos_id = eod = 128009

    got = []
    for pad_cu in (False, True):
        ds = cls(file_path=str(out_npy / "data.npy"), tokenizer=Tok(), max_seq_length=S, pad_to_max_length=pad_cu,
                 prompt_template="{input} {output}", label_key="output", truncation_field="input",
                 pad_cu_seqlens=pad_cu, pack_metadata_file_path=str(out_pq / "data.metadata.json"))
        assert len(ds) == stats["packs"]
        for i in range(len(ds)):
            b = ds.collate_fn([ds[i]])
            t, lab, lm, pos = (b[k][0].numpy() for k in ("tokens", "labels", "loss_mask", "position_ids"))
            cu = b["cu_seqlens"][0].numpy()  # megatron-bridge 0.3.1 pads it with -1 (cu_seqlens_argmin)
            cu = cu[: int(b["cu_seqlens_argmin"][0])] if (cu < 0).any() else cu
            real = len(rows[i]["input_ids"]) - len(rows[i]["seq_start_id"])  # each sample loses its last input
            if pad_cu:  # the max_seqlen Bridge hands the attention kernel covers every real segment
                segs = [int(e) - int(a) for a, e in zip(cu[:-1], cu[1:]) if int(a) < real]
                assert int(b["max_seqlen"][0]) >= max(segs)
            for a, e in zip(cu[:-1], cu[1:]):
                a, e = int(a), int(e)
                if a >= real or a == e:  # the padding to the pack's length, or pad_cu_seqlens' empty ones
                    assert not lm[a:e].any()
                    continue
                assert np.array_equal(pos[a:e], np.arange(e - a))
                ids, loss = bridge_sample(t, lab, lm, a, e)
                assert np.array_equal(lab[a:e][lm[a:e] != 0], ids[1:][loss[1:]])
                if not pad_cu:
                    got.append(np.where(loss, ids, ~ids))
    assert as_pairs(got) == as_pairs(want)


@pytest.mark.parametrize("mult", [4, 8])
def test_bridge_context_parallel_padding_keeps_every_real_token(tmp_path, shared_data, mult):
    """``--pad-to-multiple`` under Megatron-Bridge's own collate with ``pad_seq_to_mult`` (its
    context-parallel path): every sample's physical segment is a multiple, its logical segment
    (Bridge stops it at the last non-EOS input) holds every real token of the sample, Qwen3's
    closing ``<|im_end|>`` included (but the EOS a truncated piece may end with, which predicts
    nothing), the EOS padding trains nothing, and the real samples are
    what the input gives (fitted so their padded length fits the pack)."""
    from raysft.samples import Align
    from raysft.tokenize import load_tokenizer_info

    qwen3 = str(shared_data.parent / "tokenizers" / "qwen3")
    info = load_tokenizer_info(qwen3)
    eos = info.token_to_id(info.eos)
    inputs = [shared_data / n for n in INPUTS]
    out = tmp_path / "out"
    stats = build(out, inputs, qwen3, template="qwen3", seq_length=S, layout="bridge-npy", overlong="truncate",
                  pad_to_multiple=mult, engine="local")
    assert stats["pad_to_multiple"] == mult
    align = Align(mult, 1, eos)
    fitted = expected_fitted(info, inputs, template="qwen3", capacity=align.fit(S), overlong="truncate")
    want = [np.concatenate([w, np.full(int(align.aligned(np.int64(len(w)))) - len(w), ~eos, np.int32)])
            for w in fitted]
    ends = [np.where(w[-2:] >= 0, w[-2:], ~w[-2:]) for w in fitted]
    assert sum(e[0] == eos and e[1] != eos for e in ends) > 100, \
        "samples ending in <|im_end|> then a newline: Bridge's rule drops that <|im_end|> without the padding"

    class Tok:
        eos_id = eod = eos

    ds = trainers.bridge_packed_dataset_class()(
        file_path=str(out / "data.npy"), tokenizer=Tok(), max_seq_length=S, pad_to_max_length=False,
        prompt_template="{input} {output}", label_key="output", truncation_field="input", pad_seq_to_mult=mult)
    got = []
    for i in range(len(ds)):
        item = ds[i]
        inputs_total = len(item["input_ids"]) - (len(item["seq_boundaries"]) - 1)  # each sample less its last
        b = ds.collate_fn([item])
        t, lab, lm = (b[k][0].numpy() for k in ("tokens", "labels", "loss_mask"))
        phys, logical = b["cu_seqlens"][0].numpy(), b["cu_seqlens_unpadded"][0].numpy()
        phys = phys[: int(b["cu_seqlens_argmin"][0])] if (phys < 0).any() else phys
        logical = logical[: len(phys)]
        for (a, e), (la, le) in zip(zip(phys[:-1], phys[1:]), zip(logical[:-1], logical[1:])):
            a, e, la, le = map(int, (a, e, la, le))
            if a == e or a >= inputs_total:  # the padding of the pack to its length
                assert not lm[a:e].any()
                continue
            assert (e - a) % mult == 0, "each physical segment a multiple of pad_seq_to_mult"
            ids, loss = bridge_sample(t, lab, lm, a, e)
            assert ids[-1] == eos and not loss[-1], "at least one EOS of padding, untrained"
            closing = e - a
            while closing > 0 and t[a + closing - 1] == eos:
                closing -= 1
            # Bridge's logical segment ends at the last non-EOS input: with the padding's EOS
            # after every sample, that is the sample's last real token but a closing EOS (a
            # truncated piece may end with one; it predicts nothing); no trained label after it
            assert le - la == closing and not lm[a + closing:e].any()
            got.append(np.where(loss, ids, ~ids))
    assert as_pairs(got) == as_pairs(want)
