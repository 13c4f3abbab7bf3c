"""M-RoPE position ids of prompts with images and videos, against transformers' ``get_rope_index``."""

from __future__ import annotations

import pytest
import torch

from qwen35.model.mrope import mrope_positions, mrope_positions_batch
from tests.hf_oracle import build_hf

IMAGE, VIDEO, START, END = 150, 151, 152, 153
MERGE = 2


@pytest.fixture(scope="module")
def hf():
    return build_hf(moe=False, multimodal=True).model  # Qwen3_5Model: get_rope_index reads its merge size


def _hf_rope_index(hf, ids: torch.Tensor, image_grid_thw=None, video_grid_thw=None, attention_mask=None):
    mm = (ids == IMAGE).long() + 2 * (ids == VIDEO).long()
    # get_rope_index splits video grids in place: give it a copy
    video = video_grid_thw.clone() if video_grid_thw is not None else None
    pos, deltas = hf.get_rope_index(ids, mm, image_grid_thw, video, attention_mask)
    return pos, deltas.flatten()


def _prompt(seed: int, blocks: list, lead: int = 3, between: int = 2, tail: int = 4):
    """Text, then per block ('image' | 'video', (t, h, w)) its pad tokens between START/END; a video gives one
    block per frame, each after a timestamp."""
    g = torch.Generator().manual_seed(seed)

    def txt(n):
        return torch.randint(0, IMAGE, (n,), generator=g).tolist()

    ids, images, videos = txt(lead), [], []
    for kind, (t, h, w) in blocks:
        if kind == "image":
            ids += [START] + [IMAGE] * (t * h * w // MERGE ** 2) + [END] + txt(between)
            images.append((t, h, w))
        else:
            for _ in range(t):
                ids += txt(between) + [START] + [VIDEO] * (h * w // MERGE ** 2) + [END]
            videos.append((t, h, w))
    ids += txt(tail)
    return (torch.tensor(ids), torch.tensor(images) if images else None, torch.tensor(videos) if videos else None)


CASES = {
    "text-only": [],
    "one-image": [("image", (1, 4, 6))],
    "tall-image": [("image", (1, 12, 4))],
    "two-images": [("image", (1, 4, 4)), ("image", (1, 8, 10))],
    "image-and-video": [("image", (1, 6, 4)), ("video", (3, 4, 8))],
    "video-then-image": [("video", (2, 2, 6)), ("image", (1, 2, 2))],
    "two-videos": [("video", (1, 4, 4)), ("video", (4, 2, 2))],
}


# each case with text around its blocks, and (but for text-only) with vision tokens first and last
LAYOUTS = [(name, 3, 4) for name in sorted(CASES)] + [(name, 0, 0) for name in sorted(CASES) if CASES[name]]


@pytest.mark.parametrize("name, lead, tail", LAYOUTS, ids=[f"{n}-{'text-around' if a else 'vision-at-ends'}"
                                                           for n, a, _ in LAYOUTS])
def test_positions_match_transformers(hf, name, lead, tail):
    ids, images, videos = _prompt(0, CASES[name], lead=lead, tail=tail)
    pos, delta = mrope_positions(ids, images, videos, IMAGE, VIDEO, MERGE)
    want, want_delta = _hf_rope_index(hf, ids[None], images, videos)
    assert pos.dtype == torch.long and pos.shape == (3, ids.numel())
    assert torch.equal(pos, want[:, 0]) and delta == int(want_delta[0])


def test_hand_computed_block_layout(hf):
    # two text tokens, a 4x6-patch image (2x3 merged tokens), one text token
    grid = torch.tensor([[1, 4, 6]])
    ids = torch.tensor([7, 8] + [IMAGE] * 6 + [9])
    pos, delta = mrope_positions(ids, grid, None, IMAGE, VIDEO, MERGE)
    assert pos.tolist() == [[0, 1, 2, 2, 2, 2, 2, 2, 5],
                            [0, 1, 2, 2, 2, 3, 3, 3, 5],
                            [0, 1, 2, 3, 4, 2, 3, 4, 5]]
    assert delta == 6 - 9  # the next token sits at 9 + delta = 6
    # nothing but pad tokens: the next token follows the block's largest extent
    pos, delta = mrope_positions(ids[2:8], grid, None, IMAGE, VIDEO, MERGE)
    want, want_delta = _hf_rope_index(hf, ids[None, 2:8], grid)
    assert torch.equal(pos, want[:, 0]) and delta == int(want_delta[0]) == 3 - 6


def test_decode_continues_at_index_plus_delta():
    ids, images, videos = _prompt(1, CASES["image-and-video"])
    pos, delta = mrope_positions(ids, images, videos, IMAGE, VIDEO, MERGE)
    generated = torch.randint(0, IMAGE, (5,), generator=torch.Generator().manual_seed(2))
    longer, _ = mrope_positions(torch.cat([ids, generated]), images, videos, IMAGE, VIDEO, MERGE)
    T = ids.numel()
    assert torch.equal(longer[:, :T], pos)
    assert torch.equal(longer[:, T:], (torch.arange(T, T + 5) + delta).expand(3, -1))


def test_left_padded_batch_matches_transformers(hf):
    rows = [_prompt(3, CASES["one-image"]), _prompt(4, []), _prompt(5, CASES["image-and-video"], lead=1)]
    L = max(r[0].numel() for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, (r, _, _) in enumerate(rows):
        ids[i, L - r.numel():] = r
        mask[i, L - r.numel():] = 1
    images = torch.cat([r[1] for r in rows if r[1] is not None])
    videos = torch.cat([r[2] for r in rows if r[2] is not None])
    pos, deltas = mrope_positions_batch(ids, images, videos, IMAGE, VIDEO, MERGE, attention_mask=mask)
    want, want_deltas = _hf_rope_index(hf, ids, images, videos, attention_mask=mask)
    assert torch.equal(pos, want) and torch.equal(deltas, want_deltas)
    for i, (r, im, vi) in enumerate(rows):  # each row as it would be alone
        solo, d = mrope_positions(r, im, vi, IMAGE, VIDEO, MERGE)
        assert torch.equal(pos[:, i, L - r.numel():], solo) and int(deltas[i]) == d


def test_back_to_back_images_take_one_grid_each():
    # no separator between two images: each run of pads still splits by the grids' token counts
    ids = torch.tensor([5] + [IMAGE] * 2 + [IMAGE] * 4 + [6])
    pos, _ = mrope_positions(ids, torch.tensor([[1, 2, 4], [1, 4, 4]]), None, IMAGE, VIDEO, MERGE)
    assert pos.tolist() == [[0, 1, 1, 3, 3, 3, 3, 5],
                            [0, 1, 1, 3, 3, 4, 4, 5],
                            [0, 1, 2, 3, 4, 3, 4, 5]]


def test_grids_that_do_not_fit_the_tokens_are_clear_errors():
    ids, images, videos = _prompt(6, CASES["image-and-video"])
    with pytest.raises(ValueError, match="no grid left in video_grid_thw"):
        mrope_positions(ids, images, None, IMAGE, VIDEO, MERGE)
    with pytest.raises(ValueError, match="more than the pad tokens"):
        mrope_positions(ids, torch.cat([images, images]), videos, IMAGE, VIDEO, MERGE)
    with pytest.raises(ValueError, match="does not match its grid"):
        mrope_positions(ids, torch.tensor([[1, 8, 8]]), videos, IMAGE, VIDEO, MERGE)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        mrope_positions(ids, torch.tensor([[1, 3, 8]]), videos, IMAGE, VIDEO, MERGE)
    with pytest.raises(ValueError, match="one non-empty sequence"):
        mrope_positions(ids[None], images, videos, IMAGE, VIDEO, MERGE)
