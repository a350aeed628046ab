"""Model-based test: random program steps on the core and on a local directory must agree.

See :mod:`tests.core.model` for what a step is and what is compared after each
one. The default suite has two seeded runs (each ends with a close-all/drain/restart
checkpoint): :data:`MODEL_STEPS` steps with the mount's default cache TTLs and
a kernel dentry cache, and :data:`MODEL_STEPS_NO_CACHES` steps with every
cache off, and :data:`MODEL_STEPS_S3` steps on S3 (moto on 127.0.0.1). On a mismatch the sequence is
shrunk (bounded) and printed as a numbered script.

Environment knobs (for exploring; CI uses the defaults):

* ``GSTORE_MODEL_SEEDS=1,2,3`` — run these seeds instead (in every configuration, or in
  ``GSTORE_MODEL_CONFIGS=mount-defaults,no-caches,s3``);
* ``GSTORE_MODEL_STEPS=2000`` — steps per run;
* ``GSTORE_MODEL_SHRINK_SECONDS=0`` — don't shrink a failure (default 20 s at most).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from .model import MOUNT_DEFAULTS, NO_CACHES, S3, Config, format_steps, run_model, shrink

#: The seed of the runs in the default test suite.
MODEL_SEED = 20250601
#: Steps of the run with the mount's default caches (a final restart checkpoint comes on top).
MODEL_STEPS = 500
#: Steps of the run with every cache off (each step costs more backend calls; a different seed).
MODEL_STEPS_NO_CACHES = 250
#: Steps of the run on S3 (moto on 127.0.0.1; every request is an HTTP round trip).
MODEL_STEPS_S3 = 120
#: What each model run did (config, seed, steps, seconds, outcome): printed in the terminal summary.
MODEL_RUNS: list[str] = []

_SEEDS = os.environ.get("GSTORE_MODEL_SEEDS")
_STEPS = os.environ.get("GSTORE_MODEL_STEPS")
SHRINK_SECONDS = float(os.environ.get("GSTORE_MODEL_SHRINK_SECONDS", "20"))

if _SEEDS:
    _CONFIGS = {c.name: c for c in (MOUNT_DEFAULTS, NO_CACHES, S3)}
    _CHOSEN = os.environ.get("GSTORE_MODEL_CONFIGS", "mount-defaults,no-caches,s3").split(",")
    RUNS = [(_CONFIGS[name.strip()], int(seed), int(_STEPS or MODEL_STEPS))
            for seed in _SEEDS.split(",") if seed.strip() for name in _CHOSEN if name.strip()]
else:
    RUNS = [(MOUNT_DEFAULTS, MODEL_SEED, int(_STEPS or MODEL_STEPS)),
            (NO_CACHES, MODEL_SEED + 1, int(_STEPS or MODEL_STEPS_NO_CACHES)),
            (S3, MODEL_SEED + 2, int(_STEPS or MODEL_STEPS_S3))]


@pytest.mark.parametrize(("config", "seed", "steps"), RUNS, ids=[f"{c}-{s}" for c, s, _ in RUNS])
async def test_model_matches_local_directory(tmp_path: Path, config: Config, seed: int, steps: int,
                                             record_property) -> None:
    started = time.monotonic()
    result = await run_model(tmp_path / "run", seed=seed, steps=steps, config=config)
    elapsed = time.monotonic() - started
    ran = len(result.steps)
    counts = ", ".join(f"{op} {n}" for op, n in sorted(result.counts.items()))
    record_property("model_seed", seed)
    record_property("model_steps", ran)
    if result.failure is None:
        MODEL_RUNS.append(f"model {config} seed {seed}: {ran} steps passed in {elapsed:.1f}s ({counts})")
        return
    MODEL_RUNS.append(f"model {config} seed {seed}: FAILED at step {ran - 1} of {steps + 1} after {elapsed:.1f}s "
                      f"[{result.failure.category}]")
    message = [
        f"the core and the local directory disagree ({config}, seed {seed}, step {ran - 1}):",
        f"  {result.failure.message}",
        "",
        "steps run (with the reference's result of each):",
        result.script if ran <= 80 else "\n".join(result.script.splitlines()[-60:]),
    ]
    if SHRINK_SECONDS > 0 and ran > 1:
        small, failure, initial, runs = await shrink(tmp_path / "shrink", result, budget=SHRINK_SECONDS,
                                                     config=config)
        start = "the usual seed files" if initial is None else (
            "these files (the state at a clean restart): "
            + ", ".join(f"{p} ({len(d)} bytes)" for p, d in sorted(initial.items())))
        message += [
            "",
            f"shrunk to {len(small)} steps ({runs} replays) that fail the same way, starting from {start}:",
            format_steps(small),
            f"  which gives: {failure.message}",
        ]
    pytest.fail("\n".join(message), pytrace=False)
