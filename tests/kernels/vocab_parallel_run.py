"""Run under torchrun (gloo, CPU): every public function on vocabulary-sharded inputs (DTensor logits Shard(-1), a
DTensor lm_head weight and bias Shard(0), torch's own ColwiseParallel on a tiny model's head) against one process's
float64 truth and same-dtype eager reference (DESIGN.md §4's criterion, values and gradients), the collectives each
call makes, and the layouts refused by name. Writes {case: "ok" | failure} and the counts to argv[1] (rank 0).

    torchrun --nproc_per_node 2 tests/kernels/vocab_parallel_run.py out.json [--quick]
"""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rlhfv_kernels as rk  # noqa: E402
from numerics import assert_meets_criterion, rounded_logits_extra  # noqa: E402
from rlhfv_kernels import reference  # noqa: E402

dist.init_process_group("gloo")
WORLD = dist.get_world_size()
MESH = init_device_mesh("cpu", (WORLD,))
QUICK = "--quick" in sys.argv
results, counts = {}, {}


def case(name):
    """Runs the decorated check now; records "ok" or the failure."""
    def run(check):
        try:
            check()
            results[name] = "ok"
        except Exception as exc:  # noqa: BLE001  (every failure is reported, the run goes on)
            results[name] = f"{type(exc).__name__}: {exc}"[:2000]
        return check
    return run


def leaves(tensors, dtype, *, truth=False):
    return [t.detach().to(dtype).to(torch.float64 if truth else dtype).clone().requires_grad_(True)
            if t is not None else None for t in tensors]


def sharded(tensor, dtype, placement):
    return distribute_tensor(tensor.detach().to(dtype), MESH, [placement]).requires_grad_(True)


def backward(out, seeds):
    """sum(out_k * seed_k) backward; returns the values."""
    outs = out if isinstance(out, tuple) else (out,)
    outs = tuple(o.loss if hasattr(o, "loss") else o for o in outs)
    sum((o * s.to(o.dtype)).sum() for o, s in zip(outs, seeds)).backward()
    return [o.detach() for o in outs]


def compare(ours, same, truth, dtype, what, relative=False, extra=None):
    for k, (o, s, t) in enumerate(zip(ours, same, truth)):
        if o is None and t is None:
            continue
        assert_meets_criterion(o, s, t, dtype, f"{what} [{k}]", relative=relative,
                               extra=0.0 if extra is None else extra[k])


def logits_case(fn, logits, seeds, dtype, what, *, placement=Shard(-1), inplace=False, relative=False):
    """fn(logits) on a DTensor of `logits` vs the eager reference of it (fn with reference=True) on whole tensors."""
    x = sharded(logits, dtype, placement)
    view = x[:, :-1] if what.startswith("strided") else x
    ours = backward(fn(view, inplace=inplace) if inplace else fn(view), seeds)
    ours.append(x.grad.full_tensor())
    results_of = []
    for truth in (False, True):
        (leaf,) = leaves([logits], dtype, truth=truth)
        lv = leaf[:, :-1] if what.startswith("strided") else leaf
        values = backward(fn(lv, reference=True), seeds)
        results_of.append(values + [leaf.grad])
    compare(ours, *results_of, dtype, what, relative=relative)


def linear_case(fn, hidden, weight, bias, seeds, dtype, what, *, hidden_dtensor=False):
    """fn(hidden, weight, bias) with the weight and bias DTensors Shard(0) vs eager F.linear + reference."""
    h = (distribute_tensor(hidden.detach().to(dtype), MESH, [Replicate()]).requires_grad_(True) if hidden_dtensor
         else hidden.detach().to(dtype).clone().requires_grad_(True))
    w = sharded(weight, dtype, Shard(0))
    b = sharded(bias, dtype, Shard(0)) if bias is not None else None
    ours = backward(fn(h, w, b), seeds)
    ours += [h.grad.full_tensor() if hidden_dtensor else h.grad, w.grad.full_tensor(),
             b.grad.full_tensor() if b is not None else None]
    results_of = []
    for truth in (False, True):
        lh, lw, lb = leaves([hidden, weight, bias], dtype, truth=truth)
        values = backward(fn(lh, lw, lb, reference=True), seeds)
        results_of.append(values + [lh.grad, lw.grad, lb.grad if lb is not None else None])
    extra = None
    if dtype != torch.float32:  # BLAS sums the 16-bit logits in another order than eager's one GEMM
        rounded = [t.to(dtype) if t is not None else None for t in (hidden, weight, bias)]
        coef = torch.ones(hidden.shape[:-1], dtype=torch.float64)
        extra = [0.0] * (len(ours) - 3) + list(rounded_logits_extra(*rounded, LABELS2, coef, 1.0, dtype)[1:])
    compare(ours, *results_of, dtype, what, relative=True, extra=extra)


SEED = int(os.environ.get("RLHFV_TEST_SEED", "1234"))
torch.manual_seed(SEED)  # the same global inputs on every rank, fresh per launch (the test picks the seed)
VOCAB = 1031 if not QUICK else 259  # uneven over 2, 4 (and 3) ranks
ROWS, SEQ, HID = 4, 9, 24
LOGITS = torch.randn(ROWS, SEQ, VOCAB) * 3
LOGITS[1, 3] *= 3000  # |logits| ~ 1e4
LABELS = torch.randint(0, VOCAB, (ROWS, SEQ))
LABELS[:, :2] = -100
LABELS[2] = -100  # an all-ignored row
LABELS[0, 4] = VOCAB - 1  # the last rank's last column
LABELS1 = LABELS[:, :-1]
HIDDEN = torch.randn(ROWS, SEQ, HID)
WEIGHT = torch.randn(VOCAB, HID) / HID ** 0.5 * 3
BIAS = torch.randn(VOCAB)
LABELS2 = LABELS.clone()
LABELS2[2, 3:] = torch.randint(0, VOCAB, (SEQ - 3,))  # the DPO losses need every row scored
LABELS_GRPO = LABELS2.clone()
LABELS_GRPO[1, 3] = -100  # exp(logp - old) of a logit of 1e4 overflows in every implementation: not this test's
WEIGHTS = torch.where(torch.rand(ROWS, SEQ) < 0.3, 5.0, 1.0)
REF = torch.randn(ROWS) - 30
MARGIN = torch.rand(ROWS // 2)
ADV = torch.randn(ROWS)
OLD = torch.randn(ROWS, SEQ) * 0.1 - 7
SEED_TOK = torch.randn(ROWS, SEQ, dtype=torch.float64)
SEED_ENT = torch.randn(ROWS, SEQ, dtype=torch.float64)
ONE = torch.ones((), dtype=torch.float64)
OPTIONS = {"plain": {}, "temperature": {"temperature": 0.7},
           "softcap and scale": {"softcap": 30.0, "logit_scale": 0.5, "temperature": 1.3}}


def transform(options):
    """The options the eager reference takes (all but the backend)."""
    return {k: v for k, v in options.items() if k != "backend"}


def tokens(options, labels=LABELS, entropy=True):
    def fn(x, reference=False, inplace=False):
        if reference:
            return rk.reference.token_logprobs(x, labels, return_entropy=entropy, **transform(options))
        return rk.token_logprobs(x, labels, return_entropy=entropy, inplace_backward=inplace, **options)
    return fn


DTYPES = (torch.float32, torch.bfloat16) if not QUICK else (torch.float32,)
for dtype in DTYPES:
    for opt_name, options in OPTIONS.items():
        case(f"token_logprobs+entropy {opt_name} {dtype}")(
            lambda: logits_case(tokens(options), LOGITS, (SEED_TOK, SEED_ENT), dtype, "token_logprobs"))
    case(f"token_logprobs in place {dtype}")(
        lambda: logits_case(tokens({}, entropy=False), LOGITS, (SEED_TOK,), dtype, "in place", inplace=True))
    case(f"token_logprobs+entropy in place, soft cap {dtype}")(
        lambda: logits_case(tokens({"softcap": 20.0}), LOGITS, (SEED_TOK, SEED_ENT), dtype, "in place", inplace=True))
case("strided view logits[:, :-1]")(
    lambda: logits_case(tokens({}, LABELS1), LOGITS, (SEED_TOK[:, :-1], SEED_ENT[:, :-1]), torch.float32,
                        "strided view"))
case("float64")(lambda: logits_case(tokens({"temperature": 0.9}), LOGITS, (SEED_TOK, SEED_ENT), torch.float64,
                                    "float64"))
case("replicated DTensor logits")(
    lambda: logits_case(tokens({}), LOGITS, (SEED_TOK, SEED_ENT), torch.float32, "replicated", placement=Replicate()))


if os.environ.get("TRITON_INTERPRET") == "1":  # the Triton family's kernels (interpreted on CPU tensors)
    case("triton: token_logprobs+entropy, soft cap")(
        lambda: logits_case(tokens({"softcap": 30.0, "backend": "triton"}), LOGITS, (SEED_TOK, SEED_ENT),
                            torch.float32, "triton"))


def loss_fn(name, **kw):
    """A loss of the logits path as fn(x, reference=...)."""
    ours, ref = getattr(rk, name), getattr(reference, name)
    args = {"sequence_logps": (LABELS2, WEIGHTS), "ddpo_loss": (LABELS2, REF), "dpo_loss": (LABELS2, REF),
            "grpo_loss": (LABELS_GRPO, ADV)}[name]

    def fn(x, reference=False):
        return (ref if reference else ours)(x, *args, **kw)
    return fn


LOSSES = {
    "sequence_logps mean": ("sequence_logps", {"mode": "mean"}),
    "ddpo_loss (DRS, SFT, soft cap)": ("ddpo_loss", {"token_weights": WEIGHTS, "beta": 0.5, "reward_margin": MARGIN,
                                                      "drs_weight": 0.5, "sft_weight": 0.1, "softcap": 30.0}),
    "dpo_loss": ("dpo_loss", {"beta": 0.1, "temperature": 0.8}),
    "grpo_loss dapo": ("grpo_loss", {"old_logps": OLD, "ref_logps": OLD + 0.1, "beta_kl": 0.04}),
    "grpo_loss grpo": ("grpo_loss", {"loss_type": "grpo"}),
    "grpo_loss dr_grpo": ("grpo_loss", {"loss_type": "dr_grpo", "epsilon_high": 0.28}),
}
for loss_name, (fn_name, kw) in LOSSES.items():
    if QUICK and loss_name not in ("ddpo_loss (DRS, SFT, soft cap)", "grpo_loss dapo"):
        continue
    case(f"logits {loss_name}")(lambda: logits_case(loss_fn(fn_name, **kw), LOGITS, (ONE,), torch.float32,
                                                    loss_name, relative=True))


@case("logits ddpo_loss packed (cu_seqlens, pairs)")
def _packed():
    # the four rows back to back in one stream of 4 * SEQ tokens, as packing collators give them
    stream = LOGITS.reshape(1, ROWS * SEQ, VOCAB)
    labels = LABELS2.reshape(1, -1)
    cu = [0, SEQ, 2 * SEQ, 3 * SEQ, 4 * SEQ]
    kw = {"token_weights": WEIGHTS.reshape(1, -1), "beta": 0.5, "pairs": torch.tensor([[0, 2], [1, 3]])}

    def fn(x, reference=False):
        if reference:  # the same sequences as padded rows, pairs (0, 2) and (1, 3): the reference's own layout
            return rk.reference.ddpo_loss(x.view(ROWS, SEQ, VOCAB), LABELS2, REF,
                                          token_weights=WEIGHTS, beta=0.5)
        return rk.ddpo_loss(x, labels, REF, cu_seqlens=cu, **kw)
    logits_case(fn, stream, (ONE,), torch.float32, "packed", relative=True)


def linear_tokens(labels, entropy=True, chunk_size=None, **options):
    def fn(h, w, b, reference=False):
        if reference:
            return rk.reference.token_logprobs(F.linear(h, w, b), labels, return_entropy=entropy,
                                               **transform(options))
        return rk.linear_token_logprobs(h, w, labels, bias=b, return_entropy=entropy, chunk_size=chunk_size,
                                        **options)
    return fn


def linear_loss(name, ref_name, args, **kw):
    def fn(h, w, b, reference=False):
        if reference:
            return getattr(rk.reference, ref_name)(F.linear(h, w, b), *args, **kw)
        return getattr(rk, name)(h, w, *args, bias=b, **kw)
    return fn


for dtype in DTYPES:
    case(f"linear token_logprobs+entropy {dtype}")(
        lambda: linear_case(linear_tokens(LABELS2), HIDDEN, WEIGHT, BIAS, (SEED_TOK, SEED_ENT), dtype, "linear"))
case("linear soft cap, temperature, chunks of 5, no bias")(
    lambda: linear_case(linear_tokens(LABELS, softcap=30.0, temperature=0.8, chunk_size=5), HIDDEN, WEIGHT, None,
                        (SEED_TOK, SEED_ENT), torch.float32, "linear softcap"))
if os.environ.get("TRITON_INTERPRET") == "1":
    case("triton: linear token_logprobs+entropy")(
        lambda: linear_case(linear_tokens(LABELS2, backend="triton"), HIDDEN, WEIGHT, BIAS, (SEED_TOK, SEED_ENT),
                            torch.float32, "triton linear"))
case("linear hidden a Replicate DTensor")(
    lambda: linear_case(linear_tokens(LABELS, entropy=False), HIDDEN, WEIGHT, BIAS, (SEED_TOK,), torch.float32,
                        "linear replicated hidden", hidden_dtensor=True))
case("linear ddpo_loss")(
    lambda: linear_case(linear_loss("linear_ddpo_loss", "ddpo_loss", (LABELS2, REF), token_weights=WEIGHTS,
                                    beta=0.5, sft_weight=0.1), HIDDEN, WEIGHT, BIAS, (ONE,), torch.float32,
                        "linear ddpo"))
if not QUICK:
    case("linear grpo_loss bnpo")(
        lambda: linear_case(linear_loss("linear_grpo_loss", "grpo_loss", (LABELS2, ADV), old_logps=OLD,
                                        loss_type="bnpo"), HIDDEN, WEIGHT, BIAS, (ONE,), torch.float32,
                            "linear grpo"))
    case("linear sequence_logps")(
        lambda: linear_case(linear_loss("linear_sequence_logps", "sequence_logps", (LABELS2, WEIGHTS), mode="mean"),
                            HIDDEN, WEIGHT, BIAS, (ONE,), torch.float32, "linear sequence"))


def count(name, fn):
    """Collectives of fn's forward and of its backward (CommDebugMode: torch's own counter of c10d calls)."""
    with CommDebugMode() as forward_mode:
        out = fn()
    with CommDebugMode() as backward_mode:
        (out[0] if isinstance(out, tuple) else getattr(out, "loss", out)).sum().backward()
    counts[name] = {"forward": {str(k): v for k, v in forward_mode.get_comm_counts().items()},
                    "backward": {str(k): v for k, v in backward_mode.get_comm_counts().items()}}


count("logits token_logprobs+entropy",
      lambda: rk.token_logprobs(sharded(LOGITS, torch.float32, Shard(-1)), LABELS, return_entropy=True))
count("logits ddpo_loss", lambda: rk.ddpo_loss(sharded(LOGITS, torch.float32, Shard(-1)), LABELS2, REF))
count("linear, plain hidden", lambda: rk.linear_ddpo_loss(
    HIDDEN.clone().requires_grad_(True), sharded(WEIGHT, torch.float32, Shard(0)), LABELS2, REF))
count("linear, Replicate hidden", lambda: rk.linear_token_logprobs(
    distribute_tensor(HIDDEN, MESH, [Replicate()]).requires_grad_(True), sharded(WEIGHT, torch.float32, Shard(0)),
    LABELS))


def refusal(name, fn):
    try:
        fn()
        results[f"refused: {name}"] = "not refused"
    except (ValueError, TypeError) as exc:
        results[f"refused: {name}"] = f"{type(exc).__name__}: {exc}"


W_SHARD = distribute_tensor(WEIGHT, MESH, [Shard(0)])
refusal("weight Shard(1)", lambda: rk.linear_token_logprobs(HIDDEN, distribute_tensor(WEIGHT, MESH, [Shard(1)]),
                                                            LABELS))
refusal("hidden Shard(1) (sequence parallel)", lambda: rk.linear_token_logprobs(
    distribute_tensor(HIDDEN, MESH, [Shard(1)]), W_SHARD, LABELS))
refusal("plain bias beside a sharded weight", lambda: rk.linear_token_logprobs(HIDDEN, W_SHARD, LABELS, bias=BIAS))
refusal("low_rank with a sharded weight", lambda: rk.linear_token_logprobs(
    HIDDEN, W_SHARD, LABELS, low_rank=(torch.randn(ROWS, SEQ, 2), distribute_tensor(torch.randn(VOCAB, 2), MESH,
                                                                                    [Shard(0)]))))
refusal("eager backend, sharded logits", lambda: rk.token_logprobs(
    distribute_tensor(LOGITS, MESH, [Shard(-1)]), LABELS, backend="eager"))
refusal("logits sharded on the sequence", lambda: rk.token_logprobs(distribute_tensor(LOGITS, MESH, [Shard(1)]),
                                                                    LABELS))
refusal("a per-token input as a DTensor", lambda: rk.sequence_logps(
    distribute_tensor(LOGITS, MESH, [Shard(-1)]), LABELS, distribute_tensor(WEIGHTS, MESH, [Replicate()])))
refusal("label out of the whole vocabulary", lambda: rk.token_logprobs(
    distribute_tensor(LOGITS, MESH, [Shard(-1)]), torch.full_like(LABELS, VOCAB)))
rank_labels = LABELS.clone()
rank_labels[3, 5] = dist.get_rank()  # each rank its own batch: what FSDP2's data-parallel shard would see
refusal("different tokens on each rank (a data-parallel shard)",
        lambda: rk.linear_token_logprobs(HIDDEN, W_SHARD, rank_labels))


if WORLD == 4:
    @case("2-D mesh (data parallel x tensor parallel): each data-parallel group its own batch")
    def _two_dimensional():
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        mine = dist.get_rank() // 2  # this rank's data-parallel group
        labels = LABELS2.roll(mine, 0)
        hidden = HIDDEN.roll(mine, 0)
        h = hidden.clone().requires_grad_(True)
        w0 = WEIGHT.clone().requires_grad_(True)
        expected = rk.linear_ddpo_loss(h, w0, labels, REF, bias=BIAS, beta=0.5)
        expected.loss.backward()
        w = distribute_tensor(WEIGHT, mesh, [Replicate(), Shard(0)]).requires_grad_(True)
        b = distribute_tensor(BIAS, mesh, [Replicate(), Shard(0)])
        h2 = hidden.clone().requires_grad_(True)
        got = rk.linear_ddpo_loss(h2, w, labels, REF, bias=b, beta=0.5)
        got.loss.backward()
        torch.testing.assert_close(got.loss, expected.loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(h2.grad, h.grad, rtol=1e-5, atol=1e-6)
        # each tensor-parallel rank holds its rows of this group's gradient
        local = w.grad.to_local()
        rows = w.to_local().shape[0]
        start = mesh.get_local_rank("tp") * ((VOCAB + 1) // 2)
        torch.testing.assert_close(local, w0.grad[start:start + rows], rtol=1e-5, atol=1e-6)


def tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(7)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).float()


def grads_of(model):
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters()}


def worst(got, want):
    return max(float(((got[n] - want[n]).abs() / want[n].abs().max().clamp_min(1e-12)).max()) for n in want)


@case("ColwiseParallel head: logits route and fused-linear route equal one process")
def _colwise():
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    ids = torch.randint(0, VOCAB, (ROWS, SEQ))
    labels = LABELS2[:, 1:]
    one = tiny_model()
    out = one(input_ids=ids)
    rk.ddpo_loss(out.logits[:, :-1], labels, REF, token_weights=WEIGHTS[:, 1:], beta=0.5).loss.backward()
    truth = grads_of(one)
    for route in ("logits", "fused-linear"):
        model = tiny_model()
        parallelize_module(model.lm_head, MESH, ColwiseParallel(use_local_output=False))
        if route == "logits":
            logits = model(input_ids=ids).logits
            assert type(logits).__name__ == "DTensor", type(logits)
            loss = rk.ddpo_loss(logits[:, :-1], labels, REF, token_weights=WEIGHTS[:, 1:], beta=0.5).loss
        else:
            hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
            loss = rk.linear_ddpo_loss(hidden, model.lm_head.weight, labels, REF, token_weights=WEIGHTS[:, 1:],
                                       beta=0.5).loss
        loss.backward()
        error = worst(grads_of(model), truth)
        results[f"colwise {route} error"] = error
        assert error < 1e-5, (route, error)


if dist.get_rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump({"world": WORLD, "seed": SEED, "results": results, "counts": counts}, f, indent=1)
dist.destroy_process_group()
