"""``python -m raysft.build``: SFT records in, packed Megatron .bin/.idx out.

Run ``python -m raysft.build --help`` for the flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import (
    ENCODERS,
    ENGINES,
    FORMATS,
    MIX_UNITS,
    OVERLONG_POLICIES,
    PARITY_MODES,
    THINK_LOSS,
    BuildConfig,
    SettingError,
)
from .errors import OneLineParser, classify
from .layouts import LAYOUTS, REGISTRY
from .templates import ALIASES, TEMPLATE_NAMES

EXAMPLE = """\
example:
  python -m raysft.build --input 'data/*.jsonl' --tokenizer /models/Llama-3-8B \\
      --template llama3 --seq-length 4096 --output out/

Outputs in --output: the layout's dataset (native: data.bin + data.idx, Megatron MMIDIDX
int32), data_order.txt, shards/, stats.json, report.html, provenance.bin, inputs.json,
manifest.json, rejects.jsonl (when records were rejected), _SUCCESS (last).
With no RAY_ADDRESS (or --ray-address) Ray starts in-process; otherwise the job joins that cluster.

exit codes: 0 ok, 1 bad input, 2 usage, 3 storage/output, 4 cluster, 70 internal error,
130 interrupted (--resume continues).
"""


def _layout_help() -> str:
    return "; ".join(f"{name}: {lay.summary}" for name, lay in REGISTRY.items())


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m raysft.build",
        description="Turn SFT records (Alpaca, ShareGPT, OpenAI messages, plain text) or preference pairs "
                    "(chosen/rejected) into packed Megatron-family datasets on Ray.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE",
                   help="YAML (or JSON) job file; keys are the flag names below, flags given here override it")
    g = p.add_argument_group("input")
    g.add_argument(
        "--input",
        dest="inputs",
        action="append",
        metavar="PATH",
        help="file, folder or glob of .jsonl/.json/.parquet, local or s3://; repeatable",
    )
    g.add_argument(
        "--source", dest="sources", action="append", metavar="JSON", type=_json_object,
        help='a source with its own inputs, format, keys, loss policy and amount (instead of --input), e.g. '
             '\'{"name": "math", "input": "gsm8k.jsonl", "map_keys": {"prompt": "question", "response": "answer"}, '
             '"share": 0.3}\'; amounts: share (a fraction of the output), budget (an absolute amount) or repeat '
             '(times its own size), counted in --mix-unit; repeatable (a job file takes a sources: list)')
    g.add_argument("--dataset", metavar="NAMES", type=_names,
                   help="with an --input folder holding LLaMA-Factory's dataset_info.json: the entries to build, "
                        "comma-separated (as LLaMA-Factory's dataset:); default: every entry whose file is in the "
                        "folder and that holds SFT records")
    g.add_argument("--mix-unit", choices=MIX_UNITS,
                   help="what source shares and budgets count (default loss_tokens: supervised tokens)")
    g.add_argument("--format", choices=FORMATS, help="record layout (default: auto, detected per record); a record "
                   "with chosen and rejected is a preference pair in any of them (a build is all SFT or all pairs)")
    g.add_argument(
        "--map-keys", metavar="JSON", help='rename input fields, e.g. \'{"prompt": "question", "response": "answer"}\''
    )
    g.add_argument(
        "--on-bad-record",
        choices=("fail", "skip"),
        help="fail (default): stop at the first bad record, naming file and row; "
        "skip: leave it out and list it in rejects.jsonl",
    )
    g = p.add_argument_group("tokenizer and template")
    g.add_argument("--tokenizer", metavar="PATH", help="Hugging Face tokenizer folder or tokenizer.json")
    g.add_argument(
        "--template", metavar="NAME",
        help=f"chat template: auto = the tokenizer's own chat_template (default), or a built-in: "
             f"{', '.join(TEMPLATE_NAMES[:-1])}; LLaMA-Factory's and MindSpeed's names for these are taken too "
             f"({', '.join(sorted(ALIASES))})",
    )
    g.add_argument(
        "--train-on-prompt",
        action="store_const",
        const="all",
        dest="loss",
        help="put loss on every token, not only assistant turns",
    )
    g.add_argument(
        "--mask-history",
        action="store_const",
        const="last",
        dest="loss",
        help="put loss on the last assistant turn only",
    )
    g.add_argument("--think-loss", choices=THINK_LOSS,
                   help="loss on reasoning blocks (<think>...</think>, empty or not): auto (default) trains what the "
                        "template writes inside the assistant's turn (with Qwen3's template, enable_thinking: false moves "
                        "the empty block into the prompt, untrained); train: always, mask: never (recorded in stats.json)")
    g.add_argument("--template-kwargs", metavar="JSON", type=_json_object,
                   help='extra variables for the chat template, e.g. \'{"enable_thinking": false, "date_string": '
                        '"26 Jul 2024"}\' (recorded in stats.json); templates that read the date get a fixed one '
                        "(--template-date)")
    g.add_argument("--template-date", metavar="YYYY-MM-DD",
                   help="the date a chat template reads from strftime_now (auto templates; default 2024-07-26, "
                        "the date Llama's templates fall back to): output bytes never depend on the day the job runs")
    g.add_argument("--parity", choices=PARITY_MODES,
                   help="when the tokenizer has a chat template, render and tokenize a deterministic sample of about "
                        "--parity-rows records with transformers' apply_chat_template too and compare the token ids: "
                        "report (default) counts them in stats.json and the summary, strict fails the build on any "
                        "difference, off skips it")
    g.add_argument("--parity-rows", type=int, metavar="N", help="about how many records the parity check takes "
                   "(default 1000)")
    g.add_argument("--encoder", choices=ENCODERS,
                   help="auto (default): fastokens when it matches the reference on a start-up canary, else hf; "
                        "fastokens: require it; hf: Hugging Face tokenizers. Output bytes are the same")
    g.add_argument(
        "--add-special-tokens",
        action="store_true",
        default=None,
        help="add the built-in template's markers the tokenizer has no single token for as special tokens; "
             "the extended tokenizer is saved in OUTPUT/tokenizer/ (without it they are tokenized as text, "
             "with a warning)",
    )
    g.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="allow custom tokenizer code from the tokenizer folder (off by default)",
    )
    g = p.add_argument_group("packing and output")
    g.add_argument("--seq-length", type=int, metavar="N", help="tokens per pack (default 4096)")
    g.add_argument(
        "--no-pack", action="store_false", dest="pack", default=None, help="one sample per pack (no packing)"
    )
    g.add_argument("--pad-to-multiple", type=int, metavar="N",
                   help="pad each sample at its end with EOS tokens (no loss) so every length the trainer attends "
                        "over is a multiple of N: context parallelism needs 2 x CP (x TP with sequence parallelism), "
                        "Megatron-Bridge's pad_seq_to_mult. With --layout bridge the padded length less its last "
                        "token is the multiple, and every sample gets at least one EOS (default 1: no padding)")
    g.add_argument("--overlong", choices=OVERLONG_POLICIES,
                   help="samples longer than --seq-length: drop (default), truncate (keep the prompt, cut the "
                        "answer) or split (cut at answer-turn ends). A preference pair (both sides in one pack) is "
                        "dropped, or under truncate each side's response is cut; it is never split")
    g.add_argument("--layout", choices=LAYOUTS, help="output layout for the trainer that reads it (default native). "
                   + _layout_help())
    g.add_argument("--epochs", type=int, metavar="N",
                   help="write N independently shuffled packings of the samples, one after the other (default 1)")
    g.add_argument("--validation", metavar="FRACTION|COUNT",
                   help="hold out records (0.01: a fraction; 500: a count), chosen by a hash of their content, as their "
                        "own dataset in OUTPUT/valid/; never in the training set")
    g.add_argument("--cache", metavar="DIR",
                   help="tokenized cache, local or s3://: each read chunk's tokens are kept there by content, and a "
                        "rebuild with other --seq-length, layout, mixture, seed, epochs or split tokenizes nothing; "
                        "when every chunk is cached no tokenizer is loaded and no local Ray instance is started")
    g.add_argument("--drop-shards", action="store_true", default=None,
                   help="keep only the merged dataset (shards/ is removed after the merge; data_order.txt then names "
                        "the merged file)")
    g.add_argument("--seed", type=int, help="seed of the pack order and slot shuffles (default 1234)")
    g.add_argument("--output", metavar="DIR", help="output folder, local or s3://")
    g.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output")
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue an interrupted run in the same --output: completed shards are reused when "
                        "inputs, tokenizer and flags match its manifest (tokenization runs again)")
    g = p.add_argument_group("object storage")
    g.add_argument("--s3-endpoint-url", metavar="URL", help="S3-compatible endpoint (MinIO, OSS, ...)")
    g.add_argument(
        "--s3-addressing-style",
        choices=("auto", "virtual", "path"),
        help="virtual for Alibaba OSS; path for most MinIO setups",
    )
    g = p.add_argument_group("execution")
    g.add_argument("--engine", choices=ENGINES,
                   help="ray (default): Ray actors and tasks, in-process or on the cluster of --ray-address; "
                        "local: this machine without Ray (tokenizer processes, one per CPU, and the driver's "
                        "threads) - no Ray start-up, object store or spill, for single-machine jobs and re-packs "
                        "from --cache; its blocks go to memory-mapped files under --spill-dir (~4.5 bytes a token). "
                        "Same output bytes either way")
    g.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (default: $RAY_ADDRESS, else local)")
    g.add_argument("--num-cpus", type=int, help="CPUs of the in-process Ray instance, or of --engine local (default: all)")
    g.add_argument("--object-store-memory", type=int, metavar="BYTES",
                   help="object store size of the in-process Ray instance (default: 1.5 bytes a byte of input, at "
                        "least 1 GiB, at most 45%% of the memory available); the tokenized dataset is held until "
                        "the plan is made and spills to disk beyond it")
    g.add_argument("--spill-dir", metavar="DIR",
                   help="where the in-process Ray instance spills objects (default: Ray's, under /tmp/ray), or where "
                        "--engine local keeps its blocks (default: the system's temp dir); "
                        "needs about 4 bytes per token of free space for large inputs")
    g.add_argument("--tokenize-workers", type=int, metavar="N", help="tokenizer actors (default: one per CPU, each encoding with one thread; with fewer, each gets its share of the cores)")
    g.add_argument("--batch-size", type=int, metavar="N", help="records per tokenizer actor call, encoded in two halves that overlap (default 16384)")
    g.add_argument("--num-shards", type=int, metavar="N", help="writer shards (default: by size)")
    g.add_argument("--stall-timeout", type=float, metavar="S",
                   help="fail a stage that makes no progress for S seconds, naming what it waits for (default 600; "
                        "0: wait forever)")
    g.add_argument("--debug", action="store_true", help="print the traceback of a failure")
    return p


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated entry names")
    return names


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def load_config_file(path: str) -> dict:
    """Read a job file into BuildConfig field values (flag names, '-' or '_')."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: must be a mapping of flag names to values")
    for flag in ("no_pack", "train_on_prompt", "mask_history"):
        for key in (flag, flag.replace("_", "-")):
            if key in data and not isinstance(data[key], bool):
                raise ValueError(f"--config {path}: {flag.replace('_', '-')} must be true/false, not {data[key]!r}")
    out: dict = {}
    names = BuildConfig.field_names()
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k == "input":
            out["inputs"] = [value] if isinstance(value, str) else list(value)
        elif k == "no_pack":
            out["pack"] = not value
        elif k == "train_on_prompt" and value:
            out["loss"] = "all"
        elif k == "mask_history" and value:
            out["loss"] = "last"
        elif k in names and k not in ("inputs",):
            out[k] = value
        else:
            flags = sorted({n.replace("_", "-") for n in names - {"inputs"}} | {"input", "no-pack"})
            raise ValueError(f"--config {path}: unknown key {key!r}; known keys: {', '.join(flags)}")
    if "inputs" in out and not all(isinstance(i, str) for i in out["inputs"]):
        raise ValueError(f"--config {path}: input must be a path or a list of paths")
    BuildConfig.check_types({k: v for k, v in out.items() if k != "inputs"}, f"--config {path}")
    return out


def config_from_args(argv: list[str] | None = None) -> BuildConfig:
    """The build's settings from the flags over a job file's (``--config``), checked once by
    ``BuildConfig.from_values`` (raysft.config: every choice and range): one line, exit 2."""
    args = parser().parse_args(argv)
    values = load_config_file(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if v is not None and k in BuildConfig.field_names()})
    missing = [f"--{n}" for n, v in (("input", values.get("inputs") or values.get("sources")),
                                      ("tokenizer", values.get("tokenizer")), ("output", values.get("output"))) if not v]
    if missing:
        parser().error(f"missing {', '.join(missing)}")
    try:
        return BuildConfig.from_values(values)
    except SettingError as e:
        parser().error(str(e))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="raysft: %(message)s")
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cfg = config_from_args(argv)
    except ValueError as e:
        print(f"raysft.build: error: {e}", file=sys.stderr)
        return 2

    # the engine and the stages (pyarrow, the encoders) load only when a build runs: --help and
    # a usage error answer at once
    from .engine.driver import run
    from .engine.session import stop_ray

    return guarded("raysft.build", lambda: run(cfg), stop_ray, debug)


def guarded(prog: str, work, cleanup, debug: bool = False) -> int:
    """Run a command's work: one error line and its exit code on failure (see raysft.errors)."""
    import signal

    def on_term(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        pass
    try:
        try:
            work()
        except SystemExit as e:
            # a SIGTERM that came while Ray was starting: its handler, in place until Ray is up,
            # exits with the signal's number (``raysft.engine.session._keep_sigterm``)
            if e.code == signal.SIGTERM:
                raise KeyboardInterrupt from None
            raise
        return 0
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every failure ends as one line
        code, line = classify(e)
        if debug:
            import traceback

            traceback.print_exc()
        print(f"{prog}: error: {line}", file=sys.stderr)
        return code
    finally:
        try:
            cleanup()
        except (Exception, KeyboardInterrupt):  # noqa: BLE001 - never mask the outcome
            pass


def exit_now(code: int) -> None:
    """End a command whose work is done (outputs closed, Ray stopped) without the interpreter's
    teardown of Ray's core worker, Arrow and the tokenizer: ~0.5 s of clean-up that decides
    nothing. Not under a tracer or profiler (coverage, cProfile), whose exit hooks save data."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if sys.gettrace() is None and sys.getprofile() is None:
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_now(main())
