"""A real DVC remote: DVC's SSH remote (dvc-ssh) against Debian's OpenSSH sshd, which these tests start on
127.0.0.1 with throwaway keys. The tiny project's outputs are pushed once; fresh clones pull them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import COMMAND_TIMEOUT, REPO, Project, isolated_env, stages_run

SSHD = "/usr/sbin/sshd"  # Debian's path; sshd -D insists on an absolute path (it re-executes itself)


@dataclass
class Sshd:
    port: int
    key: Path  # in authorized_keys
    stranger: Path  # a key sshd was never told about
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not Path(SSHD).is_file() or not shutil.which("ssh-keygen"):
        reason = f"no OpenSSH server ({SSHD}; apt-get install openssh-server): the DVC remote tests need one"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI must run them (.ci/run installs it)")
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key", "stranger_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"isara-test-{name}",
                        "-f", str(home / name)], check=True)
    (home / "authorized_keys").write_text((home / "user_key.pub").read_text())
    port = free_port()
    config = home / "sshd_config"
    # Nothing here is read from /etc/ssh: a host key, users' keys and a pid file of our own. StrictModes no: pytest's
    # temp folders are not owned and locked down the way sshd wants a home's. Root may log in with a key only: the
    # tests run as root in CI.
    config.write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {home}/host_key
PidFile {home}/sshd.pid
AuthorizedKeysFile {home}/authorized_keys
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
Subsystem sftp internal-sftp
""")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd started by root will not start without this privsep folder
    log = home / "sshd.log"
    with log.open("w") as out:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "Server listening" not in log.read_text():
            assert proc.poll() is None, f"sshd exited ({proc.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, f"sshd not listening after 30 s:\n{log.read_text()}"
            time.sleep(0.1)
        yield Sshd(port, home / "user_key", home / "stranger_key", log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def clone(src: Project, dst: Path) -> Project:
    home = dst.parent / f"{dst.name}-home"
    home.mkdir()
    project = Project(dst, {**src.env, "HOME": str(home), "DVC_SITE_CACHE_DIR": str(home / "dvc-site-cache")})
    subprocess.run(["git", "clone", "-q", str(src.root), str(dst)], check=True, env=project.env)
    return project


def cache_files(project: Project) -> list[tuple[str, int]]:
    cache = project.root / ".dvc" / "cache"
    return sorted((str(p.relative_to(cache)), p.stat().st_size) for p in cache.rglob("*") if p.is_file())


def objects(folder: Path) -> int:
    """Complete objects under a cache or remote folder (not the temp files of a transfer in progress)."""
    return sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))


def lock_outs(project: Project) -> dict[str, dict]:
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    return {out["path"]: out for stage in lock["stages"].values() for out in stage.get("outs", [])}


@dataclass
class Pushed:
    src: Project  # the clone that pushed
    url: str
    storage: Path  # the remote's folder on the server


@pytest.fixture(scope="module")
def pushed(tiny_project, sshd, tmp_path_factory) -> Pushed:
    """A clone of the tiny project with its dvc.lock and small files committed (the get-started convention) and
    the SSH remote `storage` as its default, its cache pushed there once."""
    base = tmp_path_factory.mktemp("remote")
    src = clone(tiny_project, base / "src")
    # What the reproduced project holds beside its commit: dvc.lock, the .gitignore files DVC wrote for the cached
    # outputs, and the `cache: false` metrics, which git carries, not the remote. Copied, never changed in place:
    # other test files share the tiny project.
    untracked = tiny_project.run("git", "ls-files", "--others", "--exclude-standard").stdout.split()
    # checkpoints/: generate's resume log, outside DVC; the repo's own .gitignore keeps it out of git.
    for rel in (r for r in untracked if not r.startswith("checkpoints/")):
        (src.root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tiny_project.root / rel, src.root / rel)
    assert (src.root / "dvc.lock").is_file()
    # The objects are read where they are: a copy of the tiny project's cache would be gigabytes.
    src.dvc("cache", "dir", "--local", str(tiny_project.root / ".dvc" / "cache"))
    storage = base / "storage"
    url = f"ssh://127.0.0.1:{sshd.port}{storage}"
    src.dvc("remote", "add", "-d", "storage", url)
    src.dvc("remote", "modify", "--local", "storage", "keyfile", str(sshd.key))
    src.run("git", "add", "-A")
    src.run("git", "commit", "-qm", "tiny project reproduced, remote storage")
    src.dvc("push")
    return Pushed(src, url, storage)


def pull_clone(pushed, sshd, dst: Path) -> Project:
    """A fresh clone of the pushing repo, empty cache, its own key file setting (config.local is never cloned)."""
    project = clone(pushed.src, dst)
    project.dvc("remote", "modify", "--local", "storage", "keyfile", str(sshd.key))
    return project


@pytest.fixture(scope="module")
def pulled(pushed, sshd, tmp_path_factory) -> Project:
    project = pull_clone(pushed, sshd, tmp_path_factory.mktemp("pulled") / "repo")
    assert not (project.root / ".dvc" / "cache").exists() and not (project.root / "artifacts/2/model.gguf").exists()
    project.pull = project.dvc("pull")
    return project


@pytest.mark.slow
def test_pull_into_a_fresh_clone_brings_every_artifact(pushed, pulled):
    outs = lock_outs(pulled)
    for rel in ("artifacts/2/model.gguf", "artifacts/2/dataset.jsonl"):
        path = pulled.root / rel
        assert path.is_file(), f"{rel} did not arrive:\n{pulled.pull.stdout}\n{pulled.pull.stderr}"
        md5 = subprocess.run(["md5sum", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]
        assert md5 == outs[rel]["md5"], rel
    assert cache_files(pulled), "the pull left the clone's cache empty"
    status = pulled.dvc("status", "--json")
    assert status.stdout.strip() == "{}", status.stdout
    assert stages_run(pulled.dvc("repro").stdout) == set()
    pulled.isara("audit")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unreachable", "wrong key"])
def test_bad_remote_fails_naming_it_and_leaves_the_cache_alone(pulled, sshd, tmp_path, kind):
    if kind == "unreachable":
        name, url, key = "nobody", f"ssh://127.0.0.1:{free_port()}{tmp_path / 'storage'}", sshd.key
        cause = "connection refused"
    else:
        name, url, key = "stranger", f"ssh://127.0.0.1:{sshd.port}{tmp_path / 'storage'}", sshd.stranger
        cause = "refused the credentials"
    pulled.dvc("remote", "add", "--local", name, url)
    pulled.dvc("remote", "modify", "--local", name, "keyfile", str(key))
    before = cache_files(pulled)
    for direction in ("push", "pull"):
        proc = pulled.isara(direction, "-r", name, check=False)
        assert proc.returncode != 0, (direction, proc.stdout, proc.stderr)
        last = proc.stderr.strip().splitlines()[-1]
        assert f"remote '{name}' ({url})" in last and cause in last, (direction, proc.stderr)
        assert cache_files(pulled) == before, direction
    assert pulled.dvc("status", "--json").stdout.strip() == "{}"


@pytest.mark.slow
def test_pull_killed_midway_completes_on_rerun(pushed, sshd, tmp_path):
    project = pull_clone(pushed, sshd, tmp_path / "repo")
    cache = project.root / ".dvc" / "cache"
    total = objects(pushed.storage)
    # -j 1: one object at a time, so the kill lands between the first object and the last.
    child = subprocess.Popen([sys.executable, "-m", "dvc", "pull", "-j", "1"], cwd=project.root, env=project.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while not objects(cache):
            assert child.poll() is None, f"dvc pull exited ({child.returncode}) before any object arrived"
            assert time.monotonic() < deadline, "dvc pull wrote nothing"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):  # it finished meanwhile: the count below says so
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    arrived = objects(cache)
    assert 0 < arrived < total, f"the kill should land mid-pull: {arrived} of {total} objects in the cache"
    project.isara("pull")
    assert project.dvc("status", "--json").stdout.strip() == "{}"
    project.isara("audit")


def test_push_without_a_remote_says_how_to_add_one(tmp_path):
    (tmp_path / "home").mkdir()
    project = Project(tmp_path / "repo", isolated_env(tmp_path / "home"))
    project.root.mkdir()
    shutil.copytree(REPO / "isara", project.root / "isara", ignore=shutil.ignore_patterns("__pycache__"))
    project.run("git", "init", "-q")
    project.dvc("init", "-q")
    expected = {
        ("push",): "Error: no DVC remote: add one with `dvc remote add -d NAME URL` (README \"Sharing artifacts: a DVC "
                   "remote\")",
        ("pull", "-r", "elsewhere"): "Error: no DVC remote named 'elsewhere' (configured: none)",
    }
    for args, line in expected.items():
        proc = project.isara(*args, check=False)
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert proc.stderr.strip().splitlines()[-1] == line
