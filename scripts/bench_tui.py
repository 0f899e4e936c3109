"""
What the dashboard costs, measured (a benchmark, not a test):

1. training speed of the same run in the dashboard and in the script, side by side: `python -m
   scripts.base_train <flags>` and `mlxchat-tui --preset P --set ... --start` in a real terminal (tmux),
   alternated A B A B so that drift of the machine hits both alike; tok/s from each run's own
   metrics.jsonl (the median step time, after the first steps);
2. the dashboard's input-to-screen latency while it trains, in a dashboard run of its own after the
   speed runs (each redraw is work that must not count against them): a key press (switching panes
   with 1 and 2) sent with `tmux send-keys`, until `tmux capture-pane` shows the other pane (the
   polling's own few milliseconds are included, so the figure is an upper bound);
3. chat reply speed with and without training running in the same process: the dashboard's chat
   thread (tui/chat_worker.py) replying from the run's checkpoint while a training thread runs, and
   while it does not.

    python -m scripts.bench_tui                        # the demo model, 60 steps per run, 2 runs each
    python -m scripts.bench_tui --steps 100 --repeats 3 --presses 200
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import mlxchat  # noqa: F401  (preloads OpenBLAS before mlx)

from mlxchat.training import read_metrics

TUI = os.path.join(os.path.dirname(sys.executable), "mlxchat-tui")


def step_times(run_dir, skip):
    steps = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["event"] == "step"]
    return [r["dt"] for r in steps[skip:]], (steps[0]["total"] if steps else None)


def tokens_per_step(run_dir):
    started = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["event"] == "started"]
    return started[-1]["tokens_per_step"]


def screen(session):
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout


def wait_screen(session, predicate, timeout):
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        text = screen(session)
        if predicate(text):
            return text
        time.sleep(0.002)
    raise TimeoutError(f"the screen did not show what was expected in {timeout}s:\n{screen(session)}")


def run_script(flags, run_dir, env):
    subprocess.run([sys.executable, "-m", "scripts.base_train", *flags, "--checkpoint-dir", run_dir], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_dashboard(preset, sets, runs_dir, name, env, presses=0, size=(120, 40)):
    """Train in mlxchat-tui under tmux. With presses: time that many key presses while it trains, then
    quit (the run stops with a checkpoint) and return the latencies (s); without: wait for the run's end."""
    session = f"bench-tui-{uuid.uuid4().hex[:6]}"
    done = os.path.join(runs_dir, f".{name}.exit")
    args = " ".join(f"--set {k}={v}" for k, v in {**sets, "run_name": name}.items())
    envs = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith("MLXCHAT_"))
    command = f"env {envs} TERM=xterm-256color {TUI} --runs-dir {runs_dir} --preset {preset} {args} --start; echo $? > {done}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", str(size[0]), "-y", str(size[1]), command], check=True)
    latencies = []
    try:
        wait_screen(session, lambda t: " running " in t.splitlines()[0] if t else False, 300)
        on_monitor = True
        for _ in range(presses):
            if not os.path.exists(os.path.join(runs_dir, name, "metrics.jsonl")) or os.path.exists(done):
                break
            key, want = ("1", "Stage") if on_monitor else ("2", "step ")
            t0 = time.perf_counter()
            subprocess.run(["tmux", "send-keys", "-t", session, key], check=True)
            try:
                wait_screen(session, lambda t, w=want: w in "\n".join(t.splitlines()[3:6]), 10)
            except TimeoutError:
                break  # the run ended meanwhile (the app left the screen)
            latencies.append(time.perf_counter() - t0)
            on_monitor = not on_monitor
            time.sleep(0.05)
        if presses:
            for key in ("q", "y"):  # quit, confirmed: the run stops with a checkpoint and the app exits
                subprocess.run(["tmux", "send-keys", "-t", session, key], check=True)
                time.sleep(0.5)
        deadline = time.time() + 1800
        while not os.path.exists(done) and time.time() < deadline:
            state = read_metrics(os.path.join(runs_dir, name, "metrics.jsonl"))
            if state and state[-1]["event"] == "finished":
                subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
            time.sleep(0.5)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    return latencies


def run_dashboard_headless(preset, sets, runs_dir, name):
    """The dashboard in this process without a terminal (Textual's headless mode: everything but the
    writes to a terminal), for machines without tmux (the GPU machine)."""
    import asyncio
    from tui.app import MlxchatApp

    async def go():
        app = MlxchatApp(runs_dir=runs_dir, preset=preset, overrides={**{k: str(v) for k, v in sets.items()}, "run_name": name})
        try:
            async with app.run_test(headless=True, size=(120, 40)) as pilot:
                await pilot.pause(0.5)
                app.action_start()
                while app.state is None or app.state.state not in ("finished", "failed", "stopped"):
                    await pilot.pause(0.2)
                if app.state.state != "finished":
                    raise RuntimeError(f"the dashboard's run ended {app.state.state}: {app.state.error}")
        finally:
            app.shutdown_workers(300)
    asyncio.run(go())


def run_thread(flags, run_dir):
    """The script's run object on a background thread of this process, with no UI: tells the cost of the
    dashboard's screen from the cost of training off the main thread."""
    from mlxchat.pretrain import BaseTrainConfig, BaseTrainRun
    from mlxchat.training import run_in_thread
    from scripts._shell import config_from_args, make_parser
    config = config_from_args(BaseTrainConfig, make_parser("bench", BaseTrainConfig).parse_args(flags))
    config.checkpoint_dir = run_dir
    thread = run_in_thread(BaseTrainRun(config, freeze_gc=True), on_event=None, name="bench-thread")
    thread.join()
    if thread.error is not None:
        raise thread.error


def chat_speed(checkpoint_dir, tokens, train_flags, repeats=3):
    """Reply tok/s of the dashboard's chat thread, idle and beside a training thread."""
    from mlxchat.pretrain import BaseTrainConfig, BaseTrainRun
    from mlxchat.training import run_in_thread
    from scripts._shell import config_from_args, make_parser
    from tui.chat_worker import ChatWorker, ModelFailed, ModelLoaded, ReplyDone

    class Inbox:
        def __init__(self):
            self.messages, self.event = [], threading.Event()

        def post_message(self, message):
            self.messages.append(message)
            self.event.set()
            return True

        def wait(self, kind, timeout=600):
            deadline = time.time() + timeout
            while time.time() < deadline:
                for m in self.messages:
                    if isinstance(m, kind) or isinstance(m, ModelFailed):
                        self.messages.remove(m)
                        if isinstance(m, ModelFailed):
                            raise RuntimeError(m.error)
                        return m
                self.event.wait(0.05)
                self.event.clear()
            raise TimeoutError(kind.__name__)

    inbox = Inbox()
    worker = ChatWorker(inbox)
    worker.start()
    worker.load_checkpoint(checkpoint_dir)
    inbox.wait(ModelLoaded)

    def replies():
        out = []
        for i in range(repeats):
            worker.new_conversation()
            worker.generate("Tell me about the state of the union.", temperature=1.0, top_k=50, max_tokens=tokens)
            done = inbox.wait(ReplyDone)
            out.append(done.tok_per_sec)
        return out

    idle = replies()
    parser = make_parser("bench", BaseTrainConfig)
    config = config_from_args(BaseTrainConfig, parser.parse_args(train_flags))
    config.num_iterations, config.checkpoint_dir = 100000, os.path.join(tempfile.mkdtemp(), "busy")
    config.eval_every = config.sample_every = config.save_every = -1
    run = BaseTrainRun(config)
    thread = run_in_thread(run, on_event=None, name="bench-train")
    while run.step < 3 and thread.is_alive():
        time.sleep(0.1)
    worker.training_control = run.control  # as the dashboard does: the run holds while a reply streams
    busy = replies()
    held_at = run.step
    time.sleep(2.0)
    if run.step == held_at:
        raise RuntimeError("the training run did not go on after the replies")
    run.control.stop()
    thread.join()
    worker.shutdown()
    return idle, busy


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", help="the dashboard preset whose model both sides train (default demo)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    p.add_argument("--skip", type=int, default=10, help="first steps left out of the speed (compilation, warm-up)")
    p.add_argument("--repeats", type=int, default=2, help="runs per side, alternated")
    p.add_argument("--presses", type=int, default=100, help="key presses timed while the dashboard trains (in a run "
                   "of their own, after the speed runs)")
    p.add_argument("--chat-tokens", type=int, default=128, help="tokens per chat reply")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="change the preset for both sides, e.g. --set depth=8 --set max_seq_len=1024 (a GPU needs a larger "
                        "step than the demo's to time anything but the host)")
    p.add_argument("--chat-only", action="store_true", help="only the chat figures (one script run makes the checkpoint)")
    p.add_argument("--thread", action="store_true", help="also time the run on a background thread of a process "
                   "without a UI (what the dashboard does, minus its screen)")
    p.add_argument("--headless", action="store_true", help="run the dashboard in this process without a terminal "
                   "(no latency figures); the default when tmux or the mlxchat-tui script is missing")
    args = p.parse_args(argv)
    if shutil.which("tmux") is None or not os.path.exists(TUI):
        args.headless = True

    from tui.presets import PRESETS, command_line, STAGES
    preset = dict(PRESETS[args.preset])
    stage = preset.pop("stage")
    if stage != "base":
        sys.exit("--preset: a pretraining preset (demo, d12, d20)")
    # no evaluation, samples or checkpoints in between: the runs differ only in who drives them
    from tui.presets import field_info
    info = field_info("base")
    changes = {}
    for item in args.set:
        name, _, value = item.partition("=")
        changes[name] = info[name][2](value)  # KeyError: not a base_train setting
    changes.update(num_iterations=args.steps, eval_every=-1, sample_every=-1, save_every=-1)
    preset.update(changes)
    work = tempfile.mkdtemp(prefix="bench_tui_")
    env = dict(os.environ, MLXCHAT_BASE_DIR=os.path.join(work, "base"))
    config = STAGES["base"][0](**preset)
    flags = command_line("base", config).split()[3:]  # the flags after `python -m scripts.base_train`
    sets = changes  # over the preset, in the dashboard's Configure pane
    print(f"bench_tui: {'headless dashboard (in this process), ' if args.headless else 'dashboard in tmux, '}"
          f"{args.preset} preset{' with ' + ', '.join(args.set) if args.set else ''}, {args.steps} steps per run, speed from steps {args.skip + 1}-{args.steps}, "
          f"{args.repeats} runs per side alternated; work dir {work}", flush=True)
    if args.chat_only:
        run_dir = os.path.join(work, "script", "chat")
        run_script(flags, run_dir, env)
        os.environ["MLXCHAT_BASE_DIR"] = env["MLXCHAT_BASE_DIR"]
        idle, busy = chat_speed(run_dir, args.chat_tokens, flags, repeats=3)
        print(f"chat reply ({args.chat_tokens} tokens): {statistics.median(idle):,.0f} tok/s alone, {statistics.median(busy):,.0f} "
              f"tok/s while a run trains in the same process (held at a step boundary while the reply streams)")
        return
    script_tps, tui_tps, thread_tps, latencies = [], [], [], []
    for i in range(args.repeats):
        run_dir = os.path.join(work, "script", f"r{i}")
        run_script(flags, run_dir, env)
        dts, _ = step_times(run_dir, args.skip)
        script_tps.append(tokens_per_step(run_dir) / statistics.median(dts))
        print(f"  script    run {i + 1}: {script_tps[-1]:,.0f} tok/s (median step {statistics.median(dts) * 1000:.1f} ms)", flush=True)
        runs_dir = os.path.join(work, "tui")
        os.makedirs(runs_dir, exist_ok=True)
        if args.headless:
            os.environ["MLXCHAT_BASE_DIR"] = env["MLXCHAT_BASE_DIR"]
            run_dashboard_headless(args.preset, sets, runs_dir, f"r{i}")
        else:
            run_dashboard(args.preset, sets, runs_dir, f"r{i}", env)
        dts, _ = step_times(os.path.join(runs_dir, f"r{i}"), args.skip)
        tui_tps.append(tokens_per_step(os.path.join(runs_dir, f"r{i}")) / statistics.median(dts))
        print(f"  dashboard run {i + 1}: {tui_tps[-1]:,.0f} tok/s (median step {statistics.median(dts) * 1000:.1f} ms)", flush=True)
        if args.thread:
            run_dir = os.path.join(work, "thread", f"r{i}")
            run_thread(flags, run_dir)
            dts, _ = step_times(run_dir, args.skip)
            thread_tps.append(tokens_per_step(run_dir) / statistics.median(dts))
            print(f"  thread    run {i + 1}: {thread_tps[-1]:,.0f} tok/s (median step {statistics.median(dts) * 1000:.1f} ms)",
                  flush=True)
    if not args.headless and args.presses:
        # a run of its own: each key press redraws a pane, work that the speed runs above must not include
        latencies = run_dashboard(args.preset, {**sets, "num_iterations": 100_000}, os.path.join(work, "tui"), "keys", env,
                                  presses=args.presses)
    s, t = statistics.median(script_tps), statistics.median(tui_tps)
    print(f"\ntraining: script {s:,.0f} tok/s, dashboard {t:,.0f} tok/s: the dashboard costs {100 * (s - t) / s:+.1f}% "
          f"(runs: script {', '.join(f'{x:,.0f}' for x in script_tps)}; dashboard {', '.join(f'{x:,.0f}' for x in tui_tps)})")
    if thread_tps:
        th = statistics.median(thread_tps)
        print(f"training on a background thread without a UI: {th:,.0f} tok/s ({100 * (s - th) / s:+.1f}% against the script)")
    if latencies:
        ms = sorted(x * 1000 for x in latencies)
        p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
        print(f"key press to screen while training ({len(ms)} presses, tmux): median {statistics.median(ms):.0f} ms, "
              f"p99 {p99:.0f} ms, max {ms[-1]:.0f} ms")
    idle, busy = chat_speed(os.path.join(work, "tui", "r0"), args.chat_tokens, flags, repeats=3)
    print(f"chat reply ({args.chat_tokens} tokens): {statistics.median(idle):,.0f} tok/s alone, {statistics.median(busy):,.0f} "
          f"tok/s while a run trains in the same process (held at a step boundary while the reply streams)")


if __name__ == "__main__":
    main()
