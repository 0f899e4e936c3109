"""
The ARC dataset from Allen AI: grade-school science multiple choice, in two difficulties.
https://huggingface.co/datasets/allenai/ai2_arc
"""

from tasks.common import Task, evaluate_mc, load_hub_dataset, mc_conversation


class ARC(Task):

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        assert subset in ["ARC-Easy", "ARC-Challenge"], "ARC subset must be ARC-Easy or ARC-Challenge"
        assert split in ["train", "validation", "test"], "ARC split must be train|validation|test"
        self.ds = load_hub_dataset("allenai/ai2_arc", subset, split=split).shuffle(seed=42)

    @property
    def eval_type(self):
        return 'categorical'

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        question = row["question"]
        choices = row["choices"]["text"]
        letters = row["choices"]["label"]  # usually A-D, sometimes A-E or 1-4
        answer_string = row["answerKey"]  # one of the letters
        assert answer_string in letters, f"ARC answer {answer_string} must be one of {letters}"
        return mc_conversation(question, letters, choices, answer_string)

    def evaluate(self, conversation, assistant_response):
        return evaluate_mc(conversation, assistant_response)
