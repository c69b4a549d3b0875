"""KVzipCache under transformers' tensor parallelism, on 2 CPU processes (gloo over the loopback).

Each rank loads the same tiny model with ``tp_plan="auto"`` and caches one of its two KV heads. Selection must be
global: the keep mask and the scores equal a single-process run with the same weights (fp32), and so do the greedy
tokens, for pair, pair-uniform and head levels, fp8 kept pairs, KVzip+ scores, predicted scores (compress, and eviction while
prefilling), a left-padded batch, rollback and a head-dropping prefill; each rank holds half the KV bytes; bad inputs
are refused on every rank, also when only one rank can see what is wrong (its own shard of the weights).
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ByteTokenizer, make_pair

ARCHS = ["llama", "qwen3", "gemma3"]  # gemma3: sliding-window layers
WORLD = 2
TOK = ByteTokenizer()


def _ids(n, seed, batch=1):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def _load(folder, parallel: bool):
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": "kvzip", "dtype": torch.float32}
    if parallel:
        try:
            from transformers.distributed import DistributedConfig

            kwargs["distributed_config"] = DistributedConfig(tp_plan="auto")
        except ImportError:  # older transformers: the standalone argument
            kwargs["tp_plan"] = "auto"
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def _answer(model, cache, question):
    out = model.generate(**cache.inputs_for(*question), past_key_values=cache, max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    cache.rollback()
    return out


def run_scenarios(model) -> dict:
    """Everything the test compares, from one process (or one rank): masks, scores, tokens, bytes."""
    from kvzip_cache import KVzipCache, ScorePredictor

    results = {}
    context, question = _ids(40, 1), (_ids(5, 2), None)
    head_scores = torch.rand(model.config.num_hidden_layers, model.config.num_key_value_heads,
                             generator=torch.Generator().manual_seed(3))
    for level in ("pair", "pair-uniform", "head"):
        cache = KVzipCache(model)
        cache.prefill(model, context, context_start=4, chunk_size=16)
        dense_bytes = cache.kv_bytes()
        cache.compress(model, 0.4, tokenizer=TOK, chunk_size=16, level=level,
                       head_scores=head_scores if level == "head" else None)
        first = _answer(model, cache, question)
        results[level] = {"keep": cache.keep_mask, "scores": cache.scores, "tokens": first,
                          "again": _answer(model, cache, question), "bytes": (dense_bytes, cache.kv_bytes())}
    cache = KVzipCache(model)  # fp8 kept pairs: each rank quantizes its own heads' pairs (a scale per pair)
    cache.prefill(model, context, context_start=4, chunk_size=16)
    dense_bytes = cache.kv_bytes()
    cache.compress(model, 0.4, tokenizer=TOK, chunk_size=16, kv_dtype="fp8")
    results["fp8"] = {"keep": cache.keep_mask, "scores": cache.scores, "tokens": _answer(model, cache, question),
                      "bytes": (dense_bytes, cache.kv_bytes())}
    cache = KVzipCache(model)  # KVzip+ scores: each rank weights by its own slice of o_proj
    cache.prefill(model, context, context_start=4, chunk_size=16)
    cache.compress(model, 0.4, tokenizer=TOK, chunk_size=16, score="kvzip+")
    results["kvzip+"] = {"keep": cache.keep_mask, "scores": cache.scores, "tokens": _answer(model, cache, question)}
    # predicted scores (row-parallel predictor): compress after a plain prefill, and eviction while prefilling
    predictor = ScorePredictor.init(model, "mlp", seed=0)
    cache = KVzipCache(model)
    cache.prefill(model, context, context_start=4, chunk_size=16)
    cache.compress(model, 0.4, predictor=predictor)
    results["predicted"] = {"keep": cache.keep_mask, "scores": cache.scores, "tokens": _answer(model, cache, question)}
    cache = KVzipCache(model)
    cache.prefill(model, context, context_start=4, chunk_size=16, predictor=predictor, ratio=0.4)
    results["predicted-prefill"] = {"keep": cache.keep_mask, "scores": cache.scores,
                                    "tokens": _answer(model, cache, question)}
    # ... to a looser ratio (fp8 pairs), then KVzip scores each rank's kept pairs and the ranks select together.
    # (0.7: at 0.6 this context's chunk selection has a near tie that the all-reduce's rounding flips)
    cache = KVzipCache(model)
    cache.prefill(model, context, context_start=4, chunk_size=16, predictor=predictor, ratio=0.7, kv_dtype="fp8")
    cache.compress(model, 0.3, scorer="kvzip", tokenizer=TOK, chunk_size=16)
    results["predicted-prefill+kvzip"] = {"keep": cache.keep_mask, "scores": cache.scores,
                                          "tokens": _answer(model, cache, question)}
    # a left-padded batch, with padded questions
    ids, mask = _ids(36, 4, batch=2), torch.ones(2, 36, dtype=torch.long)
    ids[1, :7], mask[1, :7] = 0, 0
    q_ids, q_mask = _ids(5, 5, batch=2), torch.ones(2, 5, dtype=torch.long)
    q_mask[0, :2] = 0
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=torch.tensor([4, 11]), chunk_size=16)
    cache.compress(model, 0.3, tokenizer=TOK, chunk_size=16)
    results["batch"] = {"keep": cache.keep_mask, "scores": cache.scores, "tokens": _answer(model, cache, (q_ids, q_mask))}
    # a head-dropping prefill, then a second compress at a smaller ratio
    cache = KVzipCache(model)
    cache.prefill(model, context, context_start=4, chunk_size=16, head_scores=head_scores, ratio=0.5)
    results["head-prefill"] = {"keep": cache.keep_mask, "tokens": _answer(model, cache, question)}
    return results


def refusals(model, rank: int) -> dict:
    """Each bad call's error, as this rank sees it (every rank must refuse)."""
    from kvzip_cache import KVzipCache

    errors = {}

    def attempt(name, call):
        try:
            call()
            errors[name] = None
        except Exception as error:  # noqa: BLE001 - recorded for the test to check
            errors[name] = f"{type(error).__name__}: {error}"

    cache = KVzipCache(model)
    cache.prefill(model, _ids(30, 6), context_start=4, chunk_size=16)
    before = cache.kv_bytes()
    attempt("ratio", lambda: cache.compress(model, 1.5, tokenizer=TOK))
    attempt("ranks-differ", lambda: cache.compress(model, 0.3 + 0.1 * rank, tokenizer=TOK))
    attempt("level", lambda: cache.compress(model, 0.3, level="everything"))
    attempt("config-cache", lambda: KVzipCache(model.config).prefill(model, _ids(30, 6), context_start=4))
    # Rank 1's shard of a weight changes (another fine-tune there): only rank 1 can see it, yet both refuse, before
    # either enters the scoring passes' collectives (a rank going on alone would wait there forever).
    weight = model.model.layers[0].self_attn.k_proj.weight
    shard = weight.to_local() if hasattr(weight, "to_local") else weight
    with torch.no_grad():
        shard.add_(float(rank == 1))
    attempt("other-shard", lambda: cache.compress(model, 0.3, tokenizer=TOK))
    with torch.no_grad():
        shard.sub_(float(rank == 1))
    errors["untouched"] = cache.kv_bytes() == before and not cache.is_compressed
    cache.compress(model, 0.3, tokenizer=TOK)  # the ranks still run together afterwards
    errors["compressed after"] = cache.is_compressed
    return errors


def _worker(rank: int, folder: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import kvzip_cache  # noqa: F401  (registers "kvzip")

        results = {}
        for arch in ARCHS:
            model = _load(os.path.join(folder, arch), parallel=True)
            results[arch] = run_scenarios(model)
            results[arch]["refusals"] = refusals(model, rank)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process results per arch, [rank 0 results, rank 1 results])."""
    folder, out = tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("ranks")
    single = {}
    for arch in ARCHS:
        model, _ = make_pair(arch)
        model.save_pretrained(folder / arch)
        single[arch] = run_scenarios(_load(folder / arch, parallel=False))
    ranks = mp.start_processes(_worker, args=(str(folder), _free_port(), str(out)), nprocs=WORLD,
                               start_method="spawn", join=False)
    deadline = time.monotonic() + 900  # a rank left waiting in a collective fails the test instead of hanging it
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the tensor-parallel ranks did not finish: one is waiting in a collective the other left")
    return single, [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_parallel_selection_and_tokens_equal_one_process(runs, arch):
    single, ranks = runs
    for results in ranks:
        for name, expected in single[arch].items():
            got = results[arch][name]
            assert torch.equal(got["keep"], expected["keep"]), (arch, name)
            assert torch.equal(got["tokens"], expected["tokens"]), (arch, name)
            if "scores" in expected:
                torch.testing.assert_close(got["scores"], expected["scores"], atol=1e-5, rtol=1e-5, equal_nan=True)
            if "again" in expected:
                assert torch.equal(got["again"], expected["tokens"])  # rollback, then the same answer


@pytest.mark.parametrize("arch", ARCHS)
def test_each_rank_holds_half_the_kv(runs, arch):
    single, ranks = runs
    for level in ("pair", "pair-uniform", "head", "fp8"):
        dense, compressed = single[arch][level]["bytes"]
        per_rank = [results[arch][level]["bytes"] for results in ranks]
        assert sum(d for d, _ in per_rank) == dense and all(2 * d == dense for d, _ in per_rank)
        assert sum(c for _, c in per_rank) == compressed  # the two halves of one GPU's kept pairs


@pytest.mark.parametrize("arch", ARCHS)
def test_bad_inputs_are_refused_on_every_rank(runs, arch):
    _, ranks = runs
    for results in ranks:
        errors = results[arch]["refusals"]
        assert errors["ratio"].startswith("ValueError") and "(0, 1]" in errors["ratio"]
        assert errors["ranks-differ"].startswith("ValueError") and "different arguments" in errors["ranks-differ"]
        assert errors["level"].startswith("ValueError") and "unknown level" in errors["level"]
        assert errors["config-cache"].startswith("ValueError") and "KVzipCache(model)" in errors["config-cache"]
        assert errors["untouched"] and errors["compressed after"]
    assert ranks[1][arch]["refusals"]["other-shard"].startswith("ValueError: compress() got a model with other weights")
    assert ranks[0][arch]["refusals"]["other-shard"].startswith("RuntimeError: compress() was refused on "
                                                               "tensor-parallel rank 1")


@pytest.mark.slow  # 13 s: the example script under torchrun; the scenarios above cover the same calls in-process
def test_torchrun_example_runs_on_two_cpu_ranks():
    """The documented command: ``torchrun --nproc-per-node 2 examples/tensor_parallel.py`` (gloo, CPU)."""
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "tensor_parallel.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
         env["MASTER_PORT"], str(example)], capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the same keep mask on every rank" in done.stdout
    halves = [line for line in done.stdout.splitlines() if line.startswith("rank ")]
    assert len(halves) == 2
