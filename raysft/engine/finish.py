"""Finish stage: merge each split's shards into one dataset (with its provenance and
data_order.txt), rejects.jsonl, the checks (rows read = written + rejected + dropped, packs and
samples against the plan), stats.json, the layout's metadata, the report, and the commit."""

from __future__ import annotations

import json
import logging
import sys
import time

import numpy as np

from .. import stats as stats_mod
from ..errors import BuildError
from ..fs import join
from ..merge import copy_into
from ..read import LineCounter
from ..report import render_report
from ..tokenize import save_tokenizer
from .context import Build
from .measure import Blocks, Measured
from .mixture import Mix
from .plan import Packing, Plans, pack_shape
from .prepare import OUTPUT_FILES
from .writing import Written

log = logging.getLogger("raysft")


def finish(b: Build, m: Measured, x: Mix, p: Plans, w: Written) -> dict:
    """Merge, check, describe and commit the build; its stats.json."""
    cfg, out, layout, files, storage = b.cfg, b.out, b.layout, b.files, b.storage
    out_fs, tmp, S = out.fs, out.tmp, cfg.seq_length
    totals, blocks, pairs, enc_stats, parity = m.totals, m.blocks, m.pairs, m.enc_stats, m.parity
    selection, sel_summaries, natural = x.selection, x.summaries, x.natural
    train, valid, epochs, digest = p.train, p.valid, p.epochs, p.digest
    metas, valid_metas = w.metas, w.valid_metas
    info, added, pad_id, sources, lock, manifest, watch = b.info, b.added, b.pad_id, b.sources, b.lock, b.manifest, b.watch
    # ---- merge (into _tmp), check, commit
    keeps_shards = layout.keeps_shards and not cfg.drop_shards
    present = layout.final_files() + list(OUTPUT_FILES)
    watch.progress("merge", f"{len(metas)} shard(s) into one dataset")
    merged = _merge(out_fs, tmp, "", layout, metas, keeps_shards)
    if keeps_shards:
        present.append("shards")
    valid_stats = None
    if valid is not None:
        watch.progress("merge", f"{len(valid_metas)} validation shard(s) into one dataset")
        vmerged = _merge(out_fs, tmp, "valid", layout, valid_metas, keeps_shards)
        if vmerged["packs"] != valid.packs:
            raise BuildError(f"internal check failed: {vmerged['packs']} validation packs written, plan has "
                             f"{valid.packs}")
        present.append("valid")
    with out_fs.open(join(tmp, "inputs.json"), "w") as f:
        json.dump([fi.url for fi in files], f, indent=1)
    if added:
        out_fs.makedirs(join(tmp, "tokenizer"), exist_ok=True)
        save_tokenizer(out_fs, join(tmp, "tokenizer"), info)
        present.append("tokenizer")
    if blocks.rejects:
        watch.progress("merge", "rejects.jsonl")
        write_rejects(out_fs, tmp, blocks, files, storage)
        present.append("rejects.jsonl")
    b.timed("merge")
    log.info("stage seconds: %s", ", ".join(f"{k} {v}" for k, v in b.timings.items()))

    P = train.packs
    tokens = train.tokens * epochs
    samples = train.samples * epochs * (2 if pairs else 1)  # a pair is two samples (its sides)
    if merged["packs"] != P * epochs:
        raise BuildError(f"internal check failed: {merged['packs']} packs written, plan has {P * epochs}")
    if merged.get("samples") is not None and merged["samples"] != samples and layout.counts_samples:
        raise BuildError(f"internal check failed: {merged['samples']} samples written for {samples}")
    rejected, dropped = totals.rejected, dict(totals.dropped)
    rows_written = totals.rows_written
    if selection is not None:
        rows_written = sum(sm["rows_written"] for sm in sel_summaries)
        left_out = sum(sm["not_sampled"] for sm in sel_summaries)
        if left_out:
            dropped["not_sampled"] = left_out
    rej_n, drop_n = sum(rejected.values()), sum(dropped.values())
    if totals.rows != rows_written + rej_n + drop_n:
        raise BuildError(f"internal check failed: rows read {totals.rows} != written {rows_written} + rejected "
                         f"{rej_n} + dropped {drop_n}")
    lossy: dict = {}
    for m in metas + valid_metas:
        for k, v in (m.get("unrepresentable") or {}).items():
            lossy[k] = lossy.get(k, 0) + v
    for k, v in lossy.items():
        log.warning("layout %s cannot represent %s: %d time(s)", layout.name, k, v)
    if valid is not None:
        vs = [sum(x) for x in zip(*(sm["valid"] for sm in sel_summaries))]
        valid_stats = {"spec": cfg.validation, "rows": vs[0], "samples": vs[1] * (2 if pairs else 1), "tokens": vs[2],
                       "loss_tokens": vs[3], "packs": valid.packs, **({"pairs": vs[1]} if pairs else {}),
                       **stats_mod.packing_figures(valid.tokens, valid.packs, S), "path": "valid/"}
    loss_tokens = (sum(v[2] for sm in sel_summaries for v in sm["per_source"].values()) * epochs
                   if selection is not None else totals.loss_tokens * epochs)
    result = {
        "rows_read": totals.rows,
        "rows_written": rows_written,
        "samples_written": samples,
        "rejected": rejected,
        "dropped": dropped,
        "overlong": {"policy": cfg.overlong, "rows_kept": totals.overlong_kept},
        "tokens": tokens,
        "loss_tokens": loss_tokens,
        **({"pairs": pair_figures(train.samples * epochs, tokens, totals, sel_summaries, epochs)
                     | {"packed": bool(cfg.pack and layout.packs_pairs)}} if pairs else {}),
        # what was written, all epochs (each epoch packed on its own: its bound is per epoch)
        **stats_mod.packing_figures(train.tokens, P, S, epochs),
        "epochs": epochs,
        "tokens_per_epoch": train.tokens,
        "packs_per_epoch": P,
        "length": stats_mod.length_summary(totals.hist_all if totals.hist_all is not None else np.zeros(1)),
        "layout": cfg.layout,
        "pack_capacity": train.cap,
        "pad_to_multiple": int(cfg.pad_to_multiple or 1),
        "tokenizer": cfg.tokenizer,
        "template": cfg.template,
        "template_kwargs": cfg.template_kwargs,
        "template_date": cfg.template_date,
        "think_loss": cfg.think_loss,
        **({"template_render": {"replayed_from_plans": totals.template_paths[0], "rendered": totals.template_paths[1]}}
           if cfg.template == "auto" else {}),
        "encoder": {"name": enc_stats.name, "version": enc_stats.version, "rows_checked": enc_stats.rows_checked,
                    "mismatches": enc_stats.mismatches, "fallbacks": enc_stats.fallbacks,
                    **({"why": enc_stats.why} if enc_stats.why else {})},
        "parity": parity,
        "loss_policy": cfg.loss,
        "packed": cfg.pack,
        "seed": cfg.seed,
        "shards": len(metas),
        "vocab_size": info.vocab_size,
        "added_special_tokens": added,
        "pad_id": pad_id,
        **pack_shape(train),  # (max_sample_length, max_samples_per_pack, min_pack_targets)
        "unrepresentable": lossy,
        "rows_per_file": {files[s].url: int(c) for s, c in sorted(totals.rows_per_src.items())},
        "pack_fill": {str(t): int(c) * epochs for t, c in enumerate(train.plan.pack_fill()) if c},
        "sample_lengths": {str(L): int(c) for L, c in enumerate(totals.hist_all) if c},
        "mix_unit": cfg.mix_unit,
        "sources": source_stats(sources, totals, natural, selection, sel_summaries, cfg.mix_unit),
        **({"validation": valid_stats} if valid_stats else {}),
        **({"cache": {"dir": cfg.cache, "rows_from_cache": totals.cached_rows,
                      "rows_tokenized": totals.rows - totals.cached_rows}} if cfg.cache else {}),
    }
    result.update(layout.extra_stats(result))
    present += layout.write_extra(out_fs, tmp, result)
    watch.progress("merge", "stats.json, the report and the layout's metadata")
    with out_fs.open(join(tmp, "stats.json"), "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    if valid is not None:
        write_split(out_fs, join(tmp, "valid"), layout, result, valid, valid_stats, files)
    with out_fs.open(join(tmp, "report.html"), "w") as f:
        f.write(render_report(result))
    watch.progress("commit", "the files moved to their final names")
    out.commit(present, manifest | {"plan": digest}, lock)
    print(stats_mod.format_summary(result), file=sys.stderr)
    print(f"output           {cfg.output}  ({time.time() - b.t0:.1f} s)", file=sys.stderr)
    return result


def pair_figures(pairs: int, tokens: int, totals, sel_summaries, epochs: int) -> dict:
    """stats.json's ``pairs``: pairs written (all epochs) and their tokens per side."""
    chosen = (sum(sm.get("chosen_tokens", 0) for sm in sel_summaries) if sel_summaries is not None
              else totals.chosen_tokens) * epochs
    return {"written": pairs, "chosen_tokens": chosen, "rejected_tokens": tokens - chosen}


# what a split's own stats.json repeats of the build's: how it was made and how to read it
SPLIT_KEYS = ("layout", "seq_length", "pack_capacity", "tokenizer", "template", "template_kwargs", "template_date",
              "think_loss", "loss_policy", "packed", "seed", "vocab_size", "added_special_tokens", "pad_id",
              "mix_unit", "pad_to_multiple")


def write_split(fs, root: str, layout, result: dict, split: Packing, figures: dict, files) -> None:
    """``valid/`` as a dataset of its own (readers and ``raysft.inspect`` open it like the
    main one): its stats.json (its own counts, and how the build made it), inputs.json and the
    layout's metadata, by the same rules as the training split's."""
    stats = {k: result[k] for k in SPLIT_KEYS if k in result}
    stats.update({
        "split": "valid", "validation": figures.get("spec"),
        "rows_written": figures["rows"], "samples_written": split.samples, "tokens": split.tokens,
        "loss_tokens": figures["loss_tokens"], "epochs": 1, "tokens_per_epoch": split.tokens,
        "packs_per_epoch": split.packs,
        **stats_mod.packing_figures(split.tokens, split.packs, result["seq_length"]),
        "pack_fill": {str(t): int(c) for t, c in enumerate(split.plan.pack_fill()) if c},
        "sample_lengths": {str(n): int(c) for n, c in enumerate(split.hist) if c},
        **pack_shape(split),
    })
    stats.update(layout.extra_stats(stats))
    layout.write_extra(fs, root, stats)
    with fs.open(join(root, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
        f.write("\n")
    with fs.open(join(root, "inputs.json"), "w") as f:
        json.dump([fi.url for fi in files], f, indent=1)


def _merge(fs, tmp: str, sub: str, layout, metas: list[dict], keeps_shards: bool) -> dict:
    """Merge one packed dataset's shards (in ``tmp/sub``) into ``tmp/sub/data``, with its
    provenance and its data_order.txt; the shards stay (their listing is data_order.txt) or go."""
    base = join(tmp, sub) if sub else tmp
    names = [f"shards/part-{m['shard']:05d}" for m in metas]
    merged = layout.merge(fs, [join(base, n) for n in names], join(base, "data"), metas)
    copy_into(fs, [join(base, n + ".prov") for n in names], join(base, "provenance.bin"))
    for n in names:
        for extra in (".prov", ".meta.json"):
            if fs.exists(join(base, n + extra)):
                fs.rm(join(base, n + extra))
    if not keeps_shards:
        fs.rm(join(base, "shards"), recursive=True)
    with fs.open(join(base, "data_order.txt"), "w") as f:
        f.write("".join(line + "\n" for line in (layout.data_order(names) if keeps_shards
                                                   else layout.final_files()[:1])))
    return merged


def source_stats(sources: list, totals, natural: list[float], selection, summaries, unit: str) -> list[dict]:
    """stats.json's ``sources``: per source, what was read and tokenized, what it was asked to
    give and what it gave (per epoch), in samples, tokens and loss tokens, and its share of
    the output in the mix unit, asked and realized."""
    k_unit = stats_mod.SOURCE_FIGURES.index(unit) - 1  # written[k] holds the figures after "rows"
    written = {}
    for k in range(len(sources)):
        fig = totals.per_source.get(k, [0, 0, 0, 0])
        if selection is None:
            written[k] = fig[1:]
        else:
            written[k] = [sum(sm["per_source"].get(k, [0, 0, 0])[j] for sm in summaries) for j in range(3)]
    total = sum(w[k_unit] for w in written.values()) or 1
    out = []
    for k, s in enumerate(sources):
        fig = totals.per_source.get(k, [0, 0, 0, 0])
        asked = {x: getattr(s, x) for x in ("share", "budget", "repeat") if getattr(s, x) is not None}
        out.append({
            "name": s.name, "inputs": s.inputs, "format": s.format, "map_keys": s.map_keys, "loss": s.loss,
            "asked": asked or {"repeat": 1.0},
            "rows": fig[0], "samples": fig[1], "tokens": fig[2], "loss_tokens": fig[3],
            "factor": round(written[k][k_unit] / natural[k], 6) if natural[k] else 0.0,
            "written": {"samples": written[k][0], "tokens": written[k][1], "loss_tokens": written[k][2]},
            "share": round(written[k][k_unit] / total, 6),
        })
    return out


def write_rejects(fs, tmp: str, blocks: Blocks, files, storage) -> int:
    """rejects.jsonl from the blocks' reject files, in input order, each with its file
    position (JSON Lines: the line, counted in one pass per file as far as its last reject)."""
    counters: dict[int, LineCounter] = {}
    n = 0
    with fs.open(join(tmp, "rejects.jsonl"), "wb") as out:
        for _, name in sorted(blocks.rejects):
            path = join(tmp, "rejects", name)
            with fs.open(path, "rb") as f:
                for line in f:
                    e = json.loads(line)
                    url = files[e["src"]].url
                    if e["offset"] >= 0:
                        counter = counters.setdefault(e["src"], LineCounter(url, storage))
                        where = f"{url} line {counter.line(e['offset'])}"
                    else:
                        where = f"{url} record {e['row']} (0-based)"
                    out.write(json.dumps({"source": url, "position": where, "reason": e["reason"],
                                          "message": e["message"], "record": e["bad_raw"]},
                                         ensure_ascii=False).encode("utf-8", "replace") + b"\n")
                    n += 1
    for c in counters.values():
        c.close()
    fs.rm(join(tmp, "rejects"), recursive=True)
    return n


def nothing_to_write(b: Build, m: Measured) -> BuildError:
    """Every record was rejected or dropped (or there were none): the output gets the reasons
    (rejects.jsonl, stats.json) without a dataset or _SUCCESS, and the build fails."""
    out, blocks, files, storage, cfg, totals = b.out, m.blocks, b.files, b.storage, b.cfg, m.totals
    if not totals.rows:
        return BuildError(f"the inputs hold no records ({len(files)} file(s), {', '.join(f.url for f in files[:3])}"
                          + (" ..." if len(files) > 3 else "") + ")")
    present = ["stats.json"]
    if blocks.rejects:
        write_rejects(out.fs, out.tmp, blocks, files, storage)
        present.append("rejects.jsonl")
    with out.fs.open(join(out.tmp, "stats.json"), "w") as f:
        json.dump({"rows_read": totals.rows, "samples_written": 0, "rejected": totals.rejected, "dropped": totals.dropped,
                   "failed": "every record was rejected or dropped", "tokenizer": cfg.tokenizer,
                   "template": cfg.template, "layout": cfg.layout, "seq_length": cfg.seq_length}, f, indent=2)
    out.commit(present, b.manifest, b.lock, success=False)
    return BuildError(f"no sample left to write: every record was rejected or dropped "
                      f"({stats_mod.format_reasons(totals.reasons)}); "
                      f"see {join(cfg.output, 'rejects.jsonl')}")
