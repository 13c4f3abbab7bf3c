"""The vision tower and images / videos in the model, against transformers in float32 (random weights)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import qwen35
from qwen35.checkpoint import CheckpointError
from qwen35.config import ConfigError, VisionConfig, config_from_dict
from qwen35.model import SequenceCache
from qwen35.model.context import dense_context
from qwen35.model.mrope import mrope_positions
from qwen35.model.vision import VisionGrid, VisionTower, merge_block_order
from tests.hf_oracle import build_hf, save_hf

# token ids inside the oracle's 160-token vocabulary (transformers' defaults, 248056…, are past its end)
IMAGE, VIDEO, START, END = 150, 151, 152, 153
TEXT_VOCAB = 150  # random text ids stay below the special ids

TOWER = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4, temporal_patch_size=2,
             num_position_embeddings=36, out_hidden_size=40)  # a 6x6 learned grid: images both larger and smaller
TEXT = dict(model_type="qwen3_5_text", vocab_size=160, hidden_size=40, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, intermediate_size=64)

GRIDS = {
    "one-image": [[1, 6, 10]],
    "two-images": [[1, 4, 4], [1, 10, 6]],
    "video": [[3, 4, 6]],
    "mixed-non-square": [[1, 2, 2], [2, 8, 4], [1, 12, 14]],
}


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= rel * scale, f"max|Δ| {err:.3g} > {rel} × scale {scale:.3g}"


def _vision_config(**kw) -> VisionConfig:
    body = {"model_type": "qwen3_5", "text_config": TEXT, "vision_config": kw}
    return config_from_dict(body).vision


def _hf_tower(**kw):
    import transformers as tf

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = tf.Qwen3_5VisionModel(tf.Qwen3_5VisionConfig(**kw)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.05))
    ours = VisionTower(_vision_config(**kw)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # the same names: loading is a prefix change
    return hf, ours


def _pixels(cfg: VisionConfig, grid_thw, seed: int = 0) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grid_thw)
    return torch.randn(n, cfg.patch_dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def towers():
    return _hf_tower(**TOWER)


# ------------------------------------------------------------------------------------------------------------
# the tower alone


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_tower_matches_transformers(towers, name):
    hf, ours = towers
    grid = torch.tensor(GRIDS[name])
    pixels = _pixels(ours.config, GRIDS[name])
    with torch.no_grad():
        want = hf(pixels, grid_thw=grid).pooler_output  # 5.23 returns the merger output as pooler_output
        got = ours(pixels, grid)
    assert got.shape == (grid.prod(-1).sum() // 4, TOWER["out_hidden_size"])
    assert_close(got, want)


def test_exact_gelu_tower_matches_transformers():
    hf, ours = _hf_tower(**dict(TOWER, hidden_act="gelu", depth=1))
    grid = torch.tensor([[1, 4, 8]])
    pixels = _pixels(ours.config, [[1, 4, 8]])
    with torch.no_grad():
        assert_close(ours(pixels, grid), hf(pixels, grid_thw=grid).pooler_output)


@pytest.mark.parametrize("rows, cols", [(2, 2), (6, 6), (4, 10), (14, 8)])
def test_learned_positions_are_bilinear_align_corners_in_block_order(towers, rows, cols):
    _, ours = towers
    side, d = ours.config.position_grid_side, ours.config.hidden_size
    table = ours.pos_embed.weight.detach()
    grid_img = table.T.reshape(1, d, side, side)
    want = F.interpolate(grid_img, size=(rows, cols), mode="bilinear", align_corners=True)[0]  # [d, rows, cols]
    r, c = merge_block_order(rows, cols, ours.config.spatial_merge_size)
    got = ours._positions([VisionGrid(2, rows, cols)])
    torch.testing.assert_close(got, want[:, r, c].T.repeat(2, 1), atol=1e-6, rtol=1e-5)


def test_tower_rejects_inputs_that_do_not_fit(towers):
    _, ours = towers
    pixels = _pixels(ours.config, [[1, 4, 4]])
    with pytest.raises(ValueError, match="pixel_values must be"):
        ours(pixels[:, :-1], torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="16 patches but grid_thw describes 24"):
        ours(pixels, torch.tensor([[1, 4, 6]]))
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        ours(pixels[:15], torch.tensor([[1, 3, 5]]))


# ------------------------------------------------------------------------------------------------------------
# the config


def test_config_reads_transformers_defaults_and_writes_back():
    import transformers as tf

    v = _vision_config()
    assert v == VisionConfig(out_hidden_size=TEXT["hidden_size"])  # transformers' defaults, at the text width
    hf_defaults = tf.Qwen3_5VisionConfig()
    for f in ("depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads", "in_channels", "patch_size",
              "spatial_merge_size", "temporal_patch_size", "num_position_embeddings", "initializer_range"):
        assert getattr(v, f) == getattr(hf_defaults, f), f
    c = config_from_dict({"model_type": "qwen3_5_moe", "text_config": dict(
        {k: val for k, val in TEXT.items() if k != "intermediate_size"}, model_type="qwen3_5_moe_text",
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=8),
        "vision_config": dict(TOWER, patch_size=[4, 4], deepstack_visual_indexes=[])})
    body = c.to_dict()
    assert config_from_dict(body).vision == c.vision and c.vision.patch_size == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = tf.Qwen3_5MoeConfig(**body)
    for f, want in TOWER.items():
        assert getattr(hf.vision_config, f) == want, f


def test_transformers_saved_config_parses_without_warnings(tmp_path):
    path = save_hf(build_hf(moe=False, multimodal=True), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = qwen35.config.load_config(path)
    assert c.vision.depth == 1 and c.vision.hidden_size == 32 and c.vision.rope_theta == 10_000.0


@pytest.mark.parametrize("change, field", [
    (dict(num_position_embeddings=50), "num_position_embeddings"),
    (dict(hidden_act="relu"), "hidden_act"),
    (dict(out_hidden_size=64), "out_hidden_size"),
    (dict(num_heads=3), "num_heads"),
    (dict(hidden_size=24, num_heads=4), "num_heads"),
    (dict(patch_size=[16, 14]), "patch_size"),
    (dict(depth=0), "depth"),
    (dict(rope_parameters=dict(rope_type="default")), "rope_parameters.rope_type"),
])
def test_bad_vision_config_names_the_field(change, field):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model_type": "qwen3_5", "text_config": TEXT, "vision_config": dict(TOWER, **change)},
                         "x/config.json")
    assert f"'vision_config.{field}'" in str(e.value) and "x/config.json" in str(e.value)
    with pytest.raises(ConfigError, match="'vision_config' must be an object"):
        config_from_dict({"model_type": "qwen3_5", "text_config": TEXT, "vision_config": "big"})


# ------------------------------------------------------------------------------------------------------------
# the whole model


def _oracle(moe: bool, tie: bool = False):
    ref = build_hf(moe, multimodal=True, tie=tie)
    ref.config.image_token_id, ref.config.video_token_id = IMAGE, VIDEO
    ref.config.vision_start_token_id, ref.config.vision_end_token_id = START, END
    return ref


@pytest.fixture(scope="module", params=["dense", "moe"])
def pair(request, tmp_path_factory):
    ref = _oracle(request.param == "moe")
    path = save_hf(ref, tmp_path_factory.mktemp(request.param))
    return ref, qwen35.load_model(path, dtype="float32"), path


class Prompt:
    """Token ids with image and video blocks as the processor lays them out, and matching random pixels."""

    def __init__(self, seed: int = 0, images=((1, 4, 6), (1, 8, 4)), video=(2, 4, 4), text=(5, 3, 2, 4)):
        g = torch.Generator().manual_seed(seed)

        def txt(n):
            return torch.randint(0, TEXT_VOCAB, (n,), generator=g).tolist()

        ids = txt(text[0])
        for t, h, w in images:
            ids += [START] + [IMAGE] * (t * h * w // 4) + [END] + txt(text[1])
        if video is not None:
            t, h, w = video
            for _ in range(t):  # one block per frame, a timestamp (text) before each
                ids += txt(text[2]) + [START] + [VIDEO] * (h * w // 4) + [END]
        ids += txt(text[3])
        self.ids = torch.tensor([ids])
        self.vision = {}
        patch_dim = 3 * 2 * 16 * 16
        if images:
            self.vision["pixel_values"] = torch.randn(sum(t * h * w for t, h, w in images), patch_dim, generator=g)
            self.vision["image_grid_thw"] = torch.tensor(images)
        if video is not None:
            self.vision["pixel_values_videos"] = torch.randn(video[0] * video[1] * video[2], patch_dim, generator=g)
            self.vision["video_grid_thw"] = torch.tensor([video])


def hf_logits_mm(ref, ids: torch.Tensor, attention_mask=None, **vision) -> torch.Tensor:
    mm = (ids == IMAGE).long() + 2 * (ids == VIDEO).long()
    with torch.no_grad():
        return ref(input_ids=ids, attention_mask=attention_mask, mm_token_type_ids=mm, **vision).logits


def test_logits_with_images_and_video_match_transformers(pair):
    ref, ours, _ = pair
    p = Prompt()
    with torch.no_grad():
        got = ours(p.ids, **p.vision).logits
    want = hf_logits_mm(ref, p.ids, **p.vision)
    assert_close(got, want, 1e-4)
    # the comparison can fail: the pixels and the 3-D positions both move the logits
    with torch.no_grad():
        assert (ours(p.ids).logits - want).abs().max() > 1e-2
        text_positions = torch.arange(p.ids.shape[1])[None]
        assert (ours(p.ids, position_ids=text_positions, **p.vision).logits - want).abs().max() > 1e-3


def test_images_only_and_video_only_match_transformers(pair):
    ref, ours, _ = pair
    for p in (Prompt(1, images=((1, 2, 2),), video=None), Prompt(2, images=(), video=(3, 2, 6))):
        with torch.no_grad():
            assert_close(ours(p.ids, **p.vision).logits, hf_logits_mm(ref, p.ids, **p.vision), 1e-4)


def test_engine_path_embed_then_hidden_states_equals_forward(pair):
    """What the engine runs: encode in prompt order, embed, M-RoPE positions, the stack under a context."""
    _, ours, _ = pair
    p = Prompt(3, images=((1, 4, 4),), video=(2, 2, 2))
    with torch.no_grad():
        # the image comes first in the prompt, then the video: concatenate in that order
        rows = torch.cat([ours.encode_vision(p.vision["pixel_values"], p.vision["image_grid_thw"]),
                          ours.encode_vision(p.vision["pixel_values_videos"], p.vision["video_grid_thw"])])
        embeds = ours.embed(p.ids, rows)
        pos, delta = mrope_positions(p.ids[0], p.vision["image_grid_thw"], p.vision["video_grid_thw"], IMAGE, VIDEO,
                                     ours.config.vision.spatial_merge_size)
        ctx, _ = dense_context(ours.rope, p.ids, position_ids=pos[:, None, :], dtype=ours.dtype)
        h = ours.hidden_states(p.ids, ctx, inputs_embeds=embeds)
        assert torch.equal(ours.compute_logits(h), ours(p.ids, **p.vision).logits)
        assert h.shape[:2] == p.ids.shape and delta < 0


def test_decode_after_images_continues_at_rope_delta(pair):
    ref, ours, _ = pair
    p = Prompt(4)
    g = torch.Generator().manual_seed(5)
    tail = torch.randint(0, TEXT_VOCAB, (1, 3), generator=g)
    full = torch.cat([p.ids, tail], 1)
    want = hf_logits_mm(ref, full, **p.vision)
    with torch.no_grad():
        cache = SequenceCache()
        parts = [ours(p.ids, cache=cache, **p.vision).logits]
        parts += [ours(tail[:, i:i + 1], cache=cache).logits for i in range(tail.shape[1])]
    assert_close(torch.cat(parts, 1), want, 1e-4)


def test_left_padded_batch_with_images_rows_equal_transformers_solo(pair):
    ref, ours, _ = pair
    prompts = [Prompt(6, images=((1, 4, 6),), video=None), Prompt(7, images=((1, 2, 2), (1, 4, 4)), video=(2, 2, 4))]
    L = max(p.ids.shape[1] for p in prompts)
    ids = torch.zeros(2, L, dtype=torch.long)
    mask = torch.zeros(2, L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - p.ids.shape[1]:] = p.ids[0]
        mask[i, L - p.ids.shape[1]:] = 1
    vision = dict(pixel_values=torch.cat([p.vision["pixel_values"] for p in prompts]),
                  image_grid_thw=torch.cat([p.vision["image_grid_thw"] for p in prompts]),
                  pixel_values_videos=prompts[1].vision["pixel_values_videos"],
                  video_grid_thw=prompts[1].vision["video_grid_thw"])
    with torch.no_grad():
        batch = ours(ids, attention_mask=mask, **vision).logits
    for i, p in enumerate(prompts):
        assert_close(batch[i, L - p.ids.shape[1]:], hf_logits_mm(ref, p.ids, **p.vision)[0], 1e-4)


def test_checkpoint_roundtrip_with_visual_weights(pair, tmp_path):
    import transformers  # noqa: F401

    ref, ours, src = pair
    assert ours.visual is not None and ours.extra_tensors == {}
    ours.save_pretrained(tmp_path)
    written, original = load_file(str(tmp_path / "model.safetensors")), load_file(str(src / "model.safetensors"))
    visual = {k for k in original if k.startswith("model.visual.")}
    assert visual and {k for k in written if k.startswith("model.visual.")} == visual
    for k in visual:
        assert torch.equal(written[k], original[k]), k
    again = qwen35.load_model(tmp_path, dtype="float32")
    p = Prompt(8)
    with torch.no_grad():
        a = ours(p.ids, **p.vision).logits
        assert torch.equal(again(p.ids, **p.vision).logits, a)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            back = type(ref).from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert_close(hf_logits_mm(back, p.ids, **p.vision), a, 1e-4)


def test_bfloat16_model_takes_images_as_precisely_as_transformers(pair):
    """In bf16 both round differently from the float32 truth; ours stays within 1.5x transformers' own bf16
    error plus 2% of the logit scale (as the text parity tests ask)."""
    import copy

    ref, ours, path = pair
    bf = qwen35.load_model(path, dtype="bfloat16")
    assert bf.visual.dtype == torch.bfloat16
    p = Prompt(9)
    with torch.no_grad():
        truth = ours(p.ids, **p.vision).logits
        ours_err = (bf(p.ids, **p.vision).logits.float() - truth).abs().max().item()
    hf_err = (hf_logits_mm(copy.deepcopy(ref).to(torch.bfloat16), p.ids, **p.vision).float() - truth).abs().max()
    assert ours_err <= 1.5 * hf_err.item() + 0.02 * truth.abs().max().item()


# ------------------------------------------------------------------------------------------------------------
# errors


def test_pad_count_mismatch_is_a_clear_error(pair):
    _, ours, _ = pair
    p = Prompt(10, images=((1, 4, 4),), video=None)
    rows = ours.encode_vision(p.vision["pixel_values"], p.vision["image_grid_thw"])
    with pytest.raises(ValueError, match=r"hold 4 image/video pad tokens .* vision_embeds has shape \(3, "):
        ours.embed(p.ids, rows[:3])
    with pytest.raises(ValueError, match="pad tokens of id 150 but pixel_values"):
        ours(p.ids[:, :8], pixel_values=p.vision["pixel_values"], image_grid_thw=p.vision["image_grid_thw"])
    with pytest.raises(ValueError, match="needs image_grid_thw"):
        ours(p.ids, pixel_values=p.vision["pixel_values"])


def test_text_only_model_given_pixels_says_it_has_no_tower(tmp_path):
    ours = qwen35.load_model(save_hf(build_hf(moe=False, multimodal=False), tmp_path), dtype="float32")
    assert ours.visual is None
    p = Prompt(11, images=((1, 2, 2),), video=None)
    with pytest.raises(ValueError, match="no vision tower .*no vision_config"):
        ours(p.ids, **p.vision)
    with pytest.raises(ValueError, match="no vision tower"):
        ours.encode_vision(p.vision["pixel_values"], p.vision["image_grid_thw"])


def test_multimodal_folder_without_visual_weights_is_text_only(pair, tmp_path):
    _, ours, src = pair
    t = {k: v for k, v in load_file(str(src / "model.safetensors")).items() if not k.startswith("model.visual.")}
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    save_file(t, str(tmp_path / "model.safetensors"))
    m = qwen35.load_model(tmp_path, dtype="float32")
    assert m.visual is None and m.config.vision is not None
    ids = Prompt(12).ids
    with torch.no_grad():
        assert torch.equal(m(ids).logits, ours(ids).logits)
    with pytest.raises(ValueError, match="no model.visual"):
        m(ids, **Prompt(12).vision)
    # a partial tower is an error, never a half-random one
    partial = dict(t)
    partial["model.visual.pos_embed.weight"] = ours.visual.pos_embed.weight.detach().clone()
    save_file(partial, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor.*visual"):
        qwen35.load_model(tmp_path, dtype="float32")
