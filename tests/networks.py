"""Random ReLU networks as plain numpy matrices, their unit graphs, and hypothesis strategies.

A :class:`Network` has nodes 0..n-1: node 0 is the input, node n-1 the output, the others hidden
ReLU layers. Each edge (src, dst, W) adds ``W @ h_src`` to node dst's pre-activation, W of shape
(size[dst], size[src]); layered networks have edges k -> k+1 only, DAG networks add skip edges.
Every hidden unit has a scale group (several units may share one: tied groups); input and output
units are FIXED. The unit graph has one layer per edge (as separate Gemms whose outputs are
added would have in ONNX), so a node fed by two edges contributes one row per edge to the norm;
the reference in tests/reference.py uses the same layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from onnxbalance.scaling import scale_bias, scale_weight, unit_log_scales
from onnxbalance.unitgraph import FIXED, Layer, UnitGraph, coupling_matrix


@dataclass(frozen=True)
class Edge:
    src: int
    dst: int
    weight: np.ndarray


@dataclass(frozen=True)
class Network:
    sizes: tuple[int, ...]
    edges: tuple[Edge, ...]
    biases: tuple[np.ndarray, ...]  # one per node; the input's is empty
    groups: tuple[np.ndarray, ...]  # per node, the group of each unit (FIXED at input/output)
    n_groups: int

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(f"g{k}" for k in range(self.n_groups))

    def unit_graph(self, p: float) -> UnitGraph:
        layers = []
        for k, edge in enumerate(self.edges):
            coupling, col_groups = coupling_matrix(edge.weight, self.groups[edge.src], p)
            layers.append(
                Layer(
                    f"edge{k}_{edge.src}to{edge.dst}", coupling, self.groups[edge.dst], col_groups
                )
            )
        return UnitGraph(tuple(layers), self.group_names)

    def layers(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(W, row groups, column groups) of every edge, raw (no aggregation)."""
        return [(e.weight, self.groups[e.dst], self.groups[e.src]) for e in self.edges]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Output for a batch x of shape (batch, size[0])."""
        values = [np.asarray(x, dtype=np.float64)]
        last = len(self.sizes) - 1
        for node in range(1, len(self.sizes)):
            z = np.broadcast_to(self.biases[node], (len(x), self.sizes[node])).copy()
            for edge in self.edges:
                if edge.dst == node:
                    z += values[edge.src] @ edge.weight.T
            values.append(z if node == last else np.maximum(z, 0.0))
        return values[-1]

    def rescaled(self, group_log_scales: np.ndarray) -> Network:
        units = [unit_log_scales(group_log_scales, g) for g in self.groups]
        edges = tuple(
            Edge(e.src, e.dst, scale_weight(e.weight, units[e.dst], units[e.src]))
            for e in self.edges
        )
        biases = tuple(scale_bias(b, units[k]) if b.size else b for k, b in enumerate(self.biases))
        return Network(self.sizes, edges, biases, self.groups, self.n_groups)


def make_network(
    sizes,
    *,
    seed: int,
    skips: int = 0,
    zero_fraction: float = 0.0,
    ties: int = 0,
    paper_init: bool = False,
    bias: bool = True,
    group_pool: int = 0,
) -> Network:
    """A random network: ``skips`` extra edges between non-adjacent nodes, a fraction of weights
    set to zero, ``ties`` pairs of hidden units merged into one group, or (``group_pool`` > 0)
    every hidden unit in a random one of that many groups. ``paper_init``: Gaussian weights of
    variance 2 / fan-in and zero biases (the paper's Fig. 2 setup)."""
    rng = np.random.default_rng(seed)
    sizes = tuple(int(s) for s in sizes)
    n = len(sizes)
    pairs = [(k, k + 1) for k in range(n - 1)]
    candidates = [(a, b) for a in range(n) for b in range(a + 2, n)]
    if skips and candidates:
        picked = rng.choice(len(candidates), size=min(skips, len(candidates)), replace=False)
        pairs += [candidates[i] for i in sorted(picked)]
    edges = []
    for src, dst in pairs:
        std = np.sqrt(2.0 / sizes[src]) if paper_init else 1.0
        w = rng.normal(0.0, std, size=(sizes[dst], sizes[src]))
        if zero_fraction:
            w[rng.random(w.shape) < zero_fraction] = 0.0
        edges.append(Edge(src, dst, w))
    biases = [np.zeros(0)] + [
        np.zeros(s) if (paper_init or not bias) else rng.normal(size=s) for s in sizes[1:]
    ]
    groups = [np.full(sizes[0], FIXED)]
    next_group = 0
    for s in sizes[1:-1]:
        groups.append(np.arange(next_group, next_group + s))
        next_group += s
    groups.append(np.full(sizes[-1], FIXED))
    n_groups = next_group
    if ties and n_groups >= 2:
        mapping = np.arange(n_groups)
        for _ in range(ties):
            a, b = rng.choice(n_groups, size=2, replace=False)
            mapping[mapping == mapping[b]] = mapping[a]
        _, compact = np.unique(mapping, return_inverse=True)
        groups = [g if g[0] == FIXED else compact[g] for g in groups]
        n_groups = int(compact.max()) + 1
    if group_pool:
        groups = [g if g[0] == FIXED else rng.integers(0, group_pool, g.size) for g in groups]
        n_groups = group_pool
    return Network(sizes, tuple(edges), tuple(biases), tuple(groups), n_groups)


def dead_and_cut_off_network() -> Network:
    """h1 = [a, b, c, d], h2 = [e, f, g]; a has zero incoming weights, b zero outgoing weights;
    c and g share a group whose only input is the self-loop c -> g (cut off from the inputs)."""
    rng = np.random.default_rng(7)
    w1 = rng.normal(size=(4, 3))
    w1[0] = 0.0  # a: dead (incoming)
    w1[2] = 0.0  # c: fed by nothing but ...
    w2 = rng.normal(size=(3, 4))
    w2[:, 1] = 0.0  # b: dead (outgoing)
    w2[2] = 0.0
    w2[2, 2] = 1.5  # ... g, in c's group, fed only by c
    w3 = rng.normal(size=(2, 3))
    groups = (np.full(3, FIXED), np.array([0, 1, 2, 3]), np.array([4, 5, 2]), np.full(2, FIXED))
    biases = (np.zeros(0), rng.normal(size=4), rng.normal(size=3), rng.normal(size=2))
    edges = (Edge(0, 1, w1), Edge(1, 2, w2), Edge(2, 3, w3))
    return Network((3, 4, 3, 2), edges, biases, groups, 6)


PAPER_SIZES = (
    (200, 2500, 1250, 10),
    (200, 2000, 1000, 500, 250, 10),
    (200, 1000, 750, 750, 500, 500, 250, 10),
)


def paper_networks(seed: int = 0) -> list[Network]:
    """The three networks of the paper's Fig. 2, Gaussian variance 2 / fan-in, zero biases."""
    return [make_network(s, seed=seed + k, paper_init=True) for k, s in enumerate(PAPER_SIZES)]


@st.composite
def networks(
    draw,
    *,
    dag: bool = False,
    max_hidden: int = 3,
    max_width: int = 5,
    zeros: bool = False,
    ties: bool = False,
    max_ties: int = 2,
    group_pool: bool = False,
) -> Network:
    """Small random networks: layered (dag=False) or with skip edges (dag=True); ``group_pool``
    puts hidden units in a few random groups (many ties and self-loops)."""
    hidden = draw(st.integers(1, max_hidden))
    sizes = [draw(st.integers(1, max_width)) for _ in range(hidden + 2)]
    return make_network(
        sizes,
        seed=draw(st.integers(0, 2**32 - 1)),
        skips=draw(st.integers(1, 4)) if dag else 0,
        zero_fraction=draw(st.sampled_from([0.0, 0.3, 0.6])) if zeros else 0.0,
        ties=draw(st.integers(0, max_ties)) if ties else 0,
        group_pool=draw(st.integers(1, 5)) if group_pool else 0,
    )


exponents = st.floats(0.5, 4.0, allow_nan=False, allow_infinity=False)
