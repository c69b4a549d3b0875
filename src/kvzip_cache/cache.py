"""`KVzipCache`: a transformers `Cache` that compresses its context once and serves many questions.

Life cycle::

    cache = KVzipCache(model)
    cache.prefill(model, input_ids, context_start=prefix_len)   # dense, chunked
    cache.compress(model, ratio=0.3, tokenizer=tok)              # score by reconstruction, evict for real
    model.generate(full_ids, past_key_values=cache, ...)          # appends question + answer to a dense tail
    cache.rollback()                                              # drop them; the next question starts clean

Long answers: ``cache.evict_while_decoding(model, predictor, ratio, window=128)`` bounds the tail too (the oldest
tail tokens are scored by a trained predictor and mostly freed as the answer grows; see `DecodeEviction`).

Sequences are in padded coordinates (left padding when batch > 1). Positions before ``context_start`` are the
protected prefix: never scored, never evicted. Padding is never kept.
"""

from __future__ import annotations

import logging
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from .attention import ATTN_IMPLEMENTATION, uses_kvzip_attention
from .compat import cache_kwarg
from .config import FULL as _FULL
from .config import config_fields, config_fingerprint, field_differences, layer_types, text_config
from .eviction import DecodeEviction, PrefillEviction
from .fingerprints import (attention_module_ids, tokenizer_fields, tokenizer_fingerprint, weight_differences,
                           weight_digests)
from .head_scores import HeadScores
from .layers import KVzipLayer, KVzipSlidingLayer, check_batch
from .parallel import TensorParallel, tensor_parallel_of, tensor_parallel_size
from .persistence import load_cache, save_cache
from .scorers.predictor import ScorePredictor
from .scorers.rotary import rotary_tables
from .scoring import RECONSTRUCTION_TARGETS, score_by_reconstruction
from .selection import LEVELS, select_heads, select_pairs

logger = logging.getLogger("kvzip_cache")



@dataclass
class CompressReport:
    """What `KVzipCache.compress` did.

    Attributes:
        level: as requested (``"pair"``, ``"pair-uniform"`` or ``"head"``).
        ratio: as requested: the fraction of context pairs kept.
        achieved_ratio: kept context pairs / selectable context pairs, over all rows and compressible layers.
        kept_per_layer: ``[L]`` context pairs kept per layer (summed over rows and heads; sliding layers: 0).
        bytes_before: `KVzipCache.kv_bytes` before eviction.
        bytes_after: `KVzipCache.kv_bytes` after eviction.
        metadata_bytes: bytes of per-pair positions and per-head offsets after eviction.
        seconds: wall time of scoring plus eviction.
    """

    level: str
    ratio: float
    achieved_ratio: float
    kept_per_layer: list[int]
    bytes_before: int
    bytes_after: int
    metadata_bytes: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"KVzip {self.level} ratio={self.ratio:g}: kept {self.achieved_ratio:.3f} of context pairs, "
            f"KV {self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB in {self.seconds:.2f}s"
        )


# Static tails are sized in multiples of this, so that nearby max_new_tokens share a compiled graph.
_TAIL_BUCKET = 64
_STATIC_DECODE_EVICTION = (
    "eviction while decoding changes the size of the compressed context, which a static cache fixes for its compiled "
    "steps: use one or the other (cache.evict_while_decoding(None) turns eviction off)"
)

class KVzipCache(Cache):
    """A transformers `Cache` with KVzip compression. See the module docstring for the life cycle.

    Args:
        model_or_config: the model (loaded with ``attn_implementation="kvzip"``) or its config.

    Attributes:
        input_ids: ``[B, S]`` the prefilled ids (padded coordinates).
        attention_mask: ``[B, S]`` bool, False on left padding.
        context_start: ``[B]`` int64, first context position of each row.
        scores: ``[L, B, H, S - min(context_start)]`` float32 KVzip scores after `compress` (NaN = not scored).
        keep_mask: same shape, bool, the context pairs kept by the last `compress`/`evict`.
        weight_digests: a sample of the prefilling model's weights (`kvzip_cache.fingerprints.weight_digests`).
        tokenizer_fields: the tokenizer the context was scored with (`kvzip_cache.fingerprints.tokenizer_fields`).

    `prefill` sets the first three and the weight digests; `compress` and `evict` set the scores and the mask.

    What the cache checks (each refusal names the fix; README "Troubleshooting" lists them): the architecture (config
    fingerprint) at `prefill`, `compress` and `load`; the weights (a sample, so another
    fine-tune of the same architecture is refused) at `compress` and `load`; the tokenizer at `compress` when one is
    passed or loaded; the model object at ``generate`` from a compressed cache (by identity of its attention
    modules, recorded at `prefill`, `compress` and `load`, so no host sync: another model object, even an identical
    copy that did not compress or load the cache, is refused; `evict` takes no model and keeps the recorded one).
    A cache prefilled but not compressed is as a `DynamicCache` and is not checked at ``generate``. An interrupted
    `prefill` (out of memory, KeyboardInterrupt) resets the cache to empty; an interrupted scoring pass leaves it
    exactly as it was; an eviction interrupted after some layers evicted resets it. The exception is re-raised with
    a note saying which.
    """

    def __init__(self, model_or_config) -> None:
        config = text_config(model_or_config)
        self.layer_types = layer_types(config)
        # The architecture this cache is for (saved files and head scores record the same fingerprint).
        self.fingerprint, self.config_fields = config_fingerprint(model_or_config), config_fields(model_or_config)
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        # A tensor-parallel model: this rank caches a block of the KV heads; scores and masks stay global.
        is_model = hasattr(model_or_config, "config")
        self.tensor_parallel: TensorParallel | None = (
            tensor_parallel_of(model_or_config, self.num_kv_heads) if is_model else None
        )
        layers = [
            KVzipLayer() if kind == _FULL else KVzipSlidingLayer(sliding_window=config.sliding_window)
            for kind in self.layer_types
        ]
        super().__init__(layers=layers)
        self._first_full = self.layer_types.index(_FULL) if _FULL in self.layer_types else -1
        self._clear_context()

    def _clear_context(self) -> None:
        self.input_ids: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        self.context_start: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.keep_mask: torch.Tensor | None = None
        self.compressed_with: tuple[str, float] | None = None
        self.score_source: str | None = None  # "kvzip", "kvzip+", "predicted" or "head": where `scores` came from
        # What filled this context besides the architecture (see `kvzip_cache.fingerprints`): a sample of the
        # model's weights (recorded by prefill) and the tokenizer that scored it (recorded by compress).
        self.weight_digests: dict[str, int] | None = None
        self.tokenizer_fields: dict | None = None
        self._scoring: dict | None = None
        self.decode_eviction: DecodeEviction | None = None  # set by evict_while_decoding()
        # [B, n] bool padding mask of the last question built by inputs_for (tells DecodeEviction its padding)
        self.pending_query_mask: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def compressible_layers(self) -> list[int]:
        """Indices of the full-attention layers (the only ones scored and evicted)."""
        return [i for i, kind in enumerate(self.layer_types) if kind == _FULL]

    @property
    def local_kv_heads(self) -> int:
        """KV heads per layer cached by this process (``num_kv_heads`` over the tensor-parallel size)."""
        tp = self.tensor_parallel
        return self.num_kv_heads if tp is None else tp.local_kv_heads

    def _local_heads(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's KV heads of a tensor over all heads (the tensor itself without tensor parallelism)."""
        return tensor if self.tensor_parallel is None else self.tensor_parallel.local(tensor, dim)

    def _check_same_model(self, model, call: str) -> None:
        """Refuse a model of another architecture than the one this cache was made for (its config fingerprint,
        the one head scores and saved caches record)."""
        if config_fingerprint(model) != self.fingerprint:
            raise ValueError(
                f"{call} got a model of another architecture than this cache was made for "
                f"({field_differences(self.config_fields, config_fields(model))}): use the model that filled the "
                "cache, or a new KVzipCache(model) for this one"
            )

    def _check_same_weights(self, model, call: str) -> None:
        """Refuse a model of the same architecture but other weights (another fine-tune) than the one that filled
        the context: its scores and answers would be garbage, silently. Compares a sample (`weight_digests`)."""
        if self.weight_digests is None:
            return
        current = weight_digests(model)
        differ = None if current is None else weight_differences(self.weight_digests, current)
        if differ is not None:
            raise ValueError(
                f"{call} got a model with other weights than the one that filled this cache ({differ}; another "
                "fine-tune of the same architecture?): use the model that prefilled the cache, or cache.reset() "
                "and prefill again with this one"
            )

    def _bind_model(self, model) -> None:
        """Record ``model``'s attention modules in the full layers: a compressed layer then refuses to run under
        another model object (`RaggedKV.owner`), which would otherwise decode garbage silently."""
        owners = attention_module_ids(model)
        for idx in self.compressible_layers:
            self.layers[idx].owner = owners.get(idx)

    def _check_tokenizer(self, tokenizer) -> dict:
        """The tokenizer's `tokenizer_fields`; refuses one that differs from the tokenizer this cache was
        scored with (the reconstruction prompts, hence the scores, depend on it)."""
        fields = tokenizer_fields(tokenizer)
        recorded = self.tokenizer_fields
        if recorded is not None and tokenizer_fingerprint(fields) != tokenizer_fingerprint(recorded):
            raise ValueError(
                f"compress() got another tokenizer than the one this cache was scored with "
                f"({field_differences(recorded, fields)}): pass the tokenizer of the model that filled the cache "
                "(or none: a second compress re-uses the stored scores)"
            )
        return fields

    def _check_parallel(self, model, call: str, *values) -> None:
        """Refuse a model whose tensor parallelism differs from the cache's, and (tensor parallel) calls whose
        arguments differ between ranks: every rank must run the same forward passes, so a divergence would hang
        or corrupt. Runs before any other check, so that a refusal is raised on every rank alike."""
        size = tensor_parallel_size(model)
        mine = 1 if self.tensor_parallel is None else self.tensor_parallel.world_size
        if size != mine:
            raise ValueError(
                f"the model is split over {size} tensor-parallel ranks but this cache was made for {mine}: create "
                "the cache from the loaded model, KVzipCache(model), after the process group and the model exist"
            )
        if self.tensor_parallel is None:
            return
        numbers = []
        for value in values:
            if isinstance(value, torch.Tensor):  # ids: their shape, sum and position-weighted sum
                flat = value.flatten()
                numbers += [*value.shape, float(flat.sum()),
                            float((flat * torch.arange(flat.numel(), device=flat.device)).sum())]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers.append(float(value))
            else:
                numbers.append(float(zlib.crc32(str(value).encode())))  # crc32: the same in every process
        # On the model's device: NCCL reduces only CUDA tensors (gloo takes CPU ones).
        values = torch.tensor(numbers, dtype=torch.float64, device=getattr(model, "device", "cpu")).nan_to_num(nan=-1.0)
        if not self.tensor_parallel.agree(values):
            raise ValueError(
                f"the tensor-parallel ranks called {call} with different arguments; every rank must make the same "
                "calls with the same inputs (they run each forward pass together)"
            )

    @property
    def context_offset(self) -> int:
        """First position of the score / keep-mask tensors: ``min(context_start)``."""
        return int(self.context_start.min())

    @property
    def context_length(self) -> int:
        """Logical length of the prefilled sequence (padded coordinates)."""
        return 0 if self.input_ids is None else self.input_ids.shape[1]

    @property
    def is_compressed(self) -> bool:
        return self.compressed_with is not None

    def kv_bytes(self) -> int:
        """Bytes allocated for keys and values over all layers (spare tail capacity counts)."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def metadata_bytes(self) -> int:
        """Bytes of the ragged layout's bookkeeping (per-pair positions, per-head offsets)."""
        return sum(layer.metadata_bytes() for layer in self.layers)

    # ---------------------------------------------------------------------------------------- transformers API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self._scoring is not None:
            spec = self._scoring
            return self.layers[layer_idx].peek(
                key_states, value_states, spec["row"], spec["chunk"], spec["prefix_positions"],
                spec["buffers"].get(layer_idx), query_norms=spec["query_norms"].get(layer_idx),
            )
        layer = self.layers[layer_idx]
        if layer_idx == 0 and not torch.compiler.is_compiling():
            self._check_whole_forwards()  # once per eager forward, before any layer appends
            self._check_batch(key_states.shape[0])
            if self.decode_eviction is not None:
                self._evict_tail(key_states.shape[-2], key_states.shape[0])
        if layer.is_static and layer_idx == self._first_full and not torch.compiler.is_compiling():
            self._check_room(key_states.shape[-2])  # once per eager forward; compiled steps never read lengths
        return layer.update(key_states, value_states)

    def _check_whole_forwards(self) -> None:
        """Refuse to run on layers of different lengths: an earlier forward pass stopped between two layers (an
        exception in the model, a refusal by the attention, KeyboardInterrupt during ``generate``), and the next one
        would attend to mismatched positions. `rollback` (or `reset`) repairs it."""
        if self.is_static:
            return  # its lengths live on the device; reading them here would cost a host sync per step
        lengths = {layer.cumulative_length for layer in self.layers}
        if len(lengths) > 1:
            raise RuntimeError(
                f"an earlier forward pass stopped partway (the cache's layers hold between {min(lengths)} and "
                f"{max(lengths)} tokens): call cache.rollback() to return to the compressed context (or "
                "cache.reset()) before generating again"
            )

    def _evict_tail(self, new_tokens: int, batch: int) -> None:
        """Run `DecodeEviction` before this forward appends; if it stopped with the layers in disagreement (out of
        memory between two layers), return to the compressed context rather than leave them so."""
        try:
            self.decode_eviction.before_forward(self, new_tokens, batch)
        except BaseException as error:
            if len({self.layers[idx].context_length for idx in self.compressible_layers}) > 1:
                self.rollback()
                _add_note(error, "KVzipCache: eviction while decoding stopped between two layers; the cache was "
                                 "rolled back to its compressed context (the tokens after it are gone)")
            raise

    def _check_batch(self, batch: int) -> None:
        """Refuse a forward whose batch differs from the cached rows before the first layer runs: transformers'
        sliding layer counts the new tokens before its concatenation fails, so a later refusal would leave it
        longer than it is (found by the call-order state machine)."""
        first = self.layers[0]
        if getattr(first, "context", None) is not None:
            rows = len(first.src_rows)
        elif getattr(first, "keys", None) is not None and first.keys.numel():
            rows = first.keys.shape[0]
        else:
            return  # empty: the first forward sets the batch
        check_batch(batch, rows)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop tokens from the end (``-n`` removes n), in every layer or in none: each layer checks first."""
        for layer in self.layers:
            layer.check_crop(tokens_to_remove, self.context_length)
        super().crop(tokens_to_remove)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        # transformers builds the mask before any layer runs: the first place a forward with no new tokens shows.
        # (generate feeds only the ids after the cached length, so passing the question alone leaves nothing.)
        if isinstance(query_length, int) and query_length == 0 and self.input_ids is not None:
            raise ValueError(
                f"no new tokens after the {self.context_length} cached ones: the input ids must be the whole sequence "
                "[context; question], as with any transformers cache. Use "
                "model.generate(**cache.inputs_for(query_ids, query_mask), past_key_values=cache)"
            )
        return super().get_mask_sizes(query_length, layer_idx)

    def reset(self) -> None:
        super().reset()
        self._clear_context()

    # ------------------------------------------------------------------------------------------------- prefill
    @torch.no_grad()
    def prefill(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        context_start: int | torch.Tensor = 0,
        chunk_size: int = 16384,
        head_scores: HeadScores | torch.Tensor | None = None,
        predictor: ScorePredictor | None = None,
        ratio: float | None = None,
        level: str = "pair",
    ) -> None:
        """Fill the cache with ``[protected prefix | context]``, ``chunk_size`` tokens per forward pass.

        With ``predictor`` and ``ratio``, the cache is compressed while it is filled: after every chunk, the
        predictor scores the chunk's context pairs and only ``ratio`` of them stay (one top-k per row over layers x
        heads x the chunk's positions for ``level="pair"``, per (layer, head) for ``"pair-uniform"``); the rest is
        freed before the next chunk runs, so the full cache never exists (peak ~ ratio x full KV + one chunk). Each
        chunk attends densely to itself and to what the earlier chunks kept, so later hidden states differ from a
        prefill that compresses afterwards. The result is compressed at ``level`` with the predicted scores.

        With ``head_scores`` and ``ratio``, the context KV of the heads that head-level compression would drop is
        dropped after every chunk, so the full cache never exists (peak memory ~ ratio x full). The result is a
        cache compressed at ``level="head"``. This is not identical to prefilling then compressing: in the later
        chunks, the dropped heads already see only the protected prefix and their own chunk (as DuoAttention's
        streaming heads see only their window), so later hidden states differ slightly.

        Args:
            model: the causal LM, loaded with ``attn_implementation="kvzip"``.
            input_ids: ``[B, S]``; left-padded when B > 1.
            attention_mask: ``[B, S]`` (1 = token, 0 = left padding), or None for no padding.
            context_start: first context position (an int, or ``[B]`` in padded coordinates); earlier positions
                are the protected prefix.
            chunk_size: tokens per forward pass (bounds activation memory).
            head_scores: `HeadScores` (or ``[num_layers, num_kv_heads]``) to drop heads during the prefill.
            predictor: a `ScorePredictor` for this model, to evict pairs during the prefill.
            ratio: with ``head_scores``, the fraction of compressible heads kept; with ``predictor``, the fraction
                of each chunk's context pairs kept.
            level: with ``predictor``: ``"pair"`` or ``"pair-uniform"`` (the budget within each chunk).
        """
        self._check_parallel(model, "prefill()", input_ids, context_start, chunk_size, ratio, level,
                             predictor is None, head_scores is None)
        check_model(model)
        self._check_same_model(model, "prefill()")
        if self.get_seq_length() > 0 or self.input_ids is not None:
            raise RuntimeError("prefill() needs an empty cache: create a new KVzipCache or call cache.reset() first")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, seq] with seq > 0, got shape {tuple(input_ids.shape)}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
        batch, seq = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        mask = attention_mask.to(device=device, dtype=torch.bool)
        if bool((mask[:, 1:].int() < mask[:, :-1].int()).any()):
            raise ValueError("only left padding is supported: set tokenizer.padding_side = 'left'")
        starts = torch.as_tensor(context_start, dtype=torch.long, device=device).flatten()
        starts = starts.expand(batch).clone() if starts.numel() == 1 else starts
        if starts.numel() != batch:
            raise ValueError(f"context_start has {starts.numel()} entries for a batch of {batch}")
        if bool((starts < 0).any()) or bool((starts >= seq).any()):
            raise ValueError(f"context_start must lie in [0, {seq}) so that every row has a context; got {starts.tolist()}")
        if bool((~mask.gather(1, starts[:, None])).any()):
            raise ValueError("context_start points at padding in some row: the context must come after the left padding")

        if predictor is not None and head_scores is not None:
            raise ValueError("prefill() evicts by head_scores=... or by predictor=..., not both")
        kept_heads = self._prefill_kept_heads(model, head_scores, ratio) if predictor is None else None
        eviction = self._prefill_eviction(model, predictor, ratio, level, mask, starts) if predictor else None
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # what generate() derives from the mask
        kwarg = cache_kwarg(model)
        digests = weight_digests(model)
        try:
            for lo in range(0, seq, chunk_size):
                hi = min(lo + chunk_size, seq)
                model(
                    input_ids=input_ids[:, lo:hi],
                    attention_mask=mask[:, :hi].long(),
                    position_ids=positions[:, lo:hi],
                    use_cache=True,
                    logits_to_keep=1,
                    **{kwarg: self},
                )
                if kept_heads is not None:
                    self._drop_heads(kept_heads, mask, starts, lo, hi)
                if eviction is not None:
                    eviction.after_chunk(self, lo, hi)
            self.input_ids, self.attention_mask, self.context_start = input_ids, mask, starts
            self.weight_digests = digests
            self._bind_model(model)
            for layer in self.layers:
                if isinstance(layer, KVzipSlidingLayer):
                    layer.take_snapshot()
            if kept_heads is not None:  # the same state as compress(level="head"); the layers hold that subset
                self.compress(model, ratio, level="head", head_scores=_head_score_tensor(model, head_scores))
            if eviction is not None:  # the layers hold the kept pairs already; record what compress would have
                self.scores, self.keep_mask = eviction.scores, eviction.keep_mask
                self.compressed_with, self.score_source = (level, eviction.ratio), "predicted"
        except BaseException as error:  # out of memory, KeyboardInterrupt, ...: never a half-filled cache
            self.reset()
            _add_note(error, "KVzipCache.prefill() did not finish: the cache was reset to empty (nothing of this "
                             "prefill is kept); call prefill() again, e.g. with a smaller chunk_size")
            raise

    def _prefill_kept_heads(self, model, head_scores, ratio) -> torch.Tensor | None:
        """``[L, H]`` bool, the heads a head-dropping prefill keeps; None for a plain prefill."""
        if head_scores is None and ratio is None:
            return None
        if head_scores is None or ratio is None:
            raise ValueError("prefill() drops heads only when given both head_scores=... and ratio=...")
        ratio = _check_ratio(ratio)
        head_scores = _head_score_tensor(model, head_scores)
        full = torch.tensor([kind == _FULL for kind in self.layer_types])
        selectable = full[:, None, None, None].expand(-1, 1, self.num_kv_heads, 1)
        return select_heads(selectable, torch.as_tensor(head_scores), ratio)[:, 0, :, 0]

    def _prefill_eviction(self, model, predictor, ratio, level, mask, starts) -> PrefillEviction:
        """Checks the arguments of an evicting prefill (before anything runs) and returns its per-chunk step."""
        if ratio is None:
            raise ValueError("prefill(predictor=...) needs ratio=...: the fraction of context pairs kept")
        ratio = _check_ratio(ratio)
        if level not in ("pair", "pair-uniform"):
            raise ValueError(f"prefill(predictor=...) selects at level 'pair' or 'pair-uniform', got {level!r}")
        _check_predictor(model, predictor)
        if not self.compressible_layers:
            raise ValueError("every layer of this model uses sliding-window attention: there is nothing to evict")
        return PrefillEviction(self, model, predictor, ratio, level, mask, starts)

    def _drop_heads(self, kept_heads: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor, lo: int, hi: int) -> None:
        """After the chunk ``[lo, hi)``: dropped heads keep only its protected-prefix tokens (padding never)."""
        in_prefix = torch.arange(lo, hi, device=mask.device)[None, :] < starts[:, None]
        real = mask[:, None, lo:hi]  # [B, 1, t]
        for idx in self.compressible_layers:
            heads = kept_heads[idx].to(mask.device)
            if bool(heads.all()):
                continue  # nothing to drop: stays dense until the final compress
            keep = self._local_heads(real & (heads[None, :, None] | in_prefix[:, None, :]), dim=1)  # [B, H, t]
            layer = self.layers[idx]
            if layer.is_compressed:
                layer.absorb_tail(keep)
            else:
                layer.evict(keep)  # the first chunk (lo == 0) turns the layer ragged

    # ------------------------------------------------------------------------------------------------ compress
    def compress(
        self,
        model,
        ratio: float,
        *,
        tokenizer=None,
        level: str = "pair",
        chunk_size: int = 2048,
        head_scores: HeadScores | torch.Tensor | None = None,
        predictor: ScorePredictor | None = None,
        score: str | None = None,
        progress: bool = False,
    ) -> CompressReport:
        """Score the context (by reconstruction, or with a trained predictor) and evict all but ``ratio`` of its
        pairs, for real.

        Args:
            model: the model the cache was prefilled with.
            ratio: fraction of context pairs KEPT, in (0, 1].
            tokenizer: the model's tokenizer (builds the reconstruction prompts); loaded from
                ``model.config.name_or_path`` when None. Not needed for ``level="head"``.
            level: ``"pair"`` (one top-k per row over layers x heads x positions), ``"pair-uniform"`` (same
                fraction in every layer and head) or ``"head"`` (whole heads by ``head_scores``, no scoring pass);
                ``"predicted"`` is ``"pair"`` with the scores of ``predictor``.
            chunk_size: context tokens per reconstruction pass.
            head_scores: for ``level="head"``: a `HeadScores` (checked against the model) or a
                ``[num_layers, num_kv_heads]`` tensor, importance per KV head.
            predictor: a `ScorePredictor` for this model: its predicted scores replace the reconstruction pass
                (no forward pass at all).
            score: what the reconstruction pass computes: ``"kvzip"`` (default) or ``"kvzip+"`` (KVzap's KVzip+:
                the probability weighted by ``||W_O v|| / ||h||``, see `score_by_reconstruction`).
            progress: show a progress bar over the reconstruction passes.

        A second `compress` on a compressed cache re-selects among the kept pairs with the stored scores (same
        level, a ratio no larger than before; ratios stay relative to the original context).

        Returns:
            a `CompressReport`.
        """
        started = time.perf_counter()
        self._check_parallel(model, "compress()", ratio, level, chunk_size, predictor is None, str(score),
                             head_scores is None)
        if level == "predicted":
            if predictor is None:
                raise ValueError("level='predicted' needs predictor=ScorePredictor.from_pretrained(...)")
            level = "pair"
        ratio = self._check_compress_args(model, ratio, level, head_scores)
        source = self._score_source(model, level, predictor, score)
        head_scores = _head_score_tensor(model, head_scores)
        scored_with = self._check_tokenizer(tokenizer) if tokenizer is not None else None
        bytes_before = self.kv_bytes()
        selectable = self.selectable_pairs()
        if level == "head":
            keep = select_heads(selectable, torch.as_tensor(head_scores), ratio)
            if self.keep_mask is not None:  # re-selection (or after a custom evict): evicted pairs stay evicted
                keep &= self.keep_mask
            scores = torch.as_tensor(head_scores, dtype=torch.float32).to(keep.device)[:, None, :, None]
            scores = scores.expand_as(keep).masked_fill(~selectable, float("nan"))
        else:
            # New scores stay local until the eviction is done: an interrupted scoring pass (out of memory,
            # KeyboardInterrupt) leaves the cache exactly as it was (scoring mode is left in scoring_pass's finally).
            scores = self.scores
            if scores is None and source == "predicted":
                scores = self._predicted_scores(model, predictor, selectable)
            elif scores is None:
                if tokenizer is None:
                    tokenizer = _load_tokenizer(model)
                    scored_with = self._check_tokenizer(tokenizer)
                try:
                    scores = score_by_reconstruction(self, model, tokenizer, chunk_size, progress, target=source)
                except BaseException as error:
                    try:
                        self._release_scoring_room()
                    except Exception:  # noqa: BLE001 - out of memory again: keep the room, report the first error
                        pass
                    _add_note(error, "KVzipCache.compress() stopped while scoring: the cache is as it was before the "
                                     "call; compress again (a smaller chunk_size needs less memory)")
                    raise
                if self.tensor_parallel is not None:  # each rank scored its own heads: rank order = head order
                    scores = self.tensor_parallel.gather(scores, dim=2)
            if self.keep_mask is None:
                keep = select_pairs(scores, ratio, level)
            else:  # re-selection: evicted pairs rank last but still count, so ratios stay relative to the context
                ranked = scores.masked_fill(selectable & ~self.keep_mask, float("-inf"))
                keep = select_pairs(ranked, ratio, level) & self.keep_mask
        self.evict(keep)
        self._bind_model(model)  # its weights passed the check: an identical copy may take the cache over
        self.scores = scores
        self.compressed_with, self.score_source = (level, ratio), source
        if self.tokenizer_fields is None and scored_with is not None:
            self.tokenizer_fields = scored_with
        report = CompressReport(
            level=level,
            ratio=ratio,
            achieved_ratio=int(keep.sum()) / max(int(selectable.sum()), 1),
            kept_per_layer=keep.flatten(1).sum(dim=1).tolist(),
            bytes_before=bytes_before,
            bytes_after=self.kv_bytes(),
            metadata_bytes=self.metadata_bytes(),
            seconds=time.perf_counter() - started,
        )
        logger.info("%s", report)
        return report

    def _check_rows_as_prefilled(self, call: str) -> None:
        """Refuse to re-select pairs while the rows are repeated or reordered (a crop can empty the tail and leave
        them so): the layers would refuse one by one (found by the call-order state machine)."""
        layer = self.layers[self._first_full] if self._first_full >= 0 else None
        if layer is not None and layer.is_compressed and layer.src_rows != tuple(range(self.input_ids.shape[0])):
            raise RuntimeError(
                f"the cache serves {len(layer.src_rows)} rows made from its {self.input_ids.shape[0]} contexts "
                f"(inputs_for(shared=True), batch_repeat_interleave or beams): call cache.rollback() before {call}"
            )

    def _release_scoring_room(self) -> None:
        """Give back the room scoring reserved after each dense layer's pairs (`KVzipLayer.reserve`), so that an
        interrupted compress leaves the memory as before too. One layer at a time: each copy is one layer large."""
        for idx in self.compressible_layers:
            self.layers[idx].release_room()

    def _check_compress_args(self, model, ratio, level, head_scores) -> float:
        ratio = _check_ratio(ratio)
        if level not in LEVELS:
            raise ValueError(f"unknown level {level!r}; choose one of {(*LEVELS, 'predicted')}")
        if self.input_ids is None:
            raise RuntimeError("compress() needs a prefilled cache: call cache.prefill(model, input_ids) first")
        check_model(model)
        self._check_same_model(model, "compress()")
        self._check_same_weights(model, "compress()")
        if not self.compressible_layers:
            raise ValueError(
                "every layer of this model uses sliding-window attention, so there is nothing KVzip can evict "
                "(transformers treats a config with sliding_window set and no layer_types as all-sliding)"
            )
        if self.get_seq_length() != self.context_length:
            raise RuntimeError(
                f"{self.get_seq_length() - self.context_length} tokens were appended after the context; "
                "call cache.rollback() before compress()"
            )
        self._check_rows_as_prefilled("compress()")
        if level == "head" and head_scores is None:
            raise ValueError("level='head' needs head_scores: a [num_layers, num_kv_heads] tensor")
        if self.is_compressed:
            prev_level, prev_ratio = self.compressed_with
            if level != prev_level or ratio > prev_ratio:
                raise ValueError(
                    f"this cache is already compressed ({prev_level}, ratio {prev_ratio:g}); a second compress can "
                    f"only keep fewer pairs at the same level (level={prev_level!r}, ratio <= {prev_ratio:g}). "
                    "Evicted pairs cannot be restored: prefill a new cache to change level or grow the ratio."
                )
        return ratio

    def _score_source(self, model, level: str, predictor: ScorePredictor | None, score: str | None) -> str:
        """Where this compress takes its scores from; checks the predictor (before anything changes)."""
        if level == "head":
            if predictor is not None or score is not None:
                raise ValueError("level='head' ranks heads by head_scores; predictor= and score= are for pair levels")
            return "head"
        if predictor is not None and score is not None:
            raise ValueError("pass predictor=... (predicted scores) or score=... (reconstruction scores), not both")
        if score is not None and score not in RECONSTRUCTION_TARGETS:
            raise ValueError(f"unknown score {score!r}; choose one of {RECONSTRUCTION_TARGETS} or pass predictor=...")
        if predictor is not None:
            _check_predictor(model, predictor)
        source = "predicted" if predictor is not None else score
        if self.is_compressed and source is not None and source != self.score_source:
            raise ValueError(
                f"this cache was compressed with {self.score_source} scores, which a second compress re-uses; "
                f"it cannot switch to {source} scores. Prefill a new cache to score it another way."
            )
        return source or self.score_source or "kvzip"

    def _predicted_scores(self, model, predictor: ScorePredictor, selectable: torch.Tensor) -> torch.Tensor:
        """``[L, B, H, C]`` predicted log scores of the dense context (NaN where not selectable); no forward pass."""
        base = self.context_offset
        positions = (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, base:]  # the prefill's position ids
        layer_kv = {idx: (self.layers[idx].keys[:, :, base:], self.layers[idx].values[:, :, base:])
                    for idx in self.compressible_layers}
        scores = torch.full(selectable.shape, float("nan"), dtype=torch.float32, device=selectable.device)
        for idx, predicted in predictor.predict_layers(model, layer_kv, positions, self.tensor_parallel).items():
            scores[idx] = predicted.to(scores.device)
        return scores.masked_fill_(~selectable, float("nan"))

    def selectable_pairs(self) -> torch.Tensor:
        """``[L, B, H, C]`` bool, the layout of `scores` and `keep_mask`: the context pairs that compete for the budget
        (full-attention layers, real tokens after the protected prefix). A custom selection for `evict` keeps a
        subset of them; ``cache.evict(cache.selectable_pairs())`` keeps every pair and makes the layers ragged."""
        base = self.context_offset
        positions = torch.arange(base, self.context_length, device=self.attention_mask.device)
        in_context = positions[None, :] >= self.context_start[:, None]  # [B, C]
        valid = in_context & self.attention_mask[:, base:]
        full = torch.tensor([kind == _FULL for kind in self.layer_types], device=valid.device)
        return full[:, None, None, None] & valid[None, :, None, :].expand(-1, -1, self.num_kv_heads, -1)

    # --------------------------------------------------------------------------------------------------- evict
    @torch.no_grad()
    def evict(self, keep_mask: torch.Tensor) -> None:
        """Keep exactly the context pairs where ``keep_mask`` is True (plus the protected prefix), free the rest.

        Args:
            keep_mask: ``[num_layers, batch, num_kv_heads, context_len]`` bool, the layout of `scores`. Entries of
                sliding layers, padding and the protected prefix are ignored. On a compressed cache it may only
                drop more pairs (an evicted pair cannot come back).
        """
        if self.input_ids is None:
            raise RuntimeError("evict() needs a prefilled cache: call cache.prefill(model, input_ids) first")
        if self.get_seq_length() != self.context_length:
            raise RuntimeError("tokens were appended after the context; call cache.rollback() before evict()")
        self._check_rows_as_prefilled("evict()")
        selectable = self.selectable_pairs()
        keep_mask = torch.as_tensor(keep_mask, device=selectable.device)
        if keep_mask.shape != selectable.shape or keep_mask.dtype != torch.bool:
            raise ValueError(
                f"keep_mask must be a bool tensor of shape {list(selectable.shape)} "
                f"([num_layers, batch, num_kv_heads, context_len]); got {keep_mask.dtype} {list(keep_mask.shape)}"
            )
        keep_mask = keep_mask & selectable
        if self.keep_mask is not None and bool((keep_mask & ~self.keep_mask).any()):
            raise ValueError("keep_mask re-admits pairs that were already evicted; they cannot be restored")
        base = self.context_offset
        prefix = self.attention_mask.clone()
        prefix[torch.arange(self.context_length, device=prefix.device)[None, :] >= self.context_start[:, None]] = False
        done, before = 0, None
        try:
            for idx in self.compressible_layers:
                full_keep = prefix[:, None, :].expand(-1, self.num_kv_heads, -1).clone()
                full_keep[:, :, base:] |= keep_mask[idx]
                before = _layer_state(self.layers[idx])
                self.layers[idx].evict(self._local_heads(full_keep, dim=1))
                done += 1
        except BaseException as error:  # out of memory, KeyboardInterrupt, ...
            if done == 0 and (before is None or _same_state(_layer_state(self.layers[idx]), before)):
                _add_note(error, "KVzipCache: the eviction stopped before any layer changed; the cache is as it was")
            else:
                # Evicted pairs cannot come back, and keeping the dense copies for a rollback would double the
                # peak memory of every compress: a cache with some layers evicted and some not is reset instead.
                self.reset()
                _add_note(error, "KVzipCache: the eviction stopped after some layers had dropped their pairs, which "
                                 "cannot be restored; the cache was reset to empty: prefill it again")
            raise
        self.keep_mask = keep_mask
        if self.compressed_with is None:
            self.compressed_with = ("custom", float(keep_mask.sum()) / max(int(selectable.sum()), 1))

    # ----------------------------------------------------------------------------------------- compiled decoding
    @property
    def is_static(self) -> bool:
        """Whether `make_static` was called: fixed shapes, lengths on the device, ready for torch.compile."""
        return self.is_compressed and self.layers[0].is_static

    def make_static(self, max_new_tokens: int) -> None:
        """Make decoding compile-friendly (``is_compileable``): room for ``max_new_tokens`` tokens after the context.

        Every layer preallocates its tail for ``max_new_tokens`` tokens (question plus answer; `rollback` empties it
        again) and keeps its length on the device, so a decode step has fixed shapes, never syncs with the host, and
        can be captured in a CUDA graph: ``generate`` compiles its decode steps on CUDA, or compile
        ``model.forward`` yourself with ``mode="reduce-overhead"``. Call it after `compress`; the cache cannot be
        re-compressed or grow its batch afterwards. Sliding-window layers (Gemma3) keep their window in fixed buffers;
        they need a context at least as long as the window.

        Compile once: the tail's room is ``max_new_tokens`` rounded up to a multiple of 64, and what a decode step
        sees of the context depends only on its length bucket (`length_bucket`, the next power of two: it bounds the
        segments' lengths for the kernels' grids and sets the mask's width; the number of kept pairs is a dynamic
        dimension; the length itself is on the device). A second document whose
        lengths fall in the same buckets, made static with the same ``max_new_tokens`` and batch, reuses the compiled
        decode graph of the first.
        """
        if not self.is_compressed:
            raise RuntimeError(
                "make_static() needs a compressed cache: call cache.compress(...) first (ratio=1.0 keeps every pair)"
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int (question + answer tokens); got {max_new_tokens!r}")
        if self.decode_eviction is not None:
            raise RuntimeError(_STATIC_DECODE_EVICTION)
        capacity = -(-max_new_tokens // _TAIL_BUCKET) * _TAIL_BUCKET
        for layer in self.layers:  # every check first, so that a refusal leaves the cache as it was
            layer.check_static(capacity)
        for layer in self.layers:
            layer.make_static(capacity)

    def _check_room(self, new_tokens: int) -> None:
        layer = self.layers[self._first_full]
        room = layer.tail_keys.shape[2] - int(layer.tail_end)
        if new_tokens > room:
            raise ValueError(
                f"the static cache has room for {room} more tokens after the context, and this step adds "
                f"{new_tokens}; call cache.rollback() between questions, or make_static() with a larger max_new_tokens"
            )

    # --------------------------------------------------------------------------------------- eviction while decoding
    def evict_while_decoding(self, model, predictor: ScorePredictor | None = None, ratio: float | None = None, *,
                             window: int = 128, level: str = "pair") -> None:
        """Bound the tail too: keep only ``ratio`` of the tokens appended after the context (question, answer,
        later turns), chosen by a trained score predictor as the answer grows. ``evict_while_decoding(None)`` turns
        it off (what was evicted stays evicted until `rollback`).

        Before each forward pass, once the tail holds ``2 * window`` tokens, its oldest ``window`` tokens (a multiple
        of ``window`` after a long question) are scored by ``predictor``; the top ``ratio`` of their pairs (``level``:
        one budget per row over layers x heads x tokens, or ``"pair-uniform"``: the same share per head) move into
        the ragged store and the rest is freed. The newest ``window`` tokens always stay. Works with
        ``model.generate`` (greedy, sampling, stop tokens; left-padded batches built with `inputs_for`), multi-turn
        use and `rollback`, which returns to the compressed context. Not with `make_static` (eviction changes the
        context's size, which a compiled step fixes), nor with rows repeated for shared questions or beams.

        Args:
            model: the model that filled the cache (its rotary embedding undoes RoPE for the predictor).
            predictor: a `ScorePredictor` for this model.
            ratio: fraction of the appended pairs kept, in (0, 1].
            window: tokens per eviction, and the recent tokens always kept.
            level: ``"pair"`` or ``"pair-uniform"``.
        """
        if model is None:
            self.decode_eviction = None
            return
        self._check_parallel(model, "evict_while_decoding()", ratio, window, level)
        check_model(model)
        self._check_same_model(model, "evict_while_decoding()")
        if not self.is_compressed:
            raise RuntimeError(
                "evict_while_decoding() needs a compressed cache (the answer joins the ragged store): call "
                "cache.compress(...) first (ratio=1.0 keeps every context pair)"
            )
        if self.is_static:
            raise RuntimeError(_STATIC_DECODE_EVICTION)
        if any(self.layers[idx].owner not in (None, owner)
               for idx, owner in attention_module_ids(model).items() if idx in self.compressible_layers):
            raise ValueError("evict_while_decoding() got another model object than the one that filled this cache: "
                             "pass that model (a copy takes the cache over by cache.compress(copy, ratio))")
        if predictor is None:
            raise ValueError("evict_while_decoding() needs predictor=ScorePredictor.from_pretrained(...) (or train "
                             "one with ScorePredictor.train(model, tokenizer))")
        _check_predictor(model, predictor)
        ratio = _check_ratio(ratio)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive number of tokens; got {window!r}")
        if level not in ("pair", "pair-uniform"):
            raise ValueError(f"evict_while_decoding() selects pairs: level must be 'pair' or 'pair-uniform', got "
                             f"{level!r}")
        first = self.layers[self.compressible_layers[0]]
        if first.tail_length and len(first.src_rows) > 1:
            raise RuntimeError(
                "evict_while_decoding() on a batch must start before the questions (it learns their padding from "
                "cache.inputs_for): call cache.rollback() first"
            )
        # (one row mid-conversation: the tail holds no padding, so every token in it is real)
        self.decode_eviction = DecodeEviction(self, model, predictor, ratio, window, level)

    # ------------------------------------------------------------------------------------------------ queries
    def rollback(self) -> None:
        """Drop every token appended after the context (question and answer) so the next question starts clean.

        Without it, turns accumulate (multi-turn chat). The batch rows return to those of the prefill.
        """
        if self.input_ids is None:
            raise RuntimeError("rollback() needs a prefilled cache")
        for layer in self.layers:
            layer.rollback(self.context_length, self.input_ids.shape[0])
        if self.decode_eviction is not None:
            self.decode_eviction.restart(self)

    def inputs_for(self, query_ids: torch.Tensor, query_mask: torch.Tensor | None = None,
                   shared: bool = False) -> dict[str, torch.Tensor]:
        """``generate`` inputs for questions after the context: ``{"input_ids", "attention_mask"}``.

        ``query_ids``: ``[B, n]`` left-padded (`encode_queries`); ``query_mask`` is its padding mask.

        - ``shared=False``: one question per context row (B = the prefill's rows; ``[1, n]`` is broadcast).
        - ``shared=True``: several questions per stored context, answered together. With C context rows, B must be
          ``C * R``: rows ``c * R .. c * R + R - 1`` ask about context ``c``. The cache's rows are repeated R times
          without copying the context (only each row's tail, and Gemma3's small sliding windows, are per row), and
          every decode step reads each context once for its R rows. Needs a compressed cache (``ratio=1.0`` keeps
          every pair); `rollback` returns to the C rows, except for a static cache, whose batch is fixed (make it
          static after this call, and ask the next R questions the same way).
        """
        if self.input_ids is None:
            raise RuntimeError("inputs_for() needs a prefilled cache")
        rows = self.input_ids.shape[0]
        query_ids = query_ids.to(self.input_ids.device)
        if query_ids.dim() != 2:
            raise ValueError(f"query_ids must be [batch, tokens]; got shape {tuple(query_ids.shape)}")
        context_ids, context_mask = self.input_ids, self.attention_mask.long()
        if shared:
            repeats = self._share_rows(query_ids.shape[0])
            context_ids = context_ids.repeat_interleave(repeats, dim=0)
            context_mask = context_mask.repeat_interleave(repeats, dim=0)
        elif query_ids.shape[0] == 1 and rows > 1:
            query_ids = query_ids.expand(rows, -1)
        if query_ids.shape[0] != context_ids.shape[0]:
            raise ValueError(
                f"query_ids has {query_ids.shape[0]} rows but the cache holds {rows} contexts; pass one question per "
                "context, or several per context with shared=True"
            )
        if query_mask is None:
            query_mask = torch.ones_like(query_ids)
        query_mask = query_mask.to(self.input_ids.device).long().expand_as(query_ids)
        self.pending_query_mask = query_mask.bool()
        mask = torch.cat([context_mask, query_mask], 1)
        return {"input_ids": torch.cat([context_ids, query_ids], dim=1), "attention_mask": mask}

    def _share_rows(self, batch: int) -> int:
        """Lay the cache's rows out for ``batch`` shared questions (R per context row); return R. Changes nothing
        when it refuses."""
        contexts = self.input_ids.shape[0]
        if not self.is_compressed:
            raise RuntimeError(
                "shared=True needs a compressed cache (the context is stored once and read by every question): "
                "call cache.compress(...) first (ratio=1.0 keeps every pair)"
            )
        if batch < 1 or batch % contexts:
            raise ValueError(
                f"{batch} questions for {contexts} stored contexts: shared=True takes the same number R of questions "
                f"per context, rows c*R .. c*R+R-1 asking about context c (pad with a repeated question if needed)"
            )
        repeats = batch // contexts
        layer = self.layers[self._first_full]
        current = layer.src_rows
        wanted = tuple(row for row in range(contexts) for _ in range(repeats))
        if current == wanted:
            return repeats  # already laid out (a static cache, or a second call before generate)
        if current != tuple(range(contexts)) or int(layer.get_seq_length()) != self.context_length:
            raise RuntimeError(
                f"the cache serves {len(current)} rows with tokens after the context; call cache.rollback() before "
                "asking new questions" + (" (a static cache's batch is fixed: ask as many questions per context as "
                                           "when it was made static)" if self.is_static else "")
            )
        if repeats > 1:
            self.batch_repeat_interleave(repeats)
        return repeats

    # ------------------------------------------------------------------------------------------ save / load
    def save(self, path, *, scores: bool = True):
        """Write this compressed cache to one safetensors file at ``path`` (atomically); returns the path.

        The file holds the kept pairs exactly (plus the context ids, masks, scores and keep mask) and is about
        ``kv_bytes()`` large; ``KVzipCache.load(path, model)`` restores it in any process. Call it after
        `compress` and before asking questions (or after `rollback`). ``scores=False`` leaves the scores out
        (smaller; the loaded cache cannot be re-compressed). See `kvzip_cache.persistence`.
        """
        return save_cache(self, path, scores=scores)

    @classmethod
    def load(cls, path, model, device=None, dtype: torch.dtype | None = None, verify: bool = True) -> KVzipCache:
        """A cache restored from a file written by `save`, for ``model`` (the one that compressed it).

        ``device`` (default: the model's) and ``dtype`` (default: the saved one) say where the keys and values go.
        Refuses, naming the mismatch, a file for another model, of a newer format, truncated or corrupted
        (``verify`` checks every tensor's CRC-32). The loaded cache behaves as the saved one: ``generate``,
        `rollback`, a second `compress` at a smaller ratio, `make_static`.
        """
        check_model(model)
        cache = cls(model)
        load_cache(cache, path, model, device=device, dtype=dtype, verify=verify)
        cache._bind_model(model)
        return cache

    # ------------------------------------------------------------------------------------------------ scoring
    @contextmanager
    def scoring_pass(self, row: int, chunk: tuple[int, int], prefix_positions: torch.Tensor, buffers: dict,
                     query_norms: dict | None = None):
        """Within this block, forward passes store nothing and full layers write scores into ``buffers``.

        ``buffers``: {layer: [H, chunk_len] float32}; a full layer missing from it computes no score.
        ``query_norms``: {layer: [n] float32 ||h_t||} for KVzip+ scores (see `ScoringKV`), or None for KVzip.
        """
        self._scoring = {"row": row, "chunk": chunk, "prefix_positions": prefix_positions, "buffers": buffers,
                         "query_norms": query_norms or {}}
        try:
            yield
        finally:
            self._scoring = None


def _layer_state(layer) -> tuple:
    """What a layer's `evict` replaces; compare with `_same_state` (an evict that failed early changed none of it)."""
    return tuple(getattr(layer, name, None) for name in ("keys", "values", "context", "context_length", "src_rows"))


def _same_state(a: tuple, b: tuple) -> bool:
    return all(x is y for x, y in zip(a[:3], b[:3])) and a[3:] == b[3:]  # tensors by identity, lengths by value


def _add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(note)


def _head_score_tensor(model, head_scores):
    """The ``[num_layers, num_kv_heads]`` tensor of ``head_scores``; a `HeadScores` is checked against the model."""
    if isinstance(head_scores, HeadScores):
        head_scores.check(model)
        return head_scores.scores
    return head_scores


def _check_predictor(model, predictor) -> None:
    if not isinstance(predictor, ScorePredictor):
        raise TypeError(
            f"predictor must be a ScorePredictor (e.g. ScorePredictor.from_pretrained(...)), got {type(predictor).__name__}"
        )
    predictor.check(model)


def _check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"ratio is the fraction of context pairs KEPT and must be in (0, 1]; got {ratio!r}")
    return float(ratio)


def check_model(model) -> None:
    """Raise a clear error unless ``model`` runs its attention through "kvzip"."""
    config = getattr(model, "config", None)
    if config is None or not callable(model):
        raise TypeError(f"expected a transformers model, got {type(model).__name__}")
    if not uses_kvzip_attention(config):
        current = getattr(config.get_text_config(decoder=True), "_attn_implementation", None)
        raise ValueError(
            f"the model uses attn_implementation={current!r}; KVzipCache needs the kvzip attention: `import "
            f"kvzip_cache`, then load with from_pretrained(..., attn_implementation={ATTN_IMPLEMENTATION!r}) or call "
            f"model.set_attn_implementation({ATTN_IMPLEMENTATION!r})"
        )


def _load_tokenizer(model):
    from transformers import AutoTokenizer

    name = getattr(model.config, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as error:  # noqa: BLE001 - any failure means the same thing to the user
        raise ValueError(
            f"compress() needs the model's tokenizer to build the reconstruction prompts and could not load it from "
            f"model.config.name_or_path={name!r} ({error}); pass tokenizer=..."
        ) from error
