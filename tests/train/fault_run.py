"""Runs a trainer's command line and kills it with SIGKILL at a chosen moment (tests/train/test_faults.py).

    python tests/train/fault_run.py ddpo|grpo FAULT [trainer options...]

FAULT: "none"; "sft:N" (the N-th SFT step, inside its loss); "step:N" (just after the N-th optimizer step, before its
metrics row and checkpoint); "save:N" (halfway through writing the N-th file torch.save writes: checkpoint, SFT
weights, reference scores); "row:N" (halfway through the N-th metrics row); "time:S" (after S seconds, wherever the run
is); "full:N" (the N-th torch.save writes half its bytes, then fails as a full disk does: ENOSPC, no kill);
"rewrite:N" (halfway through the N-th whole-file text rewrite, e.g. --resume's metrics.jsonl); "nan:N@R" (the N-th
training loss of process R, counted where gradients are on, is NaN, no kill: the NaN guard's test under torchrun).
The kill is a real SIGKILL: no Python cleanup, no flushing, exactly what `kill -9` or the OOM killer does.
"""
import errno
import io
import os
import signal
import sys
import threading


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def counting(n, real, before=None):
    """`real`, except that its n-th call runs before() (if any) and dies instead of returning."""
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            if before is None:
                real(*args, **kwargs)
            else:
                before(*args, **kwargs)
            die()
        return real(*args, **kwargs)
    return wrapper


def install(trainer: str, fault: str) -> None:
    import torch
    from rlhfv_train.run import checkpoint, sft
    kind, _, value = fault.partition(":")
    if kind == "none":
        return
    if kind == "time":
        threading.Timer(float(value), die).start()
        return
    n = int(value.partition("@")[0])
    if kind == "sft":
        sft.chosen_nll = counting(n, sft.chosen_nll, before=lambda *a, **k: None)
    elif kind == "step":
        module = __import__(f"rlhfv_train.{trainer}.trainer", fromlist=["optimizer_step"])
        module.optimizer_step = counting(n, module.optimizer_step)
    elif kind == "save":
        real_save = torch.save

        def half_written(state, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(state, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            f.flush()
        torch.save = counting(n, real_save, before=half_written)
    elif kind == "full":
        real_save = torch.save
        calls = [0]

        def disk_fills(state, f, *args, **kwargs):
            calls[0] += 1
            if calls[0] != n:
                return real_save(state, f, *args, **kwargs)
            f.write(b"PK\x03\x04" + bytes(1000))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        torch.save = disk_fills
    elif kind == "rewrite":
        from rlhfv_train import files
        from rlhfv_train.run import checkpoint as checkpoint_module

        def half_text(path, text, *, what):
            with open(path + ".tmp", "w") as f:
                f.write(text[:len(text) // 2])
                f.flush()
        checkpoint_module.write_text_whole = counting(n, files.write_text_whole, before=half_text)
    elif kind == "nan":
        module = __import__(f"rlhfv_train.{trainer}.trainer", fromlist=["batch_loss"])
        name = "batch_loss" if trainer == "ddpo" else "micro_batch_loss"
        real, calls, rank = getattr(module, name), [0], int(value.partition("@")[2] or 0)

        def poisoned(*args, **kwargs):
            result = real(*args, **kwargs)
            if torch.is_grad_enabled() and int(os.environ.get("RANK", "0")) == rank:
                calls[0] += 1
                if calls[0] == n:
                    result[0].loss = result[0].loss * float("nan")
            return result
        setattr(module, name, poisoned)
    elif kind == "row":
        def half_row(metrics_file, row):
            import json
            line = (json.dumps(row) + "\n").encode()
            os.write(metrics_file.fileno(), line[:len(line) // 2])
        checkpoint.append_row = counting(n, checkpoint.append_row, before=half_row)
        from rlhfv_train.run import loop
        loop.append_row = checkpoint.append_row
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    trainer, fault, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    install(trainer, fault)
    if trainer == "ddpo":
        from rlhfv_train.ddpo.cli import main
    else:
        from rlhfv_train.grpo.cli import main
    sys.exit(main(argv))
