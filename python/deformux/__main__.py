"""Command line: python3 -m deformux {demo,version}."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m deformux",
                                     description="deformux: DeformUX-Net on the CPU (Swift engine).")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the DDC operator over the bundled MNI152 T1 and write a NIfTI",
                          description="Deformable resampling of a T1 volume with the DDC operator: "
                                      "a rotation about the x axis plus 3x3x3 smoothing.")
    demo.add_argument("--input", default=None,
                      help="a 3D NIfTI-1 volume (.nii/.nii.gz; default: the bundled MNI152 T1)")
    demo.add_argument("--output", default="out/demo_ddc.nii.gz",
                      help="where to write the result (default: %(default)s, under the current directory)")
    demo.add_argument("--angle", type=float, default=10.0, help="rotation in degrees (default: %(default)s)")
    demo.add_argument("--threads", type=int, default=None, help="engine worker threads (default: all CPUs)")
    demo.add_argument("--slab", type=int, default=16, help="output slices per engine call (default: %(default)s)")
    sub.add_parser("version", help="print the package and engine versions")
    args = parser.parse_args(argv)

    import deformux
    if args.command == "version":
        print(f"deformux {deformux.__version__} (engine {deformux.engine_version()})")
        return 0
    from deformux import demo as demo_job
    from deformux.nifti import NiftiError
    try:
        if args.threads is not None:
            deformux.set_num_threads(args.threads)
        demo_job.run(args.input, args.output, angle=args.angle, slab=args.slab)
    except (NiftiError, OSError, ValueError, TypeError) as e:
        print(f"deformux demo: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
