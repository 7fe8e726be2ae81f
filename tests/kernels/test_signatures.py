"""Each public function is written three times: api.X on logits, linear.linear_X on hidden states and the lm_head,
reference.X the float64 oracle. Their shared parameters agree in name, kind, default and order, and each writing's
own parameters are the ones listed here (so a new option cannot reach one writing and miss another); every parameter
of every writing is documented, each shared one in the same words (rlhfv_kernels/_param_docs.py)."""
import inspect

import pytest

import rlhfv_kernels as rk
from rlhfv_kernels import _param_docs, api, linear, reference

FUNCTIONS = ("token_logprobs", "sequence_logps", "ddpo_loss", "dpo_loss", "grpo_loss")
PACKING = {"cu_seqlens", "position_ids", "max_seqlen", "pairs"}  # the kernels' packed layouts (not the oracle's)
LOGITS = {"logits", "inplace_backward"}  # the logits routes' input, and whether backward may overwrite it
OWN = {"api": LOGITS | PACKING,
       "linear": PACKING | {"hidden", "weight", "bias", "low_rank", "chunk_size"},
       "reference": LOGITS}


def writings(name: str) -> dict:
    return {"api": getattr(api, name), "linear": getattr(linear, "linear_" + name),
            "reference": getattr(reference, name)}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_the_three_writings_agree(name):
    params = {route: inspect.signature(fn).parameters for route, fn in writings(name).items()}
    every = set().union(*params.values())
    shared = [p for p in params["api"] if all(p in ps for ps in params.values())]
    for route, ps in params.items():
        assert not any(p.kind is p.VAR_KEYWORD for p in ps.values()), f"{route}.{name} hides options in **kwargs"
        assert [p for p in ps if p in shared] == shared, f"{route}.{name}: shared parameters in another order"
        for p in shared:
            want = params["api"][p]
            assert (ps[p].kind, ps[p].default) == (want.kind, want.default), f"{route}.{name}({p})"
        assert set(ps) - set(shared) <= OWN[route], f"{route}.{name}: unlisted own parameters"
        others = set().union(*(own for r, own in OWN.items() if r != route)) - OWN[route]
        assert every - set(ps) <= others, f"{route}.{name} misses an option the others take"


def test_every_public_function_is_covered():
    exported = {n for n in rk.__all__ if inspect.isfunction(getattr(rk, n)) and hasattr(reference, n)}
    assert exported == set(FUNCTIONS)


def documented(function) -> dict:
    """{parameter: its text} from the docstring's "Parameters:" section."""
    assert "\nParameters:\n" in function.__doc__, f"{function.__qualname__} is not stamped (_param_docs.stamp)"
    entries, name = {}, None
    for line in function.__doc__.split("\nParameters:\n", 1)[1].splitlines():
        if line.startswith("    ") and not line.startswith("        ") and ": " in line:
            name, text = line.strip().split(": ", 1)
            entries[name] = text
        elif line.strip():
            entries[name] += " " + line.strip()
    return entries


@pytest.mark.parametrize("name", FUNCTIONS)
def test_every_parameter_is_documented_once_in_the_same_words(name):
    docs = {route: documented(fn) for route, fn in writings(name).items()}
    for route, fn in writings(name).items():
        assert list(docs[route]) == list(inspect.signature(fn).parameters), f"{route}.{name}"
    for param, text in docs["api"].items():
        if param in docs["linear"]:
            assert docs["linear"][param] == text, (name, param)
        if param in docs["reference"] and param not in _param_docs.REFERENCE:
            assert docs["reference"][param] == text, (name, param)


def test_a_parameter_without_a_doc_is_refused_at_import():
    def token_logprobs(logits, labels, *, undocumented_option=None):
        """A new option nobody wrote down."""
    with pytest.raises(KeyError, match="'undocumented_option' has no doc in rlhfv_kernels/_param_docs.py"):
        _param_docs.stamp(token_logprobs)
