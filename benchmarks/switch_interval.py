"""A/B for D18's switch interval: `mopo.main` on CUDA (hopper-medium-v2 with a local file, evaluations beside
training), alternating Python's switch interval while an evaluation runs: 0.1 ms (what `Evaluator` sets) and the
default 5 ms (`Evaluator`'s call made a no-op). One ensemble (5 epochs) is trained first and reused by every run.

    python benchmarks/switch_interval.py hopper_random_100k.hdf5 --epochs 10 --out switch_ab.json
"""
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mopo  # noqa: E402


@dataclass
class Args:
    dataset_path: tyro.conf.Positional[str]
    """a hopper file in D4RL layout (benchmarks/make_dataset.py)"""
    epochs: int = 10
    """epochs of 1,000 updates per run"""
    pairs: int = 3
    """runs at each setting, alternating"""
    device: str = "cuda"
    out: str = "switch_ab.json"


def main(args: Args) -> list:
    out = Path(args.out).resolve()
    base = dict(env_id="hopper-medium-v2", dataset_path=str(Path(args.dataset_path).resolve()), device=args.device,
                seed=0)
    os.chdir(tempfile.mkdtemp())
    mopo.main(mopo.Args(**base, epochs=0, dynamics_max_epochs=5))
    dynamics = str(next(Path("runs").iterdir()))
    set_interval, results = sys.setswitchinterval, []
    try:
        for label in ["0.1 ms", "5 ms"] * args.pairs:
            sys.setswitchinterval = set_interval if label == "0.1 ms" else (lambda interval: None)
            began = time.perf_counter()
            r = mopo.main(mopo.Args(**base, epochs=args.epochs, dynamics_path=dynamics))
            results.append({"switch_interval": label, "s": time.perf_counter() - began,
                            "final_return": r["final_return"]})
            print(results[-1], flush=True)
            out.write_text(json.dumps(results, indent=1))
    finally:
        sys.setswitchinterval = set_interval
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
