"""The fused-linear route under torch's own wrappers, against one process on the same global batch
(tests/train/test_scale_out.py launches it with torchrun, 2 gloo processes).

    torchrun --nproc_per_node 2 tests/train/wrappers_run.py OUT.json

Each case builds the same tiny Llama (untied 613-token head), wraps it (DDP; FSDP2 with the head in the root unit or
its own unit, resharded after forward or not; gradient accumulation with the sync deferred; bf16
MixedPrecisionPolicy; PEFT LoRA, on the lm_head too, under DDP and FSDP2; DeepSpeed ZeRO-3 where installed),
computes a fused-linear loss of this process's half of the batch through rlhfv_train.models.fused_linear_forward,
and compares every parameter's gradient (gathered for the comparison only)
with the gradient of the mean loss over the whole batch in one process. Process 0 writes
{case: {"error": largest relative error over the parameters, "worst": its parameter, "loss": ...}} to OUT.json.
"naive full_tensor" is the control: the head weight read with a plain full_tensor() outside the wrappers' hooks, which
the test expects to be wrong (so the comparison can fail).
"""
import copy
import json
import os
import sys

import torch
import torch.distributed as dist

import rlhfv_kernels as rk
from rlhfv_train.models import fused_linear_forward

PAIRS, T, VOCAB = 4, 11, 613


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).float()


def global_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2 * PAIRS, T), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 3:-1] = ids[:, 4:]  # the answer's next tokens; prompt and the last position ignored
    weights = torch.where(torch.rand(ids.shape, generator=g) < 0.3, 5.0, 1.0) * (labels != -100)
    ref = torch.randn(2 * PAIRS, generator=g) * 3 - 20
    return ids, labels, weights, ref


def rows_of(pairs):
    """The chosen and the rejected rows of `pairs` (a preference batch: chosen rows first)."""
    return torch.tensor(list(pairs) + [PAIRS + p for p in pairs])


def loss_of(model, rows, *, function="ddpo", seen=None):
    ids, labels, weights, ref = (t[rows] for t in global_batch())
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if function == "ddpo":
        def ddpo(hidden, weight, *args, **kwargs):
            if seen is not None:
                seen.append(weight.dtype)
            return rk.linear_ddpo_loss(hidden, weight, *args, **kwargs)
        return fused_linear_forward(model, inputs, ddpo, labels, ref, token_weights=weights, beta=0.5,
                                    mode="mean").loss
    # the log-probs' backward recomputes the logits from the weight: the head must be gathered again there
    logps = fused_linear_forward(model, inputs, rk.linear_token_logprobs, labels)
    return -(logps * weights).sum() / (labels != -100).sum()


def full_grads(model):
    from torch.distributed.tensor import DTensor
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[name.removeprefix("module.")] = g.detach().float().clone()  # (DDP's prefix)
    return grads


def compare(grads, truth):
    worst, error = None, 0.0
    assert set(grads) == set(truth), (sorted(set(grads) ^ set(truth)))[:5]
    for name, g in grads.items():
        t = truth[name]
        e = float((g - t).norm() / t.norm().clamp_min(1e-12))
        if e >= error:
            worst, error = name, e
    return error, worst


def fsdp(model, *, head_unit, reshard, mp=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    options = {"mesh": mesh, **({"mp_policy": mp} if mp is not None else {})}
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=True, **options)
    if head_unit:
        fully_shard(model.lm_head, reshard_after_forward=reshard, **options)
    fully_shard(model, reshard_after_forward=reshard, **options)
    return model


def lora(model):
    import peft
    torch.manual_seed(2)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      init_lora_weights=False))  # the head's widened by the rank


def zero3(results, truth_of, mine):
    """DeepSpeed ZeRO-3 (its CPU accelerator, gloo): the engine's forward and the head's own gathers, for the loss
    (gradients in the forward) and the log-probs (the backward gathers the head again to recompute)."""
    try:
        import deepspeed
        import deepspeed.comm.torch
    except ImportError:
        return
    deepspeed.comm.torch.build_shm_op = lambda: None  # a CPU all-reduce fast path, JIT-compiled (~30 s): not needed
    from deepspeed.utils import safe_get_full_grad
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True}
    for function in ("ddpo", "logps"):
        truth, truth_loss = truth_of(lambda m: m, function)
        model = build_model()
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                          config=config)
        engine.backward(loss_of(engine, mine, function=function))
        partitioned = model.lm_head.weight.numel() == 0  # (a small parameter stays whole by default: threshold 0)
        grads = {name: safe_get_full_grad(p).float().clone() for name, p in model.named_parameters()}
        error, worst = compare(grads, truth)
        results[f"zero3 {function}"] = {"error": error, "worst": worst, "loss": truth_loss, "head_dtype": None,
                                        "partitioned": partitioned}


def main(out_path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = rows_of(range(rank * PAIRS // world, (rank + 1) * PAIRS // world))
    halves = [rows_of([p]) for p in range(rank * PAIRS // world, (rank + 1) * PAIRS // world)]
    everything = rows_of(range(PAIRS))
    results = {}

    def truth_of(make, function="ddpo"):
        model = make(build_model())
        loss = loss_of(model, everything, function=function)
        loss.backward()
        return full_grads(model), float(loss)

    def run(case, wrap, *, make=lambda m: m, function="ddpo", accumulate=False, tolerance=None):
        truth, truth_loss = truth_of(make, function)
        model = wrap(make(build_model()))
        seen = []
        if accumulate:  # micro-batches of one pair, the sync deferred until the last
            model.set_requires_gradient_sync(False)
            for k, rows in enumerate(halves):
                if k == len(halves) - 1:
                    model.set_requires_gradient_sync(True)
                (loss_of(model, rows, function=function, seen=seen) / len(halves)).backward()
        else:
            loss_of(model, mine, function=function, seen=seen).backward()
        error, worst = compare(full_grads(model), truth)
        results[case] = {"error": error, "worst": worst, "loss": truth_loss,
                         "head_dtype": str(seen[0]) if seen else None}

    from torch.nn.parallel import DistributedDataParallel
    run("ddp", lambda m: DistributedDataParallel(m, find_unused_parameters=True))
    for head_unit in (False, True):
        for reshard in (True, False):
            name = f"fsdp2 head {'own unit' if head_unit else 'in root'} reshard={reshard}"
            run(name, lambda m, h=head_unit, r=reshard: fsdp(m, head_unit=h, reshard=r))
    run("fsdp2 head own unit, log-probs (backward recomputes)", lambda m: fsdp(m, head_unit=True, reshard=True),
        function="logps")
    run("fsdp2 root resharded, log-probs", lambda m: fsdp(m, head_unit=False, reshard=True), function="logps")
    run("fsdp2 head own unit, accumulation", lambda m: fsdp(m, head_unit=True, reshard=True), accumulate=True)
    run("fsdp2 root resharded, accumulation", lambda m: fsdp(m, head_unit=False, reshard=True), accumulate=True)
    from torch.distributed.fsdp import MixedPrecisionPolicy
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    run("fsdp2 head own unit, bf16 mixed precision", lambda m: fsdp(m, head_unit=True, reshard=True, mp=bf16))
    run("fsdp2 + peft lora", lambda m: fsdp(m.base_model.model, head_unit=False, reshard=True) and m, make=lora)
    run("ddp + peft lora", lambda m: DistributedDataParallel(m, find_unused_parameters=True), make=lora)

    # the control: a plain full_tensor() of the head's own unit, read outside its hooks
    truth, _ = truth_of(lambda m: m)
    model = fsdp(build_model(), head_unit=True, reshard=True)
    ids, labels, weights, ref = (t[mine] for t in global_batch())
    hidden = []

    def naive(**inputs):  # inside the root's forward, as the route's own call, but the head's hooks never fire
        hidden.append(model.model(**inputs).last_hidden_state)
        return rk.linear_ddpo_loss(hidden[0], model.lm_head.weight.full_tensor(), labels, ref, token_weights=weights,
                                   beta=0.5, mode="mean").loss

    rk.run_as_forward(model, naive, input_ids=ids, attention_mask=torch.ones_like(ids)).backward()
    grads = full_grads(model)
    error, worst = compare(grads, truth)
    results["naive full_tensor"] = {"error": error, "worst": worst}
    # and the functional API handed the shard itself refuses it by name
    try:
        rk.linear_token_logprobs(hidden[0].detach(), model.lm_head.weight, labels)
        results["dtensor refused"] = None
    except ValueError as exc:
        results["dtensor refused"] = str(exc)
    # head_forward outside the model's forward, the head in the root unit resharded after forward: refused by name
    model = fsdp(build_model(), head_unit=False, reshard=True)
    hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[-1]
    try:
        rk.head_forward(model.lm_head, rk.linear_token_logprobs, hidden, labels)
        results["outside the forward refused"] = None
    except ValueError as exc:
        results["outside the forward refused"] = str(exc)
    zero3(results, truth_of, mine)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
