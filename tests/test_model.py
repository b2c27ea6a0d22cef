"""The MultiModel's parts and the whole: shapes, padding, causality, decoding, learning."""

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from mm.batch import Batch, pad_sequences
from mm.config import SpecAugmentConfig
from mm.decoding import small_steps_on_one_thread
from mm.layers import (
    AttentionBlock,
    ConvBlock,
    ConvStep,
    DecodeState,
    MultiHeadAttention,
    SeparableConv,
    timing_signal,
)
from mm.modalities import AudioInput, ClassOutput, ImageInput, TextInput, spec_augment
from mm.model import MultiModel, training_flops
from mm.synthetic import VOCAB_SIZE, SyntheticData

from conftest import tiny_model

# ------------------------------------------------------------------------------------------ shapes


def test_image_modality_runs_the_entry_flow_down_to_a_sequence():
    net = ImageInput(d=48)
    x, mask = net(torch.randint(0, 255, (2, 28, 28, 1), dtype=torch.uint8))  # grey is repeated to RGB
    assert x.shape == (2, 2 * 2, 48)  # 28 -> 14 (stride-2 conv) -> 7 -> 4 -> 2
    assert mask.all()
    x, _ = net(torch.randint(0, 255, (3, 64, 64, 3), dtype=torch.uint8))
    assert x.shape == (3, 4 * 4, 48)


def test_audio_modality_strides_over_time_only_and_tracks_lengths():
    net = AudioInput(d=32, bins=80)
    frames = torch.randn(2, 100, 80)
    x, mask = net(frames, torch.tensor([100, 37]))
    assert x.shape == (2, 7, 32)  # 100 -> 50 -> 25 -> 13 -> 7
    assert mask.sum(1).tolist() == [7, 3]  # 37 -> 19 -> 10 -> 5 -> 3


def test_spec_augment_masks_bands_and_spans_in_training_only():
    torch.manual_seed(0)
    x = torch.randn(64, 50, 80)
    lengths = torch.randint(20, 51, (64,))
    masking = SpecAugmentConfig(freq_masks=2, freq_width=15, time_masks=2, time_width=0.2)
    out = spec_augment(x, lengths, masking)
    zeroed = out == 0
    assert ((out == x) | zeroed).all()  # values are kept or masked, never changed
    bands = zeroed.all(1)  # [B, bins]: mel bins masked at every frame
    assert (bands.sum(1) <= 2 * 15).all() and bands.any()
    spans = zeroed.all(2)  # [B, T]: frames masked in every bin
    for row, length in enumerate(lengths.tolist()):
        assert spans[row].sum() <= 2 * int(length * 0.2)
    assert spans.any()
    # the same seed masks alike (training seeds each step), another one does not
    torch.manual_seed(1)
    first = spec_augment(x, lengths, masking)
    torch.manual_seed(1)
    assert torch.equal(spec_augment(x, lengths, masking), first)
    assert not torch.equal(first, out)

    net = AudioInput(d=32, bins=80, masking=masking)
    frames, both = torch.randn(2, 100, 80), torch.tensor([100, 37])
    net.eval()
    torch.testing.assert_close(net(frames, both)[0], net(frames, both)[0])  # no masking at evaluation
    net.train()
    torch.manual_seed(3)
    masked, _ = net(frames, both)
    assert not torch.allclose(masked, net.eval()(frames, both)[0])
    plain = AudioInput(d=32, bins=80).train()  # off by default: training sees the input as it is
    plain.load_state_dict(net.state_dict())
    torch.testing.assert_close(plain(frames, both)[0], plain.eval()(frames, both)[0])


def test_text_modality_scales_embeddings_and_embeds_padding_as_zero():
    net = TextInput(VOCAB_SIZE, 16)
    out = net(torch.tensor([[5, 0]]))
    assert out[0, 1].abs().sum() == 0
    torch.testing.assert_close(out[0, 0], net.weight[5] * 4.0)


def test_class_head_gives_one_logit_vector_per_example():
    head = ClassOutput(32, num_classes=7)
    logits = head(torch.randn(3, 9, 32), torch.ones(3, 9, dtype=torch.bool))
    assert logits.shape == (3, 7)


@pytest.mark.parametrize("causal", [False, True])
def test_blocks_keep_the_sequence_shape(causal):
    x, mask = torch.randn(2, 11, 32), torch.ones(2, 11, dtype=torch.bool)
    assert ConvStep(32, 15, 4, causal)(x, mask).shape == x.shape
    assert ConvBlock(32, [(3, 1), (3, 1), (15, 1), (15, 4)], causal, 0.1)(x, mask).shape == x.shape
    source = torch.randn(2, 5, 32)
    block = AttentionBlock(32, 4, [(3, 1), (3, 1), (5, 1), (5, 2)], 0.1, 0.1)
    assert block(x, mask, source, torch.ones(2, 5, dtype=torch.bool)).shape == x.shape


def test_separable_conv_is_depthwise_then_pointwise():
    conv = SeparableConv(8, 16, kernel=5, dilation=2)
    assert conv.depthwise.weight.shape == (8, 1, 5)  # one filter per channel
    assert conv.pointwise.weight.shape == (16, 8, 1)
    assert conv(torch.randn(1, 8, 20)).shape == (1, 16, 20)


@pytest.mark.parametrize("padding", ["same", "causal"])
def test_the_channels_last_separable_conv_computes_the_grouped_convolution(padding):
    conv = SeparableConv(8, 16, kernel=5, dilation=2, padding=padding)
    x = torch.randn(3, 20, 8, requires_grad=True)
    fast = conv.forward_channels_last(x)
    reference = conv(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(fast, reference)
    grads = torch.autograd.grad(fast.square().sum(), [x, conv.depthwise.weight])
    expected = torch.autograd.grad(reference.square().sum(), [x, conv.depthwise.weight])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_every_task_kind_gives_a_loss_and_logits_of_its_output_space(model, tasks, data):
    for task in tasks.values():
        batch = data.batch(task, 3)
        out = model(batch)
        assert torch.isfinite(out.loss)
        if task.output_modality == "class":
            assert out.logits.shape == (3, 10)
        else:
            assert out.logits.shape == (int((batch.targets != 0).sum()), VOCAB_SIZE)  # padding unscored
        assert len(out.moe) == (1 if task.output_modality == "class" else 2)


# ----------------------------------------------------------------------------------- padding, causality


def padded(batch: Batch, extra_inputs: int, extra_targets: int) -> Batch:
    if batch.input_lengths is not None:
        inputs = F.pad(batch.inputs, (0, 0, 0, extra_inputs), value=7.0)  # garbage beyond the length
    else:
        inputs = F.pad(batch.inputs, (0, extra_inputs))
    return Batch(batch.task, inputs, F.pad(batch.targets, (0, extra_targets)), batch.input_lengths)


@pytest.mark.parametrize("kind", ["translation", "speech_recognition", "constituency_parsing"])
def test_extra_padding_changes_no_output_at_real_positions(model, tasks, data, kind):
    batch = data.batch(tasks[kind], 4)
    longer = padded(batch, extra_inputs=23, extra_targets=5)
    with torch.no_grad():
        a, b = model(batch), model(longer)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)  # the real positions' scores
    torch.testing.assert_close(a.task_losses[kind], b.task_losses[kind], atol=1e-5, rtol=1e-5)


def test_encoder_output_is_padding_invariant_for_text(model, tasks, data):
    batch = data.batch(tasks["translation"], 4)
    with torch.no_grad():
        enc_a, mask_a, _, _ = model.encode(batch)
        enc_b, _, _, _ = model.encode(padded(batch, 17, 0))
    torch.testing.assert_close(enc_a[mask_a], enc_b[:, : enc_a.shape[1]][mask_a], atol=1e-5, rtol=1e-5)


def test_changing_target_token_t_changes_no_decoder_output_before_t(model, tasks, data):
    batch = data.batch(tasks["translation"], 2)
    t = 3
    changed = batch.targets.clone()
    changed[:, t] = (changed[:, t] + 5) % VOCAB_SIZE

    def logits(targets):  # every position's, padding too
        encoded, mask, _, _ = model.encode(batch)
        shifted = model.shift_right(targets, model.tasks[batch.task].command_id)
        return model.text_out(model.decode(shifted, shifted != 0, encoded, mask)[0])

    with torch.no_grad():
        a, b = logits(batch.targets), logits(changed)
    # the decoder input at position i is target i-1 (the command token first): logits 0..t
    # do not see target t
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1])


# ------------------------------------------------------------------------------------------ decoding


def test_incremental_decoding_matches_full_recompute_step_by_step(model, tasks, data):
    batch = data.batch(tasks["translation"], 3)
    source, source_mask, _, _ = model.encode(batch)
    prefix = MultiModel.shift_right(batch.targets, tasks["translation"].command_id)
    with torch.no_grad():
        full, _, _ = model.decode(prefix, torch.ones_like(prefix, dtype=torch.bool), source, source_mask)
        state, steps = DecodeState(), []
        for i in range(prefix.shape[1]):
            token = prefix[:, i : i + 1]
            # no target mask, as generate decodes: every position of a hypothesis is real
            hidden, _, _ = model.decode(token, None, source, source_mask, state)
            steps.append(hidden)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def _decoded_step_by_step(conv: SeparableConv, x: torch.Tensor) -> torch.Tensor:
    cache: dict = {}
    return torch.cat([conv.forward_channels_last(x[:, t : t + 1], cache) for t in range(x.shape[1])], 1)


@pytest.mark.parametrize(
    "optimiser",
    [
        lambda params: torch.optim.SGD(params, lr=0.5),
        # the trainer's: its fused kernel updates weights without bumping their version counter
        lambda params: torch.optim.Adam(params, lr=0.05, fused=True),
    ],
    ids=["sgd", "fused_adam"],
)
def test_a_decoding_conv_follows_its_weights_through_an_optimiser_step_and_a_load(optimiser):
    """Decoding one position uses depthwise and pointwise fused into one matrix; a decoding
    after the weights changed in place must use the new weights, not a matrix made before."""
    torch.manual_seed(0)
    conv = SeparableConv(8, 6, kernel=5, dilation=2, padding="causal")
    x = torch.randn(2, 7, 8)
    with torch.inference_mode():
        before = _decoded_step_by_step(conv, x)
    torch.testing.assert_close(before, conv.forward_channels_last(x).detach(), atol=1e-5, rtol=1e-5)

    step = optimiser(conv.parameters())
    conv.forward_channels_last(x).square().sum().backward()
    step.step()
    with torch.inference_mode():
        after_step = _decoded_step_by_step(conv, x)
    assert not torch.allclose(after_step, before)
    torch.testing.assert_close(after_step, conv.forward_channels_last(x).detach(), atol=1e-5, rtol=1e-5)

    other = SeparableConv(8, 6, kernel=5, dilation=2, padding="causal")
    conv.load_state_dict(other.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(_decoded_step_by_step(conv, x), _decoded_step_by_step(other, x))


def test_timing_signal_rows_are_the_same_wherever_decoding_asks_for_them():
    whole = timing_signal(40, 96)
    assert torch.equal(timing_signal(1, 96, offset=17), whole[17:18])  # one token at a time
    torch.testing.assert_close(timing_signal(3, 96, offset=5000)[0], timing_signal(5001, 96)[5000])
    half, p, i = 48, 7, 3  # sin then cos of position / 1e4^(i / (half - 1))
    angle = p / 1e4 ** (i / (half - 1))
    assert float(whole[p, i]) == pytest.approx(math.sin(angle), abs=1e-6)
    assert float(whole[p, half + i]) == pytest.approx(math.cos(angle), abs=1e-6)
    assert timing_signal(4, 7).shape == (4, 7)  # an odd width ends in a zero channel
    assert float(timing_signal(4, 7)[:, -1].abs().sum()) == 0.0


@pytest.mark.parametrize("beam", [1, 3])
def test_incremental_generation_returns_the_same_tokens_as_full_recompute(tasks, data, beam):
    model = tiny_model(seed=3).eval()
    with torch.no_grad():  # push EOS down so the untrained model writes something
        model.text_out.bias[1] -= 5.0
    batch = data.batch(tasks["constituency_parsing"], 4)
    incremental = model.generate(batch, max_len=12, beam=beam)
    recomputed = model.generate(batch, max_len=12, beam=beam, incremental=False)
    assert incremental == recomputed
    assert all(len(row) > 0 for row in incremental)


@pytest.fixture
def two_threads():
    """The process at two torch threads for the test, at its own count after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def record_step_threads(model, monkeypatch, *steps: str) -> list[int]:
    """The torch thread count each call of the model's step methods `steps` ran at."""
    seen: list[int] = []
    for name in steps:
        step = getattr(model, name)
        monkeypatch.setattr(
            model, name, lambda *a, _step=step: seen.append(torch.get_num_threads()) or _step(*a)
        )
    return seen


@pytest.mark.parametrize("beam", [1, 3])
def test_a_small_batch_decodes_on_one_thread_and_a_large_one_or_the_recompute_on_all(
    tasks, data, beam, monkeypatch, two_threads
):
    model = tiny_model(seed=3).eval()  # d_model 64: 1024 numbers a position are 16 rows
    seen = record_step_threads(model, monkeypatch, "_next_token", "_next_token_recomputed")
    small, large = data.batch(tasks["translation"], 2), data.batch(tasks["translation"], 20)
    small_out = model.generate(small, max_len=6, beam=beam)
    assert set(seen) == {1} and torch.get_num_threads() == 2  # and restored after
    seen.clear()
    model.generate(small, max_len=6, beam=beam, incremental=False)
    assert set(seen) == {2}
    seen.clear()
    model.generate(large, max_len=6, beam=beam)
    assert set(seen) == {2}
    # the thread count changes the speed, not the tokens
    assert small_out == model.generate(small, max_len=6, beam=beam, incremental=False)
    with pytest.raises(ZeroDivisionError), small_steps_on_one_thread(1):  # a failure restores it too
        assert torch.get_num_threads() == 1
        raise ZeroDivisionError
    assert torch.get_num_threads() == 2


def test_a_small_decoding_in_another_thread_keeps_the_threads_it_has(tasks, data, monkeypatch, two_threads):
    # torch's thread count is partly the process's: only the main thread changes it, so a
    # server's overlapping decodings cannot leave each other one thread
    model = tiny_model(seed=3).eval()
    seen = record_step_threads(model, monkeypatch, "_next_token")
    before: list[int] = []

    def decode_in_a_worker():
        before.append(torch.get_num_threads())
        model.generate(data.batch(tasks["translation"], 2), 4)

    worker = threading.Thread(target=decode_in_a_worker)
    worker.start()
    worker.join(60)
    assert seen and set(seen) == set(before) and torch.get_num_threads() == 2


def test_beam_hypotheses_attend_to_their_rows_one_source_as_to_a_copy_of_it():
    # beam search keeps one encoding per row; its `copies` hypotheses must see what each would
    # see with a copy of that row's source, padding masked as there
    torch.manual_seed(0)
    attention = MultiHeadAttention(16, 4, 0.0).eval()
    source, mask = torch.randn(2, 5, 16), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    queries = torch.randn(2 * 3, 2, 16)  # 3 hypotheses of each row, 2 positions each
    shared = attention(queries, source, mask)
    copied = attention(queries, source.repeat_interleave(3, 0), mask.repeat_interleave(3, 0))
    torch.testing.assert_close(shared, copied)
    cache = {}
    attention(queries[:, :1], source, mask, cache=cache)
    state = DecodeState({attention: cache})
    state.reorder(torch.tensor([2, 2, 0, 3, 5, 5]))  # re-ranking moves hypotheses within a row
    torch.testing.assert_close(attention(queries[:, 1:], source, mask, cache=cache), copied[:, 1:])


def test_beam_search_scores_at_least_as_well_as_greedy(tasks, data):
    model = tiny_model(seed=4).eval()
    batch = data.batch(tasks["translation"], 4)

    def log_prob(outputs):
        targets = pad_sequences([row + [1] for row in outputs])
        real = targets != 0
        with torch.no_grad():
            logits = model(Batch(batch.task, batch.inputs, targets)).logits.log_softmax(-1)
        picked = logits.gather(1, targets[real][:, None])[:, 0]
        return torch.zeros(len(targets)).index_add_(0, real.nonzero()[:, 0], picked)  # per row

    greedy, beam = model.generate(batch, max_len=10), model.generate(batch, max_len=10, beam=4)
    # length normalisation can prefer a longer, slightly less likely output; allow for it
    assert (log_prob(beam) >= log_prob(greedy) - 1.0).all()


def test_a_tasks_beam_is_the_width_its_evaluation_decodes_with_unless_one_is_given(tasks, data):
    from types import SimpleNamespace

    from mm.config import TaskConfig
    from mm.evaluate import score_task

    model = tiny_model(seed=4)
    widths, generate = [], model.generate
    model.generate = lambda batch, **options: widths.append(options["beam"]) or generate(batch, **options)
    task = TaskConfig(name="translation", kind="translation", max_target_length=6, beam=3)
    vocab = SimpleNamespace(decode=lambda ids: " ".join(map(str, ids)), pieces=[])
    batches = [data.batch(tasks["translation"], 2)]
    assert "bleu" in score_task(model, task, batches, vocab)
    score_task(model, task, batches, vocab, beam=2)  # `mm evaluate --beam 2`
    assert widths == [3, 2]
    assert TaskConfig(name="translation", kind="translation").beam == 1  # greedy by default


def test_classify_returns_ranked_classes_with_probabilities(model, tasks, data):
    probs, classes = model.classify(data.batch(tasks["image_classification"], 4), topk=5)
    assert classes.shape == probs.shape == (4, 5)
    assert (probs[:, :-1] >= probs[:, 1:]).all()
    assert (probs.sum(1) <= 1.0 + 1e-6).all()


# ------------------------------------------------------------------------------------------ learning


def test_tiny_multimodel_overfits_a_handful_of_examples_of_every_task_kind(tasks):
    """Every head learns: each task's loss falls by 5x or more within a few hundred steps."""
    torch.manual_seed(0)
    model = tiny_model(seed=0, label_smoothing=0.0).train()
    data = SyntheticData(seed=1)
    examples = {name: data.batch(task, 8) for name, task in tasks.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def losses():
        model.eval()
        with torch.no_grad():
            result = {name: float(model(b).task_losses[name]) for name, b in examples.items()}
        model.train()
        return result

    before = losses()
    for step in range(300):
        name = list(examples)[step % len(examples)]
        out = model(examples[name])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    after = losses()
    for name in tasks:
        assert before[name] / after[name] >= 5, f"{name}: {before[name]:.3f} -> {after[name]:.3f}"


def test_flop_count_grows_with_the_model(tasks, data):
    batch = data.batch(tasks["translation"], 2)
    small = training_flops(tiny_model(), batch)
    wide = training_flops(tiny_model(d_model=128), batch)
    assert small > 1e5
    assert wide > 2 * small


@pytest.mark.parametrize("ablation", [{"use_moe": False}, {"decoder_attention": False}])
def test_ablated_models_leave_their_blocks_out_and_still_train_and_decode(tasks, data, ablation):
    from mm.checkpoint import expert_modules
    from mm.layers import AttentionBlock as Attention

    model = tiny_model(seed=5, **ablation)
    full = tiny_model(seed=5)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    if "use_moe" in ablation:
        assert not expert_modules(model)
    else:
        assert not any(isinstance(m, Attention) for m in model.decoder.modules())
    batch = data.batch(tasks["translation"], 4)
    out = model(batch)
    assert torch.isfinite(out.loss) and len(out.moe) == (0 if "use_moe" in ablation else 2)
    out.loss.backward()
    body = [*model.encoder.before.parameters(), *model.mixer.parameters(), *model.decoder.convs.parameters()]
    assert all(p.grad is not None for p in body)
    model.eval()
    assert model.generate(batch, max_len=8) == model.generate(batch, max_len=8, incremental=False)


def test_the_auxiliary_ctc_loss_trains_the_encoder_of_speech_only(tasks, data):
    plain, hybrid = tiny_model(audio_downsampling=4), tiny_model(audio_downsampling=4, ctc_weight=0.5)
    assert plain.ctc_out is None and hybrid.ctc_out is not None
    speech = data.batch(tasks["speech_recognition"], 4)
    hybrid.eval()  # no gating noise: the two forward passes agree
    out = hybrid(speech)
    ctc = hybrid.ctc_loss(*hybrid.encode(speech)[:2], speech.targets)
    assert ctc > 0
    torch.testing.assert_close(out.loss, out.task_losses["speech_recognition"] + out.aux_loss + 0.5 * ctc)
    out.loss.backward()
    assert hybrid.ctc_out.weight.grad.abs().sum() > 0
    text = data.batch(tasks["translation"], 4)
    hybrid.zero_grad()
    hybrid(text).loss.backward()
    assert hybrid.ctc_out.weight.grad is None or hybrid.ctc_out.weight.grad.abs().sum() == 0
