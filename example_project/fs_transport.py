"""kombu's filesystem transport without its two start-up / publish races.

1. kombu writes a message file in place, so a worker polling the folder can move and read
   it before the publisher has finished writing, and dies on an empty JSON document. Here a
   message is written under a name the readers ignore and renamed into place (atomic).
2. Binding a queue creates the exchange's table file and then locks it, so a second worker
   starting at the same moment can lock and read it while it is still empty, and dies the
   same way. Here the whole read-modify-write runs under a lock file of its own, and an
   empty table reads as no bindings.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps, loads


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".part-{name}")
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.rename(partial, final)
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _table_lock(self, exchange: str) -> Any:
        self.control_folder.mkdir(exist_ok=True)
        return open(self.control_folder / f".{exchange}.lock", "a")

    def get_table(self, exchange: str) -> list[Any]:
        file = self._exchange_file(exchange)
        with self._table_lock(exchange) as guard:
            filesystem.lock(guard, filesystem.LOCK_EX)
            try:
                text = file.read_text() if file.exists() else ""
            finally:
                filesystem.unlock(guard)
        return [filesystem.exchange_queue_t(*q) for q in (loads(text) if text.strip() else [])]

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        file = self._exchange_file(exchange)
        binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        with self._table_lock(exchange) as guard:
            filesystem.lock(guard, filesystem.LOCK_EX)
            try:
                text = file.read_text() if file.exists() else ""
                queues = [
                    filesystem.exchange_queue_t(*q) for q in (loads(text) if text.strip() else [])
                ]
                if binding not in queues:
                    queues.insert(0, binding)
                    partial = file.with_name(f".part-{uuid.uuid4()}-{file.name}")
                    partial.write_text(dumps(queues))
                    os.rename(partial, file)
            finally:
                filesystem.unlock(guard)


class Transport(filesystem.Transport):
    Channel = Channel
