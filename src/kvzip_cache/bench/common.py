"""What more than one benchmark uses: models of built-in shapes, bandwidth and memory measurement, random contexts,
decode and compiled-step timing, warm-up, the result record and the report header.

Every benchmark module of `kvzip_cache.bench` imports its shared helpers from here and from no other benchmark.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

import kvzip_cache  # noqa: F401  (registers "kvzip")
from kvzip_cache import KVzipCache, ScorePredictor
from kvzip_cache.compat import cache_kwarg
from kvzip_cache.config import kv_shape

if TYPE_CHECKING:
    import argparse

    from transformers import Cache, PretrainedConfig, PreTrainedModel

SHAPES = {
    "llama3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
}
GB = 1e9


@dataclass
class Row:
    """One measured row of the default, predictor, capacity or compiled benchmark (times in s or ms, memory in GB)."""

    method: str  # "dynamic" or "kvzip"
    context: int
    batch: int
    ratio: float = 1.0
    prefill_s: float = float("nan")
    scoring_s: float = float("nan")
    compress_s: float = float("nan")
    decode_ms: float = float("nan")
    generate_ms: float = float("nan")
    kv_gb: float = float("nan")
    peak_prefill_gb: float = float("nan")
    peak_compress_gb: float = float("nan")
    peak_decode_gb: float = float("nan")
    floor_ms: float = float("nan")
    kernel_gbps: float = float("nan")
    compile_s: float = float("nan")  # compiled decoding (bench.compiled): torch.compile + CUDA graph recording
    # score-predictor rows ("kvzip-pred", "kvzip-evict", see predictor_rows) and capacity rows (capacity_rows):
    plain_prefill_s: float = float("nan")  # the plain KVzipCache prefill of the same context
    dynamic_prefill_s: float = float("nan")  # the DynamicCache + SDPA prefill of the same context
    chunk_gb: float = float("nan")  # one prefill chunk: its activations plus its own dense KV (see predictor_rows)
    bound_gb: float = float("nan")  # evicting prefill: GB allocated before it + ratio x full KV + chunk_gb
    fits: bool | None = None  # capacity rows: whether the try ran without running out of GPU memory
    notes: list[str] = field(default_factory=list)


def load_model(name: str, dtype: torch.dtype, device: str, max_positions: int | None = None) -> PreTrainedModel:
    """The model, in eval mode, SDPA attention. ``max_positions``: raise a built-in shape's
    ``max_position_embeddings`` to at least this many positions (long contexts; a hub model keeps its own)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name in SHAPES:
        spec = dict(SHAPES[name])
        if max_positions is not None:
            spec["max_position_embeddings"] = max(spec["max_position_embeddings"], max_positions)
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa").to(device)
    return model.eval()


def copy_bandwidth(device: str, nbytes: int = 4 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of 10."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times[3:])


def peak_gb() -> float:
    """Peak GPU GB allocated since the last `reset_peak` (NaN without CUDA: the CPU smoke tests)."""
    return torch.cuda.max_memory_allocated() / GB if torch.cuda.is_available() else float("nan")


def reset_peak() -> None:
    """Synchronise and reset CUDA's peak-memory counter, so that `peak_gb` measures from here (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def free_memory() -> None:
    """Return freed GPU memory to the device between measurements (and after an out-of-memory error)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Measurement:
    """What `measured` took of one block: seconds, and GPU GB at its peak and when it started (NaN without CUDA)."""

    seconds: float = float("nan")
    peak_gb: float = float("nan")  # peak GPU GB allocated during the block
    before_gb: float = float("nan")  # GPU GB allocated when the block started (weights, inputs, ...)


@contextmanager
def measured() -> Iterator[Measurement]:
    """Time a block (synchronised) and take its peak GPU memory; filled in also when the block raises (OOM)."""
    reset_peak()
    m = Measurement(before_gb=torch.cuda.memory_allocated() / GB if torch.cuda.is_available() else float("nan"))
    began = time.perf_counter()
    try:
        yield m
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        m.seconds, m.peak_gb = time.perf_counter() - began, peak_gb()


def kv_bytes_per_token(config: PretrainedConfig, itemsize: int) -> int:
    """Dense KV bytes of one token of one row: layers x 2 (keys, values) x KV heads x head_dim x itemsize."""
    num_heads, head_dim = kv_shape(config)
    return config.num_hidden_layers * 2 * num_heads * head_dim * itemsize


def chunked_forward(model: PreTrainedModel, cache: Cache, ids: torch.Tensor, mask: torch.Tensor, chunk: int,
                    start: int = 0) -> None:
    """Forward ``ids[:, start:]`` into ``cache``, ``chunk`` tokens per pass, as a chunked prefill does from ``start``.

    ``ids``, ``mask``: ``[B, S]`` (mask 1 = token, 0 = left padding); position ids follow the mask.
    """
    kwarg = cache_kwarg(model)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        for lo in range(start, ids.shape[1], chunk):
            hi = min(lo + chunk, ids.shape[1])
            model(input_ids=ids[:, lo:hi], attention_mask=mask[:, :hi], position_ids=positions[:, lo:hi],
                  use_cache=True, logits_to_keep=1, **{kwarg: cache})


def random_context(batch: int, length: int, vocab: int, device: str,
                   padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids; with ``padded``, row b is left-padded by b * length // (4 * batch) tokens.

    Returns ``(ids, mask)``, both ``[batch, length]`` (mask 1 = token, 0 = left padding).
    """
    ids = torch.randint(10, vocab, (batch, length), device=device)
    mask = torch.ones_like(ids)
    if padded:
        for b in range(batch):
            mask[b, : b * length // (4 * batch)] = 0
    return ids, mask


def decode_loop(model: PreTrainedModel, cache: Cache, batch: int, start: int, steps: int,
                mask: torch.Tensor | None) -> float:
    """Median ms of one decode step (forward of one token per row), CUDA events, after 4 warm-up steps."""
    kwarg = cache_kwarg(model)
    token = torch.full((batch, 1), 11, device=model.device)
    times = []
    gc.disable()  # a collection inside the loop would land on one step of a CPU-bound eager decode
    for step in range(steps + 4):
        position = torch.full((batch, 1), start + step, device=model.device)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            position = mask.sum(1, keepdim=True) - 1
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        with torch.no_grad():
            model(input_ids=token, attention_mask=mask, position_ids=position, use_cache=True, **{kwarg: cache})
        end.record()
        torch.cuda.synchronize()
        if step >= 4:
            times.append(begin.elapsed_time(end))
    gc.enable()
    return statistics.median(times)


def generate_ms(model: PreTrainedModel, cache: Cache, ids: torch.Tensor, mask: torch.Tensor | None, steps: int,
                reset: Callable[[], Any]) -> float:
    """ms per new token through model.generate: (time of steps+8 tokens - time of 8 tokens) / steps."""
    timings = []
    greedy(model, cache, ids, mask, 4)  # warm-up: the first generate pays one-time costs
    reset()
    for new_tokens in (8, steps + 8):
        torch.cuda.synchronize()
        began = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, **{cache_kwarg(model): cache}, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        timings.append(time.perf_counter() - began)
        reset()
    return (timings[1] - timings[0]) / steps * 1e3


def greedy(model: PreTrainedModel, cache: Cache, ids: torch.Tensor, mask: torch.Tensor | None,
           new_tokens: int) -> torch.Tensor:
    """The ``[B, new_tokens]`` greedy tokens that ``model.generate`` appends to ``ids`` (``[B, S]``) on ``cache``."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **{cache_kwarg(model): cache}, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    return out[:, ids.shape[1]:]


def warm_up(model: PreTrainedModel, device: str, predictor: ScorePredictor | None = None) -> None:
    """Compile the Triton kernels and fill caches outside the measurements (with ``predictor``: its paths too)."""
    model.set_attn_implementation("kvzip")
    ids = torch.randint(10, 1000, (2, 2048), device=device)
    cache = KVzipCache(model)
    cache.prefill(model, ids, context_start=16, chunk_size=1024)
    cache.compress(model, 0.5, tokenizer=NoTemplateTokenizer(), chunk_size=512)
    decode_loop(model, cache, 2, 2048, 2, None)
    del cache
    if predictor is not None:
        warm_up_predictor(model, predictor, device)
    torch.cuda.empty_cache()


def warm_up_predictor(model: PreTrainedModel, predictor: ScorePredictor, device: str) -> None:
    """One small predicted compress and one small evicting prefill (first-call costs outside the measurements)."""
    ids = torch.randint(10, 1000, (1, 4096), device=device)
    cache = KVzipCache(model)
    cache.prefill(model, ids, context_start=16, chunk_size=2048)
    cache.compress(model, 0.5, predictor=predictor)
    cache = KVzipCache(model)
    cache.prefill(model, ids, context_start=16, chunk_size=1024, predictor=predictor, ratio=0.5)
    del cache
    free_memory()


def one_chunk_gb(model: PreTrainedModel, ids: torch.Tensor) -> float:
    """GB that a plain prefill of one chunk ``ids`` (``[B, chunk]``, no padding) peaks at above what was allocated
    before it (NaN without CUDA).

    This is how the bench MEASURES "one chunk's activations" in the bound of an evicting prefill: the chunk's
    activations plus its own dense KV, which an evicting prefill also holds until it has scored the chunk. (The
    alternative, a full plain prefill's peak minus weights minus full KV, leaves that KV out and adds the transient
    copy of one growing dense layer, which an evicting prefill never makes.)
    """
    cache = KVzipCache(model)
    with measured() as m:
        cache.prefill(model, ids, chunk_size=ids.shape[1])
    del cache
    free_memory()
    return m.peak_gb - m.before_gb


def result_record(args: argparse.Namespace, weight_bytes: int, bandwidth: float, rows: list[Row]) -> dict:
    """What a benchmark run writes to its JSON: the machine, the model, the bandwidth and every row."""
    return {
        "machine": machine_record(),
        "model": args.model,
        "dtype": args.dtype,
        "weights_gb": weight_bytes / GB,
        "copy_bandwidth_tbps": bandwidth / 1e12,
        "rows": [asdict(r) for r in rows],
    }


class NoTemplateTokenizer:
    """Random-weight shapes have no tokenizer; reconstruction prompts only need some fixed token ids."""

    chat_template = None
    bos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """One token id in ``[10, 1010)`` per character of ``text``."""
        return [10 + (ord(ch) % 1000) for ch in text]


def machine_record() -> dict:
    """The run's machine: GPU name, torch, transformers and Python versions, git commit, UTC date."""
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, check=True).stdout.strip()
        except Exception:  # noqa: BLE001 - not a checkout
            return "unknown"

    import transformers

    return {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        # The device copy of a checkout has no .git: scripts/gpu_check.sh passes the commit in KVZIP_COMMIT.
        "commit": os.environ.get("KVZIP_COMMIT") or git("rev-parse", "--short", "HEAD"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def report_header(result: dict, title: str) -> list[str]:
    """The first lines of a Markdown report: title, model, dtype, GPU, versions, weights GB and copy TB/s."""
    m = result["machine"]
    return [
        f"# {title}: {result['model']} ({result['dtype']}) on {m['gpu']}",
        "",
        f"torch {m['torch']}, transformers {m['transformers']}, commit {m['commit']}, {m['date']}. Weights "
        f"{result['weights_gb']:.1f} GB, measured copy bandwidth {result['copy_bandwidth_tbps']:.2f} TB/s.",
        "",
    ]


def cudagraph_skips() -> int:
    """How many compiled graphs inductor has run without CUDA graphs so far (``TORCH_LOGS=cudagraphs`` says why): a
    step that skips them launches every kernel from Python, and its time is then the launches', not the GPU's."""
    return torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]


def skip_note(before: int) -> list[str]:
    """A row note when CUDA graphs were skipped since the count ``before`` (`cudagraph_skips`), else nothing."""
    skipped = cudagraph_skips() - before
    return [f"CUDA graphs skipped {skipped}x (TORCH_LOGS=cudagraphs says why)"] if skipped else []


def compiled_forward(model: PreTrainedModel) -> Callable[..., Any]:
    """``model.forward`` compiled with CUDA graphs (``mode="reduce-overhead"``, full graph), after a dynamo reset."""
    torch._dynamo.reset()
    return torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)


def question_step(model: PreTrainedModel, cache: Cache, ask: torch.Tensor,
                  start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager forward of the question (as generate's first step); returns (next token, its position).

    ``ask``: ``[B, n]`` question ids at positions ``start .. start + n - 1``; both results are ``[B, 1]``.
    """
    kwarg = cache_kwarg(model)
    batch, n = ask.shape
    with torch.no_grad():
        logits = model(input_ids=ask, position_ids=torch.arange(start, start + n, device=ask.device)[None].expand(
            batch, -1), use_cache=True, logits_to_keep=1, **{kwarg: cache}).logits
    return logits[:, -1].argmax(-1, keepdim=True), torch.full((batch, 1), start + n, device=ask.device)


def timed_steps(forward: Callable[..., Any], model: PreTrainedModel, cache: Cache, token: torch.Tensor,
                position: torch.Tensor, steps: int, warmup: int = 3) -> tuple[float, list[torch.Tensor]]:
    """Median ms of a one-token decode step (greedy: each step feeds the previous argmax) and the tokens produced.

    ``position``: ``[B, 1]`` position of ``token``; advanced by one per step on the device.
    """
    kwarg = cache_kwarg(model)
    times, tokens = [], []
    gc.disable()
    for step in range(warmup + steps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.compiler.cudagraph_mark_step_begin()
        begin.record()
        with torch.no_grad():
            logits = forward(input_ids=token, position_ids=position, use_cache=True, logits_to_keep=1,
                             **{kwarg: cache}).logits
        token = logits[:, -1].argmax(-1, keepdim=True)  # consumed before the next replay overwrites the logits
        end.record()
        torch.cuda.synchronize()
        position = position + 1
        tokens.append(token)
        if step >= warmup:
            times.append(begin.elapsed_time(end))
    gc.enable()
    return statistics.median(times), tokens
