import json
from pathlib import Path

import pytest

from raysft.normalize import normalize
from raysft.templates import Specials, Template, TemplateError

CONV = {
    "messages": [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao."},
    ]
}


def answers(r):
    return [r.text[a:b] for a, b in r.spans]


def test_llama3_exact():
    r = Template("llama3").render(normalize(CONV))
    assert r.text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nCiao.<|eot_id|>"
    )
    assert answers(r) == ["Hello!<|eot_id|>", "Ciao.<|eot_id|>"]


def test_chatml_exact():
    r = Template("chatml").render(normalize(CONV))
    assert r.text == (
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\nCiao.<|im_end|>\n"
    )
    assert answers(r) == ["Hello!<|im_end|>", "Ciao.<|im_end|>"]


def test_qwen2_default_system():
    r = Template("qwen2").render(normalize({"instruction": "a", "output": "b"}))
    assert r.text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                             "assistant.<|im_end|>\n")  # Qwen2.5's


def test_llama2_exact():
    r = Template("llama2", Specials("<s>", "</s>")).render(normalize(CONV))
    assert r.text == "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST] Ciao. </s>"
    assert answers(r) == ["Hello! </s>", "Ciao. </s>"]


def test_loss_policies():
    conv = normalize(CONV)
    assert answers(Template("llama3", loss="last").render(conv)) == ["Ciao.<|eot_id|>"]
    r = Template("llama3", loss="all").render(conv)
    assert r.spans == [(0, len(r.text))]
    masked = dict(CONV)
    masked["messages"] = [dict(m) for m in CONV["messages"]]
    masked["messages"][2]["loss_weight"] = 0
    assert answers(Template("llama3").render(normalize(masked))) == ["Ciao.<|eot_id|>"]


def test_chatml_tools_and_tool_calls():
    rec = {
        "conversations": [
            {"from": "human", "value": "weather?"},
            {"from": "function_call", "value": '{"name": "w", "arguments": {"c": "P"}}'},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "Sunny."},
        ],
        "tools": '[{"name": "w"}]',
    }
    r = Template("chatml").render(normalize(rec))
    assert '<tools>\n{"type": "function", "function": {"name": "w"}}\n</tools>' in r.text  # as Qwen's templates
    assert answers(r) == ['<tool_call>\n{"name": "w", "arguments": {"c": "P"}}\n</tool_call><|im_end|>', "Sunny.<|im_end|>"]
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n" in r.text


def test_unknown_template_and_missing_chat_template():
    with pytest.raises(TemplateError, match="unknown template"):
        Template("nope")
    with pytest.raises(TemplateError, match="chat_template"):
        Template("auto", chat_template=None)


def test_auto_template_finds_assistant_spans():
    jinja = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    t = Template("auto", Specials("<s>", "</s>"), jinja, special_strings=("<s>", "</s>"))
    r = t.render(normalize(CONV))
    assert answers(r) == ["Hello!</s>", "Ciao.</s>"]


def test_template_kwargs_a_builtin_does_not_read_are_an_error():
    import subprocess
    import sys

    from raysft.templates import Template, TemplateError

    with pytest.raises(TemplateError, match=r"'enable_thinking'.*does not read it"):
        Template("qwen2", template_kwargs={"enable_thinking": False})
    Template("qwen3", template_kwargs={"enable_thinking": False})  # qwen3 reads it (as Qwen3's template does)
    with pytest.raises(TemplateError, match="'thinking'.*does not read it"):
        Template("deepseek-v3", template_kwargs={"thinking": True})
    Template("deepseek-v3.1", template_kwargs={"thinking": True})  # its thinking mode
    Template("llama3.1", template_kwargs={"date_string": "01 Jan 2025"})  # the one a built-in reads
    r = subprocess.run([sys.executable, "-m", "raysft.build", "--input", "x.jsonl", "--tokenizer", "t", "--output", "o",
                        "--template", "chatml", "--template-kwargs", '{"enable_thinking": false}'],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "does not read it" in r.stderr and "--template auto" in r.stderr


SOT, EOT = "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>"
COMMAND_R_LIKE = (  # Command-R's tool-use template in small: instructions after the last message
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}" + SOT + "<|USER_TOKEN|>{{ m['content'] }}" + EOT + "{% endif %}"
    "{% if m['role'] == 'assistant' %}" + SOT + "<|CHATBOT_TOKEN|>{{ m['content'] }}" + EOT + "{% endif %}"
    "{% endfor %}" + SOT + "<|SYSTEM_TOKEN|>Write 'Action:' followed by a list of actions." + EOT
    + "{% if add_generation_prompt %}" + SOT + "<|CHATBOT_TOKEN|>{% endif %}")
APPENDS_AFTER_AN_ANSWER = (  # history renders the same whatever follows; a block only after a final answer
    "{% for m in messages %}" + SOT + "{{ m['role'] }}\n{{ m['content'] }}" + EOT + "{% endfor %}"
    "{% if messages[-1]['role'] == 'assistant' %}" + SOT + "<|SYSTEM_TOKEN|>rate the answer" + EOT + "{% endif %}"
    "{% if add_generation_prompt %}" + SOT + "assistant\n{% endif %}")


@pytest.mark.parametrize("jinja", [COMMAND_R_LIKE, APPENDS_AFTER_AN_ANSWER])
def test_text_a_template_writes_after_a_turns_end_of_turn_token_is_never_trained(jinja):
    """A turn's output ends at the first EOS token after its text: neither the instructions a
    template appends after the last message nor the next turn's header start carry loss (on
    the render and on the render plan's replay alike)."""
    from raysft.templates import Template

    specials = ("<BOS_TOKEN>", SOT, EOT, "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>")
    t = Template("auto", Specials("<BOS_TOKEN>", EOT), jinja, special_strings=specials)
    conv = normalize({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A1"},
                                   {"role": "user", "content": "again"}, {"role": "assistant", "content": "A2"}]})
    for _ in range(3):  # rendered, then replayed from the shape's plan
        r = t.render(conv)
        assert [r.text[a:b] for a, b in r.spans] == ["A1" + EOT, "A2" + EOT]
        assert r.text.endswith("rate the answer" + EOT if "rate" in jinja else "actions." + EOT)


R7B_LIKE = (  # Command-R7B's in small: the generation prompt (with an empty reasoning block) always written
    "{{ bos_token }}" + SOT + "<|SYSTEM_TOKEN|>preamble" + EOT + "{% for m in messages %}"
    "{% if m['role'] == 'user' %}" + SOT + "<|USER_TOKEN|>{{ m['content'] }}" + EOT + "{% endif %}"
    "{% if m['role'] == 'assistant' %}" + SOT + "<|CHATBOT_TOKEN|><|START_RESPONSE|>{{ m['content'] }}"
    "<|END_RESPONSE|>" + EOT + "{% endif %}"
    "{% endfor %}" + SOT + "<|CHATBOT_TOKEN|>{% if not enable_thinking %}<|START_THINKING|><|END_THINKING|>{% endif %}")


@pytest.mark.parametrize("marked", [False, True])
def test_a_template_that_always_writes_its_generation_prompt_trains_each_turn_through_its_own_end(marked):
    """A template that writes its generation prompt after the last message whatever
    ``add_generation_prompt`` says, with a reasoning block a turn in the history does not have:
    each answer is placed after its header, and its loss ends at its own end-of-turn marker,
    before the marker that opens every turn (the next turn, or the prompt after the last
    one), also where the tokenizer's EOS is not that marker and the markers are plain text."""
    from raysft.templates import Template

    markers = (SOT, EOT, "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|START_RESPONSE|>",
               "<|END_RESPONSE|>", "<|START_THINKING|>", "<|END_THINKING|>")
    t = Template("auto", Specials("<BOS_TOKEN>", "<|im_end|>"), R7B_LIKE,
                 special_strings=("<BOS_TOKEN>", "<|im_end|>") + (markers if marked else ()))
    conv = normalize({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A1"},
                                   {"role": "user", "content": "again"}, {"role": "assistant", "content": "A2"}]})
    for _ in range(3):  # rendered, then replayed from the shape's plan
        r = t.render(conv)
        own = "<|START_RESPONSE|>{}<|END_RESPONSE|>" + EOT
        assert [r.text[a:b] for a, b in r.spans] == [own.format("A1"), own.format("A2")]
        assert r.text.endswith(EOT + SOT + "<|CHATBOT_TOKEN|><|START_THINKING|><|END_THINKING|>")


V32_LIKE = (  # DeepSeek-V3.2's in small: the prompt pre-fills an empty reasoning block a history turn renders as </think>
    "{% set ns = namespace(tool=false) %}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% set ns.tool = false %}"
    "{% elif m['role'] == 'assistant' %}{{ '\\n\\n</think>' if ns.tool else '<｜Assistant｜></think>' }}"
    "{{ m['content'] or '' }}{% for c in m['tool_calls'] or [] %}{{ '\\n\\n' }}<｜DSML｜call name=\"{{ c['function']['name'] }}\">"
    "{{ c['function']['arguments']['q'] }}</｜DSML｜call>{% endfor %}<｜end▁of▁sentence｜>{% set ns.tool = false %}"
    "{% elif m['role'] == 'tool' %}{{ '\\n\\n' }}<result>{{ m['content'] }}</result>{% set ns.tool = true %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '\\n\\n<think></think>' if ns.tool else '<｜Assistant｜><think></think>' }}"
    "{% endif %}")


@pytest.mark.parametrize("marked", [False, True])
def test_a_turn_that_renders_the_generation_prompt_in_another_form_trains_from_where_they_part(marked):
    """Where a history turn writes the generation prompt in another form (the prompt pre-fills
    ``<think></think>``, the turn writes ``</think>``), its output starts where the two part, at
    a whole marker: never inside ``<｜Assistant｜><``, and a tool call that continues after a tool
    result keeps its ``</think>`` and call block trained (white space alone is no header)."""
    from raysft.templates import Template

    eos = "<｜end▁of▁sentence｜>"
    markers = ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>")
    t = Template("auto", Specials(None, eos), V32_LIKE, special_strings=(eos,) + (markers if marked else ()))
    call = {"id": "c1", "type": "function", "function": {"name": "search", "arguments": {"q": "b"}}}
    conv = normalize({"messages": [
        {"role": "user", "content": "find"}, {"role": "assistant", "content": "Looking."},
        {"role": "user", "content": "more"}, {"role": "assistant", "content": "", "tool_calls": [dict(call, id="c0")]},
        {"role": "tool", "tool_call_id": "c0", "content": "r1"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "r2"}, {"role": "assistant", "content": "Both."}]})
    call_text = '\n\n<｜DSML｜call name="search">b</｜DSML｜call>'
    for _ in range(3):  # rendered, then replayed from the shape's plan
        r = t.render(conv)
        assert [r.text[a:b] for a, b in r.spans] == [
            "</think>Looking." + eos, "</think>" + call_text + eos, "</think>" + call_text + eos, "</think>Both." + eos]


CALL_WITHOUT_HEADER = (  # DeepSeek-R1-Distill-Qwen's later calls in small: written right after the user's text
    "{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' and m['tool_calls'] %}{{ '\\n' }}<｜call｜>{{ m['tool_calls'][0]['function']['name'] }}"
    "<｜end▁of▁sentence｜>{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>"
    "{% elif m['role'] == 'tool' %}<｜out｜>{{ m['content'] }}<｜out_end｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")


@pytest.mark.parametrize("marked", [False, True])
def test_a_turn_a_template_writes_with_no_header_after_a_user_message_is_placed(marked):
    """A turn the template writes right after the user's text, with nothing of the generation
    prompt's marker before it, starts where the conversation up to the user's message ends."""
    from raysft.templates import Template

    eos = "<｜end▁of▁sentence｜>"
    markers = ("<｜User｜>", "<｜Assistant｜>", "<｜call｜>", "<｜out｜>", "<｜out_end｜>")
    t = Template("auto", Specials(None, eos), CALL_WITHOUT_HEADER,
                 special_strings=(eos,) + (markers if marked else ()))
    call = {"id": "c1", "type": "function", "function": {"name": "search", "arguments": {"q": "b"}}}
    conv = normalize({"messages": [
        {"role": "user", "content": "find"}, {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "r"}, {"role": "assistant", "content": "Found."}]})
    for _ in range(3):  # rendered, then replayed from the shape's plan
        r = t.render(conv)
        assert [r.text[a:b] for a, b in r.spans] == ["\n<｜call｜>search" + eos, "Found." + eos]


SPACED_END = (  # Nemotron-Nano-v2's in small: "\n<END>" between turns, "<END>" after the last; tools required
    "{% if not tools %}{{ raise_exception('tools required') }}{% endif %}<BEGIN>system tools{% for m in messages %}"
    "{% if m['role'] == 'user' %}<BEGIN>User\n{{ m['content'] }}<END>"
    "{% else %}<BEGIN>Assistant\n{{ m['content'] }}{{ '<END>' if loop.last else '\\n<END>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<BEGIN>Assistant\n{% else %}<BEGIN>System\nRate it.<END>{% endif %}")


def test_a_turns_end_marker_the_template_writes_after_white_space_between_turns_is_trained():
    """A history turn writes its end-of-turn marker after a newline where the last turn writes
    it right after the text: each turn keeps its marker, and neither the next header nor a
    block written after the last message is trained, also for a template that refuses a
    conversation without tools (its opening marker then read from the render itself)."""
    from raysft.templates import Template

    t = Template("auto", Specials(None, "<|im_end|>"), SPACED_END, special_strings=("<|im_end|>",))
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
    conv = normalize({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A1"},
                                   {"role": "user", "content": "again"}, {"role": "assistant", "content": "A2"}],
                      "tools": [tool]})
    for _ in range(3):  # rendered, then replayed from the shape's plan
        r = t.render(conv)
        assert [r.text[a:b] for a, b in r.spans] == ["A1\n<END>", "A2<END>"]


FOLDED_RESULTS = (  # Gemma-4's in small: a turn's tool results written inside the model's turn, before its text
    "{% for m in messages %}{% if m['role'] == 'user' %}<|turn>user\n{{ m['content'] }}<turn|>\n"
    "{% elif m['role'] == 'assistant' %}{% if not ns_open is defined %}<|turn>model\n{% endif %}"
    "{% for c in m['tool_calls'] or [] %}<|tool_call>call:{{ c['function']['name'] }}{q:{{ c['function']['arguments']['q'] }}}"
    "<tool_call|>{% endfor %}"
    "{% for r in messages[loop.index0 + 1:] %}{% if r['role'] == 'tool' %}<|tool_response>response:{{ r['content'] }}"
    "<tool_response|>{% endif %}{% endfor %}"
    "{{ m['content'] or '' }}<turn|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}")


@pytest.mark.parametrize("marked", [False, True])
def test_tool_results_a_template_writes_inside_the_assistant_turn_are_never_trained(marked):
    """A template that writes a turn's tool results inside the model's turn, between its calls
    and its text: the turn's calls and text are trained, the results' blocks are not."""
    from raysft.templates import Template

    markers = ("<|turn>", "<turn|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>")
    t = Template("auto", Specials(None, "<turn|>"), FOLDED_RESULTS,
                 special_strings=("<turn|>",) + (markers if marked else ()))
    calls = [{"id": f"c{k}", "type": "function", "function": {"name": "search", "arguments": {"q": q}}}
             for k, q in enumerate(("a", "b"))]
    conv = normalize({"messages": [
        {"role": "user", "content": "find"}, {"role": "assistant", "content": "Looking.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c0", "content": "RESULT-ONE"},
        {"role": "tool", "tool_call_id": "c1", "content": "RESULT-TWO"}, {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "Bye."}]})
    for _ in range(3):  # rendered, then replayed from the shape's plan
        r = t.render(conv)
        trained = [r.text[a:b] for a, b in r.spans]
        assert "RESULT" not in "".join(trained) and "response:" not in "".join(trained)
        assert trained[0].endswith("call:search{q:a}<tool_call|><|tool_call>call:search{q:b}<tool_call|>")
        assert trained[1:] == ["Looking.<turn|>", "Done.<turn|>", "Bye.<turn|>"]


R1_TOOLS = (  # DeepSeek-R1-Distill's tool turns in small: the answer continues after the results, no header

"{% set ns = namespace(is_tool=false) %}{{ bos_token }}"
"{% for message in messages %}"
"{% if message['role'] == 'user' %}{% set ns.is_tool = false %}{{ '<｜User｜>' + message['content'] }}{% endif %}"
"{% if message['role'] == 'assistant' and message['tool_calls'] %}{% set ns.is_tool = false %}"
"{{ '<｜Assistant｜><｜tool▁calls▁begin｜>' + message['tool_calls'][0]['function']['name'] + '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' }}{% endif %}"
"{% if message['role'] == 'assistant' and message['content'] is not none and not message['tool_calls'] %}"
"{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
"{% if ns.is_tool %}{{ '<｜tool▁outputs▁end｜>' + content + '<｜end▁of▁sentence｜>' }}{% set ns.is_tool = false %}"
"{% else %}{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{% endif %}{% endif %}"
"{% if message['role'] == 'tool' %}{% set ns.is_tool = true %}{{ '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}{% endif %}"
"{% endfor %}{% if ns.is_tool %}{{ '<｜tool▁outputs▁end｜>' }}{% endif %}"
"{% if add_generation_prompt and not ns.is_tool %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")


@pytest.mark.parametrize("marked", [False, True])
def test_an_answer_the_template_continues_after_a_tool_result_is_placed(marked):
    """A template that writes no assistant header after tool results (the answer continues the
    results' block) places that answer by design, where the conversation up to the results ends,
    with its markers as special tokens or as plain text; a header matched in part never takes
    the first character of the marker after it."""
    from raysft.templates import Template

    sp = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>",
          "<｜tool▁calls▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
          "<｜tool▁output▁end｜>")
    t = Template("auto", Specials("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"), R1_TOOLS,
                 special_strings=sp if marked else ())
    conv = normalize({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
            "name": "get", "arguments": "{\"c\": \"x\"}"}}]},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}]})
    for _ in range(3):  # rendered, then replayed from the shape's plan
        r = t.render(conv)
        assert [r.text[a:b] for a, b in r.spans] == [
            "<｜tool▁calls▁begin｜>get<｜tool▁calls▁end｜><｜end▁of▁sentence｜>", "It is sunny.<｜end▁of▁sentence｜>"]


GPT_OSS_LIKE = (  # gpt-oss in small: <|end|> closes a turn another follows, <|return|> the last

    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|start|>user<|message|>{{ m['content'] }}<|end|>{% endif %}"
    "{% if m['role'] == 'assistant' %}<|start|>assistant<|channel|>final<|message|>{{ m['content'] }}"
    "{% if loop.last and not add_generation_prompt %}<|return|>{% else %}<|end|>{% endif %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}")

GPT_OSS_TOOLS = (  # gpt-oss' tool turns in small: the tool result's header repeats the called name
    "{% set last = namespace(name=none) %}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|start|>user<|message|>{{ m['content'] }}<|end|>{% endif %}"
    "{% if m['role'] == 'assistant' and m['tool_calls'] %}{% set c = m['tool_calls'][0]['function'] %}"
    "<|start|>assistant to=functions.{{ c['name'] }}<|channel|>commentary json<|message|>{{ c['arguments'] | tojson }}"
    "<|call|>{% set last.name = c['name'] %}"
    "{% elif m['role'] == 'assistant' %}<|start|>assistant<|channel|>final<|message|>{{ m['content'] }}"
    "{% if loop.last and not add_generation_prompt %}<|return|>{% else %}<|end|>{% endif %}{% endif %}"
    "{% if m['role'] == 'tool' %}<|start|>functions.{{ last.name }} to=assistant<|channel|>commentary<|message|>"
    "{{ m['content'] | tojson }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}")


@pytest.mark.parametrize("marked", [False, True])
@pytest.mark.parametrize("args", [{"c": "x"}, {"items": ["a", "b"], "n": 2}, {}])
def test_a_called_name_the_template_repeats_after_the_turn_is_not_trained(marked, args):
    """gpt-oss repeats the called function's name in the tool result's header
    (``<|start|>functions.NAME``): the call's turn ends at its own closing marker, whatever its
    arguments hold (strings, other values, none), on the render and on the plan's replay."""
    from raysft.templates import Template

    sp = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>") if marked else ()
    t = Template("auto", Specials(None, "<|return|>"), GPT_OSS_TOOLS, special_strings=sp)
    conv = normalize({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": args}}]},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}]})
    call = f" to=functions.get_weather<|channel|>commentary json<|message|>{json.dumps(args)}<|call|>"
    for _ in range(3):  # rendered, then replayed from the shape's plan
        r = t.render(conv)
        assert [r.text[a:b] for a, b in r.spans] == [
            "<|channel|>final<|message|>Hello.<|end|>", call, "<|channel|>final<|message|>It is sunny.<|return|>"]


NEMOTRON3_LIKE = (  # Nemotron-3's reasoning in small: its generation prompt opens the block
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|im_start|>user\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% if m['reasoning_content'] %}<think>\n{{ m['reasoning_content'] }}\n</think>\n{% else %}<think></think>{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


@pytest.mark.parametrize("marked", [False, True])
def test_the_reasoning_opening_a_generation_prompt_supplies_is_not_trained(marked):
    """Nemotron-3's generation prompt ends with ``<think>\n``; a turn without reasoning renders
    ``<think></think>``: the ``<think>`` is the prompt's (the model never writes it), the rest
    the model's, with reasoning or without, with the markers as special tokens or as text."""
    from raysft.templates import Template

    sp = ("<|im_start|>", "<|im_end|>", "<think>", "</think>") if marked else ()
    t = Template("auto", Specials(None, "<|im_end|>"), NEMOTRON3_LIKE, special_strings=sp)
    conv = normalize({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A1"},
                                   {"role": "user", "content": "again"},
                                   {"role": "assistant", "content": "A2", "reasoning_content": "R2"}]})
    for _ in range(3):
        r = t.render(conv)
        assert [r.text[a:b] for a, b in r.spans] == ["</think>A1<|im_end|>", "R2\n</think>\nA2<|im_end|>"]


LFM_LIKE = (  # LFM2.5's in small: a {% generation %} block that holds the newline after <|im_end|>
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("marked", [False, True])
def test_white_space_a_generation_block_holds_after_the_end_of_turn_is_not_trained(marked):
    """A template's own ``{% generation %}`` block that ends with ``<|im_end|>\n`` (LFM2.5):
    the model stops at the marker, the newline after it is not its output (as with every other
    template), with the marker as a special token or as text."""
    from raysft.templates import Template

    sp = ("<|startoftext|>", "<|im_start|>", "<|im_end|>") if marked else ()
    t = Template("auto", Specials("<|startoftext|>", "<|im_end|>"), LFM_LIKE, special_strings=sp)
    conv = normalize({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A1\n"},
                                   {"role": "user", "content": "again"}, {"role": "assistant", "content": "A2"}]})
    for _ in range(3):
        r = t.render(conv)
        assert [r.text[a:b] for a, b in r.spans] == ["A1\n<|im_end|>", "A2<|im_end|>"]
        assert r.text.endswith("A2<|im_end|>\n")


GLM_LIKE = (  # GLM-4.6 tool calls in small: </tool_call> is text after the special </arg_value>
"[gMASK]<sop>{% for m in messages %}"
     "{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}{% endif %}"
     "{% if m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] or '' }}"
     "{% for tc in m['tool_calls'] or [] %}<tool_call>{{ tc['function']['name'] }}\n"
     "{% for k, v in tc['function']['arguments'].items() %}<arg_key>{{ k }}</arg_key>\n<arg_value>{{ v }}</arg_value>\n{% endfor %}</tool_call>{% endfor %}{% endif %}"
     "{% if m['role'] == 'tool' %}<|observation|>\n{{ m['content'] }}{% endif %}"
     "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.mark.parametrize("marked", [False, True])
def test_each_turn_is_closed_by_its_own_marker(marked):
    """A turn another turn follows is closed by the marker its own render writes (gpt-oss:
    ``<|end|>``), the last one by its own (``<|return|>``), with the markers as special tokens
    or as plain text."""
    from raysft.templates import Template

    sp = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>") if marked else ()
    t = Template("auto", Specials(None, "<|return|>"), GPT_OSS_LIKE, special_strings=sp)
    conv = normalize({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A1"},
                                   {"role": "user", "content": "again"}, {"role": "assistant", "content": "A2"}]})
    for _ in range(3):
        r = t.render(conv)
        assert [r.text[a:b] for a, b in r.spans] == ["<|channel|>final<|message|>A1<|end|>",
                                                    "<|channel|>final<|message|>A2<|return|>"]


def test_a_turns_own_text_after_its_last_special_token_is_trained():
    """GLM-4.6 writes a call's arguments between special tokens and closes it with plain
    ``</tool_call>``: the turn is not cut at the last special token."""
    from raysft.templates import Template

    sp = ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|observation|>", "<tool_call>", "<arg_key>",
          "</arg_key>", "<arg_value>", "</arg_value>")
    t = Template("auto", Specials(None, "<|endoftext|>"), GLM_LIKE, special_strings=sp)
    conv = normalize({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
            "name": "get", "arguments": "{\"c\": \"x\"}"}}]},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}]})
    for _ in range(3):
        r = t.render(conv)
        assert [r.text[a:b] for a, b in r.spans] == [
            "<tool_call>get\n<arg_key>c</arg_key>\n<arg_value>x</arg_value>\n</tool_call>", "It is sunny."]


NEMO = Path(__file__).resolve().parents[2] / "shared" / "templates" / "mistralai-Mistral-Nemo-Instruct-2407.jinja"


@pytest.mark.parametrize("marked", [False, True])
def test_a_header_is_found_by_design_where_the_template_writes_no_generation_prompt(marked):
    """Mistral-Nemo moves the system prompt into the last user turn (history re-renders) and has
    no generation prompt: an answer starts after what the template writes after the preceding
    message's payload (``[/INST]``), with the markers as plain text too (a system message made
    such rows 'cannot place assistant turn')."""
    from raysft.templates import Template

    sp = ("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
          "[TOOL_RESULTS]", "[/TOOL_RESULTS]") if marked else ()
    t = Template("auto", Specials("<s>", "</s>"), NEMO.read_text(), special_strings=sp)
    conv = normalize({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                                   {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                                   {"role": "assistant", "content": "d"}]})
    for _ in range(3):
        r = t.render(conv)
        assert [r.text[a:b] for a, b in r.spans] == ["b</s>", "d</s>"]
