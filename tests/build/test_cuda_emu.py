"""The CUDA C++ kernels (csrc/cuda/logprob_kernels.cu, as they are) run on the CPU through the emulation header
tests/gpu_verify/cuda_emu, under AddressSanitizer + UndefinedBehaviorSanitizer and under ThreadSanitizer, and are
checked against the float64 reference with the numerics criterion, on every shape class the kernels branch on:
one warp per row and one block per (row, split), one and several vocabulary splits, odd and aligned V, strided,
padded and misaligned rows, 3-D layouts, ignored rows, zero gradients, temperature, a soft cap, masked (-inf)
splits, NaN/inf rows, |logits| ~ 1e4, in-place and out-of-place backward. The last tests plant GPU bugs and check
each is caught.

What the emulation cannot see (its header says more): speed, the GPU's fast-math precision, and
warp-synchronous code without *_sync (which the kernels do not use).
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from numerics import assert_meets_criterion, truth_token_logprobs
from rlhfv_kernels import reference

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "gpu_verify", "cuda_emu"))
import build as emu_build  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
IGNORE = -100


class Case:
    """A logits view `parent[index]` (any leading layout, stride 1 along V) whose rows the kernels read in place."""

    def __init__(self, name, parent_shape, index=(), offset=0, sm_count=132, temperature=1.0, scale=3.0,
                 shape="block", splits=1, special=None, softcap=None):
        self.name, self.parent_shape, self.index, self.offset = name, parent_shape, index, offset
        self.sm_count, self.temperature, self.scale, self.softcap = sm_count, temperature, scale, softcap
        self.shape, self.splits, self.special = shape, splits, special  # what the launcher must choose; extras

    def __repr__(self):
        return self.name


CASES = [
    Case("warp per row, odd V, contiguous, partial last block", (13, 1001), shape="warp"),
    Case("warp per row, V=2048, 3-D logits[:, :-1], temperature", (3, 4, 2048), (slice(None), slice(0, -1)),
         temperature=0.7, shape="warp"),
    Case("warp per row, padded rows (row stride 1003)", (9, 1003), (slice(None), slice(0, 1000)), shape="warp"),
    Case("block per row, V=2049, misaligned base", (3, 2049), offset=1, sm_count=1),
    Case("block per row, splits, odd V, strided and misaligned", (2, 3, 40001), (slice(None), slice(1, None)),
         splits=4),
    Case("block per row, splits, aligned V (16-byte vectors)", (2, 32768), temperature=1.3, splits=4),
    Case("block per row, masked split, NaN/inf rows, |logits| ~ 1e4, temperature", (2, 4, 24576),
         (slice(None), slice(0, 3)), scale=3e3, temperature=0.7, splits=3, special="extremes"),
    Case("block per row, |logits| up to 6e4, temperature", (3, 3001), scale=1e4, temperature=0.7, sm_count=1),
    Case("warp per row, soft cap, temperature, 3-D logits[:, :-1]", (3, 5, 1001), (slice(None), slice(0, -1)),
         scale=20.0, temperature=0.8, shape="warp", softcap=7.0),
    Case("block per row, splits, soft cap, masked split, NaN/inf rows", (2, 4, 24576), (slice(None), slice(0, 3)),
         scale=3e3, splits=3, special="extremes", softcap=30.0),
]


def make_inputs(case, dtype, generator):
    parent_numel = torch.Size(case.parent_shape).numel()
    buffer = (torch.randn(case.offset + parent_numel, generator=generator) * case.scale).to(dtype)
    parent = buffer[case.offset:].view(case.parent_shape)
    logits = parent[case.index] if case.index else parent
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    labels = torch.randint(0, vocab, lead, generator=generator)
    flat = labels.view(-1)
    flat[1::5] = IGNORE
    flat[2::7] = 0
    flat[3::7] = vocab - 1
    coef = torch.randn(lead, generator=generator)
    coef.view(-1)[4::6] = 0.0  # rows without gradient: written with zeros, never read
    if case.special == "extremes":  # logits [2, 3, V]; V splits in 3
        logits[0, 0, : vocab // 3] = float("-inf")  # the first split of this row is entirely masked
        logits[0, 1, 17] = float("nan")  # NaN poisons its row only
        logits[0, 2, 5] = float("inf")  # so does +inf
        labels[0] = torch.tensor([vocab - 5, 3, 7])
        coef[0] = torch.tensor([1.5, -0.5, 2.0])  # nonzero: the reference's gradient is NaN on the poisoned rows
        logits[1].clamp_(-1e4, 1e4)
    return buffer, logits, labels, coef


def reference_results(logits, labels, coef, temperature, softcap=None, coef_h=None):
    """(logp, lse, dlogits) of the eager reference on `logits` (its dtype), or of the truth for float64 logits; with
    coef_h (dL/dH per row) (logp, lse, dlogits, entropy), dlogits of sum(coef * logp + coef_h * H)."""
    leaf = logits.detach().clone().requires_grad_(True)
    fn = truth_token_logprobs if logits.dtype == torch.float64 else reference.token_logprobs
    logp = fn(leaf, labels, temperature=temperature, softcap=softcap, return_entropy=coef_h is not None)
    entropy = None
    if coef_h is not None:
        logp, entropy = logp
        ((logp * coef.to(logp.dtype)).sum() + (entropy * coef_h.to(entropy.dtype)).sum()).backward()
    else:
        (logp * coef.to(logp.dtype)).sum().backward()
    # The row LSE the kernels keep, from the oracle's own log-prob: z_label - logp (NaN where the row is poisoned).
    ignored = labels == IGNORE
    if softcap is None:
        scaled = (logits.detach().float() / temperature).to(logp.dtype)  # x / t in fp32, as in truth_token_logprobs
    else:
        x = logits.detach().to(logp.dtype)
        scaled = softcap * torch.tanh(x / softcap) / temperature
    x_label = scaled.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    lse = torch.where(ignored, torch.zeros_like(logp), x_label - logp.detach())
    if coef_h is not None:
        return logp.detach(), lse, leaf.grad, entropy.detach()
    return logp.detach(), lse, leaf.grad


def run_driver(binary, case, dtype_name, workdir, seed, with_entropy=False):
    """Writes one case, runs the emulated kernels on it; returns (completed process, inputs, outputs or None). With
    the entropy the inputs end with coef_h (dL/dH per row) and the outputs hold `entropy`."""
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(seed)
    buffer, logits, labels, coef = make_inputs(case, dtype, generator)
    coef_h = torch.randn(labels.shape, generator=generator) if with_entropy else None
    if with_entropy:
        coef_h.view(-1)[5::6] = 0.0  # rows with a gradient for logp only
        coef_h.view(-1)[4::12] = 0.7  # and rows (coef 0) with one for the entropy only
    os.makedirs(workdir, exist_ok=True)
    buffer.view(BITS[dtype]).numpy().tofile(os.path.join(workdir, "logits.bin"))
    labels.reshape(-1).numpy().tofile(os.path.join(workdir, "labels.bin"))
    coef.reshape(-1).numpy().tofile(os.path.join(workdir, "coef.bin"))
    if with_entropy:
        coef_h.reshape(-1).numpy().tofile(os.path.join(workdir, "coef_h.bin"))
    lead = logits.shape[:-1]
    args = [binary, workdir, f"dtype={dtype_name}", f"sizes={','.join(map(str, lead))}",
            f"strides={','.join(map(str, logits.stride()[:-1]))}", f"base={logits.storage_offset()}",
            f"elems={buffer.numel()}", f"vocab={logits.shape[-1]}", f"sm_count={case.sm_count}",
            f"temperature={case.temperature!r}", f"softcap={case.softcap or 0.0!r}", f"ignore_index={IGNORE}",
            f"entropy={int(with_entropy)}"]
    env = {**os.environ, "TSAN_OPTIONS": "halt_on_error=1 abort_on_error=0",
           "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    inputs = (buffer, logits, labels, coef) + ((coef_h,) if with_entropy else ())
    if proc.returncode != 0:
        return proc, inputs, None

    def read(name, dt, count):
        return torch.from_file(os.path.join(workdir, name), size=count, dtype=dt)

    rows, vocab = labels.numel(), logits.shape[-1]
    out = dict(lse=read("lse.bin", torch.float64, rows).view(lead),
               logp=read("logp.bin", torch.float32, rows).view(lead),
               grad=read("grad.bin", BITS[dtype], rows * vocab).view(dtype).view(logits.shape),
               inplace=read("inplace.bin", BITS[dtype], buffer.numel()).view(dtype))
    if with_entropy:
        out["entropy"] = read("entropy.bin", torch.float32, rows).view(lead)
    return proc, inputs, out


def sanitized(dtypes, tsan_dtype):
    """(sanitizer, dtype) pairs: AddressSanitizer + UBSan on every dtype (loads and stores differ by width),
    ThreadSanitizer on one: the block and warp merges it watches for races are the same code for every dtype, and
    it is the slowest (a third of CI's time before it ran one dtype)."""
    return [pytest.param(s, d, id=f"{s}-{d}") for s in ("asan", "tsan") for d in dtypes
            if s == "asan" or d == tsan_dtype]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """sanitizer -> the emulation binary, built once per sanitizer for this module."""
    built = {}

    def binary(sanitizer):
        if sanitizer not in built:
            built[sanitizer] = emu_build.build(str(tmp_path_factory.mktemp(f"cuda_emu_{sanitizer}")), sanitizer)
        return built[sanitizer]
    return binary


@pytest.mark.parametrize("sanitizer,dtype_name", sanitized(list(DTYPES), "fp32"))
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_emulated_kernels_match_the_float64_reference(harness, sanitizer, case, dtype_name, tmp_path, fresh_seed):
    check_emulated_case(sanitizer, harness(sanitizer), case, dtype_name, tmp_path, fresh_seed, with_entropy=False)


@pytest.mark.parametrize("sanitizer,dtype_name", sanitized(["fp32", "bf16"], "bf16"))
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_emulated_entropy_matches_the_float64_reference(harness, sanitizer, case, dtype_name, tmp_path, fresh_seed):
    """The entropy variants: the moment sums through absorb / warp / block / split merges, and the backward of
    coef * logp + coef_h * H (rows with either coefficient zero included)."""
    check_emulated_case(sanitizer, harness(sanitizer), case, dtype_name, tmp_path, fresh_seed, with_entropy=True)


def check_emulated_case(sanitizer, binary, case, dtype_name, tmp_path, seed, with_entropy):
    proc, inputs, out = run_driver(binary, case, dtype_name, str(tmp_path), seed, with_entropy)
    buffer, logits, labels, coef = inputs[:4]
    coef_h = inputs[4] if with_entropy else None
    assert proc.returncode == 0, \
        f"{sanitizer}: the emulated kernels failed:\n{proc.stdout[-2000:]}{proc.stderr[-6000:]}"
    assert f"shape={case.shape} splits={case.splits} " in proc.stdout, proc.stdout  # the shape class under test
    dtype = DTYPES[dtype_name]
    same = reference_results(logits, labels, coef, case.temperature, case.softcap, coef_h)
    truth = reference_results(logits.double(), labels, coef, case.temperature, case.softcap, coef_h)
    what = f"{case.name} [{dtype_name}, {sanitizer}{', entropy' if with_entropy else ''}]"
    if with_entropy:
        assert_meets_criterion(out["entropy"], same[3], truth[3], dtype, f"{what} entropy")
    assert_meets_criterion(out["logp"], same[0], truth[0], dtype, f"{what} logp")
    assert_meets_criterion(out["lse"], same[1], truth[1], dtype, f"{what} lse")
    assert_meets_criterion(out["grad"], same[2], truth[2], dtype, f"{what} dlogits out of place")
    after = out["inplace"]
    in_place = torch.as_strided(after, logits.shape, logits.stride(), logits.storage_offset())
    assert_meets_criterion(in_place, same[2], truth[2], dtype, f"{what} dlogits in place")
    # Everything of the buffer outside the view (padding, the misaligned head, other slices) is left bit for bit.
    inside = torch.zeros(buffer.numel(), dtype=torch.bool)
    torch.as_strided(inside, logits.shape, logits.stride(), logits.storage_offset()).fill_(True)
    bits_before, bits_after = buffer.view(BITS[dtype]), after.view(BITS[dtype])
    assert torch.equal(bits_before[~inside], bits_after[~inside]), f"{what}: in-place backward wrote outside the view"


# Bugs a GPU would turn into illegal addresses, misaligned-address faults, races or hangs: (sanitizer, text to
# replace in the kernels, replacement, case that exercises it, what the failed run must print).
MUTATIONS = {
    "vector body overruns the row tail": (
        "asan", "const int64_t vectors = (stop - body) / V;", "const int64_t vectors = (stop - body + V - 1) / V;",
        CASES[0], "AddressSanitizer: heap-buffer-overflow"),
    "no scalar head: 16-byte loads at misaligned rows": (
        "asan", "return head < stop - start ? head : stop - start;", "return 0;", CASES[3],
        "runtime error: reference binding to misaligned address"),
    "missing __syncthreads in block_merge": (
        "tsan", "  __syncthreads();\n  if (warp == 0) {", "  if (warp == 0) {", CASES[3],
        "WARNING: ThreadSanitizer: data race"),
    "half the lanes of ignored rows leave before warp_merge": (
        "asan", "  if (active) {\n    const float t", "  if (kWarpPerRow && !active && w.tid >= 16) return;\n"
        "  if (active) {\n    const float t", CASES[0], "cuda_emu: block"),
    "x * (1 / t) instead of x / t (wrong numbers at |logits| ~ 1e4)": (
        "asan", "return t == 1.0f ? x : x / t;", "return t == 1.0f ? x : x * (1.0f / t);",
        Case("many rows, |logits| up to 6e4, temperature", (64, 3001), scale=1e4, temperature=0.7, sm_count=1),
        None),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_emulation_catches_planted_gpu_bugs(mutation, tmp_path):
    sanitizer, old, new, case, signature = MUTATIONS[mutation]
    binary = emu_build.build(str(tmp_path / "build"), sanitizer, mutate=lambda src: src.replace(old, new, 1))
    proc, (_, logits, labels, coef), out = run_driver(binary, case, "fp32" if signature is None else "bf16",
                                                      str(tmp_path / "case"), seed=1234)
    if signature is not None:
        assert proc.returncode != 0 and signature in proc.stderr, \
            f"planted bug not caught (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    same = reference_results(logits, labels, coef, case.temperature)
    truth = reference_results(logits.double(), labels, coef, case.temperature)
    with pytest.raises(AssertionError, match="fail the criterion"):
        assert_meets_criterion(out["logp"], same[0], truth[0], torch.float32, "logp")
