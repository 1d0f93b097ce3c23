"""MEND (Mitchell et al., ICLR 2022): a low-rank network transforms the rank-one gradient of each token.

For a linear layer W [out, in], token t's gradient is δ_t u_tᵀ (u_t its input, δ_t the gradient of its
output). A network g reads z_t = [û_t; δ̂_t] (u and δ standardised by running statistics) and gives
(ũ_t, δ̃_t) = g(z_t); g is MEND's: layers z ← z + act(s_l ⊙ (U (V z) + b) + o_l), U = 0 at initialisation (the
identity). By default each matrix has its own g; with `shared`, as in the paper, matrices of one shape share g,
each with its own scale s_l and offset o_l (1 and 0 at the start). The update is a descent step with a learned
rate per matrix:

    ΔW = −lr · Σ_t δ̃_t ũ_tᵀ

Training loss: c_edit · L(θ'; P^x, a) + c_loc · KL(p_θ ‖ p_θ') on O^x.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kedit_ray.defaults import Measured, Rule
from kedit_ray.editors.learned import Grads, HyperNet, LearnedEditor, NetConfig, module_key
from kedit_ray.models import LM

# Measured per model in kedit_ray/defaults/<model>.toml, [mend]; without a value, the paper's last three layers.
MEASURED = Measured("mend", {"layers": Rule(list[int], lambda n: list(range(max(0, n - 3), n)),
                                            "the last three layers, the paper's")})


@dataclass
class MENDConfig(NetConfig):
    rank: int = 64              # of U V
    n_hidden: int = 1           # layers with a ReLU; one more without
    edit_lr: float = 1e-4       # lr at initialisation
    lr_lr: float = 1e-2         # Adam's rate for log lr
    c_edit: float = 0.1
    c_loc: float = 1.0
    shared: bool = False        # one g per matrix shape, as in the paper (measured no better: README)

    def default_layers(self, lm: LM) -> list[int]:
        """The last three layers (the paper), or the per-model default."""
        return MEASURED.value(lm, "layers")


class LowRankResidual(nn.Module):
    """z + act(s_m ⊙ (U (V z) + b) + o_m) for matrix m of `modes`, U zero at initialisation."""

    def __init__(self, dim: int, rank: int, relu: bool, modes: int):
        super().__init__()
        self.v = nn.Parameter(torch.randn(rank, dim) / math.sqrt(dim))
        self.u = nn.Parameter(torch.zeros(dim, rank))
        self.b = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(modes, dim))
        self.offset = nn.Parameter(torch.zeros(modes, dim))
        self.relu = relu

    def forward(self, z: torch.Tensor, mode: int) -> torch.Tensor:
        h = (z @ self.v.T @ self.u.T + self.b) * self.scale[mode] + self.offset[mode]
        return z + (torch.relu(h) if self.relu else h)


class Standardise(nn.Module):
    """Running mean and variance of a feature vector (Chan et al.'s merge of batch moments)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """x [n, dim]: the tokens seen in one batch."""
        n = x.shape[0]
        if n == 0:
            return
        mean, m2 = x.mean(0), ((x - x.mean(0)) ** 2).sum(0)
        total = self.count + n
        d = mean - self.mean
        self.mean += d * n / total
        self.m2 += m2 + d ** 2 * self.count * n / total
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count < 2:                       # nothing seen yet
            return x
        std = (self.m2 / (self.count - 1).clamp_min(1)).sqrt()
        return (x - self.mean) / std.clamp_min(1e-3 * std.mean().clamp_min(1e-30))   # no 0 for a constant feature


class GradientNet(nn.Module):
    """g for the `modes` matrices [out, in] that share it: standardise u and δ, the low-rank residual layers,
    split (ũ, δ̃); each matrix its own learned rate."""

    def __init__(self, out_dim: int, in_dim: int, modes: int, cfg: MENDConfig):
        super().__init__()
        self.in_dim = in_dim
        self.norm_u, self.norm_d = Standardise(in_dim), Standardise(out_dim)
        self.layers = nn.ModuleList([LowRankResidual(in_dim + out_dim, cfg.rank, k < cfg.n_hidden, modes)
                                     for k in range(cfg.n_hidden + 1)])
        self.log_lr = nn.Parameter(torch.full((modes,), math.log(cfg.edit_lr)))

    def forward(self, u: torch.Tensor, d: torch.Tensor, tokens: torch.Tensor, mode: int) -> torch.Tensor:
        """u [R, T, in], δ [R, T, out], tokens [R, T] (1 where the token counts) → ΔW [R, out, in]."""
        z = torch.cat([self.norm_u(u), self.norm_d(d)], -1)
        for layer in self.layers:
            z = layer(z, mode)
        z = z * tokens[..., None]
        u_t, d_t = z[..., :self.in_dim], z[..., self.in_dim:]
        return -self.log_lr[mode].exp() * torch.einsum("rto,rti->roi", d_t, u_t)      # −lr Σ_t δ̃_t ũ_tᵀ


class MENDNet(HyperNet):
    method = "mend"

    def __init__(self, cfg: MENDConfig, shapes: dict[str, tuple[int, int]], embed_dim: int):
        super().__init__(cfg, shapes, embed_dim)
        # matrix name → (its network's key, its mode there)
        group = {n: f"{o}x{i}" if cfg.shared else module_key(n) for n, (o, i) in shapes.items()}
        members = {g: [n for n in shapes if group[n] == g] for g in dict.fromkeys(group.values())}
        self.route = {n: (group[n], members[group[n]].index(n)) for n in shapes}
        self.nets = nn.ModuleDict({g: GradientNet(*shapes[names[0]], len(names), cfg) for g, names in members.items()})

    def forward(self, grads: Grads, cond=None, cond_mask=None) -> dict[str, torch.Tensor]:
        return {n: self.nets[g](grads.u[n], grads.delta[n], grads.tokens, m) for n, (g, m) in self.route.items()}

    def update_stats(self, grads: Grads) -> None:
        keep = grads.tokens.bool()
        for n, (g, _) in self.route.items():
            self.nets[g].norm_u.update(grads.u[n][keep])
            self.nets[g].norm_d.update(grads.delta[n][keep])

    def objective(self, terms: dict, progress: float) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        loss = cfg.c_edit * terms["nll"] + cfg.c_loc * terms["kl"]
        lr = torch.cat([net.log_lr for net in self.nets.values()]).exp().mean().item()
        return loss, {"nll": terms["nll"].item(), "kl": terms["kl"].item(), "lr": lr}

    def param_groups(self, lr: float) -> list[dict]:
        rates = [p for n, p in self.named_parameters() if n.endswith("log_lr")]
        rest = [p for n, p in self.named_parameters() if not n.endswith("log_lr")]
        return [{"params": rest, "lr": lr}, {"params": rates, "lr": self.cfg.lr_lr}]


class MEND(LearnedEditor):
    name = "mend"
    net = (MENDNet, MENDConfig)
