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
deterministic 0.25% of rows (chosen by a hash of the text) is encoded by both and compared
(ids and loss flags); a mismatch re-encodes the batch with ``hf`` and is counted.
"""

from __future__ import annotations

import json
import logging
import unicodedata
import zlib
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from .config import ENCODERS
from .errors import BAD_INPUT

log = logging.getLogger("raysft")

PARITY_EVERY = 400  # rows of every 400 (by hash) are encoded by both encoders and compared (hf costs ~25x)


class EncoderError(ValueError):
    """An encoder that was asked for and cannot be used."""

    exit_code = BAD_INPUT


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


def batch_char_to_byte(texts: list[str], rows: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 length of every text, and the byte offset of each character offset
    ``positions[j]`` in ``texts[rows[j]]``, for a whole batch at once: one pass over the UTF-8
    bytes of the texts that are not ASCII (ASCII ones need none)."""
    n = len(texts)
    nbytes = np.fromiter(map(len, texts), np.int64, n)
    out = positions.astype(np.int64, copy=True)
    wide = [k for k, t in enumerate(texts) if not t.isascii()]
    if not wide:
        return nbytes, out
    joined = "".join([texts[k] for k in wide]).encode("utf-8", "surrogatepass")
    u8 = np.frombuffer(joined, dtype=np.uint8)
    starts = np.flatnonzero((u8 & 0xC0) != 0x80)  # byte offset of every character
    starts = np.append(starts, len(u8))
    wide_a = np.asarray(wide, np.int64)
    char_base = np.zeros(len(wide) + 1, np.int64)
    np.cumsum(nbytes[wide_a], out=char_base[1:])  # nbytes holds character counts until the next line
    nbytes[wide_a] = starts[char_base[1:]] - starts[char_base[:-1]]
    if len(rows):
        slot = np.full(n, -1, np.int64)
        slot[wide_a] = np.arange(len(wide))
        sel = slot[rows] >= 0
        if sel.any():
            base = char_base[slot[rows[sel]]]
            out[sel] = starts[base + positions[sel]] - starts[base]
    return nbytes, out


def flags_from_ranges(total: int, first: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Boolean per token: inside any ``[first, stop)`` range (ranges may overlap)."""
    depth = np.zeros(total + 1, dtype=np.int32)
    for at, step in ((first, 1), (stop, -1)):
        idx, count = np.unique(np.asarray(at, np.int64), return_counts=True)
        depth[idx] += step * count.astype(np.int32)
    return np.cumsum(depth[:-1], dtype=np.int32) > 0


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


def _finish(ids: np.ndarray, lengths: np.ndarray, first, stop) -> Batch:
    lengths = np.asarray(lengths, np.int64)
    starts = np.zeros(len(lengths), np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    loss = flags_from_ranges(len(ids), np.asarray(first, np.int64), np.asarray(stop, np.int64))
    loss[starts[lengths > 0]] = False  # no loss on a sample's first token
    values = np.array(ids, dtype=np.int32)
    np.invert(values, out=values, where=~loss)
    with_loss = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(loss, out=with_loss[1:])
    return Batch(values, lengths, with_loss[starts + lengths] - with_loss[starts])


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
        # ids are below 2**31 (checked against the vocabulary in encode): read them as int32 in place
        return np.frombuffer(ids, np.int32), np.frombuffer(offs, np.uint64).astype(np.int64)

    def encode(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> Batch:
        if not texts:
            return _empty()
        ids, offs = self._flat(texts)
        lengths = np.diff(offs)
        if len(ids) and (int(ids.max()) >= len(self.lengths) or int(ids.min()) < 0):
            return self._fallback(texts, spans, len(texts))
        blen = self.lengths[ids]
        edges = np.zeros(len(ids) + 1, np.int64)  # byte offset of each token, batch-wide, and the end
        np.cumsum(blen, out=edges[1:])
        sums = edges[offs[1:]] - edges[offs[:-1]]
        counts = np.fromiter(map(len, spans), np.int64, len(spans))
        flat = np.fromiter(chain.from_iterable(chain.from_iterable(spans)), np.int64, 2 * int(counts.sum()))
        rows = np.repeat(np.arange(len(texts)), 2 * counts)
        text_bytes, pos = batch_char_to_byte(texts, rows, flat)
        if self.lead_space is not None:  # the virtual "▁" of Metaspace "first" stands for no byte
            firsts = offs[:-1][lengths > 0]
            nonempty = np.flatnonzero(lengths > 0)
            virtual = (sums[nonempty] == text_bytes[nonempty] + 1) & self.lead_space[ids[firsts]]
            virtual &= np.fromiter((not texts[k].startswith(" ") for k in nonempty.tolist()), bool, len(nonempty))
            if virtual.any():
                blen = blen.astype(np.int64)
                blen[firsts[virtual]] -= 1
                sums[nonempty[virtual]] -= 1
                np.cumsum(blen, out=edges[1:])
        bad = sums != text_bytes
        if self.nfc:
            bad |= np.fromiter((not (t.isascii() or unicodedata.is_normalized("NFC", t)) for t in texts), bool,
                               len(texts))
        if bad.any():
            return self._fallback(texts, spans, int(bad.sum()))
        base_b = np.zeros(len(texts), np.int64)  # byte offset of each text, batch-wide
        np.cumsum(text_bytes[:-1], out=base_b[1:])
        pos += base_b[rows]
        gs_a, ge_a = pos[0::2], pos[1::2]
        # tokens overlapping [s, e): the first whose end is past s, up to the last starting before e
        first = np.searchsorted(edges[1:], gs_a, side="right")
        stop = np.searchsorted(edges[:-1], ge_a, side="left")
        keep = stop > first
        batch = _finish(ids, lengths, first[keep], stop[keep])
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
    """The deterministic parity sample: about one text in ``PARITY_EVERY``, by a hash of its
    length and its last 128 characters (enough to tell rows apart: the answer ends a row; the
    hash must cost little beside fastokens' ~15 us a row)."""
    return zlib.crc32(text[-128:].encode("utf-8", "surrogatepass"), len(text)) % PARITY_EVERY == 0


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


class Loading:
    """An encoder that loads in a background thread (fastokens builds its tables in ~2 s, with
    the GIL released): the actor reads and renders its first records meanwhile, and the first
    ``encode`` waits for it."""

    def __init__(self, mode: str, info, parity: bool = True, start: bool = True):
        import threading

        self._result: tuple | None = None
        self._error: BaseException | None = None
        self._started = False

        def load():
            try:
                self._result = choose(mode, info, parity=parity, canary=False)
            except BaseException as e:  # noqa: BLE001 - raised where the encoder is used
                self._error = e

        self._thread = threading.Thread(target=load, name="raysft-encoder-load", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Begin loading (``start=False``: not before something needs encoding, e.g. an actor
        whose chunks may all come from the cache)."""
        if not self._started:
            self._started = True
            self._thread.start()

    def get(self):
        self.start()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result[0]

    def __getattr__(self, name):  # encode, ids, name, version: the loaded encoder's
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.get(), name)


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
