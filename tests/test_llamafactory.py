"""``--layout llamafactory`` read by LLaMA-Factory's own data code: ``get_dataset`` with
``tokenized_path`` (what a user's YAML runs), then its collators, for packed SFT (neat packing),
unpacked SFT and preference pairs; tokens and labels exact against raysft's reference samples."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import trainers
from helpers import build

from raysft.normalize import normalize
from raysft.tokenize import SampleBuilder, load_tokenizer_info

SHARED = Path(__file__).resolve().parents[2] / "shared"
QWEN3 = SHARED / "tokenizers" / "qwen3"
IGNORE = -100


@pytest.fixture(scope="module")
def lf():
    from transformers import AutoTokenizer

    data, hparams = trainers.llamafactory_data()
    tok = AutoTokenizer.from_pretrained(str(QWEN3))
    return data, hparams, tok


def load(lf, out: Path, stage: str, S: int):
    """The train dataset LLaMA-Factory's ``get_dataset`` loads from ``tokenized_path: out``."""
    import types

    data, hparams, tok = lf
    data_args = hparams.DataArguments(tokenized_path=str(out), template="qwen3", neat_packing=True, cutoff_len=S)
    model_args = hparams.ModelArguments(model_name_or_path=str(QWEN3))
    template = data.get_template_and_fix_tokenizer(tok, data_args)
    # the tokenized_path branch returns before it reads the training arguments (transformers'
    # own Seq2SeqTrainingArguments would need accelerate in the main environment)
    training_args = types.SimpleNamespace(output_dir=str(out / "_run"))
    module = data.get_dataset(template, model_args, data_args, training_args, stage, tok)
    return module["train_dataset"], template


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lfl")
    sft = json.loads((SHARED / "data" / "alpaca_en_demo.json").read_text())[:80]
    sft += json.loads((SHARED / "data" / "glaive_toolcall_en_demo.json").read_text())[:40]
    (d / "sft.json").write_text(json.dumps(sft, ensure_ascii=False))
    (d / "dpo.json").write_text(json.dumps(json.loads((SHARED / "data" / "dpo_zh_demo.json").read_text())[:40],
                                           ensure_ascii=False))
    return d


def reference(path: Path) -> list[np.ndarray]:
    b = SampleBuilder(load_tokenizer_info(str(QWEN3)), "auto")
    recs = json.loads(path.read_text())
    ids, _, _ = b([json.dumps(r, ensure_ascii=False).encode() for r in recs])
    return [x for x in ids if x is not None]


def as_key(ids: np.ndarray, labels: np.ndarray) -> bytes:
    """A sample as raysft stores it (``~id`` without loss) from LLaMA-Factory's ids and labels."""
    ids, labels = np.asarray(ids, np.int64), np.asarray(labels, np.int64)
    assert np.all((labels == IGNORE) | (labels == ids))
    return np.where(labels != IGNORE, ids, ~ids).astype(np.int32).tobytes()


def test_packed_sft_under_get_dataset_and_the_neat_packing_collator(lf, records, tmp_path):
    import torch

    data, _, tok = lf
    S = 2048
    st = build(tmp_path / "o", [records / "sft.json"], str(QWEN3), seq_length=S, layout="llamafactory",
               engine="local")
    ds, template = load(lf, tmp_path / "o", "sft", S)
    assert len(ds) == st["packs"]
    collator = data.SFTDataCollatorWith4DAttentionMask(template=template, tokenizer=tok, model=None,
                                                       label_pad_token_id=IGNORE, block_diag_attn=True,
                                                       attn_implementation="eager", compute_dtype=torch.float32)
    got = Counter()
    for lo in range(0, len(ds), 4):
        rows = [ds[i] for i in range(lo, min(lo + 4, len(ds)))]
        batch = collator(rows)
        assert batch["input_ids"].shape == (len(rows), S + 1)
        for r, row in enumerate(rows):
            seg = np.asarray(row["attention_mask"])
            mask = batch["attention_mask"][r, 0].numpy() == 0  # 0: attends, dtype min: masked
            for k in range(1, int(seg.max()) + 1):
                at = np.flatnonzero(seg == k)
                a, b = at[0], at[-1] + 1
                assert np.array_equal(at, np.arange(a, b))
                block = mask[a:b, a:b]
                assert np.array_equal(block, np.tril(np.ones_like(block)))  # causal inside the sample
                assert not mask[a:b, :a].any()  # nothing before it (another sample) is seen
                assert np.array_equal(batch["position_ids"][r, a:b].numpy(), np.arange(b - a))
                got[as_key(batch["input_ids"][r, a:b].numpy(), batch["labels"][r, a:b].numpy())] += 1
            pad = seg == 0
            assert pad.any() and (batch["labels"][r].numpy()[pad] == IGNORE).all()
    want = Counter(x.astype(np.int32).tobytes() for x in reference(records / "sft.json") if len(x) <= S)
    assert got == want and sum(got.values()) == st["samples_written"]


def test_unpacked_sft_rows_are_samples(lf, records, tmp_path):
    data, _, tok = lf
    build(tmp_path / "o", [records / "sft.json"], str(QWEN3), seq_length=4096, layout="llamafactory",
          engine="local", pack=False)
    ds, _ = load(lf, tmp_path / "o", "sft", 4096)
    got = Counter(as_key(row["input_ids"], row["labels"]) for row in ds)
    assert all(set(row["attention_mask"]) == {1} for row in ds)
    assert got == Counter(x.astype(np.int32).tobytes() for x in reference(records / "sft.json"))


def test_pairs_under_get_dataset_and_the_pairwise_collator(lf, records, tmp_path):
    data, _, tok = lf
    st = build(tmp_path / "o", [records / "dpo.json"], str(QWEN3), seq_length=2048, layout="llamafactory",
               engine="local")
    ds, template = load(lf, tmp_path / "o", "rm", 2048)
    assert len(ds) == st["pairs"]["written"] == st["packs"]
    collator = data.PairwiseDataCollatorWithPadding(template=template, tokenizer=tok, model=None,
                                                    label_pad_token_id=IGNORE)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(QWEN3))
    want = {}
    for r in json.loads((records / "dpo.json").read_text()):
        p = normalize(r)
        sides = []
        for conv in (p.chosen, p.rejected):
            msgs = [{"role": m.role, "content": m.content} for m in conv.messages]
            full = hf.apply_chat_template(msgs, tokenize=True)
            prompt = hf.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True)
            full, prompt = (x["input_ids"] if hasattr(x, "keys") else x for x in (full, prompt))
            sides.append((list(full), len(prompt)))
        want[tuple(sides[0][0])] = sides
    rows = [ds[i] for i in range(len(ds))]
    batch = collator(rows)  # chosen rows first, then the rejected rows, right-padded
    n = len(rows)
    for i in range(n):
        c_len, r_len = len(rows[i]["chosen_input_ids"]), len(rows[i]["rejected_input_ids"])
        c_ids = batch["input_ids"][i, :c_len].tolist()
        (full_c, start_c), (full_r, start_r) = want[tuple(c_ids)]
        assert batch["input_ids"][n + i, :r_len].tolist() == full_r and c_len <= 2048 and r_len <= 2048
        for row, length, start in ((i, c_len, start_c), (n + i, r_len, start_r)):
            labels = batch["labels"][row, :length].numpy()
            assert (labels[:start] == IGNORE).all() and labels[start] != IGNORE  # the response from its first token
            assert (batch["labels"][row, length:] == IGNORE).all() and (batch["attention_mask"][row, length:] == 0).all()
