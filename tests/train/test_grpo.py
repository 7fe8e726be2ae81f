"""The GRPO trainer (rlhfv_train.grpo) at tiny size: rollouts score the tokens that were sampled, the loss is
normalised the same whatever the micro-batching, runs resume exactly, judges (exact, generative, user-given) and
pointwise rewards plug in, and bad configurations fail clearly."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torchrun_launch import run_under_torchrun

import rlhfv_kernels as rk
from rlhfv_train.data import load_records
from rlhfv_train.eval import GenerationSettings
from rlhfv_train.grpo import GRPOConfig, build_parser, main, train_grpo
from rlhfv_train.grpo import rollouts as rollout_ops
from rlhfv_train.grpo.rewards import GenerativeJudge, grouped_comparison
from rlhfv_train.models import tiny

pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def warm(dataset, tmp_path_factory):
    """Weights after a short warm-up, so that rollouts are scene descriptions rather than random words."""
    out = tmp_path_factory.mktemp("warm")
    train_grpo(small_config(out, dataset, max_steps=1, sft_steps=150, beta_kl=0.0, updates_per_rollout=1))
    return str(out / "sft.pt")


def small_config(output_dir, dataset, **overrides):
    values = dict(data=dataset, judge="scene", output_dir=str(output_dir), max_steps=3, num_generations=3,
                  prompts_per_step=4, max_new_tokens=14, micro_batch=5, eval_fraction=0.1, eval_every=2,
                  save_every=2, eval_max_new_tokens=8, sft_steps=0, progress=False, device="cpu", lr=1e-3)
    values.update(overrides)
    return GRPOConfig(**values)


def _records(dataset, n):
    return load_records(dataset)[0][:n]


def test_rollouts_score_the_tokens_generate_sampled(dataset):
    """Re-packed right-padded sequences give the log-probs generate() saw when it sampled each token (left-padded,
    with a KV cache): labels line up, the image is in place, positions match."""
    records = _records(dataset, 3)
    processor = tiny.build_processor()
    model = tiny.build_model(processor, seed=1)
    settings = GenerationSettings(do_sample=True, num_samples=2, max_new_tokens=7, seed=11, batch_size=3)
    rollouts = rollout_ops.sample(model, processor, records, [0, 1, 2], k=2, settings=settings, device="cpu")
    logps = rollout_ops.token_logps(model, rollouts, micro_batch=4, temperature=0.7)
    # The same sampling by hand, keeping generate()'s raw logits.
    tok = processor.tokenizer
    tok.padding_side = "left"
    inputs = processor(images=[synthetic_image(r) for r in records], text=[f"<image> {r.question}" for r in records],
                       return_tensors="pt", padding=True)
    torch.manual_seed(11)
    out = model.generate(**inputs, do_sample=True, num_return_sequences=2, max_new_tokens=7, top_k=0, top_p=1.0,
                         temperature=1.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         suppress_tokens=[tok.convert_tokens_to_ids("<image>")], output_logits=True,
                         return_dict_in_generate=True)
    tok.padding_side = "right"
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    for row in range(6):
        n = int(rollouts.answer_tokens[row])
        assert torch.equal(rollouts.labels[row][rollouts.labels[row] != -100], new[row, :n])
        expected = torch.stack([torch.log_softmax(out.logits[t][row].double() / 0.7, -1)[new[row, t]]
                                for t in range(n)])
        got = logps[row][rollouts.labels[row] != -100]
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
        assert rollouts.answers[row] == tok.decode(new[row, :n], skip_special_tokens=True).strip()
    assert rollouts.inputs["pixel_values"].shape[0] == 6
    assert torch.equal(rollouts.inputs["pixel_values"][0], rollouts.inputs["pixel_values"][1])


def synthetic_image(record):
    from rlhfv_train.data import open_images
    return open_images(record)[0]


def test_first_update_has_ratio_one(dataset):
    """Old log-probs from the fused kernels equal the policy's own: the first update's loss is the on-policy loss."""
    records = _records(dataset, 2)
    processor = tiny.build_processor()
    model = tiny.build_model(processor, seed=2)
    settings = GenerationSettings(do_sample=True, num_samples=3, max_new_tokens=6, seed=3)
    rollouts = rollout_ops.sample(model, processor, records, [0, 1], k=3, settings=settings, device="cpu")
    old = rollout_ops.token_logps(model, rollouts, micro_batch=6)
    advantages = torch.randn(6)
    logits = model(**rollouts.model_inputs(slice(0, 6))).logits
    with_old = rk.grpo_loss(logits, rollouts.labels, advantages, old_logps=old)
    on_policy = rk.grpo_loss(logits, rollouts.labels, advantages)
    torch.testing.assert_close(with_old.loss, on_policy.loss, rtol=1e-5, atol=1e-6)
    assert with_old.clip_ratio.item() == 0.0


@pytest.mark.parametrize("loss_type", rk.GRPO_LOSS_TYPES)
def test_micro_batching_does_not_change_the_step(tmp_path, dataset, warm, loss_type, monkeypatch):
    """One step with 12 sequences in micro-batches of 5 (and old/reference log-probs, clipping, KL) ends where one
    micro-batch of all 12 does: each loss type's normalisation is over the whole batch of rollouts.
    Plain SGD instead of AdamW: Adam divides each gradient by its own size, so an entry that is zero up to rounding
    (a summation-order difference, ~1e-9) moves by the whole learning rate either way; SGD's update is the gradient
    itself, so a wrong normalisation (a factor 5/12 on part of the batch) shows and rounding does not."""
    from rlhfv_train.grpo import trainer as grpo_trainer

    def sgd_and_schedule(cfg, model, total_updates):
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    monkeypatch.setattr(grpo_trainer, "optimizer_and_schedule", sgd_and_schedule)
    options = dict(max_steps=1, init_weights=warm, loss_type=loss_type, beta_kl=0.1, updates_per_rollout=2,
                   epsilon=0.05, eval_every=5, lr=2.0)
    start = torch.load(warm, map_location="cpu", weights_only=False)["model"]
    split = train_grpo(small_config(tmp_path / "a", dataset, micro_batch=5, **options))
    whole = train_grpo(small_config(tmp_path / "b", dataset, micro_batch=12, **options))
    moved = 0
    for name, value in whole["model"].state_dict().items():
        if not value.is_floating_point():
            continue
        step_whole = value - start[name]
        step_split = split["model"].state_dict()[name] - start[name]
        scale = float(step_whole.abs().max())
        moved += scale > 0
        torch.testing.assert_close(step_split, step_whole, rtol=1e-3, atol=1e-3 * scale + 1e-7, msg=name)
    assert moved > 10, "the step did not move the weights; the comparison would prove nothing"
    assert whole["metrics"]["clip_ratio"] > 0, "the second update clipped nothing; raise lr so that clipping is tested"
    assert split["metrics"]["loss"] == pytest.approx(whole["metrics"]["loss"], rel=1e-4, abs=1e-6)


def test_fused_linear_matches_the_logits_path(tmp_path, dataset, warm, monkeypatch):
    """--fused-linear (hidden states + lm_head weight, for the loss and the old and reference log-probs) takes the
    same steps as the logits path."""
    options = dict(max_steps=2, init_weights=warm, beta_kl=0.1, updates_per_rollout=2, eval_every=5)
    logits = train_grpo(small_config(tmp_path / "a", dataset, **options))
    calls = []
    for name in ("linear_grpo_loss", "linear_token_logprobs"):
        real = getattr(rk, name)
        monkeypatch.setattr(rk, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    linear = train_grpo(small_config(tmp_path / "b", dataset, fused_linear=True, **options))
    # 2 steps x (old + reference scores over 3 micro-batches; 2 updates x 3 micro-batches of loss)
    assert calls.count("linear_token_logprobs") == 12 and calls.count("linear_grpo_loss") == 12
    for name, value in logits["model"].state_dict().items():
        torch.testing.assert_close(linear["model"].state_dict()[name], value, rtol=1e-4, atol=2e-5, msg=name)
    assert linear["metrics"]["kl"] == pytest.approx(logits["metrics"]["kl"], rel=1e-3, abs=1e-6)


def test_gradient_checkpointing_takes_the_same_step(tmp_path, dataset, warm):
    """--grad-checkpointing (a RunConfig option, so GRPO has it too) recomputes activations in backward: same step."""
    options = dict(max_steps=1, init_weights=warm, beta_kl=0.1, updates_per_rollout=2, eval_every=5)
    plain = train_grpo(small_config(tmp_path / "a", dataset, **options))
    ckpt = train_grpo(small_config(tmp_path / "b", dataset, grad_checkpointing=True, **options))
    for name, value in plain["model"].state_dict().items():
        torch.testing.assert_close(ckpt["model"].state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_training_writes_metrics_plot_and_resumes_exactly(tmp_path, dataset, warm):
    config = dict(max_steps=4, init_weights=warm, beta_kl=0.05, updates_per_rollout=2)
    straight = train_grpo(small_config(tmp_path / "a", dataset, **config))
    rows = [json.loads(line) for line in open(straight["metrics_path"])]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    for key in ("eval_win_rate", "eval_scene_reward", "chair_s", "chair_i", "recall"):
        assert key in rows[0] and key in rows[2] and key in rows[4]
    for row in rows[1:]:
        assert row["reward"] == pytest.approx(0.5)  # grouped comparison: the wins of a group sum to k / 2
        assert row["kl"] >= 0 and 0 <= row["clip_ratio"] <= 1 and row["answer_tokens"] >= 1
        assert -1 <= row["scene_reward"] <= 1 and 0 <= row["zero_std_groups"] <= 1
    assert rows[4]["kl"] > 0  # the policy moved away from the frozen reference
    assert os.path.getsize(straight["plot"]) > 1000
    stopped = train_grpo(small_config(tmp_path / "b", dataset, stop_after=2, **config))
    assert stopped["stopped"]
    resumed = train_grpo(small_config(tmp_path / "b", dataset, resume=True, **config))
    for name, value in straight["model"].state_dict().items():
        assert torch.equal(resumed["model"].state_dict()[name], value), name
    assert [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl")] == [0, 1, 2, 3, 4]


def test_pointwise_and_user_rewards(tmp_path, dataset, warm):
    scene = train_grpo(small_config(tmp_path / "a", dataset, judge=None, reward="scene", max_steps=1,
                                    init_weights=warm))
    assert "eval_reward" in scene["start_metrics"] and "eval_win_rate" not in scene["start_metrics"]
    assert scene["metrics"]["reward"] == pytest.approx(scene["metrics"]["scene_reward"])
    user = train_grpo(small_config(tmp_path / "b", dataset, judge="test_grpo:longer_wins", max_steps=1,
                                   init_weights=warm))
    assert "eval_win_rate" in user["metrics"]


def longer_wins(record, pairs):
    """A user judge (module:function): the longer answer wins."""
    return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for a, b in pairs]


def _judge_processor():
    from rlhfv_train.data.synthetic import VOCABULARY
    return tiny.build_processor(words=list(VOCABULARY) + ["A", "B", "Answer", "Which", "better"])


def test_generative_judge_reads_p_a_over_p_b(dataset):
    records = _records(dataset, 1)
    processor = _judge_processor()
    model = tiny.build_model(processor, seed=4)
    pairs = [("there is a red circle on the left .", "there is a blue square on the right ."),
             ("there is a blue square on the right .", "there is a red circle on the left ."),
             ("a", "there is a green diamond in the middle and a red circle on the left .")]
    batched = GenerativeJudge(model, processor, batch_size=8)(records[0], pairs)
    single = GenerativeJudge(model, processor, batch_size=1)(records[0], pairs)
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), rtol=1e-5, atol=1e-6)
    # By hand: the last position's logits of the unpadded prompt, A against B.
    judge = GenerativeJudge(model, processor)
    prompt = "<image> " + judge.template.format(question=records[0].question, first=pairs[2][0], second=pairs[2][1])
    inputs = processor(images=[synthetic_image(records[0])], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        last = model(**inputs).logits[0, -1].double()
    a, b = processor.tokenizer.convert_tokens_to_ids(["A", "B"])
    assert batched[2] == pytest.approx(torch.softmax(last[[a, b]], 0)[0].item(), rel=1e-5, abs=1e-6)
    assert all(0 < p < 1 for p in batched)
    scores = grouped_comparison(records[0], [p[0] for p in pairs], judge)
    assert sum(scores) == pytest.approx(len(pairs) / 2)


def test_generative_judge_needs_its_choice_tokens():
    processor = tiny.build_processor()  # the scenes' vocabulary: no "A" or "B"
    model = tiny.build_model(processor)
    with pytest.raises(ValueError, match="no token for 'A'"):
        GenerativeJudge(model, processor)
    with pytest.raises(ValueError, match="must contain {second}"):
        GenerativeJudge(model, processor, template="{question} {first}")


def test_training_with_a_generative_judge_model(tmp_path, dataset, warm, capsys):
    processor = _judge_processor()
    tiny.build_model(processor, seed=6).save_pretrained(tmp_path / "judge")
    processor.save_pretrained(tmp_path / "judge")
    assert main(["--data", dataset, "--judge-model", str(tmp_path / "judge"), "--output-dir", str(tmp_path / "run"),
                 "--init-weights", warm, "--max-steps", "1", "-k", "2", "--prompts-per-step", "2",
                 "--max-new-tokens", "6", "--eval-max-new-tokens", "6", "--no-progress", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert 0 <= rows[-1]["eval_win_rate"] <= 1 and rows[-1]["reward"] == pytest.approx(0.5)
    assert "held-out, start -> end" in capsys.readouterr().out


def test_all_empty_answers_fail_clearly(tmp_path, dataset, monkeypatch):
    real = rollout_ops.generate_tokens

    def ends_at_once(*args, **kwargs):
        batches = real(*args, **kwargs)
        for batch in batches:
            batch.new_tokens[:] = tiny.build_processor().tokenizer.eos_token_id
        return batches

    monkeypatch.setattr(rollout_ops, "generate_tokens", ends_at_once)
    with pytest.raises(ValueError, match="all 12 sampled answers are empty"):
        train_grpo(small_config(tmp_path, dataset, max_steps=1))


@pytest.mark.parametrize("flags, message", [
    (["-k", "1"], "num_generations (k) must be >= 2"),
    (["--judge", ""], "no judge"),
    (["--loss-type", "ppo"], None),  # argparse's own error, exit 2
    (["--prompts-per-step", "0"], "--prompts-per-step must be in [1, inf), got 0"),
    (["--temperature", "0"], "--temperature must be in (0, inf), got 0.0"),
    (["--judge-model", "/nonexistent/judge"], "no such folder"),
    (["--judge", "nosuchmodule:fn"], "cannot load it"),
    (["--reward", "scene", "--judge", "scene"], None),  # mutually exclusive options
])
def test_bad_configurations_are_one_line_errors(tmp_path, dataset, capsys, flags, message):
    argv = ["--data", dataset, "--output-dir", str(tmp_path), "--no-progress", "--max-steps", "1", "--device", "cpu",
            "--sft-steps", "0"]
    if "--judge" not in flags and "--judge-model" not in flags:
        argv += ["--judge", "scene"]
    try:
        code = main(argv + flags)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    if message is not None:
        assert len(err) == 1 and message in err[0], err


def test_scene_judge_needs_objects(tmp_path, dataset):
    rows = [json.loads(line) for line in open(dataset)]
    path = tmp_path / "plain.jsonl"
    with open(path, "w") as f:
        for row in rows:
            row.pop("objects", None)
            f.write(json.dumps({**row, "image": os.path.join(os.path.dirname(dataset), row["image"])}) + "\n")
    with pytest.raises(ValueError, match="needs ground-truth 'objects'"):
        train_grpo(small_config(tmp_path / "run", str(path)))


def test_help_shows_defaults():
    text = " ".join(build_parser().format_help().split())
    assert "(default: runs/grpo)" in text and "(default: dapo)" in text and ">= 2) (default: 4)" in text


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "tp"])
def test_two_gloo_processes(tmp_path, dataset, warm, parallel):
    """torchrun with 2 CPU processes: each samples its share of the prompts, generation under FSDP2 runs on gathered
    parameters; the run ends with its metrics and held-out evaluation. DDP runs the fused-linear route (the old and
    reference log-probs and the loss inside DDP's forward). Under --tensor-parallel (the policy and the reference
    sharded by transformers' own plan, the head scored vocab-parallel) both processes sample every prompt alike, and
    the run equals one process's: the same rollouts, losses and KL at every step."""
    flags = {"fsdp": ["--fsdp"], "ddp": ["--fused-linear"], "tp": ["--tensor-parallel", "--fused-linear"]}[parallel]
    common = ["-m", "rlhfv_train.grpo", "--data", dataset, "--judge", "scene", "--init-weights", warm, "--max-steps",
              "2", "-k", "2", "--prompts-per-step", "4", "--max-new-tokens", "14", "--eval-max-new-tokens", "14",
              "--eval-every", "2", "--save-every", "2", "--micro-batch", "3", "--no-progress", "--device", "cpu",
              *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = run_under_torchrun([*common, "--output-dir", str(tmp_path / "two")])
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2] and "chair_s" in rows[2] and rows[2]["kl"] > 0
    if parallel == "tp":
        one = subprocess.run([sys.executable, *[a for a in common if a != "--tensor-parallel"], "--output-dir",
                              str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=600)
        assert one.returncode == 0, one.stderr[-3000:]
        alone = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
        for mine, theirs in zip(rows[1:], alone[1:]):
            assert mine["answer_tokens"] == theirs["answer_tokens"] and mine["reward"] == theirs["reward"]
            for key in ("loss", "kl", "grad_norm"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-7), (mine["step"], key)


def test_k_sweep_pipeline(tmp_path):
    """python -m experiments.grpo_sweep --quick: every k runs from one warm-up per seed, and the table, JSON and plot
    are written (a pipeline check; the recorded result is benchmarks/results/grpo-k-cpu.*)."""
    from experiments import grpo_sweep
    out = tmp_path / "sweep"
    assert grpo_sweep.main(["--quick", "--k", "2", "3", "--work-dir", str(tmp_path / "runs"), "--out", str(out),
                            "--no-progress"]) == 0
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["k"], r["seed"]) for r in result["runs"]] == [(2, 0), (3, 0)]
    assert not os.path.exists(tmp_path / "runs" / "seed0" / "k3" / "sft.pt")  # k=3 started from k=2's warm-up
    assert [row["run"] for row in result["summary"]] == ["start (SFT warm-up)", "GRPO k=2", "GRPO k=3"]
    assert "| GRPO k=3 |" in (tmp_path / "sweep.md").read_text()


def test_the_grpo_docs_name_real_options():
    import pathlib
    import re

    from experiments import grpo_sweep
    docs = pathlib.Path(__file__).resolve().parents[2] / "docs"
    sweep = (docs / "experiments.md").read_text()
    start = sweep.index("## GRPO's group size")
    end = sweep.find("\n## ", start + 1)  # the sweep's own section, not the ones after it
    section = (docs / "grpo.md").read_text() + sweep[start:end if end != -1 else None]
    known = {option for parser in (build_parser(), grpo_sweep.build_parser()) for action in parser._actions
             for option in action.option_strings}
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", section))
    assert named and named <= known, named - known
