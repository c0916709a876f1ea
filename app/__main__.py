"""Command line: ``python -m app -i IN -o OUT [-m MODELS] [--phase-flip] [--qsm-method star|tkd]
[--bg-method vsharp|pdf|lbv] [--device auto|cpu|cuda] [--no-input-copies]``, or ``--job-from-stdin``
instead of ``-i``/``-o``.

Paths fall back to the MONAI Deploy environment variables ``HOLOSCAN_INPUT_PATH``,
``HOLOSCAN_OUTPUT_PATH`` and ``HOLOSCAN_MODEL_PATH``. Exit status: 0 success; 2 unusable input or
configuration (one line on stderr says why); 1 internal error. Results appear in OUT only when the
whole run succeeded (see :mod:`core.outputs`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import warnings
from pathlib import Path

N_STEPS = 8  # operators in app.app.CMBApp.compose, each reports when it ends (core.progress)

# Holoscan wants a 32 MiB stack for its threads and warns on every run below that.
_STACK_BYTES = 32 * 1024 * 1024


def _raise_stack_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    want = _STACK_BYTES if hard == resource.RLIM_INFINITY else min(_STACK_BYTES, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_STACK, (want, hard))


@contextlib.contextmanager
def _framework_log(path: Path | None):
    """Send everything written to fd 1/2 (Holoscan's C++ logging included) to ``path``.

    The user sees our own one-line outcome; the framework's log goes to OUT/app.log on success.
    ``path=None`` leaves the terminal untouched (``-l DEBUG``).
    """
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app", description=__doc__.splitlines()[0])
    p.add_argument("-i", "--input", type=Path, default=os.environ.get("HOLOSCAN_INPUT_PATH"),
                   help="input folder, its kind detected: scanner DICOM (any layout), dcm2niix NIfTI + JSON "
                        "sidecars (magnitude and phase echoes), or a precomputed QSM map (NIfTI or DICOM) "
                        "with its magnitude (env HOLOSCAN_INPUT_PATH)")
    p.add_argument("-o", "--output", type=Path, default=os.environ.get("HOLOSCAN_OUTPUT_PATH"),
                   help="results folder (env HOLOSCAN_OUTPUT_PATH)")
    p.add_argument("-m", "--model", type=Path, default=os.environ.get("HOLOSCAN_MODEL_PATH"),
                   help="model folder (env HOLOSCAN_MODEL_PATH; default: models/ of this repository)")
    p.add_argument("--phase-flip", action="store_true",
                   default=os.environ.get("CMB_PHASE_FLIP", "").lower() in ("1", "true", "yes"),
                   help="negate the phase (for scanners whose phase polarity is opposite; env CMB_PHASE_FLIP)")
    p.add_argument("--qsm-method", choices=("star", "tkd"), default=os.environ.get("CMB_QSM_METHOD", "star"),
                   help="dipole inversion: STAR-QSM (default) or the TKD baseline (env CMB_QSM_METHOD)")
    p.add_argument("--bg-method", choices=("vsharp", "pdf", "lbv"), default=os.environ.get("CMB_BG_METHOD", "vsharp"),
                   help="background field removal: V-SHARP (default), PDF or LBV (env CMB_BG_METHOD; "
                        "bench/results/bgremove.json compares them)")
    p.add_argument("--device", default=os.environ.get("CMB_DEVICE", "auto"),
                   help="torch device for the QSM FFTs and the networks: auto (CUDA when present), cpu, "
                        "cuda or cuda:N (env CMB_DEVICE)")
    p.add_argument("--no-input-copies", dest="input_copies", action="store_false",
                   default=os.environ.get("CMB_INPUT_COPIES", "1").lower() not in ("0", "false", "no"),
                   help="do not write magnitude.nii.gz / phase.nii.gz (copies of the input, ~100 MB each "
                        "at 1 mm; the DICOM node needs none of them: env CMB_INPUT_COPIES=0)")
    p.add_argument("--job-from-stdin", action="store_true",
                   help="import everything, then read the job as one JSON line {\"input\": DIR, \"output\": DIR} "
                        "on stdin (the DICOM node starts the app ahead of its job this way); exit 0 at end-of-file")
    p.add_argument("-l", "--log-level", default=os.environ.get("HOLOSCAN_LOG_LEVEL", "WARN"))
    args = p.parse_args(argv)
    if args.bg_method not in ("vsharp", "pdf", "lbv"):  # argparse does not check a default from the env
        p.error(f"CMB_BG_METHOD must be vsharp, pdf or lbv, got {args.bg_method!r}")
    return args


def _warm_imports() -> None:
    """Import what the steps import lazily, so a prestarted app has paid for them before its job."""
    import importlib

    for name in ("highdicom", "nibabel", "SimpleITK", "skimage.filters", "skimage.restoration"):
        importlib.import_module(name)


def _job_from_stdin(args: argparse.Namespace) -> bool:
    """Read ``{"input": ..., "output": ...}`` (one line) into ``args``; False at end-of-file."""
    line = sys.stdin.readline()
    if not line.strip():
        return False
    try:
        job = json.loads(line)
        args.input, args.output = Path(job["input"]), Path(job["output"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"job on stdin is not {{\"input\": ..., \"output\": ...}}: {exc}") from None
    return True


def _paths_error(args: argparse.Namespace) -> str | None:
    """Why the input/output folders cannot be used, or None."""
    if args.input is None or args.output is None:
        return "input and output folders are required (-i/-o or HOLOSCAN_INPUT_PATH/HOLOSCAN_OUTPUT_PATH)"
    if not Path(args.input).is_dir():
        return f"input folder does not exist: {args.input}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not args.job_from_stdin and (problem := _paths_error(args)):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    os.environ["HOLOSCAN_LOG_LEVEL"] = args.log_level.upper()
    _raise_stack_limit()
    warnings.filterwarnings("ignore", message=".*stack size.*")

    from app.app import AppConfig  # imports the whole chain (a prestarted app pays it here)
    from core import progress
    from core.device import select_device
    from core.errors import CMBError
    from core.outputs import StagedOutput

    try:
        device = select_device(args.device)
    except CMBError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.job_from_stdin:
        _warm_imports()
        try:
            if not _job_from_stdin(args):
                return 0  # end-of-file before a job: the node stopped or no longer needs this process
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if problem := _paths_error(args):
            print(f"error: {problem}", file=sys.stderr)
            return 2

    debug = args.log_level.upper() == "DEBUG"
    stage = StagedOutput(Path(args.output))
    config = AppConfig(Path(args.input), stage.path, args.model, args.phase_flip, args.qsm_method,
                       input_copies=args.input_copies, device=device, bg_method=args.bg_method)
    fd, log_name = tempfile.mkstemp(prefix="cmb-app-", suffix=".log")
    os.close(fd)
    log_path = Path(log_name)
    # progress lines go to stdout as it was before the framework's log took fds 1 and 2 (stderr
    # keeps the one-line error of a failed run)
    progress_stream = os.fdopen(os.dup(1), "w", buffering=1)
    progress.attach(progress_stream, total_steps=N_STEPS)
    try:
        return _run(args, config, stage, log_path, debug)
    finally:
        progress.attach(None)
        progress_stream.close()


def _run(args: argparse.Namespace, config, stage, log_path: Path, debug: bool) -> int:
    """Run the app with progress attached; print the outcome. Returns the exit status."""
    from app.app import CMBApp
    from core import progress
    from core.errors import CMBError

    try:
        with _framework_log(None if debug else log_path):
            CMBApp(config).run()
        if not debug:
            os.replace(log_path, stage.path / "app.log")
        written = stage.commit()
    except CMBError as exc:
        stage.abort()
        log_path.unlink(missing_ok=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line for the operator; details stay in the log
        stage.abort()
        print(f"error: internal failure: {type(exc).__name__}: {exc} (log: {log_path})", file=sys.stderr)
        if debug:
            raise
        return 1
    out = Path(args.output)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    inp = summary.get("input", {})
    print(f"read {inp.get('input_kind', '?')} input, {inp.get('manufacturer', '?')} GRE: {inp.get('n_echoes', '?')} echo(es) at "
          f"{inp.get('echo_times_ms', '?')} ms, {inp.get('field_strength_t', '?')} T, "
          f"grid {inp.get('geometry', {}).get('shape', '?')} @ {inp.get('geometry', {}).get('spacing_mm', '?')} mm")
    if "qsm" in summary:
        q = summary["qsm"]
        print(f"QSM ({q['method']}): brain {q['brain_volume_ml']} ml, {q['seconds'].get('total', 0):.1f} s; "
              f"map: {out / 'qsm.nii.gz'} and DICOM series {out / 'dicom' / 'qsm'}")
    if "detection" in summary:
        d = summary["detection"]
        print(f"microbleeds: {d['n_microbleeds']} (mimics listed separately: {d['n_mimics']}); "
              f"findings: {out / 'findings.json'}, report: {out / 'cmb_summary.txt'}, DICOM: {out / 'dicom' / 'cmb'}")
    print(f"wrote {len(written)} file(s) to {out}")
    extra = {}
    if "qsm" in summary:
        extra["QSM steps (s)"] = {k: v for k, v in summary["qsm"]["seconds"].items() if k != "total"}
    if "detection" in summary:
        d = summary["detection"]["seconds"]
        extra["detection steps (s)"] = {k[:-2]: d[k] for k in ("stage1_s", "conv_s", "vnet_s", "resnet_s") if k in d}
    print(progress.timing_table(extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
