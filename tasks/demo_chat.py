"""
The chat set shipped with mlxchat (mlxchat/data/demo_chat, CC0): conversations for SFT and
calculator problems in GSM8K's format, used by the offline demo's SFT and RL.
"""
import json
import os

from tasks.common import HubDataset, Task
from tasks.gsm8k import GSM8K

DEMO_CHAT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mlxchat", "data", "demo_chat")


class DemoCalculator(GSM8K):
    """Rows in GSM8K's format ({"question", "answer"} with <<expr=result>> calculator marks and a final
    "#### N") read from a JSONL file: GSM8K's conversion into tool-call parts and its reward apply as is."""

    def __init__(self, filepath, **kwargs):
        Task.__init__(self, **kwargs)
        import pyarrow as pa
        if not os.path.exists(filepath):
            raise FileNotFoundError(f"{filepath} does not exist: regenerate the demo chat set with `python -m scripts.gen_demo_chat`")
        with open(filepath, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for i, row in enumerate(rows, 1):
            if not (isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("answer"), str)):
                raise ValueError(f"{filepath}:{i}: expected {{\"question\": str, \"answer\": str}} (GSM8K's row format)")
        self.ds = HubDataset(pa.Table.from_pylist(rows, schema=pa.schema([("question", pa.string()), ("answer", pa.string())])))
