"""Dynamic batch loading (Sheared LLaMA, Xia et al. 2024; `dynamic_loading_callback.py` of LLM-Shearing).

Every `--dbl-update-interval` iterations: the per-domain validation loss l_i on each domain's held-out
samples (`Trainer.evaluate_domains`, reduced over data-parallel ranks, so every rank computes the same
update), then

    delta = l - l_ref                   (clipped at 0 with --dbl-clip-negative, the paper's Alg. 1)
    alpha = softmax(log w + eta delta)
    w     = (1 - c) alpha + c / k       (c = --dbl-smoothing, k domains), in float64

and the batch source draws samples from the next one on with w (`BatchSource.set_weights`; the blend
rebuilds only the window it reads next). The weights live in the data state of checkpoints (the blend's
weight schedule), so a resumed run continues with exactly the same samples.
"""

from __future__ import annotations

import json
import os

import numpy as np

from megatron_eff.methods.base import Method
from megatron_eff.methods.dbl.config import DBLConfig
from megatron_eff.training.logging import log


def dbl_update(weights, losses, reference, eta: float = 1.0, smoothing: float = 1e-4,
               clip_negative: bool = False) -> np.ndarray:
    """The new domain weights (float64, summing to 1) from the current ones and the loss gaps."""
    weights, losses, reference = (np.asarray(x, dtype=np.float64) for x in (weights, losses, reference))
    delta = losses - reference
    if clip_negative:
        delta = np.maximum(delta, 0.0)
    with np.errstate(divide="ignore"):
        logits = np.log(weights) + eta * delta
    alpha = np.exp(logits - logits.max())
    alpha /= alpha.sum()
    new = (1 - smoothing) * alpha + smoothing / len(weights)
    return new / new.sum()


def read_reference_losses(values: tuple[str, ...], domains: list[str]) -> list[float]:
    """--dbl-reference-loss: one number per domain, or one file (JSON {domain: loss} or numbers)."""
    if len(values) == 1 and not _is_number(values[0]):
        path = values[0]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--dbl-reference-loss {path}: file not found")
        text = open(path, encoding="utf-8").read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = text.split()
        if isinstance(data, dict):
            missing = [d for d in domains if d not in data]
            if missing:
                raise ValueError(f"--dbl-reference-loss {path}: no loss for domains {missing} (has {sorted(data)})")
            return [float(data[d]) for d in domains]
        values = tuple(str(v) for v in data)
    if not all(_is_number(v) for v in values):
        raise ValueError(f"--dbl-reference-loss {' '.join(values)}: expected numbers or one file")
    if len(values) != len(domains):
        raise ValueError(f"--dbl-reference-loss has {len(values)} values for {len(domains)} --data-path domains "
                         f"({', '.join(domains)})")
    return [float(v) for v in values]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


class DynamicBatchLoading(Method):
    name = "dbl"

    def __init__(self, dbl_config: DBLConfig, config, pstate):
        self.cfg, self.pstate = dbl_config, pstate
        self.trainer = None
        self.domains: list[str] = []
        self.reference: list[float] = []
        self.last_losses: dict[str, float] = {}

    def attach(self, trainer) -> None:
        source = trainer.batch_source
        if not source.blended or not trainer.valid_domains:
            raise ValueError("--dbl needs a blended --data-path with a validation split for each domain (--split)")
        self.trainer = trainer
        self.domains = list(source.dataset.member_names)
        self.reference = read_reference_losses(self.cfg.reference_loss, self.domains)

    @property
    def weights(self) -> list[float]:
        """The blend weights in effect for the next samples."""
        return list(self.trainer.batch_source.dataset.weight_schedule[-1][1])

    def after_step(self, iteration: int) -> None:
        if iteration % self.cfg.update_interval:
            return
        losses = self.trainer.evaluate_domains()
        self.last_losses = losses
        new = dbl_update(self.weights, [losses[d] for d in self.domains], self.reference, self.cfg.eta,
                         self.cfg.smoothing, self.cfg.clip_negative)
        self.trainer.batch_source.set_weights(new.tolist())
        listed = " | ".join(f"{d} loss {losses[d]:.4f} (ref {r:.4f}) weight {w:.4f}"
                            for d, r, w in zip(self.domains, self.reference, self.weights))
        log(f"dynamic batch loading at iter {iteration}: {listed}", self.trainer.is_logger)

    def gaps(self) -> dict[str, float]:
        """{domain: last validation loss - reference}."""
        return {d: self.last_losses[d] - r for d, r in zip(self.domains, self.reference) if d in self.last_losses}

    def log_scalars(self) -> dict[str, float]:
        out = {f"dbl/weight/{d}": w for d, w in zip(self.domains, self.weights)}
        out.update({f"dbl/gap/{d}": g for d, g in self.gaps().items()})
        return out

    def state_dict(self) -> dict:
        return {"last_losses": self.last_losses}

    def load_state_dict(self, state: dict) -> None:
        self.last_losses = dict(state.get("last_losses", {}))

    def summary(self) -> str:
        return "dbl: final weights " + ", ".join(f"{d} {w:.4f}" for d, w in zip(self.domains, self.weights))
