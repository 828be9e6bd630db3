"""Learning from preferences: DPO on the adapter with TRL, and how often it ranks right.

:func:`train_dpo` runs TRL's ``DPOTrainer`` on the recipe's PEFT model. TRL copies the
adapter as it stands into a frozen ``ref`` adapter and trains the ``default`` one against
it, so ``sft+dpo`` moves the SFT adapter only as far as ``dpo_beta`` lets it; the copy is
removed afterwards, so the saved adapter is the trained one alone.

:func:`ranking_accuracy` measures the result on held-out pairs: the share of pairs whose
chosen answer gets the higher implicit reward, ``log p(answer | prompt)`` under the
adapter minus the same under the base model (adapter disabled). It is the same number
for an SFT adapter and a DPO one, so the two can be compared.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tuneloop.services.curation.preferences import PreferencePair
from tuneloop.training.config import RecipeConfig
from tuneloop.training.data import IGNORE, encode_chat

log = logging.getLogger(__name__)


def _answer_logprob(model: Any, tokenizer: Any, messages: list[dict[str, str]],
                    answer: str, device: torch.device) -> float:
    encoded = encode_chat(tokenizer, [*messages, {"role": "assistant", "content": answer}])
    ids = torch.tensor([encoded.input_ids], device=device)
    labels = torch.tensor([encoded.labels], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1))
    return float(logps.squeeze(-1)[mask].sum())


@torch.inference_mode()
def ranking_accuracy(model: Any, tokenizer: Any, pairs: Sequence[PreferencePair],
                     device: torch.device) -> float | None:
    """Share of ``pairs`` whose chosen answer has the higher implicit reward (see the
    module); None when there are no pairs."""
    if not pairs:
        return None
    was_training = model.training
    model.eval()
    try:
        right = 0
        for pair in pairs:
            rewards = []
            for answer in (pair.chosen, pair.rejected):
                policy = _answer_logprob(model, tokenizer, pair.messages, answer, device)
                with model.disable_adapter():
                    base = _answer_logprob(model, tokenizer, pair.messages, answer, device)
                rewards.append(policy - base)
            right += rewards[0] > rewards[1]
    finally:
        model.train(was_training)
    return right / len(pairs)


def train_dpo(model: Any, tokenizer: Any, pairs: Sequence[PreferencePair], config: RecipeConfig,
              out_dir: Path, *, device: torch.device, show_progress: bool = True
              ) -> dict[str, Any]:
    """DPO on ``pairs`` (TRL's ``DPOTrainer``), in place on ``model``'s default adapter.

    Returns the run's figures (steps, final loss, reward accuracy on the train pairs,
    seconds). Raises ``ValueError`` when there are no pairs.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    if not pairs:
        raise ValueError("DPO needs preference pairs: the dataset has none (its events carry "
                         "no corrections)")
    rows = [{"prompt": p.messages, "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs]
    args = DPOConfig(
        output_dir=str(out_dir), beta=config.dpo_beta, learning_rate=config.dpo_learning_rate,
        num_train_epochs=config.dpo_epochs, per_device_train_batch_size=config.dpo_batch_size,
        gradient_accumulation_steps=1, lr_scheduler_type="cosine", warmup_steps=0.1,
        max_length=config.max_seq_len * 2, save_strategy="no", report_to=[],
        logging_steps=1, seed=config.seed, use_cpu=device.type == "cpu",
        bf16=device.type == "cuda", disable_tqdm=not show_progress,
        dataloader_num_workers=0)
    started = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    output = trainer.train()
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
    model.set_adapter("default")
    history = [h for h in trainer.state.log_history if "loss" in h]
    last = history[-1] if history else {}
    figures = {"pairs": len(pairs), "steps": int(output.global_step),
               "loss": last.get("loss"),
               "train_reward_accuracy": last.get("rewards/accuracies"),
               "dpo_s": time.perf_counter() - started,
               "beta": config.dpo_beta, "learning_rate": config.dpo_learning_rate}
    log.info("DPO: %d pairs, %d steps in %.0fs, last loss %s", len(pairs), figures["steps"],
             figures["dpo_s"], figures["loss"])
    return figures
