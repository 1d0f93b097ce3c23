"""KnowledgeEditor (De Cao, Aziz and Titov, EMNLP 2021): a hypernetwork maps the edit and ∇_W L to ΔW.

Conditioning: "old >> new || input" → the model's own frozen token embeddings → bidirectional LSTM (final
states of both directions) → feed-forward (tanh) → c. Per edited matrix W [out, in], a small network of c gives
α, β ∈ R^out, γ, δ ∈ R^in, η ∈ R and

    ΔW = σ(η) · (α̂ ⊙ ∇_W L(W; x, a) + β̂),   α̂ = softmax(α) γᵀ,   β̂ = softmax(β) δᵀ.

Training: min Σ_{x̂ ∈ P^x} L(θ'; x̂, a)  s.t.  C_KL(θ, θ'; O^x) < m, as the Lagrangian
L + λ (C_KL − m) with λ = softplus(ρ) ≥ 0 learned by gradient ascent, and the margin m shrinking
geometrically from margin_max to margin_min over the run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kedit_ray.defaults import Measured, Rule
from kedit_ray.editors.learned import Grads, HyperNet, LearnedEditor, NetConfig, module_key
from kedit_ray.models import LM

# Measured per model in kedit_ray/defaults/<model>.toml, [ke] (the README's "Learned editors"): the pair of
# down_projs a plain gradient step moves the answer most on for the least KL on O^x; without one, the rule here.
MEASURED = Measured("ke", {"layers": Rule(list[int], lambda n: [max(0, 2 * n // 3 - 1), 2 * n // 3],
                                          "the two layers up to two thirds of the depth")})


@dataclass
class KEConfig(NetConfig):
    lstm_hidden: int = 128        # per direction
    cond_dim: int = 256           # c
    hidden: int = 128             # per-matrix network
    init_scale: float = 1e-3      # at initialisation α̂ ≈ −init_scale, β̂ ≈ 0: edits start as gradient steps
    margin_max: float = 0.1       # m at the start of training (mean KL per O^x position, nats)
    margin_min: float = 0.01      # m at the end
    lagrange_init: float = 1.0    # λ at the start
    lagrange_lr: float = 1e-2     # Adam's rate for ρ (gradient ascent)

    def default_layers(self, lm: LM) -> list[int]:
        """Two upper-middle layers."""
        return MEASURED.value(lm, "layers")


def ke_update(grad: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor,
              delta: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """ΔW [R, out, in] from ∇_W L [R, out, in], α, β [R, out], γ, δ [R, in], η [R, 1]."""
    a_hat = alpha.softmax(-1)[:, :, None] * gamma[:, None, :]          # α̂ = softmax(α) γᵀ
    b_hat = beta.softmax(-1)[:, :, None] * delta[:, None, :]           # β̂ = softmax(β) δᵀ
    return torch.sigmoid(eta)[:, :, None] * (a_hat * grad + b_hat)


class KENet(HyperNet):
    method = "ke"
    conditioned = True

    def __init__(self, cfg: KEConfig, shapes: dict[str, tuple[int, int]], embed_dim: int):
        super().__init__(cfg, shapes, embed_dim)
        self.lstm = nn.LSTM(embed_dim, cfg.lstm_hidden, batch_first=True, bidirectional=True)
        self.ff = nn.Linear(2 * cfg.lstm_hidden, cfg.cond_dim)
        self.heads = nn.ModuleDict()
        for name, (o, i) in shapes.items():
            head = nn.Sequential(nn.Linear(cfg.cond_dim, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, 2 * (o + i) + 1))
            last = head[-1]
            with torch.no_grad():        # softmax(α) ≈ 1/out: γ ≈ −init_scale · out gives α̂ ≈ −init_scale
                last.weight.mul_(0.1)
                last.bias.zero_()
                last.bias[2 * o:2 * o + i] = -cfg.init_scale * o
            self.heads[module_key(name)] = head
        self.rho = nn.Parameter(torch.tensor(float(torch.log(torch.expm1(torch.tensor(cfg.lagrange_init))))))

    def condition(self, cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """c [R, cond_dim]: the BiLSTM's final states of both directions, then the feed-forward layer."""
        packed = nn.utils.rnn.pack_padded_sequence(cond, mask.sum(1).cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return torch.tanh(self.ff(torch.cat([h[0], h[1]], -1)))

    def coefficients(self, c: torch.Tensor, name: str) -> tuple[torch.Tensor, ...]:
        """α, β, γ, δ, η for one matrix."""
        o, i = self.shapes[name]
        return self.heads[module_key(name)](c).split([o, o, i, i, 1], -1)

    def forward(self, grads: Grads, cond: torch.Tensor, cond_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.condition(cond, cond_mask)
        return {name: ke_update(grads.grad(name), *self.coefficients(c, name)) for name in self.shapes}

    def multiplier(self) -> torch.Tensor:
        return F.softplus(self.rho)                                    # λ ≥ 0

    def margin(self, progress: float) -> float:
        cfg = self.cfg
        return cfg.margin_max * (cfg.margin_min / cfg.margin_max) ** min(1.0, progress)

    def objective(self, terms: dict, progress: float) -> tuple[torch.Tensor, dict[str, float]]:
        lam, m = self.multiplier(), self.margin(progress)
        loss = terms["nll"] + lam * (terms["kl"] - m)                  # L + λ (C_KL − m)
        return loss, {"nll": terms["nll"].item(), "kl": terms["kl"].item(), "lambda": lam.item(), "m": m}

    def param_groups(self, lr: float) -> list[dict]:
        rest = [p for n, p in self.named_parameters() if n != "rho"]
        return [{"params": rest, "lr": lr}, {"params": [self.rho], "lr": self.cfg.lagrange_lr}]

    def ascent_parameters(self) -> list[nn.Parameter]:
        return [self.rho]


class KE(LearnedEditor):
    name = "ke"
    net = (KENet, KEConfig)
