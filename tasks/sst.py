"""SST-5 sentiment (Socher et al., 2013, "Recursive Deep Models for Semantic Compositionality Over a
Sentiment Treebank"): 5-way classification of a sentence, cross-entropy loss, accuracy."""
import torch.nn.functional as F

from tasks.base import Task, accuracy

TASK = Task(
    name="sst",
    file_prefix="ids-sst",
    text_columns=("sentence",),
    label_column="sentiment",
    label_range=(0, 4),
    integer_labels=True,
    metric="acc",
    prediction_column="Predicted_Sentiment",
    loss=lambda logits, y: F.cross_entropy(logits, y.long()),  # [B, 5], [B]
    predict=lambda logits: logits.argmax(dim=-1),
    score=accuracy,
)
