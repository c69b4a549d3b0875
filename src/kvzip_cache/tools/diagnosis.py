"""What a score predictor keeps differently from exact KVzip on needle documents, and which differences cost answers.

    python -m kvzip_cache.tools.diagnosis --model smollm2-135m --predictor scores/predictor-smollm2-135m-mlp.safetensors \\
        --contexts 67 --context-tokens 4000 --ratio 0.3 --out diagnosis.json

On the evaluation's needle documents ("The special magic number for CITY is N", three per document), every context
token is put in a class: the needle's digits, its entity (the city), the rest of its sentence (the frame), or the
haystack. Per class it reports how many of exact KVzip's kept pairs the predictor keeps too (recall) and how many
pairs each keeps; per (layer, head) how often each keeps the digits. Then it re-asks every question with selections
that are the predictor's except for one class, where exact KVzip's decisions are restored, at the same budget (the
restored decisions are fixed, the rest of the budget is filled by the predictor's ranking): the accuracy each
restoration buys says which of the predictor's losses change answers.
"""

from __future__ import annotations

import argparse
import copy
import re
import time

import torch

from ..cache import KVzipCache
from ..scorers.base import score_context_by_layers
from ..scorers.predictor import PredictorScorer, ScorePredictor
from ..scorers.reconstruction import ReconstructionScorer
from ..selection import select_pairs
from ..templates import encode_contexts
from .shipped import write_report

CLASSES = ("digits", "entity", "frame", "haystack")
NEEDLE = re.compile(r"The special magic number for (?P<entity>.+?) is (?P<digits>\d+)")
RESTORED = {  # selection name -> the classes whose exact decisions are restored into the predictor's selection
    "predicted": (),
    "restore digits": ("digits",),
    "restore entity": ("entity",),
    "restore frame": ("frame",),
    "restore needle sentence": ("digits", "entity", "frame"),
    "restore haystack": ("haystack",),
}


def token_classes(tokenizer, text: str, context_ids: torch.Tensor) -> torch.Tensor:
    """``[C]`` int64 class index (into `CLASSES`) of every context token of ``text`` (by the tokenizer's offsets).

    ``context_ids``: the ``[C]`` ids the cache holds for the text, which must equal the tokenizer's own encoding.
    """
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if encoded["input_ids"] != context_ids.tolist():
        raise ValueError("the tokenizer's offsets do not describe the cached context tokens")
    chars = torch.full((len(text),), CLASSES.index("haystack"), dtype=torch.long)
    for match in NEEDLE.finditer(text):
        chars[match.start() : match.end()] = CLASSES.index("frame")
        for name in ("entity", "digits"):
            chars[match.start(name) : match.end(name)] = CLASSES.index(name)
    # a token takes the most specific class of its characters (digits < entity < frame < haystack)
    return torch.tensor([int(chars[lo:hi].min()) if hi > lo else CLASSES.index("haystack")
                         for lo, hi in encoded["offset_mapping"]])


def restored_scores(predicted: torch.Tensor, exact_keep: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
    """Scores whose top-k keeps exact KVzip's decisions where ``restore`` (``[B, C]`` bool) and fills the rest of the
    budget by the predictor's ranking: ``+inf`` where exact keeps a restored pair, ``-inf`` where it drops one."""
    out = predicted.clone()
    restore = restore[None, :, None, :].expand_as(out) & ~out.isnan()
    out[restore & exact_keep] = float("inf")
    out[restore & ~exact_keep] = float("-inf")
    return out


def class_statistics(exact_keep: torch.Tensor, predicted_keep: torch.Tensor, classes: torch.Tensor,
                     selectable: torch.Tensor) -> dict:
    """Per class: pairs, exact's and the predictor's keep rates, and the recall of exact's kept pairs."""
    stats = {}
    for index, name in enumerate(CLASSES):
        where = (classes == index)[None, :, None, :] & selectable
        exact, pred = exact_keep & where, predicted_keep & where
        stats[name] = {"pairs": int(where.sum()), "exact_keeps": int(exact.sum()), "predicted_keeps": int(pred.sum()),
                       "recall": float((exact & pred).sum()) / max(int(exact.sum()), 1)}
    return stats


def _ask(model, tokenizer, cache: KVzipCache, contexts, keep: torch.Tensor) -> list[float]:
    from ..eval.runner import answer_shared
    from ..eval.tasks import contains

    trial = copy.deepcopy(cache)
    trial.evict(keep)
    answers = answer_shared(model, tokenizer, trial, [[q.question for q in c.questions] for c in contexts], 32)
    return [contains(a, q.answers) for c, row in zip(contexts, answers) for q, a in zip(c.questions, row)]


@torch.no_grad()
def diagnose(model, tokenizer, predictor: ScorePredictor, contexts, ratio: float = 0.3, batch: int = 17) -> dict:
    """Class statistics, per-head digit keep rates and the restoration re-asks over ``contexts`` (needle `Context`s).

    Returns ``{"classes": {class: {...}}, "digit_keep_by_head": {"exact": [L][H], "predicted": [L][H]},
    "accuracy": {selection: [0/1 per question]}, "questions": n}``; the accuracy lists are in one question order, so
    two selections compare question by question.
    """
    device = next(model.parameters()).device
    scorer = PredictorScorer(predictor, model)
    totals: dict[str, dict] = {}
    digit_exact = digit_pred = digit_count = None
    accuracy: dict[str, list[float]] = {"exact": [], **{name: [] for name in RESTORED}}
    for lo in range(0, len(contexts), batch):
        group = contexts[lo : lo + batch]
        ids, mask, starts = (t.to(device) for t in encode_contexts(tokenizer, [c.text for c in group]))
        cache = KVzipCache(model)
        cache.prefill(model, ids, mask, context_start=starts)
        context = cache.prefilled_context()
        exact = ReconstructionScorer(tokenizer).score_context(model, context)
        predicted = score_context_by_layers(scorer, context)
        selectable = cache.selectable_pairs()
        exact, predicted = exact.masked_fill(~selectable, float("nan")), predicted.masked_fill(~selectable, float("nan"))
        exact_keep, predicted_keep = select_pairs(exact, ratio), select_pairs(predicted, ratio)
        offset = cache.context_offset
        classes = torch.full(selectable.shape[1::2], CLASSES.index("haystack"), dtype=torch.long, device=device)
        for row, c in enumerate(group):
            start = int(starts[row])
            classes[row, start - offset :] = token_classes(tokenizer, c.text, ids[row, start:].cpu()).to(device)
        for name, values in class_statistics(exact_keep, predicted_keep, classes, selectable).items():
            total = totals.setdefault(name, {"pairs": 0, "exact_keeps": 0, "predicted_keeps": 0, "hits": 0.0})
            for key in ("pairs", "exact_keeps", "predicted_keeps"):
                total[key] += values[key]
            total["hits"] += values["recall"] * values["exact_keeps"]
        digits = (classes == CLASSES.index("digits"))[None, :, None, :] & selectable
        full = [i for i in range(len(exact)) if not bool(exact[i].isnan().all())]
        per_head = lambda keep: (keep & digits)[full].sum(dim=(1, 3)).double()  # noqa: E731  [L_full, H]
        digit_exact = per_head(exact_keep) + (0 if digit_exact is None else digit_exact)
        digit_pred = per_head(predicted_keep) + (0 if digit_pred is None else digit_pred)
        digit_count = digits[full].sum(dim=(1, 3)).double() + (0 if digit_count is None else digit_count)
        accuracy["exact"] += _ask(model, tokenizer, cache, group, exact_keep)
        for name, restore in RESTORED.items():
            mask_classes = torch.zeros_like(classes, dtype=torch.bool)
            for cls in restore:
                mask_classes |= classes == CLASSES.index(cls)
            keep = select_pairs(restored_scores(predicted, exact_keep, mask_classes), ratio)
            accuracy[name] += _ask(model, tokenizer, cache, group, keep)
        del cache
    classes_out = {name: {"pairs": t["pairs"], "exact_keep_rate": t["exact_keeps"] / max(t["pairs"], 1),
                          "predicted_keep_rate": t["predicted_keeps"] / max(t["pairs"], 1),
                          "recall_of_exact": t["hits"] / max(t["exact_keeps"], 1)} for name, t in totals.items()}
    return {"classes": classes_out, "ratio": ratio,
            "digit_keep_by_head": {"exact": (digit_exact / digit_count).tolist(),
                                   "predicted": (digit_pred / digit_count).tolist()},
            "accuracy": accuracy, "questions": len(accuracy["exact"]), "contexts": len(contexts)}


def summary(result: dict) -> str:
    lines = [f"ratio {result['ratio']}, {result['contexts']} needle contexts, {result['questions']} questions",
             "| class | pairs | exact keeps | predictor keeps | recall of exact's kept |", "|---|---:|---:|---:|---:|"]
    for name, s in result["classes"].items():
        lines.append(f"| {name} | {s['pairs']} | {s['exact_keep_rate']:.3f} | {s['predicted_keep_rate']:.3f} | "
                     f"{s['recall_of_exact']:.3f} |")
    lines += ["", "| selection | accuracy |", "|---|---:|"]
    for name, values in result["accuracy"].items():
        lines.append(f"| {name} | {sum(values) / len(values):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from ..eval.tasks import needle_contexts
    from ..zoo import load_model

    parser = argparse.ArgumentParser(prog="python -m kvzip_cache.tools.diagnosis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--predictor", required=True, help="a predictor file, folder or shipped name")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--contexts", type=int, default=67)
    parser.add_argument("--context-tokens", type=int, default=4000)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--batch", type=int, default=17)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    predictor = ScorePredictor.from_pretrained(args.predictor, model=model)
    contexts = needle_contexts(tokenizer, args.contexts, args.context_tokens)
    result = diagnose(model, tokenizer, predictor, contexts, args.ratio, args.batch)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(summary(result))
    write_report(args.out, result, indent=1)
    return result


if __name__ == "__main__":
    main()
