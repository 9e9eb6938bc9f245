"""The command line, run as a user runs it: exit codes, one-line errors, `ls` output."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror.redact import safe_url
from tests.conftest import ROOT, Seeded
from tools.imagebuild import Layout as SrcLayout
from tools.imagebuild import random_layer
from tools.registry import Registry, free_port, skopeo_copy


def mirror(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True, text=True, env=env)


def test_bad_reference_is_usage_error(tmp_path: Path) -> None:
    res = mirror("pull", "--cache", str(tmp_path / "c"), "reg.example/App:1")
    assert res.returncode == 2
    assert (
        res.stderr.strip() == "mirror: invalid reference 'reg.example/App:1': repository name 'App' must be lowercase"
    )


def test_bad_platform_is_usage_error(tmp_path: Path) -> None:
    res = mirror("pull", "--cache", str(tmp_path / "c"), "--platform", "amd64", "reg.example/app:1")
    assert res.returncode == 2
    assert "invalid platform 'amd64'" in res.stderr


def test_nothing_reachable_exits_3(tmp_path: Path) -> None:
    res = mirror("pull", "--cache", str(tmp_path / "c"), f"127.0.0.1:{free_port()}/a:1")
    assert res.returncode == 3
    assert "FAILED" in res.stdout and "cannot reach" in res.stdout


def test_ls_refuses_a_directory_that_is_not_a_cache(tmp_path: Path) -> None:
    res = mirror("ls", "--cache", str(tmp_path))
    assert res.returncode == 1
    assert res.stderr.strip() == f"mirror: {tmp_path} is not a cache: no oci-layout file"


def test_pull_refuses_a_non_empty_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    res = mirror("pull", "--cache", str(tmp_path), "127.0.0.1:1/a:1")
    assert res.returncode == 1
    assert "is not empty and is not an OCI layout" in res.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "index.json").exists()


@pytest.mark.slow
def test_pull_then_ls(seeded: Seeded, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    refs = [seeded.ref("t/schema2:1"), seeded.ref("t/index:1"), seeded.ref("nope/missing:1")]
    res = mirror("pull", "--cache", str(cache), *refs)
    assert res.returncode == 1, res.stderr
    assert f"FAILED {seeded.ref('nope/missing:1')}" in res.stdout
    assert "2/3 images cached, 1 failed" in res.stderr
    # Results on stdout, one line per image; stderr has only the summary.
    assert len(res.stdout.splitlines()) == 3 and res.stderr.count("\n") == 1, res.stderr
    res = mirror("ls", "--cache", str(cache))
    assert res.returncode == 0
    lines = sorted(res.stdout.splitlines())
    assert len(lines) == 2
    index_line = next(line for line in lines if "t/index:1" in line).split("\t")
    assert index_line[1] == seeded.digests["t/index:1"]
    assert index_line[2] == "linux/amd64,linux/arm64"
    schema2_line = next(line for line in lines if "t/schema2:1" in line).split("\t")
    assert schema2_line[:3] == [seeded.ref("t/schema2:1"), seeded.digests["t/schema2:1"], "linux/amd64"]
    # The same, for scripts.
    res = mirror("ls", "--json", "--cache", str(cache))
    assert res.returncode == 0, res.stderr
    listed = {img["name"]: img for img in json.loads(res.stdout)}
    assert listed[seeded.ref("t/index:1")]["digest"] == seeded.digests["t/index:1"]
    assert listed[seeded.ref("t/index:1")]["platforms"] == ["linux/amd64", "linux/arm64"]
    assert listed[seeded.ref("t/schema2:1")]["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert all(img["size"] > 0 and img["problem"] is None for img in listed.values())


def test_insecure_flag_keeps_the_configured_credentials(tmp_path: Path) -> None:
    import argparse

    from mirror.commands.common import load_config

    cfg_file = tmp_path / "m.toml"
    cfg_file.write_text('[[registries]]\nhost = "reg.example:5000"\nusername = "u"\npassword = "p"\napi = "v1"\n')
    args = argparse.Namespace(config=cfg_file, cache=None, insecure=["reg.example:5000", "other.example"])
    regs = {r.host: r for r in load_config(args).registries}
    assert regs["reg.example:5000"].insecure and regs["reg.example:5000"].username == "u"
    assert regs["reg.example:5000"].password == "p" and regs["reg.example:5000"].api == "v1"
    assert regs["other.example"].insecure and regs["other.example"].username is None


def test_usage_error_shows_the_subcommand_usage(tmp_path: Path) -> None:
    res = mirror("pull", "--bogus", "127.0.0.1:1/a:1")
    assert res.returncode == 2
    assert res.stderr.startswith("usage: mirror pull [-h]")
    assert res.stderr.endswith("mirror pull: error: unrecognized arguments: --bogus\n")
    res = mirror("-v", "ls", "--cache", str(tmp_path), "--nope")
    assert res.returncode == 2
    assert res.stderr.startswith("usage: mirror ls [-h]") and "unrecognized arguments: --nope" in res.stderr
    res = mirror("push", "--bogus")
    assert res.returncode == 2 and res.stderr.startswith("usage: mirror push [options] SRC_REF DEST_REF")
    assert res.stdout == ""


def _small_cache(root: Path, tags: int) -> Path:
    src = SrcLayout(root)
    img = {k: v for k, v in src.image([random_layer(1000, 1)]).items() if k != "platform"}
    names = [f"127.0.0.1:5000/app/n{i}:1" for i in range(tags)]
    entries = [{**img, "annotations": {"org.opencontainers.image.ref.name": n}} for n in names]
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": entries}))
    return root


@pytest.mark.parametrize("extra", [(), ("--json",)])
def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path, extra: tuple[str, ...]) -> None:
    """`mirror ls | head`: the reader is gone; no message, no traceback, the status of a process SIGPIPE ended."""
    cache = _small_cache(tmp_path / "c", 3)
    read, write = os.pipe()
    os.close(read)
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "mirror", "ls", "--cache", str(cache), *extra]
        res = subprocess.run(cmd, stdout=write, stderr=subprocess.PIPE, text=True, env=env)
    finally:
        os.close(write)
    assert res.stderr == ""
    assert res.returncode == 141


def test_output_into_a_pipe_read_in_part(tmp_path: Path) -> None:
    """A reader that takes the first line and goes, as `head -1` does, with more output than a pipe holds."""
    cache = _small_cache(tmp_path / "c", 1000)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mirror", "ls", "--cache", str(cache)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith(b"127.0.0.1:5000/app/n")
        proc.stdout.close()
        err = proc.stderr.read()
        code = proc.wait(timeout=120)
    assert code in (0, 141)  # 0 when everything fit in the pipe before we closed it
    assert err == b""


def test_safe_url_hides_secrets_and_keeps_what_explains_a_request() -> None:
    assert safe_url("https://u:pw@reg.example:5000/v2/a/blobs/uploads/x?_state=SECRET&digest=sha256:ab") == (
        "https://reg.example:5000/v2/a/blobs/uploads/x?_state=***&digest=sha256:ab"
    )
    assert safe_url("https://auth.example/token?scope=repository:a/b:pull&service=reg&account=bob") == (
        "https://auth.example/token?scope=repository:a/b:pull&service=reg&account=***"
    )
    assert safe_url("https://s3.example/blob?X-Amz-Signature=abc&X-Amz-Credential=k") == (
        "https://s3.example/blob?X-Amz-Signature=***&X-Amz-Credential=***"
    )
    assert safe_url("http://127.0.0.1:5000/v2/") == "http://127.0.0.1:5000/v2/"


USER, PASSWORD = "carol", "Verbose-Pa55-SECRET"
REQUEST_LINE = re.compile(r"mirror: (GET|HEAD|POST|PUT|PATCH) https?://\S+ \d{3} (\d+|\?) bytes \d+\.\d{3}s")


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, str]]:
    root = tmp_path_factory.mktemp("basic-cli")
    htpasswd = root / "htpasswd"
    line = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], capture_output=True, text=True, check=True).stdout
    htpasswd.write_text(line.strip() + "\n")
    reg = Registry(root / "reg", auth=f"auth: {{htpasswd: {{realm: r, path: {htpasswd}}}}}\n").start()
    src = SrcLayout(root / "src")
    src.tag("img", src.image([random_layer(30_000, 51)]))
    skopeo_copy(f"oci:{src.root}:img", f"docker://{reg.host}/private/app:1", "--dest-creds", f"{USER}:{PASSWORD}")
    yield reg, f"{reg.host}/private/app:1"
    reg.stop()


@pytest.mark.slow
def test_verbose_logs_each_request_without_secrets(
    basic_registry: tuple[Registry, str], registry: Registry, tmp_path: Path
) -> None:
    reg, ref = basic_registry
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[[registries]]\nhost = "{reg.host}"\nusername = "{USER}"\npassword_env = "CLI_TEST_PW"\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLI_TEST_PW": PASSWORD, "DOCKER_CONFIG": str(tmp_path)}
    cache = str(tmp_path / "c")
    pull = subprocess.run(
        [sys.executable, "-m", "mirror", "-v", "pull", "-c", str(cfg), "--cache", cache, ref],
        capture_output=True,
        text=True,
        env=env,
    )
    assert pull.returncode == 0, pull.stderr
    assert pull.stdout.startswith(f"ok     {ref} sha256:") and pull.stdout.count("\n") == 1  # results only
    requests = [line for line in pull.stderr.splitlines() if REQUEST_LINE.fullmatch(line)]
    assert f"mirror: GET http://{reg.host}/v2/private/app/manifests/1 401 " in pull.stderr
    assert any(f"GET http://{reg.host}/v2/private/app/manifests/1 200 " in line for line in requests)
    assert sum("/v2/private/app/blobs/sha256:" in line for line in requests) >= 2  # config and layer
    # An upload session's state goes in the query: hidden.
    dest = f"{registry.host}/cli-verbose/app:1"
    push = subprocess.run(
        [sys.executable, "-m", "mirror", "push", "-v", "-c", str(cfg), "--cache", cache, ref, dest],
        capture_output=True,
        text=True,
        env=env,
    )
    assert push.returncode == 0, push.stderr
    assert push.stdout.startswith(f"{dest}\tsha256:")
    uploads = [line for line in push.stderr.splitlines() if "/blobs/uploads/" in line and "PUT " in line]
    assert uploads and all("_state=***&digest=sha256:" in line for line in uploads), push.stderr
    encoded = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for text in (pull.stderr, pull.stdout, push.stderr, push.stdout):
        assert PASSWORD not in text and encoded not in text and "Authorization" not in text


def test_terminal_bars_load_rich_only() -> None:
    """`mirror pull` on a terminal imports rich's progress bars, not sync's modules nor pygments or markdown-it."""
    code = (
        "import sys, mirror.commands.pull; before = set(sys.modules); import mirror.progress_rich; "
        "print(' '.join(sorted(m for m in set(sys.modules) - before if not m.startswith('rich'))))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    loaded = res.stdout.split()
    assert "mirror.engine.sync" not in loaded and "mirror.store.state" not in loaded, loaded
    assert not [m for m in loaded if m.startswith(("pygments", "markdown_it"))], loaded


@pytest.mark.slow
def test_bars_on_the_terminal_results_on_stdout(seeded: Seeded, tmp_path: Path) -> None:
    """stderr a terminal (bars), stdout a file: each image's line goes to the file, not to the terminal."""
    import pty

    main, tty = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DOCKER_CONFIG": str(tmp_path), "TERM": "xterm", "COLUMNS": "100"}
    ref = seeded.ref("t/schema2:1")
    with subprocess.Popen(
        [sys.executable, "-m", "mirror", "pull", "--cache", str(tmp_path / "c"), ref],
        stdout=subprocess.PIPE,
        stderr=tty,
        stdin=subprocess.DEVNULL,
        env=env,
    ) as proc:
        os.close(tty)
        seen = b""
        while True:  # read the terminal until the process closes it (bounded by the test timeout)
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            seen += chunk
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        code = proc.wait(timeout=120)
    os.close(main)
    assert code == 0, seen.decode(errors="replace")
    assert out.startswith(f"ok     {ref} sha256:") and out.count("\n") == 1
    terminal = seen.decode(errors="replace")
    assert "1/1 images cached, 0 failed" in terminal and f"ok     {ref}" not in terminal
