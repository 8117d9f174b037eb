"""Placing responses outside the GCF graph next to their nearest graph responses (beyond the paper).

CoPL's adaptation (§4.3) reads a new user's pairs through the graph: the GCF embeddings of the two
responses (for γ) and the positive edges of the chosen one (for the k-hop neighbours). The paper only
adapts from responses that are graph nodes; a pair on any other response is dropped. Here a response
outside the graph, given by its prompt and text, is embedded with the run's frozen backbone (the pooled
features of :mod:`coplctl.models.features`, cached on disk like training's) and placed by those features,
*centred per prompt*: a response's features minus the mean over the graph's responses to its prompt
(if the graph has none, over the placed responses to it). Raw features mostly tell a prompt's topic,
which says nothing of a preference; what sets a response apart from the other answers to its prompt
does, and the graph's own pairs (two answers to one prompt) are read that way too.

- Neighbours: the ``k`` graph responses whose centred features are most cosine-similar, weighted by
  softmax(similarity / τ), τ = :data:`TEMPERATURE`. A placed response that is a pair's chosen one
  reaches, through its positive edge, the seen users who chose any of its ``k`` neighbours.
- GCF embedding (``embedding="ridge"``, default): the prompt's mean graph embedding (the whole graph's
  mean if it has none to the prompt: only differences within a prompt matter to γ) plus a ridge
  regression map from centred features to centred GCF embeddings, fitted on the graph's responses
  (λ = :data:`RIDGE` × the mean eigenvalue of the features' Gram matrix), applied to the centred
  features; the map learns those differences from every graph pair. ``embedding="neighbours"``: the
  weighted mean of the neighbours' embeddings.

Measured (``python benchmarks/perf/adapt_outside.py``; simulated UF-P-2, 1,000 seen users, frozen
minilm, 50 unseen users with 4-8 pairs each, two seeds, unseen test accuracy): pairs on responses held
out of the graph give 73.6 / 75.3% with ridge embeddings and 70.4 / 67.0% with neighbour means (on
uncentred features 67.0 / 67.1%), against 68.3 / 68.2% when they are dropped (every user falls back)
and 76.0 / 77.8% for the same users' pairs on graph responses. Rephrased graph responses: 74.2 / 75.6%
(ridge), 76.0 / 77.6% (neighbours, which find the originals).

Neighbours are sorted by similarity with ties broken by node order (a stable sort), so the placement
is deterministic. Features are compared in chunks of bounded memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

TEMPERATURE = 0.05  # τ of the neighbours' softmax weights over cosine similarities
RIDGE = 0.25  # λ of the feature -> GCF embedding map, relative to the Gram matrix's mean eigenvalue
EMBEDDINGS = ("ridge", "neighbours")
CHUNK_ELEMENTS = 1 << 24  # floats of a (new responses × graph responses) similarity block


@dataclass
class Placement:
    """Responses outside the graph and where they are placed: row i of ``nearest`` holds the graph node
    indices of ``ids[i]``'s nearest graph responses, most similar first, ``weights`` their weights
    (rows sum to 1), and ``emb`` (if given) the GCF embedding of ``ids[i]``."""

    ids: list[str]
    nearest: torch.Tensor  # (m, k) int64 graph node indices
    weights: torch.Tensor  # (m, k) float32
    k: int  # the neighbours asked for (rows have fewer when the graph has fewer responses)
    emb: torch.Tensor | None = None  # (m, d) GCF embeddings; None: the neighbours' weighted mean

    def embedding(self, node_emb: torch.Tensor) -> torch.Tensor:
        """(m, d): each placed response's GCF embedding, given the graph's (``node_emb``)."""
        if self.emb is not None:
            return self.emb.to(node_emb.dtype)
        return torch.einsum("mk,mkd->md", self.weights.to(node_emb.dtype), node_emb[self.nearest])


def nearest(graph_feats: torch.Tensor, new_feats: torch.Tensor, k: int, temperature: float = TEMPERATURE
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights) of each new row's ``k`` most cosine-similar graph rows (fewer if the graph has
    fewer), most similar first, ties broken by index; weights are softmax(similarity / ``temperature``)."""
    k = min(k, len(graph_feats))
    g, x = F.normalize(graph_feats.float(), dim=-1), F.normalize(new_feats.float(), dim=-1)
    idx = torch.empty(len(x), k, dtype=torch.long)
    sim = torch.empty(len(x), k)
    step = max(1, CHUNK_ELEMENTS // max(1, len(g)))
    for s in range(0, len(x), step):
        block = x[s:s + step] @ g.T  # (b, n)
        order = torch.sort(block, dim=1, descending=True, stable=True).indices[:, :k]
        idx[s:s + step], sim[s:s + step] = order, block.gather(1, order)
    return idx, torch.softmax(sim / temperature, dim=1)


def _means(x: torch.Tensor, codes: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-group means of the rows of ``x``, rows per group)."""
    sums = torch.zeros(groups, x.shape[1], dtype=x.dtype).index_add_(0, codes, x)
    counts = torch.bincount(codes, minlength=groups)
    return sums / counts.clamp(min=1).to(x.dtype)[:, None], counts


def ridge_map(x: torch.Tensor, y: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """W minimising |x W - y|² + λ|W|², λ = ``ridge`` × trace(xᵀx) / columns (in float64)."""
    x, y = x.double(), y.double()
    gram = x.T @ x
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    return torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), x.T @ y).float()


@contextlib.contextmanager
def plain_backbone(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``model`` as the frozen backbone: peft adapters off and MoLE layers replaced by their base
    linear layers (lora-mode runs inject both into the backbone itself)."""
    from coplctl.copl.mole import MoLELinear
    from coplctl.models.encoders import adapters_disabled

    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, MoLELinear):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, module.base)
            swapped.append((parent, attr, module))
    try:
        with adapters_disabled(model):
            yield model
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)


def backbone_features(backbone, responses: pd.DataFrame) -> torch.Tensor:
    """Pooled frozen-backbone features of ``responses`` (prompt, text), from the feature cache."""
    from coplctl.models.features import features

    with plain_backbone(backbone.model):
        return features(backbone, responses["prompt"], responses["text"])


def outside_responses(graph_ids: list[str], pairs: pd.DataFrame, responses: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``responses`` that pairs name and the graph lacks, in order of first mention."""
    named = pd.unique(pairs[["chosen_id", "rejected_id"]].to_numpy().ravel("F"))
    outside = pd.Index(named).difference(pd.Index(graph_ids), sort=False)
    rows = responses.drop_duplicates("response_id").set_index("response_id")
    outside = [r for r in outside if r in rows.index]
    return rows.loc[outside, ["prompt", "text"]].rename_axis("response_id").reset_index()


def place(backbone, run, pairs: pd.DataFrame, responses: pd.DataFrame, k: int,
          embedding: str = "ridge") -> Placement:
    """The placement at ``k`` >= 1 neighbours of every response ``pairs`` name that is outside the graph of
    GCF run ``run`` but known to ``responses`` (response_id, prompt, text), with GCF embeddings by
    ``embedding`` (``ridge`` or ``neighbours``, see the module's docstring)."""
    graph = run.responses
    new = outside_responses(graph["response_id"].tolist(), pairs, responses)
    if new.empty:
        return Placement([], torch.empty(0, k, dtype=torch.long), torch.empty(0, k), k)
    graph_feats, new_feats = backbone_features(backbone, graph), backbone_features(backbone, new)
    # prompt anchors: the mean features (and GCF embedding) of the graph's responses to the prompt, else of
    # the placed responses to it (and the graph's mean embedding; only differences within a prompt count)
    codes, prompts = pd.factorize(pd.concat([graph["prompt"], new["prompt"]], ignore_index=True))
    g_code, n_code = torch.from_numpy(codes[:len(graph)]), torch.from_numpy(codes[len(graph):])
    E = run.response_emb.float()
    f_anchor, in_graph = _means(graph_feats, g_code, len(prompts))
    e_anchor = _means(E, g_code, len(prompts))[0]
    alone = in_graph == 0
    f_anchor[alone] = _means(new_feats, n_code, len(prompts))[0][alone]
    e_anchor[alone] = E.mean(0)
    graph_centred = graph_feats - f_anchor[g_code]
    query = new_feats - f_anchor[n_code]
    idx, w = nearest(graph_centred, query, k)
    emb = None
    if embedding == "ridge":
        emb = e_anchor[n_code] + query @ ridge_map(graph_centred, E - e_anchor[g_code])
    return Placement(new["response_id"].tolist(), idx, w, k, emb)
