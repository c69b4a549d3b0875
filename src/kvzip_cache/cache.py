"""`KVzipCache`: a transformers `Cache` that compresses its context once and serves many questions.

Life cycle::

    cache = KVzipCache(model)
    cache.prefill(model, input_ids, context_start=prefix_len)   # dense, chunked
    cache.compress(model, ratio=0.3, tokenizer=tok)              # score by reconstruction, evict for real
    model.generate(full_ids, cache=cache, ...)                    # appends question + answer to a dense tail
    cache.rollback()                                              # drop them; the next question starts clean

Any scorer (`kvzip_cache.scorers`) takes the reconstruction pass's place: ``compress(model, 0.3, scorer="snapkv")``,
a `ScorePredictor`, `HeadScores`, or an object of your own. Layer scorers also evict while prefilling
(``prefill(..., scorer=s, ratio=r)``: the full cache never exists) and while decoding
(``evict_while_decoding(model, s, ratio)``: long answers stay bounded; see `kvzip_cache.eviction`).

Sequences are in padded coordinates (left padding when batch > 1). Positions before ``context_start`` are the
protected prefix: never scored, never evicted. Padding is never kept. The shared refusals live in `kvzip_cache.checks`
(the rest are raised by the call they guard, before anything changes); every keep mask reaches the layers through
`KVzipCache.keep_pairs`.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from .checks import (STATIC_DECODE_EVICTION, agree_on_checks, check_architecture, check_batch, check_kv_dtype,
                     check_level, check_model, check_model_object, check_nothing_appended, check_prefill_inputs,
                     check_ranks, check_ratio, check_recompress, check_rescore, check_rows_as_prefilled,
                     check_static_room, check_token_ids, check_tokenizer, check_unmasked_padding, check_weights,
                     check_whole_forwards, check_window, dense_rows_changed_error, no_new_tokens_error)
from .compat import cache_kwarg
from .config import FULL, config_fields, config_fingerprint, layer_types, text_config
from .eviction import (BUDGETS, DecodeEviction, EvictBetweenSteps, PrefillEviction, position_ids,
                       static_tail_room)
from .fingerprints import attention_module_ids, weight_digests
from .layers import KVzipLayer, KVzipSlidingLayer, compact_tails, sync_static_lengths
from .parallel import TensorParallel, tensor_parallel_of
from .head_scores import HeadScores
from .persistence import SavedContext, read_cache, save_cache
from .scorers.base import ContextScorer, LayerScorer, PrefilledContext, score_context_by_layers, scorer_level
from .scorers.predictor import ScorePredictor
from .scorers.reconstruction import RECONSTRUCTION_TARGETS
from .scorers.registry import resolve_scorer, scorer_label, scores_kept_pairs
from .selection import LEVELS, select
from .views import ScoringPass

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
        scorer: where the scores came from (``cache.score_source``).
    """

    level: str
    ratio: float
    achieved_ratio: float
    kept_per_layer: list[int]
    bytes_before: int
    bytes_after: int
    metadata_bytes: int
    seconds: float
    scorer: str = "kvzip"

    def __str__(self) -> str:
        return (
            f"KVzip {self.level} ratio={self.ratio:g} ({self.scorer} scores): kept {self.achieved_ratio:.3f} of "
            f"context pairs, KV {self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB in "
            f"{self.seconds:.2f}s"
        )


# Static tails are sized in multiples of this, so that nearby max_new_tokens share a compiled graph; small, because
# every row of a shared batch holds its own tail (64 rows x 32 + 32 tokens: 80 slots a row instead of 128).
_TAIL_BUCKET = 16


class KVzipCache(Cache):
    """A transformers `Cache` with KVzip compression. See the module docstring for the life cycle.

    Args:
        model_or_config: the model (loaded with ``attn_implementation="kvzip"``) or its config.

    Attributes:
        input_ids: ``[B, S]`` the prefilled ids (padded coordinates).
        attention_mask: ``[B, S]`` bool, False on left padding.
        context_start: ``[B]`` int64, first context position of each row.
        scores: ``[L, B, H, S - min(context_start)]`` float32 scores after `compress` (NaN = not scored).
        keep_mask: same shape, bool, the context pairs kept by the last `compress`/`evict`.
        score_source: the scorer the scores came from (``"kvzip"``, ``"kvzip+"``, ``"predicted"``, ``"head"``, a
            registered name or a scorer's ``name``).
        weight_digests: a sample of the prefilling model's weights (`kvzip_cache.fingerprints.weight_digests`).
        tokenizer_fields: the tokenizer the context was scored with (`kvzip_cache.fingerprints.tokenizer_fields`).

    `prefill` sets the first three and the weight digests; `compress` and `evict` set the scores and the mask.

    What the cache checks (`kvzip_cache.checks`; each refusal names the fix): the architecture (config fingerprint)
    at `prefill`, `compress` and `load`; the weights (a sample, so another fine-tune of the same architecture is
    refused) at `compress` and `load`; the tokenizer at `compress` when one is passed or loaded; the model object at
    ``generate`` from a compressed cache (by identity of its attention modules, recorded at `prefill`, `compress`
    and `load`, so no host sync: another model object, even an identical copy that did not compress or load the
    cache, is refused; `evict` takes no model and keeps the recorded one). A cache prefilled but not compressed is
    as a `DynamicCache` and is not checked at ``generate``. An interrupted `prefill` (out of memory,
    KeyboardInterrupt) resets the cache to empty; an interrupted scoring pass leaves it exactly as it was; an
    eviction interrupted after some layers evicted resets it. The exception is re-raised with a note saying which.
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
            KVzipLayer() if kind == FULL else KVzipSlidingLayer(sliding_window=config.sliding_window)
            for kind in self.layer_types
        ]
        super().__init__(layers=layers)
        self._first_full = self.layer_types.index(FULL) if FULL in self.layer_types else -1
        self._clear_context()

    def _clear_context(self) -> None:
        self.input_ids: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        self.context_start: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.keep_mask: torch.Tensor | None = None
        self.compressed_with: tuple[str, float] | None = None
        self.score_source: str | None = None
        self.kv_dtype: torch.dtype | None = None  # how kept pairs are stored: None, the model's dtype; or fp8
        # What filled this context besides the architecture (see `kvzip_cache.fingerprints`): a sample of the
        # model's weights (recorded by prefill) and the tokenizer that scored it (recorded by compress).
        self.weight_digests: dict[str, int] | None = None
        self.tokenizer_fields: dict | None = None
        self._scoring_pass: ScoringPass | None = None  # set while a reconstruction pass runs (`scoring_pass`)
        self.decode_eviction: DecodeEviction | None = None  # set by evict_while_decoding()
        # [B, n] bool padding mask of the last question built by inputs_for (tells DecodeEviction its padding)
        self.pending_query_mask: torch.Tensor | None = None
        # Whether beams, batch_repeat_interleave or batch_select_indices changed the rows of a cache never compressed:
        # its dense layers then hold rows that no longer match input_ids (a compressed layer tracks its src_rows).
        self._dense_rows_changed = False

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def compressible_layers(self) -> list[int]:
        """Indices of the full-attention layers (the only ones scored and evicted)."""
        return [i for i, kind in enumerate(self.layer_types) if kind == FULL]

    @property
    def local_kv_heads(self) -> int:
        """KV heads per layer cached by this process (``num_kv_heads`` over the tensor-parallel size)."""
        tp = self.tensor_parallel
        return self.num_kv_heads if tp is None else tp.local_kv_heads

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

    @property
    def is_static(self) -> bool:
        """Whether `make_static` was called: fixed shapes, lengths on the device, ready for torch.compile."""
        return self.is_compressed and self.layers[0].is_static

    def kv_bytes(self) -> int:
        """Bytes allocated for keys and values over all layers (spare tail capacity counts)."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def metadata_bytes(self) -> int:
        """Bytes of the ragged layout's bookkeeping (per-pair positions, per-head offsets)."""
        return sum(layer.metadata_bytes() for layer in self.layers)

    def selectable_pairs(self) -> torch.Tensor:
        """``[L, B, H, C]`` bool, the layout of `scores` and `keep_mask`: the context pairs that compete for the budget
        (full-attention layers, real tokens after the protected prefix). A custom selection for `evict` keeps a
        subset of them; ``cache.evict(cache.selectable_pairs())`` keeps every pair and makes the layers ragged."""
        base = self.context_offset
        positions = torch.arange(base, self.context_length, device=self.attention_mask.device)
        in_context = positions[None, :] >= self.context_start[:, None]  # [B, C]
        valid = in_context & self.attention_mask[:, base:]
        full = torch.tensor([kind == FULL for kind in self.layer_types], device=valid.device)
        return full[:, None, None, None] & valid[None, :, None, :].expand(-1, -1, self.num_kv_heads, -1)

    # ---------------------------------------------------------------------------------------- transformers API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        record = self._scoring_pass
        if record is not None:
            return layer.peek(key_states, value_states, record.row, record.chunk, record.prefix_positions,
                              record.scores_out.get(layer_idx), query_norms=record.query_norms.get(layer_idx))
        if layer_idx == 0 and not torch.compiler.is_compiling():  # once per eager forward, before any layer appends
            if not self.is_static:  # a static cache's lengths live on the device: no host sync per step
                check_whole_forwards({layer.cumulative_length for layer in self.layers})
            self._check_forward_batch(key_states.shape[0])
            if self.decode_eviction is not None:
                self._evict_tail(key_states.shape[-2], key_states.shape[0])
            if self.is_static:  # before any layer writes (a sliding layer 0 would write its slots first)
                self._check_static_room(key_states.shape[-2])
        return layer.update(key_states, value_states)

    def _check_static_room(self, new_tokens: int) -> None:
        check_static_room(self.static_room(), new_tokens)

    def evict_between_steps(self, batch: int | None = None, check_room: bool = True) -> None:
        """Run eviction while decoding now, if the tail is due, as the next one-token forward would: the hook of a
        static cache under compiled decoding, whose steps run no Python (a replayed CUDA graph). `generate` calls
        it through `eviction_criteria`; a hand-written loop calls it before each compiled step. Then (``check_room``)
        checks that the next token fits the static tail."""
        if self.decode_eviction is not None:
            self._evict_tail(1, len(self.layers[self._first_full].src_rows) if batch is None else batch)
        if check_room and self.is_static:
            self._check_static_room(1)

    def static_room(self) -> int | None:
        """Tokens a static cache's tail can still take (None for a dynamic cache): the full layers' tail, and with
        eviction while decoding the sliding layers' buffers too (their window moves to the front at each eviction).
        Reads the device on the host."""
        if not self.is_static:
            return None
        first = self.layers[self._first_full]
        rooms = [first.tail_keys.shape[2] - int(first.tail_end)]
        rooms += [layer.slot_room() for layer in self.layers if layer.is_sliding and layer.slot_valid is not None]
        return min(rooms)

    def eviction_criteria(self):
        """A `transformers.StoppingCriteria` that runs eviction while decoding after each step:
        ``model.generate(..., stopping_criteria=[cache.eviction_criteria()])`` keeps evicting while `generate`
        replays compiled decode steps (a static cache made with eviction while decoding on). It stops generation
        only if the static tail is full (with a warning: `make_static` with a larger ``max_new_tokens``), where a
        compiled step would otherwise write past it. Eager decoding needs none (the cache evicts at the start of each
        forward); it does no harm there."""
        return EvictBetweenSteps(self)

    def _check_forward_batch(self, batch: int) -> None:
        """Refuse a forward whose batch differs from the cached rows before the first layer runs: transformers'
        sliding layer counts the new tokens before its concatenation fails, so a later refusal would leave it
        longer than it is (found by the call-order state machine)."""
        first = self.layers[0]
        if getattr(first, "context", None) is not None:
            check_batch(batch, len(first.src_rows))
        elif getattr(first, "keys", None) is not None and first.keys.numel():
            check_batch(batch, first.keys.shape[0])

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

    def crop(self, tokens_to_remove: int) -> None:
        """Drop tokens from the end (``-n`` removes n), in every layer or in none: each layer checks first."""
        for layer in self.layers:
            layer.check_crop(tokens_to_remove, self.context_length)
        super().crop(tokens_to_remove)
        if self.decode_eviction is not None:  # the padding it knew of may have been cut with the tail
            self.decode_eviction.after_crop(self)

    # Batch changes (generate calls them for beams and num_return_sequences): the layers change their rows; the cache
    # remembers when the rows of a never-compressed cache no longer match its input_ids.
    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._dense_rows_changed |= not self.is_compressed and repeats != 1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._check_static_batch(len(beam_idx), "reorder_cache()")
        super().reorder_cache(beam_idx)
        self._dense_rows_changed |= not self.is_compressed

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._check_static_batch(len(torch.as_tensor(indices).flatten()), "batch_select_indices()")
        super().batch_select_indices(indices)
        self._dense_rows_changed |= not self.is_compressed

    def _check_static_batch(self, rows: int, call: str) -> None:
        batch = len(self.layers[self._first_full].src_rows) if self.is_static else rows
        if rows != batch:
            raise RuntimeError(f"a static cache has a fixed batch of {batch} rows; {call} asked for {rows}: select "
                               "rows before cache.make_static()")

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        # query_length first: a compiled step (1 new token) must not read the context's length
        if isinstance(query_length, int) and query_length == 0 and self.input_ids is not None:
            raise no_new_tokens_error(self.context_length)
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
        scorer=None,
        ratio: float | None = None,
        level: str | None = None,
        head_scores=None,
        predictor=None,
        budget: str = "chunk",
        kv_dtype=None,
    ) -> None:
        """Fill the cache with ``[protected prefix | context]``, ``chunk_size`` tokens per forward pass.

        With a layer ``scorer`` and ``ratio``, the cache is compressed while it is filled: after every chunk, the
        scorer rates the chunk's context pairs and only ``ratio`` of them stay (``level``: one top-k per row over
        layers x heads x the chunk's positions for ``"pair"``, per (layer, head) for ``"pair-uniform"``, whole heads
        for ``"head"``; default: the scorer's level); the rest is freed before the next chunk runs, so the full cache
        never exists (peak ~ ratio x full KV + one chunk). Each chunk attends to itself and to what the earlier
        chunks kept, so later hidden states differ from a prefill that compresses afterwards (with head scores, the
        dropped heads already see only the protected prefix and their own chunk, as DuoAttention's streaming heads
        see only their window). The result is a cache compressed at ``level`` with the chunks' scores.

        Args:
            model: the causal LM, loaded with ``attn_implementation="kvzip"``.
            input_ids: ``[B, S]``; left-padded when B > 1.
            attention_mask: ``[B, S]`` (1 = token, 0 = left padding), or None for no padding.
            context_start: first context position (an int, or ``[B]`` in padded coordinates); earlier positions
                are the protected prefix.
            chunk_size: tokens per forward pass (bounds activation memory).
            scorer: a layer scorer (`kvzip_cache.scorers.base.LayerScorer`): a `ScorePredictor`, `HeadScores`, a
                registered name such as ``"keydiff"`` or ``"predicted"``, or your own object.
            ratio: with ``scorer``, the fraction of each chunk's context pairs kept (of the heads, at level "head").
            level: with ``scorer``: the selection within each chunk; default the scorer's ``level``.
            head_scores: the same as ``scorer=head_scores`` (drops whole heads chunk by chunk).
            predictor: the same as ``scorer=predictor``.
            budget: with ``scorer``: ``"chunk"``: each chunk keeps ``ratio`` of its own pairs; ``"carry"``: after
                each chunk, ``ratio`` of all pairs seen so far are re-selected among those still held, so budget moves
                from sparse chunks to dense later ones (pair levels; `kvzip_cache.eviction`). Same memory bound.
            kv_dtype: with ``scorer``: ``"fp8"`` stores the kept pairs as float8 e4m3 with a scale per pair (see
                `compress`); default: the model's dtype.
        """
        spec = _one_scorer("prefill()", scorer=scorer, predictor=predictor, head_scores=head_scores)
        check_ranks(self.tensor_parallel, model, "prefill()", input_ids, context_start, chunk_size, ratio, str(level),
                    scorer_label(spec), budget, str(kv_dtype))
        mask, starts = agree_on_checks(self.tensor_parallel, model, "prefill()",
                                       lambda: self._check_prefill(model, input_ids, attention_mask, context_start,
                                                                   chunk_size))
        eviction = self._prefill_eviction(model, spec, ratio, level, mask, starts, budget)
        if kv_dtype is not None and eviction is None:
            raise ValueError("prefill(kv_dtype=...) sets how the pairs kept while prefilling are stored: pass scorer= "
                             "and ratio= too, or give kv_dtype to compress() after a plain prefill")
        kv_dtype = _storage_dtype(kv_dtype, model, "prefill()")
        digests = weight_digests(model)
        self.kv_dtype = kv_dtype  # the eviction after each chunk stores the kept pairs so (a reset clears it)
        try:
            for lo in range(0, input_ids.shape[1], chunk_size):
                hi = min(lo + chunk_size, input_ids.shape[1])
                self._forward(model, input_ids, mask, lo, hi)
                if eviction is not None:
                    eviction.after_chunk(self, lo, hi)
            self._take_context(model, input_ids, mask, starts, digests)
            if eviction is not None:  # the layers hold the kept pairs already; record what compress would have
                eviction.finish(self)
                self.scores, self.keep_mask = eviction.scores, eviction.keep_mask
                self.compressed_with, self.score_source = (eviction.level, eviction.ratio), scorer_label(spec)
        except BaseException as error:  # out of memory, KeyboardInterrupt, ...: never a half-filled cache
            self.reset()
            hint = ", e.g. with a smaller chunk_size" if isinstance(error, torch.OutOfMemoryError) else ""
            _add_note(error, "KVzipCache.prefill() did not finish: the cache was reset to empty (nothing of this "
                             f"prefill is kept); call prefill() again{hint}")
            raise

    def _prefill_eviction(self, model, spec, ratio, level, mask, starts, budget) -> PrefillEviction | None:
        """The per-chunk eviction step of a prefill with a scorer (None without one); checks its arguments first."""
        if budget not in BUDGETS:
            raise ValueError(f"prefill(budget={budget!r}): choose one of {BUDGETS}")
        if spec is None and ratio is None:
            if budget != "chunk":
                raise ValueError("prefill(budget=...) applies to eviction while prefilling: pass scorer= and ratio= too")
            return None
        if spec is None:
            raise ValueError("prefill(ratio=...) evicts while filling and needs scorer=...: a layer scorer such as a "
                             "ScorePredictor, HeadScores or 'keydiff' (or leave ratio out and compress afterwards)")
        if ratio is None:
            raise ValueError("prefill(scorer=...) needs ratio=...: the fraction of context pairs kept")
        ratio = check_ratio(ratio)
        if not self.compressible_layers:
            raise ValueError("every layer of this model uses sliding-window attention: there is nothing to evict")
        scorer = _layer_scorer(resolve_scorer(spec, model), "prefill()")
        level = check_level(level or scorer_level(scorer), LEVELS, "prefill()")
        if budget == "carry" and level == "head":
            raise ValueError("prefill(budget='carry') re-selects pairs across chunks; at level 'head' use "
                             "budget='chunk'")
        return PrefillEviction(scorer, ratio, level, mask, starts, len(self.layers), self.num_kv_heads,
                               self.compressible_layers, self.tensor_parallel, budget)

    def _forward(self, model, input_ids: torch.Tensor, mask: torch.Tensor, lo: int, hi: int) -> None:
        """One prefill forward of positions ``[lo, hi)``, attending to everything cached before them."""
        model(
            input_ids=input_ids[:, lo:hi],
            attention_mask=mask[:, :hi].long(),
            position_ids=position_ids(mask[:, :hi]).clamp(min=0)[:, lo:],  # what generate() derives from the mask
            use_cache=True,
            logits_to_keep=1,
            **{cache_kwarg(model): self},
        )

    def _check_prefill(self, model, input_ids, attention_mask, context_start, chunk_size):
        """Refuse a prefill that cannot run (before anything changes); return the padding mask and context starts."""
        check_model(model)
        check_architecture(self.fingerprint, self.config_fields, model, "prefill()")
        if self.get_seq_length() > 0 or self.input_ids is not None:
            raise RuntimeError("prefill() needs an empty cache: create a new KVzipCache or call cache.reset() first")
        mask, starts = check_prefill_inputs(input_ids, attention_mask, context_start, chunk_size)
        check_unmasked_padding(input_ids, attention_mask, _pad_token_id(model))
        return mask, starts

    def _check_decode_eviction(self, model) -> None:
        """Refuse eviction while decoding on a cache or with a model it cannot serve (before anything changes)."""
        check_model(model)
        check_architecture(self.fingerprint, self.config_fields, model, "evict_while_decoding()")
        if not self.is_compressed:
            raise RuntimeError(
                "evict_while_decoding() needs a compressed cache (the answer joins the ragged store): call "
                "cache.compress(...) first (ratio=1.0 keeps every context pair)"
            )
        if self.is_static:
            raise RuntimeError(STATIC_DECODE_EVICTION)
        check_model_object({idx: self.layers[idx].owner for idx in self.compressible_layers}, model,
                           "evict_while_decoding()")

    def _take_context(self, model, input_ids, mask, starts, digests) -> None:
        """Record the prefilled context and what filled it; snapshot the sliding windows for `rollback`."""
        self.input_ids, self.attention_mask, self.context_start = input_ids, mask, starts
        self.weight_digests = digests
        self._bind_model(model)
        for layer in self.layers:
            if isinstance(layer, KVzipSlidingLayer):
                layer.take_snapshot()

    def _bind_model(self, model) -> None:
        """Record ``model``'s attention modules in the full layers: a compressed layer then refuses to run under
        another model object (`RaggedKV.owner`), which would otherwise decode garbage silently."""
        owners = attention_module_ids(model)
        for idx in self.compressible_layers:
            self.layers[idx].owner = owners.get(idx)

    # ------------------------------------------------------------------------------------------------ compress
    @torch.no_grad()
    def compress(
        self,
        model,
        ratio: float,
        *,
        scorer=None,
        tokenizer=None,
        level: str | None = None,
        chunk_size: int = 2048,
        head_scores=None,
        predictor=None,
        score: str | None = None,
        progress: bool = False,
        kv_dtype=None,
    ) -> CompressReport:
        """Score the context and evict all but ``ratio`` of its pairs, for real.

        Args:
            model: the model the cache was prefilled with.
            ratio: fraction of context pairs KEPT, in (0, 1] (at level ``"head"``: of the compressible heads).
            scorer: what rates the pairs (`kvzip_cache.scorers`): a registered name (``"kvzip"``, the default, and
                ``"kvzip+"``, ``"predicted"``, ``"head"``, ``"snapkv"``, ``"h2o"``, ``"streaming"``, ``"random"``,
                ``"keydiff"``, ...), a `ScorePredictor`, `HeadScores`, or an object with ``score_layer`` or
                ``score_context``.
            tokenizer: the model's tokenizer (builds the reconstruction prompts); loaded from
                ``model.config.name_or_path`` when None. Not needed by scorers that do not read text.
            level: ``"pair"`` (one top-k per row over layers x heads x positions), ``"pair-uniform"`` (same
                fraction in every layer and head) or ``"head"`` (whole heads, ranked by their best pair); default:
                the scorer's level (``"pair"`` for KVzip). ``"predicted"`` is ``"pair"`` with ``predictor``.
            chunk_size: context tokens per reconstruction pass.
            head_scores: the same as ``scorer=head_scores`` (level ``"head"``).
            predictor: the same as ``scorer=predictor``: predicted scores, no forward pass at all.
            score: the same as ``scorer=score`` for ``"kvzip"`` or ``"kvzip+"`` (KVzap's KVzip+).
            progress: show a progress bar over the reconstruction passes.
            kv_dtype: how the kept pairs are stored: None (default) keeps the cache's current storage (the model's
                dtype unless an earlier call chose fp8); ``"fp8"`` (or ``torch.float8_e4m3fn``) stores them as float8
                e4m3 with a float32 scale per key and per value (about half of bf16's bytes). Selection happens
                before quantizing: the scores are the same either way. Tokens after the context (question, answer)
                stay in the model's dtype; pairs that eviction while decoding moves into the store are quantized.

        A second `compress` on a compressed cache re-selects among the kept pairs with the stored scores (same
        level, a ratio no larger than before; ratios stay relative to the original context). Naming another
        reconstruction scorer (``scorer="kvzip"`` or ``"kvzip+"``) than the one that compressed it, or any of them on
        a cache compressed without scores (`evict`, a file saved with ``scores=False``), scores the KEPT pairs again
        instead: each reconstruction pass attends to what the cache keeps, and the softmax that rates a chunk runs
        over its kept pairs only. With a prefill that evicted with a predictor at a looser ratio this is exact
        KVzip's choice among the predictor's survivors, within the looser memory bound (docs/score-predictors.md).

        Returns:
            a `CompressReport`.
        """
        started = time.perf_counter()
        if level == "predicted":  # the earlier spelling of scorer=predictor at level "pair"
            if predictor is None:
                raise ValueError("level='predicted' needs predictor=ScorePredictor.from_pretrained(...)")
            level = "pair"
        spec = _one_scorer("compress()", scorer=scorer, predictor=predictor, head_scores=head_scores, score=score)
        check_ranks(self.tensor_parallel, model, "compress()", ratio, str(level), chunk_size,
                    scorer_label(spec), str(kv_dtype))
        ratio, scored_with = agree_on_checks(self.tensor_parallel, model, "compress()",
                                             lambda: self._check_compress(model, ratio, level, tokenizer))
        kv_dtype = _storage_dtype(kv_dtype, model, "compress()")
        bytes_before = self.kv_bytes()
        scores, source, level, scored_with = self._scores_for(model, spec, ratio, level, tokenizer, chunk_size,
                                                              progress, scored_with)
        selectable = self.selectable_pairs()
        keep = self._select(scores, ratio, level, selectable)
        self._evict_context(keep, kv_dtype)
        self._bind_model(model)  # its weights passed the check: an identical copy may take the cache over
        self.scores, self.compressed_with, self.score_source = scores, (level, ratio), source
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
            scorer=source,
        )
        logger.info("%s", report)
        return report

    def _check_compress(self, model, ratio, level: str | None, tokenizer) -> tuple[float, dict | None]:
        """Refuse a compress that cannot run on this cache with these arguments (before anything changes); return
        the ratio and the fields of a passed tokenizer (checked against the recorded one)."""
        ratio = check_ratio(ratio)
        if level is not None:
            check_level(level, LEVELS, "compress()")
        if self.input_ids is None:
            raise RuntimeError("compress() needs a prefilled cache: call cache.prefill(model, input_ids) first")
        check_model(model)
        check_architecture(self.fingerprint, self.config_fields, model, "compress()")
        check_weights(self.weight_digests, model, "compress()")
        if not self.compressible_layers:
            raise ValueError(
                "every layer of this model uses sliding-window attention, so there is nothing KVzip can evict "
                "(transformers treats a config with sliding_window set and no layer_types as all-sliding)"
            )
        check_nothing_appended(int(self.get_seq_length()) - self.context_length, "compress()")
        self._check_rows_as_prefilled("compress()")
        return ratio, check_tokenizer(self.tokenizer_fields, tokenizer) if tokenizer is not None else None

    def _scores_for(self, model, spec, ratio: float, level: str | None, tokenizer, chunk_size: int, progress: bool,
                    scored_with: dict | None) -> tuple[torch.Tensor, str, str, dict | None]:
        """``(scores, source, level, tokenizer fields)`` of a compress: the stored scores on a compressed cache (a
        re-selection: the same source and level, a smaller ratio), else those of the scorer ``spec`` (default
        KVzip), at its level unless ``level`` says otherwise."""
        label = scorer_label(spec) if spec is not None else None
        if self.scores is not None and label in (None, self.score_source):  # a re-selection with the stored scores
            level = check_level(level or self.compressed_with[0], LEVELS, "compress()")
            check_recompress(self.compressed_with, level, ratio)
            return self.scores, self.score_source, level, scored_with
        if self.compressed_with is not None:  # the kept pairs scored again, or refused before a scorer is built
            check_rescore(self.compressed_with, self.score_source, label or "kvzip", ratio,
                          scores_kept_pairs("kvzip" if spec is None else spec))
        scorer = resolve_scorer("kvzip" if spec is None else spec, model, tokenizer=tokenizer, chunk_size=chunk_size,
                                progress=progress)
        level = check_level(level or scorer_level(scorer), LEVELS, "compress()")
        scores = self._score(model, scorer)
        scored_with = self._check_scorer_tokenizer(scorer, tokenizer, scored_with)
        return scores, scorer_label("kvzip" if spec is None else spec), level, scored_with

    def _check_rows_as_prefilled(self, call: str) -> None:
        layer = self.layers[self._first_full] if self._first_full >= 0 else None
        if layer is not None and layer.is_compressed:
            check_rows_as_prefilled(layer.src_rows, self.input_ids.shape[0], call)
        elif self._dense_rows_changed:
            raise RuntimeError(dense_rows_changed_error(call))

    def _check_scorer_tokenizer(self, scorer, tokenizer, scored_with: dict | None) -> dict | None:
        """The fields of the tokenizer a scorer loaded for itself (the reconstruction scorer, from the model's name),
        checked like a passed one (before the eviction: a refusal leaves the cache as it was), else ``scored_with``."""
        loaded = getattr(scorer, "tokenizer", None)
        if tokenizer is None and loaded is not None:
            try:
                return check_tokenizer(self.tokenizer_fields, loaded)
            except ValueError:
                self.release_scoring_room()
                raise
        return scored_with

    def _score(self, model, scorer) -> torch.Tensor:
        """``[L, B, H, C]`` float32 scores of the dense context by ``scorer`` (all KV heads, NaN where not
        selectable). The cache is unchanged afterwards, also when scoring stops (out of memory, KeyboardInterrupt):
        new scores stay local until the eviction, and the room a reconstruction pass reserved is given back."""
        context = self.prefilled_context()
        try:
            if isinstance(scorer, ContextScorer):
                raw = scorer.score_context(model, context)
            else:
                raw = score_context_by_layers(scorer, context)
        except BaseException as error:
            try:
                self.release_scoring_room()
            except Exception:  # noqa: BLE001 - out of memory again: keep the room, report the first error
                pass
            _add_note(error, "KVzipCache.compress() stopped while scoring: the cache is as it was before the call; "
                             "compress again (a smaller chunk_size needs less memory)")
            raise
        if not isinstance(raw, torch.Tensor) or tuple(raw.shape) != context.shape:
            got = tuple(raw.shape) if isinstance(raw, torch.Tensor) else type(raw).__name__
            raise ValueError(f"{type(scorer).__name__}.score_context returned {got}; a context scorer returns "
                             f"[layers, batch, kv_heads, context] = {list(context.shape)}")
        scores = raw.float().to(context.selectable.device)
        if self.tensor_parallel is not None:  # each rank scored its own heads: rank order = head order
            scores = self.tensor_parallel.gather(scores, dim=2)
        scored = context.selectable if context.kept is None else context.selectable & context.kept
        return scores.masked_fill(~scored, float("nan"))

    def _select(self, scores: torch.Tensor, ratio: float, level: str, selectable: torch.Tensor) -> torch.Tensor:
        """The keep mask of a compress: a fresh selection, or a re-selection among the pairs still kept (evicted
        pairs rank last but still count, so ratios stay relative to the context)."""
        if self.keep_mask is None:
            return select(scores, ratio, level)
        ranked = scores.masked_fill(selectable & ~self.keep_mask, float("-inf"))
        return select(ranked, ratio, level) & self.keep_mask

    def prefilled_context(self) -> PrefilledContext:
        """What a scorer may read of this prefilled cache (`kvzip_cache.scorers.base.PrefilledContext`)."""
        if self.input_ids is None:
            raise RuntimeError("scoring needs a prefilled cache: call cache.prefill(model, input_ids) first")
        return PrefilledContext(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            context_start=self.context_start,
            offset=self.context_offset,
            positions=position_ids(self.attention_mask),
            layer_types=tuple(self.layer_types),
            num_kv_heads=self.num_kv_heads,
            selectable=self.selectable_pairs(),
            tensor_parallel=self.tensor_parallel,
            target=self,
            kept=self.keep_mask if self.is_compressed else None,
        )

    # --------------------------------------------------------------------------------------------------- evict
    @torch.no_grad()
    def evict(self, keep_mask: torch.Tensor, kv_dtype=None) -> None:
        """Keep exactly the context pairs where ``keep_mask`` is True (plus the protected prefix), free the rest.

        Args:
            keep_mask: ``[num_layers, batch, num_kv_heads, context_len]`` bool, the layout of `scores`. Entries of
                sliding layers, padding and the protected prefix are ignored. On a compressed cache it may only
                drop more pairs (an evicted pair cannot come back).
            kv_dtype: how the kept pairs are stored, as in `compress`.
        """
        if self.input_ids is None:
            raise RuntimeError("evict() needs a prefilled cache: call cache.prefill(model, input_ids) first")
        check_nothing_appended(int(self.get_seq_length()) - self.context_length, "evict()")
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
        self._evict_context(keep_mask, check_kv_dtype(kv_dtype, selectable.device, "evict()"))
        if self.compressed_with is None:
            self.compressed_with = ("custom", float(keep_mask.sum()) / max(int(selectable.sum()), 1))

    def _evict_context(self, keep_mask: torch.Tensor, kv_dtype: torch.dtype | None = None) -> None:
        """Evict the context down to ``keep_mask`` (``[L, B, H, C]``, selectable pairs only) plus the protected prefix,
        the kept pairs stored as ``kv_dtype`` (None: as they are now).

        An eviction that stops (out of memory, KeyboardInterrupt) before any layer changed leaves the cache as it
        was; one that stops after some layers dropped their pairs resets it: evicted pairs cannot come back, and
        keeping dense copies for a rollback would double the peak memory of every compress."""
        base = self.context_offset
        prefix = self.attention_mask.clone()
        prefix[torch.arange(self.context_length, device=prefix.device)[None, :] >= self.context_start[:, None]] = False
        done, before = 0, None
        try:
            for idx in self.compressible_layers:  # one layer at a time: its dense copy is freed before the next
                keep = prefix[:, None, :].expand(-1, self.num_kv_heads, -1).clone()
                keep[:, :, base:] |= keep_mask[idx]
                before = _layer_state(self.layers[idx])
                self.keep_pairs({idx: keep}, start=0, fp8=(kv_dtype or self.kv_dtype) is not None)
                done, before = done + 1, None
        except BaseException as error:
            if done == 0 and (before is None or _same_state(_layer_state(self.layers[idx]), before)):
                _add_note(error, "KVzipCache: the eviction stopped before any layer changed; the cache is as it was")
            else:
                self.reset()
                _add_note(error, "KVzipCache: the eviction stopped after some layers had dropped their pairs, which "
                                 "cannot be restored; the cache was reset to empty: prefill it again")
            raise
        self.keep_mask = keep_mask
        self.kv_dtype = kv_dtype or self.kv_dtype

    def keep_pairs(self, keeps: dict[int, torch.Tensor], start: int, fp8: bool | None = None,
                   room: bool = False) -> None:
        """The one path by which keep masks reach the layers: every eviction (`compress`, `evict`, a prefill or a
        decoding step that evicts) ends here.

        Args:
            keeps: ``{full layer: [B, H, n] bool}`` over ALL KV heads (this rank's share is taken here): keep the
                pairs of positions ``start .. start + n - 1`` where True, free the others.
            start: ``0``: ``n`` covers everything the layer holds as its context (a dense layer becomes ragged; a
                ragged one keeps a subset); the layer's context length: the tail's oldest ``n`` tokens join the
                ragged store.
            fp8: store what the layers keep as float8 (`CompressedContext.to_fp8`); default: whether the cache
                stores its pairs so (`kv_dtype`). A layer's store that is fp8 already quantizes what joins it.
            room: tail pairs join the ragged store in reserved room, in place (eviction while decoding: O(pairs
                kept) per eviction, not O(context); see `CompressedContext.append`).
        """
        fp8 = self.kv_dtype is not None if fp8 is None else fp8
        if self.tensor_parallel is not None:
            keeps = {idx: self.tensor_parallel.local(keep, dim=1) for idx, keep in keeps.items()}
        packed = [idx for idx in keeps if self.layers[idx].is_static and self.layers[idx].tail_valid is not None]
        if packed:  # a static tail that evicts while decoding: all its layers at once (between two decode steps)
            compact_tails([self.layers[idx] for idx in packed], torch.stack([keeps[idx] for idx in packed]), start)
        for idx, keep in keeps.items():
            layer = self.layers[idx]
            if idx in packed:
                continue
            if layer.is_compressed and start == layer.context_length:
                layer.absorb_tail(keep, keep.shape[-1], room=room)
            elif start == 0:
                layer.evict(keep, fp8=fp8)
            else:
                raise ValueError(f"layer {idx} holds its context up to position {layer.context_length}; a keep mask "
                                 f"from position {start} fits neither its context nor its tail")

    def dense_pairs(self, start: int, count: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{full layer: (keys, values)}``, each ``[B, H, count, D]``, of positions ``start .. start + count - 1``
        that the layers hold densely (a dense layer's context, a compressed layer's tail): what an eviction policy
        rates before it calls `keep_pairs`. Views, not copies."""
        layers = {idx: self.layers[idx] for idx in self.compressible_layers}
        static = [layer for layer in layers.values() if layer.is_compressed and layer.is_static]
        if static:
            sync_static_lengths(static)  # one host read, not one per layer
        return {idx: layer.held_pairs(start, count) for idx, layer in layers.items()}

    # ----------------------------------------------------------------------------------------- compiled decoding
    def make_static(self, max_new_tokens: int) -> None:
        """Make decoding compile-friendly (``is_compileable``): room for ``max_new_tokens`` tokens after the context.

        Every layer preallocates its tail for ``max_new_tokens`` tokens (question plus answer; `rollback` empties it
        again) and keeps its length on the device, so a decode step has fixed shapes, never syncs with the host, and
        can be captured in a CUDA graph: ``generate`` compiles its decode steps on CUDA, or compile
        ``model.forward`` yourself with ``mode="reduce-overhead"``. Call it after `compress`; the cache cannot be
        re-compressed or grow its batch afterwards. Sliding-window layers (Gemma3) keep their window in fixed buffers;
        they need a context at least as long as the window.

        Compile once: the tail's room is ``max_new_tokens`` rounded up to a multiple of 16, and what a decode step
        sees of the context depends only on its length bucket (`length_bucket`, the next power of two: it bounds the
        segments' lengths for the kernels' grids and sets the mask's width; the number of kept pairs is a dynamic
        dimension; the length itself is on the device). A second document whose
        lengths fall in the same buckets, made static with the same ``max_new_tokens`` and batch, reuses the compiled
        decode graph of the first.

        ``generate`` does not know the room: with more ``max_new_tokens`` than the question leaves, its eager steps
        raise at the full tail, and a compiled step would write past it (a device-side assert on CUDA). Pass
        ``stopping_criteria=[cache.eviction_criteria()]`` and generation stops there with a warning instead (with or
        without eviction while decoding).

        With eviction while decoding (call `evict_while_decoding` first, with ``level="pair-uniform"``): the tail
        is sized from the bound eviction keeps, not from ``max_new_tokens``: about ``ratio x max_new_tokens`` packed
        pairs plus ``2 x window`` recent tokens (`static_tail_room`). Evictions pack the kept pairs into the tail's
        front between compiled steps (`KVzipLayer.compact_tail`); pass ``stopping_criteria=[cache.eviction_criteria()]``
        to ``generate``, or call `evict_between_steps` before each step of your own compiled loop. Sliding-window
        layers (Gemma3) move their window to the front of their buffers at each eviction (`compact_window`).
        """
        if not self.is_compressed:
            raise RuntimeError(
                "make_static() needs a compressed cache: call cache.compress(...) first (ratio=1.0 keeps every pair)"
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int (question + answer tokens); got {max_new_tokens!r}")
        if any(self.layers[idx].context_length != self.context_length for idx in self.compressible_layers):
            raise RuntimeError(
                "eviction while decoding moved answer tokens into the compressed context, which a static cache's "
                "rollback could not drop again: call cache.rollback() before make_static()"
            )
        eviction = self.decode_eviction
        tokens = max_new_tokens if eviction is None else self._check_static_eviction(max_new_tokens)
        capacity = -(-tokens // _TAIL_BUCKET) * _TAIL_BUCKET
        for layer in self.layers:  # every check first, so that a refusal leaves the cache as it was
            layer.check_static(capacity)
        evicting = eviction is not None and not self.is_static  # (a static cache stays as it was made)
        for layer in self.layers:
            if not evicting:
                layer.make_static(capacity)
            elif layer.is_sliding:
                layer.make_static(capacity, evicting=True, context_mask=self.attention_mask)
            else:
                layer.make_static(capacity, evicting=True)

    def _check_static_eviction(self, max_new_tokens: int) -> int:
        """The tail's room for a static cache that evicts while decoding; refuses what it cannot serve."""
        eviction = self.decode_eviction
        if self.is_static:
            raise RuntimeError(STATIC_DECODE_EVICTION)
        if eviction.level != "pair-uniform":
            raise ValueError(
                f"make_static() with eviction while decoding needs level='pair-uniform' (every head keeps the same "
                f"share, so fixed buffers bound the answer's pairs); eviction runs with level={eviction.level!r}: "
                f"call cache.evict_while_decoding(model, scorer, ratio, level='pair-uniform') first"
            )
        if any(self.layers[idx].tail_length for idx in self.compressible_layers):
            raise RuntimeError("make_static() with eviction while decoding starts from the compressed context: call "
                               "cache.rollback() first")
        return static_tail_room(max_new_tokens, eviction.ratio, eviction.window)

    # --------------------------------------------------------------------------------------- eviction while decoding
    def evict_while_decoding(self, model, scorer=None, ratio: float | None = None, *, window: int = 128,
                             level: str | None = None, predictor=None) -> None:
        """Bound the tail too: keep only ``ratio`` of the tokens appended after the context (question, answer,
        later turns), chosen by a layer scorer as the answer grows. ``evict_while_decoding(None)`` turns it off
        (what was evicted stays evicted until `rollback`).

        Before each forward pass, once the tail holds ``2 * window`` tokens, its oldest ``window`` tokens (a multiple
        of ``window`` after a long question) are rated by ``scorer``; the top ``ratio`` of their pairs (``level``:
        one budget per row over layers x heads x tokens, ``"pair-uniform"``: the same share per head, ``"head"``:
        whole heads; default the scorer's level) move into the ragged store and the rest is freed. The newest
        ``window`` tokens always stay. Works with ``model.generate`` (greedy, sampling, stop tokens; left-padded
        batches built with `inputs_for`), multi-turn use and `rollback`, which returns to the compressed context.
        With ``level="pair-uniform"`` it also runs under a later `make_static(max_new_tokens=N)`: the kept pairs are
        packed into a fixed tail sized from ``ratio``, ``window`` and N, between compiled steps (`eviction_criteria`,
        `evict_between_steps`; docs/compiled-decoding.md). Not with rows repeated for shared questions or beams.

        Args:
            model: the model that filled the cache (the predictor undoes RoPE with its rotary embedding).
            scorer: a layer scorer: a `ScorePredictor`, `HeadScores`, a registered name (``"predicted"``,
                ``"keydiff"``) or your own object with ``score_layer``.
            ratio: fraction of the appended pairs kept, in (0, 1].
            window: tokens per eviction, and the recent tokens always kept.
            level: the selection within each evicted window; default the scorer's level.
            predictor: the same as ``scorer=predictor``.
        """
        if model is None:
            self.decode_eviction = None
            return
        spec = _one_scorer("evict_while_decoding()", scorer=scorer, predictor=predictor)
        check_ranks(self.tensor_parallel, model, "evict_while_decoding()", ratio, window, str(level),
                    scorer_label(spec))
        agree_on_checks(self.tensor_parallel, model, "evict_while_decoding()",
                        lambda: self._check_decode_eviction(model))
        if spec is None:
            raise ValueError("evict_while_decoding() needs a layer scorer: scorer=ScorePredictor.from_pretrained(...), "
                             "'predicted' (the shipped predictor for this model), 'keydiff', or your own")
        scorer = _layer_scorer(resolve_scorer(spec, model), "evict_while_decoding()")
        ratio = check_ratio(ratio)
        window = check_window(window)
        level = check_level(level or scorer_level(scorer), LEVELS, "evict_while_decoding()")
        first = self.layers[self.compressible_layers[0]]
        pending = self.pending_query_mask
        padded_tail = pending is not None and not bool(pending.all())
        if first.tail_length and (len(first.src_rows) > 1 or padded_tail):
            raise RuntimeError(
                "evict_while_decoding() on a batch, or after a left-padded question, must start before the questions "
                "(it learns their padding from cache.inputs_for): call cache.rollback() first"
            )
        # (one row mid-conversation, its question unpadded: every token in the tail is real)
        self.decode_eviction = DecodeEviction(self, scorer, ratio, window, level)

    # ------------------------------------------------------------------------------------------------ queries
    def rollback(self) -> None:
        """Drop every token appended after the context (question and answer) so the next question starts clean.

        Without it, turns accumulate (multi-turn chat). The batch rows return to those of the prefill.
        """
        if self.input_ids is None:
            raise RuntimeError("rollback() needs a prefilled cache")
        if not self.is_compressed and self._dense_rows_changed:  # before any layer moves: all of them or none
            raise RuntimeError(dense_rows_changed_error("rollback()"))
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
        check_token_ids(query_ids, "query_ids", "encode_query(tokenizer, question) gives one question's ids, "
                                                "encode_queries(tokenizer, questions) several, with their mask")
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
    def load(cls, path, model, device=None, dtype: torch.dtype | None = None, verify: bool = True,
             kv_dtype=None) -> KVzipCache:
        """A cache restored from a file written by `save`, for ``model`` (the one that compressed it).

        ``device`` (default: the model's) and ``dtype`` (default: the saved one) say where the keys and values go
        and what they are read in. ``kv_dtype="fp8"`` stores the loaded pairs as fp8 (as `compress` does); a file
        of fp8 pairs loads as fp8 whatever it is given.
        Refuses, naming the mismatch, a file for another model, of a newer format, truncated or corrupted
        (``verify`` checks every tensor's CRC-32). The loaded cache behaves as the saved one: ``generate``,
        `rollback`, a second `compress` at a smaller ratio, `make_static`.
        """
        check_model(model)
        cache = cls(model)
        saved = read_cache(path, cache, model, device=device, dtype=dtype, verify=verify)
        kv_dtype = check_kv_dtype(kv_dtype, saved.input_ids.device, "KVzipCache.load()")
        cache._restore(saved, kv_dtype)
        cache._bind_model(model)
        return cache

    def _restore(self, saved: SavedContext, kv_dtype: torch.dtype | None = None) -> None:
        """Become the compressed cache a file described (see `kvzip_cache.persistence`), its kept pairs stored as
        ``kv_dtype`` (None: as saved); never half of it."""
        try:
            for layer, (kind, state, length) in zip(self.layers, saved.layers):
                if kind == FULL:
                    layer.import_state(state, self.num_kv_heads, length, saved.dtype)
                    if kv_dtype is not None:
                        layer.context = layer.context.to_fp8()
                else:
                    layer.import_state(state, length)
            self.input_ids, self.attention_mask = saved.input_ids, saved.attention_mask
            self.context_start, self.keep_mask, self.scores = saved.context_start, saved.keep_mask, saved.scores
            self.compressed_with, self.score_source = saved.compressed_with, saved.score_source
            self.weight_digests, self.tokenizer_fields = saved.weight_digests, saved.tokenizer_fields
            self.kv_dtype = kv_dtype or saved.kv_dtype
        except BaseException:
            self.reset()
            raise

    # ------------------------------------------------------------------------------------ scoring passes
    def reserve_scoring_room(self, tokens: int) -> None:
        """Make room for ``tokens`` pass tokens after each dense full layer's pairs (`KVzipLayer.reserve`): each
        reconstruction pass writes its tokens there instead of copying the cached row."""
        for idx in self.compressible_layers:
            self.layers[idx].reserve(tokens)

    def release_scoring_room(self) -> None:
        """Give that room back (so an interrupted compress leaves the memory as before too). One layer at a time:
        each copy is one layer large."""
        for idx in self.compressible_layers:
            self.layers[idx].release_room()

    @contextmanager
    def scoring_pass(self, record: ScoringPass):
        """Within this block, forward passes store nothing and full layers write scores where ``record`` says."""
        self._scoring_pass = record
        try:
            yield
        finally:
            self._scoring_pass = None


def _one_scorer(call: str, **given):
    """The one scorer among ``scorer=`` and the keywords that mean the same (``predictor=``, ``head_scores=``,
    ``score=``), or None; refuses two, and a keyword given what it does not take."""
    named = {name: value for name, value in given.items() if value is not None}
    if len(named) > 1:
        raise ValueError(f"{call} takes one scorer; got {' and '.join(f'{name}=' for name in named)} (they are the "
                         "same thing: pass one)")
    for name, value in named.items():
        if name == "predictor" and not isinstance(value, ScorePredictor):
            raise TypeError(f"predictor must be a ScorePredictor (e.g. ScorePredictor.from_pretrained(...)), got "
                            f"{type(value).__name__}; scorer= also takes a registered name such as 'predicted'")
        if name == "head_scores" and not isinstance(value, (HeadScores, torch.Tensor)):
            raise TypeError(f"head_scores must be HeadScores or a [num_layers, num_kv_heads] tensor, got "
                            f"{type(value).__name__}")
        if name == "score" and value not in RECONSTRUCTION_TARGETS:
            raise ValueError(f"unknown score {value!r}; choose one of {RECONSTRUCTION_TARGETS} (or pass scorer=...)")
    return next(iter(named.values()), None)


def _storage_dtype(kv_dtype, model, call: str) -> torch.dtype | None:
    """`check_kv_dtype` on the device of the model's first weights (what fp8 pairs must be served on)."""
    return None if kv_dtype is None else check_kv_dtype(kv_dtype, next(model.parameters()).device, call)


def _pad_token_id(model):
    """The model's pad token id, when it has one that does not also open every sequence (bos)."""
    config = getattr(model, "generation_config", None) or model.config
    pad, bos = getattr(config, "pad_token_id", None), getattr(config, "bos_token_id", None)
    return None if pad is None or pad == bos or isinstance(pad, list) else pad


def _layer_scorer(scorer, call: str):
    if not isinstance(scorer, LayerScorer):
        raise TypeError(
            f"{call} evicts part by part and needs a layer scorer (score_layer(layer_idx, keys, values, positions)); "
            f"{type(scorer).__name__} scores a whole prefilled context: prefill, then cache.compress(model, ratio, "
            "scorer=...)"
        )
    return scorer


def _layer_state(layer) -> tuple:
    """What a layer's `evict` replaces; compare with `_same_state` (an evict that failed early changed none of it)."""
    return tuple(getattr(layer, name, None) for name in ("keys", "values", "context", "context_length", "src_rows"))


def _same_state(a: tuple, b: tuple) -> bool:
    return all(x is y for x, y in zip(a[:3], b[:3])) and a[3:] == b[3:]  # tensors by identity, lengths by value


def _add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(note)
