"""Sources with amounts, the tokenized cache, epochs and the validation split (raysft.sources,
raysft.cache): the rules without a cluster, then builds that check them on real data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import build, file_bytes, reader

from raysft.provenance import PROVENANCE_DTYPE
from raysft.sources import (
    Selection,
    Source,
    SourceError,
    Validation,
    copies,
    count_threshold,
    cut_for,
    mix_factors,
    parse_sources,
    valid_key,
)

DEFAULTS = {"format": "auto", "map_keys": {}, "loss": "assistant"}


def test_parse_sources_and_their_one_line_errors():
    srcs = parse_sources([{"input": "a.jsonl", "share": 0.25}, {"name": "b", "input": ["b/*.json"], "share": 0.75,
                                                                  "map-keys": {"prompt": "question"}, "loss": "last"}],
                         DEFAULTS)
    assert [s.name for s in srcs] == ["source1", "b"]
    assert srcs[1].map_keys == {"prompt": "question"} and srcs[1].loss == "last" and srcs[1].inputs == ["b/*.json"]
    for bad, msg in [
        ([{"share": 0.5}], "'input' must name"),
        ([{"input": "a", "weight": 2}], "unknown key"),
        ([{"input": "a", "share": 0.5, "budget": 10}], "one of share, budget or repeat"),
        ([{"input": "a", "share": 0.5}, {"input": "b", "share": 0.2}], "add up to 0.7"),
        ([{"input": "a", "share": 0.6}, {"input": "b", "share": 0.4}, {"input": "c"}], "leaving nothing"),
        ([{"input": "a", "name": "x"}, {"input": "b", "name": "x"}], "names must differ"),
        ([{"input": "a", "repeat": -1}], ">= 0"),
        ([{"input": "a", "loss": "some"}], "loss must be one of"),
    ]:
        with pytest.raises(SourceError, match=msg):
            parse_sources(bad, DEFAULTS)


def test_mix_factors():
    a, b, c = Source("a", ["a"]), Source("b", ["b"]), Source("c", ["c"])
    # shares everywhere: the output keeps the input's size
    assert mix_factors([Source("a", ["a"], share=0.5), Source("b", ["b"], share=0.5)], [100, 300]) == [2.0, 2 / 3]
    # a share beside fixed sources: it takes its fraction of the whole
    assert mix_factors([a, Source("b", ["b"], share=0.5)], [100, 25]) == [1.0, 4.0]
    # budgets and repeats are absolute
    assert mix_factors([Source("a", ["a"], budget=50), Source("b", ["b"], repeat=2.5), c], [100, 10, 7]) == [0.5, 2.5, 1]
    with pytest.raises(SourceError, match="no samples"):
        mix_factors([a, Source("b", ["b"], budget=5)], [1, 0])
    assert b.to_dict()["name"] == "b"


def test_copies_are_whole_then_a_seeded_sample():
    rng = np.random.default_rng(0)
    h = rng.integers(-(2**63), 2**63 - 1, 200_000, dtype=np.int64)
    pos = np.arange(len(h))
    m = copies(h, pos, np.full(len(h), 2.3), seed=7)
    assert m.min() == 2 and m.max() == 3 and abs(m.mean() - 2.3) < 0.01
    assert np.array_equal(m, copies(h, pos, np.full(len(h), 2.3), seed=7))  # deterministic
    assert not np.array_equal(m, copies(h, pos, np.full(len(h), 2.3), seed=8))  # seeded
    under = copies(h, pos, np.full(len(h), 0.25), seed=7)
    assert set(np.unique(under).tolist()) == {0, 1} and abs(under.mean() - 0.25) < 0.01
    # the pieces of one record (same content hash and position) get the same copies
    assert copies(h[:1].repeat(5), pos[:1].repeat(5), np.full(5, 0.5), 3).tolist() in ([0] * 5, [1] * 5)


def test_validation_spec_and_keys():
    assert Validation.parse("0.01") == Validation(fraction=0.01)
    assert Validation.parse(500) == Validation(count=500)
    assert Validation.parse(None) is None
    for bad in ("abc", "-1", "2.5"):
        with pytest.raises(SourceError):
            Validation.parse(bad)
    keys = valid_key(np.arange(1000, dtype=np.int64), 1)
    thr = count_threshold([keys[:400], keys[300:]], 10)
    assert (keys < thr).sum() == 10
    assert Selection((1,), (0.0,), 1).trivial and not Selection((1,), (0.0,), 1, 0.1).trivial


def test_validation_count_from_a_single_block_holds_out_exactly_that_many():
    """Each block sends its count + 1 smallest keys: a block with more records than the count
    (one JSON array file, one block) is not taken for one that holds exactly the count (which held
    out every record: "the mixture leaves no training sample")."""
    import pyarrow as pa

    from raysft.engine.tasks import smallest_keys

    hashes = np.arange(60, dtype=np.int64) * 7919
    table = pa.table({"reason": [""] * 60, "piece": np.zeros(60, np.int32), "rec_hash": hashes})
    thr = count_threshold([smallest_keys(table, 5, 3)], 5)
    assert (valid_key(hashes, 3) < thr).sum() == 5
    assert count_threshold([smallest_keys(table.slice(0, 5), 5, 3)], 5) > 1  # exactly 5 records: all of them
    assert not Selection((2,), (0.0,), 1).trivial and not Selection((0,), (0.5,), 1).trivial


def test_a_sample_meets_its_amount_to_a_bucket():
    amounts = np.full(4096, 10.0)
    assert cut_for(amounts, 0) == 0.0 and cut_for(amounts, 1e9) == 1.0
    assert cut_for(amounts, 4096 * 10 / 4) == pytest.approx(0.25)
    assert cut_for(amounts, 15) == pytest.approx(1.5 / 4096)


# --------------------------------------------------------------------------- builds


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory, shared_data):
    d = tmp_path_factory.mktemp("mixed")
    (d / "math").mkdir()
    lines = (shared_data / "gsm8k_train.jsonl").read_text().splitlines()[:1500]
    (d / "math" / "gsm8k.jsonl").write_text("\n".join(lines) + "\n")
    return {"alpaca": str(shared_data / "alpaca_en_demo.json"), "math": str(d / "math" / "gsm8k.jsonl")}


def _sources(inputs, alpaca: dict, math: dict) -> list[dict]:
    return [{"name": "alpaca", "input": inputs["alpaca"], **alpaca},
            {"name": "math", "input": inputs["math"], "map_keys": {"prompt": "question", "response": "answer"},
             **math}]


def _prov(path: Path) -> np.ndarray:
    return np.frombuffer((path / "provenance.bin").read_bytes(), dtype=PROVENANCE_DTYPE)


@pytest.mark.slow  # four builds with a cache and epochs (~60 s): CI's slow run
def test_mixture_epochs_validation_and_the_cache(tmp_path, ray_session, mixed_inputs, llama3_dir):
    cache = tmp_path / "cache"
    flags = dict(template="llama3", seq_length=2048, mix_unit="samples", epochs=2, validation="0.1",
                 sources=_sources(mixed_inputs, {"share": 0.6}, {"share": 0.4}))
    out = tmp_path / "mixed"
    st = build(out, [], llama3_dir, cache=str(cache), **flags)
    by = {s["name"]: s for s in st["sources"]}
    # asked 60/40 in samples, from 999 and 1500 records
    assert abs(by["alpaca"]["share"] - 0.6) < 0.02 and abs(by["math"]["share"] - 0.4) < 0.02
    assert by["alpaca"]["factor"] > 1 > by["math"]["factor"]
    assert st["rows_read"] == 999 + 1500
    assert st["rows_read"] == st["rows_written"] + sum(st["rejected"].values()) + sum(st["dropped"].values())
    assert st["dropped"].get("not_sampled", 0) > 0  # math was under-sampled
    assert st["epochs"] == 2 and st["cache"]["rows_tokenized"] == 2499

    # the validation set: about 10% of the records, its own dataset, no record on both sides
    v = st["validation"]
    assert 180 < v["rows"] < 320 and (out / "valid" / "data.bin").exists()
    train, valid = _prov(out), _prov(out / "valid")
    key = lambda p: set(zip(p["src"].tolist(), p["row"].tolist(), p["offset"].tolist()))  # noqa: E731
    assert key(train) and key(valid) and not key(train) & key(valid)
    assert len(valid) == v["samples"]

    # epochs: two packings of the same samples, in another order
    r = reader(out)
    docs = r.index.document_indices
    P = st["packs_per_epoch"]
    # stats.json counts what was written, both epochs (a --train-iters sized from it covers all)
    assert st["packs"] == len(docs) - 1 == 2 * P and sum(st["pack_fill"].values()) == 2 * P
    assert st["lower_bound_packs"] == 2 * -(-st["tokens_per_epoch"] // 2048) and st["tokens"] == 2 * st["tokens_per_epoch"]
    e1 = [r[i].tobytes() for i in range(int(docs[0]), int(docs[P]))]
    e2 = [r[i].tobytes() for i in range(int(docs[P]), int(docs[2 * P]))]
    assert Counter(e1) == Counter(e2) and e1 != e2
    assert len(e1) == st["samples_written"] // 2 == sum(s["written"]["samples"] for s in st["sources"])
    assert (train["pack"][: len(e1)] < P).all() and (train["pack"][len(e1):] >= P).all()

    # a rebuild at another seq-length reads every chunk from the cache, and writes what a build
    # without a cache writes
    again = build(tmp_path / "again", [], llama3_dir, cache=str(cache), **(flags | {"seq_length": 4096}))
    assert again["cache"] == {"dir": str(cache), "rows_from_cache": 2499, "rows_tokenized": 0}
    fresh = build(tmp_path / "fresh", [], llama3_dir, **(flags | {"seq_length": 4096}))
    assert file_bytes(tmp_path / "again") == file_bytes(tmp_path / "fresh")
    assert (tmp_path / "again" / "valid" / "data.bin").read_bytes() == (tmp_path / "fresh" / "valid" / "data.bin"
                                                                        ).read_bytes()
    assert again["sources"] == fresh["sources"]

    # an entry that fails its checksum is not trusted: that chunk is tokenized again
    entry = sorted(cache.rglob("*.arrow"))[0]
    entry.write_bytes(entry.read_bytes()[:-10] + b"0123456789")
    third = build(tmp_path / "third", [], llama3_dir, cache=str(cache), **(flags | {"seq_length": 4096}))
    assert 0 < third["cache"]["rows_tokenized"] < 2499
    assert file_bytes(tmp_path / "third") == file_bytes(tmp_path / "fresh")

    # a shorter seq-length than the entries were made at (they keep no text, which dropping
    # overlong records does not need) also reads everything from the cache
    short = build(tmp_path / "short", [], llama3_dir, cache=str(cache), **(flags | {"seq_length": 1024}))
    assert short["cache"]["rows_tokenized"] == 0
    build(tmp_path / "short-fresh", [], llama3_dir, **(flags | {"seq_length": 1024}))
    assert file_bytes(tmp_path / "short") == file_bytes(tmp_path / "short-fresh")


def test_budget_repeat_and_a_validation_count(tmp_path, ray_session, mixed_inputs, llama3_dir):
    flags = dict(template="llama3", seq_length=2048, validation="100",
                 sources=_sources(mixed_inputs, {"repeat": 2}, {"budget": 20000}))  # loss tokens
    st = build(tmp_path / "out", [], llama3_dir, **flags)
    by = {s["name"]: s for s in st["sources"]}
    assert st["validation"]["rows"] == 100
    alpaca_loss = by["alpaca"]["loss_tokens"]
    # repeat 2: every training record twice (the 100 held-out records are not copied)
    assert by["alpaca"]["written"]["samples"] == 2 * (by["alpaca"]["samples"] - _held(tmp_path / "out", 0))
    assert 2 * alpaca_loss * 0.85 < by["alpaca"]["written"]["loss_tokens"] <= 2 * alpaca_loss
    assert abs(by["math"]["written"]["loss_tokens"] - 20000) < 0.01 * 20000  # to about one record


def _held(out: Path, src: int) -> int:
    p = _prov(out / "valid")
    return int((p["src"] == src).sum())


def test_sources_on_the_command_line_and_in_a_job_file(tmp_path):
    from raysft.build import config_from_args

    cfg = config_from_args(["--source", '{"input": "a.jsonl", "share": 0.5}', "--source",
                            '{"input": "b.jsonl", "share": 0.5}', "--tokenizer", "t", "--output", "o",
                            "--epochs", "3", "--validation", "0.02", "--cache", "c", "--mix-unit", "tokens"])
    assert [s["input"] for s in cfg.sources] == ["a.jsonl", "b.jsonl"] and cfg.epochs == 3
    assert cfg.validation == "0.02" and cfg.cache == "c" and cfg.mix_unit == "tokens"
    job = tmp_path / "job.yaml"
    job.write_text("sources:\n  - {input: a.jsonl, share: 0.3}\n  - {input: b.jsonl, share: 0.7}\n"
                   "tokenizer: t\noutput: o\nvalidation: 500\n")
    cfg = config_from_args(["--config", str(job)])
    assert len(cfg.sources) == 2 and cfg.validation == "500"
    with pytest.raises(SystemExit):
        config_from_args(["--source", '{"input": "a"}', "--tokenizer", "t", "--output", "o", "--epochs", "0"])
    assert json.loads(json.dumps(cfg.to_dict()))["sources"][1]["share"] == 0.7


@pytest.mark.parametrize("layout", ["native", "bridge"])
def test_the_validation_split_is_a_dataset_of_its_own(tmp_path, shared_data, llama3_dir, layout):
    """valid/ has its own stats.json, inputs.json and layout metadata, by the training split's
    rules: the reader and raysft.inspect open it like the main dataset."""
    import subprocess
    import sys

    out = tmp_path / layout
    st = build(out, [str(shared_data / "alpaca_en_demo.json")], llama3_dir, template="llama3", seq_length=1024,
               validation="0.2", engine="local", layout=layout)
    v = out / "valid"
    vs = json.loads((v / "stats.json").read_text())
    assert vs["split"] == "valid" and vs["layout"] == layout and vs["pad_id"] == st["pad_id"]
    assert vs["samples_written"] == st["validation"]["samples"] and vs["packs"] == st["validation"]["packs"]
    assert vs["tokens"] == st["validation"]["tokens"] and sum(vs["pack_fill"].values()) == vs["packs"]
    assert json.loads((v / "inputs.json").read_text()) == json.loads((out / "inputs.json").read_text())
    r = subprocess.run([sys.executable, "-m", "raysft.inspect", str(v), "--pack", "0"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    if layout == "native":
        from raysft.reader import PackedReader

        packs = PackedReader(str(v))
        assert len(packs) == vs["packs"] and sum(len(p["cu_seqlens"]) - 1 for p in packs) == vs["samples_written"]
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(v / "data.idx.parquet").to_pylist()
        meta = json.loads((v / "data.metadata.json").read_text())[0]
        assert meta == vs["bridge_metadata"] and meta != st["bridge_metadata"]
        assert meta["min_packed_seqlen"] == min(len(r["input_ids"]) - len(r["seq_start_id"]) for r in rows)
        assert meta["max_samples_per_bin"] == max(len(r["seq_start_id"]) for r in rows)
