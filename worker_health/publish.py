"""Publishing a recorded message again, byte for byte.

The body is sent as the raw bytes that were delivered, with their content type and
encoding, so any serializer round-trips and no process deserializes the payload. The task
id, arguments, routing, ETA/countdown and expiry all live in the recorded body and headers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import current_app

if TYPE_CHECKING:
    from .models import TaskQueue

#: message properties that describe the message itself and may be sent again
PUBLISHABLE_PROPERTIES = ("correlation_id", "reply_to", "priority", "delivery_mode")


def publishable_properties(properties: dict[str, Any] | None) -> dict[str, Any]:
    props = properties or {}
    return {k: props[k] for k in PUBLISHABLE_PROPERTIES if props.get(k) is not None}


def republish(task: TaskQueue) -> None:
    """Publish ``task``'s recorded message again through the current Celery app."""
    if task.body is None:
        raise ValueError(f"task {task.task_id} has no recorded message to publish")
    app = current_app
    body = bytes(task.body)
    queue = app.amqp.queues.get(task.queue) if task.queue else None
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange=task.exchange or "",
            routing_key=task.routing_key or task.queue,
            headers=dict(task.headers or {}),
            content_type=task.content_type or "application/json",
            content_encoding=task.content_encoding or "utf-8",
            declare=[queue] if queue is not None else None,
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
            **publishable_properties(task.properties),
        )
