from django.db import models


class Effect(models.Model):
    """What a demo task did: one row per task id, with how many times it ran."""

    task_id = models.CharField(max_length=255, unique=True)
    label = models.CharField(max_length=255, blank=True, default="")
    runs = models.PositiveIntegerField(default=1)
    worker = models.CharField(max_length=255, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.task_id} x{self.runs}"
