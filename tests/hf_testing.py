"""What the Hugging Face integration tests share: tiny configs, prompt padding, call spies and the checks every
family must pass (full budget changes nothing, remove_hiprune restores the model, generate returns the prompt)."""

import contextlib

import torch

import hiprune_ops
from hiprune_ops.integrations import capture

# A 2-layer text model small enough to build in milliseconds; families add what their config needs.
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=160, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def vit(image_size, num_hidden_layers=3, patch_size=4, **extra) -> dict:
    """A tiny ViT tower's config (width 32, 4 heads) as keyword arguments."""
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=num_hidden_layers, num_attention_heads=4,
                image_size=image_size, patch_size=patch_size, **extra)


def left_pad(rows, pad=0):
    """(input_ids, attention_mask) of token rows of different lengths, left padded as a processor would."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


class CallSpy:
    """Records the keyword arguments of every call of a module (`args`: the positional ones; input_ids: the first
    positional one when it was not given by keyword)."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        call = dict(kwargs, args=args)
        if args and call.get("input_ids") is None:
            call["input_ids"] = args[0]
        self.calls.append(call)


@contextlib.contextmanager
def spying(*modules):
    """One CallSpy per module, removed on exit."""
    spies = [CallSpy(m) for m in modules]
    try:
        yield spies
    finally:
        for spy in spies:
            spy.handle.remove()


def spied_forward(model, inputs, *modules):
    """Runs model(**inputs) without grad while spying on `modules`; returns (output, one spy per module)."""
    with spying(*modules) as spies, torch.no_grad():
        return model(**inputs), spies


def unpatch(*models):
    """Test teardown: removes apply_hiprune from the models; no capture wrapper may outlive it."""
    for model in models:
        hiprune_ops.remove_hiprune(model)
    assert not capture._installed, "a capture wrapper outlived remove_hiprune"


def assert_full_budget_is_identity(model, inputs, budget, what=""):
    """Keeping every token changes neither the logits nor greedy generate; the model is unpatched after."""
    with torch.no_grad():
        reference = model(**inputs).logits
        reference_ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    hiprune_ops.apply_hiprune(model, budget=budget)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        hiprune_ops.remove_hiprune(model)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    assert torch.equal(ids, reference_ids), what


def assert_remove_restores_bit_identical_outputs(model, inputs, budget):
    """A pruned forward (shorter), then remove_hiprune: the same object, attention kernels and logits as before."""
    from transformers.modeling_utils import AttentionInterface

    sdpa = AttentionInterface._global_mapping["sdpa"]
    with torch.no_grad():
        before = model(**inputs).logits
        hiprune_ops.apply_hiprune(model, budget=budget)
        assert model(**inputs).logits.shape[1] < before.shape[1]
    assert hiprune_ops.remove_hiprune(model) is model
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert AttentionInterface._global_mapping["sdpa"] is sdpa
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(before, after)


def assert_generate_returns_prompt_then_greedy(model, inputs, out, new_tokens):
    """generate's output is the original prompt and new_tokens more, the first of them greedy from forward."""
    prompt = inputs["input_ids"]
    assert out.shape == (prompt.shape[0], prompt.shape[1] + new_tokens)
    assert torch.equal(out[:, :prompt.shape[1]], prompt)  # so out[:, prompt.shape[1]:] is still the answer
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.equal(out[:, prompt.shape[1]], logits[:, -1].argmax(-1))
