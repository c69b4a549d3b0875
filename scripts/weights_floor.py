"""How close a decode step's matrix products alone come to the weights' bandwidth floor.

Issue #30 asks for a compiled decode step within 1.3x of its bandwidth floor (weights + kept KV read once at the
copy bandwidth). The 8B model's own compiled step, with almost no KV, runs at 1.48x its weights' floor. This script
asks what the matrix products of one decode token cost with nothing else around them: each layer's seven
projections (q, k, v, o, gate, up, down) and the LM head, batch 1, bf16, random weights of the ``--model`` shape,
replayed from one CUDA graph (no launch overhead from the host):

- ``separate``: the seven products per layer as the Hugging Face model issues them;
- ``fused``: q|k|v and gate|up concatenated (four products per layer, as serving engines fuse them);
- ``read``: one ``sum`` over each weight matrix (a reduction reads the bytes without a product; what a GEMV could
  reach at best).

Each is reported as ms per token and as a multiple of the weights' floor at the measured copy bandwidth, both for
the bytes those products read and for the model's full weights (which the benchmark's floor uses; it includes the
input embedding, of which a step reads one row).

    python scripts/weights_floor.py --out floor.json        # CUDA only
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from kvzip_cache.bench.common import SHAPES, copy_bandwidth, machine_record


def layer_weights(shape: dict, fused: bool, device: str) -> list[torch.Tensor]:
    """One layer's projection weights ``[out, in]`` in bf16, in the order a step reads them: q, k, v, o, gate, up,
    down; with ``fused``, q|k|v, o, gate|up, down."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * (hidden // shape["num_attention_heads"])
    outs = [hidden + 2 * kv, hidden, 2 * inter] if fused else [hidden, kv, kv, hidden, inter, inter]
    weights = [torch.randn(out, hidden, dtype=torch.bfloat16, device=device) for out in outs]
    return weights + [torch.randn(hidden, inter, dtype=torch.bfloat16, device=device)]  # down


def graph_ms(fn, replays: int = 20) -> float:
    """Median ms of one replay of ``fn`` captured in a CUDA graph (after a warm-up on a side stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(replays + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--out", type=Path, default=Path("weights_floor.json"))
    args = parser.parse_args()
    shape, device = SHAPES[args.model], "cuda"
    bandwidth = copy_bandwidth(device)
    hidden, vocab = shape["hidden_size"], shape["vocab_size"]
    model_bytes = 2 * (shape["num_hidden_layers"] * sum(  # the model's full weights, as the benchmark counts them
        w.numel() for w in layer_weights(shape, False, "meta")) + 2 * vocab * hidden)
    x = torch.randn(1, hidden, dtype=torch.bfloat16, device=device)
    x_inter = torch.randn(1, shape["intermediate_size"], dtype=torch.bfloat16, device=device)
    head = torch.randn(vocab, hidden, dtype=torch.bfloat16, device=device)
    result = {"machine": machine_record(), "model": args.model, "copy_bandwidth_tbps": bandwidth / 1e12,
              "model_weights_gb": model_bytes / 1e9, "variants": {}}
    for variant in ("separate", "fused", "read"):
        layers = [layer_weights(shape, variant == "fused", device) for _ in range(shape["num_hidden_layers"])]
        read_bytes = 2 * (sum(w.numel() for ws in layers for w in ws) + head.numel())

        def step() -> None:
            for weights in layers:
                for w in weights:
                    if variant == "read":
                        w.sum(dtype=torch.float32)
                    else:
                        F.linear(x_inter if w.shape[1] != hidden else x, w)
            head.sum(dtype=torch.float32) if variant == "read" else F.linear(x, head)

        ms = graph_ms(step)
        floor_ms, model_floor_ms = read_bytes / bandwidth * 1e3, model_bytes / bandwidth * 1e3
        result["variants"][variant] = {
            "ms": ms, "read_gb": read_bytes / 1e9, "floor_ms": floor_ms, "x_floor": ms / floor_ms,
            "model_floor_ms": model_floor_ms, "x_model_floor": ms / model_floor_ms,
            "effective_tbps": read_bytes / ms / 1e9,
        }
        print(f"{variant:9s} {ms:6.2f} ms  reads {read_bytes / 1e9:5.2f} GB  {read_bytes / ms / 1e9:4.2f} TB/s  "
              f"{ms / floor_ms:4.2f}x its floor ({floor_ms:.2f} ms)  {ms / model_floor_ms:4.2f}x the model's "
              f"({model_floor_ms:.2f} ms)", flush=True)
        layers.clear()  # (the next variant allocates its own)
        torch.cuda.empty_cache()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s on {torch.cuda.get_device_name()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
