"""QLoRA's 4-bit NormalFloat quantizer against bitsandbytes' CPU functions (0.50): the NF4 code
book and the packed bytes equal, the dequantized weights equal given bitsandbytes' own quantization
state (its 8-bit absmax codes, their scales and offset); a QLoRA layer's outputs and gradients equal
LoRA on the dequantized weights; the storage is about 4.13 bits a weight; merging folds into the
dequantized weights and unmerging puts the quantized layer back."""
from __future__ import annotations

import logging

import bitsandbytes.functional as bnbF
import pytest
import torch
from torch import nn

from minbert.peft import adapter_layers, merge_and_unload, param_counts
from minbert.peft.lora import LoraLinear
from minbert.peft.qlora import Linear4bit, QLora, dequantize_nf4, nf4_code, quantize_nf4
from peft_cases import base_encoder, batch, hidden, perturb


def weight(shape=(96, 64), seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_nf4_code_book_is_bitsandbytes():
    assert torch.equal(nf4_code(), bnbF.get_4bit_type("nf4", device="cpu"))
    assert nf4_code()[7] == 0 and nf4_code()[0] == -1 and nf4_code()[-1] == 1


@pytest.mark.parametrize("shape", [(96, 64), (384, 1536), (7, 9)])  # the last: partial blocks
def test_packed_bytes_and_absmax_are_bitsandbytes(shape):
    w = weight(shape)
    theirs, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=False,
                                       quant_type="nf4")
    packed, absmax = quantize_nf4(w)
    assert torch.equal(packed, theirs.view(-1)) and torch.equal(absmax, state.absmax)


def test_packing_order_can_fail():
    """Low nibble first (the other common convention) gives other bytes than bitsandbytes."""
    w = weight()
    theirs, _ = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    packed, _ = quantize_nf4(w)
    swapped = (packed >> 4) | ((packed & 0x0F) << 4)
    assert not torch.equal(swapped, theirs.view(-1))


def layer_with_bitsandbytes_state(w: torch.Tensor):
    """Our Linear4bit holding bitsandbytes' quantization of `w` (double-quantized statistics)."""
    linear = nn.Linear(w.shape[1], w.shape[0])
    linear.weight.data.copy_(w)
    ours = Linear4bit(linear)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours.packed.copy_(packed.view(-1))
    ours.absmax_codes.copy_(state.absmax)
    ours.absmax_scale = state.state2.absmax.clone()
    ours.absmax_offset.copy_(state.offset)
    return ours, bnbF.dequantize_4bit(packed, state)


def layer_with_bitsandbytes_state_only(w: torch.Tensor) -> Linear4bit:
    return layer_with_bitsandbytes_state(w)[0]


@pytest.mark.parametrize("shape", [(96, 64), (384, 1536)])
def test_dequantized_weights_equal_bitsandbytes_given_its_state(shape):
    ours, theirs = layer_with_bitsandbytes_state(weight(shape))
    assert torch.equal(ours.weight, theirs)


def test_our_double_quantization_is_never_worse_than_bitsandbytes():
    """Our 8-bit codes of the block constants are the nearest ones; bitsandbytes' CPU kernel
    picks the other neighbour for a few blocks (as for its 8-bit optimizer states, see
    tests/test_quant.py): ours reconstruct every absmax at least as well, and mostly identically."""
    w = weight((384, 1536))
    linear = nn.Linear(1536, 384)
    linear.weight.data.copy_(w)
    ours, theirs = Linear4bit(linear), layer_with_bitsandbytes_state_only(w)
    exact = quantize_nf4(w)[1]
    ours_err, theirs_err = (ours.absmax() - exact).abs(), (theirs.absmax() - exact).abs()
    assert (ours_err <= theirs_err + 1e-9).all()
    assert (ours.absmax_codes == theirs.absmax_codes).float().mean() > 0.9
    assert (ours.weight - w).abs().max() < 0.2 * w.abs().max()  # NF4's own error, for scale


def test_storage_is_about_4_13_bits_a_weight():
    layer = Linear4bit(nn.Linear(1536, 384))
    stored = sum(b.numel() * b.element_size() for b in layer.buffers())
    bits = 8 * stored / (384 * 1536)
    assert 4.12 < bits < 4.14
    model_bits = QLora(targets="all_linear").apply(base_encoder("minilm"))
    counts = param_counts(model_bits)
    assert counts["params/total"] == sum(p.numel() for p in base_encoder("minilm").parameters()) \
        + counts["params/trainable"]  # quantized weights count as the parameters they hold


def test_qlora_layer_equals_lora_on_the_dequantized_weights():
    linear = nn.Linear(64, 96)
    linear.weight.data.copy_(weight())
    q = LoraLinear(Linear4bit(linear), rank=4, scaling=2.0)
    plain = nn.Linear(64, 96)
    plain.weight.data.copy_(q.base_layer.weight)
    plain.bias.data.copy_(linear.bias)
    ref = LoraLinear(plain, rank=4, scaling=2.0)
    with torch.no_grad():
        q.lora_B.normal_()
        ref.lora_A.copy_(q.lora_A)
        ref.lora_B.copy_(q.lora_B)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    y, y_ref = q(x), ref(x)
    assert torch.equal(y, y_ref)
    y.pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    assert torch.equal(q.lora_A.grad, ref.lora_A.grad) and torch.equal(q.lora_B.grad, ref.lora_B.grad)


def test_merging_folds_into_the_dequantized_weights_and_says_so(caplog):
    caplog.set_level(logging.INFO)
    encoder = QLora(rank=4, targets="attn_qkv").apply(base_encoder("tiny")).eval()
    perturb(encoder)
    b = batch()
    with torch.no_grad():
        want = hidden(encoder, b)
        layers = dict(adapter_layers(encoder))
        for layer in layers.values():
            layer.merge()
        assert "merging into the dequantized weights" in caplog.text
        assert all(type(layer.base_layer) is nn.Linear for layer in layers.values())
        assert (hidden(encoder, b) - want).abs().max() < 1e-5
        for layer in layers.values():
            layer.unmerge()
        assert all(isinstance(layer.base_layer, Linear4bit) for layer in layers.values())
        assert torch.equal(hidden(encoder, b), want)
        merge_and_unload(encoder)
        assert (hidden(encoder, b) - want).abs().max() < 1e-5


def test_dequantize_round_trip_error_is_nf4_s():
    w = weight((64, 64))
    packed, absmax = quantize_nf4(w)
    back = dequantize_nf4(packed, absmax, w.shape)
    steps = (nf4_code()[1:] - nf4_code()[:-1]).max()
    blocks = w.reshape(-1, 64).abs().amax(dim=1).repeat_interleave(64).view(w.shape)
    assert ((back - w).abs() <= steps / 2 * blocks + 1e-7).all()
