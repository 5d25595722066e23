"""Object storage through a real S3 endpoint (moto server) reached by the driver and the workers."""

import boto3
import pytest
from helpers import build, file_bytes

from raysft.engine.driver import BuildError
from raysft.read import InputError

BUCKET = "raysft-data"


@pytest.fixture(scope="module")
def bucket(s3_endpoint, shared_data):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    for name in ("alpaca_zh_demo.json", "glaive_toolcall_en_demo.json"):
        s3.upload_file(str(shared_data / name), BUCKET, f"raw/{name}")
    return s3


def test_s3_in_and_out_byte_identical_to_local(tmp_path, ray_session, bucket, s3_endpoint, shared_data, llama3_dir,
                                                capsys):
    local = tmp_path / "local"
    flags = dict(template="llama3", seq_length=2048, num_shards=2)
    build(local, [shared_data / "alpaca_zh_demo.json", shared_data / "glaive_toolcall_en_demo.json"], llama3_dir,
          **flags)
    out = f"s3://{BUCKET}/packed/run1"
    stats = build(out, [f"s3://{BUCKET}/raw/*.json"], llama3_dir, s3_endpoint_url=s3_endpoint, **flags)
    assert stats["rows_read"] == 1300
    remote = {}
    for name in ("data.bin", "data.idx", "data_order.txt", "stats.json", "_SUCCESS"):
        remote[name] = bucket.get_object(Bucket=BUCKET, Key=f"packed/run1/{name}")["Body"].read()
    for name, data in file_bytes(local).items():
        assert remote[name] == data, name
    for line in remote["data_order.txt"].decode().split():
        bucket.head_object(Bucket=BUCKET, Key=f"packed/run1/{line}")
    assert "testing" not in remote["stats.json"].decode()  # no credentials in outputs

    # inspect reads the S3 output directly
    from raysft import inspect as insp

    assert insp.main([out, "--pack", "0", "--color", "never", "--s3-endpoint-url", s3_endpoint]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("pack 0 of ") and "[[" in shown and "s3://raysft-data/raw/" in shown


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("s3://no-such-bucket/raw/*.jsonl", "bucket 'no-such-bucket' does not exist"),
        (f"s3://{BUCKET}/raw/missing.jsonl", "no such file or folder"),
        (f"s3://{BUCKET}/empty-prefix/*.jsonl", "matches no input file"),
    ],
)
def test_s3_input_errors_are_one_line(tmp_path, bucket, s3_endpoint, llama3_dir, pattern, message):
    with pytest.raises(InputError, match=message) as e:
        build(tmp_path, [pattern], llama3_dir, template="llama3", s3_endpoint_url=s3_endpoint)
    assert "\n" not in str(e.value)


def test_s3_missing_output_bucket(tmp_path, bucket, s3_endpoint, llama3_dir):
    with pytest.raises((InputError, BuildError), match="bucket 'no-out-bucket' does not exist"):
        build("s3://no-out-bucket/x", [f"s3://{BUCKET}/raw/*.json"], llama3_dir, template="llama3",
              s3_endpoint_url=s3_endpoint)
