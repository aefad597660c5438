"""Run outputs: ``metrics.jsonl`` (one object per logged step), TensorBoard events when tensorboardX is installed,
and throughput figures (tokens/s, model FLOPs utilisation)."""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import jax

from mra_jax.configuration import BLOCK_SIZE, MraConfig

PEAK_BF16_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}
"""Dense bfloat16 peak FLOP/s per chip, by a substring of ``device_kind``."""


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """The device's bf16 peak, or ``None`` where unknown (CPUs): MFU is then not reported."""
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return flops
    return None


def mlm_train_flops_per_token(config: MraConfig, seq_len: int, predictions_per_sequence: int,
                              dense_attention: bool = False) -> float:
    """Model FLOPs of one training token (forward + backward = 3x forward matmul FLOPs, no remat recount).

    Per layer: the Q/K/V/output and FFN matmuls (2 x params), plus attention: MRA computes its selected 32x32 block
    pairs (``num_blocks`` per head, 2 matmuls) and the low-resolution ``n x n`` logits; dense attention all pairs.
    The decoder runs at the masked positions only.
    """
    h, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    matmul = 2 * (4 * h * h + 2 * h * config.intermediate_size)
    n = math.ceil(seq_len / BLOCK_SIZE)
    if dense_attention:
        attention = 2 * 2 * seq_len * h
    else:
        pairs = min(config.num_blocks, n * n)
        attention = (2 * 2 * pairs * BLOCK_SIZE * BLOCK_SIZE * (h // heads) * heads + 2 * 2 * n * n * h) / seq_len
    head = 2 * h * h + 2 * h * config.vocab_size * predictions_per_sequence / seq_len
    return 3 * (layers * (matmul + attention) + head)


class MetricsWriter:
    """Appends metric records to ``metrics.jsonl`` (and TensorBoard) in ``directory``; a no-op off process 0."""

    def __init__(self, directory: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.path = pathlib.Path(directory) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))

    def _truncate_after(self, step: int | None) -> None:
        """A resumed run logs again the steps after its checkpoint: drop what the killed run logged past it."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if step is not None and record.get("step", 0) <= step:
                keep.append(line)
        self.path.write_text("".join(f"{line}\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
