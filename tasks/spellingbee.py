"""
Tasks to make the model better at spelling and counting letters, for example:

"How many r are in strawberry?" -> 3

The assistant solves it with a mix of manual counting and Python, a good problem solving
"instinct" to mix into the model (RL may later refine which one to trust).

Two tasks live in this file:
1. SpellingBee: count the occurrences of a letter in a word
2. SimpleSpelling: simply spell a word
(1) is the goal; (2) is a condensed version of the part that makes (1) hard for an LLM:
mapping each token (a little semantic chunk) to the characters that make it up. Large models
learn this on their own; small models need it over-represented in the training data.

Both are synthetic: example i is generated from random.Random(i) (test examples from
random.Random(10_000_000 + i)), so any index is reproducible. This is nanochat's version from
Oct 2025 - Jul 2026 (removed from its SFT mixture in 950a1dc).

To preview a few example conversations: python -m tasks.spellingbee
"""

import random
import string

from tasks.common import Task, download_file_with_lock
from tasks.gsm8k import evaluate_final_answer

# Letters of the alphabet
LETTERS = string.ascii_lowercase
# A list of 370K English words of large variety
WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
# A number bigger than 370K to separate train and test random seeds
TEST_RANDOM_SEED_OFFSET = 10_000_000


# User message templates for data augmentation (order matters: it feeds rng.choice)
USER_MSG_TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "Count the number of {letter} in {word}",
    "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}",
    "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}",
    "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}",
    "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}",
    "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}",
    "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}",
    "Count all the {letter} in {word}",
    "How many times is {letter} in {word}",
    "Number of {letter} in {word}",
    "Total count of {letter} in {word}",
    "How many {letter} does {word} have",
    "How many {letter} does {word} contain",
    "What's the number of {letter} in {word}",
    "{word} has how many {letter}",
    "In {word}, count the {letter}",
    "How many {letter} appear in {word}",
    "Count the {letter} in {word}",
    "Give me the count of {letter} in {word}",
    "How many instances of {letter} in {word}",
    "Show me how many {letter} are in {word}",
    "Calculate the number of {letter} in {word}",
    # Spanish
    "¿Cuántas {letter} hay en {word}?",
    "¿Cuántas veces aparece {letter} en {word}?",
    "Cuenta las {letter} en {word}",
    "¿Cuántas letras {letter} tiene {word}?",
    # Chinese (Simplified)
    "{word}中有多少个{letter}",
    "{word}里有几个{letter}",
    "数一下{word}中的{letter}",
    "{word}这个词里有多少{letter}",
    # Korean
    "{word}에 {letter}가 몇 개 있나요",
    "{word}에서 {letter}의 개수는",
    "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    # French
    "Combien de {letter} dans {word}",
    "Combien de fois {letter} apparaît dans {word}",
    "Compte les {letter} dans {word}",
    # German
    "Wie viele {letter} sind in {word}",
    "Wie oft kommt {letter} in {word} vor",
    "Zähle die {letter} in {word}",
    # Japanese
    "{word}に{letter}は何個ありますか",
    "{word}の中に{letter}がいくつ",
    "{word}に{letter}が何回出てくる",
]


def load_words(word_list_path=None):
    """
    The word list, one word per line. By default dwyl's words_alpha.txt, downloaded once into
    the base dir (as nanochat does); word_list_path uses a local file instead (offline, tests).
    """
    if word_list_path is None:
        filename = WORD_LIST_URL.split("/")[-1]
        try:
            word_list_path = download_file_with_lock(WORD_LIST_URL, filename)
        except OSError as e:  # urllib's errors are OSErrors
            raise RuntimeError(
                f"Could not download the SpellingBee word list from {WORD_LIST_URL}: {e}\n"
                f"Fix: rerun with internet access, or put that file at $MLXCHAT_BASE_DIR/{filename}, "
                f"or pass word_list_path= to use another word list."
            ) from e
    with open(word_list_path, 'r', encoding='utf-8') as f:
        words = [line.strip() for line in f]
    # words_alpha.txt has no blank lines; dropping them keeps a hand-made list from yielding an empty "word"
    words = [word for word in words if word]
    assert words, f"no words in {word_list_path}"
    return words


class WordTask(Task):
    """ What both tasks share: the word list, `size` examples, and example i's own seeded rng. """

    def __init__(self, size=1000, split="train", word_list_path=None, **kwargs):
        super().__init__(**kwargs)
        assert split in ["train", "test"], "SpellingBee split must be train|test"
        self.size = size
        self.split = split
        self.words = load_words(word_list_path)

    @property
    def eval_type(self):
        return 'generative'

    def num_examples(self):
        return self.size

    def example_rng(self, index):
        seed = index if self.split == 'train' else TEST_RANDOM_SEED_OFFSET + index
        return random.Random(seed)


class SpellingBee(WordTask):

    def get_example(self, index):
        rng = self.example_rng(index)

        # pick a random word, and a letter from it (90%) or a random letter (10%)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        # the correct answer, by simply counting
        count = word.count(letter)

        # the user message, with a bunch of variations as data augmentation
        template = rng.choice(USER_MSG_TEMPLATES)
        if rng.random() < 0.3:  # lazy people don't use shift
            template = template.lower()
        quote_options = ['', "'", '"']
        letter_quote = rng.choice(quote_options)
        word_quote = rng.choice(quote_options)
        letter_wrapped = f"{letter_quote}{letter}{letter_quote}"
        word_wrapped = f"{word_quote}{word}{word_quote}"
        user_msg = template.format(letter=letter_wrapped, word=word_wrapped)
        if rng.random() < 0.5:  # half of people don't even use question marks
            user_msg += "?"

        # the ideal assistant response, as parts: manual spelling and counting first...
        assistant_parts = []
        word_letters = ",".join(list(word))
        manual_text = f"""We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach first.

First spell the word out:
{word}:{word_letters}

Then count the occurrences of '{letter}':
"""
        running_count = 0
        for i, char in enumerate(word, 1):
            if char == letter:
                running_count += 1
                # deliberately no space between i and char: " a" and "a" are different tokens
                manual_text += f"{i}:{char} hit! count={running_count}\n"
            else:
                manual_text += f"{i}:{char}\n"
        manual_text += f"\nThis gives us {running_count}."
        assistant_parts.append({"type": "text", "text": manual_text})
        # ...then a check with the python tool, then the final answer in GSM8K's #### format
        assistant_parts.append({"type": "text", "text": "\n\nLet me double check this using Python:\n\n"})
        assistant_parts.append({"type": "python", "text": f"'{word}'.count('{letter}')"})
        assistant_parts.append({"type": "python_output", "text": str(count)})
        assistant_parts.append({"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"})

        messages = [
            {"role": "user", "content": user_msg},
            {"role": "assistant", "content": assistant_parts},
        ]
        conversation = {
            "messages": messages,
        }
        return conversation

    def evaluate(self, conversation, assistant_response):
        # the answer ends in GSM8K's "#### <count>" line: graded exactly as GSM8K grades
        return evaluate_final_answer(conversation, assistant_response)

    # reward: Task's, the 0/1 correctness (float(self.evaluate(...))), just like GSM8K


class SimpleSpelling(WordTask):
    """ A much simpler task to get the model to just practice spelling words. """

    def __init__(self, size=1000, split="train", word_list_path=None, **kwargs):
        super().__init__(size, split, word_list_path, **kwargs)
        rng = random.Random(42)
        rng.shuffle(self.words)  # a different word order than SpellingBee's

    def get_example(self, index):
        rng = self.example_rng(index)
        word = rng.choice(self.words)
        word_letters = ",".join(list(word))
        messages = [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{word_letters}"},
        ]
        conversation = {
            "messages": messages,
        }
        return conversation


if __name__ == "__main__":
    # preview the first few SpellingBee examples, with tool calls shown inline
    task = SpellingBee()
    for i in range(10):
        ex = task.get_example(i)
        print("=" * 100)
        print(ex['messages'][0]['content'])
        print("-" * 100)
        for part in ex['messages'][1]['content']:
            if part['type'] == 'text':
                print(part['text'], end='')
            elif part['type'] == 'python':
                print(f"<<{part['text']}=", end='')
            elif part['type'] == 'python_output':
                print(f"{part['text']}>>", end='')
        print()
