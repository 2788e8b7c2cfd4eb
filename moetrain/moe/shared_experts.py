"""Shared experts (DeepSeekMoE, Qwen-MoE): a dense MLP every token goes through.

Legend: T tokens, D model dim, H shared hidden dim (default num_shared_experts * hidden_dim).
With ``shared_gate`` the output is scaled per token by ``sigmoid(x_TD @ gate_D)`` (Qwen2-MoE).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moetrain.moe.config import MoEConfig
from moetrain.moe.experts import expert_mlp


class SharedExperts(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        D, H = cfg.dim, cfg.shared_hidden
        self.w1_HD = nn.Parameter(torch.empty(H, D))
        self.w3_HD = nn.Parameter(torch.empty(H, D)) if cfg.activation == "swiglu" else None
        self.w2_DH = nn.Parameter(torch.empty(D, H))
        self.gate_1D = nn.Parameter(torch.empty(1, D)) if cfg.shared_gate else None

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        for w in (self.w1_HD, self.w3_HD, self.gate_1D):
            if w is not None:
                nn.init.normal_(w, std=std)
        nn.init.normal_(self.w2_DH, std=std if out_std is None else out_std)

    def forward(self, x_TD: Tensor) -> Tensor:
        out_TD = expert_mlp(x_TD, self.w1_HD, self.w3_HD, self.w2_DH)
        if self.gate_1D is not None:
            out_TD = torch.sigmoid(x_TD @ self.gate_1D.t()) * out_TD
        return out_TD
