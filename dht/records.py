"""Schemas of every record the swarm stores in the DHT (pydantic models, msgpack on the wire).

Each record kind of :class:`~swarmtrain.dht.keys.RecordKind` has one model here. Records that fail validation are
dropped by :class:`~swarmtrain.dht.validator.SwarmRecordValidator` before anyone reads them, so everything that
comes out of :class:`~swarmtrain.dht.directory.SwarmDirectory` already satisfies these schemas. Strings that
peers choose (names, versions, devices) are length-limited here; the dashboard still escapes them.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from swarmtrain.dht.keys import RUN_ID_PATTERN, RecordKind

Modality = Literal["text", "image", "audio"]
MODALITIES: tuple[str, ...] = ("text", "image", "audio")
FORMAT_VERSION = 1

PeerIdStr = Annotated[str, StringConstraints(pattern=r"^[1-9A-HJ-NP-Za-km-z]{32,64}$")]  # base58
ShortText = Annotated[str, StringConstraints(max_length=64)]
MaddrStr = Annotated[str, StringConstraints(max_length=256)]
ExpertUidStr = Annotated[str, StringConstraints(pattern=r"^(text|image|audio)\.\d{1,3}\.\d{1,4}$")]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Sizes of the multimodal MoE model; the coordinator fixes them for the whole run."""

    hidden: int = Field(64, ge=8, le=4096)
    layers: int = Field(2, ge=1, le=64)
    heads: int = Field(4, ge=1, le=64)
    expert_ffn: int = Field(256, ge=8, le=65536)
    text_vocab: int = Field(256, ge=2, le=1 << 20)  # byte-level tokens
    text_seq_len: int = Field(64, ge=4, le=8192)
    caption_len: int = Field(32, ge=4, le=1024)
    image_size: int = Field(8, ge=2, le=1024)
    image_channels: int = Field(1, ge=1, le=4)
    patch_size: int = Field(2, ge=1, le=64)
    num_classes: int = Field(10, ge=2, le=100_000)
    audio_sample_rate: int = Field(16000, ge=1000, le=192000)
    audio_n_fft: int = Field(400, ge=16, le=8192)
    audio_hop: int = Field(160, ge=1, le=8192)
    audio_n_mels: int = Field(32, ge=4, le=256)
    audio_max_frames: int = Field(100, ge=4, le=10000)
    contrastive_dim: int = Field(32, ge=4, le=4096)

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelSpec":
        if self.hidden % self.heads:
            raise ValueError(f"model.hidden={self.hidden} must be divisible by model.heads={self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"model.image_size={self.image_size} must be divisible by model.patch_size")
        return self


class OptimizerSpec(_Strict):
    """Local optimizer of replicated parameters (peers) and of experts (their hosts)."""

    name: Literal["adam", "adamw", "adam8bit", "sgd"] = "adam"
    lr: Finite = Field(3e-3, gt=0, le=10)
    weight_decay: Finite = Field(0.0, ge=0, le=1)
    betas: tuple[Finite, Finite] = (0.9, 0.98)


class AveragingSpec(_Strict):
    """How peers keep replicated parameters in agreement (see swarmtrain.averaging)."""

    period_s: Finite = Field(4.0, gt=0, le=3600)
    timeout_s: Finite = Field(20.0, gt=0, le=3600)  # an exchange that stops progressing this long is given up
    # the partner must answer our hello within this: a black-holed partner costs seconds, not timeout_s
    connect_timeout_s: Finite = Field(3.0, gt=0, le=600)
    # wire encoding of exchanges: float32, float16, or 8-bit blockwise (tensors < 4096 elements as float16)
    codec: Literal["none", "fp16", "8bit"] = "8bit"
    blocksize: Literal[64, 128, 256, 512, 1024, 2048, 4096] = 4096
    # 8bit: carry what encoding dropped into the next message (e_{t+1} = x_t + e_t - Q(x_t + e_t)). Push-sum keeps
    # the swarm's mass exact without it (both sides apply the same decoded move); it evens out 8-bit rounding of
    # values that keep changing (training) at the price of more noise per exchange for static ones
    error_feedback: bool = True
    # 8bit: send our values as float16 when the partner is within a few 8-bit errors (pairs then agree exactly,
    # ~1.5 bytes per element); False: always 8-bit (~1.01 bytes per element, pairs stay ~1% apart)
    adaptive_precision: bool = True
    # 8bit: zstd-compress 8-bit messages losslessly (~0.89 bytes per element instead of ~1.0; ~3-6 ms of CPU per
    # million elements per side): for peers on home uplinks, where bytes cost more than CPU
    entropy_coding: bool = True
    # 8bit: keep a reference vector shared with each of this many recent partners (one float32 copy of the
    # parameters each) so that later exchanges with them send 8-bit *differences* from it (CHOCO-gossip style):
    # ~1 byte per element at about float16 precision; 0: off
    reference_partners: int = Field(4, ge=0, le=64)
    chunk_elems: int = Field(1 << 20, ge=4096, le=1 << 24)  # elements per streamed message
    # how an exchange lands: "delta" adds the pair-averaging move to the live parameters (keeps local progress made
    # during the exchange: delay compensation); "overwrite" sets them to the pair average computed from the
    # exchange's snapshot (naive averaging: progress since the snapshot is lost; for comparisons)
    rule: Literal["delta", "overwrite"] = "delta"
    staleness_scaling: bool = True  # scale an exchange by 1/sqrt(1 + local steps since its snapshot)
    max_staleness: int = Field(256, ge=0)  # drop an exchange older than this many local steps
    max_rel_distance: Finite = Field(4.0, gt=0)  # reject partners farther than this x the parameter norm
    clip_rel: Optional[Finite] = Field(None, gt=0)  # CenteredClip radius (x the parameter norm); None: off
    mode: Literal["gossip", "diloco"] = "gossip"  # diloco: pair averages feed an outer Nesterov optimizer
    outer_lr: Finite = Field(0.7, gt=0, le=10)
    outer_momentum: Finite = Field(0.9, ge=0, lt=1)


class ExpertPoolSpec(_Strict):
    """How peers call remote experts (see swarmtrain.expert_pool)."""

    top_k: int = Field(2, ge=1, le=16)
    k_min: int = Field(1, ge=1, le=16)
    timeout_s: Finite = Field(15.0, gt=0, le=600)
    max_batch_rows: int = Field(65536, ge=1)
    # at most capacity_factor * rows * k / live experts rows go to one expert per call (first choices first);
    # the rest of that expert's share is dropped and the row's gate weights renormalised. None: no limit
    capacity_factor: Optional[Finite] = Field(2.0, ge=1.0)
    # activations/grads on the wire (expert_pool.codec); "auto": per host link, blockwise8 unless the link is
    # measured faster than the codec (expert_pool.links.wire_codec)
    wire_codec: Literal["auto", "none", "fp16", "blockwise8"] = "auto"
    # communication-aware routing: the gate subtracts this x the call cost (0 here, up to 1 for a slow or unknown
    # link; expert_pool.links.call_cost) from an expert's logit when choosing the top-k; 0: off
    comm_cost_weight: Finite = Field(4.0, ge=0, le=100)


class DatasetSpec(_Strict):
    name: ShortText = "builtin"
    description: Annotated[str, StringConstraints(max_length=512)] = (
        "scikit-learn digits (1,797 8x8 scans) with label captions + Python's pydoc_data.topics English text"
    )
    num_shards: int = Field(8, ge=1, le=100_000)


class TrainingSpec(_Strict):
    batch_size: int = Field(16, ge=1, le=65536)
    loss_weights: dict[Modality | Literal["contrastive"], Finite] = Field(
        default_factory=lambda: {"text": 1.0, "image": 1.0, "contrastive": 0.5, "audio": 1.0}
    )
    eval_every_s: Finite = Field(10.0, gt=0)
    heartbeat_period_s: Finite = Field(2.0, gt=0, le=600)
    heartbeat_ttl_s: Finite = Field(8.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _check_ttl(self) -> "TrainingSpec":
        if self.heartbeat_ttl_s <= self.heartbeat_period_s:
            raise ValueError("training.heartbeat_ttl_s must exceed heartbeat_period_s, or records expire between beats")
        return self


class Manifest(_Strict):
    """The run manifest: everything a volunteer needs to join, signed by the coordinator."""

    format_version: Literal[1] = FORMAT_VERSION
    run_id: Annotated[str, StringConstraints(pattern=RUN_ID_PATTERN.pattern)]
    created_at: Finite
    coordinator: PeerIdStr
    seed: int = 0
    modalities: tuple[Modality, ...] = ("text", "image")
    experts_per_layer: dict[Modality, Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: {"text": 4, "image": 4}
    )
    model: ModelSpec = ModelSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    averaging: AveragingSpec = AveragingSpec()
    expert_pool: ExpertPoolSpec = ExpertPoolSpec()
    dataset: DatasetSpec = DatasetSpec()
    training: TrainingSpec = TrainingSpec()
    # set when the coordinator resumed the run from a checkpoint (its saved_at): peers then start from the
    # coordinator's copy of any state no live peer has (peer/seed.py). Left out of the serialized manifest when
    # unset, so manifests of runs that were not resumed read the same as before this field existed.
    resumed_from: Optional[Finite] = Field(None, exclude_if=lambda value: value is None)

    @model_validator(mode="after")
    def _check_modalities(self) -> "Manifest":
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be a non-empty list without repeats, got {list(self.modalities)}")
        missing = [m for m in self.modalities if m not in self.experts_per_layer]
        if missing:
            raise ValueError(f"experts_per_layer has no entry for modalities {missing}")
        fewest = min(self.experts_per_layer[m] for m in self.modalities)
        if self.expert_pool.top_k > fewest:
            raise ValueError("expert_pool.top_k exceeds the number of experts per layer of some modality")
        if self.expert_pool.k_min > fewest:
            raise ValueError("expert_pool.k_min exceeds the number of experts per layer of some modality")
        return self

    def expert_uids(self, modalities: Optional[tuple[str, ...]] = None) -> list[str]:
        """All expert uids of the run (``<modality>.<layer>.<index>``), optionally of some modalities only."""
        from swarmtrain.dht.uids import make_uid

        wanted = self.modalities if modalities is None else [m for m in self.modalities if m in modalities]
        return [
            make_uid(m, layer, index)
            for m in wanted
            for layer in range(self.model.layers)
            for index in range(self.experts_per_layer[m])
        ]


class Heartbeat(_Strict):
    """A peer's signed status, refreshed every ``training.heartbeat_period_s`` with a TTL."""

    peer_id: PeerIdStr
    role: Literal["peer", "coordinator", "observer"] = "peer"
    public_name: ShortText = ""
    version: Annotated[str, StringConstraints(max_length=32)] = ""
    device: Annotated[str, StringConstraints(max_length=32)] = "cpu"
    modalities: tuple[Modality, ...] = ()
    experts: tuple[ExpertUidStr, ...] = Field((), max_length=4096)
    maddrs: tuple[MaddrStr, ...] = Field((), max_length=16)
    client_mode: bool = False
    loss: Optional[Finite] = None
    val_loss: Optional[Finite] = None
    val_loss_initial: Optional[Finite] = None
    losses: dict[Annotated[str, StringConstraints(max_length=16)], Finite] = Field(default_factory=dict, max_length=8)
    samples_per_s: Finite = Field(0.0, ge=0)
    steps: int = Field(0, ge=0)
    samples: int = Field(0, ge=0)
    averaging_rounds: int = Field(0, ge=0)
    averaging_failures: int = Field(0, ge=0)
    averaging_bytes: int = Field(0, ge=0)
    expert_averaging_rounds: int = Field(0, ge=0)  # exchanges among replicas of the experts this peer hosts
    started_at: Finite = 0.0
    time: Finite = 0.0


class ExpertLoad(_Strict):
    load: Finite = Field(0.0, ge=0)  # rows processed per second (EMA)
    calls: int = Field(0, ge=0)
    version: int = Field(0, ge=0)  # optimizer steps applied


class ExpertsRecord(_Strict):
    """Expert registry entry: the experts one peer serves and their load."""

    peer_id: PeerIdStr
    experts: dict[ExpertUidStr, ExpertLoad] = Field(default_factory=dict, max_length=4096)
    time: Finite = 0.0


class AveragingRecord(_Strict):
    """Averaging rendezvous: a peer announces it accepts exchanges for some parameter groups."""

    peer_id: PeerIdStr
    groups: tuple[Annotated[str, StringConstraints(max_length=64)], ...] = Field((), max_length=4096)
    samples: int = Field(0, ge=0)
    time: Finite = 0.0


RECORD_TYPES: dict[RecordKind, type[_Strict]] = {
    RecordKind.MANIFEST: Manifest,
    RecordKind.PEERS: Heartbeat,
    RecordKind.EXPERTS: ExpertsRecord,
    RecordKind.AVERAGING: AveragingRecord,
}


def parse_record(kind: RecordKind, payload: dict) -> _Strict:
    """Validate a decoded payload against the schema of ``kind`` (raises pydantic.ValidationError)."""
    return RECORD_TYPES[RecordKind(kind)].model_validate(payload)


def short_peer_id(peer_id: str) -> str:
    """The last 6 characters of a peer id, as shown in logs and tables."""
    return "..." + peer_id[-6:]
