"""Nothing lost at the edges of a run (issue 42): a diverging run stops before it spoils a weight or a checkpoint (or
skips such updates when asked), flags that can only diverge are refused at start, --resume keeps metrics.jsonl whole
and refuses flags that change the run, a fresh run never replaces a run's files silently, and a failing disk is named.
In-process command lines (ddpo.main / grpo.main) with the tiny model; faults injected by monkeypatching."""
import errno
import json
import math
import os
import shutil

import pytest
import torch
from torchrun_launch import run_under_torchrun

from rlhfv_train import ddpo, files, grpo
from rlhfv_train.ddpo import trainer as ddpo_trainer
from rlhfv_train.grpo import trainer as grpo_trainer
from rlhfv_train.run import sft

pytest.importorskip("PIL")

DDPO = ["--max-steps", "6", "--save-every", "2", "--eval-every", "3", "--sft-steps", "6", "--batch-size", "4",
        "--no-hallucination-eval", "--no-progress", "--device", "cpu"]
GRPO = ["--judge", "scene", "--max-steps", "3", "--save-every", "1", "--eval-every", "3", "--sft-steps", "4",
        "--num-generations", "3", "--prompts-per-step", "2", "--max-new-tokens", "8", "--micro-batch", "3",
        "--eval-max-new-tokens", "6", "--no-progress", "--device", "cpu"]


def ddpo_run(out, data, *extra):
    return ddpo.main(["--data", data, "--output-dir", str(out), *DDPO, *extra])


def grpo_run(out, data, *extra):
    return grpo.main(["--data", data, "--output-dir", str(out), *GRPO, *extra])


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)


def error_line(capsys):
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(lines) == 1, captured.err[-3000:]
    return lines[0], captured.out


def poison(module, name, monkeypatch, calls_to_poison, *, attribute="loss"):
    """module.name returns NaN (through its output's `attribute`) on the given training calls (1-based, counted
    where gradients are on: the held-out evaluation runs without them)."""
    real, count = getattr(module, name), [0]

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        if torch.is_grad_enabled():
            count[0] += 1
            if count[0] in calls_to_poison:
                out = result[0] if isinstance(result, tuple) else result
                if attribute is None:
                    return result * float("nan")
                setattr(out, attribute, getattr(out, attribute) * float("nan"))
        return result
    monkeypatch.setattr(module, name, poisoned)


# 1. the NaN guard

def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_finite_checkpoint(tmp_path, dataset, capsys):
    """The case that was reported: --lr 1e6 --max-grad-norm 1e30 printed 'done ... loss nan', exited 0 and wrote NaN
    weights over every checkpoint."""
    out = tmp_path / "run"
    assert ddpo_run(out, dataset, "--lr", "1e6", "--max-grad-norm", "1e30", "--save-every", "1") == 2
    line, _ = error_line(capsys)
    step = int(line.split("error: step ")[1].split(":")[0])
    assert "the run diverged and stopped before applying it" in line and "--skip-nonfinite" in line
    assert f"the last checkpoint (step {step - 1}, {out / 'checkpoint.pt'}) is kept" in line
    state = checkpoint(out)
    assert state["step"] == step - 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    kept = rows(out)
    assert [r["step"] for r in kept] == list(range(step))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in kept[1:])


@pytest.mark.parametrize("trainer", ["ddpo", "grpo"])
def test_a_nonfinite_step_stops_the_run_or_is_skipped_and_counted(tmp_path, dataset, capsys, monkeypatch, trainer):
    module, name, run = ((ddpo_trainer, "batch_loss", ddpo_run) if trainer == "ddpo"
                         else (grpo_trainer, "micro_batch_loss", grpo_run))
    # DDPO's third training call is step 3; GRPO's fifth is step 2, update 1 (two micro-batches per update)
    call, where, saved = (3, "step 3", 2) if trainer == "ddpo" else (5, "step 2, update 1 of 2", 1)
    poison(module, name, monkeypatch, {call})
    stopped = tmp_path / "stopped"
    assert run(stopped, dataset) == 2
    line, _ = error_line(capsys)
    assert f"error: {where}: the loss is nan" in line
    before = checkpoint(stopped)
    assert before["step"] == saved and f"the last checkpoint (step {saved}," in line
    assert all(torch.isfinite(t).all() for t in before["model"].values() if t.is_floating_point())
    assert [r["step"] for r in rows(stopped)] == list(range(saved + 1))

    monkeypatch.undo()
    poison(module, name, monkeypatch, {call})  # the same update, in a run that may skip one
    skipped = tmp_path / "skipped"
    assert run(skipped, dataset, "--skip-nonfinite", "1") == 0
    captured = capsys.readouterr()
    assert f"{where}: the loss is nan" in captured.out and "update skipped (1 of at most 1" in captured.out
    assert "1 optimizer update skipped" in captured.out
    counts = [r["nonfinite_skipped"] for r in rows(skipped)[1:]]
    assert counts[0] == 0 and counts[-1] == 1 and counts == sorted(counts)
    state = checkpoint(skipped)
    assert state["nonfinite_skipped"] == 1
    updates = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    total = 6 if trainer == "ddpo" else 3 * 2
    assert updates == {total - 1}  # AdamW took every update but the skipped one
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_a_diverging_sft_stage_stops_before_writing_its_weights(tmp_path, dataset, capsys, monkeypatch):
    poison(sft, "chosen_nll", monkeypatch, {3}, attribute=None)
    out = tmp_path / "run"
    assert ddpo_run(out, dataset, "--skip-nonfinite", "5") == 2  # the SFT stage always stops
    line, _ = error_line(capsys)
    assert "error: SFT step 3 of 6: the loss is nan" in line and "--sft-lr" in line
    assert not os.path.exists(out / "sft.pt")


@pytest.mark.parametrize("trainer, flags, message", [
    ("ddpo", ["--sft-lr", "inf"], "--sft-lr must be in (0, inf), got inf"),
    ("ddpo", ["--max-grad-norm", "nan"], "--max-grad-norm must be in (0, inf], got nan"),
    ("ddpo", ["--warmup-ratio", "2"], "--warmup-ratio must be in [0, 1], got 2.0"),
    ("ddpo", ["--lr", "nan"], "--lr must be in (0, inf), got nan"),
    ("ddpo", ["--gamma", "inf"], "--gamma must be in [0, inf), got inf"),
    ("ddpo", ["--beta", "0"], "--beta must be in (0, inf), got 0.0"),
    ("ddpo", ["--weight-decay", "-1"], "--weight-decay must be in [0, inf), got -1.0"),
    ("ddpo", ["--lora-alpha", "inf"], "--lora-alpha must be a finite number, got inf"),
    ("ddpo", ["--resume", "--overwrite"], "--resume continues the run in --output-dir and --overwrite deletes it"),
    ("grpo", ["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    ("grpo", ["--epsilon", "nan"], "--epsilon must be in (0, inf), got nan"),
    ("grpo", ["--temperature", "inf"], "--temperature must be in (0, inf), got inf"),
    ("grpo", ["--beta-kl", "-0.1"], "--beta-kl must be in [0, inf), got -0.1"),
    ("grpo", ["--lr", "inf"], "--lr must be in (0, inf), got inf"),
])
def test_flags_that_can_only_diverge_are_refused_before_any_work(tmp_path, dataset, capsys, trainer, flags, message):
    run = ddpo_run if trainer == "ddpo" else grpo_run
    assert run(tmp_path / "run", dataset, *flags) == 2
    line, stdout = error_line(capsys)
    assert message in line and "data:" not in stdout


@pytest.mark.slow
def test_under_torchrun_a_nan_in_one_process_stops_every_process_at_the_same_step(tmp_path, dataset):
    """Process 1's third loss is NaN (tests/train/fault_run.py nan:3@1): the guard decides on values every process
    shares (the averaged loss, the synchronized gradients' norm), so both stop at step 3 (a process that went on
    alone would wait on its peer forever), and process 0 wrote nothing after step 2's checkpoint."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "run"
    env = {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = run_under_torchrun([os.path.join(root, "tests", "train", "fault_run.py"), "ddpo", "nan:3@1", "--data",
                               dataset, "--output-dir", str(out), *DDPO, "--batch-size", "2"], env=env, cwd=root)
    assert done.returncode != 0
    assert done.stderr.count("error: step 3: the loss is nan") == 2, done.stderr[-3000:]
    state = checkpoint(out)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["model"].values()
                                      if t.is_floating_point())
    assert [r["step"] for r in rows(out)] == [0, 1, 2]


def test_max_grad_norm_inf_means_no_clipping_and_is_allowed():
    cfg = ddpo.TrainConfig(max_grad_norm=float("inf"))
    cfg.check()


# 2-4: resume and the folder

@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert ddpo_run(out, dataset) == 0
    return out


@pytest.fixture
def copy_of(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


@pytest.mark.parametrize("flags, shown", [
    (["--lr", "0.001"], "--lr 0.001 (the run's: 0.002)"),
    (["--seed", "1"], "--seed 1 (the run's: 0)"),
    (["--batch-size", "2"], "--batch-size 2 (the run's: 4)"),
    (["--beta", "0.1"], "--beta 0.1 (the run's: 0.5)"),
    (["--gamma", "2"], "--gamma 2.0 (the run's: 5.0)"),
    (["--eval-fraction", "0.2"], "--eval-fraction 0.2 (the run's: 0.1)"),
    (["--lora-r", "4"], "--lora-r 4 (the run's: 0)"),  # was a raw traceback
    (["--fused-linear"], "--fused-linear given (the run was started without it)"),
    (["--lr", "0.001", "--seed", "2"], "--lr 0.001 (the run's: 0.002); --seed 2 (the run's: 0)"),
])
def test_resume_refuses_flags_that_change_the_run(copy_of, dataset, capsys, flags, shown):
    before = {name: (copy_of / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl")}
    assert ddpo_run(copy_of, dataset, "--resume", "--max-steps", "8", *flags) == 2
    line, stdout = error_line(capsys)
    assert "--resume: these flags differ from the run in" in line and shown in line, line
    assert "data:" not in stdout  # before any work
    assert before == {name: (copy_of / name).read_bytes() for name in before}


def test_resume_refuses_other_data(copy_of, dataset, capsys, tmp_path):
    other = tmp_path / "other.jsonl"
    shutil.copy(dataset, other)
    assert ddpo.main(["--data", str(other), "--output-dir", str(copy_of), *DDPO, "--resume"]) == 2
    line, _ = error_line(capsys)
    assert f"--data {str(other)!r} (the run's: {dataset!r})" in line


def test_resume_allows_and_says_what_only_extends_the_run(copy_of, dataset, capsys):
    assert ddpo_run(copy_of, dataset, "--resume", "--max-steps", "8", "--save-every", "4", "--eval-every", "4") == 0
    out = capsys.readouterr().out
    assert "--resume: --max-steps 8 (the run's: 6) (the learning-rate schedule is stretched" in out
    assert "--resume: --save-every 4 (the run's: 2)" in out and "--resume: --eval-every 4 (the run's: 3)" in out
    assert [r["step"] for r in rows(copy_of)] == list(range(9)) and checkpoint(copy_of)["step"] == 8


def test_resume_before_the_first_checkpoint_compares_what_shaped_the_sft_stage(copy_of, dataset, capsys):
    os.remove(copy_of / "checkpoint.pt")
    assert ddpo_run(copy_of, dataset, "--resume", "--sft-lr", "1e-3") == 2
    line, _ = error_line(capsys)
    assert "--sft-lr 0.001 (the run's: 0.0005)" in line and "sft.pt" in line
    assert ddpo_run(copy_of, dataset, "--resume", "--lr", "1e-3", "--max-steps", "2") == 0  # no DDPO step taken yet


def test_resume_rewrites_metrics_whole_or_not_at_all(copy_of, dataset, capsys, monkeypatch):
    """--resume drops the rows after the checkpoint by writing a new file and renaming it over the old one: a failure
    (or a kill) in between leaves every row as it was. (It truncated the file in place: a kill there left it empty,
    and the next --resume went on without the step-0 baseline.)"""
    state = checkpoint(copy_of)
    state["step"] = 4  # as if the run had been stopped after step 6's row but before step 6's checkpoint
    files.save_verified(str(copy_of / "checkpoint.pt"), state, what="checkpoint")
    all_rows = (copy_of / "metrics.jsonl").read_text()
    real_replace = os.replace

    def fails_for_metrics(src, dst):
        if str(dst).endswith("metrics.jsonl"):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)
    monkeypatch.setattr(files.os, "replace", fails_for_metrics)
    assert ddpo_run(copy_of, dataset, "--resume") == 2
    line, _ = error_line(capsys)
    assert f"could not write the metrics {copy_of / 'metrics.jsonl'} (Input/output error)" in line
    assert (copy_of / "metrics.jsonl").read_text() == all_rows and not (copy_of / "metrics.jsonl.tmp").exists()
    monkeypatch.undo()
    inode = os.stat(copy_of / "metrics.jsonl").st_ino
    assert ddpo_run(copy_of, dataset, "--resume") == 0
    assert os.stat(copy_of / "metrics.jsonl").st_ino != inode  # replaced, never truncated in place
    assert [r["step"] for r in rows(copy_of)] == list(range(7))


def test_a_fresh_run_in_a_run_folder_is_refused_unless_overwrite(copy_of, dataset, capsys):
    before = {name: (copy_of / name).read_bytes() for name in ("checkpoint.pt", "sft.pt", "metrics.jsonl")}
    assert ddpo_run(copy_of, dataset, "--max-steps", "2") == 2
    line, stdout = error_line(capsys)
    assert f"--output-dir {copy_of} holds a run (checkpoint.pt, sft.pt, metrics.jsonl, metrics.png)" in line
    assert "--resume" in line and "--overwrite" in line and "data:" not in stdout
    assert before == {name: (copy_of / name).read_bytes() for name in before}
    assert grpo_run(copy_of, dataset) == 2  # the other trainer too
    error_line(capsys)
    assert ddpo_run(copy_of, dataset, "--max-steps", "2", "--overwrite") == 0
    assert f"--overwrite: deleted the run in {copy_of}" in capsys.readouterr().out
    assert checkpoint(copy_of)["step"] == 2 and [r["step"] for r in rows(copy_of)] == [0, 1, 2]


# 9. disks

def test_a_full_disk_at_a_metrics_row_is_named(tmp_path, dataset, capsys, monkeypatch):
    real_write = os.write

    def full(fd, data):
        if data.startswith(b'{"step": 3'):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", full)
    out = tmp_path / "run"
    assert ddpo_run(out, dataset) == 2
    line, _ = error_line(capsys)
    assert f"could not append step 3's row to {out / 'metrics.jsonl'} (the disk is full" in line
    assert "the last checkpoint is intact" in line and "--resume" in line
    monkeypatch.undo()
    assert ddpo_run(out, dataset, "--resume") == 0 and [r["step"] for r in rows(out)] == list(range(7))


def test_a_failed_checkpoint_rename_leaves_no_tmp_and_the_previous_file(tmp_path, dataset, capsys, monkeypatch):
    real_replace, calls = os.replace, [0]

    def fails_on_the_second_checkpoint(src, dst):
        if str(dst).endswith("checkpoint.pt"):
            calls[0] += 1
            if calls[0] == 2:
                raise OSError(errno.EROFS, "Read-only file system")
        return real_replace(src, dst)
    monkeypatch.setattr(files.os, "replace", fails_on_the_second_checkpoint)
    out = tmp_path / "run"
    assert ddpo_run(out, dataset) == 2
    line, _ = error_line(capsys)
    assert f"could not write the checkpoint {out / 'checkpoint.pt'} (Read-only file system)" in line
    assert f"the previous checkpoint at {out / 'checkpoint.pt'} is intact" in line
    assert not (out / "checkpoint.pt.tmp").exists() and checkpoint(out)["step"] == 2


def test_an_io_error_reading_a_checkpoint_is_not_called_damage(copy_of, dataset, capsys, monkeypatch):
    """EIO says nothing of the file's bytes: the advice is to check the disk, never to delete the file."""
    import zipfile

    def eio(self):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(zipfile.ZipFile, "testzip", eio)
    assert ddpo_run(copy_of, dataset, "--resume", "--max-steps", "8") == 2
    line, _ = error_line(capsys)
    assert f"could not read {copy_of / 'checkpoint.pt'} (Input/output error)" in line
    assert "do not delete it" in line and "damaged" not in line and "remove it" not in line
    with pytest.raises(files.UnreadableFile, match="do not delete it"):
        files.load_verified(str(copy_of / "sft.pt"), advice="remove it")


def test_a_metrics_file_that_cannot_be_opened_is_named(tmp_path):
    """(Root ignores file permissions, so a read-only file cannot be staged here: a folder that is gone stands in.)"""
    from rlhfv_train.run.checkpoint import open_metrics
    with pytest.raises(files.SaveFailed, match=r"could not open .*metrics.jsonl to append metrics \(No such file"):
        open_metrics(str(tmp_path / "gone" / "metrics.jsonl"), True)
