"""
Chat-model evaluation (nanochat's scripts/chat_eval.py core, in MLX): ARC-Easy, ARC-Challenge,
MMLU, GSM8K and HumanEval accuracies, and ChatCORE over all five. scripts/chat_eval.py is the
command line around it; SFT calls it during training.

    from mlxchat.chat_eval import ALL_TASKS, chatcore, run_chat_eval
    results = {name: run_chat_eval(name, model, tokenizer, Engine(model, tokenizer), max_problems=100)
               for name in ALL_TASKS}
    chatcore(results)   # 0 = chance, 1 = perfect

Categorical tasks (multiple choice) need no sampling: a batch of prompts goes through the model once
and the answer is the allowed letter with the largest logit at the <|assistant_start|> position.
Generative tasks sample num_samples completions per problem; a problem passes if any of them does.
A prompt longer than the model can forward is cropped from the left (nanochat would crash).
In an mlx.launch run the problems are split over the processes and the counts summed.

Quiet by default: the final counts go to the "mlxchat.chat_eval" logger (INFO), and progress bars
only appear with progress=True.
"""
import logging
from functools import partial

import numpy as np
import mlx.core as mx
from tqdm import tqdm

from mlxchat.core_eval import dist_info, model_max_len
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU

logger = logging.getLogger(__name__)

ALL_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"]
# ChatCORE centers each accuracy on its chance level: 1 of 4 letters for multiple choice, 0 when open-ended
BASELINE_ACCURACIES = {
    "ARC-Easy": 0.25,
    "ARC-Challenge": 0.25,
    "MMLU": 0.25,
    "GSM8K": 0.0,
    "HumanEval": 0.0,
    "SpellingBee": 0.0,
}


def _all_sum(values, group):
    if group is None:
        return values
    return [int(v) for v in np.array(mx.distributed.all_sum(mx.array(values, dtype=mx.int32), group=group)).tolist()]


def _crop_left(ids, limit):
    # keep the end of an over-long prompt (its end is where the answer goes)
    return ids if limit is None or len(ids) <= limit else ids[len(ids) - limit:]


def _progress_bar(items, rank, progress):
    return tqdm(items, desc=f"rank {rank}", leave=False, dynamic_ncols=True, disable=not progress)


# -----------------------------------------------------------------------------
# Generative evaluation: one problem at a time, sample, check


def run_generative_eval(task_object, tokenizer, model, engine, num_samples, max_new_tokens, temperature, top_k,
                        max_problems=None, progress=False):
    rank, world_size, group = dist_info()
    num_problems = len(task_object) if max_problems is None else min(len(task_object), max_problems)
    limit = model_max_len(model)
    num_passed, total = 0, 0
    bar = _progress_bar(range(rank, num_problems, world_size), rank, progress)
    for i in bar:
        conversation = task_object[i]
        encoded_prompt = tokenizer.render_for_completion(conversation)
        if limit is not None:
            encoded_prompt = _crop_left(encoded_prompt, max(1, limit - max_new_tokens))
        results, _ = engine.generate_batch(
            encoded_prompt,
            num_samples=num_samples,
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
        )
        prefix_length = len(encoded_prompt)
        completions = [tokenizer.decode(result_tokens[prefix_length:]) for result_tokens in results]
        # pass@num_samples: any sample passing counts
        outcomes = [task_object.evaluate(conversation, completion) for completion in completions]
        passed = any(outcomes)
        total += 1
        num_passed += int(passed)
        bar.set_postfix_str(f"{num_passed}/{total} ({100 * num_passed / total:.2f}%)")
    bar.close()
    num_passed, total = _all_sum([num_passed, total], group)
    logger.info(f"Final: {num_passed}/{total} ({100 * num_passed / max(total, 1):.2f}%)")
    return num_passed / total if total else float("nan")


# -----------------------------------------------------------------------------
# Categorical evaluation: batches of problems, no sampling; the logits of the allowed letters decide


def run_categorical_eval(task_object, tokenizer, model, batch_size, max_problems=None, progress=False):
    rank, world_size, group = dist_info()
    bos = tokenizer.get_bos_token_id()  # the pad token: padded positions come after the answer position
    num_problems = len(task_object) if max_problems is None else min(len(task_object), max_problems)
    num_batches = -(-num_problems // batch_size)
    limit = model_max_len(model)

    letter_to_id_cache = {}  # letters repeat a lot
    num_passed, total = 0, 0
    bar = _progress_bar(range(rank, num_batches, world_size), rank, progress)
    for i in bar:
        i0, i1 = i * batch_size, min((i + 1) * batch_size, num_problems)
        conversations = [task_object[ii] for ii in range(i0, i1)]
        prompt_ids = [_crop_left(tokenizer.render_for_completion(c), limit) for c in conversations]
        max_length = max(len(ids) for ids in prompt_ids)
        answer_time_positions = [len(ids) - 1 for ids in prompt_ids]  # the <|assistant_start|> token
        padded_prompt_ids = [ids + [bos] * (max_length - len(ids)) for ids in prompt_ids]
        logits = model(mx.array(padded_prompt_ids, dtype=mx.int32))  # (B, T, V)

        for idx, conversation in enumerate(conversations):
            letters = conversation["letters"]
            letter_ids = []
            for letter in letters:
                if letter not in letter_to_id_cache:
                    encoded_letter = tokenizer.encode(letter)
                    assert len(encoded_letter) == 1, "Each letter must be a single token"
                    letter_to_id_cache[letter] = encoded_letter[0]
                letter_ids.append(letter_to_id_cache[letter])
            # only the allowed letters compete, at the position that predicts the answer
            focus_logits = logits[idx, answer_time_positions[idx], mx.array(letter_ids)]
            predicted_letter = letters[int(mx.argmax(focus_logits).item())]
            outcome = task_object.evaluate(conversation, predicted_letter)
            num_passed += int(outcome)
            total += 1
        bar.set_postfix_str(f"{num_passed}/{total} ({100 * num_passed / total:.2f}%)")
    bar.close()
    num_passed, total = _all_sum([num_passed, total], group)
    average = num_passed / total if total else float("nan")
    logger.info(f"Final: {num_passed}/{total} ({100 * average:.2f}%)")
    return average


# -----------------------------------------------------------------------------


def make_task(task_name):
    task_module = {
        "HumanEval": HumanEval,
        "MMLU": partial(MMLU, subset="all", split="test"),
        "ARC-Easy": partial(ARC, subset="ARC-Easy", split="test"),
        "ARC-Challenge": partial(ARC, subset="ARC-Challenge", split="test"),
        "GSM8K": partial(GSM8K, subset="main", split="test"),
        "SpellingBee": _spelling_bee,  # nanochat's history; not part of ChatCORE
    }
    if task_name not in task_module:
        raise ValueError(f"unknown task {task_name!r}; known: {' | '.join(task_module)}")
    return task_module[task_name]()


def _spelling_bee():
    from tasks.spellingbee import SpellingBee
    return SpellingBee(size=256, split="test")


def run_chat_eval(task_name, model, tokenizer, engine, batch_size=1, num_samples=1, max_new_tokens=512,
                  temperature=0.0, top_k=50, max_problems=None, progress=False):
    """Accuracy of the model on one task (a name of BASELINE_ACCURACIES): pass@num_samples for the
    generative tasks, the best allowed letter for the categorical ones (batch_size prompts at once)."""
    task_object = make_task(task_name)
    if task_object.eval_type == "generative":
        return run_generative_eval(task_object, tokenizer, model, engine, num_samples, max_new_tokens, temperature,
                                   top_k, max_problems=max_problems, progress=progress)
    if task_object.eval_type == "categorical":
        return run_categorical_eval(task_object, tokenizer, model, batch_size, max_problems=max_problems,
                                    progress=progress)
    raise ValueError(f"Unsupported task evaluation type: {task_object.eval_type}")


def chatcore(results):
    """Mean accuracy centered on each task's chance level (0 = chance, 1 = perfect), or None unless
    all of ALL_TASKS are in results."""
    if not all(task_name in results for task_name in ALL_TASKS):
        return None
    centered = [(results[t] - BASELINE_ACCURACIES[t]) / (1.0 - BASELINE_ACCURACIES[t]) for t in ALL_TASKS]
    return sum(centered) / len(centered)
