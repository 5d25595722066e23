"""The chat-template parity gate: a deterministic sample of records rendered and tokenized a
second time by transformers' ``apply_chat_template`` with the tokenizer's own chat template,
and compared token for token with what raysft wrote.

Pure (no engine). Which records: those whose raw bytes hash to 0 modulo ``every`` (the driver
picks ``every`` from the input's size so that about ``--parity-rows`` records are checked), so
the sample is the same whatever the worker count or chunking. The reference renders with the
template variables raysft used (``--template-kwargs``) and the same fixed date for
``strftime_now`` (``--template-date``); it is independent of raysft's renderer (transformers'
own Jinja environment) and of its encoder (the ``tokenizers`` library).

Per checked record the outcome is ``MATCH``, ``MISMATCH`` (both rendered, the ids differ) or
``REFUSED`` (the chat template raises on a record raysft wrote: with ``--template auto`` that is
a mismatch too).
"""

from __future__ import annotations

import datetime
import os
import zlib

import numpy as np

UNCHECKED, MATCH, MISMATCH, REFUSED = 0, 1, 2, 3


def picked(raw: bytes, every: int) -> bool:
    return every > 0 and zlib.crc32(raw) % every == 0


def sample_rate(total_bytes: int, row_bytes: float, rows: int = 1000) -> int:
    """``every`` for about ``rows`` checked records in ``total_bytes`` of input whose records
    are ``row_bytes`` long on average."""
    est = total_bytes / max(1.0, row_bytes)
    return max(1, round(est / max(1, rows)))


class TemplateParity:
    """Checks records against ``apply_chat_template`` (transformers loaded on first use)."""

    def __init__(self, info, every: int, template_kwargs: dict | None = None, date: datetime.date | str | None = None):
        self.info = info
        self.every = every
        self.kwargs = dict(template_kwargs or {})
        if isinstance(date, str):
            date = datetime.date.fromisoformat(date)
        self.date = date or datetime.date(2024, 7, 26)
        self._hf = None
        self._seen: dict[int, int] = {}  # crc -> outcome, for datasets that repeat records

    def _tokenizer(self):
        if self._hf is None:
            import tempfile

            from transformers import PreTrainedTokenizerFast

            names = {k: v for k, v in (self.info.special_map or {}).items() if isinstance(v, str)}
            # from a file, not ``tokenizer_object``: transformers deep-copies an object it is
            # handed (a serialize and a parse: ~0.75 s a process with a 128k vocabulary)
            with tempfile.TemporaryDirectory(prefix="raysft-parity-") as d:
                path = os.path.join(d, "tokenizer.json")
                with open(path, "w", encoding="utf-8") as f:
                    f.write(self.info.tokenizer_json)
                self._hf = PreTrainedTokenizerFast(tokenizer_file=path, chat_template=self.info.chat_template,
                                                   **names)
            self._fix_date()
        return self._hf

    def _fix_date(self) -> None:
        """``strftime_now`` is a global of transformers' Jinja environment (a callable passed as
        a template variable reaches the template as text in transformers 5): the compiled
        template's own global is set to the build's fixed date (``--template-date``). The
        compiled template is the one ``apply_chat_template`` uses (transformers caches it by
        source)."""
        from transformers.utils import chat_template_utils

        compile_ = getattr(chat_template_utils, "_compile_jinja_template", None)
        if compile_ is None or not self.info.chat_template:
            return
        date = self.date
        template = compile_(self.info.chat_template)
        template.globals["strftime_now"] = lambda fmt: datetime.datetime(date.year, date.month, date.day).strftime(fmt)

    def check(self, raw: bytes, conv, signed: np.ndarray, messages: list[dict]) -> int:
        """The outcome for one record raysft wrote (``signed``: its signed token ids;
        ``messages``: the conversation as its template is handed it, ``Template.messages``)."""
        key = zlib.crc32(raw) ^ (len(raw) << 32)
        if key in self._seen:
            return self._seen[key]
        try:
            ref = self._tokenizer().apply_chat_template(
                messages, tools=conv.tools, tokenize=True, add_generation_prompt=False, **self.kwargs)
        except Exception:  # noqa: BLE001 - whatever the template raises
            out = REFUSED
        else:
            if hasattr(ref, "keys"):
                ref = ref["input_ids"]
            ids = np.where(signed >= 0, signed, ~signed)
            out = MATCH if list(ref) == ids.tolist() else MISMATCH
        if len(self._seen) < 65536:
            self._seen[key] = out
        return out


def summary(checked: int, mismatched: int, refused: int, examples: list, mode: str, template: str) -> dict:
    """stats.json's ``parity``."""
    return {"mode": mode, "template": template, "reference": "transformers apply_chat_template",
            "checked": checked, "matched": checked - mismatched - refused, "mismatched": mismatched,
            "refused_by_template": refused, "examples": examples[:5]}
