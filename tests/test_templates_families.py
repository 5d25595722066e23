"""Each built-in template against its family's published chat format (expected strings are
written by hand from each family's documented format, not produced by the code)."""

import pytest

from raysft.normalize import normalize
from raysft.templates import MARKERS, Specials, Template

CONV = {"messages": [
    {"role": "system", "content": "SYS"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao."},
]}
TOOLS_CONV = {
    "messages": [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "c0ffee123", "type": "function",
                         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "c0ffee123", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ],
    "tools": [{"name": "get_weather", "description": "Weather now", "parameters": {"type": "object"}}],
}

PLAIN = {
    "qwen3": (
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nCiao.<|im_end|>\n",
        ["Hello!<|im_end|>", "<think>\n\n</think>\n\nCiao.<|im_end|>"],
    ),
    "mistral": (  # Tekken (Mistral Nemo): no SentencePiece spaces
        "<s>[INST]Hi[/INST]Hello!</s>[INST]SYS\n\nBye[/INST]Ciao.</s>",
        ["Hello!</s>", "Ciao.</s>"],
    ),
    "internlm2": (
        "<s><|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nCiao.<|im_end|>\n",
        ["Hello!<|im_end|>", "Ciao.<|im_end|>"],
    ),
    "deepseek-v3": (
        "<｜begin▁of▁sentence｜>SYS<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜><｜User｜>Bye<｜Assistant｜>"
        "Ciao.<｜end▁of▁sentence｜>",
        ["Hello!<｜end▁of▁sentence｜>", "Ciao.<｜end▁of▁sentence｜>"],
    ),
    "glm4": (
        "[gMASK]<sop><|system|>\nSYS<|user|>\nHi<|assistant|>\nHello!<|user|>\nBye<|assistant|>\nCiao.<|endoftext|>",
        ["\nHello!<|user|>", "\nCiao.<|endoftext|>"],
    ),
}

TOOLS = {
    "qwen3": (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Weather now", '
        '"parameters": {"type": "object"}}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nweather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        "<|im_end|>\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nIt is sunny.<|im_end|>\n"
    ),
    "mistral": (
        '<s>[AVAILABLE_TOOLS][{"type": "function", "function": {"name": "get_weather", "description": "Weather now", '
        '"parameters": {"type": "object"}}}][/AVAILABLE_TOOLS][INST]weather in Paris?[/INST]'
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "c0ffee123"}]</s>'
        '[TOOL_RESULTS]{"content": "sunny", "call_id": "c0ffee123"}[/TOOL_RESULTS]It is sunny.</s>'
    ),
    "internlm2": (
        '<s><|im_start|>system name=<|plugin|>\n[{"name": "get_weather", "description": "Weather now", '
        '"parameters": {"type": "object"}}]<|im_end|>\n<|im_start|>user\nweather in Paris?<|im_end|>\n'
        '<|im_start|>assistant\n<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
        "<|action_end|><|im_end|>\n<|im_start|>environment name=<|plugin|>\nsunny<|im_end|>\n"
        "<|im_start|>assistant\nIt is sunny.<|im_end|>\n"
    ),
    "deepseek-v3": (
        "<｜begin▁of▁sentence｜>## Tools\nYou have access to the following tools:\n\n### get_weather\n"
        'Description: Weather now\n\nParameters: {"type": "object"}\n'
        "<｜User｜>weather in Paris?<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"
        'get_weather\n```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>'
        "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
        "It is sunny.<｜end▁of▁sentence｜>"
    ),
    "glm4": (
        "[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
        "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n\n## get_weather\n\n{\n    \"name\": \"get_weather\",\n"
        '    "description": "Weather now",\n    "parameters": {\n        "type": "object"\n    }\n}\n'
        "在调用上述函数时，请使用 Json 格式表示调用的参数。<|user|>\nweather in Paris?"
        '<|assistant|>get_weather\n{"city": "Paris"}<|observation|>\nsunny<|assistant|>\nIt is sunny.<|endoftext|>'
    ),
}


def answers(r):
    return [r.text[a:b] for a, b in r.spans]


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_system_and_multi_turn(name):
    text, expected_answers = PLAIN[name]
    r = Template(name, Specials()).render(normalize(CONV))
    assert r.text == text
    assert answers(r) == expected_answers


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_tool_turns(name):
    r = Template(name, Specials()).render(normalize(TOOLS_CONV))
    assert r.text == TOOLS[name]
    got = answers(r)
    assert len(got) == 2 and got[-1].startswith(("It is sunny.", "\nIt is sunny.", "<think>"))
    assert "get_weather" in got[0]  # the tool call is trained on as assistant output
    assert "sunny" not in got[0] and "weather in Paris?" not in "".join(got)  # results and prompt carry no loss


def test_qwen3_reasoning_only_after_the_last_query():
    conv = normalize({"messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "old thoughts"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d", "reasoning_content": "new thoughts"},
    ]})
    r = Template("qwen3").render(conv)
    assert "old thoughts" not in r.text
    assert answers(r) == ["b<|im_end|>", "<think>\nnew thoughts\n</think>\n\nd<|im_end|>"]


def test_reasoning_in_families_without_a_format_is_a_think_block():
    conv = normalize({"messages": [{"role": "user", "content": "q"},
                                   {"role": "assistant", "content": "a", "reasoning_content": "r"}]})
    assert answers(Template("deepseek-v3").render(conv)) == ["<think>\nr\n</think>\n\na<｜end▁of▁sentence｜>"]


def test_deepseek_v31_thinking_mode_trains_the_closing_think():
    """DeepSeek-V3.1's thinking mode (``thinking``, or ``enable_thinking`` as its template reads
    it): the prompt ends at ``<think>``, the reasoning (empty without one), ``</think>`` and the
    answer are the turn's output; non-thinking mode (the default) keeps ``<think></think>`` in the
    prompt, as the vendor template writes it."""
    conv = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                         {"role": "user", "content": "q2"},
                         {"role": "assistant", "content": "b", "reasoning_content": "r"}]}
    plain = Template("deepseek-v3.1").render(normalize(conv))
    assert "<｜Assistant｜><think></think>a" in plain.text
    assert answers(plain) == ["a<｜end▁of▁sentence｜>", "r</think>b<｜end▁of▁sentence｜>"]
    for key in ("thinking", "enable_thinking"):
        r = Template("deepseek-v3.1", template_kwargs={key: True}).render(normalize(conv))
        assert r.text == plain.text  # the same text: only what is trained moves
        assert answers(r) == ["</think>a<｜end▁of▁sentence｜>", "r</think>b<｜end▁of▁sentence｜>"]


def test_every_builtin_declares_its_markers():
    from raysft.templates import BUILTINS as BUILTIN

    assert set(MARKERS) == set(BUILTIN)
    for name, markers in MARKERS.items():
        text = Template(name, Specials()).render(normalize(CONV)).text
        if name != "llama2":
            text += Template(name, Specials()).render(normalize(TOOLS_CONV)).text
        missing = [m for m in markers if m not in text]
        assert not missing, (name, missing)


CALL = {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}


def _turn(**assistant):
    return normalize({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", **assistant}]})


def test_qwen_reasoning_and_call_one_newline_only():
    conv = _turn(content=None, reasoning_content="r", tool_calls=[CALL])
    assert answers(Template("qwen3").render(conv)) == [
        '<think>\nr\n</think>\n\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>']
    assert answers(Template("chatml").render(conv)) == answers(Template("qwen3").render(conv))


def test_qwen3_strips_newlines_not_spaces_and_reads_inline_think():
    assert answers(Template("qwen3").render(_turn(content="\n  a", reasoning_content="\nr  \n"))) == [
        "<think>\nr  \n</think>\n\n  a<|im_end|>"]
    # reasoning written inline in the content is that turn's reasoning, not a second block
    assert answers(Template("qwen3").render(_turn(content="<think>\nr\n</think>\n\na"))) == [
        "<think>\nr\n</think>\n\na<|im_end|>"]


def test_qwen2_is_qwen25_default_system():
    text = Template("qwen2").render(_turn(content="a")).text
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                           "assistant.<|im_end|>\n")


@pytest.mark.parametrize("name", ["llama3", "glm4", "chatml", "qwen2", "deepseek-v3", "internlm2"])
def test_reasoning_survives_tool_calls(name):
    got = "".join(answers(Template(name).render(_turn(content="c", reasoning_content="deep thought",
                                                        tool_calls=[CALL])))).replace(" ", "")
    assert "deepthought" in got and '"x":1' in got and got.index("deepthought") < got.index('"x":1')


def test_glm4_writes_every_parallel_call():
    two = [CALL, {"type": "function", "function": {"name": "g", "arguments": {"y": 2}}}]
    conv = normalize({"messages": [{"role": "user", "content": "q"},
                                   {"role": "assistant", "content": "", "tool_calls": two},
                                   {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"},
                                   {"role": "assistant", "content": "done"}]})
    r = Template("glm4").render(conv)
    assert answers(r) == ['f\n{"x": 1}<|assistant|>g\n{"y": 2}<|observation|>', "\ndone<|endoftext|>"]
    assert r.text.endswith("<|observation|>\n1<|observation|>\n2<|assistant|>\ndone<|endoftext|>")


def test_tools_in_openai_form_and_plain_form_render_alike():
    plain = dict(TOOLS_CONV)
    openai = dict(TOOLS_CONV, tools=[{"type": "function", "function": TOOLS_CONV["tools"][0]}])
    for name in ["qwen3", "deepseek-v3", "deepseek-v3.1", "glm4", "llama3", "mistral", "internlm2"]:
        assert Template(name).render(normalize(plain)).text == Template(name).render(normalize(openai)).text, name
