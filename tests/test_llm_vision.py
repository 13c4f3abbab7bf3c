"""Pictures through ``qwen35.LLM``: chat content parts and vLLM's multi_modal_data give transformers' greedy tokens
on the same pixels (a random-weight multimodal checkpoint with the embedded tokenizer, float32); every source form
gives the same answer; the media policy and a model without a vision tower refuse by name."""

from __future__ import annotations

import base64
import io
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import qwen35
from qwen35.chat.completion import build_chat_prompt
from qwen35.chat.media import MediaError
from qwen35.chat.vision_prompt import MediaPolicy, VisionPreparer, media_parts
from tests.hf_oracle import build_hf, save_hf

ASSETS = Path(qwen35.__file__).parent / "assets" / "default"
GREEDY = dict(temperature=0.0, ignore_eos=True, max_tokens=6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    tok = qwen35.chat.Tokenizer(ASSETS)
    ref = build_hf(False, multimodal=True, vocab_size=len(tok))
    ids = {k: tok.token_to_id(v) for k, v in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                                               ("vision_start_token_id", "<|vision_start|>"),
                                               ("vision_end_token_id", "<|vision_end|>"))}
    for k, v in ids.items():
        setattr(ref.config, k, v)
    path = save_hf(ref, tmp_path_factory.mktemp("mm"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ASSETS / name, path / name)
    return path


@pytest.fixture(scope="module")
def llm(folder):
    return qwen35.LLM(folder, dtype="float32")


def picture(seed: int = 0, size=(70, 50)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def ask(*parts) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is in the picture?"}]}]


def hf_greedy(folder: Path, llm, messages, n: int = 6) -> list[int]:
    """transformers' generate on the prompt and pixels our preparer makes (preprocessing itself is compared with
    transformers' processors in tests/chat/test_media.py)."""
    import transformers as tf

    prompt = build_chat_prompt(llm.tokenizer, messages)
    prepared = VisionPreparer.for_folder(folder).prepare(prompt.text, media_parts(messages))
    ids = torch.tensor([llm.tokenizer.encode(prepared.text)])
    cfg = llm.model.config
    mm = (ids == cfg.image_token_id).long() + 2 * (ids == cfg.video_token_id).long()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = tf.Qwen3_5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                               max_new_tokens=n, min_new_tokens=n, do_sample=False, **prepared.tensors())
    return out[0, ids.shape[1]:].tolist()


def test_chat_with_pictures_equals_transformers(folder, llm):
    messages = ask({"type": "image", "image": picture(0)}, {"type": "image", "image": picture(1, (40, 90))})
    got = llm.chat(messages, qwen35.SamplingParams(**GREEDY))
    assert got.token_ids == hf_greedy(folder, llm, messages)
    assert got.usage["prompt_tokens"] > 2 * 64  # each picture is at least min_pixels: 64 tokens or more


def test_every_source_form_gives_the_same_answer(llm, tmp_path):
    img = picture(2)
    data = png_bytes(img)
    path = tmp_path / "p.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    forms = [{"type": "image", "image": img}, {"type": "image", "image": data}, {"type": "image", "image": str(path)},
             {"type": "image", "image": path}, {"type": "image_url", "image_url": {"url": url}},
             {"type": "image_url", "image_url": {"url": path.as_uri()}}, {"type": "image", "url": url}]
    scored = qwen35.SamplingParams(**GREEDY, logprobs=0)
    results = [llm.chat(ask(f), scored) for f in forms]
    answers = [r.token_ids for r in results]
    assert all(a == answers[0] for a in answers), answers
    # (equal up to rounding: after the first, each request resumes from the prefix cache -- the same picture hits)
    assert all(r.choices[0].logprobs == pytest.approx(results[0].choices[0].logprobs, abs=1e-5) for r in results)
    # the pictures matter: another one scores the answer differently (else this test could not fail)
    assert llm.chat(ask({"type": "image", "image": picture(3)}), scored).choices[0].logprobs != \
        pytest.approx(results[0].choices[0].logprobs, abs=1e-5)
    # vLLM's prompt dict, the template's text with one pad per picture
    text = build_chat_prompt(llm.tokenizer, ask({"type": "image"})).text
    out = llm.generate({"prompt": text, "multi_modal_data": {"image": img}}, qwen35.SamplingParams(**GREEDY))[0]
    assert out.outputs[0].token_ids == answers[0]
    streamed = [o for o in llm.stream({"prompt": text, "multi_modal_data": {"image": [img]}},
                                      qwen35.SamplingParams(**GREEDY))]
    assert streamed[-1].outputs[0].token_ids == answers[0]


def test_a_video_as_frames(folder, llm):
    frames = [picture(10 + k) for k in range(4)]
    messages = ask({"type": "video", "video": frames})
    got = llm.chat(messages, qwen35.SamplingParams(**GREEDY))
    assert got.token_ids == hf_greedy(folder, llm, messages)
    prompt = build_chat_prompt(llm.tokenizer, messages)
    prepared = VisionPreparer.for_folder(folder).prepare(prompt.text, media_parts(messages))
    assert "seconds>" in prepared.text  # frames are separated by their timestamps


def test_policy_refuses_by_name(folder, tmp_path):
    path = tmp_path / "p.png"
    path.write_bytes(png_bytes(picture(5)))
    strict = qwen35.LLM(folder, dtype="float32", media_policy=MediaPolicy(allow_local=False))
    with pytest.raises(MediaError, match=r"messages\[0\]\.content\[0\].*local files are not allowed"):
        strict.chat(ask({"type": "image_url", "image_url": {"url": path.as_uri()}}))
    with pytest.raises(MediaError, match="remote URLs are not fetched"):
        strict.chat(ask({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}))
    inside = qwen35.LLM(folder, dtype="float32", media_policy=MediaPolicy(local_root=tmp_path / "only"))
    with pytest.raises(MediaError, match="outside the allowed media folder"):
        inside.chat(ask({"type": "image", "image": str(path)}))
    with pytest.raises(MediaError, match="no such file"):
        qwen35.LLM(folder, dtype="float32").chat(ask({"type": "image", "image": str(tmp_path / "missing.png")}))
    with pytest.raises(MediaError, match="not an image format Pillow can read"):
        qwen35.LLM(folder, dtype="float32").chat(ask({"type": "image", "image": b"not an image at all"}))


def test_a_text_model_refuses_pictures(tmp_path):
    from tests.vision_checkpoint import build_text_checkpoint

    llm = qwen35.LLM(build_text_checkpoint(tmp_path / "text"), dtype="float32")
    with pytest.raises(ValueError, match="no vision tower"):
        llm.chat(ask({"type": "image", "image": picture(6)}))
    with pytest.raises(ValueError, match="no vision tower"):
        llm.generate({"prompt": "<|vision_start|><|image_pad|><|vision_end|>hi", "multi_modal_data": {"image": picture(6)}})
