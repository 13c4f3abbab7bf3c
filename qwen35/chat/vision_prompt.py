"""Pictures in a conversation: find them in the messages, load them under a policy, preprocess them, and expand the
rendered prompt's placeholders -- what ``LLM.chat``, ``LLM.generate`` and the server share.

Content parts, in the order they appear in the messages (which is the order the chat template renders them in):

* ``{"type": "image_url", "image_url": {"url": URL}}`` and ``{"type": "video_url", "video_url": {"url": URL}}``
  (OpenAI's shape; the URL may also be given as a plain string);
* ``{"type": "image", "image": SOURCE}`` and ``{"type": "video", "video": SOURCE}`` (transformers' shape; also
  ``"url"`` / ``"path"`` keys), where SOURCE is a path, bytes, a PIL image, a ``data:`` URL, or for a video a list
  of frames.

A URL is a ``data:`` URL (always allowed), ``file://PATH`` or a bare path (local files: allowed in the Python API, off
in the server unless the operator names a folder they must be inside), or ``http(s)://`` (fetched only when
``MediaPolicy.allow_remote`` is on, with the byte limit and a timeout).  Every refusal is a ``MediaError`` naming the
part and why.
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .media import (
    ImageProcessorConfig,
    MediaError,
    MediaLimits,
    VideoProcessorConfig,
    expand_placeholders,
    image_grid_thw,
    load_image,
    preprocess_images,
)
from .video import load_video, preprocess_video

_PART_KEYS = {"image": ("image", "url", "path"), "image_url": ("image_url",),
              "video": ("video", "url", "path"), "video_url": ("video_url",)}


@dataclass(frozen=True)
class MediaPolicy:
    """Where pictures may come from, and how large they may be."""

    allow_local: bool = True  # bare paths and file:// URLs
    local_root: Path | None = None  # when set, local files must lie inside this folder
    allow_remote: bool = False  # http:// and https:// URLs
    remote_timeout_s: float = 10.0
    limits: MediaLimits = field(default_factory=MediaLimits)


@dataclass(frozen=True)
class MediaPart:
    kind: str  # "image" or "video"
    source: Any
    where: str  # e.g. "messages[1].content[0]"


@dataclass(frozen=True)
class PreparedVision:
    """The prompt text with every placeholder expanded, and the tensors the engine takes (transformers' names)."""

    text: str
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in (("pixel_values", self.pixel_values), ("image_grid_thw", self.image_grid_thw),
                                  ("pixel_values_videos", self.pixel_values_videos),
                                  ("video_grid_thw", self.video_grid_thw)) if v is not None}


def media_parts(messages: Sequence[Mapping[str, Any]]) -> list[MediaPart]:
    """The image and video content parts of a conversation, in order."""
    parts: list[MediaPart] = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, (list, tuple)):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, Mapping):
                continue
            kind = part.get("type")
            if kind is None:  # an untyped part is what its payload key says, as validate_messages reads it
                kind = next((k for k in ("text", *_PART_KEYS) if k in part), None)
            if kind not in _PART_KEYS:
                continue
            where = f"messages[{i}].content[{j}]"
            source = next((part[k] for k in _PART_KEYS[kind] if part.get(k) is not None), None)
            if kind.endswith("_url"):
                source = source.get("url") if isinstance(source, Mapping) else source
                if not isinstance(source, str) or not source:
                    raise MediaError(f"{where}: the {kind} part needs {{\"url\": \"...\"}}")
            if source is None:
                raise MediaError(f"{where}: the {kind} part holds no picture (give '{_PART_KEYS[kind][0]}')")
            parts.append(MediaPart("video" if kind.startswith("video") else "image", source, where))
    return parts


class VisionPreparer:
    """Loads and preprocesses a prompt's pictures for one model (its processor configs and merge size)."""

    def __init__(self, image_config: ImageProcessorConfig, video_config: VideoProcessorConfig,
                 policy: MediaPolicy | None = None) -> None:
        self.image_config = image_config
        self.video_config = video_config
        self.policy = policy or MediaPolicy()

    @classmethod
    def for_folder(cls, folder: str | os.PathLike, policy: MediaPolicy | None = None) -> VisionPreparer:
        """The processor configs a checkpoint folder ships (preprocessor_config.json ...; official defaults
        otherwise)."""
        return cls(ImageProcessorConfig.from_folder(folder), VideoProcessorConfig.from_folder(folder), policy)

    def prepare(self, text: str, parts: Sequence[MediaPart]) -> PreparedVision:
        """``text``: a prompt rendered with one pad token per picture, in the order of ``parts``."""
        images, videos = [], []
        for part in parts:
            source = self._resolve(part)
            try:
                if part.kind == "image":
                    image = load_image(source, self.policy.limits, allow_paths=self._paths_ok(source))
                    # the size the processor will give it, now: a shape it refuses (an aspect ratio beyond 200:1)
                    # is then named by its part, not found later for the whole batch of pictures
                    image_grid_thw(image.height, image.width, self.image_config)
                    images.append(image)
                else:
                    frames = load_video(source, self.video_config, limits=self.policy.limits,
                                        allow_paths=self._paths_ok(source))
                    videos.append(preprocess_video(frames, self.video_config))
            except MediaError as e:
                raise MediaError(f"{part.where}: {e}") from None
        pixel_values = image_grid = video_values = video_grid = None
        if images:
            pixel_values, image_grid = preprocess_images(images, self.image_config)
        if videos:
            video_values = torch.cat([v[0] for v in videos])
            video_grid = torch.cat([v[1] for v in videos])
        try:
            expanded = expand_placeholders(text, image_grid, video_grid, [v[2] for v in videos] if videos else None,
                                           self.image_config.merge_size)
        except MediaError as e:
            raise MediaError(f"the prompt's picture placeholders do not match its pictures: {e}") from None
        return PreparedVision(expanded, pixel_values, image_grid, video_values, video_grid)

    # -- where a picture may come from ---------------------------------------------------------------------
    @staticmethod
    def _paths_ok(source: Any) -> bool:
        # _resolve has vetted every Path against the policy; no other string may be read as a path
        if isinstance(source, (list, tuple)):
            return any(isinstance(s, Path) for s in source)
        return isinstance(source, Path)

    def _resolve(self, part: MediaPart) -> Any:
        """A source load_image / load_video can take: bytes, a vetted Path, a data: URL, a PIL image, frames."""
        src = part.source
        if isinstance(src, (list, tuple)):  # a video as its frames
            return [self._resolve(MediaPart(part.kind, s, f"{part.where}.frames[{k}]")) for k, s in enumerate(src)]
        if isinstance(src, os.PathLike):
            return self._local(Path(src), part)
        if not isinstance(src, str):
            return src
        if src.startswith("data:"):
            return src
        scheme = urllib.parse.urlsplit(src).scheme.lower()
        if scheme in ("http", "https"):
            return self._remote(src, part)
        if scheme == "file":
            return self._local(Path(urllib.parse.unquote(urllib.parse.urlsplit(src).path)), part)
        if scheme and len(scheme) > 1:  # not a Windows drive letter
            raise MediaError(f"{part.where}: URLs of scheme {scheme!r} are not supported (use data:, file: or "
                             "http(s):)")
        return self._local(Path(src), part)

    def _local(self, path: Path, part: MediaPart) -> Path:
        policy = self.policy
        if not policy.allow_local:
            raise MediaError(f"{part.where}: local files are not allowed here (send the picture as a data: URL; "
                             "a server operator can allow a folder with --allowed-local-media-path)")
        resolved = path.expanduser().resolve()
        if policy.local_root is not None:
            root = policy.local_root.expanduser().resolve()
            if resolved != root and root not in resolved.parents:
                raise MediaError(f"{part.where}: {path} is outside the allowed media folder {root}")
        if not resolved.is_file():
            raise MediaError(f"{part.where}: no such file: {path}")
        return resolved

    def _remote(self, url: str, part: MediaPart) -> bytes:
        policy = self.policy
        if not policy.allow_remote:
            raise MediaError(f"{part.where}: remote URLs are not fetched here (send the picture as a data: URL; a "
                             "server operator can allow fetching with --allow-remote-media)")
        limit = policy.limits.max_video_bytes if part.kind == "video" else policy.limits.max_image_bytes
        try:
            with urllib.request.urlopen(url, timeout=policy.remote_timeout_s) as response:  # noqa: S310 (checked)
                data = response.read(limit + 1)
        except (OSError, ValueError) as e:
            raise MediaError(f"{part.where}: could not fetch {url}: {e}") from None
        if len(data) > limit:
            raise MediaError(f"{part.where}: {url} is larger than the limit of {limit} bytes")
        return data
