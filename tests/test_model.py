"""SwarmModel, its encoders and the log-mel front end: shapes, masking, gating, losses, init, a short training run."""
from __future__ import annotations

import math

import pytest
import torch

from swarmtrain.dht.records import Manifest
from swarmtrain.dht.uids import make_uid
from swarmtrain.expert_pool.dispatch import LocalDispatcher
from swarmtrain.expert_pool.expert import make_expert
from swarmtrain.peer.audio import LogMelSpectrogram, mel_centers_hz, mel_filterbank, sine
from swarmtrain.peer.data import Batch, DataSource, encode_caption
from swarmtrain.peer.encoders import AudioEncoder, ImageEncoder, TextEncoder
from swarmtrain.peer.model import MoE, SwarmModel, count_parameters

COORDINATOR = "1" * 40
CLIP_SAMPLES = 99 * 160  # 100 log-mel frames at the default hop


def make_manifest(**overrides) -> Manifest:
    fields = dict(run_id="test-run", created_at=0.0, coordinator=COORDINATOR)
    fields.update(overrides)
    return Manifest(**fields)


def local_experts(manifest: Manifest) -> dict[str, torch.nn.Module]:
    spec = manifest.model
    return {uid: make_expert(uid, spec.hidden, spec.expert_ffn, manifest.seed) for uid in manifest.expert_uids()}


def all_modalities_manifest(**overrides) -> Manifest:
    return make_manifest(modalities=("text", "image", "audio"),
                         experts_per_layer={"text": 4, "image": 4, "audio": 3}, **overrides)


def full_batch(manifest: Manifest, size: int = 4) -> Batch:
    g = torch.Generator().manual_seed(1)
    captions = [encode_caption(f"a handwritten digit {i % 3}", manifest.model.caption_len) for i in range(size)]
    has_audio = "audio" in manifest.modalities
    return Batch(
        text=torch.randint(0, 256, (size, manifest.model.text_seq_len + 1), generator=g),
        images=torch.rand(size, 1, 8, 8, generator=g),
        image_labels=torch.arange(size) % 3,
        captions=torch.stack([c for c, _ in captions]),
        caption_mask=torch.stack([m for _, m in captions]),
        audio=0.1 * torch.randn(size, CLIP_SAMPLES, generator=g) if has_audio else None,
        audio_labels=torch.arange(size) % 2 if has_audio else None,
    )


class RecordingDispatcher(LocalDispatcher):
    """LocalDispatcher that remembers the expert choices of every call and can leave some answers out."""

    def __init__(self, experts, unanswered: tuple[int, ...] = ()):
        super().__init__(experts)
        self.unanswered = unanswered
        self.calls: list[tuple[str, int, torch.Tensor]] = []

    def dispatch(self, x, expert_idx, modality, layer):
        self.calls.append((modality, layer, expert_idx.clone()))
        out, answered = super().dispatch(x, expert_idx, modality, layer)
        for expert in self.unanswered:
            answered = answered & (expert_idx != expert)
        # what a failed remote call leaves behind must not leak into the result
        return out.masked_fill(~answered.unsqueeze(-1), float("nan")), answered


@pytest.mark.timeout(30)
def test_encoders_output_shapes_and_reject_bad_inputs():
    spec = make_manifest().model
    assert TextEncoder(spec)(torch.randint(0, 256, (3, 10))).shape == (3, 10, spec.hidden)
    assert ImageEncoder(spec)(torch.rand(3, 1, 8, 8)).shape == (3, 1 + 16, spec.hidden)  # CLS + (8 / 2)^2 patches
    assert AudioEncoder(spec)(torch.randn(3, CLIP_SAMPLES)).shape == (3, spec.audio_max_frames, spec.hidden)
    assert AudioEncoder(spec)(torch.randn(3, 2 * CLIP_SAMPLES)).shape[1] == spec.audio_max_frames  # cropped
    with pytest.raises(ValueError, match="must lie in"):
        TextEncoder(spec)(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="images must be"):
        ImageEncoder(spec)(torch.rand(3, 3, 8, 8))
    with pytest.raises(ValueError, match="at least audio_n_fft"):
        AudioEncoder(spec)(torch.randn(3, 100))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mel_bin", [5, 17, 28])
def test_log_mel_of_a_sine_peaks_at_its_mel_bin(mel_bin):
    rate, n_fft, hop, n_mels = 16000, 400, 160, 32
    bank = mel_filterbank(rate, n_fft, n_mels)
    assert bank.shape == (n_fft // 2 + 1, n_mels) and bank.max() <= 1.0 + 1e-6
    frequency = float(mel_centers_hz(rate, n_mels)[mel_bin])
    log_mel = LogMelSpectrogram(rate, n_fft, hop, n_mels)(sine(frequency, rate, 8000).unsqueeze(0))
    assert log_mel.shape == (1, 1 + 8000 // hop, n_mels)
    assert int(log_mel[0, 2:-2].mean(0).argmax()) == mel_bin


@pytest.mark.timeout(30)
def test_mel_filterbank_rejects_too_many_mels_for_the_fft():
    with pytest.raises(ValueError, match="cover no FFT bin"):
        mel_filterbank(16000, 32, 64)


@pytest.mark.timeout(30)
def test_text_and_captions_are_causal_images_are_not():
    manifest = make_manifest()
    model = SwarmModel(manifest, LocalDispatcher(local_experts(manifest))).eval()
    batch = full_batch(manifest)
    changed = Batch(**vars(batch))
    changed.text, changed.captions, changed.images = batch.text.clone(), batch.captions.clone(), batch.images.clone()
    changed.text[:, 20] = (changed.text[:, 20] + 1) % 256
    changed.captions[:, 5] = (changed.captions[:, 5] + 1) % 256
    changed.images[:, :, -1, -1] += 0.5  # the last patch
    with torch.no_grad():
        before, _ = model.features(batch)
        after, _ = model.features(changed)
    assert torch.allclose(before["text"][:, :20], after["text"][:, :20], atol=1e-5)
    assert not torch.allclose(before["text"][:, 20:], after["text"][:, 20:], atol=1e-3)
    assert torch.allclose(before["caption"][:, :5], after["caption"][:, :5], atol=1e-5)
    assert not torch.allclose(before["image"][:, 0], after["image"][:, 0], atol=1e-3)  # CLS sees the last patch


@pytest.mark.timeout(30)
def test_top_k_only_picks_live_experts_and_clips_k():
    manifest = make_manifest()
    experts = local_experts(manifest)
    for index in (1, 2, 3):  # text layer 0 keeps only expert 0; image layer 1 loses expert 2
        del experts[make_uid("text", 0, index)]
    del experts[make_uid("image", 1, 2)]
    dispatcher = RecordingDispatcher(experts)
    losses = SwarmModel(manifest, dispatcher).losses(full_batch(manifest))
    assert all(torch.isfinite(v) for v in losses.values())
    calls = {(m, layer): idx for m, layer, idx in dispatcher.calls}
    assert len(dispatcher.calls) == len(calls) == 4  # one dispatch per (modality, layer)
    assert calls["text", 0].shape[1] == 1 and (calls["text", 0] == 0).all()
    assert calls["image", 1].shape[1] == 2 and not (calls["image", 1] == 2).any()
    assert calls["text", 1].shape[1] == 2 and (calls["text", 1][:, 0] != calls["text", 1][:, 1]).all()
    # text + non-padding caption tokens travel together in the text dispatch
    batch = full_batch(manifest)
    assert calls["text", 1].shape[0] == batch.text[:, 1:].numel() + int(batch.caption_mask.sum())


@pytest.mark.timeout(30)
def test_unanswered_experts_are_dropped_and_weights_renormalised():
    manifest = make_manifest()
    experts = local_experts(manifest)
    torch.manual_seed(3)
    moe = MoE(manifest.model.hidden, "text", 0, num_experts=4, top_k=2, k_min=1)
    x = torch.randn(300, manifest.model.hidden)
    y, _ = moe(x, RecordingDispatcher(experts, unanswered=(0, 1)))

    logits = moe.gate(x)
    top, idx = logits.topk(2, dim=-1)
    weights = top.softmax(-1) * (idx >= 2)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    expected = torch.zeros_like(x)
    for row in range(x.shape[0]):
        for slot in range(2):
            if idx[row, slot] >= 2:
                uid = make_uid("text", 0, int(idx[row, slot]))
                expected[row] += weights[row, slot] * experts[uid](x[row : row + 1])[0]
    nothing_answered = (idx < 2).all(-1)
    assert nothing_answered.any() and (~nothing_answered).any()
    assert torch.isfinite(y).all()
    assert torch.allclose(y, expected, atol=1e-5)
    assert (y[nothing_answered] == 0).all()


@pytest.mark.timeout(30)
def test_fewer_live_experts_than_k_min_is_a_clear_error():
    manifest = make_manifest(expert_pool={"k_min": 2})
    experts = {uid: e for uid, e in local_experts(manifest).items() if not uid.startswith("image.1.") or
               uid == "image.1.3"}
    with pytest.raises(RuntimeError, match=r"only 1 of 4 image experts of layer 1 .*k_min=2"):
        SwarmModel(manifest, LocalDispatcher(experts)).losses(full_batch(manifest))


@pytest.mark.timeout(60)
def test_losses_have_the_expected_keys_are_finite_and_reach_every_parameter():
    manifest = all_modalities_manifest()
    model = SwarmModel(manifest, LocalDispatcher(local_experts(manifest)))
    losses = model.losses(full_batch(manifest))
    assert set(losses) == {"text", "image", "contrastive", "audio", "moe_aux"}
    assert all(v.shape == () and torch.isfinite(v) for v in losses.values())
    assert 0 < losses["moe_aux"] < 1
    model.total_loss(losses).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert count_parameters(model) == sum(p.numel() for p in model.state_dict().values())

    text_only = model.losses(Batch(text=full_batch(manifest).text))
    assert set(text_only) == {"text", "moe_aux"}
    expected = manifest.training.loss_weights
    parts = {"text": torch.tensor(2.0), "contrastive": torch.tensor(1.0), "moe_aux": torch.tensor(0.5)}
    weighted = model.total_loss(parts)
    assert math.isclose(float(weighted), 2.0 * expected["text"] + expected["contrastive"] + 0.5)


@pytest.mark.timeout(30)
def test_bad_batches_are_rejected_with_clear_errors():
    manifest = make_manifest()
    model = SwarmModel(manifest, LocalDispatcher(local_experts(manifest)))
    batch = full_batch(manifest)
    with pytest.raises(ValueError, match="holds audio"):
        model.losses(Batch(audio=torch.randn(2, CLIP_SAMPLES), audio_labels=torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="image_labels must lie"):
        model.losses(Batch(images=batch.images, image_labels=batch.image_labels + 10))
    with pytest.raises(ValueError, match="need image_labels"):
        model.losses(Batch(images=batch.images))
    with pytest.raises(ValueError, match="no text, images or audio"):
        model.losses(Batch())
    with pytest.raises(ValueError, match="prefix"):
        model.losses(Batch(images=batch.images, image_labels=batch.image_labels, captions=batch.captions,
                           caption_mask=~batch.caption_mask))
    with pytest.raises(ValueError, match="total_loss expects"):
        model.total_loss({"txt": torch.tensor(1.0)})


@pytest.mark.timeout(30)
def test_logit_scale_starts_at_1_over_0_07_and_is_clamped_at_100():
    manifest = make_manifest()
    model = SwarmModel(manifest, LocalDispatcher(local_experts(manifest)))
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    batch = full_batch(manifest)
    batch.text = None
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.losses(batch)["contrastive"].backward()
    assert model.logit_scale.grad == 0  # above log(100) the scale is clamped


@pytest.mark.timeout(30)
def test_init_is_deterministic_from_the_seed_and_leaves_the_global_rng_alone():
    manifest = all_modalities_manifest(seed=7)
    torch.manual_seed(123)
    reference = torch.rand(3)
    torch.manual_seed(123)
    a = SwarmModel(manifest, LocalDispatcher({})).state_dict()
    assert torch.equal(torch.rand(3), reference)
    b = SwarmModel(manifest, LocalDispatcher({})).state_dict()
    c = SwarmModel(all_modalities_manifest(seed=8), LocalDispatcher({})).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not any(k.startswith("dispatcher") or "expert" in k for k in a)


@pytest.mark.timeout(120)
def test_a_short_training_run_lowers_text_and_image_loss():
    torch.manual_seed(0)
    manifest = make_manifest()
    experts = local_experts(manifest)
    model = SwarmModel(manifest, LocalDispatcher(experts))
    data = DataSource.builtin(manifest, ["text", "image"], shard_index=0, shard_count=1)
    validation = data.validation_batches(128, max_batches=1)[0]
    params = list(model.parameters()) + [p for expert in experts.values() for p in expert.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-3)

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            return {k: float(v) for k, v in model.losses(validation).items()}

    initial = evaluate()
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = model.total_loss(model.losses(data.sample(16, generator)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = evaluate()
    assert initial["text"] > 5.0 and final["text"] < initial["text"] - 2.0, (initial, final)
    assert final["image"] < initial["image"] - 0.8, (initial, final)


@pytest.mark.timeout(30)
def test_capacity_factor_caps_rows_per_expert_first_choices_first():
    from swarmtrain.peer.model import MoE

    moe = MoE(hidden=8, modality="text", layer=0, num_experts=4, top_k=2, k_min=1, capacity_factor=1.0)
    idx = torch.tensor([[0, 1]] * 6 + [[1, 0]] * 2)  # expert 0: 6 first choices + 2 second; capacity = 1*8*2/4 = 4
    sent = moe._within_capacity(idx, live_experts=4)
    assert sent[:, 0].tolist() == [True] * 4 + [False] * 2 + [True] * 2  # expert 0 keeps its first 4 first choices
    assert sent[6:, 1].tolist() == [False, False]  # ...and has no room left for second choices
    per_expert = torch.zeros(4, dtype=torch.long).index_add_(0, idx[sent], torch.ones(int(sent.sum()), dtype=torch.long))
    assert int(per_expert.max()) <= 4
    unlimited = MoE(hidden=8, modality="text", layer=0, num_experts=4, top_k=2, k_min=1, capacity_factor=None)
    assert unlimited._within_capacity(idx, live_experts=4).all()


@pytest.mark.timeout(60)
def test_trainer_reports_a_positive_rate_from_its_first_step():
    """A peer that has stepped never reports 0 samples/s, even before its first 2 s rate window closes."""
    import threading
    import time

    from swarmtrain.peer.trainer import Trainer

    manifest = make_manifest()
    model = SwarmModel(manifest, LocalDispatcher(local_experts(manifest)))
    data = DataSource.builtin(manifest, ["text", "image"], shard_index=0, shard_count=1)
    trainer = Trainer(model, data, torch.optim.SGD(model.parameters(), lr=1e-3), threading.Lock(), None,
                      batch_size=4, seed=0, device=torch.device("cpu"))
    time.sleep(2.5)  # time before the first step (joining, evaluating) is not part of the rate
    trainer.step()
    assert trainer.stats.steps == 1 and trainer.stats.samples == 8
    first = trainer.stats.samples_per_s
    assert first > 8 / 2.5, first


@pytest.mark.timeout(60)
def test_an_evaluation_spread_over_steps_gives_the_whole_evaluations_loss():
    """begin_evaluation + one continue_evaluation per step (the peer's loop, so that evaluating never stalls
    training) ends with the same loss as a whole evaluation of the same model."""
    import threading

    from swarmtrain.peer.trainer import Trainer

    manifest = make_manifest()
    model = SwarmModel(manifest, LocalDispatcher(local_experts(manifest)))
    data = DataSource.builtin(manifest, ["text", "image"], shard_index=0, shard_count=1)
    trainer = Trainer(model, data, torch.optim.SGD(model.parameters(), lr=1e-3), threading.Lock(), None,
                      batch_size=4, seed=0, device=torch.device("cpu"))
    whole = trainer.evaluate(max_batches=3)
    trainer.stats.val_loss = None
    trainer.begin_evaluation(max_batches=3)
    assert trainer.evaluating
    assert [trainer.continue_evaluation() for _ in range(3)] == [False, False, True]
    assert not trainer.evaluating and trainer.stats.val_loss == pytest.approx(whole)
    assert model.training  # evaluation batches leave the model in training mode
    with pytest.raises(RuntimeError, match="no evaluation in progress"):
        trainer.continue_evaluation()
