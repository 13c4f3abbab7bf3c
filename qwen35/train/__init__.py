"""Training the tiny default model that ships with the package.

* :mod:`qwen35.train.data` — seeded synthetic chat data (verifiable tasks with thinking traces, tool use in the
  Qwen3.5 XML format, multi-turn chats, stories, raw text), a held-out split, rendering through the chat template.
* :mod:`qwen35.train.bpe` — a small byte-level BPE tokenizer with the Qwen3.5 added tokens, trained on that data.

Nothing is imported here, so ``import qwen35.train`` stays cheap; import the submodules directly.
"""
