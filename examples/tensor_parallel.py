"""KVzip on a tensor-parallel model: every rank caches its share of the KV heads, selection stays global.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py                      # CPU: gloo, a tiny random Llama
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --model PATH --device cuda   # GPUs: NCCL, a real model

Each rank loads the model with transformers' tensor-parallel plan, prefills and compresses its own
`KVzipCache(model)` (all ranks make the same calls), and generates. Rank 0 prints the kept ratio, the KV bytes each
rank holds, and the answer; every rank checks that its keep mask is the same as the others'.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import kvzip_cache  # noqa: F401  (registers attn_implementation="kvzip")
from kvzip_cache import KVzipCache
from kvzip_cache.compat import cache_kwarg


def tiny_llama(folder: str) -> str:
    """A small random Llama (4 KV heads) saved to ``folder``, the same on every rank (fixed seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load_tensor_parallel(path: str, device: str):
    kwargs = {"attn_implementation": "kvzip", "dtype": torch.float32 if device == "cpu" else torch.bfloat16}
    try:
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(tp_plan="auto")
    except ImportError:  # transformers before DistributedConfig
        kwargs["tp_plan"] = "auto"
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local checkpoint (default: a tiny random Llama)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--ratio", type=float, default=0.3)
    args = parser.parse_args()

    dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
    rank = dist.get_rank()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    with tempfile.TemporaryDirectory() as scratch:
        path = args.model
        if path is None:  # rank 0 writes the tiny model, the others wait for it
            path = os.path.join(scratch, "tiny-llama") if rank == 0 else None
            if rank == 0:
                tiny_llama(path)
            shared = [path]
            dist.broadcast_object_list(shared, src=0)
            path = shared[0]
        model = load_tensor_parallel(path, args.device)
        dist.barrier()  # the scratch folder may go once every rank has loaded the model
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    context = torch.randint(10, vocab, (1, 600), generator=torch.Generator().manual_seed(1)).to(device)
    question = torch.randint(10, vocab, (1, 12), generator=torch.Generator().manual_seed(2)).to(device)

    cache = KVzipCache(model)
    cache.prefill(model, context, context_start=8, chunk_size=256)
    dense = cache.kv_bytes()
    tokenizer = _NoTemplateTokenizer() if args.model is None else None  # None: the checkpoint's own tokenizer
    report = cache.compress(model, args.ratio, tokenizer=tokenizer)
    # cache= on transformers 5.24+, past_key_values= before (the GPU machine runs 5.17): cache_kwarg picks the name.
    out = model.generate(**cache.inputs_for(question), **{cache_kwarg(model): cache}, max_new_tokens=8, do_sample=False)

    masks = [torch.empty_like(cache.keep_mask) for _ in range(dist.get_world_size())]
    dist.all_gather(masks, cache.keep_mask.contiguous())
    assert all(torch.equal(mask, masks[0]) for mask in masks), "ranks kept different pairs"
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, (dense, cache.kv_bytes()))
    if rank == 0:
        print(f"{dist.get_world_size()} ranks, {cache.local_kv_heads} of {cache.num_kv_heads} KV heads each; kept "
              f"{report.achieved_ratio:.3f} of the context pairs (the same keep mask on every rank)")
        for r, (d, c) in enumerate(per_rank):
            print(f"rank {r}: KV {d / 2**20:.2f} MiB dense -> {c / 2**20:.2f} MiB compressed")
        print("generated ids:", out[0, -8:].tolist())
    dist.destroy_process_group()


class _NoTemplateTokenizer:
    """A random model has no tokenizer; the reconstruction prompts only need some token ids."""

    chat_template = None
    bos_token_id = None

    def encode(self, text, add_special_tokens=False):
        return [10 + ord(ch) % 200 for ch in text]


if __name__ == "__main__":
    main()
