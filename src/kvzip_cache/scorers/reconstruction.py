"""KVzip scoring by context reconstruction (a context scorer).

For each chunk of the context the model is fed, teacher-forced at the positions right after the cached sequence,
``[repeat prompt | assistant turn | chunk]`` (`reconstruction_inputs`). The cache is put in scoring mode, so the
pass stores nothing, and every full-attention layer's backend writes the KVzip score of the chunk's cached pairs:
the maximum over the pass's queries and the GQA group of the softmax restricted to
``[protected prefix | chunk | repeat input (causal)]``.

``target="kvzip+"`` scores KVzip+ (KVzap, arXiv 2601.07891) instead: each probability ``p[j, t, i]`` (query head
``j``, query ``t``, cached pair ``i``) is weighted by how much the pair writes into the residual stream relative
to the query's hidden state, before the same max over ``(t, j)``::

    score+[i] = max_{t, j in group(h)} p[j, t, i] * ||W_O^(j) v_i|| / ||h_t||

with ``W_O^(j)`` query head ``j``'s slice of the layer's ``o_proj``, ``v_i`` the cached value and ``h_t`` the hidden
state entering the attention module (the output of the decoder layer's ``input_layernorm``). Reading ``h_t``
without hooks takes one extra forward per pass: the pass is first run with ``output_hidden_states=True`` (cache in
scoring mode, no score computed), and the model's own ``input_layernorm`` is applied to the residual entering each
layer. KVzip+ scoring therefore costs about 1.5x KVzip's (two forwards per pass instead of one, the first without
the score computation).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..compat import cache_kwarg
from ..templates import chat_pieces, encode_text
from ..views import ScoringPass
from .base import PrefilledContext

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
LATER_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with "
OVERLAP_TOKENS = 8  # last tokens of the previous chunk quoted in the prompt of the next one
RECONSTRUCTION_TARGETS = ("kvzip", "kvzip+")  # what ReconstructionScorer(target=...) computes


def reconstruction_inputs(
    tokenizer, context_ids: torch.Tensor | list[int], chunk_size: int = 2048
) -> list[tuple[int, int, torch.Tensor]]:
    """The reconstruction passes for a context.

    Args:
        tokenizer: the model's tokenizer (its chat template gives the assistant-turn tokens).
        context_ids: the context's token ids, ``[seq]`` or ``[1, seq]``, without the protected prefix.
        chunk_size: context tokens per pass.

    Returns:
        One ``(start, end, input_ids [n])`` per chunk: the chunk's span inside the context and the exact ids fed,
        ``[repeat prompt | assistant turn | context[start:end]]``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    context_ids = torch.as_tensor(context_ids, dtype=torch.long).flatten().cpu()
    assistant_turn = encode_text(tokenizer, chat_pieces(tokenizer).assistant_turn)
    first_prompt = encode_text(tokenizer, FIRST_PROMPT)
    later_prompt = encode_text(tokenizer, LATER_PROMPT)
    passes = []
    for start in range(0, len(context_ids), chunk_size):
        end = min(start + chunk_size, len(context_ids))
        if start == 0:
            prompt = first_prompt
        else:
            prompt = later_prompt + context_ids[max(0, start - OVERLAP_TOKENS) : start].tolist()
        ids = torch.tensor(prompt + assistant_turn, dtype=torch.long)
        passes.append((start, end, torch.cat([ids, context_ids[start:end]])))
    return passes


class ReconstructionScorer:
    """KVzip's scores (``target="kvzip"``) or KVzip+'s (``"kvzip+"``): see the module docstring.

    Rows are scored one at a time (each pass reads a view of its row, nothing is copied), so rows of different
    context lengths need no padding of their reconstruction inputs.

    Args:
        tokenizer: the model's tokenizer (builds the prompts); loaded from ``model.config.name_or_path`` when None.
            After scoring, ``self.tokenizer`` is the one used (the cache records its fingerprint).
        target: ``"kvzip"`` or ``"kvzip+"`` (one extra forward per pass, about 1.5x the time).
        chunk_size: context tokens per pass.
        progress: show a progress bar over the passes.
    """

    level = "pair"
    scores_kept_pairs = True  # on a compressed cache, each pass reads the kept pairs (`CompressedScoringKV`)

    def __init__(self, tokenizer=None, target: str = "kvzip", chunk_size: int = 2048, progress: bool = False) -> None:
        if target not in RECONSTRUCTION_TARGETS:
            raise ValueError(f"unknown score target {target!r}; choose one of {list(RECONSTRUCTION_TARGETS)}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
        self.tokenizer, self.target, self.chunk_size, self.progress = tokenizer, target, chunk_size, progress

    @property
    def name(self) -> str:
        return self.target

    @torch.no_grad()
    def score_context(self, model, context: PrefilledContext) -> torch.Tensor:
        """``[L, B, H, C]`` float32, NaN where nothing is scored (sliding layers, padding, protected prefix)."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(model)
        cache = context.target
        device = context.attention_mask.device
        base = context.offset
        scores = torch.full(context.shape, float("nan"), dtype=torch.float32, device=device)
        compressible = context.full_layers
        norms = _input_layernorms(model, compressible) if self.target == "kvzip+" else None
        kwarg = cache_kwarg(model)
        jobs = []
        for row in range(context.input_ids.shape[0]):
            start = int(context.context_start[row])
            passes = reconstruction_inputs(self.tokenizer, context.input_ids[row, start:], self.chunk_size)
            jobs.extend((row, start, p) for p in passes)
        cache.reserve_scoring_room(max(ids.numel() for _, _, (_, _, ids) in jobs))
        for row, ctx_start, (lo, hi, ids) in tqdm(jobs, desc=f"{self.target} scoring", disable=not self.progress):
            valid = context.attention_mask[row]
            prefix_positions = torch.nonzero(valid[:ctx_start]).flatten()
            chunk = (ctx_start + lo, ctx_start + hi)
            buffers = {layer: scores[layer, row, :, chunk[0] - base : chunk[1] - base] for layer in compressible}
            n_new = ids.numel()
            inputs = {
                "input_ids": ids.to(device).unsqueeze(0),
                "attention_mask": torch.cat([valid, valid.new_ones(n_new)]).unsqueeze(0),
                "position_ids": (int(valid.sum()) + torch.arange(n_new, device=device)).unsqueeze(0),
                "use_cache": True,
                "logits_to_keep": 1,
                kwarg: cache,
            }
            query_norms = {}
            if norms is not None:
                with cache.scoring_pass(ScoringPass(row, chunk, prefix_positions)):  # attention output only
                    hidden = model(**inputs, output_hidden_states=True).hidden_states
                # hidden[l]: the residual entering decoder layer l; its input_layernorm gives the attention's input
                query_norms = {layer: norms[layer](hidden[layer])[0].float().norm(dim=-1) for layer in compressible}
                del hidden
            with cache.scoring_pass(ScoringPass(row, chunk, prefix_positions, buffers, query_norms)):
                model(**inputs)
        return scores


def load_tokenizer(model):
    """The tokenizer at ``model.config.name_or_path``, or an error that says to pass one."""
    from transformers import AutoTokenizer

    name = getattr(model.config, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as error:  # noqa: BLE001 - any failure means the same thing to the user
        raise ValueError(
            f"compress() needs the model's tokenizer to build the reconstruction prompts and could not load it from "
            f"model.config.name_or_path={name!r} ({error}); pass tokenizer=..."
        ) from error


def _input_layernorms(model, layers: list[int]) -> dict[int, torch.nn.Module]:
    """{layer: the decoder layer's ``input_layernorm``} for KVzip+ (which reads the attention modules' inputs)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    decoder_layers = getattr(decoder, "layers", None)
    if decoder_layers is None:
        raise ValueError(
            f"KVzip+ scores need the decoder layers at model.get_decoder().layers; {type(model).__name__} has none"
        )
    norms = {}
    for layer in layers:
        norm = getattr(decoder_layers[layer], "input_layernorm", None)
        if norm is None:
            raise ValueError(
                f"KVzip+ scores need each decoder layer's input_layernorm (the attention's input is read as "
                f"input_layernorm(hidden_states)); layer {layer} of {type(model).__name__} "
                f"({type(decoder_layers[layer]).__name__}) has none. Score with 'kvzip' instead."
            )
        norms[layer] = norm
    return norms
