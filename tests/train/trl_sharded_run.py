"""TRL's DPOTrainer and the drop-ins under accelerate's own FSDP2 path on CPU (tests/train/test_scale_out.py launches
it with torchrun, 2 gloo processes).

    torchrun --nproc_per_node 2 tests/train/trl_sharded_run.py OUT.json [zero3]

accelerate runs FSDP only on GPU-like devices: on CPU it turns an FSDP plugin into plain DDP without a word
(../shared/notes/cpu-distributed.md). `force_fsdp_on_cpu` makes its state take the FSDP path on CPU, so
`DPOConfig(fsdp=..., fsdp_config={"version": 2, "reshard_after_forward": True})` shards the policy and the reference
exactly as accelerate's fsdp2_prepare_model does on GPUs (the decoder layers resharded after forward, a tail unit of
the final norm and the lm_head, the root). Each trainer trains 2 steps on the same 4 pairs (one pair per process per
step); process 0 writes {trainer: {"losses": [...], "weights": {name: flat list}, "fsdp": was the model
FSDP2-sharded}} to OUT.json.
With `zero3`: DPOTrainer and the drop-in under accelerate's DeepSpeed ZeRO-3 path instead (DPOConfig(deepspeed=...),
which runs on CPU as it is).
"""
import copy
import json
import os
import sys

import torch


def force_fsdp_on_cpu():
    """accelerate's state with an FSDP plugin on CPU processes (MULTI_CPU) becomes FSDP, as on GPUs."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = init


def zero3(out_path):
    import deepspeed.comm.torch
    deepspeed.comm.torch.build_shm_op = lambda: None  # a CPU all-reduce fast path, JIT-compiled (~30 s): not needed
    import datasets
    import trl
    from deepspeed.utils import safe_get_full_fp32_param

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_trl_dropin import ROWS, TOKENIZER, tiny_llama

    from rlhfv_train.integrations.trl import DPOTrainer

    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "train_batch_size": "auto", "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True}
    results = {}
    for name, cls, options in (("zero3 trl", trl.DPOTrainer, {}),
                               ("zero3 ours fused-linear", DPOTrainer, {"use_fused_linear": True})):
        model = tiny_llama()
        args = trl.DPOConfig(output_dir=os.path.join(os.path.dirname(out_path), name.replace(" ", "-")), max_steps=2,
                             per_device_train_batch_size=1, learning_rate=1e-2, report_to=[], logging_steps=1,
                             save_strategy="no", use_cpu=True, bf16=False, beta=0.5, seed=0, deepspeed=config)
        trainer = cls(model=model, ref_model=copy.deepcopy(model), args=args, processing_class=TOKENIZER,
                      train_dataset=datasets.Dataset.from_list(ROWS), **options)
        trainer.train()
        head = trainer.model.lm_head.weight  # partitioned between the steps (persistence threshold 0)
        partitioned = type(trainer.model_wrapped).__name__ == "DeepSpeedEngine" and head.numel() == 0
        weights = {n: safe_get_full_fp32_param(p).flatten().tolist() for n, p in trainer.model.named_parameters()}
        results[name] = {"losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
                         "weights": weights, "partitioned": partitioned}
    if int(os.environ["RANK"]) == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


def main(out_path):
    force_fsdp_on_cpu()
    import datasets
    import trl
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_trl_dropin import PROMPTS, ROWS, TOKENIZER, reward_length, tiny_llama

    from rlhfv_train.integrations.trl import DDPOTrainer, DPOTrainer, GRPOTrainer

    results = {}
    # accelerate 1.16's policy: the decoder layers, then a tail unit [final norm, lm_head] not resharded after
    # forward (the norm's hook gathers the head), then the root
    root = ["LlamaDecoderLayer"]
    own = ["LlamaDecoderLayer", "Linear"]  # every nn.Linear its own unit, the lm_head among them
    cases = [("trl", trl.DPOTrainer, {}, root), ("ours fused-linear", DPOTrainer, {"use_fused_linear": True}, root),
             ("ours logits", DPOTrainer, {}, root),
             ("ddpo logits", DDPOTrainer, {"gamma": 3.0}, root),
             ("ddpo fused-linear", DDPOTrainer, {"gamma": 3.0, "use_fused_linear": True}, root),
             ("trl, head own unit", trl.DPOTrainer, {}, own),
             ("ours fused-linear, head own unit", DPOTrainer, {"use_fused_linear": True}, own),
             ("ours logits, head own unit", DPOTrainer, {}, own)]
    for name, cls, options, units in cases:
        fsdp_config = {"version": 2, "reshard_after_forward": True, "transformer_layer_cls_to_wrap": units,
                       "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}
        model = tiny_llama()
        args = trl.DPOConfig(output_dir=os.path.join(os.path.dirname(out_path), name.replace(" ", "-")), max_steps=2,
                             per_device_train_batch_size=1, learning_rate=1e-2, report_to=[], logging_steps=1,
                             save_strategy="no", use_cpu=True, bf16=False, beta=0.5, seed=0,
                             fsdp="full_shard", fsdp_config=fsdp_config)
        trainer = cls(model=model, ref_model=copy.deepcopy(model), args=args, processing_class=TOKENIZER,
                      train_dataset=datasets.Dataset.from_list(ROWS), **options)
        trainer.train()
        wrapped = trainer.model_wrapped if hasattr(trainer, "model_wrapped") else trainer.model
        sharded = any(isinstance(p, DTensor) for p in trainer.model.parameters())
        state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
        results[name] = {"losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
                         "weights": {k: v.detach().float().flatten().tolist() for k, v in state.items()},
                         "fsdp": sharded, "wrapped": type(wrapped).__name__,
                         "head": type(trainer.model.lm_head).__name__,
                         "head_sharded": isinstance(trainer.model.lm_head.weight, DTensor)}
    # GRPO: the policy from a folder (TRL loads its reference from there), generation under FSDP2
    import torch.distributed as dist
    model_dir = os.path.join(os.path.dirname(out_path), "grpo-model")
    if int(os.environ["RANK"]) == 0:
        tiny_llama().save_pretrained(model_dir)
        TOKENIZER.save_pretrained(model_dir)
    dist.barrier()
    for name, cls, options in (("grpo trl", trl.GRPOTrainer, {}),
                               ("grpo ours fused-linear", GRPOTrainer, {"use_fused_linear": True})):
        fsdp_config = {"version": 2, "reshard_after_forward": True, "transformer_layer_cls_to_wrap": root,
                       "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}
        args = trl.GRPOConfig(output_dir=os.path.join(os.path.dirname(out_path), name.replace(" ", "-")),
                              per_device_train_batch_size=2, num_generations=2, max_completion_length=6,
                              use_cpu=True, bf16=False, report_to=[], save_strategy="no", max_steps=2, seed=0,
                              logging_steps=1, beta=0.1, learning_rate=1e-2, fsdp="full_shard",
                              fsdp_config=fsdp_config)
        trainer = cls(model=model_dir, reward_funcs=[reward_length], args=args, processing_class=TOKENIZER,
                      train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS]), **options)
        trainer.train()
        state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
        results[name] = {"losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
                         "weights": {k: v.detach().float().flatten().tolist() for k, v in state.items()},
                         "fsdp": any(isinstance(p, DTensor) for p in trainer.model.parameters())}
    if int(os.environ["RANK"]) == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    (zero3 if sys.argv[2:] == ["zero3"] else main)(sys.argv[1])
