"""Sources, the mixture, and the validation split. Pure (numpy), no engine.

A build reads one or more **sources**: each its own inputs, record format, ``--map-keys`` and
loss policy, and what it contributes to the output, measured in ``--mix-unit``
(``loss_tokens``, the default: supervised tokens; ``samples``; or ``tokens``):

* ``share: F`` — a fraction ``F`` of the output;
* ``budget: N`` — an absolute amount (e.g. ``2e7`` loss tokens);
* ``repeat: R`` — ``R`` times its own size (``2.5``: two whole copies and a seeded half);
* none of these — its own size, once.

Sources with a budget, a repeat or nothing are *fixed*; their amounts add up to ``F_fixed``.
Shares divide the rest: the output is ``T = F_fixed / (1 - sum(shares))`` and a share source
gets ``share * T``. When every source has a share (they must add up to 1), the output keeps
the size of the input, ``T = sum of the sources' own amounts``.

A source asked for ``r`` times its own amount gives every sample ``floor(r)`` copies and one
more to a seeded sample of ``r - floor(r)`` of them (whole copies first, then the sample; a
large source under-sampled keeps a seeded sample). The pick is by a hash of the record's
content and its position in its file, and the seed, so it does not depend on the worker
count or how the input was cut; the realized amounts are reported beside the asked ones.

The **validation split** (``--validation 0.01`` or ``--validation 500``) holds records out by a
hash of their content: all pieces and copies of a record, and every record with the same
content, fall on the same side, so the sets never overlap. A count takes the records with
the smallest hashes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import BAD_INPUT
from .normalize import FORMATS, parse_map_keys
from .pack import mix64  # the one splitmix64 finalizer (slot shuffles use it too)
from .samples import kept_mask
from .templates import LOSS_POLICIES


class SourceError(ValueError):
    """A source or mixture specification that cannot be used (one line)."""

    exit_code = BAD_INPUT


@dataclass
class Source:
    name: str
    inputs: list[str]
    format: str = "auto"
    map_keys: dict = field(default_factory=dict)
    loss: str = "assistant"
    share: float | None = None
    budget: float | None = None
    repeat: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


SOURCE_KEYS = ("name", "input", "inputs", "format", "map_keys", "loss", "share", "budget", "repeat")


def parse_sources(specs: list, defaults: dict) -> list[Source]:
    """``sources:`` of a job file or ``--source`` values (mappings) -> sources. Keys a source
    leaves out take the build's own (``format``, ``map_keys``, ``loss``)."""
    out: list[Source] = []
    for k, spec in enumerate(specs):
        where = f"source {k + 1}"
        if not isinstance(spec, dict):
            raise SourceError(f"{where}: must be a mapping with at least 'input', got {type(spec).__name__}")
        spec = {str(key).replace("-", "_"): v for key, v in spec.items()}
        unknown = sorted(set(spec) - set(SOURCE_KEYS))
        if unknown:
            raise SourceError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(SOURCE_KEYS)}")
        inputs = spec.get("input", spec.get("inputs"))
        inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
        if not inputs or not all(isinstance(i, str) and i for i in inputs):
            raise SourceError(f"{where}: 'input' must name a file, folder or glob (or a list of them)")
        name = str(spec.get("name") or f"source{k + 1}")
        where = f"source {name!r}"
        fmt = spec.get("format", defaults.get("format", "auto"))
        if fmt not in ("auto", *FORMATS):
            raise SourceError(f"{where}: format must be one of auto, {', '.join(FORMATS)}")
        loss = spec.get("loss", defaults.get("loss", "assistant"))
        if loss not in LOSS_POLICIES:
            raise SourceError(f"{where}: loss must be one of {', '.join(LOSS_POLICIES)}")
        try:
            keys = parse_map_keys(spec["map_keys"]) if "map_keys" in spec else dict(defaults.get("map_keys") or {})
        except ValueError as e:
            raise SourceError(f"{where}: {e}") from None
        given = [k for k in ("share", "budget", "repeat") if spec.get(k) is not None]
        if len(given) > 1:
            raise SourceError(f"{where}: give one of share, budget or repeat, not {' and '.join(given)}")
        src = Source(name, inputs, fmt, keys, loss)
        for key in given:
            try:
                value = float(spec[key])
            except (TypeError, ValueError):
                raise SourceError(f"{where}: {key} must be a number, got {spec[key]!r}") from None
            if not math.isfinite(value) or value < 0 or (key == "share" and value > 1):
                raise SourceError(f"{where}: {key} must be {'between 0 and 1' if key == 'share' else '>= 0'}")
            setattr(src, key, value)
        out.append(src)
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise SourceError(f"source names must differ: {', '.join(sorted(n for n in set(names) if names.count(n) > 1))}")
    shares = [s.share for s in out if s.share is not None]
    if shares and len(shares) == len(out) and abs(sum(shares) - 1) > 1e-6:
        raise SourceError(f"the sources' shares add up to {sum(shares):g}; with a share on every source they must add "
                          "up to 1")
    if shares and len(shares) < len(out) and sum(shares) >= 1:
        raise SourceError(f"the shares add up to {sum(shares):g}, leaving nothing for the sources without one")
    return out


def mix_factors(sources: list[Source], natural: list[float]) -> list[float]:
    """How many times its own amount each source gives (see module doc). ``natural``: each
    source's amount in the mix unit, as tokenized."""
    shares = [s.share for s in sources]
    fixed = 0.0
    for s, n in zip(sources, natural):
        if s.share is None:
            fixed += s.budget if s.budget is not None else n * (s.repeat if s.repeat is not None else 1.0)
    if all(x is not None for x in shares):
        total = float(sum(natural))
    else:
        total = fixed / (1.0 - sum(x for x in shares if x is not None))
    out = []
    for s, n in zip(sources, natural):
        if s.share is not None:
            want = s.share * total
        elif s.budget is not None:
            want = s.budget
        else:
            out.append(s.repeat if s.repeat is not None else 1.0)
            continue
        if n <= 0:
            if want > 0:
                raise SourceError(f"source {s.name!r} has no {'' if n == 0 else 'usable '}samples to give {want:,.0f}")
            out.append(0.0)
        else:
            out.append(want / n)
    return out


def unit(values: np.ndarray, salt: int) -> np.ndarray:
    """A deterministic number in [0, 1) per value (a hash of it and ``salt``)."""
    with np.errstate(over="ignore"):
        x = np.asarray(values).astype(np.int64).view(np.uint64) ^ np.uint64(salt & 0xFFFFFFFFFFFFFFFF)
    return (mix64(x) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def copy_key(rec_hash: np.ndarray, position: np.ndarray, seed: int) -> np.ndarray:
    """The number in [0, 1) that orders a source's records for its seeded sample: a hash of
    the record's content, its position in its file, and the seed."""
    with np.errstate(over="ignore"):
        key = np.asarray(rec_hash, np.int64).view(np.uint64) ^ mix64(np.asarray(position, np.int64).view(np.uint64))
    return unit(key.view(np.int64), seed * 0x9E3779B97F4A7C15 + 1)


def copies(rec_hash: np.ndarray, position: np.ndarray, factor: np.ndarray, seed: int) -> np.ndarray:
    """Copies of each sample: ``floor(factor)`` and one more when its record's key falls in
    the fractional part (a seeded sample of that share of the records)."""
    whole = np.floor(factor).astype(np.int64)
    return whole + (copy_key(rec_hash, position, seed) < (factor - whole))


BUCKETS = 4096  # resolution of the seeded sample's cut (raysft.sources.cut_for)


def cut_for(amounts: np.ndarray, want: float) -> float:
    """The key below which a source's records add up to ``want`` (in the mix unit), from
    its amounts per key bucket (``BUCKETS`` of them): the sample then meets its amount to a
    bucket's worth, however few records it takes."""
    total = float(amounts.sum())
    if want <= 0 or total <= 0:
        return 0.0
    if want >= total:
        return 1.0
    cum = np.cumsum(amounts)
    b = int(np.searchsorted(cum, want, side="left"))
    before = cum[b - 1] if b else 0.0
    inside = (want - before) / amounts[b] if amounts[b] else 0.0
    return (b + inside) / len(amounts)


@dataclass(frozen=True)
class Validation:
    """``--validation``: a fraction of the records, or a count."""

    fraction: float | None = None
    count: int | None = None

    @classmethod
    def parse(cls, value) -> Validation | None:
        if value in (None, "", 0, "0"):
            return None
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise SourceError(f"--validation must be a fraction (0.01) or a count (500), got {value!r}") from None
        if not math.isfinite(x) or x <= 0:
            raise SourceError("--validation must be > 0")
        if x < 1:
            return cls(fraction=x)
        if x != int(x):
            raise SourceError("--validation: a count must be a whole number (or give a fraction below 1)")
        return cls(count=int(x))


VALIDATION_SALT = 0x5EEDFACE


def valid_key(rec_hash: np.ndarray, seed: int) -> np.ndarray:
    """The number in [0, 1) that puts a record on the validation side (by content only)."""
    return unit(rec_hash, VALIDATION_SALT ^ (seed * 0x9E3779B97F4A7C15))


def count_threshold(smallest: list[np.ndarray], count: int) -> float:
    """For ``--validation COUNT``: the key below which exactly the ``count`` smallest distinct
    record keys lie (from each block's own smallest keys)."""
    keys = np.unique(np.concatenate(smallest)) if smallest else np.zeros(0)
    if len(keys) <= count:
        return 1.0 + 1e-9  # every record
    return float(np.nextafter(keys[count - 1], 2.0))


@dataclass(frozen=True)
class Selection:
    """What the mixture and the split make of each row of a tokenized block."""

    whole: tuple[int, ...]  # per source: copies of every record
    cut: tuple[float, ...]  # per source: records whose copy key is below get one more
    seed: int
    valid_below: float | None = None  # records whose valid_key is below go to validation

    @property
    def trivial(self) -> bool:
        return self.valid_below is None and all(w == 1 for w in self.whole) and not any(self.cut)


def row_keys(table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: kept, the record's content hash, its position in its file."""

    kept = kept_mask(table).to_numpy(zero_copy_only=False)
    row = table.column("row").to_numpy()
    return kept, table.column("rec_hash").to_numpy(), np.where(row >= 0, row, table.column("offset").to_numpy())


def held_out(table, seed: int, valid_below: float | None) -> np.ndarray:
    kept, rec, _ = row_keys(table)
    if valid_below is None:
        return np.zeros(len(kept), bool)
    return kept & (valid_key(rec, seed) < valid_below)


def amounts_by_key(table, seed: int, valid_below: float | None, unit: str) -> dict[int, np.ndarray]:
    """Per source: the amounts (in the mix unit) of the block's training rows, by copy-key
    bucket; what ``cut_for`` finds a source's sample in."""
    kept, rec, pos = row_keys(table)
    train = kept & ~held_out(table, seed, valid_below)
    amount = {"samples": np.ones(len(kept)), "tokens": table.column("n").to_numpy().astype(np.float64),
              "loss_tokens": table.column("loss_n").to_numpy().astype(np.float64)}[unit]
    bucket = np.minimum((copy_key(rec, pos, seed) * BUCKETS).astype(np.int64), BUCKETS - 1)
    src = table.column("source").to_numpy()
    out = {}
    for s in np.unique(src[train]).tolist():
        r = train & (src == s)
        out[int(s)] = np.bincount(bucket[r], weights=amount[r], minlength=BUCKETS)
    return out


def select(table, selection: Selection) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a tokenized block (``raysft.samples`` rows): its copies in the training set
    and whether it is in the validation set (rejected and dropped rows: neither)."""
    kept, rec, pos = row_keys(table)
    valid = held_out(table, selection.seed, selection.valid_below)
    src = table.column("source").to_numpy().astype(np.int64)
    whole = np.asarray(selection.whole, np.int64)[src]
    cut = np.asarray(selection.cut, np.float64)[src]
    m = whole + (copy_key(rec, pos, selection.seed) < cut)
    m[~kept | valid] = 0
    return m, valid
