"""Fetch: bytes from loopback S3, HTTP and disk; every failure becomes a short, stable reason."""

import os
import socket
import time

import lib
import pytest
from conftest import closed_port_url
from workload import s3_admin

BUCKET = "s3://open-images-dataset"


def reason_of(fetcher: lib.Fetcher, location: str) -> str:
    with pytest.raises(lib.ImageFailure) as failure:
        fetcher.fetch(location)
    return failure.value.reason


def test_s3_unsigned_like_the_official_downloader(s3_endpoint, images):
    fetcher = lib.Fetcher(s3_endpoint)
    key = sorted(images)[0]
    assert fetcher.fetch(f"{BUCKET}/validation/{key}.jpg") == images[key]
    assert reason_of(fetcher, f"{BUCKET}/train/{key}.jpg") == "s3 NoSuchKey"


def test_s3_endpoint_from_the_environment(s3_endpoint, images, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    key = sorted(images)[1]
    assert lib.Fetcher(None).fetch(f"{BUCKET}/validation/{key}.jpg") == images[key]


def test_unreachable_s3(fast_retries):
    fetcher = lib.Fetcher(closed_port_url(""), timeout=(1, 1))
    assert reason_of(fetcher, f"{BUCKET}/validation/x.jpg") == "connection error"


def test_http(http_server, images):
    key = sorted(images)[2]
    assert lib.Fetcher().fetch(http_server.url(f"/images/{key}.jpg")) == images[key]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/status/404/x.jpg", "http 404"),
        ("/status/403/x.jpg", "http 403"),
        ("/status/500/x.jpg", "http 500"),
        ("/truncated/images/0000000000000003.jpg", "truncated body"),
    ],
)
def test_http_failures(http_server, fast_retries, path, reason):
    assert reason_of(lib.Fetcher(), http_server.url(path)) == reason


def test_http_500_is_retried_then_recovers(http_server, images, fast_retries):
    key = sorted(images)[4]
    path = f"/flaky/images/{key}.jpg"
    assert lib.Fetcher().fetch(http_server.url(path)) == images[key]
    assert http_server.hits[path] == 2


def test_http_timeout(http_server, fast_retries):
    fetcher = lib.Fetcher(timeout=(2, 0.3))
    assert reason_of(fetcher, http_server.url("/slow/images/0000000000000005.jpg")) == "timeout"


def test_http_connection_refused(fast_retries):
    assert reason_of(lib.Fetcher(), closed_port_url("/x.jpg")) == "connection error"


def test_files(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"jpeg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    fetcher = lib.Fetcher()
    assert fetcher.fetch(str(tmp_path / "a.jpg")) == b"jpeg"
    assert fetcher.fetch((tmp_path / "a.jpg").as_uri()) == b"jpeg"
    assert reason_of(fetcher, str(tmp_path / "missing.jpg")) == "file not found"
    assert reason_of(fetcher, str(tmp_path / "empty.jpg")) == "empty body"
    assert reason_of(fetcher, str(tmp_path)).startswith("file unreadable")


def test_a_body_that_trickles_in_past_the_deadline_is_a_timeout(http_server, images):
    fetcher = lib.Fetcher(timeout=(2, 2), deadline=0.5)
    assert reason_of(fetcher, http_server.url(f"/trickle/images/{sorted(images)[6]}.jpg")) == "timeout"


def test_bodies_over_the_size_limit_are_never_read(http_server, s3_endpoint, images, tmp_path):
    key = sorted(images)[7]
    assert reason_of(lib.Fetcher(), http_server.url(f"/huge/images/{key}.jpg")) == "too large"
    small = lib.Fetcher(s3_endpoint, max_bytes=100)
    assert reason_of(small, http_server.url(f"/images/{key}.jpg")) == "too large"
    assert reason_of(small, f"{BUCKET}/validation/{key}.jpg") == "too large"
    (tmp_path / "big.jpg").write_bytes(images[key])
    assert reason_of(small, str(tmp_path / "big.jpg")) == "too large"


@pytest.mark.parametrize("status", [429, 503])
def test_a_retry_after_past_the_deadline_fails_at_once_with_the_status(http_server, images, status):
    """urllib3 would wait for a server's Retry-After, up to 6 hours, before the body deadline applied."""
    path = f"/busy/{status}/8/images/{sorted(images)[8]}.jpg?now"
    began = time.monotonic()
    assert reason_of(lib.Fetcher(deadline=2), http_server.url(path)) == f"http {status}"
    assert time.monotonic() - began < 2, "the fetch ends when it knows it cannot finish in time"
    assert http_server.hits[path] == 1, "no retry is made"


def test_a_retry_after_within_the_deadline_is_honoured(http_server, images):
    key = sorted(images)[9]
    path = f"/busy/503/1/images/{key}.jpg?later"
    began = time.monotonic()
    assert lib.Fetcher(deadline=10).fetch(http_server.url(path)) == images[key]
    assert time.monotonic() - began >= 1 and http_server.hits[path] == 2


def test_a_host_name_that_cannot_be_resolved(fast_retries, s3_endpoint, monkeypatch):
    """What an offline machine answers for every image; no name is looked up for real here."""

    def unresolvable(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unresolvable)
    assert reason_of(lib.Fetcher(), "http://images.invalid/x.jpg") == "cannot resolve"
    s3 = lib.Fetcher("http://s3.invalid", timeout=(1, 1))
    assert reason_of(s3, f"{BUCKET}/validation/x.jpg") == "cannot resolve"


PRIVATE_BUCKET = "team-photos"


@pytest.fixture
def private_bucket(s3_endpoint, images) -> str:
    """A bucket of the loopback S3 without a public-read policy: moto refuses unsigned reads of it."""
    admin = s3_admin(s3_endpoint)
    if PRIVATE_BUCKET not in [bucket["Name"] for bucket in admin.list_buckets()["Buckets"]]:
        admin.create_bucket(Bucket=PRIVATE_BUCKET)
        admin.put_object(Bucket=PRIVATE_BUCKET, Key="a.jpg", Body=images[sorted(images)[0]])
    return f"s3://{PRIVATE_BUCKET}/a.jpg"


@pytest.fixture
def no_credentials(tmp_path, monkeypatch) -> None:
    """No AWS credentials anywhere boto3 looks, and no instance metadata lookups (off loopback)."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))


def test_a_private_bucket_is_read_with_the_default_credentials(
    s3_endpoint, private_bucket, images, no_credentials, monkeypatch
):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "team-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "team-secret")
    fetcher = lib.Fetcher(s3_endpoint)
    assert fetcher.fetch(private_bucket) == images[sorted(images)[0]]
    assert fetcher.s3_access(PRIVATE_BUCKET) == "with the AWS credentials of env"


def test_a_profile_of_the_shared_credentials_file_is_named(
    s3_endpoint, private_bucket, images, no_credentials, tmp_path, monkeypatch
):
    (tmp_path / "aws-credentials").write_text("[team]\naws_access_key_id = k\naws_secret_access_key = s\n")
    monkeypatch.setenv("AWS_PROFILE", "team")
    fetcher = lib.Fetcher(s3_endpoint)
    assert fetcher.fetch(private_bucket) == images[sorted(images)[0]]
    assert (
        fetcher.s3_access(PRIVATE_BUCKET)
        == "with the AWS credentials of shared-credentials-file (profile 'team')"
    )


def test_without_credentials_a_private_bucket_is_denied_and_the_check_says_how_it_was_asked(
    s3_endpoint, private_bucket, no_credentials
):
    fetcher = lib.Fetcher(s3_endpoint)
    with pytest.raises(lib.ImageFailure, match="s3 AccessDenied"):
        fetcher.fetch(private_bucket)
    reach = lib.executor.SourceCheck(fetcher.s3_access, limit=2)
    with pytest.raises(lib.PipelineError) as stopped:
        reach.add([private_bucket] * 2, ["s3 AccessDenied"] * 2)
    assert (
        f"the bucket {PRIVATE_BUCKET} refuses this machine, which asked anonymously, as no AWS credentials "
        "were found (AWS_PROFILE"
    ) in str(stopped.value)


def test_s3_anonymous_reads_unsigned_even_with_credentials(
    s3_endpoint, private_bucket, images, no_credentials, monkeypatch
):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "team-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "team-secret")
    fetcher = lib.Fetcher(s3_endpoint, s3_anonymous=True)
    with pytest.raises(lib.ImageFailure, match="s3 AccessDenied"):
        fetcher.fetch(private_bucket)
    assert fetcher.s3_access(PRIVATE_BUCKET) == "anonymously (S3_ANONYMOUS=True)"
    public = f"s3://{lib.sources.OPENIMAGES_BUCKET}/validation/{sorted(images)[0]}.jpg"
    assert lib.Fetcher(s3_endpoint).fetch(public) == images[sorted(images)[0]]
    assert lib.Fetcher(s3_endpoint).s3_access(lib.sources.OPENIMAGES_BUCKET) == (
        "anonymously (Open Images' public bucket)"
    )


def test_credentials_that_the_bucket_rejects_stop_the_run_with_what_to_renew(no_credentials, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "expired-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "expired-secret")
    reach = lib.executor.SourceCheck(lib.Fetcher().s3_access, limit=2)
    with pytest.raises(lib.PipelineError, match="rejects the credentials that this machine sent, with the"):
        reach.add([f"s3://{PRIVATE_BUCKET}/a.jpg"] * 2, ["s3 ExpiredToken", "s3 InvalidAccessKeyId"])


def test_a_run_that_cannot_reach_a_web_server_does_not_look_for_aws_credentials():
    def no_lookup(bucket: str) -> str:
        raise AssertionError("credentials looked up")

    reach = lib.executor.SourceCheck(no_lookup, limit=2)
    with pytest.raises(lib.PipelineError, match="its host name cannot be resolved"):
        reach.add(["https://offline.example/a.jpg"] * 2, ["cannot resolve"] * 2)
