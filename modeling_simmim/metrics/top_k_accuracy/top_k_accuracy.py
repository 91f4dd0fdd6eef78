"""Top-k accuracy as an `evaluate` metric module, shipped with the package.

`evaluate.load("accuracy")` fetches its script from the Hub, which fails offline (and on clusters without internet);
`evaluate.load(<this folder>)` works anywhere. Predictions are class ids ranked by score (top-k indices per example,
highest first, e.g. `logits.topk(5).indices`), so evaluation never has to keep (N, num_labels) logits in memory.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Fraction of examples whose reference label is among the first k ranked predictions, for k = 1 (key
`accuracy`) and each k in `top_k` (keys `top{k}_accuracy`)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): per example, class ids ranked by score, highest first.
    references (`list` of `int`): the true class ids.
    top_k (`list` of `int`, defaults to `[5]`): the k values to report besides top-1.
Returns:
    accuracy (`float`): top-1 accuracy in [0, 1]; top{k}_accuracy (`float`): top-k accuracy for each requested k
    (k larger than the ranked list counts the whole list).
Examples:
    >>> metric = evaluate.load("modeling_simmim/metrics/top_k_accuracy")
    >>> metric.compute(predictions=[[1, 0, 2], [2, 1, 0]], references=[1, 0], top_k=[2])
    {'accuracy': 0.5, 'top2_accuracy': 0.5}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, top_k=(5,)):
        ranked = np.asarray(predictions, dtype=np.int64)
        if ranked.ndim == 1:
            ranked = ranked[:, None]
        labels = np.asarray(references, dtype=np.int64)[:, None]
        hits = ranked == labels
        results = {"accuracy": float(hits[:, :1].any(axis=1).mean())}
        for k in top_k:
            results[f"top{k}_accuracy"] = float(hits[:, :k].any(axis=1).mean())
        return results
