"""GPTModel: embedding -> transformer block -> output layer, GPT-2 or LLaMA by config switches.

Parameter names follow Megatron-core (checkpoints and the Hugging Face converter depend on them):

    embedding.word_embeddings.weight            [V/tp, h]   V = config.padded_vocab_size(tp)
    embedding.position_embeddings.weight        [p, h]      learned_absolute only (replicated)
    decoder.layers.{i}.input_layernorm.{weight,bias}
    decoder.layers.{i}.self_attention.linear_qkv.{weight,bias}   rows per query group [q ; k ; v]
    decoder.layers.{i}.self_attention.linear_proj.{weight,bias}
    decoder.layers.{i}.pre_mlp_layernorm.{weight,bias}
    decoder.layers.{i}.mlp.linear_fc1.{weight,bias}     SwiGLU: [2, ffn/tp, h] = [gate ; up]
    decoder.layers.{i}.mlp.linear_fc2.{weight,bias}
    decoder.final_layernorm.{weight,bias}
    output_layer.weight                          untied, or tied on a last stage without the embedding

`i` is the global layer index; biases exist iff `add_bias_linear`, norm biases iff LayerNorm. One
instance is one pipeline stage (`layer_range`, `pre_process` = holds the embedding, `post_process` =
holds the final norm and the output layer).

Vocabulary padding: the embedding/output rows are padded to `padded_vocab_size(tp)` so TP shards are
equal, and that size depends on TP. The padded columns get a constant very negative logit (a fixed bias
in the output GEMM, free), so they have zero probability: the loss, its gradients and sampling only see
the real vocabulary, whatever the layout, and match the Hugging Face export (which drops those rows).
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_eff.config import ModelConfig
from megatron_eff.model.backends import build_backend
from megatron_eff.model.transformer import TransformerBlock
from megatron_eff.parallel import mappings
from megatron_eff.parallel.context_parallel import ContextParallel
from megatron_eff.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_eff.parallel.layers import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    column_parallel_linear,
    init_parallel_parameters,
    mark_sharded,
)
from megatron_eff.parallel.state import ParallelState, group_size

WORD_EMBEDDING = "embedding.word_embeddings.weight"


class Embedding(nn.Module):
    """Token ids `[b, s]` -> hidden `[s, b, h]` (`[s/tp, b, h]` with sequence parallel), then dropout.
    With context parallelism the ids are this rank's s/cp tokens, at the global positions `context_parallel`
    gives (`parallel/context_parallel.py`)."""

    def __init__(self, config: ModelConfig, tp_group, sequence_parallel: bool,
                 context_parallel: ContextParallel | None = None):
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.context_parallel = context_parallel
        self.dropout = config.hidden_dropout
        self.word_embeddings = VocabParallelEmbedding(
            config.padded_vocab_size(group_size(tp_group)), config.hidden_size, tp_group=tp_group,
            init_std=config.init_method_std,
        )
        self.position_embeddings = None
        if config.position_embedding_type == "learned_absolute":
            shape = (config.max_position_embeddings, config.hidden_size)
            self.position_embeddings = nn.Embedding(*shape)
            mark_sharded(self.position_embeddings.weight, None, shape, "normal", config.init_method_std)

    def forward(self, tokens: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
        x = self.word_embeddings(tokens.t())  # [s, b, h]: looking up transposed ids costs no activation copy
        if self.position_embeddings is not None and self.context_parallel is not None:
            x = x + self.position_embeddings.weight[self.context_parallel.positions(x.shape[0], x.device)].unsqueeze(1)
        elif self.position_embeddings is not None:
            x = x + self.position_embeddings.weight[position_offset: position_offset + x.shape[0]].unsqueeze(1)
        if self.sequence_parallel:
            x = mappings.scatter_to_sequence_parallel_region(x, self.tp_group)  # [s/tp, b, h]
        if self.dropout > 0.0 and self.training:
            x = nn.functional.dropout(x, self.dropout, training=True)
        return x


class GPTModel(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        pstate: ParallelState | None = None,
        *,
        layer_range: tuple[int, int] | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        sequence_parallel: bool = False,
        seed: int | None = 0,
    ):
        """`seed` draws the initial weights (see `init_weights`); None leaves them uninitialised, for a
        transform that changes the init rules (Unit Scaling) to call `init_weights` afterwards."""
        super().__init__()
        self.config = config
        self.pstate = pstate or ParallelState.single()
        self.pre_process, self.post_process = pre_process, post_process
        self.sequence_parallel = sequence_parallel
        tp_group = self.pstate.tp_group
        backend = build_backend(config, self.pstate, sequence_parallel)
        self.layer_range = layer_range or (0, config.num_layers)

        self.context_parallel = ContextParallel.from_state(self.pstate)  # None without CP
        self.embedding = (Embedding(config, tp_group, sequence_parallel, self.context_parallel)
                          if pre_process else None)
        self.decoder = TransformerBlock(config, backend, self.layer_range, post_process)
        self.output_layer = None
        if post_process and not (config.tied_embeddings and pre_process):
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, config.padded_vocab_size(self.pstate.tp_size), bias=False,
                tp_group=tp_group, sequence_parallel=sequence_parallel, init_std=config.init_method_std,
            )
            if config.tied_embeddings:  # the first stage holds the embedding: start equal, keep grads in sync
                self.output_layer.weight.init_name = WORD_EMBEDDING
                self.output_layer.weight.shared_embedding = True
        if pre_process and config.tied_embeddings and not post_process:
            self.embedding.word_embeddings.weight.shared_embedding = True  # all-reduced with the last stage's
        if post_process:
            self.register_buffer("vocab_padding_bias", self._vocab_padding_bias(), persistent=False)
        self.output_gemm = nn.functional.linear  # the logits GEMM; Unit Scaling swaps in a scaled one
        if seed is not None:
            self.init_weights(seed)

    def init_weights(self, seed: int) -> None:
        """Same seed -> same full weights whatever the TP/PP layout (tensors seeded by global name)."""
        init_parallel_parameters(self.named_parameters(), seed, self.pstate.tp_rank, self.pstate.tp_size)

    def forward(
        self,
        tokens: torch.Tensor | None = None,  # [b, s] on the first stage
        labels: torch.Tensor | None = None,  # [b, s] on the last stage
        input_tensor: torch.Tensor | None = None,  # [s, b, h] from the previous stage
        inference_cache=None,  # generation: an `InferenceCache` (keys/values of earlier positions)
    ) -> torch.Tensor:
        """Last stage: per-token loss `[b, s]` float32 with labels, else logits `[b, s, V/tp]`.
        Other stages: hidden `[s, b, h]` (`[s/tp, b, h]` with sequence parallel).
        With `inference_cache`, `tokens` continue the cached positions and the cache advances past them."""
        if inference_cache is None:
            x = self.embedding(tokens) if self.pre_process else input_tensor
            x = self.decoder(x)
        else:
            x = self.embedding(tokens, inference_cache.offset) if self.pre_process else input_tensor
            x = self.decoder(x, inference_cache)
            inference_cache.advance(x.shape[0])
        if not self.post_process:
            return x
        logits = self._logits(x)  # [s, b, V/tp]
        if labels is None:
            return logits.transpose(0, 1)
        loss = vocab_parallel_cross_entropy(logits, labels.t(), self.pstate.tp_group,
                                            chunk_tokens=self.config.cross_entropy_chunk_tokens)  # [s, b]
        return loss.t().contiguous()  # [b, s]; b*s floats, so the copy is free

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """`[s, b, h]` (`[s/tp, b, h]` with sequence parallel) -> `[s, b, V/tp]`."""
        layer = self.output_layer if self.output_layer is not None else self.embedding.word_embeddings
        return column_parallel_linear(
            x, layer.weight, self.vocab_padding_bias, self.pstate.tp_group,
            sequence_parallel=self.sequence_parallel, gemm=self.output_gemm,
        )

    def _vocab_padding_bias(self) -> torch.Tensor | None:
        """0 for this rank's real vocabulary columns, a very negative constant for its padded ones."""
        padded = self.config.padded_vocab_size(self.pstate.tp_size)
        per_rank = padded // self.pstate.tp_size
        first_padded = self.config.vocab_size - self.pstate.tp_rank * per_rank  # local column index
        if first_padded >= per_rank:
            return None
        bias = torch.zeros(per_rank)
        bias[max(first_padded, 0):] = torch.finfo(torch.float32).min
        return bias

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters held by this rank (shared tensors counted once)."""
        skip = {"embedding.word_embeddings.weight", "embedding.position_embeddings.weight"}
        return sum(p.numel() for n, p in self.named_parameters() if not (exclude_embeddings and n in skip))
