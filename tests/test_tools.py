"""inspect, stats, report.html and --help: the tools people look at a dataset with."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import build, reader

from raysft import inspect as insp
from raysft.provenance import PROVENANCE_DTYPE


@pytest.fixture(scope="module", params=["native", "pai", "mindspeed"])
def built(request, tmp_path_factory, ray_session, shared_data, llama3_dir):
    out = tmp_path_factory.mktemp(request.param)
    inputs = [shared_data / "glaive_toolcall_en_demo.json", shared_data / "alpaca_en_demo.json"]
    stats = build(out, inputs, llama3_dir, template="llama3", seq_length=2048, layout=request.param,
                  on_bad_record="skip")
    return out, stats


def test_inspect_pack_marks_loss_and_matches_the_data(built, capsys, llama3_info):
    out, stats = built
    assert insp.main([str(out), "--pack", "3", "--color", "never"]) == 0
    text = capsys.readouterr().out
    ds = insp.Dataset(str(out), {})
    samples = ds.pack_samples(3)
    assert text.count("── sample ") == len(samples) == (ds.prov["pack"] == 3).sum()
    assert "[[" in text and "position ids restart" in text
    tok = llama3_info.load()
    for ids, loss in samples:
        answer = tok.decode(ids[loss].tolist(), skip_special_tokens=False)
        assert answer.endswith("<|eot_id|>")
    if stats["layout"] == "native":
        docs = reader(out).index.document_indices
        assert len(samples) == docs[4] - docs[3]


def test_inspect_sample_by_source_row(built, capsys):
    out, _ = built
    ds = insp.Dataset(str(out), {})
    inputs = json.loads((out / "inputs.json").read_text())
    p = ds.prov[len(ds.prov) // 2]
    name = os.path.basename(inputs[p["src"]])
    assert insp.main([str(out), "--sample", f"{name}:{int(p['row'])}", "--color", "never"]) == 0
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if "<== requested" in ln)
    assert f"{name} record {int(p['row'])}" in line
    assert f"pack {int(p['pack'])} of" in text


def test_provenance_covers_every_sample(built):
    out, stats = built
    prov = np.fromfile(out / "provenance.bin", dtype=PROVENANCE_DTYPE)
    assert len(prov) == stats["samples_written"]
    assert np.all(np.diff(prov["pack"]) >= 0) and prov["pack"].max() == stats["packs"] - 1


def test_stats_cli(shared_data, llama3_dir, ray_session, capsys):
    from raysft.inputstats import main

    assert main([str(shared_data / "glaive_toolcall_en_demo.json"), "--tokenizer", llama3_dir, "--template",
                 "llama3"]) == 0
    text = capsys.readouterr().out
    assert "rows read 300; tokenized 300" in text
    assert re.search(r"\n\s+2048\s+\d+\.\d+%", text) and "histogram:" in text
    assert "max 4043" in text


@pytest.mark.slow  # (default run kept well under 15 min: CI's slow run)
def test_stats_cli_predicts_the_packs_builds_make(shared_data, llama3_dir, ray_session, capsys, tmp_path):
    """The pack column of ``python -m raysft.stats`` is what a build at that seq-length makes."""
    from raysft.inputstats import main

    inputs = [shared_data / "glaive_toolcall_en_demo.json", shared_data / "alpaca_zh_demo.json"]
    assert main([*map(str, inputs), "--tokenizer", llama3_dir, "--template", "llama3",
                 "--seq-lengths", "512,1024"]) == 0
    rows = {int(m[0]): (int(m[1].replace(",", "")), int(m[2].replace(",", "")))
            for m in re.findall(r"^\s+(\d+)\s+[\d.]+%\s+[\d.]+%\s+([\d,]+)\s+([\d,]+)", capsys.readouterr().out,
                                re.M)}
    assert set(rows) == {512, 1024}
    for S in (512, 1024):
        stats = build(tmp_path / str(S), inputs, llama3_dir, template="llama3", seq_length=S)
        assert rows[S] == (stats["packs"], stats["lower_bound_packs"]), S


@pytest.mark.parametrize("module", ["raysft.build", "raysft.inspect", "raysft.stats", "raysft.example"])
def test_help_groups_flags_and_gives_an_example(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert "example" in r.stdout.lower()
    if module != "raysft.example":
        assert len(re.findall(r"^[a-z][a-z ]+:$", r.stdout, flags=re.M)) >= 3  # argument groups


def test_report_plots_are_well_formed_svg_with_their_figures():
    import base64
    import xml.etree.ElementTree as ET

    from raysft.report import render_report

    stats = {"seq_length": 4096, "length": {"count": 6, "mean": 1.0}, "rows_read": 7, "samples_written": 6,
             "rejected": {"invalid_json": 1}, "dropped": {}, "tokens": 24_001, "loss_tokens": 9, "packs": 7,
             "lower_bound_packs": 6, "packing_efficiency": 0.84, "layout": "native", "template": "llama3",
             "tokenizer": "t", "sample_lengths": {"22": 5, "4000": 1}, "pack_fill": {"4001": 6, "3": 1},
             "rows_per_file": {"a<b>.jsonl": 7}}
    page = render_report(stats)
    uris = re.findall(r'<img class="plot" alt="[^"]*" src="data:image/svg\+xml;base64,([^"]+)"', page)
    assert len(uris) == 4
    svgs = [ET.fromstring(base64.b64decode(u)) for u in uris]  # raises on malformed XML
    texts = ["".join(t.itertext()) for t in svgs]
    assert "seq-length 4096" in texts[0] and "4,000" in texts[0]  # the marker and a round x tick
    ns = "{http://www.w3.org/2000/svg}"
    bars = [r for r in svgs[0].iter(ns + "rect") if r.find(ns + "title") is not None]
    assert sorted(r.find(ns + "title").text.split(": ")[1] for r in bars) == ["1", "5"]  # both lengths, counted
    assert "a<b>.jsonl" in texts[2] and "invalid_json" in texts[3]  # labels escaped, then read back intact


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(built, tmp_path):
    out, stats = built
    html = (out / "report.html").read_text()
    assert html.count("<img class=\"plot\"") == 4  # length, fill, files, reasons (glaive has an overlong row)
    assert "packing efficiency" in html and f"{stats['packs']:,}" in html
    browser = chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium not installed")
    r = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
         (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'data-plots-loaded="4"' in r.stdout
