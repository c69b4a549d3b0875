"""Tensor parallelism: a `KVzipCache` on a model loaded with transformers' ``tp_plan`` (or ``DistributedConfig``).

Under tensor parallelism every rank computes and caches a contiguous block of the KV heads (the key and value
projections are split by output column). The cache keeps only those, but KVzip's selection is global: the scores of
all heads are gathered (in rank order, so they read as on one GPU), every rank runs the same top-k on them, and each
rank then evicts its own heads' share of the global keep mask. ``cache.scores`` and ``cache.keep_mask`` are therefore
global and identical on every rank; ``kv_bytes()`` is per rank.

Why gather the scores rather than search for the k-th value across ranks: the scores are one float32 per context
pair, about 1% of that pair's keys and values at head_dim 128 in bf16 (4 bytes against 512), and gathering them costs
one all-gather per compress (each rank receives ``(W - 1) / W`` of them). A distributed k-th-value search would save
that memory but needs a dozen all-reduces and its own tie-breaking; gathering reuses the single-GPU selection, ties
included, so a tensor-parallel cache keeps exactly the pairs one GPU would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorParallel:
    """Where this rank's KV heads sit among the model's.

    Attributes:
        group: the tensor-parallel process group.
        rank: this process's rank in ``group``.
        world_size: ranks in ``group``.
        num_kv_heads: the model's KV heads per layer (all ranks).
    """

    group: object
    rank: int
    world_size: int
    num_kv_heads: int

    @property
    def local_kv_heads(self) -> int:
        return self.num_kv_heads // self.world_size

    @property
    def head_slice(self) -> slice:
        """This rank's KV heads, a contiguous block (transformers splits k_proj / v_proj by output column)."""
        return slice(self.rank * self.local_kv_heads, (self.rank + 1) * self.local_kv_heads)

    def local(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's heads of a tensor over all heads along ``dim``."""
        return tensor.narrow(dim, self.head_slice.start, self.local_kv_heads)

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """All ranks' heads, in rank order, from each rank's tensor over its own heads along ``dim``."""
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``tensor`` (in place)."""
        import torch.distributed as dist

        dist.all_reduce(tensor, group=self.group)
        return tensor

    def agree(self, value: torch.Tensor) -> bool:
        """Whether every rank holds the same ``value`` (checked by all-reducing its min and max)."""
        import torch.distributed as dist

        low, high = value.clone(), value.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.group)
        return bool(torch.equal(low, high))


def tensor_parallel_size(model) -> int:
    """How many tensor-parallel ranks share the model's layers (1 without tensor parallelism)."""
    return getattr(model, "_tp_size", None) or 1


def tensor_parallel_of(model, num_kv_heads: int) -> TensorParallel | None:
    """The `TensorParallel` layout of a model loaded with a tensor-parallel plan, or None for one process.

    Raises ValueError for layouts the cache cannot serve: KV heads not divisible by the tensor-parallel size, or a
    model that is both sharded by ``device_map`` and tensor parallel.
    """
    size = tensor_parallel_size(model)
    if size <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "the model is tensor parallel but no torch.distributed process group is initialised: run under torchrun "
            "(or init_process_group) before from_pretrained(..., tp_plan='auto') and KVzipCache(model)"
        )
    if getattr(model, "hf_device_map", None):
        raise ValueError(
            "the model has both a device_map and a tensor-parallel plan; KVzipCache needs one of them: load it with "
            "tp_plan='auto' alone (tensor parallelism) or device_map='auto' alone (layers spread over GPUs)"
        )
    if num_kv_heads % size:
        raise ValueError(
            f"{num_kv_heads} KV heads do not split over {size} tensor-parallel ranks: transformers would replicate or "
            f"split them unevenly; use a tensor-parallel size that divides {num_kv_heads}"
        )
    mesh = getattr(model, "_device_mesh", None)
    group = mesh["tp"].get_group() if mesh is not None and "tp" in (mesh.mesh_dim_names or ()) else dist.group.WORLD
    return TensorParallel(group=group, rank=dist.get_rank(group), world_size=size, num_kv_heads=num_kv_heads)
