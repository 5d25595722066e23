import json

import pytest

from raysft.normalize import RecordError, normalize, parse_map_keys


def roles(conv):
    return [m.role for m in conv.messages]


def test_alpaca_with_system_history_and_input():
    rec = {"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "Be brief.",
           "history": [["hi", "hey"]]}
    c = normalize(rec)
    assert roles(c) == ["system", "user", "assistant", "user", "assistant"]
    assert c.messages[3].content == "Translate\nbonjour"
    assert c.messages[4].content == "hello"


def test_alpaca_empty_input_is_not_appended():
    c = normalize({"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca")
    assert c.messages[0].content == "Say hi"


def test_sharegpt_tool_calls_from_glaive_layout(shared_data):
    rows = json.load(open(shared_data / "glaive_toolcall_en_demo.json"))
    with_call = next(r for r in rows if any(t["from"] == "function_call" for t in r["conversations"]))
    c = normalize(with_call)
    # glaive's bare {name, description, parameters} reach templates in the OpenAI form
    assert c.tools and c.tools[0]["type"] == "function" and "name" in c.tools[0]["function"]
    assert c.functions[0] is c.tools[0]["function"]
    call = next(m for m in c.messages if m.tool_calls)
    assert call.role == "assistant" and isinstance(call.tool_calls[0]["arguments"], dict)
    assert "tool" in roles(c)
    # every shared row normalizes
    for _i, r in enumerate(rows):
        normalize(r, "sharegpt")


def test_openai_messages_with_tool_calls_and_parts():
    rec = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None,
             "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
            {"role": "tool", "content": "42"},
            {"role": "assistant", "content": "It is 42.", "loss": 0},
        ]
    }
    c = normalize(rec)
    assert c.messages[0].content == "ab"
    assert c.messages[1].tool_calls == [{"name": "f", "arguments": {"x": 1}}]
    assert c.messages[3].loss is False


def test_map_keys():
    keys = parse_map_keys('{"prompt": "q", "response": "a", "system": "sys"}')
    c = normalize({"q": "question?", "a": "answer.", "sys": "S"}, "alpaca", keys)
    assert [m.content for m in c.messages] == ["S", "question?", "answer."]
    with pytest.raises(ValueError, match="unknown key"):
        parse_map_keys('{"bogus": "x"}')


@pytest.mark.parametrize(
    "record, reason",
    [
        ([1, 2], "not_an_object"),
        ({"foo": 1}, "unknown_format"),
        ({"instruction": "x"}, "missing_field"),
        ({"instruction": 3, "output": "y"}, "bad_type"),
        ({"conversations": []}, "empty_conversation"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                            {"from": "gpt", "value": "c"}]}, "role_order"),
        ({"conversations": [{"from": "human", "value": "a"}]}, "no_final_assistant"),
        ({"conversations": [{"from": "alien", "value": "a"}]}, "unknown_role"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}, "empty_assistant"),
        ({"messages": [{"role": "user", "content": {"x": 1}}, {"role": "assistant", "content": "b"}]}, "bad_type"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "{not json"}]},
         "bad_tool_call"),
    ],
)
def test_bad_records_name_their_reason(record, reason):
    with pytest.raises(RecordError) as e:
        normalize(record)
    assert e.value.reason == reason
    assert e.value.message
