"""The process jupyter_client starts for a warm kernel: the standard library only, so it starts in milliseconds.

usage: python _kernel_launch.py SOCKET [ipykernel arguments...]

It asks the zygote at SOCKET (`peftkit.notebook.warm_kernel`) to fork a kernel with this process's
arguments, working directory, environment and standard streams, then stands in for it: signals it gets
go to the kernel, and it exits when the kernel does. If the zygote cannot be reached or refuses, it
becomes an ordinary kernel (`python -m ipykernel_launcher ...`), so a kernel always starts.
"""

import json
import os
import select
import signal
import socket
import sys


def _ordinary(argv):
    os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", *argv])


def main():
    path, argv = sys.argv[1], sys.argv[2:]
    if os.environ.get("PEFTKIT_WARM_KERNEL", "1") == "0":
        _ordinary(argv)
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "launcher": os.getpid()}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(60)
            conn.connect(path)
            socket.send_fds(conn, [(json.dumps(request) + "\n").encode()], [0, 1, 2])
            reply = b""
            while not reply.endswith(b"\n"):
                more = conn.recv(65536)
                if not more:
                    break
                reply += more
        reply = json.loads(reply or b"{}")
    except (OSError, ValueError) as e:
        reply = {"refused": str(e)}
    if "pid" not in reply:
        print(f"peftkit: no warm kernel ({reply.get('refused', 'no reply')}); starting an ordinary one.", file=sys.stderr)
        _ordinary(argv)
    pid = int(reply["pid"])

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return 0
    while True:
        try:
            if select.select([pidfd], [], [])[0]:
                return 0
        except InterruptedError:
            continue


if __name__ == "__main__":
    sys.exit(main())
