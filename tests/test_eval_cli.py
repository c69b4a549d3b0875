"""The evaluation on any model and device: model specs (folder, Hub id), the CLI's errors, a user's JSONL task,
bootstrap intervals, and batched evaluation giving the answers of the unbatched one."""

import json
import math
import os
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import VOCAB, ByteTokenizer, make_pair
from kvzip_cache.eval import EvalConfig, run_eval, runner
from kvzip_cache.eval.__main__ import parse_args
from kvzip_cache.eval.stats import bootstrap_interval
from kvzip_cache.eval.tasks import Context, Question, jsonl_contexts, load_task, score
from kvzip_cache.zoo.loading import load_model
from test_head_scores import _ResolveHandler


# ------------------------------------------------------------------------------------------------ intervals
def test_bootstrap_interval_constant_deterministic_and_near_the_normal_approximation():
    assert bootstrap_interval([0.4] * 50) == pytest.approx((0.4, 0.4))
    assert bootstrap_interval([1.0]) == (1.0, 1.0)
    values = [1.0] * 120 + [0.0] * 280  # p = 0.3, n = 400
    lo, hi = bootstrap_interval(values, seed=3)
    assert bootstrap_interval(values, seed=3) == (lo, hi) and bootstrap_interval(values, seed=4) != (lo, hi)
    half = 1.959964 * math.sqrt(0.3 * 0.7 / 400)  # normal approximation: 0.045
    assert lo < 0.3 < hi
    assert lo == pytest.approx(0.3 - half, abs=0.01) and hi == pytest.approx(0.3 + half, abs=0.01)
    # [0, 1]: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4 -> the 95% interval is [0, 1]
    assert bootstrap_interval([0.0, 1.0], resamples=4000) == (0.0, 1.0)


def test_summary_shows_mean_interval_n_and_contexts():
    # one question per context: the context-clustered interval is the per-question one
    rows = [{"task": "needle", "context_id": f"needle-{i}", "question_id": "needle-0.5", "method": "kvzip",
             "ratio": 0.3, "scores": {"contains": float(i % 2)}} for i in range(10)]
    text = runner.summary_markdown(rows, EvalConfig(methods=["kvzip"], ratios=[0.3]))
    lo, hi = bootstrap_interval([float(r["scores"]["contains"]) for r in sorted(rows, key=lambda r: r["context_id"])])
    assert f"| kvzip | 10 | 10 | 0.500 [{lo:.3f}, {hi:.3f}] |" in text
    assert "paired difference" not in text  # one method: nothing to compare


# ------------------------------------------------------------------------------------------- user JSONL task
def _write(path: Path, *lines) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_user_jsonl_task_reads_contexts_questions_and_scores_contains_and_f1(tmp_path):
    path = _write(tmp_path / "mine.jsonl",
                  {"context": "Ada lives in Lyon.", "questions": [{"question": "Where?", "answers": ["Lyon"]}]},
                  "",
                  {"id": "doc", "context": "B.", "questions": [{"id": "x", "question": "Q1", "answers": ["a", "b"]},
                                                              {"question": "Q2", "answers": ["c"]}]})
    contexts = load_task(str(path), None)
    assert [c.cid for c in contexts] == ["mine-1", "doc"]
    assert [q.qid for q in contexts[1].questions] == ["x", "doc-q1"]
    assert load_task(str(path), None, num_contexts=1)[0].questions[0].answers == ["Lyon"]
    assert len(load_task(str(path), None, max_questions=1)[1].questions) == 1
    assert score(str(path), "in Lyon", ["Lyon"]) == {"contains": 1.0, "f1": pytest.approx(2 / 3)}


@pytest.mark.parametrize("line, expected", [
    ("{not json", r"line 2 is not JSON"),
    ({"questions": [{"question": "q", "answers": ["a"]}]}, r'line 2: missing "context"'),
    ({"context": "c"}, r'line 2: missing "questions"'),
    ({"context": "c", "questions": [{"question": "q", "answers": ["a"]}, {"answers": ["a"]}]},
     r'line 2: questions\[1\] has no "question"'),
    ({"context": "c", "questions": [{"question": "q", "answer": "a"}]}, r'line 2: questions\[0\] has no "answers"'),
])
def test_malformed_jsonl_lines_say_where_and_what(tmp_path, line, expected):
    good = {"context": "c", "questions": [{"question": "q", "answers": ["a"]}]}
    path = _write(tmp_path / "bad.jsonl", good, line)
    with pytest.raises(ValueError, match=expected):
        jsonl_contexts(path)


# ---------------------------------------------------------------------------------------------- CLI errors
@pytest.mark.parametrize("flags, expected", [
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
    (["--model", "./no/such/folder"], "no such folder"),
    (["--tasks", "needle", "missing.jsonl"], "task file 'missing.jsonl' does not exist"),
    (["--tasks", "nedle"], "unknown task 'nedle'"),
    (["--batch-contexts", "0"], "--batch-contexts must be >= 1"),
    (["--methods", "kvzip", "random", "--paired-reference", "full"], "--paired-reference 'full' is not one of"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda:0"], "CUDA is not available")]))
def test_cli_errors_are_one_clear_line(flags, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--out", "x", *flags])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_cli_accepts_task_alias_jsonl_device_and_dtype(tmp_path):
    path = _write(tmp_path / "m.jsonl", {"context": "c", "questions": [{"question": "q", "answers": ["a"]}]})
    config = parse_args(["--out", "x", "--task", "needle", str(path), "--device", "cpu", "--dtype", "bf16",
                         "--batch-contexts", "4"])
    assert config.tasks == ["needle", str(path)] and config.dtype == "bf16" and config.batch_contexts == 4


# ------------------------------------------------------------------------------------------- model loading
def _tiny_checkpoint(folder: Path) -> Path:
    """A tiny random Llama and a word-level tokenizer, saved as a Hub checkpoint would be."""
    model, _ = make_pair("llama")
    model.save_pretrained(folder)
    words = ["[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return folder


def test_load_model_from_a_folder_with_dtype(tmp_path):
    folder = _tiny_checkpoint(tmp_path / "ckpt")
    model, tokenizer = load_model(str(folder), device="cpu")
    assert model.config._attn_implementation == "kvzip" and model.dtype == torch.float32 and not model.training
    assert tokenizer.encode("w1 w2", add_special_tokens=False) == [4, 5]
    reference, _ = make_pair("llama")
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert load_model(str(folder), device="cpu", dtype="bfloat16")[0].dtype == torch.bfloat16


class _HubHandler(_ResolveHandler):
    """The head-score tests' Hub (``resolve`` URLs from ``files``), plus the empty folder listings that
    transformers asks for (extra chat templates)."""

    def _send(self, body: bool) -> None:
        if self.path.startswith("/api/models/") and "/tree/" in self.path:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            if body:
                self.wfile.write(b"[]")
            return
        super()._send(body)


_LOAD = """
from kvzip_cache.zoo.loading import load_model
model, tokenizer = load_model("org/tiny", device="cpu")
print(model.config._attn_implementation, float(model.lm_head.weight.sum()), tokenizer.encode("w1", add_special_tokens=False))
"""


def test_load_model_from_a_hub_id_then_offline(tmp_path):
    folder = _tiny_checkpoint(tmp_path / "served")
    _HubHandler.files = {("org/tiny", "main", f.name): f.read_bytes() for f in folder.iterdir()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
           "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": ""}
    env.pop("HF_HUB_OFFLINE", None)

    def load(environment):  # a fresh interpreter: huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE on import
        return subprocess.run([sys.executable, "-c", _LOAD], env=environment, capture_output=True, text=True,
                              timeout=300)

    try:
        online = load(env)
    finally:
        server.shutdown()
        server.server_close()
    assert online.returncode == 0, online.stderr[-3000:]
    expected = float(make_pair("llama")[0].lm_head.weight.detach().sum())
    name, total, ids = online.stdout.split(" ", 2)
    assert name == "kvzip" and float(total) == pytest.approx(expected) and ids.strip() == "[4]"
    offline = load({**env, "HF_HUB_OFFLINE": "1"})  # the server is gone: the Hub cache only
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert offline.stdout == online.stdout


# --------------------------------------------------------------------------------------- batched evaluation
class _DecodingTokenizer(ByteTokenizer):
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + int(i) % 26) for i in ids)


def _uneven_contexts(task, tokenizer, num_contexts, context_tokens, max_questions, seed):
    """Three contexts of different lengths with 2, 1 and 3 questions of different lengths (padding everywhere)."""
    counts, lengths = (2, 1, 3), (70, 52, 90)
    return [Context(f"c{i}", ("context words %d " % i * 20)[:n],
                    [Question(f"q{j}", "which one " * (j + 1), ["x"]) for j in range(k)])
            for i, (k, n) in enumerate(zip(counts, lengths))]


def test_batched_run_gives_the_unbatched_answers_and_resumes(monkeypatch, tmp_path):
    monkeypatch.setattr(runner, "load_task", _uneven_contexts)
    monkeypatch.setattr(runner, "plot", lambda *args: None)  # matplotlib takes seconds; test_eval draws one
    model, _ = make_pair("llama")
    methods = ["full", "kvzip", "kvzip-head", "random", "streaming", "snapkv", "h2o"]
    predictions = {}
    for batch in (1, 3):
        config = EvalConfig(model="tiny", methods=methods, ratios=[0.5, 0.2], max_new_tokens=4, batch_contexts=batch,
                            out=str(tmp_path / f"b{batch}"))
        rows = run_eval(config, model, _DecodingTokenizer())
        assert len(rows) == 6 * (1 + 2 * (len(methods) - 1)) and {r["batch"] for r in rows} == {batch}
        predictions[batch] = {runner.row_key(r): r["prediction"] for r in rows}
    assert predictions[1] == predictions[3]
    assert len(set(predictions[3].values())) > 10  # the random model's answers differ: the comparison means something

    # resume a batched run with some rows missing: only those are asked again, with the same answers
    path = tmp_path / "b3" / "results.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[::2]) + "\n")
    config = EvalConfig(model="tiny", methods=methods, ratios=[0.5, 0.2], max_new_tokens=4, batch_contexts=3,
                        out=str(tmp_path / "b3"))
    rows = run_eval(config, model, _DecodingTokenizer())
    assert len(path.read_text().splitlines()) == len(lines)
    assert {runner.row_key(r): r["prediction"] for r in rows} == predictions[1]


def test_resuming_with_another_context_length_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"context_tokens": 4000, "seed": 0}))
    with pytest.raises(ValueError, match="context_tokens=4000"):
        run_eval(EvalConfig(model="tiny", methods=["full"], context_tokens=7000, out=str(tmp_path)),
                 *make_pair("llama")[:1], _DecodingTokenizer())
