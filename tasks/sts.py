"""STS-B semantic textual similarity (Cer et al., 2017, "SemEval-2017 Task 1"): regression of a
similarity score in [0, 5] for a sentence pair, MSE loss, Pearson correlation."""
import torch.nn.functional as F

from tasks.base import Task, pearson

TASK = Task(
    name="sts",
    file_prefix="sts",
    text_columns=("sentence1", "sentence2"),
    label_column="similarity",
    label_range=(0.0, 5.0),
    integer_labels=False,
    metric="pearson",
    # The leaderboard's header keeps the CS224N starter code's spelling.
    prediction_column="Predicted_Similiarity",
    loss=lambda score, y: F.mse_loss(score, y.float()),  # [B], [B]
    predict=lambda score: score,
    score=pearson,
)
