"""Multiple-choice accuracy, as an `evaluate` metric module that ships with the project and loads by path.

Same interface and result as the Hub's "accuracy" metric: `compute(predictions=[chosen index], references=[gold
index])` returns `{"accuracy": ...}`, with the optional `normalize` and `sample_weight`. It needs no scikit-learn.
"""

import datasets
import evaluate


_DESCRIPTION = """
Accuracy of multiple-choice answers: the fraction of questions whose chosen choice index equals the gold index.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): the index of the choice the model picked, one per question.
    references (`list[int]`): the index of the correct choice, one per question.
    normalize (`bool`, defaults to True): return the fraction of correct answers; False returns their number
        (weighted by `sample_weight` when given).
    sample_weight (`list[float]`, *optional*): a weight per question.
Returns:
    accuracy (`float`): in [0, 1] when `normalize` is True.
Examples:
    >>> accuracy = evaluate.load("metrics/multiple_choice_accuracy")
    >>> accuracy.compute(predictions=[0, 2, 1, 3], references=[0, 1, 1, 3])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MultipleChoiceAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None):
        if sample_weight is None:
            sample_weight = [1.0] * len(predictions)
        if len(sample_weight) != len(predictions):
            raise ValueError(
                f"sample_weight has {len(sample_weight)} entries for {len(predictions)} predictions; give one per "
                f"prediction."
            )
        correct = 0.0
        for prediction, reference, weight in zip(predictions, references, sample_weight):
            if prediction == reference:
                correct += weight
        if not normalize:
            return {"accuracy": float(correct)}
        total = sum(sample_weight)
        return {"accuracy": float(correct / total) if total > 0 else float("nan")}
