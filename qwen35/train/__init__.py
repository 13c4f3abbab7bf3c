"""Training Qwen3.5 models, and the tiny default model that ships with the package.

Read in this order:

* :mod:`qwen35.train.config` — :class:`~qwen35.train.config.TrainConfig`, everything a run depends on;
* :mod:`qwen35.train.presets` — the model shapes a run can train ("tiny", "embedded");
* :mod:`qwen35.train.data` — seeded synthetic chat data (verifiable tasks with thinking traces, tool use in the
  Qwen3.5 XML format, multi-turn chats, stories, raw text), a held-out split, rendering through the chat template;
* :mod:`qwen35.train.bpe` — a small byte-level BPE tokenizer with the Qwen3.5 added tokens, trained on that data;
* :mod:`qwen35.train.batches` — encoded examples, right-padded length-bucketed micro-batches, their order;
* :mod:`qwen35.train.losses` — next-token, MTP and MoE balance losses of a micro-batch;
* :mod:`qwen35.train.optim` — the optimiser, schedule and step (shared by every trainer, RL's included);
* :mod:`qwen35.train.loop` — the run: :class:`~qwen35.train.loop.Trainer`, resumable state, export, plots;
* :mod:`qwen35.train.embedded`, :mod:`qwen35.train.embedded_vision`, :mod:`qwen35.train.vision_data` — the
  recipe of the shipped model and of its vision stage.

Weight initialisation belongs to the model (:func:`qwen35.model.init_weights`).  Nothing is imported here, so
``import qwen35.train`` stays cheap; import the submodules directly.
"""
