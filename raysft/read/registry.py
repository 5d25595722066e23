"""LLaMA-Factory data folders: an ``--input`` folder with a ``dataset_info.json`` registry is read
through it, each entry a source (``raysft.sources``) with its own files, format and keys.

Pure (fsspec + json), no engine. What an entry says, as LLaMA-Factory reads it:

* ``file_name``: a file or folder inside the data folder (entries that name only a hub dataset,
  ``hf_hub_url``/``ms_hub_url``/``om_hub_url``/``script_url``, cannot be read here: nothing is
  downloaded);
* ``formatting``: ``alpaca`` (default), ``sharegpt`` or ``openai``;
* ``columns``: column names (``prompt``, ``query``, ``response``, ``history``, ``messages``,
  ``system``, ``tools``), as ``--map-keys``; an Alpaca entry that maps a ``prompt`` and no
  ``response`` (LLaMA-Factory's pretraining entries, ``wiki_demo``: ``{"prompt": "text"}``) is
  plain text (``format: text``);
* ``tags``: ShareGPT role names (``role_tag``, ``content_tag``, ``user_tag``, ...);
* ``ranking: true``: preference pairs (``chosen``/``rejected`` columns), built as a pair
  dataset when picked with ``--dataset`` (a build is either SFT or pairs);
* ``kto_tag``, ``images``/``videos``/``audios``: KTO and multimodal data, which raysft does not
  read.

``--dataset a,b`` picks entries by name (as LLaMA-Factory's ``dataset:``); without it every SFT
entry whose file is in the folder is built, and the others are named in one log line each. A ``datasets`` ``save_to_disk`` folder also holds a ``dataset_info.json``
(with its ``state.json``): that is a saved dataset, read as its Arrow files, not a registry.
"""

from __future__ import annotations

import json
import logging

from ..fs import get_fs, join
from ..normalize import parse_map_keys
from ..sources import Source, SourceError

log = logging.getLogger("raysft")

REGISTRY = "dataset_info.json"
ABSENT = " "  # ends the reason of an entry whose data is not in the folder
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
FORMATTING = {"alpaca": "alpaca", "sharegpt": "sharegpt", "openai": "openai"}
NOT_READ = {"kto_tag": "KTO data (kto_tag)", "images": "images", "videos": "videos", "audios": "audio"}


def read_registry(path: str, storage: dict | None = None) -> dict | None:
    """The registry of a LLaMA-Factory data folder, or None when ``path`` is not one (not a
    folder, no ``dataset_info.json``, or a ``datasets`` saved dataset)."""
    if any(ch in path for ch in "*?["):
        return None
    fs, root = get_fs(path, storage)
    try:
        if not fs.isdir(root):
            return None
        reg = join(root, REGISTRY)
        if not fs.exists(reg) or fs.exists(join(root, "state.json")) or fs.exists(join(root, "dataset_dict.json")):
            return None
        with fs.open(reg, "rb") as fh:
            data = json.loads(fh.read())
    except ValueError as e:
        raise SourceError(f"{join(path, REGISTRY)}: not valid JSON ({str(e).splitlines()[0][:200]})") from None
    except OSError:
        return None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise SourceError(f"{join(path, REGISTRY)}: a dataset registry maps names to entries (objects)")
    return data


def registry_sources(folder: str, registry: dict, picked: list[str] | None, defaults: dict,
                     storage: dict | None = None) -> list[Source]:
    """The sources a registry's entries make (``picked``: by name, in that order; else every
    entry an SFT build can read whose file is in the folder)."""
    fs, root = get_fs(folder, storage)
    if picked:
        unknown = [n for n in picked if n not in registry]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], list(registry), n=3)
            raise SourceError(f"--dataset {unknown[0]}: no such entry in {join(folder, REGISTRY)}"
                              + (f"; did you mean {', '.join(close)}?" if close else ""))
    out, absent = [], 0
    for name in picked or list(registry):
        entry = registry[name]
        why = _unreadable(entry, fs, root, bool(picked))
        if why:
            if picked:
                raise SourceError(f"--dataset {name}: {why.strip()}")
            if why.endswith(ABSENT):
                absent += 1
            else:  # its data is here, and not built: said entry by entry
                log.warning("%s: entry %s is not built: %s", join(folder, REGISTRY), name, why)
            continue
        out.append(_source(name, entry, folder, defaults))
    if absent:
        log.info("%s: %d entr%s name a hub dataset or a file not in the folder (not read)", join(folder, REGISTRY),
                 absent, "y" if absent == 1 else "ies")
    if not out:
        raise SourceError(f"--input {folder}: no entry of its {REGISTRY} can be built (pick entries with --dataset)")
    return out


def _unreadable(entry: dict, fs, root: str, picked: bool = False) -> str:
    """Why this build does not read this entry ("" when it does): preference pairs only when
    picked by name."""
    if "file_name" not in entry:
        hub = next((k for k in HUB_KEYS if k in entry), None)
        return f"it names a hub dataset ({hub}); raysft reads local or object-store files only{ABSENT}" if hub \
            else "it has no file_name"
    if not isinstance(entry["file_name"], str):
        return "its file_name is not a string"
    for key, what in NOT_READ.items():
        if entry.get(key) or (entry.get("columns") or {}).get(key):
            return f"{what}, which raysft does not read"
    if entry.get("ranking") and not picked:
        return "preference pairs (ranking: true): pick them with --dataset to build a pair dataset"
    fmt = entry.get("formatting", "alpaca")
    if fmt not in FORMATTING:
        return f"formatting {fmt!r} is not one of {', '.join(FORMATTING)}"
    if not fs.exists(join(root, entry["file_name"])):
        return f"{entry['file_name']} is not in the folder{ABSENT}"
    return ""


def _source(name: str, entry: dict, folder: str, defaults: dict) -> Source:
    columns = dict(entry.get("columns") or {})
    fmt = FORMATTING[entry.get("formatting", "alpaca")]
    if fmt == "alpaca" and "prompt" in columns and "response" not in columns and not \
            set(columns) & {"query", "history", "messages"}:
        fmt, columns = "text", {"text": columns["prompt"]}  # a pretraining entry: {"prompt": "text"}
    spec: dict = {"columns": columns}
    if entry.get("tags"):
        spec["tags"] = entry["tags"]
    try:
        keys = parse_map_keys(spec)
    except ValueError as e:
        raise SourceError(f"{REGISTRY} entry {name!r}: {e}") from None
    for ignored in ("subset", "split", "num_samples", "folder"):
        if entry.get(ignored) not in (None, "train"):
            log.warning("%s entry %r: %s is not applied (every row of its file is read)", REGISTRY, name, ignored)
    return Source(name, [join(folder, entry["file_name"])], fmt, keys, defaults.get("loss", "assistant"))
