"""Accuracy of extracted answers, with a Wilson score interval: an `evaluate` metric module that loads offline.

    import evaluate
    metric = evaluate.load("recipes/metrics/gap_accuracy")
    metric.compute(predictions=["B", "12"], references=["B", "13"])
    # {'accuracy': 0.5, 'ci_low': 0.094..., 'ci_high': 0.905..., 'correct': 1, 'total': 2}

Predictions and references are answers already normalised by `trainers.evaluation.extract_answer` /
`reference_answer`; an empty prediction (nothing answer-like found) counts as wrong.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Exact-match accuracy of normalised answers, with a Wilson score confidence interval."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): extracted answers ("" when none was found).
    references (`list[str]`): gold answers in the same normal form.
    confidence (`float`, defaults to 0.95): the interval's coverage.
Returns:
    accuracy, ci_low, ci_high (floats in [0, 1]), correct, total (ints).
"""


def wilson_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    if total == 0:
        return 0.0, 0.0
    z = {0.9: 1.6449, 0.95: 1.96, 0.99: 2.5758}.get(confidence)
    if z is None:
        raise ValueError(f"confidence must be 0.9, 0.95 or 0.99; got {confidence}.")
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


class GapAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, confidence: float = 0.95):
        correct = sum(bool(p) and p == r for p, r in zip(predictions, references))
        total = len(references)
        low, high = wilson_interval(correct, total, confidence)
        return {"accuracy": correct / total if total else 0.0, "ci_low": low, "ci_high": high, "correct": correct,
                "total": total}
