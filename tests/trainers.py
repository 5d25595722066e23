"""The trainers' own data-loading code, for the layout tests.

Where the trainer is on PyPI its code runs as published: megatron-core's ``GPTDataset``
(installed), LLaMA-Factory's ``get_dataset`` and collators (its version check off:
``DISABLE_VERSION_CHECK``, as its error message offers, because this environment's
``transformers`` is newer than it lists; ``torchaudio``, which only its audio plugin uses, is a
stub), Megatron-Bridge's ``GPTSFTPackedDataset`` and XTuner's ``intern_repo`` module
(installed with ``--no-deps`` by ``scripts/setup.sh`` into ``.venv/trainers``, with the
``datasets`` 3.x release XTuner's code was written for: their package ``__init__`` files
import GPU-only libraries, so only the data modules are loaded, with the package ``__init__``
skipped and XTuner's unrelated imports stubbed: its logger, registry and HF map functions,
which the loading code does not call).

Pai-Megatron-Patch, MindSpeed-LLM and Megatron-LM's training side (``pretrain_gpt.py``, newer
than the megatron-core on PyPI) are not on PyPI: their batch functions are rewritten
here from their sources (Megatron-LM main d98e8a6 ``--sft``: ``default_collate`` of
``megatron/training/datasets/sft_dataset.py`` items, then ``flatten_batch_for_packed_sequences``
and ``_merge_cu_seqlens_across_micro_batch`` of ``megatron/core/utils.py``; (Pai-Megatron-Patch ``megatron_patch/data/utils.py``
``get_batch_on_this_tp_rank_idxmap_sft`` and ``get_ltor_position_ids_packed_seq``, and the
``cu_seqlens`` of ``megatron_patch/template/helper.py``; MindSpeed-LLM
``mindspeed_llm/tasks/preprocess/decoder_packed_mtf_dataset.py`` with ``--neat-pack``,
``mindspeed_llm/training/utils.py`` ``_compute_actual_seq_len`` and the label shift of
``--is-instruction-dataset`` in ``mindspeed_llm/core/models/gpt/gpt_model.py``), step for step.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = Path(os.environ.get("RAYSFT_TRAINERS", ROOT / ".venv" / "trainers"))


def _stub_package(name: str, path: Path) -> None:
    if name not in sys.modules:
        m = types.ModuleType(name)
        m.__path__ = [str(path)]
        sys.modules[name] = m


def _site() -> Path:
    if not all((TRAINERS / p).exists() for p in ("megatron/bridge", "xtuner", "llamafactory")):
        import pytest

        pytest.fail(f"trainer packages not found in {TRAINERS}: run scripts/setup.sh")
    if str(TRAINERS) not in sys.path:
        sys.path.insert(0, str(TRAINERS))  # their pinned ``datasets`` (3.x) before any other
    return TRAINERS


def bridge_packed_dataset_class():
    """Megatron-Bridge's ``GPTSFTPackedDataset`` (PyPI megatron-bridge)."""
    site = _site()
    import megatron  # noqa: F401 - megatron-core's namespace package

    megatron.__path__.append(str(site / "megatron"))
    _stub_package("megatron.bridge", site / "megatron" / "bridge")
    _stub_package("megatron.bridge.training", site / "megatron" / "bridge" / "training")
    _stub_package("megatron.bridge.data", site / "megatron" / "bridge" / "data")
    return importlib.import_module("megatron.bridge.data.datasets.sft").GPTSFTPackedDataset


def xtuner_intern_repo():
    """XTuner's ``xtuner.dataset.intern_repo`` module (PyPI xtuner)."""
    site = _site()
    _stub_package("xtuner", site / "xtuner")
    _stub_package("xtuner.dataset", site / "xtuner" / "dataset")
    for name, attrs in {"mmengine": {"print_log": lambda *a, **k: None},
                        "xtuner.dataset.map_fns": {"openai_map_fn": None},
                        "xtuner.registry": {"BUILDER": None},
                        "xtuner.dataset.huggingface": {"process": None}}.items():
        if name not in sys.modules:
            m = types.ModuleType(name)
            m.__dict__.update(attrs)
            sys.modules[name] = m
    return importlib.import_module("xtuner.dataset.intern_repo")


def llamafactory_data():
    """LLaMA-Factory's ``llamafactory.data`` and ``llamafactory.hparams`` (PyPI llamafactory)."""
    import importlib.machinery

    _site()
    os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
    if "torchaudio" not in sys.modules:
        m = types.ModuleType("torchaudio")
        m.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        sys.modules["torchaudio"] = m
    return importlib.import_module("llamafactory.data"), importlib.import_module("llamafactory.hparams")


class MegatronTokenizerStub:
    """What megatron-core's GPT dataset asks of a tokenizer (Pai's wrappers define no ``pad``)."""

    def __init__(self, eod: int, vocab_size: int):
        self.eod, self.eos, self.vocab_size = eod, eod, vocab_size

    @property
    def pad(self):
        raise NotImplementedError

    @property
    def unique_identifiers(self):
        return {"class": "stub"}


def megatron_gpt_dataset(prefix: str, sequence_length: int, num_samples: int, eod: int, vocab_size: int, cache: str):
    """megatron-core's GPTDataset over an MMIDIDX prefix, built as Pai builds it for SFT
    (``--dataset MMAP``, the sequence length doubled for [inputs | labels])."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=sequence_length, blend=([prefix], None), split="100,0,0",
        tokenizer=MegatronTokenizerStub(eod, vocab_size), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, path_to_cache=cache, mmap_bin_files=True)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    return train


# --------------------------------------------------------------------------- Pai-Megatron-Patch


def pai_position_ids(data):
    """``get_ltor_position_ids_packed_seq``: position ids restart after each negative token."""
    import torch

    micro_batch_size, seq_length = data.size()
    position_ids = torch.arange(seq_length, dtype=torch.long, device=data.device)
    position_ids = position_ids.unsqueeze(0).expand_as(data).clone()
    for b in range(micro_batch_size):
        eod_index = position_ids[b, data[b] < 0].clone()
        prev_index = 0
        for j in range(eod_index.size()[0]):
            i = eod_index[j]
            position_ids[b, (i + 1):] -= (i + 1 - prev_index)
            prev_index = i + 1
    return position_ids


def pai_batch(tokens_2s, seq_length: int) -> dict:
    """``get_batch_on_this_tp_rank_idxmap_sft`` with ``--reset-position-ids`` (sequence packing)
    and ``per_seq_average=True``, then the ``cu_seqlens`` its ``get_batch`` builds (TP rank 0,
    micro batch 1). Raises where Pai raises."""
    import torch

    data = {"tokens": tokens_2s}
    assert data["tokens"].shape[-1] == 2 * seq_length
    tokens = data["tokens"].long()[..., :seq_length].clone()
    labels = data["tokens"].long()[..., seq_length:]
    loss_mask = (labels != -100).float()
    position_ids = pai_position_ids(tokens)
    has_pad = tokens[:, -1] >= 0
    tokens[tokens < 0] = -tokens[tokens < 0] - 1
    num_seqs = torch.ones(position_ids.shape[0], dtype=torch.int64)
    for b in range(position_ids.shape[0]):
        p = position_ids[b]
        start_indices = (p == 0).nonzero(as_tuple=True)[0]
        seqlens = start_indices[1:] - start_indices[:-1]
        seqlens = seqlens.cpu().numpy().tolist() + [p.shape[0] - start_indices[-1].item()]
        subseqs = torch.split(loss_mask[b], seqlens)
        num_seqs[b] = len(seqlens) - int(has_pad[b])
        for subseq_idx, (start_idx, seqlen, subseq) in enumerate(zip(start_indices, seqlens, subseqs)):
            if subseq_idx == num_seqs[b]:
                continue
            assert subseq.sum() > 0
            loss_mask[b, start_idx: start_idx + seqlen] /= subseq.sum()
    # get_batch (megatron_patch/template/helper.py), reset_position_ids: cu_seqlens
    pid = position_ids[0]
    start_indices = (pid == 0).nonzero(as_tuple=True)[0]
    seqlens = start_indices[1:] - start_indices[:-1]
    cu_seqlens = torch.zeros(start_indices.shape[0] + 1, dtype=torch.int)
    cu_seqlens[1:-1] = torch.cumsum(seqlens, dim=0)
    cu_seqlens[-1] = pid.shape[0]
    max_seqlen = torch.max(seqlens.max(), pid.max() + 1)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids,
            "num_seqs": num_seqs, "cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}


# --------------------------------------------------------------------------- Megatron-LM --sft


def megatron_sft_batch(items: list[dict]) -> dict:
    """Megatron-LM's ``--sft`` batch path on CPU (TP and CP 1): the micro-batch collated by
    torch's ``default_collate`` as its data loader does, then flattened into one packed
    sequence: each row's ``cu_seqlens`` kept up to its first entry equal to the row length,
    offset by ``row * row_length`` and joined without the later rows' leading zero; token
    tensors reshaped to ``(1, rows * row_length)``; ``max_seqlen`` the rows' largest."""
    import torch
    from torch.utils.data import default_collate

    batch = default_collate(items)
    rows, length = batch["tokens"].shape
    parts = []
    for r in range(rows):
        row = batch["cu_seqlens"][r]
        hits = (row == length).nonzero(as_tuple=True)[0]
        row = row[: hits[0].item() + 1] if hits.numel() else row
        parts.append(row + r * length if r == 0 else row[1:] + r * length)
    out = {k: batch[k].reshape(1, -1) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    out["cu_seqlens"] = torch.cat(parts).to(torch.int32)
    out["max_seqlen"] = batch["max_seqlen"].max()
    return out


# --------------------------------------------------------------------------- MindSpeed-LLM


def mindspeed_position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """``DecoderPackedMTFDataset._get_neat_pack_position_ids``."""
    counter = Counter(attention_mask.tolist())
    position_ids = []
    zeros_nums = counter.pop(0) if 0 in counter.keys() else 0
    for key in sorted(counter.keys()):
        position_ids += list(range(counter[key]))
    position_ids += [0] * zeros_nums
    return np.array(position_ids, dtype=np.int64)


def mindspeed_actual_seq_len(position_ids: np.ndarray) -> list[int]:
    """``_compute_actual_seq_len``: where the position ids restart, and the end."""
    zero_pos = np.flatnonzero(position_ids == 0)[1:].tolist()
    return zero_pos + [len(position_ids)]


def mindspeed_item(input_ids: np.ndarray, labels: np.ndarray, attention_mask: np.ndarray, seq_length: int,
                   eos: int) -> dict:
    """``DecoderPackedMTFDataset.__getitem__`` with ``--reset-attention-mask
    --reset-position-ids --neat-pack`` (no MTP), then the label shift of
    ``--is-instruction-dataset``: the model scores ``logits[:-1]`` against ``labels[1:]``."""
    data = input_ids
    position_ids = np.arange(seq_length, dtype=np.int64)
    eod_index = position_ids[: len(data)][data == eos]
    prev_index = 0
    for i in eod_index.tolist():  # overwritten by neat pack below, kept as MindSpeed runs it
        position_ids[i + 1:] -= i + 1 - prev_index
        prev_index = i + 1
    position_ids = mindspeed_position_ids(attention_mask)
    actual_seq_len = mindspeed_actual_seq_len(position_ids)
    shifted = np.concatenate([labels[1:], [-100]])  # target of position t (nothing after the last)
    return {"input_ids": input_ids.astype(np.int64), "labels": labels.astype(np.int64), "position_ids": position_ids,
            "actual_seq_len": actual_seq_len, "targets": shifted, "loss_mask": (labels != -100)[1:]}


def mindspeed_eos_segments(input_ids: np.ndarray, eos: int) -> int:
    """How many segments MindSpeed cuts a pack into without ``--neat-pack`` (at every EOS)."""
    return len(np.flatnonzero(input_ids == eos)) + 1
