"""Gemma 4's audio: the log-mel feature extractor, the conformer audio tower and `embed_audio`.

Features (as transformers' `Gemma4AudioFeatureExtractor`, numpy): the mono waveform at the extractor's
sampling rate gets frame_length // 2 zeros in front (semicausal), frames of frame_length + 1 samples every
hop (the last sample only feeds the optional preemphasis), a periodic Hann window, |rfft| to fft_length,
an HTK mel filter bank without normalisation, log(mel + mel_floor), optional per-bin mean and stddev.
Only frames made of real samples are kept: transformers zeroes and masks the others (its padding to 128
samples), and because the tower's convolutions see zeros there either way and its attention masks them,
the kept frames' soft tokens are the same.

Tower (transformers' `Gemma4AudioModel`): two 3x3 stride-2 convolutions (LayerNorm, ReLU) over (time,
mel), a projection; conformer layers of half-step feed-forward, chunked local self-attention with a
sinusoidal relative-position term and a logit soft-cap, a light causal depthwise convolution, another
half-step feed-forward and an output norm; an output projection; then `embed_audio` (RMSNorm without scale,
a projection into the text hidden size). Every clip gives ceil(ceil(frames / 2) / 2) soft tokens, which the
prompt takes between `<boa>` and `<eoa>`. Audio rows attend causally in the decoder (transformers' Gemma 4
makes only vision tokens bidirectional).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pie.engine.vision.base import config_value
from pie.engine.vision.common import CheckpointModule, PreparedImage, activation, build_on, ceil_div
from pie.engine.vision.gemma4 import ClippableLinear, NormWeight, gemma_rms
from pie.errors import InputError


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def mel_filters(num_bins: int, num_mels: int, low: float, high: float, rate: int) -> np.ndarray:
    """[num_bins, num_mels] triangular HTK-mel filters over the rfft bins, unnormalised (transformers'
    `mel_filter_bank(norm=None, mel_scale="htk")`)."""
    mel_points = np.linspace(_hz_to_mel(low), _hz_to_mel(high), num_mels + 2)
    hz_points = 700.0 * (10.0 ** (mel_points / 2595.0) - 1.0)
    fft_freqs = np.linspace(0, rate // 2, num_bins)
    slopes = hz_points[None, :] - fft_freqs[:, None]  # [bins, mels + 2]
    widths = np.diff(hz_points)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    return np.maximum(np.zeros(1), np.minimum(down, up))


class Gemma4AudioProcessor:
    """A waveform -> (features of its real frames, its prompt tokens), from the checkpoint's
    preprocessor_config.json (the feature extractor's keys) and config.json (token ids)."""

    def __init__(self, preprocessor_config: dict[str, Any], hf_config: Any) -> None:
        cfg = preprocessor_config.get("feature_extractor", preprocessor_config)
        self.sampling_rate = int(cfg.get("sampling_rate", 16_000))
        self.num_mels = int(cfg.get("feature_size", 128))
        self.frame_length = round(self.sampling_rate * float(cfg.get("frame_length_ms", 20.0)) / 1000.0)
        self.hop = round(self.sampling_rate * float(cfg.get("hop_length_ms", 10.0)) / 1000.0)
        fft = 2 ** math.ceil(math.log2(self.frame_length))
        self.fft_length = fft * 2 if cfg.get("fft_overdrive", False) else fft
        self.preemphasis = float(cfg.get("preemphasis", 0.0))
        self.htk_preemphasis = bool(cfg.get("preemphasis_htk_flavor", True))
        self.scale = float(cfg.get("input_scale_factor", 1.0))
        self.mel_floor = float(cfg.get("mel_floor", 1e-3))
        # Dither adds random noise; pie's features are deterministic (a clip's hash names its embeddings).
        self.max_samples = int(cfg.get("max_length") or 480_000)  # the extractor truncates beyond this
        n = np.arange(self.frame_length)
        self.window = (0.5 - 0.5 * np.cos(2 * np.pi * n / self.frame_length)).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the top filter may fall between bins, as transformers notes
            self.filters = mel_filters(self.fft_length // 2 + 1, self.num_mels, float(cfg.get("min_frequency", 0.0)),
                                       float(cfg.get("max_frequency", 8000.0)), self.sampling_rate)
        mean, std = cfg.get("per_bin_mean"), cfg.get("per_bin_stddev")
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64).reshape(1, -1)
        self.std = None if std is None else np.asarray(std, dtype=np.float64).reshape(1, -1)
        ac = hf_config.audio_config
        channels = list(ac.subsampling_conv_channels)
        if channels[0] != self.num_mels:
            raise ValueError(f"preprocessor feature_size {self.num_mels} differs from the audio config's "
                             f"subsampling_conv_channels[0] = {channels[0]} (the tower's input projection needs both)")
        self.audio_token_id = int(config_value(hf_config, "audio_token_id"))
        self.boa_token_id = int(config_value(hf_config, "boa_token_id"))
        self.eoa_token_id = int(config_value(hf_config, "eoa_token_id", "eoa_token_index"))

    @property
    def max_seconds(self) -> float:
        return self.max_samples / self.sampling_rate

    def num_frames(self, num_samples: int) -> int:
        return max(0, (num_samples + self.frame_length // 2 - (self.frame_length + 1)) // self.hop + 1)

    def features(self, waveform: np.ndarray) -> np.ndarray:
        """[frames, num_mels] float32 log-mel features of a mono float waveform's real frames."""
        x: np.ndarray = np.asarray(waveform, dtype=np.float64 if waveform.dtype == np.float64 else np.float32)
        if self.scale != 1.0:
            x = x * np.float32(self.scale)
        x = np.pad(x, (self.frame_length // 2, 0))
        size, n = self.frame_length + 1, self.num_frames(len(waveform))
        frames = np.lib.stride_tricks.as_strided(x, shape=(n, size), strides=(x.strides[0] * self.hop, x.strides[0]))
        if self.preemphasis > 0.0 and self.htk_preemphasis:
            frames = np.concatenate([frames[:, :1] * (1.0 - self.preemphasis),
                                     frames[:, 1:-1] - self.preemphasis * frames[:, :-2]], axis=-1)
        elif self.preemphasis > 0.0:
            frames = frames[:, 1:] - self.preemphasis * frames[:, :-1]
        else:
            frames = frames[:, :-1]
        spectrum = np.abs(np.fft.rfft(frames * self.window, n=self.fft_length, axis=-1))
        mel = np.log(spectrum @ self.filters + self.mel_floor)
        if self.mean is not None:
            mel = mel - self.mean
        if self.std is not None:
            mel = mel / self.std
        return mel.astype(np.float32)

    def prepare(self, waveform: np.ndarray) -> PreparedImage:
        if len(waveform) > self.max_samples:
            raise InputError(f"the audio is {len(waveform) / self.sampling_rate:.2f} s long, over the model's "
                             f"{self.max_seconds:.0f} s per clip; send a shorter clip")
        frames = self.num_frames(len(waveform))
        if frames < 1:
            raise InputError(f"the audio is too short ({len(waveform)} samples at {self.sampling_rate} Hz): it "
                             f"needs at least {self.frame_length + 1 - self.frame_length // 2} samples")
        feats = torch.from_numpy(self.features(waveform))
        n = ceil_div(ceil_div(frames, 2), 2)
        tokens = [self.boa_token_id, *[self.audio_token_id] * n, self.eoa_token_id]
        return PreparedImage(pixel_values=feats, grid=(1, frames, self.num_mels), tokens=tokens,
                             embed_rows=list(range(1, n + 1)), positions=None)


class _ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, eps: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(c_out, eps=eps, bias=False)


class _Subsample(nn.Module):
    def __init__(self, ac: Any) -> None:
        super().__init__()
        c0, c1 = ac.subsampling_conv_channels
        eps = float(ac.rms_norm_eps)  # transformers' LayerNorms here take the config's RMSNorm eps
        self.layer0 = _ConvBlock(1, c0, eps)
        self.layer1 = _ConvBlock(c0, c1, eps)
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, ac.hidden_size, bias=False)


class _FeedForward(nn.Module):
    def __init__(self, ac: Any) -> None:
        super().__init__()
        c, h = bool(ac.use_clipped_linears), int(ac.hidden_size)
        self.ffw_layer_1 = ClippableLinear(h, 4 * h, c)
        self.ffw_layer_2 = ClippableLinear(4 * h, h, c)
        self.pre_layer_norm = NormWeight(h)
        self.post_layer_norm = NormWeight(h)


class _Attention(nn.Module):
    def __init__(self, ac: Any) -> None:
        super().__init__()
        c, h = bool(ac.use_clipped_linears), int(ac.hidden_size)
        self.q_proj = ClippableLinear(h, h, c)
        self.k_proj = ClippableLinear(h, h, c)
        self.v_proj = ClippableLinear(h, h, c)
        self.post = ClippableLinear(h, h, c)
        self.relative_k_proj = nn.Linear(h, h, bias=False)
        self.per_dim_scale = nn.Parameter(torch.zeros(h // int(ac.num_attention_heads)))


class _LightConv(nn.Module):
    def __init__(self, ac: Any) -> None:
        super().__init__()
        c, h = bool(ac.use_clipped_linears), int(ac.hidden_size)
        self.linear_start = ClippableLinear(h, 2 * h, c)
        self.linear_end = ClippableLinear(h, h, c)
        self.depthwise_conv1d = nn.Conv1d(h, h, int(ac.conv_kernel_size), groups=h, bias=False)
        self.pre_layer_norm = NormWeight(h)
        self.conv_norm = NormWeight(h)


class _Layer(nn.Module):
    def __init__(self, ac: Any) -> None:
        super().__init__()
        self.feed_forward1 = _FeedForward(ac)
        self.feed_forward2 = _FeedForward(ac)
        self.self_attn = _Attention(ac)
        self.lconv1d = _LightConv(ac)
        self.norm_pre_attn = NormWeight(ac.hidden_size)
        self.norm_post_attn = NormWeight(ac.hidden_size)
        self.norm_out = NormWeight(ac.hidden_size)


class _AudioTower(nn.Module):
    def __init__(self, ac: Any) -> None:
        super().__init__()
        self.subsample_conv_projection = _Subsample(ac)
        self.layers = nn.ModuleList(_Layer(ac) for _ in range(ac.num_hidden_layers))
        self.output_proj = nn.Linear(ac.hidden_size, ac.output_proj_dims, bias=True)


class _Embedder(nn.Module):
    def __init__(self, audio_dim: int, text_dim: int) -> None:
        super().__init__()
        self.embedding_projection = nn.Linear(audio_dim, text_dim, bias=False)


class Gemma4AudioTower(CheckpointModule):
    """Gemma 4's audio encoder + `embed_audio`; names as in the checkpoint."""

    prefixes = (
        ("model.audio_tower.", "audio_tower."),
        ("audio_tower.", "audio_tower."),
        ("model.embed_audio.", "embed_audio."),
        ("embed_audio.", "embed_audio."),
    )
    bidirectional = False  # transformers' Gemma 4 makes only vision tokens attend both ways

    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        ac = hf_config.audio_config
        text = hf_config.get_text_config(decoder=True)
        self.hidden, self.heads = int(ac.hidden_size), int(ac.num_attention_heads)
        self.head_dim = self.hidden // self.heads
        self.chunk = int(ac.attention_chunk_size)
        self.past = int(ac.attention_context_left) - 1
        self.future = int(ac.attention_context_right)
        self.context = self.chunk + self.past + self.future
        self.softcap = float(ac.attention_logit_cap)
        self.invalid = float(ac.attention_invalid_logits_value)
        self.clip = float(ac.gradient_clipping)
        self.residual_weight = float(ac.residual_weight)
        self.eps = float(ac.rms_norm_eps)
        self.act = activation(ac.hidden_act)
        self.audio_tower = _AudioTower(ac)
        self.embed_audio = _Embedder(int(ac.output_proj_dims), int(text.hidden_size))

    @classmethod
    def from_config(cls, hf_config: Any, dtype: torch.dtype, device: torch.device) -> Gemma4AudioTower:
        tower = build_on(device, dtype, lambda: cls(hf_config))
        assert isinstance(tower, cls)
        return tower

    def _clamp(self, x: torch.Tensor) -> torch.Tensor:
        c = min(self.clip, torch.finfo(x.dtype).max)  # no over/underflow in low precision
        return torch.clamp(x, -c, c)

    def _subsample(self, feats: torch.Tensor) -> torch.Tensor:
        """[frames, mels] -> [ceil(ceil(frames / 2) / 2), hidden]."""
        sub = self.audio_tower.subsample_conv_projection
        x = feats[None, None]
        for block in (sub.layer0, sub.layer1):
            x = block.conv(x)
            x = F.relu(block.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        _, _, t, _ = x.shape
        return sub.input_proj_linear(x.permute(0, 2, 3, 1).reshape(t, -1))

    def _feed_forward(self, ff: _FeedForward, x: torch.Tensor) -> torch.Tensor:
        h = gemma_rms(self._clamp(x), ff.pre_layer_norm.weight, self.eps)
        h = ff.ffw_layer_2(self.act(ff.ffw_layer_1(h)))
        return x + gemma_rms(self._clamp(h), ff.post_layer_norm.weight, self.eps) * self.residual_weight

    def _positions(self, device: torch.device) -> torch.Tensor:
        """The [context // 2 + 1, hidden] sinusoids of relative distances context // 2, ..., 0: sin then cos."""
        n = self.hidden // 2
        inv = torch.exp(torch.arange(n, dtype=torch.float32) * -(math.log(10000.0) / max(n - 1, 1)))
        t = torch.arange(self.context // 2, -1, -1, dtype=torch.float32)[:, None] * inv[None, :]
        return torch.cat([t.sin(), t.cos()], dim=-1).to(device)

    def _attention(self, att: _Attention, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Chunked local attention of one clip ([t, hidden]): each block of `chunk` queries sees the keys
        from `past` before its start to `future` after its end, masked to the window and the clip."""
        t, nh, d, b, c = x.shape[0], self.heads, self.head_dim, self.chunk, self.context
        q = att.q_proj(x).float().view(t, nh, d) * ((d ** -0.5) / math.log(2)) * F.softplus(att.per_dim_scale)
        k = att.k_proj(x).float().view(t, nh, d) * (math.log(1 + math.e) / math.log(2))
        v = att.v_proj(x).float().view(t, nh, d)
        blocks = ceil_div(t, b)
        q = F.pad(q, (0, 0, 0, 0, 0, blocks * b - t)).view(blocks, b, nh, d)

        def windows(z: torch.Tensor) -> torch.Tensor:  # [t, nh, d] -> [blocks, c, nh, d]
            z = F.pad(z, (0, 0, 0, 0, self.past, self.future + b - 1))
            return z.unfold(0, c, b)[:blocks].permute(0, 3, 1, 2)

        kb, vb = windows(k), windows(v)
        ac = torch.einsum("nihd,njhd->hnij", q, kb)  # [nh, blocks, b, c]
        rel = att.relative_k_proj(pos).float().view(-1, nh, d)  # [p, nh, d]
        bd = torch.einsum("nihd,phd->hnip", q, rel)  # [nh, blocks, b, p]
        # Transformer-XL's shift: query r of a block reads distance (r + past - column) at each key column.
        p = bd.shape[-1]
        bd = F.pad(bd, (0, c + 1 - p)).reshape(nh, blocks, b * (c + 1))[..., :b * c].reshape(nh, blocks, b, c)
        logits = torch.tanh((ac + bd) / self.softcap) * self.softcap
        row = torch.arange(b)[:, None]
        col = torch.arange(c)[None, :]
        dist = row + self.past - col  # query - key
        key = torch.arange(blocks)[:, None, None] * b - self.past + col[None]  # [blocks, 1, c]
        ok = (((dist >= 0) & (dist < self.past)) | ((dist < 0) & (-dist < self.future)))[None] & (key >= 0) & (key < t)
        logits = logits.masked_fill(~ok.to(logits.device)[None], self.invalid)
        w = F.softmax(logits, dim=-1)
        out = torch.einsum("hnij,njhd->nihd", w, vb).reshape(blocks * b, nh * d)[:t]
        return att.post(out.to(x.dtype))

    def _light_conv(self, lc: _LightConv, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(lc.linear_start(gemma_rms(x, lc.pre_layer_norm.weight, self.eps)), dim=-1)
        kernel = lc.depthwise_conv1d.weight.shape[-1]
        h = lc.depthwise_conv1d(F.pad(h.T[None], (kernel - 1, 0)))[0].T  # causal: only past frames
        h = gemma_rms(self._clamp(h), lc.conv_norm.weight, self.eps)
        return x + lc.linear_end(self.act(h))

    def _layer(self, layer: _Layer, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self._feed_forward(layer.feed_forward1, x)
        a = self._attention(layer.self_attn, gemma_rms(self._clamp(x), layer.norm_pre_attn.weight, self.eps), pos)
        x = x + gemma_rms(self._clamp(a), layer.norm_post_attn.weight, self.eps)
        x = self._light_conv(layer.lconv1d, x)
        x = self._feed_forward(layer.feed_forward2, x)
        return gemma_rms(self._clamp(x), layer.norm_out.weight, self.eps)

    def encode(self, feats: torch.Tensor) -> torch.Tensor:
        """One clip's [frames, mels] features -> its [tokens, text_hidden] embeddings."""
        weight = self.audio_tower.output_proj.weight
        x = self._subsample(feats.to(device=weight.device, dtype=weight.dtype))
        pos = self._positions(x.device).to(x.dtype)
        layers: list[_Layer] = list(self.audio_tower.layers)  # type: ignore[arg-type]
        for layer in layers:
            x = self._layer(layer, x, pos)
        x = self.audio_tower.output_proj(x)
        return self.embed_audio.embedding_projection(gemma_rms(x, None, self.eps))

    @torch.no_grad()
    def forward(self, clips: list[PreparedImage]) -> list[torch.Tensor]:
        # One clip at a time: clips differ in length, and a clip's soft tokens depend on its frames only.
        out = [self.encode(clip.pixel_values) for clip in clips]
        for clip, emb in zip(clips, out, strict=True):
            assert emb.shape[0] == len(clip.embed_rows), (emb.shape, len(clip.embed_rows))
        return out
