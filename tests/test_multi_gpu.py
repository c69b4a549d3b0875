"""A model sharded over two GPUs (accelerate's dispatch, as device_map="auto" does): each layer's cache lives on its
layer's GPU, and prefill, compress and generate give what the same model gives on one GPU. Needs 2 CUDA devices;
run with -m gpu."""

import copy

import pytest
import torch

from conftest import ByteTokenizer, make_pair
from kvzip_cache import KVzipCache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]
TOK = ByteTokenizer()


def _one_and_two_gpus(arch):
    """The same float32 weights on cuda:0, and split over cuda:0 / cuda:1 (first half of the layers on 0)."""
    from accelerate import dispatch_model

    model, _ = make_pair(arch)
    single = copy.deepcopy(model).to("cuda:0")
    layers = model.config.num_hidden_layers
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
    device_map.update({f"model.layers.{i}": 0 if i < layers // 2 else 1 for i in range(layers)})
    if hasattr(model.model, "rotary_emb_local"):  # Gemma3's second rotary embedding
        device_map["model.rotary_emb_local"] = 0
    return single, dispatch_model(model, device_map=device_map)


def _ids(n, seed):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed)).to("cuda:0")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sharded_model_equals_one_gpu(arch):
    single, sharded = _one_and_two_gpus(arch)
    context, question = _ids(300, 1), _ids(9, 2)
    results = []
    for model in (single, sharded):
        cache = KVzipCache(model)
        cache.prefill(model, context, context_start=7, chunk_size=128)
        cache.compress(model, 0.3, tokenizer=TOK, chunk_size=100)
        inputs = cache.inputs_for(question)
        tokens = model.generate(**inputs, past_key_values=cache, max_new_tokens=10, do_sample=False)
        results.append((cache, tokens.to("cuda:0")))
    (one, one_tokens), (two, two_tokens) = results
    torch.testing.assert_close(two.scores.to("cuda:0"), one.scores, atol=1e-4, rtol=1e-4, equal_nan=True)
    assert torch.equal(two.keep_mask.to("cuda:0"), one.keep_mask)
    assert torch.equal(two_tokens, one_tokens)
    for idx in two.compressible_layers:  # each layer's kept pairs stay on its layer's GPU
        weight = sharded.model.layers[idx].self_attn.q_proj.weight
        assert two.layers[idx].context.keys.device == weight.device
        assert two.layers[idx].src_index.device == weight.device
    assert {two.layers[i].context.keys.device.index for i in two.compressible_layers} == {0, 1}
