"""
The README's screenshots of the dashboard, taken from a real run: the demo preset trains on this
machine, and each pane is saved as an SVG (Textual's own screenshots) while it trains and after.

    python -m scripts.tui_screenshots                    # -> docs/screenshots/{configure,monitor,chat,runs}.svg
    python -m scripts.tui_screenshots --steps 150 --size 120x36
"""
import argparse
import asyncio
import os
import tempfile
import time

import mlxchat  # noqa: F401  (preloads OpenBLAS before mlx)


async def take(out_dir, steps, size):
    from tui.app import MlxchatApp
    from tui.panes.chat import ChatPane
    work = tempfile.mkdtemp(prefix="mlxchat_shots_")
    os.environ.setdefault("MLXCHAT_BASE_DIR", os.path.join(work, "base"))
    runs_dir = os.path.join(work, "runs")
    app = MlxchatApp(runs_dir=runs_dir, preset="demo",
                     overrides={"run_name": "demo-run", "num_iterations": str(steps), "eval_every": str(max(steps // 6, 1)),
                                "sample_every": str(max(steps // 3, 1)), "save_every": str(max(steps // 3, 1))})

    async def until(pilot, predicate, timeout=1800):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("the run did not get there in time")
            await pilot.pause(0.2)

    def shot(name):
        path = app.save_screenshot(filename=f"{name}.svg", path=out_dir)
        print(f"wrote {path}", flush=True)

    try:
        async with app.run_test(size=size) as pilot:
            await until(pilot, lambda: app.machine is not None)
            await pilot.pause(0.5)
            shot("configure")
            await pilot.press("r")
            await until(pilot, lambda: app.state is not None and app.state.step >= int(0.7 * steps) and app.state.samples)
            await pilot.pause(1.0)
            shot("monitor")
            await until(pilot, lambda: app.state.state == "finished")
            await pilot.press("3")
            chat = app.query_one(ChatPane)
            chat.open_checkpoint(os.path.join(runs_dir, "demo-run"))
            await pilot.pause(3.0)
            box = app.query_one("#chat-input")
            box.value = "The state of the union is"
            await box.action_submit()
            await until(pilot, lambda: "tok/s" in str(chat.query_one("#chat-status").render()), timeout=120)
            await pilot.pause(0.5)
            shot("chat")
            await pilot.press("escape", "escape", "4")
            await pilot.pause(1.0)
            shot("runs")
    finally:
        app.shutdown_workers(120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "screenshots"))
    p.add_argument("--steps", type=int, default=150, help="steps of the demo run")
    p.add_argument("--size", default="110x34", help="terminal size, COLSxROWS")
    args = p.parse_args(argv)
    cols, rows = (int(x) for x in args.size.lower().split("x"))
    os.makedirs(args.out, exist_ok=True)
    asyncio.run(take(args.out, args.steps, (cols, rows)))


if __name__ == "__main__":
    main()
