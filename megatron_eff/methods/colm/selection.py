"""CoLM's selection of one iteration, on plain tensors (no model, no process groups): what `method.py` runs
on the candidates' zeroth-order scalars, and what the tests check against hand computations.

    sketch = AdamSketch(0.9, 0.999, 1e-8)
    chosen, info = select_coreset(scalars, sources, keep, coreset_size, sketch, step, z=None,
                                  zo_dim=2560, similarity="l1")

The steps (the authors' efficient trainer, README.md "CoLM"):
1. candidates of the kept sources enter the coreset first (the first `coreset_size` of them, pool order);
2. every other candidate i has the zeroth-order gradient g_i = c_i z (c_i its directional derivative along
   the shared z), Adam-normalised with CoLM's own moments: m_i = b1 m + (1 - b1) g_i, v_i = b2 v + (1 - b2)
   g_i^2, u_i = (m_i / (1 - b1^t)) / (sqrt(v_i / (1 - b2^t)) + eps), t the 1-based iteration;
3. per source, the `zo_dim` coordinates of largest |mean u| are kept (sparsification);
4. the remaining budget is shared by the sources in proportion to their candidate counts (floor, then +1
   round-robin to the smallest allocations), and each source's share is chosen by facility location over a
   similarity of the sketches, maximised by lazy greedy;
5. the moments become the mean m_i, v_i over the selected (non-kept) candidates.

The fast path (`z=None`): with one z for the whole run the moments stay collinear with z and z^2 (m = a z,
v = b z^2), so u_i = r_i sign(z) up to the eps term, with the scalar r_i = Adam-normalised c_i. Every
similarity is then a function of the scalars (L1: zo_dim |r_i - r_j|; cosine: sign(r_i) sign(r_j)), and a
positive factor does not change what facility location picks: the sketch state is the two scalars (a, b).

Determinism: facility location on such values has exact ties (e.g. every point between the two middle ones
of an even count is a median), which float rounding would break one way or another -- differently in
another parallel layout, whose scalars differ in the last bits. So sketches are rounded to multiples of
`SKETCH_QUANTUM` (2^-24) before the similarities: L1 distances and the greedy's gains are then sums of
multiples of 2^-24 far below 2^53 of them, exact in float64 in any order, ties are exact and go to the lowest
index, and a 1e-13 difference in a scalar changes the coreset only if it straddles a rounding boundary
(probability ~1e-6 per candidate).
"""

from __future__ import annotations

import heapq

import torch

SKETCH_QUANTUM = 2.0**-24


class AdamSketch:
    """CoLM's Adam normalisation of per-candidate gradient sketches; `m`, `v` are the moments ([D] float64,
    D = 1 in the scalar fast path), None before the first selection (zeros)."""

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def normalise(self, grads: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u, m_i, v_i) for `grads` [n, D] at 1-based `step`; the moments are not changed."""
        grads = grads.double()
        m_prev = self.m if self.m is not None else torch.zeros(grads.shape[1], dtype=torch.float64)
        v_prev = self.v if self.v is not None else torch.zeros(grads.shape[1], dtype=torch.float64)
        if m_prev.shape[0] != grads.shape[1]:
            raise ValueError(f"CoLM sketch state has {m_prev.shape[0]} coordinates, the sketches {grads.shape[1]} "
                             "(resumed with a different --colm-zo-resample?)")
        m = self.beta1 * m_prev + (1 - self.beta1) * grads
        v = self.beta2 * v_prev + (1 - self.beta2) * grads * grads
        m_hat = m / (1 - self.beta1 ** step)
        v_hat = v / (1 - self.beta2 ** step)
        return m_hat / (v_hat.sqrt() + self.eps), m, v

    def reset(self, m: torch.Tensor, v: torch.Tensor, rows) -> None:
        """The moments become the mean of the selected rows (unchanged when none is selected)."""
        rows = torch.as_tensor(list(rows), dtype=torch.long)
        if len(rows):
            self.m, self.v = m[rows].mean(0), v[rows].mean(0)

    def state_dict(self) -> dict:
        return {"m": None if self.m is None else self.m.tolist(), "v": None if self.v is None else self.v.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.m = None if state["m"] is None else torch.tensor(state["m"], dtype=torch.float64)
        self.v = None if state["v"] is None else torch.tensor(state["v"], dtype=torch.float64)


def source_budgets(counts: list[int], budget: int) -> list[int]:
    """Per-source shares of `budget`: floor(n_s / n * budget), then +1 round-robin to the smallest
    allocations (ties: lower source first) that are still below their count."""
    total = sum(counts)
    if budget > total:
        raise ValueError(f"a budget of {budget} from {total} candidates")
    alloc = [count * budget // total if total else 0 for count in counts]
    left = budget - sum(alloc)
    while left > 0:
        for s in sorted((s for s in range(len(counts)) if alloc[s] < counts[s]), key=lambda s: (alloc[s], s)):
            if left == 0:
                break
            alloc[s] += 1
            left -= 1
    return alloc


def similarity_matrix(sketches: torch.Tensor, kind: str) -> torch.Tensor:
    """[n, n] non-negative similarities of sketches [n, D]: l1 -> max(D) - D (D pairwise L1 distances),
    cosine -> 1 + cos (shifted so facility location stays monotone)."""
    sketches = sketches.double()
    if kind == "l1":
        dist = torch.cdist(sketches, sketches, p=1)
        return dist.max() - dist
    if kind == "cosine":
        unit = sketches / sketches.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return 1 + unit @ unit.T
    raise ValueError(f"unknown similarity {kind!r}")


def scalar_similarity(r: torch.Tensor, kind: str) -> torch.Tensor:
    """The fast path's [n, n] similarity of the scalars r (a positive multiple of `similarity_matrix` of the
    rank-one sketches r_i sign(z))."""
    r = r.double()
    if kind == "l1":
        dist = (r[:, None] - r[None, :]).abs()
        return dist.max() - dist
    if kind == "cosine":
        sign = torch.sign(r)
        return 1 + sign[:, None] * sign[None, :]
    raise ValueError(f"unknown similarity {kind!r}")


def _gain(sim: torch.Tensor, best: torch.Tensor, j: int) -> float:
    """Facility-location gain of adding column j given each row's best similarity so far."""
    return float((sim[:, j] - best).clamp_min(0).sum())


def facility_location(sim: torch.Tensor, budget: int) -> list[int]:
    """`budget` columns maximising sum_i max_{j in A} sim[i, j] by lazy greedy: the same picks as the plain
    greedy (largest gain, lowest index on ties) with gains re-evaluated only when they may lead."""
    n = sim.shape[0]
    budget = min(budget, n)
    best = torch.zeros(n, dtype=sim.dtype)
    heap = [(-_gain(sim, best, j), j) for j in range(n)]  # upper bounds of the gains (submodularity)
    heapq.heapify(heap)
    chosen: list[int] = []
    while len(chosen) < budget:
        _, j = heapq.heappop(heap)
        entry = (-_gain(sim, best, j), j)
        if heap and entry > heap[0]:  # another candidate's bound may still beat it: re-queue
            heapq.heappush(heap, entry)
            continue
        chosen.append(j)
        best = torch.maximum(best, sim[:, j])
    return chosen


def greedy_facility_location(sim: torch.Tensor, budget: int) -> list[int]:
    """The plain greedy (every gain evaluated every round): the reference lazy greedy must equal."""
    n = sim.shape[0]
    best = torch.zeros(n, dtype=sim.dtype)
    chosen: list[int] = []
    for _ in range(min(budget, n)):
        gains = [(-_gain(sim, best, j), j) for j in range(n) if j not in chosen]
        j = min(gains)[1]
        chosen.append(j)
        best = torch.maximum(best, sim[:, j])
    return chosen


def facility_value(sim: torch.Tensor, chosen: list[int]) -> float:
    return float(sim[:, chosen].max(dim=1).values.sum()) if chosen else 0.0


def select_coreset(scalars: torch.Tensor, sources: torch.Tensor, keep: set[int], coreset_size: int,
                   sketch: AdamSketch, step: int, z: torch.Tensor | None = None, zo_dim: int = 2560,
                   similarity: str = "l1") -> tuple[list[int], dict]:
    """Pool positions of the coreset (sorted) and what was done: {"kept", "per_source": {source: count}}.

    `scalars` [n]: each candidate's c_i; `sources` [n]: its source (blend member); `keep`: kept sources;
    `z` [D]: the shared direction (general path) or None (the scalar fast path, see the module docstring).
    Updates `sketch`'s moments (step 5)."""
    n = scalars.shape[0]
    if coreset_size > n:
        raise ValueError(f"a coreset of {coreset_size} from {n} candidates")
    sources = sources.long()
    kept = [i for i in range(n) if int(sources[i]) in keep][:coreset_size]
    large = torch.tensor([i for i in range(n) if int(sources[i]) not in keep], dtype=torch.long)
    budget = coreset_size - len(kept)
    chosen = list(kept)
    if budget > 0:
        c = scalars.double()[large]
        grads = c[:, None] if z is None else c[:, None] * z.double()[None, :]  # [n_large, D]
        u, m, v = sketch.normalise(grads, step)
        u = torch.round(u / SKETCH_QUANTUM) * SKETCH_QUANTUM  # see "Determinism" in the module docstring
        groups = sorted(set(sources[large].tolist()))
        rows_of = {s: (sources[large] == s).nonzero().flatten() for s in groups}
        shares = source_budgets([len(rows_of[s]) for s in groups], budget)
        selected_rows: list[int] = []
        for s, share in zip(groups, shares):
            rows = rows_of[s]
            if share == 0:
                continue
            if share >= len(rows):
                picked = rows.tolist()
            else:
                u_s = u[rows]
                if z is None:
                    sim = scalar_similarity(u_s[:, 0], similarity)
                else:
                    coords = u_s.mean(0).abs().topk(min(zo_dim, u_s.shape[1])).indices
                    sim = similarity_matrix(u_s[:, coords], similarity)
                picked = rows[facility_location(sim, share)].tolist()
            selected_rows += picked
        sketch.reset(m, v, selected_rows)
        chosen += large[selected_rows].tolist()
    chosen.sort()
    counts: dict[int, int] = {}
    for i in chosen:
        counts[int(sources[i])] = counts.get(int(sources[i]), 0) + 1
    return chosen, {"kept": len(kept), "per_source": counts}
