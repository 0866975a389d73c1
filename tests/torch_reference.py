"""PyTorch reference estimators written from SPEC.md section 3: the parity target for `chest_jax.interop`.

`Estimator_v4` and the v1 `Estimator` here name their parameters and buffers as the original's state dict does
(`ch_tf._layers.N.mha.q_proj_weight`, `ch_tf._layers.N.pe`, ...), so their `state_dict()` has the layout the
original saved. Internally they run batch-first; the original ran sequence-first, which changes no value.
Only the tests import this module (it needs torch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class ReferenceDims:
    """The sizes that define an estimator (SPEC 3); `length` is K, the used subcarriers."""
    length: int
    step_size: int
    num_layers: int
    d_model: int
    n_token: int
    n_head: int
    dim_feedforward: int
    dropout: float
    dmrs: tuple[int, int, int]

    @property
    def cond_n_token(self) -> int:
        return self.length // self.step_size

    @property
    def cond_d_model(self) -> int:
        return 2 * self.step_size

    @property
    def out_per_token(self) -> int:
        return 2 * self.length // self.n_token


def sine_encoding(n: int, width: int) -> torch.Tensor:
    """The original's positional encoding, (n, width) float32: sin on even columns, cos on odd ones."""
    position_N = torch.arange(1, n + 1, dtype=torch.float32) / (n + 1e-6) * (2 * math.pi * n)
    column_W = torch.arange(width)
    wavelength_W = float(n) ** (2 * torch.div(column_W, 2, rounding_mode="floor").float() / width)
    angle_NxW = position_N[:, None] / wavelength_W[None, :]
    return torch.where(column_W % 2 == 0, torch.sin(angle_NxW), torch.cos(angle_NxW))


class ProjectedAttention(nn.Module):
    """Multi-head attention with separate q/k/v input projections (`*_proj_weight`, (out, in)) and one
    `in_proj_bias` (q, k, v), as torch.nn.MultiheadAttention stores them when kdim differs from embed_dim."""

    def __init__(self, d_model: int, n_head: int, kdim: int, vdim: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.q_proj_weight = nn.Parameter(torch.empty(d_model, d_model))
        self.k_proj_weight = nn.Parameter(torch.empty(d_model, kdim))
        self.v_proj_weight = nn.Parameter(torch.empty(d_model, vdim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = nn.Dropout(dropout)
        for weight in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight, self.out_proj.weight):
            nn.init.xavier_uniform_(weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query_BxTxD, key_BxSxE, value_BxSxE):
        bias_q, bias_k, bias_v = self.in_proj_bias.chunk(3)
        q = F.linear(query_BxTxD, self.q_proj_weight, bias_q)
        k = F.linear(key_BxSxE, self.k_proj_weight, bias_k)
        v = F.linear(value_BxSxE, self.v_proj_weight, bias_v)
        batch, n_query, d_model = q.shape
        head_dim = d_model // self.n_head

        def heads(t):
            return t.reshape(batch, t.shape[1], self.n_head, head_dim).transpose(1, 2)

        weights_BxHxTxS = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        mixed_BxHxTxC = self.attn_dropout(weights_BxHxTxS) @ heads(v)
        return self.out_proj(mixed_BxHxTxC.transpose(1, 2).reshape(batch, n_query, d_model))


class ReferenceLayer(nn.Module):
    """One Pre-LN layer: self-attention, cross-attention to the pilots, feed-forward (SPEC 3).

    With `query_projections` False it is the v1 layer: attention reads the LayerNorm output directly.
    """

    def __init__(self, dims: ReferenceDims, query_projections: bool):
        super().__init__()
        d = dims.d_model
        self.query_projections = query_projections
        self.register_buffer("pe", sine_encoding(dims.n_token, d))
        self.register_buffer("cond_pe", sine_encoding(dims.cond_n_token, dims.cond_d_model))
        if query_projections:
            self.mha_q_proj = nn.Linear(d, d)
            self.mha_k_proj = nn.Linear(d, d)
            self.mha_v_proj = nn.Linear(d, d)
        self.mha = ProjectedAttention(d, dims.n_head, d, d, dims.dropout)
        self.cond_mha = ProjectedAttention(d, dims.n_head, dims.cond_d_model, dims.cond_d_model, dims.dropout)
        self.ffnn_linear1 = nn.Linear(d, dims.dim_feedforward)
        self.ffnn_dropout = nn.Dropout(dims.dropout)
        self.ffnn_linear2 = nn.Linear(dims.dim_feedforward, d)
        self.norm1 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.norm3 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.dropout1 = nn.Dropout(dims.dropout)
        self.dropout2 = nn.Dropout(dims.dropout)
        self.dropout3 = nn.Dropout(dims.dropout)

    def forward(self, x_BxTxD, cond_BxSxE):
        normed = self.norm1(x_BxTxD)
        if self.query_projections:
            q, k, v = self.mha_q_proj(normed), self.mha_k_proj(normed), self.mha_v_proj(normed)
        else:
            q = k = v = normed
        x_BxTxD = x_BxTxD + self.dropout1(self.mha(q + self.pe, k + self.pe, v))

        normed = self.norm2(x_BxTxD)
        # v4 shares the self-attention query projection with the cross-attention query.
        q_cond = self.mha_q_proj(normed) if self.query_projections else normed
        x_BxTxD = x_BxTxD + self.dropout2(self.cond_mha(q_cond + self.pe, cond_BxSxE + self.cond_pe, cond_BxSxE))

        normed = self.norm3(x_BxTxD)
        hidden = self.ffnn_dropout(F.relu(self.ffnn_linear1(normed)))
        return x_BxTxD + self.dropout3(self.ffnn_linear2(hidden))


class ReferenceTransformer(nn.Module):
    def __init__(self, dims: ReferenceDims, query_projections: bool):
        super().__init__()
        self.dims = dims
        self._embedding = nn.Parameter(torch.randn(dims.n_token, dims.d_model))
        self._layers = nn.ModuleList(ReferenceLayer(dims, query_projections) for _ in range(dims.num_layers))
        self._linear = nn.Linear(dims.d_model, dims.out_per_token)
        nn.init.xavier_uniform_(self._linear.weight)
        nn.init.zeros_(self._linear.bias)

    def forward(self, c_Bx2xK):
        dims = self.dims
        batch = c_Bx2xK.shape[0]
        # tokens of `step_size` consecutive subcarriers, re and im side by side: (B, K/step, 2*step)
        cond = c_Bx2xK.reshape(batch, 2, dims.cond_n_token, dims.step_size).permute(0, 2, 1, 3)
        cond = cond.reshape(batch, dims.cond_n_token, dims.cond_d_model)
        x = self._embedding[None].expand(batch, -1, -1)
        for layer in self._layers:
            x = layer(x, cond)
        y = self._linear(x).reshape(batch, dims.n_token, 2, dims.out_per_token // 2)
        return y.permute(0, 2, 1, 3).reshape(batch, 2, dims.length)


class Estimator_v4(nn.Module):
    """rx (B, S, K, 2) -> (h_est (B, K, 2), zero-forcing equalized rx (B, S, K, 2)); eval() for inference."""

    query_projections = True

    def __init__(self, dims: ReferenceDims):
        super().__init__()
        self.dims = dims
        self.ch_tf = ReferenceTransformer(dims, self.query_projections)
        for layer in self.ch_tf._layers:
            for name in ("mha_q_proj", "mha_k_proj", "mha_v_proj", "ffnn_linear1", "ffnn_linear2"):
                if hasattr(layer, name):
                    nn.init.xavier_uniform_(getattr(layer, name).weight)
                    nn.init.zeros_(getattr(layer, name).bias)

    def forward(self, rx_BxSxKx2):
        pilots = torch.arange(*self.dims.dmrs)
        batch, _, n_subc, _ = rx_BxSxKx2.shape
        c_Bx2xK = torch.zeros(batch, 2, n_subc, dtype=rx_BxSxKx2.dtype)
        c_Bx2xK[:, :, pilots] = rx_BxSxKx2[:, 0, pilots, :].transpose(1, 2)
        scale_Bx1x1 = torch.sqrt(torch.sum(c_Bx2xK ** 2, dim=(1, 2), keepdim=True) / n_subc)
        h_Bx2xK = self.ch_tf(c_Bx2xK / scale_Bx1x1) * scale_Bx1x1
        h_est_BxKx2 = h_Bx2xK.transpose(1, 2)
        h = torch.complex(h_est_BxKx2[..., 0], h_est_BxKx2[..., 1]).detach()[:, None, :]
        y = torch.complex(rx_BxSxKx2[..., 0], rx_BxSxKx2[..., 1])
        equalized = y * torch.conj(h) / (h.real ** 2 + h.imag ** 2)
        return h_est_BxKx2, torch.stack((equalized.real, equalized.imag), dim=-1)


class Estimator(Estimator_v4):
    """The original base (v1) model: no mha_*_proj layers."""

    query_projections = False


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter with non-trivial values (biases and LayerNorm params included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("_embedding"):
                param.copy_(noise)
            elif ".norm" in name and name.endswith(".weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif param.ndim == 2:
                param.copy_(noise / math.sqrt(param.shape[1]))
            else:
                param.copy_(0.2 * noise)
    return model
