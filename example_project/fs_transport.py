"""kombu's filesystem transport without its start-up / publish races, and with acks.

1. kombu writes a message file in place, so a worker polling the folder can move and read
   it before the publisher has finished writing, and dies on an empty JSON document. Here a
   message is written under a name the readers ignore and renamed into place (atomic).
2. Binding a queue creates the exchange's table file and then locks it, so a second worker
   starting at the same moment can lock and read it while it is still empty, and dies the
   same way. Here the whole read-modify-write runs under a lock file of its own, and an
   empty table reads as no bindings.
3. Message files are named by the nanosecond, zero-padded, so that they are read in the
   order they were written (kombu's milliseconds tie, and then sort by a random uuid).
4. kombu deletes a message file as soon as a consumer reads it: a worker killed before it
   acknowledged a message (``SIGKILL``, the OOM killer) loses it for good, as no broker
   delivers it again. Here a read message moves (atomically) into a folder of the channel
   that read it, is deleted only when acknowledged, and goes back to the queue when
   rejected with requeue or when the channel closes unacknowledged. Each such folder is
   owned through an exclusive ``flock`` on its lock file, held while the process lives (the
   kernel drops it when the process dies, however it dies); any consumer that finds an
   owner's lock free moves its messages back to the queue: Redis's visibility timeout,
   without the timeout. Processes forked by the reader inherit its lock: the messages of a
   reader killed alone come back once they have exited too (Celery's prefork processes
   are sent SIGKILL when their parent dies, on Linux: at once).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from pathlib import Path
from time import monotonic, monotonic_ns
from typing import IO, Any

from kombu.transport import filesystem
from kombu.transport.virtual import Message
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

#: the folder (in the queue folder) of the messages read and not yet acknowledged
INFLIGHT = ".inflight"
#: how often (seconds) a consumer looks for the messages of owners that are gone
RECOVER_EVERY = 1.0


def recover_orphans(queue_folder: str | os.PathLike[str], keep: str | None = None) -> int:
    """Move the unacknowledged messages of every owner that is gone (its lock is free) back
    into ``queue_folder``; how many moved. ``keep``: an owner not to look at (the caller)."""
    root = Path(queue_folder) / INFLIGHT
    try:
        owners = [p for p in root.iterdir() if p.is_dir() and p.name != keep]
    except FileNotFoundError:
        return 0
    moved = 0
    for folder in owners:
        try:
            guard = open(root / f"{folder.name}.lock", "a")  # noqa: SIM115 (held below)
        except OSError:
            continue
        with guard:
            try:
                fcntl.flock(guard.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its owner lives
            try:
                try:
                    held = sorted(folder.iterdir())
                except FileNotFoundError:
                    held = []  # another consumer emptied it first
                for message in held:
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(message, Path(queue_folder) / message.name)
                        moved += 1
                with contextlib.suppress(OSError):
                    folder.rmdir()
                with contextlib.suppress(OSError):
                    os.unlink(root / f"{folder.name}.lock")
            finally:
                fcntl.flock(guard.fileno(), fcntl.LOCK_UN)
    return moved


class Channel(filesystem.Channel):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: read and not yet acknowledged: delivery tag -> the message's file
        self._inflight: dict[str, Path] = {}
        self._owner: str | None = None
        self._owner_lock: IO[str] | None = None
        self._recover_at = 0.0
        #: queues consumed without acknowledgements (Celery's remote control): their
        #: messages are deleted when read, as kombu does
        self._no_ack_queues: set[str] = set()
        self._no_ack_get = False

    # -- publish ---------------------------------------------------------------------------

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        # zero-padded nanoseconds: read in the order written (kombu's milliseconds tie)
        name = f"{monotonic_ns():020d}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".part-{name}")
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.rename(partial, final)
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot add file {final!r} to directory") from exc

    # -- consume, acknowledge --------------------------------------------------------------

    def _owned_folder(self) -> Path:
        """This channel's folder of read messages, made (and its lock taken) on first use."""
        root = Path(self.data_folder_in) / INFLIGHT
        if self._owner is None:
            owner = f"{os.getpid()}-{uuid.uuid4().hex}"
            root.mkdir(exist_ok=True)
            guard = open(root / f"{owner}.lock", "a")  # noqa: SIM115 (held while we live)
            fcntl.flock(guard.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            (root / owner).mkdir()
            self._owner, self._owner_lock = owner, guard
        return root / self._owner

    def _get(self, queue: str) -> Any:
        now = monotonic()
        if now >= self._recover_at:
            self._recover_at = now + RECOVER_EVERY
            recover_orphans(self.data_folder_in, keep=self._owner)
        wanted = f"{queue}.msg"
        folder = self._owned_folder()
        for filename in sorted(os.listdir(self.data_folder_in)):
            if filename.partition(".")[2] != wanted:
                continue
            held = folder / filename
            try:
                os.rename(os.path.join(self.data_folder_in, filename), held)
            except FileNotFoundError:
                continue  # another consumer took it
            try:
                payload = loads(bytes_to_str(held.read_bytes()))
            except (OSError, ValueError) as exc:
                raise filesystem.ChannelError(f"Cannot read file {held!s} from queue.") from exc
            tag = payload.get("properties", {}).get("delivery_tag")
            if tag is None or self._no_ack_get or queue in self._no_ack_queues:
                held.unlink()  # nothing will acknowledge it: as kombu's own transport does
            else:
                self._inflight[tag] = held
            return payload
        raise filesystem.Empty()

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any
    ) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        return super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> Any:
        self._no_ack_queues.discard(self._tag_to_queue.get(consumer_tag, ""))
        return super().basic_cancel(consumer_tag)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        self._no_ack_get = no_ack
        try:
            return super().basic_get(queue, no_ack, **kwargs)
        finally:
            self._no_ack_get = False

    def _settled(self, delivery_tag: str) -> None:
        held = self._inflight.pop(delivery_tag, None)
        if held is not None:
            with contextlib.suppress(FileNotFoundError):
                held.unlink()

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple)
        self._settled(delivery_tag)

    def _restore(self, message: Message) -> None:
        # a requeue or the close of the channel: the message goes back to its queue as a
        # new file (marked redelivered) and the one this channel held is gone
        super()._restore(message)
        self._settled(message.delivery_tag)

    def close(self) -> None:
        super().close()  # puts back what was never acknowledged (``_restore``)
        if self._owner is None:
            return
        folder = Path(self.data_folder_in) / INFLIGHT / self._owner
        for held in list(self._inflight.values()):  # not restored (restore turned off)
            with contextlib.suppress(FileNotFoundError):
                os.rename(held, Path(self.data_folder_in) / held.name)
        self._inflight.clear()
        with contextlib.suppress(OSError):
            folder.rmdir()
        with contextlib.suppress(OSError):
            os.unlink(folder.with_suffix(".lock"))
        if self._owner_lock is not None:
            self._owner_lock.close()
        self._owner = self._owner_lock = None

    # -- exchange tables -------------------------------------------------------------------

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
