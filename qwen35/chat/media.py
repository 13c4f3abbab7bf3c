"""Images for Qwen3.5's vision tower: loading, preprocessing, prompt placeholders, content hashes.

Qwen3.5 checkpoints preprocess pictures with transformers' ``Qwen2VLImageProcessor`` (the numbers
come from the checkpoint's ``preprocessor_config.json``) and expand the chat template's
placeholders with ``Qwen3VLProcessor``.  This module reproduces both with Pillow, NumPy and torch
(no torchvision), value for value against the PIL backend ``Qwen2VLImageProcessorPil``:

1. **RGB.**  Pictures with transparency (an alpha band, or a palette / colour key marked
   transparent) are composited on white, others are converted with ``Image.convert("RGB")``.
2. **Size.**  :func:`smart_resize` picks the closest size whose sides are multiples of
   ``patch_size * merge_size`` (32) with a pixel count inside ``[min_pixels, max_pixels]``,
   keeping the aspect ratio; the picture is resized to it with Pillow's bicubic filter.
3. **Values.**  ``x * rescale_factor`` (in float64, stored as float32), then
   ``(x - image_mean) / image_std`` in float32.
4. **Patches.**  A still picture is repeated to ``temporal_patch_size`` (2) frames and cut into
   ``patch_size``-square patches, ordered 2x2-merge-block by merge-block (row-major blocks, each
   block's four patches row-major), each flattened as ``(channel, frame, row, column)`` into a
   vector of ``3 * 2 * 16 * 16 = 1536`` values.  ``image_grid_thw`` is ``(1, rows, columns)`` in
   patches, and the picture costs ``rows * columns / merge_size**2`` ``<|image_pad|>`` tokens.

Steps 3-4 run as one table lookup: the normalised value depends only on the byte and the channel,
so a 256-entry table per channel built with the exact same float operations gives the same bits
as normalising the whole array, without the float64 copy of the picture.

:func:`load_image` opens a path, bytes, a ``data:`` URL or a PIL image, honouring the EXIF
orientation as transformers' ``load_image`` does, and checks :class:`MediaLimits` (file size, and
the pixel count read from the header *before* the pixels are decoded).  Every problem with the
input is a :class:`MediaError` (a ``ValueError``) whose message names the source and the limit or
the decoder's complaint.  Video lives in :mod:`qwen35.chat.video`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import operator
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_TOKEN",
    "VIDEO_TOKEN",
    "VISION_END",
    "VISION_START",
    "GridRow",
    "GridRows",
    "ImageProcessorConfig",
    "ImageSource",
    "MediaError",
    "MediaLimits",
    "ProcessorConfigError",
    "VideoProcessorConfig",
    "count_vision_tokens",
    "expand_placeholders",
    "image_grid_thw",
    "load_image",
    "map_values",
    "media_hash",
    "patchify",
    "preprocess_images",
    "smart_resize",
    "to_rgb",
]

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"

PREPROCESSOR_CONFIG = "preprocessor_config.json"
VIDEO_PREPROCESSOR_CONFIG = "video_preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"  # transformers v5 nests each modality's settings here

# What one picture may be given as; see load_image.
ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image
# One (t, h, w) grid row, and a table of them ([n, 3] tensor or array, or rows of ints).
GridRow = torch.Tensor | np.ndarray | Sequence[int]
GridRows = torch.Tensor | np.ndarray | Sequence[Sequence[int]]


class MediaError(ValueError):
    """An image or video could not be used: unreadable, corrupt, too large, or badly shaped.

    The message names the source and what is wrong (the limit that was exceeded, or the
    decoder's own complaint), so a server can return it to the client as a 400.
    """


class ProcessorConfigError(ValueError):
    """A checkpoint's preprocessor config file is unreadable or holds an unusable value."""


# --------------------------------------------------------------------------------------------
# limits


@dataclass(frozen=True)
class MediaLimits:
    """Upper bounds checked while loading media, before the expensive work happens.

    ``max_image_pixels`` is checked on the size a file's header declares, before its pixels
    are decoded (a 100-byte PNG can declare 50000x50000), and applies to each video frame too.
    ``max_video_frames`` bounds the frames a video source holds, since decoding walks through
    them to reach the sampled ones; how many are *sampled* is the processor's ``max_frames``.
    """

    max_image_bytes: int = 32 * 2**20
    max_image_pixels: int = 8192 * 8192
    max_video_bytes: int = 512 * 2**20
    max_video_frames: int = 30 * 60 * 30  # half an hour at 30 frames per second

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MediaLimits.{f.name} must be a positive integer, got {value!r}")


def _check_image_pixels(size: tuple[int, int], limits: MediaLimits, what: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise MediaError(f"{what} has an empty size {width}x{height}")
    if width * height > limits.max_image_pixels:
        raise MediaError(f"{what} is {width}x{height} = {width * height} pixels, over the limit of "
                         f"{limits.max_image_pixels} (MediaLimits.max_image_pixels)")


# --------------------------------------------------------------------------------------------
# processor configuration

# PIL filter numbers accepted as ``resample`` (the values preprocessor configs store).
_PIL_FILTERS = {int(f): f for f in Image.Resampling}


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProcessorConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ProcessorConfigError(f"{path}: expected a JSON object at the top level")
    return data


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Settings of the image processor, as a checkpoint's ``preprocessor_config.json`` holds them.

    The defaults are the values Qwen3.5 checkpoints ship (``Qwen/Qwen3.5-*``'s
    ``preprocessor_config.json``): 16-pixel patches merged 2x2, two temporal frames, pictures
    between 256x256 (65536) and 4096x4096 (16777216) pixels, mean and std 0.5, bicubic.
    ``min_pixels`` / ``max_pixels`` are what transformers calls ``size["shortest_edge"]`` /
    ``size["longest_edge"]`` (pixel counts, despite the names).
    """

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    # Which files hold this config, most preferred first (transformers' own search order:
    # the nested processor_config.json section, then the dedicated file).
    _file_names: ClassVar[tuple[str, ...]] = (PREPROCESSOR_CONFIG,)
    _nested_key: ClassVar[str] = "image_processor"
    _type_entry: ClassVar[tuple[str, str]] = ("image_processor_type", "Qwen2VLImageProcessor")
    # Whether top-level min_pixels / max_pixels keys count (Qwen2VLImageProcessor reads them and
    # lets them override ``size``; Qwen3VLVideoProcessor reads ``size`` only).
    _accepts_min_max_pixels: ClassVar[bool] = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        for key in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ProcessorConfigError(f"{name}.{key} must be a positive integer, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ProcessorConfigError(f"{name}: min_pixels {self.min_pixels} is above max_pixels {self.max_pixels}")
        for key in ("image_mean", "image_std"):
            value = getattr(self, key)
            if len(value) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value):
                raise ProcessorConfigError(f"{name}.{key} must be three finite numbers (R, G, B), got {value!r}")
        if any(v == 0 for v in self.image_std):
            raise ProcessorConfigError(f"{name}.image_std has a zero, which would divide by zero: {self.image_std}")
        if not (isinstance(self.rescale_factor, (int, float)) and math.isfinite(self.rescale_factor)
                and self.rescale_factor > 0):
            raise ProcessorConfigError(f"{name}.rescale_factor must be a positive number, got {self.rescale_factor!r}")
        if self.resample not in _PIL_FILTERS:
            raise ProcessorConfigError(f"{name}.resample must be a PIL filter number {sorted(_PIL_FILTERS)}, "
                                       f"got {self.resample!r}")

    @property
    def factor(self) -> int:
        """Side lengths are multiples of this: one merged block of patches, in pixels."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch vector: channels x temporal frames x patch pixels."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    # -- reading and writing the transformers file format --------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> Self:
        """Build from a preprocessor config dict (keys as transformers writes them).

        Keys this processor does not use (``processor_class``, ``image_processor_type``...) are
        ignored; keys that are missing keep the Qwen3.5 defaults.
        """
        values: dict[str, Any] = {}
        size = data.get("size")
        if size is not None:
            if not isinstance(size, Mapping):
                raise ProcessorConfigError(f"{source}: 'size' must be an object, got {size!r}")
            # transformers' key names, then the spelling some older files use inside ``size``
            for ours, theirs in (("min_pixels", ("shortest_edge", "min_pixels")),
                                 ("max_pixels", ("longest_edge", "max_pixels"))):
                for key in theirs:
                    if size.get(key) is not None:
                        values[ours] = size[key]
                        break
        if cls._accepts_min_max_pixels:  # top-level keys win over ``size``, as in transformers
            for key in ("min_pixels", "max_pixels"):
                if data.get(key) is not None:
                    values[key] = data[key]
        simple = {f.name for f in fields(cls)} - {"min_pixels", "max_pixels", "image_mean", "image_std"}
        for key in simple:
            if key in data and data[key] is not None:
                values[key] = data[key]
        for key in ("image_mean", "image_std"):
            if key in data and data[key] is not None:
                value = data[key]
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    value = [value] * 3  # one number for all channels, as transformers allows
                if not isinstance(value, (list, tuple)):
                    raise ProcessorConfigError(f"{source}: '{key}' must be a list of three numbers, got {value!r}")
                values[key] = tuple(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                                    for v in value)
        defaults = cls()
        for f in fields(cls):  # type check here so the message names the file
            if f.name not in values:
                continue
            value = values[f.name]
            expected = type(getattr(defaults, f.name))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                values[f.name] = float(value)
            elif expected is tuple:
                pass  # checked in __post_init__
            elif expected is bool and not isinstance(value, bool):
                raise ProcessorConfigError(f"{source}: '{f.name}' must be true or false, got {value!r}")
            elif expected is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ProcessorConfigError(f"{source}: '{f.name}' must be an integer, got {value!r}")
            elif expected is float and not isinstance(value, float):
                raise ProcessorConfigError(f"{source}: '{f.name}' must be a number, got {value!r}")
        try:
            return cls(**values)
        except ProcessorConfigError as exc:
            raise ProcessorConfigError(f"{source}: {exc}") from exc

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> Self:
        """Read a checkpoint folder's config the way transformers looks for it.

        ``processor_config.json``'s nested section wins, then the dedicated file(s); a folder
        with none of them gets the Qwen3.5 defaults.
        """
        folder = Path(folder)
        nested = folder / PROCESSOR_CONFIG
        if nested.is_file():
            data = _read_json_object(nested)
            section = data.get(cls._nested_key)
            if isinstance(section, Mapping):
                return cls.from_dict(section, source=f"{nested} [{cls._nested_key}]")
        for name in cls._file_names:
            path = folder / name
            if path.is_file():
                return cls.from_dict(_read_json_object(path), source=str(path))
        return cls()

    def to_dict(self) -> dict[str, Any]:
        """The config in transformers' file format: written as the config file, transformers'
        processor reads back these same settings."""
        out: dict[str, Any] = {
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
            "resample": self.resample,
            "do_resize": self.do_resize,
            "do_rescale": self.do_rescale,
            "do_normalize": self.do_normalize,
            "do_convert_rgb": self.do_convert_rgb,
        }
        for f in fields(self):  # subclass fields (video sampling) after the shared ones
            if f.name not in out and f.name not in ("min_pixels", "max_pixels"):
                out[f.name] = getattr(self, f.name)
        key, value = self._type_entry
        out[key] = value
        out["processor_class"] = "Qwen3VLProcessor"
        return out

    def replace(self, **changes: Any) -> Self:
        """A copy with some settings changed (validated like a new config)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class VideoProcessorConfig(ImageProcessorConfig):
    """Settings of Qwen3-VL's video processor (``video_preprocessor_config.json``).

    The pixel bounds are Qwen3.5's video file values: 4096 to 25165824 pixels for the whole clip
    (frames x height x width).  Sampling follows ``Qwen3VLVideoProcessor``'s defaults: 2 frames
    per second, at least 4 and at most 768 frames.  ``cap_pixels_per_frame`` is transformers'
    opt-in per-frame budget (off by default there as here).
    """

    min_pixels: int = 4096
    max_pixels: int = 25165824
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768

    # transformers falls back to preprocessor_config.json when the video file is missing
    _file_names: ClassVar[tuple[str, ...]] = (VIDEO_PREPROCESSOR_CONFIG, PREPROCESSOR_CONFIG)
    _nested_key: ClassVar[str] = "video_processor"
    _type_entry: ClassVar[tuple[str, str]] = ("video_processor_type", "Qwen3VLVideoProcessor")
    # Qwen3VLVideoProcessor reads only ``size``; top-level min/max_pixels are not its keys.
    _accepts_min_max_pixels: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("min_frames", "max_frames", "max_video_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ProcessorConfigError(f"VideoProcessorConfig.{key} must be a positive integer, got {value!r}")
        if self.min_frames > self.max_frames:
            raise ProcessorConfigError(f"VideoProcessorConfig: min_frames {self.min_frames} is above "
                                       f"max_frames {self.max_frames}")
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise ProcessorConfigError(f"VideoProcessorConfig.fps must be a positive number, got {self.fps!r}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["do_sample_frames"] = True
        return out


# --------------------------------------------------------------------------------------------
# loading


def _data_url_bytes(url: str, max_bytes: int, limit_name: str) -> bytes:
    """Bytes of a ``data:[<type>][;base64],<payload>`` URL (base64 only: media is binary)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise MediaError(f"data URL {url[:40]!r}... is not base64-encoded (expected 'data:<type>;base64,<data>')")
    payload = "".join(payload.split())  # clients wrap long base64 lines
    # three bytes per four characters: refuse an oversized payload before decoding it
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise MediaError(f"data URL holds about {len(payload) // 4 * 3} bytes, over the limit of {max_bytes} "
                         f"(MediaLimits.{limit_name})")
    payload += "=" * (-len(payload) % 4)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"data URL {header!r} has invalid base64 data ({exc})") from exc
    if len(data) > max_bytes:
        raise MediaError(f"data URL holds {len(data)} bytes, over the limit of {max_bytes} (MediaLimits.{limit_name})")
    return data


def _describe(source: Any) -> str:
    """Short name of a media source for error messages (never the whole payload)."""
    if isinstance(source, str):
        return repr(source[:60] + "...") if len(source) > 60 else repr(source)
    if isinstance(source, os.PathLike):
        return repr(os.fspath(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def _source_bytes_or_path(source: Any, *, max_bytes: int, limit_name: str, allow_paths: bool,
                          kind: str) -> bytes | Path:
    """Resolve a str / path / bytes source to its bytes, or (for a path) the checked file path.

    Remote URLs are never fetched here: whether a server may fetch them, from where and with
    what timeouts is its own policy, so it downloads and hands over the bytes.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise MediaError(f"{kind} is {len(data)} bytes, over the limit of {max_bytes} (MediaLimits.{limit_name})")
        return data
    if isinstance(source, str):
        if source.startswith("data:"):
            return _data_url_bytes(source, max_bytes, limit_name)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", source):
            raise MediaError(f"{kind} URL {_describe(source)} is not fetched here: download it and pass the bytes "
                             f"or a data: URL")
    if not isinstance(source, (str, os.PathLike)):
        raise MediaError(f"unsupported {kind} source of type {type(source).__name__}")
    if not allow_paths:
        raise MediaError(f"{kind} source {_describe(source)} is not a data: URL, and local paths are not allowed here")
    path = Path(source)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise MediaError(f"cannot read {kind} file {_describe(source)}: {exc.strerror or exc}") from exc
    if not path.is_file():
        raise MediaError(f"{kind} path {_describe(source)} is not a file")
    if size > max_bytes:
        raise MediaError(f"{kind} file {_describe(source)} is {size} bytes, over the limit of {max_bytes} "
                         f"(MediaLimits.{limit_name})")
    return path


def _open_image_bytes(data: bytes, limits: MediaLimits, what: str) -> Image.Image:
    """Decode one picture, checking the declared size before decoding the pixels."""
    with warnings.catch_warnings():
        # our own pixel limit is checked next; PIL's bomb warning would only be noise
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise MediaError(f"{what} declares too many pixels ({exc})") from exc
        except Image.UnidentifiedImageError as exc:
            raise MediaError(f"{what} is not an image format Pillow can read") from exc
        except Exception as exc:  # any decoder failure is a bad input
            raise MediaError(f"{what} could not be opened as an image: {type(exc).__name__}: {exc}") from exc
        _check_image_pixels(image.size, limits, what)
        try:
            image.load()
        except Exception as exc:  # truncated or corrupt pixel data
            raise MediaError(f"{what} is corrupt or truncated ({image.format or 'unknown'} "
                             f"{image.width}x{image.height}): {type(exc).__name__}: {exc}") from exc
    return image


def _upright(image: Image.Image, what: str) -> Image.Image:
    """Apply the EXIF orientation tag, as transformers' ``load_image`` does."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # unreadable EXIF block
        raise MediaError(f"{what} has unreadable EXIF orientation data: {type(exc).__name__}: {exc}") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of a picture, transparency composited on white.

    This is what transformers' image processors do to a PIL input (``convert_to_rgb``): a
    picture with an alpha band, or a palette / grey / RGB picture with a colour marked
    transparent, goes through RGBA and is laid over opaque white; anything else is converted
    directly.  (transformers' ``load_image`` helper would instead drop the alpha band with a
    plain ``convert("RGB")``, leaving whatever colour the transparent pixels happen to store.)
    """
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(source: ImageSource, limits: MediaLimits | None = None, *, allow_paths: bool = True) -> Image.Image:
    """Open one picture as an upright RGB ``PIL.Image``.

    ``source`` is a local path (``str`` / ``PathLike``), the file's bytes, a
    ``data:image/...;base64,...`` URL, or a PIL image.  Remote ``http(s)://`` URLs are refused
    (the caller fetches them under its own policy).  ``allow_paths=False`` refuses local paths
    too, for sources that come from a client.  The EXIF orientation is applied; animated
    formats give their first frame; transparency is composited on white (:func:`to_rgb`).
    """
    limits = limits or MediaLimits()
    what = f"image {_describe(source)}"
    if isinstance(source, Image.Image):
        _check_image_pixels(source.size, limits, what)
        try:  # an image from Image.open() is decoded lazily: a corrupt one fails here
            source.load()
        except Exception as exc:
            raise MediaError(f"{what} is corrupt or truncated: {type(exc).__name__}: {exc}") from exc
        image = source
    else:
        resolved = _source_bytes_or_path(source, max_bytes=limits.max_image_bytes, limit_name="max_image_bytes",
                                         allow_paths=allow_paths, kind="image")
        data = resolved.read_bytes() if isinstance(resolved, Path) else resolved
        image = _open_image_bytes(data, limits, what)
    return to_rgb(_upright(image, what))


# --------------------------------------------------------------------------------------------
# sizes and token counts


def smart_resize(height: int, width: int, *, factor: int = 32, min_pixels: int = 65536,
                 max_pixels: int = 16777216) -> tuple[int, int]:
    """Target ``(height, width)`` for a picture: multiples of ``factor``, area within bounds.

    Each side is rounded to the nearest multiple of ``factor`` (Python's ``round``, so halves go
    to even); if the area is then above ``max_pixels`` both sides shrink by the same ratio
    (rounded down), if below ``min_pixels`` they grow (rounded up).  Aspect ratios beyond 200:1
    are refused, as transformers refuses them.  (transformers' ``smart_resize`` in
    ``image_processing_qwen2_vl.py``.)
    """
    if height <= 0 or width <= 0:
        raise MediaError(f"cannot resize an empty {width}x{height} picture")
    if max(height, width) / min(height, width) > 200:
        raise MediaError(f"picture is {width}x{height}: aspect ratio {max(height, width) / min(height, width):.1f} "
                         f"is beyond the 200:1 the vision processor accepts")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_grid_thw(height: int, width: int, cfg: ImageProcessorConfig | None = None) -> tuple[int, int, int]:
    """``(1, rows, columns)`` in patches for a picture of this size, without processing it."""
    cfg = cfg or ImageProcessorConfig()
    if cfg.do_resize:
        height, width = smart_resize(height, width, factor=cfg.factor, min_pixels=cfg.min_pixels,
                                     max_pixels=cfg.max_pixels)
    return 1, height // cfg.patch_size, width // cfg.patch_size


def _grid_triple(grid: GridRow) -> tuple[int, int, int]:
    values = grid.tolist() if isinstance(grid, (torch.Tensor, np.ndarray)) else list(grid)
    try:  # plain ints, NumPy integers and one-element integer tensors all have __index__
        if len(values) != 3 or any(isinstance(v, bool) for v in values):
            raise TypeError
        t, h, w = (operator.index(v) for v in values)
    except TypeError:
        raise ValueError(f"a grid is three positive integers (t, h, w), got {values!r}") from None
    if min(t, h, w) <= 0:
        raise ValueError(f"a grid is three positive integers (t, h, w), got {values!r}")
    return t, h, w


def count_vision_tokens(grid_thw: GridRow, merge_size: int = 2) -> int:
    """Placeholder tokens one image or video takes: ``t * h * w / merge_size**2``.

    ``grid_thw`` is one ``(t, h, w)`` row of ``image_grid_thw`` / ``video_grid_thw``.  For a
    video these are the ``<|video_pad|>`` tokens only; the per-frame timestamp text and the
    vision start/end markers around each frame come on top (see :func:`expand_placeholders`).
    """
    t, h, w = _grid_triple(grid_thw)
    if h % merge_size or w % merge_size:
        raise ValueError(f"grid {t}x{h}x{w} is not divisible by merge_size {merge_size}")
    return t * h * w // (merge_size * merge_size)


def _grid_rows(grids: GridRows | None, what: str) -> list[tuple[int, int, int]]:
    if grids is None:
        return []
    if isinstance(grids, (torch.Tensor, np.ndarray)):
        if grids.ndim != 2 or grids.shape[1] != 3:
            raise ValueError(f"{what} must have shape [n, 3], got {list(grids.shape)}")
        grids = grids.tolist()
    return [_grid_triple(row) for row in grids]


def expand_placeholders(text: str, image_grid_thw: GridRows | None = None, video_grid_thw: GridRows | None = None,
                        video_timestamps: Sequence[Sequence[float]] | None = None, merge_size: int = 2, *,
                        image_token: str = IMAGE_TOKEN, video_token: str = VIDEO_TOKEN,
                        vision_start: str = VISION_START, vision_end: str = VISION_END) -> str:
    """Expand the chat template's one pad token per image / video into the full placeholder text.

    The i-th ``<|image_pad|>`` becomes ``count_vision_tokens(image_grid_thw[i])`` pad tokens.
    The i-th ``<|video_pad|>`` becomes, for each temporal patch ``k`` of the video,
    ``<{video_timestamps[i][k]:.1f} seconds>`` + vision_start + ``h * w / merge**2`` pads +
    vision_end.  The template already wraps the single pad in vision_start / vision_end, and
    those stay, so a video reads ``<|vision_start|><0.3 seconds><|vision_start|>...`` exactly
    as ``Qwen3VLProcessor.replace_video_token`` produces it.  The number of pads in ``text``
    must match the number of grids (a mismatch, e.g. a pad token typed by a user, is an error).
    """
    images = _grid_rows(image_grid_thw, "image_grid_thw")
    videos = _grid_rows(video_grid_thw, "video_grid_thw")
    stamps = [list(s) for s in video_timestamps] if video_timestamps is not None else []
    n_images, n_videos = text.count(image_token), text.count(video_token)
    if n_images != len(images):
        raise MediaError(f"the prompt has {n_images} {image_token} placeholders but {len(images)} images were given")
    if n_videos != len(videos):
        raise MediaError(f"the prompt has {n_videos} {video_token} placeholders but {len(videos)} videos were given")
    if len(stamps) != len(videos):
        raise MediaError(f"{len(videos)} videos but {len(stamps)} timestamp lists were given")

    def image_text(grid: tuple[int, int, int]) -> str:
        return image_token * count_vision_tokens(grid, merge_size)

    def video_text(grid: tuple[int, int, int], times: list[float]) -> str:
        t, h, w = grid
        if len(times) != t:
            raise MediaError(f"video grid has {t} temporal patches but {len(times)} timestamps were given")
        per_frame = vision_start + video_token * count_vision_tokens((1, h, w), merge_size) + vision_end
        return "".join(f"<{stamp:.1f} seconds>" + per_frame for stamp in times)

    pieces: list[str] = []
    image_iter, video_iter = iter(images), iter(zip(videos, stamps))
    pattern = re.compile("|".join(re.escape(tok) for tok in (image_token, video_token)))
    last = 0
    for match in pattern.finditer(text):
        pieces.append(text[last:match.start()])
        if match.group() == image_token:
            pieces.append(image_text(next(image_iter)))
        else:
            grid, times = next(video_iter)
            pieces.append(video_text(grid, times))
        last = match.end()
    pieces.append(text[last:])
    return "".join(pieces)


# --------------------------------------------------------------------------------------------
# pixel values


def patchify(frames: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """Cut ``[frames, H, W, C]`` into patch vectors ``[N, C, T * P * P]`` in the vision tower's order.

    ``frames`` must hold a multiple of ``temporal_patch_size`` frames and sides that are
    multiples of ``patch_size * merge_size``.  Patches run temporal patch by temporal patch,
    then merge block by merge block (row-major), then within a block row-major; each vector is
    ``(channel, frame, row, column)``.  Works on any dtype (uint8 here, before value mapping).
    """
    f, height, width, channels = frames.shape
    t, p, m = temporal_patch_size, patch_size, merge_size
    if f % t or height % (p * m) or width % (p * m):
        raise MediaError(f"cannot cut {f} frames of {width}x{height} into {t}-frame, {p * m}-pixel blocks")
    gt, gh, gw = f // t, height // p, width // p
    x = frames.reshape(gt, t, gh // m, m, p, gw // m, m, p, channels)
    # -> (temporal, block_row, block_col, in_row, in_col, channel, frame, pixel_row, pixel_col)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return x.reshape(gt * gh * gw, channels, t * p * p)


def _image_value_table(cfg: ImageProcessorConfig) -> np.ndarray:
    """Normalised float32 value of each byte per channel, ``[3, 256]``, computed with the PIL
    backend's operations: rescale in float64 then store float32, normalise in float32."""
    x: np.ndarray = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 256))
    if cfg.do_rescale:
        x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        x = x.astype(np.float32) if not np.issubdtype(x.dtype, np.floating) else x
        mean = np.array(cfg.image_mean, dtype=x.dtype)[:, None]
        std = np.array(cfg.image_std, dtype=x.dtype)[:, None]
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)


def map_values(patches: np.ndarray, table: np.ndarray) -> torch.Tensor:
    """uint8 patches ``[N, C, L]`` -> float32 ``[N, C * L]`` through a per-channel table ``[C, 256]``."""
    n, channels, length = patches.shape
    out = np.empty((n, channels, length), dtype=np.float32)
    for c in range(channels):
        out[:, c, :] = table[c][patches[:, c, :]]
    return torch.from_numpy(out.reshape(n, channels * length))


def _rgb_resized(image: Image.Image, index: int, cfg: ImageProcessorConfig) -> np.ndarray:
    """One picture as uint8 ``[H, W, 3]`` at the processor's size."""
    if not isinstance(image, Image.Image):
        raise MediaError(f"image {index} is a {type(image).__name__}, not a PIL image (use load_image)")
    if cfg.do_convert_rgb:
        image = to_rgb(image)
    elif image.mode != "RGB":
        raise MediaError(f"image {index} is in mode {image.mode} and do_convert_rgb is off")
    if cfg.do_resize:
        height, width = smart_resize(image.height, image.width, factor=cfg.factor,
                                     min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        image = image.resize((width, height), resample=_PIL_FILTERS[cfg.resample])
    return np.asarray(image, dtype=np.uint8)


def preprocess_images(images: Image.Image | Sequence[Image.Image], cfg: ImageProcessorConfig | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values float32 [N, 1536], image_grid_thw int64 [n, 3])`` for PIL pictures.

    Equal to ``Qwen2VLImageProcessorPil`` with the same settings: the patches of all pictures
    are concatenated in order, one grid row per picture.  Pictures in other modes than RGB are
    converted with :func:`to_rgb` (which :func:`load_image` has already applied).
    """
    cfg = cfg or ImageProcessorConfig()
    if isinstance(images, Image.Image):
        images = [images]
    resized = [_rgb_resized(image, index, cfg) for index, image in enumerate(images)]
    p, t = cfg.patch_size, cfg.temporal_patch_size
    grids = [(1, pixels.shape[0] // p, pixels.shape[1] // p) for pixels in resized]
    total = sum(h * w for _, h, w in grids)
    # filled in place: no float copy of the pictures besides the result itself
    out = np.empty((total, 3, t, p * p), dtype=np.float32)
    table = _image_value_table(cfg)
    start = 0
    for pixels in resized:
        # a still picture is its own temporal patch: cut one frame, write its values t times
        patches = patchify(pixels[None], p, cfg.merge_size, 1)  # [n, 3, p * p]
        end = start + len(patches)
        for c in range(3):
            out[start:end, c] = table[c][patches[:, c, :]][:, None, :]
        start = end
    return torch.from_numpy(out.reshape(total, cfg.patch_dim)), torch.tensor(grids, dtype=torch.int64).reshape(-1, 3)


# --------------------------------------------------------------------------------------------
# content hash


def media_hash(pixel_values: torch.Tensor, grid_thw: GridRow | GridRows) -> str:
    """Stable sha256 (hex) of preprocessed media: the tensor's dtype, shape and bytes plus the grid.

    Equal pixels and grid give equal hashes across processes and machines (the bytes are those
    of a contiguous CPU copy, little-endian on every platform torch runs on), so a prefix cache
    can key vision positions by content.  Different grids over the same bytes hash differently.
    """
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    rows = _grid_rows(torch.as_tensor(grid_thw).reshape(-1, 3), "grid_thw")
    tensor = pixel_values.detach().to("cpu").contiguous()
    digest = hashlib.sha256()
    header = {"v": 1, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape), "grid": rows}
    digest.update(json.dumps(header, sort_keys=True).encode())
    if tensor.numel():
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()
