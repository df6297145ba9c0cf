"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021).

Each targeted Linear keeps its pretrained weight W0 frozen and learns a low-rank update

    W = W0 + s · B A,    A: [r, in] kaiming-uniform,  B: [out, r] zeros,  s = alpha / r

so the model is unchanged at initialisation. rsLoRA (Kalajdzievski, 2023) scales by alpha / √r
instead. Initialisation, scaling and dropout (on the adapter's input only) follow peft's
`LoraConfig`, so an adapter exported by `minbert.peft.io.export_peft` loads into `peft` unchanged.

`init=pissa` (`peft=pissa`; Meng et al., 2024, "PiSSA: Principal Singular Values and Singular
Vectors Adaptation of Large Language Models") starts the factors from the r principal singular
triplets of W0 and leaves the rest, the residual, in the frozen base weight (`PissaLinear`): the
model is again unchanged at init, but the principal part trains. `pissa_niter_<n>` takes them from
a fast randomised SVD (n power iterations), as peft's `init_lora_weights` does.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import CheckpointError, ConfigError
from minbert.checkpoint import minbert_to_hf_key
from minbert.peft import adapter_layers, adapter_state_dict
from minbert.peft.contract import Capabilities
from minbert.peft.io import peft_key
from minbert.peft.layer import AdapterConfig, AdapterLinear, adapt, low_rank_update, train_biases

# Our adapter tensors' leaf names -> peft's, in its saved LoRA (and DoRA) adapters.
PEFT_LEAVES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight",
               "magnitude": "lora_magnitude_vector"}


class LoraLinear(AdapterLinear):
    """y = x W0ᵀ + b + s · (drop(x) Aᵀ) Bᵀ."""

    adapter_tensors = ("lora_A", "lora_B")

    def __init__(self, base: nn.Module, rank: int, scaling: float, dropout: float = 0.0,
                 train_A: bool = True):
        super().__init__(base, dropout)
        w = self.weight
        self.scaling = scaling
        self.lora_A = nn.Parameter(w.new_empty(rank, self.in_features), requires_grad=train_A)
        self.lora_B = nn.Parameter(w.new_zeros(self.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and peft

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)  # [out, r] @ [r, in] -> [out, in]

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # [N, in] -> [N, out]
        h = F.linear(self.dropout(x), self.lora_A)  # [N, in] -> [N, r]
        return low_rank_update(y, h, self.lora_B, self.scaling)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """This layer's tensors in peft's LoRA format, by our leaf names (A, B, DoRA's magnitude)."""
        return {t: getattr(self, t) for t in self.adapter_tensors}


class PissaLinear(LoraLinear):
    """PiSSA's layer: LoRA whose factors start from the r principal singular triplets of W0 and
    whose base layer holds the residual (peft's `pissa_init`, number for number):

        W0 = U S Vh,  A = diag(√S_r') Vh_r,  B = U_r diag(√S_r'),  S_r' = S_r / s,  W_res = W0 - s B A

    The first r triplets of the exact SVD (`niter` None), or of `torch.svd_lowrank` with `niter`
    power iterations, seeded so that a rebuilt model has the same residual (peft draws from the
    global generator). The initial factors A0, B0 stay as frozen buffers, saved with the adapter:
    the update against W0, what merges of experts and TIES/DARE combine, is ΔW = s (B A - B0 A0);
    `merge` folds s B A into W_res (a given ΔW, with the s B0 A0 that W_res lacks), and the export
    for peft on the original weights is peft's conversion to a LoRA of rank 2r,
    s [B, -B0] [A; A0] (`save_pretrained(path_initial_model_for_weight_conversion=...)`)."""

    adapter_tensors = ("lora_A", "lora_B", "pissa_A0", "pissa_B0")

    def __init__(self, base: nn.Module, rank: int, scaling: float, dropout: float = 0.0,
                 niter: int | None = None):
        super().__init__(base, rank, scaling, dropout)
        if rank > min(self.in_features, self.out_features):
            raise ConfigError(f"init=pissa: rank={rank} exceeds the {self.out_features}x"
                              f"{self.in_features} weight's singular values")
        A, B = self.principal(rank, niter)
        with torch.no_grad():
            self.lora_A.copy_(A)
            self.lora_B.copy_(B)
        self.register_buffer("pissa_A0", self.lora_A.detach().clone())  # [r, in]
        self.register_buffer("pissa_B0", self.lora_B.detach().clone())  # [out, r]

    @torch.no_grad()
    def principal(self, rank: int, niter: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) from W0's SVD; writes W_res = W0 - s B A into the base layer."""
        weight = self.weight
        if weight.device.type == "meta":  # shapes only (parameter counts)
            return self.lora_A, self.lora_B
        W = weight.to(torch.float32)
        if niter is None:
            V, S, Uh = torch.linalg.svd(W.data, full_matrices=False)
            Vr, Sr, Uhr = V[:, :rank], S[:rank], Uh[:rank]
        else:
            with torch.random.fork_rng(devices=[W.device] if W.is_cuda else []):
                torch.manual_seed(0)
                Vr, Sr, Ur = torch.svd_lowrank(W.data, rank, niter=niter)
            Uhr = Ur.t()
        Sr = Sr / self.scaling
        A = torch.diag(torch.sqrt(Sr)) @ Uhr
        B = Vr @ torch.diag(torch.sqrt(Sr))
        self.base_layer.weight.data = (W.data - self.scaling * B @ A).to(weight.dtype)
        return A, B

    def delta_weight(self) -> torch.Tensor:
        """ΔW against W0 (= W_res + s B0 A0): s (B A - B0 A0), [out, in]."""
        return self.scaling * (self.lora_B @ self.lora_A - self.pissa_B0 @ self.pissa_A0)

    @torch.no_grad()
    def merge(self, delta_weight: torch.Tensor | None = None,
              delta_bias: torch.Tensor | None = None) -> None:
        if delta_weight is None and delta_bias is None:  # its own update: W_res + s B A
            return super().merge(LoraLinear.delta_weight(self))
        initial = self.scaling * (self.pissa_B0 @ self.pissa_A0)  # W_res + s B0 A0 = W0
        return super().merge(initial if delta_weight is None else initial + delta_weight,
                             delta_bias)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """peft's conversion for the original weights: ΔW = s (B A - B0 A0) = s [B, -B0] [A; A0]."""
        return {"lora_A": torch.cat([self.lora_A, self.pissa_A0], dim=0),  # [2r, in]
                "lora_B": torch.cat([self.lora_B, -self.pissa_B0], dim=1)}  # [out, 2r]


@dataclass
class Lora(AdapterConfig):
    """`peft=lora`: the method's config and `apply`: rank `rank`, scale alpha / rank (alpha / √rank
    with `rslora`), `init` (`kaiming`: A kaiming-uniform, B zero; `pissa`, `pissa_niter_<n>`:
    PiSSA), and the options every adapter method has (`AdapterConfig`: dropout, targets, bias,
    lr, merge_eval)."""

    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    init: str = "kaiming"
    name: ClassVar[str] = "lora"
    capabilities: ClassVar[Capabilities] = Capabilities(peft_export=True)

    def __post_init__(self):
        super().__post_init__()
        if not self.alpha > 0:
            raise ConfigError(f"alpha={self.alpha!r} must be positive")
        if self.init not in ("kaiming", "pissa") and not re.fullmatch(r"pissa_niter_\d+",
                                                                       str(self.init)):
            raise ConfigError(f"init={self.init!r}; use kaiming, pissa or pissa_niter_<n> (PiSSA "
                              "from a fast randomised SVD of n power iterations)")
        if self.init != "kaiming" and type(self).make_layer is not Lora.make_layer:
            raise ConfigError(f"init={self.init!r} is LoRA's (peft=lora, pissa, qlora); peft="
                              f"{self.name} builds its own layers")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def make_layer(self, linear: nn.Linear) -> AdapterLinear:
        if self.init == "kaiming":
            return LoraLinear(linear, self.rank, self.scaling, self.dropout)
        niter = None if self.init == "pissa" else int(self.init.rpartition("_")[2])
        return PissaLinear(linear, self.rank, self.scaling, self.dropout, niter)

    def apply(self, encoder: nn.Module) -> nn.Module:
        adapt(encoder, self.targets, self.make_layer)
        train_biases(encoder, self.bias)
        return encoder

    def peft_adapter(self, encoder: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        """What `minbert.peft.io.export_peft` writes: peft's `LoraConfig` fields and the adapter's
        tensors (A, B, DoRA's magnitude, the biases under bias=all) under peft's names. PiSSA's
        is peft's conversion for the original weights: a LoRA of rank 2r at the same scale (alpha
        doubled, or times √2 under rsLoRA), `PissaLinear.peft_tensors`."""
        layers = dict(adapter_layers(encoder))
        if not layers or not all(isinstance(m, LoraLinear) for m in layers.values()):
            raise CheckpointError(f"peft={self.name}: the encoder has no LoRA layers to export")
        own = {f"{n}.{leaf}": t for n, m in layers.items() for leaf, t in m.peft_tensors().items()}
        state = {}
        for n, t in adapter_state_dict(encoder).items():
            module, _, leaf = n.rpartition(".")
            if module in layers and leaf in layers[module].adapter_tensors:
                if n not in own:  # PiSSA's initial factors: inside its converted A and B
                    continue
                t = own[n]
            state[peft_key(n, set(layers), PEFT_LEAVES)] = t
        converted = any(isinstance(m, PissaLinear) for m in layers.values())
        rank, alpha = self.rank, self.alpha
        if converted:
            rank, alpha = 2 * rank, alpha * (2 ** 0.5 if self.rslora else 2)
        config = {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
            "r": rank, "lora_alpha": alpha, "lora_dropout": self.dropout,
            "use_rslora": self.rslora,
            "use_dora": any("magnitude" in m.adapter_tensors for m in layers.values()),
            "bias": self.bias, "fan_in_fan_out": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None,
            # exact module names, so that a suffix never catches a module we did not adapt
            "target_modules": sorted(minbert_to_hf_key(f"{n}.weight").removesuffix(".weight")
                                     for n in layers),
        }
        return config, state
