"""Encoders: rendered texts -> token ids and per-token loss flags.

Pure (no engine). Two encoders give the same ids:

* ``hf``: Hugging Face ``tokenizers``, the reference. Loss flags come from its character
  offsets.
* ``fastokens`` (PyPI ``fastokens``): an exact re-implementation of the same ``tokenizer.json``,
  about 15-20x faster per core. It has no offsets: loss flags come from the bytes each token
  stands for (``TokenBytes``), which for a byte-level BPE tokenizer are exactly the UTF-8
  bytes of the text, token after token. That is checked per row: the token byte lengths must
  add up to the UTF-8 length of the text the encoder saw (and, for a tokenizer with an NFC
  normalizer, the text must already be NFC); a row that fails the check is encoded again
  with ``hf``.

Loss rule, both encoders: a token carries loss iff any character it covers lies inside a loss
span (a token that straddles a span boundary carries loss), and the first token of a sample
never does: it has no preceding token in the sample, so a loss on it could only be trained
from the previous sample of a pack.

``--encoder auto`` (default) takes fastokens when it loads the tokenizer and a start-up canary
(edge cases, special tokens, CJK, whitespace runs, the first rows of the input) gives ids
identical to ``hf``; otherwise ``hf``, with one log line saying why. During the build a
deterministic 1% of rows (chosen by a hash of the text) is encoded by both and compared
(ids and loss flags); a mismatch re-encodes the batch with ``hf`` and is counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import unicodedata
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("raysft")

ENCODERS = ("auto", "fastokens", "hf")
PARITY_EVERY = 100  # rows of every 100 (by hash) are encoded by both encoders and compared


class EncoderError(ValueError):
    """An encoder that was asked for and cannot be used."""


# --------------------------------------------------------------------------- token bytes


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte <-> printable character table (each character of a byte-level BPE token
    stands for one byte)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _components(node, key: str) -> list[dict]:
    """The steps of a (possibly Sequence) normalizer / pre-tokenizer / decoder."""
    if not node:
        return []
    inner = node.get(key)
    if isinstance(inner, list):
        return [c for n in inner for c in _components(n, key)]
    return [node]


@dataclass
class TokenBytes:
    """How many bytes of the encoder's input each token id stands for, or why the tokenizer's
    tokens do not map to its input bytes (then only ``hf`` can give loss flags)."""

    lengths: np.ndarray | None  # int32 per id
    nfc: bool = False  # the normalizer is NFC: the text must already be NFC
    unsupported: str = ""
    # Metaspace "first": a text that starts with plain text not starting with a space gets a
    # virtual "▁" (standing for no byte) on its first token; these ids start with "▁"
    lead_space: np.ndarray | None = None

    @classmethod
    def from_json(cls, tokenizer_json: str) -> TokenBytes:
        j = json.loads(tokenizer_json)
        model = j.get("model") or {}
        if model.get("type") != "BPE":
            return cls(None, unsupported=f"a {model.get('type')} model (only BPE tokens map to input bytes)")
        norms = [n.get("type") for n in _components(j.get("normalizer"), "normalizers")]
        if any(t != "NFC" for t in norms):
            return cls(None, unsupported=f"normalizer {norms} changes the text")
        pres = _components(j.get("pre_tokenizer"), "pretokenizers")
        kinds = {p.get("type") for p in pres}
        vocab: dict[str, int] = model.get("vocab") or {}
        size = max([*vocab.values(), *(a["id"] for a in j.get("added_tokens", []))], default=-1) + 1
        lengths = np.zeros(size, dtype=np.int32)
        lead_space = None
        if "ByteLevel" in kinds and not model.get("byte_fallback"):
            if any(p.get("type") == "ByteLevel" and p.get("add_prefix_space") for p in pres):
                return cls(None, unsupported="a ByteLevel pre-tokenizer that adds a prefix space")
            table = _bytes_to_unicode()
            added = {a["id"] for a in j.get("added_tokens", [])}
            for tok, i in vocab.items():
                if i in added:
                    continue  # its added-token content decides (below)
                if not all(ch in table for ch in tok):
                    return cls(None, unsupported=f"vocabulary token {tok!r} is not byte-level")
                lengths[i] = len(tok)
        elif kinds == {"Metaspace"}:
            meta = pres[0]
            scheme = meta.get("prepend_scheme", "always" if meta.get("add_prefix_space", True) else "never")
            if scheme not in ("first", "never"):
                # "always" puts a virtual "▁" after every added token that plain text follows:
                # where it stands depends on the added-token matches; leave it to hf offsets
                return cls(None, unsupported=f"a Metaspace pre-tokenizer that prepends '▁' ({scheme})")
            rep = meta.get("replacement", "▁")
            lead = np.zeros(size, dtype=bool)
            for tok, i in vocab.items():
                if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">") and model.get("byte_fallback"):
                    lengths[i] = 1
                else:
                    lengths[i] = len(tok.replace(rep, " ").encode("utf-8"))
                    lead[i] = tok.startswith(rep)
            lead_space = lead if scheme == "first" else None
        else:
            return cls(None, unsupported=f"pre-tokenizer {sorted(k for k in kinds if k)} (not byte-level BPE)")
        for a in j.get("added_tokens", []):
            if a.get("lstrip") or a.get("rstrip"):
                return cls(None, unsupported=f"added token {a['content']!r} strips the whitespace around it")
            lengths[a["id"]] = len(a["content"].encode("utf-8"))
        if lead_space is not None:
            for a in j.get("added_tokens", []):
                lead_space[a["id"]] = False
        return cls(lengths, nfc="NFC" in norms, lead_space=lead_space)


# --------------------------------------------------------------------------- spans -> flags


def char_to_byte(text: str, positions: list[int]) -> list[int]:
    """Byte offsets in ``text.encode()`` of character offsets ``positions``."""
    if text.isascii():
        return positions
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    width = 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)
    ends = np.concatenate([[0], np.cumsum(width)])
    return ends[np.asarray(positions, dtype=np.int64)].tolist()


def flags_from_ranges(total: int, first: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Boolean per token: inside any ``[first, stop)`` range (ranges may overlap)."""
    depth = np.zeros(total + 1, dtype=np.int32)
    np.add.at(depth, first, 1)
    np.add.at(depth, stop, -1)
    return np.cumsum(depth[:-1], dtype=np.int32) > 0


def sign(ids: np.ndarray, loss: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Signed storage (``~id`` without loss), with no loss on each sample's first token."""
    loss = loss.copy()
    loss[starts[starts < len(loss)]] = False
    return np.where(loss, ids, ~ids).astype(np.int32)


@dataclass
class Batch:
    """Encoded texts: signed tokens back to back, tokens and loss-bearing tokens per text."""

    values: np.ndarray
    lengths: np.ndarray
    loss: np.ndarray
    parity_rows: int = 0
    parity_mismatches: int = 0
    fallback_rows: int = 0


def _empty() -> Batch:
    return Batch(np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64))


def _finish(ids: np.ndarray, lengths: np.ndarray, first: list[int], stop: list[int]) -> Batch:
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
    loss = flags_from_ranges(len(ids), np.asarray(first, np.int64), np.asarray(stop, np.int64))
    values = sign(ids, loss, starts)
    with_loss = np.concatenate([[0], np.cumsum(values >= 0)])
    ends = starts + lengths
    return Batch(values, lengths.astype(np.int64), (with_loss[ends] - with_loss[starts]).astype(np.int64))


class HFEncoder:
    """Hugging Face ``tokenizers``: ids, and loss flags from character offsets."""

    name = "hf"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        import tokenizers

        self.version = tokenizers.__version__

    def ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def encode(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> Batch:
        if not texts:
            return _empty()
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        ids_list = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, ids_list), dtype=np.int64, count=len(ids_list))
        from itertools import chain

        ids = np.fromiter(chain.from_iterable(ids_list), dtype=np.int64, count=int(lengths.sum()))
        first: list[int] = []
        stop: list[int] = []
        base = 0
        for enc, sp, n in zip(encodings, spans, lengths.tolist()):
            if sp:
                offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
                # tokens that cover no character (offsets (k, k)) never carry loss
                covers = offs[:, 1] > offs[:, 0]
                for s, e in sp:
                    hit = np.flatnonzero(covers & (offs[:, 0] < e) & (offs[:, 1] > s))
                    if len(hit):
                        first.append(base + int(hit[0]))
                        stop.append(base + int(hit[-1]) + 1)
            base += n
        return _finish(ids, lengths, first, stop)


class FastEncoder:
    """``fastokens`` for the ids; loss flags from the bytes each token stands for."""

    name = "fastokens"

    def __init__(self, tokenizer_json: str, token_bytes: TokenBytes, reference: HFEncoder, parity: bool = True):
        import fastokens

        self.tokenizer = fastokens.Tokenizer.from_json_str(tokenizer_json)
        try:
            from importlib.metadata import version

            self.version = version("fastokens")
        except Exception:  # noqa: BLE001
            self.version = "unknown"
        self.lengths = token_bytes.lengths
        self.nfc = token_bytes.nfc
        self.lead_space = token_bytes.lead_space
        self.reference = reference
        self.parity = parity

    def ids(self, texts: list[str]) -> list[list[int]]:
        flat, offs = self._flat(texts)
        return [flat[a:b].tolist() for a, b in zip(offs[:-1], offs[1:])]

    def _flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, offs = self.tokenizer.encode_batch_flat(texts, add_special_tokens=False)
        return np.frombuffer(ids, np.uint32).astype(np.int64), np.frombuffer(offs, np.uint64).astype(np.int64)

    def encode(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> Batch:
        if not texts:
            return _empty()
        ids, offs = self._flat(texts)
        lengths = np.diff(offs)
        if len(ids) and int(ids.max()) >= len(self.lengths):
            return self._fallback(texts, spans, len(texts))
        blen = self.lengths[ids].astype(np.int64)
        ends = np.cumsum(blen)  # byte end of each token, batch-wide
        starts_b = ends - blen
        sums = np.add.reduceat(blen, offs[:-1]) if len(ids) else np.zeros(len(texts), np.int64)
        sums[lengths == 0] = 0
        text_bytes = np.fromiter((len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts), np.int64,
                                 len(texts))
        if self.lead_space is not None:  # the virtual "▁" of Metaspace "first" stands for no byte
            firsts = offs[:-1][lengths > 0]
            rows = np.flatnonzero(lengths > 0)
            virtual = (sums[rows] == text_bytes[rows] + 1) & self.lead_space[ids[firsts]]
            virtual &= np.fromiter((not texts[k].startswith(" ") for k in rows.tolist()), bool, len(rows))
            if virtual.any():
                blen[firsts[virtual]] -= 1
                sums[rows[virtual]] -= 1
                ends = np.cumsum(blen)
                starts_b = ends - blen
        bad = sums != text_bytes
        if self.nfc:
            bad |= np.fromiter((not (t.isascii() or unicodedata.is_normalized("NFC", t)) for t in texts), bool,
                               len(texts))
        if bad.any():
            return self._fallback(texts, spans, int(bad.sum()))
        base_b = np.concatenate([[0], np.cumsum(text_bytes)[:-1]])  # byte offset of each text, batch-wide
        gs, ge = [], []
        for k, sp in enumerate(spans):
            if sp:
                pos = char_to_byte(texts[k], [x for s in sp for x in s])
                b = int(base_b[k])
                gs += [b + x for x in pos[0::2]]
                ge += [b + x for x in pos[1::2]]
        gs_a, ge_a = np.asarray(gs, np.int64), np.asarray(ge, np.int64)
        # tokens overlapping [s, e): the first whose end is past s, up to the last starting before e
        first = np.searchsorted(ends, gs_a, side="right")
        stop = np.searchsorted(starts_b, ge_a, side="left")
        keep = stop > first
        batch = _finish(ids, lengths, first[keep].tolist(), stop[keep].tolist())
        if self.parity:
            self._check(texts, spans, batch)
        return batch

    def _fallback(self, texts, spans, rows: int) -> Batch:
        batch = self.reference.encode(texts, spans)
        batch.fallback_rows = rows
        return batch

    def _check(self, texts, spans, batch: Batch) -> None:
        """Encode the parity sample of the batch with hf too; on any difference, the whole
        batch is hf's (and counted)."""
        pick = [k for k, t in enumerate(texts) if parity_pick(t)]
        if not pick:
            return
        ref = self.reference.encode([texts[k] for k in pick], [spans[k] for k in pick])
        starts = np.concatenate([[0], np.cumsum(batch.lengths)])
        got = np.concatenate([batch.values[starts[k] : starts[k + 1]] for k in pick])
        same = len(got) == len(ref.values) and np.array_equal(got, ref.values)
        batch.parity_rows = len(pick)
        if not same:
            whole = self.reference.encode(texts, spans)
            batch.values, batch.lengths, batch.loss = whole.values, whole.lengths, whole.loss
            batch.parity_mismatches = 1
            batch.fallback_rows = len(texts)
            log.warning("fastokens and hf disagree on a row of this batch: the batch was encoded with hf")


def parity_pick(text: str) -> bool:
    """The deterministic parity sample: about one text in ``PARITY_EVERY``, by its hash."""
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "little") % PARITY_EVERY == 0


# --------------------------------------------------------------------------- choosing


CANARY = [
    "", " ", "  ", "\n", "\n\n\n", "\t\t x", "a", "Hello, world!", " leading space", "trailing space ",
    "multiple   spaces   here", "line one\nline two\r\nline three", "tabs\tand\tnewlines\n\n", "1234567890 3.14159 1e-9",
    "don't won't it's we're they've I'm you'll he'd", "CamelCaseWordsAndUPPER lower MiXeD", "snake_case_name = 42",
    "def f(x):\n    return x ** 2  # comment\n", "{\"key\": [1, 2, {\"nested\": null}]}", "<html><body>x</body></html>",
    "你好，世界！这是一个测试。", "日本語のテキストとカタカナ、ひらがな。", "한국어 문장입니다.", "Ünïcödé ñ ç ß ø å æ œ",
    "emoji 😀🎉👍🏽 and flags 🇫🇷", "Ελληνικά и русский текст", "עברית וערבית العربية", "math ∑ ∫ √ ∞ ≤ ≥ ≠ π",
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces", "zero\u200bwidth\u200djoiner", "combining e\u0301 a\u0308",
    "a" * 300, " ".join(["word"] * 200), "ab" * 100 + "\n" * 10 + "  " * 20, "!!!???...,,,;;;:::",
    "https://example.com/path?query=1&b=2#frag", "user@example.com +1-555-0100", "$100.00 €50 ¥1000 £20",
]


def canary_texts(specials: tuple[str, ...], rows: list[str]) -> list[str]:
    out = list(CANARY)
    for s in specials[:64]:
        out += [s, f"x{s}y", f" {s} ", f"{s}\n{s}", f"text before {s}text after"]
    out += rows
    return out


def choose(mode: str, info, sample_texts: list[str] | None = None, parity: bool = True, canary: bool = True):
    """The encoder for ``--encoder mode`` and, when auto fell back to hf, why. ``canary``:
    check fastokens against hf first (the driver does; the actors take its verdict)."""
    from .tokenize import TokenizerInfo

    assert isinstance(info, TokenizerInfo)
    if mode not in ENCODERS:
        raise EncoderError(f"unknown encoder {mode!r}; choose one of {', '.join(ENCODERS)}")
    reference = HFEncoder(info.shared())  # encoding changes nothing in the tokenizer: one per process
    if mode == "hf":
        return reference, ""
    why = ""
    try:
        import fastokens  # noqa: F401
    except ImportError:
        why = "the fastokens package is not installed"
    tb = info.token_bytes() if not why else None
    if tb is not None and tb.lengths is None:
        why = f"its loss flags need offsets: the tokenizer has {tb.unsupported}"
    enc = None
    if not why:
        try:
            enc = FastEncoder(info.tokenizer_json, tb, reference, parity=parity)
        except Exception as e:  # noqa: BLE001 - any loader failure means: not this encoder
            why = f"fastokens cannot load this tokenizer ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
    if enc is not None and canary:
        texts = canary_texts(info.special_strings, sample_texts or [])
        if enc.ids(texts) != reference.ids(texts):
            bad = next(t for t, a, b in zip(texts, enc.ids(texts), reference.ids(texts)) if a != b)
            why = f"fastokens gave other ids than hf on the start-up canary (e.g. {bad[:40]!r})"
            enc = None
    if enc is None:
        if mode == "fastokens":
            raise EncoderError(f"--encoder fastokens: {why}")
        return reference, why
    return enc, ""


@dataclass
class EncoderStats:
    """What stats.json records of the encoder."""

    name: str
    version: str
    rows_checked: int = 0
    mismatches: int = 0
    fallbacks: int = 0
    why: str = ""
    extra: dict = field(default_factory=dict)

    def add(self, b: Batch) -> None:
        self.rows_checked += b.parity_rows
        self.mismatches += b.parity_mismatches
        self.fallbacks += b.fallback_rows
