import pyarrow as pa
import pytest

from ray_wsss.core import commit, schema, storage
from ray_wsss.core.errors import StageNotCommittedError, WsssError


def _errors_table(ids):
    return pa.table({"image_id": ids, "stage": ["t"] * len(ids), "error": ["boom"] * len(ids)},
                    schema=schema.ERRORS)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_bucket") + "/prefix/out"


def test_bytes_roundtrip_and_listing(root):
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"hello")
    storage.write_bytes(storage.join(root, "b.bin"), b"world")
    assert storage.read_bytes(storage.join(root, "a", "x.bin")) == b"hello"
    assert storage.list_files(root) == ["a/x.bin", "b.bin"]
    assert storage.exists(storage.join(root, "b.bin"))
    storage.delete(storage.join(root, "a"))
    assert storage.list_files(root) == ["b.bin"]


def test_missing_file_names_the_uri(root):
    with pytest.raises(WsssError, match=r"not found.*nope.bin"):
        storage.read_bytes(storage.join(root, "nope.bin"))


def test_stage_is_invisible_until_committed(root):
    commit.write_staged_table(root, "errors", _errors_table(["a", "b"]))
    # A crash here leaves staged files only: the stage must not look finished.
    assert not commit.is_committed(root)
    with pytest.raises(StageNotCommittedError, match="not finished, crashed"):
        commit.read_table(root, "errors")
    commit.write_staged_table(root, "errors", _errors_table(["c"]))
    manifest = commit.commit_stage(root, ["errors"], {"source": "test"})
    assert manifest["tables"]["errors"]["rows"] == 3
    assert sorted(commit.read_table(root, "errors").column("image_id").to_pylist()) == ["a", "b", "c"]
    assert storage.read_json(storage.join(root, "dataset.json")) == {"source": "test"}
    assert not any(f.startswith(commit.STAGING_DIR) for f in storage.list_files(root))


def test_truncated_staged_file_is_discarded_on_resume(root):
    commit.write_staged_table(root, "errors", _errors_table(["a"]))
    # A writer that died mid-file leaves bytes without a Parquet footer.
    storage.write_bytes(storage.join(commit.staging_uri(root, "errors"), "part-dead.parquet"), b"PAR1garbage")
    assert commit.staged_column(root, "errors", "image_id") == ["a"]
    assert len(storage.list_files(commit.staging_uri(root, "errors"))) == 1


def test_stray_files_in_committed_table_are_not_read(root):
    commit.write_staged_table(root, "errors", _errors_table(["a"]))
    commit.commit_stage(root, ["errors"], {})
    storage.write_bytes(storage.join(root, "errors", "stray.parquet"), b"not listed in the manifest")
    assert commit.read_table(root, "errors").column("image_id").to_pylist() == ["a"]


def test_unreachable_bucket_is_a_clear_error(s3_endpoint):
    with pytest.raises(WsssError, match="s3://no-such-bucket-xyz"):
        storage.read_bytes("s3://no-such-bucket-xyz/data/dataset.json")


def test_explicit_options_override_environment(s3_bucket, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    opts = storage.StorageOptions(endpoint_url=s3_endpoint)
    storage.write_bytes(s3_bucket + "/k", b"v", opts)
    assert storage.read_bytes(s3_bucket + "/k", opts) == b"v"


def _bucket_names(endpoint):
    import boto3

    return {b["Name"] for b in boto3.client("s3", endpoint_url=endpoint).list_buckets()["Buckets"]}


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1"])
def test_missing_bucket_is_named_and_never_created(s3_endpoint, region):
    # Outside us-east-1, s3fs's makedirs used to create the bucket silently (in the client's region).
    opts = storage.StorageOptions(region=region)
    bucket = f"no-such-bucket-{region}"
    with pytest.raises(WsssError, match=f"bucket '{bucket}' does not exist.*never creates buckets"):
        storage.write_bytes(f"s3://{bucket}/run/x.json", b"{}", opts)
    fs, path = storage.resolve(f"s3://{bucket}/run/table", opts)  # what Ray Data and Ray Train call
    with pytest.raises(FileNotFoundError, match=f"bucket '{bucket}' does not exist"):
        fs.create_dir(path, recursive=True)
    with pytest.raises(WsssError, match=f"bucket '{bucket}' does not exist"):
        storage.read_bytes(f"s3://{bucket}/data/dataset.json", opts)
    with pytest.raises(WsssError, match=f"bucket '{bucket}' does not exist"):
        commit.read_table(f"s3://{bucket}/data", "samples", opts)
    with pytest.raises(WsssError, match=f"bucket '{bucket}' does not exist"):
        storage.create_exclusive(f"s3://{bucket}/run/_LOCK", b"{}", opts)
    assert bucket not in _bucket_names(s3_endpoint)


def test_create_dir_in_an_existing_bucket_makes_nothing(s3_bucket, s3_endpoint):
    fs, path = storage.resolve(s3_bucket + "/a/b")
    fs.create_dir(path, recursive=True)
    fs.create_dir(s3_bucket[len("s3://"):], recursive=True)  # the bucket itself: exists, fine
    assert storage.list_files(s3_bucket) == []
