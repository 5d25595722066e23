"""Build settings: one frozen dataclass shared by the CLI, job files and the pipeline, and the
one home of every setting's choices, defaults and ranges. ``BuildConfig.from_values`` makes a
checked one from any source (flags, a job file, a program); ``check`` is what it runs, and the
driver runs it again on a config a program made. The modules that act on a setting import its
choices from here (this module imports nothing of raysft at its top: no import circles)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import USAGE

# every setting's choices (the layouts' are their registry's: raysft.layouts.LAYOUTS)
FORMATS = ("auto", "alpaca", "sharegpt", "openai", "text")
LOSS_POLICIES = ("assistant", "last", "all")
THINK_LOSS = ("auto", "train", "mask")
OVERLONG_POLICIES = ("drop", "truncate", "split")
ON_BAD_RECORD = ("fail", "skip")
ENCODERS = ("auto", "fastokens", "hf")
PARITY_MODES = ("off", "report", "strict")
MIX_UNITS = ("loss_tokens", "samples", "tokens")
ENGINES = ("ray", "local")
S3_ADDRESSING = ("auto", "virtual", "path")
MAX_SEQ_LENGTH = 1 << 24  # the planner's arrays are indexed by length: 16M tokens is 128 MB of counts

# field -> (its flag, its choices)
CHOICES = {
    "format": ("--format", FORMATS), "loss": ("loss policy", LOSS_POLICIES), "think_loss": ("--think-loss", THINK_LOSS),
    "overlong": ("--overlong", OVERLONG_POLICIES), "on_bad_record": ("--on-bad-record", ON_BAD_RECORD),
    "encoder": ("--encoder", ENCODERS), "parity": ("--parity", PARITY_MODES), "mix_unit": ("mix_unit", MIX_UNITS),
    "engine": ("--engine", ENGINES), "s3_addressing_style": ("--s3-addressing-style", S3_ADDRESSING),
}
# field -> its least value (None: unset, the default applies)
AT_LEAST = {"pad_to_multiple": 1, "parity_rows": 1, "batch_size": 1, "num_shards": 1, "tokenize_workers": 1,
            "num_cpus": 1, "shard_tokens": 1, "chunk_bytes": 1, "epochs": 1}


class SettingError(ValueError):
    """A setting's value is not one it takes: one line, exit 2 (usage)."""

    exit_code = USAGE


@dataclass(frozen=True)
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
    # sees is a multiple of N (context parallelism needs 2 x CP; raysft.samples.Align)
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

    @classmethod
    def from_values(cls, values: dict) -> BuildConfig:
        """A checked config from field values as a user gives them (a job file's or the CLI's):
        comma lists, ``--map-keys`` text, peer template names, JSON text, a count-or-fraction
        validation and a zero stall timeout normalized first."""
        # (the registries import this module's choices: imported here, see check)
        from .normalize import parse_map_keys
        from .templates import TemplateError, canonical_template

        v = dict(values)
        if isinstance(v.get("dataset"), str):
            v["dataset"] = [n.strip() for n in v["dataset"].split(",") if n.strip()] or None
        if isinstance(v.get("map_keys"), (str, dict)):
            v["map_keys"] = parse_map_keys(v["map_keys"])
        if "template" in v:
            try:
                v["template"] = canonical_template(str(v["template"]))
            except TemplateError as e:
                raise SettingError(f"--template: {e}") from None
        if v.get("validation") is not None:
            v["validation"] = str(v["validation"])
        if v.get("stall_timeout") == 0:
            v["stall_timeout"] = None
        if isinstance(v.get("template_kwargs"), str):
            import json

            try:
                v["template_kwargs"] = json.loads(v["template_kwargs"])
            except json.JSONDecodeError as e:
                raise SettingError(f"--template-kwargs not valid JSON: {e}") from None
        cfg = cls(**v)
        cfg.check()
        return cfg

    def check(self) -> BuildConfig:
        """Every setting within its choices and range (one line naming the flag otherwise)."""
        # the registries (layouts, templates, sources) import this module's choices: they are
        # consulted when a config is checked, not when this module is imported
        from .layouts import LAYOUTS
        from .templates import unknown_kwargs

        if not isinstance(self.seq_length, int) or not 2 <= self.seq_length <= MAX_SEQ_LENGTH:
            raise SettingError(f"--seq-length must be from 2 to {MAX_SEQ_LENGTH:,} (a sample's most tokens)")
        for name, (flag, choices) in {**CHOICES, "layout": ("--layout", LAYOUTS)}.items():
            value = getattr(self, name)
            if value not in choices and not (value is None and name == "s3_addressing_style"):
                raise SettingError(f"{flag} must be one of {', '.join(choices)}, not {value!r}")
        for name, least in AT_LEAST.items():
            value = getattr(self, name)
            flag = f"--{name.replace('_', '-')}"
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise SettingError(f"{flag} must be a whole number, not {value!r}")
            if value is not None and value < least:
                raise SettingError(f"{flag} must be at least {least}, not {value!r}")
        if not isinstance(self.sources, list):
            raise SettingError("sources must be a list of mappings (each with at least 'input')")
        if self.validation is not None:
            from .sources import SourceError, Validation  # (a registry module, see check)

            try:
                Validation.parse(str(self.validation))
            except SourceError as e:
                raise SettingError(str(e)) from None
        if self.engine == "local" and self.ray_address:
            raise SettingError("--engine local runs without Ray: it takes no --ray-address")
        if not isinstance(self.template_kwargs, dict):
            raise SettingError("--template-kwargs must be a JSON object")
        if why := unknown_kwargs(self.template, self.template_kwargs):
            raise SettingError(why)
        return self
