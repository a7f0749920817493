"""DataSource: builtin shards and held-out split, batches, user folders of text / images / WAV clips, bad input."""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from swarmtrain.dht.records import Manifest
from swarmtrain.peer.audio import read_wav, resample, sine
from swarmtrain.peer.data import DIGIT_WORDS, Batch, DataSource

COORDINATOR = "1" * 40


def make_manifest(**overrides) -> Manifest:
    fields = dict(run_id="test-run", created_at=0.0, coordinator=COORDINATOR)
    fields.update(overrides)
    return Manifest(**fields)


def audio_manifest(**model) -> Manifest:
    spec = dict(text_seq_len=16, image_size=6, image_channels=3, patch_size=2, audio_max_frames=20, **model)
    return make_manifest(modalities=("text", "image", "audio"), experts_per_layer={"text": 2, "image": 2, "audio": 2},
                         model=spec)


def write_wav(path: Path, samples: np.ndarray, rate: int, width: int = 2) -> None:
    """Write float samples in [-1, 1] (``[S]`` mono or ``[S, channels]``) as 8- or 16-bit PCM."""
    frames = samples.reshape(samples.shape[0], -1)
    if width == 2:
        data = (frames * 32767).astype("<i2").tobytes()
    else:
        data = (frames * 127 + 128).astype(np.uint8).tobytes()
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(frames.shape[1])
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(data)


def make_folder(root: Path) -> Path:
    """A small real data folder: text, 2 image classes (png/jpg/pgm, one caption), 2 audio classes (WAV)."""
    rng = np.random.default_rng(0)
    (root / "notes.txt").write_text("The quick brown fox jumps over the lazy dog. " * 60)
    (root / "more.txt").write_bytes("Zwölf Boxkämpfer jagen Viktor quer über den Sylter Deich. ".encode() * 20)
    for name, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (root / name).mkdir()
        for i in range(4):
            pixels = np.zeros((12, 12, 3), np.uint8) + np.array(color, np.uint8)
            pixels[rng.integers(0, 12), :] = 128
            Image.fromarray(pixels).save(root / name / f"{name}{i}.png")
        Image.fromarray(np.full((10, 10), 200, np.uint8)).save(root / name / f"{name}_gray.pgm")
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(root / name / f"{name}_photo.jpg")
    (root / "cat" / "cat0.txt").write_text("  a red square with a grey line  \n")
    for name, freq in (("high", 3000.0), ("low", 500.0)):
        (root / name).mkdir()
        for i in range(3):
            tone = sine(freq, 8000, 8000 + 500 * i).numpy()
            write_wav(root / name / f"{name}{i}.wav", np.stack([tone, tone], axis=1), 8000)  # 16-bit stereo
        write_wav(root / name / f"{name}_8bit.wav", sine(freq, 22050, 2000).numpy(), 22050, width=1)
    return root


@pytest.mark.timeout(60)
def test_builtin_shards_are_disjoint_and_the_held_out_split_is_fixed():
    manifest = make_manifest()
    shards = [DataSource.builtin(manifest, ["text", "image"], i, 3) for i in range(3)]
    val_span, val_images = shards[0].val_text_span, shards[0].val_indices["image"]
    spans = sorted(s.text_span for s in shards)
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] == val_span[0]
    total = val_span[1]
    assert val_span[1] - val_span[0] == total - int(total * 0.95) and total > 400_000
    images = [set(s.indices["image"].tolist()) for s in shards]
    assert all(not (a & b) for i, a in enumerate(images) for b in images[i + 1 :])
    assert not set(val_images.tolist()) & set().union(*images)
    assert set(val_images.tolist()) | set().union(*images) == set(range(1797))
    assert len(val_images) == round(1797 * 0.15)
    for other in shards[1:]:
        assert other.val_text_span == val_span and torch.equal(other.val_indices["image"], val_images)
    assert "builtin shard 1/3" in shards[1].describe() and "held-out" in shards[1].describe()


@pytest.mark.timeout(60)
def test_builtin_batches_hold_real_digits_from_the_shard_with_label_captions():
    manifest = make_manifest()
    data = DataSource.builtin(manifest, ["text", "image"], 1, 4)
    batch = data.sample(32, torch.Generator().manual_seed(5))
    again = data.sample(32, torch.Generator().manual_seed(5))
    assert torch.equal(batch.text, again.text) and torch.equal(batch.images, again.images)
    assert batch.text.shape == (32, 65) and batch.text.dtype == torch.long and batch.num_samples() == 64
    assert batch.images.shape == (32, 1, 8, 8) and 0 <= batch.images.min() and batch.images.max() <= 1
    corpus = data.text.tolist()
    row = batch.text[0].tolist()
    assert any(corpus[i : i + 65] == row for i in range(len(corpus) - 64))  # a window of this shard's text

    digits = load_digits()
    shard_images = torch.tensor(digits.images[data.indices["image"].numpy()], dtype=torch.float32) / 16
    for image, label, caption, mask in zip(batch.images, batch.image_labels, batch.captions, batch.caption_mask):
        match = (shard_images - image[0]).abs().flatten(1).amax(1) < 1e-6
        assert match.any() and (torch.tensor(digits.target)[data.indices["image"]][match] == label).all()
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any() and (caption[length:] == 0).all()
        text = bytes(caption[:length].tolist()).decode()
        assert DIGIT_WORDS[int(label)] in text or str(int(label)) in text


@pytest.mark.timeout(60)
def test_validation_batches_cover_the_held_out_data_once_and_match_across_peers():
    manifest = make_manifest()
    a = DataSource.builtin(manifest, ["text", "image"], 0, 2).validation_batches(100)
    b = DataSource.builtin(manifest, ["text", "image"], 1, 2).validation_batches(100)
    assert len(a) == len(b) and all(torch.equal(x.text, y.text) for x, y in zip(a, b) if x.text is not None)
    images = torch.cat([x.images for x in a if x.images is not None])
    assert images.shape[0] == round(1797 * 0.15) and len(torch.unique(images.flatten(1), dim=0)) > 250
    windows = torch.cat([x.text for x in a if x.text is not None])
    assert torch.equal(windows[1:, 0], windows[:-1, -1])  # consecutive, non-overlapping windows
    assert len(DataSource.builtin(manifest, ["image"], 0, 2).validation_batches(64, max_batches=2)) == 2


@pytest.mark.timeout(30)
def test_builtin_rejects_audio_and_bad_shards():
    manifest = make_manifest(modalities=("text", "audio"), experts_per_layer={"text": 2, "audio": 2})
    with pytest.raises(ValueError, match="no bundled audio.*--data"):
        DataSource.builtin(manifest, ["audio"], 0, 1)
    with pytest.raises(ValueError, match="subset"):
        DataSource.builtin(make_manifest(), ["audio"], 0, 1)
    with pytest.raises(ValueError, match="shard index 3"):
        DataSource.builtin(make_manifest(), ["image"], 3, 3)
    with pytest.raises(ValueError, match="shard 1600 of 1800 is empty"):
        DataSource.builtin(make_manifest(), ["image"], 1600, 1800)


@pytest.mark.timeout(60)
def test_from_path_reads_text_images_captions_and_wav(tmp_path):
    root = make_folder(tmp_path)
    manifest = audio_manifest()
    data = DataSource.from_path(str(root), manifest, ["text", "image", "audio"], 0, 1)
    assert data.class_names == {"image": ["cat", "dog"], "audio": ["high", "low"]}
    assert data.text.shape[0] + data.val_text.shape[0] == len((root / "more.txt").read_bytes()) + 1 + len(
        (root / "notes.txt").read_bytes())
    images = torch.cat([data.items["image"].inputs, data.val_items["image"].inputs])
    assert images.shape == (12, 3, 6, 6) and 0 <= images.min() and images.max() <= 1
    labels = torch.cat([data.items["image"].labels, data.val_items["image"].labels])
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 6
    red = torch.tensor([1.0, 0.0, 0.0])
    cat_png = images[(labels == 0)][:, :, 0, 0]
    assert (cat_png - red).abs().amax(1).lt(0.01).sum() >= 2  # red squares stay red (left column, away from lines)

    every = data.validation_batches(64)[0]
    train = data.sample(8, torch.Generator().manual_seed(0))
    captions = torch.cat([data.items["image"].captions, data.val_items["image"].captions])
    decoded = {bytes(c[c != 0].tolist()).decode() for c in captions}
    assert "a red square with a grey line" in decoded and "a picture of dog" in decoded
    assert train.audio.shape == (8, 19 * 160) and every.audio_labels is not None and train.text.shape == (8, 17)

    clips = torch.cat([data.items["audio"].inputs, data.val_items["audio"].inputs])
    clip_labels = torch.cat([data.items["audio"].labels, data.val_items["audio"].labels])
    for clip, label in zip(clips, clip_labels):
        spectrum = torch.fft.rfft(clip).abs()
        peak_hz = float(spectrum.argmax()) * 16000 / clip.shape[0]
        assert abs(peak_hz - (3000.0 if label == 0 else 500.0)) < 30, peak_hz  # resampled to 16 kHz, pitch kept


@pytest.mark.timeout(30)
def test_wav_reading_and_resampling(tmp_path):
    tone = sine(1000.0, 8000, 4000, amplitude=0.8).numpy()
    write_wav(tmp_path / "a.wav", np.stack([tone, np.zeros_like(tone)], axis=1), 8000)
    samples, rate = read_wav(tmp_path / "a.wav")
    assert rate == 8000 and samples.shape == (4000,) and abs(float(samples.abs().max()) - 0.4) < 1e-3
    up = resample(samples, 8000, 16000)
    assert up.shape == (8000,) and torch.allclose(up[::2], samples, atol=1e-3)


@pytest.mark.timeout(30)
def test_bad_folders_give_clear_errors_naming_the_problem(tmp_path):
    manifest = audio_manifest()
    load = lambda path, modalities=("image",), m=manifest: DataSource.from_path(str(path), m, modalities, 0, 1)  # noqa
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        load(tmp_path / "empty")

    (tmp_path / "data").mkdir()
    root = make_folder(tmp_path / "data")
    with pytest.raises(ValueError, match="model.num_classes is 2"):
        (root / "bird").mkdir()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "bird" / "b.png")
        load(root, m=audio_manifest(num_classes=2))
    (root / "bird" / "b.png").unlink()
    with pytest.raises(ValueError, match="class folder .*bird is empty"):
        load(root)
    (root / "bird").rmdir()

    cases = [
        ("cat/anim.gif", b"GIF89a", "unsupported file .*anim.gif"),
        ("cat/broken.png", b"not a png at all", "cannot read image .*broken.png"),
        ("cat/orphan.txt", b"caption", "orphan.txt has no image"),
        ("cat/empty.txt", None, "empty.txt is empty"),
        ("README.md", b"hello", "unsupported file .*README.md"),
    ]
    for relative, content, message in cases:
        path = root / relative
        if content is None:  # an empty caption beside a real image
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(path.with_suffix(".png"))
            path.write_text("   ")
        else:
            path.write_bytes(content)
        with pytest.raises(ValueError, match=message):
            load(root)
        path.unlink()
        path.with_suffix(".png").unlink(missing_ok=True)
    assert DataSource.from_path(str(root), manifest, ["image"], 0, 1).describe()  # clean again

    with wave.open(str(root / "low" / "wide.wav"), "wb") as writer:  # 24-bit PCM is not supported
        writer.setnchannels(1), writer.setsampwidth(3), writer.setframerate(8000), writer.writeframes(b"\0" * 300)
    with pytest.raises(ValueError, match="width in .*wide.wav: 24-bit"):
        load(root, ("audio",))
    (root / "low" / "wide.wav").write_bytes(b"RIFF....WAVEjunk")
    with pytest.raises(ValueError, match="cannot read WAV file .*wide.wav"):
        load(root, ("audio",))
    (root / "low" / "wide.wav").unlink()

    only_text = tmp_path / "only_text"
    only_text.mkdir()
    (only_text / "a.txt").write_text("hello " * 400)
    with pytest.raises(ValueError, match="no image files"):
        load(only_text)
    with pytest.raises(ValueError, match="too small"):
        DataSource.from_path(str(only_text), manifest, ["text"], 0, 200)
    images_only = tmp_path / "images_only"
    (images_only / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(images_only / "a" / "x.png")
    with pytest.raises(ValueError, match="no \\*.txt text files"):
        load(images_only, ("text",))
    assert isinstance(DataSource.from_path(str(only_text), manifest, ["text"], 0, 1).sample(2, torch.Generator()),
                      Batch)


@pytest.mark.timeout(60)
def test_folder_batches_feed_the_model(tmp_path):
    from swarmtrain.expert_pool.dispatch import LocalDispatcher
    from swarmtrain.expert_pool.expert import make_expert
    from swarmtrain.peer.model import SwarmModel

    manifest = audio_manifest()
    data = DataSource.from_path(str(make_folder(tmp_path)), manifest, ["text", "image", "audio"], 0, 1)
    spec = manifest.model
    experts = {uid: make_expert(uid, spec.hidden, spec.expert_ffn, 0) for uid in manifest.expert_uids()}
    losses = SwarmModel(manifest, LocalDispatcher(experts)).losses(data.sample(4, torch.Generator().manual_seed(0)))
    assert set(losses) == {"text", "image", "contrastive", "audio", "moe_aux"}
    assert all(torch.isfinite(v) for v in losses.values())
