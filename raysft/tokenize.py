"""Template stage, part 2: tokenize rendered conversations and derive the loss mask.

Pure (no engine). Each sample's ``input_ids`` are what the tokenizer gives for the whole
rendered conversation in one pass, with ``add_special_tokens=False`` because the template
already wrote BOS and every marker: this is what ``apply_chat_template(..., tokenize=True)``
gives and what the model sees when served.

Loss mask rule (documented in docs/inputs.md): a token carries loss iff any character it covers
lies inside a loss span, so a token that straddles a span boundary carries loss and every
character of an answer is inside some loss-bearing token; a sample's first token never
carries loss (nothing in the sample precedes it). ``raysft.encode`` maps spans to tokens,
from the reference tokenizer's offsets or from the bytes each token stands for.

Samples are returned as one flat int32 array per sample in which a token without loss is
stored as its bitwise complement (``~id == -id - 1``); ``decode_signed`` undoes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np

from .config import OVERLONG_POLICIES
from .encode import Batch, TokenBytes, choose
from .errors import BAD_INPUT
from .fs import get_fs
from .normalize import Document, Pair, RecordError, normalize
from .parity import MATCH, MISMATCH, REFUSED, picked
from .templates import MARKERS, Rendered, Specials, Template


class TokenizerError(ValueError):
    """A tokenizer path that cannot be loaded."""

    exit_code = BAD_INPUT


@dataclass
class TokenizerInfo:
    """Everything the job needs from a tokenizer folder, loadable in any worker."""

    path: str  # folder or tokenizer.json
    tokenizer_json: str  # serialized tokenizers.Tokenizer
    bos: str | None
    eos: str | None
    pad: str | None
    chat_template: str | None
    special_strings: tuple[str, ...]
    vocab_size: int
    special_map: dict | None = None  # the named special tokens a chat template sees (bos_token, ...)
    prefix_space: bool = False  # SentencePiece-style: each encoded text gets a leading "▁"

    def load(self):
        """A new tokenizer of its own (safe to change)."""
        from tokenizers import Tokenizer

        try:
            return _whole(Tokenizer.from_str(self.tokenizer_json))
        except Exception as e:  # noqa: BLE001 - the library's parse error, as one line
            raise TokenizerError(f"--tokenizer {self.path}: not a valid tokenizer.json: {e}") from None

    def shared(self):
        """One tokenizer per TokenizerInfo for work that changes nothing (building one from a
        large tokenizer.json takes ~0.5 s, so it is built on first use: a build that encodes
        nothing never does); not pickled with the info."""
        tok = self.__dict__.get("_shared")
        if tok is None:
            tok = self.__dict__["_shared"] = self.load()
        return tok

    def vocabulary(self) -> Vocabulary:
        """The tokens' ids as the tokenizer.json lists them (no tokenizer built)."""
        v = self.__dict__.get("_vocabulary")
        if v is None:
            v = self.__dict__["_vocabulary"] = Vocabulary.of(json.loads(self.tokenizer_json))
        return v

    def token_to_id(self, token: str) -> int | None:
        return self.vocabulary().token_to_id(token)

    def token_bytes(self):
        """How many input bytes each token id stands for (``raysft.encode.TokenBytes``),
        computed once and sent along with the info."""
        tb = self.__dict__.get("_token_bytes")
        if tb is None:
            tb = self.__dict__["_token_bytes"] = TokenBytes.from_json(self.tokenizer_json)
        return tb

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_shared", "_vocabulary")}

    def save(self, url: str, storage: dict | None = None) -> TokenizerFile:
        """Write the info (as the build uses it, added special tokens included) where every
        node reads it, and return the small reference the tokenizer actors are made with: an
        actor whose constructor arguments are inline can always be re-created by Ray (a 10 MB
        argument would sit in the object store, which may lose it)."""
        fs, path = get_fs(url, storage or {})
        with fs.open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f)  # the fields only (not the tokenizer built from them)
        return TokenizerFile(url)

    @property
    def specials(self) -> Specials:
        return Specials(self.bos, self.eos, self.prefix_space)

    def pad_id(self) -> int:
        """Pad id: the tokenizer's pad token, else its EOS token."""
        for t in (self.pad, self.eos):
            if t is not None and self.token_to_id(t) is not None:
                return self.token_to_id(t)
        raise TokenizerError(f"{self.path}: the tokenizer has neither a pad nor an eos token")


@dataclass(frozen=True)
class TokenizerFile:
    """A :class:`TokenizerInfo` written by :meth:`TokenizerInfo.save`, by its path."""

    path: str

    def load(self, storage: dict | None = None) -> TokenizerInfo:
        fs, path = get_fs(self.path, storage or {})
        with fs.open(path, "r") as f:
            d = json.load(f)
        d["special_strings"] = tuple(d["special_strings"])
        return TokenizerInfo(**d)


@dataclass
class Vocabulary:
    """A tokenizer.json's tokens and ids read from the JSON itself, as ``tokenizers`` reads
    them: the added tokens first, then the model's vocabulary (a Unigram model's by position)."""

    added: dict[str, int]
    model: dict[str, int]
    specials: tuple[str, ...]  # the added tokens marked special, by id
    model_size: int  # the model's entries (a Unigram list may name a piece twice)

    @classmethod
    def of(cls, j: dict) -> Vocabulary:
        if not isinstance(j, dict) or not isinstance(j.get("model"), dict):
            raise TokenizerError("no model")
        vocab = j["model"].get("vocab") or {}
        if isinstance(vocab, list):  # Unigram: [piece, score] by id
            model = {v[0]: i for i, v in enumerate(vocab)}
        else:
            model = dict(vocab)
        added = sorted((t["id"], t["content"], bool(t.get("special"))) for t in j.get("added_tokens") or [])
        return cls({c: i for i, c, _ in added}, model, tuple(c for _, c, sp in added if sp), len(vocab))

    def token_to_id(self, token: str) -> int | None:
        i = self.added.get(token)
        return self.model.get(token) if i is None else i

    def size(self) -> int:
        """The vocabulary with its added tokens, as ``get_vocab_size(with_added_tokens=True)``
        counts it: the model's entries and each added token the model does not have."""
        return self.model_size + sum(t not in self.model for t in self.added)


def sentencepiece_style(tokenizer_json: str | dict) -> bool:
    """A SentencePiece-style tokenizer: it writes spaces as "▁" (a Metaspace pre-tokenizer, or a
    Replace(" ", "▁") normalizer)."""
    j = json.loads(tokenizer_json) if isinstance(tokenizer_json, str) else tokenizer_json
    text = json.dumps([j.get("pre_tokenizer"), j.get("normalizer")])
    return '"Metaspace"' in text or "\\u2581" in text


def _whole(tok):
    """The tokenizer without truncation or padding: every sample is encoded in full."""
    tok.no_truncation()
    tok.no_padding()
    return tok


KNOWN_BOS = ("<|begin_of_text|>", "<s>", "<｜begin▁of▁sentence｜>", "[gMASK]<sop>", "<bos>")
KNOWN_EOS = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<｜end▁of▁sentence｜>", "<eos>", "<|im_end|>")


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer_info(path: str, trust_remote_code: bool = False) -> TokenizerInfo:
    """Read a Hugging Face tokenizer folder (or a bare tokenizer.json) from local disk.

    A folder without tokenizer.json (a slow, SentencePiece-only tokenizer) is converted to a
    fast one with ``transformers``; custom tokenizer code runs only with ``trust_remote_code``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TokenizerError(
            f"--tokenizer {path}: no such file or folder (give a local tokenizer folder or tokenizer.json)"
        )
    config: dict = {}
    if os.path.isdir(path):
        cfg = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(cfg):
            try:
                with open(cfg, encoding="utf-8") as f:
                    config = json.load(f)
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                raise TokenizerError(f"--tokenizer {cfg}: not valid JSON ({str(e).splitlines()[0][:200]})") from None
            if not isinstance(config, dict):
                raise TokenizerError(f"--tokenizer {cfg}: must hold a JSON object, not {type(config).__name__}")
        tj = os.path.join(path, "tokenizer.json")
        jinja = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja) and not config.get("chat_template"):
            with open(jinja, encoding="utf-8") as f:
                config["chat_template"] = f.read()
        if os.path.exists(tj):
            with open(tj, encoding="utf-8") as f:
                tokenizer_json = f.read()
        else:
            if config.get("auto_map") and not trust_remote_code:
                raise TokenizerError(f"--tokenizer {path}: this tokenizer runs its own Python code (auto_map in "
                                     "tokenizer_config.json) and has no tokenizer.json; pass --trust-remote-code if "
                                     "you trust that code")
            try:
                from transformers import AutoTokenizer

                hf = AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=trust_remote_code)
            except Exception as e:  # noqa: BLE001 - report any loader failure as one line
                raise TokenizerError(f"--tokenizer {path}: cannot load a fast tokenizer: {e}") from None
            if not getattr(hf, "is_fast", False):
                raise TokenizerError(f"--tokenizer {path}: only fast (Rust) tokenizers are supported")
            tokenizer_json = hf.backend_tokenizer.to_str()
    else:
        with open(path, encoding="utf-8") as f:
            tokenizer_json = f.read()
    # the tokenizer itself is built where something is encoded (TokenizerInfo.shared): what the
    # job needs to know about it here comes from its JSON
    try:
        j = json.loads(tokenizer_json)
        vocab = Vocabulary.of(j)
    except (ValueError, TypeError, KeyError) as e:
        raise TokenizerError(f"--tokenizer {path}: not a valid tokenizer.json: {e}") from None
    chat_template = config.get("chat_template")
    if isinstance(chat_template, list):  # named templates: use "default"
        named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
        chat_template = named.get("default")
    specials = vocab.specials
    bos, eos, pad = (_token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
    if not config:  # a bare tokenizer.json: recognise the usual special-token names
        bos = bos or next((t for t in KNOWN_BOS if t in specials), None)
        eos = eos or next((t for t in KNOWN_EOS if t in specials), None)
    # what apply_chat_template passes a template: the named special tokens the config sets
    special_map = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "sep_token",
                                                            "pad_token", "cls_token", "mask_token")}
    special_map = {k: v for k, v in special_map.items() if v is not None}
    if not config:
        special_map.update({k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None})
    info = TokenizerInfo(
        path=path,
        tokenizer_json=tokenizer_json,
        bos=bos,
        eos=eos,
        pad=pad,
        chat_template=chat_template,
        special_strings=specials,
        vocab_size=vocab.size(),
        special_map=special_map,
        prefix_space=sentencepiece_style(j),
    )
    info.__dict__["_vocabulary"] = vocab
    return info


def add_special_tokens(info: TokenizerInfo, markers: tuple[str, ...]) -> tuple[TokenizerInfo, list[str]]:
    """A copy of ``info`` whose tokenizer also has ``markers`` as special tokens (the ones it
    lacked, appended to the vocabulary in the order given), and the list of tokens added."""
    import dataclasses

    from tokenizers import AddedToken

    tok = info.load()
    missing = [m for m in markers if tok.token_to_id(m) is None]
    if not missing:
        return info, []
    tok.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in missing])
    extended = dataclasses.replace(
        info,
        tokenizer_json=tok.to_str(),
        special_strings=(*info.special_strings, *missing),
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
    )
    return extended, missing


def missing_markers(info: TokenizerInfo, markers: tuple[str, ...]) -> list[str]:
    return [m for m in markers if info.token_to_id(m) is None]


def save_tokenizer(fs, folder: str, info: TokenizerInfo) -> None:
    """tokenizer.json + tokenizer_config.json, loadable by transformers and by --tokenizer."""
    with fs.open(folder + "/tokenizer.json", "w") as f:
        f.write(info.tokenizer_json)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": info.bos, "eos_token": info.eos,
              "pad_token": info.pad}
    if info.chat_template:
        config["chat_template"] = info.chat_template
    with fs.open(folder + "/tokenizer_config.json", "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)


def split_flat(values: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(values, np.cumsum(lengths)[:-1]) if len(lengths) else []


def loss_counts(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Loss-bearing tokens in each segment ``values[offsets[k]:offsets[k + 1]]`` of signed tokens."""
    with_loss = np.concatenate([[0], np.cumsum(values >= 0)])
    return with_loss[offsets[1:]] - with_loss[offsets[:-1]]


def decode_signed(signed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed storage -> (token ids, loss mask)."""
    signed = np.asarray(signed)
    loss = signed >= 0
    return np.where(loss, signed, ~signed), loss


def json_loads(raw: bytes):
    """Decode one record: the C parser (orjson), and the standard library's where orjson
    refuses what JSON allows (NaN, integers beyond 64 bits). Every failure is a ValueError or
    RecursionError."""
    if orjson is not None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)


try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency
    orjson = None


@dataclass
class Encoded:
    """A batch of records, tokenized: the kept records' signed tokens back to back."""

    values: np.ndarray  # int32, signed (see module doc)
    lengths: np.ndarray  # int64 per record: its token count, 0 when rejected
    loss: np.ndarray  # int64 per record: its loss-bearing token count, 0 when rejected
    ok: np.ndarray  # bool per record: kept
    reasons: list[str]  # per record: "" or why it was rejected
    messages: list[str]
    batch: object = None  # the encoder's Batch (parity and fallback counts)
    parity: np.ndarray | None = None  # int8 per record: the chat-template parity outcome (raysft.parity)
    planned: int = 0  # --template auto: conversations replayed from render plans
    rendered: int = 0  # --template auto: conversations rendered
    first: np.ndarray | None = None  # int64 per record: a preference pair's chosen tokens (0: not a pair)


def _reject_reason(e: BaseException) -> tuple[str, str]:
    """(reason, message) of a record that failed to decode."""
    if isinstance(e, UnicodeDecodeError):
        return "invalid_utf8", f"not valid UTF-8 ({e.reason} at byte {e.start})"
    if isinstance(e, UnicodeEncodeError):
        return "invalid_utf8", f"text holds a character UTF-8 cannot encode ({e.reason}: {e.object[e.start:e.end]!r})"
    if isinstance(e, json.JSONDecodeError):
        return "invalid_json", f"not valid JSON (col {e.colno}: {e.msg})"
    if isinstance(e, RecursionError):
        return "invalid_json", "JSON nested too deeply"
    return "invalid_json", f"not valid JSON ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"


class SampleBuilder:
    """Raw JSON records -> signed token arrays, or a (reason, message) per rejected record.

    The whole per-record path of the job (decode, normalize, render, tokenize, mask) without
    any engine; the Ray actor of the pipeline only wraps it. ``encoder`` is an encoder object
    from ``raysft.encode`` or a ``--encoder`` mode (``hf`` by default here: the reference).
    """

    def __init__(
        self,
        info: TokenizerInfo,
        template: str,
        fmt: str = "auto",
        map_keys: dict | None = None,
        loss: str = "assistant",
        encoder="hf",
        template_kwargs: dict | None = None,
        max_chars: int | None = None,
        template_date: str | None = None,
        parity=None,
        think_loss: str = "auto",
    ):
        self.info = info
        self.encoder = choose(encoder, info)[0] if isinstance(encoder, str) else encoder
        self.tokenizer = info.shared()
        # a plain-text source renders no conversation: it needs no chat template
        self.template = None if fmt == "text" else Template(
            template, info.specials, info.chat_template, info.special_strings, loss, template_kwargs, info.special_map,
            template_date, think_loss)
        self.fmt = fmt
        self.keys = map_keys or {}
        self.max_chars = max_chars
        self.parity = parity  # a raysft.parity.TemplateParity, or None

        # markers this tokenizer has no single token for: a cut could fall inside them
        markers = MARKERS.get(getattr(self.template, "name", ""), ()) + tuple(info.special_strings) + tuple(s for s in (info.bos, info.eos) if s)
        self.markers = tuple(m for m in dict.fromkeys(markers) if self.tokenizer.token_to_id(m) is None)

    def unsafe_cuts(self, raw: bytes) -> np.ndarray | None:
        """Cut positions inside a template marker, for one (overlong) record (None for a
        plain-text document: no template wrote it)."""
        sample = normalize(json_loads(raw), self.fmt, self.keys)
        if isinstance(sample, Document):
            return None
        rendered = self.template.render(sample)
        return marker_cuts(self.tokenizer.encode(rendered.text, add_special_tokens=False), rendered.text,
                           self.markers)

    def document_ends(self) -> tuple[np.ndarray, np.ndarray]:
        """What a plain-text document gets around its text's tokens, as Megatron-LM's
        ``preprocess_data.py --append-eod`` writes it: before, the special tokens the
        tokenizer's post-processor adds (``tokenizer(text).input_ids``: a BOS where the
        tokenizer adds one); after, those it appends, then the EOS token (the EOD)."""
        ends = self.__dict__.get("_doc_ends")
        if ends is None:
            with_sp = self.tokenizer.encode("a", add_special_tokens=True).ids
            bare = self.tokenizer.encode("a", add_special_tokens=False).ids
            at = next((k for k in range(len(with_sp) - len(bare) + 1) if with_sp[k : k + len(bare)] == bare), None)
            eos = self.info.token_to_id(self.info.eos) if self.info.eos is not None else None
            if at is None or eos is None:
                raise RecordError("no_eos" if eos is None else "template_error",
                                  "the tokenizer has no EOS token to end a plain-text document with" if eos is None
                                  else "the tokenizer's post-processor changes a text's own tokens")
            ends = self.__dict__["_doc_ends"] = (np.array(with_sp[:at], np.int32),
                                                 np.array(with_sp[at + len(bare) :] + [eos], np.int32))
        return ends

    def render(self, raws: list[bytes], errors: list[str] | None, reasons: list[str], messages: list[str],
               docs: list[tuple[int, str]] | None = None) -> tuple[list[Rendered], list[int]]:
        """Decode, normalize and render records; failures go to reasons/messages, plain-text
        documents (``format: text``) to ``docs`` as (record, text). A preference pair renders
        as two conversations, chosen then rejected, both placed at its record."""
        rendered: list[Rendered] = []
        where: list[int] = []
        template, fmt, keys, max_chars = self.template, self.fmt, self.keys, self.max_chars
        for i, raw in enumerate(raws):
            if errors and errors[i]:
                reasons[i], _, messages[i] = errors[i].partition(": ")
                continue
            try:
                record = json_loads(raw)
            except (ValueError, RecursionError) as e:
                reasons[i], messages[i] = _reject_reason(e)
                continue
            try:
                sample = normalize(record, fmt, keys)
                if type(sample) is Document:
                    if docs is None:
                        raise RecordError("unknown_format", "a plain-text record where a conversation is needed")
                    if not sample.text.isascii():
                        sample.text.encode("utf-8")
                    if max_chars is not None and len(sample.text) > max_chars:
                        reasons[i], messages[i] = "overlong", f"text of {len(sample.text):,} characters"
                    elif not sample.text:
                        reasons[i], messages[i] = "empty_text", "an empty plain-text document"
                    else:
                        docs.append((i, sample.text))
                    continue
                sides = [template.render(c) for c in ((sample.chosen, sample.rejected) if type(sample) is Pair
                                                      else (sample,))]
                for r in sides:
                    if not r.text.isascii():
                        r.text.encode("utf-8")  # a lone surrogate ("\ud83d") is valid JSON, not text
                chars = sum(len(r.text) for r in sides)
                if max_chars is not None and chars > max_chars:
                    reasons[i], messages[i] = "overlong", f"rendered text of {chars:,} characters"
                    continue
                rendered += sides
                where += [i] * len(sides)
            except RecordError as e:
                reasons[i], messages[i] = e.reason, e.message
            except (UnicodeError, RecursionError) as e:
                reasons[i], messages[i] = _reject_reason(e)
            except ValueError as e:  # decoded fine: a template (built-in) that cannot write this record
                reasons[i], messages[i] = "template_error", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return rendered, where

    def encode(self, raws: list[bytes], errors: list[str] | None = None) -> Encoded:
        """Records -> kept samples' signed tokens, back to back, and a reason per rejected one."""
        n = len(raws)
        reasons = [""] * n
        messages = [""] * n
        docs: list[tuple[int, str]] = []
        paths = self.template.render_paths() if self.template is not None else (0, 0)
        rendered, where = self.render(raws, errors, reasons, messages, docs)
        b = self.encoder.encode([r.text for r in rendered], [r.spans for r in rendered])
        values, lengths, loss_n, ok, first = self._kept(b, where, n, reasons, messages)
        if docs:
            values, b = self._with_documents(values, lengths, loss_n, ok, b, docs)
        after = self.template.render_paths() if self.template is not None else (0, 0)
        return Encoded(values, lengths, loss_n, ok, reasons, messages, b,
                       self._parity(raws, values, lengths, ok, first), after[0] - paths[0], after[1] - paths[1], first)

    @staticmethod
    def _kept(b, where: list[int], n: int, reasons: list[str], messages: list[str]):
        """The encoded conversations placed at their records (``where``; a preference pair's two
        sides, chosen then rejected, at the same record): signed tokens back to back, tokens,
        loss tokens, kept flag and chosen tokens (a pair; else 0) per record; a record with an
        empty or loss-free conversation is rejected, with its reason."""
        values, counts, loss = b.values, b.lengths, b.loss
        lengths = np.zeros(n, dtype=np.int64)
        loss_n = np.zeros(n, dtype=np.int64)
        first = np.zeros(n, dtype=np.int64)
        ok = np.zeros(n, dtype=bool)
        if where:
            at = np.asarray(where, dtype=np.int64)
            paired = np.zeros(len(at), dtype=bool)
            paired[1:] = at[1:] == at[:-1]
            paired[:-1] |= paired[1:]
            good = (counts > 0) & (loss > 0)
            bad = np.zeros(n, dtype=bool)
            for j in np.flatnonzero(~good).tolist():
                i = where[j]
                if bad[i]:
                    continue
                bad[i] = True
                side = ("the rejected response" if j and where[j - 1] == i else "the chosen response") \
                    if paired[j] else "the sample"
                if counts[j] == 0:
                    reasons[i], messages[i] = "empty_sample", f"the rendered conversation of {side} has no tokens"
                else:
                    reasons[i], messages[i] = "all_masked", f"no token of {side} carries loss"
            keep = ~bad[at]
            if not keep.all():
                values = values[np.repeat(keep, counts)]
            at, counts, loss, paired = at[keep], counts[keep], loss[keep], paired[keep]
            lengths[:] = np.bincount(at, weights=counts, minlength=n)
            loss_n[:] = np.bincount(at, weights=loss, minlength=n)
            ok[at] = True
            chosen = paired & np.concatenate([[True], at[1:] != at[:-1]]) if len(at) else paired
            first[at[chosen]] = counts[chosen]
        return values, lengths, loss_n, ok, first

    def _with_documents(self, values, lengths, loss_n, ok, conv, docs):
        """Plain-text documents put beside the batch's conversations (``lengths``, ``loss_n``
        and ``ok`` completed in place): each the post-processor's tokens + its text's tokens +
        EOS, every token with loss (``document_ends``); every kept record's tokens in record
        order. Returns the tokens and the batch's encoder counts."""
        texts = [t for _, t in docs]
        plain = self.encoder.encode(texts, [[(0, len(t))] for t in texts])  # the same encoder, parity and fallback
        pre, post = self.document_ends()
        arrays = dict(zip(np.flatnonzero(ok).tolist(), split_flat(values, lengths[ok])))
        for (i, _), arr in zip(docs, split_flat(plain.values, plain.lengths)):
            arrays[i] = np.concatenate([pre, np.where(arr < 0, ~arr, arr), post])
            ok[i], lengths[i], loss_n[i] = True, len(arrays[i]), len(arrays[i])
        order = sorted(arrays)
        values = np.concatenate([arrays[i] for i in order]).astype(np.int32) if order else np.zeros(0, np.int32)
        return values, Batch(values, lengths[ok], loss_n[ok], conv.parity_rows + plain.parity_rows,
                             conv.parity_mismatches + plain.parity_mismatches, conv.fallback_rows + plain.fallback_rows)

    def _parity(self, raws, values, lengths, ok, first) -> np.ndarray | None:
        """The chat-template parity outcome of each picked record that was written (a pair's
        is the worse of its two sides')."""
        p = self.parity
        if p is None:
            return None
        out = np.zeros(len(raws), dtype=np.int8)
        ends = np.cumsum(lengths)
        for i in np.flatnonzero(ok).tolist():
            if picked(raws[i], p.every):
                sample = normalize(json_loads(raws[i]), self.fmt, self.keys)
                if type(sample) is Document:  # a plain-text document has no template to check
                    continue
                tokens = values[ends[i] - lengths[i] : ends[i]]
                if type(sample) is Pair:
                    k = int(first[i])
                    sides = [(raws[i] + b"\0chosen", sample.chosen, tokens[:k]),
                             (raws[i] + b"\0rejected", sample.rejected, tokens[k:])]
                else:
                    sides = [(raws[i], sample, tokens)]
                got = {p.check(key, conv, ids, self.template.messages(conv)) for key, conv, ids in sides}
                out[i] = MISMATCH if MISMATCH in got else REFUSED if REFUSED in got else MATCH
        return out

    def __call__(self, raws: list[bytes], errors: list[str] | None = None):
        """Per record: its signed token array (None when rejected), reasons, messages."""
        e = self.encode(raws, errors)
        arrays = iter(split_flat(e.values, e.lengths[e.ok]))
        ids = [next(arrays) if good else None for good in e.ok.tolist()]
        return ids, e.reasons, e.messages




def turn_ends(signed: np.ndarray) -> np.ndarray:
    """Token positions just after each loss-bearing run (the end of an answer turn)."""
    loss = signed >= 0
    edge = np.nonzero(loss[:-1] & ~loss[1:])[0] + 1
    return np.concatenate([edge, [len(signed)]]) if len(signed) and loss[-1] else edge


def marker_cuts(encoding, text: str, markers: tuple[str, ...]) -> np.ndarray:
    """``unsafe[b]`` is True when a cut between tokens b-1 and b would fall inside a marker."""
    n = len(encoding.ids)
    unsafe = np.zeros(n + 1, dtype=bool)
    starts = np.array([encoding.offsets[i][0] for i in range(n)] + [len(text)], dtype=np.int64)
    for m in markers:
        k = text.find(m)
        while k >= 0:
            inside = (starts > k) & (starts < k + len(m))
            unsafe[np.nonzero(inside)[0]] = True
            k = text.find(m, k + len(m))
    return unsafe


def _safe_cut(limit: int, lowest: int, unsafe: np.ndarray | None) -> int:
    """The last cut position <= limit that is not inside a marker (limit itself if none is)."""
    if unsafe is None:
        return limit
    for b in range(limit, lowest, -1):
        if not unsafe[b]:
            return b
    return limit


def fit_overlong(signed: np.ndarray, seq_length: int, policy: str,
                 unsafe: np.ndarray | None = None) -> tuple[list[np.ndarray], str]:
    """Apply ``--overlong`` to a sample longer than ``seq_length``.

    * ``drop``: no piece (the sample is counted as dropped);
    * ``truncate``: keep the first ``seq_length`` tokens: the prompt stays whole and the answer
      is cut; dropped when the cut leaves no loss-bearing token (the prompt alone is too long);
    * ``split``: cut at the ends of answer turns, each piece as long as fits; a stretch with no
      turn end inside ``seq_length`` is cut at ``seq_length``; a piece's first token carries no
      loss (it starts a sample); pieces without any loss-bearing token are left out.

    ``unsafe`` (see ``marker_cuts``) marks cut positions inside a template marker that the
    tokenizer splits into several tokens: a cut moves back to the marker's start.

    Returns the pieces and, when nothing is kept, the reason.
    """
    if len(signed) <= seq_length:
        return [signed], ""
    if policy == "drop":
        return [], "overlong"
    if policy == "truncate":
        head = signed[: _safe_cut(seq_length, 0, unsafe)]
        return ([head], "") if (head >= 0).any() else ([], "overlong_prompt")
    if policy != "split":
        raise ValueError(f"unknown overlong policy {policy!r}; choose one of {', '.join(OVERLONG_POLICIES)}")
    ends = turn_ends(signed)
    pieces, start = [], 0
    while start < len(signed):
        limit = start + seq_length
        fits = ends[(ends > start) & (ends <= limit)]
        stop = int(fits[-1]) if len(fits) else (_safe_cut(limit, start, unsafe) if limit < len(signed) else len(signed))
        piece = signed[start:stop]
        if piece[0] >= 0:  # a piece is a sample: no loss on its first token
            piece = piece.copy()
            piece[0] = ~piece[0]
        if (piece >= 0).any():
            pieces.append(piece)
        start = stop
    return pieces, ("" if pieces else "overlong")


def fit_pair(signed: np.ndarray, chosen: int, total: int, side: int, policy: str) -> tuple[np.ndarray | None, int, str]:
    """Apply ``--overlong`` to a preference pair (its chosen tokens, ``chosen`` of them, then its
    rejected tokens) that does not fit: both sides together at most ``total`` tokens, each at
    most ``side``. A pair is one unit: it is never split.

    * ``drop``: dropped (reason ``overlong``);
    * ``truncate``: each side keeps its first tokens (the prompt whole, the response cut at its
      end, as MindSpeed-LLM and LLaMA-Factory cut pairs): a side that fits in half the room
      stays whole and the other takes the rest, else each gets half; dropped
      (``overlong_prompt``) when a side keeps no loss-bearing token;
    * ``split``: a pair is never split: one that does not fit is dropped, as under ``drop``.

    Returns (tokens, chosen tokens, "") or (None, 0, reason)."""
    c, r = chosen, len(signed) - chosen
    if c + r <= total and max(c, r) <= side:
        return signed, chosen, ""
    if policy != "truncate":
        return None, 0, "overlong"
    room = min(total, 2 * side)
    half = room // 2
    if min(c, r) <= half:
        c2, r2 = (c, min(r, room - c, side)) if c <= r else (min(c, room - r, side), r)
    else:
        c2, r2 = room - half, half
    kept_c, kept_r = signed[:c2], signed[c : c + r2]
    if not (kept_c >= 0).any() or not (kept_r >= 0).any():
        return None, 0, "overlong_prompt"
    return np.concatenate([kept_c, kept_r]), c2, ""
