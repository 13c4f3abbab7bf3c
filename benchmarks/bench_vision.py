"""Picture encoding: qwen35's vision tower and preprocessing against transformers', side by side in one run.

For each tower size (``--towers``: the official 0.8B tower, depth 12 / width 768, and the 9B-and-up one, depth 27 /
width 1152; random weights, the same in both) and each input (a 448x448 picture, a 1024x1024 picture, a 16-frame
448x448 video), prints the seconds to preprocess (qwen35.chat.media / video vs transformers' PIL image processor;
the video processor of transformers needs torchvision, which this project's torch cannot import, so its video
preprocessing is not timed) and to encode (``VisionTower`` vs ``Qwen3_5VisionModel``), median of --reps runs, with
the ratio, and checks that both towers give the same features.

  python benchmarks/bench_vision.py [--towers 0.8B,9B] [--dtype float32|bfloat16] [--threads 2] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import numpy as np
import torch
from PIL import Image

TOWERS = {"0.8B": "Qwen3.5-0.8B", "9B": "Qwen3.5-9B"}


def _time(fn, reps: int) -> float:
    fn()  # warm-up (allocations, first-call costs)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _time_pair(ours, theirs, reps: int) -> tuple[float, float]:
    """Median seconds of each, the two called alternately so that a busy machine slows both alike."""
    ours(), theirs()
    a, b = [], []
    for _ in range(reps):
        for fn, out in ((ours, a), (theirs, b)):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return statistics.median(a), statistics.median(b)


def _pictures(seed: int = 0):
    rng = np.random.default_rng(seed)

    def img(size):
        # smooth colour fields plus noise: JPEG-like content, not pure noise
        y, x = np.mgrid[0:size, 0:size] / size
        base = np.stack([np.sin(6 * x), np.cos(5 * y), np.sin(4 * (x + y))], -1) * 100 + 128
        return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8), "RGB")

    return {"image 448x448": [img(448)], "image 1024x1024": [img(1024)],
            "video 16 x 448x448": [img(448) for _ in range(16)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--towers", default="0.8B,9B", help="comma-separated: 0.8B, 9B")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)

    import transformers as tf
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from qwen35.chat.media import (
        ImageProcessorConfig,
        VideoProcessorConfig,
        preprocess_images,
    )
    from qwen35.chat.video import VideoFrames, preprocess_video
    from qwen35.model.vision import VisionTower
    from qwen35.presets import preset_config

    image_cfg, video_cfg = ImageProcessorConfig(), VideoProcessorConfig()
    hf_processor = Qwen2VLImageProcessorPil(min_pixels=image_cfg.min_pixels, max_pixels=image_cfg.max_pixels,
                                            patch_size=16, temporal_patch_size=2, merge_size=2,
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    inputs = {}
    rows = []
    for name, pics in _pictures().items():
        if name.startswith("video"):
            frames = VideoFrames(np.stack([np.asarray(p) for p in pics]), list(range(len(pics))), 2.0, len(pics),
                                 pics[0].size)
            ours_pre = _time(lambda: preprocess_video(frames, video_cfg), a.reps)
            pv, grid, _ = preprocess_video(frames, video_cfg)
            hf_pre = None
        else:
            ours_pre, hf_pre = _time_pair(lambda: preprocess_images(pics, image_cfg),
                                          lambda: hf_processor(images=pics, return_tensors="pt"), a.reps)
            pv, grid = preprocess_images(pics, image_cfg)
        inputs[name] = (pv, grid)
        rows.append(("preprocess", "-", name, ours_pre, hf_pre))

    for tower in a.towers.split(","):
        vcfg = preset_config(TOWERS[tower]).vision
        torch.manual_seed(0)
        ours = VisionTower(vcfg).to(dtype).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf_cfg = tf.Qwen3_5VisionConfig(**{k: v for k, v in vcfg.to_dict("qwen3_5").items()
                                               if k not in ("deepstack_visual_indexes", "model_type")})
            hf = tf.models.qwen3_5.modeling_qwen3_5.Qwen3_5VisionModel._from_config(hf_cfg).to(dtype).eval()
        missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
        if missing or unexpected:
            print(f"weights do not line up: missing {missing[:3]}, unexpected {unexpected[:3]}", file=sys.stderr)
            return 1
        for name, (pv, grid) in inputs.items():
            x = pv.to(dtype)
            with torch.inference_mode():
                mine = ours(x, grid)
                theirs = hf(x, grid_thw=grid)
                theirs = getattr(theirs, "pooler_output", theirs)
                if isinstance(theirs, (tuple, list)):
                    theirs = theirs[0]
                err = float((mine.float() - theirs.float()).abs().max() / theirs.float().abs().max())
                t_ours, t_hf = _time_pair(lambda: ours(x, grid), lambda: hf(x, grid_thw=grid), a.reps)
            rows.append((f"encode ({tower} tower)", f"{err:.1e}", f"{name}: {grid.tolist()[0]} -> {mine.shape[0]} tokens",
                         t_ours, t_hf))

    print(f"\n{a.dtype}, {torch.get_num_threads()} threads, median of {a.reps}\n")
    print("| step | input | qwen35 (s) | transformers (s) | transformers / qwen35 | max rel. diff |")
    print("|---|---|---:|---:|---:|---:|")
    for step, err, name, t_ours, t_hf in rows:
        ratio = f"{t_hf / t_ours:.2f}x" if t_hf else "–"
        print(f"| {step} | {name} | {t_ours:.3f} | {t_hf:.3f} | {ratio} | {err} |" if t_hf else
              f"| {step} | {name} | {t_ours:.3f} | – | {ratio} | {err} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
