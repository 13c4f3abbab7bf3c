"""Image and video preprocessing against transformers' own processors.

The oracle for pictures is ``Qwen2VLImageProcessorPil`` (the PIL backend, which needs nothing
beyond Pillow).  The video processor ``Qwen3VLVideoProcessor`` is a torchvision-backend class and
torchvision cannot be installed beside this project's torch, so when it is missing the test loads
transformers' real module and class anyway and gives it the three torchvision functions it calls
(``resize``, ``normalize``, ``grayscale_to_rgb``) written after torchvision's CPU code paths
(uint8 frames straight into ``torch.nn.functional.interpolate``, bicubic, antialias).  Everything
else - frame sampling, smart_resize, the fused rescale/normalise, patch order, grids, timestamps,
and ``Qwen3VLProcessor``'s prompt expansion - is transformers' code running as shipped.  When
torchvision *is* importable the real classes run unpatched.
"""

from __future__ import annotations

import base64
import enum
import functools
import importlib.util
import io
import json
import struct
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qwen35.chat.media import (
    ImageProcessorConfig,
    MediaError,
    MediaLimits,
    ProcessorConfigError,
    VideoProcessorConfig,
    count_vision_tokens,
    expand_placeholders,
    image_grid_thw,
    load_image,
    media_hash,
    preprocess_images,
    smart_resize,
    to_rgb,
)
from qwen35.chat.video import (
    VideoFrames,
    frame_timestamps,
    load_video,
    preprocess_video,
    sample_frame_indices,
    smart_resize_video,
)

ASSETS = Path(__file__).resolve().parents[2] / "qwen35" / "assets" / "default"

# Qwen/Qwen3.5-*'s preprocessor_config.json and video_preprocessor_config.json
QWEN35_IMAGE_FILE = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast",
}
QWEN35_VIDEO_FILE = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor",
}


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def moving_colours(count: int, height: int = 48, width: int = 64) -> list[np.ndarray]:
    """Frames of a bar sweeping right over a changing red and a horizontal blue ramp."""
    frames = []
    for i in range(count):
        frame = np.zeros((height, width, 3), np.uint8)
        frame[..., 0] = (i * 16) % 256
        frame[:, : 4 * i + 4, 1] = 200
        frame[..., 2] = (np.arange(width) * 4 % 256)[None]
        frames.append(frame)
    return frames


# --------------------------------------------------------------------------------------------
# the transformers oracle


class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _tv_resize(image, size, interpolation=_InterpolationMode.BILINEAR, antialias=True):
    # torchvision.transforms.v2.functional.resize_image on CPU: unchanged size is a no-op;
    # uint8 goes to interpolate as is for bicubic (and bilinear with AVX2)
    *lead, channels, height, width = image.shape
    if tuple(size) == (height, width):
        return image
    assert interpolation is _InterpolationMode.BICUBIC and image.dtype == torch.uint8
    out = torch.nn.functional.interpolate(image.reshape(-1, channels, height, width), size=list(size),
                                          mode="bicubic", align_corners=False, antialias=antialias)
    return out.reshape(*lead, channels, *size)


def _tv_normalize(image, mean, std, inplace=False):
    # torchvision.transforms.v2.functional.normalize_image
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    image = image.sub_(mean) if inplace else image.sub(mean)
    return image.div_(std)


def _tv_grayscale_to_rgb(image):
    return image.repeat_interleave(3, dim=-3) if image.shape[-3] == 1 else image


@pytest.fixture(scope="module")
def hf():
    """transformers' processors: image (PIL backend), video, and the Qwen3-VL text expansion."""
    transformers = pytest.importorskip("transformers")
    from transformers import AutoTokenizer, image_processing_backends, video_processing_utils
    from transformers.image_utils import PILImageResampling
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.processing_utils import ProcessorMixin
    from transformers.utils import is_torchvision_available
    from transformers.video_utils import read_video_pyav

    with pytest.MonkeyPatch.context() as mp:
        if is_torchvision_available():
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
        else:
            tvF = types.SimpleNamespace(InterpolationMode=_InterpolationMode, resize=_tv_resize,
                                        normalize=_tv_normalize, grayscale_to_rgb=_tv_grayscale_to_rgb)
            mp.setattr(image_processing_backends, "tvF", tvF, raising=False)
            mp.setattr(video_processing_utils, "tvF", tvF, raising=False)
            mp.setattr(image_processing_backends, "pil_torch_interpolation_mapping",
                       {PILImageResampling.BICUBIC: _InterpolationMode.BICUBIC})
            # the lazy module would hand back a "needs torchvision" placeholder: load the file itself
            path = Path(transformers.__file__).parent / "models" / "qwen3_vl" / "video_processing_qwen3_vl.py"
            spec = importlib.util.spec_from_file_location("transformers.models.qwen3_vl._video_oracle", path)
            module = importlib.util.module_from_spec(spec)
            mp.setitem(sys.modules, spec.name, module)
            spec.loader.exec_module(module)
            module.tvF = tvF
            Qwen3VLVideoProcessor = module.Qwen3VLVideoProcessor
            # the processor checks its parts against the auto-class registry, which lists no
            # video processor without torchvision; the parts are the right classes regardless
            mp.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
        tokenizer = AutoTokenizer.from_pretrained(ASSETS)
        yield types.SimpleNamespace(
            ImageProcessor=Qwen2VLImageProcessorPil, VideoProcessor=Qwen3VLVideoProcessor, Processor=Qwen3VLProcessor,
            tokenizer=tokenizer, read_video_pyav=read_video_pyav,
        )


def hf_images(hf, images, cfg: ImageProcessorConfig):
    out = hf.ImageProcessor(**cfg.to_dict())(images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def hf_video(hf, frames: np.ndarray, fps: float, indices, cfg: VideoProcessorConfig):
    processor = hf.VideoProcessor(**cfg.to_dict())
    meta = {"total_num_frames": int(max(indices)) + 1, "fps": fps, "frames_indices": list(indices)}
    out = processor(videos=[frames], video_metadata=[meta], do_sample_frames=False, return_tensors="pt")
    return out["pixel_values_videos"], out["video_grid_thw"]


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    assert torch.equal(ours, theirs.to(torch.float32)), f"max diff {(ours - theirs).abs().max().item()}"


# --------------------------------------------------------------------------------------------
# config files


def test_defaults_are_qwen35s_files():
    assert ImageProcessorConfig() == ImageProcessorConfig.from_dict(QWEN35_IMAGE_FILE)
    assert VideoProcessorConfig() == VideoProcessorConfig.from_dict(QWEN35_VIDEO_FILE)
    cfg = ImageProcessorConfig()
    assert (cfg.factor, cfg.patch_dim, cfg.min_pixels, cfg.max_pixels) == (32, 1536, 256 * 256, 4096 * 4096)
    video = VideoProcessorConfig()
    assert (video.fps, video.min_frames, video.max_frames, video.cap_pixels_per_frame) == (2.0, 4, 768, False)


def test_from_folder_follows_transformers_search_order(tmp_path: Path):
    assert ImageProcessorConfig.from_folder(tmp_path) == ImageProcessorConfig()
    assert VideoProcessorConfig.from_folder(tmp_path) == VideoProcessorConfig()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**QWEN35_IMAGE_FILE, "patch_size": 14}))
    assert ImageProcessorConfig.from_folder(tmp_path).patch_size == 14
    # without its own file the video processor reads the image file, as transformers does
    fallback = VideoProcessorConfig.from_folder(tmp_path)
    assert (fallback.patch_size, fallback.min_pixels, fallback.max_pixels) == (14, 65536, 16777216)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({**QWEN35_VIDEO_FILE, "fps": 4}))
    assert VideoProcessorConfig.from_folder(tmp_path) == VideoProcessorConfig(fps=4.0)
    # transformers v5 nests each part in processor_config.json, and that wins
    nested = {"image_processor": {**QWEN35_IMAGE_FILE, "merge_size": 1},
              "video_processor": {**QWEN35_VIDEO_FILE, "max_frames": 64}}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    assert ImageProcessorConfig.from_folder(tmp_path).merge_size == 1
    assert VideoProcessorConfig.from_folder(tmp_path).max_frames == 64


def test_legacy_pixel_keys_and_scalar_mean():
    cfg = ImageProcessorConfig.from_dict({"min_pixels": 3136, "max_pixels": 12845056, "size": {"shortest_edge": 1},
                                          "image_mean": 0.5})
    assert (cfg.min_pixels, cfg.max_pixels, cfg.image_mean) == (3136, 12845056, (0.5, 0.5, 0.5))
    assert ImageProcessorConfig.from_dict({"size": {"min_pixels": 100, "max_pixels": 200}}).max_pixels == 200


@pytest.mark.parametrize("data, words", [
    ({"patch_size": "16"}, "'patch_size' must be an integer"),
    ({"image_std": [0.5, 0, 0.5]}, "zero"),
    ({"image_mean": [0.5, 0.5]}, "three finite numbers"),
    ({"size": {"shortest_edge": 10, "longest_edge": 5}}, "above max_pixels"),
    ({"resample": 99}, "PIL filter"),
    ({"do_resize": "yes"}, "true or false"),
])
def test_bad_config_values_are_named(data, words):
    with pytest.raises(ProcessorConfigError, match=words) as info:
        ImageProcessorConfig.from_dict(data, source="my/preprocessor_config.json")
    assert "my/preprocessor_config.json" in str(info.value)


def test_unreadable_config_file(tmp_path: Path):
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ProcessorConfigError, match="preprocessor_config.json: not valid JSON"):
        ImageProcessorConfig.from_folder(tmp_path)


def test_to_dict_is_read_back_by_transformers(hf, tmp_path: Path):
    cfg = ImageProcessorConfig(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 100, image_mean=(0.4, 0.5, 0.6))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg.to_dict()))
    theirs = hf.ImageProcessor.from_pretrained(tmp_path)
    assert (theirs.size["shortest_edge"], theirs.size["longest_edge"]) == (cfg.min_pixels, cfg.max_pixels)
    assert (theirs.patch_size, theirs.merge_size, theirs.temporal_patch_size) == (16, 2, 2)
    assert tuple(theirs.image_mean) == cfg.image_mean and theirs.resample == 3
    assert ImageProcessorConfig.from_folder(tmp_path) == cfg

    video = VideoProcessorConfig(fps=3.0, max_frames=32, cap_pixels_per_frame=True)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(video.to_dict()))
    theirs_video = hf.VideoProcessor.from_pretrained(tmp_path)
    assert (theirs_video.fps, theirs_video.max_frames, theirs_video.min_frames) == (3.0, 32, 4)
    assert theirs_video.cap_pixels_per_frame is True and theirs_video.size["longest_edge"] == 25165824
    assert VideoProcessorConfig.from_folder(tmp_path) == video


# --------------------------------------------------------------------------------------------
# pictures: values equal to Qwen2VLImageProcessorPil


def _palette_with_transparency() -> Image.Image:
    image = Image.fromarray(noise(45, 70, channels=1) // 64, mode="L").convert("P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    image.info["transparency"] = 1
    return image


PICTURES = {
    "tiny, grown to min_pixels": lambda: Image.fromarray(noise(20, 30)),
    "one pixel": lambda: Image.fromarray(noise(1, 1)),
    "ordinary": lambda: Image.fromarray(noise(300, 517, seed=1)),
    "wide 1:31": lambda: Image.fromarray(noise(64, 2000, seed=2)),
    "tall 7:1": lambda: Image.fromarray(noise(700, 100, seed=3)),
    "grayscale": lambda: Image.fromarray(noise(77, 91, channels=1), mode="L"),
    "rgba": lambda: Image.fromarray(noise(77, 91, channels=4, seed=4), mode="RGBA"),
    "grey with alpha": lambda: Image.fromarray(noise(60, 50, channels=4)[..., :2].copy(), mode="LA"),
    "palette": lambda: Image.fromarray(noise(45, 70, seed=5)).convert("P"),
    "palette with transparency": _palette_with_transparency,
    "cmyk": lambda: Image.fromarray(noise(40, 40, channels=4, seed=6), mode="CMYK"),
}


@pytest.mark.parametrize("name", PICTURES)
def test_picture_equals_transformers(hf, name):
    image = PICTURES[name]()
    cfg = ImageProcessorConfig()
    pixel_values, grid = preprocess_images([image], cfg)
    theirs_values, theirs_grid = hf_images(hf, [image], cfg)
    assert grid.dtype == torch.int64 and torch.equal(grid, theirs_grid)
    assert_same(pixel_values, theirs_values)
    assert pixel_values.shape == (int(grid.prod()), 1536)


def test_large_picture_is_shrunk_to_max_pixels(hf):
    # a small bound keeps the test fast; the rule is the same as for 4096x4096
    cfg = ImageProcessorConfig(min_pixels=32 * 32, max_pixels=32 * 32 * 30)
    image = Image.fromarray(noise(600, 900, seed=7))
    pixel_values, grid = preprocess_images(image, cfg)
    theirs_values, theirs_grid = hf_images(hf, [image], cfg)
    assert torch.equal(grid, theirs_grid) and int(grid[0, 1] * grid[0, 2]) * 16 * 16 <= cfg.max_pixels
    assert_same(pixel_values, theirs_values)


def test_several_pictures_and_other_settings(hf):
    images = [Image.fromarray(noise(90, 60, seed=s)) for s in range(3)]
    cfg = ImageProcessorConfig(min_pixels=32 * 32, max_pixels=32 * 32 * 20, image_mean=(0.48145466, 0.4578275,
                               0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711), resample=2)
    pixel_values, grid = preprocess_images(images, cfg)
    theirs_values, theirs_grid = hf_images(hf, images, cfg)
    assert torch.equal(grid, theirs_grid) and grid.shape == (3, 3)
    assert_same(pixel_values, theirs_values)


def test_patch_order_is_merge_block_major():
    # a picture whose pixel value tells its patch: 64x64 with 16-pixel patches is 2x2 blocks of 2x2
    cfg = ImageProcessorConfig(min_pixels=64 * 64, do_normalize=False, do_rescale=False)
    pixels = np.zeros((64, 64, 3), np.uint8)
    for row in range(4):
        for col in range(4):
            pixels[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16] = 10 * row + col
    values, grid = preprocess_images(Image.fromarray(pixels), cfg)
    assert grid.tolist() == [[1, 4, 4]]
    order = [int(v[0]) for v in values]
    assert order == [0, 1, 10, 11, 2, 3, 12, 13, 20, 21, 30, 31, 22, 23, 32, 33]
    assert all(bool((v == v[0]).all()) for v in values)  # every patch vector is one patch, both frames


def test_smart_resize_equals_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as theirs

    for height in (1, 7, 16, 31, 48, 100, 255, 256, 333, 1000, 4095, 5000):
        for width in (3, 16, 50, 257, 1024, 4096, 9000):
            if max(height, width) / min(height, width) > 200:
                with pytest.raises(MediaError, match="200:1"):
                    smart_resize(height, width)
                continue
            expected = theirs(height, width, factor=32, min_pixels=65536, max_pixels=16777216)
            assert smart_resize(height, width) == expected
            assert image_grid_thw(height, width) == (1, expected[0] // 16, expected[1] // 16)


def test_empty_list_and_wrong_types():
    values, grid = preprocess_images([])
    assert values.shape == (0, 1536) and grid.shape == (0, 3)
    with pytest.raises(MediaError, match="image 0 is a ndarray"):
        preprocess_images([noise(10, 10)])
    with pytest.raises(MediaError, match="do_convert_rgb is off"):
        preprocess_images([Image.new("L", (40, 40))], ImageProcessorConfig(do_convert_rgb=False))


# --------------------------------------------------------------------------------------------
# loading pictures


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size but carries almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 8)  # a few bytes where width x height x 3 are due
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_sources_give_the_same_picture(tmp_path: Path):
    image = Image.fromarray(noise(33, 44))
    data = _png_bytes(image)
    path = tmp_path / "p.png"
    path.write_bytes(data)
    encoded = base64.b64encode(data).decode()
    url = "data:image/png;base64," + encoded
    wrapped = "data:image/png;base64," + "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    loaded = [load_image(s) for s in (path, str(path), data, bytearray(data), url, wrapped, image)]
    for picture in loaded:
        assert picture.mode == "RGB" and np.array_equal(np.asarray(picture), np.asarray(image))


def test_exif_orientation_is_applied_like_transformers(tmp_path: Path):
    from transformers.image_utils import load_image as theirs

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(noise(30, 50)).save(path, "JPEG", exif=exif.tobytes())
    ours = load_image(path)
    assert ours.size == (30, 50)  # stored 50 wide, shown 30 wide
    assert np.array_equal(np.asarray(ours), np.asarray(theirs(str(path))))


def test_transparency_is_composited_on_white_like_the_processor():
    from transformers.image_transforms import convert_to_rgb

    rgba = Image.fromarray(noise(20, 20, channels=4), mode="RGBA")
    ours = np.asarray(load_image(_png_bytes(rgba)))
    assert np.array_equal(ours, convert_to_rgb(rgba, return_numpy=True))
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(to_rgb(clear)).tolist() == [[[255, 255, 255]] * 4] * 4


def test_remote_urls_and_paths_can_be_refused(tmp_path: Path):
    with pytest.raises(MediaError, match="not fetched here"):
        load_image("https://example.com/cat.png")
    path = tmp_path / "p.png"
    path.write_bytes(_png_bytes(Image.new("RGB", (8, 8))))
    with pytest.raises(MediaError, match="local paths are not allowed"):
        load_image(str(path), allow_paths=False)
    assert load_image("data:image/png;base64," + base64.b64encode(path.read_bytes()).decode(), allow_paths=False)
    with pytest.raises(MediaError, match="cannot read image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(MediaError, match="is not a file"):
        load_image(tmp_path)
    with pytest.raises(MediaError, match="unsupported image source"):
        load_image(12)  # type: ignore[arg-type]


def test_byte_limits(tmp_path: Path):
    data = _png_bytes(Image.fromarray(noise(64, 64)))
    limits = MediaLimits(max_image_bytes=len(data) - 1)
    path = tmp_path / "p.png"
    path.write_bytes(data)
    for source in (data, path, "data:image/png;base64," + base64.b64encode(data).decode()):
        with pytest.raises(MediaError, match=r"over the limit of \d+ \(MediaLimits.max_image_bytes\)"):
            load_image(source, limits)


def test_pixel_limit_is_checked_before_decoding():
    header_only = _png_header_only(200, 300)  # its pixel data is missing: decoding would fail
    limit = r"200x300 = 60000 pixels, over the limit of 10000 \(MediaLimits.max_image_pixels\)"
    with pytest.raises(MediaError, match=limit):
        load_image(header_only, MediaLimits(max_image_pixels=100 * 100))
    with pytest.raises(MediaError, match="corrupt or truncated"):
        load_image(header_only)
    with pytest.raises(MediaError, match="MediaLimits.max_image_pixels"):
        load_image(_png_header_only(9000, 9000))  # 81 MP: above our limit, below Pillow's warning
    with pytest.raises(MediaError, match="too many pixels"):
        load_image(_png_header_only(30000, 30000))  # Pillow's own bomb check fires first
    with pytest.raises(MediaError, match="MediaLimits.max_image_pixels"):
        load_image(Image.new("RGB", (200, 100)), MediaLimits(max_image_pixels=10000))


def test_corrupt_pictures_give_clear_errors():
    jpeg = io.BytesIO()
    Image.fromarray(noise(256, 256)).save(jpeg, "JPEG")
    with pytest.raises(MediaError, match="corrupt or truncated .*JPEG 256x256"):
        load_image(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    with pytest.raises(MediaError, match="not an image format Pillow can read"):
        load_image(b"definitely not a picture")
    with pytest.raises(MediaError, match="invalid base64"):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(MediaError, match="not base64-encoded"):
        load_image("data:image/png,rawdata")


def test_media_limits_must_be_positive():
    with pytest.raises(ValueError, match="MediaLimits.max_video_frames must be a positive integer"):
        MediaLimits(max_video_frames=0)


# --------------------------------------------------------------------------------------------
# prompt placeholders


def test_expansion_equals_qwen3vl_processor(hf):
    images = [Image.fromarray(noise(40, 50)), Image.fromarray(noise(300, 200, seed=1))]
    video = load_video([Image.fromarray(f) for f in moving_colours(16)], source_fps=8.0)
    cfg, video_cfg = ImageProcessorConfig(), VideoProcessorConfig()
    image_values, image_grid = preprocess_images(images, cfg)
    video_values, video_grid, timestamps = preprocess_video(video, video_cfg)
    prompt = ("<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>and a clip "
              "<|vision_start|><|video_pad|><|vision_end|> and <|vision_start|><|image_pad|><|vision_end|>"
              "what changed?<|im_end|>\n<|im_start|>assistant\n")
    ours = expand_placeholders(prompt, image_grid, video_grid, [timestamps], merge_size=2)

    processor = hf.Processor(image_processor=hf.ImageProcessor(**cfg.to_dict()), tokenizer=hf.tokenizer,
                             video_processor=hf.VideoProcessor(**video_cfg.to_dict()))
    meta = {"total_num_frames": 16, "fps": 8.0, "frames_indices": list(video.frame_indices)}
    out = processor(text=[prompt], images=images, videos=[video.frames], video_metadata=[meta],
                    do_sample_frames=False, return_text_replacement_offsets=True)
    theirs, last = [], 0
    for entry in out["text_replacement_offsets"][0]:
        theirs += [prompt[last:entry["span"][0]], entry["replacement"]]
        last = entry["span"][1]
    theirs.append(prompt[last:])
    assert ours == "".join(theirs)
    assert hf.tokenizer(ours)["input_ids"] == out["input_ids"][0]
    assert_same(image_values, torch.as_tensor(out["pixel_values"]))
    assert_same(video_values, torch.as_tensor(out["pixel_values_videos"]))
    assert "<0.3 seconds><|vision_start|>" + "<|video_pad|>" * 4 + "<|vision_end|><1.6 seconds>" in ours


def test_expansion_counts_and_errors():
    grid = torch.tensor([[1, 4, 6]])
    assert count_vision_tokens(grid[0]) == 6 and count_vision_tokens((2, 4, 4), merge_size=2) == 8
    assert count_vision_tokens([np.int64(1), 2, 2], merge_size=1) == 4
    assert expand_placeholders("a<|image_pad|>b", grid) == "a" + "<|image_pad|>" * 6 + "b"
    assert expand_placeholders("no media") == "no media"
    with pytest.raises(MediaError, match="2 <\\|image_pad\\|> placeholders but 1 images"):
        expand_placeholders("<|image_pad|><|image_pad|>", grid)
    with pytest.raises(MediaError, match="1 <\\|video_pad\\|> placeholders but 0 videos"):
        expand_placeholders("<|video_pad|>")
    with pytest.raises(MediaError, match="2 temporal patches but 1 timestamps"):
        expand_placeholders("<|video_pad|>", video_grid_thw=[[2, 2, 2]], video_timestamps=[[0.5]])
    with pytest.raises(ValueError, match="three positive integers"):
        count_vision_tokens((1, 0, 2))
    with pytest.raises(ValueError, match="not divisible by merge_size"):
        count_vision_tokens((1, 3, 2))


# --------------------------------------------------------------------------------------------
# video


@pytest.fixture(scope="module")
def mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 s at 8 frames per second, 64x48."""
    av = pytest.importorskip("av", reason="PyAV (pip install av) writes and reads the test video")
    path = tmp_path_factory.mktemp("video") / "colours.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in moving_colours(16):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def gif_bytes() -> bytes:
    frames = [Image.fromarray(f) for f in moving_colours(16)]
    buffer = io.BytesIO()
    # GIF stores centiseconds: 100 ms a frame is exactly 10 frames per second
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def _hf_sampler(hf, cfg: VideoProcessorConfig, **kwargs):
    return functools.partial(hf.VideoProcessor(**cfg.to_dict()).sample_frames, **kwargs)


@pytest.mark.parametrize("cfg, sampling", [
    (VideoProcessorConfig(), {}),
    (VideoProcessorConfig(), {"fps": 4.0}),
    (VideoProcessorConfig(), {"num_frames": 3}),  # an odd count: the last frame is repeated
    (VideoProcessorConfig(max_pixels=32 * 32 * 4, cap_pixels_per_frame=True), {"num_frames": 8}),
    (VideoProcessorConfig(min_pixels=128 * 128 * 4), {}),  # grown above the source size
])
def test_video_file_equals_transformers(hf, mp4, cfg, sampling):
    fps = sampling.get("fps", None if "num_frames" in sampling else cfg.fps)
    sampler = _hf_sampler(hf, cfg, fps=fps, num_frames=sampling.get("num_frames"))
    frames, meta = hf.read_video_pyav(str(mp4), sampler)
    video = load_video(mp4, cfg, **sampling)
    assert video.frame_indices == tuple(meta.frames_indices.tolist())
    assert (video.source_fps, video.total_frames, video.source_size) == (8.0, 16, (48, 64))
    values, grid, timestamps = preprocess_video(video, cfg)
    theirs_values, theirs_grid = hf_video(hf, frames, 8.0, meta.frames_indices, cfg)
    assert torch.equal(grid, theirs_grid)
    assert_same(values, theirs_values)
    calculate = hf.Processor._calculate_timestamps
    assert timestamps == calculate(None, list(meta.frames_indices), 8.0, cfg.temporal_patch_size)


def test_raw_frames_are_resized_in_preprocess(hf, mp4):
    cfg = VideoProcessorConfig()
    frames, meta = hf.read_video_pyav(str(mp4), _hf_sampler(hf, cfg, fps=2.0))
    raw = VideoFrames(frames=frames, frame_indices=tuple(meta.frames_indices.tolist()), source_fps=8.0,
                      total_frames=16, source_size=(48, 64))
    values, grid, _ = preprocess_video(raw, cfg)
    assert grid.tolist() == [[2, 4, 4]]
    assert torch.equal(values, preprocess_video(load_video(mp4, cfg), cfg)[0])
    with pytest.raises(MediaError, match="neither the source size"):
        preprocess_video(VideoFrames(frames=frames[:, :40], frame_indices=raw.frame_indices, source_fps=8.0,
                                     total_frames=16, source_size=(48, 64)), cfg)


def test_gif_is_a_video(hf, gif_bytes, tmp_path: Path):
    cfg = VideoProcessorConfig()
    path = tmp_path / "colours.gif"
    path.write_bytes(gif_bytes)
    url = "data:image/gif;base64," + base64.b64encode(gif_bytes).decode()
    videos = [load_video(s, cfg) for s in (path, gif_bytes, url, Image.open(io.BytesIO(gif_bytes)))]
    video = videos[0]
    assert (video.source_fps, video.total_frames, video.frame_indices) == (10.0, 16, (0, 5, 10, 15))
    assert all(np.array_equal(v.frames, video.frames) for v in videos)
    gif = Image.open(io.BytesIO(gif_bytes))
    frames = []
    for i in video.frame_indices:
        gif.seek(i)
        frames.append(np.asarray(gif.convert("RGB")))
    values, grid, _ = preprocess_video(video, cfg)
    theirs_values, theirs_grid = hf_video(hf, np.stack(frames), 10.0, video.frame_indices, cfg)
    assert torch.equal(grid, theirs_grid)
    assert_same(values, theirs_values)


def test_frame_list_is_sampled_like_transformers(hf):
    frames = [Image.fromarray(f) for f in moving_colours(48)]
    cfg = VideoProcessorConfig()
    video = load_video(frames, cfg)  # no rate given: transformers' 24 frames per second
    processor = hf.VideoProcessor(**cfg.to_dict())
    out = processor(videos=[frames], return_tensors="pt", return_metadata=True)
    assert video.frame_indices == tuple(out["video_metadata"][0].frames_indices.tolist())
    values, grid, _ = preprocess_video(video, cfg)
    assert torch.equal(grid, out["video_grid_thw"])
    assert_same(values, out["pixel_values_videos"])
    arrays = load_video([np.asarray(f) for f in frames], cfg)
    assert np.array_equal(arrays.frames, video.frames)


def test_single_frame_video_is_one_temporal_patch():
    video = load_video([Image.fromarray(noise(64, 64))], VideoProcessorConfig())
    values, grid, timestamps = preprocess_video(video)
    assert grid.tolist() == [[1, 4, 4]] and timestamps == [0.0] and values.shape == (16, 1536)


def test_sampling_equals_transformers(hf):
    from transformers.video_utils import VideoMetadata

    cfg = VideoProcessorConfig()
    processor = hf.VideoProcessor(**cfg.to_dict())
    for total in (1, 2, 3, 5, 16, 17, 100, 241, 1000, 7201):
        for source_fps in (1.0, 8.0, 23.976, 30.0, 60.0):
            for fps in (0.5, 2.0, 3.0):
                theirs = processor.sample_frames(VideoMetadata(total_num_frames=total, fps=source_fps), fps=fps)
                assert sample_frame_indices(total, source_fps, fps=fps) == theirs.tolist()
            for count in (1, 4, 9):
                if count <= total:
                    theirs = processor.sample_frames(VideoMetadata(total_num_frames=total, fps=source_fps),
                                                     num_frames=count)
                    assert sample_frame_indices(total, source_fps, fps=None, num_frames=count) == theirs.tolist()
    assert len(sample_frame_indices(100000, 30.0, fps=2.0)) == 768
    assert sample_frame_indices(100, 10.0, fps=None, num_frames=500) == list(range(100))
    with pytest.raises(MediaError, match="give one, not both"):
        sample_frame_indices(10, 10.0, fps=2.0, num_frames=3)


def test_video_resize_and_timestamps_equal_transformers(hf):
    module = sys.modules[hf.VideoProcessor.__module__]
    for frames in (2, 3, 4, 7, 64, 768):
        for height, width in ((48, 64), (10, 300), (1080, 1920), (31, 31), (4000, 30)):
            expected = module.smart_resize(frames, height, width, temporal_factor=2, factor=32, min_pixels=4096,
                                           max_pixels=25165824)
            assert smart_resize_video(frames, height, width) == expected
    calculate = hf.Processor._calculate_timestamps
    for indices in ([0, 5, 10, 15], [0, 7, 15], [3], list(range(0, 300, 7))):
        assert frame_timestamps(indices, 29.97) == calculate(None, list(indices), 29.97, 2)


def test_video_limits_and_errors(mp4, gif_bytes, tmp_path: Path):
    with pytest.raises(MediaError, match=r"16 frames, over the limit of 10 \(MediaLimits.max_video_frames\)"):
        load_video(mp4, limits=MediaLimits(max_video_frames=10))
    with pytest.raises(MediaError, match=r"16 frames, over the limit of 10 \(MediaLimits.max_video_frames\)"):
        load_video(gif_bytes, limits=MediaLimits(max_video_frames=10))
    with pytest.raises(MediaError, match="MediaLimits.max_video_bytes"):
        load_video(mp4, limits=MediaLimits(max_video_bytes=100))
    with pytest.raises(MediaError, match=r"64x48 = 3072 pixels, over the limit of 1000"):
        load_video(mp4, limits=MediaLimits(max_image_pixels=1000))
    with pytest.raises(MediaError, match="could not be opened as a video"):
        load_video(b"\0" * 4096)
    with pytest.raises(MediaError, match="frames change size"):
        load_video([Image.new("RGB", (64, 64)), Image.new("RGB", (32, 64))], num_frames=2)
    with pytest.raises(MediaError, match="frame 1: .*not an image format"):
        load_video([Image.new("RGB", (64, 64)), b"junk"], num_frames=2)
    with pytest.raises(MediaError, match="not fetched here"):
        load_video("http://example.com/v.mp4")
    playlist = tmp_path / "list.m3u8"  # FFmpeg would open the files a playlist names
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{mp4}\n#EXT-X-ENDLIST\n")
    with pytest.raises(MediaError, match="playlists are not"):
        load_video(playlist)


def test_missing_pyav_names_the_package(monkeypatch, mp4):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` fail
    with pytest.raises(ImportError, match="pip install av"):
        load_video(mp4)


# --------------------------------------------------------------------------------------------
# content hash


def test_media_hash_is_stable_and_content_keyed(tmp_path: Path):
    values = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    digest = media_hash(values, [[1, 1, 2]])
    assert digest == media_hash(values.clone(), torch.tensor([[1, 1, 2]]))
    # pinned: the hash must not change between processes, machines or releases of this code
    assert digest == "7ee9cf473082c0ef399c1159a64711d1e783f463b3103fa9be90e13ca0dd9658"
    assert media_hash(values, [[1, 2, 1]]) != digest
    changed = values.clone()
    changed[1, 5] = 11.5
    assert media_hash(changed, [[1, 1, 2]]) != digest
    assert media_hash(values.to(torch.float64), [[1, 1, 2]]) != digest
    image = Image.fromarray(noise(40, 40))
    data = _png_bytes(image)
    path = tmp_path / "p.png"
    path.write_bytes(data)
    hashes = {media_hash(*preprocess_images(load_image(s))) for s in (data, path)}
    assert len(hashes) == 1
