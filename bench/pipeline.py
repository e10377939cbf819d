"""Pipeline benchmark: studies/minute through two worker processes with the tiny model, and the
pipeline's own overhead per study (everything except model time), from the recorded stage times.

    .venv/bin/python bench/pipeline.py [--studies 12] [--slices 40] [--redis redis://127.0.0.1:6379/15]
                                       [--baseline-tree DIR [--rounds 2]]

Each study is one generated CT series (512x512, ``--slices`` slices) sent over DICOM to an
in-process listener; two ``taqrir worker`` processes (all queues, concurrency 1) on Redis do the
drafting against a SQLite file. Overhead = render + persist + publish + the non-model part of the
inference stage (reading key images, building prompts, guards). The share of overhead is reported
against the measured tiny-model time and against an assumed BiMediX2 time per study
(``--model-seconds``, default 20 s for an English draft plus its Arabic translation on one GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlmodel import select

from ground.db import session_scope
from inference.tiny import write_tiny
from integrations.dicom.index import Study
from reporting.draft_record import DraftRecord
from taqrir import wiring
from taqrir.demo import send_files
from taqrir.settings import load_settings
from tests.factories.studies import make_ct_series


def compare_trees(args: argparse.Namespace) -> None:
    """Run this tree's and the baseline tree's benchmark in turn, each in a process of its own."""
    here = Path(__file__).resolve().parent.parent
    own = ["--studies", str(args.studies), "--slices", str(args.slices), "--redis", args.redis,
           "--model-seconds", str(args.model_seconds)]
    for round_no in range(1, args.rounds + 1):
        for name, tree in (("this tree", here), ("baseline tree", args.baseline_tree.resolve())):
            python = tree / ".venv" / "bin" / "python"
            print(f"--- round {round_no}, {name} ({tree})", flush=True)
            subprocess.run([str(python) if python.exists() else sys.executable, str(tree / "bench" / "pipeline.py"),
                            *own], cwd=tree, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=12)
    ap.add_argument("--slices", type=int, default=40)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--model-seconds", type=float, default=20.0)
    ap.add_argument("--baseline-tree", type=Path, default=None,
                    help="also run this checkout's own bench/pipeline.py (with its .venv), alternating with this "
                         "tree, --rounds times each: before/after figures from one run")
    ap.add_argument("--rounds", type=int, default=2, help="with --baseline-tree: runs of each tree")
    args = ap.parse_args()
    if args.baseline_tree is not None:
        compare_trees(args)
        return
    work = Path(tempfile.mkdtemp(prefix="taqrir-bench-pipeline-"))
    model = write_tiny(work / "tiny-hf", layout="hf")
    env = {"TAQRIR_DATA_DIR": str(work / "data"), "TAQRIR_QUEUE__BROKER_URL": args.redis,
           "TAQRIR_INFERENCE__MODEL_PATH": str(model), "TAQRIR_INFERENCE__TORCH_THREADS": "1",
           "TAQRIR_STUDY__STABLE_AFTER": "1", "TAQRIR_STUDY__SWEEP_INTERVAL": "0.2",
           "TAQRIR_LISTENER__MIN_FREE_BYTES": "0", "TAQRIR_LISTENER__HOST": "127.0.0.1",
           "TAQRIR_LISTENER__PORT": "0", "TAQRIR_LOG_LEVEL": "WARNING", "TAQRIR_QUEUE__REQUEUE_AFTER": "600"}
    os.environ.update(env)
    subprocess.run(["redis-cli", "-u", args.redis, "flushdb"], capture_output=True)
    settings = load_settings()
    engine = wiring.migrated_engine(settings)  # a scratch database of its own
    studies = [make_ct_series(work / f"src{i}", args.slices, seed=i, patient_id=f"P{i:03d}") for i in range(args.studies)]
    workers = [subprocess.Popen([sys.executable, "-m", "taqrir", "worker", "--queues", "render,infer,publish"],
                                env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for _ in range(2)]
    parts = wiring.receiving(settings, engine, signed_srs=False, sweep_every=5.0, atna=False)
    port = parts.start()
    try:
        time.sleep(12)  # workers import torch and load the model before the clock starts
        t0 = time.perf_counter()
        for files in studies:
            send_files(port, files)
        sent_s = time.perf_counter() - t0
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            with session_scope(engine) as s:
                states = [st.state for st in s.exec(select(Study)).all()]
            if len(states) == args.studies and all(x in ("drafted", "failed") for x in states):
                break
            time.sleep(0.2)
        total_s = time.perf_counter() - t0
        with session_scope(engine) as s:
            times = [json.loads(d.stage_times) for d in s.exec(select(DraftRecord)).all()]
        drafted = len(times)
        overhead = [t.get("render_s", 0) + t.get("persist_s", 0) + t.get("publish_s", 0)
                    + max(t.get("infer_s", 0) - t.get("model_latency_s", 0), 0) for t in times]
        model = [t.get("model_latency_s", 0) for t in times]
        print(f"{drafted}/{args.studies} studies drafted ({args.slices} x 512² CT each) in {total_s:.1f}s "
              f"(sending took {sent_s:.1f}s, stable_after 1s): {drafted / total_s * 60:.1f} studies/minute, 2 workers")
        print(f"per study, median: overhead {statistics.median(overhead) * 1000:.0f} ms "
              f"(render {statistics.median(t.get('render_s', 0) for t in times) * 1000:.0f}, "
              f"persist {statistics.median(t.get('persist_s', 0) for t in times) * 1000:.0f}, "
              f"publish {statistics.median(t.get('publish_s', 0) for t in times) * 1000:.0f}, "
              f"non-model inference {statistics.median(max(t.get('infer_s', 0) - t.get('model_latency_s', 0), 0) for t in times) * 1000:.0f}); "
              f"tiny model {statistics.median(model) * 1000:.0f} ms")
        med = statistics.median(overhead)
        print(f"overhead share: {med / (med + statistics.median(model)) * 100:.1f}% with the tiny model; "
              f"{med / (med + args.model_seconds) * 100:.2f}% at an assumed {args.model_seconds:.0f} s BiMediX2 study")
    finally:
        parts.close()
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(timeout=30)


if __name__ == "__main__":
    main()
