"""Build settings: one dataclass shared by the CLI, config files and the pipeline."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class BuildConfig:
    inputs: list[str] = field(default_factory=list)
    output: str = ""
    tokenizer: str = ""
    template: str = "auto"
    format: str = "auto"
    dataset: list | None = None  # entries of a LLaMA-Factory data folder's dataset_info.json (raysft.read.registry)
    map_keys: dict = field(default_factory=dict)
    loss: str = "assistant"  # assistant | last | all
    seq_length: int = 4096
    pack: bool = True
    layout: str = "native"
    seed: int = 1234
    on_bad_record: str = "fail"  # fail | skip
    overlong: str = "drop"  # drop | truncate | split
    # each sample padded at its end with EOS (no loss) so that every length the trainer's attention
    # sees is a multiple of N (context parallelism needs 2 x CP; raysft.samples.align_samples)
    pad_to_multiple: int = 1
    overwrite: bool = False
    resume: bool = False
    trust_remote_code: bool = False
    add_special_tokens: bool = False
    encoder: str = "auto"  # auto | fastokens | hf (same output; see raysft.encode)
    template_kwargs: dict = field(default_factory=dict)  # extra variables for the chat template
    template_date: str = "2024-07-26"  # what strftime_now returns to a chat template (auto)
    think_loss: str = "auto"  # auto | train | mask: loss on reasoning blocks (raysft.templates.think_spans)
    drop_shards: bool = False  # keep only the merged dataset
    sources: list = field(default_factory=list)  # raysft.sources: each its inputs, format, keys, loss and amount
    mix_unit: str = "loss_tokens"  # what shares and budgets count: loss_tokens | samples | tokens
    cache: str | None = None  # tokenized cache folder (raysft.cache), local or s3://
    epochs: int = 1  # independently shuffled packings of the samples, one after the other
    validation: str | None = None  # a fraction (0.01) or a count (500) of records held out into OUTPUT/valid/
    parity: str = "report"  # off | report | strict: check a sample against apply_chat_template (raysft.parity)
    parity_rows: int = 1000  # about how many records the parity gate checks
    # object storage
    s3_endpoint_url: str | None = None
    s3_addressing_style: str | None = None
    # execution
    engine: str = "ray"  # ray | local (this machine, no Ray: raysft.engine.executor)
    ray_address: str | None = None
    num_cpus: int | None = None
    object_store_memory: int | None = None  # in-process Ray only; default pipeline.OBJECT_STORE_BYTES
    spill_dir: str | None = None  # in-process Ray only: where the object store spills
    tokenize_workers: int | None = None
    batch_size: int = 16384
    chunk_bytes: int = 16 << 20
    num_shards: int | None = None
    shard_tokens: int = 16 << 20  # tokens per writer shard (64 MB of int32): bounds a writer task's memory
    stall_timeout: float | None = 600.0  # a stage with no progress for this long fails (None: wait forever)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def check_types(cls, values: dict, where: str) -> None:
        """Each value of a job file of the type its setting takes (one line naming the key
        otherwise): a YAML ``pack: "no"`` is a string, not false; ``seq_length: '4096'`` is not
        a number."""
        import types
        import typing

        hints = typing.get_type_hints(cls)
        also = {"map_keys": (str,), "template_kwargs": (str,), "dataset": (str,), "validation": (int, float)}
        for key, value in values.items():
            hint = hints.get(key)
            if hint is None or value is None and key not in ("inputs",):
                continue
            args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
            allowed = tuple(typing.get_origin(a) or a for a in args if a is not type(None)) + also.get(key, ())
            if float in allowed and int not in allowed:
                allowed += (int,)
            ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
            if not ok:
                names = " or ".join(sorted({"a number" if a is float else "a whole number" if a is int else
                                            "true/false" if a is bool else
                                            "a list" if a is list else "a mapping" if a is dict else "text"
                                            for a in allowed}))
                raise ValueError(f"{where}: {key.replace('_', '-')} must be {names}, not {value!r}")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}
