"""Quora Question Pairs paraphrase detection (Iyer et al., 2017, the public Quora release): binary
classification of a question pair from one logit, BCE-with-logits loss, accuracy."""
import torch.nn.functional as F

from tasks.base import Task, accuracy

TASK = Task(
    name="para",
    file_prefix="quora",
    text_columns=("sentence1", "sentence2"),
    label_column="is_duplicate",
    label_range=(0, 1),
    integer_labels=True,
    metric="acc",
    prediction_column="Predicted_Is_Paraphrase",
    loss=lambda logit, y: F.binary_cross_entropy_with_logits(logit, y.float()),  # [B], [B]
    predict=lambda logit: (logit > 0).long(),  # sigmoid(logit) > 0.5
    score=accuracy,
)
