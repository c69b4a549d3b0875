"""Head scores: computation, files, Hub download (against a local server), DuoAttention format, head-level compress."""

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from conftest import ByteTokenizer, make_pair
from kvzip_cache import HeadScores, KVzipCache, encode_context
from kvzip_cache.head_scores import config_fingerprint
from kvzip_cache.tools import compute_head_scores


def _texts():
    gen = torch.Generator().manual_seed(5)
    return ["".join(chr(65 + int(c)) for c in torch.randint(0, 26, (n,), generator=gen)) for n in (30, 45)]


def _scores(arch="qwen2"):
    model, _ = make_pair(arch)
    return model, compute_head_scores(model, ByteTokenizer(), _texts(), progress=False)


def test_compute_is_the_max_over_positions_and_samples_of_pair_scores():
    model, computed = _scores("gemma3")  # sliding layers: never scored, score 0
    tokenizer = ByteTokenizer()
    expected = None
    for text in _texts():
        ids, start = encode_context(tokenizer, text)
        cache = KVzipCache(model)
        cache.prefill(model, ids, context_start=start)
        cache.compress(model, 1.0, tokenizer=tokenizer)
        per_head = cache.scores[:, 0].nan_to_num(0.0).amax(dim=-1)  # [L, H]
        expected = per_head if expected is None else torch.maximum(expected, per_head)
    sliding = [i for i, kind in enumerate(model.config.layer_types) if kind == "sliding_attention"]
    assert sliding and bool((computed.scores[sliding] == 0).all())
    torch.testing.assert_close(computed.scores, expected, rtol=0, atol=1e-6)
    assert computed.fingerprint == config_fingerprint(model) and computed.seconds > 0


def test_save_and_load_round_trip_with_metadata(tmp_path):
    _, computed = _scores()
    path = computed.save(tmp_path)
    assert path.name == "head_scores.safetensors"
    loaded = HeadScores.from_pretrained(tmp_path)
    assert torch.equal(loaded.scores, computed.scores)
    assert (loaded.fingerprint, loaded.calibration, loaded.created) == (
        computed.fingerprint, computed.calibration, computed.created)
    assert loaded.seconds == pytest.approx(computed.seconds, abs=1e-3)


def test_scores_for_another_model_are_refused_before_the_cache_changes():
    _, theirs = _scores("llama")
    model, _ = make_pair("qwen2")
    cache = KVzipCache(model)
    cache.prefill(model, torch.randint(3, 120, (1, 20)), context_start=2)
    with pytest.raises(ValueError, match="do not fit this model.*fingerprint"):
        cache.compress(model, 0.5, level="head", head_scores=theirs)
    assert not cache.is_compressed and cache.layers[0].keys.shape[-2] == 20
    wrong_shape = HeadScores(torch.rand(3, 7))
    with pytest.raises(ValueError, match=r"shape \[3 layers, 7 KV heads\]"):
        wrong_shape.check(model)


def test_head_scores_object_and_tensor_select_the_same_heads():
    model, computed = _scores()
    ids = torch.randint(3, 120, (1, 30))
    masks = []
    for head_scores in (computed, computed.scores.clone()):
        cache = KVzipCache(model)
        cache.prefill(model, ids, context_start=2)
        cache.compress(model, 0.5, level="head", head_scores=head_scores)
        masks.append(cache.keep_mask)
    assert torch.equal(masks[0], masks[1])


def test_duo_attention_files_round_trip(tmp_path):
    _, computed = _scores()
    computed.to_duo_attention(tmp_path, sink_size=32, recent_size=128)
    rows = (tmp_path / "full_attention_heads.tsv").read_text().splitlines()
    assert len(rows) == computed.scores.shape[0]
    assert all(len(row.split("\t")) == computed.scores.shape[1] for row in rows)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["sink_size"] == 32 and config["recent_size"] == 128
    back = HeadScores.from_duo_attention(tmp_path)
    torch.testing.assert_close(back.scores, computed.scores, rtol=1e-5, atol=1e-6)
    assert back.fingerprint == computed.fingerprint


def test_push_to_hub_uploads_a_loadable_file(tmp_path):
    _, computed = _scores()

    class RecordingApi:  # the two HfApi calls push_to_hub makes
        def create_repo(self, repo_id, private=None, exist_ok=False):
            self.repo = (repo_id, exist_ok)

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id, revision=None, commit_message=None):
            self.uploaded = (tmp_path / path_in_repo).write_bytes(Path(path_or_fileobj).read_bytes())
            self.where = (repo_id, path_in_repo, revision)
            return "https://hub.example/commit/1"

    api = RecordingApi()
    assert computed.push_to_hub("me/heads", api=api) == "https://hub.example/commit/1"
    assert api.repo == ("me/heads", True) and api.where == ("me/heads", "head_scores.safetensors", None)
    assert torch.equal(HeadScores.from_pretrained(tmp_path).scores, computed.scores)


# --------------------------------------------------------------------------------- Hub download, local server
class _ResolveHandler(BaseHTTPRequestHandler):
    """Serves ``/{repo}/resolve/{revision}/{file}`` with the headers the Hub sends (commit, ETag, size)."""

    files: dict[tuple[str, str, str], bytes] = {}

    def _send(self, body: bool) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) != 5 or parts[2] != "resolve":
            self.send_error(404)
            return
        data = self.files.get(("/".join(parts[:2]), parts[3], parts[4]))
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", hashlib.sha1(parts[3].encode()).hexdigest())
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):  # noqa: N802 - http.server's naming
        self._send(body=False)

    def do_GET(self):  # noqa: N802
        self._send(body=True)

    def log_message(self, *args):
        pass


_DOWNLOAD = """
import sys, torch
from kvzip_cache import HeadScores
for revision in sys.argv[1:]:
    hs = HeadScores.from_pretrained("org/heads", revision=None if revision == "default" else revision)
    print(revision, hs.scores.sum().item(), hs.model_name)
"""


def _download(env: dict, *revisions: str) -> subprocess.CompletedProcess:
    # huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE when imported: a fresh interpreter sees them like a user's.
    return subprocess.run([sys.executable, "-c", _DOWNLOAD, *revisions], env=env, capture_output=True, text=True,
                          timeout=300)


def test_from_pretrained_downloads_revisions_then_hits_the_offline_cache(tmp_path):
    main, tagged = HeadScores(torch.ones(2, 2), model_name="m-main"), HeadScores(torch.full((2, 2), 2.0), model_name="m-v1")
    _ResolveHandler.files = {
        ("org/heads", rev, "head_scores.safetensors"): hs.save(tmp_path / f"{rev}.safetensors").read_bytes()
        for rev, hs in (("main", main), ("v1", tagged))
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ResolveHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
           "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": ""}
    env.pop("HF_HUB_OFFLINE", None)
    try:
        online = _download(env, "default", "v1")
    finally:
        server.shutdown()
        server.server_close()
    assert online.returncode == 0, online.stderr
    assert online.stdout.split("\n")[:2] == ["default 4.0 m-main", "v1 8.0 m-v1"]

    offline = _download({**env, "HF_HUB_OFFLINE": "1"}, "default", "v1")  # the server is gone: cache only
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.split("\n")[:2] == ["default 4.0 m-main", "v1 8.0 m-v1"]


# ------------------------------------------------------------------------------- dropping heads during prefill
def _chunked_reference_logits(reference, ids, mask, starts, kept_heads, chunk, question):
    """Float64 eager reference of a head-dropping prefill: before each chunk, the dropped heads' context pairs of the
    earlier chunks are hidden; the question then sees none of the dropped heads' context.

    ``kept_heads``: {full-attention layer: [H] bool}.
    """
    from conftest import HIDDEN_PAIRS
    from transformers import DynamicCache

    batch, seq = ids.shape
    full_ids = torch.cat([ids, question], 1)
    full_mask = torch.cat([mask, torch.ones_like(question)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=reference.config)
    in_context = torch.arange(seq)[None, :] >= starts[:, None]  # [B, seq]
    spans = [(lo, min(lo + chunk, seq)) for lo in range(0, seq, chunk)] + [(seq, seq + question.shape[1])]
    try:
        with torch.no_grad():
            for lo, hi in spans:
                visible_context = in_context[:, :lo]
                for layer, heads in kept_heads.items():
                    HIDDEN_PAIRS[layer] = ~heads[None, :, None] & visible_context[:, None, :]
                out = reference(input_ids=full_ids[:, lo:hi], attention_mask=full_mask[:, :hi],
                                position_ids=positions[:, lo:hi], past_key_values=cache, use_cache=True)
    finally:
        HIDDEN_PAIRS.clear()
    return out.logits


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_prefill_dropping_heads_equals_the_chunked_masked_reference(arch):
    model, reference = make_pair(arch)
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 120, (2, 29), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    starts = torch.tensor([2, 6])
    layers = model.config.num_hidden_layers
    head_scores = torch.tensor([[0.1, 0.9], [0.8, 0.2]] * layers)[:layers]  # a dropped head in every layer
    cache = KVzipCache(model)
    cache.prefill(model, ids, mask, context_start=starts, chunk_size=8, head_scores=head_scores, ratio=0.5)

    after = KVzipCache(model)  # the same selection made after a full prefill
    after.prefill(model, ids, mask, context_start=starts)
    after.compress(model, 0.5, level="head", head_scores=head_scores)
    assert cache.compressed_with == ("head", 0.5)
    assert torch.equal(cache.keep_mask, after.keep_mask)
    assert cache.kv_bytes() == after.kv_bytes()

    kept = cache.keep_mask.any(dim=(1, 3))  # [L, H]
    kept_heads = {i: kept[i] for i in cache.compressible_layers}  # sliding layers: nothing hidden
    question = torch.randint(3, 120, (2, 5), generator=gen)
    expected = _chunked_reference_logits(reference, ids, mask, starts, kept_heads, 8, question)
    full_mask = cache.inputs_for(question)["attention_mask"]
    positions = (full_mask.cumsum(-1) - 1)[:, -question.shape[1]:]
    with torch.no_grad():
        got = model(input_ids=question, attention_mask=full_mask, position_ids=positions, past_key_values=cache).logits
    torch.testing.assert_close(got.double(), expected[:, -question.shape[1]:].double(), atol=1e-4, rtol=0)
    if arch == "llama":  # the reference tells the two apart: dropping during the prefill changes later chunks
        with torch.no_grad():
            post_hoc = model(input_ids=question, attention_mask=full_mask, position_ids=positions,
                             past_key_values=after).logits
        assert (post_hoc.double() - got.double()).abs().max() > 1e-3


def test_prefill_head_arguments_are_checked_before_anything_runs():
    model, _ = make_pair("llama")
    cache = KVzipCache(model)
    ids = torch.randint(3, 120, (1, 10))
    with pytest.raises(ValueError, match=r"prefill\(ratio=\.\.\.\) evicts while filling and needs scorer="):
        cache.prefill(model, ids, ratio=0.5)
    with pytest.raises(ValueError, match="fraction of context pairs KEPT"):
        cache.prefill(model, ids, head_scores=torch.rand(2, 2), ratio=1.5)
    with pytest.raises(ValueError, match=r"\[num_layers, num_kv_heads\]"):
        cache.prefill(model, ids, head_scores=torch.rand(3, 7), ratio=0.5)
    assert cache.get_seq_length() == 0 and cache.input_ids is None
