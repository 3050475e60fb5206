"""``clcalib`` command line: calibrate and evaluate here; serve/worker/submit/... talk to the service."""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path

from pydantic import ValidationError

from clcalib.config import CalibConfig
from clcalib.config_flags import add_config_flags, config_overrides
from clcalib.errors import CalibrationError, ConfigError


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="quantize a model and write OUTDIR/quantized.safetensors + report.json",
                       description="Quantize a model: either --arch with --num-classes and --weights (a registered "
                       "architecture), or --model (any model as a torch.export program).",
                       allow_abbrev=False)
    g = _model_and_calibration(p)
    g.add_argument("--eval", help="folder, zip or tar with one subfolder per class (named 0..C-1, or by class "
                   "name with --labels)")
    g.add_argument("--labels", help=LABELS_HELP)
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--config", help="JSON file of config fields; the flags below override it")
    g.add_argument("--resume-dir", help="keep per-unit state here; a rerun continues after the last finished unit")
    add_config_flags(p)
    g = p.add_argument_group("run")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_calibrate)


def _model_and_calibration(p: argparse.ArgumentParser):
    """The model (--arch with --num-classes and --weights, or --model) and --calib, as one group."""
    g = p.add_argument_group("model and data")
    g.add_argument("--arch", help=f"a registered architecture: {', '.join(_archs())} (with --num-classes and --weights)")
    g.add_argument("--num-classes", type=int, help="the model's output classes (with --arch)")
    g.add_argument("--weights", help="the model's state_dict: .safetensors or a torch file (loaded weights_only)")
    g.add_argument("--model", help="any model as a torch.export program (.pt2, dynamic batch), instead of --arch")
    g.add_argument("--calib", required=True, help="folder, zip or tar of images, or an .npy/.safetensors tensor")
    return g


LABELS_HELP = ("text file of the model's class names, one per line in index order: evaluation folders named by "
               "class map through it (without it they map in sorted order, with a warning)")


def _labels(a: argparse.Namespace) -> list[str] | None:
    from clcalib.data import read_labels

    return read_labels(a.labels) if getattr(a, "labels", None) else None


def _mapping_note(data) -> None:
    """Say how class folders were mapped, loudly when it was by sorted name."""
    from clcalib.traps import mapping_warning

    w = mapping_warning(data.mapping, data.by_name)
    if w:
        print(f"clcalib: WARNING: {w}", file=sys.stderr)


def _archs() -> list[str]:
    from clcalib.graph.registry import ARCHS

    return list(ARCHS)


def _config_file(path: str | None) -> dict:
    """The --config JSON object of config fields ({} without one)."""
    try:
        base = json.loads(Path(path).read_text()) if path else {}
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--config {path}: not a readable JSON file ({e})") from None
    if not isinstance(base, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of config fields")
    return base


def config_from_args(a: argparse.Namespace) -> CalibConfig:
    return CalibConfig.model_validate(config_overrides(a, _config_file(a.config)))


class _Bar:
    """tqdm bar over all units x iterations, fed by ProgressEvents."""

    def __init__(self, quiet: bool):
        self.bar = None
        self.quiet = quiet

    def __call__(self, e) -> None:
        from tqdm import tqdm

        if e.stage == "warning":  # loud even with --quiet: the run may be giving garbage
            tqdm.write(f"clcalib: WARNING: {e.message}", file=sys.stderr)
            return
        if self.quiet:
            return

        if self.bar is None and e.num_units:
            self.bar = tqdm(total=e.num_units * max(e.iters, 1), unit="it", dynamic_ncols=True, file=sys.stderr)
        if self.bar is None:
            return
        if e.stage in ("reconstruct", "unit_done"):
            done = e.unit * max(e.iters, 1) + (e.iteration if e.iters else 1)
            self.bar.update(max(0, done - self.bar.n))
        post = {"unit": f"{min(e.unit + 1, e.num_units)}/{e.num_units} {e.unit_name}", "stage": e.stage}
        if e.loss is not None:
            post["loss"] = f"{e.loss:.4g}"
        self.bar.set_postfix(post, refresh=False)
        if e.stage == "done":
            self.bar.close()


def _model_args(a: argparse.Namespace, weights: bool = True) -> None:
    """Either --model, or --arch with --num-classes (and --weights): one line saying which."""
    if a.model is not None and a.arch is not None:
        raise CalibrationError("give --model (an exported program) or --arch, not both")
    need = ["--arch", "--num-classes"] + (["--weights"] if weights else [])
    if a.model is None and any(getattr(a, f[2:].replace("-", "_")) is None for f in need):
        raise CalibrationError(f"give --model m.pt2, or {' '.join(need)}")


def cmd_calibrate(a: argparse.Namespace) -> int:
    from clcalib.pipeline import run_calibration

    cfg = config_from_args(a)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    _model_args(a)
    report = run_calibration(arch=a.arch, num_classes=a.num_classes, weights=a.weights, model=a.model, calibration=a.calib,
                             config=cfg, out_dir=a.out, evaluation=a.eval, on_progress=_Bar(a.quiet),
                             resume_dir=a.resume_dir, labels=_labels(a))
    _print_table(report)
    if report["metrics"].get("export_error"):  # calibrated and saved; the export it asked for is missing
        print(f"clcalib: the ONNX export failed after calibration; {Path(a.out) / report['checkpoint']} and "
              "report.json are written", file=sys.stderr)
        return 3
    return 0


def _fmt(v, unit="") -> str:
    if v is None:
        return "-"
    return f"{v:.2f}{unit}" if isinstance(v, float) else f"{v}{unit}"


def _draw(report: dict) -> str:
    d = report.get("calib_draw") or {}
    of = f" of {d['supplied']} supplied" if d.get("supplied") is not None else ""
    return f"{report['calib_images']}{of}, draw {d.get('seed')} (--calib-seed), sha256 {report['calib_sha256'][:12]}"


def _print_table(report: dict) -> None:
    m, c = report["metrics"], report["config"]
    rows = [
        ("config", f"{report['arch']} {CalibConfig.model_validate(c).summary()}"),
        ("calibration images", _draw(report)),
        ("FP top-1 %", _fmt(m["fp_top1"])),
        ("quantized top-1 % (reloaded checkpoint)", _fmt(m["quant_top1"])),
        ("top-1 agreement with FP %", _fmt(m["top1_agreement"])),
        ("output SQNR", _fmt(m["sqnr_db"], " dB")),
        ("weights", f"{m['weight_bytes'] / 1e6:.2f} MB vs {m['fp32_weight_bytes'] / 1e6:.2f} MB FP32 ({m['compression_vs_fp32']:.1f}x)"),
        ("calibration time", _fmt(m["calibration_seconds"], " s")),
    ]
    mp = report.get("mixed_precision") or {}
    if mp.get("allocation"):
        a = mp["allocation"]
        acts = f", activations {a['a_bits_avg']:.2f} bits on average" if a.get("a_bits_avg") is not None else ""
        weights = f"weights {a['w_bits_avg']:.2f} bits on average" if a.get("w_bits_avg") is not None else "weights uniform"
        rows.append(("mixed precision", f"{weights}{acts} "
                     f"(sensitivity {mp['sensitivity_seconds']:.0f} s); per-layer bits in report.json config.layer_bits"))
    if mp.get("search"):
        s = mp["search"]
        done = [p for p in s["probes"] if p["top1"] is not None]
        rows.append(("accuracy target", f"{'met' if s['met'] else 'NOT met'}: FP - {s['max_top1_drop']:g} points, "
                     f"{len(done)} candidate(s) calibrated" + (", stopped by the time budget" if s["stopped_by_time_budget"] else "")))
    if m.get("onnx_bytes") is not None:
        from clcalib.export.onnx_check import RUNTIMES

        rows.append((f"{report['onnx']} (target {m.get('export_target', 'reference')})", f"{m['onnx_bytes'] / 1e6:.2f} MB"))
        from clcalib.export.profiles import widens_activations

        run_as = " (run as the file runs: activations below 8 bits as 8-bit codes)" \
            if widens_activations(m.get("export_target"), report.get("config") or {}) else ""
        for k, name in RUNTIMES.items():
            if m.get(f"{k}_top1_agreement") is not None:
                rows.append((f"  in {name}", f"top-1 {_fmt(m[f'{k}_top1'])}, agreement with torch{run_as} "
                             f"{_fmt(m[f'{k}_top1_agreement'])} % on {m[f'{k}_checked_images']} images"))
        for b, t in (m.get("onnx_latency") or {}).get("batches", {}).items():
            rows.append((f"  latency, batch {b}", f"{t['ms']:.2f} ms = {t['x_fp32']:.2f}x FP32 ({t['fp32_ms']:.2f} ms) "
                         f"in {m['onnx_latency']['runtime']}"))
    if report.get("class_mapping"):
        cm = sorted(report["class_mapping"].items(), key=lambda kv: kv[1])
        rows.append(("evaluation classes", ", ".join(f"{n}={i}" for n, i in cm[:10]) + (", ..." if len(cm) > 10 else "")))
    for warning in m.get("warnings") or []:
        rows.append(("WARNING", warning))
    w = max(len(r[0]) for r in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))
    print(f"{'unit':<28} {'loss before':>12} {'loss after':>12}")
    for u in report["units"]:
        print(f"{u['name']:<28} {u['loss_before']:>12.4g} {u['loss_after']:>12.4g}")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="re-measure a saved quantized checkpoint on a labeled folder/zip")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--eval", required=True, help="folder, zip or tar with one subfolder per class")
    p.add_argument("--labels", help=LABELS_HELP)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(a: argparse.Namespace) -> int:
    from clcalib.calibration import resolve_device
    from clcalib.config import Preprocess
    from clcalib.data import LabeledSet
    from clcalib.errors import DataError
    from clcalib.export import load_quantized
    from clcalib.metrics import predict, top1

    device = str(resolve_device(a.device))
    model = load_quantized(a.checkpoint, device=device)
    header = model.header
    data = LabeledSet(a.eval, Preprocess.model_validate(header["preprocess"]), labels=_labels(a))
    _mapping_note(data)
    if int(data.labels.max()) >= header["num_classes"]:
        raise DataError(f"{a.eval}: class index {int(data.labels.max())} but the model has {header['num_classes']} classes")
    acc = top1(predict(model, data.images(), device=device), data.labels)
    out = {"quant_top1": acc, "images": len(data.labels), "arch": header["arch"], "method": header["method"]}
    print(json.dumps(out) if a.json else f"{header['arch']} {header['method']}: top-1 {acc:.2f}% on {len(data.labels)} images")
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="print the reconstruction units, their layers and every quantizer's place "
                       "for a model and config, before calibrating", allow_abbrev=False)
    p.add_argument("--arch", help=f"a registered architecture: {', '.join(_archs())}")
    p.add_argument("--model", help="a torch.export program (.pt2), instead of --arch")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default: 1000)")
    p.add_argument("--input-size", type=int, default=224, help="square input side in pixels (default: 224)")
    p.add_argument("--config", help="JSON file with config fields (bits, act_placement, ...)")
    add_config_flags(p, only={"--w-bits", "--a-bits", "--first-last-bits", "--act-placement", "--partition"})
    p.add_argument("--json", action="store_true", help="print one JSON list of units")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(a: argparse.Namespace) -> int:
    import torch

    from clcalib.graph.describe import describe, render
    from clcalib.graph.partition import QuantModel, QuantSpec
    from clcalib.graph.registry import build_model

    cfg = config_from_args(a)
    _model_args(a, weights=False)
    if a.model is not None:
        from clcalib.graph.program import read_program

        model = read_program(a.model)
        user_input = next(s.arg.name for s in model.graph_signature.input_specs if s.kind.name == "USER_INPUT")
        shape = next(n for n in model.graph.nodes if n.name == user_input).meta["val"].shape
        example = torch.zeros(2, *(int(d) for d in shape[1:]))
    else:
        model, example = build_model(a.arch, a.num_classes), torch.zeros(2, 3, a.input_size, a.input_size)
    qm = QuantModel(model, QuantSpec.from_config(cfg), example, cfg.partition)
    units = describe(qm)
    print(json.dumps(units) if a.json else render(units))
    return 0


def _add_sensitivity(sub) -> None:
    p = sub.add_parser("sensitivity", help="measure what each layer's (and activation's) bits cost, to choose "
                       "per-layer bits (docs/mixed_precision.md)",
                       description="Each site alone quantized at each width, everything else FP: the KL divergence "
                       "of the predictions from FP on calibration images; with --eval also the real top-1 drop.")
    g = _model_and_calibration(p)
    g.add_argument("--eval", help="labeled folder/zip: also each site's real top-1 drop there (slower), and how "
                   "well the proxy ranks the sites")
    g.add_argument("--eval-images", type=int, default=1000, help="evaluation images used with --eval (default 1000)")
    g.add_argument("--labels", help=LABELS_HELP)
    g.add_argument("--config", help="JSON file of config fields; the flags below override it")
    g.add_argument("--images", type=int, default=256, help="calibration images measured on (default 256)")
    g.add_argument("--w-widths", type=_widths, default=(2, 3, 4, 8), help="weight widths measured (default 2,3,4,8)")
    g.add_argument("--a-widths", type=_widths, default=None,
                   help="activation widths measured (e.g. 2,4,8; default: activations not measured)")
    g.add_argument("--json", help="write the table as JSON here")
    g.add_argument("--plot", help="write the bar chart (SVG) here")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    add_config_flags(p, only={"--method", "--w-bits", "--a-bits", "--first-last-bits", "--partition", "--device",
                              "--seed", "--calib-size", "--resize", "--crop", "--mean", "--std", "--w-symmetric"})
    p.set_defaults(func=cmd_sensitivity)


def _widths(text: str) -> tuple[int, ...]:
    from clcalib.config import _bit_choices

    try:
        return _bit_choices(tuple(int(v) for v in text.replace(",", " ").split()))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_sensitivity(a: argparse.Namespace) -> int:
    import torch

    from clcalib.data import LabeledSet, load_calibration
    from clcalib.mixed.plan import sensitivity
    from clcalib.mixed.sensitivity import proxy_check
    from clcalib.mixed.table import render
    from clcalib.pipeline import load_model

    cfg = config_from_args(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    _model_args(a)
    fp_model, arch, _, cfg, notes = load_model(a.arch, a.num_classes, a.weights, a.model, None, cfg)
    for n in notes:
        print(f"clcalib: {n}", file=sys.stderr)
    calib = load_calibration(a.calib, cfg.preprocess, cfg.calib_size, cfg.seed)
    evaluation = None
    if a.eval:
        data = LabeledSet(a.eval, cfg.preprocess, labels=_labels(a))
        _mapping_note(data)
        evaluation = (torch.cat(list(data.images(limit=a.eval_images))), data.labels[:a.eval_images])
    costs, seconds = sensitivity(fp_model, calib, cfg, lambda e: None, a.w_widths, a.a_widths, a.images, evaluation)
    check = proxy_check(costs)
    print(render(costs, check))
    print(f"{arch}: {len(costs)} sites measured in {seconds:.0f} s")
    report = {"arch": arch, "config": cfg.model_dump(mode="json", by_alias=True),
              "mixed_precision": {"sensitivity": [c.to_dict() for c in costs], "sensitivity_seconds": seconds,
                                  "proxy_check": check}}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    if a.plot:
        from clcalib.report_html import mixed_figures

        Path(a.plot).write_text(mixed_figures(report["mixed_precision"])["sensitivity"])
    return 0


def _add_export(sub) -> None:
    from clcalib.config import current_target
    from clcalib.export.profiles import DEFAULT, PROFILES

    p = sub.add_parser("export", help="write a saved quantized checkpoint as ONNX (QDQ) for a runtime, checked there")
    p.add_argument("--checkpoint", required=True, help="quantized.safetensors written by calibrate or a job")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="default: onnx (QDQ)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--target", type=current_target, choices=list(PROFILES), default=DEFAULT,
                   help=f"the runtime the file is written for (docs/deploy.md; default {DEFAULT}): "
                   + "; ".join(f"{k}: {v.summary}" for k, v in PROFILES.items()))
    p.add_argument("--calib", help="calibration images (folder, zip or tensor file): the ranges of the tensors the "
                   "calibration kept in float, which integer targets write in 8 bits (default: the ranges the "
                   "checkpoint stored from its calibration images; for an older checkpoint, the --eval images)")
    p.add_argument("--latency", action="store_true", help="also time the file against the FP32 export in its runtime")
    p.add_argument("--eval", help="folder or zip with one subfolder per class: check top-1 there "
                   "(default: agreement with the torch model on 256 random inputs)")
    p.add_argument("--labels", help=LABELS_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_export)


def cmd_export(a: argparse.Namespace) -> int:
    import torch

    from clcalib.config import Preprocess
    from clcalib.data import LabeledSet, load_calibration
    from clcalib.errors import DataError
    from clcalib.export import load_quantized
    from clcalib.export.onnx_check import MIN_AGREEMENT, export_checked
    from clcalib.export.onnx_qdq import RANGE_IMAGES
    from clcalib.export.profiles import check_target

    model = load_quantized(a.checkpoint)
    prof = check_target(a.target, bool(model.header["config"].get("w_symmetric")))
    shape = tuple(model.header["input_shape"])
    pre = Preprocess.model_validate(model.header["preprocess"])
    ranges = load_calibration(a.calib, pre, RANGE_IMAGES) if a.calib else None
    stored = "float_ranges" in model.header  # measured on the calibration images when the run saved it
    if a.eval:
        data = LabeledSet(a.eval, pre, labels=_labels(a))
        _mapping_note(data)
        if data.shape != tuple(shape[1:]):
            raise DataError(f"--eval {a.eval}: images come out {data.shape} with the checkpoint's "
                            f"preprocessing, but the model was calibrated on {tuple(shape[1:])}")
        images, labels = data.images(), data.labels  # streamed once for torch and ONNX Runtime
        if ranges is None and prof.integer_ops and not stored:
            ranges = LabeledSet(a.eval, pre, labels=_labels(a)).images()
            ranges = next(iter(ranges)) if not isinstance(ranges, torch.Tensor) else ranges
    elif ranges is not None:  # the calibration images: real inputs, within the ranges the file clamps to
        images, labels = ranges, None
    else:
        images, labels = torch.randn((256, *shape[1:]), generator=torch.Generator().manual_seed(0)), None
    checked_on = "images" if a.eval else "calibration images" if ranges is not None else "random inputs"
    # random inputs leave an integer file's calibrated 8-bit ranges: its agreement with the torch
    # model there says nothing about the model, so it is reported, not required (give --eval)
    unchecked = prof.integer_ops and a.eval is None and ranges is None
    if ranges is None and prof.integer_ops and not stored:
        raise CalibrationError(f"export target {a.target} writes the tensors the calibration kept in float as 8-bit "
                               "codes and needs their ranges, which this checkpoint does not hold (written by the "
                               "library's save_quantized, or before checkpoints stored them): give --calib "
                               "(the calibration images) or --eval, or use --target reference")
    out = {"onnx": str(a.out), **export_checked(model, a.out, shape, images, labels, target=a.target,
                                                range_images=ranges, min_agreement=None if unchecked else MIN_AGREEMENT)[0]}
    if unchecked:
        out["onnx_check"] = "runs; agreement on random inputs not required (give --eval or --calib to check it)"
    if a.latency:
        from clcalib.export.latency import latency_vs_fp32

        out["onnx_latency"] = latency_vs_fp32(model, a.out, shape, (1, 32), prof.runtime)
    if note := out.get("onnx_check_note"):
        print(f"clcalib: WARNING: {note}", file=sys.stderr)
    if a.json:
        print(json.dumps(out))
    else:
        from clcalib.export.onnx_check import RUNTIMES

        print(f"{a.out}: {out['onnx_bytes'] / 1e6:.2f} MB, target {a.target}")
        for k, name in RUNTIMES.items():
            if f"{k}_top1_agreement" in out:
                top = f"top-1 {out[f'{k}_top1']:.2f} %, " if labels is not None else ""
                print(f"  {name}: {top}agreement with the torch model {out[f'{k}_top1_agreement']:.2f} % on "
                      f"{out[f'{k}_checked_images']} {checked_on}, "
                      f"max |logit diff| {out[f'{k}_max_abs_logit_diff']:.3g}")
        if unchecked:
            print(f"  {out['onnx_check']}")
        for b, t in out.get("onnx_latency", {}).get("batches", {}).items():
            print(f"  batch {b}: {t['ms']:.2f} ms, {t['x_fp32']:.2f}x the FP32 model's {t['fp32_ms']:.2f} ms in {prof.runtime}")
    return 0


def _version() -> str:
    try:
        return version("clcalib")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clcalib", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"clcalib {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_calibrate(sub)
    _add_evaluate(sub)
    _add_export(sub)
    _add_inspect(sub)
    _add_sensitivity(sub)
    # the service's and the worker's commands (serve, submit, worker, ...) register themselves
    # as entry points; the library does not import them by name
    for ep in sorted(entry_points(group="clcalib.commands"), key=lambda e: e.name):
        try:
            add_commands = ep.load()
        except ImportError:  # installed without that part's dependencies
            continue
        add_commands(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        print(f"clcalib: invalid config: {errs}", file=sys.stderr)
        return 2
    except (CalibrationError, OSError) as e:  # OSError: a missing file, a folder given as --out, a full disk
        print(f"clcalib: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
