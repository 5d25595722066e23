"""The job files and manifests users copy must only use flags raysft.build accepts."""

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from raysft.build import config_from_args, load_config_file, parser

MANIFESTS = sorted((ROOT / "deploy").glob("*.yaml"))


def entrypoints(doc: dict) -> list[str]:
    spec = doc.get("spec", {})
    if doc.get("kind") == "RayJob":
        return [spec["entrypoint"]]
    if doc.get("kind") == "RayCronJob":
        assert spec.get("schedule")
        return [spec["jobTemplate"]["entrypoint"]]
    raise AssertionError(f"unexpected kind {doc.get('kind')}")


def build_args(entry: str) -> list[str]:
    words = shlex.split(entry)
    i = words.index("raysft.build")
    assert words[i - 1] == "-m"
    return words[i + 1 :]


def local(path: str) -> Path:
    return ROOT / path.removeprefix("/app/") if path.startswith("/app/") else Path(path)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_entrypoints_use_real_flags(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1"
        spec = doc["spec"]
        job = spec.get("jobTemplate", spec)
        assert job["shutdownAfterJobFinishes"] is True
        for entry in entrypoints(doc):
            args = build_args(entry)
            ns = parser().parse_args(args)  # SystemExit on an unknown flag
            if ns.config:
                assert local(ns.config).exists(), ns.config
                args = [a if a != ns.config else str(local(ns.config)) for a in args]
            cfg = config_from_args(args)
            assert cfg.output and cfg.tokenizer and cfg.inputs


def test_manifest_count():
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in MANIFESTS}
    assert {"RayJob", "RayCronJob"} <= kinds


def test_job_config_file_and_cli_override(tmp_path):
    values = load_config_file(str(ROOT / "jobs" / "example.yaml"))
    assert values["inputs"] and values["seq_length"] == 4096
    cfg = config_from_args(["--config", str(ROOT / "jobs" / "example.yaml"), "--seq-length", "2048",
                            "--output", "/tmp/x", "--no-pack"])
    assert cfg.seq_length == 2048 and cfg.output == "/tmp/x" and cfg.pack is False
    assert cfg.template == "llama3" and cfg.on_bad_record == "skip"
    bad = tmp_path / "bad.yaml"
    bad.write_text("seq-lenght: 10\n")
    with pytest.raises(ValueError, match="unknown key 'seq-lenght'"):
        load_config_file(str(bad))


def test_mixture_job_file_parses_into_sources():
    cfg = config_from_args(["--config", str(ROOT / "jobs" / "mixture.yaml")])
    assert [s["name"] for s in cfg.sources] == ["chat", "math", "code"]
    assert sum(s["share"] for s in cfg.sources) == pytest.approx(1.0)
    assert cfg.sources[1]["map_keys"] == {"prompt": "question", "response": "answer"}
    assert cfg.epochs == 2 and cfg.validation == "0.01" and cfg.cache


@pytest.mark.parametrize("script", ["jobs/cron_submit.sh", "deploy/dlc_launch.sh", "scripts/setup.sh"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


def test_cron_wrapper_fails_without_config():
    r = subprocess.run(["bash", str(ROOT / "jobs/cron_submit.sh")], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def test_dlc_launcher_forwards_flags():
    text = (ROOT / "deploy/dlc_launch.sh").read_text()
    assert 'python -m raysft.build "$@"' in text
    assert "RANK" in text and "ray start --head" in text and "ray start --address" in text


def test_dockerfile_copies_existing_paths():
    for line in (ROOT / "deploy/Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            for src in line.split()[1:-1]:
                if not src.startswith("--"):
                    assert (ROOT / src).exists(), src


def test_every_output_affecting_setting_has_a_flag():
    """Each setting that changes output bytes can be given on the command line (one was lost
    once: --add-special-tokens existed in the config and the driver but not in the CLI)."""
    from raysft.engine.driver import FINGERPRINT_FLAGS

    flags = {a.dest for a in parser()._actions}
    internal = {"shard_tokens", "chunk_bytes"}  # sizes the tests and benchmarks set, not users
    assert set(FINGERPRINT_FLAGS) - internal <= flags, set(FINGERPRINT_FLAGS) - internal - flags
    cfg = config_from_args(["--input", "a", "--tokenizer", "t", "--output", "o", "--add-special-tokens"])
    assert cfg.add_special_tokens is True
