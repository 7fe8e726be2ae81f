"""Running under torchrun: process group, DDP or FSDP2 wrapping, gradient-sync control and metric averaging."""
from __future__ import annotations

import atexit
import contextlib
import os

import torch


def process_device(name: str) -> torch.device:
    """The device of this process: "auto" is this process's GPU under torchrun (LOCAL_RANK), else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def _destroy_process_group() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    wait_for_idle_threads(GLOO_WORKER_THREAD)


# torch names gloo's worker threads so; they outlive destroy_process_group() while anything (FSDP2's DTensor caches,
# a user's model) still holds the group.
GLOO_WORKER_THREAD = "pt_gloo_runloop"


def wait_for_idle_threads(name: str, *, quiet_s: float = 0.05, limit_s: float = 5.0) -> bool:
    """Waits, with the GIL released, until every thread of this process named `name` has slept through `quiet_s`
    without a context switch; gives up after `limit_s`. Returns whether they all went quiet (True when there are none,
    or no /proc to read them from).

    Why: a gloo worker frees a finished collective (and the tensors it held) after the caller's wait() returned, and
    freeing a tensor that has a Python object takes the GIL. Once interpreter finalization has begun, a thread that
    asks for the GIL is ended inside that destructor: "terminate called without an active exception", SIGABRT, after
    a finished run (pytorch/pytorch#190489; 3 of ~100 two-process FSDP runs on a loaded 2-core machine). So this runs
    from atexit, before finalization. A thread waiting for the GIL wakes every switch interval (5 ms), a preempted
    one is runnable ('R'), and an idle worker sleeps on its queue without waking: quiet and sleeping means idle."""
    import time

    def workers():
        try:
            tids = os.listdir("/proc/self/task")
        except OSError:
            return {}
        found = {}
        for tid in tids:
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    if f.read().strip() != name:
                        continue
                with open(f"/proc/self/task/{tid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:  # the thread ended meanwhile
                continue
            found[tid] = (fields["State"].split()[0], fields["voluntary_ctxt_switches"].strip(),
                          fields["nonvoluntary_ctxt_switches"].strip())
        return found

    deadline = time.monotonic() + limit_s
    last, quiet_since = workers(), time.monotonic()
    while last:
        time.sleep(0.005)
        now, seen = time.monotonic(), workers()
        if seen != last or any(state != "S" for state, *_ in seen.values()):
            last, quiet_since = seen, now
        elif now - quiet_since >= quiet_s:
            return True
        if now > deadline:
            return False
    return True


class Distributed:
    """Rank and world size under torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on GPU; a no-op otherwise.
    tensor_parallel: the processes share one model and so read the same data (data_rank 0 of data_world 1)."""

    def __init__(self, device: torch.device, tensor_parallel: bool = False):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        if self.world > 1:
            import torch.distributed as dist
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
                # Tear the group down, and let gloo's workers finish freeing their last collectives, before the
                # interpreter's finalization (see wait_for_idle_threads).
                atexit.register(_destroy_process_group)
            self.rank = dist.get_rank()
        self.is_main = self.rank == 0
        self.tensor_parallel = tensor_parallel and self.world > 1
        # Who reads which data: every process its own share, except under tensor parallelism (one batch for all).
        self.data_rank, self.data_world = (0, 1) if self.tensor_parallel else (self.rank, self.world)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, values: dict) -> dict:
        """Averages float metrics over ranks."""
        if self.world == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t)}

    def wrap(self, model, device, fsdp: bool):
        """DDP (a wrapper; `model` stays the plain module), FSDP2 (shards `model` in place and returns it) or, for
        processes started with tensor_parallel, transformers' own tensor-parallel plan (in place)."""
        if self.world == 1:
            return model
        if self.tensor_parallel:
            return self._tensor_parallel(model)
        if fsdp:
            from torch.distributed.fsdp import fully_shard
            # One shard group per transformer block (the classes HF marks as not to be split), then the rest.
            block_names = set(getattr(model, "_no_split_modules", None) or [])
            for module in model.modules():
                if type(module).__name__ in block_names:
                    fully_shard(module)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel
        # Vision towers often leave parameters unused (e.g. CLIP's post-layernorm when LLaVA reads a hidden layer).
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True)

    def _tensor_parallel(self, model):
        """Shards `model` with the tensor-parallel plan its transformers class declares (q/k/v and MLP up columnwise,
        o/down rowwise, the embedding and lm_head over the vocabulary), through transformers' own entry points, on a
        1-D mesh of all processes. Every process must hold the same weights (the same seed or checkpoint)."""
        from transformers.distributed import DistributedConfig
        cls = type(model)
        if not getattr(model, "tp_plan", None):
            raise ValueError(f"--tensor-parallel: {cls.__name__} declares no tensor-parallel plan in transformers "
                             "(tp_plan); train it with DDP or --fsdp")
        config, _, mesh = cls.prepare_distribute_model(DistributedConfig(tp_size=self.world))
        return cls.maybe_distribute_model(model, config, mesh)

    @contextlib.contextmanager
    def unsharded(self, model, fsdp: bool):
        """A context in which an FSDP2-sharded model has all its parameters gathered, for generate() (which calls
        submodules such as the vision tower directly, outside the root forward that would gather them). A no-op
        without FSDP. Costs the full model's memory on every process while it lasts."""
        if not (fsdp and self.world > 1):
            yield
            return
        from torch.distributed.fsdp import FSDPModule
        if not getattr(model, "_rlhfv_fsdp_initialized", False):  # FSDP2 sets itself up on the first root forward
            token = torch.ones((1, 1), dtype=torch.long, device=next(model.parameters()).device)
            with torch.no_grad():
                model(input_ids=token, attention_mask=token)
            model._rlhfv_fsdp_initialized = True
        modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for module in modules:
            module.unshard()
        try:
            yield
        finally:
            for module in modules:
                module.reshard()

    def skip_grad_sync(self, trained):
        """A context in which backward accumulates gradients locally (all micro-batches but the last)."""
        if self.data_world == 1:  # one process, or tensor parallel: no gradient is averaged
            return contextlib.nullcontext()
        if hasattr(trained, "no_sync"):  # DDP
            return trained.no_sync()
        return _FsdpNoSync(trained)


class _FsdpNoSync:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.model.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)
        return False
