"""Trained predictors of KVzip scores: evict without the reconstruction pass (KVzap / Fast KVzip style).

For every full-attention layer, a small model (``"linear"`` or a 2-layer ``"mlp"``) maps what the cache holds for
one context position - the keys of all KV heads, un-rotated to before RoPE with the model's own rotary embedding,
and their values - to the predicted log KVzip score of each KV head at that position::

    predictor = ScorePredictor.from_pretrained("smollm2-135m")        # shipped, a file, a folder or a Hub repo
    cache.prefill(model, ids, context_start=start)
    cache.compress(model, 0.3, scorer=predictor)                       # no forward pass
    # or evict while prefilling: the full cache never exists
    cache.prefill(model, ids, context_start=start, scorer=predictor, ratio=0.3)

Bound to its model (`PredictorScorer`, what ``scorer=predictor`` builds), a predictor is a layer scorer
(`kvzip_cache.scorers.base`): it rates whatever a cache layer holds, so it also evicts while decoding. Training lives
in `kvzip_cache.tools.training` (``train_score_predictor``).

Why these features (measured, see docs/score-predictors.md): keys and values are everything the cache keeps about
a pair, so the same features exist after a prefill (compress) and chunk by chunk during one (eviction while
prefilling), with no hook and no stored activations. Pre-RoPE keys are linear in the layer's normalised input
(``k_proj(norm(h))``), as are the values, so together they carry most of what KVzap reads from ``h``; the rotation
only adds position, which a small per-position model cannot use well. The target is ``log(max(score, 1e-6))``:
rankings, not probabilities, decide evictions, and the log spreads the scores that matter.

Files are safetensors (every layer's weights plus its input standardisation) with JSON metadata: model, config
fingerprint, feature spec, target, kind, training data, held-out metrics, library version, date, seconds.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .._version import __version__
from ..artifacts import make_readable, resolve_artifact
from ..config import config_fingerprint, full_attention_layers, kv_shape, text_config
from ..parallel import TensorParallel, tensor_parallel_of
from .reconstruction import RECONSTRUCTION_TARGETS
from .rotary import rotary_tables, unrotate

FEATURES = ("key+value", "key", "rotated-key+value")
"""Feature specs: pre-RoPE keys and values (default), pre-RoPE keys only, post-RoPE (cached as is) keys and values."""
KINDS = ("linear", "mlp")
TARGETS = RECONSTRUCTION_TARGETS  # a predictor learns the scores of one reconstruction target
SCORE_FLOOR = 1e-6  # scores below this are the same "evict" to a ranking; the log target is floored there
PREDICTOR_FILE = "score_predictor.safetensors"
_FORMAT = "kvzip-score-predictor/1"
_BLOCK = 8192  # positions per predictor call: bounds the float32 feature block ([B, block, F]) on long contexts


def log_target(scores: torch.Tensor) -> torch.Tensor:
    """The regression target of KVzip (or KVzip+) scores: ``log(max(score, SCORE_FLOOR))`` in float32."""
    return scores.float().clamp(min=SCORE_FLOOR).log()


def pair_features(spec: str, keys: torch.Tensor, values: torch.Tensor, cos: torch.Tensor | None,
                  sin: torch.Tensor | None) -> torch.Tensor:
    """Per-position features of one layer's cached pairs.

    Args:
        spec: one of `FEATURES`.
        keys: ``[B, H, t, D]`` as the cache holds them (post-RoPE).
        values: ``[B, H, t, D]``.
        cos: ``[B, t, R]`` RoPE table at the pairs' positions (`rotary_tables`); unused for ``"rotated-key+value"``.
        sin: ``[B, t, R]``, likewise.

    Returns:
        ``[B, t, F]``: the KV heads' features side by side (``F = H * D`` or ``2 * H * D``), in the keys' dtype when
        that is bf16 or fp16 (half the bytes of every pass over them, and tensor cores for the first layer: the
        predicted compress is a few percent of a prefill only so), else float32.
    """
    if spec not in FEATURES:
        raise ValueError(f"unknown feature spec {spec!r}; choose one of {FEATURES}")
    dtype = keys.dtype if keys.dtype in (torch.bfloat16, torch.float16) else torch.float32
    key_part = keys.to(dtype) if spec == "rotated-key+value" else unrotate(keys, cos, sin, dtype)
    parts = [key_part] if spec == "key" else [key_part, values.to(dtype)]
    return torch.cat(parts, dim=-1).permute(0, 2, 1, 3).flatten(2)


def feature_size(spec: str, num_kv_heads: int, head_dim: int) -> int:
    return num_kv_heads * head_dim * (1 if spec == "key" else 2)


class LayerPredictor(nn.Module):
    """One layer's predictor: standardise the ``[..., F]`` features, then linear or Linear-GELU-Linear to ``[..., H]``."""

    def __init__(self, in_features: int, num_kv_heads: int, hidden: int | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        if hidden is None:
            self.net = nn.Linear(in_features, num_kv_heads)
        else:
            self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, num_kv_heads))

    @property
    def first(self) -> nn.Linear:
        """The linear layer that reads the features."""
        return self.net if isinstance(self.net, nn.Linear) else self.net[0]

    def folded_input_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer with the standardisation folded in: ``(weight [hidden, F], bias [hidden])`` float32.

        W (x - m) / s + b = (W / s) x + (b - (W / s) m), so the ``[N, F]`` features are read once instead of going
        through a subtraction and a division first."""
        weight = self.first.weight / self.std
        return weight, self.first.bias - weight @ self.mean

    def forward(self, features: torch.Tensor, parallel: TensorParallel | None = None) -> torch.Tensor:
        """``[..., F]`` features -> ``[..., H]`` float32 predicted log scores (half-precision features meet the first
        layer's weights in their dtype; what follows it runs in float32).

        ``parallel``: tensor parallelism, ``features`` holding only this rank's KV heads' columns (``[..., F / W]``).
        The first layer is then row-parallel: each rank multiplies its columns, one all-reduce sums the partial
        pre-activations (``[..., hidden]``, much smaller than the features), and every rank gets all heads' outputs.
        """
        if parallel is None:
            weight, bias = self.folded_input_layer()
            hidden = nn.functional.linear(features, weight.to(features.dtype), bias.to(features.dtype)).float()
        else:  # folded as there, over this rank's columns
            columns = features.shape[-1]
            weight = (self.first.weight / self.std)[:, parallel.rank * columns : (parallel.rank + 1) * columns]
            mean = self.mean.narrow(0, parallel.rank * columns, columns)
            partial = nn.functional.linear(features, weight.to(features.dtype), (-(weight @ mean)).to(features.dtype))
            hidden = parallel.all_reduce(partial.float()) + self.first.bias
        return hidden if self.first is self.net else self.net[2](self.net[1](hidden))


class StackedPredictors:
    """Several layers' `LayerPredictor` as batched matrix products: ``[n, N, F]`` -> ``[n, N, H]``, where
    ``layers[i](features[i])`` would take one call (about ten operations) per layer.

    What an eviction while decoding needs: it rates a short window of every layer, where issuing the operations on
    the host costs far more than the arithmetic. Built from the layers' current weights (`ScorePredictor` rebuilds
    it when a weight changed); the results equal the layers' own up to the rounding of a batched product.

    Args:
        layers: the layers' predictors, all of one kind and shape.
        dtype: the features' dtype (the first product runs in it, as `LayerPredictor.forward`).
    """

    def __init__(self, layers: list[LayerPredictor], dtype: torch.dtype) -> None:
        folded = [layer.folded_input_layer() for layer in layers]
        self.weight = torch.stack([weight for weight, _ in folded]).transpose(1, 2).to(dtype)  # [n, F, hidden]
        self.bias = torch.stack([bias for _, bias in folded]).unsqueeze(1).to(dtype)  # [n, 1, hidden]
        self.activation = None if layers[0].first is layers[0].net else layers[0].net[1]
        if self.activation is not None:
            self.out_weight = torch.stack([layer.net[2].weight for layer in layers]).transpose(1, 2)  # [n, hidden, H]
            self.out_bias = torch.stack([layer.net[2].bias for layer in layers]).unsqueeze(1)  # [n, 1, H]

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        hidden = torch.baddbmm(self.bias, features, self.weight).float()
        if self.activation is None:
            return hidden
        return torch.baddbmm(self.out_bias, self.activation(hidden), self.out_weight)


@dataclass
class ScorePredictor:
    """Per-layer predictors of log KVzip scores: ``compress(model, r, scorer=predictor)``, ``prefill(..., scorer=predictor,
    ratio=r)``, ``evict_while_decoding(model, predictor, r)``.

    Attributes:
        layers: ``{layer index: LayerPredictor}`` for every full-attention layer.
        kind: ``"linear"`` or ``"mlp"``.
        target: what it was trained to predict: ``"kvzip"`` or ``"kvzip+"`` scores.
        features: the feature spec (see `FEATURES`).
        num_layers: the model's number of layers.
        num_kv_heads: its KV heads per layer.
        head_dim: its head dimension.
        model_name: the model it was made for.
        fingerprint: `config_fingerprint` of that model.
        training: how it was trained (texts, tokens, seconds, hyper-parameters).
        metrics: held-out evaluation (per-layer R2 / Spearman, kept-set overlap with exact KVzip per ratio).
    """

    layers: dict[int, LayerPredictor]
    kind: str
    target: str = "kvzip"
    features: str = "key+value"
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    model_name: str = ""
    fingerprint: str = ""
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    library_version: str = __version__
    created: str = field(default_factory=lambda: datetime.date.today().isoformat())
    _stacked_cache: tuple | None = field(default=None, init=False, repr=False, compare=False)

    # ---------------------------------------------------------------------------------------------- construction
    @classmethod
    def init(cls, model_or_config, kind: str = "mlp", *, features: str = "key+value", target: str = "kvzip",
             hidden: int | None = None, seed: int = 0, model_name: str | None = None) -> ScorePredictor:
        """An untrained predictor for a model (random weights, seeded): the start of training, or for benchmarks,
        whose speed and memory do not depend on the weights.

        ``hidden``: the MLP's width; default ``F // 8`` (KVzap's ratio), at least 16.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown predictor kind {kind!r}; choose one of {KINDS}")
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
        config = text_config(model_or_config)
        num_heads, head_dim = kv_shape(config)
        in_features = feature_size(features, num_heads, head_dim)
        width = None if kind == "linear" else (hidden or max(16, in_features // 8))
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # nn.Linear initialises from the global generator; restored below
        try:
            layers = {i: LayerPredictor(in_features, num_heads, width) for i in full_attention_layers(config)}
        finally:
            torch.random.set_rng_state(generator_state)
        name = model_name if model_name is not None else str(getattr(config, "name_or_path", "") or "")
        return cls(layers=layers, kind=kind, target=target, features=features, num_layers=config.num_hidden_layers,
                   num_kv_heads=num_heads, head_dim=head_dim, model_name=name,
                   fingerprint=config_fingerprint(model_or_config))

    @classmethod
    def train(cls, *args, **kwargs):
        """Moved: training runs the cache, so it lives with the tools (the core never imports them)."""
        raise AttributeError("ScorePredictor.train moved to kvzip_cache.tools.train_score_predictor(model, tokenizer, "
                             "texts=None, kind=..., target=...), with the same arguments")

    # ------------------------------------------------------------------------------------------------ prediction
    @property
    def hidden(self) -> int | None:
        net = next(iter(self.layers.values())).net
        return net[0].out_features if isinstance(net, nn.Sequential) else None

    def to(self, device: torch.device | str) -> ScorePredictor:
        """Move every layer's weights (in place) and return self."""
        for module in self.layers.values():
            module.to(device)
        return self

    @torch.no_grad()
    def predict(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, cos: torch.Tensor | None,
                sin: torch.Tensor | None, parallel: TensorParallel | None = None) -> torch.Tensor:
        """Predicted log scores of one layer's cached pairs.

        Args:
            layer_idx: a full-attention layer.
            keys: ``[B, H, t, D]`` as cached (post-RoPE); under tensor parallelism this rank's ``H / W`` heads.
            values: ``[B, H, t, D]``, likewise.
            cos: ``[B, t, R]`` RoPE table at the pairs' positions (`rotary_tables`).
            sin: ``[B, t, R]``, likewise.
            parallel: the cache's `TensorParallel`, or None (see `LayerPredictor.forward`).

        Returns:
            ``[B, H, t]`` float32 for ALL the model's KV heads (also under tensor parallelism), higher = more
            important (comparable across layers: one pair-level top-k).
        """
        module = self.layers.get(layer_idx)
        if module is None:
            raise ValueError(f"this predictor has no layer {layer_idx} (it covers the full-attention layers "
                             f"{sorted(self.layers)})")
        if module.mean.device != keys.device:
            module.to(keys.device)  # (in place; moving a module costs more than predicting a window)
        batch, _, length, _ = keys.shape
        out = torch.empty(batch, self.num_kv_heads, length, dtype=torch.float32, device=keys.device)
        for lo in range(0, length, _BLOCK):
            hi = min(lo + _BLOCK, length)
            block_cos = None if cos is None else cos[:, lo:hi]
            block_sin = None if sin is None else sin[:, lo:hi]
            features = pair_features(self.features, keys[:, :, lo:hi], values[:, :, lo:hi], block_cos, block_sin)
            out[:, :, lo:hi] = module(features, parallel).transpose(1, 2)
        return out

    @torch.no_grad()
    def predict_layers(self, layer_indices: list[int], keys: torch.Tensor, values: torch.Tensor,
                       cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        """`predict` for several layers at once, without tensor parallelism: a few batched operations instead of a
        dozen per layer (eviction while decoding rates every layer's window between two decode steps).

        Args:
            layer_indices: ``n`` full-attention layers.
            keys: ``[n, B, H, t, D]``: layer ``layer_indices[i]``'s cached keys in ``keys[i]`` (post-RoPE).
            values: ``[n, B, H, t, D]``, likewise.
            cos: ``[B, t, R]`` RoPE table at the pairs' positions, as for `predict`.
            sin: ``[B, t, R]``, likewise.

        Returns:
            ``[n, B, H, t]`` float32, what `predict` returns for each layer (up to the rounding of batched products).
        """
        missing = [idx for idx in layer_indices if idx not in self.layers]
        if missing:
            raise ValueError(f"this predictor has no layers {missing} (it covers the full-attention layers "
                             f"{sorted(self.layers)})")
        layers, batch, heads, length, dim = keys.shape
        # the layers side by side as more KV heads of one layer: one pass builds every layer's features
        as_heads = (batch, layers * heads, length, dim)
        features = pair_features(self.features, keys.transpose(0, 1).reshape(as_heads),
                                 values.transpose(0, 1).reshape(as_heads), cos, sin)  # [B, t, n * F]
        features = features.view(batch * length, layers, -1).transpose(0, 1)  # [n, B * t, F]
        out = self._stacked(layer_indices, keys.device, features.dtype)(features)  # [n, B * t, H]
        return out.view(layers, batch, length, -1).transpose(2, 3)

    def _stacked(self, layer_indices: list[int], device: torch.device, dtype: torch.dtype) -> StackedPredictors:
        """The `StackedPredictors` of these layers, rebuilt only when a weight changed (its version counter moved:
        training steps and loads do) or the layers, device or dtype differ."""
        modules = [self.layers[idx] for idx in layer_indices]
        if modules[0].mean.device != device:
            for module in modules:
                module.to(device)
        tensors = [t for m in modules for t in (m.mean, m.std, m.first.weight, m.first.bias)]
        if modules[0].first is not modules[0].net:
            tensors += [t for m in modules for t in (m.net[2].weight, m.net[2].bias)]
        key = (device, dtype, tuple(layer_indices), tuple((id(t), t._version) for t in tensors))
        if self._stacked_cache is None or self._stacked_cache[0] != key:
            self._stacked_cache = (key, StackedPredictors(modules, dtype))
        return self._stacked_cache[1]

    # ----------------------------------------------------------------------------------------------------- checks
    def check(self, model_or_config) -> None:
        """Raise a ValueError that says what differs unless this predictor was made for the model's architecture."""
        config = text_config(model_or_config)
        problems = []
        theirs = config_fingerprint(model_or_config)
        if self.fingerprint and self.fingerprint != theirs:
            problems.append(f"config fingerprint {self.fingerprint} vs the model's {theirs}")
        num_heads, head_dim = kv_shape(config)
        if (self.num_layers, self.num_kv_heads, self.head_dim) != (config.num_hidden_layers, num_heads, head_dim):
            problems.append(
                f"[{self.num_layers} layers, {self.num_kv_heads} KV heads, head_dim {self.head_dim}] vs the model's "
                f"[{config.num_hidden_layers}, {num_heads}, {head_dim}]"
            )
        elif sorted(self.layers) != full_attention_layers(config):
            problems.append(f"predictors for layers {sorted(self.layers)} vs the model's full-attention layers "
                            f"{full_attention_layers(config)}")
        if problems:
            raise ValueError(
                f"this score predictor was made for {self.model_name or 'another model'!r} and does not fit this "
                f"model: {'; '.join(problems)}. Train one for it with kvzip_cache.tools.train_score_predictor(model, tokenizer) or "
                "`python -m kvzip_cache.train_predictor --model NAME`."
            )

    # ------------------------------------------------------------------------------------------------ save / load
    def metadata(self) -> dict[str, str]:
        return {
            "format": _FORMAT,
            "kind": self.kind,
            "target": self.target,
            "features": self.features,
            "hidden": "" if self.hidden is None else str(self.hidden),
            "num_layers": str(self.num_layers),
            "num_kv_heads": str(self.num_kv_heads),
            "head_dim": str(self.head_dim),
            "layers": json.dumps(sorted(self.layers)),
            "model_name": self.model_name,
            "fingerprint": self.fingerprint,
            "training": json.dumps(self.training),
            "metrics": json.dumps(self.metrics),
            "library_version": self.library_version,
            "created": self.created,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one safetensors file (a directory gets ``score_predictor.safetensors`` inside it)."""
        path = Path(path)
        if path.is_dir():
            path = path / PREDICTOR_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{idx}.{name}": tensor.detach().cpu().contiguous()
                   for idx, module in self.layers.items() for name, tensor in module.state_dict().items()}
        save_file(tensors, str(path), metadata=self.metadata())
        make_readable(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ScorePredictor:
        """Read a file written by `save`."""
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            found = meta.get("format")
            if found != _FORMAT:
                if str(found).startswith(_FORMAT.split("/")[0] + "/"):
                    raise ValueError(f"{path} is a score predictor of format {found!r}; this kvzip-cache reads "
                                     f"{_FORMAT!r}: install the kvzip-cache version that wrote it, or retrain with "
                                     "`python -m kvzip_cache.train_predictor`")
                raise ValueError(f"{path} is not a kvzip-cache score predictor file (format {found!r}, "
                                 f"expected {_FORMAT!r})")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        hidden = int(meta["hidden"]) if meta.get("hidden") else None
        num_heads = int(meta["num_kv_heads"])
        layers = {}
        for idx in json.loads(meta["layers"]):
            state = {name.split(".", 1)[1]: t for name, t in tensors.items() if name.split(".", 1)[0] == str(idx)}
            module = LayerPredictor(state["mean"].numel(), num_heads, hidden)
            module.load_state_dict(state)
            layers[idx] = module.eval()
        return cls(layers=layers, kind=meta["kind"], target=meta["target"], features=meta["features"],
                   num_layers=int(meta["num_layers"]), num_kv_heads=num_heads, head_dim=int(meta["head_dim"]),
                   model_name=meta.get("model_name", ""), fingerprint=meta.get("fingerprint", ""),
                   training=json.loads(meta.get("training") or "{}"), metrics=json.loads(meta.get("metrics") or "{}"),
                   library_version=meta.get("library_version", ""), created=meta.get("created", ""))

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], filename: str | None = None,
                        revision: str | None = None, *, kind: str | None = None, model=None,
                        cache_dir: str | os.PathLike[str] | None = None, token: str | bool | None = None,
                        ) -> ScorePredictor:
        """Load a predictor shipped with the library, from a file or folder, or from the Hugging Face Hub.

        Args:
            name_or_path: a short model name with shipped predictors (``"smollm2-135m"``; see
                `shipped_predictors`), a file, a folder holding ``filename``, or a Hub repo id (``"user/name"``),
                downloaded through ``huggingface_hub`` (its cache, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``).
            filename: file inside the folder or repo; default ``score_predictor.safetensors``.
            kind: for a shipped predictor, ``"linear"`` or ``"mlp"``; default: the one the manifest recommends.
            model: when given, `check` the predictor against it.
        """
        entry = shipped_predictors().get(str(name_or_path)) if not Path(name_or_path).exists() else None
        shipped = None
        if entry is not None:
            choice = kind or entry["default"]
            if choice not in entry["files"]:
                raise ValueError(f"no shipped {choice!r} predictor for {name_or_path}; shipped: {sorted(entry['files'])}")
            shipped = _shipped_dir() / entry["files"][choice]
        path = resolve_artifact(
            name_or_path, filename or PREDICTOR_FILE, shipped,
            f"a model with shipped predictors ({', '.join(sorted(shipped_predictors()))}). Train one with "
            "`python -m kvzip_cache.train_predictor --model NAME`.",
            revision=revision, cache_dir=cache_dir, token=token,
        )
        predictor = cls.load(path)
        if model is not None:
            predictor.check(model)
        return predictor


class PredictorScorer:
    """A `ScorePredictor` bound to its model: the layer scorer behind ``scorer=predictor`` (and ``"predicted"``).

    Its scores are predicted log KVzip scores, comparable across layers and heads (one pair-level top-k). RoPE is
    undone with the model's own rotary embedding; the tables are computed once per ``positions`` tensor (the cache
    passes the same one for every layer of a round).

    Args:
        predictor: a predictor made for ``model``'s architecture (checked).
        model: the model whose cache it rates.
    """

    name, level = "predicted", "pair"

    def __init__(self, predictor: ScorePredictor, model) -> None:
        predictor.check(model)
        self.predictor, self.model = predictor, model
        self.parallel = tensor_parallel_of(model, predictor.num_kv_heads)
        self._tables: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None] | None = None

    def score_layer(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
        """``[B, H, t]`` float32 predicted log scores of the layer's pairs (this rank's heads)."""
        cos, sin = self._rotary(positions)
        if cos is not None:
            cos, sin = cos.to(keys.device), sin.to(keys.device)
        scores = self.predictor.predict(layer_idx, keys, values, cos, sin, self.parallel)
        return scores if self.parallel is None else self.parallel.local(scores, dim=1)

    def score_layers(self, layer_indices: list[int], keys: torch.Tensor, values: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
        """``[n, B, H, t]`` float32 predicted log scores of several layers' pairs (``[n, B, H, t, D]`` each): one
        batched pass (`ScorePredictor.predict_layers`); layer by layer under tensor parallelism."""
        if self.parallel is not None:
            return torch.stack([self.score_layer(idx, layer_keys, layer_values, positions)
                                for idx, layer_keys, layer_values in zip(layer_indices, keys, values)])
        cos, sin = self._rotary(positions)
        if cos is not None:
            cos, sin = cos.to(keys.device), sin.to(keys.device)
        return self.predictor.predict_layers(layer_indices, keys, values, cos, sin)

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.predictor.features == "rotated-key+value":
            return None, None
        if self._tables is None or self._tables[0] is not positions:
            self._tables = (positions, rotary_tables(self.model, positions.clamp(min=0)))  # padding (-1): any angle
        return self._tables[1]


def _shipped_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("kvzip_cache.scores")))  # installed as plain files (not zip-safe)


def shipped_predictors() -> dict[str, dict]:
    """The predictors shipped in ``kvzip_cache.scores``, by short model name: ``{"default": kind, "files": {kind:
    file}, ...how each was trained and what it scored}``."""
    path = _shipped_dir() / "predictors.json"
    return json.loads(path.read_text()) if path.is_file() else {}
