"""Debiasing Mixture-of-Experts: a router, a batched expert bank and the load-balancing loss.

Routing is per item, so every token of an item goes through the same top-k experts. The default router
([`BiasRouter`]) reads the item's *bias evidence*: how strongly its text and its image carry a shortcut (class
spreads of the context statistics, blind to which class the shortcut points at), so that experts can specialise by
bias type and routing is no channel for the cue's value. [`AttentionRouter`] reads the pooled multimodal content
instead. Experts are bottleneck MLPs applied as a residual, `h + sum_e g_e * E_e(h)`; all experts are computed in
one batched contraction (no Python loop over experts) and the gates of experts outside the top-k are exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

from .configuration_cfmoe import RouterInput


@dataclass
class RoutingResult:
    """Gates of one MoE site.

    gates: `(batch, num_experts)` float32, non-zero only on the top-k experts, rows sum to one.
    router_logits: `(batch, num_experts)` float32 scores before the softmax.
    """

    gates: torch.Tensor
    router_logits: torch.Tensor


def top_k_gates(logits: torch.Tensor, top_k: int) -> RoutingResult:
    """Softmax over `logits` `(batch, E)` float32, the top-k kept and renormalised (the rest exactly zero)."""
    probs = logits.softmax(dim=-1)
    top_probs, top_idx = probs.topk(top_k, dim=-1)
    gates = torch.zeros_like(probs).scatter(-1, top_idx, top_probs / top_probs.sum(-1, keepdim=True))
    return RoutingResult(gates=gates, router_logits=logits)


class Router(nn.Module):
    """What every router shares: `num_experts`, top-k, multiplicative input jitter in training, a temperature."""

    def __init__(self, num_experts: int, top_k: int, jitter: float, temperature: float):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.jitter = jitter
        self.temperature = temperature

    def jittered(self, inputs: torch.Tensor) -> torch.Tensor:
        """`inputs` times noise uniform in `[1 - jitter, 1 + jitter]` while training."""
        if self.training and self.jitter > 0:
            return inputs * torch.empty_like(inputs).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return inputs


class BiasRouter(Router):
    """Gates from an item's bias evidence `(batch, num_evidence)` (one non-negative strength per kind of shortcut,
    `ContextStatistics.bias_evidence`): a linear score per expert. Initialised so that expert 0 takes items without
    evidence and expert `1 + f` items with evidence of kind `f`; training may move that."""

    def __init__(self, num_evidence: int, num_experts: int, top_k: int, jitter: float, temperature: float):
        super().__init__(num_experts, top_k, jitter, temperature)
        self.weight = nn.Parameter(torch.empty(num_experts, num_evidence, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32))

    def forward(self, evidence: torch.Tensor) -> RoutingResult:
        """evidence: `(batch, num_evidence)` -> gates `(batch, num_experts)`."""
        evidence = self.jittered(evidence.float())
        with torch.autocast(device_type=evidence.device.type, enabled=False):  # routing stays float32
            logits = (evidence @ self.weight.float().T + self.bias.float()) / self.temperature
        return top_k_gates(logits, self.top_k)


class AttentionRouter(Router):
    """A query from the pooled item state attends over learned expert keys: softmax, top-k, renormalise."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, jitter: float, temperature: float):
        super().__init__(num_experts, top_k, jitter, temperature)
        self.key_size = max(8, hidden_size // 4)
        # float32 whatever the default dtype (the model keeps routers in float32 when loading in half precision)
        self.query = nn.Linear(hidden_size, self.key_size, bias=False, dtype=torch.float32)
        self.expert_keys = nn.Parameter(torch.empty(num_experts, self.key_size, dtype=torch.float32))

    def forward(self, pooled: torch.Tensor) -> RoutingResult:
        """pooled: `(batch, hidden)` -> gates `(batch, num_experts)`."""
        pooled = self.jittered(pooled)
        with torch.autocast(device_type=pooled.device.type, enabled=False):  # routing stays float32
            # the module is called (not its weight read) so that offload hooks fire; routers load in float32
            query = self.query(pooled.to(self.expert_keys.dtype)).float()
            logits = query @ self.expert_keys.float().T / (self.key_size**0.5 * self.temperature)
        return top_k_gates(logits, self.top_k)


class ExpertBank(nn.Module):
    """`num_experts` bottleneck MLPs with stacked weights, evaluated together and mixed by gates."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, act: str = "gelu"):
        super().__init__()
        self.up = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, intermediate_size))
        self.down = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.act = ACT2FN[act]

    def forward(self, hidden: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """hidden: `(tokens, hidden)`, gates: `(tokens, num_experts)` -> `sum_e g_e E_e(h)`, `(tokens, hidden)`."""
        gates = gates.to(hidden.dtype)
        inner = self.act(torch.einsum("nd,edh->neh", hidden, self.up) + self.up_bias)
        return torch.einsum("neh,ehd->nd", inner * gates.unsqueeze(-1), self.down) + gates @ self.down_bias


class DebiasingMoE(nn.Module):
    """Residual MoE site: `h + sum_e g_e E_e(h)` with per-item gates.

    router_input: `BIAS` ([`BiasRouter`] on the bias evidence) or `CONTENT` ([`AttentionRouter`] on the pooled
    item state). uniform_gates: every expert weighted 1/E whatever the router says (an ablation).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        jitter: float,
        temperature: float,
        router_input: RouterInput = RouterInput.BIAS,
        num_evidence: int = 3,
        uniform_gates: bool = False,
    ):
        super().__init__()
        self.router_input = router_input
        if router_input == RouterInput.BIAS:
            self.router = BiasRouter(num_evidence, num_experts, top_k, jitter, temperature)
        else:
            self.router = AttentionRouter(hidden_size, num_experts, top_k, jitter, temperature)
        self.experts = ExpertBank(hidden_size, intermediate_size, num_experts)
        self.uniform_gates = uniform_gates

    def route(self, content: torch.Tensor, evidence: torch.Tensor | None) -> RoutingResult:
        """content: `(batch, hidden)` pooled item states; evidence: `(batch, num_evidence)` bias evidence, or None
        where it would not change the gates (one expert, uniform gates)."""
        if self.router_input == RouterInput.CONTENT:
            routing = self.router(content)
        else:
            routing = self.router(
                content.new_zeros(content.shape[0], self.router.weight.shape[1]) if evidence is None else evidence
            )
        if self.uniform_gates:
            uniform = torch.full_like(routing.gates, 1.0 / routing.gates.shape[-1])
            return RoutingResult(gates=uniform, router_logits=routing.router_logits)
        return routing

    def forward(self, hidden: torch.Tensor, token_gates: torch.Tensor) -> torch.Tensor:
        """hidden: `(tokens, hidden)`; token_gates: `(tokens, num_experts)` (the item gates of each token)."""
        return hidden + self.experts(hidden, token_gates)


def load_balancing_loss(gates: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss `E * sum_e f_e * P_e` over the items of a batch.

    gates: `(batch, E)` top-k gates (their support is the dispatch); router_logits: `(batch, E)`.
    Equals 1 when dispatch and probabilities are uniform; larger when routing collapses.
    """
    num_experts = gates.shape[-1]
    dispatch = (gates > 0).float()
    fraction = dispatch.mean(0) / dispatch.sum(-1).mean().clamp_min(1.0)
    prob = router_logits.float().softmax(-1).mean(0)
    return num_experts * (fraction * prob).sum()
