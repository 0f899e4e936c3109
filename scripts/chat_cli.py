"""
Chat with a model in the terminal (nanochat's scripts/chat_cli.py, in MLX).

    python -m scripts.chat_cli                          # the latest SFT model in the base dir
    python -m scripts.chat_cli -i rl -g d12 -s 400      # source / model tag / step
    python -m scripts.chat_cli -p "Why is the sky blue?"  # one answer, then exit
    python -m scripts.chat_cli --checkpoint-dir ~/nanochat/chatsft_checkpoints/d20   # any directory, nanochat's too
    python -m scripts.chat_cli --quantize 4             # 4-bit weights: less memory, faster decoding

In the chat, type `clear` to start a new conversation and `quit` or `exit` (or Ctrl-D) to leave.
Replies stream as they are generated. When the conversation outgrows the model's context, the
oldest turns are dropped (with a notice). The model may use its calculator tool: the
<|python_start|> ... <|python_end|> call and the <|output_start|> ... <|output_end|> result are
shown as they appear in the token stream.
"""
import argparse
import sys

import mlxchat  # noqa: F401  (preloads OpenBLAS on Linux before mlx)

from mlxchat.chat import Conversation, ReplyEnd, fit_context, stream_chat  # noqa: F401  (fit_context: still importable from here)
from mlxchat.checkpoint_manager import build_model, find_last_step, load_model
from mlxchat.engine import Engine
from mlxchat.quantize import cast_linear_weights, quantize_model


def load(args):
    if args.checkpoint_dir:
        step = args.step if args.step is not None else find_last_step(args.checkpoint_dir)
        model, tokenizer, _ = build_model(args.checkpoint_dir, step)
    else:
        model, tokenizer, _ = load_model(args.source, model_tag=args.model_tag, step=args.step)
    if tokenizer is None:
        from mlxchat.tokenizer import get_tokenizer
        tokenizer = get_tokenizer()
    # inference form: weights stored in the compute dtype (same outputs, half the bytes per step on a GPU)
    cast_linear_weights(model)
    if args.quantize:
        quantize_model(model, args.quantize)
    return model, tokenizer


def stream_reply(engine, tokenizer, prompt, out, **kwargs):
    """Generate and print the reply as it comes (UTF-8 safe: mlxchat.chat.stream_chat); returns its
    tokens (without <|assistant_end|>). kwargs: stream_chat's (max_tokens, temperature, ...)."""
    for piece in stream_chat(engine, tokenizer, prompt, **kwargs):
        if isinstance(piece, ReplyEnd):
            reply = piece.tokens
        else:
            out.write(piece.text)
            out.flush()
    out.write("\n")
    out.flush()
    return reply


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--source", default="sft", choices=["base", "sft", "rl"], help="which model stage to load from the base dir")
    p.add_argument("-g", "--model-tag", default=None, help="model tag, e.g. d12 (default: the largest)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--checkpoint-dir", default=None, help="load this checkpoint directory instead (ours or nanochat's; tokenizer.pkl beside it or in the base dir)")
    p.add_argument("-p", "--prompt", default="", help="answer this one prompt and exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    p.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the most likely tokens holding this much probability")
    p.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply")
    p.add_argument("--quantize", type=int, default=None, choices=[4, 8], help="quantize the weights to this many bits")
    p.add_argument("--seed", type=int, default=42, help="sampling seed of the first reply (then +1 per reply)")
    args = p.parse_args(argv)
    if args.temperature < 0 or args.top_k < 0 or args.max_tokens < 1:
        p.error("--temperature and --top-k must be >= 0, --max-tokens >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")

    model, tokenizer = load(args)
    engine = Engine(model, tokenizer)
    conversation = Conversation(tokenizer, model.config.sequence_len)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)

    if not args.prompt:
        print("mlxchat interactive mode")
        print("-" * 50)
        print("Type 'quit' or 'exit' to end the conversation, 'clear' to start a new one")
        print("-" * 50)
    seed = args.seed
    while True:
        if args.prompt:
            user_input = args.prompt
        else:
            try:
                user_input = input("\nUser: ").strip()
            except (EOFError, KeyboardInterrupt):
                print("\nGoodbye!")
                break
            if user_input.lower() in ("quit", "exit"):
                print("Goodbye!")
                break
            if user_input.lower() == "clear":
                conversation.clear()
                print("Conversation cleared.")
                continue
            if not user_input:
                continue

        prompt, max_tokens, notice = conversation.prompt(user_input, args.max_tokens)
        if notice:
            print(f"[context: {notice}]", file=sys.stderr)

        if not args.prompt:
            print("\nAssistant: ", end="", flush=True)
        try:
            reply = stream_reply(engine, tokenizer, prompt, sys.stdout, max_tokens=max_tokens, seed=seed, **sampling)
        except KeyboardInterrupt:
            print("\n[interrupted]")
            reply = []
        seed += 1
        conversation.add_reply(reply)
        if args.prompt:
            break


if __name__ == "__main__":
    main()
