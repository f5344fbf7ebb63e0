import os
import select
import sys

from .cli import main


def stdout_reader_left() -> bool:
    """Whether standard output is a pipe whose reader has closed it (``... | head``)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # (no such descriptor, or no poll on this platform)
        return False


if __name__ == "__main__":
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError as exc:
        if not stdout_reader_left():  # another pipe than the output's: an error of the command
            print(f"error: {exc}", file=sys.stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's own flush at exit would raise)
        status = 1
    raise SystemExit(status)
