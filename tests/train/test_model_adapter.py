"""rlhfv_train/models/adapter.py on real transformers model classes (tiny, random weights, built in code): the
fused-linear route (hidden states + lm_head + the final logit transform read from the config) gives the log-probs of
the model's own `.logits` for plain, soft-capped (Gemma 2/3), scaled (Cohere, Cohere2) and divided (Granite) families,
under PEFT wrappers (a LoRA adapter on lm_head included); a transform nobody announced is refused with a clear
error."""
import contextlib

import pytest
import torch

import rlhfv_kernels as rk
from rlhfv_kernels import reference
from rlhfv_train.models import (LogitTransform, UnsupportedModelError, check_fused_linear, fused_linear_forward,
                                hidden_and_head, logit_transform)

VOCAB, HIDDEN = 512, 64
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def families():
    """name -> (config class, extra config, the transform the config announces)."""
    import transformers as tf
    return {
        "llama": (tf.LlamaConfig, {}, LogitTransform()),
        "gemma2": (tf.Gemma2Config, dict(head_dim=16, final_logit_softcapping=30.0), LogitTransform(softcap=30.0)),
        "gemma3-text": (tf.Gemma3TextConfig, dict(head_dim=16, final_logit_softcapping=20.0),
                        LogitTransform(softcap=20.0)),
        "cohere": (tf.CohereConfig, dict(logit_scale=0.0625), LogitTransform(logit_scale=0.0625)),
        "cohere2": (tf.Cohere2Config, dict(logit_scale=0.25), LogitTransform(logit_scale=0.25)),
        "granite": (tf.GraniteConfig, dict(logits_scaling=8.0), LogitTransform(logit_scale=0.125)),
    }


def build(name, seed=0):
    from transformers import AutoModelForCausalLM
    config_class, extra, _ = families()[name]
    config = config_class(**COMMON, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # large logits, so that a dropped soft cap or scale would show
            model.get_output_embeddings().weight.mul_(400.0 if name != "cohere" else 2000.0)
    return model.eval()


def batch(rows=3, seq=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, seq), generator=g)
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[0, -3:] = 0  # right padding
    labels = torch.cat([ids[:, 1:], torch.full((rows, 1), -100)], dim=1)
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask}, labels


@pytest.mark.parametrize("name", list(families()))
def test_fused_route_equals_the_models_own_logits(name):
    model = build(name)
    assert logit_transform(model) == families()[name][2]
    inputs, labels = batch()
    with torch.no_grad():
        own = reference.token_logprobs(model(**inputs).logits.double(), labels)
        hidden, head = hidden_and_head(model, inputs)
        ours = rk.linear_token_logprobs(hidden, head.weight, labels, **head.options())
        plain = rk.linear_token_logprobs(hidden, head.weight, labels, bias=head.bias)
    torch.testing.assert_close(ours.double(), own, rtol=0, atol=2e-4)
    if name != "llama":  # the transform matters at these logit sizes: without it the route trains another model
        assert (plain.double() - own).abs().max() > 0.05
    assert check_fused_linear(model, inputs) < 1e-3


def test_gradients_of_the_fused_route_equal_the_logits_path():
    """One DDPO loss and its gradient w.r.t. every parameter, fused-linear (transform in the kernels) vs the logits
    path on the model's own logits, for a soft-capped model."""
    model = build("gemma2").train()
    inputs, labels = batch(rows=4)
    ref = torch.randn(4) - 50
    grads = {}
    for route in ("logits", "fused"):
        model.zero_grad()
        if route == "logits":
            out = rk.ddpo_loss(model(**inputs).logits, labels, ref, beta=0.1, mode="sum")
        else:
            hidden, head = hidden_and_head(model, inputs)
            out = rk.linear_ddpo_loss(hidden, head.weight, labels, ref, beta=0.1, mode="sum", **head.options())
        out.loss.backward()
        grads[route] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None})
    torch.testing.assert_close(grads["fused"][0], grads["logits"][0], rtol=1e-5, atol=1e-5)
    assert grads["fused"][1].keys() == grads["logits"][1].keys()
    for name, g in grads["logits"][1].items():
        torch.testing.assert_close(grads["fused"][1][name], g, rtol=1e-3, atol=1e-5, msg=name)


class _ScaledLlama:
    """A Llama that halves its logits after the head, with no config field saying so (an unknown family)."""

    @staticmethod
    def build():
        from transformers import LlamaConfig, LlamaForCausalLM

        class HalvedLlama(LlamaForCausalLM):
            def forward(self, *args, **kwargs):
                out = super().forward(*args, **kwargs)
                out.logits = out.logits * 0.5
                return out

        torch.manual_seed(0)
        return HalvedLlama(LlamaConfig(**COMMON)).eval()


def test_an_unannounced_transform_is_refused():
    model = _ScaledLlama.build()
    inputs, _ = batch()
    with pytest.raises(UnsupportedModelError, match="HalvedLlama: its logits differ by .* Train without --fused"):
        check_fused_linear(model, inputs)


def test_check_restores_training_mode():
    model = build("llama").train()
    check_fused_linear(model, batch()[0])
    assert model.training


def test_bad_config_values_are_refused():
    model = build("granite")
    model.config.logits_scaling = -1.0
    with pytest.raises(UnsupportedModelError, match="logits_scaling = -1.0 is not a positive number"):
        logit_transform(model)


def test_peft_wrapped_model_gives_hidden_states_not_logits():
    peft = pytest.importorskip("peft")
    model = build("gemma2")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
    inputs, labels = batch()
    with torch.no_grad():
        own = reference.token_logprobs(wrapped(**inputs).logits.double(), labels)
        hidden, head = hidden_and_head(wrapped, inputs)
        assert hidden.shape[-1] == HIDDEN  # the body's states, not the [.., V] logits
        ours = rk.linear_token_logprobs(hidden, head.weight, labels, **head.options())
    torch.testing.assert_close(ours.double(), own, rtol=0, atol=2e-4)
    assert logit_transform(wrapped) == LogitTransform(softcap=30.0)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")  # Gemma 2 ties its head
def test_lora_on_lm_head_enters_the_fused_product():
    """A LoRA adapter on lm_head (dropout 0.3 included): fused_linear_forward's log-probs and gradients (base frozen;
    A, B and the body's) equal the model's own logits path, widened by the rank; disabled (the reference), the
    adapter is left out; hidden_and_head, which returns one weight, refuses the head."""
    peft = pytest.importorskip("peft")
    inputs, labels = batch()

    def run(fused, dropout_seed=0, disabled=False):
        torch.manual_seed(0)
        wrapped = peft.get_peft_model(build("gemma2"), peft.LoraConfig(r=4, target_modules=["lm_head", "q_proj"],
                                                                        lora_dropout=0.3, init_lora_weights=False))
        wrapped.train()
        torch.manual_seed(dropout_seed)
        context = wrapped.disable_adapter() if disabled else contextlib.nullcontext()
        with context:
            if fused:
                logps = fused_linear_forward(wrapped, inputs, rk.linear_token_logprobs, labels)
            else:
                logps = rk.token_logprobs(wrapped(**inputs).logits, labels)
        if not disabled:  # (disabled, nothing trainable is used)
            (logps * torch.linspace(0.5, 1.5, logps.numel()).view(logps.shape)).sum().backward()
        grads = {n: p.grad for n, p in wrapped.named_parameters() if p.grad is not None}
        return logps.detach(), grads, wrapped

    own, own_grads, _ = run(False)
    ours, our_grads, wrapped = run(True)
    torch.testing.assert_close(ours, own, rtol=0, atol=2e-4)
    assert own_grads.keys() == our_grads.keys() and any("lm_head.lora_B" in n for n in own_grads)
    for name, grad in own_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    other_dropout, _, _ = run(True, dropout_seed=1)
    assert not torch.allclose(other_dropout, ours)  # the dropout is the adapter's own, drawn per call
    reference, _, _ = run(True, disabled=True)
    torch.testing.assert_close(reference, run(False, disabled=True)[0], rtol=0, atol=2e-4)
    assert not torch.allclose(reference, ours, atol=1e-3)
    with pytest.raises(UnsupportedModelError, match="lm_head carries a PEFT adapter \\(LoRA\\)"):
        hidden_and_head(wrapped, inputs)
    dora = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["lm_head"], use_dora=True))
    with pytest.raises(UnsupportedModelError, match="LoRA adapter 'default' is a variant"):
        fused_linear_forward(dora, inputs, rk.linear_token_logprobs, labels)
