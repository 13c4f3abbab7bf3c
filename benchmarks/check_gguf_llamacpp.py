"""GGUF against llama.cpp itself: files its converter wrote load here, files we write run there.

  (a) The GGUFs llama.cpp's convert_hf_to_gguf.py (BF16) and llama-quantize (Q8_0) made of CKPT load with
      qwen35.quant.gguf.load_gguf and give the logits of load_model(CKPT): BF16 bit for bit, Q8_0 within its
      rounding (max |logit difference|, top-1 agreement) -- and every Q8_0 block llama-quantize wrote equals our
      quantiser's block of the same BF16 values.  --also adds files (e.g. llama-quantize's Q4_K_M: Q4_K / Q6_K
      blocks) to the same comparison.
  (b) save_gguf(load_model(CKPT)) -> the same tensor bytes and metadata keys as the converter's file, and llama.cpp
      (llama-server at --temp 0, token ids; llama-completion --temp 0, text) generates the greedy tokens our engine
      generates from the same weights (CKPT for our BF16 file, our Q8_0 file through qwen35.LLM for our Q8_0 file),
      for a short prompt; qwen35.LLM on the converter's BF16 file gives CKPT's tokens.

  python benchmarks/check_gguf_llamacpp.py --checkpoint CKPT --llama-bin DIR --converter convert_hf_to_gguf.py \\
      [--gguf-bf16 FILE] [--gguf-q8_0 FILE] [--also FILE ...] [--tokens 8] [--threads 2] [--workdir DIR]

Without --gguf-bf16 / --gguf-q8_0 the files are made with --converter (run by this interpreter; it needs torch,
transformers and its own gguf-py) and DIR/llama-quantize.  Prints one JSON report (also written to
DIR/report.json when --workdir is given).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

PROMPT = "The capital of France is Paris. The capital of Germany is"


def log(msg: str) -> None:
    print(f"[check_gguf] {msg}", file=sys.stderr, flush=True)


def llama_env(bin_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{bin_dir}:{env.get('LD_LIBRARY_PATH', '')}"
    return env


def make_converter_files(a: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    bf16 = Path(a.gguf_bf16) if a.gguf_bf16 else work / "converter-bf16.gguf"
    q8 = Path(a.gguf_q8_0) if a.gguf_q8_0 else work / "converter-q8_0.gguf"
    if not bf16.exists():
        log(f"converting {a.checkpoint} with {a.converter}")
        subprocess.run([sys.executable, a.converter, a.checkpoint, "--no-mtp", "--outtype", "bf16", "--outfile",
                        str(bf16)], check=True, capture_output=True)
    if not q8.exists():
        log("quantising to Q8_0 with llama-quantize")
        subprocess.run([str(Path(a.llama_bin) / "llama-quantize"), str(bf16), str(q8), "Q8_0", str(a.threads)],
                       check=True, capture_output=True, env=llama_env(Path(a.llama_bin)))
    return bf16, q8


def prompt_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def compare_logits(got: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (got - ref).abs()
    return {"max_abs_logit_diff": diff.max().item(), "logit_std": ref.std().item(),
            "max_diff_over_std": (diff.max() / ref.std()).item(),
            "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "bit_identical": bool(torch.equal(got, ref))}


def check_loading(a: argparse.Namespace, bf16: Path, q8: Path, ids: list[int]) -> dict:
    from qwen35.checkpoint import load_model
    from qwen35.quant.gguf import Q8_0, GGUFFile, dequantize, load_gguf, quantize

    out: dict = {}
    ref = load_model(a.checkpoint, dtype="bfloat16")
    ref_logits = prompt_logits(ref, ids)
    del ref
    files = [("converter_bf16", bf16), ("converter_q8_0", q8)] + [(Path(x).name, Path(x)) for x in a.also]
    for label, path in files:
        t = time.perf_counter()
        m = load_gguf(path, dtype="bfloat16")
        load_s = time.perf_counter() - t
        with GGUFFile(path) as f:
            types = sorted({info.type_name for info in f.tensors.values()})
        out[label] = {"file": str(path), "tensor_types": types, "load_s": round(load_s, 1),
                      **compare_logits(prompt_logits(m, ids), ref_logits)}
        del m
    # llama-quantize's Q8_0 blocks against ours, from the same BF16 values
    same = total = 0
    mismatched = []
    with GGUFFile(bf16) as fb, GGUFFile(q8) as fq:
        for name, info in fq.tensors.items():
            if info.ggml_type != Q8_0:
                continue
            src = fb.tensors[name]
            ours = quantize(dequantize(fb.raw(name), src.ggml_type).float(), Q8_0)
            theirs = fq.raw(name)
            blocks_ours, blocks_theirs = ours.reshape(-1, 34), theirs.reshape(-1, 34)
            eq = (blocks_ours == blocks_theirs).all(-1)
            same += int(eq.sum())
            total += eq.numel()
            if not bool(eq.all()):
                mismatched.append(name)
            fb.release(name)
            fq.release(name)
    out["q8_0_blocks_equal_to_llama_quantize"] = {"equal": same, "total": total, "tensors_differing": mismatched}
    return out


def compare_files(ours: Path, theirs: Path) -> dict:
    from qwen35.quant.gguf import GGUFFile

    with GGUFFile(ours) as a, GGUFFile(theirs) as b:
        ka, kb = set(a.metadata), set(b.metadata)
        values_differ = sorted(k for k in ka & kb if a.metadata[k] != b.metadata[k])
        names_equal = set(a.tensors) == set(b.tensors)
        layout_differ = sorted(n for n in a.tensors if n in b.tensors and (
            a.tensors[n].ggml_type != b.tensors[n].ggml_type or a.tensors[n].shape != b.tensors[n].shape))
        bytes_differ = []
        for n in a.tensors:
            if n in b.tensors and n not in layout_differ and not torch.equal(a.raw(n), b.raw(n)):
                bytes_differ.append(n)
            a.release(n)
            b.release(n)
    return {"keys_only_ours": sorted(ka - kb), "keys_only_converter": sorted(kb - ka),
            "values_differ": values_differ, "tensor_names_equal": names_equal,
            "type_or_shape_differ": layout_differ, "tensor_bytes_differ": bytes_differ}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def llama_server_greedy(a: argparse.Namespace, gguf: Path, ids: list[int]) -> dict:
    """Greedy token ids from llama-server (temperature 0) for a token-id prompt, and its tokenisation of PROMPT."""
    port = free_port()
    cmd = [str(Path(a.llama_bin) / "llama-server"), "-m", str(gguf), "-t", str(a.threads), "-c", "512", "-np", "1",
           "--host", "127.0.0.1", "--port", str(port), "--no-webui", "--no-warmup"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=llama_env(Path(a.llama_bin)))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("llama-server did not come up in 300 s")
            time.sleep(0.5)
        tokenized = post(base + "/tokenize", {"content": PROMPT, "add_special": False})["tokens"]
        res = post(base + "/completion", {"prompt": ids, "n_predict": a.tokens, "temperature": 0.0,
                                          "ignore_eos": True, "cache_prompt": False, "return_tokens": True,
                                          "n_probs": 2})
        return {"prompt_tokens": tokenized, "tokens": res["tokens"], "text": res.get("content"),
                "top2": [[p.get("id") for p in step.get("top_probs", step.get("probs", []))]
                         for step in res.get("completion_probabilities", [])]}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def llama_completion_text(a: argparse.Namespace, gguf: Path) -> str:
    cmd = [str(Path(a.llama_bin) / "llama-completion"), "-m", str(gguf), "-p", PROMPT, "-n", str(a.tokens),
           "--temp", "0", "-t", str(a.threads), "-c", "512", "--ignore-eos", "--no-display-prompt", "-no-cnv",
           "--no-warmup", "-sp"]
    out = subprocess.run(cmd, capture_output=True, env=llama_env(Path(a.llama_bin)), timeout=600, check=True)
    return out.stdout.decode("utf-8", errors="replace").strip()


def check_export(a: argparse.Namespace, bf16: Path, work: Path, ids: list[int]) -> dict:
    from qwen35 import LLM, SamplingParams
    from qwen35.checkpoint import load_model
    from qwen35.quant.gguf import save_gguf

    out: dict = {}
    model = load_model(a.checkpoint, dtype="bfloat16")
    exports = {}
    for file_type in ("bf16", "q8_0"):
        path = work / f"ours-{file_type}.gguf"
        t = time.perf_counter()
        save_gguf(model, a.checkpoint, path, file_type=file_type)
        exports[file_type] = path
        out[f"export_{file_type}_s"] = round(time.perf_counter() - t, 1)
    del model
    out["ours_vs_converter_bf16"] = compare_files(exports["bf16"], bf16)

    # ours: the engine, float32 activations over the file's weights (as llama.cpp computes): on the checkpoint for
    # the BF16 export (the same values), on our own Q8_0 file (qwen35.LLM on a .gguf) for the Q8_0 export; and
    # qwen35.LLM on the converter's BF16 file, which must give the checkpoint's tokens
    greedy = SamplingParams(max_tokens=a.tokens, temperature=0.0, ignore_eos=True)

    def ours_greedy(source: Path | str) -> tuple[list[int], str, list[int]]:
        llm = LLM(source, dtype="float32", threads=a.threads)
        tokens = list(llm.generate(ids, greedy)[0].outputs[0].token_ids)
        return tokens, llm.tokenizer.decode(tokens), llm.tokenizer.encode(PROMPT)

    ours = {"bf16": ours_greedy(a.checkpoint), "q8_0": ours_greedy(exports["q8_0"])}
    from_converter = ours_greedy(bf16)
    out["ours"] = {"checkpoint": {"tokens": ours["bf16"][0], "text": ours["bf16"][1]},
                   "our_q8_0_gguf": {"tokens": ours["q8_0"][0], "text": ours["q8_0"][1]},
                   "converter_bf16_gguf_via_LLM": {"tokens": from_converter[0],
                                                   "equal_to_checkpoint": from_converter[0] == ours["bf16"][0],
                                                   "tokenizer_equal": from_converter[2] == ours["bf16"][2]}}
    for file_type, path in exports.items():
        ours_tokens, ours_text, ours_prompt = ours[file_type]
        theirs = llama_server_greedy(a, path, ids)
        agree = sum(x == y for x, y in zip(ours_tokens, theirs["tokens"]))
        first_diff = next((i for i, (x, y) in enumerate(zip(ours_tokens, theirs["tokens"])) if x != y), None)
        entry = {"llama_server_tokens": theirs["tokens"], "token_agreement": f"{agree}/{len(ours_tokens)}",
                 "first_divergence": first_diff, "prompt_tokenisation_equal": theirs["prompt_tokens"] == ours_prompt}
        if file_type == "bf16":
            completion = llama_completion_text(a, path)
            entry["llama_completion_text"] = completion
            entry["llama_completion_text_equal"] = completion == ours_text.strip()
        out[f"llama_cpp_on_ours_{file_type}"] = entry
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a Qwen3.5 checkpoint folder (config, safetensors, tokenizer)")
    p.add_argument("--llama-bin", required=True, help="folder with llama-server, llama-completion, llama-quantize")
    p.add_argument("--converter", required=True, help="llama.cpp's convert_hf_to_gguf.py")
    p.add_argument("--gguf-bf16", help="the converter's BF16 GGUF of the checkpoint (default: made here)")
    p.add_argument("--gguf-q8_0", help="llama-quantize's Q8_0 of it (default: made here)")
    p.add_argument("--also", nargs="*", default=[], metavar="FILE",
                   help="more GGUFs of the checkpoint to load and compare in (a), e.g. llama-quantize's Q4_K_M")
    p.add_argument("--tokens", type=int, default=8, help="greedy tokens to compare (default: 8)")
    p.add_argument("--threads", type=int, default=2, help="threads for us and llama.cpp (default: 2)")
    p.add_argument("--workdir", help="where our exports (and made files) go (default: a temporary folder)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tmp = None
    if a.workdir:
        work = Path(a.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="check-gguf-")
        work = Path(tmp.name)
    from qwen35.chat.tokenizer import Tokenizer

    ids = Tokenizer(a.checkpoint).encode(PROMPT)
    bf16, q8 = make_converter_files(a, work)
    report = {"checkpoint": a.checkpoint, "prompt": PROMPT, "prompt_ids": ids}
    log("(a) loading the converter's files")
    report["loading"] = check_loading(a, bf16, q8, ids)
    log("(b) exporting and running llama.cpp")
    report["export"] = check_export(a, bf16, work, ids)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if a.workdir:
        (work / "report.json").write_text(text + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
