"""The command line: ``deformux`` (a console script) or ``python3 -m deformux``.

    deformux predict -i t1.nii.gz -o labels.nii.gz [--model M] [--overlap 0.5] [--window 96] [--tta]
    deformux evaluate labels.nii.gz reference.nii.gz [--json] [--labels 1,2,3]
    deformux train --data DIR --out RUN [--patch-size 96] [--steps N | --epochs N] [--resume]
    deformux demo                      the main job on the bundled MNI152 T1
    deformux summary [--model M] [--size 96]
    deformux bench segment | model | ddc | conv | backward | train
    deformux version

Long work shows a progress bar on stderr when it is a terminal (--no-progress turns it off). Errors
print one line "deformux <command>: error: ..." and exit with status 1 (2 for bad arguments, 130 when
interrupted).
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["main"]

EPILOG = "Run 'deformux COMMAND --help' for a command's options."


def _ints(text, count=None, name="value"):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be integers separated by commas, got {text!r}") from None
    if count is not None and len(values) not in (1, count):
        raise argparse.ArgumentTypeError(f"{name} must be one integer or {count} separated by commas, got {text!r}")
    return values


def _window(text):
    if text == "auto":
        return "auto"
    values = _ints(text, 3, "--window")
    return values[0] if len(values) == 1 else tuple(values)


def _fraction(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def _positive(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _add_network_options(p):
    g = p.add_argument_group("network (when no --model is given)")
    g.add_argument("--in-channels", type=_positive, default=1)
    g.add_argument("--out-channels", type=_positive, default=16)
    g.add_argument("--feature-size", default="48,96,192,384", help="encoder widths (default: %(default)s)")
    g.add_argument("--depths", default="2,2,2,2", help="blocks per stage (default: %(default)s)")
    g.add_argument("--hidden-size", type=_positive, default=768)
    g.add_argument("--block", choices=("deformux", "uxnet"), default="deformux")
    g.add_argument("--mlp", choices=("dense", "grouped", "none"), default=None)
    g.add_argument("--offset-mode", choices=("aligned", "official"), default="aligned")
    g.add_argument("--kernel-size", type=_positive, default=7, help="3D UX-Net's depthwise kernel")


def _network_config(args):
    return {"in_channels": args.in_channels, "out_channels": args.out_channels,
            "feature_size": _ints(args.feature_size, 4, "--feature-size"), "depths": _ints(args.depths, 4, "--depths"),
            "hidden_size": args.hidden_size, "block": args.block, "mlp": args.mlp, "offset_mode": args.offset_mode,
            "kernel_size": args.kernel_size}


def _parser():
    parser = argparse.ArgumentParser(
        prog="deformux", description="deformux: 3D medical image segmentation with DeformUX-Net on the CPU "
                                     "(a Swift engine).", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("predict", help="segment a NIfTI image into a NIfTI label map",
                       description="Segments a NIfTI image (.nii/.nii.gz) and writes the label map (uint8, the "
                                   "input's grid, affine and header; written atomically). Without --model the "
                                   "bundled default model is used.")
    p.add_argument("-i", "--input", required=True, help="the image (.nii or .nii.gz; 4-D files: one channel per volume)")
    p.add_argument("-o", "--output", required=True, help="the label map to write (.nii or .nii.gz)")
    p.add_argument("--model", default=None, help="a model card (.json) or weights (.safetensors); default: the bundled model")
    p.add_argument("--overlap", type=_fraction, default=None, help="window overlap in [0, 1) (default: the card's, 0.5)")
    p.add_argument("--window", type=_window, default=None,
                   help="window size: N, X,Y,Z (multiples of 16) or auto (default: the card's)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test-time augmentation, 8x the work (default: the card's; the bundled model's is on)")
    p.add_argument("--batch", type=_positive, default=None, help="windows per forward (default: the card's, 1)")
    p.add_argument("--probabilities", default=None, metavar="P",
                   help="also write the class probabilities (float32, x, y, z, class) to P (.nii/.nii.gz)")
    p.add_argument("--largest-component", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the largest connected component of each label (default: the card's)")
    p.add_argument("--threads", type=int, default=None, help="engine worker threads (default: all CPUs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")

    p = sub.add_parser("evaluate", help="per-class Dice and HD95 of a label map against a reference",
                       description="Compares two NIfTI label maps on one grid: per label, Dice and the 95th "
                                   "percentile Hausdorff distance in mm (MONAI's definition; spacing from the "
                                   "affine). NaN: the label is in neither map; inf: in only one.")
    p.add_argument("prediction", help="the predicted label map (.nii/.nii.gz)")
    p.add_argument("reference", help="the reference label map on the same grid")
    p.add_argument("--labels", default=None, help="labels to report, e.g. 1,2,3 (default: every non-zero label present)")
    p.add_argument("--json", action="store_true", help="print JSON (NaN as null, infinity as \"inf\")")
    p.add_argument("--no-hd", action="store_true", help="Dice only (skip the distances)")

    p = sub.add_parser("train", help="train a model on a Decathlon / nnU-Net folder",
                       description="Trains DeformUX-Net with the paper's recipe (Dice + CE, AdamW, ReduceLROnPlateau "
                                   "on the validation Dice, random crops 1:1 foreground/background with rotation, "
                                   "scaling and intensity-shift augmentation) on a Medical Segmentation Decathlon or "
                                   "nnU-Net raw folder (dataset.json, imagesTr/, labelsTr/). Writes into RUN: "
                                   "last.* (a resumable checkpoint, also written on Ctrl-C), best.safetensors and "
                                   "best.json (the best weights and their model card, usable with 'deformux predict "
                                   "--model RUN/best.json'), metrics.jsonl.")
    p.add_argument("--data", required=True, help="the dataset folder (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("--out", required=True, metavar="RUN", help="the run folder (created)")
    p.add_argument("--resume", action="store_true", help="continue from RUN's last checkpoint")
    p.add_argument("--model", default=None, help="start from these weights or model card (default: a new network)")
    p.add_argument("--patch-size", default="96", help="training patch: N or X,Y,Z, multiples of 16 (default: %(default)s)")
    p.add_argument("--steps", type=_positive, default=None, help="optimiser steps (default: one epoch)")
    p.add_argument("--epochs", type=_positive, default=None, help="passes over the training volumes")
    p.add_argument("--stop-after", type=_positive, default=None,
                   help="end after this step with a resumable checkpoint (the schedule still spans --steps; "
                        "--resume goes on)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.08, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--accumulation", type=_positive, default=1, help="micro-batches per optimiser step")
    p.add_argument("--samples-per-volume", type=_positive, default=2, help="crops per volume (default: %(default)s)")
    p.add_argument("--volumes-per-step", type=_positive, default=1, help="volumes per step (default: %(default)s)")
    p.add_argument("--drop-path", type=_fraction, default=0.0, help="stochastic depth rate (default: 0)")
    p.add_argument("--pos-neg", default="1,1", help="weights of foreground / background crop centres (default: 1,1)")
    p.add_argument("--exclude-norm-and-bias-from-weight-decay", action="store_true")
    p.add_argument("--augmentation", choices=("paper", "mr_robust", "none"), default="paper")
    p.add_argument("--intensity", choices=("ct", "mr", "none"), default=None,
                   help="intensity preset (default: from dataset.json's modality)")
    p.add_argument("--validation", type=int, default=None,
                   help="validation cases held out (seeded; default: 20%%, at least one)")
    p.add_argument("--validate-every", type=_positive, default=100, help="steps between validations (default: %(default)s)")
    p.add_argument("--window", type=_window, default=None, help="validation / inference window (default: the patch)")
    p.add_argument("--overlap", type=_fraction, default=0.5)
    p.add_argument("--scheduler", choices=("plateau", "poly", "none"), default="plateau",
                   help="learning rate: the paper's ReduceLROnPlateau, nnU-Net's poly decay, or constant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="the model card's name")
    p.add_argument("--threads", type=int, default=None, help="engine worker threads (default: all CPUs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("network (when no --model is given; channels and classes come from the data)")
    g.add_argument("--feature-size", default="48,96,192,384", help="encoder widths (default: %(default)s)")
    g.add_argument("--depths", default="2,2,2,2", help="blocks per stage (default: %(default)s)")
    g.add_argument("--hidden-size", type=_positive, default=768)
    g.add_argument("--block", choices=("deformux", "uxnet"), default="deformux")
    g.add_argument("--mlp", choices=("dense", "grouped", "none"), default=None)
    g.add_argument("--offset-mode", choices=("aligned", "official"), default="aligned")

    p = sub.add_parser("demo", help="the main job on the bundled MNI152 T1",
                       description="Segments the bundled MNI152 T1 (or --input) with the bundled brain-tissue "
                                   "model (or --model), writes the labels (NIfTI, the input's grid) and a PNG of three "
                                   "slices with the labels overlaid, and prints per-class Dice against the bundled "
                                   "reference labels. --ddc runs the operator demo instead: the DDC resamples the T1 "
                                   "(a rotation about the x axis plus 3x3x3 smoothing) and writes a NIfTI.")
    p.add_argument("--input", default=None, help="a 3D NIfTI volume (default: the bundled MNI152 T1)")
    p.add_argument("--output", default=None,
                   help="where to write the result (default: out/demo_labels.nii.gz; --ddc: out/demo_ddc.nii.gz)")
    p.add_argument("--angle", type=float, default=10.0, help="DDC demo: rotation in degrees (default: %(default)s)")
    p.add_argument("--slab", type=int, default=16, help="DDC demo: output slices per engine call (default: %(default)s)")
    p.add_argument("--ddc", action="store_true", help="run the DDC operator demo instead of the segmentation")
    p.add_argument("--segment", action="store_true", help="run the segmentation demo (the default when a model is bundled)")
    p.add_argument("--model", default=None, help="segmentation demo: a model card or weights")
    p.add_argument("--png", default=None, help="segmentation demo: the overlay picture (default: beside the output)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="segmentation demo: flip test-time augmentation, 8x the work (default: the card's)")
    p.add_argument("--threads", type=int, default=None, help="engine worker threads (default: all CPUs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("summary", help="the network's modules, output shapes, parameters and multiply-adds",
                       description="Prints the network's modules with their output shapes, parameters and "
                                   "multiply-adds for one input size.")
    p.add_argument("--model", default=None, help="a model card or weights (default: the options below)")
    p.add_argument("--size", default="96", help="input size: N or D,H,W, multiples of 16 (default: %(default)s)")
    p.add_argument("--batch", type=_positive, default=1)
    _add_network_options(p)

    p = sub.add_parser("bench", help="benchmarks (they print their figures; run on a quiet machine)",
                       description="Benchmarks. 'segment' and 'model' run here; 'ddc', 'conv', 'backward' and 'train' run "
                                   "the Swift command line's benchmarks (found as DEFORMUX_SWIFT_CLI, or "
                                   ".build/release/deformux in the repository).")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    b = bsub.add_parser("segment", help="a whole segmentation: time, windows, s/window, time outside windows, peak RSS",
                        description="Segments a synthetic 250 x 250 x 150 volume (or --input) with a random-weight "
                                    "network (default: the full size) and prints total time, windows, seconds per "
                                    "window, the time outside the windows and its share, and peak RSS. The full "
                                    "default takes about 10 minutes on 2 cores.")
    b.add_argument("--size", default="250,250,150", help="synthetic volume X,Y,Z (default: %(default)s)")
    b.add_argument("--input", default=None, help="a NIfTI image instead ('mni152': the bundled T1)")
    b.add_argument("--pad", type=int, default=0, help="background voxels added on every side of the image")
    b.add_argument("--overlap", type=_fraction, default=0.5)
    b.add_argument("--window", type=_window, default=(96, 96, 96), help="N, X,Y,Z or auto (default: 96)")
    b.add_argument("--skip-threshold", type=float, default=None,
                   help="skip windows whose every input value is <= this (the card's skip_background)")
    b.add_argument("--output", default=None, help="also write the labels (timed)")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--json", action="store_true", help="also print the figures as JSON")
    b.add_argument("--no-progress", action="store_true")
    _add_network_options(b)
    b = bsub.add_parser("model", help="one forward of the network at a cubic size")
    b.add_argument("--size", type=_positive, default=96)
    b.add_argument("--repeats", type=_positive, default=1)
    b.add_argument("--threads", type=int, default=None)
    _add_network_options(b)
    for name in ("ddc", "conv", "backward", "train"):
        b = bsub.add_parser(name, help=f"the Swift command line's 'bench {name}'", add_help=False)
        b.add_argument("rest", nargs=argparse.REMAINDER)

    sub.add_parser("version", help="print the package and engine versions")
    return parser


def _set_threads(n):
    if n is not None:
        import deformux
        deformux.set_num_threads(n)


def _predict(args):
    import numpy as np

    import deformux
    _set_threads(args.threads)
    for name, path in (("--output", args.output), ("--probabilities", args.probabilities)):
        if path is not None and not (path.endswith(".nii") or path.endswith(".nii.gz")):
            raise ValueError(f"{name} must end in .nii or .nii.gz, got {path!r}")
    if not os.path.exists(args.input):
        raise FileNotFoundError(2, f"no such image file: {args.input}", args.input)
    seg = deformux.Segmenter(args.model, overlap=args.overlap, window=args.window, tta=args.tta, batch=args.batch,
                             largest_component=args.largest_component)
    for path in (args.output, args.probabilities):
        if path is not None and os.path.dirname(os.path.abspath(path)):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    result = seg.segment(args.input, output=args.output, return_probabilities=args.probabilities is not None,
                         progress=not args.no_progress)
    if args.probabilities is not None:
        labels, probabilities = result
        deformux.nifti.save(args.probabilities, probabilities.array, labels.affine, header=probabilities.header,
                            dtype="float32", description="deformux class probabilities")
    else:
        labels = result
    if not args.quiet:
        s = seg.statistics
        counts = {int(k): int(v) for k, v in enumerate(np.bincount(labels.array.ravel())) if v}
        print(f"deformux predict: {args.input} -> {args.output}: {' x '.join(map(str, labels.array.shape))} voxels, "
              f"{s['windows_run']} of {s['windows']} windows, {s['total_seconds']:.1f} s; voxels per label {counts}",
              file=sys.stderr)
    return 0


def _json_number(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return x


def _evaluate(args):
    from deformux import evaluate as ev
    labels = _ints(args.labels, name="--labels") if args.labels else None
    results, spacing = ev.evaluate_files(args.prediction, args.reference, labels=labels, hd=not args.no_hd)
    if args.json:
        out = {"prediction": args.prediction, "reference": args.reference, "spacing": list(spacing),
               "labels": {str(k): {m: _json_number(v) for m, v in r.items()} for k, r in results.items()}}
        print(json.dumps(out, indent=2))
    else:
        print(f"prediction {args.prediction}\nreference  {args.reference}\nspacing    "
              f"{' x '.join(f'{s:g}' for s in spacing)} mm")
        print(ev.format_table(results))
    return 0


def _demo(args):
    from deformux import demo as demo_job
    _set_threads(args.threads)
    if not args.ddc and (args.segment or args.model is not None or demo_job.default_model_available()):
        demo_job.run_segmentation(args.input, args.output or "out/demo_labels.nii.gz", model=args.model, png=args.png,
                                  progress=not args.no_progress, tta=args.tta)
    else:
        demo_job.run(args.input, args.output or "out/demo_ddc.nii.gz", angle=args.angle, slab=args.slab)
    return 0


def _pos_neg(text):
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2 or min(values) < 0 or sum(values) <= 0:
        raise ValueError(f"--pos-neg must be two non-negative numbers, not both 0, e.g. 1,1; got {text!r}")
    return tuple(values)


def _train(args):
    import deformux
    from deformux.card import load_model
    from deformux.train import load_dataset, _classes_and_modality
    _set_threads(args.threads)
    patch = _ints(args.patch_size, 3, "--patch-size")
    patch = tuple(patch * 3 if len(patch) == 1 else patch)
    if args.steps is not None and args.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    cases, meta = load_dataset(args.data)
    names, _ = _classes_and_modality(meta)
    if args.model is not None:
        model, _ = load_model(args.model)
    else:
        from deformux.nifti import load
        first = load(cases[0]["images"][0])
        channels = len(cases[0]["images"]) * (first.array.shape[0] if first.array.ndim == 4 else 1)
        classes = len(names) if names else None
        if classes is None:
            classes = int(max(load(c["label"], dtype="int32").array.max() for c in cases)) + 1
        model = deformux.DeformUXNet(
            in_channels=channels, out_channels=classes, feature_size=_ints(args.feature_size, 4, "--feature-size"),
            depths=_ints(args.depths, 4, "--depths"), hidden_size=args.hidden_size, block=args.block, mlp=args.mlp,
            offset_mode=args.offset_mode, seed=args.seed)
    window = args.window
    if isinstance(window, int):
        window = (window,) * 3
    run = deformux.train(
        args.data, model, out=args.out, patch_size=patch, steps=args.steps, epochs=args.epochs, lr=args.lr,
        weight_decay=args.weight_decay, accumulation=args.accumulation, samples_per_volume=args.samples_per_volume,
        volumes_per_step=args.volumes_per_step, drop_path=args.drop_path, pos_neg=_pos_neg(args.pos_neg),
        exclude_norm_and_bias_from_weight_decay=args.exclude_norm_and_bias_from_weight_decay,
        augmentation=args.augmentation, intensity=args.intensity, validation=args.validation,
        validate_every=args.validate_every, window=None if window == "auto" else window, overlap=args.overlap,
        seed=args.seed, resume=args.resume, progress=not args.no_progress, name=args.name, scheduler=args.scheduler,
        stop_after=args.stop_after, command="deformux " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["train"] else None)
    best = run["best"]
    if best is not None:
        dice = ", ".join(f"{k} {v:.4f}" for k, v in best["dice"].items())
        print(f"deformux train: {run['steps']} steps; best validation Dice at step {best['step']}: {dice} "
              f"(mean {best['mean_dice']:.4f}); model card {os.path.join(run['out'], 'best.json')}")
    else:
        print(f"deformux train: {run['steps']} steps; no validation; model card {os.path.join(run['out'], 'last.json')}")
    return 0


def _summary(args):
    import deformux
    from deformux.card import load_model
    dims = _ints(args.size, 3, "--size")
    dims = dims * 3 if len(dims) == 1 else dims
    if args.model is not None:
        model, _ = load_model(args.model)
    else:
        model = deformux.DeformUXNet(**_network_config(args))
    print(model.summary(tuple(dims), batch=args.batch))
    return 0


def _swift_cli():
    """The Swift command line, for the benchmarks that live there."""
    explicit = os.environ.get("DEFORMUX_SWIFT_CLI")
    if explicit:
        return explicit
    repo = Path(__file__).resolve().parents[2]
    for candidate in (repo / ".build" / "release" / "deformux", shutil.which("deformux-swift")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _bench(args):
    from deformux import bench
    if args.bench in ("ddc", "conv", "backward", "train"):
        exe = _swift_cli()
        if exe is None:
            raise RuntimeError(f"'bench {args.bench}' is a Swift benchmark: in the repository run "
                               f"'swift run -c release -Xcc -march=native deformux bench {args.bench}', or set "
                               f"DEFORMUX_SWIFT_CLI to the built 'deformux' executable")
        return subprocess.call([exe, "bench", args.bench] + args.rest)
    _set_threads(args.threads)
    config = _network_config(args)
    if args.bench == "model":
        bench.bench_model(config, size=args.size, repeats=args.repeats)
        return 0
    size = _ints(args.size, 3, "--size")
    size = size * 3 if len(size) == 1 else size
    window = args.window if args.window != "auto" else None
    if isinstance(window, int):
        window = (window,) * 3
    input_path = args.input
    if input_path == "mni152":
        from deformux.data import mni152_path
        input_path = mni152_path("t1")
    figures = bench.bench_segment(config, size=tuple(size), overlap=args.overlap, window=window, input_path=input_path,
                                  pad=args.pad, skip_threshold=args.skip_threshold, output=args.output,
                                  progress=not args.no_progress)
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "version":
        import deformux
        print(f"deformux {deformux.__version__} (engine {deformux.engine_version()})")
        return 0
    handlers = {"predict": _predict, "evaluate": _evaluate, "train": _train, "demo": _demo, "summary": _summary,
                "bench": _bench}
    import deformux
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print(f"\ndeformux {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, TypeError, RuntimeError, deformux.DeformUXError) as e:
        print(f"deformux {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
