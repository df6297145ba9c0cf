"""minBERT: our BERT encoder, its checkpoint loading, and parameter-efficient fine-tuning methods."""
from minbert.model import BertConfig, BertModel, BertOutput

__all__ = ["BertConfig", "BertModel", "BertOutput"]
