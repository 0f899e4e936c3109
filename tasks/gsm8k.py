"""
GSM8K: grade school math word problems.
https://huggingface.co/datasets/openai/gsm8k

Example problem instance:

Question:
Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?
Answer:
Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.
Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.
#### 10

The solutions contain calculator calls inside << >>: they become python tool calls
(and their outputs) in the assistant message, which teaches the model to use its tool.
"""

import re

from tasks.common import Task, load_hub_dataset

GSM_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(completion):
    """
    The number after the #### marker (first match), normalized like the official
    grade-school-math code: stripped, commas removed. None if there is no marker.
    """
    match = GSM_RE.search(completion)
    if match:
        match_str = match.group(1).strip()
        match_str = match_str.replace(",", "")
        return match_str
    return None


def evaluate_final_answer(conversation, assistant_response):
    """
    1 if the response's #### answer equals the reference's, else 0. The conversation holds the
    ground truth assistant message, whose last text part ends in "#### <number>"; assistant_response
    is usually a sampled alternative to it. Every task that answers in GSM8K's format (SpellingBee too)
    is graded here.
    """
    assert isinstance(assistant_response, str), "Assuming simple string response for now"
    assistant_message = conversation['messages'][-1]
    assert assistant_message['role'] == "assistant", "Last message must be from the Assistant"
    assert isinstance(assistant_message['content'], list), "This is expected to be a list of parts"
    ref_num = extract_answer(assistant_message['content'][-1]['text'])
    pred_num = extract_answer(assistant_response)
    return int(pred_num == ref_num)


class GSM8K(Task):

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        assert subset in ["main", "socratic"], "GSM8K subset must be main|socratic"
        assert split in ["train", "test"], "GSM8K split must be train|test"
        self.ds = load_hub_dataset("openai/gsm8k", subset, split=split).shuffle(seed=42)

    @property
    def eval_type(self):
        return 'generative'

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        question = row['question']
        answer = row['answer']  # the full solution, ending in "#### <number>"
        # split the solution into text and calculator calls: "<<12/60=0.2>>" becomes a python
        # part "12/60" and a python_output part "0.2" (split on the *last* "=")
        assistant_message_parts = []
        for part in re.split(r'(<<[^>]+>>)', answer):
            if part.startswith('<<') and part.endswith('>>'):
                inner = part[2:-2]
                if '=' in inner:
                    expr, result = inner.rsplit('=', 1)
                else:
                    expr, result = inner, ""
                assistant_message_parts.append({"type": "python", "text": expr})
                assistant_message_parts.append({"type": "python_output", "text": result})
            else:
                assistant_message_parts.append({"type": "text", "text": part})
        messages = [
            {"role": "user", "content": question},  # a plain string
            {"role": "assistant", "content": assistant_message_parts},  # a list of parts
        ]
        conversation = {
            "messages": messages,
        }
        return conversation

    def evaluate(self, conversation, assistant_response):
        return evaluate_final_answer(conversation, assistant_response)

    # reward: Task's, the 0/1 correctness (float(self.evaluate(...))) for RL
