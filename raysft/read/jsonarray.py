"""A JSON array file, element by element, in bounded memory.

``iter_elements`` reads a stream that holds one JSON array and yields the raw bytes of each
top-level element, without parsing them (each is decoded later, on its own, so one bad
element is one counted reject, not a failed file). It scans windows of the stream with
numpy: only the structural bytes (quotes, backslashes, brackets, braces, commas) are looked
at, and the state that crosses a window (inside a string or not, the backslash run it ends
with, the nesting depth, the bytes of the element in progress) is carried over. Memory: a
window plus the element being cut, whatever the file's size or nesting depth.

A file cut short yields every complete element and then raises ``ArrayError`` for the rest;
so does anything after the closing bracket that is not white space.
"""

from __future__ import annotations

import numpy as np

WINDOW = 4 << 20
_SPECIAL = np.zeros(256, dtype=bool)
for _c in b'"\\[]{},':
    _SPECIAL[_c] = True
QUOTE, BSLASH, COMMA = ord('"'), ord("\\"), ord(",")
DEPTH = np.zeros(256, dtype=np.int64)
DEPTH[ord("[")] = DEPTH[ord("{")] = 1
DEPTH[ord("]")] = DEPTH[ord("}")] = -1
_WS = b" \t\r\n"


class ArrayError(ValueError):
    """Where the array stops being a JSON array (the elements before it were yielded)."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


def _escaped_quotes(pos: np.ndarray, ch: np.ndarray, carry: int) -> np.ndarray:
    """Per special byte: a quote preceded by an odd run of backslashes (``carry``: the run the
    previous window ended with, continuing at byte 0)."""
    n = len(pos)
    is_bs = ch == BSLASH
    if not n or (not is_bs.any() and not carry):
        return np.zeros(n, dtype=bool)
    idx = np.arange(n)
    after_bs = np.zeros(n, dtype=bool)  # the byte right before this one is a backslash
    after_bs[1:] = is_bs[:-1] & (pos[1:] == pos[:-1] + 1)
    starts = is_bs & ~after_bs
    run_start = np.maximum.accumulate(np.where(starts, idx, 0))
    run_len = np.where(is_bs, idx - run_start + 1, 0)  # backslashes in the run, through this one
    if carry and pos[0] == 0 and is_bs[0]:
        first_run = is_bs & (run_start == 0)
        run_len = run_len + np.where(first_run, carry, 0)
    before = np.zeros(n, dtype=np.int64)  # backslashes right before each special byte
    before[1:] = np.where(after_bs[1:], run_len[:-1], 0)
    if carry and pos[0] == 0 and not is_bs[0]:
        before[0] = carry
    return (ch == QUOTE) & (before % 2 == 1)


def iter_elements(stream, window: int = WINDOW):
    """Yield (index, raw element bytes) of the JSON array in ``stream``; raise ArrayError at
    the first place it is not one (after yielding every complete element before it)."""
    head = stream.read(window)
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    lead = len(head) - len(head.lstrip(_WS))
    if head[lead : lead + 1] != b"[":
        raise ArrayError("not a JSON array", 0)
    buf = head[lead + 1 :]
    consumed = lead + 1  # bytes of the stream before ``buf``
    in_string, carry, depth = False, 0, 1
    pending: list[bytes] = []  # the element in progress, from earlier windows
    index, done = 0, False
    while True:
        if not buf:
            buf = stream.read(window)
            if not buf:
                break
        if done:
            if buf.strip(_WS):
                raise ArrayError(f"unexpected data after the end of the array (near byte {consumed})", index)
            consumed += len(buf)
            buf = b""
            continue
        arr = np.frombuffer(buf, dtype=np.uint8)
        pos = np.flatnonzero(_SPECIAL[arr])
        ch = arr[pos]
        quotes = (ch == QUOTE) & ~_escaped_quotes(pos, ch, carry)
        inside_after = (np.cumsum(quotes) % 2 == 1) ^ in_string
        structural = ~(inside_after ^ quotes) & ~quotes  # outside any string
        delta = np.where(structural, DEPTH[ch], 0)
        depth_after = depth + np.cumsum(delta)
        if len(pos) and depth_after.min() < 0:
            raise ArrayError("unbalanced brackets", index)
        seps = np.flatnonzero(structural & (((ch == COMMA) & (depth_after == 1)) | ((delta < 0) & (depth_after == 0))))
        start = 0
        for k in seps.tolist():
            p = int(pos[k])
            pending.append(buf[start:p])
            element = b"".join(pending).strip(_WS)
            pending = []
            start = p + 1
            if ch[k] == COMMA and not element:
                raise ArrayError(f"an empty element before byte {consumed + p}", index)
            if element:
                yield index, element
                index += 1
            if depth_after[k] == 0:
                done = True
                break
        if done:
            rest = buf[start:]
            if rest.strip(_WS):
                raise ArrayError(f"unexpected data after the end of the array (byte {consumed + start})", index)
        else:
            pending.append(buf[start:])
            if len(pos):
                in_string, depth = bool(inside_after[-1]), int(depth_after[-1])
            tail = len(buf) - len(buf.rstrip(b"\\"))
            carry = carry + tail if tail == len(buf) else tail
        consumed += len(buf)
        buf = b""
    if not done:
        inside = bool(b"".join(pending).strip(_WS))
        raise ArrayError(f"the array is cut off: the file ends at byte {consumed}"
                         + (" inside an element" if inside else ""), index)
