"""Opens COUNT keep-alive connections to 127.0.0.1:PORT, sends one GET on
each and reads its response, then holds them all open and idle.

    python3 bench/hold.py PORT COUNT

Prints "held N OK" (N connections, OK of them answered 200) once they are
all open and idle, then waits for standard input to close before closing
them.
"""

import selectors
import socket
import sys


def main() -> None:
    port, count = int(sys.argv[1]), int(sys.argv[2])
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    selector = selectors.DefaultSelector()
    connections = []
    # At most this many exchanges at once, like a crowd arriving.
    window = 200
    pending = {}
    ok = 0
    opened = 0
    while opened < count or pending:
        while opened < count and len(pending) < window:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(request)
            sock.setblocking(False)
            pending[sock] = b""
            selector.register(sock, selectors.EVENT_READ)
            connections.append(sock)
            opened += 1
        for key, _ in selector.select(timeout=10):
            sock = key.fileobj
            chunk = sock.recv(65536)
            if not chunk:
                raise SystemExit(f"connection {sock.getsockname()} closed early")
            pending[sock] += chunk
            if complete(pending[sock]):
                ok += pending[sock].startswith(b"HTTP/1.1 200 ")
                selector.unregister(sock)
                del pending[sock]
    print(f"held {len(connections)} {ok}", flush=True)
    sys.stdin.read()
    for sock in connections:
        sock.close()


def complete(response: bytes) -> bool:
    """Whether a response with a Content-Length body has arrived whole."""
    head_end = response.find(b"\r\n\r\n")
    if head_end < 0:
        return False
    for line in response[:head_end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(response) - head_end - 4 >= int(value)
    raise SystemExit(f"no Content-Length in {response[:head_end]!r}")


if __name__ == "__main__":
    main()
