"""The data and habits users bring from LLaMA-Factory, MindSpeed and Megatron (#35): each rule
checked on its own and on the peers' own demo data, with the peers' own code as the reference
where it is at hand (transformers' apply_chat_template, megatron-core's tokenizer steps and
IndexedDatasetBuilder, the datasets library's save_to_disk)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import reader

from raysft.build import main as build_main
from raysft.normalize import RecordError, normalize, parse_map_keys
from raysft.templates import ABSENT, Template, canonical_template
from raysft.tokenize import SampleBuilder, decode_signed, load_tokenizer_info

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
QWEN3 = SHARED / "tokenizers" / "qwen3"
MISTRAL = SHARED / "tokenizers" / "mistral-v3"
TRAINERS = Path(os.environ.get("RAYSFT_TRAINERS", ROOT / ".venv" / "trainers"))
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}


def _sg(*turns, **extra):
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}


# --------------------------------------------------------------------------- normalizing by rule


def test_sharegpt_role_order_is_llamafactorys_positional_rule():
    # an observation after a plain gpt turn is valid ShareGPT (user side: human/observation)
    conv = normalize(_sg(("human", "q"), ("gpt", "let me look"), ("observation", "{}"), ("gpt", "done")))
    assert [m.role for m in conv.messages] == ["user", "assistant", "tool", "assistant"]
    conv = normalize(_sg(("system", "s"), ("human", "q"), ("function_call", json.dumps(CALL)), ("observation", "r"),
                         ("gpt", "a")))
    assert conv.messages[0].role == "system" and conv.messages[2].tool_calls[0]["name"] == "get_weather"
    for bad in (_sg(("human", "a"), ("human", "b"), ("gpt", "c")), _sg(("gpt", "a")), _sg(("human", "a")),
                _sg(("human", "a"), ("observation", "r"), ("gpt", "c")), _sg(("human", "a"), ("gpt", "b"), ("gpt", "c"))):
        with pytest.raises(RecordError) as e:
            normalize(bad)
        assert e.value.reason in ("role_order", "no_final_assistant")


def test_a_function_call_turn_holds_one_call_or_a_list():
    conv = normalize(_sg(("human", "q"), ("function_call", json.dumps([CALL, {"name": "b", "arguments": "{}"}])),
                         ("observation", "r1"), ("observation", "r2"), ("gpt", "a")))
    assert [c["name"] for c in conv.messages[1].tool_calls] == ["get_weather", "b"]


def test_a_tool_call_only_turn_has_one_form_whatever_the_input():
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    inputs = [
        _sg(("human", "q"), ("function_call", json.dumps(CALL)), ("observation", "r"), ("gpt", "a")),
        *({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", **content, "tool_calls": [call]},
                        {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]}
          for content in ({"content": None}, {"content": ""}, {})),
        {"messages": [{"role": "user", "content": "q"},
                      {"role": "assistant", "content": [{"type": "tool_call", "value": json.dumps(CALL)}]},
                      {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]},
    ]
    for rec in inputs:
        m = normalize(rec).messages[1]
        assert m.content is None and m.tool_calls[0]["name"] == "get_weather", rec


def test_map_keys_take_nested_tags_and_dataset_info_columns():
    keys = parse_map_keys({"messages": "conversations", "tags": {"role_tag": "role", "content_tag": "content",
                                                                 "user_tag": "user", "assistant_tag": "assistant"}})
    assert keys == {"messages": "conversations", "role_tag": "role", "content_tag": "content", "user_tag": "user",
                    "assistant_tag": "assistant"}
    rec = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert [m.role for m in normalize(rec, "sharegpt", keys).messages] == ["user", "assistant"]
    # ShareGPT turns under tag names of their own
    keys = parse_map_keys('{"messages": "dialog", "tags": {"role_tag": "speaker", "content_tag": "text", '
                          '"user_tag": "customer", "assistant_tag": "agent", "observation_tag": "env"}}')
    rec = {"dialog": [{"speaker": "customer", "text": "q"}, {"speaker": "agent", "text": "a"},
                      {"speaker": "env", "text": "r"}, {"speaker": "agent", "text": "b"}]}
    assert [m.role for m in normalize(rec, "sharegpt", keys).messages] == ["user", "assistant", "tool", "assistant"]
    with pytest.raises(RecordError, match="unknown role 'human'"):
        normalize(_sg(("human", "q"), ("gpt", "a")) | {"dialog": [{"speaker": "human", "text": "q"}]}, "sharegpt",
                  keys)
    assert parse_map_keys({"columns": {"prompt": "question", "response": "answer"}}) == {
        "prompt": "question", "response": "answer"}
    for bad in ('{"tags": ["role"]}', '{"kto_tag": "k"}', '{"tags": {"role_tag": 1}}', '{"bogus": "x"}'):
        with pytest.raises(ValueError):
            parse_map_keys(bad)


def test_peer_template_names_map_to_the_built_ins_and_unknown_names_list_close_ones(tmp_path, capsys):
    assert canonical_template("qwen") == "qwen2"
    assert canonical_template("intern2") == "internlm2"
    assert canonical_template("deepseek3") == "deepseek-v3"
    assert canonical_template("qwen3") == "qwen3" and canonical_template("auto") == "auto"
    with pytest.raises(SystemExit) as e:
        build_main(["--input", "x.jsonl", "--tokenizer", str(QWEN3), "--output", str(tmp_path / "o"),
                    "--template", "qwen3x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "did you mean qwen3" in err.strip().splitlines()[-1]


# --------------------------------------------------------------------------- templates


_HF: dict = {}


def _apply(info, messages, tools=None, **kw):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    key = (info.path, info.chat_template)
    if key not in _HF:
        _HF[key] = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(info.tokenizer_json),
                                           chat_template=info.chat_template, **(info.special_map or {}))
    out = _HF[key].apply_chat_template(messages, tools=tools, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _tool_rows():
    glaive = json.loads((SHARED / "data" / "glaive_toolcall_en_demo.json").read_text())
    return [r for r in glaive if any(t["from"] == "function_call" for t in r["conversations"])][:40]


def test_tool_call_only_turns_render_under_qwen3s_own_template():
    info = load_tokenizer_info(str(QWEN3))
    assert "tool_call" in info.chat_template
    rows = _tool_rows()
    b = SampleBuilder(info, "auto")
    ids, reasons, _ = b([json.dumps(r).encode() for r in rows])
    assert reasons == [""] * len(rows)  # (was template_error: 'dict object' has no attribute 'content')
    t, tok = b.template, info.load()
    for rec, signed in zip(rows, ids):
        conv = normalize(rec)
        tokens, loss = decode_signed(signed)
        assert tokens.tolist() == _apply(info, t.messages(conv), conv.tools)
        text = tok.decode(tokens[loss].tolist(), skip_special_tokens=False)
        for m in conv.messages:
            for c in m.tool_calls or ():
                assert c["name"] in text  # the call is trained


# a template in the manner of DeepSeek-R1-Distill's: it writes a turn's calls only when it has no
# content string, and only the content otherwise
R1_STYLE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}<|User|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' and message['content'] is not string %}<|Assistant|>"
    "{% for tool in message['tool_calls'] %}<|call|>{{ tool['function']['name'] }}"
    "{{ tool['function']['arguments'] | tojson }}{% endfor %}<|end|>"
    "{% elif message['role'] == 'assistant' %}<|Assistant|>{{ message['content'] }}<|end|>"
    "{% elif message['role'] == 'tool' %}<|tool|>{{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>{% endif %}")


def test_each_template_gets_the_form_it_renders_a_call_under_and_a_dropped_call_is_a_reject(tmp_path):
    info = load_tokenizer_info(str(QWEN3))
    info.chat_template = R1_STYLE
    t = Template("auto", info.specials, R1_STYLE, info.special_strings)
    assert t._jinja.call_form is ABSENT  # "" would drop the call here
    b = SampleBuilder(info, "auto")
    rows = [_sg(("human", "q"), ("function_call", json.dumps(CALL)), ("observation", "r"), ("gpt", "a")),
            {"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": "sure", "tool_calls": [{"type": "function", "function": CALL}]},
                          {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}]}]
    ids, reasons, _ = b([json.dumps(r).encode() for r in rows])
    assert reasons == ["", "tool_call_not_rendered"]
    conv = normalize(rows[0])
    assert decode_signed(ids[0])[0].tolist() == _apply(info, t.messages(conv))


def test_think_loss_is_an_explicit_switch():
    info = load_tokenizer_info(str(QWEN3))
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    r2 = {"messages": [{"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "hello", "reasoning_content": "think first"}]}

    def loss_text(template, mode, kwargs, record):
        t = Template(template, info.specials, info.chat_template, info.special_strings, "assistant", kwargs,
                     info.special_map, None, mode)
        r = t.render(normalize(record))
        return "".join(r.text[a:b] for a, b in r.spans)

    for template in ("auto", "qwen3"):
        for kwargs in ({}, {"enable_thinking": False}):
            assert loss_text(template, "train", kwargs, rec) == "<think>\n\n</think>\n\nhello there<|im_end|>"
            assert loss_text(template, "mask", kwargs, rec) == "hello there<|im_end|>"
            assert loss_text(template, "mask", kwargs, r2) == "hello<|im_end|>"
            assert loss_text(template, "train", kwargs, r2).startswith("<think>\nthink first\n</think>")
    # auto keeps what the template says: Qwen3's enable_thinking false moves the empty block into the
    # prompt; the built-in reads the switch the same way
    for template in ("auto", "qwen3"):
        assert loss_text(template, "auto", {"enable_thinking": False}, rec) == "hello there<|im_end|>"
        assert loss_text(template, "auto", {}, rec) == "<think>\n\n</think>\n\nhello there<|im_end|>"
        assert loss_text(template, "auto", {"enable_thinking": False}, r2).startswith("<think>\nthink first")


# --------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def lf_folder(tmp_path_factory):
    """A LLaMA-Factory data folder: its registry as dataset_info.json beside its demo files."""
    folder = tmp_path_factory.mktemp("lfdata")
    for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json", "glaive_toolcall_en_demo.json", "dpo_zh_demo.json",
                 "wiki_demo.txt"):
        (folder / name).symlink_to(SHARED / "data" / name)
    (folder / "dataset_info.json").write_bytes((SHARED / "data" / "lf_dataset_info.json").read_bytes())
    return folder


def _run(argv):
    r = subprocess.run([sys.executable, "-m", "raysft.build", *argv], capture_output=True, text=True, cwd=ROOT)
    return r.returncode, r.stderr


def test_a_llamafactory_data_folder_builds_with_default_flags(lf_folder, tmp_path):
    out = tmp_path / "out"
    code, err = _run(["--input", str(lf_folder), "--tokenizer", str(QWEN3), "--output", str(out), "--engine",
                      "local", "--seq-length", "32768"])
    assert code == 0, err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_read"] == 999 + 1000 + 300 + 30 and stats["rejected"] == {} and stats["dropped"] == {}
    assert [s["name"] for s in stats["sources"]] == ["alpaca_en_demo", "alpaca_zh_demo", "glaive_toolcall_en_demo",
                                                     "wiki_demo"]
    assert ("entry dpo_zh_demo is not built: preference pairs (ranking: true): pick them with --dataset to build a "
            "pair dataset") in err
    assert stats["parity"]["mismatched"] == 0 and stats["parity"]["refused_by_template"] == 0


@pytest.mark.slow  # five builds (~15 s): CI's slow run
def test_dataset_picks_registry_entries_with_one_line_errors(lf_folder, tmp_path):
    out = tmp_path / "out"
    code, err = _run(["--input", str(lf_folder), "--dataset", "glaive_toolcall_en_demo,wiki_demo", "--tokenizer",
                      str(QWEN3), "--output", str(out), "--engine", "local", "--seq-length", "32768"])
    assert code == 0, err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_read"] == 330 and [s["name"] for s in stats["sources"]] == ["glaive_toolcall_en_demo",
                                                                                   "wiki_demo"]
    for pick, says in (("glaive_toolcal", "did you mean glaive_toolcall"), ("alpaca_en", "hub dataset"),
                       ("identity", "identity.json is not in the folder")):
        code, err = _run(["--input", str(lf_folder), "--dataset", pick, "--tokenizer", str(QWEN3), "--output",
                          str(tmp_path / "x"), "--engine", "local"])
        assert code == 1 and says in err and len(err.strip().splitlines()) == 1, err
    # a ranking entry builds preference pairs (tests/test_pairs.py); picked with an SFT entry, one line
    code, err = _run(["--input", str(lf_folder), "--dataset", "dpo_zh_demo,wiki_demo", "--tokenizer", str(QWEN3),
                      "--output", str(tmp_path / "y"), "--engine", "local", "--seq-length", "32768"])
    assert code == 1 and err.strip().splitlines()[-1].startswith("raysft.build: error: the inputs hold 300 preference "
                                                                 "pairs and 30 SFT samples"), err


def _save_to_disk(rows, folder, splits=None):
    code = ("import datasets, json, sys; rows = json.load(open(sys.argv[1]));"
            "d = datasets.DatasetDict({k: datasets.Dataset.from_list(rows[a:b]) for k, (a, b) in json.loads(sys.argv[3]).items()})"
            " if sys.argv[3] != 'null' else datasets.Dataset.from_list(rows); d.save_to_disk(sys.argv[2])")
    src = folder.parent / (folder.name + ".json")
    src.write_text(json.dumps(rows))
    subprocess.run([sys.executable, "-c", code, str(src), str(folder), json.dumps(splits)], check=True,
                   env={**os.environ, "PYTHONPATH": str(TRAINERS)}, capture_output=True)


@pytest.mark.slow  # the datasets library in two subprocesses and two builds (~16 s): CI's slow run
def test_a_datasets_save_to_disk_folder_is_read_as_its_arrow_files(tmp_path):
    rows = json.loads((SHARED / "data" / "alpaca_en_demo.json").read_text())[:60]
    _save_to_disk(rows, tmp_path / "saved")
    _save_to_disk(rows, tmp_path / "dict", {"train": [0, 40], "test": [40, 60]})
    assert {p.name for p in (tmp_path / "saved").iterdir()} >= {"state.json", "dataset_info.json"}
    for folder, n in (("saved", 60), ("dict", 40)):
        out = tmp_path / f"out-{folder}"
        code, err = _run(["--input", str(tmp_path / folder), "--tokenizer", str(QWEN3), "--output", str(out),
                          "--engine", "local", "--on-bad-record", "skip"])
        assert code == 0, err
        stats = json.loads((out / "stats.json").read_text())
        assert stats["rows_read"] == n == stats["samples_written"], folder  # no registry or state rows


# --------------------------------------------------------------------------- plain text


def _megatron_reference(texts, tokenizer: Path, prefix: Path):
    """What preprocess_data.py --append-eod writes, by its steps with megatron-core's own parts:
    ``tokenizer(text).input_ids`` (megatron-core's HuggingFaceTokenizer.tokenize), the EOS as EOD
    on a document with tokens, one sequence a document, DType.optimal_dtype(len(tokenizer)).
    (The tool itself writes an empty document for a text with no tokens, which raysft drops as
    ``empty_text``: the input here has none, as the README says.)"""
    from megatron.core.datasets import indexed_dataset
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer))
    eod = hf.convert_tokens_to_ids(hf.eos_token)
    builder = indexed_dataset.IndexedDatasetBuilder(str(prefix) + ".bin",
                                                    dtype=indexed_dataset.DType.optimal_dtype(len(hf)))
    for text in texts:
        ids = hf(text).input_ids
        if ids:
            builder.add_document(ids + [eod], [len(ids) + 1])
    builder.finalize(str(prefix) + ".idx")
    return eod, len(hf)


@pytest.fixture(scope="module")
def text_input(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    texts = [line.rstrip("\n") for line in (SHARED / "data" / "wiki_demo.txt").open(encoding="utf-8") if line.strip()]
    texts += [json.loads(x)["question"] for x in (SHARED / "data" / "gsm8k_train.jsonl").open()][:400]
    texts += [" leading space", "a <|im_end|> marker in the text", "tabs\tand\nnewlines\n"]
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    (folder / "job.yaml").write_text("chunk_bytes: 30000\nnum_shards: 3\n")  # several chunks and shards
    return path, texts


@pytest.mark.parametrize("tokenizer,engine", [(MISTRAL, "local"), (QWEN3, "local"),
                                              pytest.param(MISTRAL, "ray", marks=pytest.mark.slow)])
def test_plain_text_no_pack_native_is_megatrons_preprocess_data_byte_for_byte(text_input, tokenizer, engine,
                                                                              tmp_path):
    path, texts = text_input
    ref = tmp_path / "ref"
    _megatron_reference(texts, tokenizer, ref)
    out = tmp_path / "out"
    code, err = _run(["--input", str(path), "--format", "text", "--tokenizer", str(tokenizer), "--output", str(out),
                      "--no-pack", "--seq-length", "1000000", "--engine", engine, "--config",
                      str(path.parent / "job.yaml")])
    assert code == 0, err
    for ext in ("bin", "idx"):
        assert (out / f"data.{ext}").read_bytes() == Path(f"{ref}.{ext}").read_bytes(), (tokenizer.name, ext)


def test_plain_text_is_pretraining_data_for_megatron_cores_gpt_dataset(text_input, tmp_path):
    from trainers import megatron_gpt_dataset

    path, texts = text_input
    out = tmp_path / "out"
    code, err = _run(["--input", str(path), "--format", "text", "--tokenizer", str(QWEN3), "--output", str(out),
                      "--engine", "local", "--seq-length", "512"])
    assert code == 0, err
    info = load_tokenizer_info(str(QWEN3))
    eod = info.token_to_id(info.eos)
    r = reader(out)
    assert len(r) == json.loads((out / "stats.json").read_text())["samples_written"]
    assert all((r[i] >= 0).all() and r[i][-1] == eod for i in range(len(r)))  # every token trains; each ends on EOD
    ds = megatron_gpt_dataset(str(out / "data"), 256, 20, eod, info.vocab_size, str(tmp_path / "cache"))
    item = ds[0]
    assert len(item["tokens"]) == 256 and int(item["loss_mask"].sum()) == 256


def test_a_txt_file_is_one_document_a_line_and_mixes_with_chat_data(tmp_path):
    out = tmp_path / "out"
    txt = tmp_path / "wiki.txt"
    txt.write_bytes((SHARED / "data" / "wiki_demo.txt").read_bytes() + b"\n\n")  # blank lines hold no document
    sources = [{"name": "chat", "input": str(SHARED / "data" / "alpaca_en_demo.json"), "share": 0.8},
               {"name": "text", "input": str(txt), "share": 0.2}]
    code, err = _run(["--source", json.dumps(sources[0]), "--source", json.dumps(sources[1]), "--tokenizer", str(QWEN3),
                      "--output", str(out), "--engine", "local", "--seq-length", "32768", "--mix-unit", "tokens"])
    assert code == 0, err
    stats = json.loads((out / "stats.json").read_text())
    by_name = {s["name"]: s for s in stats["sources"]}
    assert stats["rejected"] == {} and by_name["text"]["rows"] == 30 and by_name["text"]["format"] == "auto"
    assert by_name["text"]["written"]["loss_tokens"] == by_name["text"]["written"]["tokens"]  # every token trains
    assert abs(by_name["text"]["share"] - 0.2) < 0.03
