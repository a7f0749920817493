"""Typed reads and writes of the swarm's records (the only place that calls DHT store/get for swarm keys)."""
from __future__ import annotations

import logging
from typing import Optional, TypeVar

import hivemind
from hivemind.utils import get_dht_time
from pydantic import BaseModel

from swarmtrain.dht.keys import RecordKind, dht_key
from swarmtrain.dht.records import RECORD_TYPES, AveragingRecord, ExpertsRecord, Heartbeat, Manifest

logger = logging.getLogger(__name__)
R = TypeVar("R", bound=BaseModel)


class SwarmDirectory:
    """Publish this peer's records and read everyone's, for one run.

    Records come back already checked by :class:`~swarmtrain.dht.validator.SwarmRecordValidator` (signature,
    owner, schema); they are parsed again here into their pydantic models.
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, peer_id: str):
        self.dht = dht
        self.run_id = run_id
        self.peer_id = peer_id

    def publish(self, kind: RecordKind, record: BaseModel, ttl_s: float) -> bool:
        """Store ``record`` under this peer's subkey of ``kind`` for ``ttl_s`` seconds; True if stored somewhere."""
        value = record.model_dump(mode="json")
        return bool(
            self.dht.store(dht_key(self.run_id, kind), value, get_dht_time() + ttl_s, subkey=self.peer_id)
        )

    async def apublish(self, kind: RecordKind, record: BaseModel, ttl_s: float) -> bool:
        value = record.model_dump(mode="json")
        future = self.dht.store(
            dht_key(self.run_id, kind), value, get_dht_time() + ttl_s, subkey=self.peer_id, return_future=True
        )
        return bool(await future)

    def read(self, kind: RecordKind, latest: bool = True) -> dict[str, tuple[BaseModel, float]]:
        """All live records of ``kind``: {owner peer id: (record, expiration time)}."""
        return self._parse(kind, self.dht.get(dht_key(self.run_id, kind), latest=latest))

    async def aread(self, kind: RecordKind, latest: bool = True) -> dict[str, tuple[BaseModel, float]]:
        found = await self.dht.get(dht_key(self.run_id, kind), latest=latest, return_future=True)
        return self._parse(kind, found)

    def manifest(self) -> Optional[Manifest]:
        """The verified manifest of the run, or None if none is (yet) visible."""
        records = self.read(RecordKind.MANIFEST)
        if not records:
            return None
        return max((rec for rec, _ in records.values()), key=lambda m: m.created_at)

    def heartbeats(self) -> dict[str, Heartbeat]:
        return {peer: rec for peer, (rec, _) in self.read(RecordKind.PEERS).items()}

    def experts(self) -> dict[str, ExpertsRecord]:
        return {peer: rec for peer, (rec, _) in self.read(RecordKind.EXPERTS).items()}

    def averaging(self) -> dict[str, AveragingRecord]:
        return {peer: rec for peer, (rec, _) in self.read(RecordKind.AVERAGING).items()}

    @staticmethod
    def _parse(kind: RecordKind, found) -> dict[str, tuple[BaseModel, float]]:
        if found is None or not isinstance(found.value, dict):
            return {}
        now = get_dht_time()
        model = RECORD_TYPES[kind]
        result = {}
        for subkey, item in found.value.items():
            if item.expiration_time < now:
                continue
            try:
                result[subkey] = (model.model_validate(item.value), item.expiration_time)
            except Exception as e:  # validated on arrival; a failure here means a local bug, so say it
                logger.warning(f"ignoring {kind.value} record of {subkey}: {e}")
        return result
