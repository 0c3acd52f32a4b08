"""The pretraining corpus of the embedded model pair, built from text shipped in this repository.

WikiText-2 articles (their tokenised spacing undone) plus the PIQA / GSM8K *training* splits
rendered as prose, with a few WikiText articles held out for perplexity. ``muscle.pretrain``
tokenizes and trains on it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_DATA = Path(__file__).resolve().parent / "embedded" / "data"


@dataclass(frozen=True)
class Corpus:
    """Documents for pretraining, and WikiText articles held out of it for perplexity."""

    train: list[str]
    heldout: list[str]

    def fingerprint(self) -> str:
        return _sha256_texts(["train", *self.train, "heldout", *self.heldout])


_WIKI_TITLE = re.compile(r"^ = [^=].* = $")  # " = Title = " starts an article; " = = Sub = = " not
_WIKI_SPACING = [
    (re.compile(r" @([-,.])@ "), r"\1"),  # "1 @,@ 000" -> "1,000", "well @-@ known"
    (re.compile(r" ([,.;:!?)\]])"), r"\1"),  # space before closing punctuation
    (re.compile(r"([(\[]) "), r"\1"),
    (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"),
    (re.compile(r"^(?:= )+(.*?)(?: =)+$", re.M), r"\1"),  # "= = Sub = =" -> "Sub"
]


def wikitext_articles(raw: str) -> list[str]:
    """Split a WikiText raw file into articles and undo its tokenised spacing.

    The task data (PIQA, GSM8K) is normally spaced text; keeping WikiText's " , " and " @-@ "
    would teach a tiny model two spellings of every punctuation mark.
    """
    articles: list[list[str]] = []
    for line in raw.split("\n"):
        if _WIKI_TITLE.match(line):
            articles.append([])
        if articles and line.strip():
            articles[-1].append(line.strip())
    out = []
    for lines in articles:
        text = "\n".join(lines)
        for pattern, repl in _WIKI_SPACING:
            text = pattern.sub(repl, text)
        out.append(text)
    return out


_GSM8K_CALC = re.compile(r"<<[^>]*>>")


def _read_jsonl(path: Path, limit: int | None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def piqa_prose(row: dict) -> str:
    """A PIQA *training* example as prose: the goal followed by its correct solution."""
    sol = row["sol1"] if row["label"] == 0 else row["sol2"]
    return f"{row['goal'].strip()} {sol.strip()}"


def gsm8k_prose(row: dict) -> str:
    """A GSM8K *training* example as prose: question, then the worked solution.

    Calculator annotations are dropped and "#### 72" becomes a sentence, so the base model has
    seen the domain but not the task's output format: the task adapter still has that to learn.
    """
    answer = _GSM8K_CALC.sub("", row["answer"])
    body, _, final = answer.rpartition("####")
    return f"{row['question'].strip()}\n{body.strip()}\nThe answer is {final.strip()}."


def build_corpus(
    data_dir: Path = EMBEDDED_DATA, *, heldout_articles: int = 6, max_docs: int | None = None
) -> Corpus:
    """WikiText articles plus the PIQA/GSM8K *training* splits rendered as plain prose.

    Why the task text: a base model that has already read physical-commonsense goals and grade
    school word problems gives its task adapters something to build on, so a LoRA trained for a
    few minutes on CPU moves accuracy off chance and v1/v2 differ in ways that show as flips.
    Only training splits are used: PIQA ``valid`` and GSM8K ``test`` are the evaluation data.
    The last ``heldout_articles`` WikiText test articles are never trained on (perplexity).
    """
    wiki_dir = data_dir / "corpus" / "wikitext-2-raw"
    wiki = []
    for name in ("wiki.valid.raw", "wiki.test.raw"):
        wiki += wikitext_articles((wiki_dir / name).read_text(encoding="utf-8"))
    heldout = wiki[len(wiki) - heldout_articles :]
    wiki = wiki[: len(wiki) - heldout_articles]
    if max_docs is not None:
        wiki = wiki[:max_docs]
    piqa = [piqa_prose(r) for r in _read_jsonl(data_dir / "piqa" / "train.jsonl", max_docs)]
    gsm = [gsm8k_prose(r) for r in _read_jsonl(data_dir / "gsm8k" / "train.jsonl", max_docs)]
    return Corpus(train=wiki + piqa + gsm, heldout=heldout)


def _sha256_texts(texts: Sequence[str]) -> str:
    """SHA-256 of a list of texts: the corpus fingerprint (and, in muscle.pretrain, the
    tokenizer's inputs)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))  # length prefix: ["ab","c"] != ["a","bc"]
        h.update(b)
    return h.hexdigest()
