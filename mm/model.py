"""The MultiModel (Kaiser et al. 2017, "One Model To Learn Them All").

    inputs ──modality net──▶ encoder ──────────────────────────────┬──▶ class head  (class tasks)
                             conv blocks, MoE, conv blocks         │
    targets shifted right, ─▶ I/O mixer ─────────▶ decoder ────────┴──▶ text out    (text tasks)
    command token first       attention block,     conv + attention
                              causal conv blocks   blocks, MoE in the middle

Every task shares the body. Modality nets are shared by the tasks of one modality; the command
token (the task's own id in the shared vocabulary) tells the decoder which output to produce.
Class tasks stop after the encoder, as tensor2tensor's MultiModel did. Everything after the
mixer's input is causal (left-padded convolutions, masked self-attention), so decoding runs one
token at a time from cached state.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.batch import EOS, Batch
from mm.config import ModelConfig
from mm.decoding import AllDone, Constraint, beam_search, greedy_search, small_steps_on_one_thread
from mm.layers import AttentionBlock, ConvBlock, DecodeState
from mm.modalities import AudioInput, ClassOutput, ImageInput, TextInput
from mm.moe import MoE, MoEStats
from mm.tasks import TaskSpec


@dataclass
class Output:
    loss: Tensor  # loss_weight * task loss + MoE balancing loss: what training minimises
    task_losses: dict[str, Tensor]  # the task's own (unweighted, detached) loss
    aux_loss: Tensor
    logits: Tensor  # [B, classes], or [real target tokens, vocab]: padding is not scored
    moe: list[MoEStats]  # one per MoE layer the example went through (none without MoE)


def make_moe(config: ModelConfig) -> MoE:
    moe = config.moe
    return MoE(
        config.d_model,
        moe.hidden,
        moe.num_experts,
        moe.k,
        moe.capacity_factor,
        eval_capacity_factor=moe.eval_capacity_factor,
        noisy_gating=moe.noisy_gating,
        balance_coef=moe.balance_coef,
        z_loss_coef=moe.z_loss_coef,
        balance=moe.balance,
        bias_update_rate=moe.bias_update_rate,
        shared_experts=moe.shared_experts,
        router_fp32=moe.router_fp32,
        grouped_mm=moe.grouped_mm,
    )


class MoEResidual(nn.Module):
    """x + MoE(x), normalised: tokens an expert had no room for pass through unchanged."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.moe = make_moe(config)
        self.norm = nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, MoEStats]:
        out = self.moe(x, mask)
        return self.norm(x + self.dropout(out.y)), out.aux_loss, out.stats


class NoMoE(nn.Module):
    """Stands in for an MoE layer left out by the ablation: identity, no balancing loss."""

    def forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, None]:
        return x, x.new_zeros(()), None


def moe_layer(config: ModelConfig) -> nn.Module:
    return MoEResidual(config) if config.use_moe else NoMoE()


class Encoder(nn.Module):
    """Conv blocks with an MoE layer in the middle (the paper: 6 blocks)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        half = config.encoder_blocks // 2
        block = lambda: ConvBlock(config.d_model, config.conv_kernels, causal=False, dropout=config.dropout)  # noqa: E731
        self.before = nn.ModuleList(block() for _ in range(half))
        self.moe = moe_layer(config)
        self.after = nn.ModuleList(block() for _ in range(config.encoder_blocks - half))

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, MoEStats | None]:
        for block in self.before:
            x = block(x, mask)
        x, aux, stats = self.moe(x, mask)
        for block in self.after:
            x = block(x, mask)
        return x, aux, stats


class Mixer(nn.Module):
    """The I/O mixer: an attention block over the encoded inputs, then causal conv blocks."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.d_model
        self.attention = AttentionBlock(
            d, config.num_heads, config.conv_kernels, config.dropout, config.attention_dropout
        )
        self.blocks = nn.ModuleList(
            ConvBlock(d, config.conv_kernels, causal=True, dropout=config.dropout)
            for _ in range(config.mixer_blocks)
        )

    def forward(self, x, mask, source, source_mask, state: DecodeState | None = None) -> Tensor:
        x = self.attention(x, mask, source, source_mask, state)
        for block in self.blocks:
            x = block(x, mask, state)
        return x


class Decoder(nn.Module):
    """Causal conv + attention blocks with an MoE layer in the middle (the paper: 4 blocks)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, n = config.d_model, config.decoder_blocks
        self.convs = nn.ModuleList(
            ConvBlock(d, config.conv_kernels, causal=True, dropout=config.dropout) for _ in range(n)
        )
        self.attentions = nn.ModuleList(
            AttentionBlock(d, config.num_heads, config.conv_kernels, config.dropout, config.attention_dropout)
            for _ in range(n if config.decoder_attention else 0)
        )
        self.moe_at = n // 2
        self.moe = moe_layer(config)

    def forward(self, x, mask, source, source_mask, state: DecodeState | None = None):
        aux, stats, moe_done = x.new_zeros(()), None, False
        for i, conv in enumerate(self.convs):
            if i == self.moe_at:
                x, aux, stats = self.moe(x, mask)
                moe_done = True
            x = conv(x, mask, state)
            if self.attentions:
                x = self.attentions[i](x, mask, source, source_mask, state)
        if not moe_done:  # no blocks after the middle
            x, aux, stats = self.moe(x, mask)
        return x, aux, stats


class MultiModel(nn.Module):
    def __init__(self, config: ModelConfig, tasks: Sequence[TaskSpec], vocab_size: int):
        super().__init__()
        self.config = config
        self.tasks = {task.name: task for task in tasks}
        self.vocab_size = vocab_size
        d = config.d_model
        modalities = {t.input_modality for t in tasks}
        self.image_in = ImageInput(d, config.image_channels) if "image" in modalities else None
        self.audio_in = (
            AudioInput(d, config.audio_bins, config.audio_downsampling, config.spec_augment)
            if "audio" in modalities
            else None
        )
        self.text_in = TextInput(vocab_size, d)  # also embeds the decoder's (shifted) targets
        self.encoder = Encoder(config)
        self.mixer = Mixer(config)
        self.decoder = Decoder(config)
        self.text_out = nn.Linear(d, vocab_size)
        if config.tie_embeddings:
            self.text_out.weight = self.text_in.weight
        self.class_out = nn.ModuleDict(
            {t.name: ClassOutput(d, t.num_classes) for t in tasks if t.output_modality == "class"}
        )
        # speech only: per-position token scores for the auxiliary CTC loss (training only)
        self.ctc_out = nn.Linear(d, vocab_size) if config.ctc_weight > 0 and self.audio_in else None

    # --------------------------------------------------------------------------------- training

    def forward(self, batch: Batch) -> Output:
        task = self.tasks[batch.task]
        encoded, mask, aux, stats = self.encode(batch)
        moe_stats = [stats] if stats is not None else []
        if task.output_modality == "class":
            logits = self.class_out[task.name](encoded, mask)
            task_loss = F.cross_entropy(logits, batch.targets)
        else:
            shifted = self.shift_right(batch.targets, task.command_id)
            hidden, dec_aux, dec_stats = self.decode(shifted, shifted != 0, encoded, mask)
            # only real target positions go through the vocabulary projection, the largest
            # matmul of a text step: padding is 34-60 % of the starter's target positions
            real = batch.targets != 0
            logits = self.text_out(hidden[real])  # [real tokens, vocab], row by row
            task_loss = F.cross_entropy(
                logits, batch.targets[real], label_smoothing=self.config.label_smoothing
            )
            aux = aux + dec_aux
            moe_stats += [dec_stats] if dec_stats is not None else []
        loss = task.loss_weight * task_loss + aux
        if self.ctc_out is not None and task.input_modality == "audio":
            loss = loss + self.config.ctc_weight * self.ctc_loss(encoded, mask, batch.targets)
        return Output(loss, {task.name: task_loss.detach()}, aux, logits, moe_stats)

    def ctc_loss(self, encoded: Tensor, mask: Tensor, targets: Tensor) -> Tensor:
        """CTC of the targets (EOS left out) over the encoder's positions, padding id 0 as the
        blank. An utterance with fewer positions than it needs adds nothing (zero_infinity)."""
        log_probs = self.ctc_out(encoded).float().log_softmax(-1).transpose(0, 1)  # [T, B, V]
        target_lengths = ((targets != 0) & (targets != EOS)).sum(1)
        return F.ctc_loss(
            log_probs, targets, mask.sum(1), target_lengths, blank=0, reduction="mean", zero_infinity=True
        )

    def encode(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, MoEStats]:
        x, mask = self.embed_inputs(batch)
        encoded, aux, stats = self.encoder(x, mask)
        return encoded, mask, aux, stats

    def embed_inputs(self, batch: Batch) -> tuple[Tensor, Tensor]:
        modality = self.tasks[batch.task].input_modality
        if modality == "image":
            return self.image_in(batch.inputs)
        if modality == "audio":
            return self.audio_in(batch.inputs, batch.input_lengths)
        return self.text_in(batch.inputs), batch.inputs != 0

    def decode(self, targets, target_mask, source, source_mask, state: DecodeState | None = None):
        x = self.text_in(targets)
        x = self.mixer(x, target_mask, source, source_mask, state)
        return self.decoder(x, target_mask, source, source_mask, state)

    @staticmethod
    def shift_right(targets: Tensor, command_id: int) -> Tensor:
        """[command, y1, ..., y(U-1)]: the decoder predicts y_t from the command and y_<t."""
        command = targets.new_full((len(targets), 1), command_id)
        return torch.cat([command, targets[:, :-1]], dim=1)

    # -------------------------------------------------------------------------------- inference

    @torch.inference_mode()
    def classify(self, batch: Batch, topk: int = 5) -> tuple[Tensor, Tensor]:
        """The `topk` most likely classes of each example and their probabilities."""
        encoded, mask, _, _ = self.encode(batch)
        probs = self.class_out[batch.task](encoded, mask).softmax(-1)
        top = probs.topk(min(topk, probs.shape[-1]), dim=-1)
        return top.values, top.indices

    @torch.inference_mode()  # not only no_grad: no version counters either, a fixed cost per op
    def generate(
        self,
        batch: Batch,
        max_len: int = 64,
        beam: int = 1,
        incremental: bool = True,
        all_done: AllDone | None = None,
        constraint: Constraint | None = None,
    ) -> list[list[int]]:
        """Token ids of each example's output, EOS excluded. `incremental=False` recomputes the
        whole prefix at every step instead of continuing from cached state (for comparison).
        With experts on several ranks, `all_done` makes the ranks stop together. `constraint`
        limits what may be generated (parse trees: `mm.decoding.TreeConstraint`)."""
        encoded, mask, _, _ = self.encode(batch)
        # beam search keeps `beam` hypotheses of each row, which attend to its one encoding
        first = torch.full((len(encoded) * beam,), self.tasks[batch.task].command_id, device=encoded.device)
        decode_step = self._next_token if incremental else self._next_token_recomputed

        def step(tokens: Tensor, state: DecodeState) -> Tensor:
            return decode_step(tokens, state, encoded, mask)

        options: dict = {} if all_done is None else {"all_done": all_done}
        if constraint is not None:
            options["constraint"] = constraint.start(batch.inputs, beam)
        # an incremental step computes one position of each hypothesis; the full recompute's
        # steps grow with the prefix, and keep the process's threads
        threads = (
            small_steps_on_one_thread(len(first) * self.config.d_model) if incremental else nullcontext()
        )
        with threads:
            if beam > 1:
                return beam_search(step, DecodeState(), first, max_len, EOS, beam, **options)
            return greedy_search(step, DecodeState(), first, max_len, EOS, **options)

    def _next_token(self, tokens: Tensor, state: DecodeState, source: Tensor, source_mask: Tensor) -> Tensor:
        # no target mask: every position of a hypothesis is real (None skips the masking kernels)
        hidden, _, _ = self.decode(tokens.unsqueeze(1), None, source, source_mask, state)
        return self.text_out(hidden[:, -1]).log_softmax(-1)

    def _next_token_recomputed(self, tokens, state: DecodeState, source, source_mask) -> Tensor:
        cache = state.cache(self)
        prefix = (
            tokens.unsqueeze(1) if "prefix" not in cache else torch.cat([cache["prefix"], tokens[:, None]], 1)
        )
        cache["prefix"] = prefix
        hidden, _, _ = self.decode(prefix, None, source, source_mask)
        return self.text_out(hidden[:, -1]).log_softmax(-1)


# ------------------------------------------------------------------------------------------ FLOPs


def training_flops(model: MultiModel, batch: Batch) -> float:
    """FLOPs of one forward+backward pass on `batch`, per example, as PyTorch counts them
    (matmuls, convolutions, attention); for model FLOPs utilisation as nanoGPT's estimate_mfu."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(batch)


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, device: str = "cpu", size: int = 2048) -> float:
    """This process's GFLOP/s on a large square matmul, at its torch thread count: the peak
    that MFU is measured against (the spec sheet's is rarely reached, and not on every CPU)."""
    import statistics
    import time

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def seconds() -> float:
        started = time.perf_counter()
        (a @ b).sum().item()  # .item() waits for a GPU too
        return time.perf_counter() - started

    for _ in range(3):
        seconds()
    return 2 * size**3 / statistics.median(seconds() for _ in range(7)) / 1e9
