"""Where a picture's facts get lost on the way to the answer: linear probes along a multimodal checkpoint.

For one picture task of qwen35.train.vision_data, teacher-forced on generated examples (train split to fit the
probes, held-out split to score them), this reads the hidden state at the position that predicts the trace's
fact token (the first token of the answer in the trace: "I count the shapes: |3", "I look at the circle: it is
|red") after the input embedding and after
every decoder layer, and the mean of the last layer's states over the picture tokens, and fits a linear
classifier of the fact on each.  Printed: the model's own teacher-forced accuracy on the fact token, then each
probe's train / held-out accuracy (a probe's classes are whole answers; the model's accuracy is on the answer's
first token, which some answers share, so it is an upper bound of the model's).  A fact that a probe reads at some layer but the model does not predict is
lost in the read-out; one that no layer at the answer position holds never reached it.

    python benchmarks/vision_probes.py --model DIR --task pic_count_all [--train 640] [--held 160]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def fact_position(tok, ids: torch.Tensor, keep: torch.Tensor, row: int, answer: str) -> int | None:
    """The first learned position whose next token starts the example's answer (the fact the trace states
    before the conclusion), with or without a leading space; None when the trace never states it."""
    space = tok.token_to_id("Ġ")
    starts = {enc.ids[0] for enc in (tok.encode(answer), tok.encode(" " + answer))} - {space}
    starts |= {enc.ids[1] for enc in (tok.encode(" " + answer),) if enc.ids[0] == space and len(enc.ids) > 1}
    for t in range(ids.shape[1] - 1):
        if keep[row, t + 1] and int(ids[row, t + 1]) in starts:
            return t
    return None


def collect(model, tok, task: str, held_out: bool, n: int, seed: int):
    from qwen35.train.embedded_vision import picture_batch
    from qwen35.train.vision_data import picture_example

    acts: dict = {}
    hooks = [layer.register_forward_hook(lambda _m, _i, o, k=k: acts.__setitem__(k, o[0] if isinstance(o, tuple)
                                                                                else o))
             for k, layer in enumerate(model.model.layers)]
    hooks.append(model.model.embed_tokens.register_forward_hook(lambda _m, _i, o: acts.__setitem__("embedding", o)))
    names = ["embedding", *range(len(model.model.layers))]
    feats: dict = {k: [] for k in names}
    feats["picture mean"] = []
    targets, own = [], []
    examples = [picture_example(seed + i, 0, held_out, {task: 1.0}, 1.0) for i in range(n)]
    pad = tok.token_to_id("<|endoftext|>")
    try:
        for b in range(0, n, 16):
            chunk = examples[b:b + 16]
            pb = picture_batch(chunk, tok, model.config.image_token_id, model.config.vision.spatial_merge_size, pad)
            with torch.no_grad():
                out = model(pb.batch.ids, pixel_values=pb.pixel_values, image_grid_thw=pb.image_grid_thw)
            ids, keep = pb.batch.ids, pb.batch.loss_mask
            for r in range(len(chunk)):
                p = fact_position(tok, ids, keep, r, str(chunk[r]["answer"]))
                if p is None:
                    continue
                targets.append(str(chunk[r]["answer"]))  # the probes' class: the whole answer
                own.append(int(out.logits[r, p].argmax()) == int(ids[r, p + 1]))  # the model's: its first token
                for k in names:
                    feats[k].append(acts[k][r, p])
                feats["picture mean"].append(out.hidden_states[r][ids[r] == model.config.image_token_id].mean(0))
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.stack(v) for k, v in feats.items()}, targets, sum(own) / max(len(own), 1)


def probe(train_x, train_y, held_x, held_y, steps: int = 400) -> tuple[float, float]:
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-5
    a, b = (train_x - mu) / sd, (held_x - mu) / sd
    lin = torch.nn.Linear(a.shape[1], int(max(train_y.max(), held_y.max())) + 1)
    opt = torch.optim.Adam(lin.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(lin(a), train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (float((lin(a).argmax(-1) == train_y).float().mean()), float((lin(b).argmax(-1) == held_y).float().mean()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a multimodal checkpoint folder (e.g. the vision stage's DIR/model)")
    p.add_argument("--task", default="pic_count_all", help="a picture task of qwen35.train.vision_data")
    p.add_argument("--train", type=int, default=640, help="train-split examples the probes are fitted on")
    p.add_argument("--held", type=int, default=160, help="held-out examples they are scored on")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tokenizers import Tokenizer

    from qwen35.checkpoint import load_model

    folder = Path(args.model)
    model = load_model(folder, dtype="float32").eval()
    if model.visual is None:
        raise SystemExit(f"{folder}: the checkpoint has no vision tower")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    train_x, train_t, own_train = collect(model, tok, args.task, False, args.train, 0)
    held_x, held_t, own_held = collect(model, tok, args.task, True, args.held, 500_000)
    classes = {c: i for i, c in enumerate(sorted(set(train_t) | set(held_t)))}
    ty, hy = torch.tensor([classes[t] for t in train_t]), torch.tensor([classes[t] for t in held_t])
    report = {"task": args.task, "facts": list(classes),
              "model_fact_accuracy": {"train": own_train, "held_out": own_held}, "probes": {}}
    for k in train_x:
        tr, he = probe(train_x[k], ty, held_x[k], hy)
        report["probes"][f"layer {k}" if isinstance(k, int) else k] = {"train": round(tr, 3), "held_out": round(he, 3)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
