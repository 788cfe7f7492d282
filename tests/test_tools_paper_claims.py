"""
tools/paper_claims.py: the rank tests against hand-counted answers, and the verdicts on the
table JSONs that tools/run_table.py writes from synthetic run folders (a detectron2-style
log.txt per seed, with the AP each case needs).
"""

import json
import math
import os

import pytest
from repo_scripts import QUICK, REPO, load_script  # noqa: I001  (tests/ helpers)
from test_tools_run_table import LOG

pc = load_script(os.path.join("tools", "paper_claims.py"), "paper_claims")
rt = load_script(os.path.join("tools", "run_table.py"), "run_table")


def _row(seeds, **setting):
    """A table JSON row as run_table writes it, reduced to what the claims read."""
    return {"setting": setting, "paper": {"AP": 0.0},
            "ours_seeds": [{"seed": i, "AP": v} for i, v in enumerate(seeds)],
            "runs": [{"seed": i, "state": "done"} for i in range(len(seeds))]}  # fmt: skip


def test_rank_test_counts_the_splits_of_the_pooled_seeds():
    # 3 vs 3 apart: 1 of the C(6, 3) = 20 splits is as extreme
    assert pc.rank_test([10, 11, 12], [7, 8, 9]) == pytest.approx(1 / 20)
    # 10 below 10.5: U = 8 of 9, reached by 2 splits ({10.5, 11, 12} and {10, 11, 12})
    assert pc.rank_test([10, 11, 12], [8, 9, 10.5]) == pytest.approx(2 / 20)
    assert pc.rank_test([7, 8, 9], [10, 11, 12]) == 1.0
    # one seed above three: at best 1 of C(4, 1) = 4
    assert pc.rank_test([20], [7, 8, 9]) == pytest.approx(1 / 4)
    # ties count half: all equal -> every split has U = 4.5 of 9
    assert pc.rank_test([0, 0, 0], [0, 0, 0]) == 1.0


def test_spearman_against_closed_forms():
    x = [30.3, 31.9, 31.8, 32.4, 34.2, 34.0, 33.8]
    assert pc.spearman(x, [v - 20 for v in x]) == pytest.approx(1.0)
    assert pc.spearman(x, [-v for v in x]) == pytest.approx(-1.0)
    # 1 - 6 sum(d^2) / (n (n^2 - 1)) with one swap of neighbours in 5: 1 - 12/120 = 0.9
    assert pc.spearman([1, 2, 3, 4, 5], [1, 2, 4, 3, 5]) == pytest.approx(0.9)
    rho, p = pc.spearman_test(x, [v - 20 for v in x])
    assert rho == pytest.approx(1.0) and p == pytest.approx(1 / math.factorial(7))
    assert pc.spearman([1, 2, 3], [5, 5, 5]) is None


@pytest.mark.parametrize(
    "a, b, verdict, why",
    [
        ([10, 11, 12], [7, 8, 9], "reproduced", "p = 0.05"),
        ([10, 11, 12], [8, 9, 10.5], "not resolved", "seeds overlap, p = 0.1"),
        ([10, 11, 12], [11, 12, 13], "not reproduced", "mean not higher"),
        ([10, 11], [11.5, 13], "not resolved", "2 vs 2 seeds cannot give p <= 0.05"),
        ([7, 8, 9], [10, 11, 12], "not reproduced", "reversed, p = 0.05"),
        ([20], [7, 8, 9], "not resolved", "1 vs 3 seeds cannot give"),
        ([10, 11, 12], [], "not resolved", "no finished run"),
    ],
)
def test_compare_verdicts(a, b, verdict, why):
    c = pc.compare(_row(a, alpha=0.5), _row(b, alpha=0.75))
    assert c["verdict"] == verdict and why in c["why"], c
    if a and b:
        assert c["d"] == pytest.approx(sum(a) / len(a) - sum(b) / len(b))


def test_equivalence_verdicts():
    fl = _row([10, 11, 12], loss="FL")
    # margin 5% of 11 = 0.55; every FL* seed is within 1.8 of every FL seed, not within 0.55
    c = pc.equivalence(_row([10.2, 11.1, 11.8], loss="FL*"), fl, 0.05)
    assert c["verdict"] == "not resolved" and c["margin"] == pytest.approx(0.55)
    assert c["equal_within"] == pytest.approx(1.8, abs=1e-5)
    c = pc.equivalence(_row([10.2, 11.1, 11.8], loss="FL*"), fl, 0.2)  # margin 2.2
    assert c["verdict"] == "reproduced" and c["p"] == pytest.approx(1 / 20)
    c = pc.equivalence(_row([5, 6, 7], loss="FL*"), fl, 0.05)
    assert c["verdict"] == "not reproduced" and c["d"] == pytest.approx(-5)
    c = pc.equivalence(_row([11], loss="FL*"), fl, 0.5)
    assert c["verdict"] == "not resolved" and "1 vs 3 seeds" in c["why"]


# Our AP per (table, setting, seed) of the synthetic reproduction: None = not run, "nan" = no
# detection above the score threshold, "failed" = diverged. Rows not named: one seed at AP 1.
FL = [10.0, 11.0, 12.0]
SYNTHETIC = {
    ("1a", (("alpha", 0.1),)): ["nan"],  # no detection, one seed
    ("1a", (("alpha", 0.25),)): [5.0, 7.5, 8.5],
    ("1a", (("alpha", 0.75),)): [7.0, 8.0, 9.0],  # the best CE, below FL's every seed
    ("1b", (("gamma", 1.0), ("alpha", 0.25))): [11.0, 12.0, 13.0],  # above gamma 2
    ("1b", (("gamma", 2.0), ("alpha", 0.25))): FL,
    ("1b", (("gamma", 5.0), ("alpha", 0.25))): [8.0, 9.0, 10.5],  # overlaps gamma 2
    ("1d", (("method", "FL"),)): FL,
    ("1d", (("method", "OHEM"), ("batch_size", 128), ("nms", 0.5))): [3.0],  # best OHEM, 1 seed
    ("1d", (("method", "OHEM"), ("batch_size", 128), ("nms", 0.7))): ["failed"],
    ("3", (("loss", "CE"),)): [7.0, 8.0, 9.0],  # the folders of 1a's alpha .75 (same command)
    ("3", (("loss", "FL"),)): FL,
    ("3", (("loss", "FL*"), ("gamma", 2.0))): [10.2, 11.1, 11.8],
    ("3", (("loss", "FL*"), ("gamma", 4.0))): [5.0, 6.0, 7.0],
}


def _synthetic_aps(table, row):
    for (t, setting), aps in SYNTHETIC.items():
        if t == table and all(row.setting[k] == v for k, v in setting):
            return aps
    if table == "1c":  # the paper's order, 20 AP lower
        return [row.paper["AP"] - 20]
    return [1.0]


def _reproduce(root, tables=("1a", "1b", "1c", "1d", "3")):
    """Run folders as train_net.py leaves them, then run_table.py --collect-only's JSONs."""
    for table in tables:
        argv = ["--table", table, "--scale", "demo", "--demo-config", QUICK, "--iters", "5",
                "--seeds", "0", "1", "2", "--output-root", str(root)]  # fmt: skip
        args = rt.build_parser().parse_args(argv + ["--collect-only"])
        for run in rt.plan_runs(args, rt.discover_rows(table, os.path.join(REPO, "configs"))):
            aps = _synthetic_aps(table, run.row)
            if run.skipped or run.seed >= len(aps):
                continue
            os.makedirs(run.output_dir, exist_ok=True)
            ap = aps[run.seed]
            if ap == "failed":
                with open(os.path.join(run.output_dir, "run_status.json"), "w") as f:
                    json.dump({"state": "failed", "reason": "FloatingPointError: nan"}, f)
                continue
            text = LOG.format(out=run.output_dir, ap=float(ap))
            if ap == "nan":  # what detectron2 logs when nothing is detected
                text = text.replace("nan,52.5000,36.5000", "nan,nan,nan")
            with open(os.path.join(run.output_dir, "log.txt"), "w") as f:
                f.write(text)
            if table == "1b" and run.row.setting["gamma"] == 2.0:  # val AP every 200 iterations
                curve = [5.0, 9.0, 10.0, 9.8 + 0.4 * run.seed]
                with open(os.path.join(run.output_dir, "metrics.json"), "w") as f:
                    for it, v in zip((199, 399, 599, 799), curve):
                        f.write(json.dumps({"iteration": it, "bbox/AP": v}) + "\n")
        assert rt.main(argv + ["--collect-only"]) == 0
    return os.path.join(root, "demo")


def test_verdicts_on_run_tables_json(tmp_path, capsys):
    root = _reproduce(tmp_path)
    md_path = tmp_path / "claims.md"
    assert pc.main(["--root", root, "--markdown", str(md_path)]) == 0
    data = json.loads((tmp_path / "demo" / "claims.json").read_text())
    claims = {c["id"]: c for c in data["claims"]}
    assert [c["id"] for c in data["claims"]] == [
        "fl_vs_best_ce", "ce_alpha0.1_collapses", "gamma2_best", "gamma5_lower",
        "fl_vs_best_ohem", "flstar_g2_b1_equals_fl", "flstar_g4_b0_equals_fl", "trend_1c",
    ]  # fmt: skip  (no table1e.json: no 1e claim)
    verdicts = {k: (c["verdict"], c["d"]) for k, c in claims.items()}

    # FL 11 +- 1 (10-12) against the best CE, alpha .75: 8 +- 1 (7-9): apart, p = 1/20
    assert verdicts["fl_vs_best_ce"] == ("reproduced", pytest.approx(3.0))
    assert claims["fl_vs_best_ce"]["p"] == pytest.approx(0.05)
    # alpha .10: no detection (AP 0), one seed: collapsed, but 3 vs 1 seeds cannot decide
    c = claims["ce_alpha0.1_collapses"]
    assert c["verdict"] == "not resolved" and c["d"] == pytest.approx(8.0)
    assert "3 vs 1 seeds" in c["why"] and "at 0% of the best" in c["ours"]
    assert verdicts["gamma2_best"] == ("not reproduced", pytest.approx(-1.0))  # gamma 1 higher
    assert verdicts["gamma5_lower"][0] == "not resolved"  # overlapping
    assert claims["gamma5_lower"]["p"] == pytest.approx(0.1)
    # the best OHEM has one seed (and b128/nms .7 failed): not resolved
    assert verdicts["fl_vs_best_ohem"] == ("not resolved", pytest.approx(8.0))
    assert "OHEM, batch_size 128, nms 0.5" in claims["fl_vs_best_ohem"]["ours"]
    assert verdicts["flstar_g2_b1_equals_fl"][0] == "not resolved"
    assert verdicts["flstar_g4_b0_equals_fl"] == ("not reproduced", pytest.approx(-5.0))
    assert claims["trend_1c"]["verdict"] == "reproduced"
    assert claims["trend_1c"]["rho"] == pytest.approx(1.0)
    # FL's val AP: 10.0 at 599, mean 10.2 at 799 (+0.2), seeds 9.8 / 10.2 / 10.6 (std 0.4)
    assert data["schedule"]["verdict"] == "stopped rising"
    assert data["schedule"]["rise"] == pytest.approx(0.2)

    md = md_path.read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| FL (gamma 2) beats"))
    # the paper's numbers beside ours: FL 34.0 against its best CE, alpha .75's 31.1
    assert "34.0 vs 31.1 (alpha 0.75): +2.9" in line
    assert "11.0 ± 1.0 [10.0, 12.0] (n 3) vs 8.0 ± 1.0 [7.0, 9.0] (n 3, alpha 0.75): d = +3.0" in (
        line
    )
    assert "**reproduced** (p = 0.05)" in line
    assert "Decision rules" in md and "Mann-Whitney" in md and "stopped rising" in md
    # the synthetic runs recorded no code id (run_table.py's execute() does): said so
    assert data["code_versions"] == {"unrecorded": 54} and "**not one version**" in md

    # Three seeds of alpha .10, all without detection: the collapse is resolved.
    SYNTHETIC[("1a", (("alpha", 0.1),))] = ["nan", "nan", "nan"]
    try:
        _reproduce(tmp_path, tables=("1a",))
    finally:
        SYNTHETIC[("1a", (("alpha", 0.1),))] = ["nan"]
    assert pc.main(["--root", root, "--margin", "0.2", "--tables", "1a", "1b", "1d", "3"]) == 0
    claims = {c["id"]: c for c in json.loads((tmp_path / "demo" / "claims.json").read_text())
              ["claims"]}  # fmt: skip
    assert claims["ce_alpha0.1_collapses"]["verdict"] == "reproduced"
    assert claims["ce_alpha0.1_collapses"]["p"] == pytest.approx(0.05)
    assert claims["flstar_g2_b1_equals_fl"]["verdict"] == "reproduced"  # margin 2.2 AP
    assert claims["trend_1c"]["why"] == "no table1c.json"  # left out with --tables


def test_missing_or_old_tables_are_clear(tmp_path, capsys):
    assert pc.main(["--root", str(tmp_path / "none")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert pc.main(["--root", str(tmp_path)]) == 2
    assert "run tools/run_table.py first" in capsys.readouterr().err
    (tmp_path / "table1a.json").write_text(json.dumps({"rows": [{"setting": {}, "runs": []}]}))
    assert pc.main(["--root", str(tmp_path)]) == 2
    assert "older tools/run_table.py" in capsys.readouterr().err
    # only Table 1a: the claims on other tables say which JSON they lack
    row = _row([1.0], alpha=0.1)
    (tmp_path / "table1a.json").write_text(json.dumps({"rows": [row]}))
    assert pc.main(["--root", str(tmp_path)]) == 0
    claims = json.loads((tmp_path / "claims.json").read_text())["claims"]
    assert claims[0]["verdict"] == "not resolved" and claims[0]["why"] == "no table1b.json"


def test_input_size_trend_of_table_1e(tmp_path):
    from focal_det.paper_tables import get_paper_table

    rows = []
    ours = {400: [2.0], 500: [3.0], 600: [5.0, 5.0], 700: [4.0], 800: [6.0]}  # 600/700 swapped
    for p in get_paper_table("1e").rows:
        row = _row(ours[p["scale"]] if p["depth"] == 50 else [], depth=p["depth"], scale=p["scale"])
        rows.append({**row, "paper": {"AP": p["AP"]}})
    (tmp_path / "table1e.json").write_text(json.dumps({"rows": rows}))
    assert pc.main(["--root", str(tmp_path)]) == 0
    (c,) = [c for c in json.loads((tmp_path / "claims.json").read_text())["claims"]
            if c["id"] == "trend_1e"]  # fmt: skip
    # one swap of neighbours in 5: rho = 0.9; as high or higher: 1 + 4 of the 5! orders
    assert c["rho"] == pytest.approx(0.9) and c["p"] == pytest.approx(5 / 120)
    assert c["verdict"] == "reproduced" and "over 5 rows" in c["ours"]
