"""WaveNet (van den Oord et al. 2016c) over mu-law quantized audio, e.g. the Free Spoken Digit Dataset.

The model is a distribution over the Q-level mu-law codes of a clip. `nll` is exact, in nats of those
codes; bits per sample = nll / (T log 2) (`val/bpd` for this family is bits per *sample*). It is not a
likelihood of the 16-bit linear PCM recording, so it is comparable only across models that use the
same mu-law quantization. Optional global conditioning on the digit label or the FSDD speaker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from scalegen.config.schema import ModelConfig, OptimConfig, choice, ranged
from scalegen.data.transforms import mu_law_decode, mu_law_encode
from scalegen.dataspec import DataSpec
from scalegen.errors import UserError
from scalegen.families.base import GenerativeModel
from scalegen.nets.wavenet import WaveNet
from scalegen.objectives.autoregressive import categorical_nll
from scalegen.registry import register_family
from scalegen.samplers.autoregressive import sample_sequence
from scalegen.samplers.wav import write_wavs


@dataclass
class WaveNetConfig(ModelConfig):
    family: str = "wavenet"
    levels: int = ranged(256, ge=2, le=65536)  # mu-law levels Q of the softmax (2016c Sec. 2.2); = data.mu_law if coded
    residual_channels: int = ranged(64, ge=1)  # channels of the residual stream
    dilation_channels: int = ranged(64, ge=1)  # channels of each gated activation (filter and gate have this many each)
    skip_channels: int = ranged(256, ge=1)  # channels of the skip connections summed into the output head
    kernel_size: int = ranged(2, ge=1)  # kernel of the dilated causal convolutions
    layers_per_stack: int = ranged(10, ge=1)  # dilations 1, 2, ..., 2^(L-1) per stack
    num_stacks: int = ranged(3, ge=1)  # stacks of dilated layers (2016c: several, receptive field = R below)
    input_kernel_size: int = ranged(2, ge=1)  # kernel k0 of the first causal conv; R = k0 + (k-1) * sum(dilations)
    condition: str = choice("none", "label", "speaker")  # global condition: none, label y, or `speaker`
    num_speakers: int = ranged(6, ge=1)  # condition=speaker: speaker ids in the batches' `speaker` field (FSDD: 6)
    temperature: float = ranged(1.0, ge=0)  # default sampling temperature (softmax logits / T; 0 = argmax)
    sample_length: int = ranged(0, ge=0)  # samples per generated clip; 0 = the data's clip length


@register_family("wavenet", WaveNetConfig, "WaveNet on mu-law audio: exact bits/sample, WAV generation")
class WaveNetModel(GenerativeModel):
    """WaveNet over mu-law codes with optional global conditioning."""

    predictions = frozenset({"nll", "sample"})
    nll_kind = "exact"

    def __init__(self, cfg: WaveNetConfig, optim: OptimConfig, data: DataSpec) -> None:
        super().__init__(cfg, optim, data)
        self._codes_checked = False  # integer codes' range is checked on the first batch only (a host read)
        if data.kind != "audio":
            raise UserError(f"the wavenet family models audio [1, T], not {data.kind} {data.shape}")
        if cfg.condition == "label" and data.num_classes <= 0:
            raise UserError("model.condition=label needs a labelled dataset (data spec has no classes)")
        if data.levels != cfg.levels and data.levels <= 4096:  # pre-quantized codes (data.mu_law > 0)
            raise UserError(f"the data are {data.levels}-level mu-law codes but model.levels={cfg.levels}: "
                            f"set data.mu_law={cfg.levels} or model.levels={data.levels}")
        num_classes = {"none": 0, "label": data.num_classes, "speaker": cfg.num_speakers}[cfg.condition]
        self.net = WaveNet(cfg.levels, cfg.residual_channels, cfg.dilation_channels, cfg.skip_channels,
                           cfg.kernel_size, cfg.layers_per_stack, cfg.num_stacks, cfg.input_kernel_size,
                           num_classes)

    def codes(self, x: Tensor) -> Tensor:
        """Batch audio -> int64 codes [B, T]: float [-1, 1] is mu-law encoded; integer codes are checked."""
        if x.is_floating_point():
            return mu_law_encode(x, self.cfg.levels).reshape(x.shape[0], -1)
        if not self._codes_checked and (int(x.max()) >= self.cfg.levels or int(x.min()) < 0):
            raise UserError(f"audio codes outside [0, {self.cfg.levels}): set data.mu_law={self.cfg.levels} "
                            f"or model.levels to the data's mu-law levels")
        self._codes_checked = True
        return x.long().reshape(x.shape[0], -1)

    def condition(self, batch: dict[str, Tensor]) -> Tensor | None:
        """The global condition of this batch: none, the label, or the `speaker` field."""
        if self.cfg.condition == "none":
            return None
        if self.cfg.condition == "label":
            return batch.get("y")
        if "speaker" not in batch:
            raise UserError("model.condition=speaker but the batches have no `speaker` field")
        return batch["speaker"].long().reshape(-1)

    def nll(self, x: Tensor, y: Tensor | None = None, k: int | None = None) -> Tensor:
        """Exact -log p(codes [| g]) in nats [B]; y is the conditioning id (label or speaker) if any."""
        codes = self.codes(x)
        g = y if self.cfg.condition != "none" else None
        return categorical_nll(self.net(codes, g), codes)

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        nll = self.nll(batch["x"], self.condition(batch))
        bits_per_sample = nll.mean() / (nll.new_tensor(self.data_spec.dims) * math.log(2))
        return bits_per_sample, {"bits_per_sample": bits_per_sample.detach()}

    @property
    def num_labels(self) -> int:
        """Classes (or speakers) the model is conditioned on (0: unconditional); `scalegen sample --class`."""
        return int(self.net.num_classes)

    @torch.no_grad()
    def sample(self, n: int, y: Tensor | None = None, temperature: float | None = None,
               length: int | None = None) -> Tensor:
        """n clips, float [n, 1, T] in [-1, 1]; conditional models cycle ids 0, 1, ... when y is None."""
        if self.net.num_classes > 0 and y is None:
            y = torch.arange(n, device=self.device) % self.net.num_classes
        t = self.cfg.temperature if temperature is None else temperature
        length = length or self.cfg.sample_length or int(self.data_spec.shape[-1])
        codes = sample_sequence(self.net, n, length, y if self.cfg.condition != "none" else None, t)
        return mu_law_decode(codes, self.cfg.levels).unsqueeze(1)

    def save_wav(self, audio: Tensor, out: str | Path) -> list[Path]:
        """Write clips [n, 1, T] as `{out stem}_{i:03d}.wav` at the data's sample rate."""
        return write_wavs(out, audio, self.data_spec.sample_rate or 8000)
