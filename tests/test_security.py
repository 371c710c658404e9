"""What the library must never do: evaluate or unpickle what it reads back, run a shell, or
read or write outside the places an artifact belongs to; and what it creates is never
writable by other users."""

from __future__ import annotations

import ast
import os
import socket
import stat
import time
from pathlib import Path

import pytest

import prov4ml_dist as prov4ml
from prov4ml_dist.artifacts import sha256_file
from prov4ml_dist.errors import ArtifactError

from .conftest import REPO
from .faultkit import files_under

PACKAGE = REPO / "prov4ml_dist"
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output", "getoutput", "getstatusoutput"}
UNSAFE_LOADERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("marshal", "load"),
                  ("marshal", "loads"), ("dill", "load"), ("dill", "loads"), ("shelve", "open"),
                  ("yaml", "unsafe_load"), ("os", "system"), ("os", "popen")}


def _dotted(node: ast.expr) -> tuple[str, ...]:
    """``a.b.c`` as ("a", "b", "c"); () for anything that is not a plain dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return (node.id, *reversed(parts)) if isinstance(node, ast.Name) else ()


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str) -> list[str]:
    """Calls that evaluate, unpickle or hand a string to a shell, with their line numbers."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        what = None
        if name in (("eval",), ("exec",), ("compile",), ("__import__",)):
            what = f"{name[0]}()"
        elif name[-2:] in UNSAFE_LOADERS or name[-1:] == ("unsafe_load",):
            what = ".".join(name)
        elif name[-1:] == ("load",) and name[:1] == ("torch",) and not _is_true(_keyword(node, "weights_only")):
            what = "torch.load without weights_only=True"
        elif name[-1:] == ("load",) and name[:1] in (("np",), ("numpy",)) and _is_true(_keyword(node, "allow_pickle")):
            what = "numpy.load with allow_pickle=True"
        elif name[-1:] == ("load",) and name[:1] == ("yaml",) and _keyword(node, "Loader") is None:
            what = "yaml.load without a safe Loader"
        elif name[:1] == ("subprocess",) and name[-1] in SUBPROCESS_CALLS:
            if _is_true(_keyword(node, "shell")):
                what = "subprocess with shell=True"
            elif node.args and isinstance(node.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)):
                what = "subprocess with a command string, not an argument list"
        if what:
            found.append(f"line {node.lineno}: {what}")
    return found


def test_the_scanner_finds_what_it_looks_for():
    bad = """
eval(x); exec(y); pickle.loads(b); pickle.load(f); torch.load(p); torch.load(p, weights_only=False)
np.load(p, allow_pickle=True); yaml.load(s); os.system(c); os.popen(c)
subprocess.run(f"ls {d}", shell=True); subprocess.run("ls " + d); subprocess.Popen(f"git {a}")
"""
    assert len(unsafe_calls(bad)) == 13
    good = """
torch.load(p, weights_only=True); np.load(p); np.load(p, allow_pickle=False); json.loads(s)
subprocess.run(["git", "rev-parse", "HEAD"], cwd=d); yaml.load(s, Loader=yaml.SafeLoader)
"""
    assert unsafe_calls(good) == []


def test_the_package_never_evaluates_unpickles_or_builds_shell_commands():
    problems = {str(path.relative_to(REPO)): found for path in sorted(PACKAGE.rglob("*.py"))
                if (found := unsafe_calls(path.read_text(encoding="utf-8")))}
    assert problems == {}


# -- artifacts -------------------------------------------------------------------------------
@pytest.fixture
def outside(tmp_path) -> Path:
    """A directory beside the run, with a file an escaping artifact would read or overwrite."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.txt").write_text("secret\n")
    return path


def _unchanged_outside(tmp_path: Path, run_dir: Path, before: dict) -> None:
    after = {k: v for k, v in files_under(tmp_path).items() if not (tmp_path / k).is_relative_to(run_dir)}
    assert after == before


@pytest.mark.parametrize("name", ["../../x", "../x", "/etc/x", "a/../../x", "a\\..\\..\\x", "..", ".", "",
                                  " ", "x\x00y", "x\ny"])
def test_an_artifact_name_cannot_leave_the_artifact_directory(run_dir, tmp_path, outside, name):
    before = {k: v for k, v in files_under(tmp_path).items() if not (tmp_path / k).is_relative_to(run_dir)}
    with pytest.raises(ArtifactError):
        prov4ml.log_artifact(name, b"payload", prov4ml.Context.TRAINING)
    _unchanged_outside(tmp_path, run_dir, before)


def test_a_symlinked_directory_in_the_store_gets_nothing_written_through_it(run_dir, tmp_path, outside):
    store = prov4ml.get_active_run().artifacts.directory
    (store / "evil").symlink_to(outside)
    before = {k: v for k, v in files_under(tmp_path).items() if not (tmp_path / k).is_relative_to(run_dir)}
    for name in ("evil/x.txt", "evil/sub/x.txt", "evil/secret.txt"):
        with pytest.raises(ArtifactError, match="outside"):
            prov4ml.log_artifact(name, b"payload", prov4ml.Context.TRAINING)
    _unchanged_outside(tmp_path, run_dir, before)


def test_a_symlink_at_the_destination_is_not_followed(run_dir, outside):
    store = prov4ml.get_active_run().artifacts.directory
    (store / "config.json").symlink_to(outside / "secret.txt")
    record = prov4ml.log_artifact("config.json", {"a": 1}, prov4ml.Context.TRAINING)
    assert record["path"].endswith("config.1.json")
    assert (outside / "secret.txt").read_text() == "secret\n"


def test_symlinked_and_special_sources_are_refused_quickly(run_dir, tmp_path, outside):
    (tmp_path / "link").symlink_to(outside / "secret.txt")
    (tmp_path / "dirlink").symlink_to(outside)
    os.mkfifo(tmp_path / "fifo")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "sock"))
    started = time.monotonic()
    for source in (tmp_path / "link", tmp_path / "dirlink", tmp_path / "fifo", tmp_path / "sock", "/dev/zero",
                   "/dev/null", "/proc/self/mem"):
        for copy in (True, False):
            with pytest.raises(ArtifactError):
                prov4ml.log_artifact("a", source, prov4ml.Context.TRAINING, log_copy_in_prov_directory=copy)
    server.close()
    assert time.monotonic() - started < 5


def test_a_directory_artifact_copies_its_regular_files_only(run_dir, tmp_path, outside):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("a")
    (src / "passwd").symlink_to("/etc/passwd")
    (src / "secret").symlink_to(outside / "secret.txt")
    (src / "etc").symlink_to("/etc")
    os.mkfifo(src / "fifo")
    record = prov4ml.log_artifact("tree", src, prov4ml.Context.TRAINING)
    assert record["files"] == 1 and sorted(record["skipped"]) == ["etc", "fifo", "passwd", "secret"]
    copy = prov4ml.get_active_run().rank_root / record["path"]
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == ["sub", "sub/a.txt"]


def test_sha256_of_a_special_file_is_an_error_not_an_endless_read():
    """Paths named by untrusted records (a prov.json to validate) are hashed with this."""
    with pytest.raises(OSError):
        sha256_file(Path("/dev/zero"))


@pytest.fixture
def umask():
    """Set the process umask for a test, and put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize(("mask", "allowed"), [(0o000, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_files_follow_the_umask_and_are_never_world_writable(tmp_path, umask, mask, allowed):
    torch = pytest.importorskip("torch")
    umask(mask)
    (tmp_path / "in.txt").write_text("x")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "f.txt").write_text("y")
    run_dir = prov4ml.start_run(experiment_name="m", provenance_save_dir=tmp_path / "prov", run_id="u",
                                sample_interval=None)
    prov4ml.log_artifact("value.json", {"a": 1}, prov4ml.Context.TRAINING)
    prov4ml.log_artifact("in.txt", tmp_path / "in.txt", prov4ml.Context.TRAINING)
    prov4ml.log_artifact("tree", tmp_path / "tree", prov4ml.Context.TRAINING)
    prov4ml.save_model_version(torch.nn.Linear(2, 2), "m", prov4ml.Context.TRAINING)
    prov4ml.get_active_run().close()
    prov4ml.api._active = None
    made = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(made) == 5  # the shard, three artifact files, the model version
    modes = {str(p.relative_to(run_dir)): stat.S_IMODE(p.stat().st_mode) for p in made}
    assert {name: mode & ~allowed for name, mode in modes.items()} == dict.fromkeys(modes, 0), modes
