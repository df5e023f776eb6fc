"""Recipe search: run several base -> Sparse Context fine-tune pipelines side by side and score each one with
quality.py's summary. Made for a lent GPU (each pipeline is one process; they share the card), where it
compares recipes at the step counts the shipped recipe affords on the 2-core CPU.

    python benchmarks/recipe_search.py --variants benchmarks/recipe_search_gpu.json --device cuda

``--variants`` is a JSON object ``{name: {"base": {...overrides of recipes/base.json}, "sparse": {...
overrides of recipes/sparse.json}}}``; a variant may name another's base (``"base_from": "other"``) to
fine-tune it differently. Writes ``benchmarks/results/recipe_search.json`` (or ``--out``): per variant the
recipes as run, steps reached, wall minutes and quality.py's summary.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import check_device, parser, positive_int, quick_or, rounded, write_json

ROOT = Path(__file__).resolve().parents[1]


def run_pipeline(name: str, spec: dict, root: Path, device: str, n: int, threads: int) -> subprocess.Popen:
    """Start one pipeline in the background (a shell chain: base, fine-tune, quality); returns the process."""
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    cmds = []
    base_w = out / "base.safetensors"
    if "base_path" in spec:  # a base trained elsewhere (e.g. an earlier search)
        base_w = Path(spec["base_path"])
    elif "base_from" not in spec:
        base = {**json.loads((ROOT / "recipes/base.json").read_text()), **spec.get("base", {}),
                "out": str(out / "base")}
        (out / "base_recipe.json").write_text(json.dumps(base, indent=2))
        cmds.append(_cmd(sys.executable, "-m", "tokensparse.cli", "train", "--config", out / "base_recipe.json",
                         "--export", base_w))
    else:
        base_w = root / spec["base_from"] / "base.safetensors"
    sparse = {**json.loads((ROOT / "recipes/sparse.json").read_text()), **spec.get("sparse", {}),
              "out": str(out / "sparse"), "init": str(base_w)}
    (out / "sparse_recipe.json").write_text(json.dumps(sparse, indent=2))
    sparse_w = out / "sparse.safetensors"
    cmds.append(_cmd(sys.executable, "-m", "tokensparse.cli", "train", "--config", out / "sparse_recipe.json",
                     "--export", sparse_w))
    cmds.append(_cmd(sys.executable, ROOT / "benchmarks/quality.py", "--base", base_w, "--sparse", sparse_w,
                     "--n", n, "--device", device, "--out", out / "quality.json"))
    if "base_from" in spec:  # fine-tune-only variants wait for the base they share
        base_q = shlex.quote(str(base_w))
        cmds.insert(0, f"for i in $(seq 360); do [ -f {base_q} ] && break; sleep 5; done; [ -f {base_q} ]")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    with open(out / "log.txt", "w") as log:  # the child keeps its own descriptor; this process closes its copy
        return subprocess.Popen(" && ".join(cmds), shell=True, env=env, stdout=log, stderr=subprocess.STDOUT)


def _cmd(*args: object) -> str:
    """One shell command from ``args``, each quoted (a root or variant name with spaces stays one argument)."""
    return shlex.join(str(a) for a in args)


def collect(name: str, root: Path) -> dict:
    out = root / name
    row: dict = {}
    for stage in ("base", "sparse"):
        if (out / f"{stage}.json").is_file():  # written by the export: architecture, resolved recipe, steps
            row[f"{stage}_checkpoint"] = json.loads((out / f"{stage}.json").read_text())
        state = sorted((out / stage).glob("step_*/state.json"))
        if state:
            s = json.loads(state[-1].read_text())
            row[f"{stage}_steps"], row[f"{stage}_minutes"] = s["step"], round(s["elapsed_s"] / 60, 2)
            row[f"{stage}_evals"] = s.get("evals", [])
    q = out / "quality.json"
    if q.is_file():
        payload = json.loads(q.read_text())
        row["summary"] = payload["summary"]
        row["psnr"] = {label: {keep: {f: v["psnr"]["mean"] for f, v in fams.items()}
                               for keep, fams in payload["results"][label].items()} for label in ("base", "sparse")}
    return row


def read_variants(path: Path, ap: argparse.ArgumentParser) -> dict[str, dict]:
    """The ``--variants`` file: a JSON object of objects (``ap.error`` naming the flag otherwise)."""
    try:
        variants = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        ap.error(f"--variants {path}: cannot read it as JSON ({exc})")
    if not isinstance(variants, dict) or not variants or not all(isinstance(v, dict) for v in variants.values()):
        ap.error(f"--variants {path} must hold a JSON object {{name: {{\"base\": {{...}}, \"sparse\": {{...}}}}}}")
    for name, spec in variants.items():  # else its pipeline waits 30 minutes for a base that never comes
        src = spec.get("base_from")
        if src is not None and (src not in variants or {"base_from", "base_path"} & set(variants[src])):
            ap.error(f"--variants {path}: {name}'s base_from {src!r} must name another variant that trains its base")
    return variants


def main() -> None:
    ap = parser(__doc__, "recipe_search", "20-step stages and 4 samples per family: checks the wiring")
    ap.add_argument("--variants", type=Path, required=True)
    ap.add_argument("--root", type=Path, default=ROOT / "runs/search")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=positive_int, default=32, help="held-out samples per family for each quality run")
    ap.add_argument("--threads", type=positive_int, default=2, help="CPU threads per pipeline")
    args = ap.parse_args()
    check_device(args.device, ap)  # the quality stages run there, each after minutes of training
    variants = read_variants(args.variants, ap)
    if args.quick:
        args.n = quick_or(args, "n", 4)  # a --n typed beside --quick keeps its value
        quick = {"steps": 20, "eval_every": 10**6, "ckpt_every": 10}
        variants = {k: {**v, "base": {**v.get("base", {}), **quick}, "sparse": {**v.get("sparse", {}), **quick}}
                    for k, v in variants.items()}
        args.root = args.root / "quick"  # never resumes (or overwrites) a full run's stages
    t0 = time.time()
    procs = {}
    for name, spec in variants.items():
        procs[name] = run_pipeline(name, spec, args.root, args.device, args.n, args.threads)
    failed = []
    for name, p in procs.items():
        code = p.wait()
        print(f"{name}: exit {code} after {(time.time() - t0) / 60:.1f} min", flush=True)
        if code:
            failed.append(name)
    payload = {"quick": args.quick, "device": args.device, "n": args.n,
               "wall_minutes": round((time.time() - t0) / 60, 2),
               "variants": {name: collect(name, args.root) for name in variants}}
    write_json(args.out, payload)
    for name, row in payload["variants"].items():
        s = row.get("summary", {})
        print(name, row.get("base_steps"), row.get("sparse_steps"),
              rounded(s, 2))  # quality.py's summary nests per model too (proportional_gain_db_keep025)
    print(f"wrote {args.out}")
    if failed:  # the JSON keeps what the others reached; the exit status says it is incomplete
        sys.exit(f"failed pipelines: {', '.join(failed)} (their logs: {args.root}/NAME/log.txt)")


if __name__ == "__main__":
    main()
