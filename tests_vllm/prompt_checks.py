"""What the HiPrune++ tier-2 files share (test_vllm_prompt.py, test_vllm_prompt_tiled.py): the extra count, the
prompt's text embedding and the expected extra tokens, each recomputed independently of the plugin, in float64, and
the cache-separation check."""

import glob
import os

import torch


def extra_count(keep, beta):
    return int(torch.tensor(beta * keep, dtype=torch.float64).round().item())  # round half to even


def prompt_embedding(model_dir, prompt_ids, token):
    """float64 mean of the language model's embedding rows over the prompt's text: the ids after the last image
    placeholder, from the first ordinary token to the next special one (the tokenizer's special ids and the token
    ids config.json names, as integrations/prompt.py)."""
    import json

    import transformers
    from safetensors import safe_open

    special = set(transformers.AutoTokenizer.from_pretrained(model_dir).all_special_ids)
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    for section in (config, config.get("text_config") or {}):
        for key, value in section.items():
            if key.endswith(("token_id", "token_ids", "token_index")):
                special.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    after = prompt_ids[max(i for i, t in enumerate(prompt_ids) if t == token) + 1:]
    text = []
    for t in after:
        if t in special:
            if text:
                break
            continue
        text.append(t)
    path = glob.glob(os.path.join(model_dir, "*.safetensors"))[0]
    with safe_open(path, "pt") as f:
        name = next(k for k in f.keys() if k.endswith("embed_tokens.weight"))
        table = f.get_tensor(name).double()
    return table[text].mean(0), text


def expected_extras(full_embeddings, kept, prompt, count):
    """The `count` not-kept tokens of highest cosine similarity to the prompt (ties: lower index), float64."""
    features = torch.tensor(full_embeddings, dtype=torch.float64)
    cosine = torch.nn.functional.cosine_similarity(features, prompt[None], dim=1)
    left = [i for i in range(features.shape[0]) if i not in set(kept)]
    return sorted(sorted(left, key=lambda i: (-cosine[i].item(), i))[:count])


def check_questions_cached_apart(results, first, second):
    """Results by request name: "default" and "question" (two questions on one image, kept indices `first` and
    `second`) differ, and "again" / "question_again" repeat them, answered from the caches (no encoder run)."""
    assert first != second  # these two questions pick different tokens on this image (else the test shows nothing)
    for name, twin in (("again", "default"), ("question_again", "question")):
        for key in ("prompt_ids", "tokens"):
            assert results[name][key] == results[twin][key], (name, key)
        # The caches are on: the repeated prompt ran no encoder (its image came from the prefix / encoder cache).
        assert results[name]["kept"] == [] and results[name]["embeddings"] == [], name
