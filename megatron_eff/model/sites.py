"""Named sites: where training methods mask or read the model's activations, and typed module discovery.

Every transformer layer holds identity modules `Site(kind, layer)` at four kinds of places:

| kind     | where                                               | x                         | `mask` shape   |
|----------|-----------------------------------------------------|---------------------------|----------------|
| "head"   | attention context per head, before `linear_proj`    | `[s, b, nq/tp, d]`        | `[nq/tp]`      |
| "ffn"    | MLP intermediate activation, before `linear_fc2`    | `[s, b, ffn/tp]`          | `[ffn/tp]`     |
| "hidden" | the layer's output hidden state (residual stream)   | `[s, b, h]` (`[s/tp, ..]` SP) | `[h]`      |
| "layer"  | one residual branch's delta (`branch` = "attention" | `[s, b, h]` (`[s/tp, ..]` SP) | scalar     |
|          | or "mlp"), before the residual add: mask both of a  |                           |                |
|          | layer's "layer" sites with 0 to remove the layer    |                           |                |

`layer` is the global layer index (`TransformerLayer.layer_number`). A site costs nothing by default (it
returns x). A method acts on it in either of two ways:
- `site.mask = tensor` (shape in the table; None switches it off): the site returns `x * mask`,
  broadcast over the other dims. The mask always covers every local head / channel; when the caller
  computes only some (`heads=` / `query_heads=` / `channels=`, see `model/transformer.py`), the site
  applies `mask[index]`.
- forward hooks: `site.register_forward_hook(hook)`, `hook(site, (x, index), out)` may return a new
  output; `index` is the LongTensor of the local heads / channels present in x (None: all of them).

Discovery: `find_modules(chunks, Site)` yields `(name, module)` over the model chunks of this rank, and
`find_sites(chunks, kind)` the sites of one kind, so methods do not parse module names.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

SITE_KINDS = ("head", "ffn", "hidden", "layer")


class Site(nn.Module):
    """An identity point `kind` of layer `layer` (see the module docstring); `branch` names the residual
    branch of a "layer" site."""

    def __init__(self, kind: str, layer: int | None, branch: str | None = None):
        super().__init__()
        if kind not in SITE_KINDS:
            raise ValueError(f"site kind must be one of {SITE_KINDS}, got {kind!r}")
        self.kind, self.layer, self.branch = kind, layer, branch
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        if self.mask is None:
            return x
        mask = self.mask if index is None else self.mask[index]
        if self.kind == "head":
            mask = mask.unsqueeze(-1)  # [heads, 1] against [s, b, heads, d]
        return x * mask.to(x.dtype)

    def extra_repr(self) -> str:
        branch = "" if self.branch is None else f", branch={self.branch!r}"
        return f"kind={self.kind!r}, layer={self.layer}{branch}"


def find_modules(chunks, cls: type[nn.Module]) -> Iterator[tuple[str, nn.Module]]:
    """`(name, module)` of every module of type `cls` in the model chunks `chunks` (one module or a list)."""
    for chunk in chunks if isinstance(chunks, (list, tuple)) else [chunks]:
        for name, module in chunk.named_modules():
            if isinstance(module, cls):
                yield name, module


def find_sites(chunks, kind: str) -> Iterator[tuple[str, Site]]:
    """The sites of one kind, `(name, site)`, in model order."""
    for name, site in find_modules(chunks, Site):
        if site.kind == kind:
            yield name, site
