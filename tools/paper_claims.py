#!/usr/bin/env python
"""
A verdict on each of the paper's claims from the tables that ``tools/run_table.py`` wrote.

    python tools/paper_claims.py --root output/repro/demo --markdown docs/claims.md

Reads ``<root>/table<T>.json`` for T in 1a, 1b, 1c, 1d, 3 (and 1e when present) and writes, per
claim, "reproduced", "not reproduced" or "not resolved" with the difference of our mean APs, each
row's seed spread and the test's p, beside the paper's numbers: Markdown (``--markdown``) and JSON
(``--json``, default ``<root>/claims.json``). A missing table leaves its claims "not resolved".
The decision rules are in :func:`rules` (printed with the verdicts).
"""

import argparse
import itertools
import json
import math
import os
import random
import statistics
import sys
from typing import Dict, List, Optional, Sequence, Tuple

TABLES = ("1a", "1b", "1c", "1d", "3", "1e")
P_MAX = 0.05  # the p at or below which a test decides
MIN_SEEDS = 3  # seeds a side for "not reproduced" from the sign of the difference alone
COLLAPSE = 0.10  # "AP ~ 0": a mean AP below this fraction of the best CE's
MARGIN = 0.05  # FL* ~ FL: |difference| below this fraction of FL's mean AP


def rules(margin: float = MARGIN) -> str:
    return f"""\
- Each row's AP is the mean over its finished seeds (no detection above the score threshold
  counts as AP 0; a failed run counts as no seed). "Best" row (the best CE alpha, OHEM variant,
  other gamma): the highest mean AP; picking the best of several rows favours it.
- **A > B**: *reproduced* when the one-sided exact rank test (Mann-Whitney U over every split of
  the pooled seeds) gives p <= {P_MAX}; with 3 seeds a row that means every seed of A above every
  seed of B (p = 1/20). *Not reproduced* when the reverse test gives p <= {P_MAX}, or A's mean is
  not above B's with >= {MIN_SEEDS} seeds a side. Otherwise *not resolved*: too few seeds for
  p <= {P_MAX} (one seed on a side needs 19 on the other) or overlapping seeds.
- **A ~ B** (FL* ~ FL): *reproduced* when both rank tests A > B - m and B > A - m give
  p <= {P_MAX} (two one-sided tests; with 3 seeds each: every FL* seed within m of every FL seed),
  m = {margin:.0%} of FL's mean AP: about half the paper's FL gain over the best CE (8.5% of FL's
  AP), so that "~ FL" cannot also hold for the best CE; the paper's own FL*/FL gap is 0.6%.
  *Not reproduced* when |d| >= m and the rank test in d's direction gives p <= {P_MAX} or there
  are >= {MIN_SEEDS} seeds a side. Otherwise *not resolved*.
- **Trends** (1c anchors, 1e input size): Spearman's rho between the paper's AP and our mean AP
  over the rows with a result; *reproduced* when rho > 0 with the exact one-sided permutation
  p <= {P_MAX}, *not reproduced* when rho <= 0, otherwise *not resolved*.
- **Collapse** (CE alpha .10): *reproduced* when alpha .10's mean AP is below {COLLAPSE:.0%} of the
  best CE's and best CE > alpha .10 by the rule above; *not reproduced* when it is not below it
  or that comparison is not reproduced; otherwise *not resolved*.
"""


class ClaimsError(Exception):
    """The tables cannot be read as asked (the message says what and how to fix)."""


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
def rank_test(a: Sequence[float], b: Sequence[float]) -> float:
    """
    One-sided exact p of the Mann-Whitney U test that ``a``'s values are larger than ``b``'s:
    the fraction of the splits of the pooled values into groups of len(a) and len(b) whose U
    (pairs a > b, ties counting half) is at least the observed one.
    """
    def u(xs, ys):
        return sum((x > y) + 0.5 * (x == y) for x in xs for y in ys)

    pooled, k = list(a) + list(b), len(a)
    observed = u(a, b)
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), k):
        chosen = set(idx)
        xs = [pooled[i] for i in idx]
        ys = [v for i, v in enumerate(pooled) if i not in chosen]
        hits += u(xs, ys) >= observed - 1e-9
        total += 1
    return hits / total


def _ranks(xs: Sequence[float]) -> List[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman's rho (Pearson's r of the ranks); None when either side is constant."""
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def spearman_test(x: Sequence[float], y: Sequence[float]) -> Tuple[Optional[float], float]:
    """(rho, one-sided p of rho this large when y's order is unrelated to x): exact up to 8
    rows, else 20000 seeded random permutations."""
    rho = spearman(x, y)
    if rho is None:
        return None, 1.0
    if len(y) <= 8:
        perms = list(itertools.permutations(y))
    else:
        rng = random.Random(0)
        perms = [rng.sample(list(y), len(y)) for _ in range(20000)]
    return rho, sum(spearman(x, p) >= rho - 1e-9 for p in perms) / len(perms)


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
def load_tables(root: str, names: Sequence[str] = TABLES) -> Dict[str, List[Dict]]:
    """{table: rows} of the ``table<T>.json`` files under ``root`` (missing ones left out)."""
    if not os.path.isdir(root):
        raise ClaimsError(f"--root {root} is not a folder (run_table.py's <output-root>/<scale>)")
    tables = {}
    for t in names:
        path = os.path.join(root, f"table{t}.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            rows = json.load(f)["rows"]
        if any("ours_seeds" not in r for r in rows):
            raise ClaimsError(
                f"{path} has no per-seed results (written by an older tools/run_table.py): "
                f"rewrite it with `tools/run_table.py --table {t} ... --collect-only`"
            )
        tables[t] = rows
    if not tables:
        raise ClaimsError(f"No table<T>.json under {root}: run tools/run_table.py first")
    return tables


def find_row(rows: Optional[List[Dict]], **setting) -> Optional[Dict]:
    for r in rows or []:
        if all(_same(r["setting"].get(k), v) for k, v in setting.items()):
            return r
    return None


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) < 1e-9
    return a == b


def aps(row: Optional[Dict]) -> List[float]:
    return [s["AP"] for s in row["ours_seeds"]] if row else []


def best_row(rows: List[Dict]) -> Optional[Dict]:
    """The row with the highest mean AP among those with a result."""
    ok = [r for r in rows if aps(r)]
    return max(ok, key=lambda r: statistics.mean(aps(r))) if ok else None


def label(row: Dict) -> str:
    return ", ".join(
        v if isinstance(v, str) else f"{k} {v:g}" for k, v in row["setting"].items()
        if v is not None
    )  # fmt: skip


def describe(row: Optional[Dict], named: bool = False) -> str:
    """Our AP of a row with its seed spread: "14.3 ± 0.5 [13.8, 14.9] (n 3)"; ``named``: with
    the row's setting in the parentheses."""
    if row is None:
        return "no such row"
    v = aps(row)
    failed = sum(r["state"] == "failed" for r in row["runs"])
    extra = (f", {failed} failed" if failed else "") + (f", {label(row)}" if named else "")
    if not v:
        return f"no result ({len(row['runs'])} run(s){extra})"
    if len(v) == 1:
        return f"{v[0]:.1f} (n 1{extra})"
    return (
        f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f} [{min(v):.1f}, {max(v):.1f}]"
        f" (n {len(v)}{extra})"
    )


def _p_floor(na: int, nb: int) -> float:
    """The smallest p the rank test can give with these numbers of seeds."""
    return 1 / math.comb(na + nb, na)


# ---------------------------------------------------------------------------------------------
# verdicts
# ---------------------------------------------------------------------------------------------
REPRODUCED, NOT_REPRODUCED, NOT_RESOLVED = "reproduced", "not reproduced", "not resolved"


def compare(a_row: Optional[Dict], b_row: Optional[Dict]) -> Dict:
    """Verdict on "A's AP > B's AP" (see :func:`rules`): verdict, why, d, p, p_reverse."""
    a, b = aps(a_row), aps(b_row)
    for row, v in ((a_row, a), (b_row, b)):
        if not v:
            what = label(row) if row else "a row"
            return {"verdict": NOT_RESOLVED, "why": f"{what}: no finished run", "d": None}
    d = statistics.mean(a) - statistics.mean(b)
    p, p_rev = rank_test(a, b), rank_test(b, a)
    out = {"d": d, "p": p, "p_reverse": p_rev}
    if p <= P_MAX:
        return {**out, "verdict": REPRODUCED, "why": f"p = {p:.3g}"}
    if p_rev <= P_MAX:
        return {**out, "verdict": NOT_REPRODUCED, "why": f"reversed, p = {p_rev:.3g}"}
    if d <= 0 and min(len(a), len(b)) >= MIN_SEEDS:
        return {**out, "verdict": NOT_REPRODUCED,
                "why": f"mean not higher, >= {MIN_SEEDS} seeds a side; p = {p:.3g}"}
    if _p_floor(len(a), len(b)) > P_MAX:
        why = f"{len(a)} vs {len(b)} seeds cannot give p <= {P_MAX}: add seeds"
    else:
        why = f"seeds overlap, p = {p:.3g}: add seeds"
    return {**out, "verdict": NOT_RESOLVED, "why": why}


def _row(t, table: str, **setting) -> Dict:
    row = find_row(t[table], **setting)
    if row is None:
        raise ClaimsError(
            f"table{table}.json has no row {setting}: collect the table without --rows"
        )
    return row


def _paper_best(rows: List[Dict]) -> Dict:
    return max(rows, key=lambda r: r["paper"]["AP"])


def _pair_claim(cid, claim, tables, a_row, b_row, paper_b_row, name_b=False) -> Dict:
    """A > B; ``name_b``: B is a "best" row, picked separately in the paper and by us."""
    c = compare(a_row, b_row)
    ours = f"{describe(a_row)} vs {describe(b_row, name_b)}"
    if c["d"] is not None:
        ours += f": d = {c['d']:+.1f}"
    pa, pb = a_row["paper"]["AP"], paper_b_row["paper"]["AP"]
    note = f" ({label(paper_b_row)})" if name_b else ""
    return {"id": cid, "claim": claim, "tables": tables, "ours": ours,
            "paper": f"{pa:.1f} vs {pb:.1f}{note}: {pa - pb:+.1f}", **c}  # fmt: skip


def _missing(cid, claim, tables, have) -> Optional[Dict]:
    lacking = [t for t in tables.split(", ") if t not in have]
    if not lacking:
        return None
    return {"id": cid, "claim": claim, "tables": tables, "paper": "", "ours": "",
            "verdict": NOT_RESOLVED, "why": f"no table{'/'.join(lacking)}.json", "d": None}


def fl_vs_best_ce(t) -> Dict:
    cid, claim, tabs = "fl_vs_best_ce", "FL (gamma 2) beats the best alpha-balanced CE", "1a, 1b"
    if (m := _missing(cid, claim, tabs, t)) is not None:
        return m
    fl = _row(t, "1b", gamma=2.0)
    return _pair_claim(cid, claim, tabs, fl, best_row(t["1a"]), _paper_best(t["1a"]), True)


def ce_collapse(t) -> Dict:
    cid, tabs = "ce_alpha0.1_collapses", "1a"
    claim = "CE alpha .10 collapses (AP ~ 0), the best alpha does not"
    if (m := _missing(cid, claim, tabs, t)) is not None:
        return m
    low, best, paper_best = _row(t, "1a", alpha=0.1), best_row(t["1a"]), _paper_best(t["1a"])
    # "the best CE beats alpha .10" by the rank test, and alpha .10 near 0 relative to the best
    c = {"id": cid, "claim": claim, "tables": tabs, **compare(best or low, low),
         "paper": f"best {paper_best['paper']['AP']:.1f} ({label(paper_best)}) vs alpha .10 "
                  f"{low['paper']['AP']:.1f}",
         "ours": f"best {describe(best, True)} vs alpha .10 {describe(low)}"}  # fmt: skip
    if c["d"] is None:
        return c
    frac = statistics.mean(aps(low)) / max(statistics.mean(aps(best)), 1e-9)
    c["ours"] += f": d = {c['d']:+.1f}; alpha .10 at {frac:.0%} of the best"
    if best is low or frac >= COLLAPSE:
        c.update(verdict=NOT_REPRODUCED, why=f"alpha .10 not below {COLLAPSE:.0%} of the best")
    return c


def gamma_claims(t) -> List[Dict]:
    """The shape of the gamma sweep: gamma 2 above the best other gamma, and above gamma 5."""
    best = ("gamma2_best", "gamma 2 is the best gamma")
    lower = ("gamma5_lower", "gamma 5 is below gamma 2")
    if "1b" not in t:
        return [_missing(*best, "1b", t), _missing(*lower, "1b", t)]
    g2, g5 = _row(t, "1b", gamma=2.0), _row(t, "1b", gamma=5.0)
    others = [r for r in t["1b"] if r is not g2]
    return [
        _pair_claim(*best, "1b", g2, best_row(others), _paper_best(others), True),
        _pair_claim(*lower, "1b", g2, g5, g5),
    ]


def fl_vs_best_ohem(t) -> Dict:
    cid, claim, tabs = "fl_vs_best_ohem", "FL beats the best OHEM", "1d"
    if (m := _missing(cid, claim, tabs, t)) is not None:
        return m
    fl = _row(t, "1d", method="FL")
    ohem = [r for r in t["1d"] if r is not fl]
    return _pair_claim(cid, claim, tabs, fl, best_row(ohem), _paper_best(ohem), True)


def equivalence(a_row: Optional[Dict], b_row: Optional[Dict], margin: float) -> Dict:
    """Verdict on "A's AP ~ B's AP" within ``margin`` x B's mean AP (see :func:`rules`)."""
    a, b = aps(a_row), aps(b_row)
    if not a or not b:
        row = a_row if not a else b_row
        return {"verdict": NOT_RESOLVED, "d": None,
                "why": f"{label(row) if row else 'a row'}: no finished run"}  # fmt: skip
    d = statistics.mean(a) - statistics.mean(b)
    m = margin * statistics.mean(b)

    def p_within(w):
        return max(rank_test([x + w for x in a], b), rank_test([y + w for y in b], a))

    # The smallest margin these seeds show equality within (None if no margin can: few seeds).
    shown = None
    if _p_floor(len(a), len(b)) <= P_MAX:
        cands = sorted({abs(x - y) + 1e-6 for x in a for y in b} | {1e-6})
        shown = next(c for c in cands if p_within(c) <= P_MAX)
    out = {"d": d, "margin": m, "p": p_within(m), "equal_within": shown}
    if out["p"] <= P_MAX:
        return {**out, "verdict": REPRODUCED, "why": f"within ±{m:.1f} AP, p = {out['p']:.3g}"}
    p_dir = rank_test(a, b) if d > 0 else rank_test(b, a)
    if abs(d) >= m and (p_dir <= P_MAX or min(len(a), len(b)) >= MIN_SEEDS):
        return {**out, "verdict": NOT_REPRODUCED, "why": f"|d| >= {m:.1f} AP; p = {p_dir:.3g}"}
    why = (f"the seeds show equality within ±{shown:.1f} AP only, not ±{m:.1f}" if shown
           else f"{len(a)} vs {len(b)} seeds cannot give p <= {P_MAX}: add seeds")  # fmt: skip
    return {**out, "verdict": NOT_RESOLVED, "why": why}


def flstar_claims(t, margin: float) -> List[Dict]:
    out, tabs = [], "3"
    paper_rows = [("FL*", 2.0, 1.0), ("FL*", 4.0, 0.0)]
    for loss, g, b in paper_rows:
        cid, claim = f"flstar_g{g:g}_b{b:g}_equals_fl", f"FL* (gamma {g:g}, beta {b:g}) ~ FL"
        if (m := _missing(cid, claim, tabs, t)) is not None:
            out.append(m)
            continue
        star, fl = _row(t, "3", loss=loss, gamma=g, beta=b), _row(t, "3", loss="FL")
        c = equivalence(star, fl, margin)
        ours = f"{describe(star)} vs {describe(fl)}"
        if c["d"] is not None:
            ours += f": d = {c['d']:+.1f}, margin ±{c['margin']:.1f}"
        pa, pb = star["paper"]["AP"], fl["paper"]["AP"]
        out.append({"id": cid, "claim": claim, "tables": tabs, "ours": ours,
                    "paper": f"{pa:.1f} vs {pb:.1f}: {pa - pb:+.1f}", **c})  # fmt: skip
    return out


def trend_claim(t, table: str, claim: str, rows_of=lambda rows: rows) -> Optional[Dict]:
    cid = f"trend_{table}"
    if (m := _missing(cid, claim, table, t)) is not None:
        return m
    rows = [r for r in rows_of(t[table]) if aps(r)]
    paper = max(rows_of(t[table]), key=lambda r: r["paper"]["AP"])
    worst = min(rows_of(t[table]), key=lambda r: r["paper"]["AP"])
    c = {"id": cid, "claim": claim, "tables": table, "d": None,
         "paper": f"best {label(paper)} ({paper['paper']['AP']:.1f}), worst {label(worst)} "
                  f"({worst['paper']['AP']:.1f})"}  # fmt: skip
    if len(rows) < 3:
        return {**c, "ours": f"{len(rows)} row(s) with a result", "verdict": NOT_RESOLVED,
                "why": "fewer than 3 rows with a result"}  # fmt: skip
    x = [r["paper"]["AP"] for r in rows]
    y = [statistics.mean(aps(r)) for r in rows]
    rho, p = spearman_test(x, y)
    ours_best, ours_worst = rows[y.index(max(y))], rows[y.index(min(y))]
    c["ours"] = (f"best {label(ours_best)} ({max(y):.1f}), worst {label(ours_worst)} "
                 f"({min(y):.1f}); over {len(rows)} rows")  # fmt: skip
    c.update(rho=rho, p=p)
    pair = compare(find_row(rows, **paper["setting"]), find_row(rows, **worst["setting"]))
    if pair["d"] is not None:
        c["ours"] += f"; paper's best - worst: d = {pair['d']:+.1f} ({pair['verdict']})"
    if rho is None:
        return {**c, "verdict": NOT_RESOLVED, "why": "our APs are all equal"}
    c["ours"] += f"; Spearman rho = {rho:+.2f}"
    if rho > 0 and p <= P_MAX:
        return {**c, "verdict": REPRODUCED, "why": f"p = {p:.3g}"}
    if rho <= 0:
        return {**c, "verdict": NOT_REPRODUCED, "why": f"rho <= 0; p = {p:.3g}"}
    return {**c, "verdict": NOT_RESOLVED, "why": f"p = {p:.3g}"}


def schedule_check(t) -> Optional[Dict]:
    """Whether FL's (Table 1b, gamma 2) mean val AP still rose over the last quarter of the
    schedule: more than its seeds' std at the last evaluation = still rising."""
    fl = find_row(t.get("1b"), gamma=2.0)
    curve = fl and fl.get("val_AP")
    if not curve or len(curve["iterations"]) < 2:
        return None
    its, mean = curve["iterations"], curve["mean"]
    q = max(i for i, it in enumerate(its) if it <= 0.75 * its[-1] or i == 0)
    rise = mean[-1] - mean[q]
    last = [v[-1] for v in curve["seeds"].values()]
    std = statistics.stdev(last) if len(last) > 1 else None
    text = (f"FL (1b, gamma 2) mean val AP {mean[q]:.1f} at iteration {its[q]}, {mean[-1]:.1f} at "
            f"{its[-1]}: {rise:+.1f}; seeds' std at the end "
            + ("-" if std is None else f"{std:.1f}"))  # fmt: skip
    verdict = "not resolved" if std is None else "still rising" if rise > std else "stopped rising"
    return {"id": "fl_val_ap_plateau", "text": text, "rise": rise, "std": std, "verdict": verdict}


def all_claims(tables: Dict[str, List[Dict]], margin: float = MARGIN) -> List[Dict]:
    """Every claim's verdict dict (see the functions above), in the order of the page."""
    out = [fl_vs_best_ce(tables), ce_collapse(tables), *gamma_claims(tables),
           fl_vs_best_ohem(tables), *flstar_claims(tables, margin)]  # fmt: skip
    out.append(trend_claim(tables, "1c", "AP vs anchors (#scales x #ratios): the paper's order"))
    if "1e" in tables:  # the depth-50 rows (101 has no demo counterpart)
        depth50 = lambda rows: [r for r in rows if r["setting"]["depth"] == 50]  # noqa: E731
        out.append(trend_claim(tables, "1e", "AP rises with the input size", depth50))
    return out


def code_versions(tables: Dict[str, List[Dict]]) -> Dict[str, int]:
    """{training code id (run_table.py's record): number of finished runs}, over all tables."""
    out: Dict[str, int] = {}
    for rows in tables.values():
        for row in rows:
            for r in row["runs"]:
                if r["state"] == "done":
                    v = r.get("code_id") or "unrecorded"
                    out[v] = out.get(v, 0) + 1
    return out


def markdown(root: str, claims: List[Dict], check: Optional[Dict], margin: float = MARGIN,
             versions: Optional[Dict[str, int]] = None) -> str:  # fmt: skip
    lines = [
        f"Claims of the paper on the tables of `{root}` (`tools/paper_claims.py`); AP: mean "
        "± sample std [lowest, highest seed] (n seeds); d: difference of the means.",
        "",
        "| claim | table | paper AP | ours AP | verdict |",
        "|---|---|---|---|---|",
    ]
    for c in claims:
        lines.append(f"| {c['claim']} | {c['tables']} | {c['paper']} | {c['ours']} | "
                     f"**{c['verdict']}** ({c['why']}) |")  # fmt: skip
    if check:
        lines += ["", f"Schedule: {check['text']}: **{check['verdict']}** (still rising when the "
                  "rise exceeds that std)."]  # fmt: skip
    if versions:
        v = ", ".join(f"{k}: {n} run(s)" for k, n in sorted(versions.items()))
        one = len(versions) == 1 and "unrecorded" not in versions
        lines += ["", f"Training code of the finished runs: {v}"
                  + ("" if one else " -- **not one version**: rows may differ by code")]
    lines += ["", "Decision rules:", "", rules(margin)]
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--root", required=True, help="run_table.py's <output-root>/<scale> folder")
    p.add_argument("--markdown", default=None, help="write the Markdown here too")
    p.add_argument("--json", default=None, help="default: <root>/claims.json")
    p.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES,
                   help="read only these tables (e.g. to leave out one run on older code)")
    p.add_argument("--margin", type=float, default=MARGIN,
                   help="FL* ~ FL: equal within this fraction of FL's mean AP")  # fmt: skip
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tables = load_tables(args.root, args.tables)
        claims, check = all_claims(tables, args.margin), schedule_check(tables)
    except ClaimsError as e:
        print(f"paper_claims: {e}", file=sys.stderr)
        return 2
    versions = code_versions(tables)
    md = markdown(args.root, claims, check, args.margin, versions)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(md)
    json_path = args.json or os.path.join(args.root, "claims.json")
    with open(json_path, "w") as f:
        json.dump({"root": args.root, "tables": sorted(tables), "p_max": P_MAX,
                   "min_seeds": MIN_SEEDS, "collapse": COLLAPSE, "margin": args.margin,
                   "code_versions": versions, "claims": claims, "schedule": check},
                  f, indent=2)  # fmt: skip
    print(md)
    print(f"wrote {json_path}" + (f"\nwrote {args.markdown}" if args.markdown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
