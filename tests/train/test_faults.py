"""A run survives its bad days (issue 25): SIGKILL at any moment then --resume ends bitwise equal to a run never
stopped, in both trainers; a damaged file of each kind ends in its one-line message and exit status 2 (a derived one
is rebuilt), never a silent resume; a full disk keeps the previous checkpoint; one run per output folder.

The killed runs are real processes (tests/train/fault_run.py), killed with SIGKILL at chosen moments (inside the SFT
stage, after an optimizer step, halfway through a checkpoint / SFT weights / reference cache / metrics row write) and
at a random time (the seed is in the report of a failure).
"""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from rlhfv_train.files import DamagedFile, SaveFailed, load_verified, save_verified
from rlhfv_train.run import output
from rlhfv_train.run.checkpoint import append_row

pytest.importorskip("PIL")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAULT_RUN = os.path.join(ROOT, "tests", "train", "fault_run.py")
DDPO = ["--max-steps", "6", "--save-every", "2", "--eval-every", "3", "--sft-steps", "6", "--batch-size", "4",
        "--no-hallucination-eval", "--no-progress", "--device", "cpu"]
GRPO = ["--judge", "scene", "--max-steps", "4", "--save-every", "2", "--eval-every", "2", "--sft-steps", "4",
        "--num-generations", "3", "--prompts-per-step", "2", "--max-new-tokens", "8", "--micro-batch", "3",
        "--eval-max-new-tokens", "6", "--no-progress", "--device", "cpu"]
OPTIONS = {"ddpo": DDPO, "grpo": GRPO}
KILLED = -signal.SIGKILL


def run(trainer, fault, out, data, *extra, resume=True):
    args = [sys.executable, FAULT_RUN, trainer, fault, "--data", data, "--output-dir", str(out), *OPTIONS[trainer],
            *extra, *(["--resume"] if resume else [])]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)


def final_state(out):
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return state, f.read()


def assert_bitwise_equal(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def same_run(straight, resumed):
    (s_state, s_rows), (r_state, r_rows) = final_state(straight), final_state(resumed)
    for key in ("model", "optimizer", "scheduler", "step"):
        assert_bitwise_equal(s_state[key], r_state[key], key)
    assert r_rows == s_rows


# The chains: each link is one process with its fault, resuming where the last one died; the faults fire in this
# order because each link's files decide what it runs (no sft.pt yet: the SFT stage runs again, and so on).
CHAINS = {
    "ddpo": ["sft:3",        # inside the SFT stage: nothing written yet
             "save:1",       # halfway through sft.pt
             "save:2",       # sft.pt written; halfway through the reference cache
             "step:3",       # just after step 3's optimizer step (checkpoint of step 2 on disk)
             "save:1",       # resumed at 2; halfway through step 4's checkpoint
             "row:3",        # resumed at 2 again; halfway through step 5's metrics row
             "time",         # anywhere
             "none"],
    "grpo": ["save:1", "step:2", "row:2", "save:1", "time", "none"],
}


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["ddpo", "grpo"])
def test_sigkill_anywhere_then_resume_is_bitwise_equal(tmp_path, dataset, trainer, fresh_seed):
    straight = run(trainer, "none", tmp_path / "straight", dataset, resume=False)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = tmp_path / "killed"
    delay = 2.0 + (fresh_seed % 1000) / 1000 * 6.0  # 2 to 8 s: a process starts in ~4 s
    for link, fault in enumerate(CHAINS[trainer]):
        done = run(trainer, f"time:{delay:.2f}" if fault == "time" else fault, killed, dataset)
        if fault in ("time", "none"):
            assert done.returncode in ((KILLED, 0) if fault == "time" else (0,)), (link, fault, done.stderr[-3000:])
        else:
            assert done.returncode == KILLED, (link, fault, done.returncode, done.stderr[-3000:])
    same_run(tmp_path / "straight", killed)


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
    """A finished tiny DDPO run: checkpoint.pt, sft.pt, the reference cache and metrics.jsonl."""
    out = tmp_path_factory.mktemp("finished")
    done = run("ddpo", "none", out, dataset, resume=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def middle_of_the_largest_entry(path) -> int:
    """The offset of a byte in the middle of the biggest entry's bytes (a flip elsewhere may hit the padding between
    entries, which holds nothing)."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_length + extra_length + info.file_size // 2


def damage(path, how):
    data = bytearray(open(path, "rb").read())
    if how == "flip":
        data[middle_of_the_largest_entry(path)] ^= 0x40
    elif how == "truncate":
        data = data[:len(data) * 2 // 3]
    elif how == "empty":
        data = bytearray()
    elif how == "header":
        data[:16] = b"\x80\x02garbagegarbage"
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("how", ["flip", "truncate", "empty", "header"])
def test_a_damaged_file_is_found_on_read_whatever_the_damage(tmp_path, how):
    path = str(tmp_path / "state.pt")
    save_verified(path, {"w": torch.randn(300, 300), "step": 3}, what="test state")
    assert load_verified(path, advice="-")["step"] == 3
    damage(path, how)
    with pytest.raises(DamagedFile, match=rf"{path} is damaged \(.+\); remove it"):
        load_verified(path, advice="remove it")


def test_a_file_checked_before_the_work_is_read_once_and_a_later_write_is_seen(tmp_path, monkeypatch):
    """--resume checks checkpoint.pt and sft.pt before any work and loads them later: one CRC pass per file, unless
    the file changed in between (a flip keeps the size; the write gives it a new modification time)."""
    from rlhfv_train import files
    path = str(tmp_path / "checkpoint.pt")
    save_verified(path, {"w": torch.randn(300, 300), "step": 3}, what="test state")
    old = os.stat(path).st_mtime - 60
    os.utime(path, (old, old))  # settled: written a minute ago
    passes = []
    real = files.archive_problem
    monkeypatch.setattr(files, "archive_problem", lambda p: passes.append(p) or real(p))
    files.verify(path, advice="-")
    assert load_verified(path, advice="-")["step"] == 3 and len(passes) == 1
    damage(path, "flip")
    with pytest.raises(DamagedFile, match="checksum"):
        load_verified(path, advice="-")
    assert len(passes) == 2


@pytest.mark.parametrize("trainer,name,how", [("ddpo", "checkpoint.pt", "flip"), ("ddpo", "checkpoint.pt", "header"),
                                              ("ddpo", "sft.pt", "truncate"), ("grpo", "checkpoint.pt", "empty")])
def test_resume_with_a_damaged_file_stops_with_one_line_and_status_2(finished, tmp_path, dataset, trainer, name, how):
    """(GRPO shares the checks of the run's start: a damaged file is refused there before its kind is looked at.)"""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    damage(out / name, how)
    done = run(trainer, "none", out, dataset, "--max-steps", "8")
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    advice = "remove it to start over" if name == "checkpoint.pt" else "the SFT stage runs again"
    assert len(lines) == 1 and f"{out / name} is damaged" in lines[0] and advice in lines[0], done.stderr[-2000:]
    assert "data:" not in done.stdout  # refused before any work


def test_a_kill_while_resume_rewrites_the_metrics_leaves_every_row(finished, tmp_path, dataset):
    """--resume keeps the rows up to the checkpoint through a new file renamed over the old one: SIGKILL halfway
    through writing it leaves metrics.jsonl as it was (it was truncated in place: a kill there emptied it, and the next
    --resume went on without the step-0 baseline), and the next --resume ends with every row."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state["step"] = 4  # rows 5 and 6 are past it: --resume must drop them
    save_verified(str(out / "checkpoint.pt"), state, what="checkpoint")
    before = (out / "metrics.jsonl").read_text()
    killed = run("ddpo", "rewrite:1", out, dataset)
    assert killed.returncode == KILLED, killed.stderr[-2000:]
    assert (out / "metrics.jsonl").read_text() == before
    done = run("ddpo", "none", out, dataset)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == list(range(7))


def test_a_damaged_reference_cache_is_rebuilt(finished, tmp_path, dataset):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    cache = next((out / "ref_cache").iterdir())
    good = load_verified(str(cache), advice="-")
    damage(cache, "flip")
    done = run("ddpo", "none", out, dataset)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{cache} is damaged" in done.stdout and "computing the reference scores again" in done.stdout
    assert load_verified(str(cache), advice="-") == good


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, dataset):
    out = tmp_path / "run"
    done = run("ddpo", "full:4", out, dataset, resume=False)  # saves: sft.pt, refs, step 2, step 4 <- full
    assert done.returncode == 2, done.stderr[-2000:]
    message = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(message) == 1 and "could not write the checkpoint" in message[0], done.stderr[-2000:]
    assert "No space left on device" in message[0] or "the disk is full" in message[0]
    assert f"the previous checkpoint at {out / 'checkpoint.pt'} is intact" in message[0]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2
    assert not os.path.exists(out / "checkpoint.pt.tmp")
    resumed = run("ddpo", "none", out, dataset)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout and "at step 2" in resumed.stdout


def test_a_save_that_fails_leaves_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    save_verified(path, {"step": 1}, what="checkpoint")

    def fails(state, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1972800 vs 1972688")
    monkeypatch.setattr(torch, "save", fails)
    with pytest.raises(SaveFailed, match=rf"could not write the checkpoint {path} \(the disk is full: .* MiB free\); "
                                         rf"the previous checkpoint at {path} is intact"):
        save_verified(path, {"step": 2}, what="checkpoint")
    monkeypatch.undo()
    assert load_verified(path, advice="-") == {"step": 1} and not os.path.exists(path + ".tmp")


def test_a_metrics_row_is_one_write(tmp_path, monkeypatch):
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(data) or real_write(fd, data))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        append_row(f, {"step": 1, "loss": 0.5, "note": "x" * 20000})
    assert len(writes) == 1 and json.loads(writes[0])["step"] == 1


def test_one_run_per_output_folder(tmp_path, dataset):
    """A second run in a busy folder fails at once naming the holder; the lock of a killed run is no obstacle."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from rlhfv_train.run import output; output.claim(sys.argv[2]); print('held', "
                               "flush=True); time.sleep(600)", ROOT, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(output.FolderBusy, match=rf"{out} is in use by another run \(pid {holder.pid} on .*"
                                                    rf"delete {out / 'run.lock'}"):
            output.claim(str(out))
        busy = run("ddpo", "none", out, dataset, resume=False)
        assert busy.returncode == 2 and f"pid {holder.pid}" in busy.stderr and "data:" not in busy.stdout
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = output.claim(str(out))  # the dead holder's lock went with it
    again = output.claim(str(out))  # re-entrant within a process
    again.release()
    lock.release()


def test_an_unwritable_output_folder_fails_before_any_work(tmp_path, dataset):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = run("ddpo", "none", blocker / "out", dataset, resume=False)
    assert done.returncode == 2 and "cannot write there" in done.stderr and "data:" not in done.stdout


def test_too_little_room_for_the_next_checkpoint_is_refused(tmp_path, monkeypatch):
    (tmp_path / "checkpoint.pt").write_bytes(bytes(5000))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4000))
    with pytest.raises(ValueError, match="next save needs 0.0 MiB .*checkpoint.pt"):
        output.check_room(str(tmp_path), known={"checkpoint.pt": 5000}, estimated=0)
    with pytest.warns(RuntimeWarning, match="estimated at .* may not fit"):
        output.check_room(str(tmp_path), known={}, estimated=10_000)
    output.check_room(str(tmp_path), known={}, estimated=100)  # fits: silent
