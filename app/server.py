"""python app.py [--host 127.0.0.1] [--port 7860] [--auth USER:PASS] [--runs_dir DIR] [--allow_read DIR ...]

Starts the studio. It listens on 127.0.0.1 unless told otherwise (reach it through `ssh -L`), serves files
only from runs_dir, and exits with one line (no traceback) on a bad flag or a port in use.
"""

from __future__ import annotations

import argparse
import errno
import getpass
import os
import socket
import sys

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from calligrapher_rl.errors import UserError, cli_main  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(message, where="command line")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python app.py", description="The Calligrapher RL studio (Gradio): train, watch, infer, compare.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: use ssh -L; "
                                                       "0.0.0.0 exposes it to the network, use --auth then)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    p.add_argument("--runs_dir", default="runs", metavar="DIR", help="where runs and saved presets live (default ./runs)")
    p.add_argument("--allow_read", action="append", default=[], metavar="DIR",
                   help="a folder runs started from the page may read models and datasets from (repeatable); "
                        "always allowed: runs_dir, this repository, the project's cache, the Hugging Face cache")
    return p


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UserError("expected USER:PASS (both non-empty)", field="--auth")
    return user, password


def check_port(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise UserError(f"expected a port in 1-65535, got {port}", field="--port")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a closing socket is no conflict
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} on {host} is in use (another studio?); pick another with "
                                f"--port {port + 1}", field="--port") from None
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror})", field="--host") from None


def ssh_hint(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return (f"Studio: http://{shown}:{port}\n"
            f"From your laptop:  ssh -N -L {port}:127.0.0.1:{port} {getpass.getuser()}@{socket.gethostname()}\n"
            f"then open http://localhost:{port}")


QUEUE_POLL_S = 2.0


def _start_queue_thread(runs_dir: str, service=None) -> None:
    """Queued runs start when their GPUs are free, whether or not a page is open; the studio's own inference model
    leaves the card first (gpu_room.make_room_for_run)."""
    import threading
    import time
    import traceback

    from .gpu_queue import start_ready
    from .gpu_room import make_room_for_run
    from .procs import _launch

    def launch(run_dir, argv, gpus):
        make_room_for_run(service, gpus)
        return _launch(run_dir, argv, gpus)

    def loop():
        while True:
            try:
                start_ready(runs_dir, launch=launch)
            except Exception:  # noqa: BLE001 - the queue must outlive one bad run folder; say what happened
                traceback.print_exc()
            time.sleep(QUEUE_POLL_S)

    threading.Thread(target=loop, name="studio-queue", daemon=True).start()


def launch(runs_dir: str, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None,
           prevent_thread_lock: bool = False, quiet: bool = False, allow_read: list[str] | None = None):
    """Build and launch the Blocks; returns the demo (with prevent_thread_lock=True the call returns at once)."""
    from .gpu_room import GpuRoom
    from .inference import InferenceService
    from .layout import CSS, JS, build_demo
    from .runs import default_read_roots

    runs_dir = os.path.abspath(runs_dir)
    os.makedirs(runs_dir, exist_ok=True)
    service = InferenceService(room=GpuRoom(runs_dir))  # one per studio: the tabs and the queue share it
    demo = build_demo(runs_dir, service, read_roots=default_read_roots(runs_dir)
                      + [os.path.abspath(d) for d in allow_read or []])
    demo.queue(default_concurrency_limit=1)
    _start_queue_thread(runs_dir, service)
    try:
        demo.launch(server_name=host, server_port=port, auth=auth, allowed_paths=[runs_dir], css=CSS, js=JS,
                    prevent_thread_lock=prevent_thread_lock, quiet=quiet, show_error=True,
                    auth_message="Calligrapher RL studio" if auth else None)
    except OSError as exc:
        if "port" in str(exc).lower():
            raise UserError(f"port {port} on {host} is in use; pick another with --port {port + 1}",
                            field="--port") from None
        raise
    return demo


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    auth = parse_auth(args.auth)
    if os.path.exists(args.runs_dir) and not os.path.isdir(args.runs_dir):
        raise UserError("exists and is not a folder", where=args.runs_dir, field="--runs_dir")
    try:
        os.makedirs(args.runs_dir, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create it ({exc.strerror})", where=args.runs_dir, field="--runs_dir") from None
    if not os.access(args.runs_dir, os.W_OK):
        raise UserError("not writable", where=args.runs_dir, field="--runs_dir")
    for folder in args.allow_read:
        if not os.path.isdir(folder):
            raise UserError("no such folder", where=folder, field="--allow_read")
    check_port(args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not auth:
        print(f"warning: listening on {args.host} without --auth: anyone who reaches this port can start runs",
              file=sys.stderr)
    demo = launch(args.runs_dir, args.host, args.port, auth, prevent_thread_lock=True, quiet=True,
                  allow_read=args.allow_read)
    print(f"Runs folder: {os.path.abspath(args.runs_dir)}\n{ssh_hint(args.host, args.port)}", flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    cli_main(main)
