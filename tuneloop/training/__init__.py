"""LoRA supervised fine-tuning of the served base model on curated dataset versions.

- ``config``: the typed, validated recipe config (files in ``tuneloop/training/configs``).
- ``base_model``: which base model, and the one-time GGUF -> safetensors conversion.
- ``tokenizer``: the base model's tokenizer, for counting tokens at curation time.
- ``dataset``: a dataset version and the golden set as the recipe trains on them.
- ``data``: assistant-only labels, packing, the learning-rate schedule (pure).
- ``recipe``: ``LoRARecipe`` with ``setup()``, ``train()``, ``cleanup()``.
- ``checkpoint``: the loop's state, early stopping, and resuming a run that died.
- ``evaluate``: generation-based task evaluation (metrics in ``tuneloop.services.evaluation``).
- ``report``: a run's result, curve and report.
- ``pipeline``: one run end to end (read, train, evaluate, publish), used by
  ``tuneloop train`` and the ``retrain`` flow.
"""
