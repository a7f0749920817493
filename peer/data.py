"""Training data: batches of byte text, captioned images and labelled audio, split into held-out and peer shards.

Two sources, both real data and no downloads:

* :meth:`DataSource.builtin`: Python's own reference prose (``pydoc_data.topics``, ~465 KB of English) as byte text,
  and scikit-learn's 1,797 handwritten digit scans with captions made from their labels.
* :meth:`DataSource.from_path`: a user folder of ``*.txt`` text files plus class subfolders of images
  (``<class>/<name>.png|.jpg|.jpeg|.pgm``, optional caption in ``<class>/<name>.txt``) and/or 8/16-bit PCM WAV
  clips (``<class>/<name>.wav``).

Every peer derives the same held-out split (the last 5% of the text; a fixed seeded 15% of the images and clips) and
trains on its own disjoint shard of the rest (text: contiguous chunks; items: every ``shard_count``-th). Everything
is loaded into memory. Not for: streaming large corpora, tokenisers other than raw bytes, augmentation.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from swarmtrain.dht.records import Manifest, ModelSpec
from swarmtrain.peer.audio import fit_length, num_samples_for_frames, read_wav, resample

TEXT_HELD_OUT = 0.05
ITEMS_HELD_OUT = 0.15
SPLIT_SEED = 1234  # fixed, not the run's seed: the held-out items are the same in every run
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm")
AUDIO_SUFFIXES = (".wav",)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit} written by hand",
    "a scan of a hand-drawn {digit}",
    "digit {word}, handwritten",
)
CLASS_TEMPLATES = ("a picture of {name}", "an image of {name}", "{name}")


@dataclass
class Batch:
    """One training or validation batch; every field is optional and a batch holds only some modalities."""

    text: Optional[Tensor] = None  # [B, T+1] long byte tokens (inputs = [:, :-1], targets = [:, 1:])
    images: Optional[Tensor] = None  # [B, C, H, W] float in [0, 1]
    image_labels: Optional[Tensor] = None  # [B] long
    captions: Optional[Tensor] = None  # [B, L] long
    caption_mask: Optional[Tensor] = None  # [B, L] bool
    audio: Optional[Tensor] = None  # [B, S] float waveform
    audio_labels: Optional[Tensor] = None  # [B] long

    def num_samples(self) -> int:
        """Text sequences + images (a captioned image counts once) + audio clips."""
        return sum(0 if t is None else t.shape[0] for t in (self.text, self.images, self.audio))

    def to(self, device: torch.device | str) -> "Batch":
        """A copy with every tensor moved to ``device``."""
        return replace(self, **{f.name: _move(getattr(self, f.name), device) for f in fields(self)})


@dataclass
class LabelledItems:
    """Images or audio clips with labels (and, for images, caption tokens and mask)."""

    inputs: Tensor
    labels: Tensor
    captions: Optional[Tensor] = None
    caption_mask: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.labels.shape[0]

    def take(self, index: Tensor) -> "LabelledItems":
        """The items at ``index`` (a long tensor), in that order."""
        def pick(values: Optional[Tensor]) -> Optional[Tensor]:
            return None if values is None else values.index_select(0, index)

        return LabelledItems(pick(self.inputs), pick(self.labels), pick(self.captions), pick(self.caption_mask))


class DataSource:
    """Training shard + validation split for the given modalities.

    Build one with :meth:`builtin` or :meth:`from_path`. ``sample`` draws random training batches from this peer's
    shard; ``validation_batches`` gives the held-out data in fixed batches, the same on every peer. Attributes:
    ``text_span`` / ``val_text_span`` (byte ranges of the corpus), ``indices`` / ``val_indices`` (item indices
    into the full image / audio sets), ``class_names`` (per modality, label id order).
    """

    def __init__(
        self,
        name: str,
        spec: ModelSpec,
        modalities: Sequence[str],
        shard_index: int,
        shard_count: int,
        *,
        text: Optional[Tensor] = None,
        images: Optional[LabelledItems] = None,
        audio: Optional[LabelledItems] = None,
        class_names: Optional[dict[str, list[str]]] = None,
    ):
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard index {shard_index} is outside 0..{shard_count - 1} (shard count {shard_count})")
        self.name, self.spec, self.modalities = name, spec, tuple(modalities)
        self.shard_index, self.shard_count = shard_index, shard_count
        self.class_names = class_names or {}
        self.text = self.val_text = None
        self.items: dict[str, LabelledItems] = {}
        self.val_items: dict[str, LabelledItems] = {}
        self.indices: dict[str, Tensor] = {}
        self.val_indices: dict[str, Tensor] = {}
        if text is not None:
            self._split_text(text)
        for modality, items in (("image", images), ("audio", audio)):
            if items is not None:
                self._split_items(modality, items)

    @classmethod
    def builtin(cls, manifest: Manifest, modalities: Sequence[str], shard_index: int, shard_count: int) -> "DataSource":
        """Bundled data: Python reference prose (text) and scikit-learn digits with label captions (image)."""
        modalities = _check_modalities(manifest, modalities)
        if "audio" in modalities:
            raise ValueError("there is no bundled audio: to train the audio modality pass --data <folder> with "
                             "WAV files in class subfolders")
        spec, text, images = manifest.model, None, None
        if "text" in modalities:
            from pydoc_data.topics import topics

            text = _bytes_to_tensor("".join(topics[key] for key in sorted(topics)).encode("utf-8"))
        if "image" in modalities:
            from sklearn.datasets import load_digits

            digits = load_digits()
            pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
            labels = torch.tensor(digits.target, dtype=torch.long)
            captions = [_digit_caption(int(label), i) for i, label in enumerate(labels)]
            images = _labelled(_fit_images(pixels, spec), labels, captions, manifest)
        names = {"image": [str(d) for d in range(10)]} if images is not None else {}
        return cls("builtin", spec, modalities, shard_index, shard_count, text=text, images=images, class_names=names)

    @classmethod
    def from_path(
        cls, path: str, manifest: Manifest, modalities: Sequence[str], shard_index: int, shard_count: int
    ) -> "DataSource":
        """User data from a folder: ``*.txt`` text, ``<class>/<name>.png|.jpg|.jpeg|.pgm`` images (caption in
        ``<class>/<name>.txt``), ``<class>/<name>.wav`` audio. Raises ValueError naming any bad file or folder."""
        modalities = _check_modalities(manifest, modalities)
        root = Path(path)
        if not root.is_dir():
            raise ValueError(f"data folder {root} does not exist or is not a folder")
        text_files, image_files, audio_files, captions = _scan_folder(root)
        spec, text, images, audio, names = manifest.model, None, None, None, {}
        if "text" in modalities:
            if not text_files:
                raise ValueError(f"no *.txt text files directly in {root} (needed for the text modality)")
            text = _bytes_to_tensor(b"\n".join(_read_bytes(f) for f in text_files))
        for modality, found, what in (("image", image_files, "image"), ("audio", audio_files, "WAV")):
            if modality in modalities and not found:
                raise ValueError(f"no {what} files in class subfolders of {root} (needed for the {modality} modality)")
        if "image" in modalities:
            names["image"], labels = _class_labels(image_files, spec, root)
            pixels = torch.stack([_read_image(f, spec) for f in image_files])
            texts = [
                _read_caption(captions[f]) if f in captions else _class_caption(f.parent.name, i)
                for i, f in enumerate(image_files)
            ]
            images = _labelled(pixels, labels, texts, manifest)
        if "audio" in modalities:
            names["audio"], labels = _class_labels(audio_files, spec, root)
            length = max(num_samples_for_frames(spec.audio_max_frames, spec.audio_hop), spec.audio_n_fft)
            clips = [resample(*read_wav(f), spec.audio_sample_rate) for f in audio_files]
            audio = LabelledItems(torch.stack([fit_length(c, length) for c in clips]), labels)
        return cls(str(root), spec, modalities, shard_index, shard_count,
                   text=text, images=images, audio=audio, class_names=names)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """A random training batch (with replacement) of ``batch_size`` per modality from this peer's shard."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batch = Batch()
        if self.text is not None:
            window = self.spec.text_seq_len + 1
            starts = torch.randint(0, self.text.shape[0] - window + 1, (batch_size,), generator=generator)
            batch.text = self.text[starts[:, None] + torch.arange(window)].long()
        for modality, items in self.items.items():
            _put_items(batch, modality, items.take(torch.randint(0, len(items), (batch_size,), generator=generator)))
        return batch

    def validation_batches(self, batch_size: int, max_batches: Optional[int] = None) -> list[Batch]:
        """The held-out data in fixed batches, the same on every peer; each held-out item appears exactly once.

        Text is cut into windows of ``text_seq_len + 1`` bytes at stride ``text_seq_len`` (each held-out byte is a
        target once). Batch ``i`` holds the ``i``-th chunk of every modality; a modality with fewer items stops
        appearing once they run out, so compare per-modality losses. ``max_batches`` keeps only the first ones.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        parts: list[list[Batch]] = []
        if self.val_text is not None:
            window = self.spec.text_seq_len + 1
            count = (self.val_text.shape[0] - 1) // self.spec.text_seq_len
            windows = self.val_text[torch.arange(count)[:, None] * self.spec.text_seq_len + torch.arange(window)]
            parts.append([Batch(text=chunk.long()) for chunk in windows.split(batch_size)])
        for modality, items in self.val_items.items():
            order = torch.arange(len(items))
            parts.append([_put_items(Batch(), modality, items.take(chunk)) for chunk in order.split(batch_size)])
        batches = []
        for i in range(max(len(p) for p in parts)):
            merged = Batch()
            for part in parts:
                if i < len(part):
                    merged = _merge(merged, part[i])
            batches.append(merged)
        return batches if max_batches is None else batches[:max_batches]

    def describe(self) -> str:
        """One line for logs and the dashboard: source, shard, and how much data of each modality."""
        parts = []
        if self.text is not None:
            parts.append(f"text {self.text.shape[0]:,} train bytes / {self.val_text.shape[0]:,} held-out")
        for modality, items in self.items.items():
            classes = len(self.class_names.get(modality, [])) or "?"
            parts.append(f"{modality} {len(items):,} train / {len(self.val_items[modality]):,} held-out "
                         f"({classes} classes)")
        return f"{self.name} shard {self.shard_index}/{self.shard_count}: " + "; ".join(parts)

    def _split_text(self, corpus: Tensor) -> None:
        window = self.spec.text_seq_len + 1
        cut = int(corpus.shape[0] * (1 - TEXT_HELD_OUT))
        bounds = [cut * i // self.shard_count for i in range(self.shard_count + 1)]
        self.text_span = (bounds[self.shard_index], bounds[self.shard_index + 1])
        self.val_text_span = (cut, corpus.shape[0])
        self.text, self.val_text = corpus[slice(*self.text_span)], corpus[cut:]
        for what, part in (("training shard", self.text), ("held-out part", self.val_text)):
            if part.shape[0] < window:
                raise ValueError(
                    f"text corpus of {corpus.shape[0]:,} bytes is too small: its {what} has {part.shape[0]:,} bytes, "
                    f"fewer than text_seq_len + 1 = {window} (shard {self.shard_index} of {self.shard_count})"
                )

    def _split_items(self, modality: str, items: LabelledItems) -> None:
        n = len(items)
        if n < 2:
            raise ValueError(f"{modality} data has {n} item(s); need at least 2 (one held out for validation)")
        order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(n))
        held = max(1, round(n * ITEMS_HELD_OUT))
        val_index, train_index = order[:held].sort().values, order[held:].sort().values
        shard = train_index[self.shard_index :: self.shard_count]
        if shard.numel() == 0:
            raise ValueError(f"{modality} shard {self.shard_index} of {self.shard_count} is empty: only "
                             f"{train_index.numel()} training items; use fewer shards or more data")
        self.indices[modality], self.val_indices[modality] = shard, val_index
        self.items[modality], self.val_items[modality] = items.take(shard), items.take(val_index)


def encode_caption(text: str, length: int) -> tuple[Tensor, Tensor]:
    """UTF-8 bytes of ``text``, cut or zero-padded to ``length``: (tokens ``[length]`` long, mask ``[length]`` bool)."""
    data = text.encode("utf-8")[:length]
    tokens = torch.zeros(length, dtype=torch.long)
    tokens[: len(data)] = torch.tensor(list(data), dtype=torch.long)
    return tokens, torch.arange(length) < len(data)


def _check_modalities(manifest: Manifest, modalities: Sequence[str]) -> tuple[str, ...]:
    modalities = tuple(modalities)
    unknown = [m for m in modalities if m not in manifest.modalities]
    if not modalities or unknown:
        raise ValueError(f"modalities {list(modalities)} must be a non-empty subset of the run's "
                         f"{list(manifest.modalities)}")
    if "text" in manifest.modalities and manifest.model.text_vocab < 256:
        raise ValueError(f"byte tokens need model.text_vocab >= 256, got {manifest.model.text_vocab}")
    return modalities


def _bytes_to_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def _labelled(pixels: Tensor, labels: Tensor, captions: list[str], manifest: Manifest) -> LabelledItems:
    """Images with their caption tokens when the run has a text modality to read captions with."""
    if "text" not in manifest.modalities:
        return LabelledItems(pixels, labels)
    encoded = [encode_caption(c, manifest.model.caption_len) for c in captions]
    return LabelledItems(pixels, labels, torch.stack([t for t, _ in encoded]), torch.stack([m for _, m in encoded]))


def _digit_caption(label: int, index: int) -> str:
    return DIGIT_TEMPLATES[index % len(DIGIT_TEMPLATES)].format(word=DIGIT_WORDS[label], digit=label)


def _class_caption(name: str, index: int) -> str:
    return CLASS_TEMPLATES[index % len(CLASS_TEMPLATES)].format(name=name.replace("_", " "))


def _fit_images(pixels: Tensor, spec: ModelSpec) -> Tensor:
    """Grayscale ``[N, 1, H, W]`` in [0, 1] -> ``[N, image_channels, image_size, image_size]``."""
    if pixels.shape[-1] != spec.image_size or pixels.shape[-2] != spec.image_size:
        size = (spec.image_size, spec.image_size)
        pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    color = pixels.expand(-1, min(spec.image_channels, 3), -1, -1)
    alpha = torch.ones_like(pixels).expand(-1, spec.image_channels - color.shape[1], -1, -1)  # LA / RGBA: opaque
    return torch.cat([color[:, :1] if spec.image_channels == 2 else color, alpha], dim=1).contiguous()


def _scan_folder(root: Path) -> tuple[list[Path], list[Path], list[Path], dict[Path, Path]]:
    """(top-level text files, image files, WAV files, image -> caption file); ValueError on anything else."""
    text_files, image_files, audio_files, caption_files = [], [], [], []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() == ".txt":
            text_files.append(entry)
        elif not entry.is_dir():
            raise ValueError(f"unsupported file {entry}: the data folder holds *.txt text files and class subfolders")
        else:
            contents = [item for item in sorted(entry.iterdir()) if not item.name.startswith(".")]
            if not contents:
                raise ValueError(f"class folder {entry} is empty: remove it or add images / WAV files")
            for item in contents:
                suffix = item.suffix.lower()
                if not item.is_file():
                    raise ValueError(f"unexpected nested folder {item}: class folders must hold files only")
                kind = image_files if suffix in IMAGE_SUFFIXES else audio_files if suffix in AUDIO_SUFFIXES else None
                kind = caption_files if suffix == ".txt" else kind
                if kind is None:
                    raise ValueError(f"unsupported file {item}: expected {', '.join(IMAGE_SUFFIXES + AUDIO_SUFFIXES)} "
                                     f"or a .txt caption")
                kind.append(item)
    if not (text_files or image_files or audio_files):
        raise ValueError(f"data folder {root} holds no *.txt files and no class subfolders with images or WAV files")
    images_by_stem = {f.with_suffix(""): f for f in image_files}
    captions = {}
    for caption in caption_files:
        if caption.with_suffix("") not in images_by_stem:
            raise ValueError(f"caption file {caption} has no image of the same name beside it")
        captions[images_by_stem[caption.with_suffix("")]] = caption
    return text_files, image_files, audio_files, captions


def _class_labels(files: list[Path], spec: ModelSpec, root: Path) -> tuple[list[str], Tensor]:
    names = sorted({f.parent.name for f in files})
    if len(names) > spec.num_classes:
        raise ValueError(f"{root} has {len(names)} class folders ({', '.join(names[:5])}, ...) but the run's "
                         f"model.num_classes is {spec.num_classes}")
    ids = {name: i for i, name in enumerate(names)}
    return names, torch.tensor([ids[f.parent.name] for f in files], dtype=torch.long)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _read_caption(path: Path) -> str:
    text = _read_bytes(path).decode("utf-8", errors="replace").strip()
    if not text:
        raise ValueError(f"caption file {path} is empty")
    return text


def _read_image(path: Path, spec: ModelSpec) -> Tensor:
    """An image file as ``[image_channels, image_size, image_size]`` float in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[spec.image_channels]
    try:
        with Image.open(path) as image:
            image = image.convert(mode).resize((spec.image_size, spec.image_size), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _put_items(batch: Batch, modality: str, items: LabelledItems) -> Batch:
    if modality == "image":
        batch.images, batch.image_labels = items.inputs, items.labels
        batch.captions, batch.caption_mask = items.captions, items.caption_mask
    else:
        batch.audio, batch.audio_labels = items.inputs, items.labels
    return batch


def _merge(a: Batch, b: Batch) -> Batch:
    return Batch(**{f.name: getattr(b, f.name) if getattr(a, f.name) is None else getattr(a, f.name)
                    for f in fields(Batch)})


def _move(value: Optional[Tensor], device: torch.device | str) -> Optional[Tensor]:
    return None if value is None else value.to(device)
