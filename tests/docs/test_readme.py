"""Every Python example in README.md and docs/ runs as written, on a tiny Hugging Face model, and does what its
comments say; the README keeps its shape (the two commands first, at most 150 lines) and every relative link in the
manual points at a file that exists."""
import copy
import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MANUAL = [README, ROOT / "DESIGN.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(standalone=False):
    """The manual's python examples, as (file, block): the training-step ones (they call the `model` the test
    provides), or the standalone ones (they build their own inputs)."""
    blocks = [(path.relative_to(ROOT), block) for path in MANUAL
              for block in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)]
    return [(path, block) for path, block in blocks if ("model(" not in block) == standalone]


def tiny_causal_lm(vocab=512):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def preference_batch(pairs=2, seq=24, prompt=8, vocab=512):
    input_ids = torch.randint(0, vocab, (2 * pairs, seq))
    input_ids[pairs:, :prompt] = input_ids[:pairs, :prompt]  # a pair shares its prompt
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    weights = torch.where(torch.rand(2 * pairs, seq) < 0.3, 5.0, 1.0)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "token_weights": weights}


def test_readme_has_the_two_commands_first_and_stays_short():
    lines = README.read_text().splitlines()
    commands = [line for line in lines[:8] if line.startswith("bash scripts/setup.sh")]
    assert len(commands) == 2 and "benchmarks/run.py" in commands[0] and "pytest" in commands[1]
    # CI runs the README's test command as written (.ci/run: setup, then that pytest line)
    test_command = commands[1].split("#")[0].split("&&")[1].strip()
    assert any(line.startswith(test_command + " ") or line == test_command
               for line in (ROOT / ".ci" / "run").read_text().splitlines()), test_command
    assert len(lines) <= 150


@pytest.mark.parametrize("path", MANUAL, ids=lambda p: p.name)
def test_the_manual_links_resolve(path):
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text())
    missing = [t for t in targets if not (path.parent / t).exists()]
    assert not missing
    names = re.findall(r"`((?:rlhfv_kernels|rlhfv_train|benchmarks|experiments|scripts|tests)/[\w./-]+)`",
                       path.read_text())
    assert not [n for n in names if "foo" not in n and not (ROOT / n.rstrip("/")).exists()]  # foo: the recipes' example


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_python_example_runs(index, capsys):
    model = tiny_causal_lm()
    ref_model = copy.deepcopy(model).eval()
    calls = []
    forward = model.forward

    def recording_forward(*args, **kwargs):
        calls.append(sorted(kwargs))
        return forward(*args, **kwargs)

    model.forward = recording_forward
    before = [p.detach().clone() for p in model.parameters()]
    namespace = {"model": model, "ref_model": ref_model, "batch": preference_batch(),
                 "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    path, block = python_blocks()[index]
    exec(compile(block, f"{path} python block {index}", "exec"), namespace)
    printed = capsys.readouterr().out.split()
    assert len(printed) == 3 and all(torch.isfinite(torch.tensor(float(v))) for v in printed)
    # The model was called without labels (no second, N x V cross-entropy inside it) and the step changed it.
    assert calls and all("labels" not in kwargs for kwargs in calls), calls
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # At the first step the policy is the reference: the DDPO loss is log 2.
    assert float(printed[0]) == pytest.approx(0.6931472, abs=1e-5)


@pytest.mark.parametrize("index", range(len(python_blocks(standalone=True))))
def test_standalone_python_example_runs(index):
    namespace = {}
    path, block = python_blocks(standalone=True)[index]
    exec(compile(block, f"{path} standalone python block {index}", "exec"), namespace)
    out = namespace.get("out")
    assert out is None or bool(torch.isfinite(out.loss))


def test_supported_models_table_is_the_generated_one():
    """On the transformers release the table names (other releases give other --packing columns: docs/models.md)."""
    pytest.importorskip("PIL")
    import transformers
    from rlhfv_train.models.support_table import supported_models_markdown
    from rlhfv_train.models.tiny_families import FAMILIES
    recorded = re.search(r"with transformers (\S+):", (ROOT / "docs" / "models.md").read_text()).group(1)
    if recorded != transformers.__version__:
        pytest.skip(f"docs/models.md's table is transformers {recorded}'s; this is {transformers.__version__}")
    for needed in {package for family in FAMILIES.values() for package in family.needs}:
        pytest.importorskip(needed)
    assert supported_models_markdown() in (ROOT / "docs" / "models.md").read_text(), \
        "docs/models.md's table is stale: paste `python -m rlhfv_train.models.support_table` into it"
