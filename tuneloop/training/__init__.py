"""LoRA supervised fine-tuning of the served base model on curated dataset versions.

- ``config``: the typed, validated recipe config (files in ``training/configs``).
- ``base_model``: which base model, and the one-time GGUF -> safetensors conversion.
- ``data``: assistant-only labels, packing, the learning-rate schedule (pure).
- ``recipe``: ``LoRARecipe`` with ``setup()``, ``train()``, ``cleanup()``.
- ``evaluate``: generation-based task evaluation (metrics in ``tuneloop.services.evaluation.metrics``).
- ``pipeline``: one run end to end (read, train, evaluate, publish), used by
  ``tuneloop train`` and the ``retrain`` flow.
"""
