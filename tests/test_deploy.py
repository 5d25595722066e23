"""The job files and manifests users copy must only use flags raysft.build accepts."""

import os
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


def _fake_dlc_node(tmp_path, nodes: int, build_exit: int, ray_start_ok: bool = True) -> dict:
    """PATH with a fake `ray` (recording its arguments) and a fake interpreter that reports
    ``nodes`` live nodes and exits ``build_exit`` as the build."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "ray").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/ray.log\n'
                                 f'case "$1 $2" in "start --address") exit {0 if ray_start_ok else 1};; esac\nexit 0\n')
    (bin_dir / "py").write_text(f'#!/bin/sh\ncase "$*" in *raysft.build*) echo "$@" > {tmp_path}/build.log; '
                                f'exit {build_exit};; *ray.nodes*) echo {nodes};; *) exit 1;; esac\n')
    for f in ("ray", "py"):
        (bin_dir / f).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "py"),
            "RAYSFT_JOIN_TIMEOUT_S": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


@pytest.mark.slow  # (default run kept well under 15 min: CI's slow run)
def test_dlc_launcher_waits_for_every_rank_and_exits_with_the_builds_code(tmp_path):
    script = str(ROOT / "deploy/dlc_launch.sh")
    env = _fake_dlc_node(tmp_path, nodes=2, build_exit=3)
    r = subprocess.run(["bash", script, "--config", "x.yaml"], env=env | {"RANK": "0", "WORLD_SIZE": "2"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr  # the build's own exit code
    assert "--port 1 " in (tmp_path / "ray.log").read_text()  # DLC's MASTER_PORT, not a fixed 6379
    assert "-m raysft.build --config x.yaml" in (tmp_path / "build.log").read_text()
    env = _fake_dlc_node(tmp_path, nodes=1, build_exit=0)
    r = subprocess.run(["bash", script], env=env | {"RANK": "0", "WORLD_SIZE": "3"}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 4 and "only 1 of 3 nodes joined" in r.stderr  # never a build on a partial cluster
    env = _fake_dlc_node(tmp_path, nodes=1, build_exit=0, ray_start_ok=False)
    r = subprocess.run(["bash", script], env=env | {"RANK": "1", "WORLD_SIZE": "3"}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 4 and "cannot join the head" in r.stderr  # a rank that never joins fails


def test_dockerfile_copies_existing_paths():
    for line in (ROOT / "deploy/Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            for src in line.split()[1:-1]:
                if not src.startswith("--"):
                    assert (ROOT / src).exists(), src


def test_every_output_affecting_setting_has_a_flag():
    """Each setting that changes output bytes can be given on the command line (one was lost
    once: --add-special-tokens existed in the config and the driver but not in the CLI)."""
    from raysft.engine.prepare import FINGERPRINT_FLAGS

    flags = {a.dest for a in parser()._actions}
    internal = {"shard_tokens", "chunk_bytes"}  # sizes the tests and benchmarks set, not users
    assert set(FINGERPRINT_FLAGS) - internal <= flags, set(FINGERPRINT_FLAGS) - internal - flags
    cfg = config_from_args(["--input", "a", "--tokenizer", "t", "--output", "o", "--add-special-tokens"])
    assert cfg.add_special_tokens is True


# The spec fields of KubeRay's CRDs at the releases the manifests claim (read from
# ray-project/kuberay's ray-operator/config/crd/bases at v1.2.0 and v1.6.0): a field outside
# them is pruned or refused by the API server (RayCronJob has no concurrencyPolicy).
RAYJOB_SPEC_1_2 = {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "entrypoint", "entrypointNumCpus",
                   "entrypointNumGpus", "entrypointResources", "jobId", "metadata", "rayClusterSpec",
                   "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
                   "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"}
RAYCRONJOB_SPEC_1_6 = {"jobTemplate", "schedule", "suspend"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_use_only_fields_of_the_kuberay_release_they_claim(path):
    text = path.read_text()
    doc = yaml.safe_load(text)
    spec = doc["spec"]
    if doc["kind"] == "RayCronJob":
        assert set(spec) <= RAYCRONJOB_SPEC_1_6 and {"schedule", "jobTemplate"} <= set(spec)
        assert "KubeRay >= 1.6" in text and "RayCronJob=true" in text  # the version and the alpha feature gate
        spec = spec["jobTemplate"]
    else:
        assert "KubeRay >= 1.2" in text
    assert set(spec) <= RAYJOB_SPEC_1_2, set(spec) - RAYJOB_SPEC_1_2
