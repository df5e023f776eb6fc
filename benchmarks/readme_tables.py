"""Print the README's result tables (markdown) from the JSON files under benchmarks/results/.

    python benchmarks/readme_tables.py            # print them
    python benchmarks/readme_tables.py --write    # replace the README's generated block with them
    python benchmarks/readme_tables.py --check    # exit 1 when that block differs from them (README untouched)

Every number in the README's results section comes from this script's output.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
from collections.abc import Callable
from pathlib import Path

R = Path(__file__).parent / "results"


def load(name: str) -> dict | None:
    path = R / f"{name}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("quick"):
        raise SystemExit(f"{path} holds a --quick run; the README quotes full runs (git checkout {path} to restore)")
    return data


def flux() -> None:
    d = load("flux_flops")
    if not d:
        return
    print("**FLUX.2 [klein] 9B, 1024² output, 4 references of 1024², FLOPs per denoising step** "
          "(`benchmarks/flux_flops.py`, meta device, no weights):\n")
    print("| keep | TFLOP / step | vs dense | + K/V cache: TFLOP / step | vs dense | one-time reference pass (TFLOP) |")
    print("|---|---|---|---|---|---|")
    for r in d["rows"]:
        if r["model"] == "FLUX.2-klein-9B" and r["refs"] == 4 and r.get("keep") is not None:
            kv = r["kv_cache"]
            print(f"| {r['keep']:g} | {r['step_tflop']:.1f} | {r['speedup']:.2f}× | {kv['step_tflop']:.1f} | "
                  f"{kv['speedup']:.2f}× | {kv['reference_pass_tflop']:.1f} |")
    one = [r for r in d["rows"] if r["model"] == "FLUX.2-klein-9B" and r["refs"] == 1 and r.get("keep") == 0.25][0]
    k4 = [r for r in d["rows"] if r["model"] == "FLUX.2-klein-4B" and r["refs"] == 4 and r.get("keep") == 0.25][0]
    print(f"\nOne reference (9B), keep 0.25: {one['speedup']:.2f}× ({one['kv_cache']['speedup']:.2f}× with the K/V "
          f"cache). 4B with 4 references, keep 0.25: {k4['speedup']:.2f}× ({k4['kv_cache']['speedup']:.2f}× with "
          "the cache). All models, reference counts and Kontext: `benchmarks/results/flux_flops.json`.\n")


def flux_speed() -> None:
    d = load("flux_speed")
    if not d:
        return
    c = d["config"]
    refs = sorted({r["refs"] for r in d["rows"]})
    print("**A real diffusers FLUX.2 transformer, timed** (`benchmarks/flux_speed.py`): diffusers' "
          "`Flux2Transformer2DModel` with the K/V processors of `Flux2KleinKVPipeline`, random "
          f"weights, scaled down for a CPU ({c['num_layers']} double + {c['num_single_layers']} single blocks, "
          f"width {c['num_attention_heads'] * c['attention_head_dim']}), {d['target_tokens']} target tokens, "
          f"{d['ref_tokens_each']} per reference; the library's hooks as users apply them; one CPU thread; speedup "
          f"of a {d['steps']}-step generation vs dense in CPU time (median of {d['repeats']} interleaved repeats; "
          "K/V-cache settings: one extract call, then cached calls), FLOP ratio in brackets:\n")
    print("| setting | " + " | ".join(f"{n} ref{'s' if n > 1 else ''}" for n in refs) + " |")
    print("|---|" + "---|" * len(refs))
    for s in dict.fromkeys(r["setting"] for r in d["rows"]):
        cells = [next(f"{r['speedup']:.2f}× ({r['flop_ratio']:.2f}×)" for r in d["rows"]
                      if r["refs"] == n and r["setting"] == s) for n in refs]
        print(f"| {s} | " + " | ".join(cells) + " |")
    print(f"\nLowest efficiency (speedup / FLOP ratio): {d['summary']['min_efficiency']:.2f}.", end=" ")
    other = load("flux_speed_run1")
    if other:
        o, m = other["summary"]["speedup"], d["summary"]["speedup"]
        pairs = [(n, k) for n in ("1", "4") for k in ("sparse0.25+kv", "sparse0.25+kv+tome0.5") if n in o and n in m]
        print("Run-to-run spread: an earlier run of the same script (`benchmarks/results/flux_speed_run1.json`, "
              "made before 0.8.0's merging changes -- module split, call fingerprints -- which compute the same; "
              "both runs predate 0.9.0 and every release since) gave "
              + ", ".join(f"{n} ref{'s' if n != '1' else ''} {k} {o[n][k]:.2f}× (this run {m[n][k]:.2f}×)"
                          for n, k in pairs)
              + f"; lowest efficiency {other['summary']['min_efficiency']:.2f}.", end="")
    print("\n")


EARLIER_SPEED = {  # committed earlier runs: the tokensparse.__version__ of the code that made each (what write_json
    # records since 0.20.0; these runs predate that): speed_run4 ran between 0.16.0 and 0.17.0, on code saying 0.16.0
    "speed_run1": "0.9.0", "speed_run2": "0.9.0", "speed_run3": "0.14.1", "speed_run4": "0.16.0",
    "speed_run5": "0.18.0", "speed_run6": "0.19.0", "speed_run7": "0.20.0"}


def speed() -> None:
    d = load("speed")
    if not d:
        return
    rows = [r for r in d["rows"] if r["arch"] == "refdit-s-64px"]
    refs = sorted({r["refs"] for r in rows})
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    print("**RefDiT speed** (`benchmarks/speed.py`): 20-step generation, "
          f"16×16 tokens per image, random weights, one CPU thread, CPU seconds (median of {d['repeats']} "
          "interleaved repeats); speedup vs dense (FLOP ratio in brackets). tome0.5 merges half the target tokens "
          "in every block with a new matching each step (ToMe); tome0.5c5 merges as many with CA-ToMe's cache, "
          "each layer's matching recomputed every 5th step:\n")
    print("| setting | " + " | ".join(f"{n} ref{'s' if n > 1 else ''}" for n in refs) + " |")
    print("|---|" + "---|" * len(refs))
    for s in settings:
        cells = []
        for n in refs:
            r = next(x for x in rows if x["refs"] == n and x["setting"] == s)
            cells.append(f"{r['speedup']:.2f}× ({r['flop_ratio']:.2f}×)")
        print(f"| {s} | " + " | ".join(cells) + " |")
    print(f"\nEfficiency (measured speedup / FLOP ratio), lowest over the dropping and caching settings: "
          f"{d['summary']['min_efficiency']:.2f}; with target-token merging: "
          f"{d['summary']['min_efficiency_with_merging']:.2f}.\n")
    m = d["summary"]
    named = [(name, o) for name in EARLIER_SPEED if (o := load(name))]
    if not named:
        return
    earlier = [o["summary"] for _, o in named]

    def each(get: Callable[[dict], float]) -> str:
        return " / ".join(f"{get(o):.2f}" for o in earlier)

    sp = m["speedup"]
    made = "; ".join(f"`{name}.json`, at {EARLIER_SPEED[name]} with {o['repeats']} repeats" for name, o in named)
    print(f"Run-to-run spread on this shared machine: {len(named)} earlier full runs of this script are committed "
          f"({made}; the model code has since gained input checks and refactors that compute the same). "
          f"In that order they gave 4 refs "
          f"sparse0.25 {each(lambda o: o['speedup']['4']['sparse0.25'])}× (this run "
          f"{sp['4']['sparse0.25']:.2f}×), sparse0.25+kv {each(lambda o: o['speedup']['4']['sparse0.25+kv'])}× "
          f"({sp['4']['sparse0.25+kv']:.2f}×); 1 ref sparse0.25 {each(lambda o: o['speedup']['1']['sparse0.25'])}× "
          f"({sp['1']['sparse0.25']:.2f}×), sparse0.25+kv {each(lambda o: o['speedup']['1']['sparse0.25+kv'])}× "
          f"({sp['1']['sparse0.25+kv']:.2f}×), +tome0.5 "
          f"{each(lambda o: o['speedup']['1']['sparse0.25+kv+tome0.5'])}× "
          f"({sp['1']['sparse0.25+kv+tome0.5']:.2f}×); minimum efficiency "
          f"{each(lambda o: o['min_efficiency'])} ({m['min_efficiency']:.2f}).", end=" ")
    every = [d, *(o for _, o in named)]
    spans = []
    for arch, size in (("refdit-s-64px", "16×16"), ("refdit-s", "the shipped 8×8")):
        moved = {}
        for tome in (False, True):
            by_setting: dict[tuple, list[float]] = {}
            for run in every:
                for r in run["rows"]:
                    if r["arch"] == arch and r["setting"] != "dense" and ("tome" in r["setting"]) == tome:
                        by_setting.setdefault((r["refs"], r["setting"]), []).append(r["speedup"])
            moved[tome] = max(max(v) / min(v) - 1 for v in by_setting.values() if len(v) > 1)
        eff = [r["efficiency"] for run in every for r in run["rows"]
               if r["arch"] == arch and r["setting"] != "dense" and "tome" not in r["setting"]]
        spans.append(f"up to {moved[False]:.0%} at {size} tokens ({moved[True]:.0%} with merging stacked), "
                     f"where efficiency ranges over {min(eff):.2f}–{max(eff):.2f}")
    print(f"Across the {len(every)} runs a setting's speedup moves by {spans[0]}, and by {spans[1]} "
          "(above 1 is timing noise): targets within that margin pass in one run and miss in another.\n")


def quality() -> None:
    d = load("quality")
    if not d:
        return
    res = d["results"]
    fams = list(res["floors"])
    print(f"**RefDiT quality under reference dropping** (`benchmarks/quality.py`, {d['samples_per_family']} "
          f"held-out samples per family, {d['steps']} steps, random selection): PSNR (dB) against the exact "
          "ground truth, coarse (layout) PSNR in brackets.\n")
    print("| model | keep | " + " | ".join(fams) + " |")
    print("|---|---|" + "---|" * len(fams))
    rows = [(d["models"][label], keep, res[label][str(keep)]) for label in ("base", "sparse") for keep in d["keeps"]]
    rows += [(f"{d['models'][label]}, `proportional=True`", float(keep), at)
             for label, by_keep in res.get("proportional", {}).items() for keep, at in by_keep.items()]
    for name, keep, at in rows:
        print(f"| {name} | {keep:g} | " + " | ".join(
            f"{at[f]['psnr']['mean']:.2f} ({at[f]['coarse_psnr']['mean']:.2f})" for f in fams) + " |")
    print("| no references (sparse model) | – | " + " | ".join(
        f"{res['ref_blind'][f]['psnr']['mean']:.2f}" for f in fams) + " |")
    for name in ("copy_ref", "mean_image"):
        print(f"| floor: {name} | – | " + " | ".join(
            f"{res['floors'][f][name]['psnr']['mean']:.2f}" for f in fams) + " |")
    def summary_values(vals: dict) -> str:
        return ", ".join(f"{f} {v:+.2f}" if isinstance(v, float) else f"{d['models'][f]} ({summary_values(v)})"
                         for f, v in vals.items())

    print("\nSummary (dB): " + "; ".join(f"`{k}` {summary_values(vals)}" for k, vals in d["summary"].items())
          + "\n")
    specialist(d)


def specialist(q: dict) -> None:
    """The keep-0.25 specialist against the shipped refdit-sparse: is ft_gain_db_keep025 < 2 the recipe's fault?"""
    d = load("quality_specialist025")
    if not d:
        return

    def at(run: dict, keep: str, f: str) -> float:
        return run["results"]["sparse"][keep][f]["psnr"]["mean"]

    fams = ("subject", "multi")
    print("A fine-tune aimed at exactly that setting does not raise `ft_gain_db_keep025` (`recipes/experiments/"
          "specialist025.json`: refdit-sparse fine-tuned 800 more steps on subject and multi samples (editing 1e-4 "
          "of them) with every reference at random keep 0.24-0.26; `benchmarks/results/quality_specialist025.json`, "
          "the shipped refdit-sparse in brackets): PSNR at random 25 % " + ", ".join(
              f"{f} {at(d, '0.25', f):.2f} ({at(q, '0.25', f):.2f})" for f in fams)
          + "; at keep 1 " + ", ".join(f"{f} {at(d, '1.0', f):.2f} ({at(q, '1.0', f):.2f})" for f in fams)
          + "; `ft_gain_db_keep025` " + ", ".join(
              f"{f} {d['summary']['ft_gain_db_keep025'][f]:+.2f} ({q['summary']['ft_gain_db_keep025'][f]:+.2f})"
              for f in fams)
          + ". A random quarter of a subject reference keeps about 1-4 of the subject's 4-16 tokens: what is dropped "
          "is gone for any model, and the shipped mix of ratios already gets as much from what is left as training "
          "at that one ratio does.\n")


def drop_sweep() -> None:
    d = load("drop_sweep")
    if not d:
        return
    s = d["summary"]
    fams = list(next(iter(s["psnr"].values()))["1.0"])
    # runs before the sweep followed recipes/sparse.json recorded no learning rates (they used 2e-4 on the lr-3e-4 base)
    lr = f" (lr {d['lr']:g})" if "lr" in d else " (lr 2e-4, the fine-tune recipe of the time)"
    base_lr = f", lr {d['base_lr']:g}" if "base_lr" in d else ", lr 3e-4"
    cols = [k for k in ("1.0", "0.25", "0.25_auto") if k in next(iter(s["psnr"].values()))]
    print(f"**Choosing the dropping distribution** (`benchmarks/drop_sweep.py`): "
          f"{d['steps']}-step fine-tunes{lr} of the refdit-base of the time ({d['base_steps']:,} steps{base_lr}) "
          "into the cache-capable model that differ only in how "
          f"references are dropped (`dense` = no dropping, the control); PSNR (dB) on {d['n']} held-out samples "
          f"per family, {d['generation_steps']} sampling steps, random selection"
          + (" (and `auto` at 25 %)" if "0.25_auto" in cols else "") + ":\n")
    names = {"1.0": "keep 1", "0.25": "keep 0.25", "0.25_auto": "auto 0.25"}
    print("| arm (keep ~ U[min, max], p_full, p_selected) | "
          + " | ".join(f"{names[k]}: {f}" for k in cols for f in fams) + " |")
    print("|---|" + "---|" * (len(cols) * len(fams)))
    for arm, p in s["psnr"].items():
        print(f"| {arm} | " + " | ".join(f"{p[k][f]:.2f}" for k in cols for f in fams) + " |")
    best = s.get("best_arm")
    print(f"\nHighest keep-0.25 PSNR: `{s['best_keep025_arm']}`; among arms costing <= 0.5 dB at keep 1 on every "
          f"family: " + (f"`{best}`" if best else "none (at this length dropping costs keep-1 quality)") + ".\n")


def proportional_table(d: dict) -> None:
    """``SparseContextConfig(proportional=True)`` against plain Sparse Context, from selection.json."""
    s, res = d["summary"], d["results"]
    gain = s["proportional_gain_db_keep025"]
    print("**Proportional attention for dropped tokens** (`SparseContextConfig(proportional=True)`, same run; each "
          "dropped reference token hands its attention mass to the kept token nearest to it in pixels, as a "
          "`log(size)` logit bias: no training, the same tokens and FLOPs):\n")
    print("| family | dense − auto at 25 % (dB): plain → proportional | dense − task-aware at ≤ 25 % (dB): plain → "
          "proportional | gain at 25 %, " + " / ".join(gain) + " (dB) |")
    print("|---|---|---|---|")
    for fam in s["taskaware_drop_db_keep025"]:
        dense = res["dense"][fam]["psnr"]["mean"]
        plain, prop = (dense - r["auto"]["0.25"][fam]["psnr"]["mean"]
                       for r in (res["fixed"], res["proportional"]["fixed"]))
        print(f"| {fam} | {plain:+.2f} → {prop:+.2f} | {s['taskaware_drop_db_keep025'][fam]:+.2f} → "
              f"{s['taskaware_proportional_drop_db_keep025'][fam]:+.2f} "
              f"({s['taskaware_proportional_keep025_config'][fam]}) | "
              + " / ".join(f"{gain[sel][fam]:+.2f}" for sel in gain) + " |")
    print(f"\nSelection time with the sizes / 20-step generation: {s['selection_overhead_frac_proportional']:.4f}.\n")


def selection() -> None:
    d = load("selection")
    if not d or "summary" not in d:
        return
    s = d["summary"]
    print(f"**Task-aware selection** (`benchmarks/selection.py`, `{d['model']}`, {d['samples_per_family']} held-out "
          f"samples per family, {d['steps']} sampling steps; `selector=\"auto\"`; the adaptive budget is "
          f"`adaptive=True` at the default mass 0.9, its tokens kept in brackets):\n")
    ada = "taskaware_adaptive_drop_db" in s
    print("| family | auto − random at 25 % (dB) | dense − auto at 25 % (dB) | "
          + ("dense − auto adaptive (dB) [tokens kept] | dense − task-aware at ≤ 25 % average (dB) | "
             if ada else "")
          + "tokens adaptive needs to match random-25 % | best selector |")
    print("|---|---|---|" + ("---|---|" if ada else "") + "---|---|")
    for fam in s["taskaware_minus_random_db"]:
        fixed = s["taskaware_minus_random_db"][fam]
        extra = (f"{s['taskaware_adaptive_drop_db'][fam]:+.2f} [{s['taskaware_adaptive_kept_frac'][fam]:.0%}] | "
                 f"{s['taskaware_drop_db_keep025'][fam]:+.2f} ({s['taskaware_keep025_config'][fam]}) | " if ada else "")
        drop_fixed = (d["results"]["dense"][fam]["psnr"]["mean"]
                      - d["results"]["fixed"]["auto"]["0.25"][fam]["psnr"]["mean"])
        need = s["adaptive_tokens_frac_at_random25"][fam]  # None: no adaptive budget measured reaches it
        print(f"| {fam} | {fixed:+.2f} | {drop_fixed:+.2f} | {extra}"
              f"{'not reached' if need is None else f'{need:.2f}×'} | {s['best_selector_keep025'][fam]} |")
    print(f"\nSelection time / 20-step generation: {s['selection_overhead_frac']:.4f} "
          f"(attention probe: {s['selection_overhead_frac_attention']:.4f}).\n")
    prev, prev_q, q = load("selection_p_selected0"), load("quality_p_selected0"), load("quality")
    fams = list(s["taskaware_drop_db_keep025"])

    def pair(key: str, new: dict, old: dict) -> str:
        return ", ".join(f"{f} {new[key][f]:+.2f} ({old[key][f]:+.2f})" for f in fams)

    if prev and prev_q and q:  # the refdit-sparse of commit 067a892: purely random dropping (p_selected = 0)
        print("The shipped fine-tune with selection-aware dropping (`DropConfig.p_selected` 0.8: in 80 % of the "
              "samples that drop tokens the references keep exactly what `auto` selection keeps) against the "
              "refdit-sparse of "
              "commit 067a892 (purely random dropping, fewer steps, no prompt text encoder and an older base, so not "
              "a controlled comparison — the drop "
              "sweep above is one; `benchmarks/results/*_p_selected0.json`, in brackets): dense − task-aware at "
              "≤ 25 % "
              f"{pair('taskaware_drop_db_keep025', s, prev['summary'])}; `ft_gain_db_keep025` (random selection) "
              f"{pair('ft_gain_db_keep025', q['summary'], prev_q['summary'])}; `ft_cost_db_keep1` "
              f"{pair('ft_cost_db_keep1', q['summary'], prev_q['summary'])}.\n")
    half, half_q = load("selection_p_selected05"), load("quality_p_selected05")
    if half and half_q and q:  # the refdit-sparse of 0.7.0: the same recipe and seed with p_selected 0.5
        print("Against the same recipe and seed with `p_selected` 0.5 (the refdit-sparse of 0.7.0, 1,738 steps in "
              "the same 44-minute budget; `benchmarks/results/*_p_selected05.json`, in brackets): dense − task-aware "
              "at ≤ 25 % "
              f"{pair('taskaware_drop_db_keep025', s, half['summary'])}; `ft_gain_db_keep025` "
              f"{pair('ft_gain_db_keep025', q['summary'], half_q['summary'])}; `ft_cost_db_keep1` "
              f"{pair('ft_cost_db_keep1', q['summary'], half_q['summary'])}; `dense_margin_db` "
              f"{pair('dense_margin_db', q['summary'], half_q['summary'])}; `ref_gain_db` "
              f"{pair('ref_gain_db', q['summary'], half_q['summary'])}.\n")
    if "taskaware_proportional_drop_db_keep025" in s:
        proportional_table(d)


def _merging_desc(cfg: dict) -> str:
    """A TokenMergingConfig (as stored in the JSON) in words."""
    parts = [f"centred cosine threshold {cfg['threshold']:g}" if cfg.get("center", True) and cfg["threshold"]
             is not None else f"threshold {cfg['threshold']:g}" if cfg["threshold"] is not None else ""]
    if cfg["ratio"]:
        parts.append(f"ratio {cfg['ratio']:g}" + (" as the cap" if cfg["threshold"] is not None else ""))
    parts.append(f"matchings every {cfg['recompute_every']} steps" if cfg["recompute_every"] > 1 else
                 "matchings every step")
    return ", ".join(p for p in parts if p)


def _versions(quality: dict, speed: dict) -> str:
    """Where a benchmark's quality and timing parts ran on different releases, say which (the timings do not
    depend on which tokens merge; merging.py --part re-runs some parts and keeps the rest)."""
    qv, sv = (part.get("tokensparse", "an earlier release") for part in (quality, speed))
    return "" if qv == sv else f"; drop and PSNR columns from tokensparse {qv}, speedups from {sv}"


def merging() -> None:
    d = load("merging")
    if not d:
        return
    s = d["summary"]
    q, sp = d.get("refdit_quality"), d.get("refdit_speed")
    if q and sp:
        c = q["configs"]
        keeps = sorted({v["keep"] for v in c.values() if v["keep"] < 1.0})
        repeats = len(sp["seconds"]["dense"]["cpu_all"])
        print(f"**Token merging on RefDiT** (`benchmarks/merging.py`; `{q['model']}`, {q['target_tokens']} target "
              f"tokens, reference K/V cache {'on' if q['kv_cache'] else 'off'}, {q['steps']} steps, {q['samples']} "
              "held-out editing and subject samples one at a time, one CPU thread, median of "
              f"{repeats} interleaved timing repeats; speedup over the same model without merging, drop = PSNR to "
              "ground truth lost, PSNR to unmerged pooled over the samples; thresholds are centred cosines, "
              "`_raw` = the raw cosine of ToMe / tomesd"
              + "".join(f"; `sparse{k:g}+`: stacked on Sparse Context, auto selection of {k:.0%} of the reference "
                        "tokens, drop against the dense model" for k in keeps) + _versions(q, sp) + "):\n")
        print("| config | speedup | drop (dB) | PSNR to unmerged (dB) | merged tokens / layer |")
        print("|---|---|---|---|---|")
        for name, v in c.items():
            if name == "dense":
                continue
            to_unmerged = "–" if v["psnr_to_unmerged"] is None else f"{v['psnr_to_unmerged']:.2f}"
            print(f"| {name} | {sp['speedup'][name]:.2f}× | {v['drop_db']:+.2f} | {to_unmerged} | "
                  f"{v['merged_tokens_per_step_per_layer']:.0f} |")
        head = s["catome_config"]
        same = s.get("catome_same_outputs_as")
        print(f"\nHeadline CA-ToMe ({head}, chosen from an exploratory sweep before the benchmark runs: "
              f"{_merging_desc(c[head]['merging'])}): {s['catome_speedup']:.2f}× at {s['catome_drop_db']:+.2f} "
              f"dB, where ToMe without a cache at the same speed loses {s['tome_drop_db_at_equal_speed']:.2f} dB"
              + (" (extrapolated)" if s["tome_equal_speed_extrapolated"] else "") + "."
              + (f" Its outputs are identical to {same}'s (the cap binds in every layer and step), which this run "
                 f"times at {sp['speedup'][same]:.2f}×: what CA-ToMe gains over ToMe here comes from reusing "
                 "matchings, not from the threshold." if same else "")
              + " Each CA-ToMe setting minus ToMe at its speed: " + ", ".join(
                  f"{k} {v:+.2f} dB" for k, v in s["catome_minus_tome_at_equal_speed_db"].items()) + ".")
        old = load("merging_run1")
        if old and old.get("summary", {}).get("catome_config") == head:
            o = old["summary"]
            print(f"The first run of the whole benchmark (`benchmarks/results/merging_run1.json`, "
                  f"{len(old['refdit_speed']['seconds']['dense']['cpu_all'])} timing repeats, raw-cosine rows not "
                  f"yet in it) measured ToMe ratio 0.5 at {old['refdit_speed']['speedup']['tome_r0.5']:.2f}× and the "
                  f"headline at {o['catome_speedup']:.2f}×, "
                  f"{o['catome_drop_db'] - o['tome_drop_db_at_equal_speed']:+.2f} dB against ToMe at equal speed "
                  f"(this run: {s['catome_drop_db'] - s['tome_drop_db_at_equal_speed']:+.2f}"
                  " dB): the comparison moves with the timing noise.")
        prev = load("merging_run2")
        if prev and prev.get("summary", {}).get("catome_config") == head:
            ps, pd = prev["refdit_speed"], d["refdit_speed"]
            dense = (ps["seconds"]["dense"]["cpu"], pd["seconds"]["dense"]["cpu"])
            print(f"The previous full run (`benchmarks/results/merging_run2.json`, tokensparse 0.3.0, before the "
                  "per-step destination seeding of 0.19.0) timed ToMe ratio 0.5 at "
                  f"{ps['speedup']['tome_r0.5']:.2f}× and the headline at {prev['summary']['catome_speedup']:.2f}× "
                  f"(this run: {pd['speedup']['tome_r0.5']:.2f}× and {s['catome_speedup']:.2f}×); its unmerged model "
                  f"took {dense[0]:.2f} s per generation, this run's {dense[1]:.2f} s (the machine and the unmerged "
                  "model's code both changed since), and against a faster unmerged model the per-step costs merging "
                  "does not shrink (matching, norms, residuals on every token) weigh more.")
        small = s.get("refdit_small")
        if small:
            rs = d["refdit_small_speed"]["speedup"]
            fastest = max((k for k in rs if k != "dense"), key=rs.get)
            print(f"On `{small['model']}` ({small['target_tokens']} target tokens) merging saves about what it costs "
                  f"or less: fastest {fastest} {rs[fastest]:.2f}×, headline {small['catome_config']} "
                  f"{small['catome_speedup']:.2f}×.", end=" ")
        if "refdit_large_grid_tome_r0.5_speedup" in s:
            print(f"A random-weight RefDiT with 1,024 target tokens runs ToMe ratio 0.5 at "
                  f"{s['refdit_large_grid_tome_r0.5_speedup']:.2f}×.", end="")
        print("\n")
    u = d.get("unet")
    if not u:
        return
    print(f"**Token merging on an SD-style UNet** (`benchmarks/merging.py`; built from config, "
          f"{u['top_level_tokens']} top-level tokens, {u['steps']}-step {u['sampler']}, one CPU thread; "
          "`ours_*` merge self-attention only (`merge_mlp=False`, as tomesd) with the default centred cosine, "
          "`_raw` with tomesd's raw cosine):\n")
    print("| config | speedup | PSNR to dense (dB) |")
    print("|---|---|---|")
    for name, v in u["configs"].items():
        if name == "dense":
            continue
        print(f"| {name} | {v['speedup']:.2f}× | {v['psnr_to_dense']:.2f} |")
    print(f"\nvs tomesd at ratio 0.5: speed ratio {s['vs_tomesd_speed_ratio']:.2f}, error ratio "
          f"{s['vs_tomesd_err_ratio']:.2f}" + (
              f" (raw cosine, like for like: {s['vs_tomesd_speed_ratio_raw']:.2f} and "
              f"{s['vs_tomesd_err_ratio_raw']:.2f})"
              if "vs_tomesd_err_ratio_raw" in s else "") + ".\n")


def guidance() -> None:
    d = load("guidance")
    if not d:
        return
    s = d["summary"]
    print(f"**Guidance** (`benchmarks/guidance.py`, `{d['model']}`): FID of "
          f"{d['n']} generated vs {d['n']} held-out images of the prompt-only `scene` task (many right answers), "
          f"FeatureNet features, {d['steps']} steps; GFLOPs per denoising step for one image"
          + (" (whole generation / steps; context K/V cache on, and SG's two conditional branches compute the "
             "blocks before the route span once — both exact)" if d.get("kv_cache") else "") + ":\n")
    print("| config | FID | GFLOP / step |")
    print("|---|---|---|")
    for r in d["rows"]:
        print(f"| {r['config']} | {r['fid']:.2f} | {r['gflops_per_step']:.3f} |")
    frac = s["flops_frac_at_cfg_best_fid"]
    print(f"\nBest CFG FID {s['cfg_best_fid']:.2f} ({s['cfg_best_config']}); best SG FID {s['sg_best_fid']:.2f} "
          f"({s['sg_best_config']}) at {s['sg_best_fid_flops_frac']:.2f}× CFG's FLOPs per step; "
          + ("no SG configuration reaches CFG's best FID" if frac is None else
             f"SG reaches CFG's best FID at {frac:.2f}× its FLOPs per step") + ". Sparse-reference guidance "
          "(weak branch sees 10 % of the reference tokens) vs unguided, PSNR: " + ", ".join(
              f"{f} {v:+.2f} dB" for f, v in s["sparse_ref_guidance_gain_db"].items())
          + f", at {s['sparse_ref_guidance_cost_frac']:+.0%} FLOPs per step. Training step (one thread, process "
          "time) with TREAD routing (γ = 0.5) vs none: " + ", ".join(
              f"{k} {v:.2f}× (FLOP ratio {s['routing_train_flop_ratio'][k]:.2f}×)"
              for k, v in s["routing_train_speedup"].items()) + ".\n")


def _as_of(info: dict) -> str:
    """The suffix ' as of commit X' where a checkpoint's parent has been re-trained since (``init_commit``)."""
    return f" as of commit {info['init_commit']}" if info.get("init_commit") else ""


def recipe_search() -> None:
    rows = []
    for name in ("recipe_search_gpu", "recipe_search_gpu2"):
        d = load(name)
        rows += list((d or {}).get("variants", {}).items())
    if not rows:
        return
    keys = ("dense_margin_db", "ref_gain_db", "ft_gain_db_keep025", "ft_cost_db_keep1")
    print("**Recipe search** (`benchmarks/recipe_search.py` on a lent GPU, pipelines sharing the card; the CPU "
          "recipes' step counts, quality.py's summary on 64 held-out samples per family, dB as editing / "
          "subject / multi):\n")
    print("| variant | base lr | fine-tune lr | p_full | multi weight | steps (base, fine-tune) | "
          + " | ".join(f"`{k}`" for k in keys) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(keys))
    for variant, row in rows:
        b = row.get("base_checkpoint", {}).get("recipe", {})
        f = row["sparse_checkpoint"]["recipe"]
        if not b:  # fine-tune of another variant's base
            b = next(r for v, r in rows if v == Path(f["init"]).parent.name)["base_checkpoint"]["recipe"]
        s = row["summary"]
        cells = [" / ".join(f"{s[k][fam]:+.2f}" for fam in ("editing", "subject", "multi")) for k in keys]
        print(f"| {variant} | {b['lr']:g} | {f['lr']:g} | {f['drop']['p_full']:g} | "
              f"{(f.get('family_weights') or {}).get('multi', 1):g} | {b['steps']:,}, {row['sparse_steps']:,} | "
              + " | ".join(cells) + " |")
    print()


def checkpoints() -> None:
    w = Path(__file__).parents[1] / "src" / "tokensparse" / "weights"
    lines = []
    for path in sorted(w.glob("refdit-*.json")):
        info = json.loads(path.read_text())
        r = info.get("recipe", {})
        drop = r.get("drop")
        what = "dense" if not drop else (f"random reference dropping, keep ~ U[{drop['keep_min']:g}, "
                                         f"{drop['keep_max']:g}] ({drop['p_full']:.0%} full)")
        if drop and drop.get("p_selected"):
            what += (f", in {drop['p_selected']:.0%} of the samples the references keep what `{drop['selector']}` "
                     "selection keeps at the drawn budgets")
        if r.get("route"):
            what += f", TREAD routing γ = {r['route']:g}"
        if r.get("cond_drop"):
            what += f", {r['cond_drop']:.0%} null prompts"
        if r.get("init"):
            what += f", from `{Path(r['init']).stem}`{_as_of(info)}"
        prev = info.get("previous_stage")
        if prev:
            what += (f" (itself {prev['steps']:,} steps, {prev['wall_minutes']:.0f} min of `{prev['recipe']}`"
                     f" from `{prev['init']}`{_as_of(prev)})")
        procs = info.get("processes", 2)
        where = f", on {info['device']}" if info.get("device") else ""
        cpu = (f"; the same recipe takes {info['cpu_wall_minutes_same_recipe']:.0f} min on the 2-core CPU"
               if info.get("cpu_wall_minutes_same_recipe") else "")
        lines.append(f"`{path.stem}` ({r.get('model')}) — {what}; {info.get('step'):,} steps × "
                     f"{r.get('batch_size')} samples × {procs} process{'es' if procs > 1 else ''}, "
                     f"{info.get('wall_minutes', 0):.0f} min{where}{cpu}")
    if lines:
        print("**Shipped checkpoints** (`ts.load_model`, safetensors in float16, provenance JSON beside each): "
              + "; ".join(lines) + ".\n")


#: the release of the one committed data_speed run that predates the script recording its version
DATA_SPEED_UNRECORDED = "0.1.0, the first task suite (no `scene` task yet); the suite's code has changed since"


def data() -> None:
    d = load("data_speed")
    if not d:
        return
    s = d["stream_samples_per_s"]
    made = d.get("tokensparse", DATA_SPEED_UNRECORDED)
    print(f"**Task suite throughput** (`benchmarks/data_speed.py`, one process, run at tokensparse {made}): "
          + ", ".join(f"{k}px {v['median']:,} samples/s" for k, v in s.items()) + ".\n")


BEGIN, END = "<!-- results:begin (benchmarks/readme_tables.py --write) -->", "<!-- results:end -->"
README = Path(__file__).parents[1] / "README.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="replace the README's generated block (default: print)")
    mode.add_argument("--check", action="store_true",
                      help="exit 1 when the README's generated block differs from the tables (the README is untouched)")
    args = ap.parse_args()  # --help and unknown options exit here, before anything is printed or written
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        for fn in (flux, flux_speed, speed, quality, drop_sweep, recipe_search, selection, guidance, merging, data,
                   checkpoints):
            fn()
    if not (args.write or args.check):
        print(buf.getvalue(), end="")
        return
    text = README.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README} has no generated block ({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    old, tail = rest.split(END, 1)
    new = f"\n\n{buf.getvalue().rstrip()}\n\n"
    if args.check:
        if old == new:
            print(f"{README}: the results block matches the tables")
            return
        diff = difflib.unified_diff(old.strip().splitlines(), new.strip().splitlines(), "README.md", "tables",
                                    lineterm="", n=0)
        print("\n".join(line[:200] for line in diff))
        raise SystemExit(f"{README}: the results block differs from the tables (python benchmarks/readme_tables.py "
                         "--write updates it)")
    from tokensparse.files import published  # here: the other modes need no torch

    with published(README) as (tmp,):  # atomic: an interrupt leaves the old README, no half of one
        tmp.write_text(f"{head}{BEGIN}{new}{END}{tail}")
    print(f"updated {README}")


if __name__ == "__main__":
    main()
