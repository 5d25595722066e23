import errno
import json
import os
import pathlib

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

import raysft.write as w
from raysft.indexed import decode_index
from raysft.layouts import IGNORE, LAYOUTS, REGISTRY, Placement, get_layout
from raysft.merge import merge_shards


def signed(ids, loss):
    ids = np.asarray(ids, np.int32)
    return np.where(np.asarray(loss, bool), ids, ~ids).astype(np.int32)


SAMPLES = [
    signed([10, 11, 12, 13], [0, 0, 1, 1]),
    signed([20, 21, 22], [0, 1, 1]),
    signed([30, 31], [0, 1]),
]


def encode(samples, packs, pos, layout, S, pad):
    """The layout's encoding of samples placed at (pack, position), in output order."""
    order = w.order_samples(packs, pos)
    p = Placement(np.concatenate([samples[i] for i in order]), [len(samples[i]) for i in order],
                  np.asarray(packs)[order])
    return get_layout(layout).encode(p, S, pad)


def write_shard(fs, prefix, samples, packs, layout="native", S=8, pad=0):
    return w.write_ordered(fs, prefix, get_layout(layout), S, pad, np.concatenate(samples),
                           [len(s) for s in samples], packs)


def test_registry_has_one_module_per_layout():
    assert set(LAYOUTS) == {"native", "pai", "mindspeed", "xtuner", "bridge", "bridge-npy", "llamafactory"}
    for name, lay in REGISTRY.items():
        assert lay.name == name and lay.summary and lay.trainer


def test_native_layout_orders_by_pack_then_position():
    [(tokens, idx)] = encode(SAMPLES, np.array([1, 0, 0]), np.array([0, 1, 0]), "native", 8, 0)
    assert tokens.tolist() == SAMPLES[2].tolist() + SAMPLES[1].tolist() + SAMPLES[0].tolist()
    assert idx.sequence_lengths.tolist() == [2, 3, 4]
    assert idx.document_indices.tolist() == [0, 2, 3]


def test_pai_layout():
    S = 8
    [(tokens, idx)] = encode(SAMPLES, np.array([0, 0, 1]), np.array([0, 1, 0]), "pai", S, 99)
    assert idx.sequence_lengths.tolist() == [16, 16]
    assert idx.document_indices.tolist() == [0, 1, 2]
    seq0 = tokens[:16]
    inputs, labels = seq0[:S], seq0[S:]
    # sample ends marked as -1-id; padding with pad id; the last position is always padding
    assert inputs.tolist() == [10, 11, 12, -1 - 13, 20, 21, -1 - 22, 99]
    # labels[i] is the target of position i; no loss across sample boundary or on prompt
    assert labels.tolist() == [IGNORE, 12, 13, IGNORE, 21, 22, IGNORE, IGNORE]
    seq1 = tokens[16:]
    assert seq1[:S].tolist() == [30, -1 - 31, 99, 99, 99, 99, 99, 99]
    assert seq1[S:].tolist() == [31] + [IGNORE] * 7


def test_pai_packs_never_fill_the_last_position():
    lay = get_layout("pai")
    assert lay.capacity(8) == 7
    with pytest.raises(ValueError, match="more than 7"):
        encode([signed(range(8), [0] + [1] * 7)], np.array([0]), np.array([0]), "pai", 8, 0)


def test_pai_counts_sample_ends_it_cannot_mark():
    p = Placement(np.concatenate([signed([5, 0], [0, 1]), signed([7, 8], [0, 1])]), [2, 2], [0, 0])
    assert sum(get_layout("pai").unrepresentable(p).values()) == 1


def test_mindspeed_layout():
    S = 8
    parts = encode(SAMPLES, np.array([0, 0, 1]), np.array([0, 1, 0]), "mindspeed", S, 99)
    (ids, idx), (labels, _), (segments, _) = parts
    assert idx.sequence_lengths.tolist() == [S, S] and idx.document_indices.tolist() == [0, 1, 2]
    assert ids[:S].tolist() == [10, 11, 12, 13, 20, 21, 22, 99]
    assert labels[:S].tolist() == [IGNORE, IGNORE, 12, 13, IGNORE, 21, 22, IGNORE]  # unshifted
    assert segments[:S].tolist() == [1, 1, 1, 1, 2, 2, 2, 0]
    assert ids[S:].tolist() == [30, 31] + [99] * 6
    assert labels[S:].tolist() == [IGNORE, 31] + [IGNORE] * 6
    assert segments[S:].tolist() == [1, 1] + [0] * 6


def test_mindspeed_never_labels_a_sample_start():
    """MindSpeed shifts labels over the whole pack: a label on a sample's first token would be
    the target of the previous sample's last token."""
    s = [signed([1, 2], [1, 1]), signed([3, 4], [1, 1])]
    _, (labels, _), _ = encode(s, np.array([0, 0]), np.array([0, 1]), "mindspeed", 6, 0)
    assert labels.tolist() == [IGNORE, 2, IGNORE, 4, IGNORE, IGNORE]


def test_xtuner_layout(tmp_path):
    fs = fsspec.filesystem("file")
    prefix = str(tmp_path / "part-00000")
    meta = write_shard(fs, prefix, SAMPLES, np.array([0, 0, 1]), "xtuner")
    lines = (tmp_path / "part-00000.bin").read_bytes().splitlines(keepends=True)
    assert [json.loads(x)["tokens"] for x in lines] == [[-10, -11, 12, 13], [-20, 21, 22], [-30, 31]]
    m = np.load(tmp_path / "part-00000.bin.meta")
    assert m.dtype == np.int64 and m.tolist() == [[0, 4], [len(lines[0]), 3], [len(lines[0]) + len(lines[1]), 2]]
    assert meta["sequences"] == 3 and meta["documents"] == 2


def test_bridge_layout(tmp_path):
    fs = fsspec.filesystem("file")
    write_shard(fs, str(tmp_path / "part-00000"), SAMPLES, np.array([0, 0, 1]), "bridge")
    rows = pq.read_table(tmp_path / "part-00000.idx.parquet").to_pylist()
    assert rows[0]["input_ids"] == [10, 11, 12, 13, 20, 21, 22]
    assert rows[0]["seq_start_id"] == [0, 4]
    # rolled by one inside each sample: position i says whether token i+1 is a target
    assert rows[0]["loss_mask"] == [0, 1, 1, 0, 1, 1, 0]
    assert rows[1] == {"input_ids": [30, 31], "loss_mask": [1, 0], "seq_start_id": [0]}


def _copy_file_range_refused_at(call: int, unit: int):
    """os.copy_file_range that copies ``unit`` bytes per call and fails on call number ``call``."""
    real, seen = os.copy_file_range, [0]

    def fake(src, dst, count, *args):
        seen[0] += 1
        if seen[0] == call:
            raise OSError(errno.EXDEV, "refused")
        return real(src, dst, min(count, unit), *args)

    return fake


@pytest.mark.parametrize("fs_name, refuse_at", [("file", None), ("file", 1), ("file", 3), ("memory", None)])
def test_merge_concatenates_shards(tmp_path, monkeypatch, fs_name, refuse_at):
    """Local disk copies in the kernel, falling back to a buffered copy where copy_file_range
    is refused (at a file's start or mid-file; the next shard goes back to the kernel copy);
    other file systems stream. The bytes are the same."""
    if refuse_at is not None:
        monkeypatch.setattr(os, "copy_file_range", _copy_file_range_refused_at(refuse_at, 4))
    fs = fsspec.filesystem(fs_name)
    if fs_name == "memory":
        tmp_path = pathlib.PurePosixPath(f"/merge-{refuse_at}")
    prefixes = []
    for k, (samples, packs) in enumerate([(SAMPLES[:2], [0, 1]), (SAMPLES[2:], [2])]):
        p = str(tmp_path / f"part-{k}")
        write_shard(fs, p, samples, np.array(packs))
        prefixes.append(p)
    merged = merge_shards(fs, prefixes, str(tmp_path / "data"))
    assert merged.sequence_lengths.tolist() == [4, 3, 2]
    assert merged.document_indices.tolist() == [0, 1, 2, 3]
    data = np.frombuffer(fs.cat_file(str(tmp_path / "data.bin")), dtype="<i4")
    assert data.tolist() == sum((s.tolist() for s in SAMPLES), [])
    assert decode_index(fs.cat_file(str(tmp_path / "data.idx"))).sequence_lengths.tolist() == [4, 3, 2]


def test_streamed_index_merge_equals_the_in_memory_one(tmp_path):
    """The merged .idx is written in three passes over the shard indexes; its bytes are those
    of concatenating the indexes in memory."""
    from raysft.indexed import encode_index
    from raysft.merge import merge_indexes

    fs = fsspec.filesystem("file")
    rng = np.random.default_rng(0)
    prefixes, indexes = [], []
    for k in range(5):
        n = int(rng.integers(0, 6))  # a shard may be empty
        lengths = rng.integers(1, 5, n)
        flat = rng.integers(-99, 99, int(lengths.sum())).astype(np.int32)
        packs = np.sort(rng.integers(0, 3, n))
        p = str(tmp_path / f"part-{k}")
        w.write_ordered(fs, p, get_layout("native"), 64, 0, flat, lengths, packs)
        prefixes.append(p)
        indexes.append(decode_index((tmp_path / f"part-{k}.idx").read_bytes()))
    merge_shards(fs, prefixes, str(tmp_path / "data"))
    assert (tmp_path / "data.idx").read_bytes() == encode_index(merge_indexes(indexes))


@pytest.mark.parametrize("layout", ["native", "pai", "mindspeed", "xtuner", "bridge"])
def test_shard_writer_slices_give_the_same_bytes(tmp_path, monkeypatch, layout):
    """Writing a shard a few packs at a time gives exactly the bytes of writing it whole."""
    S = 16
    rng = np.random.default_rng(3)
    samples, packs = [], []
    for p in range(40):
        room = S - 1
        while room > 2 and rng.random() < 0.8:
            n = int(rng.integers(1, room))
            samples.append(signed(rng.integers(0, 1000, n), rng.integers(0, 2, n)))
            packs.append(p)
            room -= n
        if not packs or packs[-1] != p:
            samples.append(signed([5], [1]))
            packs.append(p)
    packs = np.array(packs)
    fs = fsspec.filesystem("file")
    whole = write_shard(fs, str(tmp_path / "whole"), samples, packs, layout, S, 7)
    monkeypatch.setattr(w, "SLICE_TOKENS", 40)  # a few packs per slice
    sliced = write_shard(fs, str(tmp_path / "part"), samples, packs, layout, S, 7)
    lay = get_layout(layout)
    for a, b in zip(lay.shard_files(str(tmp_path / "whole")), lay.shard_files(str(tmp_path / "part"))):
        if a.endswith(".parquet"):
            assert pq.read_table(a).equals(pq.read_table(b))
            assert pq.ParquetFile(b).metadata.num_row_groups > 5  # it did write in slices
        else:
            assert pathlib.Path(a).read_bytes() == pathlib.Path(b).read_bytes(), a
    assert sliced["documents"] == whole["documents"] == 40


@pytest.mark.parametrize("layout", ["native", "pai", "mindspeed", "xtuner", "bridge", "bridge-npy"])
def test_every_layout_merges_and_reads_back_its_packs(tmp_path, layout):
    """Shards merged by the layout, then each pack read back: the samples' ids and loss
    masks as written (the first token of each sample never carries loss)."""
    fs = fsspec.filesystem("file")
    lay = get_layout(layout)
    S = 12
    shards = [([SAMPLES[0], SAMPLES[1]], [0, 0]), ([SAMPLES[2]], [1])]
    prefixes, metas = [], []
    for k, (samples, packs) in enumerate(shards):
        prefix = str(tmp_path / f"part-{k}")
        metas.append(write_shard(fs, prefix, samples, np.array(packs), layout, S, 0))
        prov = w.provenance_records(np.zeros(len(samples)), np.zeros(len(samples)), np.zeros(len(samples)),
                                    -np.ones(len(samples)), np.array(packs))
        (tmp_path / f"part-{k}.prov").write_bytes(prov.tobytes())
        prefixes.append(prefix)
    merged = lay.merge(fs, prefixes, str(tmp_path / "data"), metas)
    assert merged["packs"] == 2
    from raysft.merge import copy_into

    copy_into(fs, [p + ".prov" for p in prefixes], str(tmp_path / "provenance.bin"))
    stats = {"seq_length": S, "layout": layout, "packs": 2}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    got = [lay.read_pack(fs, str(tmp_path), stats, k) for k in range(2)]
    want = [[SAMPLES[0], SAMPLES[1]], [SAMPLES[2]]]
    for pack, exp in zip(got, want):
        assert len(pack) == len(exp)
        for (ids, loss), s in zip(pack, exp):
            assert ids.tolist() == np.where(s >= 0, s, ~s).tolist()
            assert loss.tolist() == (s >= 0).tolist()


@pytest.mark.parametrize("mean", [4, 200])  # short samples: index arrays; long: one copy per sample
def test_gather_reads_samples_in_order_from_sliced_and_chunked_columns(mean):
    """Gather gives each sample's tokens in the order asked, from several tables whose ids
    columns are sliced (offsets not starting at 0) and in several chunks."""
    import pyarrow as pa

    rng = np.random.default_rng(7)
    samples, parts = [], []
    for _ in range(4):
        lists = [rng.integers(-500, 500, int(rng.integers(0, 2 * mean))).astype(np.int32) for _ in range(60)]
        col = pa.array([x.tolist() for x in lists], pa.list_(pa.int32()))
        chunks = [col.slice(5, 20), col.slice(25, 35)]  # rows 5..59 as two sliced chunks
        parts.append(pa.table({"ids": pa.chunked_array(chunks)}))
        samples.append(lists[5:])
    rows = [np.sort(rng.choice(55, 30, replace=False)) for _ in parts]
    flat = [samples[p][r] for p, rs in enumerate(rows) for r in rs]
    order = rng.permutation(len(flat))
    g = w.Gather.of(parts, rows, order)
    expect = [flat[i] for i in order]
    assert g.length.tolist() == [len(x) for x in expect]
    cuts = [0, 7, 7, 50, len(order)]
    got = np.concatenate([g(a, b) for a, b in zip(cuts[:-1], cuts[1:])])
    assert got.tolist() == np.concatenate(expect).tolist()


def test_write_shard_reads_only_its_rows_of_every_part(tmp_path):
    """A writer given whole assigned blocks (the local engine's) writes the bytes it writes
    from the blocks' cuts for its shard (Ray's), whatever the order of the parts."""
    import pyarrow as pa

    rng = np.random.default_rng(11)
    S, blocks = 32, []
    for b in range(3):
        n = 40
        lists = [signed(rng.integers(0, 900, k), rng.integers(0, 2, k)).tolist() for k in rng.integers(1, 12, n)]
        blocks.append(pa.table({
            "shard": pa.array(rng.integers(-1, 2, n)), "out_pack": pa.array(rng.permutation(n) + 100 * b),
            "pos": pa.array(rng.integers(0, 3, n)), "ids": pa.array(lists, pa.list_(pa.int32())),
            "src": pa.array(np.full(n, b, np.int32)), "piece": pa.array(np.zeros(n, np.int32)),
            "row": pa.array(np.arange(n)), "offset": pa.array(np.arange(n) * 10),
        }))
    fs = fsspec.filesystem("file")
    lay = get_layout("native")
    whole = w.write_shard(fs, str(tmp_path / "whole"), lay, S, 0, blocks[::-1], shard=1)
    cut = [t.filter(pa.compute.equal(t.column("shard"), 1)) for t in blocks]
    parts = w.write_shard(fs, str(tmp_path / "cut"), lay, S, 0, cut, shard=1)
    assert whole["tokens"] == parts["tokens"] > 0
    for a, b in zip(lay.shard_files(str(tmp_path / "whole")) + [str(tmp_path / "whole.prov")],
                    lay.shard_files(str(tmp_path / "cut")) + [str(tmp_path / "cut.prov")]):
        assert pathlib.Path(a).read_bytes() == pathlib.Path(b).read_bytes(), a


@pytest.mark.parametrize("block", [1, 3, 7, 1 << 20])
def test_the_index_merge_reads_shards_in_blocks_with_the_same_bytes(tmp_path, monkeypatch, block):
    """Each shard's index is read INDEX_BLOCK entries at a time (the driver's memory is flat in
    the samples per shard): the bytes equal the in-memory merge's at every block edge."""
    import fsspec

    from raysft import merge
    from raysft.indexed import Index, encode_index

    monkeypatch.setattr(merge, "INDEX_BLOCK", block)
    rng = np.random.default_rng(7)
    prefixes, indexes = [], []
    for k, n in enumerate((13, 0, 1, 29)):
        lengths = rng.integers(1, 50, n).astype(np.int32)
        cuts = np.sort(rng.choice(np.arange(1, n), size=min(4, n - 1), replace=False)) if n > 1 else []
        docs = np.concatenate([[0], cuts, [n]]).astype(np.int64) if n else np.zeros(1, np.int64)
        idx = Index(np.dtype(np.int32), lengths, docs)
        p = tmp_path / f"s{k}"
        pathlib.Path(f"{p}.idx").write_bytes(encode_index(idx))
        pathlib.Path(f"{p}.bin").write_bytes(np.arange(int(lengths.sum()), dtype=np.int32).tobytes())
        prefixes.append(str(p))
        indexes.append(idx)
    m = merge.merge_index_files(fsspec.filesystem("file"), prefixes, str(tmp_path / "out"))
    assert (tmp_path / "out.idx").read_bytes() == encode_index(merge.merge_indexes(indexes))
    assert (m.sequences, m.num_tokens) == (43, sum(int(i.sequence_lengths.sum()) for i in indexes))
