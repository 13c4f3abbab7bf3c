"""Video for Qwen3.5's vision tower: frame sampling, loading, preprocessing, timestamps.

Qwen3.5 checkpoints process video with transformers' ``Qwen3VLVideoProcessor``
(``video_preprocessor_config.json``).  This module reproduces it without torchvision:

1. **Sampling** (``Qwen3VLVideoProcessor.sample_frames``).  A clip of ``total`` frames at
   ``source_fps`` gets ``int(total / source_fps * fps)`` frames (``fps`` 2 by default), clamped to
   ``[min_frames, max_frames]`` (4 and 768) and to ``total``, spread evenly from the first frame to
   the last (``numpy.linspace(...).round()``).
2. **Size** (``smart_resize`` of ``video_processing_qwen3_vl.py``).  As for pictures, but the pixel
   bounds count the whole clip: ``t * h * w`` with ``t`` the frame count rounded to the temporal
   patch, ``min_pixels``/``max_pixels`` 4096 / 25165824 for Qwen3.5.  Frames narrower than one
   block are scaled up first.
3. **Resize** exactly as torchvision does on CPU: ``torch.nn.functional.interpolate`` on the uint8
   frames, bicubic, ``antialias=True`` (torchvision's native uint8 path).
4. **Values**: the fused rescale-and-normalise of transformers' torchvision backend,
   ``(x - mean * 255) / (std * 255)`` in float32.
5. **Patches**: frames padded to a multiple of ``temporal_patch_size`` by repeating the last
   one, then cut like pictures (:func:`qwen35.chat.media.patchify`);
   ``video_grid_thw = (frames / 2, rows, columns)``.
6. **Timestamps** (``Qwen3VLProcessor._calculate_timestamps``): the mean time of the first and last
   frame of each temporal patch, ``index / source_fps`` seconds; the prompt shows them as
   ``<0.3 seconds>`` before each temporal patch (:func:`qwen35.chat.media.expand_placeholders`).

Files are decoded with PyAV (optional: ``pip install av``), animated GIF / PNG / WebP with
Pillow; a list of pictures is a video too.  Frames are resized as they are decoded (the resize is
per frame, so the result is the same as resizing the stack), so a long high-resolution clip never
sits in memory at full size.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .media import (
    MediaError,
    MediaLimits,
    VideoProcessorConfig,
    _check_image_pixels,
    _describe,
    _open_image_bytes,
    _source_bytes_or_path,
    load_image,
    map_values,
    patchify,
    to_rgb,
)

__all__ = [
    "DEFAULT_FRAME_LIST_FPS",
    "VideoFrames",
    "VideoSource",
    "frame_timestamps",
    "load_video",
    "preprocess_video",
    "sample_frame_indices",
    "smart_resize_video",
    "video_frame_size",
]

# transformers assumes this rate for frames given without metadata (a list of pictures)
DEFAULT_FRAME_LIST_FPS = 24.0

# Picks the source positions to keep, given the clip's frame count and frame rate.
_Sampler = Callable[[int, float], list[int]]

# What a video may be given as; see load_video.
VideoSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | Sequence[Any]

# Demuxers PyAV may use: ordinary single-file containers.  Playlist formats (HLS, DASH, concat)
# would make FFmpeg open further files or URLs named inside the data, which a client-supplied
# video must not be able to do.
_DEMUXERS = ("mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,flv,ogg,mpeg,asf,gif,h264,hevc,m4v,"
             "mjpeg,yuv4mpegpipe,nut,ivf,obu")

# File signatures of the animated picture formats Pillow decodes (GIF, APNG, WebP).
_PILLOW_MAGIC = (b"GIF87a", b"GIF89a", b"\x89PNG\r\n\x1a\n")


@dataclass(frozen=True)
class VideoFrames:
    """Sampled frames of a video, with what timestamps and resizing need to know.

    ``frames`` is uint8 ``[T, H, W, 3]`` RGB; :func:`load_video` has already resized them to the
    processor's target size, and :func:`preprocess_video` resizes frames still at
    ``source_size``.  ``frame_indices[k]`` is frame ``k``'s position in the source.
    """

    frames: np.ndarray
    frame_indices: tuple[int, ...]
    source_fps: float
    total_frames: int
    source_size: tuple[int, int]  # (height, width) of the source frames

    def __post_init__(self) -> None:
        f = self.frames
        if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3:
            shape = getattr(f, "shape", None)
            raise MediaError(f"VideoFrames.frames must be a uint8 array [frames, height, width, 3], "
                             f"got {type(f).__name__} {getattr(f, 'dtype', '')} {shape}")
        if len(f) == 0:
            raise MediaError("a video needs at least one frame")
        if len(self.frame_indices) != len(f):
            raise MediaError(f"{len(f)} frames but {len(self.frame_indices)} frame indices")
        if not (math.isfinite(self.source_fps) and self.source_fps > 0):
            raise MediaError(f"source_fps must be a positive number, got {self.source_fps!r}")

    @property
    def duration(self) -> float:
        """Length of the source in seconds."""
        return self.total_frames / self.source_fps


# --------------------------------------------------------------------------------------------
# sampling, sizes, timestamps


def sample_frame_indices(total_frames: int, source_fps: float, *, fps: float | None = 2.0,
                         num_frames: int | None = None, min_frames: int = 4, max_frames: int = 768) -> list[int]:
    """Source positions of the frames to keep, as ``Qwen3VLVideoProcessor.sample_frames`` picks them.

    With ``fps``: ``int(total_frames / source_fps * fps)`` frames, clamped to
    ``[min_frames, max_frames]`` and to ``total_frames``.  With ``num_frames`` instead: that many
    (capped at ``max_frames`` and ``total_frames``, where transformers would repeat frames).  The
    frames are spread evenly over the whole clip, first and last included.
    """
    if total_frames <= 0:
        raise MediaError("the video has no frames")
    if fps is not None and num_frames is not None:
        raise MediaError("fps and num_frames are two ways to choose the frames: give one, not both")
    if num_frames is not None:
        if num_frames <= 0:
            raise MediaError(f"num_frames must be positive, got {num_frames}")
        count = min(num_frames, max_frames, total_frames)
    else:
        if fps is None or not fps > 0:
            raise MediaError(f"fps must be a positive number, got {fps!r}")
        count = int(total_frames / source_fps * fps)
        count = min(max(count, min_frames), max_frames, total_frames)
    return np.linspace(0, total_frames - 1, count).round().astype(int).tolist()


def smart_resize_video(num_frames: int, height: int, width: int, *, factor: int = 32, temporal_factor: int = 2,
                       min_pixels: int = 4096, max_pixels: int = 25165824) -> tuple[int, int]:
    """Target frame ``(height, width)`` for a clip (``smart_resize`` of ``video_processing_qwen3_vl.py``).

    Like :func:`qwen35.chat.media.smart_resize`, with the bounds applying to
    ``frames x height x width``.  A clip of one frame is sized as the two-frame temporal patch it
    becomes (transformers refuses it).
    """
    num_frames = max(num_frames, temporal_factor)
    if height <= 0 or width <= 0:
        raise MediaError(f"cannot resize empty {width}x{height} frames")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise MediaError(f"video frames are {width}x{height}: aspect ratio "
                         f"{max(height, width) / min(height, width):.1f} is beyond the 200:1 the processor accepts")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_frame_size(num_frames: int, height: int, width: int, cfg: VideoProcessorConfig | None = None
                     ) -> tuple[int, int]:
    """Size the processor gives ``num_frames`` sampled frames of ``height x width``.

    With ``cfg.cap_pixels_per_frame`` each frame's share of ``max_pixels`` is also capped at
    ``max_video_tokens`` merged blocks and floored at ``1.05 * min_pixels`` (transformers'
    ``Qwen3VLVideoProcessor.resize``).
    """
    cfg = cfg or VideoProcessorConfig()
    max_pixels = cfg.max_pixels
    if cfg.cap_pixels_per_frame:
        frame_cap = cfg.max_video_tokens * cfg.factor * cfg.factor
        per_frame = max(min(frame_cap, cfg.max_pixels // num_frames), int(cfg.min_pixels * 1.05))
        max_pixels = per_frame * num_frames
    return smart_resize_video(num_frames, height, width, factor=cfg.factor, temporal_factor=cfg.temporal_patch_size,
                              min_pixels=cfg.min_pixels, max_pixels=max_pixels)


def frame_timestamps(frame_indices: Sequence[int], source_fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Seconds shown before each temporal patch: the mean of its first and last frame's time.

    The index list is padded with its last entry to a whole number of temporal patches, as the
    frames themselves are (``Qwen3VLProcessor._calculate_timestamps``).
    """
    indices = list(frame_indices)
    if not indices:
        return []
    if len(indices) % temporal_patch_size:
        indices += [indices[-1]] * (temporal_patch_size - len(indices) % temporal_patch_size)
    times = [i / source_fps for i in indices]
    return [(times[k] + times[k + temporal_patch_size - 1]) / 2 for k in range(0, len(times), temporal_patch_size)]


# --------------------------------------------------------------------------------------------
# resizing and values (torchvision's CPU arithmetic, with plain torch)


def _torch_resize_mode(resample: int) -> tuple[str, bool]:
    """torch interpolate mode and antialias flag for a PIL filter number, as torchvision maps them."""
    if resample == int(Image.Resampling.BICUBIC):
        return "bicubic", True
    if resample == int(Image.Resampling.BILINEAR):
        return "bilinear", True
    if resample == int(Image.Resampling.NEAREST):
        return "nearest-exact", False
    raise MediaError(f"video resizing supports the bicubic (3), bilinear (2) and nearest (0) filters, "
                     f"not resample={resample}")


def _resize_frames(frames: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """uint8 ``[k, H, W, 3]`` -> uint8 ``[k, h, w, 3]`` the way torchvision's ``resize`` does on CPU."""
    if frames.shape[1:3] == size:
        return frames  # torchvision returns the input unchanged too
    mode, antialias = _torch_resize_mode(resample)
    x = torch.from_numpy(np.require(frames, requirements=["C", "W"])).permute(0, 3, 1, 2).contiguous()
    align = False if mode in ("bilinear", "bicubic") else None
    # torchvision feeds uint8 straight to interpolate except bilinear on CPUs without AVX2,
    # where it goes through float32 and rounds back
    native = mode != "bilinear" or "AVX2" in torch.backends.cpu.get_cpu_capability()
    if native:
        y = torch.nn.functional.interpolate(x, size=list(size), mode=mode, align_corners=align, antialias=antialias)
    else:
        y = torch.nn.functional.interpolate(x.to(torch.float32), size=list(size), mode=mode, align_corners=align,
                                            antialias=antialias).round_().to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().numpy()


def _video_value_table(cfg: VideoProcessorConfig) -> np.ndarray:
    """Float32 value of each byte per channel, ``[3, 256]``, computed with the torchvision
    backend's operations (rescale folded into mean and std when both apply)."""
    x = torch.arange(256, dtype=torch.uint8).expand(3, 256)
    if cfg.do_normalize:
        mean = torch.tensor(cfg.image_mean, dtype=torch.float32)
        std = torch.tensor(cfg.image_std, dtype=torch.float32)
        if cfg.do_rescale:
            mean, std = mean * (1.0 / cfg.rescale_factor), std * (1.0 / cfg.rescale_factor)
        values = x.to(torch.float32).sub(mean.view(-1, 1)).div_(std.view(-1, 1))
    elif cfg.do_rescale:
        values = x * cfg.rescale_factor
    else:
        values = x.to(torch.float32)
    return values.to(torch.float32).contiguous().numpy()


# --------------------------------------------------------------------------------------------
# loading


class _FrameCollector:
    """Keeps the sampled frames as they are decoded, each resized to the clip's target size."""

    def __init__(self, count: int, cfg: VideoProcessorConfig, limits: MediaLimits, what: str) -> None:
        self.count, self.cfg, self.limits, self.what = count, cfg, limits, what
        self.frames: list[np.ndarray] = []
        self.source_size: tuple[int, int] | None = None
        self.target: tuple[int, int] | None = None

    def add(self, rgb: np.ndarray) -> None:
        height, width = rgb.shape[:2]
        if self.source_size is None:
            _check_image_pixels((width, height), self.limits, f"{self.what} frame")
            self.source_size = (height, width)
            self.target = (video_frame_size(self.count, height, width, self.cfg) if self.cfg.do_resize
                           else (height, width))
        elif (height, width) != self.source_size:
            raise MediaError(f"{self.what}: frames change size from {self.source_size[1]}x{self.source_size[0]} "
                             f"to {width}x{height}")
        assert self.target is not None
        self.frames.append(_resize_frames(rgb[None], self.target, self.cfg.resample)[0])

    def result(self, indices: Sequence[int], source_fps: float, total_frames: int) -> VideoFrames:
        assert self.source_size is not None
        return VideoFrames(frames=np.stack(self.frames), frame_indices=tuple(int(i) for i in indices),
                           source_fps=float(source_fps), total_frames=int(total_frames),
                           source_size=self.source_size)


def _import_av() -> Any:
    try:
        import av  # PyAV is optional: only video files need it
    except ImportError as exc:
        raise ImportError("decoding video files needs PyAV, which is not installed: pip install av") from exc
    return av


def _open_container(av: Any, source: bytes | Path, what: str) -> Any:
    file: Any = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        return av.open(file, mode="r", options={"format_whitelist": _DEMUXERS, "protocol_whitelist": "file"})
    except Exception as exc:  # FFmpeg's error for unreadable / unknown data
        raise MediaError(f"{what} could not be opened as a video (accepted containers: MP4/MOV, Matroska/WebM, "
                         f"AVI, MPEG-TS/PS, FLV, Ogg, ASF, raw H.264/HEVC; playlists are not): "
                         f"{type(exc).__name__}: {exc}") from exc


def _load_with_pyav(source: bytes | Path, cfg: VideoProcessorConfig, limits: MediaLimits, what: str,
                    choose: _Sampler) -> VideoFrames:
    av = _import_av()
    container = _open_container(av, source, what)
    try:
        if not container.streams.video:
            raise MediaError(f"{what} has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width and height:  # check the declared size before decoding anything
            _check_image_pixels((width, height), limits, f"{what} frame")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or float(rate) <= 0:
            raise MediaError(f"{what} does not say its frame rate")
        source_fps = float(rate)
        total = int(stream.frames)
        if total <= 0:  # some containers (WebM, MPEG-TS) do not record it: count the packets
            total = sum(1 for packet in container.demux(stream) if packet.size)
            container.close()
            container = _open_container(av, source, what)
            stream = container.streams.video[0]
        if total > limits.max_video_frames:
            raise MediaError(f"{what} has {total} frames, over the limit of {limits.max_video_frames} "
                             f"(MediaLimits.max_video_frames)")
        indices = choose(total, source_fps)
        wanted: dict[int, int] = {}  # source index -> how many samples use it
        for i in indices:
            wanted[i] = wanted.get(i, 0) + 1
        collector = _FrameCollector(len(indices), cfg, limits, what)
        stream.thread_type = "AUTO"  # frame-parallel decoding; frames come out in the same order
        last = indices[-1]
        kept: list[int] = []
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    rgb = frame.to_ndarray(format="rgb24")
                    for _ in range(wanted[i]):
                        collector.add(rgb)
                        kept.append(i)
                if i >= last:
                    break
        except MediaError:
            raise
        except Exception as exc:  # corrupt stream data
            raise MediaError(f"{what} could not be decoded: {type(exc).__name__}: {exc}") from exc
        if not kept:
            raise MediaError(f"{what} has no decodable frames")
        # a header can promise more frames than the stream holds: the missing samples at the
        # end repeat the last frame decoded rather than failing the whole video
        while len(kept) < len(indices):
            collector.frames.append(collector.frames[-1])
            kept.append(kept[-1])
        return collector.result(kept, source_fps, total)
    finally:
        container.close()


def _frame_durations_ms(image: Image.Image) -> list[float]:
    """Display time of each frame of an animated picture, in milliseconds.

    Browsers show frames that declare 10 ms or less for 100 ms, and so do we: such GIFs are
    common and would otherwise be read as 100 frames per second.
    """
    durations = []
    for index in range(getattr(image, "n_frames", 1)):
        image.seek(index)
        ms = image.info.get("duration") or 0
        durations.append(float(ms) if ms > 10 else 100.0)
    return durations


def _load_with_pillow(image: Image.Image, cfg: VideoProcessorConfig, limits: MediaLimits, what: str,
                      choose: _Sampler) -> VideoFrames:
    _check_image_pixels(image.size, limits, what)
    total = int(getattr(image, "n_frames", 1))
    if total > limits.max_video_frames:
        raise MediaError(f"{what} has {total} frames, over the limit of {limits.max_video_frames} "
                         f"(MediaLimits.max_video_frames)")
    try:
        durations = _frame_durations_ms(image)
        source_fps = total / (sum(durations) / 1000.0)
        indices = choose(total, source_fps)
        collector = _FrameCollector(len(indices), cfg, limits, what)
        for i in indices:
            image.seek(i)
            collector.add(np.asarray(to_rgb(image), dtype=np.uint8))
    except MediaError:
        raise
    except Exception as exc:  # corrupt frame data
        raise MediaError(f"{what} could not be decoded: {type(exc).__name__}: {exc}") from exc
    return collector.result(indices, source_fps, total)


def _frame_picture(item: Any, limits: MediaLimits, allow_paths: bool, index: int) -> Image.Image:
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] not in (1, 3, 4)):
            raise MediaError(f"frame {index} must be a uint8 array [height, width] or [height, width, 1|3|4], "
                             f"got {item.dtype} {list(item.shape)}")
        item = Image.fromarray(item[..., 0] if item.ndim == 3 and item.shape[2] == 1 else item)
    try:
        return load_image(item, limits, allow_paths=allow_paths)
    except MediaError as exc:
        raise MediaError(f"frame {index}: {exc}") from exc


def _load_frame_list(items: Sequence[Any], cfg: VideoProcessorConfig, limits: MediaLimits, allow_paths: bool,
                     source_fps: float, choose: _Sampler) -> VideoFrames:
    total = len(items)
    if total == 0:
        raise MediaError("a video given as a list of frames needs at least one frame")
    if total > limits.max_video_frames:
        raise MediaError(f"the video has {total} frames, over the limit of {limits.max_video_frames} "
                         f"(MediaLimits.max_video_frames)")
    indices = choose(total, source_fps)
    collector = _FrameCollector(len(indices), cfg, limits, "video")
    for i in indices:  # only the sampled frames are decoded
        collector.add(np.asarray(_frame_picture(items[i], limits, allow_paths, i), dtype=np.uint8))
    return collector.result(indices, source_fps, total)


def _is_pillow_animation(head: bytes) -> bool:
    return head.startswith(_PILLOW_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def load_video(source: VideoSource, cfg: VideoProcessorConfig | None = None, *, fps: float | None = None,
               num_frames: int | None = None, max_frames: int | None = None, source_fps: float | None = None,
               limits: MediaLimits | None = None, allow_paths: bool = True) -> VideoFrames:
    """Decode and sample a video, ready for :func:`preprocess_video`.

    ``source`` is a video file (path, bytes or ``data:video/...;base64,`` URL; decoded with PyAV),
    an animated GIF / PNG / WebP (path, bytes, data URL or an open PIL image; decoded with
    Pillow), or a list of frames (PIL images, uint8 arrays, or any :func:`load_image` source).
    Frames are sampled at ``fps`` (default ``cfg.fps``) or as ``num_frames`` evenly spread
    frames, at most ``max_frames`` (default ``cfg.max_frames``).  A list of frames is taken to
    run at ``source_fps`` (default 24, transformers' assumption for frames without metadata).
    Remote URLs are refused, and with ``allow_paths=False`` local paths too.
    """
    cfg = cfg or VideoProcessorConfig()
    limits = limits or MediaLimits()
    if fps is not None and num_frames is not None:
        raise MediaError("fps and num_frames are two ways to choose the frames: give one, not both")
    budget = max_frames if max_frames is not None else cfg.max_frames
    if budget <= 0:
        raise MediaError(f"max_frames must be positive, got {budget}")
    rate = None if num_frames is not None else (fps if fps is not None else cfg.fps)

    def choose(total: int, clip_fps: float) -> list[int]:
        return sample_frame_indices(total, clip_fps, fps=rate, num_frames=num_frames,
                                    min_frames=cfg.min_frames, max_frames=budget)

    what = f"video {_describe(source)}"
    if isinstance(source, Image.Image):
        return _load_with_pillow(source, cfg, limits, what, choose)
    if isinstance(source, (list, tuple)):
        list_fps = DEFAULT_FRAME_LIST_FPS if source_fps is None else float(source_fps)
        if not (math.isfinite(list_fps) and list_fps > 0):
            raise MediaError(f"source_fps must be a positive number, got {source_fps!r}")
        return _load_frame_list(source, cfg, limits, allow_paths, list_fps, choose)
    resolved = _source_bytes_or_path(source, max_bytes=limits.max_video_bytes, limit_name="max_video_bytes",
                                     allow_paths=allow_paths, kind="video")
    if isinstance(resolved, Path):
        with resolved.open("rb") as handle:
            head = handle.read(16)
    else:
        head = resolved[:16]
    if _is_pillow_animation(head):
        data = resolved.read_bytes() if isinstance(resolved, Path) else resolved
        return _load_with_pillow(_open_image_bytes(data, limits, what), cfg, limits, what, choose)
    return _load_with_pyav(resolved, cfg, limits, what, choose)


# --------------------------------------------------------------------------------------------
# preprocessing


def preprocess_video(video: VideoFrames, cfg: VideoProcessorConfig | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """``(pixel_values_videos float32 [N, 1536], video_grid_thw int64 [1, 3], timestamps)``.

    Equal to ``Qwen3VLVideoProcessor`` given the same sampled frames; ``timestamps`` holds one
    entry per temporal patch for :func:`qwen35.chat.media.expand_placeholders`.
    """
    cfg = cfg or VideoProcessorConfig()
    frames = video.frames
    count = len(frames)
    if cfg.do_resize:
        target = video_frame_size(count, *video.source_size, cfg)
        if frames.shape[1:3] != target:
            if frames.shape[1:3] != video.source_size:
                raise MediaError(f"frames are {frames.shape[2]}x{frames.shape[1]}, neither the source size "
                                 f"{video.source_size[1]}x{video.source_size[0]} "
                                 f"nor the target {target[1]}x{target[0]}")
            frames = _resize_frames(frames, target, cfg.resample)
    t = cfg.temporal_patch_size
    if count % t:  # a partial temporal patch is completed with copies of the last frame
        frames = np.concatenate([frames, np.repeat(frames[-1:], t - count % t, axis=0)])
    patches = patchify(frames, cfg.patch_size, cfg.merge_size, t)
    pixel_values = map_values(patches, _video_value_table(cfg))
    grid = torch.tensor([[len(frames) // t, frames.shape[1] // cfg.patch_size, frames.shape[2] // cfg.patch_size]],
                        dtype=torch.int64)
    return pixel_values, grid, frame_timestamps(video.frame_indices, video.source_fps, t)
