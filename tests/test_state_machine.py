"""Random call orders (hypothesis's rule-based state machine) on tiny Llama and Gemma3 (sliding layers) models.

The machine drives prefill (one row, or a left-padded batch of 2), compress (every level, shrinking ratios), evict,
questions (multi-turn tails; several per context through ``inputs_for(shared=True)``, which repeats the cache's
rows), rollback, crop, reset and bad calls (a forward with another batch size among them) in any order. After every step it checks:

- the logits of a probe question (asked on a copy of the cache) equal a float64 dense DynamicCache reference that
  sees the same context and tail and hides exactly the evicted pairs;
- every compressed layer stores exactly the kept pairs (the keep mask plus the protected prefix);
- a refused call left the cache exactly as it was (a snapshot of lengths, rows, stored pairs and masks).

The default run is bounded (a few examples); ``-m slow`` runs a longer profile.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import ByteTokenizer, make_pair, reference_logits
from kvzip_cache import KVzipCache

TOK = ByteTokenizer()
PROBE = torch.tensor([[5, 9, 17]])
_MODELS: dict[str, tuple] = {}


def _models(arch: str):
    if arch not in _MODELS:
        _MODELS[arch] = make_pair(arch)
    return _MODELS[arch]


def _ids(n: int, seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (rows, n), generator=torch.Generator().manual_seed(seed))


def _snapshot(cache: KVzipCache):
    layers = []
    for layer in cache.layers:
        context = getattr(layer, "context", None)
        layers.append((int(layer.get_seq_length()), getattr(layer, "src_rows", None),
                       None if context is None else context.keys.clone(),
                       None if getattr(layer, "keys", None) is None else layer.keys.clone()))
    masks = [None if t is None else t.clone() for t in (cache.keep_mask, cache.scores)]
    return cache.kv_bytes(), cache.compressed_with, layers, masks


def _equal(a, b) -> bool:
    def same(x, y):
        if x is None or y is None:
            return x is None and y is None
        if isinstance(x, torch.Tensor):
            return x.shape == y.shape and torch.equal(x.nan_to_num(-7.0), y.nan_to_num(-7.0))
        if isinstance(x, (tuple, list)):
            return len(x) == len(y) and all(same(i, j) for i, j in zip(x, y))
        return x == y

    return same(a, b)


class CacheMachine(RuleBasedStateMachine):
    arch = "llama"

    def __init__(self) -> None:
        super().__init__()
        self.model, self.reference = _models(self.arch)
        self.cache = KVzipCache(self.model)
        self.context: torch.Tensor | None = None  # [B, n], left-padded
        self.mask: torch.Tensor | None = None  # [B, n] long, 0 on the padding
        self.start = 0  # protected prefix tokens of every row
        self.repeat = 1  # questions per context (inputs_for(shared=True)); rollback returns to 1
        self.segments: list[torch.Tensor] = []  # [B * repeat, k] tokens appended after the context, in order

    # ------------------------------------------------------------------------------------------------ helpers
    def _refused(self, error, call) -> None:
        before = _snapshot(self.cache)
        with pytest.raises(error):
            call()
        assert _equal(_snapshot(self.cache), before), "a refused call changed the cache"

    @property
    def _rows(self) -> int:
        return self.context.shape[0] * self.repeat

    def _forward(self, ids: torch.Tensor) -> None:
        """Feed ``[rows, n]`` ids after the context and the tail, as generate would (positions and mask per row)."""
        tail = sum(s.shape[1] for s in self.segments)
        mask = self.mask.repeat_interleave(self.repeat, 0)
        positions = mask.sum(1, keepdim=True) + tail + torch.arange(ids.shape[1])[None]
        full_mask = torch.cat([mask, torch.ones(mask.shape[0], tail + ids.shape[1], dtype=torch.long)], 1)
        with torch.no_grad():
            return self.model(input_ids=ids, attention_mask=full_mask, past_key_values=self.cache,
                              position_ids=positions).logits

    # -------------------------------------------------------------------------------------------------- rules
    @rule(n=st.integers(14, 40), seed=st.integers(0, 50), start=st.integers(1, 6), pad=st.sampled_from([0, 0, 3, 7]))
    def prefill(self, n, seed, start, pad):
        ids, mask, starts = _ids(n, seed), torch.ones(1, n, dtype=torch.long), torch.tensor([start])
        if pad:  # a left-padded batch of 2: the second row is ``pad`` tokens shorter
            ids = torch.cat([ids, _ids(n, seed + 1)])
            ids[1, :pad], mask = 0, torch.ones(2, n, dtype=torch.long)
            mask[1, :pad], starts = 0, torch.tensor([start, pad + start])
        if self.context is not None:
            self._refused(RuntimeError, lambda: self.cache.prefill(self.model, ids, mask, context_start=starts))
            return
        self.cache.prefill(self.model, ids, mask, context_start=starts, chunk_size=16)
        self.context, self.mask, self.start = ids, mask, start

    @precondition(lambda self: self.context is not None)
    @rule(level=st.sampled_from(["pair", "pair-uniform", "head"]), ratio=st.floats(0.1, 1.0))
    def compress(self, level, ratio):
        heads = torch.rand(self.model.config.num_hidden_layers, self.cache.num_kv_heads,
                           generator=torch.Generator().manual_seed(1))
        call = lambda: self.cache.compress(self.model, ratio, tokenizer=TOK, chunk_size=16, level=level,  # noqa: E731
                                           head_scores=heads if level == "head" else None)
        previous = self.cache.compressed_with
        if self.segments or self.repeat > 1:  # a tail, or rows repeated for shared questions (a crop may empty it)
            self._refused(RuntimeError, call)
        elif previous is not None and (previous[0] != level or ratio > previous[1]):
            self._refused(ValueError, call)
        else:
            call()

    @precondition(lambda self: self.context is not None and not self.segments)
    @rule(seed=st.integers(0, 50), keep_share=st.floats(0.2, 1.0))
    def evict(self, seed, keep_share):
        selectable = self.cache.selectable_pairs()
        keep = torch.rand(selectable.shape, generator=torch.Generator().manual_seed(seed)) < keep_share
        if self.cache.keep_mask is not None:
            keep &= self.cache.keep_mask
        if self.repeat > 1:
            self._refused(RuntimeError, lambda: self.cache.evict(keep))
            return
        self.cache.evict(keep)

    @precondition(lambda self: self.context is not None)
    @rule(n=st.integers(1, 5), seed=st.integers(0, 50))
    def ask(self, n, seed):
        ids = _ids(n, 100 + seed, self._rows)
        self._forward(ids)
        self.segments.append(ids)

    @precondition(lambda self: self.context is not None and not self.segments and self.cache.is_compressed)
    @rule(repeat=st.integers(1, 3), n=st.integers(1, 4), seed=st.integers(0, 50))
    def ask_shared(self, repeat, n, seed):
        """``repeat`` questions per context: the cache's rows are repeated (batch_repeat_interleave) until rollback."""
        ids = _ids(n, 200 + seed, self.context.shape[0] * repeat)
        inputs = self.cache.inputs_for(ids, shared=True)
        assert torch.equal(inputs["input_ids"][:, -n:], ids)
        self.repeat = repeat
        self._forward(ids)
        self.segments.append(ids)

    @precondition(lambda self: self.context is not None)
    @rule()
    def rollback(self):
        self.cache.rollback()
        self.segments, self.repeat = [], 1

    @precondition(lambda self: self.segments and self.cache.is_compressed)
    @rule(data=st.data())
    def crop(self, data):
        tail = sum(s.shape[1] for s in self.segments)
        drop = data.draw(st.integers(1, tail))
        if any(kind != "full_attention" for kind in self.cache.layer_types):
            # sliding windows that have filled cannot be cropped: refused, in every layer or none
            self._refused(ValueError, lambda: self.cache.crop(-drop))
            return
        if data.draw(st.booleans()):  # into the compressed context: refused
            self._refused(ValueError, lambda: self.cache.crop(-(tail + 1)))
        self.cache.crop(-drop)
        kept = torch.cat(self.segments, 1)[:, : tail - drop]
        self.segments = [kept] if kept.shape[1] else []

    @rule()
    def reset(self):
        self.cache.reset()
        self.context, self.mask, self.segments, self.repeat = None, None, [], 1

    @precondition(lambda self: self.context is not None)
    @rule(bad=st.sampled_from(["ratio", "level", "mask-shape", "rows", "static-before-compress", "batch", "shared"]))
    def bad_call(self, bad):
        cache, model = self.cache, self.model
        if bad == "ratio":
            self._refused(ValueError, lambda: cache.compress(model, 1.5, tokenizer=TOK))
        elif bad == "level":
            self._refused(ValueError, lambda: cache.compress(model, 0.5, tokenizer=TOK, level="everything"))
        elif bad == "mask-shape":
            self._refused((ValueError, RuntimeError), lambda: cache.evict(torch.ones(2, 2, dtype=torch.bool)))
        elif bad == "rows":
            self._refused(ValueError, lambda: cache.inputs_for(torch.ones(3, 2, dtype=torch.long)))
        elif bad == "batch":  # a forward with one row too many (e.g. num_return_sequences without repeating rows)
            ids = _ids(2, 7, self._rows + 1)
            positions = torch.arange(self.context.shape[1], self.context.shape[1] + 2).expand(ids.shape[0], -1)
            with torch.no_grad():
                self._refused((ValueError, RuntimeError), lambda: model(
                    input_ids=ids, past_key_values=cache, position_ids=positions))
        elif bad == "shared":  # shared questions need a compressed cache, R per context, and no tail
            ids = torch.ones(3 if self.context.shape[0] == 2 else 0, 2, dtype=torch.long)  # not R per context
            self._refused((ValueError, RuntimeError), lambda: cache.inputs_for(ids, shared=True))
        elif not cache.is_compressed:
            self._refused(RuntimeError, lambda: cache.make_static(8))

    # ------------------------------------------------------------------------------------------------ checks
    @invariant()
    def logits_equal_the_dense_reference(self):
        if self.context is None:
            assert self.cache.get_seq_length() == 0 and self.cache.kv_bytes() == 0
            return
        probe = PROBE.expand(self._rows, -1)
        cache, self.cache = self.cache, copy.deepcopy(self.cache)
        try:
            got = self._forward(probe)
        finally:
            self.cache = cache
        hidden = None
        rows = torch.arange(self._rows) // self.repeat  # the context row each row asks about
        if self.cache.keep_mask is not None:
            hidden = {}
            offset, n = self.cache.context_offset, self.context.shape[1]
            in_context = torch.arange(offset, n)[None, :] >= self.cache.context_start[rows][:, None]  # [rows, C]
            for idx in self.cache.compressible_layers:
                evicted = torch.zeros(self._rows, self.cache.num_kv_heads, n, dtype=torch.bool)
                evicted[..., offset:] = ~self.cache.keep_mask[idx][rows] & in_context[:, None, :]
                hidden[idx] = evicted
        segments = [(s, torch.ones_like(s)) for s in self.segments]
        expected = reference_logits(self.reference, self.context[rows], *segments, (probe, torch.ones_like(probe)),
                                    context_mask=self.mask[rows], hidden=hidden)
        torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=1e-4)

    @invariant()
    def compressed_layers_store_exactly_the_kept_pairs(self):
        if self.cache.keep_mask is None:
            return
        for idx in self.cache.compressible_layers:
            stored = self.cache.layers[idx].context.keys.shape[0]
            prefix = self.cache.num_kv_heads * self.start * self.context.shape[0]
            assert stored == int(self.cache.keep_mask[idx].sum()) + prefix


class GemmaMachine(CacheMachine):
    arch = "gemma3"


_FAST = settings(max_examples=25, stateful_step_count=12, deadline=None, derandomize=True,
                 suppress_health_check=list(HealthCheck))
_LONG = settings(max_examples=60, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck))

TestLlamaCallOrders = CacheMachine.TestCase
TestLlamaCallOrders.settings = _FAST
TestGemma3CallOrders = GemmaMachine.TestCase
TestGemma3CallOrders.settings = _FAST


@pytest.mark.slow
@pytest.mark.parametrize("machine", [CacheMachine, GemmaMachine], ids=["llama", "gemma3"])
def test_long_call_order_profile(machine):
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(machine, settings=_LONG)
