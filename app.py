"""Wan T2V Studio: the composition root.

    python app.py [serve options]     run the web app (default 127.0.0.1:7860)
    python app.py download [...]      download the INT8 weights
    python app.py doctor [...]        check this machine and explain what to fix

Nothing heavy happens at import: torch and LightX2V load on the first Generate.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("wan_studio")

APP_DIR = Path(__file__).resolve().parent
DEFAULT_WEIGHTS_DIR = Path("weights") / "Wan2.1-T2V-14B-StepDistill-CfgDistill-Lightx2v"
DEFAULT_OUTPUTS_DIR = Path("outputs")
AUTH_ENV = "WAN_STUDIO_AUTH"
HISTORY_DB_NAME = "history.sqlite3"
# The app takes no uploads, but Gradio's /upload route exists anyway: keep it from filling the disk.
MAX_UPLOAD = "1mb"
# Waiting jobs beyond this are refused ("queue full") rather than piling up hours of GPU work.
MAX_QUEUED = 100


class ConfigError(SystemExit):
    """A start-up refusal with a message for the terminal (exit status 2)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    share: bool
    auth: tuple[str, str] | None
    weights_dir: Path
    outputs_dir: Path
    backend: str
    vram_cap_gib: float | None
    quant_scheme: str
    attn_mode: str
    preview: str = "auto"
    open_browser: bool = False
    # Several GPUs: the GPU indices ("0,1" or "all"; None: one GPU, in this process) and the mode.
    gpus: str | None = None
    multi_gpu: str = "lanes"
    # The command line as the records state it: the flags given, the --auth value hidden.
    argv: tuple[str, ...] = ()


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth / WAN_STUDIO_AUTH must be 'user:password' with both parts non-empty.")
    return user, password


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `--au x` would be --auth, and the records' command line must hide it.
    p = argparse.ArgumentParser(description="Wan T2V Studio: local text-to-video web app.",
                                allow_abbrev=False)
    p.add_argument("--host", default=_env("WAN_STUDIO_HOST", "127.0.0.1"),
                   help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--listen", action="store_true",
                   help="bind 0.0.0.0 so other machines on the LAN can connect (needs --auth)")
    p.add_argument("--port", type=int, default=int(_env("WAN_STUDIO_PORT", "7860")))
    p.add_argument("--share", action="store_true",
                   help="create a public Gradio share link (needs --auth)")
    p.add_argument("--auth", default=_env(AUTH_ENV),
                   help=f"user:password required to open the app (or env {AUTH_ENV})")
    p.add_argument("--weights-dir", type=Path,
                   default=Path(_env("WAN_STUDIO_WEIGHTS_DIR", str(DEFAULT_WEIGHTS_DIR))))
    p.add_argument("--outputs-dir", type=Path,
                   default=Path(_env("WAN_STUDIO_OUTPUTS_DIR", str(DEFAULT_OUTPUTS_DIR))))
    p.add_argument("--backend", choices=("lightx2v", "fake"), default=_env("WAN_STUDIO_BACKEND", "lightx2v"),
                   help="'fake' runs a CPU test double that writes noise clips (UI work, tests)")
    p.add_argument("--vram-cap-gib", type=float, default=_env("WAN_STUDIO_VRAM_CAP_GIB"),
                   help="cap this app's PyTorch at this many GiB, leaving the rest for other programs")
    p.add_argument("--quant-scheme", default=_env("WAN_STUDIO_QUANT_SCHEME", "auto"),
                   help="INT8 kernel: auto (int8-triton unless vllm/sgl kernels are installed) or a "
                        "LightX2V scheme name")
    p.add_argument("--attn-mode", default=_env("WAN_STUDIO_ATTN_MODE", "auto"),
                   help="attention: auto (sage_attn2 when sageattention is installed, else torch_sdpa)")
    p.add_argument("--gpus", default=_env("WAN_STUDIO_GPUS"),
                   help="use several GPUs: their indices (0,1) or 'all'; each runs in its own worker "
                        "process (default: one GPU, in the app's process)")
    p.add_argument("--multi-gpu", choices=("lanes", "seq"), default=_env("WAN_STUDIO_MULTI_GPU", "lanes"),
                   help="with --gpus: 'lanes' runs one clip per GPU at a time (the queue picks a free GPU "
                        "that fits), 'seq' splits each clip over the GPUs (2, 4 or 8; LightX2V's "
                        "sequence parallelism)")
    p.add_argument("--open", action="store_true", dest="open_browser",
                   help="open the app in this machine's web browser once it is up")
    p.add_argument("--preview", choices=("auto", "linear", "tiny-vae", "off"),
                   default=_env("WAN_STUDIO_PREVIEW", "auto"),
                   help="the picture after every denoising step: auto (the tiny VAE when installed, "
                        "else the linear colour map), linear, tiny-vae, or off")
    return p


HIDDEN = "<hidden>"


def recorded_argv(argv: list[str]) -> tuple[str, ...]:
    """The command line for the records: every flag as given, the password never."""
    out = ["app.py"]
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(HIDDEN)
            hide_next = False
        elif arg == "--auth":
            out.append(arg)
            hide_next = True
        elif arg.startswith("--auth="):
            out.append(f"--auth={HIDDEN}")
        else:
            out.append(arg)
    return tuple(out)


def settings_from_args(argv: list[str]) -> Settings:
    args = build_parser().parse_args(argv)
    auth = parse_auth(args.auth)
    host = "0.0.0.0" if args.listen else args.host
    exposed = args.share or host not in ("127.0.0.1", "localhost", "::1")
    if exposed and auth is None:
        what = "--share" if args.share else f"binding {host} (--listen/--host)"
        raise ConfigError(f"Refusing to start: {what} makes the app reachable by others, and it "
                          f"would be open without a password. Add --auth user:password (or set "
                          f"{AUTH_ENV}=user:password).")
    if args.vram_cap_gib is not None and float(args.vram_cap_gib) <= 0:
        raise ConfigError("--vram-cap-gib must be a positive number of GiB.")
    _check_outputs_dir(args.outputs_dir, args.weights_dir)
    return Settings(host=host, port=args.port, share=args.share, auth=auth,
                    weights_dir=args.weights_dir, outputs_dir=args.outputs_dir, backend=args.backend,
                    vram_cap_gib=None if args.vram_cap_gib is None else float(args.vram_cap_gib),
                    quant_scheme=args.quant_scheme, attn_mode=args.attn_mode, preview=args.preview,
                    open_browser=args.open_browser, gpus=args.gpus, multi_gpu=args.multi_gpu,
                    argv=recorded_argv(argv))


def _check_outputs_dir(outputs_dir: Path, weights_dir: Path) -> None:
    # Everything in the outputs folder is served to the browser (launch's allowed_paths), so it
    # must not contain the app's code or the weights.
    outputs = outputs_dir.resolve()
    for what, path in (("the app's own folder", APP_DIR), ("the weights folder", weights_dir.resolve())):
        if path == outputs or outputs in path.parents:
            raise ConfigError(f"--outputs-dir {outputs_dir} contains {what} ({path}); everything in "
                              f"the outputs folder is served to the browser. Choose a folder of its "
                              f"own, e.g. the default '{DEFAULT_OUTPUTS_DIR}'.")


def blocked_paths(settings: Settings) -> list[str]:
    """Files under the served outputs folder that Gradio must never hand out: the history database
    (every prompt ever typed), its SQLite side files, and the folder's lock file."""
    from pipeline.store.outputs import LOCK_NAME

    db = (settings.outputs_dir / HISTORY_DB_NAME).resolve()
    return ([str(db)] + [f"{db}{suffix}" for suffix in ("-wal", "-shm", "-journal")]
            + [str((settings.outputs_dir / LOCK_NAME).resolve())])


def _real_backend(settings: Settings):
    from pipeline.backends.unavailable import UnavailableBackend

    try:
        from pipeline.backends.lightx2v import LightX2VBackend
    except ImportError as exc:
        # Not at start: the UI must come up on machines without the GPU stack; Generate explains.
        log.warning("LightX2V backend unavailable: %s", exc)
        return UnavailableBackend("LightX2V", f"{type(exc).__name__}: {exc}")
    return LightX2VBackend(weights_dir=settings.weights_dir, quant_scheme=settings.quant_scheme,
                           attn_mode=settings.attn_mode, vram_cap_gib=settings.vram_cap_gib)


def _fake_backend(presets):
    from pipeline.backends.fake import fake_backend_from_env

    try:
        return fake_backend_from_env(os.environ, list(presets))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def build_app(settings: Settings):
    """Wire presets, backend, cache, service, job lane and UI. Returns (demo, ui_context)."""
    # Must be set before anything initialises CUDA: it is what lets 720p fit (docs/lightx2v.md §2).
    from install.doctor import APP_ALLOC_CONF  # the doctor reports this default as the app's own

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", APP_ALLOC_CONF)

    from pipeline.cache import PipelineCache
    from pipeline.errors import OutputError, OutputsInUse
    from pipeline.machine.gpu import GpuMonitor
    from pipeline.store.history import History
    from pipeline.jobs import JobQueue
    from pipeline.store.outputs import OutputStore
    from pipeline.service import VideoService
    from presets import load_presets
    from ui import UiContext, build_ui

    presets = load_presets()
    switches = None
    if settings.backend == "fake":
        backend, switches = _fake_backend(presets)
    else:
        backend = _real_backend(settings)
    outputs = OutputStore(settings.outputs_dir, writer=switches.writer if switches else None)
    try:
        outputs.ensure()
        outputs.claim()  # before anything below touches the folder another app may be writing
    except (OutputError, OutputsInUse) as exc:
        raise ConfigError(str(exc)) from None
    outputs.clean_leftovers()
    history = History(settings.outputs_dir / HISTORY_DB_NAME)
    interrupted = history.mark_interrupted()
    if interrupted:
        adopted = history.adopt_saved(outputs.find_saved)
        log.warning("%d job(s) were interrupted when the app last stopped%s", interrupted,
                    f"; {adopted} of them had already saved their video and are listed" if adopted else "")
    if hasattr(backend, "use_kernel_store"):
        backend.use_kernel_store(history)  # the attention kernel measured per GPU is remembered there
    monitor = GpuMonitor()
    service_kwargs = dict(vram_cap_gib=settings.vram_cap_gib, preview=settings.preview,
                          command_line=list(settings.argv))
    if settings.gpus:
        lanes = _multi_gpu_services(settings, backend, presets, outputs, history, service_kwargs)
        service = lanes[0]
    else:
        service = VideoService(presets=presets, cache=PipelineCache(backend), outputs=outputs,
                               history=history, monitor=monitor, **service_kwargs)
        lanes = [service]
    ctx = UiContext(service=service, jobs=JobQueue(service, max_waiting=MAX_QUEUED, lanes=lanes),
                    presets=presets, monitor=monitor, history=history,
                    lanes=lanes if settings.gpus else [])
    demo = build_ui(ctx, extra_tabs=_system_tab(settings, monitor, history))
    return demo, ctx


def _multi_gpu_services(settings: Settings, backend, presets, outputs, history, service_kwargs):
    """One service per GPU worker group (--gpus, --multi-gpu): the workers start now, in the
    background; each loads its weights at its first job."""
    from pipeline.backend import UnavailableBackend
    from pipeline.machine.gpu import device_count
    from pipeline.workers import group
    from pipeline.workers.protocol import BackendSpec
    from pipeline.workers.setup import multi_gpu_services

    try:
        gpus = group.parse_gpus(settings.gpus, device_count())
        group.check_mode(settings.multi_gpu, gpus)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if isinstance(backend, UnavailableBackend):
        raise ConfigError(f"--gpus needs the {backend.name} backend, which cannot run here: {backend.reason}. "
                          f"'python app.py doctor' explains what is missing.")
    if settings.backend == "fake":
        spec = BackendSpec("fake", {name: getattr(backend, name) for name in (
            "step_seconds", "oom_at", "tiny_vae_installed", "host_oom_loads", "host_oom_at", "ram_gib")})
    else:
        spec = BackendSpec("lightx2v", {
            "weights_dir": settings.weights_dir, "quant_scheme": settings.quant_scheme,
            "attn_mode": settings.attn_mode, "vram_cap_gib": settings.vram_cap_gib,
            "seq_parallel": len(gpus) if settings.multi_gpu == "seq" else 1})
    services, groups = multi_gpu_services(mode=settings.multi_gpu, gpus=gpus, backend_spec=spec, presets=presets,
                                          outputs=outputs, history=history, **service_kwargs)
    atexit.register(lambda: [g.close() for g in groups])
    log.info("%d GPU(s) %s in %s mode: %d worker group(s)", len(gpus), gpus, settings.multi_gpu, len(groups))
    return services


def _system_tab(settings: Settings, monitor, history):
    def measured_kernels() -> list[dict[str, Any]]:
        from pipeline.backends import kernels

        snapshot = monitor.read()
        return kernels.cached_choices(history, snapshot.gpu_name if snapshot else None)

    def render() -> None:
        import gradio as gr

        from install import doctor, weights
        from ui.system_tab import build_system_tab

        with gr.Tab("System"):
            build_system_tab(
                doctor=lambda: doctor.run_doctor(weights_dir=settings.weights_dir,
                                                 outputs_dir=settings.outputs_dir, monitor=monitor,
                                                 in_ui=True),
                weights_dir=settings.weights_dir,
                start_download=lambda: weights.iter_download(settings.weights_dir),
                kernels=measured_kernels)
    return render


def _login_guard(settings: Settings) -> tuple[Any, dict[str, Any]]:
    """The auth callable and FastAPI keyword arguments for launch(): throttled logins per address
    (ui/login.py). Nothing without --auth."""
    if settings.auth is None:
        return None, {}
    from starlette.middleware import Middleware

    from ui.login import LoginThrottle, LoginThrottleMiddleware, password_check

    throttle = LoginThrottle(lock_s=float(_env("WAN_STUDIO_LOGIN_LOCK_S", "30")))
    user, password = settings.auth
    return (password_check(user, password, throttle),
            {"middleware": [Middleware(LoginThrottleMiddleware, throttle=throttle)]})


def _startup_lines(settings: Settings, demo) -> list[str]:
    """What the terminal says once the server is up (Gradio's own lines are off: its share hint
    names a launch() argument, not this app's flags)."""
    lines = [f"* Running on local URL:  http://{settings.host}:{settings.port}"]
    if demo.share_url:
        lines.append(f"* Running on public URL: {demo.share_url} (login required)")
    elif settings.host in ("127.0.0.1", "localhost", "::1"):
        lines.append("* Only this machine can open it. For other machines: python app.py --listen "
                     "--auth user:pass (your network), or --share --auth user:pass (a public link).")
    lines.append("* Stop it with Ctrl+C; videos and their records are in "
                 f"{settings.outputs_dir.resolve()}")
    return lines


def serve(argv: list[str]) -> int:
    try:
        settings = settings_from_args(argv)
        demo, ctx = build_app(settings)
    except ConfigError as exc:
        sys.stderr.write(exc.message + "\n")
        return 2
    from ui.layout import CSS

    demo.queue(default_concurrency_limit=1, max_size=MAX_QUEUED)
    auth, app_kwargs = _login_guard(settings)
    try:
        demo.launch(server_name=settings.host, server_port=settings.port, share=settings.share,
                    auth=auth, show_error=True, css=CSS, quiet=True, prevent_thread_lock=True,
                    inbrowser=settings.open_browser,
                    app_kwargs=app_kwargs,
                    # Only the outputs folder is served, never the history database inside it.
                    allowed_paths=[str(settings.outputs_dir.resolve())],
                    blocked_paths=blocked_paths(settings), max_file_size=MAX_UPLOAD,
                    # This app keeps its own history; Gradio's run history could upload prompts
                    # and videos to a Hugging Face bucket, and its monitoring page is not needed.
                    run_history=False, enable_monitoring=False, mcp_server=False, ssr_mode=False)
    except OSError as exc:
        if "port" not in str(exc).lower():
            raise
        sys.stderr.write(f"Cannot listen on {settings.host}:{settings.port}: the port is in use "
                         f"(is Wan T2V Studio already running?). Choose another with --port.\n")
        return 1
    for line in _startup_lines(settings, demo):
        log.info("%s", line)
    _run_until_stopped(demo, ctx.jobs)
    return 0


STOPPED_MESSAGE = ("Wan T2V Studio was stopped (Ctrl+C or shutdown) before this job finished; "
                   "nothing was saved for it. Start the app again (python app.py) and press Generate.")


def _run_until_stopped(demo, jobs) -> None:
    """Serve until Ctrl+C or SIGTERM; then tell every waiting or running job's client why it ends,
    before the server goes (a client cut off without a word sees only a broken connection)."""
    import signal
    import time

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        while True:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    stopped = jobs.stop_all(STOPPED_MESSAGE)
    if stopped:
        log.warning("stopping: %d unfinished job(s) stopped; telling their clients", stopped)
        jobs.wait_idle(15)  # a running job stops at its next step boundary
        time.sleep(0.5)  # the followers poll every 0.1 s: their last message goes out
    log.info("stopped")
    demo.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=_env("WAN_STUDIO_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "download":
        from install.cli import main_download

        return main_download(argv[1:])
    if argv and argv[0] == "doctor":
        from install.doctor import main_doctor

        return main_doctor(argv[1:])
    return serve(argv)


if __name__ == "__main__":
    sys.exit(main())
