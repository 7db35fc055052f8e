"""What putting a session down and picking it up costs: re-feeding the token history vs restoring the saved state
tensors, for a long GPT-2 context (the REPL's :save / :load, see repl/app.py).

    python -m benchmarks.session_restore [--model PATH] [--tokens 1000] [--threads 2]

Default model: the cached GPT-2-small-shaped fp32 file the other benchmarks build (random weights: cost only).
Timed: re-feed = ``Session.restore`` without state, then the first next-token distribution (one onnxruntime run
over the history); state = decoding the saved JSON document's arrays plus ``Session.restore`` with them, then the
same distribution (no model run). Also the file sizes. Median of 3 after one untimed run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.model_files import GPT2_SMALL, model_file
from benchmarks.runners import open_model
from repl.app import decode_array, encode_array
from runtime.generate import Session
from runtime.settings import Settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    path = args.model or model_file(GPT2_SMALL, Path.home() / ".cache" / "textgen-bench")
    model = open_model(path, args.threads)
    settings = Settings(model.info.generation)
    session = Session(model, settings)
    rng = np.random.default_rng(0)
    session.history.extend(rng.integers(0, model.info.vocab_size - 1, size=args.tokens).tolist())
    session.next_token_probs(1)  # feeds the history: the state a :save would write
    snapshot = session.snapshot()
    document = json.dumps({name: encode_array(array) for name, array in snapshot.state.items()}
                          | {"logits": encode_array(snapshot.logits)})
    history_json = json.dumps(snapshot.history)

    def refeed() -> None:
        fresh = Session(model, settings)
        fresh.restore(type(snapshot)(snapshot.history, [], 0, 0, None, None))
        fresh.next_token_probs(1)

    def restore_state() -> None:
        arrays = {name: decode_array(value, name) for name, value in json.loads(document).items()}
        logits = arrays.pop("logits")
        fresh = Session(model, settings)
        fresh.restore(type(snapshot)(snapshot.history, [], snapshot.fed_start, snapshot.fed_end, arrays, logits))
        fresh.next_token_probs(1)

    print(f"{path.name}: {args.tokens}-token context, {args.threads} threads")
    for name, action in (("re-feed the history", refeed), ("restore the state tensors", restore_state)):
        action()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            action()
            times.append(time.perf_counter() - start)
        print(f"  {name:<28} {statistics.median(times) * 1000:9.1f} ms (min {min(times) * 1000:.1f}, "
              f"max {max(times) * 1000:.1f})")
    print(f"  session file: history alone {len(history_json) / 1e6:.2f} MB; "
          f"with the state {len(document) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
