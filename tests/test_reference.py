"""References: normalisation and one-line errors, as Docker parses them."""

import pytest

from mirror.errors import ReferenceError_
from mirror.reference import Reference, is_loopback

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "normal", "api_host"),
    [
        ("ubuntu", "docker.io/library/ubuntu:latest", "registry-1.docker.io"),
        ("ubuntu:15.10", "docker.io/library/ubuntu:15.10", "registry-1.docker.io"),
        ("library/ubuntu", "docker.io/library/ubuntu:latest", "registry-1.docker.io"),
        ("index.docker.io/foo/bar", "docker.io/foo/bar:latest", "registry-1.docker.io"),
        ("docker.io/busybox", "docker.io/library/busybox:latest", "registry-1.docker.io"),
        ("127.0.0.1:5000/ubuntu:15.10", "127.0.0.1:5000/ubuntu:15.10", "127.0.0.1:5000"),
        ("localhost/a/b/c:1", "localhost/a/b/c:1", "localhost"),
        ("quay.io/coreos/etcd", "quay.io/coreos/etcd:latest", "quay.io"),
        ("my-reg.example:443/ns/app@" + D, "my-reg.example:443/ns/app@" + D, "my-reg.example:443"),
        ("reg.example/app:v1@" + D, "reg.example/app:v1@" + D, "reg.example"),
        ("[::1]:5000/x", "[::1]:5000/x:latest", "[::1]:5000"),
        ("a__b/c-d.e_f:tag_1.0-rc", "docker.io/a__b/c-d.e_f:tag_1.0-rc", "registry-1.docker.io"),
    ],
)
def test_valid(text: str, normal: str, api_host: str) -> None:
    ref = Reference.parse(text)
    assert str(ref) == normal
    assert ref.api_host == api_host
    assert Reference.parse(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ns/Ubuntu", "must be lowercase"),
        ("ubuntu:bad tag", "invalid tag 'bad tag'"),
        ("ubuntu:.hidden", "invalid tag '.hidden'"),
        ("ubuntu:", "invalid tag ''"),
        ("ubuntu@sha256:abc", "sha256 needs 64 lowercase hex"),
        ("ubuntu@md5:" + "a" * 32, "unsupported digest algorithm 'md5'"),
        ("ubuntu@nonsense", "malformed digest"),
        ("reg.example/a//b", "bad repository path component ''"),
        ("reg.example/-a", "bad repository path component '-a'"),
        ("", "empty"),
        (" ubuntu", "surrounded by spaces"),
        ("reg.example:5000/", "no repository name"),
        ("x" * 300, "longer than 255"),
    ],
)
def test_invalid(text: str, message: str) -> None:
    with pytest.raises(ReferenceError_) as err:
        Reference.parse(text)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_selector_prefers_digest() -> None:
    ref = Reference.parse("reg.example/app:v1@" + D)
    assert ref.selector == D
    assert Reference.parse("reg.example/app:v1").selector == "v1"


@pytest.mark.parametrize(
    ("host", "loop"),
    [("127.0.0.1:5000", True), ("localhost", True), ("[::1]:5000", True), ("10.0.0.1:5000", False), ("quay.io", False)],
)
def test_loopback(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop
