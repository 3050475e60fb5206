"""Benchmark tables label each row by what it ran with, so rows keep their meaning after a
default moves (bench.summarize.settings)."""

import pytest

from bench.summarize import defaults, label, table


def _row(**kw):
    base = {"model": "resnet18", "bits": "W4A2", "method": "qdrop", "seed": 0, "iters": 2000, "device": "cpu",
            "cl": False, "overrides": {}, "fp_top1": 90.5, "quant_top1": 87.0, "calib_seconds": 1.0}
    return {**base, **kw}


def test_a_row_from_before_the_range_norm_moved_is_labelled_with_the_old_norm():
    assert label(_row()) == 'qdrop {"act_range_p": 2.0}'
    assert label(_row(overrides={"act_range_p": 2.4})) == "qdrop"


def test_cl_rows_of_the_old_default_form_say_so_and_base_rows_carry_no_cl_block():
    old_cl = {**defaults()["cl_calib"], "enabled": True, "critic": "nce", "lambda": 0.1}
    assert label(_row(cl=True, config={**defaults(), "cl_calib": old_cl})) == \
        'qdrop+CL {"cl_calib": {"critic": "nce", "lambda": 0.1}}'
    # a row from before configs were recorded: the form of then, the term on every iteration
    assert label(_row(cl=True, overrides={"act_range_p": 2.4})) == \
        'qdrop+CL {"cl_calib": {"critic": "nce", "every": 1, "hold": false, "lambda": 0.1}}'
    base = {**defaults(), "cl_calib": {**old_cl, "enabled": False}}  # a base row made before the default moved
    assert label(_row(config=base)) == "qdrop"


def test_rows_that_ran_alike_share_a_label_however_they_asked_for_it():
    cfg = dict(defaults())
    asked = _row(overrides={"act_range_p": 2.4}, config=cfg)
    by_default = _row(config=cfg)
    assert label(asked) == label(by_default) == "qdrop"
    assert "(n=2" in table([asked, by_default])


def test_a_nested_setting_shows_only_what_differs_and_cl_is_said_once():
    cfg = {**defaults(), "cl_calib": {**defaults()["cl_calib"], "enabled": True, "tau": 0.1}}
    assert label(_row(cl=True, config=cfg)) == 'qdrop+CL {"cl_calib": {"tau": 0.1}}'
    assert label(_row(method="brecq", overrides={"drop_scope": "all"})) == 'brecq {"act_range_p": 2.0, "drop_scope": "all"}'


def test_the_official_comparison_uses_only_the_model_the_official_code_ran_on():
    from bench.make_results import anchor_rows

    ours = [_row(bits="W2A4", overrides={"act_range_p": 2.4}, quant_top1=89.4),
            _row(model="mobilenet_v2", bits="W2A4", overrides={"act_range_p": 2.4}, quant_top1=84.9)]
    w2a4 = next(line for line in anchor_rows([], ours).splitlines() if line.startswith("| W2A4"))
    assert "89.40 (n=1)" in w2a4 and "84.9" not in w2a4


def test_a_run_under_an_older_default_is_not_taken_as_done_for_todays_default():
    from bench.accuracy import resolved_config, run_key

    spec = {"model": "resnet18", "bits": "W4A2", "method": "qdrop", "seed": 0, "iters": 2000, "device": "cpu",
            "cl": False, "overrides": {}}
    todays = run_key({**spec, "config": resolved_config(spec)})
    assert run_key(_row()) != todays  # made when act_range_p defaulted to 2.0
    assert run_key(_row(overrides={"act_range_p": 2.4})) == todays  # asked for what is now the default
    assert run_key(_row(config=resolved_config(spec))) == todays


def test_a_resumed_run_counts_for_accuracy_but_not_for_time():
    rows = [_row(calib_seconds=60.0), _row(seed=1, calib_seconds=1.3, resumed_units=10)]
    assert "(n=2; 60 s)" in table(rows)


def test_the_benchmark_retries_failed_runs_and_runs_alike_variants_once():
    from bench.accuracy import to_do

    spec = {"model": "resnet18", "bits": "W4A2", "method": "qdrop", "seed": 0, "iters": 2000, "device": "cpu",
            "cl": False, "overrides": {}}
    failed = {**_row(overrides={"act_range_p": 2.4}), "error": "BrokenProcessPool"}
    assert to_do([spec], [failed]) == [spec]
    assert to_do([spec], [_row(overrides={"act_range_p": 2.4})]) == []
    alike = [spec, {**spec, "overrides": {"act_range_p": 2.4}}]  # the second asks for today's default
    assert to_do(alike, []) == [spec]
    assert to_do([{**spec, "device": "cuda"}], [_row(overrides={"act_range_p": 2.4})]) != []


def test_the_committed_results_page_is_what_the_committed_rows_make():
    """RESULTS.md quotes tables; a row added or a head edited without regenerating fails here."""
    from bench.make_results import HERE, render
    from bench.summarize import ANCHOR

    if not ANCHOR.is_file():
        pytest.fail(f"{ANCHOR} not found: set CLCALIB_REFERENCE_DIR to the shared reference folder")
    assert render() == (HERE / "RESULTS.md").read_text(), "run `python -m bench.make_results` and commit RESULTS.md"


def test_cl_forms_table_counts_a_base_that_asked_for_todays_default_and_matches_cl_blocks():
    from bench.cl_forms_table import table as cl_table

    cl = {"critic": "relational", "lambda": 10.0}
    cfg = {k: v for k, v in defaults().items()}
    rows = [_row(seed=0, overrides={"act_range_p": 2.4}, quant_top1=86.0),  # no config: asked for 2.4
            _row(seed=1, config=cfg, quant_top1=86.4),
            _row(seed=0, cl=True, overrides={"cl_calib": cl}, quant_top1=87.0),
            _row(seed=1, cl=True, overrides={"cl_calib": cl}, quant_top1=87.2),
            _row(seed=2, cl=True, overrides={"cl_calib": {"critic": "nce"}}, quant_top1=10.0)]
    out = cl_table(rows, cl)
    assert "| W4A2 | 86.20 ± 0.28 (n=2) | 87.10 ± 0.14 (n=2) |" in out
    assert "+0.90 | 0.28 | yes |" in out


def test_cl_diagnose_markdown_renders_a_unit_row():
    from bench.cl_diagnose import EPS, SCALE, markdown

    ph = {"alpha_ratio": 0.1, "alpha_cos": 0.2, "act_ratio": 0.05, "L_loss": 0.01, "L_pos": -0.9, "L_neg": 3.9, "L_const": 3.0}
    d = {"model": "resnet18", "bits": "W2A2", "method": "qdrop", "iters": 200, "seed": 0,
         "cl_calib": {"critic": "relational", "mapping": "fp_tail", "tail_end": "logits", "negatives": "batch", "lambda": 10.0, "tau": 0.5},
         "units": [{"unit": "layer1.0", "start": ph, "mid": ph, "end": ph,
                    "perturb_noise": {str(e): e for e in EPS}, "perturb_error": {str(t): t for t in SCALE}}]}
    md = markdown(d)
    assert "| layer1.0 | 0.1 / 0.1 / 0.1 | 0.2 / 0.2 / 0.2 | 0.05 / 0.05 / 0.05 |" in md
    assert "critic=relational" in md


def test_draws_from_a_larger_supply_are_other_runs_with_their_own_table_row():
    from bench.accuracy import resolved_config, run_dir, run_key
    from bench.cl_draws_table import table as draws_table

    spec = {"model": "mobilenet_v2", "bits": "W4A2", "method": "qdrop", "seed": 0, "iters": 500, "device": "cpu",
            "cl": False, "overrides": {"calib_size": 1024, "calib_seed": 1}}
    of_1024 = run_key({**spec, "config": resolved_config(spec)})
    of_8192 = run_key({**spec, "calib_supplied": 8192, "config": resolved_config(spec)})
    assert of_1024 != of_8192  # a 1024-of-1024 row must not stand in for a draw from 8192
    assert run_dir(spec) != run_dir({**spec, "calib_supplied": 8192})  # nor share its resume state
    rows = []
    for supply, base, cl in ((1024, 56.0, 58.0), (8192, 60.0, 59.0)):
        for d in (0, 1):
            for on, top1 in ((False, base + d), (True, cl + d)):
                cfg = {**resolved_config({**spec, "cl": on}), "calib_seed": d}
                rows.append({**spec, "cl": on, "calib_supplied": supply, "config": cfg, "quant_top1": top1,
                             "calib_seconds": 1.0})
    got = draws_table(rows)
    # the shipped form (enabled: true) is labelled by what it is, whatever the default was when it ran
    assert "| 1024 | 500 | 2 | 56.50 ± 0.71 | base + CL (every 8, hold True): 58.50 ± 0.71 |" in got
    assert "| 1024 of 8192 | 500 | 2 | 60.50 ± 0.71 | base + CL (every 8, hold True): 59.50 ± 0.71 |" in got


def test_a_draws_row_is_labelled_by_the_cl_form_it_ran_whatever_enabled_selected_then():
    from bench.accuracy import resolved_config
    from bench.cl_draws_table import table as draws_table

    spec = {"model": "resnet18", "bits": "W4A2", "method": "qdrop", "seed": 0, "iters": 500, "device": "cpu",
            "overrides": {"calib_size": 128}}
    rows = []
    for d in (0, 1):
        base = {**resolved_config({**spec, "cl": False}), "calib_seed": d}
        rows.append({**spec, "cl": False, "config": base, "quant_top1": 80.0 + d, "calib_seconds": 1.0})
        cl = {**resolved_config({**spec, "cl": True}), "calib_seed": d}
        for block, top1 in (({"every": 1, "hold": False}, 81.0), ({"every": 8, "hold": True}, 82.0),
                            ({"every": 8}, 70.0)):  # the last: a row from before hold existed (pulses)
            cfg = {**cl, "cl_calib": {**{k: v for k, v in cl["cl_calib"].items() if k not in ("every", "hold")}, **block}}
            rows.append({**spec, "cl": True, "config": cfg, "quant_top1": top1 + d, "calib_seconds": 1.0})
    got = draws_table(rows)
    assert "| base + CL: 81.50 ± 0.71 |" in got
    assert "| base + CL (every 8, hold True): 82.50 ± 0.71 |" in got
    assert "| base + CL (every 8): 70.50 ± 0.71 |" in got
