"""Scores for generated summaries: ROUGE-1/2/L and exact match.

ROUGE is Google's ``rouge_score`` package (the reference implementation of
the summarization literature, ``pip install rouge-score``) with Porter stemming;
each score is the mean F-measure over the examples, in ``[0, 1]``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from lora_jax.errors import DataError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@functools.cache
def _scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ImportError("ROUGE needs the rouge_score package: pip install rouge-score") from None
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def normalize(text: str) -> str:
    """Lower-case, collapse whitespace and drop trailing periods (for exact match).

    Examples:
      >>> normalize("  Return the  Sum.\\n")
      'return the sum'
    """
    return re.sub(r"\s+", " ", text).strip().lower().rstrip(".").rstrip()


def score_summaries(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Score generated summaries against references.

    Args:
      predictions: the generated texts.
      references: the reference texts, as many.

    Returns:
      ``rouge1``, ``rouge2``, ``rougeL`` (mean F-measures, stemmed), ``exact_match``
      (fraction equal after :func:`normalize`) and ``n`` (the number of pairs).

    Examples:
      >>> s = score_summaries(["Return the sum."], ["return the sum"])
      >>> s["rouge1"], s["exact_match"], s["n"]
      (1.0, 1.0, 1)
    """
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be sequences of strings, not a single string")
    if len(predictions) != len(references):
        raise DataError(f"got {len(predictions)} predictions for {len(references)} references")
    if not references:
        raise DataError("nothing to score: no predictions and references")
    scorer = _scorer()
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    exact = 0
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)  # (target, prediction)
        for k in ROUGE_TYPES:
            totals[k] += scores[k].fmeasure
        exact += normalize(pred) == normalize(ref)
    n = len(references)
    return {**{k: v / n for k, v in totals.items()}, "exact_match": exact / n, "n": n}
