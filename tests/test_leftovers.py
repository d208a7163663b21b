"""Nothing half-written and no leftovers: SIGTERM during `msd-fast encode` removes its temporary file, a writer
killed outright leaves one that the next write removes, write errors name the user's path, and run logs are private."""
import errno
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from msd_fast import Key
from msd_fast.atomic import _HOST, atomic_write, remove_stale_temporaries
from msd_fast.server.logs import MetricsLog


def _temporaries(folder):
    return sorted(name for name in os.listdir(folder) if name.startswith(".msd_fast-"))


@pytest.mark.parametrize("signum, status, last_line", [(signal.SIGTERM, 143, "terminated"),
                                                       (signal.SIGINT, 130, "interrupted")], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_encode_leaves_neither_a_temporary_nor_a_shard(tmp_path, signum, status, last_line):
    Key.generate().save(tmp_path / "k.key")
    out = tmp_path / "big.shard"
    process = subprocess.Popen([sys.executable, "-m", "msd_fast.cli", "encode", "--key", str(tmp_path / "k.key"),
                                "--data", "synthetic:20000", "--patch-size", "8", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not _temporaries(tmp_path) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _temporaries(tmp_path), "encode never started writing (or finished too fast to interrupt)"
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr
    assert stderr.strip().splitlines()[-1] == f"msd-fast encode: {last_line}"
    assert "Traceback" not in stderr
    assert _temporaries(tmp_path) == [] and not out.exists()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_writer_killed_outright_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    stale = tmp_path / f".msd_fast-{_HOST}-{_dead_pid()}-abc123.tmp"
    other_host = tmp_path / f".msd_fast-{_HOST}x-{_dead_pid()}-abc123.tmp"  # another machine's PID means nothing here
    alive = tmp_path / f".msd_fast-{_HOST}-{os.getppid()}-abc123.tmp"  # a live writer's file
    for path in (stale, other_host, alive):
        path.write_bytes(b"half")
    with atomic_write(tmp_path / "result.bin") as handle:
        handle.write(b"complete")
    assert not stale.exists() and other_host.exists() and alive.exists()
    assert (tmp_path / "result.bin").read_bytes() == b"complete"
    assert remove_stale_temporaries(str(tmp_path)) == []


def test_a_missing_folder_is_named_as_the_users_path_not_the_temporary(tmp_path):
    target = tmp_path / "no-such-folder" / "model.bin"
    with pytest.raises(FileNotFoundError) as info:
        with atomic_write(target) as handle:
            handle.write(b"x")
    assert str(target) in str(info.value) and ".msd_fast-" not in str(info.value)


def test_a_failure_while_writing_names_the_users_path_and_leaves_nothing(tmp_path, monkeypatch):
    def disk_full(fd):  # the kernel's error names the file being written: here, the temporary
        raise OSError(errno.ENOSPC, "No space left on device", os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr("msd_fast.atomic.os.fsync", disk_full)
    target = tmp_path / "model.bin"
    with pytest.raises(OSError) as info:
        with atomic_write(target) as handle:
            handle.write(b"x")
    assert info.value.errno == errno.ENOSPC
    assert str(target) in str(info.value) and ".msd_fast-" not in str(info.value)
    assert _temporaries(tmp_path) == [] and not target.exists()


def test_existing_files_are_refused_with_the_flag_to_use(tmp_path):
    key = Key.generate()
    key.save(tmp_path / "k.key")
    with pytest.raises(FileExistsError, match="--force on the command line, overwrite=True in Python"):
        key.save(tmp_path / "k.key")


def test_run_logs_are_private(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("")
    path.chmod(0o644)  # written by an older version
    for append in (True, False):
        log = MetricsLog(str(path), append=append)
        log.write(event="step", loss=1.0)
        log.close()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    fresh = tmp_path / "fresh.jsonl"
    MetricsLog(str(fresh), append=False).close()
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o600
